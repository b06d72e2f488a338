"""Markdown reference of the FineTuneJob API, generated from the CRD schema (docs/api-reference.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .crd import open_api_schema

REFERENCE_FILE = Path(__file__).resolve().parents[3] / "docs" / "api-reference.md"


def _type(node: dict[str, Any]) -> str:
    if node.get("x-kubernetes-int-or-string"):
        return "integer or `auto`"
    kind = node["type"]
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if kind == "array":
        return f"list of {_type(node['items'])}"
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return f"map of {_type(node['additionalProperties'])}"
    return kind


def _limits(node: dict[str, Any]) -> str:
    out = []
    for key, label in (
        ("minimum", ">="),
        ("maximum", "<="),
        ("minItems", "items >="),
        ("maxItems", "items <="),
        ("maxLength", "length <="),
    ):
        if key in node:
            bound = label.replace("=", "") if node.get(f"exclusive{key.capitalize()}") else label
            out.append(f"{bound} {node[key]}")
    if "pattern" in node:
        out.append("pattern")
    return ", ".join(out)


def _rows(node: dict[str, Any], path: str, required: set[str]) -> list[str]:
    rows = []
    for key, child in node.get("properties", {}).items():
        where = f"{path}.{key}"
        default = f"`{json.dumps(child['default'])}`" if "default" in child else ""
        if isinstance(child.get("default"), dict) and "properties" in child:
            default = "its fields' defaults"  # written out whole in the CRD; the rows below give each one
        req = "yes" if key in required else ""
        desc = child.get("description", "").replace("|", "\\|")
        rows.append(
            f"| `{where}` | {_type(child)} | {req} | {default and f'`{default}`'} | {_limits(child)} | {desc} |"
        )
        target = child["items"] if child.get("type") == "array" and "properties" in child.get("items", {}) else child
        rows += _rows(target, where + ("[]" if target is not child else ""), set(target.get("required", [])))
    return rows


def _rules(node: dict[str, Any], path: str) -> list[str]:
    out = [
        f"| `{path or '(object)'}` | {r['message']} | `{r['rule']}` |" for r in node.get("x-kubernetes-validations", [])
    ]
    for key, child in node.get("properties", {}).items():
        out += _rules(child, f"{path}.{key}" if path else key)
        if "items" in child:
            out += _rules(child["items"], f"{path}.{key}[]" if path else f"{key}[]")
    return out


def render_reference() -> str:
    schema = open_api_schema()
    spec, status = schema["properties"]["spec"], schema["properties"]["status"]
    head = "| field | type | required | default | limits | description |\n|---|---|---|---|---|---|"
    parts = [
        "# FineTuneJob API reference (finetune.dev/v1alpha1)",
        "",
        "Generated from the pydantic models by `finetune-operator crd --write`; a test fails if it drifts.",
        "`kubectl explain ftj.spec.<field>` shows the same descriptions on a cluster.",
        "",
        "## spec",
        "",
        head,
        *_rows(spec, "spec", set(spec.get("required", []))),
        "",
        "## Cross-field rules (CEL, enforced by the API server and by `finetune-operator validate`)",
        "",
        "| on | message | rule |",
        "|---|---|---|",
        *_rules(schema, ""),
        "",
        "## status",
        "",
        head,
        *_rows(status, "status", set()),
        "",
    ]
    return "\n".join(parts)
