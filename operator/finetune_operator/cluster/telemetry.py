"""Prometheus metrics of the operator, derived from the status transitions the reconciler writes.

Every number comes from comparing the status before and after one reconcile (`OperatorMetrics.record`), so a
restarted operator, which starts from the status stored in the API server, counts nothing twice.
"""

from __future__ import annotations

import collections
import datetime as dt
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..api.spec import STAGES
from ..api.status import Phase

PHASES: tuple[str, ...] = Phase.__args__  # type: ignore[attr-defined]
TERMINAL_STAGE_STATES = ("Succeeded", "Failed")
# Stages last from seconds (a cached prepare) to days (a multi-node train).
DURATION_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 259200)
# Creation to first stage: mostly queueing (Kueue admission, image pulls, PVC binding).
QUEUE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 14400, 86400)


def _time(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def _seconds(start: str | None, end: str | None) -> float | None:
    begin, finish = _time(start), _time(end)
    if begin is None or finish is None:
        return None
    return max(0.0, (finish - begin).total_seconds())


class _PhaseCollector(Collector):
    """FineTuneJobs by namespace and phase, counted at scrape time (every phase present, 0 when none)."""

    def __init__(self, phases: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self.phases = phases

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "finetune_jobs", "FineTuneJobs the operator tracks, by namespace and phase", labels=["namespace", "phase"]
        )
        counts = collections.Counter(self.phases())
        for namespace in sorted({ns for ns, _ in counts}):
            for phase in PHASES:
                family.add_metric([namespace, phase], counts.get((namespace, phase), 0))
        yield family


class OperatorMetrics:
    """The operator's metrics in their own registry (tests and two operators in one process stay apart)."""

    def __init__(self, phases: Callable[[], Iterable[tuple[str, str]]] = lambda: ()) -> None:
        self.registry = CollectorRegistry()
        self.stage_duration = Histogram(
            "finetune_stage_duration_seconds",
            "Wall time of finished stages, from the first attempt's start to the end",
            ["stage", "outcome"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.stage_retries = Counter(
            "finetune_stage_retries", "Stage pod attempts beyond the first", ["stage"], registry=self.registry
        )
        self.time_to_first_stage = Histogram(
            "finetune_time_to_first_stage_seconds",
            "From a FineTuneJob's creation to the start of its first stage",
            buckets=QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.reconcile_errors = Counter(
            "finetune_reconcile_errors",
            "Reconciles that raised (they are retried on the next event or poll)",
            registry=self.registry,
        )
        self.reconcile_skipped = Counter(
            "finetune_reconcile_skipped",
            "Reconciles that found the same job and children as a pass that had nothing to do (not planned again)",
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "finetune_reconcile_duration_seconds",
            "Time one reconcile takes (planning plus API writes)",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.registry.register(_PhaseCollector(phases))

    def record(self, before: dict[str, Any] | None, after: dict[str, Any], created: str | None) -> None:
        """Count what changed between two wire statuses of one FineTuneJob."""
        before = before or {}
        old_stages = before.get("stages") or {}
        new_stages = after.get("stages") or {}
        same_run = before.get("run", 1) == after.get("run", 1)
        for stage in STAGES:
            old = (old_stages.get(stage) or {}) if same_run else {}
            new = new_stages.get(stage) or {}
            retries = max(0, new.get("attempts", 0) - 1) - max(0, old.get("attempts", 0) - 1)
            if retries > 0:
                self.stage_retries.labels(stage).inc(retries)
            state = new.get("state")
            if state in TERMINAL_STAGE_STATES and old.get("state") != state:
                seconds = _seconds(new.get("startTime"), new.get("completionTime"))
                if seconds is not None:
                    self.stage_duration.labels(stage, state).observe(seconds)
        if after.get("run", 1) == 1 and not _first_start(old_stages):
            started = _first_start(new_stages)
            waited = _seconds(created, started)
            if started and waited is not None:
                self.time_to_first_stage.observe(waited)

    def serve(self, port: int, address: str = "0.0.0.0") -> Callable[[], None]:
        """Serve /metrics on a port; returns the function that stops serving."""
        server, thread = start_http_server(port, address, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(5)

        return stop


def _first_start(stages: dict[str, Any]) -> str | None:
    starts = [record["startTime"] for record in stages.values() if record and record.get("startTime")]
    return min(starts, key=lambda s: _time(s)) if starts else None  # type: ignore[arg-type,return-value]
