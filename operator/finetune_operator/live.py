"""The live view of `finetune-operator run`: stage, a training progress bar, then a summary of the run."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from .api.status import FineTuneJobStatus
from .local import Reporter
from .planner import format_eta


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None, *, tables: bool = True) -> None:
        self.console = console or Console()
        self.tables = tables
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def event(self, kind: str, reason: str, message: str) -> None:
        style = "yellow" if kind == "Warning" else "cyan"
        # soft_wrap: a log line stays one line (paths and messages are not broken at the console width).
        self.console.print(f"[{style}]{reason}[/] {escape(message)}", soft_wrap=True)

    def stage_started(self, stage: str) -> None:
        if not self.console.is_terminal:
            self.console.print(f"[bold]{stage}[/] started")
            return
        self.progress = Progress(
            TextColumn(f"[bold]{stage:<8}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(stage, total=None, detail="starting")

    def record(self, stage: str, record: dict[str, Any]) -> None:
        kind = record.get("finetune.dev/progress")
        if not self.console.is_terminal:
            # No live bar in a log: one line per progress record instead.
            if kind == "progress":
                self.console.print(
                    f"{stage} step {record.get('step')}/{record.get('totalSteps')} loss {record.get('loss'):.4f} "
                    f"{record.get('tokensPerSecond', 0):,.0f} tok/s ETA {format_eta(record.get('etaSeconds'))}"
                )
            elif kind == "step" and record.get("message"):
                self.console.print(f"{stage}: {record['message']}")
            return
        if self.progress is None or self.task is None:
            return
        if kind == "progress":
            detail = (
                f"loss {record.get('loss', float('nan')):.4f}  {record.get('tokensPerSecond', 0):,.0f} tok/s  "
                f"ETA {format_eta(record.get('etaSeconds'))}"
            )
            self.progress.update(
                self.task, total=record.get("totalSteps"), completed=record.get("step", 0), detail=detail
            )
        elif kind == "trial":
            self.progress.update(self.task, total=record.get("trials"), completed=record.get("trial", 1) - 1,
                                 detail=str(record.get("message", ""))[:90])  # fmt: skip
        elif kind in ("step", "stage") and record.get("message"):
            self.progress.update(self.task, detail=str(record["message"])[:90])

    def stage_finished(self, stage: str) -> None:
        if self.progress is not None:
            if self.task is not None:
                task = self.progress.tasks[0]
                if task.total is None:
                    self.progress.update(self.task, total=1, completed=1)
            self.progress.stop()
        self.progress, self.task = None, None

    def finished(self, status: FineTuneJobStatus) -> None:
        colour = "green" if status.phase == "Succeeded" else "red"
        # A failure's message ends the run as one line of its own (see `finetune-operator run`).
        outcome = f": {status.message}" if status.phase == "Succeeded" and status.message else ""
        self.console.rule(f"[{colour}]{status.phase}[/] run {status.run}{outcome}")
        if not self.tables:
            return
        if status.search:
            self._search_table(status)
        if status.estimate:
            from .estimate import one_line

            recoveries = len(status.estimate.oom_recoveries)
            self.console.print(
                f"estimate: {one_line(status.estimate.wire())}"
                + (f"; recovered from {recoveries} CUDA out-of-memory error(s)" if recoveries else "")
            )
        if status.metrics and (status.metrics.tuned or status.metrics.base):
            table = Table(title="Evaluation", show_lines=False)
            table.add_column("metric")
            table.add_column("base", justify="right")
            table.add_column("tuned", justify="right")
            for name in sorted(set(status.metrics.tuned) | set(status.metrics.base)):
                base, tuned = status.metrics.base.get(name), status.metrics.tuned.get(name)
                table.add_row(name, "" if base is None else f"{base:.4g}", "" if tuned is None else f"{tuned:.4g}")
            self.console.print(table)
            if status.metrics.gates:
                gates = Table(title="Quality gates")
                for column in ("metric", "value", "min", "max", "passed"):
                    gates.add_column(column)
                for g in status.metrics.gates:
                    gates.add_row(
                        g.metric,
                        f"{g.value}",
                        f"{g.min if g.min is not None else ''}",
                        f"{g.max if g.max is not None else ''}",
                        "yes" if g.passed else "[red]no[/]",
                    )
                self.console.print(gates)
        if status.artifacts and not self.console.is_terminal:
            # A log or a pipe: one whole line per artifact, so a path is never cut to the table's width.
            self.console.print("Artifacts")
            for a in status.artifacts:
                self.console.print(
                    f"  {a.name}: {a.uri} (sha256 {a.sha256[:16]}, {a.size_bytes / 1e6:.1f} MB)",
                    soft_wrap=True,
                    markup=False,
                    highlight=False,
                )
        elif status.artifacts:
            table = Table(title="Artifacts")
            for column in ("name", "uri", "sha256", "size"):
                table.add_column(column, overflow="fold")
            for a in status.artifacts:
                table.add_row(a.name, a.uri, a.sha256[:16], f"{a.size_bytes / 1e6:.1f} MB")
            self.console.print(table)

    def _search_table(self, status: FineTuneJobStatus) -> None:
        search = status.search
        assert search is not None
        names = list(search.best) or sorted({k for t in search.trials for k in t.values})
        table = Table(title=f"Hyper-parameter search ({search.method}, {search.direction} {search.metric})")
        for column in ("trial", *names, search.metric, "steps", "seconds"):
            table.add_column(column, justify="right")
        for t in search.trials:
            mark = " *" if t.trial == search.best_trial else ""
            score = (t.message or "") if t.objective is None else f"{t.objective:.4g}{mark}"
            table.add_row(str(t.trial), *(f"{t.values.get(n, 0):.4g}" for n in names), score, str(t.steps),
                          f"{t.seconds:.1f}")  # fmt: skip
        self.console.print(table)
