"""What the command line prints: tables that never cut a name, progress that survives a pipe,
and what a termination signal (Ctrl-C, SIGTERM, SIGHUP) does.

On a terminal: rich tables and a live progress bar. Elsewhere (a pipe, a log file, ``nohup``, a
scheduler): plain aligned rows, and a plain progress line at least every ``PLAIN_EVERY_S``
seconds and at every milestone the caller marks (the end of an epoch), so that a log shows a
long run alive and anything reading the output gets names and paths whole.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

from rich.console import Console
from rich.markup import escape
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
            self.task = self.live.add_task(  # a run's name is a folder's: no markup in it
                escape(self.description),
                total=self.total,
                completed=self.completed,
                rate="",
                status="",
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
                self.task, completed=completed, total=self.total, rate=rate, status=escape(status)
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


# what Ctrl-C, a scheduler (Slurm, Kubernetes, ``timeout``) and a closed terminal send
TERMINATING = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)
)
_pending: list[int] = []  # signals that arrived while they were only recorded (the start-up)


class Terminated(KeyboardInterrupt):
    """A termination signal, raised where the work stands (as Ctrl-C raises KeyboardInterrupt), so
    that ``finally`` clauses release the run and atomic writes drop their temporary files."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal_name(self.signum)

    @property
    def exit_code(self) -> int:  # the shell's convention: 130 for SIGINT, 143 SIGTERM, 129 SIGHUP
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def record_termination(pending: list[int] | None = None) -> None:
    """From now on a termination signal is only recorded, to be raised by ``raise_on_termination``:
    one that arrives while the heavy modules import is never lost (nor swallowed by an import).
    ``pending``: the list an earlier recorder appended to, taken over with what it holds."""
    global _pending
    if pending is not None:
        _pending = pending
    for signum in TERMINATING:
        signal.signal(signum, lambda signum, frame: _pending.append(signum))


def _raise_terminated(signum, frame):
    raise Terminated(signum)


@contextmanager
def raise_on_termination() -> Iterator[None]:
    """Within: a termination signal raises ``Terminated``, and one recorded before raises at once."""
    if threading.current_thread() is not threading.main_thread():  # signals go to the main thread
        yield
        return
    previous = {signum: signal.signal(signum, _raise_terminated) for signum in TERMINATING}
    try:
        if _pending:
            signum = _pending[0]
            _pending.clear()
            raise Terminated(signum)
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:
                signal.signal(signum, handler)


class StopOnInterrupt:
    """The first termination signal (Ctrl-C, SIGTERM, SIGHUP) asks the loop to stop after the
    current step, which saves a consistent checkpoint; a second one interrupts at once, leaving
    the last epoch's checkpoint. ``signum``: the signal that asked, if one did."""

    def __enter__(self):
        self.requested = False
        self.signum = None
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {signum: signal.signal(signum, self._handle) for signum in TERMINATING}
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise Terminated(signum)
        self.requested, self.signum = True, signum

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            if handler is not None:
                signal.signal(signum, handler)
        return False
