"""The controller's scheduling, without a server: coalesced reconciles, retries of failed ones, what the poll visits,
and when a status write is skipped. (The controller on the real API server: tests/test_cluster_e2e.py.)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import dataclasses
import itertools
import time
from typing import Any

import kopf
import pytest

from finetune_operator import controller
from finetune_operator.api.status import FineTuneJobStatus
from finetune_operator.cluster.kube import ApiCallError, KubeApi
from finetune_operator.cluster.telemetry import OperatorMetrics
from finetune_operator.controller import Failure, State
from finetune_operator.planner import Plan

from .conftest import MINIMAL_JOB

KEY = ("ml", "demo")


@pytest.fixture
def memo() -> Any:
    memo = kopf.Memo()
    memo.api = KubeApi()
    memo.state = State(api=memo.api, executor=concurrent.futures.ThreadPoolExecutor(2))
    memo.metrics = OperatorMetrics()
    memo.written = {}
    memo.indexes = {"finetunejobs": {}, "stage_jobs": {}, "stage_pods": {}}
    yield memo
    memo.state.executor.shutdown(wait=False)


async def settle(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "not reached"
        await asyncio.sleep(0.01)


@pytest.mark.asyncio
async def test_events_that_arrive_during_a_reconcile_fold_into_one_more_pass(memo, monkeypatch):
    passes: list[tuple[str, str]] = []

    async def one_pass(key: tuple[str, str], _: Any) -> None:
        passes.append(key)
        await asyncio.sleep(0.05)

    monkeypatch.setattr(controller, "_reconcile", one_pass)
    await asyncio.gather(*(controller.reconcile(KEY, memo, {}) for _ in range(10)))
    assert passes == [KEY, KEY]  # the first event's pass, then one for the nine that came during it
    await controller.reconcile(("ml", "other"), memo, {})
    assert passes[-1] == ("ml", "other")


@pytest.mark.asyncio
async def test_a_failed_reconcile_is_retried_with_backoff_shown_once_and_forgotten_on_success(memo, monkeypatch):
    memo.state.settings = dataclasses.replace(memo.state.settings, retry_seconds=0.02)
    attempts: list[float] = []
    reports: list[str] = []

    async def failing_four_times(key: tuple[str, str], _: Any) -> None:
        attempts.append(time.monotonic())
        if len(attempts) <= 4:
            raise ApiCallError("create Job ml/demo-prepare", "500 Internal Server Error: etcd timeout", status=500)

    async def report(key: tuple[str, str], _: Any, error: str) -> bool:
        reports.append(error)
        return True

    monkeypatch.setattr(controller, "_reconcile", failing_four_times)
    monkeypatch.setattr(controller, "_report", report)
    await controller.reconcile(KEY, memo, {})  # an event handler: it returns, kopf sees no exception
    await settle(lambda: len(attempts) == 5 and KEY not in memo.state.failures)
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert gaps[3] > gaps[0]  # the backoff grows
    assert reports == ["create Job ml/demo-prepare: 500 Internal Server Error: etcd timeout"]  # at the 3rd failure
    assert memo.metrics.reconcile_errors._value.get() == 4


def test_the_poll_visits_never_reconciled_and_due_jobs_not_recently_reconciled_or_failing_ones(memo):
    now = time.monotonic()
    memo.written.update({
        ("ml", "training"): {"status": {"phase": "Training"}},
        ("ml", "training-resync-due"): {"status": {"phase": "Training"}},
        ("ml", "done"): {"status": {"phase": "Succeeded"}},
        ("ml", "ttl-due"): {"status": {"phase": "Succeeded"}},
        ("ml", "ttl-later"): {"status": {"phase": "Failed"}},
    })  # fmt: skip
    memo.state.due.update({("ml", "training"): now + 5, ("ml", "ttl-due"): now - 1, ("ml", "ttl-later"): now + 60})
    memo.state.resync.update({("ml", "training"): now + 20, ("ml", "training-resync-due"): now - 1})
    memo.state.failures[("ml", "failing")] = Failure(count=2)  # its retry timer brings it back
    keys = [*memo.written, ("ml", "first-reconcile-failed"), ("ml", "failing")]
    visited = {k[1] for k in keys if controller._wants_visit(memo, k, now)}
    assert visited == {"training-resync-due", "ttl-due", "first-reconcile-failed"}


def test_a_plan_sets_the_next_visit_an_active_job_within_the_resync_a_finished_one_only_when_asked(memo):
    def visits(phase: str, requeue_after: float | None) -> tuple[float | None, float | None]:
        result = Plan(status=FineTuneJobStatus(phase=phase), requeue_after=requeue_after)
        controller._next_visit(memo.state, KEY, result)
        due, resync = memo.state.due.get(KEY), memo.state.resync.get(KEY)
        now = time.monotonic()
        return (None if due is None else due - now), (None if resync is None else resync - now)

    due, resync = visits("Training", 2)  # results still coming, a deadline
    assert due == pytest.approx(2, abs=0.5)
    every = controller.RESYNC_POLLS * memo.state.settings.poll_seconds
    assert 0.7 * every < resync < 1.3 * every
    assert visits("Training", None)[0] is None
    assert visits("Succeeded", 600) == (pytest.approx(600, abs=0.5), None)  # the TTL
    assert visits("Failed", None) == (None, None)


@pytest.mark.asyncio
async def test_a_pass_with_the_inputs_of_a_quiet_one_is_not_planned_again_until_something_changes_or_is_due(
    memo, monkeypatch
):
    status = FineTuneJobStatus(phase="Training", run=1).wire()
    body = {**copy.deepcopy(MINIMAL_JOB), "status": status}
    body["metadata"].update(uid="u1", generation=1, resourceVersion="7")
    memo.indexes["finetunejobs"][KEY] = [controller.PackedJob(body)]
    planned: list[int] = []

    def nothing_to_do(job: Any, observed: Any, now: Any) -> Plan:
        planned.append(job.generation)
        return Plan(status=FineTuneJobStatus.model_validate(status))

    monkeypatch.setattr(controller, "plan", nothing_to_do)
    await controller.reconcile(KEY, memo, {})
    # The echo of a write (a new resourceVersion), a pod event that changes nothing the planner reads:
    memo.indexes["finetunejobs"][KEY] = [
        controller.PackedJob({**body, "metadata": {**body["metadata"], "resourceVersion": "8"}})
    ]
    await controller.reconcile(KEY, memo, {})
    assert planned == [1] and memo.metrics.reconcile_skipped._value.get() == 1
    memo.state.resync[KEY] = time.monotonic() - 1  # a resync that finds the index as it was: nothing to catch up
    await controller.reconcile(KEY, memo, {})
    assert planned == [1] and memo.state.resync[KEY] > time.monotonic()
    memo.state.due[KEY] = time.monotonic() - 1  # a deadline, a TTL: the clock's part of the plan
    await controller.reconcile(KEY, memo, {})
    assert planned == [1, 1]
    edited = {**body, "spec": {**body["spec"], "training": {"epochs": 2}}}
    edited["metadata"] = {**body["metadata"], "generation": 2}
    memo.indexes["finetunejobs"][KEY] = [controller.PackedJob(edited)]
    await controller.reconcile(KEY, memo, {})
    assert planned == [1, 1, 2]
    assert not memo.api.api_client.rest_client.pool_manager.pools  # nothing to do: no API call was made


def test_a_status_that_differs_only_in_progress_updated_at_is_not_written_again():
    before = {"phase": "Training", "progress": {"step": 5, "updatedAt": "2026-11-27T10:00:00Z"}}
    same = {"phase": "Training", "progress": {"step": 5, "updatedAt": "2026-11-27T10:00:05Z"}}
    moved = {"phase": "Training", "progress": {"step": 6, "updatedAt": "2026-11-27T10:00:05Z"}}
    assert controller._comparable(before) == controller._comparable(same)
    assert controller._comparable(before) != controller._comparable(moved)


@pytest.mark.asyncio
async def test_in_a_burst_a_stage_create_goes_before_status_writes_and_events():
    """The worker threads take the most urgent waiting call first: with every thread busy, a next stage's create
    queued last still runs before the status write and the Event queued ahead of it."""
    executor = controller.PriorityExecutor(1, "test")
    state = State(api=KubeApi(), executor=executor)
    gate = asyncio.Event()
    loop = asyncio.get_running_loop()
    order: list[str] = []

    def hold() -> None:
        asyncio.run_coroutine_threadsafe(gate.wait(), loop).result(5)

    busy = asyncio.ensure_future(state.call(hold))
    await asyncio.sleep(0.05)  # the one thread is taken
    calls = [
        asyncio.ensure_future(state.post(order.append, "event")),
        asyncio.ensure_future(state.call(order.append, "status", priority=controller.STATUS)),
        asyncio.ensure_future(state.call(order.append, "create")),
    ]
    await asyncio.sleep(0.05)
    gate.set()
    await asyncio.wait_for(asyncio.gather(busy, *calls), 5)
    assert order == ["create", "status", "event"]
    running = executor.submit_with(controller.HAND_OFF, time.sleep, 0.2)
    await asyncio.sleep(0.05)
    queued = executor.submit_with(controller.EVENT, order.append, "late")
    executor.shutdown(wait=True, cancel_futures=True)  # what runs finishes, what waits is dropped
    assert running.done() and queued.cancelled() and "late" not in order
    with pytest.raises(RuntimeError):
        executor.submit(order.append, "after shutdown")


@pytest.mark.asyncio
async def test_kopf_forgets_the_memory_of_an_object_once_it_is_idle_unless_it_throttles_errors():
    now = [0.0]
    memories = controller.LeanMemories(sweep_seconds=30, clock=lambda: now[0])
    finished, failing, busy = ({"metadata": {"uid": uid}} for uid in ("finished", "failing", "busy"))
    kept = {uid: await memories.recall(body, memobase=kopf.Memo()) for uid, body in
            (("finished", finished), ("failing", failing), ("busy", busy))}  # fmt: skip
    kept["failing"].error_throttler.active_until = 5.0  # an unexpected error: kopf backs off this object
    now[0] = 31
    await memories.recall(busy)  # the first sweep: every object was seen in its interval
    assert len(list(memories.iter_all_memories())) == 3
    now[0] = 62
    assert await memories.recall(busy) is kept["busy"]
    assert len(list(memories.iter_all_memories())) == 2
    assert await memories.recall(failing) is kept["failing"]
    fresh = await memories.recall(finished, memobase=kopf.Memo(shared="yes"))
    assert fresh is not kept["finished"] and fresh.memo.shared == "yes"  # from the operator's memo, at its next event
