"""flexslim.cli: the command line - the Typer app (`app`), one function per command, the exit-code wrapper.

Parse, call one library function, render, exit code. May import every other subpackage (lazily, inside the
commands, so `flexslim --help` loads no torch); nothing imports it.
"""

# isort: off
# in this order: each module registers its commands on the shared `app`, and --help lists them as registered
from flexslim.cli.app import app
from flexslim.cli.commands import main  # search, profile, train, export, validate
from flexslim.cli import compare  # noqa: F401  (bench, sweep)
from flexslim.cli import cache  # noqa: F401  (cache list|clear)
from flexslim.cli import timer  # noqa: F401  (timer serve)
# isort: on

__all__ = ["app", "main"]
