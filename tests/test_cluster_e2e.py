"""The operator as a process against the real API server, with the test cluster of tests/cluster.py.

`finetune-operator operator` runs with a KUBECONFIG (through the fault proxy where a test injects faults or counts
requests); the test cluster plays the Job controller, the kubelet and the garbage collector. The end-to-end test
runs the four real stage programs on a tiny model; the control-plane tests use fake stages (timers with canned
summaries) to stay fast.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from finetune_operator.stages.contract import PROGRESS_KEY

from .apiserver import ApiServer
from .cluster import (
    FAKE_SUMMARIES,
    Cluster,
    FakeStages,
    Fault,
    FaultProxy,
    OperatorProcess,
    Rest,
    free_port,
    wait_until,
)
from .conftest import first_word_rows, write_jsonl
from .helm import allows

# Every test here starts the real operator process against the real API server and waits for it (5-30 s each,
# minutes with the real stages): end-to-end tests, run by CI and left out of `-m "not slow"`.
pytestmark = pytest.mark.slow

STAGES = ("prepare", "train", "evaluate", "export")
NAME = "demo"
FAKE_SPEC: dict[str, Any] = {
    "model": {"source": "hf://org/model", "revision": "abc123"},
    "dataset": {"source": "s3://bucket/data.jsonl", "format": "completion"},
    "training": {"epochs": 1},
    "output": {"uri": "s3://bucket/out"},
    "storage": {"workspace": {"size": "1Gi"}},
}


@dataclass
class Env:
    """One test's namespace on the real server, its test cluster, the proxy and the operator process."""

    server: ApiServer
    namespace: str
    tmp: Path
    proxy: FaultProxy
    rest: Rest
    clusters: list[Cluster] = field(default_factory=list)
    operators: list[OperatorProcess] = field(default_factory=list)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def cluster(self, fake: FakeStages | None = None) -> Cluster:
        cluster = Cluster(self.server.kubeconfig, self.namespace, self.tmp / "cluster", fake=fake)
        cluster.start()
        self.clusters.append(cluster)
        return cluster

    def operator(self, through_proxy: bool = True, start: bool = True, proxy: FaultProxy | None = None,
                 args: tuple[str, ...] = ()) -> OperatorProcess:  # fmt: skip
        proxy = proxy or self.proxy
        kubeconfig = proxy.kubeconfig(self.tmp / f"operator-{proxy.port}.kubeconfig") if through_proxy else None
        log = self.tmp / f"operator-{len(self.operators)}.log"
        operator = OperatorProcess(kubeconfig or self.server.kubeconfig, self.namespace, log, args=args)
        self.operators.append(operator)
        return operator.start() if start else operator

    # ------------------------------------------------------------------ the FineTuneJob as a user sees it

    def apply(self, spec: dict[str, Any], name: str = NAME) -> dict[str, Any]:
        body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                "metadata": {"name": name, "namespace": self.namespace}, "spec": spec}  # fmt: skip
        manifest = self.tmp / f"{name}.yaml"
        manifest.write_text(yaml.safe_dump(body))
        self.server.kubectl("apply", "-f", str(manifest))
        return self.get(name)

    def get(self, name: str = NAME) -> dict[str, Any]:
        return self.rest.get("finetunejobs", self.namespace, name) or {}

    def status(self, name: str = NAME) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    def wait_phase(self, phase: str, timeout: float = 60, name: str = NAME, run: int | None = None) -> dict:
        def reached() -> dict[str, Any] | None:
            status = self.status(name)
            if status.get("phase") == "Failed" != phase:
                raise AssertionError(f"the job failed: {status.get('message')}")
            return status if status.get("phase") == phase and (run is None or status.get("run") == run) else None

        try:
            return wait_until(reached, timeout, f"phase {phase}", interval=0.2)
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}\nstatus: {json.dumps(self.status(name), indent=1)[:3000]}\n"
                f"operator log:\n{self.operators[-1].tail(40) if self.operators else ''}"
            ) from None

    def events(self, name: str = NAME) -> list[dict[str, Any]]:
        uid = self.get(name)["metadata"]["uid"]
        return [e for e in self.rest.list("events", self.namespace) if e["involvedObject"].get("uid") == uid]

    def settled_events(self, expected: dict[str, int], name: str = NAME) -> list[dict[str, Any]]:
        """The job's Events once at least `expected` of each reason are there (they are posted after the status)."""

        def enough() -> list[dict[str, Any]] | None:
            events = self.events(name)
            counts = collections.Counter(e["reason"] for e in events)
            return events if all(counts[r] >= n for r, n in expected.items()) else None

        try:
            events = wait_until(enough, 20, f"events {expected}", interval=0.3)
        except AssertionError:
            events = self.events(name)  # the assertions that follow say what is missing
        time.sleep(1)  # and a moment for a duplicate to show
        return self.events(name) if len(self.events(name)) != len(events) else events

    def children(self, plural: str) -> list[str]:
        return sorted(o["metadata"]["name"] for o in self.rest.list(plural, self.namespace))

    def job_posts(self) -> collections.Counter:
        """Stage Jobs the operator created (201), by name, as the proxy saw them."""
        return collections.Counter(r.body["metadata"]["name"] for r in self.proxy.made("POST", r"/jobs$", 201))


@pytest.fixture
def env(crd_installed: ApiServer, namespace: str, tmp_path: Path):
    proxy = FaultProxy(crd_installed.kubeconfig)
    with proxy:
        rest = Rest(crd_installed.kubeconfig)
        environment = Env(crd_installed, namespace, tmp_path, proxy, rest)
        try:
            yield environment
        finally:
            for operator in environment.operators:
                operator.kill()  # nothing to shut down gracefully at the end of a test
            for process in environment.processes:
                if process.poll() is None:
                    process.kill()
                    process.wait(15)
            errors = []
            for cluster in environment.clusters:
                try:
                    cluster.stop()
                except AssertionError as exc:
                    errors.append(str(exc))
            rest.close()
            assert not errors, errors[0]
        assert_rbac_allows(proxy.requests, namespace)


RBAC_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


def rbac_request(method: str, path: str, query: str) -> tuple[str, str, str] | None:
    """(verb, API group, resource[/subresource]) of a request path; None for discovery and /version."""
    parts = path.strip("/").split("/")
    if parts[0] == "api" and len(parts) > 2:
        group, rest = "", parts[2:]
    elif parts[0] == "apis" and len(parts) > 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if rest[0] == "namespaces" and len(rest) > 2:
        rest = rest[2:]
    plural, name, sub = rest[0], (rest[1:2] or [None])[0], (rest[2:3] or [None])[0]
    if method == "GET":
        verb = "get" if name else ("watch" if "watch=true" in query.lower() else "list")
    elif method == "DELETE":
        verb = "delete" if name else "deletecollection"
    else:
        verb = RBAC_VERBS[method]
    return verb, group, plural + (f"/{sub}" if sub else "")


def assert_rbac_allows(requests: list[Any], namespace: str) -> None:
    """Every request the operator made on the real server is granted by the chart installed as this operator
    runs: watching one namespace (a Role there, the ClusterRole for discovery), with peering where it peered."""
    if not requests:
        return
    from .helm import one, render_chart

    peering = any("/kopf.dev/" in r.path for r in requests)
    chart = render_chart({"watchNamespaces": [namespace], "peering": {"enabled": peering}})
    cluster_rules = one(chart, "ClusterRole")["rules"]
    namespace_rules = cluster_rules + one(chart, "Role")["rules"]
    made = {(call, f"/namespaces/{namespace}/" in r.path) for r in requests
            if (call := rbac_request(r.method, r.path, r.query))}  # fmt: skip
    denied = sorted(call for call, namespaced in made
                    if not allows(namespace_rules if namespaced else cluster_rules, *call))  # fmt: skip
    assert not denied, f"the chart's RBAC does not allow what the operator did: {denied}"


def assert_events_once(events: list[dict[str, Any]], runs: int = 1) -> collections.Counter:
    """No Event posted twice in a run (each is posted under a generated name: a repeat is a second object)."""
    seen = collections.Counter((e["reason"], e["message"]) for e in events)
    repeated = {k: n for k, n in seen.items() if n > runs}
    assert not repeated, f"events posted more than once: {repeated}"
    return collections.Counter(e["reason"] for e in events)


# ---------------------------------------------------------------------------------------- end to end


STEPS = 60  # the four-real-stages test's train length
STEP_RECORD = json.dumps({PROGRESS_KEY: "progress"})[1:-1]  # in a stage log line: a train step


def e2e_spec(model: str, train: str, evaluation: str, output: str, steps: int = 20) -> dict[str, Any]:
    return {
        "model": {"source": model},
        "dataset": {"source": train, "evalSource": evaluation, "format": "completion",
                    "columns": {"prompt": "instruction", "input": "input", "completion": "output"},
                    "maxSeqLength": 64},
        "method": {"type": "full"},
        "training": {"maxSteps": steps, "learningRate": 0.005, "batchSize": 16, "loggingSteps": 2,
                     "checkpointEverySteps": 10},
        "resources": {"gpusPerWorker": 0},
        "evaluation": {"metrics": ["perplexity", "exactMatch"], "generation": {"maxNewTokens": 4}},
        "export": {"formats": ["merged"]},
        "storage": {"workspace": {"size": "1Gi"}},
        "output": {"uri": output},
    }  # fmt: skip


class Watcher:
    """`kubectl get ftj -w`, as a user watching the job: the distinct rows it printed (without the Age)."""

    def __init__(self, server: ApiServer, namespace: str) -> None:
        self.server, self.namespace = server, namespace
        self.rows: list[str] = []
        self._process: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._read, daemon=True)

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self._add(line)

    def _add(self, line: str) -> None:
        row = " ".join(line.split()[:-1])
        if row and (not self.rows or self.rows[-1] != row):
            self.rows.append(row)

    def __enter__(self) -> Watcher:
        # By field selector: a watch of the name alone ends at once while the job does not exist yet.
        argv = ["kubectl", "get", "ftj", "-n", self.namespace, f"--field-selector=metadata.name={NAME}", "--no-headers",
                "-w"]  # fmt: skip
        self._process = subprocess.Popen(argv, env=self.server.env(), stdout=subprocess.PIPE,
                                         stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._process is not None
        self._process.terminate()
        self._process.wait(15)
        self._thread.join(15)
        # What kubectl shows now: the watch may not have printed the final status write yet.
        done = self.server.kubectl("get", "ftj", NAME, "-n", self.namespace, "--no-headers", check=False)
        if done.returncode == 0:
            self._add(done.stdout)


@contextlib.contextmanager
def train_paused_after_a_step(cluster: Cluster) -> Iterator[None]:
    """The train pod's process stopped (SIGSTOP) once its log shows a step, until the block ends: a micro model trains
    its steps faster than the log reaches the status (the kubelet publishes each second, the operator polls)."""

    def stepped() -> int | None:
        for pod in list(cluster.running.values()):
            if pod.name.startswith(f"{NAME}-train") and pod.log.exists() and STEP_RECORD in pod.log.read_text():
                return pod.process.pid
        return None

    pid = wait_until(stepped, 600, "the train pod's first step")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.mark.timeout(1800)  # four real stages twice (cluster, then local) on 2 cores that may be shared
def test_a_finetunejob_runs_the_four_real_stages_end_to_end(env: Env, tmp_path: Path):
    from finetune_operator.stages.tiny import build_tiny_model

    cluster = env.cluster()
    rows = first_word_rows(136)
    corpus = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in rows]
    model = build_tiny_model(cluster.volume("models") / "tiny", corpus, preset="micro")
    write_jsonl(cluster.volume("data") / "train.jsonl", rows[:120])
    write_jsonl(cluster.volume("data") / "eval.jsonl", rows[120:])
    for claim in ("models", "data"):  # the user's PVCs (the kubelet mounts only claims that exist)
        env.rest.create("persistentvolumeclaims", env.namespace, {"metadata": {"name": claim}, "spec": {
            "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})  # fmt: skip
    local = tmp_path / "local"
    shutil.copytree(model, local / "model")
    shutil.copytree(cluster.volume("data"), local / "data")
    manifest = local / "job.yaml"
    # 60 steps: a stage forked warm trains 20 in about a second, which the 1 s log poll and the 0.5 s kubectl
    # watch could both miss (the progress assertion below failed that way, twice in 2 sessions).
    local_spec = e2e_spec("./model", "./data/train.jsonl", "./data/eval.jsonl", "./out", steps=STEPS)
    manifest.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                        "metadata": {"name": NAME}, "spec": local_spec}))  # fmt: skip
    env.operator(through_proxy=False)  # straight at the server: KUBECONFIG as a user has it

    with Watcher(env.server, env.namespace) as watcher:
        env.apply(e2e_spec("pvc://models/tiny", "pvc://data/train.jsonl", "pvc://data/eval.jsonl",
                           "pvc://models/out", steps=STEPS))  # fmt: skip
        with train_paused_after_a_step(cluster):  # however fast it trains, kubectl sees it mid-way
            wait_until(lambda: any("train step" in row for row in watcher.rows), 120, "a train step row in kubectl")
        status = env.wait_phase("Succeeded", timeout=900)

    # kubectl showed the job moving through its stages, with the train step as it went.
    shown = "\n".join(watcher.rows)
    for phase in ("Preparing", "Training", "Evaluating", "Exporting", "Succeeded"):
        assert phase in shown, shown
    assert "train step" in shown and f"/{STEPS} (" in shown, shown
    assert watcher.rows[-1].startswith(f"{NAME} Succeeded export"), watcher.rows[-1]

    assert [status["stages"][s]["state"] for s in STAGES] == ["Succeeded"] * 4
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == "True"
    assert [s for s, _ in cluster.processes_started] == list(STAGES)  # one real process per stage, no rerun
    # Each forked from the harness's warm server (prefork.py): pods of one job differ only in HOME and HOSTNAME.
    assert (cluster.launcher.forked, cluster.launcher.fresh) == (len(STAGES), 0), cluster.launcher.why_fresh
    assert cluster.launcher.servers_started == 1  # the train pod's index is read at run time: no server of its own
    # The stages' results reached the status through the pods' termination messages.
    assert status["lineage"]["datasetFingerprint"] and status["metrics"]["tuned"] and status["servingConfig"]
    assert [a["name"] for a in status["artifacts"]] == ["merged", "serving-config"]
    out = cluster.volume("models") / "out"
    for artifact in status["artifacts"]:
        from finetune_operator.stages.export import digest

        path = out / artifact["uri"].removeprefix("pvc://models/out/")
        assert artifact["uri"].startswith("pvc://models/out/") and path.exists(), artifact
        assert digest(path) == (artifact["sha256"], artifact["sizeBytes"])
    counts = assert_events_once(env.settled_events({"StageSucceeded": 4, "Succeeded": 1}))
    assert counts["StageStarted"] == 4 and counts["StageSucceeded"] == 4 and counts["Succeeded"] == 1

    # The same job run by `finetune-operator run` reports the same results (run here, in this process, after the
    # cluster run: its stages fork from the session's warm server, as the cluster's pods fork from the kubelet's).
    from finetune_operator.cli import main

    assert main(["run", str(manifest), "-q"]) == 0
    expected = yaml.safe_load((local / "out" / "status.yaml").read_text())
    assert status["metrics"]["tuned"] == pytest.approx(expected["metrics"]["tuned"], rel=1e-5)
    assert status["metrics"]["base"] == pytest.approx(expected["metrics"]["base"], rel=1e-5)
    assert status["progress"]["step"] == expected["progress"]["step"] == STEPS
    assert status["lineage"]["datasetFingerprint"] == expected["lineage"]["datasetFingerprint"]
    assert [(a["name"], a["format"]) for a in status["artifacts"]] == [
        (a["name"], a["format"]) for a in expected["artifacts"]
    ]
    # The same weights and tokenizer, byte for byte; the serving config differs only by the URIs it names.
    digests = {a["name"]: (a["sha256"], a["sizeBytes"]) for a in status["artifacts"]}
    assert digests["merged"] == {a["name"]: (a["sha256"], a["sizeBytes"]) for a in expected["artifacts"]}["merged"]
    assert status["servingConfig"]["uri"].startswith("pvc://models/out/") and expected["servingConfig"]["uri"]


# ------------------------------------------------------------------------------------- control plane


def test_a_spec_change_starts_run_2_whose_status_holds_only_its_own_results(env: Env):
    fake = FakeStages(hold=set())
    cluster = env.cluster(fake)
    operator = env.operator()
    env.apply(FAKE_SPEC)
    first = env.wait_phase("Succeeded", run=1)
    assert first["metrics"]["tuned"] == {"exactMatch": 0.9} and first["completionTime"]

    # Run 2 reports other numbers; its train stage runs until the operator has been restarted.
    fake.summaries["evaluate"] = {**FAKE_SUMMARIES["evaluate"], "metrics": {"base": {"exactMatch": 0.1},
                                  "tuned": {"exactMatch": 0.97}}, "summary": "exactMatch 0.97 (base 0.1)"}  # fmt: skip
    fake.summaries["export"] = {**FAKE_SUMMARIES["export"], "artifacts": [
        {**FAKE_SUMMARIES["export"]["artifacts"][0], "sha256": "2" * 64}]}  # fmt: skip
    fake.hold.add("train")
    env.apply({**FAKE_SPEC, "training": {"epochs": 2}})
    during = env.wait_phase("Training", run=2)
    # What the planner dropped for run 2 is gone on the server, not only in the operator's memory.
    for dropped in ("metrics", "artifacts", "servingConfig", "completionTime"):
        assert not during.get(dropped), (dropped, during)
    assert set(during["stages"]) <= {"prepare", "train"}, during["stages"]

    env.settled_events({"StageStarted": 6})  # Events follow the status write: a kill before them loses them
    operator.kill()
    fake.hold.clear()
    env.operator()
    final = env.wait_phase("Succeeded", run=2)
    assert final["metrics"]["tuned"] == {"exactMatch": 0.97}
    assert final["artifacts"][0]["sha256"] == "2" * 64
    assert final["observedGeneration"] == 2
    assert [r["run"] for r in final["runs"]] == [1] and final["runs"][0]["phase"] == "Succeeded"
    assert final["runs"][0]["metrics"] == {"exactMatch": 0.9}
    jobs = env.rest.list("jobs", env.namespace)
    assert {j["metadata"]["labels"]["finetune.dev/run"] for j in jobs} == {"2"}  # run 1's children are gone
    # Each stage ran once per run: 8 stage pods in all.
    assert collections.Counter(s for s, _ in cluster.processes_started) == {s: 2 for s in STAGES}
    counts = assert_events_once(env.settled_events({"StageSucceeded": 8, "Succeeded": 2}), runs=2)
    assert counts["NewRun"] == 1 and counts["Succeeded"] == 2
    assert counts["StageStarted"] == counts["StageSucceeded"] == 8


def scrape(port: int) -> dict[str, float]:
    """The operator's /metrics as {"name{labels}": value}."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


def test_a_job_succeeds_with_metrics_and_a_runpolicy_change_alone_starts_no_new_run(env: Env):
    env.cluster(FakeStages())
    port = free_port()
    env.operator(args=("--metrics-port", str(port)))
    created = env.apply(FAKE_SPEC)
    status = env.wait_phase("Succeeded")
    assert status["lineage"]["modelRevision"] == "abc" and status["observedGeneration"] == 1
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions["Ready"] == "True" and conditions["Reconciling"] == "False"
    jobs = env.rest.list("jobs", env.namespace)
    assert all(j["metadata"]["ownerReferences"][0]["uid"] == created["metadata"]["uid"] for j in jobs)
    assert "kopf" not in json.dumps(status)  # kopf's bookkeeping stays out of the status
    # The operator counts the phase once its status write has returned, a moment after the server shows it.
    succeeded = f'finetune_jobs{{namespace="{env.namespace}",phase="Succeeded"}}'
    metrics = wait_until(lambda: (m := scrape(port)).get(succeeded) == 1 and m, 30, "the job counted as Succeeded")
    for stage in STAGES:
        assert metrics[f'finetune_stage_duration_seconds_count{{outcome="Succeeded",stage="{stage}"}}'] == 1
    assert metrics["finetune_time_to_first_stage_seconds_count"] == 1

    env.apply({**FAKE_SPEC, "runPolicy": {"ttlSecondsAfterFinished": 3600}})
    wait_until(lambda: env.status().get("observedGeneration") == 2, 30, "generation 2 observed")
    status = env.status()
    assert status["run"] == 1 and status["phase"] == "Succeeded" and not status.get("runs")
    assert sum(env.job_posts().values()) == 4


def test_failed_creates_and_status_writes_are_retried(env: Env):
    env.proxy.inject(
        Fault("POST", r"/jobs$", status=500, times=2),
        Fault("POST", r"/configmaps$", status=503, times=1),
        Fault("POST", r"/configmaps$", status=409, times=1),  # a 409 for an object that is not there
        Fault("PATCH", rf"/finetunejobs/{NAME}/status$", status=500, times=2),
        Fault("PATCH", rf"/finetunejobs/{NAME}/status$", delay=2.0, times=1),
    )
    env.cluster(FakeStages())
    env.operator()
    env.apply(FAKE_SPEC)
    status = env.wait_phase("Succeeded", timeout=90)
    assert all(f.hits == f.times for f in env.proxy.faults), env.proxy.faults
    assert env.job_posts() == {f"{NAME}-{s}": 1 for s in STAGES}
    assert {c["type"]: c["status"] for c in status["conditions"]}.get("Synced", "True") == "True"
    counts = assert_events_once(env.settled_events({"StageSucceeded": 4}))
    assert counts["StageSucceeded"] == 4


@pytest.mark.parametrize("code", [422, 500])
def test_an_api_error_that_persists_shows_as_a_condition_and_an_event(env: Env, code: int):
    env.proxy.inject(Fault("POST", r"/jobs$", status=code, times=10_000))
    env.cluster(FakeStages())
    env.operator()
    env.apply(FAKE_SPEC)

    synced = wait_until(lambda: synced_false(env), 60, "condition Synced=False")
    assert f"create Job {env.namespace}/{NAME}-prepare: {code}" in synced["message"], synced
    warnings = [e for e in env.events() if e["type"] == "Warning" and e["reason"] == "ApiError"]
    assert warnings and str(code) in warnings[0]["message"], warnings
    assert env.children("jobs") == []

    # The server recovers: the job goes on and the condition clears.
    env.proxy.clear()
    status = env.wait_phase("Succeeded", timeout=90)
    assert {c["type"]: c["status"] for c in status["conditions"]}["Synced"] == "True"


def synced_false(env: Env) -> dict[str, Any] | None:
    synced = {c["type"]: c for c in env.status().get("conditions") or []}.get("Synced")
    return synced if synced and synced["status"] == "False" else None


def stale_config_map(env: Env, labels: dict[str, str], owner: dict[str, Any] | None) -> None:
    metadata: dict[str, Any] = {"name": f"{NAME}-prepare-config", "labels": labels}
    if owner:
        metadata["ownerReferences"] = [
            {
                "apiVersion": "finetune.dev/v1alpha1",
                "kind": "FineTuneJob",
                "name": NAME,
                "uid": owner["metadata"]["uid"],
                "controller": True,
            }
        ]
    env.rest.create("configmaps", env.namespace, {"metadata": metadata, "data": {"config.json": "{}"}})


def test_a_409_from_an_earlier_runs_child_replaces_it(env: Env):
    created = env.apply(FAKE_SPEC)  # no operator yet: the ConfigMap of an "earlier run" is already there
    labels = {"app.kubernetes.io/managed-by": "finetune-operator", "finetune.dev/job": NAME, "finetune.dev/run": "0"}
    stale_config_map(env, labels, created)
    env.cluster(FakeStages())
    env.operator()
    env.wait_phase("Succeeded", timeout=60)
    config_map = env.rest.get("configmaps", env.namespace, f"{NAME}-prepare-config")
    assert config_map["metadata"]["labels"]["finetune.dev/run"] == "1"
    assert json.loads(config_map["data"]["config.json"])["job"] == NAME  # the real config, not the stale one


def test_a_409_from_an_object_the_operator_did_not_make_is_refused_and_shown(env: Env):
    stale_config_map(env, {"app": "someone-else"}, None)
    env.cluster(FakeStages())
    env.operator()
    env.apply(FAKE_SPEC)
    synced = wait_until(lambda: synced_false(env), 60, "condition Synced=False")
    assert f"{NAME}-prepare-config" in synced["message"] and "did not create" in synced["message"], synced
    assert env.children("jobs") == []
    assert json.loads(env.rest.get("configmaps", env.namespace, f"{NAME}-prepare-config")["data"]["config.json"]) == {}
    env.rest.delete("configmaps", env.namespace, f"{NAME}-prepare-config")  # the user removes it
    env.wait_phase("Succeeded", timeout=90)


def test_a_slow_log_read_does_not_stall_the_job(env: Env):
    env.proxy.inject(Fault("GET", r"/pods/.*/log$", delay=15.0, times=100))
    fake = FakeStages(delays={"train": 4.0})
    env.cluster(fake)
    env.operator()
    env.apply(FAKE_SPEC)
    env.wait_phase("Succeeded", timeout=60)


def test_deleting_a_finetunejob_while_a_stage_runs_stops_everything(env: Env):
    fake = FakeStages(hold={"train"})
    cluster = env.cluster(fake)
    env.operator()
    env.apply(FAKE_SPEC)
    env.wait_phase("Training")
    wait_until(lambda: any(s == "train" for s, _ in cluster.processes_started), 30, "the train pod running")
    deleted_at = len(env.proxy.requests)
    env.server.kubectl("delete", "ftj", NAME, "-n", env.namespace, "--wait=false")

    def all_gone() -> bool:
        return not any(env.children(p) for p in ("jobs", "pods", "configmaps", "persistentvolumeclaims"))

    wait_until(all_gone, 30, "the children deleted by the garbage collector")
    time.sleep(3)  # three operator poll periods: long enough for a wrongful re-create to show
    assert all_gone()
    later = [r for r in env.proxy.requests[deleted_at:] if r.method == "POST" and "/events" not in r.path]
    assert later == [], later
    assert not cluster.running  # the train process was stopped with its pod


def test_the_operator_killed_at_20_random_moments_finishes_the_run_once(env: Env):
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    fake = FakeStages(delay=1.5)
    cluster = env.cluster(fake)
    operator = env.operator(start=False)
    env.apply(FAKE_SPEC)
    kills = 0
    while kills < 20:
        if rng.random() < 0.25:  # in start-up, before or while the watches open
            operator.start(wait_ready=False)
            time.sleep(rng.uniform(0.2, 1.5))
        else:  # at work: between a stage's pod ending, the status write, the next Job's create, the Events
            operator.start()
            time.sleep(rng.uniform(0.0, 2.0))
        operator.kill()
        kills += 1
    operator.start()
    status = env.wait_phase("Succeeded", timeout=90)
    context = f"seed {seed}"
    assert env.job_posts() == {f"{NAME}-{s}": 1 for s in STAGES}, context
    assert [s for s, _ in cluster.processes_started] == list(STAGES), context  # no stage ran twice
    assert [status["stages"][s]["state"] for s in STAGES] == ["Succeeded"] * 4, context
    counts = assert_events_once(env.settled_events({"Succeeded": 1}))
    assert counts["StageSucceeded"] <= 4 and counts["Succeeded"] <= 1, context


def test_a_stage_that_exits_with_a_config_error_fails_the_job_without_a_retry(env: Env):
    failure = {"ok": False, "message": "spec.dataset.source: row 4: column 'output' is a int"}
    cluster = env.cluster(FakeStages(fail={"prepare": (3, failure)}))
    env.operator()
    env.apply(FAKE_SPEC)
    status = env.wait_phase("Failed")
    assert status["message"] == f"prepare failed: {failure['message']}"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Stalled"] == "True"
    assert env.children("jobs") == [f"{NAME}-prepare"]  # train never started
    job = env.rest.get("jobs", env.namespace, f"{NAME}-prepare")
    assert {c["type"]: c["reason"] for c in job["status"]["conditions"]}["Failed"] == "PodFailurePolicy"
    assert len(cluster.pods_created) == 1  # exit code 3 is not retried (podFailurePolicy FailJob)
    assert assert_events_once(env.settled_events({"StageFailed": 1}))["StageFailed"] == 1


def test_training_progress_comes_from_the_train_pod_log(env: Env):
    fake = FakeStages(hold={"train"})
    env.cluster(fake)
    env.operator()
    env.apply(FAKE_SPEC)

    def at_step_5() -> dict[str, Any] | None:
        status = env.status()
        return status if (status.get("progress") or {}).get("step") == 5 else None

    status = wait_until(at_step_5, 60, "progress at step 5 (from the pod log)")
    assert status["phase"] == "Training" and status["progress"]["percent"] == 50
    assert status["progress"]["eta"] == "5s" and status["message"] == "train step 5/10 (50%), loss 1.5, ETA 5s"
    fake.hold.clear()
    final = env.wait_phase("Succeeded")
    assert final["progress"]["step"] == 10  # the train summary's final numbers replace the live ones


def test_suspend_stops_the_running_stage_and_resume_runs_it_again(env: Env):
    fake = FakeStages(hold={"train"})
    cluster = env.cluster(fake)
    env.operator()
    env.apply(FAKE_SPEC)
    env.wait_phase("Training")
    wait_until(lambda: "train" in {s for s, _ in cluster.processes_started}, 30, "the train pod running")
    env.apply({**FAKE_SPEC, "runPolicy": {"suspend": True}})
    status = env.wait_phase("Suspended")
    assert status["stages"]["prepare"]["state"] == "Succeeded"
    wait_until(lambda: env.children("jobs") == [f"{NAME}-prepare"], 30, "train's Job deleted, prepare's kept")
    wait_until(lambda: not cluster.running, 30, "the train process stopped")
    env.apply({**FAKE_SPEC, "runPolicy": {"suspend": False}})
    env.wait_phase("Training")
    fake.hold.clear()
    final = env.wait_phase("Succeeded")
    assert final["observedGeneration"] == 3 and final["run"] == 1
    assert env.job_posts() == {f"{NAME}-prepare": 1, f"{NAME}-train": 2, f"{NAME}-evaluate": 1, f"{NAME}-export": 1}
    assert [s for s, _ in cluster.processes_started] == ["prepare", "train", "train", "evaluate", "export"]
    events = env.settled_events({"Suspended": 1, "Resumed": 1, "Succeeded": 1})
    counts = collections.Counter((e["reason"], e["message"]) for e in events)
    assert counts[("StageStarted", f"train started ({NAME}-train)")] == 2  # started, stopped, started again
    assert all(n == 1 for key, n in counts.items() if key[0] != "StageStarted"), counts
    assert collections.Counter(e["reason"] for e in events)["Suspended"] == 1


def test_ttl_after_finished_deletes_the_children_and_keeps_the_status(env: Env):
    env.cluster(FakeStages())
    env.operator()
    env.apply({**FAKE_SPEC, "runPolicy": {"ttlSecondsAfterFinished": 1}})
    env.wait_phase("Succeeded")

    def all_gone() -> bool:
        return not any(env.children(p) for p in ("jobs", "pods", "configmaps", "persistentvolumeclaims"))

    wait_until(all_gone, 40, "the children deleted after the TTL")
    status = env.status()
    assert status["phase"] == "Succeeded" and status["artifacts"][0]["name"] == "merged"  # results outlive them


def test_two_replicas_with_peering_one_works_and_the_other_takes_over(env: Env):
    env.rest.create("kopfpeerings", env.namespace, {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering",
                                                    "metadata": {"name": "fto"}})  # fmt: skip
    fake = FakeStages(hold={"train"})
    env.cluster(fake)
    with FaultProxy(env.server.kubeconfig) as standby_proxy:
        standby = env.operator(proxy=standby_proxy, args=("--peering", "fto", "--priority", "20"))
        leader = env.operator(args=("--peering", "fto", "--priority", "100"))
        time.sleep(1)  # the standby sees the leader's peering record and pauses
        env.apply(FAKE_SPEC)
        env.wait_phase("Training")
        leader.stop()  # a clean stop removes its peering record: the standby resumes
        fake.hold.clear()
        env.wait_phase("Succeeded", timeout=90)
        standby.kill()
        took_over = collections.Counter(r.body["metadata"]["name"] for r in standby_proxy.made("POST", r"/jobs$", 201))
        assert_rbac_allows(standby_proxy.requests, env.namespace)
    assert env.job_posts() == {f"{NAME}-prepare": 1, f"{NAME}-train": 1}
    assert took_over == {f"{NAME}-evaluate": 1, f"{NAME}-export": 1}
