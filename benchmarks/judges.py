"""What one verdict on a FineTuneJob manifest costs: `finetune-operator validate` (offline) against the real API
server (../shared/apiserver), asked through one reused Python client (a dry-run create with strict field
validation) or through one `kubectl apply --dry-run=server` per manifest. Run:

    python benchmarks/judges.py [--manifests 100]

Starts the API server in a temporary folder, applies crds/, and prints a Markdown table (the README's).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.apiserver import find_apiserver_dir  # noqa: E402
from tests.judges import ServerJudge, validate_verdict  # noqa: E402


def _manifests(count: int) -> list[dict[str, Any]]:
    """The cluster examples, then variants of them (a valid and an invalid one in turn)."""
    examples = [yaml.safe_load(p.read_text()) for p in sorted((REPO / "examples").glob("*.yaml"))]
    out = []
    for i in range(count):
        manifest = copy.deepcopy(examples[i % len(examples)])
        manifest["metadata"] = {"name": f"bench-{i}"}
        if i % 2:
            manifest["spec"]["training"]["learningRate"] = 0  # refused by both
        out.append(manifest)
    return out


def _per_call_ms(fn: Callable[[dict[str, Any]], Any], manifests: list[dict[str, Any]]) -> tuple[float, float]:
    times = []
    for manifest in manifests:
        start = time.perf_counter()
        fn(manifest)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), sum(times) / 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--manifests", type=int, default=100)
    args = parser.parse_args()
    script_dir = find_apiserver_dir()
    if script_dir is None:
        print("../shared/apiserver is not here", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["bash", str(script_dir / "start.sh"), tmp], check=True, capture_output=True)
        try:
            env = dict(line.split("=", 1) for line in (Path(tmp) / "env").read_text().split() if "=" in line)
            kubectl_env = {**os.environ, "KUBECONFIG": env["KUBECONFIG"]}

            def kubectl(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess:
                return subprocess.run(["kubectl", *argv], env=kubectl_env, capture_output=True, text=True, **kwargs)

            kubectl("apply", "--server-side", "-f", str(REPO / "crds"), check=True)
            kubectl("wait", "--for=condition=Established", "crd/finetunejobs.finetune.dev", check=True)
            kubectl("create", "namespace", "bench", check=True)

            from kubernetes import client, config

            configuration = client.Configuration()
            config.load_kube_config(config_file=env["KUBECONFIG"], client_configuration=configuration)
            judge = ServerJudge(client.ApiClient(configuration), "bench")
            manifests = _manifests(args.manifests)
            judge.judge(manifests[0])  # connection and discovery warm-up
            validate_verdict(manifests[0])

            def by_kubectl(manifest: dict[str, Any]) -> None:
                kubectl("apply", "-n", "bench", "--dry-run=server", "--validate=strict", "-f", "-",
                        input=yaml.safe_dump(manifest))  # fmt: skip

            rows = [
                ("`validate` (offline: pydantic + cel-python)", *_per_call_ms(validate_verdict, manifests)),
                ("API server, one reused Python client (dry-run create)", *_per_call_ms(judge.judge, manifests)),
                ("API server, one `kubectl apply --dry-run=server` each", *_per_call_ms(by_kubectl, manifests[:20])),
            ]
        finally:
            subprocess.run(["bash", str(script_dir / "stop.sh"), tmp], capture_output=True)
    print(f"| judge ({args.manifests} manifests; kubectl: 20) | median ms per manifest | total s |")
    print("|---|---:|---:|")
    for name, median, total in rows:
        print(f"| {name} | {median:.1f} | {total:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
