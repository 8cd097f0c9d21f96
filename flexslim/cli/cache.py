"""`flexslim cache list|clear`: the latency cache, every network timed on this device, per device fingerprint.
Registered on the shared `app`; flexslim/cli/__init__.py imports this module after compare.py (last in --help).
"""

from __future__ import annotations

import typer

from flexslim.cli.app import app, command_exit_codes, out

cache_app = typer.Typer(
    help="The latency cache: every network timed on this device, per device fingerprint ($FLEXSLIM_CACHE/latency).",
)
app.add_typer(cache_app, name="cache")


@cache_app.command("list")
def cache_list() -> None:
    """Per device fingerprint: the device and timing settings, the networks held, the file's size, the bake's
    headroom floor there (what re-timings moved) and the path."""
    with command_exit_codes():
        from rich.markup import escape
        from rich.table import Table

        from flexslim.latency.cache import describe, latency_folder, listing

        files = listing()
        if not files:
            out.print(f"latency cache {latency_folder()}: empty", highlight=False, markup=False)
            return
        table = Table(title=f"latency cache {escape(str(latency_folder()))}")
        for column in ("fingerprint", "device", "networks", "size", "headroom floor"):
            table.add_column(column, justify="left" if column in ("fingerprint", "device") else "right", no_wrap=True)
        table.add_column("path", overflow="fold")
        for f in files:
            held = f"{f.entries}" + (f" (+{f.corrupt} corrupt)" if f.corrupt else "")
            table.add_row(f.id, escape(describe(f.fingerprint)), held, _size(f.size), _floor(f.id), escape(str(f.path)))
        out.print(table)


@cache_app.command("clear")
def cache_clear() -> None:
    """Delete the latency cache's files (only flexslim's latency files in the cache folder), naming each."""
    with command_exit_codes():
        from flexslim.latency.cache import clear, latency_folder

        removed = clear()
        for path in removed:
            out.print(f"removed {path}", highlight=False, markup=False)
        out.print(f"latency cache {latency_folder()}: {len(removed)} files removed", highlight=False, markup=False)


def _floor(device: str) -> str:
    """The headroom's floor on the device (`latency.rechecks`): what its re-timings moved, or the prior."""
    from flexslim.latency import rechecks

    f = rechecks.floor(device)
    return f"{f.value:.1%} ({f.pairs} re-timings)" if f.pairs else f"{f.value:.1%} (prior)"


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"
