"""Generate the FineTuneJob CustomResourceDefinition from the pydantic models.

Pydantic emits JSON Schema (draft 2020-12) with $refs and `anyOf [X, null]` for optionals; Kubernetes wants a
structural OpenAPI v3.0 schema: everything inlined, a type on every node, no nullables, `exclusiveMinimum` as a
boolean, and every default the models have written out in full, so that the API server defaults a sparse manifest
to exactly what the models do.
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
from .names import name_rules
from .spec import FineTuneJobSpec
from .status import ACTIVE_PHASES, FineTuneJobStatus

CRD_FILE = Path(__file__).resolve().parents[3] / "crds" / f"{GROUP}_{PLURAL}.yaml"
# Helm installs a chart's crds/ folder before its templates; it carries the same files as crds/.
CHART_CRD_FILE = CRD_FILE.parents[1] / "charts" / "finetune-operator" / "crds" / CRD_FILE.name

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


# metadata may carry no schema in a CRD: rules on the root are the one place to check metadata.name.
ROOT_RULES = [*name_rules(), _immutable_while_running_rule()]

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


def _wire_default(value: Any) -> Any:
    """A default as it is written on the wire: nested models in full (camelCase, unset optionals left out)."""
    if isinstance(value, BaseModel):
        return value.model_dump(by_alias=True, exclude_none=True, mode="json")
    if isinstance(value, list | tuple):
        return [_wire_default(v) for v in value]
    if isinstance(value, dict):
        return {k: _wire_default(v) for k, v in value.items()}
    return value


def _add_model_defaults(node: dict[str, Any], model: type[BaseModel]) -> None:
    """Every default the models have, written out in full.

    Pydantic leaves `default_factory` values out of the schema. An object default must be written out whole: the
    API server checks each default against the CEL rules of its node *without* applying the nested defaults first,
    so `default: {}` fails any rule that reads a key (and would differ from what the models default to).
    """
    props = node.get("properties", {})
    for name, field in model.model_fields.items():
        prop = props.get(field.alias or name)
        if prop is None:
            continue
        if not field.is_required():
            value = _wire_default(field.get_default(call_default_factory=True))
            if value is None:
                prop.pop("default", None)
            else:
                prop["default"] = value
        nested = _model_in(field.annotation)
        if nested is not None:
            target = prop["items"] if prop.get("type") == "array" else prop
            if isinstance(target.get("additionalProperties"), dict):
                target = target["additionalProperties"]
            _add_model_defaults(target, nested)


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
        _add_model_defaults(schema, model)
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
            # The API server allows no more here than the types of name and generateName (kubectl explain shows
            # ObjectMeta's own descriptions). The name's rules are CEL rules on the root: see names.py.
            "metadata": {"type": "object", "properties": {"name": {"type": "string"}}},
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
