"""How far a timing moves when the same network is timed again later on this device: the headroom's measured floor.

A bake chooses its network on one timing; the gate times it again, minutes later, in a fresh process. On a machine
whose speed drifts the two differ by more than one timing's own sessions do (measured on a 2-core AMD VM: 48/40/128
at int8 read 0.0564 ms in the bake, 0.0526 confirming, 0.0603 at the export gate). So the headroom kept under the
budget is at least what such re-timings have moved on this device, measured, not a constant:

- the bake records each confirming timing against the figure the network was chosen on (`source` "bake"), and the
  export gate the run's baked figure against its own reading (`source` "gate");
- `floor(device)` (a fingerprint id, `device_of(settings)`) is the RECHECK_QUANTILE of |fresh / earlier - 1| over
  the device's newest RECHECKS pairs; with fewer than MIN_PAIRS it is the prior `budget.MIN_HEADROOM` (3%, what 16
  delivered networks moved on one VM). `Budget.for_noise` still caps the headroom at half the window.

Kept beside the latency cache, per device fingerprint (`<id>.rechecks.jsonl` in `cache.latency_folder()`): one JSON
line per pair, appended under the fingerprint's lock, bounded to the newest KEEP_PAIRS lines; a corrupt line is
skipped. `$FLEXSLIM_NO_CACHE` (the commands' `--no-cache`) neither reads nor writes it: the prior stands.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

RECHECKS = 20  # the newest pairs the floor is read from
MIN_PAIRS = 3  # fewer: the prior
RECHECK_QUANTILE = 0.9  # of the pairs' relative moves
KEEP_PAIRS = 200  # lines kept in the file (the newest)
SOURCES = ("bake", "gate")
_ID = re.compile(r"[0-9a-f]{16}")


@dataclass(frozen=True)
class Floor:
    """The headroom's floor on this device: `value` (a fraction of the budget), from `pairs` re-timings (0: the
    prior), their largest move `worst`."""

    value: float
    pairs: int = 0
    worst: float = 0.0

    def describe(self) -> str:
        """One line for the log and run.json's reader."""
        from flexslim.latency.budget import MIN_HEADROOM

        if not self.pairs:
            return f"headroom floor {MIN_HEADROOM:.1%} (prior: fewer than {MIN_PAIRS} re-timings on this device)"
        return (
            f"headroom floor {self.value:.1%}: the p{RECHECK_QUANTILE * 100:g} of how far {self.pairs} re-timings on "
            f"this device moved (the largest {self.worst:.1%})"
        )


def _path(device: str, folder: Path | None = None) -> Path:
    from flexslim.latency.cache import latency_folder

    return Path(folder or latency_folder()) / f"{device}.rechecks.jsonl"


def device_of(settings) -> str:
    """The fingerprint id of the device that measures at `settings` (what run.json records as `measuring_device`)."""
    from flexslim.latency.fingerprint import fingerprint, fingerprint_id

    return fingerprint_id(fingerprint(settings))


def record(device: str, earlier_ms: float, fresh_ms: float, source: str, folder: Path | None = None) -> bool:
    """Add one pair (the figure a network was chosen on, the figure a later timing of it read) for the device whose
    fingerprint id is `device`; False when not kept (cache off, a figure not a positive number, an id that is not 16
    hex digits, a folder that cannot be written)."""
    from flexslim.latency.cache import enabled
    from flexslim.system.locks import exclusive

    ok = all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in (earlier_ms, fresh_ms))
    if not enabled() or not ok or source not in SOURCES or not _ID.fullmatch(str(device)):
        return False
    path = _path(device, folder)
    line = json.dumps({"earlier_ms": float(earlier_ms), "fresh_ms": float(fresh_ms), "source": source,
                       "at": time.time()}).encode() + b"\n"  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(path.with_name(path.name.replace(".rechecks.jsonl", ".lock"))):
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
            _bound(path)
    except (OSError, TimeoutError):
        return False  # never fail a run over its bookkeeping: the floor keeps what it had
    return True


def record_gate(run, gate_device: str | None, gate_ms: float | None, stopped: str | None) -> bool:
    """A gate's reading of a run's delivered network against the figure the run baked it on (run.json's
    `measured_ms`, on `measuring_device`), as one of that device's re-timings (`source` "gate"): only when the gate
    timed in full (`stopped` None) on the device that baked it. `run` is the run's record (a mapping); False when
    nothing was kept."""
    measuring, baked = run.get("measuring_device"), run.get("measured_ms")
    device = measuring.get("id") if isinstance(measuring, dict) else None
    figures = isinstance(baked, (int, float)) and not isinstance(baked, bool) and gate_ms is not None
    if not device or gate_device != device or stopped is not None or not figures:
        return False
    return record(device, float(baked), float(gate_ms), "gate")


def _bound(path: Path) -> None:
    from flexslim.system.files import atomic_write_bytes

    lines = path.read_bytes().splitlines(keepends=True)
    if len(lines) > KEEP_PAIRS:
        atomic_write_bytes(path, b"".join(lines[-KEEP_PAIRS:]))


def moves(device: str, folder: Path | None = None) -> list[float]:
    """|fresh / earlier - 1| of this device's newest RECHECKS valid pairs, oldest first (none: cache off or empty)."""
    from flexslim.latency.cache import enabled

    if not enabled() or not _ID.fullmatch(str(device)):
        return []
    try:
        data = _path(device, folder).read_bytes()
    except OSError:
        return []
    out = []
    for raw in data.splitlines():
        try:
            d = json.loads(raw)
            earlier, fresh = float(d["earlier_ms"]), float(d["fresh_ms"])
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            continue  # a torn or corrupt line says nothing
        if math.isfinite(earlier) and math.isfinite(fresh) and earlier > 0 and fresh > 0:
            out.append(abs(fresh / earlier - 1.0))
    return out[-RECHECKS:]


def floor(device: str, folder: Path | None = None) -> Floor:
    """The headroom's floor on the device whose fingerprint id is `device` (see the module docstring)."""
    from flexslim.latency.budget import MIN_HEADROOM

    found = moves(device, folder)
    if len(found) < MIN_PAIRS:
        return Floor(MIN_HEADROOM)
    ranked = sorted(found)
    q = ranked[min(len(ranked) - 1, math.ceil(RECHECK_QUANTILE * len(ranked)) - 1)]
    return Floor(q, len(found), ranked[-1])
