"""Offline validation of FineTuneJob manifests: the CRD's rules plus what a CRD cannot express.

The same rules the API server applies are applied here, from the same source: the manifest is read as the server
reads it (`as_decoded`), pydantic checks types (strictly), enums and ranges (the CRD schema is generated from
those models), and the CRD's own `x-kubernetes-validations` CEL rules are evaluated on the defaulted object with
cel-python. Checks that need to know where the job will run (cluster or local mode) come last. The tests hold
the verdicts to the real API server's (tests/test_api_server.py).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import celpy
import yaml
from pydantic import BaseModel, ValidationError

from .base import API_VERSION, KIND, NON_BLANK, URI_PATTERN
from .crd import open_api_schema
from .names import DNS_1035_LABEL_PATTERN, MAX_NAME_LENGTH, NAME_FORMAT_MESSAGE, NAME_LENGTH_MESSAGE
from .spec import METRICS_BY_OBJECTIVE, FineTuneJobSpec

Target = Literal["cluster", "local"]
LOCAL_SCHEMES = ("file://", "/", "./", "../")


@dataclass(frozen=True)
class Problem:
    """One finding: where, what is wrong and how to fix it."""

    path: str
    message: str
    severity: Literal["error", "warning"] = "error"
    beyond_crd: bool = False
    """A rule the API server cannot check (where the job runs, local files): the README lists them."""

    def format(self, source: str = "") -> str:
        prefix = f"{source}: " if source else ""
        tag = "" if self.severity == "error" else "warning: "
        return f"{prefix}{tag}{self.path}: {self.message}"


class InvalidJobError(ValueError):
    """A manifest that does not validate; `problems` says why."""

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = problems
        self.source = source
        super().__init__("\n".join(p.format(source) for p in problems if p.severity == "error"))


# ---------------------------------------------------------------- schema level (pydantic)


def _path(loc: Iterable[Any], prefix: str = "spec") -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _fields_at(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The wire names allowed at `loc` (for 'did you mean' hints)."""
    from .crd import _model_in

    current: type[BaseModel] | None = model
    for part in loc:
        if current is None or isinstance(part, int):
            continue
        field = next((f for n, f in current.model_fields.items() if part in (n, f.alias)), None)
        current = _model_in(field.annotation) if field else None
    if current is None:
        return []
    return [f.alias or n for n, f in current.model_fields.items()]


# Types are strict, as on the API server: YAML's quotes decide (trustRemoteCode: "true" is a string).
TYPE_ERRORS = {
    "bool_type": "must be true or false",
    "int_type": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "model_type": "must be a mapping of fields",
    "dict_type": "must be a mapping",
    "list_type": "must be a list",
}


def _type_message(kind: str, got: Any) -> str:
    shown = json.dumps(got, default=str)
    kinds = {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "mapping"}
    msg = f"{TYPE_ERRORS[kind]} (got {shown}, a {'null' if got is None else kinds.get(type(got), 'value')})"
    if isinstance(got, str) and kind == "bool_type":
        msg += ": write true or false, without quotes"
    elif isinstance(got, str) and kind in ("int_type", "float_type"):
        msg += ": write it without quotes"
    elif kind == "string_type" and isinstance(got, bool | int | float):
        msg += ": put it in quotes"
    return msg


# pydantic names the member of a union in an error's location (training.batchSize.constrained-int): not a field.
UNION_TAG = re.compile(r"^(constrained-\w+|function-\w+\[.*|literal\[.*|nullable\[.*|int|str|float|bool)$")


def _pydantic_problems(err: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    for e in err.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and UNION_TAG.match(p)))
        got = e.get("input")
        kind = e["type"]
        if kind == "missing":
            msg = f"is required: add {_path(loc)}"
        elif kind == "extra_forbidden":
            allowed = _fields_at(FineTuneJobSpec, loc[:-1])
            guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean '{guess[0]}'?" if guess else f"allowed fields: {', '.join(allowed)}"
            msg = f"unknown field '{loc[-1]}': {hint}"
        elif kind == "string_pattern_mismatch" and e.get("ctx", {}).get("pattern") == URI_PATTERN:
            msg = (
                f"'{got}' is not a location this operator reads: use hf://org/name, s3://bucket/path, "
                "gs://bucket/path, pvc://CLAIM/path, or file:///abs/path or a ./relative path (local mode)"
            )
        elif kind == "string_pattern_mismatch" and e.get("ctx", {}).get("pattern") == NON_BLANK:
            msg = "must not be empty or blank"
        elif kind == "literal_error":
            expected = e.get("ctx", {}).get("expected", "")
            msg = f"must be one of {expected} (got {got!r})"
        elif kind in TYPE_ERRORS:
            msg = _type_message(kind, got)
        else:
            text = e["msg"][0].lower() + e["msg"][1:]
            text = text.removeprefix("input ").removeprefix("value error, ")
            msg = f"{text} (got {got!r})" if not isinstance(got, dict | list) else text
        same = next((p for p in problems if p.path == _path(loc)), None)
        if same is not None:  # one field, several union members refused it: one problem, every way to fix it
            problems[problems.index(same)] = Problem(same.path, f"{same.message}; or {msg}")
            continue
        problems.append(Problem(_path(loc), msg))
    return problems


# ---------------------------------------------------------------- what the API server does before validating


def as_decoded(value: Any, schema: dict[str, Any], path: str, problems: list[Problem]) -> Any:
    """`value` as the API server reads it against the CRD schema, before its validation proper.

    A null field that is not nullable is dropped (its default, if any, applies); a whole number written as a
    float (`2.0`) is an integer; and a list of `x-kubernetes-list-type: set` must not repeat an entry (a
    problem is added to `problems`).
    """
    kind = schema.get("type")
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind == "object" and isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else None
        out = {}
        for key, child in value.items():
            sub = props.get(key, extra)
            if child is None and sub is not None and not sub.get("nullable"):
                continue
            out[key] = as_decoded(child, sub, f"{path}.{key}", problems) if sub is not None else child
        return out
    if kind == "array" and isinstance(value, list):
        items = [as_decoded(v, schema.get("items", {}), f"{path}[{i}]", problems) for i, v in enumerate(value)]
        if schema.get("x-kubernetes-list-type") == "set":
            for i, item in enumerate(items):
                if item in items[:i]:
                    problems.append(Problem(f"{path}[{i}]", f"duplicate value {item!r}: list each entry once"))
        return items
    return value


# ---------------------------------------------------------------- CRD CEL rules (cel-python)


@cache
def _schema() -> dict[str, Any]:
    return open_api_schema()


@cache
def _program(rule: str) -> Any:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def _to_cel(value: Any, schema: dict[str, Any]) -> Any:
    """Coerce numbers the way the API server types them before CEL sees them (number -> double)."""
    kind = schema.get("type")
    if kind == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind == "object" and isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties") if isinstance(schema.get("additionalProperties"), dict) else {}
        return {k: _to_cel(v, props.get(k, extra)) for k, v in value.items()}
    if kind == "array" and isinstance(value, list):
        return [_to_cel(v, schema.get("items", {})) for v in value]
    return value


def evaluate_rule(rule: str, self_value: Any, old_value: Any = None) -> bool:
    """Evaluate one CEL rule the way the API server would (`oldSelf` only on update)."""
    old = celpy.json_to_cel(old_value) if old_value is not None else None
    return _evaluate(rule, celpy.json_to_cel(self_value), old)


def _evaluate(rule: str, self_cel: Any, old_cel: Any = None) -> bool:
    activation = {"self": self_cel} if old_cel is None else {"self": self_cel, "oldSelf": old_cel}
    result = _program(rule).evaluate(activation)
    if isinstance(result, Exception):
        raise result
    return bool(result)


def _cel_problems(schema: dict[str, Any], value: Any, path: str, old: Any = None) -> Iterator[Problem]:
    if value is None:
        return
    entries = schema.get("x-kubernetes-validations", [])
    # Converted once per node: the conversion costs as much as evaluating the rule.
    self_cel = celpy.json_to_cel(_to_cel(value, schema)) if entries else None
    old_cel = celpy.json_to_cel(_to_cel(old, schema)) if entries and old is not None else None
    for entry in entries:
        is_transition = "oldSelf" in entry["rule"]
        if is_transition and old_cel is None:
            continue
        try:
            ok = _evaluate(entry["rule"], self_cel, old_cel if is_transition else None)
        except Exception as exc:  # a rule that cannot evaluate is a rule that rejects, as in the API server
            ok = False
            entry = {**entry, "message": f"{entry['message']} ({exc})"}
        if not ok:
            where = path + entry.get("fieldPath", "") if path else entry.get("fieldPath", "").lstrip(".")
            yield Problem(where or "(root)", entry["message"])
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key, child in value.items():
            sub = props.get(key) or (
                schema["additionalProperties"] if isinstance(schema.get("additionalProperties"), dict) else None
            )
            if sub is not None:
                child_old = old.get(key) if isinstance(old, dict) else None
                yield from _cel_problems(sub, child, f"{path}.{key}" if path else key, child_old)
    elif isinstance(value, list) and "items" in schema:
        for i, child in enumerate(value):
            yield from _cel_problems(schema["items"], child, f"{path}[{i}]")


# ---------------------------------------------------------------- semantic checks


def _is_local(uri: str) -> bool:
    return uri.startswith(LOCAL_SCHEMES)


def local_path(uri: str, base_dir: Path | None = None) -> Path:
    """The filesystem path of a file:// URI or plain path; relative paths are relative to `base_dir`."""
    raw = uri.removeprefix("file://")
    path = Path(raw)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return path


def _locations(spec: FineTuneJobSpec) -> list[tuple[str, str]]:
    found = [
        ("spec.model.source", spec.model.source),
        ("spec.dataset.source", spec.dataset.source),
        ("spec.output.uri", spec.output.uri),
    ]
    if spec.model.tokenizer and spec.model.tokenizer.source:
        found.append(("spec.model.tokenizer.source", spec.model.tokenizer.source))
    if spec.dataset.eval_source:
        found.append(("spec.dataset.evalSource", spec.dataset.eval_source))
    if spec.training.grpo and spec.training.grpo.reward.source:
        found.append(("spec.training.grpo.reward.source", spec.training.grpo.reward.source))
    return found


def semantic_problems(
    spec: FineTuneJobSpec, target: Target, base_dir: Path | None = None, *, model_to_build: bool = False
) -> list[Problem]:
    """`model_to_build`: `run --init-model` will create spec.model.source, so it need not exist yet."""
    problems: list[Problem] = []

    def error(path: str, msg: str) -> None:
        problems.append(Problem(path, msg, beyond_crd=True))

    def warn(path: str, msg: str) -> None:
        problems.append(Problem(path, msg, "warning"))

    for path, uri in _locations(spec):
        if target == "cluster" and _is_local(uri):
            error(
                path,
                f"'{uri}' is a local path, which only `finetune-operator run` (local mode) can read: "
                "on a cluster use pvc://CLAIM/path, s3://, gs:// or hf://",
            )
        if target == "local" and uri.startswith("pvc://"):
            error(
                path,
                f"'{uri}' names a PersistentVolumeClaim, which needs a cluster: in local mode use a "
                "path or file:// URI",
            )
        if (
            target == "local"
            and _is_local(uri)
            and path != "spec.output.uri"
            and not (model_to_build and path == "spec.model.source")
            and not local_path(uri, base_dir).exists()
        ):
            build = (
                " or let `finetune-operator run --init-model tiny-gpt2` build a random-init model there "
                "(`validate --init-model` accepts that)"
                if path == "spec.model.source"
                else ""
            )
            error(
                path,
                f"'{local_path(uri, base_dir)}' does not exist: fix the path (relative paths are "
                f"relative to the manifest's folder){build}",
            )

    if spec.model.source.startswith("hf://") and not spec.model.revision:
        warn(
            "spec.model.revision",
            "not pinned: the Hub branch can move under you; set a commit for a "
            "reproducible run (the resolved commit is recorded in status.lineage)",
        )
    if spec.model.trust_remote_code:
        warn("spec.model.trustRemoteCode", "runs Python code shipped with the model inside your pods")

    ds = spec.dataset
    if ds.format == "chat" and "messages" not in ds.columns and ds.columns.keys() & {"role", "content"}:
        warn("spec.dataset.columns", "role/content mapped but not messages: the column 'messages' is assumed")
    if ds.cleaning.max_tokens and ds.cleaning.max_tokens > ds.max_seq_length:
        warn(
            "spec.dataset.cleaning.maxTokens",
            f"rows between maxSeqLength ({ds.max_seq_length}) and "
            f"maxTokens ({ds.cleaning.max_tokens}) are kept but truncated",
        )

    tr = spec.training
    quant = spec.method.quantization
    if quant and tr.precision == "fp16" and quant.compute_dtype == "bfloat16":
        warn("spec.method.quantization.computeDtype", "bfloat16 compute with fp16 training: set one dtype")

    res = spec.resources
    if spec.distributed.strategy == "fsdp" and res.workers * max(res.gpus_per_worker, 1) == 1:
        warn("spec.distributed.strategy", "fsdp with a single process shards nothing: use ddp")
    if target == "cluster" and res.gpus_per_worker == 0:
        warn("spec.resources.gpusPerWorker", "0: training runs on CPU, which suits only tiny models")

    lower_is_better = {"perplexity"}
    for i, gate in enumerate(spec.evaluation.gates):
        if gate.metric in lower_is_better and gate.min is not None and gate.max is None:
            warn(f"spec.evaluation.gates[{i}]", f"{gate.metric} is lower-is-better: a max gate is usual")
        if gate.metric not in lower_is_better and gate.max is not None and gate.min is None:
            warn(f"spec.evaluation.gates[{i}]", f"{gate.metric} is higher-is-better: a min gate is usual")
    ev = spec.evaluation
    ignored = [m for m in ev.metrics if m not in METRICS_BY_OBJECTIVE[tr.objective]]
    if ignored and "metrics" in ev.model_fields_set:  # the default [perplexity] is not the user's choice
        warn(
            "spec.evaluation.metrics",
            f"{', '.join(ignored)} does not apply to objective {tr.objective} and is not computed; "
            f"{tr.objective} is evaluated by {', '.join(METRICS_BY_OBJECTIVE[tr.objective])}",
        )
    gen = spec.evaluation.generation
    if gen.temperature == 0 and gen.top_p < 1:
        warn("spec.evaluation.generation.topP", "ignored with temperature 0 (greedy decoding)")

    out = spec.output
    if out.uri.startswith(("s3://", "gs://")) and not out.credentials and not spec.service_account_name:
        warn(
            "spec.output.credentials",
            "no credentials or serviceAccountName: the upload relies on the nodes' own identity",
        )
    return problems


# ---------------------------------------------------------------- whole objects


def _as_created(meta: Any) -> dict[str, Any]:
    """metadata as the rules see it: the API server turns generateName into a name (5 random characters added)."""
    meta = dict(meta) if isinstance(meta, dict) else {}
    if not meta.get("name") and isinstance(meta.get("generateName"), str):
        meta["name"] = meta["generateName"] + "x2b4z"
    return meta


def _name_problems(meta: Any) -> list[Problem]:
    """metadata.name: required, and one every child object can be named after (the CRD's root rules say the same)."""
    name = meta.get("name") if isinstance(meta, dict) else None
    if name is None:
        if isinstance(meta, dict) and meta.get("generateName"):
            return []
        return [Problem("metadata.name", "is required: name or generateName")]
    if not isinstance(name, str):
        return [Problem("metadata.name", f"must be a string (got {name!r})")]
    problems = []
    if not re.match(DNS_1035_LABEL_PATTERN, name):
        problems.append(Problem("metadata.name", NAME_FORMAT_MESSAGE))
    if len(name) > MAX_NAME_LENGTH:
        problems.append(Problem("metadata.name", NAME_LENGTH_MESSAGE))
    return problems


def validate_object(
    obj: Any,
    *,
    target: Target = "cluster",
    base_dir: Path | None = None,
    old: dict[str, Any] | None = None,
    model_to_build: bool = False,
) -> tuple[FineTuneJobSpec | None, list[Problem]]:
    """Validate one FineTuneJob object. Returns the parsed spec (None when invalid) and every problem found."""
    problems: list[Problem] = []
    if not isinstance(obj, dict):
        return None, [Problem("(document)", "is not a mapping: a FineTuneJob manifest is a YAML object")]
    if obj.get("apiVersion") != API_VERSION:
        problems.append(Problem("apiVersion", f"must be {API_VERSION} (got {obj.get('apiVersion')!r})"))
    if obj.get("kind") != KIND:
        problems.append(Problem("kind", f"must be {KIND} (got {obj.get('kind')!r})"))
    meta = obj.get("metadata") or {}
    problems.extend(_name_problems(meta))
    raw_spec = obj.get("spec")
    if not isinstance(raw_spec, dict):
        problems.append(Problem("spec", "is required and must be a mapping"))
        return None, problems
    raw_spec = as_decoded(raw_spec, _schema()["properties"]["spec"], "spec", problems)
    try:
        # Strict, as the API server is: no 'yes' for a bool, no "2" for a number.
        spec = FineTuneJobSpec.model_validate(raw_spec, strict=True)
    except ValidationError as err:
        return None, problems + _pydantic_problems(err)
    if any(p.severity == "error" for p in problems):
        return None, problems

    defaulted = {
        "apiVersion": obj.get("apiVersion"),
        "kind": obj.get("kind"),
        "metadata": _as_created(meta),
        "spec": spec.wire(),
    }
    if old is not None and "status" in old:
        defaulted["status"] = old["status"]
    problems.extend(p for p in _cel_problems(_schema(), defaulted, "", old) if p not in problems)
    if not any(p.severity == "error" for p in problems):
        problems.extend(semantic_problems(spec, target, base_dir, model_to_build=model_to_build))
    ok = not any(p.severity == "error" for p in problems)
    return (spec if ok else None), problems


def load_documents(path: Path) -> list[Any]:
    """Every YAML document in a file (empty documents skipped)."""
    with path.open() as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc is not None]


def iter_manifest_files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(
                p
                for p in path.rglob("*")
                if p.suffix in (".yaml", ".yml") and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        else:
            yield path


def load_job(
    path: Path, *, target: Target = "local", model_to_build: bool = False
) -> tuple[dict[str, Any], FineTuneJobSpec, list[Problem]]:
    """Read the single FineTuneJob in a manifest file and validate it; raises InvalidJobError."""
    if path.is_dir():
        inside = list(iter_manifest_files([path]))
        hint = f": give a manifest file, e.g. {inside[0]}" if inside else " with no .yaml files: give a manifest file"
        raise InvalidJobError([Problem("(file)", f"is a folder{hint}")], str(path))
    try:
        docs = [d for d in load_documents(path) if isinstance(d, dict) and d.get("kind") == KIND]
    except FileNotFoundError as exc:
        raise InvalidJobError([Problem("(file)", "does not exist: check the path")], str(path)) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidJobError([Problem("(file)", f"cannot be read: {exc}")], str(path)) from exc
    except yaml.YAMLError as exc:
        raise InvalidJobError([Problem("(file)", f"is not valid YAML: {exc}")], str(path)) from exc
    if len(docs) != 1:
        raise InvalidJobError(
            [Problem("(file)", f"holds {len(docs)} FineTuneJobs; give a file with exactly one")], str(path)
        )
    spec, problems = validate_object(
        docs[0], target=target, base_dir=path.parent.resolve(), model_to_build=model_to_build
    )
    if spec is None:
        raise InvalidJobError(problems, str(path))
    return docs[0], spec, problems
