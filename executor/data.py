"""Data: scikit-learn's bundled digits (the embedded default), a seeded corpus of a small
fixed grammar (next-token prediction), MNIST from IDX files given by path, and seeded
synthetic inputs of any shape for models with no bundled data set; ``for_model`` picks a
model's own (``clustersim.core.models.bundled_data``)."""
from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clustersim.core.models import Model, bundled_data

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


def synthetic(shape: tuple[int, ...], classes: int, n: int, rng: np.random.Generator, vocab: int = 0,
              positions: int = 1, least: int = 1) -> Dataset:
    """Seeded random inputs and labels of the right shapes (timing runs of big models), and
    a held-out fifth drawn apart (it was a slice of the training set: 100% "test" accuracy
    on random labels); its accuracy is chance.  ``vocab`` > 0: the inputs are token ids
    below it (as float32, what an embedding reads); ``positions`` > 1: a label at each of
    that many positions, (N, positions), as a sequence model predicts.  The held-out set has
    at least ``least`` samples: the micro-batches it is evaluated in, none of them empty."""
    m = max(1, least, n // 5)
    x = (rng.integers(0, vocab, (n + m, *shape)).astype(np.float32) if vocab
         else rng.standard_normal((n + m, *shape), dtype=np.float32))
    y = rng.integers(0, max(classes, 1), (n + m, positions) if positions > 1 else n + m)
    return Dataset(x[:n], y[:n], x[n:], y[n:], classes)


# --- the grammar corpus ---------------------------------------------------------------------
# Sentences "the [adj] noun verb the [adj] noun ." over 19 words; the verb agrees in number
# with the subject (so predicting it needs the noun before), each optional adjective is
# there with probability 1/2, all choices uniform.  The corpus is one seeded stream of
# sentences cut into windows of T + 1 words: a sequence is the first T, its labels the last
# T (the next word at every position).  Accuracy is next-word accuracy over every position
# of held-out sequences (a stream of its own).  Chance is 1/19; always saying "the" scores
# 2/7 (its share of the words); a predictor that knows the grammar scores at most 0.54 (per
# sentence of 7 words on average: 1/6 after each "the", 1/8 after an adjective, 1/3 for the
# verb, 1 after the verb, after the object and after "."; docs/decisions/020).
GRAMMAR_WORDS = (".", "the", "big", "small", "red",
                 "cat", "dog", "bird", "fox", "cats", "dogs", "birds", "foxes",
                 "sees", "chases", "likes", "see", "chase", "like")
_THE, _ADJ, _NOUN, _VERB = 1, (2, 5), (5, 9), (13, 16)   # "the"; [lo, hi) of adjectives, singular nouns and verbs
_PLURAL = 4                                               # plural nouns and verbs: 4 and 3 words after the singular
GRAMMAR_TRAIN, GRAMMAR_TEST = 2048, 256                  # sequences


def grammar_stream(n_words: int, rng: np.random.Generator) -> np.ndarray:
    """At least ``n_words`` word ids: whole sentences of the grammar above."""
    words: list[int] = []
    while len(words) < n_words:
        plural = int(rng.integers(2))
        for subject in (True, False):
            words.append(_THE)
            if rng.integers(2):
                words.append(int(rng.integers(*_ADJ)))
            noun = int(rng.integers(*_NOUN))
            if subject:
                words += [noun + _PLURAL * plural, int(rng.integers(*_VERB)) + 3 * plural]
            else:
                words += [noun + _PLURAL * int(rng.integers(2)), 0]
    return np.asarray(words, np.int64)


def grammar(seed: int, positions: int, n_train: int = GRAMMAR_TRAIN, n_test: int = GRAMMAR_TEST) -> Dataset:
    """Sequences of ``positions`` word ids (as float32, what an embedding reads) and their
    next words (int64, (N, positions)); train and test from two seeded streams."""
    def windows(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        w = grammar_stream(n * (positions + 1), rng)[:n * (positions + 1)].reshape(n, positions + 1)
        return w[:, :-1].astype(np.float32), w[:, 1:].copy()
    x_tr, y_tr = windows(n_train, np.random.default_rng([seed, 0]))
    x_te, y_te = windows(n_test, np.random.default_rng([seed, 1]))
    return Dataset(x_tr, y_tr, x_te, y_te, len(GRAMMAR_WORDS))


def for_model(model: Model, seed: int) -> Dataset | None:
    """The data set ``model`` trains on where the package bundles one (inputs shaped as the
    model reads them), else None."""
    name = bundled_data(model)
    if name == "digits":
        d = digits(seed)
    elif name == "grammar":
        d = grammar(seed, model.input_shape[1])
    else:
        return None
    shape = model.input_shape
    return Dataset(d.x_train.reshape(len(d.x_train), *shape), d.y_train,
                   d.x_test.reshape(len(d.x_test), *shape), d.y_test, d.classes)


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
