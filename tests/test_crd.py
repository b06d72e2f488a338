"""The CRD is generated from the models, is a valid structural apiextensions/v1 object, and agrees with them."""

from __future__ import annotations

import json
from typing import Any

import celpy
import jsonschema
import kubernetes_validate
import pytest
import yaml

from finetune_operator.api.crd import CRD_FILE, build_crd, open_api_schema, render_crd
from finetune_operator.api.spec import FineTuneJobSpec
from finetune_operator.cli import main

from .conftest import MINIMAL_JOB


def _nodes(node: dict[str, Any], path: str = ""):
    yield path, node
    for key, child in node.get("properties", {}).items():
        yield from _nodes(child, f"{path}.{key}")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")
    if "items" in node:
        yield from _nodes(node["items"], f"{path}[]")


def test_committed_crd_matches_the_models():
    assert CRD_FILE.read_text() == render_crd(), "run `finetune-operator crd --write` and commit crds/"
    assert main(["crd", "--check"]) == 0


def test_crd_is_a_valid_apiextensions_object():
    kubernetes_validate.validate(build_crd(), "1.34.0", strict=True)


def test_schema_is_structural_and_described():
    schema = open_api_schema()
    text = json.dumps(schema)
    for forbidden in ('"$ref"', '"anyOf"', '"oneOf"', '"allOf"', '"nullable"', '"$defs"', '"title"'):
        assert forbidden not in text
    for path, node in _nodes(schema):
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if path and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description (kubectl explain reads it)"
        if node.get("type") == "object":
            assert (
                "properties" in node
                or "additionalProperties" in node
                or node.get("x-kubernetes-preserve-unknown-fields")
            ), path


def test_every_cel_rule_compiles_and_lists_in_rules_are_bounded():
    schema = open_api_schema()
    env = celpy.Environment()
    rules = [(p, r) for p, n in _nodes(schema) for r in n.get("x-kubernetes-validations", [])]
    assert len(rules) >= 25
    for path, rule in rules:
        env.compile(rule["rule"])
        assert rule["message"] and rule["reason"].startswith("FieldValue"), path
    # The API server estimates CEL cost from maxItems/maxProperties: every list or map a rule may walk is bounded.
    for path, node in _nodes(schema):
        if path.startswith(".spec") and node.get("type") == "array":
            assert "maxItems" in node, f"{path} needs maxItems"
        if path.startswith(".spec") and isinstance(node.get("additionalProperties"), dict):
            assert "maxProperties" in node, f"{path} needs maxProperties"


def test_printer_columns_use_condition_filters_not_positions():
    version = build_crd()["spec"]["versions"][0]
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert {"Phase", "Stage", "Progress", "Metric", "Age"} <= columns.keys()
    assert '[?(@.type=="Ready")]' in columns["Ready"]
    assert all("[-1" not in path for path in columns.values())
    assert version["subresources"] == {"status": {}}
    names = build_crd()["spec"]["names"]
    assert names["shortNames"] == ["ftj"] and names["categories"] == ["ml", "finetune"]


def _apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it: fill absent fields, then recurse (defaults too)."""
    if schema.get("type") == "object" and isinstance(value, dict):
        out = dict(value)
        for key, sub in schema.get("properties", {}).items():
            if key not in out and "default" in sub:
                out[key] = json.loads(json.dumps(sub["default"]))
            if key in out:
                out[key] = _apply_defaults(sub, out[key])
        return out
    if schema.get("type") == "array" and isinstance(value, list):
        return [_apply_defaults(schema["items"], v) for v in value]
    return value


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"method": {"type": "qlora", "quantization": {}}},
        {"evaluation": {"gates": [{"metric": "perplexity", "max": 9}]}},
    ],
)
def test_crd_defaults_equal_the_models_defaults(extra):
    raw = {**MINIMAL_JOB["spec"], **extra}
    server_side = _apply_defaults(open_api_schema()["properties"]["spec"], raw)
    assert server_side == FineTuneJobSpec.model_validate(raw).wire()


def test_instances_validate_against_the_crd_schema():
    schema = open_api_schema()
    jsonschema.Draft4Validator(schema).validate(MINIMAL_JOB)
    bad = json.loads(json.dumps(MINIMAL_JOB))
    bad["spec"]["method"] = {"type": "lowrank"}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft4Validator(schema).validate(bad)


def test_crd_yaml_round_trips():
    assert yaml.safe_load(CRD_FILE.read_text()) == build_crd()
