"""Data: scikit-learn's bundled digits (the embedded default), MNIST from IDX files given
by path, and seeded synthetic inputs of any shape for models with no bundled data set."""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DIGITS_TEST_FRACTION = 0.2     # 1,797 images -> 1,438 to train, 359 to test


@dataclass(frozen=True)
class Dataset:
    x_train: np.ndarray        # (N, features) float32
    y_train: np.ndarray        # (N,) int64
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int


def digits(seed: int = 0) -> Dataset:
    """8x8 digits scaled to [0, 1], split by a seeded permutation."""
    raw = _digits_csv()                               # (1797, 65): 64 pixels 0..16, then the label
    x = (raw[:, :-1] / 16.0).astype(np.float32)       # (1797, 64)
    y = raw[:, -1].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(len(x) * DIGITS_TEST_FRACTION))
    test, train = order[:n_test], order[n_test:]
    return Dataset(x[train], y[train], x[test], y[test], 10)


def _digits_csv() -> np.ndarray:
    """What ``sklearn.datasets.load_digits`` reads, read without importing scikit-learn
    (1.4 s of every rank's start here, against 0.03 s); through it where the file moved."""
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if path is not None and path.exists():
        return np.loadtxt(path, delimiter=",")
    from sklearn.datasets import load_digits
    d = load_digits()
    return np.column_stack([d.data, d.target])


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST's format), gzipped or not.  Raises ValueError on a bad header."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if raw[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{raw[2]:02x}")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtypes[raw[2]], offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {data.size} elements")
    return data.reshape(dims)


def mnist(folder: str | Path) -> Dataset:
    """MNIST from the four standard IDX files in ``folder`` (gzipped or not)."""
    folder = Path(folder)

    def load(stem: str) -> np.ndarray:
        for name in (stem, stem + ".gz"):
            if (folder / name).exists():
                return read_idx(folder / name)
        raise FileNotFoundError(folder / stem)
    xtr, ytr = load("train-images-idx3-ubyte"), load("train-labels-idx1-ubyte")
    xte, yte = load("t10k-images-idx3-ubyte"), load("t10k-labels-idx1-ubyte")
    flat = lambda a: (a.reshape(len(a), -1) / 255.0).astype(np.float32)   # noqa: E731
    return Dataset(flat(xtr), ytr.astype(np.int64), flat(xte), yte.astype(np.int64), 10)


def synthetic(shape: tuple[int, ...], classes: int, n: int, rng: np.random.Generator) -> Dataset:
    """Seeded random inputs and labels of the right shapes (timing runs of big models)."""
    x = rng.standard_normal((n, *shape), dtype=np.float32)
    y = rng.integers(0, max(classes, 1), n)
    return Dataset(x, y, x[: max(1, n // 5)], y[: max(1, n // 5)], classes)


class Batches:
    """An endless, seeded stream of mini-batches over one replica's shard of the data."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch: int, rng: np.random.Generator) -> None:
        self.x, self.y, self.batch, self.rng = x, y, min(batch, len(x)), rng
        self.order, self.pos = rng.permutation(len(x)), 0

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = self.rng.permutation(len(self.x)), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return self.x[idx], self.y[idx]
