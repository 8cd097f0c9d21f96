"""The latency cache's store: every network timed on this device, kept per device fingerprint (as TensorRT's timing
cache and TVM's tuning logs keep theirs), so profile, search, sweep, bench and the bake never time the same network
twice. The key (the device fingerprint and the graph hash) is `flexslim.latency.fingerprint`; its names are
re-exported here.

Where: `$FLEXSLIM_CACHE/latency/`, else the platform's cache folder (`$XDG_CACHE_HOME/flexslim`, by default
`~/.cache/flexslim`, on Linux; `~/Library/Caches/flexslim` on macOS; `%LOCALAPPDATA%\\flexslim\\Cache` on Windows).
`$FLEXSLIM_NO_CACHE=1` (the commands' `--no-cache`) neither reads nor writes it. The gate (`validate`, `export`)
never reads it: a verdict is always a fresh measurement. A fingerprint's sha256 (16 hex digits, `fingerprint_id`)
names its files `<id>.jsonl` (the entries), `<id>.json` (the fingerprint, readable) and `<id>.lock`.

An entry serves a request only when it was measured at least as thoroughly (`Thoroughness`: as many seconds of timed
passes over all sessions, as many sessions, as many timed passes each, and a stopping precision at least as fine - 0,
timed in full, is the finest): a quick probe never answers the bake's gate-length measurement, the other way round
it does. The newest such entry serves, as it was measured (the Timing
is stored whole and comes back equal), so a run served from the cache gives the numbers of the run that measured.

Files: one JSON line per entry, each with a checksum of its content; appended under an flock on `<id>.lock` (a
single write(), after a newline if a killed writer left a torn line), so two processes adding at once lose nothing.
Readers take no lock: a torn last line is skipped, and a line that does not parse, fails its checksum or its checks
(finite, positive milliseconds; this fingerprint's provider, batch, threads and percentile) is ignored with one note
line per file: a bad file is never a crash and never a wrong point. Bound: past MAX_ENTRIES entries or MAX_BYTES
bytes per fingerprint the oldest are dropped (the file rewritten atomically, under the lock, to KEEP of the caps).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, fields
from pathlib import Path

from flexslim.errors import BadInput
from flexslim.latency.fingerprint import (  # noqa: F401 - re-exported: the key, as before the split
    STATISTIC_VERSION,
    _cpu,
    _gpu,
    _host,
    fingerprint,
    fingerprint_id,
    graph_key,
    network_key,
)
from flexslim.latency.runtime import Timing
from flexslim.recipe.schema import LatencyConfig
from flexslim.system.files import atomic_write_bytes, atomic_write_json
from flexslim.system.locks import exclusive

CACHE_ENV = "FLEXSLIM_CACHE"  # the user's cache folder (the latency cache is its `latency/`; downloads live there too)
NO_CACHE_ENV = "FLEXSLIM_NO_CACHE"  # 1: neither read nor write the latency cache (`--no-cache`)
FOLDER = "latency"
ENTRY_VERSION = 1
MAX_ENTRIES = 4000  # per fingerprint (a profile measures 20-60 networks, a bake up to 16)
MAX_BYTES = 8 << 20  # per fingerprint; an entry is about 1 kB
KEEP = 0.75  # a file over a cap is cut to this fraction of the caps (not rewritten at every append)
_FILE = re.compile(r"[0-9a-f]{16}\.(jsonl|json|lock)|\.[0-9a-f]{16}\.(jsonl|json)\..+\.tmp")


def cache_root() -> Path:
    """The user's flexslim cache folder: $FLEXSLIM_CACHE, else the platform's (`data.sources.default_cache_dir`,
    which downloads use too)."""
    from flexslim.data.sources import default_cache_dir

    return default_cache_dir()


def latency_folder() -> Path:
    """Where the latency cache's files are."""
    return cache_root() / FOLDER


def enabled() -> bool:
    """False when $FLEXSLIM_NO_CACHE is set (to anything but '', 0, false, no)."""
    return os.environ.get(NO_CACHE_ENV, "").strip().lower() in ("", "0", "false", "no")


@contextlib.contextmanager
def switched_off(off: bool = True) -> Iterator[None]:
    """While open (and `off`), the latency cache is neither read nor written, in this process and in the processes it
    starts ($FLEXSLIM_NO_CACHE; restored afterwards): what `--no-cache` does."""
    if not off:
        yield
        return
    before = os.environ.get(NO_CACHE_ENV)
    os.environ[NO_CACHE_ENV] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(NO_CACHE_ENV, None)
        else:
            os.environ[NO_CACHE_ENV] = before


_READING: ContextVar[bool] = ContextVar("flexslim_latency_cache_reading", default=True)


@contextlib.contextmanager
def refreshing() -> Iterator[None]:
    """While open, measurements skip the cache's entries (they are still added): a deliberate second timing of a
    network (the bake re-times an outlier) must time it, not read back the first."""
    token = _READING.set(False)
    try:
        yield
    finally:
        _READING.reset(token)


@dataclass(frozen=True)
class Thoroughness:
    """How thoroughly a network is (or was) measured: seconds of timed passes over all its sessions, the sessions,
    the timed passes each had at least, and the precision its sessions could stop at (0: timed in full)."""

    seconds: float
    repeats: int
    runs: int
    precision: float = 0.0

    @classmethod
    def of(cls, settings: LatencyConfig) -> Thoroughness:
        """What `profiling.measure` asks for with `settings` (min_seconds is split among the repeats)."""
        return cls(
            float(settings.min_seconds), max(1, int(settings.repeats)), int(settings.runs), float(settings.precision)
        )

    def serves(self, wanted: Thoroughness) -> bool:
        """True when a measurement this thorough may answer a request for `wanted`."""
        finer = self.precision == 0 or 0 < self.precision <= wanted.precision
        return self.seconds >= wanted.seconds and self.repeats >= wanted.repeats and self.runs >= wanted.runs and finer


@dataclass(frozen=True)
class Tally:
    """Networks served from the cache (`hits`) and timed (`misses`, the cache on or off) in this process so far."""

    hits: int = 0
    misses: int = 0

    def __sub__(self, before: Tally) -> Tally:
        return Tally(self.hits - before.hits, self.misses - before.misses)


_COUNTS = {"hits": 0, "misses": 0}


def tally() -> Tally:
    """The counts so far; the difference of two tells what a stage took from the cache."""
    return Tally(**_COUNTS)


def served(net: str, settings: LatencyConfig) -> Timing | None:
    """The cached Timing of the network whose `network_key` is `net`, measured with `settings` at least as
    thoroughly, found without exporting it (None: the cache is off or refreshing, or it has none)."""
    if not enabled() or not _READING.get():
        return None
    hit = store_for(settings).get(net, Thoroughness.of(settings), by="net")
    if hit is not None:
        _COUNTS["hits"] += 1
    return hit


def timing_of(
    model: bytes, settings: LatencyConfig, measure: Callable[[], Timing], network: dict | None = None, net: str = ""
):
    """The Timing of the ONNX `model` measured with `settings`: this device's cache entry when one measured at least
    as thoroughly is there (and the cache is on, and not `refreshing`), else `measure()`, which is then added.
    `network` (family, widths, input shape) is stored next to it for people reading the file; `net`, its
    `network_key`, lets a later run find it without exporting (`served`)."""
    store = store_for(settings) if enabled() else None
    key = graph_key(model) if store is not None else ""
    wanted = Thoroughness.of(settings)
    if store is not None and _READING.get():
        hit = store.get(key, wanted)
        if hit is not None:
            _COUNTS["hits"] += 1
            if net:  # the same graph from other code: found by its network key next time
                store.put(key, hit, wanted, network, net=net)
            return hit
    t = measure()
    _COUNTS["misses"] += 1
    if store is not None:
        store.put(key, t, wanted, network, net=net)
    return t


_STORES: dict[tuple[str, str], LatencyCache] = {}


def store_for(settings: LatencyConfig, folder: Path | None = None) -> LatencyCache:
    """The cache of this device at `settings` (under `latency_folder()` by default), one object per file per process
    (it remembers what it parsed)."""
    folder = Path(folder or latency_folder())
    fp = fingerprint(settings)
    key = (str(folder), fingerprint_id(fp))
    if key not in _STORES:
        _STORES[key] = LatencyCache(folder, fp)
    return _STORES[key]


# -- the store ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One cached measurement: the graph's key, how thoroughly it was measured, the Timing, when (unix seconds)."""

    key: str
    measured: Thoroughness
    timing: Timing
    at: float
    network: dict | None = None
    net: str = ""  # the network key (`fingerprint.network_key`): found without exporting


_NOTED: set[str] = set()


def _note(line: str) -> None:
    """One note line on stderr."""
    print(f"note: {line}", file=sys.stderr, flush=True)


class LatencyCache:
    """The entries of one device fingerprint `fp` in `folder` (see the module notes for the files and the rules).

    Example::

        store = LatencyCache(latency_folder(), fingerprint(settings))
        store.put(graph_key(model), timing, Thoroughness.of(settings))
        store.get(graph_key(model), Thoroughness.of(settings))   # -> that timing
    """

    def __init__(
        self, folder: Path, fp: dict, *, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES, note=None
    ):
        self.folder, self.fp, self.id = Path(folder), dict(fp), fingerprint_id(fp)
        self.path = self.folder / f"{self.id}.jsonl"
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.note = note or _note
        self._seen: tuple | None = None
        self._parsed: list[Entry] = []

    # -- reading --------------------------------------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        """Every valid entry, oldest first (re-read only when the file changed; a bad line: one note per file)."""
        try:
            st = self.path.stat()
        except OSError:
            return []
        seen = (st.st_ino, st.st_size, st.st_mtime_ns)
        if seen != self._seen:
            try:
                data = self.path.read_bytes()
            except OSError as err:
                self._note_once(f"latency cache {self.path} cannot be read ({err.strerror}); timing afresh")
                return []
            self._parsed, bad = parse(data, self.id, self.fp)
            self._seen = seen
            if bad:
                self._note_once(f"latency cache {self.path}: {bad} corrupt entr{'y' if bad == 1 else 'ies'} ignored")
        return self._parsed

    def get(self, key: str, wanted: Thoroughness, by: str = "key") -> Timing | None:
        """The newest entry of `key` (its graph key; by="net": its network key) measured at least as thoroughly as
        `wanted` (None: none)."""
        for e in reversed(self.entries()):
            if getattr(e, by) == key and key and e.measured.serves(wanted):
                return e.timing
        return None

    # -- writing --------------------------------------------------------------------------------------------------
    def put(self, key: str, timing: Timing, measured: Thoroughness, network: dict | None = None, net: str = "") -> bool:
        """Add a measurement (under the lock; the oldest dropped past the caps); False when it was not added: a timing
        that stopped early or belongs to another fingerprint, or a cache folder that cannot be written (one note)."""
        if timing.stopped is not None or not _belongs(timing, self.fp):
            return False
        body = {
            "v": ENTRY_VERSION,
            "fp": self.id,
            "key": key,
            "at": time.time(),
            "measured": {
                "seconds": measured.seconds,
                "repeats": measured.repeats,
                "runs": measured.runs,
                "precision": measured.precision,
            },
            "network": network,
            "timing": timing.to_dict(),
        }
        if net:
            body["net"] = net
        line = json.dumps({**body, "sum": _checksum(body)}, sort_keys=True).encode()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            with exclusive(self.folder / f"{self.id}.lock"):
                if not (self.folder / f"{self.id}.json").is_file():
                    atomic_write_json(self.folder / f"{self.id}.json", self.fp)
                self._append(line)
                self._bound()
        except (OSError, BadInput) as err:  # never fail a run over its cache: the timing stands, it is only not kept
            why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            self._note_once(f"latency cache {self.folder} cannot be written ({why}); the timing is not kept")
            return False
        return True

    def _append(self, line: bytes) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            size = os.fstat(fd).st_size
            torn = size > 0 and os.pread(fd, 1, size - 1) != b"\n"  # a writer killed mid-line: start a line of our own
            data = (b"\n" if torn else b"") + line + b"\n"
            if os.write(fd, data) != len(data):
                raise OSError(28, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)

    def _bound(self) -> None:
        """Past a cap, rewrite the file with the newest valid entries up to KEEP of both caps (under the lock)."""
        data = self.path.read_bytes()
        lines = [ln for ln in data.split(b"\n") if ln.strip()]
        if len(lines) <= self.max_entries and len(data) <= self.max_bytes:
            return
        good = [ln for ln in lines if _entry(ln, self.id, self.fp) is not None]
        kept: list[bytes] = []
        size = 0
        for ln in reversed(good):  # newest first
            if len(kept) >= max(1, int(KEEP * self.max_entries)) or size + len(ln) + 1 > KEEP * self.max_bytes:
                break
            kept.append(ln)
            size += len(ln) + 1
        atomic_write_bytes(self.path, b"".join(ln + b"\n" for ln in reversed(kept)))

    def _note_once(self, line: str) -> None:
        if str(self.path) not in _NOTED:
            _NOTED.add(str(self.path))
            self.note(line)


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def _belongs(t: Timing, fp: dict) -> bool:
    """The timing was made with the fingerprint's provider, batch, threads and percentile (those it names)."""
    want = {"provider": t.provider, "batch": t.batch, "threads": t.threads, "percentile": t.percentile}
    return all(fp[k] == v for k, v in want.items() if k in fp)


def parse(data: bytes, fp_id: str, fp: dict) -> tuple[list[Entry], int]:
    """(the valid entries of a cache file's bytes, oldest first; how many lines were corrupt). The text after the
    last newline is a write in progress or cut short by a kill: skipped, not counted."""
    lines = data.split(b"\n")
    lines.pop()  # b"" when the file ends with a newline, else the torn last line
    out, bad = [], 0
    for line in lines:
        if not line.strip():
            continue
        e = _entry(line, fp_id, fp)
        if e is None:
            bad += 1
        elif e.key:
            out.append(e)
    return out, bad


def _entry(line: bytes, fp_id: str, fp: dict) -> Entry | None:
    """The Entry of one line, or None when it is not one this fingerprint may use."""
    try:
        d = json.loads(line)
        body = {k: v for k, v in d.items() if k != "sum"}
        if d["sum"] != _checksum(body) or d["v"] != ENTRY_VERSION or d["fp"] != fp_id:
            return None
        m = d["measured"]
        precision = _number(m.get("precision", 0.0), 0.0)  # entries made before precision were timed in full
        measured = Thoroughness(_number(m["seconds"], 0.0), _whole(m["repeats"], 1), _whole(m["runs"], 0), precision)
        timing = _timing(d["timing"])
        if not isinstance(d["key"], str) or not _belongs(timing, fp):
            return None
        network, net = d.get("network"), d.get("net", "")
        if not isinstance(net, str):
            return None
        network = network if isinstance(network, dict) else None
        return Entry(d["key"], measured, timing, _number(d["at"], 0.0), network, net)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return None


_POSITIVE_MS = ("p50_ms", "p90_ms", "at_percentile_ms", "mean_ms")
_OPTIONAL_MS = ("all_passes_ms", "fastest_ms", "timeout_s", "ci_low_ms", "ci_high_ms")


def _timing(d: dict) -> Timing:
    """A Timing from its `to_dict()`, every figure checked (ValueError/TypeError otherwise)."""
    if not isinstance(d, dict) or set(d) - {f.name for f in fields(Timing)}:
        raise ValueError("not a timing")
    t = Timing(**{**d, **{k: tuple(d[k]) for k in ("input_shape", "sessions", "cpu_nodes") if k in d}})
    if not isinstance(t.provider, str) or not isinstance(t.runtime, str) or t.stopped is not None:
        raise ValueError("provider, runtime, stopped")
    for name in _POSITIVE_MS:
        _number(getattr(t, name), 0.0, strict=True)
    for name in _OPTIONAL_MS:
        if getattr(t, name) is not None:
            _number(getattr(t, name), 0.0, strict=True)
    for v in t.sessions:
        _number(v, 0.0, strict=True)
    _number(t.percentile, 0.0)
    _number(t.elapsed_s, 0.0)
    _number(t.precision, 0.0)
    if not isinstance(t.known, bool):
        raise ValueError("known")
    for v in (t.batch, *t.input_shape):
        _whole(v, 1)
    for v in (t.threads, t.warmup, t.runs, t.windows, t.quiet_windows):
        _whole(v, 0)
    if not all(isinstance(n, str) for n in t.cpu_nodes):
        raise ValueError("cpu_nodes")
    return t


def _number(v, low: float, strict: bool = False) -> float:
    if (
        isinstance(v, bool)
        or not isinstance(v, (int, float))
        or not math.isfinite(v)
        or v < low
        or (strict and v <= low)
    ):
        raise ValueError(f"not a number >= {low}: {v!r}")
    return float(v)


def _whole(v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"not a whole number >= {low}: {v!r}")
    return v


# -- `flexslim cache list | clear` ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheFile:
    """One fingerprint's file in the cache folder: its id, fingerprint (None: its .json is missing or unreadable),
    valid entries, corrupt lines, bytes."""

    id: str
    fingerprint: dict | None
    entries: int
    corrupt: int
    size: int
    path: Path


def listing(folder: Path | None = None) -> list[CacheFile]:
    """Every fingerprint's file in the cache folder (default `latency_folder()`), by id."""
    folder = Path(folder or latency_folder())
    out = []
    for path in sorted(folder.glob("*.jsonl")) if folder.is_dir() else []:
        if not _FILE.fullmatch(path.name) or not path.is_file():
            continue
        fp_id = path.stem
        fp = _read_fingerprint(folder / f"{fp_id}.json")
        data = path.read_bytes()
        entries, bad = parse(data, fp_id, fp or {})
        out.append(CacheFile(fp_id, fp, len(entries), bad, len(data), path))
    return out


def _read_fingerprint(path: Path) -> dict | None:
    try:
        fp = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return fp if isinstance(fp, dict) and fingerprint_id(fp) == path.stem else None


def describe(fp: dict | None) -> str:
    """One line on a fingerprint: the device, onnxruntime, and the timing settings it holds."""
    if not fp:
        return "unknown device (its .json is missing or corrupt)"
    device = fp.get("gpu") if fp.get("provider") == "cuda" else fp.get("cpu")
    cores = f", {fp['cores']} cores" if fp.get("provider") != "cuda" and fp.get("cores") else ""
    threads = fp.get("threads") or "default"
    return (
        f"{fp.get('provider')} {device}{cores}, onnxruntime {fp.get('onnxruntime')}, threads {threads}, "
        f"batch {fp.get('batch')}, p{fp.get('percentile', 0):g}"
    )


def clear(folder: Path | None = None) -> list[Path]:
    """Delete the latency cache's own files from the cache folder (nothing else there), then the folder if that left
    it empty; returns what was deleted."""
    folder = Path(folder or latency_folder())
    removed = []
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if _FILE.fullmatch(path.name) and (path.is_file() or path.is_symlink()):
            path.unlink(missing_ok=True)
            removed.append(path)
    with contextlib.suppress(OSError):
        folder.rmdir()  # only when empty
    _STORES.clear()
    return removed
