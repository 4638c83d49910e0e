"""The one progress bar: on standard error, only where a person watches (a terminal), a no-op otherwise.

Every long loop in mlic (epochs, scoring, feature extraction, shard packing, reading big label files,
prediction) shows its progress through :class:`progress_bar`; a disabled bar (quiet runs, other ranks,
logs, tests) costs nothing and prints nothing, not even a blank line.
"""

from __future__ import annotations

import sys


class progress_bar:  # noqa: N801 - used like a function
    """A rich progress bar over ``total`` steps.

    Args:
        total: the number of steps (or bytes, with ``unit="bytes"``).
        description: the text before the bar.
        enabled: False makes every call a no-op.
        completed: steps already done (a resumed loop).
        unit: "steps" (shown as done/total and an ``info`` column) or "bytes".
    """

    def __init__(self, total: int, description: str, enabled: bool = True, completed: int = 0,
                 unit: str = "steps") -> None:
        self.progress = None
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            count = DownloadColumn() if unit == "bytes" else MofNCompleteColumn()
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), count, TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"), transient=True, console=Console(stderr=True))
            self.progress.start()
            self.task = self.progress.add_task(description, total=total, completed=completed, info="")

    def advance(self, info: str | None = None, count: int = 1) -> None:
        """Move ``count`` steps on; ``info`` replaces the text after the bar."""
        if self.progress is not None:
            self.progress.update(self.task, advance=count, **({"info": info} if info else {}))

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __enter__(self) -> progress_bar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
