"""A FineTuneJob name `validate` and the CRD accept is one every child object the operator creates can carry."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from finetune_operator.api.job import FineTuneJob
from finetune_operator.api.names import MAX_NAME_LENGTH, child_name_suffixes
from finetune_operator.api.spec import ResourcesSpec
from finetune_operator.api.validation import validate_object
from finetune_operator.cluster.build import render

from .conftest import MINIMAL_JOB

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS_1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
MAX_WORKERS = next(int(m.le) for m in ResourcesSpec.model_fields["workers"].metadata if getattr(m, "le", None))


def _largest_job(name: str) -> FineTuneJob:
    """Every stage, every optional child (workspace PVC, rendezvous Service) and the most train workers."""
    raw = copy.deepcopy(MINIMAL_JOB)
    raw["metadata"].update(name=name, uid="0f5e2a4c-1111-2222-3333-444455556666")
    raw["spec"]["resources"] = {"workers": MAX_WORKERS}
    raw["spec"]["storage"] = {"workspace": {"size": "10Gi", "accessModes": ["ReadWriteMany"]}}
    spec, problems = validate_object(raw)
    assert spec is not None, problems
    return FineTuneJob.model_validate(raw)


def _names_of(obj: dict[str, Any]) -> list[tuple[str, str, re.Pattern[str]]]:
    """(what, value, the rule it must follow) for the object's name, its labels and its pods' hostnames."""
    kind, meta = obj["kind"], obj["metadata"]
    out = [(f"{kind} name", meta["name"], DNS_1035_LABEL if kind == "Service" else DNS_1123_LABEL)]
    out += [(f"{kind} label {k}", v, LABEL_VALUE) for k, v in meta.get("labels", {}).items()]
    if kind == "Job":
        pod = obj["spec"]["template"]["spec"]
        out.append(("Job pod label job-name", meta["name"], LABEL_VALUE))  # the Job controller adds it
        if obj["spec"].get("completionMode") == "Indexed":
            last = obj["spec"]["completions"] - 1
            out.append(("Indexed pod hostname", f"{meta['name']}-{last}", DNS_1123_LABEL))
        if pod.get("subdomain"):
            out.append(("pod subdomain", pod["subdomain"], DNS_1123_LABEL))
    return out


def test_the_longest_accepted_name_fits_every_child():
    job = _largest_job("a" * MAX_NAME_LENGTH)
    objects = render(job)
    assert {o["kind"] for o in objects} >= {"Job", "ConfigMap", "PersistentVolumeClaim", "Service"}
    for obj in objects:
        for what, value, rule in _names_of(obj):
            assert len(value) <= 63 and rule.match(value), f"{what} {value!r} ({len(value)} characters)"
    longest = max(len(value) for obj in objects for what, value, _ in _names_of(obj) if "label" not in what)
    assert longest == 63, "MAX_NAME_LENGTH is not the longest name the children can carry"


def test_every_suffix_the_operator_uses_is_known_to_the_name_rule():
    suffixes = set(child_name_suffixes())
    name = "a" * MAX_NAME_LENGTH
    for obj in render(_largest_job(name)):
        for what, value, _ in _names_of(obj):
            if "label" not in what and value != name:
                assert value.removeprefix(name) in suffixes, f"{what} {value!r}: add its suffix to api/names.py"


@pytest.mark.parametrize(
    ("name", "words"),
    [("7b-tune", "start with a lower-case letter"), ("llama.v2", "no dots"), ("a" * 48, "at most 47")],
)
def test_a_name_a_child_cannot_carry_is_refused_with_the_reason(name, words):
    raw = copy.deepcopy(MINIMAL_JOB)
    raw["metadata"]["name"] = name
    _, problems = validate_object(raw)
    assert any(p.path == "metadata.name" and words in p.message for p in problems), problems
