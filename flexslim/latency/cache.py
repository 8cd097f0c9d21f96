"""The latency cache: every network timed on this device, kept per device fingerprint (as TensorRT's timing
cache and TVM's tuning logs keep theirs), so profile, search, sweep, bench and the bake never time the same network
twice. The key (the device fingerprint and the graph hash) is `flexslim.latency.fingerprint`; its names are
re-exported here.

Where: `$FLEXSLIM_CACHE/latency/`, else the platform's cache folder (`$XDG_CACHE_HOME/flexslim`, by default
`~/.cache/flexslim`, on Linux; `~/Library/Caches/flexslim` on macOS; `%LOCALAPPDATA%\\flexslim\\Cache` on Windows).
`$FLEXSLIM_NO_CACHE=1` (the commands' `--no-cache`) neither reads nor writes it. The gate (`validate`, `export`)
never reads it: a verdict is always a fresh measurement. A fingerprint's sha256 (16 hex digits, `fingerprint_id`)
names its files `<id>.jsonl` (the entries), `<id>.json` (the fingerprint, readable) and `<id>.lock`; beside them
`<id>.rechecks.jsonl` holds how far re-timings of one network moved there (`flexslim.latency.rechecks`).

The store itself (the files, their entries, `Thoroughness`, `LatencyCache`) is `flexslim.latency.store`; its names are
re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

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
from flexslim.latency.store import (  # noqa: F401 - re-exported: the store, as before the split
    ENTRY_VERSION,
    KEEP,
    MAX_BYTES,
    MAX_ENTRIES,
    Entry,
    LatencyCache,
    Thoroughness,
    _checksum,
    parse,
)
from flexslim.recipe.schema import LatencyConfig

CACHE_ENV = "FLEXSLIM_CACHE"  # the user's cache folder (the latency cache is its `latency/`; downloads live there too)
NO_CACHE_ENV = "FLEXSLIM_NO_CACHE"  # 1: neither read nor write the latency cache (`--no-cache`)
FOLDER = "latency"
# a fingerprint's entries, fingerprint and lock; its re-timings (`rechecks`); their atomic writes' temporary files
_FILE = re.compile(r"[0-9a-f]{16}(\.rechecks)?\.(jsonl|json|lock)|\.[0-9a-f]{16}(\.rechecks)?\.(jsonl|json)\..+\.tmp")


def cache_root() -> Path:
    """The user's flexslim cache folder: $FLEXSLIM_CACHE, else the platform's (`data.cachedir.default_cache_dir`,
    which downloads use too)."""
    from flexslim.data.cachedir import default_cache_dir

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


_EXACT: ContextVar[bool] = ContextVar("flexslim_latency_cache_exact", default=False)


@contextlib.contextmanager
def exactly() -> Iterator[None]:
    """While open, an entry answers only a request measured exactly as thoroughly as it was: what the block probe
    reads, so that a probe curve is one kind of measurement throughout (a fuller timing of one of its networks, made
    by another run at another moment, would put a step into the curve that the runtime does not have)."""
    token = _EXACT.set(True)
    try:
        yield
    finally:
        _EXACT.reset(token)


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
    hit = store_for(settings).get(net, Thoroughness.of(settings), by="net", exact=_EXACT.get())
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
        hit = store.find(key, wanted, exact=_EXACT.get())
        if hit is not None:
            _COUNTS["hits"] += 1
            if net and hit.net != net:  # the same graph from other code: found by its network key next time
                store.put(key, hit.timing, hit.measured, network, net=net)  # as thoroughly as it was measured
            return hit.timing
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
        if not _FILE.fullmatch(path.name) or not path.is_file() or path.name.endswith(".rechecks.jsonl"):
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
    label = f" ({fp['label']})" if fp.get("label") else ""
    return (
        f"{fp.get('provider')} {device}{label}{cores}, onnxruntime {fp.get('onnxruntime')}, threads {threads}, "
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
