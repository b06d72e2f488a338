"""The operator's only writer to the API server: create/delete children, write status, read a log tail.

Every call has a timeout; transient failures (429, 5xx, a dropped connection, a timeout) are retried a few times
with jittered exponential backoff; what still fails comes out as one `ApiCallError` that names the call and the
server's answer, for the controller to show in the FineTuneJob's conditions and Events.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_HOST_ENV_NAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)

from ..api.base import GROUP, PLURAL, VERSION

log = logging.getLogger(__name__)
T = TypeVar("T")

FIELD_MANAGER = "finetune-operator"
SPEC_HASH = "finetune.dev/spec-hash"
"""Annotation on every child: sha256 of the object as built, to tell a child of this job and run from a stale one."""
MANAGED_BY = ("app.kubernetes.io/managed-by", "finetune-operator")
RETRYABLE = frozenset({429, 500, 502, 503, 504})
REQUEST_TIMEOUT = (5.0, 30.0)
"""(connect, read) seconds for every call: a hung server must not hold a job (or a worker thread) forever."""
LOG_TIMEOUT = (3.0, 5.0)
POOL_CONNECTIONS = 24
"""Kept-alive connections to the server: one per worker thread of the controller (16 for calls, 4 for logs) and
some slack. The client's default (5 per core) made the busier threads open, TLS-handshake and drop a connection
per call."""


def _user_agent() -> str:
    try:
        return f"finetune-operator/{version('finetune-operator')}"
    except PackageNotFoundError:
        return "finetune-operator"


# --- client configuration -------------------------------------------------------------------------------------


class KubeConfigError(Exception):
    """No usable API server configuration; the message is one line that says what was tried and the fix."""


@dataclass(frozen=True)
class KubeSource:
    """Where the API server configuration comes from: the operator's --kubeconfig/--context flags, or nothing."""

    kubeconfig: str | None = None
    context: str | None = None

    def load(self, environ: Mapping[str, str] = os.environ) -> tuple[client.Configuration, str]:
        return load_configuration(self.kubeconfig, self.context, environ)


def load_configuration(
    kubeconfig: str | None = None,
    context: str | None = None,
    environ: Mapping[str, str] = os.environ,
    service_account: tuple[str, str] = (SERVICE_TOKEN_FILENAME, SERVICE_CERT_FILENAME),
) -> tuple[client.Configuration, str]:
    """The client configuration and a description of its source, in the order controller-runtime uses.

    `--kubeconfig`, then `$KUBECONFIG`, then the pod's service account (in-cluster), then `~/.kube/config`;
    `--context` picks a kubeconfig context (the current one otherwise).
    """
    configuration = client.Configuration()
    configuration.retries = False  # `KubeApi.call` retries, with backoff; urllib3's own 3 would multiply timeouts
    configuration.connection_pool_maxsize = POOL_CONNECTIONS
    path = kubeconfig or environ.get("KUBECONFIG") or None
    if path is None and (environ.get(SERVICE_HOST_ENV_NAME) and context is None):
        try:
            InClusterConfigLoader(*service_account, environ=environ).load_and_set(configuration)
        except ConfigException as exc:
            raise KubeConfigError(
                f"in a pod ({SERVICE_HOST_ENV_NAME} is set) but the service account cannot be used: {exc} "
                "(is automountServiceAccountToken off?); or pass --kubeconfig"
            ) from None
        return configuration, "in-cluster service account"
    if path is None:
        path = str(Path("~/.kube/config").expanduser())
        if not Path(path).is_file():
            raise KubeConfigError(
                "no Kubernetes API configuration: not in a pod and no kubeconfig at ~/.kube/config; "
                "pass --kubeconfig PATH or set KUBECONFIG"
            )
    missing = [p for p in path.split(os.pathsep) if p and not Path(p).expanduser().is_file()]
    if missing and len(missing) == len([p for p in path.split(os.pathsep) if p]):
        where = "--kubeconfig" if kubeconfig else "KUBECONFIG"
        raise KubeConfigError(f"{where} names no readable file: {', '.join(missing)}")
    try:
        config.load_kube_config(
            config_file=path, context=context, client_configuration=configuration, persist_config=False
        )
    except (ConfigException, OSError, ValueError, KeyError, TypeError) as exc:
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise KubeConfigError(f"kubeconfig {path} cannot be used: {detail}") from None
    return configuration, f"kubeconfig {path}" + (f" (context {context})" if context else "")


def check_reachable(configuration: client.Configuration, timeout: float = 10) -> str:
    """GET /version: the server's version, or a one-line KubeConfigError naming the server and the failure."""
    api = client.ApiClient(configuration)
    try:
        info = client.VersionApi(api).get_code(_request_timeout=timeout)
        return str(info.git_version)
    except ApiException as exc:
        if exc.status not in (401, 403):
            return "unknown"  # it answered: reachable (not every server serves /version)
        raise KubeConfigError(
            f"the API server at {configuration.host} refused the credentials: {_describe(exc)}"
        ) from None
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise KubeConfigError(f"the API server at {configuration.host} cannot be reached: {_describe(exc)}") from None
    finally:
        api.close()


# --- errors and retries ---------------------------------------------------------------------------------------


class ApiCallError(Exception):
    """An API call that failed for good (after the retries): `str()` names the call and the server's answer."""

    def __init__(self, action: str, cause: BaseException | str, status: int | None = None) -> None:
        self.action = action
        self.status = status if status is not None else getattr(cause, "status", None)
        self.detail = cause if isinstance(cause, str) else _describe(cause)
        super().__init__(f"{action}: {self.detail}")

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status == 0 or self.status in RETRYABLE


def _describe(exc: BaseException) -> str:
    """'500 Internal Server Error: <the server's message>' or the connection failure, on one line."""
    if isinstance(exc, ApiException):
        message = ""
        try:
            message = json.loads(exc.body or "{}").get("message", "")
        except (ValueError, AttributeError):
            message = (exc.body or "")[:200] if isinstance(exc.body, str) else ""
        text = f"{exc.status} {exc.reason or ''}".strip() + (f": {message}" if message else "")
    else:
        cause = getattr(exc, "reason", None) if isinstance(exc, urllib3.exceptions.MaxRetryError) else None
        text = str(cause or exc)
        errno = text.find("[Errno")
        text = text[errno:].rstrip("')\"") if errno >= 0 else f"{type(cause or exc).__name__}: {text}"
    return " ".join(text.split())[:500]


@dataclass
class RetryPolicy:
    attempts: int = 4
    base: float = 0.2
    cap: float = 5.0
    sleep: Callable[[float], None] = time.sleep

    def delay(self, attempt: int, exc: BaseException) -> float:
        """Full jitter; a server's Retry-After (429/503) is honoured up to the cap."""
        after = (getattr(exc, "headers", None) or {}).get("Retry-After") if isinstance(exc, ApiException) else None
        if after and str(after).isdigit():
            return min(float(after), self.cap)
        return random.uniform(0, min(self.cap, self.base * 2**attempt))


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ApiException):
        return exc.status in RETRYABLE or not exc.status
    return isinstance(exc, urllib3.exceptions.HTTPError | OSError)


# --- the API ---------------------------------------------------------------------------------------------------


def spec_hash(obj: Mapping[str, Any]) -> str:
    """sha256 of an object as built (its own spec-hash annotation left out)."""
    metadata = dict(obj.get("metadata") or {})
    annotations = {k: v for k, v in (metadata.get("annotations") or {}).items() if k != SPEC_HASH}
    metadata["annotations"] = annotations
    data = {**obj, "metadata": metadata}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


_COLLECTIONS = {
    "Job": ("/apis/batch/v1", "jobs"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Event": ("/api/v1", "events"),
    "Pod": ("/api/v1", "pods"),
    "PodGroup": ("/apis/scheduling.volcano.sh/v1beta1", "podgroups"),
}


def collection(kind: str, namespace: str, api_version: str | None = None) -> str:
    """The REST path of a namespaced collection: `/apis/batch/v1/namespaces/ml/jobs`."""
    if kind not in _COLLECTIONS:
        raise ValueError(f"no REST path for kind {kind}")
    prefix, plural = _COLLECTIONS[kind]
    if api_version and "/" in api_version:
        prefix = f"/apis/{api_version}"
    return f"{prefix}/namespaces/{namespace}/{plural}"


class KubeApi:
    """Synchronous calls to the API server (the controller runs them in its worker threads).

    They go through the kubernetes client's `ApiClient` (configuration, auth, TLS, connection pool) but not its
    typed APIs: the operator sends and reads plain JSON, and instantiating `CoreV1Api`, `BatchV1Api` and
    `AppsV1Api` cost ~1.5 s of CPU at every operator start (thousands of validating wrappers) for the eight REST
    paths it uses.
    """

    def __init__(self, api_client: client.ApiClient | None = None, retry: RetryPolicy | None = None) -> None:
        self.api_client = api_client or client.ApiClient()
        # Audit logs and API priority-and-fairness rules can tell the operator's writes apart by this.
        self.api_client.user_agent = _user_agent()
        self.retry = retry or RetryPolicy()

    @classmethod
    def from_source(cls, source: KubeSource | None = None) -> KubeApi:
        configuration, _ = (source or KubeSource()).load()
        return cls(client.ApiClient(configuration))

    @property
    def configuration(self) -> client.Configuration:
        return self.api_client.configuration

    def call(self, action: str, fn: Callable[..., T], *args: Any, retry: bool = True, **kwargs: Any) -> T:
        """`fn(*args, **kwargs)` with the request timeout, retried while the failure is transient."""
        kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT)
        attempts = self.retry.attempts if retry else 1
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
                if not _transient(exc) or attempt == attempts - 1:
                    raise ApiCallError(action, exc) from exc
                delay = self.retry.delay(attempt, exc)
                log.info("%s: %s; retrying in %.2fs", action, _describe(exc), delay)
                self.retry.sleep(delay)
        raise AssertionError("unreachable")

    def send(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        accept: str = "application/json",
        _request_timeout: Any = REQUEST_TIMEOUT,
    ) -> str:
        """One request; the answer's body as text (the connection goes back to the pool), or an ApiException."""
        headers = {"Accept": accept}
        if body is not None:
            headers["Content-Type"] = content_type
        request = self.api_client.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        reply = self.api_client.call_api(*request, _request_timeout=_request_timeout)
        data = reply.read()
        text = data.decode("utf-8", "replace") if data else ""
        if not 200 <= reply.status <= 299:
            raise ApiException.from_response(http_resp=reply, body=text, data=None)
        return text

    def request(self, action: str, method: str, path: str, **kwargs: Any) -> Any:
        """`send` retried while transient, its JSON answer decoded."""
        return json.loads(self.call(action, self.send, method, path, **kwargs) or "null")

    # -- children

    def create(self, obj: dict[str, Any]) -> str:
        """Create a child: 'created', 'exists' (ours, for this job and run, left as is) or 'replaced'.

        A 409 is not taken on trust: the existing object must be owned by the same FineTuneJob (uid), carry the
        same run and the same spec hash. A stale one (an earlier run's ConfigMap, a previous job of the same name)
        is deleted and created anew; one this operator did not make is refused.
        """
        obj = json.loads(json.dumps(obj))  # the caller's object stays as built
        obj["metadata"].setdefault("annotations", {})[SPEC_HASH] = spec_hash(obj)
        ns, name, kind = obj["metadata"]["namespace"], obj["metadata"]["name"], obj["kind"]
        what = f"{kind} {ns}/{name}"
        path = collection(kind, ns, obj.get("apiVersion"))

        def post() -> None:
            self.call(f"create {what}", self.send, "POST", path, obj)

        try:
            post()
            return "created"
        except ApiCallError as exc:
            if exc.status != 409:
                raise
        try:
            existing = self.request(f"read {what}", "GET", f"{path}/{name}")
        except ApiCallError as exc:
            if exc.status != 404:
                raise
            post()  # it went away in between
            return "created"
        verdict = _compare(existing, obj)
        if verdict == "same":
            return "exists"
        if verdict == "foreign":
            raise ApiCallError(
                f"create {what}",
                f"an object of that name exists that this operator did not create (no label "
                f"{MANAGED_BY[0]}={MANAGED_BY[1]}): delete or rename it",
                status=409,
            )
        if kind == "PersistentVolumeClaim" and verdict != "owned by another FineTuneJob of the same name":
            return "exists"  # the workspace (and its data) is shared by the runs of a job: never replaced
        log.info("replacing %s: %s", what, verdict)
        uid = existing["metadata"]["uid"]
        try:
            options = {"propagationPolicy": "Background", "preconditions": {"uid": uid}}
            self.call(f"delete stale {what}", self.send, "DELETE", f"{path}/{name}", options)
        except ApiCallError as exc:
            if exc.status not in (404, 409):
                raise
        try:
            post()
        except ApiCallError as exc:
            if exc.status == 409:  # still terminating (finalizers): try again on the next reconcile
                raise ApiCallError(f"create {what}", "a stale object of that name is still being deleted", 503) from exc
            raise
        return "replaced"

    def _delete(self, kind: str, namespace: str, name: str, propagation: str = "Background", **kw: Any) -> None:
        """Delete one object; one that is already gone is fine."""
        try:
            options = {"propagationPolicy": propagation}
            self.call(
                f"delete {kind} {namespace}/{name}",
                self.send,
                "DELETE",
                f"{collection(kind, namespace)}/{name}",
                options,
                **kw,
            )
        except ApiCallError as exc:
            if exc.status != 404:
                raise

    def delete_stage(self, namespace: str, name: str) -> None:
        """Delete one stage's Job (its pods go with it), ConfigMap, Service and PodGroup.

        Foreground: the Job stays (terminating) until its pods are gone, so the next attempt's Job of the same name
        is created only then: no old worker still saving into the workspace or answering the rendezvous address."""
        self._delete("Job", namespace, name, propagation="Foreground")
        self._delete("ConfigMap", namespace, f"{name}-config")
        self._delete("Service", namespace, name)
        try:
            self._delete("PodGroup", namespace, name, retry=False)
        except ApiCallError as exc:  # Volcano is optional: without its CRD the path answers 404 (or 405)
            log.debug("podgroup delete: %s", exc)

    def delete_playground(self, namespace: str, name: str) -> None:
        """Delete the playground's Deployment (its pods go with it), Service and ConfigMap."""
        self._delete("Deployment", namespace, name)
        self._delete("Service", namespace, name)
        self._delete("ConfigMap", namespace, name)

    def job_exists(self, namespace: str, name: str) -> bool:
        try:
            self.call(f"read Job {namespace}/{name}", self.send, "GET", f"{collection('Job', namespace)}/{name}")
        except ApiCallError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    def list_jobs(self, namespace: str, job: str) -> list[dict[str, Any]]:
        listed = self.request(
            f"list Jobs of {namespace}/{job}",
            "GET",
            collection("Job", namespace),
            query={"labelSelector": f"finetune.dev/job={job}"},
        )
        return listed.get("items") or []

    def delete_children(self, namespace: str, job: str, keep_run: int | None) -> None:
        """Delete the stage children of every run but `keep_run` (all of them when None)."""
        for item in self.list_jobs(namespace, job):
            run = item["metadata"]["labels"].get("finetune.dev/run")
            if keep_run is None or run != str(keep_run):
                self.delete_stage(namespace, item["metadata"]["name"])

    def delete_workspace(self, namespace: str, claim: str) -> None:
        self._delete("PersistentVolumeClaim", namespace, claim)

    # -- the FineTuneJob

    def write_status(
        self,
        namespace: str,
        name: str,
        status: dict[str, Any],
        resource: tuple[str, str, str] = (GROUP, VERSION, PLURAL),
    ) -> bool:
        """Replace .status whole (a JSON patch on the status subresource); False when the job is gone.

        A merge patch cannot remove what the new status leaves out (an earlier run's stages, metrics, artifacts):
        replacing the whole status can, and it needs no knowledge of what the server holds now.
        """
        try:
            group, version, plural = resource
            self.call(
                f"write status of FineTuneJob {namespace}/{name}",
                self.send,
                "PATCH",
                f"/apis/{group}/{version}/namespaces/{namespace}/{plural}/{name}/status",
                [{"op": "add", "path": "/status", "value": status}],
                query={"fieldManager": FIELD_MANAGER},
                content_type="application/json-patch+json",
            )
        except ApiCallError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    patch_status = write_status  # the name the emulator tests and older callers use

    def post_event(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about `obj` (what `kubectl describe` lists), posted from any thread or task."""
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or "default"
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            # A name of our own, as client-go's recorder makes them: a POST retried after a timeout that had in
            # fact gone through gets a 409, not a second Event.
            "metadata": {"name": f"{meta.get('name', 'object')}.{time.time_ns():x}", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": socket.gethostname()[:128],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self.call(
                f"post Event {reason} for {namespace}/{meta.get('name')}",
                self.send,
                "POST",
                collection("Event", namespace),
                event,
            )
        except ApiCallError as exc:
            if exc.status != 409:
                raise

    def log_tail(self, namespace: str, pod: str, lines: int = 40) -> str | None:
        """The last lines of a stage pod's log, or None (best effort: progress only; never retried)."""
        try:
            return self.call(
                f"read log of Pod {namespace}/{pod}",
                self.send,
                "GET",
                f"{collection('Pod', namespace)}/{pod}/log",
                query={"container": "stage", "tailLines": str(lines)},
                accept="text/plain",
                retry=False,
                _request_timeout=LOG_TIMEOUT,
            )
        except ApiCallError as exc:
            log.debug("%s", exc)
            return None


def _compare(existing: dict[str, Any], wanted: dict[str, Any]) -> str:
    """'same', 'foreign' (not made by this operator), or why the existing child is stale."""
    meta, want = existing.get("metadata") or {}, wanted["metadata"]
    labels = meta.get("labels") or {}
    if labels.get(MANAGED_BY[0]) != MANAGED_BY[1]:
        return "foreign"
    owners = {o.get("uid") for o in meta.get("ownerReferences") or [] if o.get("controller")}
    wanted_owners = {o.get("uid") for o in want.get("ownerReferences") or [] if o.get("controller")}
    if owners != wanted_owners:
        return "owned by another FineTuneJob of the same name"
    if labels.get("finetune.dev/run") != want["labels"].get("finetune.dev/run"):
        return "other-run"
    if (meta.get("annotations") or {}).get(SPEC_HASH) != want["annotations"][SPEC_HASH]:
        return "built from another spec"
    if meta.get("deletionTimestamp"):
        return "being deleted"
    return "same"
