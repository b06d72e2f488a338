"""The live view of `finetune-operator run`: stage, a training progress bar, then a summary of the run."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from .api.status import FineTuneJobStatus
from .local import Reporter
from .planner import format_eta


class RichReporter(Reporter):
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.progress: Progress | None = None
        self.task: TaskID | None = None

    def event(self, kind: str, reason: str, message: str) -> None:
        style = "yellow" if kind == "Warning" else "cyan"
        self.console.print(f"[{style}]{reason}[/] {message}")

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
        self.console.rule(f"[{colour}]{status.phase}[/] run {status.run}: {status.message or ''}")
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
        if status.artifacts:
            table = Table(title="Artifacts")
            for column in ("name", "uri", "sha256", "size"):
                table.add_column(column)
            for a in status.artifacts:
                table.add_row(a.name, a.uri, a.sha256[:16], f"{a.size_bytes / 1e6:.1f} MB")
            self.console.print(table)
