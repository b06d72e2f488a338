"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

Pydantic emits JSON Schema (draft 2020-12) with $refs and `anyOf [X, null]` for optionals; Kubernetes wants a
structural OpenAPI v3.0 schema: everything inlined, a type on every node, no nullables, `exclusiveMinimum` as a
boolean, objects defaulted to `{}` so that the API server applies the nested defaults.
"""

from __future__ import annotations

import copy
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from .base import API_VERSION, CATEGORIES, GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION, cel
from .spec import FineTuneJobSpec
from .status import ACTIVE_PHASES, FineTuneJobStatus

CRD_FILE = Path(__file__).resolve().parents[3] / "crds" / f"{GROUP}_{PLURAL}.yaml"
# Helm installs a chart's crds/ folder before its templates; it carries the same files as crds/.
CHART_CRD_FILE = CRD_FILE.parents[1] / "charts" / "finetune-operator" / "crds" / CRD_FILE.name
MAX_NAME_LENGTH = 50

# Fields a running stage depends on. Changing them mid-run would leave the run half old, half new.
IMMUTABLE_WHILE_RUNNING = ("model", "dataset", "method", "training", "distributed")


def _immutable_while_running_rule() -> dict:
    active = ", ".join(f"'{p}'" for p in ACTIVE_PHASES)
    same = " && ".join(f"self.spec.{f} == oldSelf.spec.{f}" for f in IMMUTABLE_WHILE_RUNNING)
    same += " && self.spec.resources.workers == oldSelf.spec.resources.workers"
    return cel(
        f"!has(oldSelf.status) || !has(oldSelf.status.phase) || !(oldSelf.status.phase in [{active}]) || ({same})",
        "spec.model, dataset, method, training, distributed and resources.workers cannot change while the job is "
        "running: set spec.runPolicy.suspend: true and wait for phase Suspended, or wait until it finishes "
        "(a change after it finished starts a new run)",
        reason="FieldValueForbidden",
    )


ROOT_RULES = [_immutable_while_running_rule()]

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Phase of the run"},
    {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage", "description": "Stage running now"},
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Reconciling")].message',
        "description": "What the active stage is doing",
    },
    {"name": "Metric", "type": "string", "jsonPath": ".status.metrics.summary", "description": "Key metric"},
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        "description": "True once the run succeeded and its artifacts exist",
    },
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
        "priority": 1,
        "description": "Why Ready is what it is",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _resolve(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            target.update(siblings)
            return _resolve(target, defs)
        return {k: _resolve(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, defs) for v in node]
    return node


def _structural(node: dict[str, Any]) -> dict[str, Any]:
    node = dict(node)
    if node.get("x-kubernetes-int-or-string"):
        # int | "auto": the API server types it as int-or-string; the value rules are CEL rules on the parent.
        node.pop("anyOf", None)
        node.pop("title", None)
        if isinstance(node.get("description"), str):
            node["description"] = " ".join(node["description"].split())
        return node
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {branches}")
        merged = dict(branches[0])
        merged.update(node)
        node = merged
    node.pop("title", None)
    if node.get("default", 0) is None:
        node.pop("default")
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound in ("Minimum", "Maximum"):
        exclusive = node.pop(f"exclusive{bound}", None)
        if exclusive is not None:
            node[bound.lower()] = exclusive
            node[f"exclusive{bound}"] = True
    if isinstance(node.get("description"), str):
        node["description"] = " ".join(node["description"].split())
    if "properties" in node:
        node["type"] = "object"
        node["properties"] = {k: _structural(v) for k, v in node["properties"].items()}
        node.pop("additionalProperties", None)
    elif node.get("additionalProperties") is True or (
        node.get("type") == "object" and "additionalProperties" not in node
    ):
        node.pop("additionalProperties", None)
        node["type"] = "object"
        node["x-kubernetes-preserve-unknown-fields"] = True
    elif isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = _structural(node["additionalProperties"])
    if "items" in node:
        node["items"] = _structural(node["items"])
    if "type" not in node:
        raise ValueError(f"schema node without a type: {node}")
    return node


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside `X | None`, `Annotated[X, ...]` or `list[X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated, list):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found:
                return found
    return None


def _add_factory_defaults(node: dict[str, Any], model: type[BaseModel]) -> None:
    """Pydantic leaves `default_factory` values out of the schema; Kubernetes needs them to default."""
    props = node.get("properties", {})
    for name, field in model.model_fields.items():
        prop = props.get(field.alias or name)
        if prop is None:
            continue
        if field.default_factory is not None:
            value = field.default_factory()  # type: ignore[call-arg]
            prop["default"] = {} if isinstance(value, BaseModel) else value
        nested = _model_in(field.annotation)
        if nested is not None:
            target = prop["items"] if prop.get("type") == "array" else prop
            _add_factory_defaults(target, nested)


def _strip_defaults(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_defaults(v) for k, v in node.items() if k != "default"}
    if isinstance(node, list):
        return [_strip_defaults(v) for v in node]
    return node


def model_schema(model: type[BaseModel], *, defaults: bool = True) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True)
    resolved = _resolve({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {}))
    schema = _structural(resolved)
    if defaults:
        _add_factory_defaults(schema, model)
        return schema
    return _strip_defaults(schema)


def open_api_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the FineTuneJob."""
    return {
        "type": "object",
        "description": "FineTuneJob fine-tunes, evaluates and exports a language model.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "finetune.dev/v1alpha1"},
            "kind": {"type": "string", "description": "FineTuneJob"},
            "metadata": {
                "type": "object",
                "description": "Standard object metadata.",
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": MAX_NAME_LENGTH,
                        "description": f"At most {MAX_NAME_LENGTH} characters: child Jobs and pods are named after it.",
                    }
                },
            },
            "spec": model_schema(FineTuneJobSpec),
            # The operator writes status; defaults there would only hide what it did not write.
            "status": model_schema(FineTuneJobStatus, defaults=False),
        },
        "x-kubernetes-validations": ROOT_RULES,
    }


def build_crd() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "finetune-operator", "app.kubernetes.io/part-of": "finetune-operator"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                }
            ],
        },
    }


HEADER = (
    "# Generated by `finetune-operator crd` from the pydantic models in operator/finetune_operator/api/.\n"
    "# Do not edit by hand: change the models and regenerate (a test fails when this file drifts).\n"
)


def render_crd() -> str:
    return HEADER + yaml.safe_dump(build_crd(), sort_keys=False, width=120, allow_unicode=True)


__all__ = ["API_VERSION", "CRD_FILE", "build_crd", "open_api_schema", "render_crd"]
