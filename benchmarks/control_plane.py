"""The operator's control plane at scale: N FineTuneJobs at once against the real API server.

    python benchmarks/control_plane.py [--jobs 1 50 200] [--stage-seconds 0.5] [--json out.json]

What runs: the real API server (`../shared/apiserver/start.sh`, CRDs applied), the real operator process
(`finetune-operator operator`, tests/cluster.py's OperatorProcess) whose only link to the server is a recording
proxy (tests/cluster.py's FaultProxy, timestamping each request), and the test cluster's Job controller and kubelet
with fake stages (tests/cluster.py's Cluster(watch=True) + FakeStages: each stage "runs" for --stage-seconds, then
its pod succeeds and its Job is marked Complete; the harness reads pods, Jobs, ConfigMaps and PVCs from watches and
handles the Jobs side by side, so that it keeps up at a thousand jobs). The harness talks to the server directly,
so every request the proxy saw is the operator's. For each N (fresh namespace, fresh operator) it creates N
FineTuneJobs as fast as it can and waits (bounded) until all are Succeeded, then reports:

- first stage: FineTuneJob created -> its prepare Job created (POST answered 201 at the proxy);
- hand-off: a stage Job's Complete status written by the test Job controller -> the next stage's Job created;
- finish: the export Job Complete -> the FineTuneJob's status patched to Succeeded;
- stage run (the harness's share, not the operator's): a stage Job created -> its Complete written;
- the operator's API requests after the jobs were created, per transition (a transition = a stage Job created
  or a job finished: 5 per job), by verb and resource;
- reconciles per job (the operator's /metrics: finetune_reconcile_duration_seconds_count), and of those the ones
  planned (not skipped as unchanged since a pass that had nothing to do: finetune_reconcile_skipped_total);
- operator RSS (idle, peak) and CPU seconds per job (/proc via psutil);
- correctness: each stage Job created exactly once, no Event repeated (same object, reason and message).

Prints /proc/loadavg at start and end: the numbers mean little without knowing what else the cores were doing.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "operator")]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "operator"), os.environ.get("PYTHONPATH")]))

import psutil  # noqa: E402
from tests.apiserver import find_apiserver_dir  # noqa: E402
from tests.cluster import (  # noqa: E402
    Cluster,
    FakeStages,
    FaultProxy,
    Informer,
    OperatorProcess,
    Recorded,
    Rest,
    free_port,
)

SPEC: dict[str, Any] = {
    "model": {"source": "hf://org/model", "revision": "abc123"},
    "dataset": {"source": "s3://bucket/data.jsonl", "format": "completion"},
    "training": {"epochs": 1},
    "output": {"uri": "s3://bucket/out"},
    "storage": {"workspace": {"size": "1Gi"}},
}
PATH = re.compile(r"^/(?:api/v1|apis/[^/]+/[^/]+)(?:/namespaces/[^/]+)?/([^/]+)(?:/([^/]+))?(?:/([^/]+))?$")
WRITES = ("create", "patch", "update", "delete")


class BenchCluster(Cluster):
    """The test cluster without its garbage collector: no FineTuneJob is deleted during a run, so it has nothing to
    collect, and at 200 jobs its six list calls per pass were most of the harness's load on the API server."""

    def _garbage_collect(self) -> None:
        return None


class TimedProxy(FaultProxy):
    """The recording proxy, with the monotonic time each answer came back."""

    def __init__(self, kubeconfig: Path) -> None:
        super().__init__(kubeconfig)
        self.times: list[float] = []

    def _record(self, request: Any, status: int, agent: str, body: Any, injected: bool) -> None:
        with self._lock:
            self.requests.append(Recorded(request.method, request.path, request.query_string, status, agent, body,
                                          injected))  # fmt: skip
            self.times.append(time.monotonic())

    def since(self, start: float) -> list[tuple[float, Recorded]]:
        with self._lock:
            return [(t, r) for t, r in zip(self.times, self.requests, strict=True) if t >= start]


def verb_and_resource(request: Recorded) -> tuple[str, str]:
    match = PATH.match(request.path)
    if match is None:
        return request.method.lower(), "discovery"
    resource, name, sub = match.groups()
    resource += f"/{sub}" if sub else ""
    if request.method == "GET":
        verb = "watch" if "watch=true" in request.query else ("get" if name else "list")
    else:
        verb = {"POST": "create", "PATCH": "patch", "PUT": "update", "DELETE": "delete"}.get(request.method, "?")
    return verb, resource


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "max": None, "n": 0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"p50": statistics.median(ordered), "p95": p95, "max": ordered[-1], "n": len(ordered)}


class Sampler:
    """Peak RSS of a process, sampled every `interval` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.peak = max(self.peak, self.process.memory_info().rss)
            except psutil.Error:
                return

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(("finetune_reconcile_duration_seconds_count", "finetune_reconcile_duration_seconds_sum",
                            "finetune_reconcile_errors_total", "finetune_reconcile_skipped_total")):  # fmt: skip
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = out.get(name.split("{")[0], 0.0) + float(value)
    return out


def start_server(workdir: Path) -> Path:
    script_dir = find_apiserver_dir()
    if script_dir is None:
        sys.exit("the real API server is not here (../shared/apiserver); set FT_APISERVER_DIR")
    subprocess.run(["bash", str(script_dir / "start.sh"), str(workdir)], check=True, capture_output=True, timeout=120)
    values = dict(line.split("=", 1) for line in (workdir / "env").read_text().split() if "=" in line)
    kubeconfig = Path(values["KUBECONFIG"])
    kubectl = ["kubectl", "--kubeconfig", str(kubeconfig)]
    subprocess.run([*kubectl, "apply", "--server-side", "-f", str(REPO / "crds")], check=True, capture_output=True,
                   timeout=120)  # fmt: skip
    subprocess.run([*kubectl, "wait", "--for=condition=Established", "--timeout=60s",
                    "crd/finetunejobs.finetune.dev"], check=True, capture_output=True, timeout=90)  # fmt: skip
    return kubeconfig


def stop_server(workdir: Path) -> None:
    script_dir = find_apiserver_dir()
    if script_dir is not None:
        subprocess.run(["bash", str(script_dir / "stop.sh"), str(workdir)], capture_output=True, timeout=60)


def run_once(kubeconfig: Path, tmp: Path, jobs: int, stage_seconds: float, timeout: float,
             poll_seconds: float) -> dict[str, Any]:  # fmt: skip
    namespace = f"bench-{jobs}-{os.getpid()}-{int(time.time()) % 100000}"
    subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "create", "namespace", namespace], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    rest = Rest(kubeconfig)
    completed: dict[str, float] = {}  # stage Job name -> when the test Job controller wrote Complete
    cluster = BenchCluster(kubeconfig, namespace, tmp / namespace, fake=FakeStages(delay=stage_seconds), watch=True)
    write = cluster.rest.patch

    def timed_patch(plural: str, ns: str, name: str, body: dict[str, Any], sub: str | None = None) -> Any:
        answer = write(plural, ns, name, body, sub)
        conditions = (body.get("status") or {}).get("conditions") or []
        if plural == "jobs" and sub == "status" and any(c["type"] == "Complete" and c["status"] == "True"
                                                         for c in conditions):  # fmt: skip
            completed.setdefault(name, time.monotonic())
        return answer

    cluster.rest.patch = timed_patch  # type: ignore[method-assign]
    metrics_port = free_port()
    result: dict[str, Any] = {"jobs": jobs, "stageSeconds": stage_seconds}
    with TimedProxy(kubeconfig) as proxy:
        operator = OperatorProcess(proxy.kubeconfig(tmp / f"{namespace}.kubeconfig"), namespace,
                                   tmp / f"{namespace}-operator.log", poll_seconds=poll_seconds,
                                   args=("--metrics-port", str(metrics_port)))  # fmt: skip
        cluster.start()
        try:
            operator.start()
            assert operator.process is not None
            pid = operator.process.pid
            time.sleep(1.0)  # let the initial list/watch settle before taking the idle numbers
            result["rssIdleMB"] = psutil.Process(pid).memory_info().rss / 2**20
            cpu_start = cpu_seconds(pid)
            with Sampler(pid) as sampler:
                created, start = create_jobs(rest, namespace, jobs)
                result["createSeconds"] = time.monotonic() - start
                phases = wait_finished(rest, namespace, jobs, timeout)
                result["wallSeconds"] = time.monotonic() - start
                time.sleep(2.0)  # Events are posted after the status: a moment for late (or repeated) ones
            result["rssPeakMB"] = sampler.peak / 2**20
            result["cpuSecondsPerJob"] = (cpu_seconds(pid) - cpu_start) / jobs
            result["phases"] = dict(collections.Counter(phases.values()))
            result["metrics"] = scrape(metrics_port)
            result.update(analyse(proxy.since(start), created, completed, jobs))
            result["events"] = event_check(rest.list("events", namespace))
            result["jobsOnServer"] = len(rest.list("jobs", namespace))
        finally:
            operator.stop()
            try:
                cluster.stop()
            finally:
                rest.close()
                subprocess.run(["kubectl", "--kubeconfig", str(kubeconfig), "delete", "namespace", namespace,
                                "--wait=false"], capture_output=True, timeout=60)  # fmt: skip
    reconciles = result["metrics"].get("finetune_reconcile_duration_seconds_count", 0.0)
    result["reconcilesPerJob"] = reconciles / jobs
    result["plannedPerJob"] = (reconciles - result["metrics"].get("finetune_reconcile_skipped_total", 0.0)) / jobs
    result["reconcileMeanSeconds"] = (result["metrics"].get("finetune_reconcile_duration_seconds_sum", 0.0)
                                      / reconciles if reconciles else None)  # fmt: skip
    return result


def create_jobs(rest: Rest, namespace: str, jobs: int) -> tuple[dict[str, float], float]:
    created: dict[str, float] = {}
    start = time.monotonic()
    for index in range(jobs):
        name = f"job-{index:04d}"
        body = {"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                "metadata": {"name": name, "namespace": namespace}, "spec": SPEC}  # fmt: skip
        rest.create("finetunejobs", namespace, body)
        created[name] = time.monotonic()
    return created, start


def wait_finished(rest: Rest, namespace: str, jobs: int, timeout: float) -> dict[str, str]:
    """Every FineTuneJob's phase once all are Succeeded or Failed, or when `timeout` runs out (read from a watch:
    listing a thousand jobs every second would load the server the operator is measured on)."""
    deadline = time.monotonic() + timeout
    informer = Informer(rest, "finetunejobs", namespace).start()
    try:
        while True:
            phases = {j["metadata"]["name"]: (j.get("status") or {}).get("phase", "") for j in informer.items()}
            finished = sum(1 for p in phases.values() if p in ("Succeeded", "Failed"))
            if finished == jobs or time.monotonic() > deadline:
                if finished < jobs:
                    print(f"  timed out after {timeout:.0f}s: {finished}/{jobs} finished", file=sys.stderr)
                return phases
            time.sleep(1.0)
    finally:
        informer.stop()


def analyse(requests: list[tuple[float, Recorded]], created: dict[str, float], completed: dict[str, float],
            jobs: int) -> dict[str, Any]:  # fmt: skip
    stage_jobs: dict[str, list[tuple[float, str, str]]] = collections.defaultdict(list)  # ft -> (t, stage, name)
    posts: collections.Counter = collections.Counter()
    succeeded_at: dict[str, float] = {}
    by_call: collections.Counter = collections.Counter()
    for at, request in requests:
        verb, resource = verb_and_resource(request)
        by_call[(verb, resource)] += 1
        if verb == "create" and resource == "jobs" and request.status == 201:
            meta = request.body["metadata"]
            labels = meta.get("labels") or {}
            posts[meta["name"]] += 1
            stage_jobs[labels.get("finetune.dev/job", "?")].append((at, labels.get("finetune.dev/stage", "?"),
                                                                    meta["name"]))  # fmt: skip
        if verb == "patch" and resource.startswith("finetunejobs") and request.status < 300:
            phase = patched_phase(request.body)
            name = PATH.match(request.path).group(2)  # type: ignore[union-attr]
            if phase in ("Succeeded", "Failed"):
                succeeded_at.setdefault(name, at)
    first, handoff, finish = [], [], []
    running: dict[str, list[float]] = collections.defaultdict(list)  # stage -> Job created -> Complete (harness)
    for name, stages in stage_jobs.items():
        stages.sort()
        for at, stage, job_name in stages:
            if job_name in completed:
                running[stage].append(completed[job_name] - at)
        if name in created and stages[0][1] == "prepare":
            first.append(stages[0][0] - created[name])
        for (_, _, done), (next_at, _, _) in itertools.pairwise(stages):
            if done in completed:
                handoff.append(next_at - completed[done])
        last = stages[-1][2]
        if name in succeeded_at and last in completed:
            finish.append(succeeded_at[name] - completed[last])
    transitions = sum(posts.values()) + len(succeeded_at)
    per = {f"{verb} {resource}": round(count / max(transitions, 1), 2) for (verb, resource), count in
           sorted(by_call.items(), key=lambda item: -item[1])}  # fmt: skip
    writes = sum(n for (verb, resource), n in by_call.items() if verb in WRITES and resource != "events")
    reads = sum(n for (verb, _), n in by_call.items() if verb in ("get", "list"))
    return {
        "firstStage": percentiles(first),
        "handoff": percentiles(handoff),
        "finish": percentiles(finish),
        "stageRun": {stage: percentiles(values) for stage, values in running.items()},
        "transitions": transitions,
        "writesPerTransition": writes / max(transitions, 1),
        "eventPostsPerTransition": by_call[("create", "events")] / max(transitions, 1),
        "readsPerTransition": reads / max(transitions, 1),
        "watchesOpened": sum(n for (verb, _), n in by_call.items() if verb == "watch"),
        "callsPerTransition": per,
        "stageJobsCreated": sum(posts.values()),
        "stageJobsCreatedTwice": sorted(n for n, c in posts.items() if c > 1),
        "stageJobsExpected": 4 * jobs,
    }


def patched_phase(body: Any) -> str | None:
    """The status.phase a merge patch or a JSON patch sets, if any."""
    if isinstance(body, dict):
        return (body.get("status") or {}).get("phase")
    for op in body if isinstance(body, list) else []:
        value = op.get("value")
        if op.get("path") == "/status/phase":
            return value
        if op.get("path") == "/status" and isinstance(value, dict):
            return value.get("phase")
    return None


def event_check(events: list[dict[str, Any]]) -> dict[str, Any]:
    seen = collections.Counter((e["involvedObject"].get("name"), e.get("reason"), e.get("message")) for e in events)
    repeated = {f"{k[0]} {k[1]}": n for k, n in seen.items() if n > 1}
    counted = [e["metadata"]["name"] for e in events if (e.get("count") or 1) > 1]
    return {"total": len(events), "repeated": repeated, "countAboveOne": counted}


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def stage_runs(by_stage: dict[str, dict[str, float | None]]) -> str:
    """The stages' run-time medians as a range ("9-13 s"): the harness's pace, not the operator's."""
    medians = [v["p50"] for v in by_stage.values() if v.get("p50") is not None]
    return f"{min(medians):.0f}-{max(medians):.0f} s" if medians else "-"


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| jobs (finished) | first stage p50 / p95 / max | hand-off p50 / p95 / max | finish p50 "
            "| stage run p50 (by stage) | writes / transition (+ Events) | reads / transition "
            "| reconciles (planned) / job | RSS idle → peak | CPU s / job "
            "| Jobs once, Events once |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in results:
        first, handoff = r["firstStage"], r["handoff"]
        finished = r["phases"].get("Succeeded", 0)
        # A run cut off by its timeout created fewer Jobs than expected: what counts then is that none was twice.
        all_created = r["stageJobsCreated"] == r["stageJobsExpected"] or finished < r["jobs"]
        once = (not r["stageJobsCreatedTwice"] and all_created and not r["events"]["repeated"]
                and not r["events"]["countAboveOne"])  # fmt: skip
        rows.append(
            f"| {r['jobs']} ({finished}) | {fmt(first['p50'])} / {fmt(first['p95'])} / {fmt(first['max'])} s "
            f"| {fmt(handoff['p50'])} / {fmt(handoff['p95'])} / {fmt(handoff['max'])} s | {fmt(r['finish']['p50'])} s "
            f"| {stage_runs(r.get('stageRun') or {})} "
            f"| {r['writesPerTransition']:.2f} (+ {r['eventPostsPerTransition']:.2f}) | {r['readsPerTransition']:.2f} "
            f"| {r['reconcilesPerJob']:.1f} ({r['plannedPerJob']:.1f}) "
            f"| {r['rssIdleMB']:.0f} → {r['rssPeakMB']:.0f} MB "
            f"| {r['cpuSecondsPerJob']:.2f} | {'yes' if once else 'NO'} ({r['stageJobsCreated']} Jobs) |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 50, 200], help="N concurrent FineTuneJobs per run")
    parser.add_argument("--stage-seconds", type=float, default=0.5, help="how long each fake stage runs")
    parser.add_argument("--poll-seconds", type=float, default=1.0, help="the operator's FINETUNE_POLL_SECONDS")
    parser.add_argument("--timeout", type=float, default=0, help="per run; default 120 s + 3 s per job")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    load_start = Path("/proc/loadavg").read_text().strip()
    cores, python = os.cpu_count(), platform.python_version()
    print(f"machine: {platform.node()} {platform.machine()} {platform.processor()}, {cores} cores, Python {python}")
    print(f"load average at start: {load_start}")
    results = []
    with tempfile.TemporaryDirectory(prefix="ft-control-plane-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            kubeconfig = start_server(tmp / "apiserver")
            for jobs in args.jobs:
                print(f"N={jobs} ...", flush=True)
                timeout = args.timeout or 120 + 3 * jobs
                result = run_once(kubeconfig, tmp, jobs, args.stage_seconds, timeout, args.poll_seconds)
                results.append(result)
                print(json.dumps(result, indent=1), flush=True)
        finally:
            stop_server(tmp / "apiserver")
    load_end = Path("/proc/loadavg").read_text().strip()
    print(f"load average at end: {load_end}")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps({"loadStart": load_start, "loadEnd": load_end, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
