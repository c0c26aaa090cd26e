"""How `tailor run` shows a run: a live display on a terminal, plain lines everywhere else.

Everything here takes the trainer's progress document as the typed `ProgressDoc` that
`cli_commands.load_progress` returns, and nothing here reads files: the display can be tested
from a document and a `rich.console.Console(file=io.StringIO())`.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional, Protocol

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from tailor_operator.reconcile.search import params_text
from tailor_trainer.contract import STAGE_ORDER, ProgressDoc, RunResult, SearchSummary, Trial

PLAIN_TRAIN_INTERVAL = 5.0
"""Seconds between two plain lines during training (every stage change is printed at once)."""

MAX_TRIAL_ROWS = 12
"""Rows of the live display's trials table; a larger search shows the running and best trials."""


def fmt_duration(seconds: Any) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _step(p: ProgressDoc) -> Optional[tuple[int, int]]:
    if p.step is None or not p.total_steps:
        return None
    return p.step, p.total_steps


def _step_text(step: tuple[int, int]) -> str:
    return f"step {step[0]}/{step[1]} ({100 * step[0] // max(step[1], 1)}%)"


def _stats(p: ProgressDoc) -> list[str]:
    """Loss, tokens/s and (while training) ETA, as far as the document has them."""
    stats = []
    if p.loss is not None:
        stats.append(f"loss {p.loss:.4f}")
    if p.tokens_per_second:
        stats.append(f"{p.tokens_per_second:.0f} tok/s")
    if p.stage == "train" and p.eta_seconds is not None:
        stats.append(f"ETA {fmt_duration(p.eta_seconds)}")
    return stats


def search_text(s: SearchSummary) -> str:
    """`search 3/6 done (2 running, 1 stopped)  best t02 valLoss 1.2345`."""
    done = s.completed + s.stopped + s.failed
    busy = [f"{n} {word}" for n, word in ((s.running, "running"), (s.stopped, "stopped"), (s.failed, "failed")) if n]
    text = f"search {done}/{s.trials if s.trials is not None else '?'} done" + (f" ({', '.join(busy)})" if busy else "")
    if s.best is not None and s.best.id:
        score = f" {s.objective or 'objective'} {s.best.objective:.4f}" if s.best.objective is not None else ""
        text += f"  best {s.best.id}{score}"
    return text


def search_result(s: SearchSummary) -> str:
    """After the summary table: the chosen trial and what the search cost."""
    counts = [f"{s.completed} completed"] + [f"{n} {w}" for n, w in ((s.stopped, "stopped early"),
                                                                     (s.failed, "failed")) if n]
    lines = [f"search: {s.trials if s.trials is not None else '?'} trials, {', '.join(counts)}"]
    b = s.best
    if b is not None and b.id:
        score = f"{s.objective or 'objective'} {b.objective:.4f}" if b.objective is not None else "no objective"
        steps = f", {b.steps} steps" if b.steps is not None else ""
        lines.append(f"chosen trial {b.id} ({score}{steps}): {params_text(b.params) or 'no parameters'}")
    return "\n".join(lines)


def progress_line(p: ProgressDoc) -> str:
    """One plain line: `[train]  step 6/12 (50%)  loss 2.3456  2506 tok/s  ETA 6s`; during a search
    `[train]  search 3/6 done (2 running, 1 stopped)  best t02 valLoss 1.2345  ...`."""
    parts = [f"[{p.stage or 'starting'}]"]
    if p.search is not None:
        parts.append(search_text(p.search))
    step = _step(p)
    if step is not None:
        parts.append(_step_text(step))
    parts += _stats(p)
    if p.message:
        parts.append(p.message)
    return "  ".join(parts)


def summary_table(result: RunResult) -> str:
    """The metrics of a finished run, base model beside fine-tuned, as fixed-width text."""
    m = result.metrics
    rows = [("loss", "loss", "baseLoss"), ("perplexity", "perplexity", "basePerplexity"),
            ("accuracy", "accuracy", "baseAccuracy"), ("exact match", "exactMatch", "baseExactMatch")]
    lines = [f"{'metric':<14}{'base':>12}{'fine-tuned':>14}{'change':>12}"]
    for label, key, base_key in rows:
        if m.get(key) is None:
            continue
        tuned, base = m[key], m.get(base_key)
        change = f"{tuned - base:+.4f}" if base is not None else ""
        base_s = f"{base:.4f}" if base is not None else "-"
        lines.append(f"{label:<14}{base_s:>12}{tuned:>14.4f}{change:>12}")
    return "\n".join(lines)


def _stage_track(current: Optional[str], done: bool) -> Text:
    text = Text()
    index = STAGE_ORDER.index(current) if current in STAGE_ORDER else -1
    for i, name in enumerate(STAGE_ORDER):
        if i:
            text.append(" > ", style="dim")
        if i < index or done and i == index:
            text.append(f"{name} ✓", style="green")
        elif i == index:
            text.append(name, style="bold cyan")
        else:
            text.append(name, style="dim")
    return text


def _shown_trials(s: SearchSummary) -> tuple[list[Trial], int]:
    """The table's rows by id (running and best first when there are too many), and how many
    were left out."""
    rows = [t for t in s.table if t.id]
    if len(rows) <= MAX_TRIAL_ROWS:
        return sorted(rows, key=lambda t: t.id or ""), 0
    ranked = sorted(rows, key=lambda t: (t.state != "running", t.objective is None, t.objective or 0.0))
    kept = ranked[:MAX_TRIAL_ROWS]
    return sorted(kept, key=lambda t: t.id or ""), len(rows) - len(kept)


def trials_table(s: SearchSummary) -> Table:
    """The search's trials: id, state, steps, objective, params; the best one in bold."""
    table = Table(box=None, padding=(0, 2), show_edge=False, header_style="dim")
    for name, justify in (("  trial", "left"), ("state", "left"), ("steps", "right"),
                          (s.objective or "objective", "right"), ("params", "left")):
        table.add_column(name, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    rows, hidden = _shown_trials(s)
    best = s.best.id if s.best is not None else None
    for t in rows:
        steps = "" if t.steps is None else f"{t.steps}" + (f"/{t.total_steps}" if t.total_steps else "")
        objective = "" if t.objective is None else f"{t.objective:.4f}"
        style = "bold" if t.id == best else ("dim" if t.state in ("stopped", "failed", "pending") else "")
        table.add_row(("* " if t.id == best else "  ") + (t.id or ""), t.state or "?", steps, objective,
                      params_text(t.params), style=style)
    if hidden:
        table.add_row(f"  +{hidden} more", "", "", "", "", style="dim")
    return table


def render_progress(p: ProgressDoc, elapsed: float) -> RenderableType:
    """The live display: stages, a bar with step/total, loss, tokens/s, ETA and elapsed time; during
    a search, its counts and a table of its trials."""
    stage = p.stage
    grid = Table.grid(padding=(0, 2))
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_row(Text("stage", style="dim"), _stage_track(stage, p.state == "Succeeded"))
    step = _step(p)
    if step is not None:
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=step[1], completed=min(step[0], step[1]), width=30),
                    Text(_step_text(step)))
        grid.add_row(Text("progress", style="dim"), bar)
    stats = _stats(p) + [f"elapsed {fmt_duration(elapsed)}"]
    grid.add_row(Text("", style="dim"), Text("   ".join(stats)))
    if p.message:
        grid.add_row(Text("", style="dim"), Text(p.message, style="italic"))
    if p.search is None:
        return Group(grid)
    grid.add_row(Text("search", style="dim"), Text(search_text(p.search)[len("search "):]))
    return Group(grid, trials_table(p.search)) if p.search.table else Group(grid)


class Display(Protocol):
    def update(self, p: Optional[ProgressDoc]) -> None: ...

    def close(self) -> None: ...


class PlainDisplay:
    """A line when the stage changes, and at most one every few seconds during training: stable
    output for CI logs and pipes."""

    def __init__(self, echo: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._echo, self._clock = echo, clock
        self._last_line, self._last_stage, self._last_print = "", object(), float("-inf")

    def update(self, p: Optional[ProgressDoc]) -> None:
        if p is None:
            return  # the trainer has not written its first document yet
        line, now = progress_line(p), self._clock()
        stage_changed = p.stage != self._last_stage
        due = now - self._last_print >= PLAIN_TRAIN_INTERVAL or p.stage != "train"
        if line != self._last_line and (stage_changed or due):
            self._echo(line)
            self._last_print, self._last_line, self._last_stage = now, line, p.stage

    def close(self) -> None:
        pass


class LiveDisplay:
    """rich.live on a terminal, refreshed in place; the last frame stays on screen."""

    def __init__(self, console: Optional[Console] = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock, self._started = clock, clock()
        self._live = Live(Text("starting"), console=console or Console(), refresh_per_second=4,
                          transient=False, redirect_stdout=False, redirect_stderr=False)
        self._live.start()

    def update(self, p: Optional[ProgressDoc]) -> None:
        self._live.update(render_progress(p or ProgressDoc(), self._clock() - self._started), refresh=True)

    def close(self) -> None:
        self._live.stop()


class NoDisplay:
    def update(self, p: Optional[ProgressDoc]) -> None:
        pass

    def close(self) -> None:
        pass


def make_display(quiet: bool, echo: Callable[[str], None]) -> Display:
    if quiet:
        return NoDisplay()
    if sys.stdout.isatty():
        return LiveDisplay()
    return PlainDisplay(echo)
