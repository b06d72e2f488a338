"""The real Kubernetes API server of `../shared/apiserver` (upstream apiextensions-apiserver + etcd) for tests.

One server per test session (start-up ~1 s); each test takes a fresh namespace. In CI (`CI` set) the server must
start: the fixture fails instead of skipping. Locally it skips only when `../shared/apiserver` is absent.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .cluster import wait_until

REPO = Path(__file__).resolve().parents[1]


def find_apiserver_dir() -> Path | None:
    """`$FT_APISERVER_DIR`, else `shared/apiserver` beside the checkout (or beside a parent, for git worktrees)."""
    if os.environ.get("FT_APISERVER_DIR"):
        return Path(os.environ["FT_APISERVER_DIR"])
    for parent in [REPO, *REPO.parents]:
        candidate = parent.parent / "shared" / "apiserver"
        if (candidate / "start.sh").is_file():
            return candidate
    return None


@dataclass
class ApiServer:
    dir: Path
    kubeconfig: Path
    url: str

    def env(self) -> dict[str, str]:
        """The environment for a subprocess (kubectl, the operator) that talks to this server."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 60, **kwargs: Any
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["kubectl", *args], env=self.env(), capture_output=True, text=True, check=check, timeout=timeout, **kwargs
        )

    def api_client(self) -> Any:
        """A configured `kubernetes.client.ApiClient` for this server (a new one per call)."""
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=configuration)
        return client.ApiClient(configuration)


def start_apiserver(workdir: Path) -> ApiServer:
    script_dir = find_apiserver_dir()
    if script_dir is None:
        message = "the real API server is not here (../shared/apiserver); set FT_APISERVER_DIR"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    done = subprocess.run(
        ["bash", str(script_dir / "start.sh"), str(workdir)], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        pytest.fail(f"../shared/apiserver/start.sh failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    values = dict(line.split("=", 1) for line in (workdir / "env").read_text().split() if "=" in line)
    return ApiServer(dir=workdir, kubeconfig=Path(values["KUBECONFIG"]), url=values["APISERVER_URL"])


def stop_apiserver(server: ApiServer) -> None:
    script_dir = find_apiserver_dir()
    if script_dir is not None:
        subprocess.run(["bash", str(script_dir / "stop.sh"), str(server.dir)], capture_output=True, timeout=60)


def wait_for(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.1, what: str = "condition") -> Any:
    """Poll until `predicate()` is truthy and return its value; fail the test after `timeout` seconds."""
    try:
        return wait_until(predicate, timeout, what, interval)
    except AssertionError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def apiserver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """The real API server, started once per test session and stopped at its end."""
    server = start_apiserver(tmp_path_factory.mktemp("apiserver"))
    try:
        yield server
    finally:
        stop_apiserver(server)


@pytest.fixture(scope="session")
def crd_installed(apiserver: ApiServer) -> ApiServer:
    """The real server with the project's CRDs applied and Established."""
    apiserver.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
    apiserver.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/finetunejobs.finetune.dev", timeout=90
    )
    return apiserver


@pytest.fixture
def namespace(apiserver: ApiServer) -> Iterator[str]:
    """A fresh namespace on the real server for one test (deleted after; the server has no namespace controller)."""
    name = f"t-{uuid.uuid4().hex[:10]}"
    apiserver.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        apiserver.kubectl("delete", "namespace", name, "--wait=false", check=False)
