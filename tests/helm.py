"""Render the Helm chart with the real Helm engine (helm-python-sdk embeds it; no helm binary needed)."""

from __future__ import annotations

from typing import Any

import helm_python
import yaml

from .conftest import REPO

CHART = REPO / "charts" / "finetune-operator"
RELEASE, NAMESPACE = "fto", "finetune-system"


def render_chart(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart's templates produce for these values (the CRDs in crds/ are separate)."""
    chart = helm_python.Chart.load(CHART)
    rendered = chart.render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind]
    assert len(matches) == 1, f"{len(matches)} {kind} objects"
    return matches[0]


def allows(rules: list[dict[str, Any]], verb: str, group: str, resource: str) -> bool:
    """Whether RBAC rules grant `verb` on `resource` (e.g. "pods/log") of API group `group` ("" is core)."""
    return any(
        group in rule.get("apiGroups", []) and resource in rule.get("resources", []) and verb in rule.get("verbs", [])
        for rule in rules
    )
