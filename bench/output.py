"""Where a command's words go, as command-line tools agree: results on stdout, chatter and
progress on stderr, so `hilq bench ... --json - | jq` and `hilq nightly > night.txt` get the
results alone. `--quiet` keeps results and errors only; `--verbose` shows every line even
where a progress bar stands in for them.

A progress line that reports one finished unit of work (an agent run) is a `Done`: a str, so
every `say` callback, thread and Ray board passes it on unchanged, and the command's bar
counts it without the layers below knowing there is a bar.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError


class Done(str):
    """A progress line for one finished agent run (a round of one variant)."""

    __slots__ = ()


def add_arguments(p) -> None:
    """`-q/--quiet` and `-v/--verbose`, on every command."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-q", "--quiet", action="store_true",
                   help="results and errors only: no progress, no chatter")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="every progress line, also where a progress bar stands in for them")


_STDOUT = None     # the real stdout while `--json -` sends everything else to stderr


def json_target(args) -> str | None:
    return getattr(args, "json_out", None) or getattr(args, "json", None)


@contextmanager
def json_on_stdout(args):
    """With `--json -`, everything a command prints goes to stderr, and stdout carries the
    JSON document alone (`hilq bench ... --json - | jq`)."""
    global _STDOUT
    if json_target(args) != "-":
        yield
        return
    _STDOUT = sys.stdout
    try:
        with redirect_stdout(sys.stderr):
            yield
    finally:
        _STDOUT = None


def write_json(path: str | None, obj) -> None:
    """`--json PATH`: the document at PATH (its folder made); `--json -`: on stdout."""
    if not path:
        return
    text = json.dumps(obj, indent=2, default=str) + "\n"
    if path == "-":
        out = _STDOUT or sys.stdout
        out.write(text)
        out.flush()
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    except OSError as e:
        raise UserError(f"--json {path}: cannot write ({e.strerror or type(e).__name__})") from None


# Wider than any line hilq prints: a log file keeps one line per message.
LOG_WIDTH = 4096


def console(**kw):
    """A rich Console for progress and tables. On a terminal it wraps at the terminal's width;
    otherwise (`hilq nightly > log`, CI) rich would break lines at column 80, so it does not
    wrap at all."""
    from rich.console import Console

    out = Console(**kw)
    if out.is_terminal or "width" in kw:
        return out
    return Console(**{"soft_wrap": True, **kw, "width": LOG_WIDTH})


@dataclass
class Output:
    """One command's words: results through `result` (stdout), chatter through `say` and
    progress through `progress` (stderr)."""

    quiet: bool = False
    verbose: bool = False
    _bar: object = field(default=None, repr=False)
    _task: object = field(default=None, repr=False)

    def __post_init__(self):
        self.out, self.err = console(highlight=False), console(stderr=True, highlight=False)

    @classmethod
    def of(cls, args) -> Output:
        return cls(getattr(args, "quiet", False), getattr(args, "verbose", False))

    def result(self, *objects) -> None:
        """A result (a table, a verdict): stdout (stderr while stdout carries `--json -`)."""
        self.out.print(*objects)

    def say(self, msg: str) -> None:
        """Chatter on stderr. A `Done` advances the bar; with a live bar it is not printed
        unless --verbose (the bar shows it)."""
        if isinstance(msg, Done) and self._bar is not None:
            task = self._bar.tasks[0]
            if task.total is not None and task.completed + 1 > task.total:
                task.total = None       # beyond the plan (extra rounds, a search): no ETA
            self._bar.update(self._task, advance=1, status=str(msg)[:60])
            if not self.verbose and self.err.is_terminal:
                return
        if not self.quiet:
            from rich.markup import escape

            self.err.print(f"[dim]{escape(msg)}[/dim]" if not msg.startswith("run ")
                           else escape(msg))

    @contextmanager
    def progress(self, what: str, total: int | None):
        """A bar on stderr for `total` agent runs (an ETA once some are done; None: as many
        as it takes), drawn only on a terminal and never with --quiet; a log gets the
        lines instead."""
        if self.quiet or not self.err.is_terminal:
            yield self
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                       TextColumn("[dim]{task.fields[status]}"), console=self.err,
                       transient=True)
        with bar:
            self._bar, self._task = bar, bar.add_task(what, total=total, status="")
            try:
                yield self
            finally:
                self._bar = self._task = None
