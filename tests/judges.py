"""Two judges of a FineTuneJob manifest: the real API server (a dry-run create with strict field validation) and
`finetune-operator validate`. Each gives a verdict: accepted or not, and the fields it names when it refuses."""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client

from finetune_operator.api.base import GROUP, PLURAL, VERSION
from finetune_operator.api.validation import validate_object

# The server adds these to the real causes; they name no field.
NOT_A_FIELD = ("<nil>", "")
UNKNOWN_FIELD = re.compile(r'unknown field "([^"]+)"')
DUPLICATE_FIELD = re.compile(r'duplicate field "([^"]+)"')


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    fields: frozenset[str] = field(default_factory=frozenset)
    message: str = ""
    beyond_crd: bool = False
    """Refused only by rules `validate` knows beyond the CRD (the README lists them)."""

    def agrees_with(self, other: Verdict) -> bool:
        """Same verdict and, on refusal, at least one field named by both."""
        if self.accepted or other.accepted:
            return self.accepted == other.accepted
        return bool(self.fields & other.fields)


def _fields_of_400(message: str) -> set[str]:
    found = set(UNKNOWN_FIELD.findall(message)) | set(DUPLICATE_FIELD.findall(message))
    if "API version" in message or "apiVersion" in message:
        found.add("apiVersion")
    if "kind" in message.lower() and "expected" in message.lower():
        found.add("kind")
    return found


class ServerJudge:
    """Dry-run creates against the real API server, through one reused client (a request costs a few ms)."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.api = client.CustomObjectsApi(api_client)
        self.namespace = namespace

    def judge(self, manifest: dict[str, Any]) -> Verdict:
        body = copy.deepcopy(manifest)
        if isinstance(body.get("metadata"), dict):
            body["metadata"].pop("namespace", None)  # the request's namespace is the test's
        try:
            self.api.create_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, body, dry_run="All", field_validation="Strict"
            )
        except client.ApiException as exc:
            if exc.status not in (400, 422):
                raise
            status = json.loads(exc.body)
            message = status.get("message", "")
            causes = (status.get("details") or {}).get("causes") or []
            fields = {c.get("field", "") for c in causes} - set(NOT_A_FIELD)
            if exc.status == 400:
                fields |= _fields_of_400(message)
            return Verdict(False, frozenset(fields), message)
        return Verdict(True)


def validate_verdict(manifest: dict[str, Any]) -> Verdict:
    """`finetune-operator validate`'s verdict (cluster target)."""
    _, problems = validate_object(copy.deepcopy(manifest), target="cluster")
    errors = [p for p in problems if p.severity == "error"]
    beyond = bool(errors) and all(p.beyond_crd for p in errors)
    return Verdict(not errors, frozenset(p.path for p in errors), "; ".join(p.format() for p in errors), beyond)
