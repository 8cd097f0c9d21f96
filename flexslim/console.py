"""Progress display for long loops (rich), kept out of the loops themselves.

Loops take a `Reporter`; the CLI passes a `RichReporter`, tests and library users the silent default.
"""

from __future__ import annotations


class Reporter:
    """Silent reporter: the interface the loops call."""

    def start(self, description: str, total: int) -> None: ...

    def advance(self, info: str = "") -> None: ...

    def log(self, line: str) -> None: ...

    def stop(self) -> None: ...


class RichReporter(Reporter):
    def __init__(self, console=None):
        from rich.console import Console

        self.console = console or Console(stderr=True)
        self.progress = None
        self.task = None

    def start(self, description: str, total: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.stop()
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
        (self.progress.console if self.progress is not None else self.console).print(line, highlight=False)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
