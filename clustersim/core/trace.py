"""Span records both runners emit, the metrics read from them, Chrome trace export.

A span is one thing that took time somewhere: a compute op on a device, a transfer
between two devices (with the directed links it crossed), a parameter update.  Metrics,
plots and validation read only spans.
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from clustersim.core.config import ConfigError

KINDS = ("compute", "transfer", "update", "wait")


@dataclass(slots=True)
class Span:
    name: str            # e.g. "fwd L3", "allreduce", "halo L2"
    kind: str            # compute | transfer | update | wait
    where: str           # device, or "src->dst" for a transfer
    replica: int
    step: int
    start_s: float
    end_s: float
    bytes: float = 0.0
    flops: float = 0.0
    phase: str = ""      # fwd | bwd | activation | halo | gradient | reduction | stage | allreduce | push | fetch | update
    links: tuple[str, ...] = ()   # directed links "u>v" a transfer crossed

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


@dataclass(frozen=True)
class Update:
    """One entry of the update log: what happened to parameters, in simulated order.

    kinds: ``grad`` (a replica takes a gradient on the parameters it holds, at the start
    of its step), ``send`` (it sends what it accumulated: info push), ``apply`` (a shard,
    or the whole vector when shard = -1, applies pushes: info pushes, replicas),
    ``snap`` / ``deliver`` (a shard's values are read for a fetch / arrive at the replica:
    info fetch), ``local`` (a replica's own SGD step), ``average`` (replicas' parameters
    averaged), ``unit`` / ``won`` (sandblaster work unit taken / first result kept),
    ``lbfgs`` (the batch's L-BFGS step), ``checkpoint`` / ``restore``."""

    t: float
    kind: str
    replica: int
    shard: int
    step: int
    info: dict


@dataclass
class Trace:
    spans: list[Span] = field(default_factory=list)
    step_ends: list[float] = field(default_factory=list)   # simulated time at which each step finished
    updates: list[Update] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)     # per applied update: shard versions it missed
    replica_steps: list[tuple[int, int, float, float]] = field(default_factory=list)  # (replica, step, start, end)

    def add(self, span: Span) -> None:
        self.spans.append(span)

    def step_times(self) -> list[float]:
        starts = [0.0] + self.step_ends[:-1]
        return [b - a for a, b in zip(starts, self.step_ends)]

    def device_busy(self) -> dict[str, float]:
        """Seconds each device spent computing (union of its compute/update spans)."""
        by_dev: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for s in self.spans:
            if s.kind in ("compute", "update"):
                by_dev[s.where].append((s.start_s, s.end_s))
        return {dev: union_length(iv) for dev, iv in by_dev.items()}

    def link_bytes(self) -> dict[str, float]:
        out: dict[str, float] = defaultdict(float)
        for s in self.spans:
            for link in s.links:
                out[link] += s.bytes
        return dict(out)

    def save(self, path: str | Path) -> None:
        """Writes the trace as Chrome/Perfetto JSON that ``load`` reads back whole."""
        write_atomic(path, json.dumps(self.to_chrome()))

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        """A trace written by ``save`` (either runner's): spans, step ends, replica steps,
        staleness (not the update log).  Raises ValueError for a file that is not one."""
        try:
            data = json.loads(Path(path).read_text())
            names = {(e["pid"], e["tid"]): e["args"]["name"] for e in data["traceEvents"]
                     if e.get("name") == "thread_name"}
            spans = [Span(e["name"], e["args"]["kind"], names[(e["pid"], e["tid"])], e["args"]["replica"],
                          e["args"]["step"], e["ts"] * 1e-6, (e["ts"] + e["dur"]) * 1e-6, e["args"]["bytes"],
                          e["args"]["flops"], e["args"]["phase"], tuple(e["args"]["links"]))
                     for e in data["traceEvents"] if e.get("ph") == "X"]
            extra = data["otherData"]["clustersim"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a clustersim trace ({exc.__class__.__name__}: {exc})") from None
        return cls(spans, extra["step_ends"], [], extra["staleness"], [tuple(x) for x in extra["replica_steps"]])

    def to_chrome(self) -> dict:
        """Chrome trace events (ts, dur in microseconds): one process per device or link
        owner; ``args`` and ``otherData`` carry what ``load`` needs to rebuild the Trace."""
        events, pids, tids = [], {}, {}
        for s in self.spans:
            where = s.where.split("->")[0] if s.kind == "transfer" else s.where
            group = where.split(".")[0]
            pid = pids.setdefault(group, len(pids))
            tid = tids.setdefault((group, s.where), len(tids))
            events.append({"name": s.name, "cat": s.phase or s.kind, "ph": "X", "pid": pid, "tid": tid,
                           "ts": s.start_s * 1e6, "dur": s.duration_s * 1e6,
                           "args": {"replica": s.replica, "step": s.step, "bytes": s.bytes, "flops": s.flops,
                                    "kind": s.kind, "phase": s.phase, "links": list(s.links)}})
        for group, pid in pids.items():
            events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": group}})
        for (group, where), tid in tids.items():
            events.append({"name": "thread_name", "ph": "M", "pid": pids[group], "tid": tid, "args": {"name": where}})
        return {"traceEvents": events, "displayTimeUnit": "ms",
                "otherData": {"clustersim": {"step_ends": self.step_ends, "staleness": self.staleness,
                                             "replica_steps": [list(x) for x in self.replica_steps]}}}


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def unwritable(path: str | Path, exc: OSError) -> ConfigError:
    """The one-line error of an output ``path`` the OS refused (``exc``)."""
    return ConfigError(str(path), "", f"cannot write there: {exc.strerror or exc}")


def check_writable(path: str | Path, option: str = "") -> None:
    """Refuses, before any work is done, an output path ``replace_atomic`` could not write:
    a folder, one under a file, or one whose nearest existing folder takes no new file
    (probed with a temporary file, removed at once; nothing else is made); the error names
    ``option`` where one asked for the path.  Paths written in place (/dev, /proc, FIFOs)
    are left to the write."""
    shown = Path(path)
    real = Path(os.path.realpath(shown))
    if os.path.abspath(shown).startswith(("/dev/", "/proc/")) or (real.exists() and not real.is_dir()
                                                                  and not real.is_file()):
        return

    def refused(why: str) -> ConfigError:
        return ConfigError(option, str(shown), why) if option else ConfigError(str(shown), "", why)
    if real.is_dir():
        raise refused("is a folder: give a file name")
    if shown.is_symlink() and not real.parent.is_dir():      # a link's target folder is never made
        raise refused(f"its link's folder {real.parent} does not exist")
    folder = next(p for p in real.parents if p.exists())
    if not folder.is_dir():
        raise refused(f"its folder cannot be made ({folder} is a file)")
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{real.name}.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as exc:
        raise refused(f"cannot write there: {exc.strerror or exc}") from None


def replace_atomic(path: str | Path, write) -> None:
    """Calls ``write(tmp_path)`` on a temporary file beside ``path``, then renames it into
    place with the usual permissions: the file is whole or absent, never half-written.  A
    path that cannot be written (a file where a folder should be, a folder, no permission)
    raises ConfigError naming it: one line, nothing else written.  A symlink's target is
    written (the link stays; a dangling one's folder must exist, as for the shell's ``>``),
    and a path that is neither a file nor a folder (a FIFO, a device) or lies under /dev or
    /proc (/dev/stdout, /dev/fd/N, whatever they lead to) is written in place, through the
    path given: a rename would replace the link, the FIFO or the device with a file."""
    shown = Path(path)
    try:
        kind = os.stat(shown).st_mode              # follows links, /proc's too
    except OSError:
        kind = None
    special = os.path.abspath(shown).startswith(("/dev/", "/proc/"))
    if special or (kind is not None and not stat.S_ISREG(kind) and not stat.S_ISDIR(kind)):
        try:
            write(str(shown))
        except OSError as exc:
            raise unwritable(shown, exc) from None
        return
    path = Path(os.path.realpath(shown))
    try:
        if not shown.is_symlink():
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix or ".tmp")
    except OSError as exc:
        raise unwritable(shown, exc) from None
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; outputs are for sharing
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise unwritable(shown, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> None:
    replace_atomic(path, lambda tmp: Path(tmp).write_text(text))


def write_chrome(trace: Trace, path: str | Path) -> None:
    trace.save(path)
