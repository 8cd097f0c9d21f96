"""Progress display for long loops (rich), kept out of the loops themselves.

Loops take a `Reporter`; the CLI passes a `RichReporter`, tests and library users the silent default.
On a terminal the RichReporter draws a progress bar; without one (a pipe, a CI log) it prints plain lines:
one per `log()` (the loops log once per epoch), never wrapped; progress itself (`start`/`advance`) is silent.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

CI_ENV = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "JENKINS_URL", "TF_BUILD")


class Reporter:
    """Silent reporter: the interface the loops call."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, info: str = "") -> None: ...

    def log(self, line: str) -> None: ...

    def stop(self) -> None: ...


def in_ci(environ: Mapping[str, str] | None = None) -> bool:
    """True when a CI system's environment variable is set (to anything but '', '0' or 'false')."""
    env = os.environ if environ is None else environ
    return any(env.get(k, "").strip().lower() not in ("", "0", "false") for k in CI_ENV)


class RichReporter(Reporter):
    """Rich progress bar on a terminal; plain, unwrapped lines in a pipe or CI (`plain` forces either)."""

    def __init__(self, console=None, plain: bool | None = None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        if plain is None:
            plain = not self.console.is_terminal or self.console.is_dumb_terminal or in_ci()
        self.plain = plain
        self.progress = None
        self.task = None

    def start(self, description: str, total: int) -> None:
        self.stop()
        if self.plain:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(description, total=total, info="")

    def advance(self, info: str = "") -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, info=info)

    def log(self, line: str) -> None:
        if self.plain:  # one physical line, whatever the console's width; no markup read into dicts or lists
            self.console.print(line, highlight=False, markup=False, emoji=False, soft_wrap=True)
        else:
            (self.progress.console if self.progress is not None else self.console).print(line, highlight=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
