"""The latency cache's store: one JSONL file of checked entries per device fingerprint, and when an entry may
answer a request (`Thoroughness`). `flexslim.latency.cache` decides where it lives, whether it is on, and what a
measurement asks of it.

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

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from flexslim.errors import BadInput
from flexslim.latency.fingerprint import fingerprint_id
from flexslim.latency.runtime import Timing
from flexslim.latency.wire import number as _number
from flexslim.latency.wire import timing_from_dict
from flexslim.latency.wire import whole as _whole
from flexslim.recipe.schema import LatencyConfig
from flexslim.system.files import atomic_write_bytes, atomic_write_json
from flexslim.system.locks import exclusive

ENTRY_VERSION = 1
MAX_ENTRIES = 4000  # per fingerprint (a profile measures 20-60 networks, a bake up to 16)
MAX_BYTES = 8 << 20  # per fingerprint; an entry is about 1 kB
KEEP = 0.75  # a file over a cap is cut to this fraction of the caps (not rewritten at every append)


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
            float(settings.min_seconds), max(1, int(settings.repeats)), int(settings.runs), float(settings.tolerance)
        )

    def serves(self, wanted: Thoroughness) -> bool:
        """True when a measurement this thorough may answer a request for `wanted`."""
        finer = self.precision == 0 or 0 < self.precision <= wanted.precision
        return self.seconds >= wanted.seconds and self.repeats >= wanted.repeats and self.runs >= wanted.runs and finer


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

    def find(self, key: str, wanted: Thoroughness, by: str = "key", exact: bool = False) -> Entry | None:
        """The newest entry of `key` (its graph key; by="net": its network key) measured exactly as thoroughly as
        `wanted`, else (unless `exact`) the newest measured more thoroughly (None: none).

        The same kind of measurement first: a second run then reads back what the first one measured at each step,
        fits the same latency model and asks for the same networks (the README job's warm run had timed three
        networks more: its model had been fitted on the bake's later, fuller timings of three fit networks, so it
        picked other networks near the budget)."""
        found = [e for e in reversed(self.entries()) if key and getattr(e, by) == key]
        same = next((e for e in found if e.measured == wanted), None)
        if same is not None or exact:
            return same
        return next((e for e in found if e.measured.serves(wanted)), None)

    def get(self, key: str, wanted: Thoroughness, by: str = "key", exact: bool = False) -> Timing | None:
        """The Timing of `find(key, wanted, by, exact)` (None: none)."""
        e = self.find(key, wanted, by, exact)
        return None if e is None else e.timing

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


def _timing(d: dict) -> Timing:
    """A Timing from its `to_dict()`, every figure checked (`wire.timing_from_dict`); a cache entry never holds a
    stopped timing (ValueError)."""
    t = timing_from_dict(d)
    if t.stopped is not None:
        raise ValueError("stopped")
    return t
