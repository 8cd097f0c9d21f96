"""The one place that checks every number from flags, recipes and model metadata, and output paths.

Each check returns the (converted) value or raises `BadInput` with one line naming the value, where it came
from and the fix:

    checks.budget_ms(float("inf"), checks.flag("--latency-ms"))
    -> BadInput: --latency-ms = inf: must be a finite number of milliseconds > 0; pass a valid --latency-ms

Caps keep an impossible setting from turning into a hang or an allocation of hundreds of GiB; each message
names its cap.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from flexslim.errors import BadInput

MAX_BATCH = 4096  # samples per timed pass or training step
MAX_INPUT_BYTES = 512 * 2**20  # one float32 input batch (batch * C * H * W * 4 bytes): 512 MiB
MAX_RUNS = 100_000  # timed passes
MAX_WARMUP = 10_000  # untimed passes
MAX_MIN_SECONDS = 600.0  # seconds of timed passes per measurement
MAX_TIMEOUT = 86_400.0  # seconds one measurement may be allowed (a day)
MAX_THREADS = 1024  # onnxruntime intra-op threads
MAX_IMAGE_SIZE = 4096  # pixels per side
MAX_IMAGE_PIXELS = 1_000_000_000  # pixels (width x height) of one image file read from a folder: 3 GB as RGB
MAX_EPOCHS = 100_000
MAX_WIDTH = 65_536  # channels of one stage


@dataclass(frozen=True)
class Origin:
    """Where a value came from, as the message names it (`label`), and what the user can do (`fix`)."""

    label: str
    fix: str


def flag(name: str) -> Origin:
    """A command-line flag, e.g. flag("--latency-ms")."""
    return Origin(name, f"pass a valid {name}")


def argument(name: str) -> Origin:
    """A library argument, e.g. argument("latency_ms") of flexslim.validate()."""
    return Origin(f"argument {name}", f"pass a valid {name}")


def recipe_key(key: str, source: str | None = None) -> Origin:
    """A recipe value, e.g. recipe_key("data.image_size", "recipes/quickstart.toml")."""
    where = f"recipe key {key}" + (f" ({source})" if source else "")
    return Origin(where, f"fix it in the recipe or override it with --set {key}=...")


def metadata_key(key: str, flag_name: str | None = None) -> Origin:
    """A `flexslim.*` metadata value of the model under test; `flag_name` is the flag that overrides it."""
    override = f"pass {flag_name} to override it, or " if flag_name else ""
    return Origin(f"model metadata {key}", f"{override}re-export the model with a valid value")


def table_key(path: str | Path, key: str) -> Origin:
    """A value of a latency table (`--latency-table` or a run's latency.json), e.g. table_key("t.json", "coef[2]")."""
    return Origin(f"latency table {path}: {key}", "measure the table again (`flexslim profile --out FILE`)")


def _origin(origin: Origin | str) -> Origin:
    return origin if isinstance(origin, Origin) else Origin(origin, f"pass a valid {origin}")


def _fail(value: object, origin: Origin | str, requirement: str) -> BadInput:
    o = _origin(origin)
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return BadInput(f"{o.label} = {shown}: {requirement}; {o.fix}")


def _number(value: object, origin: Origin | str, integer: bool) -> float | int:
    """`value` as a number; strings (metadata) are parsed. Booleans are not numbers here."""
    what = "an integer" if integer else "a number"
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise _fail(value, origin, f"must be {what}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(value, origin, f"must be {what}")
    if integer and isinstance(value, float):
        if not value.is_integer():
            raise _fail(value, origin, f"must be {what}")
        value = int(value)
    return value


def finite(
    value: object,
    origin: Origin | str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    unit: str = "",
) -> float:
    """A finite float within [low, high] (either end open, either end absent)."""
    v = float(_number(value, origin, integer=False))
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    need = (
        f"must be a finite number{unit}"
        + (f" {lo}" if lo else "")
        + (" and" if lo and hi else "")
        + (f" {hi}" if hi else "")
    )
    if not math.isfinite(v):
        raise _fail(value, origin, need)
    if low is not None and (v < low or (low_open and v == low)):
        raise _fail(value, origin, need)
    if high is not None and (v > high or (high_open and v == high)):
        raise _fail(value, origin, need)
    return v


def integer(value: object, origin: Origin | str, low: int = 1, cap: int | None = None, cap_reason: str = "") -> int:
    """An integer >= `low` and, when `cap` is given, <= cap (the message names the cap and why)."""
    v = int(_number(value, origin, integer=True))
    if v < low:
        raise _fail(value, origin, f"must be an integer >= {low}")
    if cap is not None and v > cap:
        raise _fail(value, origin, f"must be <= {cap} (the cap{': ' + cap_reason if cap_reason else ''})")
    return v


def positive(value: object, origin: Origin | str) -> float:
    """A finite number > 0 (learning rates, sigma, temperatures)."""
    return finite(value, origin, low=0.0, low_open=True)


def non_negative(value: object, origin: Origin | str) -> float:
    """A finite number >= 0 (weight decay, multipliers)."""
    return finite(value, origin, low=0.0)


def fraction(value: object, origin: Origin | str, below_one: bool = False) -> float:
    """A fraction in [0, 1], or [0, 1) with `below_one` (margins, momentum)."""
    return finite(value, origin, low=0.0, high=1.0, high_open=below_one)


def budget_ms(value: object, origin: Origin | str) -> float:
    """A latency budget: finite milliseconds > 0 (inf and nan refused)."""
    return finite(value, origin, low=0.0, low_open=True, unit=" of milliseconds")


def percentile(value: object, origin: Origin | str) -> float:
    """A percentile in (0, 100]."""
    return finite(value, origin, low=0.0, high=100.0, low_open=True)


def threads(value: object, origin: Origin | str) -> int:
    """onnxruntime intra-op threads: 0 (the runtime's default) or more, up to MAX_THREADS."""
    return integer(value, origin, low=0, cap=MAX_THREADS)


def runs(value: object, origin: Origin | str) -> int:
    """Timed passes: 1 .. MAX_RUNS."""
    return integer(value, origin, low=1, cap=MAX_RUNS)


def warmup(value: object, origin: Origin | str) -> int:
    """Untimed passes: 0 .. MAX_WARMUP."""
    return integer(value, origin, low=0, cap=MAX_WARMUP)


def min_seconds(value: object, origin: Origin | str) -> float:
    """Seconds of timed passes: 0 .. MAX_MIN_SECONDS."""
    return finite(value, origin, low=0.0, high=MAX_MIN_SECONDS, unit=" of seconds")


def tolerance(value: object, origin: Origin | str) -> float:
    """The relative half-width of the interval a timing stops at: 0 (off: time the full seconds) .. 0.5."""
    return finite(value, origin, low=0.0, high=0.5)


def timeout(value: object, origin: Origin | str) -> float:
    """Seconds one measurement may take: > 0 .. MAX_TIMEOUT."""
    return finite(value, origin, low=0.0, low_open=True, high=MAX_TIMEOUT, unit=" of seconds")


def batch(value: object, origin: Origin | str, sample_shape: tuple[int, ...] | None = None) -> int:
    """A batch size: 1 .. MAX_BATCH, and with `sample_shape` (C, H, W) one float32 batch <= MAX_INPUT_BYTES."""
    b = integer(value, origin, low=1, cap=MAX_BATCH)
    if sample_shape is not None:
        nbytes = b * math.prod(int(d) for d in sample_shape) * 4
        if nbytes > MAX_INPUT_BYTES:
            fit = max(1, MAX_INPUT_BYTES // (math.prod(int(d) for d in sample_shape) * 4))
            raise _fail(
                value,
                origin,
                f"one float32 input batch of shape {(b, *sample_shape)} is {nbytes / 2**20:.0f} MiB, over the cap of "
                f"{MAX_INPUT_BYTES // 2**20} MiB (at most batch {fit} for this input)",
            )
    return b


def count(value: object, origin: Origin | str, low: int = 1, cap: int | None = None) -> int:
    """A size or count (widths, epochs, samples): an integer >= `low` (1 by default), <= cap when given."""
    return integer(value, origin, low=low, cap=cap)


def choice(value: object, origin: Origin | str, valid) -> str:
    """One of the names in `valid` (a table's keys or a tuple)."""
    names = list(valid)
    if not isinstance(value, str) or value not in names:
        raise _fail(value, origin, f"must be one of {', '.join(names)}")
    return value


def check_output_path(path: str | Path, flag_name: str) -> Path:
    """A file the command will write (`--report`, `--junit`, ...), checked before any work starts.

    Missing parent folders are created when the file is written, so the nearest existing ancestor must be a
    writable folder (not a file); the path itself must not be a folder and, when it exists, must be writable.
    Returns the path.
    """
    p = Path(path)
    shown = str(path)
    if not shown or shown.endswith(os.sep):
        raise BadInput(f"{flag_name} {shown!r}: names a folder, not a file; pass a file path such as {shown}out.json")
    if p.is_dir():
        raise BadInput(f"{flag_name} {shown}: is a folder, not a file; pass a file path inside it")
    parent = p.parent if str(p.parent) else Path(".")
    existing = next((a for a in (parent, *parent.parents) if a.exists()), Path("."))
    if not existing.is_dir():
        raise BadInput(f"{flag_name} {shown}: {existing} is a file, not a folder; pick a path inside a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BadInput(f"{flag_name} {shown}: folder {existing} is not writable; pick a path you can write")
    if p.exists() and not os.access(p, os.W_OK):
        raise BadInput(f"{flag_name} {shown}: the existing file is not writable; pick another path")
    return p


def check_output_dir(path: str | Path, flag_name: str) -> Path:
    """A folder the command will create or fill (`search --run-dir`, `bench --out`), checked before any work.

    It must be a folder or not exist yet (never a file), its parent must be an existing, writable folder, and an
    existing folder must be writable. Returns the path.
    """
    p = Path(path)
    shown = str(path)
    if not shown:
        raise BadInput(f"{flag_name} is empty; pass a folder path")
    if p.exists() and not p.is_dir():
        raise BadInput(f"{flag_name} {shown}: is a file, not a folder; pass a folder path (or a new name)")
    if p.is_dir():
        if not os.access(p, os.W_OK | os.X_OK):
            raise BadInput(f"{flag_name} {shown}: folder is not writable; pick a folder you can write")
        return p
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise BadInput(f"{flag_name} {shown}: folder {parent} does not exist; create it first or pick another path")
    if not parent.is_dir():
        raise BadInput(f"{flag_name} {shown}: {parent} is a file, not a folder; pick a path inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BadInput(f"{flag_name} {shown}: folder {parent} is not writable; pick a path you can write")
    return p
