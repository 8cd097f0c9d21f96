"""The `flexslim` Typer app and what every command shares: one-line usage errors, the consoles (wide without a
terminal), `--debug`, SIGTERM as an exception, exception -> exit code around each command body, and the option
types (recipe, --set, --data, --device, --no-cache and the choice enums read from their tables). The commands are in
commands.py (search, profile, train, export, validate), compare.py (bench, sweep) and cache.py (cache list|clear).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from typer.core import TyperGroup

try:  # typer >= 0.24 vendors click; its exceptions are not click's
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on plain click
    from click import exceptions as click_errors
from flexslim.recipe.choices import PRECISIONS, PROVIDERS, SEARCH_METHODS
from flexslim.system.devices import DEVICES
from flexslim.system.distributed import printed_here, stray_rank_note

EXIT_TERMINATED = 143  # 128 + SIGTERM
WIDE = 240  # columns of rich output without a terminal (tables); plain lines are never wrapped at all


class _OneLineErrors(TyperGroup):
    """Click's own usage errors (unknown option, a value of the wrong type) as one `error:` line and exit 2,
    like every other bad input (typer would draw a multi-line box)."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click_errors.NoArgsIsHelpError as e:  # bare `flexslim`: the help, as before
            typer.echo(e.ctx.get_help(), err=True)
            sys.exit(e.exit_code)
        except click_errors.ClickException as e:
            from flexslim.errors import EXIT_BAD_INPUT
            from flexslim.system.exits import one_line

            ctx = getattr(e, "ctx", None)
            hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
            echo_err(f"error: {one_line(e.format_message()).rstrip('.')}{hint}")
            sys.exit(EXIT_BAD_INPUT)
        except typer.Abort:
            echo_err("interrupted")
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="flexslim",
    help="Find per-stage channel widths that meet a latency budget (FlexCHarts), retrain, export to ONNX, gate.",
    cls=_OneLineErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)
STATE = {"debug": False}


def echo_err(line: str) -> None:
    """One plain line on stderr: no markup (messages hold [lists]), no highlighting, never wrapped."""
    err.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)


@app.callback()
def _options(
    debug: Annotated[
        bool, typer.Option("--debug", help="Print the full traceback of a failure (else: one line, exit code).")
    ] = False,
) -> None:
    """Global options (before the command: `flexslim --debug search ...`)."""
    STATE["debug"] = debug
    for console in (out, err):
        if not console.is_terminal:  # a pipe or a CI log: rich would assume 80 columns and wrap tables there
            console.width = max(console.width, WIDE)


def _choices(name: str, names) -> type[Enum]:
    """A str Enum of the names of one table (typer shows and checks them as the option's choices)."""
    return Enum(name, {n.replace("-", "_"): n for n in names}, type=str)


Provider = _choices("Provider", PROVIDERS)
Device = _choices("Device", DEVICES)
Method = _choices("Method", SEARCH_METHODS)
Precision = _choices("Precision", PRECISIONS)


RecipeOpt = Annotated[
    str, typer.Option("--recipe", "-r", help="Shipped recipe name (quickstart, ...) or a .toml path.")
]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a recipe value: section.key=value (repeatable).")
]
DataOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--data",
        help="Dataset folder (CIFAR-10: cifar-10-batches-py; folder: train/ and val/ of class sub-folders).",
    ),
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Training device.")]
PrecisionOpt = Annotated[
    Optional[Precision],
    typer.Option(
        help="What is deployed, timed and gated: fp32, int8 (onnxruntime static quantization, its fastest format "
        "here by measurement) or fp16 (CUDA). Default: the recipe's latency.precision."
    ),
]


def with_precision(overrides, precision) -> list[str]:
    """The --set values plus `latency.precision` when --precision is given."""
    return list(overrides or []) + ([f"latency.precision={precision.value}"] if precision is not None else [])


NoCacheOpt = Annotated[
    bool,
    typer.Option(
        "--no-cache",
        help="Neither read nor add to the latency cache (`flexslim cache list`): time every network afresh.",
    ),
]
TimerOpt = Annotated[
    Optional[str],
    typer.Option(
        "--timer",
        help="Measure every latency on the deployment device: the URL of its `flexslim timer serve` "
        "(default: $FLEXSLIM_TIMER; none: this machine).",
    ),
]
TimerTokenOpt = Annotated[
    Optional[Path],
    typer.Option("--timer-token-file", help="File holding the timer's token (default: $FLEXSLIM_TIMER_TOKEN_FILE)."),
]


def timer_for(url: str | None, token_file: Path | None):
    """The context in which a command measures on the remote timer `url` (None: $FLEXSLIM_TIMER, else here); the
    processes it starts inherit it."""
    from flexslim.latency.remote import using

    return using(url, token_file)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C: the job stops between writes (every write is atomic), the
    run stays resumable, the command exits 143."""


@contextlib.contextmanager
def _sigterm_raises():
    """While a command runs, SIGTERM raises `Terminated` in the main thread (the previous handler is restored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    before = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


@contextlib.contextmanager
def command_exit_codes():
    """Every command's body: BadInput -> exit 2, GateFailed -> 1, anything unexpected -> 3 (one line naming the
    traceback's log file; `--debug` prints it), Ctrl-C -> 130, SIGTERM -> 143; run locks released at the end."""
    from flexslim.system.exits import exit_codes
    from flexslim.system.locks import release_runs

    note = stray_rank_note()  # RANK without torchrun: ignored, and said so
    if note:
        echo_err(note)
    try:
        with (
            _sigterm_raises(),
            exit_codes(echo_err, debug=STATE["debug"], exit_with=typer.Exit, printed_here=printed_here),
        ):
            try:
                yield
            except Terminated:
                echo_err("terminated (SIGTERM); finished epochs are kept (rerun with --resume)")
                raise typer.Exit(EXIT_TERMINATED) from None
    finally:
        release_runs()
