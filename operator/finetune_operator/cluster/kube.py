"""The operator's only writer to the API server: create/delete children, patch status, read a log tail."""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from ..api.base import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)

CHILD_KINDS = ("Job", "ConfigMap", "Service", "PodGroup")


def _user_agent() -> str:
    try:
        return f"finetune-operator/{version('finetune-operator')}"
    except PackageNotFoundError:
        return "finetune-operator"


class KubeApi:
    """Synchronous kubernetes-client calls (the kopf handlers run them in a worker thread)."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api_client = api_client or client.ApiClient()
        # Audit logs and API priority-and-fairness rules can tell the operator's writes apart by this.
        self.api_client.user_agent = _user_agent()
        self.core = client.CoreV1Api(self.api_client)
        self.batch = client.BatchV1Api(self.api_client)
        self.apps = client.AppsV1Api(self.api_client)
        self.custom = client.CustomObjectsApi(self.api_client)

    def create(self, obj: dict[str, Any]) -> bool:
        """Create an object; an existing one (409) is left alone. Returns whether it was created."""
        ns = obj["metadata"]["namespace"]
        kind = obj["kind"]
        try:
            if kind == "Job":
                self.batch.create_namespaced_job(ns, obj)
            elif kind == "ConfigMap":
                self.core.create_namespaced_config_map(ns, obj)
            elif kind == "Service":
                self.core.create_namespaced_service(ns, obj)
            elif kind == "Deployment":
                self.apps.create_namespaced_deployment(ns, obj)
            elif kind == "PersistentVolumeClaim":
                self.core.create_namespaced_persistent_volume_claim(ns, obj)
            elif kind == "PodGroup":
                group, version = obj["apiVersion"].split("/")
                self.custom.create_namespaced_custom_object(group, version, ns, "podgroups", obj)
            else:
                raise ValueError(f"no create for kind {kind}")
        except ApiException as exc:
            if exc.status == 409:
                return False
            raise
        return True

    def _delete(self, fn: Any, *args: Any) -> None:
        try:
            # The response body is not needed; not decoding it avoids the client's per-kind model of the reply
            # (a Service delete may answer with a Status, which the generated V1Service model refuses).
            reply = fn(*args, propagation_policy="Background", _preload_content=False)
            reply.read()  # drain it so the connection goes back to the pool
            reply.release_conn()
        except ApiException as exc:
            if exc.status != 404:
                raise

    def delete_stage(self, namespace: str, name: str) -> None:
        """Delete one stage's Job (its pods go with it), ConfigMap, Service and PodGroup."""
        self._delete(self.batch.delete_namespaced_job, name, namespace)
        self._delete(self.core.delete_namespaced_config_map, f"{name}-config", namespace)
        self._delete(self.core.delete_namespaced_service, name, namespace)
        try:
            self.custom.delete_namespaced_custom_object(
                "scheduling.volcano.sh", "v1beta1", namespace, "podgroups", name
            )
        except ApiException as exc:
            if exc.status not in (404,):
                log.debug("podgroup delete: %s", exc.reason)

    def delete_playground(self, namespace: str, name: str) -> None:
        """Delete the playground's Deployment (its pods go with it), Service and ConfigMap."""
        self._delete(self.apps.delete_namespaced_deployment, name, namespace)
        self._delete(self.core.delete_namespaced_service, name, namespace)
        self._delete(self.core.delete_namespaced_config_map, name, namespace)

    def job_exists(self, namespace: str, name: str) -> bool:
        try:
            self.batch.read_namespaced_job(name, namespace)
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def list_jobs(self, namespace: str, job: str) -> list[dict[str, Any]]:
        result = self.batch.list_namespaced_job(namespace, label_selector=f"finetune.dev/job={job}")
        return [self.api_client.sanitize_for_serialization(item) for item in result.items]

    def delete_children(self, namespace: str, job: str, keep_run: int | None) -> None:
        """Delete the stage children of every run but `keep_run` (all of them when None)."""
        for item in self.list_jobs(namespace, job):
            run = item["metadata"]["labels"].get("finetune.dev/run")
            if keep_run is None or run != str(keep_run):
                self.delete_stage(namespace, item["metadata"]["name"])

    def delete_workspace(self, namespace: str, claim: str) -> None:
        self._delete(self.core.delete_namespaced_persistent_volume_claim, claim, namespace)

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name, {"status": status})

    def log_tail(self, namespace: str, pod: str, lines: int = 40) -> str | None:
        try:
            return self.core.read_namespaced_pod_log(pod, namespace, container="stage", tail_lines=lines)
        except ApiException:
            return None
