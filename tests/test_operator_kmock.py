"""The kopf operator against kmock's Kubernetes API emulator, with a test-side job controller.

Kept for what the real API server (tests/test_cluster_e2e.py) lacks: every request the operator made is replayed
against the chart's RBAC (the real test server authorizes everything); and, until they move there, metrics, a failed
stage, progress, peering, suspend/resume and TTL. Restarts are tested on the real server (20 SIGKILLs).

A real kopf operator (the project's handlers) talks HTTP to an in-memory Kubernetes API; the test plays the
cluster's job controller: it creates the pods of each stage Job the operator creates and completes or fails them,
with the stage summaries in the pods' termination messages, as the stage programs write them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import json
import socket
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import kmock
import kopf
import pytest
import pytest_asyncio
from kubernetes import client

from finetune_operator import controller  # noqa: F401  (registers the handlers)
from finetune_operator.cluster.kube import KubeApi

from .conftest import MINIMAL_JOB
from .helm import allows, one, render_chart

pytestmark = pytest.mark.asyncio
NS = "ml"
FTJ = "finetune.dev/v1alpha1/finetunejobs"
SUMMARIES = {
    "prepare": {
        "ok": True,
        "message": "90 train / 10 eval rows",
        "lineage": {"modelRevision": "abc", "datasetFingerprint": "f" * 64},
    },
    "train": {"ok": True, "message": "trained 10 steps", "steps": 10, "progress": {"step": 10, "totalSteps": 10}},
    "evaluate": {
        "ok": True,
        "message": "exactMatch 0.9",
        "metrics": {"base": {"exactMatch": 0.1}, "tuned": {"exactMatch": 0.9}},
        "gates": [],
        "gatesPassed": True,
        "summary": "exactMatch 0.9 (base 0.1)",
    },
    "export": {
        "ok": True,
        "message": "exported",
        "artifacts": [
            {
                "name": "merged",
                "format": "safetensors",
                "uri": "pvc://models/out/merged",
                "sha256": "0" * 64,
                "sizeBytes": 10,
            }
        ],
        "servingConfig": {"uri": "pvc://models/out/serving-config.pb", "sha256": "1" * 64},
    },
}
SERVER: dict[str, str] = {}


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=SERVER["url"], insecure=True)


def declare_resources(k: kmock.KubernetesEmulator) -> None:
    for key, kind, subresources in (
        (FTJ, "FineTuneJob", {"status"}),
        ("batch/v1/jobs", "Job", {"status"}),
        ("v1/pods", "Pod", {"status"}),
        ("v1/configmaps", "ConfigMap", set()),
        ("v1/services", "Service", set()),
        ("v1/events", "Event", set()),
        ("v1/persistentvolumeclaims", "PersistentVolumeClaim", set()),
    ):
        k.resources[key] = kmock.ResourceInfo(
            kind=kind,
            namespaced=True,
            subresources=subresources,
            verbs={"list", "watch", "get", "create", "patch", "delete"},
        )
    # kopf waits for these in discovery before it starts (namespaces, and CRDs to notice new resources).
    k.resources["v1/namespaces"] = kmock.ResourceInfo(kind="Namespace", namespaced=False, verbs={"list", "watch"})
    k.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = kmock.ResourceInfo(
        kind="CustomResourceDefinition", namespaced=False, verbs={"list", "watch"}
    )
    # kopf peering (the chart's crds/kopf.dev_peerings.yaml): replicas record themselves under .status.
    k.resources["kopf.dev/v1/clusterkopfpeerings"] = kmock.ResourceInfo(
        kind="ClusterKopfPeering", namespaced=False, verbs={"list", "watch", "get", "create", "patch"}
    )


def api_for(url: str, agent: str | None = None) -> KubeApi:
    config = client.Configuration(host=url)
    api = KubeApi(client.ApiClient(config))
    if agent:
        api.api_client.user_agent = agent
    return api


class ClusterJobController:
    """Plays the Kubernetes job controller: pods for new stage Jobs, then Complete (or Failed)."""

    def __init__(self, api: KubeApi, fail: dict[str, dict[str, Any]] | None = None, hold: set[str] | None = None):
        self.api, self.fail, self.hold = api, fail or {}, hold or set()
        self.done: set[str] = set()
        self.running: set[str] = set()

    def step(self) -> None:
        for job in self.api.list_jobs(NS, MINIMAL_JOB["metadata"]["name"]):
            name, stage = job["metadata"]["name"], job["metadata"]["labels"]["finetune.dev/stage"]
            if name in self.done:
                continue
            if stage in self.hold:
                if name not in self.running:  # a pod that runs until the hold is lifted
                    self.api.core.create_namespaced_pod(NS, self._pod(job, f"{name}-run", {"phase": "Running"}))
                    self.running.add(name)
                continue
            failed = stage in self.fail
            summary = self.fail.get(stage, SUMMARIES[stage])
            now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            pod = {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "name": f"{name}-x1",
                    "namespace": NS,
                    "resourceVersion": "1",
                    "labels": {**job["spec"]["template"]["metadata"]["labels"], "job-name": name},
                    "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
                },
                "spec": {"containers": [{"name": "stage", "image": "x"}]},
                "status": {
                    "phase": "Failed" if failed else "Succeeded",
                    "containerStatuses": [
                        {
                            "name": "stage",
                            "image": "x",
                            "imageID": "x",
                            "ready": False,
                            "restartCount": 0,
                            "state": {
                                "terminated": {
                                    "exitCode": 3 if failed else 0,
                                    "finishedAt": now,
                                    "message": json.dumps(summary),
                                }
                            },
                        }
                    ],
                },
            }
            self.api.core.create_namespaced_pod(NS, pod)
            condition = {
                "type": "Failed" if failed else "Complete",
                "status": "True",
                "reason": "PodFailurePolicy" if failed else "Completed",
                "message": "",
                "lastTransitionTime": now,
            }
            counts = {"failed": 1} if failed else {"succeeded": 1, "completionTime": now}
            status = {"conditions": [condition], "startTime": now, **counts}
            self.api.batch.patch_namespaced_job_status(name, NS, {"status": status})
            self.done.add(name)

    @staticmethod
    def _pod(job: dict[str, Any], name: str, status: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": NS,
                "resourceVersion": "1",
                "labels": {**job["spec"]["template"]["metadata"]["labels"], "job-name": job["metadata"]["name"]},
                "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
            },
            "spec": {"containers": [{"name": "stage", "image": "x"}]},
            "status": status,
        }


@contextlib.asynccontextmanager
async def operator(
    url: str,
    metrics_port: int | None = None,
    peering: str | None = None,
    priority: int = 0,
    agent: str | None = None,
    liveness: str | None = None,
) -> AsyncIterator[None]:
    """A real kopf operator in its own thread and event loop, as a separate process would be.

    (In the test's loop, kopf's shutdown would cancel every task created after its start, the emulator's
    connection handlers included.)
    """
    SERVER["url"] = url
    stop, ready = threading.Event(), threading.Event()
    memo = kopf.Memo(api=api_for(url, agent), metrics_port=metrics_port)
    main = kopf.operator(
        clusterwide=True,
        standalone=peering is None,
        peering_name=peering,
        priority=priority,
        liveness_endpoint=liveness,
        stop_flag=stop,
        ready_flag=ready,
        memo=memo,
    )
    thread = threading.Thread(target=asyncio.run, args=(main,), daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 15), "the operator did not start"
    try:
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 15)
        assert not thread.is_alive(), "the operator did not stop"
        memo.api.api_client.close()


async def drive(api: KubeApi, jobs: ClusterJobController, until: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        await asyncio.to_thread(jobs.step)
        body = await asyncio.to_thread(
            api.custom.get_namespaced_custom_object,
            "finetune.dev",
            "v1alpha1",
            NS,
            "finetunejobs",
            MINIMAL_JOB["metadata"]["name"],
        )
        if (body.get("status") or {}).get("phase") == until:
            return body
        await asyncio.sleep(0.2)
    raise AssertionError(f"phase {until} not reached: {json.dumps(body.get('status'), indent=1)[:3000]}")


def new_job() -> dict[str, Any]:
    obj = copy.deepcopy(MINIMAL_JOB)
    obj["metadata"].update(
        namespace=NS,
        uid="9b1deb4d-3b7d-4bad-9bdd-2b0d7b3dcb6d",
        resourceVersion="1",
        generation=1,
        creationTimestamp="2026-11-26T11:58:00Z",
    )
    return obj


@pytest_asyncio.fixture
async def cluster(kmock: kmock.KubernetesEmulator) -> AsyncIterator[tuple[kmock.KubernetesEmulator, KubeApi]]:
    declare_resources(kmock)
    api = api_for(str(kmock.url).rstrip("/"), agent="test-cluster")
    yield kmock, api
    api.api_client.close()  # keep-alive connections would hold the emulator's shutdown
    assert_rbac_allows_every_operator_request(kmock)


RBAC_VERBS = {"LIST": "list", "WATCH": "watch", "FETCH": "get", "CREATE": "create", "DELETE": "delete"}


def assert_rbac_allows_every_operator_request(k: kmock.KubernetesEmulator) -> None:
    """Every API call the operator (kopf and our KubeApi) made is granted by the chart's ClusterRole."""
    peering = any(r.resource and r.resource.group == "kopf.dev" for r in k._requests)
    rules = one(render_chart({"replicaCount": 2} if peering else {}), "ClusterRole")["rules"]  # 2: with peering
    made = set()
    for request in k._requests:
        agent = request.headers.get("User-Agent", "")
        if not agent.startswith(("kopf/", "finetune-operator/")) or request.resource is None:
            continue
        if not request.resource.plural:  # API discovery (/api, /apis/GROUP/VERSION): open to every account
            continue
        action = request.action.value if request.action else ""
        verb = "patch" if request.method.value == "PATCH" else RBAC_VERBS.get(action, action.lower())
        plural = request.resource.plural + (f"/{request.subresource}" if request.subresource else "")
        made.add((verb, request.resource.group or "", plural))
    denied = [call for call in made if not allows(rules, *call)]
    assert not denied, f"the chart's RBAC does not allow: {sorted(denied)}"
    # The log is really the operator's (kopf watches, our writes): the check above is not vacuous.
    assert {("watch", "finetune.dev", "finetunejobs"), ("create", "", "events")} <= made, sorted(made)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """The operator's /metrics as {"name{labels}": value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def _events(k: kmock.KubernetesEmulator) -> list[str]:
    """Event reasons the operator posted (kmock stores generateName'd events under one key, so read requests)."""
    return [r.data.get("reason") for r in k._requests if r.method.value == "POST" and "/events" in str(r.url)]


async def create_job(api: KubeApi) -> None:
    await asyncio.to_thread(
        api.custom.create_namespaced_custom_object, "finetune.dev", "v1alpha1", NS, "finetunejobs", new_job()
    )


async def test_a_job_goes_from_pending_to_succeeded(cluster):
    k, api = cluster
    port, health = free_port(), free_port()
    async with operator(str(k.url).rstrip("/"), metrics_port=port, liveness=f"http://127.0.0.1:{health}/healthz"):
        await create_job(api)
        body = await drive(api, ClusterJobController(api), "Succeeded")
        jobs = await asyncio.to_thread(api.list_jobs, NS, "demo")
        metrics = await asyncio.to_thread(scrape, port)
        probe = await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{health}/healthz", timeout=5)
    assert probe.status == 200  # what the chart's startup and liveness probes call
    status = body["status"]
    assert [status["stages"][s]["state"] for s in ("prepare", "train", "evaluate", "export")] == ["Succeeded"] * 4
    assert status["metrics"]["tuned"] == {"exactMatch": 0.9} and status["artifacts"][0]["name"] == "merged"
    assert status["lineage"]["modelRevision"] == "abc" and status["observedGeneration"] == 1
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Ready"] == "True" and conditions["Reconciling"] == "False"
    assert sorted(j["metadata"]["name"] for j in jobs) == ["demo-evaluate", "demo-export", "demo-prepare", "demo-train"]
    assert all(j["metadata"]["ownerReferences"][0]["uid"] == new_job()["metadata"]["uid"] for j in jobs)
    assert "kopf" not in json.dumps(status)  # kopf's bookkeeping stays out of the status
    events = _events(k)
    assert events.count("StageStarted") == 4 and events.count("StageSucceeded") == 4 and "Succeeded" in events
    assert metrics['finetune_jobs{namespace="ml",phase="Succeeded"}'] == 1
    assert metrics['finetune_jobs{namespace="ml",phase="Training"}'] == 0
    for stage in ("prepare", "train", "evaluate", "export"):
        assert metrics[f'finetune_stage_duration_seconds_count{{outcome="Succeeded",stage="{stage}"}}'] == 1
    assert metrics["finetune_time_to_first_stage_seconds_count"] == 1
    assert metrics["finetune_reconcile_errors_total"] == 0 and metrics["finetune_reconcile_duration_seconds_count"] > 4


async def test_a_failed_stage_ends_failed(cluster):
    k, api = cluster
    failure = {"ok": False, "message": "spec.dataset.source: row 4: column 'output' is a int"}
    async with operator(str(k.url).rstrip("/")):
        await create_job(api)
        body = await drive(api, ClusterJobController(api, fail={"prepare": failure}), "Failed")
        names = [j["metadata"]["name"] for j in await asyncio.to_thread(api.list_jobs, NS, "demo")]
    status = body["status"]
    assert status["message"] == f"prepare failed: {failure['message']}"
    assert [c["status"] for c in status["conditions"] if c["type"] == "Stalled"] == ["True"]
    assert names == ["demo-prepare"]  # train never started
    assert "StageFailed" in _events(k)


PROGRESS_LOG = "\n".join(
    [
        "Loading checkpoint shards: 100%",
        json.dumps({"finetune.dev/progress": "progress", "stage": "train", "step": 41, "totalSteps": 100}),
        json.dumps(
            {"finetune.dev/progress": "progress", "stage": "train", "step": 42, "totalSteps": 100, "loss": 1.25,
             "tokensPerSecond": 5120.0, "etaSeconds": 3480}
        ),
    ]
)  # fmt: skip


async def drive_until(api: KubeApi, jobs: ClusterJobController, check, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        await asyncio.to_thread(jobs.step)
        body = await asyncio.to_thread(
            api.custom.get_namespaced_custom_object, "finetune.dev", "v1alpha1", NS, "finetunejobs", "demo"
        )
        if check(body.get("status") or {}):
            return body
        await asyncio.sleep(0.2)
    raise AssertionError(f"not reached: {json.dumps(body.get('status'), indent=1)[:3000]}")


async def test_training_progress_comes_from_the_train_pod_log(cluster, monkeypatch):
    k, api = cluster
    monkeypatch.setattr("finetune_operator.controller.POLL_SECONDS", 0.5)
    (
        k[f"get /api/v1/namespaces/{NS}/pods/demo-train-run/log"] << PROGRESS_LOG
    )  # text/plain, as the API server serves logs
    jobs = ClusterJobController(api, hold={"train"})
    async with operator(str(k.url).rstrip("/")):
        await create_job(api)
        body = await drive_until(api, jobs, lambda s: (s.get("progress") or {}).get("step") == 42)
        status = body["status"]
        assert status["phase"] == "Training" and status["progress"]["percent"] == 42
        assert status["progress"]["eta"] == "58m00s" and status["progress"]["tokensPerSecond"] == 5120.0
        assert status["message"] == "train step 42/100 (42%), loss 1.25, ETA 58m00s"
        jobs.hold.clear()
        body = await drive(api, jobs, "Succeeded")
    assert body["status"]["progress"]["step"] == 10  # the train summary's final numbers replace the live ones


async def test_two_replicas_with_peering_one_works_and_the_other_takes_over(cluster):
    k, api = cluster
    url = str(k.url).rstrip("/")
    peering = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": "fto",
               "resourceVersion": "1"}}  # fmt: skip
    await asyncio.to_thread(api.custom.create_cluster_custom_object, "kopf.dev", "v1", "clusterkopfpeerings", peering)
    jobs = ClusterJobController(api, hold={"train"})
    async with operator(url, peering="fto", priority=20, agent="finetune-operator/standby"):
        async with operator(url, peering="fto", priority=100, agent="finetune-operator/leader"):
            await asyncio.sleep(1)  # the standby sees the leader's peering record and pauses
            await create_job(api)
            await drive_until(api, jobs, lambda s: s.get("phase") == "Training")
        # The leader is gone (its peering record with it); the standby resumes and finishes the job.
        jobs.hold.clear()
        await drive(api, jobs, "Succeeded", timeout=60)
    creators = {}
    for r in k._requests:
        if r.method.value == "POST" and r.url.path.endswith("/jobs"):
            creators.setdefault(r.data["metadata"]["name"], []).append(r.headers.get("User-Agent"))
    assert creators == {
        "demo-prepare": ["finetune-operator/leader"],
        "demo-train": ["finetune-operator/leader"],
        "demo-evaluate": ["finetune-operator/standby"],
        "demo-export": ["finetune-operator/standby"],
    }


async def patch_spec(api: KubeApi, generation: int, **spec: Any) -> None:
    """What `kubectl apply` of a changed spec does (kmock does not bump metadata.generation: the test does)."""
    body = {"metadata": {"generation": generation}, "spec": spec}
    await asyncio.to_thread(
        api.custom.patch_namespaced_custom_object, "finetune.dev", "v1alpha1", NS, "finetunejobs", "demo", body
    )


async def test_suspend_stops_the_running_stage_and_resume_runs_it_again(cluster):
    k, api = cluster
    jobs = ClusterJobController(api, hold={"train"})
    async with operator(str(k.url).rstrip("/")):
        await create_job(api)
        await drive_until(api, jobs, lambda s: s.get("phase") == "Training")
        await patch_spec(api, 2, runPolicy={"suspend": True})
        body = await drive_until(api, jobs, lambda s: s.get("phase") == "Suspended")
        names = [j["metadata"]["name"] for j in await asyncio.to_thread(api.list_jobs, NS, "demo")]
        assert names == ["demo-prepare"]  # train's Job is deleted; prepare's stays with its results
        assert body["status"]["stages"]["prepare"]["state"] == "Succeeded"
        await patch_spec(api, 3, runPolicy={"suspend": False})
        await drive_until(api, jobs, lambda s: s.get("phase") == "Training")
        jobs.hold.clear()
        body = await drive(api, jobs, "Succeeded")
    posts = [
        r.data["metadata"]["name"] for r in k._requests if r.method.value == "POST" and r.url.path.endswith("/jobs")
    ]
    assert sorted(posts) == ["demo-evaluate", "demo-export", "demo-prepare", "demo-train", "demo-train"]
    deletes = [r.url.path.rsplit("/", 1)[-1] for r in k._requests if r.method.value == "DELETE"]
    assert "demo-train" in deletes and "demo-prepare" not in deletes
    assert {"Suspended", "Resumed"} <= set(_events(k))
    assert body["status"]["observedGeneration"] == 3


async def test_ttl_after_finished_deletes_the_children_and_keeps_the_status(cluster, monkeypatch):
    k, api = cluster
    monkeypatch.setattr("finetune_operator.controller.POLL_SECONDS", 0.5)
    job = new_job()
    job["spec"]["runPolicy"] = {"ttlSecondsAfterFinished": 1}
    async with operator(str(k.url).rstrip("/")):
        await asyncio.to_thread(
            api.custom.create_namespaced_custom_object, "finetune.dev", "v1alpha1", NS, "finetunejobs", job
        )
        jobs = ClusterJobController(api)
        await drive(api, jobs, "Succeeded")
        deadline = time.monotonic() + 20
        while await asyncio.to_thread(api.list_jobs, NS, "demo") and time.monotonic() < deadline:
            await asyncio.sleep(0.3)
        body = await drive(api, jobs, "Succeeded")
    assert await asyncio.to_thread(api.list_jobs, NS, "demo") == []
    deleted = {
        (r.url.path.split("/")[-2], r.url.path.split("/")[-1]) for r in k._requests if r.method.value == "DELETE"
    }
    assert {
        ("jobs", "demo-train"),
        ("configmaps", "demo-train-config"),
        ("persistentvolumeclaims", "demo-workspace"),
    } <= deleted
    assert body["status"]["artifacts"][0]["name"] == "merged"  # the results outlive the children
