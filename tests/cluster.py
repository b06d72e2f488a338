"""A test cluster around the real API server: the controllers and the kubelet it lacks, a fault-injecting proxy,
and the operator as a real process.

`../shared/apiserver` is a real Kubernetes API server without controllers (see its README): nothing turns a Job
into pods, nothing runs a pod, nothing deletes the dependents of a deleted owner. `Cluster` plays those parts
against the server, over its HTTP API only, in one background thread (with `watch=True`, as the control-plane
benchmark runs it: pods, Jobs, ConfigMaps and PVCs read from `Informer`s instead of listed on every step, and each
Job with its pods handled in one of WATCH_WORKERS threads, the Jobs side by side):

- **the Job controller**: for every Job it creates the pods the real one would (generateName, the controller's
  labels and ownerReference; for an Indexed Job one pod per completion index with the completion-index
  annotation and label, `hostname` <job>-<index>, the Job's `subdomain`, and `JOB_COMPLETION_INDEX`), replaces
  failed pods up to `backoffLimit`, applies `podFailurePolicy` (FailJob / Ignore / Count on exit codes and pod
  conditions) and `podReplacementPolicy` (Failed, the default with a podFailurePolicy: a terminating pod is
  replaced only once it has failed), keeps counting pods that ended and are gone (what the job-tracking finalizer
  ensures), counts no failure for pods it stopped itself, leaves a suspended Job without pods, and writes the Job's
  status (startTime, active, ready, terminating, succeeded, failed, completedIndexes, completionTime,
  SuccessCriteriaMet+Complete or FailureTarget+Failed);
- **the kubelet**: it runs each pod's container as a local process. The container's command runs with the container's
  env (values, fieldRef, resourceFieldRef, secretKeyRef/configMapKeyRef, envFrom), each volume mount mapped to a host
  folder (a ConfigMap's files written out, an emptyDir fresh, a PersistentVolumeClaim one folder per claim that lives
  as long as the test cluster), the paths the container would see remapped to those folders wherever they appear
  (arguments, env, JSON config files: a process cannot see a container's mount namespace), and `<host>.<subdomain>`
  names resolved to the loopback. `finetune-operator` is this Python environment's CLI (the trainer image's
  entrypoint). The log is published through the `test.finetune.dev/log` pod annotation (the server's pods/log shim),
  the termination message is read from the mapped `terminationMessagePath` (FallbackToLogsOnError honoured), and pod
  status goes Pending -> Running -> Succeeded/Failed with container states as a kubelet writes them. A running pod is
  deleted gracefully, as on a node: this server would delete it at once, so the kubelet holds it with a finalizer; on
  deletion the process gets SIGTERM, then SIGKILL after the pod's terminationGracePeriodSeconds (bounded), the final
  status is written, and then the pod goes;
- **the garbage collector**: an object whose owners are all gone (checked with a live read) is deleted, and
  foreground/orphan deletion finalizers are honoured.

`FakeStages` replaces the processes with timers for control-plane tests: a stage "runs" for a set delay and ends
with a canned summary (or a chosen failure), train's log carries progress lines.

`FaultProxy` sits between the operator and the server (TLS on both sides, the operator's kubeconfig is the
admin's with the proxy's address) and fails chosen requests with a status code or delays them; it records every
request with the response code it got, which is how tests count Job creations and Event posts.

`OperatorProcess` is `finetune-operator operator` as a user starts it: a separate process whose only link to the
cluster is KUBECONFIG.

Not played: scheduling (no nodes, resources, GPUs, taints or affinity: every pod starts at once), images (every
container runs this Python environment), networking beyond loopback, readOnlyRootFilesystem/runAsUser, Services'
endpoints, the Job's activeDeadlineSeconds, and Kueue/Volcano.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import json
import math
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import urllib3
import yaml

# die_with_parent (as preexec_fn): a killed test run leaves no operator or stage process behind.
from finetune_operator.prefork import RUNTIME_ONLY_ENV, Launcher, die_with_parent
from finetune_operator.stages.runner import stage_environment

LOG_ANNOTATION = "test.finetune.dev/log"
INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
LOG_LINES_PUBLISHED = 300
TERMINATION_LIMIT = 4096
FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES = 80, 2048
KILL_GRACE_SECONDS = 5.0
"""How long stop() waits after SIGTERM before SIGKILL when the test cluster itself is stopped."""
MAX_GRACE_SECONDS = 60.0
"""A pod's terminationGracePeriodSeconds is honoured up to this bound (the operator's default is 300 s)."""
KUBELET_FINALIZER = "test.finetune.dev/kubelet"
WATCHED = ("pods", "jobs", "configmaps", "persistentvolumeclaims")
"""What a Cluster(watch=True) reads from informers."""
WATCH_WORKERS = 8
"""Threads of a Cluster(watch=True): each Job with its pods is handled in one, the Jobs side by side."""
RETRIES = 5

GROUPS = {
    "pods": "/api/v1",
    "configmaps": "/api/v1",
    "services": "/api/v1",
    "persistentvolumeclaims": "/api/v1",
    "secrets": "/api/v1",
    "events": "/api/v1",
    "jobs": "/apis/batch/v1",
    "finetunejobs": "/apis/finetune.dev/v1alpha1",
    "kopfpeerings": "/apis/kopf.dev/v1",
}
KINDS = {"Pod": "pods", "ConfigMap": "configmaps", "Service": "services", "PersistentVolumeClaim":
         "persistentvolumeclaims", "Job": "jobs", "FineTuneJob": "finetunejobs", "Secret": "secrets"}  # fmt: skip
DEPENDENT_KINDS = ("pods", "configmaps", "services", "persistentvolumeclaims", "jobs")  # dependents before owners


def now_stamp() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """Poll until `predicate()` is truthy and return it; AssertionError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------------- REST


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body[:500]}")
        self.status = status
        self.body = body


class Rest:
    """A small JSON client over the kubeconfig's TLS settings (dicts in, dicts out, no models)."""

    def __init__(self, kubeconfig: Path, connections: int = 4) -> None:
        config = yaml.safe_load(kubeconfig.read_text())
        context = next(c["context"] for c in config["contexts"] if c["name"] == config["current-context"])
        cluster = next(c["cluster"] for c in config["clusters"] if c["name"] == context["cluster"])
        user = next(u["user"] for u in config["users"] if u["name"] == context["user"])
        self.server = cluster["server"].rstrip("/")
        self.tls = {"ca": cluster["certificate-authority"], "cert": user["client-certificate"],
                    "key": user["client-key"]}  # fmt: skip
        self.http = urllib3.PoolManager(
            maxsize=connections,
            cert_reqs="CERT_REQUIRED",
            ca_certs=self.tls["ca"],
            cert_file=self.tls["cert"],
            key_file=self.tls["key"],
            timeout=urllib3.Timeout(connect=5, read=30),
            retries=False,
        )

    @staticmethod
    def path(plural: str, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        out = GROUPS[plural] + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
        return out + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    def request(self, method: str, path: str, body: Any = None, content_type: str = "application/json",
                **query: Any) -> Any:  # fmt: skip
        url = self.server + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(RETRIES + 1):
            response = self.http.request(method, url, body=data, headers={"Content-Type": content_type})
            # A controller retries what the server says is passing (429 "storage is (re)initializing", 5xx).
            if response.status not in (429, 500, 503, 504) or attempt == RETRIES:
                break
            time.sleep(0.2 * 2**attempt)
        text = response.data.decode()
        if response.status >= 400:
            raise ApiError(response.status, text)
        return json.loads(text) if text.startswith("{") else text

    def list(self, plural: str, namespace: str, **query: Any) -> list[dict[str, Any]]:
        return self.request("GET", self.path(plural, namespace), **query)["items"]

    def get(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", self.path(plural, namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def create(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.request("POST", self.path(plural, namespace), body)

    def patch(self, plural: str, namespace: str, name: str, body: dict[str, Any], sub: str | None = None) -> Any:
        return self.request("PATCH", self.path(plural, namespace, name, sub), body, "application/merge-patch+json")

    def delete(self, plural: str, namespace: str, name: str, propagation: str = "Background") -> bool:
        try:
            self.request("DELETE", self.path(plural, namespace, name), {"propagationPolicy": propagation})
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def close(self) -> None:
        self.http.clear()


class Informer:
    """One kind of one namespace, kept current by a list and then a watch (in a thread), as client-go's informers
    do: reading it costs no request. The harness's own writes are put in at once (`put`), so its next step never
    acts on what it has already changed; an older copy (a late watch event) never replaces a newer one."""

    WATCH_SECONDS = 30
    """The server closes each watch after this long; it is reopened from the last resourceVersion seen."""

    def __init__(self, rest: Rest, plural: str, namespace: str) -> None:
        self.rest, self.plural, self.namespace = rest, plural, namespace
        self.http = urllib3.PoolManager(maxsize=1, cert_reqs="CERT_REQUIRED", ca_certs=rest.tls["ca"],
                                        cert_file=rest.tls["cert"], key_file=rest.tls["key"], retries=False,
                                        timeout=urllib3.Timeout(connect=5, read=self.WATCH_SECONDS + 15))  # fmt: skip
        self.objects: dict[str, dict[str, Any]] = {}  # uid -> the newest copy seen
        self.names: dict[str, str] = {}  # name -> uid
        self.errors: list[str] = []
        self._deleted: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._response: Any = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 30) -> Informer:
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.plural}", daemon=True)
        self._thread.start()
        if not self._synced.wait(timeout):
            raise AssertionError(f"the {self.plural} informer did not list within {timeout:.0f}s: {self.errors[-1:]}")
        return self

    def stop(self) -> None:
        self._stop.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()  # unblocks the watch's read
        if self._thread:
            self._thread.join(15)
        self.http.clear()

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.objects.values())

    def uids(self) -> set[str]:
        with self._lock:
            return set(self.objects)

    def get(self, name: str) -> dict[str, Any] | None:
        with self._lock:
            uid = self.names.get(name)
            return self.objects.get(uid) if uid else None

    def put(self, obj: dict[str, Any]) -> None:
        """A copy of an object as the server answered a write (or a watch event): kept if it is newer."""
        meta = obj.get("metadata") or {}
        uid = meta.get("uid")
        if not uid or obj.get("kind") == "Status":
            return
        with self._lock:
            if uid in self._deleted:
                return
            known = self.objects.get(uid)
            if known is None or _version(obj) >= _version(known):
                self.objects[uid] = obj
                self.names[meta["name"]] = uid

    def _forget(self, obj: dict[str, Any]) -> None:
        uid, name = obj["metadata"]["uid"], obj["metadata"]["name"]
        with self._lock:
            self._deleted.add(uid)
            self.objects.pop(uid, None)
            if self.names.get(name) == uid:
                del self.names[name]

    def _run(self) -> None:
        version = ""
        while not self._stop.is_set():
            try:
                if not version:
                    version = self._list()
                version = self._watch(version)
            except Exception:  # recorded (Cluster.stop() raises them if they persist); reopened after a pause
                if self._stop.is_set():
                    return
                self.errors.append(traceback.format_exc())
                version = ""
                self._stop.wait(0.5)

    def _list(self) -> str:
        answer = self.rest.request("GET", Rest.path(self.plural, self.namespace))
        listed = {o["metadata"]["uid"]: o for o in answer["items"]}
        with self._lock:
            for uid in [u for u in self.objects if u not in listed]:  # gone while no watch was open
                self._deleted.add(uid)
                name = self.objects.pop(uid)["metadata"]["name"]
                if self.names.get(name) == uid:
                    del self.names[name]
        for obj in listed.values():
            self.put(obj)
        self._synced.set()
        return str(answer["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> str:
        """Apply the watch's events until the server ends it; the resourceVersion to go on from ("" to list again)."""
        query = urllib.parse.urlencode({"watch": "true", "resourceVersion": version, "allowWatchBookmarks": "true",
                                        "timeoutSeconds": self.WATCH_SECONDS})  # fmt: skip
        url = self.rest.server + Rest.path(self.plural, self.namespace) + "?" + query
        response = self.http.request("GET", url, preload_content=False)
        self._response = response
        try:
            if response.status != 200:
                return "" if response.status == 410 else version
            buffer = b""
            for chunk in response.stream(64 * 1024):
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        version = self._apply(json.loads(line), version)
                        if not version:
                            return ""
                if self._stop.is_set():
                    break
            return version
        finally:
            self._response = None
            response.release_conn()

    def _apply(self, event: dict[str, Any], version: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            return "" if obj.get("code") == 410 else version  # expired: list again
        if kind == "DELETED":
            self._forget(obj)
        elif kind in ("ADDED", "MODIFIED"):
            self.put(obj)
        return str((obj.get("metadata") or {}).get("resourceVersion") or version)


def _version(obj: dict[str, Any]) -> int:
    """resourceVersion as a number: this server's are etcd revisions (opaque in general, ordered here)."""
    return int((obj.get("metadata") or {}).get("resourceVersion") or 0)


class CachingRest(Rest):
    """A Rest whose answers to writes of watched kinds go into their informers at once."""

    def __init__(self, kubeconfig: Path, connections: int = 4) -> None:
        super().__init__(kubeconfig, connections)
        self.informers: dict[str, Informer] = {}

    def create(self, plural: str, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._seen(plural, super().create(plural, namespace, body))

    def patch(self, plural: str, namespace: str, name: str, body: dict[str, Any], sub: str | None = None) -> Any:
        return self._seen(plural, super().patch(plural, namespace, name, body, sub))

    def _seen(self, plural: str, answer: Any) -> Any:
        if plural in self.informers and isinstance(answer, dict):
            self.informers[plural].put(answer)
        return answer


# ---------------------------------------------------------------------------------------------- fake stages

FAKE_SUMMARIES: dict[str, dict[str, Any]] = {
    "prepare": {"ok": True, "message": "90 train / 10 eval rows",
                "lineage": {"modelRevision": "abc", "datasetFingerprint": "f" * 64}},
    "train": {"ok": True, "message": "trained 10 steps", "steps": 10,
              "progress": {"step": 10, "totalSteps": 10, "loss": 0.5}},
    "evaluate": {"ok": True, "message": "exactMatch 0.9", "gates": [], "gatesPassed": True,
                 "metrics": {"base": {"exactMatch": 0.1}, "tuned": {"exactMatch": 0.9}},
                 "summary": "exactMatch 0.9 (base 0.1)"},
    "export": {"ok": True, "message": "exported",
               "artifacts": [{"name": "merged", "format": "safetensors", "uri": "pvc://models/out/merged",
                              "sha256": "0" * 64, "sizeBytes": 10}],
               "servingConfig": {"uri": "pvc://models/out/serving-config.pb", "sha256": "1" * 64}},
}  # fmt: skip


@dataclasses.dataclass
class FakeStages:
    """Stages as timers: `delay` seconds (per stage in `delays`), then exit 0 with the canned summary, or the
    (exit code, summary) of `fail`; a stage in `hold` runs until released. Train logs progress lines."""

    delay: float = 0.3
    delays: dict[str, float] = dataclasses.field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = dataclasses.field(default_factory=lambda: dict(FAKE_SUMMARIES))
    fail: dict[str, tuple[int, dict[str, Any]]] = dataclasses.field(default_factory=dict)
    hold: set[str] = dataclasses.field(default_factory=set)
    progress_log: str = "\n".join(
        json.dumps({"finetune.dev/progress": "progress", "stage": "train", "step": s, "totalSteps": 10,
                    "loss": 2.0 - s / 10, "etaSeconds": 10 - s}) for s in (1, 5)
    )  # fmt: skip

    def delay_of(self, stage: str) -> float:
        return self.delays.get(stage, self.delay)


class FakeProcess:
    """What the kubelet needs of a Popen, for a fake stage."""

    pid = 0

    def __init__(self, stages: FakeStages, stage: str, run: int, log: Path, termination: Path) -> None:
        self.stages, self.stage, self.run = stages, stage, run
        self.log, self.termination = log, termination
        self.started = time.monotonic()
        self.returncode: int | None = None
        if stage == "train":
            log.write_text(stages.progress_log + "\n")

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        if self.stage in self.stages.hold or time.monotonic() - self.started < self.stages.delay_of(self.stage):
            return None
        code, summary = self.stages.fail.get(self.stage, (0, self.stages.summaries[self.stage]))
        payload = {"stage": self.stage, "run": self.run, **summary}
        self.termination.write_text(json.dumps(payload))
        with self.log.open("a") as log:
            log.write(f"{self.stage} {'done' if code == 0 else 'failed'}\n")
        self.returncode = code
        return code

    def terminate(self) -> None:
        self.returncode = 143 if self.returncode is None else self.returncode


# --------------------------------------------------------------------------------------------------- kubelet


@dataclasses.dataclass
class RunningPod:
    name: str
    uid: str
    root: Path
    log: Path
    termination: Path
    message_policy: str
    process: Any
    started_at: str
    published: int = -1
    published_at: float = 0.0
    killed_at: float | None = None


class PodNotReady(Exception):
    """The pod cannot start yet (a missing ConfigMap, PVC or Secret): it stays Pending, as on a node."""


class Cluster:
    """The Job controller, the kubelet and the garbage collector for one namespace of the real server."""

    def __init__(self, kubeconfig: Path, namespace: str, root: Path, fake: FakeStages | None = None,
                 interval: float = 0.2, watch: bool = False) -> None:  # fmt: skip
        """`watch`: read pods and Jobs from informers (a list, then a watch) instead of listing both on every step:
        what lets the harness keep up with a thousand FineTuneJobs (the benchmark); the garbage collector lists."""
        self.rest: Rest = CachingRest(kubeconfig, WATCH_WORKERS + 2) if watch else Rest(kubeconfig)
        self.watch = watch
        self._pool = concurrent.futures.ThreadPoolExecutor(WATCH_WORKERS, "cluster") if watch else None
        self._busy: set[str] = set()  # Job uids being handled by a worker
        self._handled: dict[str, float] = {}  # Job uid -> when a worker last finished with it
        self.informers: dict[str, Informer] = {}
        self.namespace, self.root, self.fake, self.interval = namespace, root, fake, interval
        self.running: dict[str, RunningPod] = {}
        self.errors: list[str] = []
        self.pods_created: list[str] = []
        self.processes_started: list[tuple[str, str]] = []  # (stage label, pod name)
        self.deleted_by_gc: list[tuple[str, str]] = []
        self._ended: dict[str, dict[str, dict[str, Any]]] = {}  # Job uid -> pod uid -> the ended pod
        self._final_logs: dict[str, str] = {}  # pod uid -> its log tail, published when the pod is let go
        self._stopped_by_controller: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._last_gc = 0.0
        # Stage processes start warm, as in local mode. Each pod has its own HOME and HOSTNAME; the stage sets
        # every cache variable itself (HF_HOME comes with the pod), so no library reads HOME at import.
        self.launcher = Launcher(runtime_only=RUNTIME_ONLY_ENV | {"HOME", "HOSTNAME"})
        root.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        if self.watch:
            assert isinstance(self.rest, CachingRest)
            for plural in WATCHED:
                self.informers[plural] = self.rest.informers[plural] = Informer(self.rest, plural, self.namespace)
                self.informers[plural].start()
        self._thread = threading.Thread(target=self._loop, name=f"cluster-{self.namespace}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop and every process it started (bounded); raise if the loop met an error."""
        self._stop.set()
        if self._thread:
            self._thread.join(30)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for informer in self.informers.values():
            informer.stop()
            if len(informer.errors) > 5:  # a watch that kept failing, not one reopened after a hiccup
                self.errors.extend(informer.errors[-2:])
        for pod in list(self.running.values()):
            self._kill(pod, force=False)
        deadline = time.monotonic() + KILL_GRACE_SECONDS
        for pod in list(self.running.values()):
            while pod.process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            self._kill(pod, force=True)
        for pod in self.running.values():  # nothing runs any more: their pods may go
            with contextlib.suppress(ApiError):
                live = self.rest.get("pods", self.namespace, pod.name)
                if live is not None and KUBELET_FINALIZER in (live["metadata"].get("finalizers") or []):
                    self._release(live)
        self.running.clear()
        self.launcher.close()
        self.rest.close()
        if self.errors:
            raise AssertionError("the test cluster failed:\n" + "\n".join(self.errors[:3]))

    def volume(self, claim: str) -> Path:
        """The host folder behind PersistentVolumeClaim `claim` (tests put models and data there)."""
        path = self.root / "pv" / claim
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                with self._lock:
                    self.step()
            except Exception:  # recorded and raised at stop(): a broken harness must fail the test
                self.errors.append(traceback.format_exc())
                if len(self.errors) > 20:
                    return
            self._stop.wait(self.interval)

    def step(self) -> None:
        if self._pool is None:
            pods = self._kubelet(self._listed("pods"))
            owned = _by_owner(pods)
            for job in self._listed("jobs"):
                self._job_controller(job, owned.get(job["metadata"]["uid"], []))
        else:
            self._step_concurrently()
        if time.monotonic() - self._last_gc > 4 * self.interval:
            self._garbage_collect()
            self._last_gc = time.monotonic()

    def _step_concurrently(self) -> None:
        """The same step with each Job and its pods handled in a worker thread, without waiting for one another
        (they are independent, and each takes several sequential requests); a Job still being handled, or handled
        since this look at the informers, waits for the next step; one with nothing to do is skipped."""
        looked = time.monotonic()
        pods = self._listed("pods")
        self._stop_vanished(self.informers["pods"].uids)
        jobs = {j["metadata"]["uid"]: j for j in self._listed("jobs")}
        owned = _by_owner(pods)
        units = [(uid, job, owned.get(uid, [])) for uid, job in jobs.items()]
        units.append(("", None, [p for p in pods if not any(o["uid"] in jobs for o in
                                                            p["metadata"].get("ownerReferences") or [])]))  # fmt: skip
        assert self._pool is not None
        for key, job, group in units:
            if key in self._busy or self._handled.get(key, 0.0) > looked or self._idle(job, group):
                continue
            self._busy.add(key)
            self._pool.submit(self._unit, key, job, group)

    def _unit(self, key: str, job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> None:
        try:
            pods = self._kubelet(pods, sweep=False)
            if job is not None:
                self._job_controller(job, pods)
        except Exception:  # recorded and raised at stop(), as in the loop
            self.errors.append(traceback.format_exc())
        finally:
            self._handled[key] = time.monotonic()
            self._busy.discard(key)

    def _idle(self, job: dict[str, Any] | None, pods: list[dict[str, Any]]) -> bool:
        """Nothing for the kubelet or the Job controller to do: a finished Job, its pods ended and let go."""
        if job is not None:
            status = job.get("status") or {}
            finished = _condition(status, "Complete") or _condition(status, "Failed")
            if not finished and not job["metadata"].get("deletionTimestamp"):
                return False
        for pod in pods:
            meta = pod["metadata"]
            if meta["uid"] in self.running or KUBELET_FINALIZER in (meta.get("finalizers") or []):
                return False
            ended = (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
            if not ended and not meta.get("deletionTimestamp"):
                return False
        return True

    def _get(self, plural: str, name: str) -> dict[str, Any] | None:
        """An object by name: from its informer when it has it (one the watch has not brought yet is read)."""
        informer = self.informers.get(plural)
        found = informer.get(name) if informer is not None else None
        return found if found is not None else self.rest.get(plural, self.namespace, name)

    def _listed(self, plural: str) -> list[dict[str, Any]]:
        if plural in self.informers:
            return self.informers[plural].items()
        return self.rest.list(plural, self.namespace)

    # ------------------------------------------------------------------------------------ kubelet

    def _stop_vanished(self, live: Callable[[], set[str]]) -> None:
        """Stop the processes of pods that are gone (`live`: the pods there are, looked at after the processes)."""
        processes = list(self.running.items())
        present = live()
        for uid, running in processes:
            if uid not in present:  # gone without the kubelet's say (its finalizer removed by hand): stop it
                self._kill(running, force=running.killed_at is not None
                           and time.monotonic() - running.killed_at > KILL_GRACE_SECONDS)  # fmt: skip
                if running.process.poll() is not None:
                    del self.running[uid]

    def _kubelet(self, pods: list[dict[str, Any]], sweep: bool = True) -> list[dict[str, Any]]:
        """Run, watch and stop `pods`; `sweep`: these are all the pods (a running one missing was deleted)."""
        if sweep:
            self._stop_vanished(lambda: {p["metadata"]["uid"] for p in pods})
        for pod in pods:
            running = self.running.get(pod["metadata"]["uid"])
            if running is not None and pod["metadata"].get("deletionTimestamp"):
                # graceful deletion: SIGTERM, the grace period, SIGKILL
                self._kill(running, force=running.killed_at is not None
                           and time.monotonic() - running.killed_at > grace_seconds(pod))  # fmt: skip
        out = []
        for pod in pods:
            meta, phase = pod["metadata"], (pod.get("status") or {}).get("phase", "Pending")
            if meta["uid"] in self.running:
                pod = self._watch_process(pod, self.running[meta["uid"]])
            elif not meta.get("deletionTimestamp") and phase not in ("Succeeded", "Failed"):
                pod = self._start_pod(pod)
            if meta["uid"] not in self.running and KUBELET_FINALIZER in (pod["metadata"].get("finalizers") or []):
                pod = self._release(pod)
            out.append(pod)
        return out

    def _release(self, pod: dict[str, Any]) -> dict[str, Any]:
        """The container has stopped and its final status is written: the pod may go (a deleted one goes now)."""
        left = [f for f in pod["metadata"]["finalizers"] if f != KUBELET_FINALIZER]
        body: dict[str, Any] = {"metadata": {"finalizers": left or None,
                                             "resourceVersion": pod["metadata"]["resourceVersion"]}}  # fmt: skip
        final_log = self._final_logs.get(pod["metadata"]["uid"])
        if final_log is not None:  # the log's last lines go with the release: one write, not two
            body["metadata"]["annotations"] = {LOG_ANNOTATION: final_log}
        try:
            self.rest.patch("pods", self.namespace, pod["metadata"]["name"], body)
        except ApiError as exc:
            if exc.status not in (404, 409):  # gone, or changed meanwhile: the next step tries again
                raise
            if exc.status == 409:
                return pod
        self._final_logs.pop(pod["metadata"]["uid"], None)
        return pod  # as last seen: the Job controller counts it in this step even when it is now gone

    def _start_pod(self, pod: dict[str, Any]) -> dict[str, Any]:
        meta = pod["metadata"]
        container = pod["spec"]["containers"][0]
        root = self.root / "pods" / meta["name"]
        try:
            mounts = self._mounts(pod, container, root)
            env = self._env(pod, container, mounts)
        except PodNotReady as exc:
            return self._pending(pod, str(exc))
        # On a node a deleted pod stays (Terminating) until its containers have stopped; this server deletes a pod
        # at once, so the kubelet holds it with a finalizer until the process has exited and its status is final
        # (the test Job controller creates its pods with it; a pod made otherwise gets it here).
        if KUBELET_FINALIZER not in (meta.get("finalizers") or []):
            try:
                hold = {"metadata": {"finalizers": [*(meta.get("finalizers") or []), KUBELET_FINALIZER],
                                     "resourceVersion": meta["resourceVersion"]}}  # fmt: skip
                self.rest.patch("pods", self.namespace, meta["name"], hold)
            except ApiError as exc:
                if exc.status in (404, 409):  # deleted or changed since listed: the next step sees it as it is
                    return pod
                raise
        termination = root / "termination-log"
        log = root / "container.log"
        stage = (meta.get("labels") or {}).get("finetune.dev/stage", "")
        if self.fake is not None:
            run = int((meta.get("labels") or {}).get("finetune.dev/run", "1"))
            process: Any = FakeProcess(self.fake, stage, run, log, termination)
        else:
            process = self._spawn(container, mounts, env, root, log)
        started = now_stamp()
        self.running[meta["uid"]] = RunningPod(
            meta["name"], meta["uid"], root, log, termination,
            container.get("terminationMessagePolicy", "File"), process, started,
        )  # fmt: skip
        self.processes_started.append((stage, meta["name"]))
        ready = [{"type": t, "status": "True", "lastTransitionTime": started}
                 for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")]  # fmt: skip
        status = {
            "phase": "Running",
            "startTime": started,
            "hostIP": "127.0.0.1",
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": ready,
            "containerStatuses": [
                {"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": True,
                 "started": True, "restartCount": 0, "containerID": f"local://{meta['uid']}",
                 "state": {"running": {"startedAt": started}}}
            ],
        }  # fmt: skip
        try:
            return self.rest.patch("pods", self.namespace, meta["name"], {"status": status}, sub="status")
        except ApiError as exc:
            if exc.status != 404:
                raise
            self._kill(self.running.pop(meta["uid"]), force=True)  # gone meanwhile (its hold removed by hand)
            return pod

    def _pending(self, pod: dict[str, Any], why: str) -> dict[str, Any]:
        container = pod["spec"]["containers"][0]
        waiting = {"reason": why.split(":")[0], "message": why}
        status = {"phase": "Pending", "containerStatuses": [
            {"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": False,
             "restartCount": 0, "state": {"waiting": waiting}}]}  # fmt: skip
        if (pod.get("status") or {}).get("containerStatuses") == status["containerStatuses"]:
            return pod
        return self.rest.patch("pods", self.namespace, pod["metadata"]["name"], {"status": status}, sub="status")

    def _mounts(self, pod: dict[str, Any], container: dict[str, Any], root: Path) -> Mounts:
        """The container's view of its volumes, made ready as a kubelet would."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        mounts = Mounts(root / "fs")
        # The termination message file first: the config files below name it and are remapped with it.
        (root / "termination-log").write_text("")
        mounts.add(container.get("terminationMessagePath", "/dev/termination-log"), root / "termination-log")
        files: list[Path] = []
        for mount in container.get("volumeMounts") or []:
            volume = volumes[mount["name"]]
            if "configMap" in volume:
                name = volume["configMap"]["name"]
                config_map = self._get("configmaps", name)
                if config_map is None:
                    raise PodNotReady(f"ContainerCreating: configmap {name!r} not found")
                host = root / "volumes" / mount["name"]
                host.mkdir(parents=True)
                for key, value in (config_map.get("data") or {}).items():
                    (host / key).write_text(value)
                    files.append(host / key)
            elif "emptyDir" in volume:
                host = root / "volumes" / mount["name"]
                host.mkdir(parents=True)
            elif "persistentVolumeClaim" in volume:
                claim = volume["persistentVolumeClaim"]["claimName"]
                if self._get("persistentvolumeclaims", claim) is None:
                    raise PodNotReady(f"ContainerCreating: persistentvolumeclaim {claim!r} not found")
                host = self.volume(claim)
            else:
                raise AssertionError(f"the test kubelet does not mount volume {volume}")
            mounts.add(mount["mountPath"], host, shared="persistentVolumeClaim" in volume)
        # Files in the mounted ConfigMaps name container paths too (the stage config): map them like the rest.
        for file in files:
            with contextlib.suppress(json.JSONDecodeError, UnicodeDecodeError):
                file.write_text(json.dumps(mounts.remap(json.loads(file.read_text()))))
        return mounts

    def _env(self, pod: dict[str, Any], container: dict[str, Any], mounts: Mounts) -> dict[str, str]:
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            ref = source.get("secretRef") or source.get("configMapRef") or {}
            env.update({source.get("prefix", "") + k: v for k, v in self._data(source, ref["name"]).items()})
        for entry in container.get("env") or []:
            if "value" in entry:
                env[entry["name"]] = entry["value"]
                continue
            value_from = entry.get("valueFrom") or {}
            if "fieldRef" in value_from:
                env[entry["name"]] = field_path(pod, value_from["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in value_from:
                env[entry["name"]] = resource_field(container, value_from["resourceFieldRef"])
            else:
                ref = value_from.get("secretKeyRef") or value_from.get("configMapKeyRef") or {}
                data = self._data(value_from, ref["name"])
                if ref["key"] not in data:
                    raise PodNotReady(f"CreateContainerConfigError: key {ref['key']!r} not in {ref['name']!r}")
                env[entry["name"]] = data[ref["key"]]
        subdomain = pod["spec"].get("subdomain")
        for name, value in env.items():  # cluster DNS: <hostname>.<subdomain> of a pod here is this host
            if subdomain and re.fullmatch(rf"[a-z0-9-]+\.{re.escape(subdomain)}(\.{self.namespace}(\.svc.*)?)?", value):
                env[name] = "127.0.0.1"
        env.setdefault("HOSTNAME", pod["spec"].get("hostname") or pod["metadata"]["name"])
        return {k: mounts.remap(v) for k, v in env.items()}

    def _data(self, source: dict[str, Any], name: str) -> dict[str, str]:
        import base64

        if "secretRef" in source or "secretKeyRef" in source:
            secret = self.rest.get("secrets", self.namespace, name)
            if secret is None:
                raise PodNotReady(f"CreateContainerConfigError: secret {name!r} not found")
            return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        config_map = self._get("configmaps", name)
        if config_map is None:
            raise PodNotReady(f"CreateContainerConfigError: configmap {name!r} not found")
        return dict(config_map.get("data") or {})

    def _spawn(self, container: dict[str, Any], mounts: Mounts, env: dict[str, str], root: Path,
               log: Path) -> subprocess.Popen:  # fmt: skip
        argv = [mounts.remap(a) for a in [*(container.get("command") or []), *(container.get("args") or [])]]
        if argv and argv[0] == "finetune-operator":  # the trainer image's entrypoint is this environment's CLI
            argv = [sys.executable, "-m", "finetune_operator", *argv[1:]]
        # The image's environment (PATH, PYTHONPATH, offline caches), then the container's; never the cluster's.
        base = {k: v for k, v in os.environ.items() if k != "KUBECONFIG" and not k.startswith("PYTEST")}
        defaults = stage_environment(Path(argv[argv.index("--workdir") + 1])) if "--workdir" in argv else {}
        with log.open("wb") as out:
            return self.launcher.start(argv, {**base, **env}, defaults, str(root), out.fileno(), tied=True)

    def _watch_process(self, pod: dict[str, Any], running: RunningPod) -> dict[str, Any]:
        code = running.process.poll()
        size = running.log.stat().st_size if running.log.exists() else 0
        if code is None:
            if size != running.published and time.monotonic() - running.published_at > 1.0:
                return self._publish_log(pod, running, size)
            return pod
        if size != running.published:
            self._final_logs[running.uid] = log_tail(running.log, LOG_LINES_PUBLISHED)
        del self.running[running.uid]
        finished = now_stamp()
        message = running.termination.read_bytes()[:TERMINATION_LIMIT].decode(errors="replace")
        if not message.strip() and code != 0 and running.message_policy == "FallbackToLogsOnError":
            message = log_tail(running.log, FALLBACK_LOG_LINES)[-FALLBACK_LOG_BYTES:]
        container = pod["spec"]["containers"][0]
        terminated = {"exitCode": code if code >= 0 else 128 - code, "reason": "Completed" if code == 0 else "Error",
                      "startedAt": running.started_at, "finishedAt": finished,
                      "containerID": f"local://{running.uid}"}  # fmt: skip
        if message:
            terminated["message"] = message
        conditions = [
            {"type": t, "status": "True" if t in ("PodScheduled", "Initialized") else "False",
             "lastTransitionTime": finished, **({} if t in ("PodScheduled", "Initialized") else
                                                {"reason": "PodCompleted"})}
            for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
        ]  # fmt: skip
        status = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "conditions": conditions,
            "containerStatuses": [
                {"name": container["name"], "image": container.get("image", ""), "imageID": "", "ready": False,
                 "started": False, "restartCount": 0, "containerID": f"local://{running.uid}",
                 "state": {"terminated": terminated}}
            ],
        }  # fmt: skip
        try:
            return self.rest.patch("pods", self.namespace, running.name, {"status": status}, sub="status")
        except ApiError as exc:
            if exc.status == 404:  # deleted while it ended
                return pod
            raise

    def _publish_log(self, pod: dict[str, Any], running: RunningPod, size: int) -> dict[str, Any]:
        running.published, running.published_at = size, time.monotonic()
        body = {"metadata": {"annotations": {LOG_ANNOTATION: log_tail(running.log, LOG_LINES_PUBLISHED)}}}
        try:
            return self.rest.patch("pods", self.namespace, running.name, body)
        except ApiError as exc:
            if exc.status == 404:
                return pod
            raise

    def _kill(self, running: RunningPod, force: bool) -> None:
        process = running.process
        if process.poll() is not None:
            return
        if isinstance(process, FakeProcess):
            process.terminate()
            return
        if not force and running.killed_at is not None:
            return  # one SIGTERM, as a kubelet sends: a second one could cut short the checkpoint the first asked for
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL if force else signal.SIGTERM)
        if force:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)
        running.killed_at = running.killed_at or time.monotonic()

    # ------------------------------------------------------------------------------- job controller

    def _job_controller(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        meta, spec = job["metadata"], job["spec"]
        status = job.get("status") or {}
        if meta.get("deletionTimestamp") or _condition(status, "Complete") or _condition(status, "Failed"):
            return
        if spec.get("suspend"):
            self._suspend(job, pods)
            return
        indexed = spec.get("completionMode") == "Indexed"
        completions = int(spec.get("completions", 1))
        parallelism = int(spec.get("parallelism", 1))
        pods = self._with_ended(meta["uid"], pods)
        ended = [p for p in pods if (p.get("status") or {}).get("phase") in ("Succeeded", "Failed")]
        terminating = [p for p in pods if p not in ended and p["metadata"].get("deletionTimestamp")]
        active = [p for p in pods if p not in ended and p not in terminating]
        succeeded = sorted({_index(p) for p in ended if p["status"]["phase"] == "Succeeded"})
        # A pod the controller stopped itself (suspend, a finished Job) is no failure.
        failed_pods = [p for p in ended if p["status"]["phase"] == "Failed"
                       and p["metadata"]["uid"] not in self._stopped_by_controller]  # fmt: skip
        counted_failures = 0
        outcome: tuple[str, str, str] | None = None  # (condition, reason, message)
        for pod in failed_pods:
            action, rule = _pod_failure_action(spec.get("podFailurePolicy"), pod)
            if action == "FailJob":
                exit_code = _exit_code(pod)
                outcome = ("Failed", "PodFailurePolicy",
                           f"Container stage for pod {self.namespace}/{pod['metadata']['name']} failed with exit "
                           f"code {exit_code} matching FailJob rule at index {rule}")  # fmt: skip
            elif action != "Ignore":
                counted_failures += 1
        backoff_limit = int(spec.get("backoffLimit", 6))
        if outcome is None and counted_failures > backoff_limit:
            outcome = ("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        if outcome is None and (len(succeeded) >= completions if indexed else len(succeeded) >= 1):
            outcome = ("Complete", "CompletionsReached", "Reached expected number of succeeded pods")
        if outcome is not None:
            for pod in active:  # what is still running of a finished Job is stopped
                self._stop_pod(pod)
            active = []
        else:
            wanted = [i for i in range(completions) if i not in succeeded] if indexed else [0]
            # podReplacementPolicy: with a podFailurePolicy (default Failed) a terminating pod is replaced only
            # once it has failed, so an index never runs twice at once; TerminatingOrFailed replaces it at once.
            policy = spec.get("podReplacementPolicy") or ("Failed" if spec.get("podFailurePolicy")
                                                          else "TerminatingOrFailed")  # fmt: skip
            occupying = active + (terminating if policy == "Failed" else [])
            running = {_index(p) for p in occupying}
            for index in wanted[:parallelism]:
                if index not in running:
                    pod = self._create_pod(job, index if indexed else None)
                    if self.watch:  # a kubelet at hand starts it at once: the Job's status counts it ready
                        pod = self._kubelet([pod], sweep=False)[0]
                    active.append(pod)
        self._write_job_status(job, active, succeeded if indexed else succeeded[:1], len(failed_pods), outcome,
                               len(terminating))  # fmt: skip

    def _with_ended(self, job_uid: str, pods: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The Job's pods with those that ended and are gone since: the controller keeps counting them (the real
        one holds each pod with its job-tracking finalizer until the pod is counted in the Job's status)."""
        remembered = self._ended.setdefault(job_uid, {})
        for pod in pods:
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                remembered[pod["metadata"]["uid"]] = pod
        present = {p["metadata"]["uid"] for p in pods}
        return pods + [p for uid, p in remembered.items() if uid not in present]

    def _stop_pod(self, pod: dict[str, Any]) -> None:
        self._stopped_by_controller.add(pod["metadata"]["uid"])
        self.rest.delete("pods", self.namespace, pod["metadata"]["name"])

    def _suspend(self, job: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        for pod in pods:
            if (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                self._stop_pod(pod)
        status = job.get("status") or {}
        if not _condition(status, "Suspended"):
            condition = {"type": "Suspended", "status": "True", "reason": "JobSuspended", "message": "Job suspended",
                         "lastProbeTime": now_stamp(), "lastTransitionTime": now_stamp()}  # fmt: skip
            body = {"status": {"active": 0, "conditions": [*(status.get("conditions") or []), condition]}}
            self.rest.patch("jobs", self.namespace, job["metadata"]["name"], body, sub="status")

    def _create_pod(self, job: dict[str, Any], index: int | None) -> dict[str, Any]:
        meta, template = job["metadata"], job["spec"]["template"]
        name, uid = meta["name"], meta["uid"]
        labels = {**(template.get("metadata") or {}).get("labels", {}), "batch.kubernetes.io/controller-uid": uid,
                  "batch.kubernetes.io/job-name": name, "controller-uid": uid, "job-name": name}  # fmt: skip
        annotations = dict((template.get("metadata") or {}).get("annotations") or {})
        spec = json.loads(json.dumps(template["spec"]))
        if index is not None:
            labels[INDEX_ANNOTATION] = annotations[INDEX_ANNOTATION] = str(index)
            spec["hostname"] = f"{name}-{index}"
            for container in spec["containers"]:
                container.setdefault("env", []).append({"name": "JOB_COMPLETION_INDEX", "valueFrom": {
                    "fieldRef": {"fieldPath": f"metadata.annotations['{INDEX_ANNOTATION}']"}}})  # fmt: skip
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "generateName": f"{name}-{index}-" if index is not None else f"{name}-",
                "namespace": self.namespace,
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "Job", "name": name, "uid": uid,
                                     "controller": True, "blockOwnerDeletion": True}],
                "finalizers": [KUBELET_FINALIZER],  # the kubelet's hold (see _start_pod), set in the same write
            },
            "spec": spec,
        }  # fmt: skip
        pod = self.rest.create("pods", self.namespace, body)
        self.pods_created.append(pod["metadata"]["name"])
        return pod

    def _write_job_status(self, job: dict[str, Any], active: list[dict[str, Any]], succeeded: list[int],
                          failed: int, outcome: tuple[str, str, str] | None,
                          terminating: int = 0) -> None:  # fmt: skip
        old = job.get("status") or {}
        stamp = now_stamp()
        status: dict[str, Any] = {
            "startTime": old.get("startTime") or stamp,
            "active": len(active),
            "ready": sum(1 for p in active if (p.get("status") or {}).get("phase") == "Running"),
            "succeeded": len(succeeded),
            "failed": failed,
            "terminating": terminating,
            "uncountedTerminatedPods": {},
            "conditions": [c for c in old.get("conditions") or [] if c.get("type") != "Suspended"],
        }
        if job["spec"].get("completionMode") == "Indexed":
            status["completedIndexes"] = _ranges(succeeded)
        if outcome is not None:
            kind, reason, message = outcome
            first = "SuccessCriteriaMet" if kind == "Complete" else "FailureTarget"
            for type_ in (first, kind):
                status["conditions"].append({"type": type_, "status": "True", "reason": reason, "message": message,
                                             "lastProbeTime": stamp, "lastTransitionTime": stamp})  # fmt: skip
            if kind == "Complete":
                status["completionTime"] = stamp
        comparable = {k: v for k, v in status.items() if k != "startTime"}
        if all(old.get(k) == v for k, v in comparable.items()) and old.get("startTime"):
            return
        with contextlib.suppress(ApiError):  # deleted meanwhile: the next step sees it gone
            self.rest.patch("jobs", self.namespace, job["metadata"]["name"], {"status": status}, sub="status")

    # ------------------------------------------------------------------------------ garbage collector

    def _garbage_collect(self) -> None:
        listed = {plural: self.rest.list(plural, self.namespace) for plural in DEPENDENT_KINDS}
        listed["finetunejobs"] = self.rest.list("finetunejobs", self.namespace)
        present = {o["metadata"]["uid"] for items in listed.values() for o in items}
        for plural in DEPENDENT_KINDS:
            for obj in listed[plural]:
                owners = obj["metadata"].get("ownerReferences") or []
                orphaned = owners and all(o["uid"] not in present and self._owner_gone(o) for o in owners)
                if orphaned and self.rest.delete(plural, self.namespace, obj["metadata"]["name"]):
                    self.deleted_by_gc.append((plural, obj["metadata"]["name"]))
        for plural, items in listed.items():
            for obj in items:
                if obj["metadata"].get("deletionTimestamp"):
                    self._finalize(plural, obj, listed)

    def _owner_gone(self, owner: dict[str, Any]) -> bool:
        plural = KINDS.get(owner["kind"])
        if plural is None:
            return False  # a kind this cluster does not know: leave its dependents alone
        current = self.rest.get(plural, self.namespace, owner["name"])
        return current is None or current["metadata"]["uid"] != owner["uid"]

    def _finalize(self, plural: str, obj: dict[str, Any], listed: dict[str, list[dict[str, Any]]]) -> None:
        finalizers = obj["metadata"].get("finalizers") or []
        uid = obj["metadata"]["uid"]
        dependents = [(p, d) for p, items in listed.items() for d in items
                      if any(o["uid"] == uid for o in d["metadata"].get("ownerReferences") or [])]  # fmt: skip
        if "foregroundDeletion" in finalizers:
            for dep_plural, dep in dependents:
                self.rest.delete(dep_plural, self.namespace, dep["metadata"]["name"], propagation="Foreground")
            if dependents:
                return
        elif "orphan" in finalizers:
            for dep_plural, dep in dependents:
                refs = [o for o in dep["metadata"]["ownerReferences"] if o["uid"] != uid]
                self.rest.patch(dep_plural, self.namespace, dep["metadata"]["name"],
                                {"metadata": {"ownerReferences": refs or None}})  # fmt: skip
        else:
            return
        left = [f for f in finalizers if f not in ("foregroundDeletion", "orphan")]
        with contextlib.suppress(ApiError):
            self.rest.patch(plural, self.namespace, obj["metadata"]["name"], {"metadata": {"finalizers": left or None}})


class Mounts:
    """A container's filesystem as far as its mounts go: `fs/<mountPath>` links to the volume's host folder.

    A process cannot enter the container's mount namespace, so the paths it is given (arguments, env, the JSON
    config files of mounted ConfigMaps) are rewritten into `fs`: every path at or under a mount, and every
    folder above one (e.g. /mnt/pvc, the root of the pvc://CLAIM mounts /mnt/pvc/CLAIM).
    """

    def __init__(self, fs: Path) -> None:
        self.fs = fs
        self.paths: list[tuple[str, Path | None]] = []

    def add(self, mount_path: str, host: Path, shared: bool = False) -> None:
        """`shared`: a volume every pod mounts at the same path (a PVC) is named by its host folder, so its paths
        are the same in every pod, as inside containers (caches keyed by path, warm stage starts)."""
        link = self.fs / mount_path.strip("/")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(host)
        self.paths.append((mount_path.rstrip("/"), host if shared else None))

    def remap(self, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: self.remap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.remap(v) for v in value]
        if not isinstance(value, str) or not value.startswith("/") or value == "/":
            return value
        path = value.rstrip("/")
        for mount, host in self.paths:
            if host is not None and (path == mount or path.startswith(mount + "/")):
                return str(host) + value[len(mount) :]
        for mount, _ in self.paths:
            if path == mount or path.startswith(mount + "/") or mount.startswith(path + "/"):
                return str(self.fs) + value
        return value


def field_path(pod: dict[str, Any], path: str) -> str:
    """The downward API's fieldRef values."""
    meta = pod["metadata"]
    match = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if match:
        return (meta.get(match.group(1)) or {}).get(match.group(2), "")
    simple = {"metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
              "spec.nodeName": "local", "spec.serviceAccountName": pod["spec"].get("serviceAccountName", "default"),
              "status.podIP": "127.0.0.1", "status.hostIP": "127.0.0.1"}  # fmt: skip
    if path not in simple:
        raise AssertionError(f"the test kubelet has no fieldRef {path}")
    return simple[path]


def resource_field(container: dict[str, Any], ref: dict[str, Any]) -> str:
    """The downward API's resourceFieldRef values: the container's request or limit over the divisor, rounded up."""
    from kubernetes.utils import parse_quantity

    kind, resource = ref["resource"].split(".", 1)
    value = ((container.get("resources") or {}).get(kind) or {}).get(resource)
    if value is None:
        raise AssertionError(f"the test kubelet has no node capacity for an unset {ref['resource']}")
    return str(math.ceil(parse_quantity(value) / parse_quantity(ref.get("divisor", "1"))))


def grace_seconds(pod: dict[str, Any]) -> float:
    """The pod's terminationGracePeriodSeconds (30 s by default), bounded. Not the deletion's own grace period:
    this server serves pods without graceful deletion and writes deletionGracePeriodSeconds 0 on every delete."""
    return min(float(pod["spec"].get("terminationGracePeriodSeconds", 30)), MAX_GRACE_SECONDS)


def log_tail(path: Path, lines: int) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as file:
        file.seek(max(0, path.stat().st_size - 64 * 1024))
        text = file.read().decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def _by_owner(pods: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    owned: dict[str, list[dict[str, Any]]] = {}
    for pod in pods:
        for owner in pod["metadata"].get("ownerReferences") or []:
            owned.setdefault(owner["uid"], []).append(pod)
    return owned


def _index(pod: dict[str, Any]) -> int:
    return int((pod["metadata"].get("annotations") or {}).get(INDEX_ANNOTATION, "0"))


def _condition(status: dict[str, Any], type_: str) -> bool:
    return any(c.get("type") == type_ and c.get("status") == "True" for c in status.get("conditions") or [])


def _exit_code(pod: dict[str, Any]) -> int | None:
    for container in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (container.get("state") or {}).get("terminated")
        if terminated:
            return int(terminated["exitCode"])
    return None


def _pod_failure_action(policy: dict[str, Any] | None, pod: dict[str, Any]) -> tuple[str, int]:
    """The action of the first podFailurePolicy rule that matches a failed pod ("Count" when none does)."""
    exit_code = _exit_code(pod)
    conditions = {(c["type"], c["status"]) for c in (pod.get("status") or {}).get("conditions") or []}
    for number, rule in enumerate((policy or {}).get("rules") or []):
        codes = rule.get("onExitCodes")
        if codes and exit_code is not None:
            values = set(codes["values"])
            if exit_code != 0 and (exit_code in values) == (codes["operator"] == "In"):
                return rule["action"], number
        for pattern in rule.get("onPodConditions") or []:
            if (pattern["type"], pattern.get("status", "True")) in conditions:
                return rule["action"], number
    return "Count", -1


def _ranges(indexes: list[int]) -> str:
    """completedIndexes as the Job controller writes it: "0-2,4"."""
    out: list[str] = []
    for index in sorted(indexes):
        if out and "-" not in out[-1].split(",")[-1] and int(out[-1]) == index - 1:
            out[-1] = f"{out[-1]}-{index}"
        elif out and "-" in out[-1] and int(out[-1].split("-")[1]) == index - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{index}"
        else:
            out.append(str(index))
    return ",".join(out)


# ------------------------------------------------------------------------------------------ fault proxy


@dataclasses.dataclass
class Fault:
    """Fail (status) or delay (seconds) the next `times` requests whose method and path match."""

    method: str
    path: str
    """A regular expression searched in the request path."""
    status: int | None = None
    delay: float = 0.0
    times: int = 1
    hits: int = 0


@dataclasses.dataclass
class Recorded:
    method: str
    path: str
    query: str
    status: int
    agent: str
    body: Any
    injected: bool


REASONS = {409: "AlreadyExists", 422: "Invalid", 500: "InternalError", 503: "ServiceUnavailable", 403: "Forbidden"}


class FaultProxy:
    """A loopback HTTPS proxy in front of the API server that records every request and injects faults."""

    def __init__(self, kubeconfig: Path) -> None:
        self.source = kubeconfig
        self.upstream = Rest(kubeconfig)
        self.pki = Path(self.upstream.tls["ca"]).parent  # the server's own certificate is served by the proxy
        self.faults: list[Fault] = []
        self.requests: list[Recorded] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def kubeconfig(self, path: Path) -> Path:
        """A copy of the admin kubeconfig that talks to the server through this proxy."""
        config = yaml.safe_load(self.source.read_text())
        for cluster in config["clusters"]:
            cluster["cluster"]["server"] = f"https://127.0.0.1:{self.port}"
        path.write_text(yaml.safe_dump(config))
        return path

    def inject(self, *faults: Fault) -> None:
        with self._lock:
            self.faults.extend(faults)

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def made(self, method: str, path: str, status: int | None = None) -> list[Recorded]:
        """The requests (method, path regex) the operator made, optionally only those answered with `status`."""
        with self._lock:
            return [r for r in self.requests if r.method == method and re.search(path, r.path)
                    and (status is None or r.status == status)]  # fmt: skip

    def __enter__(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self._thread.start()
        assert self._ready.wait(15), "the fault proxy did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread:
            self._thread.join(15)
        self.upstream.close()

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(self.pki / "server.crt", self.pki / "server.key")
        client_tls = ssl.create_default_context(cafile=self.upstream.tls["ca"])
        client_tls.load_cert_chain(self.upstream.tls["cert"], self.upstream.tls["key"])
        session = ClientSession(connector=TCPConnector(ssl=client_tls), timeout=ClientTimeout(total=None),
                                auto_decompress=False)  # fmt: skip

        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            fault = self._match(request.method, request.path)
            agent = request.headers.get("User-Agent", "")
            parsed = _json_or_none(body)
            if fault is not None and fault.delay:
                await asyncio.sleep(fault.delay)
            if fault is not None and fault.status:
                self._record(request, fault.status, agent, parsed, injected=True)
                reason = REASONS.get(fault.status, "InternalError")
                status = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                          "message": f"injected by the test proxy: {reason}", "reason": reason,
                          "code": fault.status}  # fmt: skip
                return web.json_response(status, status=fault.status)
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
            # As sent: a body without Content-Type (the kubernetes client's creates) must not become octet-stream.
            async with session.request(request.method, self.upstream.server + request.path_qs, data=body or None,
                                       headers=headers, skip_auto_headers=("Content-Type",)) as upstream:  # fmt: skip
                self._record(request, upstream.status, agent, parsed, injected=False)
                response = web.StreamResponse(status=upstream.status)
                for key, value in upstream.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        response.headers[key] = value
                with contextlib.suppress(ConnectionError):  # the client went away (a watch of a killed operator)
                    await response.prepare(request)
                    async for chunk in upstream.content.iter_any():
                        await response.write(chunk)
                    await response.write_eof()
                return response

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_tls)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        await self._stopping.wait()
        await runner.cleanup()
        await session.close()

    def _match(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.hits < fault.times and fault.method == method and re.search(fault.path, path):
                    fault.hits += 1
                    return fault
        return None

    def _record(self, request: Any, status: int, agent: str, body: Any, injected: bool) -> None:
        with self._lock:
            self.requests.append(Recorded(request.method, request.path, request.query_string, status, agent, body,
                                          injected))  # fmt: skip


def _json_or_none(body: bytes) -> Any:
    try:
        return json.loads(body) if body else None
    except ValueError:
        return None


# -------------------------------------------------------------------------------------- the operator


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class OperatorProcess:
    """`finetune-operator operator -n NAMESPACE` with KUBECONFIG, as a user runs it; its output goes to a file."""

    def __init__(self, kubeconfig: Path, namespace: str, log: Path, poll_seconds: float = 1.0,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:  # fmt: skip
        self.kubeconfig, self.namespace, self.log, self.args = kubeconfig, namespace, log, args
        # A shorter first retry (the same doubling): tests wait on the backoff after the fault they injected clears.
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "FINETUNE_POLL_SECONDS": str(poll_seconds),
                    "FINETUNE_RETRY_SECONDS": "0.25", **(env or {})}  # fmt: skip
        self.process: subprocess.Popen | None = None
        self.starts = 0

    def start(self, wait_ready: bool = True) -> OperatorProcess:
        self.health = free_port()
        argv = [sys.executable, "-m", "finetune_operator", "operator", "--namespace", self.namespace,
                "--liveness", f"http://127.0.0.1:{self.health}/healthz", "--metrics-port", "0", *self.args]  # fmt: skip
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts + 1} =====\n".encode())
            self.process = subprocess.Popen(argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=die_with_parent)  # fmt: skip
        self.starts += 1
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        """Until kopf's liveness endpoint answers (the operator has started its watches)."""
        import urllib.request

        def answered() -> bool:
            if self.process is None or self.process.poll() is not None:
                raise AssertionError(f"the operator exited ({self.process and self.process.returncode}):\n"
                                     + self.tail())  # fmt: skip
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{self.health}/healthz", timeout=2).status == 200
            except OSError:
                return False

        wait_until(answered, timeout, "the operator's liveness endpoint", interval=0.2)

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers run, whatever was in flight is lost."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(15)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 60) -> str:
        return log_tail(self.log, lines)

    def __enter__(self) -> OperatorProcess:
        return self.start() if self.process is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


@contextlib.contextmanager
def running(*things: Any) -> Iterator[None]:
    """Stop everything started, in reverse order, whatever happens."""
    with contextlib.ExitStack() as stack:
        for thing in things:
            stack.enter_context(thing)
        yield
