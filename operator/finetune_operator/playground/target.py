"""What a playground TARGET holds: the tuned artifact to load, the base model, the evaluation and the status.

A TARGET is one of
- a FineTuneJob manifest (local mode): its spec.output.uri folder;
- an output folder (status.yaml, the exported artifacts, and .work/run-N with the run's workdir);
- a run workdir on a cluster's workspace volume (/workspace/run-N: sources.json, export/run-N/ artifacts).
No torch and no Gradio here: this is what `playground --check` and the cluster tests read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ..api.spec import FineTuneJobSpec
from ..stages.contract import StageConfig, Workdir

TunedKind = Literal["merged", "full", "adapter", "onnx"]
TUNED_CHOICES = ("auto", "merged", "adapter", "onnx")
FEEDBACK_FILE = "playground-feedback.jsonl"
STATUS_FILE = "status.yaml"
WORK_DIR = ".work"
ONNX_FILE = "model.onnx"


class TargetError(ValueError):
    """A TARGET that cannot be played with; the message names what is missing and the fix."""


@dataclass(frozen=True)
class Generation:
    """Generation defaults: the serving config's, else the spec's evaluation settings."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    source: str = "defaults"


@dataclass
class Target:
    artifacts: Path
    """The folder holding the exported artifacts (an output folder, or export/run-N of a workdir)."""
    workdir: Path | None
    """The run's stage workdir: base model location, tokenizer, evaluation samples."""
    tuned_kind: TunedKind
    tuned_path: Path
    base_path: Path
    tokenizer_path: Path
    spec: FineTuneJobSpec | None = None
    status: dict[str, Any] = field(default_factory=dict)
    serving: dict[str, Any] = field(default_factory=dict)
    generation: Generation = field(default_factory=Generation)
    feedback_file: Path = Path(FEEDBACK_FILE)
    job: str = "finetunejob"
    run: int = 1

    @property
    def chat(self) -> bool:
        return self.spec is not None and self.spec.dataset.format == "chat"

    @property
    def samples_file(self) -> Path | None:
        if self.workdir is None:
            return None
        file = Workdir(self.workdir).evaluation / "samples.jsonl"
        return file if file.exists() else None

    def samples(self) -> list[dict[str, Any]]:
        file = self.samples_file
        if file is None:
            return []
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]

    def tuned_artifact(self) -> dict[str, Any] | None:
        """The status record (name, uri, sha256, size) of the artifact the tuned side loads."""
        name = {"merged": "merged", "full": "adapter", "adapter": "adapter", "onnx": self.tuned_path.name}
        wanted = name[self.tuned_kind]
        return next((a for a in self.status.get("artifacts", []) if a.get("name") == wanted), None)

    def describe(self) -> dict[str, Any]:
        """What `playground --check` prints: enough to know what the app will load."""
        return {
            "job": self.job,
            "run": self.run,
            "artifacts": str(self.artifacts),
            "tuned": {"kind": self.tuned_kind, "path": str(self.tuned_path)},
            "base": str(self.base_path),
            "tokenizer": str(self.tokenizer_path),
            "chat": self.chat,
            "generation": {
                "maxNewTokens": self.generation.max_new_tokens,
                "temperature": self.generation.temperature,
                "topP": self.generation.top_p,
                "from": self.generation.source,
            },
            "samples": len(self.samples()),
            "feedback": str(self.feedback_file),
        }


def _latest_run_dir(root: Path, run: int | None) -> Path | None:
    if run is not None and (root / f"run-{run}").is_dir():
        return root / f"run-{run}"
    runs = sorted((p for p in root.glob("run-*") if p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    return runs[-1] if runs else None


def _stage_config(workdir: Path | None, config_file: Path | None) -> StageConfig | None:
    candidates = [config_file] if config_file else []
    if workdir is not None:
        candidates += [workdir / f"stage-{s}.json" for s in ("export", "evaluate", "train", "prepare")]
    for file in candidates:
        if file is not None and file.is_file():
            return StageConfig.model_validate_json(file.read_text())
    if config_file is not None:
        raise TargetError(f"--config: {config_file} does not exist")
    return None


def _serving_config(artifacts: Path) -> dict[str, Any]:
    file = artifacts / "serving-config.pb"
    if not file.is_file():
        return {}
    from google.protobuf.json_format import MessageToDict

    from ..serving import serving_config_pb2 as pb

    message = pb.ServingConfig()
    message.ParseFromString(file.read_bytes())
    return MessageToDict(message, preserving_proto_field_name=False)


def _generation(serving: dict[str, Any], spec: FineTuneJobSpec | None) -> Generation:
    gen = serving.get("generation")
    if gen:
        return Generation(
            max_new_tokens=int(gen.get("maxNewTokens", 64)),
            temperature=float(gen.get("temperature", 0.0)),
            top_p=float(gen.get("topP", 1.0)) or 1.0,
            source="serving-config.pb",
        )
    if spec is not None:
        g = spec.evaluation.generation
        return Generation(g.max_new_tokens, g.temperature, g.top_p, source="spec.evaluation.generation")
    return Generation()


def _pick_tuned(artifacts: Path, workdir: Path | None, wanted: str) -> tuple[TunedKind, Path]:
    found: dict[str, tuple[TunedKind, Path]] = {}
    if (artifacts / "merged" / "config.json").is_file():
        found["merged"] = ("merged", artifacts / "merged")
    adapter = artifacts / "adapter"
    if (adapter / "adapter_config.json").is_file():
        found["adapter"] = ("adapter", adapter)
    elif (adapter / "config.json").is_file():  # a full fine-tune exports its weights under this name
        found["adapter"] = ("full", adapter)
    for name in ("onnx", "onnx-int8"):
        if (artifacts / name / ONNX_FILE).is_file() and "onnx" not in found:
            found["onnx"] = ("onnx", artifacts / name)
    if wanted != "auto":
        if wanted not in found:
            have = ", ".join(found) or "none"
            raise TargetError(f"--tuned {wanted}: {artifacts} has no {wanted} artifact (found: {have})")
        return found[wanted]
    for name in ("merged", "adapter", "onnx"):
        if name in found:
            return found[name]
    raise TargetError(
        f"{artifacts} holds no tuned model: expected merged/, adapter/ or onnx/ (spec.export.formats); "
        "has the export stage succeeded?"
    )


def _base_path(workdir: Path | None, spec: FineTuneJobSpec | None, base: Path | None, where: Path) -> Path:
    if base is not None:
        if not base.exists():
            raise TargetError(f"--base: {base} does not exist")
        return base
    if workdir is not None:
        path = Workdir(workdir).read_sources().get("model", {}).get("path")
        if path and Path(path).exists():
            return Path(path)
    if spec is not None and Path(spec.model.source).is_absolute() and Path(spec.model.source).exists():
        return Path(spec.model.source)
    raise TargetError(
        f"the base model of {where} cannot be found (the run's sources.json names none that exists here); "
        "pass --base PATH to a local copy of spec.model.source"
    )


def _tokenizer_path(workdir: Path | None, tuned: Path, base: Path) -> Path:
    if workdir is not None and (Workdir(workdir).tokenizer / "tokenizer_config.json").is_file():
        return Workdir(workdir).tokenizer  # the one training and evaluation used
    for path in (tuned, base):
        if (path / "tokenizer_config.json").is_file():
            return path
    return base


def _from_manifest(manifest: Path) -> Path:
    from ..api.validation import InvalidJobError, load_job, local_path

    try:
        _, spec, _ = load_job(manifest, target="local")
    except InvalidJobError as exc:
        raise TargetError("; ".join(p.format(exc.source) for p in exc.problems)) from None
    output = local_path(spec.output.uri, manifest.parent.resolve())
    if not output.is_dir():
        raise TargetError(
            f"{manifest}: its output {output} does not exist yet: run `finetune-operator run {manifest}` first"
        )
    return output


def resolve(
    target: Path,
    *,
    tuned: str = "auto",
    base: Path | None = None,
    config_file: Path | None = None,
    status_file: Path | None = None,
    feedback: Path | None = None,
) -> Target:
    """Read what TARGET holds; raises TargetError with the fix when something needed is missing."""
    if tuned not in TUNED_CHOICES:
        raise TargetError(f"--tuned: {tuned!r} is not one of {', '.join(TUNED_CHOICES)}")
    if not target.exists():
        raise TargetError(f"TARGET: {target} does not exist")
    if target.is_file():
        target = _from_manifest(target)
    status: dict[str, Any] = {}
    status_path = status_file or target / STATUS_FILE
    if status_path.is_file():
        status = yaml.safe_load(status_path.read_text()) or {}
    elif status_file is not None:
        raise TargetError(f"--status: {status_file} does not exist")
    run = int(status.get("run") or 0) or None
    if (target / "sources.json").is_file():  # a run workdir (the cluster's workspace volume)
        workdir: Path | None = target
        run = run or (int(target.name[4:]) if target.name[4:].isdigit() else None)
        artifacts = _latest_run_dir(Workdir(target).export, run)
        if artifacts is None:
            raise TargetError(f"{target}: no export/run-N folder: the export stage has not run in this workdir")
    elif (target / STATUS_FILE).is_file() or (target / WORK_DIR).is_dir() or any(target.glob("*/config.json")):
        artifacts = target
        workdir = _latest_run_dir(target / WORK_DIR, run)
    else:
        raise TargetError(
            f"TARGET: {target} is neither a FineTuneJob manifest, an output folder (status.yaml, merged/, adapter/, "
            "onnx/) nor a run workdir (sources.json)"
        )
    config = _stage_config(workdir, config_file)
    spec = config.spec if config else None
    kind, tuned_path = _pick_tuned(artifacts, workdir, tuned)
    base_path = _base_path(workdir, spec, base, target)
    serving = _serving_config(artifacts)
    lineage = serving.get("lineage", {})
    return Target(
        artifacts=artifacts,
        workdir=workdir,
        tuned_kind=kind,
        tuned_path=tuned_path,
        base_path=base_path,
        tokenizer_path=_tokenizer_path(workdir, tuned_path, base_path),
        spec=spec,
        status=status,
        serving=serving,
        generation=_generation(serving, spec),
        feedback_file=feedback or artifacts / FEEDBACK_FILE,
        job=(config.job if config else None) or lineage.get("job") or artifacts.name,
        run=(config.run if config else None) or run or int(lineage.get("run", 1)),
    )
