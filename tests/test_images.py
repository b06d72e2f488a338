"""The container images, checked without a Docker engine: what each installs, runs and runs as.

The operator image must stay light (the base install, no torch); the trainer image must carry the pinned ML
stack and run the stage programs exactly as the stage Jobs call them, as the user the Jobs' security context names.
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from typing import Any

from packaging.specifiers import SpecifierSet

from finetune_operator.cli import build_parser
from finetune_operator.cluster.build import build_stage
from finetune_operator.cluster.plugins.security import UID

from .conftest import (
    MINIMAL_JOB,
    REPO,
)
from .helm import one, render_chart
from .test_render import job_from

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SCRIPTS = PYPROJECT["project"]["scripts"]


def final_stage(name: str) -> dict[str, Any]:
    """The last build stage of images/NAME/Dockerfile: base image, instructions (continuations joined)."""
    text = (REPO / "images" / name / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    args: dict[str, str] = {}
    stage: dict[str, Any] = {}
    for line in filter(None, (line.strip() for line in logical.splitlines())):
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and "=" in rest and not stage:
            key, _, value = rest.partition("=")
            args[key] = value
        elif op == "FROM":
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split(" AS ")[0].strip())
            stage = {"base": base, "run": [], "copy": [], "env": {}}
        elif op == "RUN":
            stage["run"].append(rest)
        elif op == "COPY":
            stage["copy"].append(rest)
        elif op == "ENV":
            stage["env"].update(dict(pair.split("=", 1) for pair in shlex.split(rest)))
        elif op in ("USER", "ENTRYPOINT", "CMD"):
            stage[op.lower()] = rest
    # Every COPY of every stage, sources only (a --from=stage copy names paths inside that stage).
    copies = [line.strip()[5:] for line in logical.splitlines() if line.strip().upper().startswith("COPY ")]
    stage["copied"] = [src for line in copies if "--from=" not in line for src in line.split()[:-1]]
    return stage


def exec_form(value: str) -> list[str]:
    return json.loads(value)


def test_operator_image_is_the_base_install_running_the_operator_as_non_root():
    image = final_stage("operator")
    assert image["base"].startswith("python:3.11-slim")
    installs = " ".join(image["run"])
    assert "pip install" in installs and "finetune-operator" in installs
    assert "[" not in installs and "torch" not in installs  # no extras: the operator never imports the ML stack
    command = exec_form(image["entrypoint"]) + exec_form(image["cmd"])
    assert command[0] in SCRIPTS and build_parser().parse_args(command[1:]).func.__name__ == "_cmd_operator"
    uid = int(image["user"].split(":")[0])
    deployment = one(render_chart(), "Deployment")
    assert uid != 0 and uid == deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]


def test_trainer_image_carries_the_pinned_stack_and_runs_stages_as_the_jobs_expect():
    image = final_stage("trainer")
    assert image["base"].startswith("nvidia/cuda:") and "runtime" in image["base"]
    extras = re.search(r'pip install "\.\[([\w,]+)\]"', " ".join(image["run"]))
    assert extras, "the trainer installs the project with extras"
    assert (
        set(extras.group(1).split(","))
        == {"train", "cloud", "playground"}  # playground: the operator's playground Deployments run this image
        <= PYPROJECT["project"]["optional-dependencies"].keys()
    )
    assert "torch==2.13.0" in PYPROJECT["project"]["optional-dependencies"]["train"]  # exact pin, one torch
    python = re.search(r"python3\.(\d+)", " ".join(image["run"]))
    assert python and f"3.{python.group(1)}" in SpecifierSet(PYPROJECT["project"]["requires-python"])
    job = build_stage(job_from(MINIMAL_JOB), "train").job
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert exec_form(image["entrypoint"])[0] == container["command"][0] in SCRIPTS
    assert exec_form(image["entrypoint"])[1] == container["command"][1] == "stage"
    assert int(image["user"].split(":")[0]) == UID == pod["securityContext"]["runAsUser"] != 0
    job_env = {e["name"]: e.get("value") for e in container["env"]}
    assert image["env"]["HOME"] == job_env["HOME"] and image["env"]["HF_HOME"] == job_env["HF_HOME"]


def test_images_copy_only_what_the_repository_has():
    for name in ("operator", "trainer"):
        for source in final_stage(name)["copied"]:
            assert (REPO / source).exists(), (name, source)
