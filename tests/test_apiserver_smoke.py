"""The real API server starts, and the fixture's namespace and client work against it."""

from __future__ import annotations

from kubernetes import client


def test_the_real_server_answers_and_serves_namespaces(apiserver, namespace):
    core = client.CoreV1Api(apiserver.api_client())
    names = {item.metadata.name for item in core.list_namespace().items}
    assert namespace in names
    version = apiserver.kubectl("version", "-o", "json", check=True)
    assert '"serverVersion"' in version.stdout
