"""Exception -> exit code + one line (+ a traceback only with --debug, else in a log file the line names).

The CLI wraps each command in `exit_codes(echo, debug)`; library users can call `outcome_for(exc)`:

    with exit_codes(lambda line: console.print(line, soft_wrap=True), debug=debug):
        run_the_command()
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flexslim.errors import (
    EXIT_BAD_INPUT,
    EXIT_GATE,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    BadInput,
    GateFailed,
    InternalError,
    RanksLost,
)

LOG_DIR_ENV = "FLEXSLIM_LOG_DIR"  # where crash logs go; default <tempdir>/flexslim
DISK_FULL = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


def _disk_full(exc: BaseException) -> bool:
    """A write that ran out of space or quota and was not mapped where it happened: bad input, not a bug."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


@dataclass(frozen=True)
class Outcome:
    """How one exception ends a command: exit `code`, the one `line` to print, and where the traceback went."""

    code: int
    line: str
    traceback: str | None = None  # the full traceback text (internal errors only)
    log_path: Path | None = None  # the file holding it (internal errors without --debug)


def exit_code_for(exc: BaseException) -> int:
    """The exit code of an exception: 1 gate, 2 bad input (a full disk too), 130 interrupt, 3 anything else (a bug)."""
    if isinstance(exc, GateFailed):
        return EXIT_GATE
    if isinstance(exc, BadInput) or _disk_full(exc):
        return EXIT_BAD_INPUT
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    return EXIT_INTERNAL


def one_line(text: str, limit: int = 400) -> str:
    """`text` on one line (newlines and runs of spaces collapsed), at most `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def default_log_dir() -> Path:
    """Folder for crash logs: $FLEXSLIM_LOG_DIR, else <system temp>/flexslim."""
    return Path(os.environ.get(LOG_DIR_ENV) or Path(tempfile.gettempdir()) / "flexslim")


def write_crash_log(text: str, log_dir: Path | None = None) -> Path | None:
    """Write a traceback to a new file in `log_dir`; None when it cannot be written (the line then says so)."""
    folder = Path(log_dir) if log_dir is not None else default_log_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=time.strftime("crash-%Y%m%d-%H%M%S-"), suffix=".log", dir=folder)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return Path(name)
    except OSError:
        return None


def outcome_for(exc: BaseException, debug: bool = False, log_dir: Path | None = None) -> Outcome:
    """Classify `exc`. Internal errors keep their traceback: printed with `debug`, else written to a log file."""
    code = exit_code_for(exc)
    message = one_line(str(exc)) or type(exc).__name__
    if code == EXIT_BAD_INPUT and _disk_full(exc):
        where = exc.filename if getattr(exc, "filename", None) else "a file"
        return Outcome(code, f"error: disk full writing {where} ({os.strerror(exc.errno)}); free some space")
    if code == EXIT_BAD_INPUT:
        return Outcome(code, f"error: {message}")
    if code == EXIT_GATE:
        return Outcome(code, f"FAIL: {message}")
    if code == EXIT_INTERRUPTED:
        return Outcome(code, "interrupted; finished epochs are kept (rerun with --resume)")
    if isinstance(exc, RanksLost):  # not a bug: another torchrun rank died; the line says how to resume
        return Outcome(code, f"error: {message}")
    tb = "".join(traceback.format_exception(exc))
    what = message if isinstance(exc, InternalError) else f"{type(exc).__name__}: {message}"
    kind = "internal error" if isinstance(exc, InternalError) else "internal error (a bug in flexslim)"
    if debug:
        return Outcome(code, f"{kind}: {what}", tb)
    path = write_crash_log(tb, log_dir)
    where = f"traceback in {path}" if path else "traceback not saved"
    return Outcome(code, f"{kind}: {what} ({where}; rerun with --debug to print it)", tb, path)


def _passes_through(exc: BaseException) -> bool:
    """Exits already decided by the CLI (typer.Exit, click's usage errors, SystemExit) are not errors."""
    return isinstance(exc, (SystemExit, GeneratorExit)) or type(exc).__module__.split(".")[0] in ("click", "typer")


@contextlib.contextmanager
def exit_codes(
    echo: Callable[[str], None],
    debug: bool = False,
    log_dir: Path | None = None,
    exit_with=SystemExit,
    printed_here: Callable[[BaseException], bool] = lambda exc: True,
) -> Iterator[None]:
    """Run the body; any exception becomes one `echo`d line and `raise exit_with(code)`.

    With `debug` the traceback is echoed first (every kind of error); without it, only internal errors
    keep theirs, in a log file the line names. `exit_with` is e.g. `typer.Exit`.
    """
    try:
        yield
    except BaseException as exc:  # noqa: BLE001 - every exception must become an exit code
        if _passes_through(exc):
            raise
        outcome = outcome_for(exc, debug, log_dir)
        if printed_here(exc):  # under torchrun an error every rank finds is printed by rank 0 only
            if debug:
                echo((outcome.traceback or "".join(traceback.format_exception(exc))).rstrip("\n"))
            echo(outcome.line)
        raise exit_with(outcome.code) from None
