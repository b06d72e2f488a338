"""The FineTuneJob API on the real Kubernetes API server (../shared/apiserver): the CRD installs and behaves, and
`finetune-operator validate` gives the server's verdict on every manifest the project knows and on generated ones."""

from __future__ import annotations

import collections
import copy
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from kubernetes import client

from finetune_operator.api.base import GROUP, PLURAL, VERSION
from finetune_operator.api.names import MAX_NAME_LENGTH
from finetune_operator.api.spec import FineTuneJobSpec

from .apiserver import REPO, ApiServer
from .conftest import EXAMPLES, MINIMAL_JOB
from .judges import ServerJudge, Verdict, validate_verdict
from .manifests import manifest_families
from .test_validation import DELETE, INVALID, patched

CRD_NAME = f"{PLURAL}.{GROUP}"
EXAMPLE_FILES = sorted(EXAMPLES.rglob("*.yaml"))
# Hypothesis draws FAMILIES manifests from the models' schema and MUTATIONS copies of each that break one rule.
FAMILIES, MUTATIONS = 100, 3


def _fine_tune_jobs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict) and d.get("kind") == "FineTuneJob"]


@pytest.fixture(scope="module")
def judge(crd_installed: ApiServer) -> ServerJudge:
    """One client and one namespace for every dry-run of this module (dry-runs store nothing)."""
    namespace = "judge"
    crd_installed.kubectl("create", "namespace", namespace, check=False)
    return ServerJudge(crd_installed.api_client(), namespace)


@pytest.fixture
def objects(crd_installed: ApiServer) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(crd_installed.api_client())


def _agree(what: str, manifest: dict[str, Any], server: Verdict, mine: Verdict) -> str:
    """'agree', 'validate-knows-more' (refused only by a rule beyond the CRD), or fail with both verdicts."""
    if server.agrees_with(mine):
        return "agree"
    if server.accepted and mine.beyond_crd:
        return "validate-knows-more"
    pytest.fail(
        f"the judges disagree on\n{yaml.safe_dump(manifest, sort_keys=False)}server: {server}\nvalidate: {mine}"
    )


# ---------------------------------------------------------------- the CRD installs and behaves


def test_crds_apply_client_side_and_server_side_and_are_established(crd_installed):
    # crd_installed applied crds/ server-side; a client-side apply over it must work too, and a second
    # server-side apply (what a GitOps tool repeats) must be a no-op without conflicts.
    client_side = crd_installed.kubectl("apply", "-f", str(REPO / "crds"), check=False)
    assert client_side.returncode == 0, client_side.stderr
    again = crd_installed.kubectl("apply", "--server-side", "-f", str(REPO / "crds"), check=False)
    assert again.returncode == 0, again.stderr
    crd = json.loads(crd_installed.kubectl("get", "crd", CRD_NAME, "-o", "json").stdout)
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    assert crd_installed.kubectl("get", "ftj", "-A").returncode == 0  # the short name is served


def test_the_charts_crds_and_the_install_manifest_apply(crd_installed):
    chart_crds = REPO / "charts" / "finetune-operator" / "crds"
    done = crd_installed.kubectl("apply", "--server-side", "--dry-run=server", "-f", str(chart_crds), check=False)
    assert done.returncode == 0, done.stderr
    # The server serves only some built-in kinds (no RBAC, no Deployment): apply the documents it can judge.
    served = set(crd_installed.kubectl("api-resources", "-o", "name").stdout.split())
    docs = [d for d in yaml.safe_load_all((REPO / "deploy" / "finetune-operator.yaml").read_text()) if d]
    kinds = {"CustomResourceDefinition": "customresourcedefinitions.apiextensions.k8s.io",
             "Namespace": "namespaces", "Service": "services"}  # fmt: skip
    judged = [d for d in docs if kinds.get(d["kind"]) in served]
    assert sum(d["kind"] == "CustomResourceDefinition" for d in judged) == 3
    manifest = "\n---\n".join(yaml.safe_dump(d) for d in sorted(judged, key=lambda d: d["kind"] != "Namespace"))
    done = crd_installed.kubectl("apply", "--server-side", "-f", "-", input=manifest, check=False)
    assert done.returncode == 0, done.stderr


def test_kubectl_explain_shows_the_models_descriptions(crd_installed):
    explained = crd_installed.kubectl("explain", "ftj.spec.method").stdout
    assert "LoRA, QLoRA or full fine-tuning." in explained
    assert "qlora: LoRA on a 4/8-bit quantized base" in " ".join(explained.split())
    assert "quantization\t<Object>" in explained


def test_printer_columns_show_the_status_written_through_the_subresource(crd_installed, namespace, objects):
    job = {**copy.deepcopy(MINIMAL_JOB), "metadata": {"name": "columns"}}
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
    status = {
        "phase": "Training",
        "currentStage": "train",
        "metrics": {"summary": "loss 1.23"},
        "conditions": [
            {"type": "Reconciling", "status": "True", "reason": "Training", "message": "step 5/10",
             "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "Ready", "status": "False", "reason": "Training", "message": "running",
             "lastTransitionTime": "2026-01-01T00:00:00Z"},
        ],
    }  # fmt: skip
    objects.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "columns", {"status": status})
    table = crd_installed.kubectl("get", "ftj", "columns", "-n", namespace, "-o", "wide").stdout.splitlines()
    header, row = table[0].split(), table[1]
    assert header[:6] == ["NAME", "PHASE", "STAGE", "PROGRESS", "METRIC", "READY"] and "REASON" in header
    assert "Training" in row and "train" in row and "step 5/10" in row and "loss 1.23" in row and "False" in row
    # A main-resource write cannot touch status (the subresource owns it).
    stored = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "columns")
    stored["status"]["phase"] = "Succeeded"
    objects.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "columns", stored)
    again = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "columns")
    assert again["status"]["phase"] == "Training"


# ---------------------------------------------------------------- defaults


SPARSE = {"model": {"source": "hf://org/model"}, "dataset": {"source": "s3://b/d.jsonl", "format": "completion"},
          "output": {"uri": "s3://b/out"}}  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"method": {"type": "qlora", "quantization": {}}},
        {"method": {"type": "full"}},
        {"training": {"objective": "grpo", "grpo": {}}},
        {"evaluation": {"gates": [{"metric": "perplexity", "max": 9}]}, "export": {"serving": {"runtime": "kserve"}}},
    ],
    ids=["only-model-dataset-output", "qlora", "full", "grpo", "gates-and-serving"],
)
def test_a_sparse_manifest_reads_back_with_the_models_defaults(namespace, objects, extra):
    spec = {**SPARSE, **extra}
    name = "sparse"  # each case has a namespace of its own
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
    assert validate_verdict(body).accepted
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    stored = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    assert stored["spec"] == FineTuneJobSpec.model_validate(spec).wire()


def test_the_documented_defaults_of_a_minimal_manifest(namespace, objects):
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "FineTuneJob", "metadata": {"name": "minimal"}, "spec": SPARSE}
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    spec = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "minimal")["spec"]
    assert spec["training"]["objective"] == "sft" and "epochs" not in spec["training"]  # one epoch
    assert spec["method"]["type"] == "lora" and spec["method"]["lora"]["targetModules"] == ["all-linear"]
    assert spec["export"]["formats"] == ["merged"] and spec["evaluation"]["metrics"] == ["perplexity"]
    assert spec["resources"] == {"workers": 1, "gpusPerWorker": 1, "gpuResourceName": "nvidia.com/gpu"}
    assert FineTuneJobSpec.model_validate(spec).training.epochs is None


# ---------------------------------------------------------------- transition rules


def test_a_running_jobs_spec_cannot_change_and_a_finished_ones_can(namespace, objects):
    job = {**copy.deepcopy(MINIMAL_JOB), "metadata": {"name": "moving"}}
    objects.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)

    def set_phase(phase: str) -> None:
        body = {"status": {"phase": phase}}
        objects.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, "moving", body)

    def change(patch: dict[str, Any]) -> client.ApiException | None:
        try:
            objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "moving", {"spec": patch})
        except client.ApiException as exc:
            return exc
        return None

    set_phase("Training")
    refused = change({"training": {"learningRate": 0.001}})
    assert refused is not None and refused.status == 422
    assert "cannot change while the job is running" in refused.body
    assert change({"evaluation": {"maxSamples": 50}}) is None  # read by a later stage: allowed
    assert change({"runPolicy": {"suspend": True}}) is None
    set_phase("Succeeded")
    assert change({"training": {"learningRate": 0.001}}) is None  # starts a new run
    stored = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "moving")
    assert stored["spec"]["training"]["learningRate"] == 0.001


# ---------------------------------------------------------------- one verdict, two judges


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: str(p.relative_to(EXAMPLES)))
def test_every_example_is_accepted_by_both_judges(judge, path):
    for manifest in _fine_tune_jobs(path):
        server = judge.judge(manifest)
        assert server.accepted, server.message
        if "quickstart" not in path.parts:  # the quickstart runs in local mode (local paths)
            mine = validate_verdict(manifest)
            assert mine.accepted, mine.message


@pytest.mark.parametrize(("case", "patch", "path", "words", "layer"), INVALID, ids=[c[0] for c in INVALID])
def test_the_invalid_table_gets_the_same_verdict_from_the_server(judge, case, patch, path, words, layer):
    manifest = patched(patch)
    server, mine = judge.judge(manifest), validate_verdict(manifest)
    assert not mine.accepted and path in mine.fields
    if layer == "semantic":  # a rule no CRD can express: the server accepts, `validate` knows more
        assert server.accepted, server.message
        assert mine.beyond_crd, mine.message
    elif layer == "routing":  # apiVersion and kind pick the endpoint: the server refuses without naming a field
        assert not server.accepted, server.message
    else:
        assert not server.accepted, f"{case}: the server accepted it"
        assert path in server.fields, f"{case}: the server named {sorted(server.fields)}: {server.message}"


# What the API server does before it validates, which `validate` must do alike: (case, spec patch, accepted).
DECODING = [
    ("no-break-space-in-uri", {"model": {"source": "hf://org/model\u00a0v2"}}, True),
    ("null-for-a-defaulted-block", {"method": None}, True),
    ("null-for-a-defaulted-list", {"method": {"lora": {"targetModules": None}}}, True),
    ("null-for-an-optional-field", {"image": None}, True),
    ("whole-float-for-an-integer", {"training": {"maxSteps": 20.0, "epochs": DELETE}}, True),
    ("null-inside-a-list", {"method": {"lora": {"targetModules": ["q_proj", None]}}}, False),
    ("null-for-a-required-block", {"model": None}, False),
    ("yes-for-a-bool", {"dataset": {"packing": "yes"}}, False),
    ("duplicate-in-a-set", {"export": {"formats": ["merged", "merged"]}}, False),
]


@pytest.mark.parametrize(("case", "patch", "accepted"), DECODING, ids=[c[0] for c in DECODING])
def test_both_judges_decode_a_manifest_alike(judge, case, patch, accepted):
    manifest = patched({"spec": patch})
    server, mine = judge.judge(manifest), validate_verdict(manifest)
    assert server.accepted is accepted, server.message
    assert _agree(case, manifest, server, mine) == "agree"


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("7b-tune", "a leading digit is not a DNS-1035 label (the train Service)"),
        ("llama.v2", "a dot breaks the pods' hostnames"),
        ("a" * (MAX_NAME_LENGTH + 1), "NAME-evaluate-config would exceed 63 characters"),
        ("tune-", "a trailing '-'"),
    ],
)
def test_names_a_child_cannot_carry_are_refused_by_both_judges(judge, name, why):
    manifest = patched({"metadata": {"name": name}})
    server, mine = judge.judge(manifest), validate_verdict(manifest)
    assert not server.accepted and not mine.accepted, why
    assert "metadata.name" in server.fields and "metadata.name" in mine.fields
    assert "DNS-1035" in server.message or "at most" in server.message or "RFC 1123" in server.message


def test_the_longest_name_a_child_can_carry_is_accepted(judge):
    manifest = patched({"metadata": {"name": "a" * MAX_NAME_LENGTH}})
    assert judge.judge(manifest).accepted and validate_verdict(manifest).accepted


@pytest.mark.slow
def test_generated_manifests_get_the_same_verdict_from_both_judges(judge, capsys):
    counts: collections.Counter[str] = collections.Counter()
    verdicts: collections.Counter[str] = collections.Counter()
    started = time.monotonic()

    @settings(
        max_examples=FAMILIES,
        derandomize=True,
        deadline=None,
        database=None,
        # A disagreement is printed whole by `_agree`; shrinking one took over five minutes of CI.
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(manifest_families(MUTATIONS))
    def check(family: list[tuple[str, dict[str, Any]]]) -> None:
        for what, manifest in family:
            server, mine = judge.judge(manifest), validate_verdict(manifest)
            counts[_agree(what, manifest, server, mine)] += 1
            counts["same fields"] += not server.accepted and server.fields == mine.fields
            kind = "generated" if what == "generated" else "mutated"
            verdicts[f"{kind} {'accepted' if server.accepted else 'refused'}"] += 1

    check()
    total = counts["agree"] + counts["validate-knows-more"]
    refused = sum(v for k, v in verdicts.items() if "refused" in k)
    with capsys.disabled():  # the count belongs in every test log, CI's included
        print(
            f"\n{counts['agree']} of {total} generated manifests got the same verdict from the API server and "
            f"`validate` ({counts['validate-knows-more']} more refused by `validate` alone, by a rule beyond the "
            "CRD); of the "
            f"{refused} the server refused, both named the very same fields in {counts['same fields']}; "
            f"{dict(sorted(verdicts.items()))}; {time.monotonic() - started:.1f}s"
        )
    assert total >= 300
    # Enough of each verdict that the agreement means something (the numbers are deterministic: derandomize).
    assert verdicts["generated accepted"] >= FAMILIES // 8 and verdicts["mutated refused"] >= FAMILIES
