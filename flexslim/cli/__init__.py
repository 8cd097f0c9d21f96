"""flexslim.cli: the command line - the Typer app (`app`), one function per command, the exit-code wrapper.

Parse, call one library function, render, exit code. May import every other subpackage (lazily, inside the
commands, so `flexslim --help` loads no torch); nothing imports it.
"""

from flexslim.cli.app import app
from flexslim.cli.commands import main

__all__ = ["app", "main"]
