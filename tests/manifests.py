"""Hypothesis strategies for FineTuneJob manifests, derived from the CRD schema the pydantic models generate (so a
field added to the models is generated too), and mutations that each break one rule of that schema."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

from finetune_operator.api.base import API_VERSION, KIND, URI_PATTERN
from finetune_operator.api.crd import open_api_schema

SPEC_SCHEMA = open_api_schema()["properties"]["spec"]
# Short values keep the manifests readable and the requests small; the bounds themselves are tested by mutations.
MAX_TEXT, MAX_ITEMS, MAX_KEYS = 12, 3, 3
# (hypothesis favours the ends of a range, so a one-in-four choice is a sample, not an integer range)
INCLUDE_OPTIONAL = st.sampled_from([False, False, False, True])
UTF8 = st.characters(codec="utf-8")
REMOTE_URI = r"(hf|s3|gs|pvc)://[a-z0-9][a-z0-9/._-]{0,20}"
NAME = st.from_regex(r"[a-z][a-z0-9-]{0,20}[a-z0-9]", fullmatch=True)
ODD_NAME = st.from_regex(r"[a-z0-9]([a-z0-9.-]{0,50}[a-z0-9])?", fullmatch=True)


def _pattern(node: dict[str, Any]) -> st.SearchStrategy[str]:
    # Cut to maxLength rather than filtered (filtering regex draws is slow): a cut value may break the pattern,
    # which is one more case for the judges.
    limit = node.get("maxLength", 256)
    return st.from_regex(node["pattern"], fullmatch=True, alphabet=UTF8).map(lambda s: s[:limit])


def _string(node: dict[str, Any]) -> st.SearchStrategy[str]:
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if node.get("pattern") == URI_PATTERN:
        # Mostly remote locations: a local path is refused on a cluster by `validate` alone (a documented rule).
        remote = st.from_regex(REMOTE_URI, fullmatch=True)
        return st.one_of(remote, remote, remote, _pattern(node))
    if "pattern" in node:
        return _pattern(node)
    max_len = min(node.get("maxLength", MAX_TEXT), MAX_TEXT)
    return st.text(st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=max_len)


def _integer(node: dict[str, Any]) -> st.SearchStrategy[int]:
    if "enum" in node:
        return st.sampled_from(node["enum"])
    low = node.get("minimum", -(2**31)) + (1 if node.get("exclusiveMinimum") else 0)
    high = node.get("maximum", 2**31) - (1 if node.get("exclusiveMaximum") else 0)
    # Small values make rules that relate fields (batchSize % numGenerations, lengths) hold now and then.
    return st.one_of(st.integers(low, min(high, low + 8)), st.integers(low, high))


def _number(node: dict[str, Any]) -> st.SearchStrategy[float]:
    return st.floats(
        min_value=node.get("minimum"),
        max_value=node.get("maximum", 1e6),
        exclude_min=bool(node.get("exclusiveMinimum")),
        exclude_max=bool(node.get("exclusiveMaximum")),
        allow_nan=False,
        allow_infinity=False,
    )


@st.composite
def _object(draw: st.DrawFn, fields: dict[str, st.SearchStrategy[Any]], required: set[str]) -> dict[str, Any]:
    # An optional field is written one time in four: with every block present half the time, nearly
    # every manifest would break a rule across fields, and the judges would rarely be asked about a valid one.
    return {key: draw(strategy) for key, strategy in fields.items() if key in required or draw(INCLUDE_OPTIONAL)}


def from_schema(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values the structural schema `node` describes (CEL rules not considered: both judges check those)."""
    if node.get("x-kubernetes-int-or-string"):
        # e.g. training.batchSize: a count, or the one word the field's rule allows ("auto")
        return st.one_of(st.integers(min_value=-2, max_value=64), st.sampled_from(["auto", "Auto", ""]))
    kind = node["type"]
    if kind == "object" and "properties" in node:
        required = set(node.get("required", []))
        fields = {k: from_schema(v) for k, v in node["properties"].items()}
        return _object(fields, required)
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        keys = st.from_regex(r"[a-zA-Z][a-zA-Z0-9_.-]{0,10}", fullmatch=True)
        max_size = min(node.get("maxProperties", MAX_KEYS), MAX_KEYS)
        # Often empty: a map's keys may be constrained by a rule (dataset.columns' roles) random keys break.
        return st.one_of(
            st.just({}), st.dictionaries(keys, from_schema(node["additionalProperties"]), max_size=max_size)
        )
    if kind == "object":  # x-kubernetes-preserve-unknown-fields (a pass-through block such as affinity)
        return st.just({})
    if kind == "array":
        return st.lists(
            from_schema(node["items"]),
            min_size=node.get("minItems", 0),
            max_size=min(node.get("maxItems", MAX_ITEMS), MAX_ITEMS),
            unique=node.get("x-kubernetes-list-type") == "set",
        )
    if kind == "string":
        return _string(node)
    if kind == "integer":
        return _integer(node)
    if kind == "number":
        return _number(node)
    if kind == "boolean":
        return st.booleans()
    raise ValueError(f"no strategy for {node}")


def manifest(spec: dict[str, Any], name: str) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}


# Built once: building the strategies (regular expressions above all) costs far more than drawing from them.
SPECS = from_schema(SPEC_SCHEMA)
NAMES = st.one_of(NAME, NAME, NAME, ODD_NAME)


@st.composite
def manifests(draw: st.DrawFn) -> dict[str, Any]:
    """A FineTuneJob whose every field fits its schema node; the rules across fields may or may not hold."""
    return manifest(draw(SPECS), draw(NAMES))


# ---------------------------------------------------------------- mutations: each breaks one rule of one node


def _nodes(value: Any, node: dict[str, Any], path: tuple[Any, ...] = ()):
    """(path, value, schema node) for every value in a manifest's spec."""
    yield path, value, node
    if isinstance(value, dict):
        props = node.get("properties", {})
        extra = node.get("additionalProperties") if isinstance(node.get("additionalProperties"), dict) else None
        for key, child in value.items():
            sub = props.get(key, extra)
            if sub is not None:
                yield from _nodes(child, sub, (*path, key))
    elif isinstance(value, list) and "items" in node:
        for i, child in enumerate(value):
            yield from _nodes(child, node["items"], (*path, i))


def _wrong_values(value: Any, node: dict[str, Any]) -> list[tuple[str, Any]]:
    """(mutation name, a value that breaks `node`) for one node."""
    kind = node.get("type")
    out: list[tuple[str, Any]] = []
    if node.get("x-kubernetes-int-or-string"):
        out += [("bool-for-int-or-string", True), ("fraction-for-int-or-string", 1.5), ("unknown-word", "most")]
    if kind == "boolean":
        out += [("string-for-bool", "yes"), ("number-for-bool", 1)]
    if kind in ("integer", "number"):
        out += [("string-for-number", str(value)), ("bool-for-number", True)]
        if "minimum" in node:
            out.append(("below-minimum", node["minimum"] - (0 if node.get("exclusiveMinimum") else 1)))
        if "maximum" in node:
            out.append(("above-maximum", node["maximum"] + (0 if node.get("exclusiveMaximum") else 1)))
    if kind == "integer":
        out += [("fraction-for-integer", 1.5), ("whole-float-for-integer", float(value))]
    if kind == "string":
        out += [("number-for-string", 7), ("bool-for-string", False)]
        if "enum" in node:
            out.append(("not-in-enum", f"{value}x"))
        if "pattern" in node:
            out.append(("pattern-mismatch", "not a valid value"))
        if "maxLength" in node:
            out.append(("too-long", "a" * (node["maxLength"] + 1)))
    if kind == "object":
        out += [("string-for-object", "x"), ("list-for-object", [])]
        if "properties" in node:
            out.append(("unknown-field", {**value, "notAField": 1}))
            for key in node.get("required", []):
                out.append((f"missing-required-{key}", {k: v for k, v in value.items() if k != key}))
    if kind == "array":
        out.append(("object-for-list", {}))
        if node.get("minItems"):
            out.append(("too-few-items", []))
        if value and node.get("x-kubernetes-list-type") == "set":
            out.append(("duplicate-in-set", [*value, value[0]]))
    out.append(("null", None))
    return out


def _set(target: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value


@st.composite
def manifest_families(draw: st.DrawFn, mutations: int = 3) -> list[tuple[str, dict[str, Any]]]:
    """A generated manifest and `mutations` copies of it with one value each replaced by one that breaks its
    node: [(what, manifest)], the generated one first (drawing a manifest costs far more than mutating it)."""
    base = draw(manifests())
    nodes = [(p, v, n) for p, v, n in _nodes(base["spec"], SPEC_SCHEMA) if p]
    family = [("generated", base)]
    for _ in range(mutations):
        path, value, node = draw(st.sampled_from(nodes))
        what, wrong = draw(st.sampled_from(_wrong_values(value, node)))
        out = copy.deepcopy(base)
        _set(out["spec"], path, wrong)
        family.append((f"{what} at spec.{'.'.join(map(str, path))}", out))
    return family
