"""kopf handlers: read (indexes of FineTuneJobs, their stage Jobs and pods), call the planner, write.

Event-driven, without kopf daemons or timers (those put a finalizer on every object): any change of a
FineTuneJob, or of one of its stage Jobs or pods, reconciles that FineTuneJob at once, so a stage starts within a
second of the previous Job completing. Events that arrive while a job is being reconciled are folded into one more
pass, not queued one by one. One background loop reads the running train pods' log tails (a new tail reconciles
its job) and revisits, concurrently, only the jobs whose plan asked for a visit (`requeue_after`: the active
deadline, the TTL after finishing, a stage's results still coming) or whose last visit is older than the resync
interval (a safety net for a lost watch event). Visiting every active job on every tick made the poll the
operator's main work at a few hundred jobs and delayed the event-driven hand-offs behind it.

kopf logs and drops an exception from an `on.event` handler; so no handler lets one escape: a failed reconcile
is retried here with backoff, and after a few failures the job shows the API error (condition `Synced` False and a
Warning Event).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import datetime as dt
import functools
import hashlib
import itertools
import json
import logging
import math
import os
import queue
import random
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import kopf
from kopf._core.reactor.inventory import ResourceMemories, ResourceMemory  # kopf.run's `memories`: see LeanMemories
from pydantic import ValidationError

from .api.base import GROUP, PLURAL, VERSION
from .api.job import FineTuneJob
from .api.status import FINISHED_PHASES, FineTuneJobStatus
from .cluster.build import build_stage
from .cluster.context import BuildContext, OperatorSettings, child_name
from .cluster.kube import ApiCallError, KubeApi, KubeConfigError, KubeSource, check_reachable, load_configuration
from .cluster.observe import job_view, observe, pod_view
from .cluster.plugins.storage import workspace_claim, workspace_pvc
from .cluster.telemetry import OperatorMetrics
from .planner import Observed, Plan, plan, report_api_error

LABEL = "finetune.dev/job"
RESYNC_POLLS = 12
"""An active job with no event and no requested visit is still reconciled every this many polls (jittered)."""
REPORT_AFTER = 3
"""Failed reconciles in a row (each after its own API retries) before the job shows the error."""
RETRY_CAP_SECONDS = 60.0
API_THREADS = 16
"""Worker threads for the blocking client: enough that slow calls of some jobs do not queue the others'. They take
the most urgent call first (see PriorityExecutor): a stage's creates, then status writes, then Events."""
HAND_OFF, STATUS, EVENT = 0, 1, 2
"""Priorities of the calls in the worker threads, most urgent first. In a burst of hand-offs (jobs created
together finish their stages together) the server is the bottleneck: every Event posted or status written ahead
of a next stage's Job delays that Job's start."""
LOG_THREADS = 4
"""Worker threads for train log reads, apart from the API_THREADS: with a hundred jobs training, reads that each
wait up to their timeout filled the shared pool and every hand-off queued behind them. Reads beyond these wait
their turn (progress comes later; nothing else does)."""
Key = tuple[str, str]
T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass
class Failure:
    count: int = 0
    error: str = ""
    reported: bool = False


@dataclass
class State:
    """What the handlers share (kopf hands each handler a shallow copy of the memo: this object is shared)."""

    api: KubeApi
    executor: concurrent.futures.ThreadPoolExecutor
    log_executor: concurrent.futures.ThreadPoolExecutor | None = None
    event_executor: concurrent.futures.ThreadPoolExecutor | None = None
    running: set[Key] = field(default_factory=set)
    again: set[Key] = field(default_factory=set)
    failures: dict[Key, Failure] = field(default_factory=dict)
    retries: dict[Key, asyncio.Task[None]] = field(default_factory=dict)
    due: dict[Key, float] = field(default_factory=dict)
    """Monotonic time a job wants its next visit: the plan's requeue_after (TTL, deadline, results coming)."""
    resync: dict[Key, float] = field(default_factory=dict)
    """Monotonic time an active job is looked at again though nothing asked for it (a lost watch event)."""
    posting: dict[Key, asyncio.Task[None]] = field(default_factory=dict)
    """The Events of a job's last pass, being posted: the next pass's Events go after them, in order."""
    gone: set[str] = field(default_factory=set)
    """uids of FineTuneJobs seen deleted: nothing is created for them any more."""
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    logs: dict[Key, tuple[str, str]] = field(default_factory=dict)
    """The last train log tail read per job: (pod, tail). Reads run beside reconciles, never inside them."""
    log_pods: dict[Key, tuple[str, str]] = field(default_factory=dict)
    """The running train pod per job, (namespace, pod): the poll reads its log tail every poll."""
    reading: set[Key] = field(default_factory=set)
    read_at: dict[Key, float] = field(default_factory=dict)
    quiet: dict[Key, bytes] = field(default_factory=dict)
    """Per job, the fingerprint of the inputs of its last pass that found nothing to do: the same inputs again (a pod
    turning Running, the echo of our own status write) need no planning until the job is due."""
    settings: OperatorSettings = field(default_factory=OperatorSettings)
    """The operator's settings (the poll and retry intervals are read here, where there is no memo)."""

    async def call(self, fn: Callable[..., T], *args: Any, priority: int = HAND_OFF) -> T:
        call = functools.partial(fn, *args)
        if isinstance(self.executor, PriorityExecutor):
            return await asyncio.wrap_future(self.executor.submit_with(priority, call))
        return await asyncio.get_running_loop().run_in_executor(self.executor, call)

    async def post(self, fn: Callable[..., T], *args: Any) -> T:
        if self.event_executor is not None:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self.event_executor, functools.partial(fn, *args))
        return await self.call(fn, *args, priority=EVENT)

    async def read_log(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.log_executor or self.executor, functools.partial(fn, *args))


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Keep kopf's own bookkeeping out of .status, which is the operator's contract with users.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.finetune.dev")
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330  # a watch that went silent is reopened, not waited on forever
    settings.watching.connect_timeout = 10
    settings.networking.request_timeout = 30  # kopf's own short calls (Events, peering) as bounded as ours
    settings.networking.connect_timeout = 10
    if not memo.get("api"):
        try:
            memo.api = KubeApi.from_source(memo.get("kube_source"))
        except KubeConfigError as exc:
            raise kopf.PermanentError(str(exc)) from None
    memo.settings = memo.get("settings") or OperatorSettings.from_env(os.environ)
    memo.written = {}
    # kopf hands each handler a shallow copy of this memo: share state through mutable containers only.
    memo.indexes = {}
    memo.metrics = memo.get("metrics") or OperatorMetrics(phases=lambda: _phases(memo))
    memo.state = State(
        api=memo.api,
        executor=PriorityExecutor(API_THREADS, "kube"),
        log_executor=concurrent.futures.ThreadPoolExecutor(LOG_THREADS, thread_name_prefix="kube-log"),
        settings=memo.settings,
    )
    port = memo.get("metrics_port")
    memo.stop_metrics = memo.metrics.serve(port) if port else None
    memo.poller = asyncio.create_task(_poll(memo))


class PriorityExecutor(concurrent.futures.Executor):
    """Worker threads that take the most urgent waiting call first (lowest priority number; in submission order
    among equals). Calls already running are not interrupted."""

    def __init__(self, threads: int, name: str) -> None:
        self._queue: queue.PriorityQueue[tuple[float, int, Any]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(threads)]
        self._closed = False
        for thread in self._threads:
            thread.start()

    def submit_with(
        self, priority: int, fn: Callable[..., T], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[T]:
        if self._closed:
            raise RuntimeError("cannot schedule new calls after shutdown")
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put((priority, next(self._order), (future, fn, args, kwargs)))
        return future

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[T]:
        return self.submit_with(STATUS, fn, *args, **kwargs)

    def _work(self) -> None:
        while True:
            _, _, item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as exc:  # handed to the awaiting caller, as ThreadPoolExecutor does
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    _, _, item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        for _ in self._threads:
            self._queue.put((math.inf, next(self._order), None))
        if wait:
            for thread in self._threads:
                thread.join()


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff base: kopf builds one (a deep copy of the body) on every watch event for on.create/on.update
    handlers, and stores it in an annotation after them. This operator has none (only on.event and indexes): at a
    few hundred jobs that copy was an eighth of the operator's CPU, for nothing."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


class LeanMemories(ResourceMemories):
    """kopf's memory of every object it has seen, kept only while it holds something.

    kopf keeps one per object (~3 kB: error throttling, indexing retries, daemons, a copy of the memo) until the
    object is deleted: at a thousand jobs, with their Jobs and pods, 27 MB for objects long finished. This operator
    has no daemons, timers or change handlers, so a memory in its initial state says nothing a fresh one would not:
    one not used for a whole sweep interval and in that state is dropped (kopf makes a fresh one at the object's next
    event). One that throttles errors or retries an index is kept. (kopf.run takes the container as `memories`.)
    """

    def __init__(self, sweep_seconds: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.sweep_seconds, self.clock = sweep_seconds, clock
        self._recalled: set[str] = set()
        self._swept_at = clock()

    async def recall(
        self, raw_body: Any, *, memobase: Any = None, noticed_by_listing: bool = False, ephemeral: bool = False
    ) -> ResourceMemory:
        memory = await super().recall(
            raw_body, memobase=memobase, noticed_by_listing=noticed_by_listing, ephemeral=ephemeral
        )
        self._recalled.add(self._build_key(raw_body))
        if self.clock() - self._swept_at >= self.sweep_seconds:
            self.sweep()
        return memory

    def sweep(self) -> None:
        idle = [k for k, m in self._items.items() if k not in self._recalled and _initial(m)]
        for key in idle:
            del self._items[key]
        self._recalled.clear()
        self._swept_at = self.clock()


def _initial(memory: ResourceMemory) -> bool:
    throttler, daemons = memory.error_throttler, memory.daemons_memory
    return (
        throttler.active_until is None
        and throttler.source_of_delays is None
        and memory.indexing_memory.indexing_state is None
        and memory.remaining_patch is None
        and daemons.live_fresh_body is None
        and not daemons.running_daemons
        and not daemons.forever_stopped
    )


@kopf.on.login()
def login(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    """kopf's watches use the same server and credentials as the operator's own client (read afresh each time,
    so a rotated service-account token is picked up)."""
    api: KubeApi | None = memo.get("api")
    if api is None:
        return None
    return connection_info(api.configuration, trust_env=settings.networking.trust_env)


def connection_info(configuration: Any, trust_env: bool = False) -> kopf.ConnectionInfo:
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    parts = header.split(" ", 1) if header else []
    scheme, token = (None, None) if not parts else ((None, parts[0]) if len(parts) == 1 else (parts[0], parts[1]))
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        trust_env=trust_env,
    )


def _phases(memo: kopf.Memo) -> list[tuple[str, str]]:
    return [(ns, w.get("phase") or "Pending") for (ns, _), w in list(memo.written.items())]


@kopf.on.cleanup()
async def stop_polling(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("poller"):
        memo.poller.cancel()
    state: State | None = memo.get("state")
    if state:
        for task in [*state.retries.values(), *state.tasks]:
            task.cancel()
        state.executor.shutdown(wait=False, cancel_futures=True)
        for executor in (state.log_executor, state.event_executor):
            if executor:
                executor.shutdown(wait=False, cancel_futures=True)
    if memo.get("stop_metrics"):
        await asyncio.to_thread(memo.stop_metrics)


# The indexes hold what the planner reads, not whole objects, and hold it packed: a stage Job's pod template and a
# pod's spec are most of their size, and a decoded body costs a dict per object and a string per key and value (a
# FineTuneJob of ~5 kB of JSON took ~25 kB). At a thousand jobs, with eight children each kept after they finish,
# the decoded indexes were most of the operator's memory.
UNREAD_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)


class Packed:
    """One indexed object as compressed JSON; `unpack()` gives a fresh copy (a few tens of microseconds)."""

    __slots__ = ("data",)

    def __init__(self, obj: dict[str, Any]) -> None:
        self.data = zlib.compress(json.dumps(obj, separators=(",", ":")).encode(), 1)

    def unpack(self) -> dict[str, Any]:
        return json.loads(zlib.decompress(self.data))  # type: ignore[no-any-return]


class PackedJob(Packed):
    """A FineTuneJob in the index: packed, with what tells whether it is still there at hand."""

    __slots__ = ("deleting", "uid")

    def __init__(self, body: dict[str, Any]) -> None:
        super().__init__(body)
        self.uid: str | None = body["metadata"].get("uid")
        self.deleting = bool(body["metadata"].get("deletionTimestamp"))


def _metadata(body: kopf.Body) -> dict[str, Any]:
    meta = {k: v for k, v in body.get("metadata", {}).items() if k != "managedFields"}
    annotations = meta.get("annotations")
    if annotations and any(a in annotations for a in UNREAD_ANNOTATIONS):
        meta["annotations"] = {k: v for k, v in annotations.items() if k not in UNREAD_ANNOTATIONS}
    return meta


@kopf.index(GROUP, VERSION, PLURAL)
def finetunejobs(namespace: str, name: str, body: kopf.Body, **_: Any) -> dict[Key, PackedJob]:
    return {(namespace, name): PackedJob({**body, "metadata": _metadata(body)})}


@kopf.index("batch", "v1", "jobs", labels={LABEL: kopf.PRESENT})
def stage_jobs(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, Packed]:
    return {(namespace, labels[LABEL]): Packed(job_view(dict(body)))}


@kopf.index("", "v1", "pods", labels={LABEL: kopf.PRESENT})
def stage_pods(namespace: str, labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[Key, Packed]:
    return {(namespace, labels[LABEL]): Packed(pod_view(dict(body)))}


def _unpacked(memo: kopf.Memo, index: str, key: Key) -> list[dict[str, Any]]:
    return [value.unpack() for value in list(memo.indexes.get(index, {}).get(key, []))]


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_finetunejob(
    event: dict[str, Any], namespace: str, name: str, uid: str, memo: kopf.Memo, **kw: Any
) -> None:
    if event.get("type") == "DELETED":
        forget(memo, (namespace, name), uid)
        return  # the children go with their ownerReferences
    await reconcile((namespace, name), memo, kw)


@kopf.on.event("batch", "v1", "jobs", labels={LABEL: kopf.PRESENT})
async def on_stage_job(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **kw: Any) -> None:
    await reconcile((namespace, labels[LABEL]), memo, kw)


@kopf.on.event("", "v1", "pods", labels={LABEL: kopf.PRESENT})
async def on_stage_pod(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **kw: Any) -> None:
    await reconcile((namespace, labels[LABEL]), memo, kw)


def forget(memo: kopf.Memo, key: Key, uid: str | None) -> None:
    state: State = memo.state
    if uid:
        state.gone.add(uid)
    memo.written.pop(key, None)
    state.failures.pop(key, None)
    state.due.pop(key, None)
    state.resync.pop(key, None)
    state.logs.pop(key, None)
    state.log_pods.pop(key, None)
    state.read_at.pop(key, None)
    state.quiet.pop(key, None)
    retry = state.retries.pop(key, None)
    if retry:
        retry.cancel()


def _wants_visit(memo: kopf.Memo, key: Key, now: float) -> bool:
    """Never reconciled by this process, or due (requeue_after, resync); failing jobs have their retry timer."""
    state: State = memo.state
    if key in state.failures:
        return False
    if memo.written.get(key) is None:
        return True  # e.g. its first reconcile failed before anything was written
    return state.due.get(key, float("inf")) <= now or state.resync.get(key, float("inf")) <= now


def _next_visit(state: State, key: Key, result: Plan) -> None:
    """When the poll comes back to a job no event wakes: what its plan asked for, an active one by the resync."""
    if result.requeue_after is None:
        state.due.pop(key, None)
    else:
        state.due[key] = time.monotonic() + result.requeue_after
    if result.status.phase in FINISHED_PHASES:
        state.resync.pop(key, None)
    else:
        _resync_later(state, key)


def _resync_later(state: State, key: Key) -> None:
    # Jittered: jobs created together do not resync together.
    state.resync[key] = time.monotonic() + RESYNC_POLLS * state.settings.poll_seconds * random.uniform(0.8, 1.2)


async def _poll(memo: kopf.Memo) -> None:
    state: State = memo.state
    while True:
        await asyncio.sleep(state.settings.poll_seconds)
        if not memo.indexes:
            continue
        now = time.monotonic()
        for key, (namespace, pod) in list(state.log_pods.items()):
            _start_log_read(key, memo, namespace, pod, now)
        for key in list(memo.indexes["finetunejobs"]):
            if key not in state.running and _wants_visit(memo, key, now):
                _spawn(state, reconcile(key, memo, memo.indexes))  # concurrently: a slow job holds no other


def _spawn(state: State, coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro, context=contextvars.copy_context())
    state.tasks.add(task)
    task.add_done_callback(state.tasks.discard)


async def reconcile(key: Key, memo: kopf.Memo, indexes: dict[str, Any]) -> None:
    """Reconcile one FineTuneJob; calls during a pass are folded into one more pass. Never raises."""
    if {"finetunejobs", "stage_jobs", "stage_pods"} <= indexes.keys():
        memo.indexes.update({k: indexes[k] for k in ("finetunejobs", "stage_jobs", "stage_pods")})
    state: State = memo.state
    if key in state.running:
        state.again.add(key)
        return
    state.running.add(key)
    try:
        while True:
            state.again.discard(key)
            await _attempt(key, memo)
            if key not in state.again:
                break
    finally:
        state.running.discard(key)


async def _attempt(key: Key, memo: kopf.Memo) -> None:
    metrics: OperatorMetrics = memo.metrics
    state: State = memo.state
    started = time.monotonic()
    try:
        await _reconcile(key, memo)
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # kopf would only log it: retry, and show it on the job
        metrics.reconcile_errors.inc()
        await _failed(key, memo, exc)
    else:
        state.failures.pop(key, None)
    finally:
        metrics.reconcile_seconds.observe(time.monotonic() - started)


async def _failed(key: Key, memo: kopf.Memo, exc: Exception) -> None:
    state: State = memo.state
    failure = state.failures.setdefault(key, Failure())
    failure.count += 1
    failure.error = str(exc) if isinstance(exc, ApiCallError) else f"{type(exc).__name__}: {exc}"
    delay = min(RETRY_CAP_SECONDS, state.settings.retry_seconds * 2.0 ** (failure.count - 1)) * random.uniform(0.8, 1.2)
    log.warning(
        "reconcile of %s/%s failed (%d in a row): %s; retrying in %.1fs", *key, failure.count, failure.error, delay
    )
    if not isinstance(exc, ApiCallError):
        log.debug("reconcile failure", exc_info=exc)
    if failure.count >= REPORT_AFTER and not failure.reported:
        failure.reported = await _report(key, memo, failure.error)
    previous = state.retries.get(key)
    if previous and not previous.done():
        previous.cancel()
    state.retries[key] = asyncio.get_running_loop().create_task(
        _retry_after(key, memo, delay), context=contextvars.copy_context()
    )


async def _retry_after(key: Key, memo: kopf.Memo, delay: float) -> None:
    await asyncio.sleep(delay)
    state: State = memo.state
    if state.retries.get(key) is asyncio.current_task():
        del state.retries[key]
    await reconcile(key, memo, memo.indexes)


async def _report(key: Key, memo: kopf.Memo, error: str) -> bool:
    """Condition Synced=False and a Warning Event naming the API error; whether the job could be told."""
    bodies = _unpacked(memo, "finetunejobs", key)
    if not bodies:
        return False
    body = _current(bodies[0], memo.written.get(key))
    message = f"the operator cannot act on this job: {error} (retrying)"
    await _post_events(memo, body, [("Warning", "ApiError", message[:1000])])
    try:
        job = FineTuneJob.model_validate(body)
    except ValidationError:
        return True
    status = report_api_error(job, message[:1000], dt.datetime.now(dt.UTC)).wire()
    try:
        written = await memo.state.call(memo.api.write_status, key[0], key[1], status, priority=STATUS)
    except ApiCallError as exc:  # the status write is what fails: the Event has said it
        log.warning("cannot show the error on %s/%s: %s", *key, exc)
        return True
    if written:
        _remember(memo, key, job.uid, status)
    return True


def _train_pod(run: int, pods: list[dict[str, Any]]) -> str | None:
    """Worker 0 of the current run's train stage, when it is running: the pod whose log carries progress."""
    for pod in pods:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if labels.get("finetune.dev/stage") != "train" or labels.get("finetune.dev/run") != str(run):
            continue
        if (meta.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index", "0") != "0":
            continue
        if (pod.get("status") or {}).get("phase") == "Running":
            return str(meta["name"])
    return None


def _train_log(key: Key, memo: kopf.Memo, run: int, pods: list[dict[str, Any]]) -> dict[str, str]:
    """The last log tail read of the running train pod, and a fresh read started beside this reconcile.

    A log read can hang (a node under load, a kubelet gone): the job's hand-offs never wait for it; the read
    reconciles the job again when it brings new lines. The poll goes on reading while the pod runs.
    """
    state: State = memo.state
    pod = _train_pod(run, pods)
    if pod is None:
        state.logs.pop(key, None)
        state.log_pods.pop(key, None)
        return {}
    state.log_pods[key] = (key[0], pod)
    _start_log_read(key, memo, key[0], pod, time.monotonic())
    seen, tail = state.logs.get(key, ("", ""))
    return {"train": tail} if seen == pod and tail else {}


def _start_log_read(key: Key, memo: kopf.Memo, namespace: str, pod: str, now: float) -> None:
    """A log read in the background, at most one at a time per job and one per poll."""
    state: State = memo.state
    every = state.settings.poll_seconds
    if key not in state.reading and now - state.read_at.get(key, -every) >= every:
        state.reading.add(key)
        state.read_at[key] = now
        _spawn(state, _read_log(key, memo, namespace, pod))


async def _read_log(key: Key, memo: kopf.Memo, namespace: str, pod: str) -> None:
    state: State = memo.state
    try:
        tail = await state.read_log(memo.api.log_tail, namespace, pod)
    finally:
        state.reading.discard(key)
    if tail and state.logs.get(key) != (pod, tail):
        state.logs[key] = (pod, tail)
        await reconcile(key, memo, memo.indexes)


def _started_but_unseen(api: KubeApi, job: FineTuneJob, stage: str) -> bool:
    """The status says this stage's Job was created, the index has no such Job, but the API server has it."""
    record = getattr(job.status.stages, stage)
    if record is None or record.state != "Running" or not record.job_name:
        return False
    return api.job_exists(job.namespace, child_name(job, stage))


def _remember(memo: kopf.Memo, key: Key, uid: str | None, status: dict[str, Any]) -> None:
    """Our last status write of a job, packed like the indexes (the phase apart: the metrics count it)."""
    memo.written[key] = {"uid": uid, "phase": status.get("phase"), "status": Packed(status)}


def _written_status(written: dict[str, Any] | None) -> dict[str, Any] | None:
    packed: Packed | None = (written or {}).get("status")
    return packed.unpack() if packed is not None else None


def _current(body: dict[str, Any], written: dict[str, Any] | None) -> dict[str, Any]:
    """The body with the newest status: ours, when the watch has not delivered our last write yet."""
    if written and written.get("uid") == (body.get("metadata") or {}).get("uid"):
        return {**body, "status": _written_status(written)}
    return body


def _inputs(body: dict[str, Any], observed: Observed) -> bytes:
    """A fingerprint of what a plan depends on besides the clock (the clock's part comes back as requeue_after: the
    due time). A fingerprint, not the inputs: those are a decoded copy of the job and its children's results."""
    metadata = {k: v for k, v in (body.get("metadata") or {}).items() if k != "resourceVersion"}
    # repr: as deterministic as needed (the same packed bytes decode in the same order); a miss only plans again
    text = repr((metadata, body.get("spec"), body.get("status"), observed))
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _acts(result: Plan) -> bool:
    """The plan creates or deletes something (else no API call, and no worker thread, is needed to carry it out)."""
    return bool(result.start or result.stop or result.delete_other_runs or result.cleanup or result.playground)


def _comparable(status: dict[str, Any] | None) -> dict[str, Any] | None:
    """A status without what changes on every look (progress.updatedAt): a write only when something else did."""
    if not status or not isinstance(status.get("progress"), dict):
        return status
    progress = {k: v for k, v in status["progress"].items() if k != "updatedAt"}
    return {**status, "progress": progress}


def _stored(memo: kopf.Memo, key: Key) -> PackedJob | None:
    return next(iter(memo.indexes.get("finetunejobs", {}).get(key, [])), None)


def _alive(memo: kopf.Memo, key: Key, uid: str | None) -> bool:
    stored = _stored(memo, key)
    return uid not in memo.state.gone and stored is not None and stored.uid == uid and not stored.deleting


def _run(body: dict[str, Any]) -> int:
    run = (body.get("status") or {}).get("run")
    return run if isinstance(run, int) else 1  # not a number: the validation that follows refuses the status


async def _reconcile(key: Key, memo: kopf.Memo) -> None:
    stored = _stored(memo, key)
    state: State = memo.state
    if stored is None or stored.deleting or stored.uid in state.gone:
        return
    body = _current(stored.unpack(), memo.written.get(key))
    jobs = _unpacked(memo, "stage_jobs", key)
    pods = _unpacked(memo, "stage_pods", key)
    run = _run(body)
    observed = observe(run, jobs, pods, _train_log(key, memo, run, pods))
    inputs = _inputs(body, observed)
    now = time.monotonic()
    if state.quiet.get(key) == inputs and state.due.get(key, float("inf")) > now:
        # Planned before with these inputs, nothing to do, and the plan asked for no visit by now: a resync that
        # finds the index as it was has nothing to catch up on.
        memo.metrics.reconcile_skipped.inc()
        if state.resync.get(key, float("inf")) <= now:
            _resync_later(state, key)
        return
    state.quiet.pop(key, None)
    api: KubeApi = memo.api
    try:
        job = FineTuneJob.model_validate(body)
    except ValidationError as exc:
        await _refuse(api, key, body, memo, exc)
        return
    result = plan(job, observed, dt.datetime.now(dt.UTC))
    if result.start and await state.call(_started_but_unseen, api, job, result.start):
        # The Job's event should come next; if not, look again.
        state.due[key] = time.monotonic() + state.settings.poll_seconds
        return  # our view of the children lags (a watch resuming after a pause)
    if not _alive(memo, key, job.uid):
        return  # deleted while we planned: create nothing
    if _acts(result):
        await state.call(apply, api, job, result, memo.settings)
    if result.start and not _alive(memo, key, job.uid):
        # Deleted while its stage was being created: the new children would outlive it until garbage collection.
        await state.call(api.delete_children, job.namespace, job.name, None)
        return
    status = result.status.wire()
    previous = _written_status(memo.written.get(key))
    unchanged = _comparable(status) in (_comparable(previous), _comparable(body.get("status") or None))
    if unchanged:
        status = previous or body.get("status") or status  # nothing but progress.updatedAt: no write
    elif not await state.call(api.write_status, key[0], key[1], status, priority=STATUS):
        return  # the job is gone
    memo.metrics.record(previous or body.get("status"), status, (body.get("metadata") or {}).get("creationTimestamp"))
    _remember(memo, key, job.uid, status)
    _next_visit(state, key, result)
    if unchanged and not _acts(result) and not result.events:
        state.quiet[key] = inputs
    # After the status write, not before: an operator killed in between loses an Event, it never repeats one.
    _queue_events(memo, key, body, [(e.type, e.reason, e.message) for e in result.events])


def _queue_events(memo: kopf.Memo, key: Key, body: dict[str, Any], events: list[tuple[str, str, str]]) -> None:
    """Post a pass's Events beside the job's next passes (its next hand-off never waits for them), after the
    Events of its earlier passes."""
    if not events:
        return
    state: State = memo.state
    previous = state.posting.get(key)
    body = _subject(body)  # what an Event names, not the whole job, is kept while the Events wait their turn

    async def post_in_order() -> None:
        if previous is not None:
            await asyncio.wait({previous})
        try:
            await _post_events(memo, body, events)
        except Exception as exc:  # a task's exception would only be logged at exit
            log.warning("cannot post Events for %s/%s: %s", *key, exc)

    task = asyncio.get_running_loop().create_task(post_in_order(), context=contextvars.copy_context())
    state.posting[key] = task
    state.tasks.add(task)

    def done(finished: asyncio.Task[None]) -> None:
        state.tasks.discard(finished)
        if state.posting.get(key) is finished:
            del state.posting[key]

    task.add_done_callback(done)


def _subject(body: dict[str, Any]) -> dict[str, Any]:
    meta = body.get("metadata") or {}
    return {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": {k: meta[k] for k in ("name", "namespace", "uid") if k in meta},
    }


async def _post_events(memo: kopf.Memo, body: dict[str, Any], events: list[tuple[str, str, str]]) -> None:
    """Events through the operator's own client: a pass may run in the poll loop or a retry timer, outside any kopf
    handler (kopf.event works only inside one). A failed post is logged, never retried by a reconcile (the status
    that records the transition is written: the reconcile is done)."""
    for type_, reason, message in events:
        try:
            await memo.state.post(memo.api.post_event, body, type_, reason, message)
        except ApiCallError as exc:
            log.warning("%s", exc)


def apply(api: KubeApi, job: FineTuneJob, result: Plan, settings: OperatorSettings) -> None:
    """Carry out a plan: deletions first, then the stage to start."""
    ns = job.namespace
    for stage in result.stop:
        api.delete_stage(ns, child_name(job, stage))
    if result.delete_other_runs:
        api.delete_children(ns, job.name, keep_run=result.status.run)
    if result.cleanup:
        api.delete_children(ns, job.name, keep_run=None)
        ctx = BuildContext(job=job.model_copy(update={"status": result.status}), stage="prepare", settings=settings)
        if workspace_pvc(ctx) is not None:  # only a workspace the operator created is the operator's to delete
            api.delete_workspace(ns, workspace_claim(ctx))
    if result.playground:
        _apply_playground(api, job, result, settings)
    if result.start:
        planned = job.model_copy(update={"status": result.status})
        objects = build_stage(planned, result.start, settings).all()
        # The PVC and the ConfigMap before the Job that mounts them.
        order = {"PersistentVolumeClaim": 0, "ConfigMap": 1, "Service": 2, "PodGroup": 3, "Job": 4}
        for obj in sorted(objects, key=lambda o: order.get(o["kind"], 5)):
            if obj["kind"] == "PersistentVolumeClaim" and result.start != "prepare":
                continue  # the workspace is created with a run's first stage, not re-posted by every stage
            api.create(obj)


def _apply_playground(api: KubeApi, job: FineTuneJob, result: Plan, settings: OperatorSettings) -> None:
    from .cluster.plugins.playground import build_playground, playground_name

    if result.playground == "delete":
        api.delete_playground(job.namespace, playground_name(job))
        return
    planned = job.model_copy(update={"status": result.status})
    order = {"ConfigMap": 0, "Service": 1, "Deployment": 2}
    for obj in sorted(build_playground(planned, settings), key=lambda o: order.get(o["kind"], 3)):
        api.create(obj)


async def _refuse(api: KubeApi, key: Key, body: dict[str, Any], memo: kopf.Memo, exc: ValidationError) -> None:
    """A spec this operator cannot read (an old CRD, a bypassed webhook): say so in status, do nothing else."""
    first = exc.errors()[0]
    where = "spec." + ".".join(str(p) for p in first["loc"][1:]) if first["loc"][:1] == ("spec",) else "spec"
    message = f"the spec cannot be used: {where}: {first['msg']}"
    status = FineTuneJobStatus.model_validate(body.get("status") or {}).wire() if _valid_status(body) else {}
    status.update(phase="Failed", message=message)
    if _written_status(memo.written.get(key)) != status:
        await memo.state.call(api.write_status, key[0], key[1], status, priority=STATUS)
        await _post_events(memo, body, [("Warning", "InvalidSpec", message)])
    _remember(memo, key, (body.get("metadata") or {}).get("uid"), status)
    memo.state.due.pop(key, None)  # nothing to revisit until the spec is edited (an event)
    memo.state.resync.pop(key, None)


def _valid_status(body: dict[str, Any]) -> bool:
    try:
        FineTuneJobStatus.model_validate(body.get("status") or {})
    except ValidationError:
        return False
    return True


def connect(kubeconfig: str | None = None, context: str | None = None) -> tuple[KubeApi, str]:
    """The operator's client from the first source that works, checked against the server: (api, description).

    Raises KubeConfigError with one line when there is no configuration or the server does not answer.
    """
    configuration, source = load_configuration(kubeconfig, context)
    version = check_reachable(configuration)
    from kubernetes import client

    return KubeApi(client.ApiClient(configuration)), f"{configuration.host} ({source}, Kubernetes {version})"


def run_operator(
    namespaces: list[str],
    liveness: str | None,
    peering: str | None,
    metrics_port: int | None = None,
    priority: int | None = None,
    kubeconfig: str | None = None,
    context: str | None = None,
) -> None:
    """Run the operator until it is stopped (what the operator image's entrypoint calls).

    With a peering name, replicas elect one active operator through kopf peering: the highest priority works,
    the others pause until its peering record expires. Equal priorities would freeze every replica, so each
    process draws its own unless one is given. Raises KubeConfigError (one line) when there is no cluster to talk to.
    """
    settings = OperatorSettings.from_env(os.environ)  # a bad value stops here, before anything is watched
    api, where = connect(kubeconfig, context)
    kopf.configure(verbose=False)
    logging.getLogger(__name__).info("API server: %s", where)
    if peering and priority is None:
        priority = random.SystemRandom().randint(1, 2**31 - 1)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces or (),
        liveness_endpoint=liveness,
        peering_name=peering,
        standalone=peering is None,
        priority=priority,
        memories=LeanMemories(),
        memo=kopf.Memo(
            metrics_port=metrics_port, settings=settings, api=api, kube_source=KubeSource(kubeconfig, context)
        ),
    )
