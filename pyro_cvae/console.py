"""What the command line prints: tables that never cut a name, progress that survives a pipe,
and Ctrl-C handling for long loops.

On a terminal: rich tables and a live progress bar. Elsewhere (a pipe, a log file, ``nohup``, a
scheduler): plain aligned rows, and a plain progress line at least every ``PLAIN_EVERY_S``
seconds and at every milestone the caller marks (the end of an epoch), so that a log shows a
long run alive and anything reading the output gets names and paths whole.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

from rich.console import Console
from rich.table import Table
from rich.text import Text

console = Console(soft_wrap=True)  # never breaks a long path into lines; a terminal wraps by itself
errors = Console(stderr=True, soft_wrap=True)

PLAIN_EVERY_S = 60.0  # the longest a log stays silent while a loop runs
MIN_WRAPPED_WIDTH = 12  # a column that may wrap still needs this much room on a terminal


@dataclass(frozen=True)
class Column:
    header: str
    whole: bool = False  # a name, file name or path: printed whole, never cut or wrapped
    justify: str = "left"


def print_table(
    title: str, columns: list[Column], rows: list[list[str]], out: Console = console
) -> None:
    """A titled table (cells may hold rich markup). On a terminal wide enough to show every
    ``whole`` column whole, a rich table that wraps the other columns; otherwise plain rows."""
    plain = [[Text.from_markup(cell).plain for cell in row] for row in rows]
    widths = [max([len(c.header)] + [len(row[i]) for row in plain]) for i, c in enumerate(columns)]
    needed = (
        sum(w if c.whole else MIN_WRAPPED_WIDTH for c, w in zip(columns, widths))
        + 3 * len(columns)
        + 1
    )
    out.print(title, highlight=False, soft_wrap=True)
    if out.is_terminal and needed <= out.width:
        table = Table()
        for column, width in zip(columns, widths):
            table.add_column(
                column.header,
                justify=column.justify,
                no_wrap=column.whole,
                overflow="fold",
                min_width=width if column.whole else None,
            )
        for row in rows:
            table.add_row(*row)
        out.print(table)
        return
    for row in [[c.header for c in columns], *plain]:
        cells = [
            cell.rjust(w) if c.justify == "right" else cell.ljust(w)
            for c, w, cell in zip(columns, widths, row)
        ]
        out.print("  ".join(cells).rstrip(), markup=False, highlight=False, soft_wrap=True)


def _clock_text(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress of a long loop of ``total`` units (steps, images): a live bar on a terminal,
    elsewhere a plain line such as

        joint-scratch: 1875/37500 steps (5%), epoch 1/20 done, loss 95.12 ..., 31.2 steps/s, ETA 0:20:17

    at least every ``every_s`` seconds and at each ``milestone``. Silent when not ``enabled``."""

    def __init__(
        self,
        description: str,
        total: int,
        completed: int = 0,
        unit: str = "steps",
        enabled: bool = True,
        out: Console = console,
        every_s: float = PLAIN_EVERY_S,
        transient: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.description, self.total, self.unit = description, total, unit
        self.enabled, self.out, self.every_s, self.transient, self.clock = (
            enabled,
            out,
            every_s,
            transient,
            clock,
        )
        self.completed = self.first = completed
        self.live = None

    def __enter__(self) -> "Progress":
        self.started = self.printed = self.clock()
        if self.enabled and self.out.is_terminal:
            from rich import progress as rp

            self.live = rp.Progress(
                rp.TextColumn("[bold]{task.description}"),
                rp.BarColumn(),
                rp.MofNCompleteColumn(),
                rp.TextColumn("{task.fields[rate]}"),
                rp.TimeElapsedColumn(),
                rp.TimeRemainingColumn(),
                rp.TextColumn("{task.fields[status]}"),
                console=self.out,
                transient=self.transient,
            )
            self.live.__enter__()
            self.task = self.live.add_task(
                self.description, total=self.total, completed=self.completed, rate="", status=""
            )
        return self

    def rate(self) -> float:
        """Units per second since this display started."""
        return (self.completed - self.first) / max(self.clock() - self.started, 1e-9)

    def update(
        self, completed: int, status: str = "", total: int | None = None, milestone: bool = False
    ) -> None:
        """Record ``completed`` units; ``status`` says where the loop is (epoch, loss terms, run)."""
        if not self.enabled:
            return
        self.completed = completed
        self.total = total if total is not None else self.total
        rate = f"{self.rate():.1f} {self.unit}/s"
        if self.live is not None:
            self.live.update(
                self.task, completed=completed, total=self.total, rate=rate, status=status
            )
        elif milestone or self.clock() - self.printed >= self.every_s:
            self.printed = self.clock()
            self.out.print(self.line(status), markup=False, highlight=False, soft_wrap=True)

    def line(self, status: str = "") -> str:
        """The plain progress line: where, how far, status, speed and time left."""
        rate = self.rate()
        eta = _clock_text((self.total - self.completed) / rate) if rate > 0 else "?"
        percent = f" ({100 * self.completed // self.total}%)" if self.total else ""
        parts = [
            f"{self.completed}/{self.total} {self.unit}{percent}",
            status,
            f"{rate:.1f} {self.unit}/s",
            f"ETA {eta}",
        ]
        return f"{self.description}: " + ", ".join(part for part in parts if part)

    def __exit__(self, *exc) -> bool:
        if self.live is not None:
            self.live.__exit__(*exc)
        return False


class StopOnInterrupt:
    """The first Ctrl-C (SIGINT) asks the loop to stop after the current step, which saves a
    consistent checkpoint; a second one interrupts at once, leaving the last epoch's checkpoint."""

    def __enter__(self):
        import signal
        import threading

        self.requested = False
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        return False
