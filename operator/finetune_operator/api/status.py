"""`FineTuneJob.status`: what the operator (or the local mode) writes back."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ApiModel

Phase = Literal[
    "Pending", "Preparing", "Searching", "Training", "Evaluating", "Exporting", "Succeeded", "Failed", "Suspended"
]
ACTIVE_PHASES = ("Preparing", "Searching", "Training", "Evaluating", "Exporting")
FINISHED_PHASES = ("Succeeded", "Failed")
StageState = Literal["Pending", "Running", "Succeeded", "Failed", "Skipped"]


class Condition(ApiModel):
    """A metav1.Condition."""

    type: str
    """Ready, Succeeded, Failed, Suspended, Reconciling, Stalled, or <Stage>Complete (e.g. TrainComplete)."""
    status: Literal["True", "False", "Unknown"]
    """True, False or Unknown."""
    observed_generation: int | None = None
    """The metadata.generation this condition was computed from."""
    last_transition_time: str
    """When status last changed (RFC 3339)."""
    reason: str
    """CamelCase reason, e.g. StageRunning, GateFailed, StageFailed."""
    message: str = ""
    """What happened, for a person."""


class StageStatus(ApiModel):
    """One stage's record."""

    state: StageState = "Pending"
    """Pending, Running, Succeeded, Failed or Skipped."""
    attempts: int = 0
    """Pod attempts made (1 + retries)."""
    job_name: str | None = None
    """The stage's Job (cluster) or process label (local mode)."""
    children: list[str] = Field(default_factory=list)
    """Other objects created for the stage (Service, ConfigMap, PodGroup)."""
    start_time: str | None = None
    """When the stage's first attempt started (RFC 3339)."""
    completion_time: str | None = None
    """When the stage ended (RFC 3339)."""
    message: str | None = None
    """The stage's last message (the failure reason, when it failed)."""


class StagesStatus(ApiModel):
    """Per-stage records."""

    prepare: StageStatus | None = None
    """The prepare stage."""
    search: StageStatus | None = None
    """The hyper-parameter search stage (only with spec.search)."""
    train: StageStatus | None = None
    """The train stage."""
    evaluate: StageStatus | None = None
    """The evaluate stage."""
    export: StageStatus | None = None
    """The export stage."""


class Progress(ApiModel):
    """Training progress, from the train stage's JSON progress lines."""

    step: int = 0
    """Optimizer steps done."""
    total_steps: int | None = None
    """Optimizer steps the run will take."""
    epoch: float | None = None
    """Epochs done (fractional)."""
    loss: float | None = None
    """Training loss at the last logging step."""
    learning_rate: float | None = None
    """Learning rate at the last logging step."""
    tokens_per_second: float | None = None
    """Real (non-padding) training tokens per second, all workers together."""
    eta: str | None = None
    """Estimated time left, e.g. 1h02m."""
    percent: int | None = None
    """step / totalSteps in percent (the Progress printer column)."""
    updated_at: str | None = None
    """When this progress was read (RFC 3339)."""


class GateResult(ApiModel):
    """The outcome of one quality gate."""

    metric: str
    """The gated metric."""
    value: float | None = None
    """The tuned model's value (absent when the metric could not be computed)."""
    min: float | None = None
    """The gate's lower bound."""
    max: float | None = None
    """The gate's upper bound."""
    passed: bool
    """Whether the value lies within the bounds."""


class MetricsStatus(ApiModel):
    """Evaluation results."""

    base: dict[str, float] = Field(default_factory=dict)
    """Metrics of the base model."""
    tuned: dict[str, float] = Field(default_factory=dict)
    """Metrics of the fine-tuned model."""
    gates: list[GateResult] = Field(default_factory=list)
    """One result per quality gate."""
    gates_passed: bool | None = None
    """True when every gate passed."""
    summary: str | None = None
    """One line for the printer column, e.g. "perplexity 12.3 (base 30.1)"."""


class SearchTrial(ApiModel):
    """One trial of the hyper-parameter search."""

    trial: int
    """Trial number, from 1."""
    values: dict[str, float] = Field(default_factory=dict)
    """The parameter values tried (spec field name -> value)."""
    objective: float | None = None
    """The objective's value on the eval rows (absent when the trial failed)."""
    steps: int = 0
    """Optimizer steps the trial trained."""
    seconds: float = 0.0
    """Wall time of the trial (training and scoring)."""
    message: str | None = None
    """Why the trial failed, when it did (e.g. the loss diverged)."""


class SearchStatus(ApiModel):
    """The hyper-parameter search: every trial and the winner."""

    metric: str
    """The objective metric, e.g. evalLoss."""
    direction: Literal["minimize", "maximize"]
    """Whether lower or higher was better."""
    method: str
    """The scipy.optimize method used, e.g. minimize_scalar(bounded) or direct."""
    best: dict[str, float] = Field(default_factory=dict)
    """The winning values; the main train stage uses them."""
    best_objective: float | None = None
    """The objective of the winning trial."""
    best_trial: int | None = None
    """Which trial won."""
    trials: list[SearchTrial] = Field(default_factory=list)
    """Every trial, in the order run."""


class Artifact(ApiModel):
    """One exported artifact."""

    name: str
    """Artifact name, e.g. merged or onnx."""
    format: str
    """adapter, merged, onnx, serving-config, triton-repository, kserve-manifest."""
    uri: str
    """Where the artifact is."""
    sha256: str
    """Digest of the file, or of the sorted per-file digests of a directory."""
    size_bytes: int
    """Total size in bytes."""


class ServingConfigStatus(ApiModel):
    """The protobuf serving configuration written by export."""

    uri: str
    """Where the binary protobuf is."""
    sha256: str
    """Digest of the binary protobuf."""
    text: str | None = None
    """The text-format protobuf, when it is small enough to keep in status."""


class Lineage(ApiModel):
    """What exactly this run was made from."""

    base_model: str | None = None
    """The base model's source URI."""
    model_revision: str | None = None
    """The resolved revision (commit) of the base model."""
    dataset_fingerprint: str | None = None
    """sha256 over the prepared training rows."""
    config_hash: str | None = None
    """sha256 of the resolved spec the run used."""
    run_hash: str | None = None
    """sha256 of the fields that define a run (model, dataset, method, training, distributed, workers)."""


class RunRecord(ApiModel):
    """A finished earlier run (a spec change after completion starts a new run)."""

    run: int
    """Run number."""
    generation: int | None = None
    """metadata.generation the run was made from."""
    phase: str
    """How the run ended."""
    config_hash: str | None = None
    """sha256 of the resolved spec of the run."""
    start_time: str | None = None
    """When the run started."""
    completion_time: str | None = None
    """When the run ended."""
    message: str | None = None
    """The run's last message."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """The tuned model's metrics of the run."""


class FineTuneJobStatus(ApiModel):
    """Observed state of a FineTuneJob."""

    phase: Phase = "Pending"
    """Pending, Preparing, Training, Evaluating, Exporting, Succeeded, Failed or Suspended."""
    observed_generation: int | None = None
    """The metadata.generation the status reflects."""
    current_stage: str | None = None
    """The stage running now, or the last one run."""
    message: str | None = None
    """What is happening now, for a person."""
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    """Ready, Succeeded, Failed, Suspended, one <Stage>Complete per stage, and kstatus Reconciling/Stalled."""
    stages: StagesStatus = Field(default_factory=StagesStatus)
    """Per-stage records."""
    progress: Progress | None = None
    """Training progress."""
    search: SearchStatus | None = None
    """The hyper-parameter search's trials and winner (with spec.search)."""
    metrics: MetricsStatus | None = None
    """Evaluation results and gates."""
    artifacts: list[Artifact] = Field(default_factory=list)
    """Exported artifacts with digests."""
    serving_config: ServingConfigStatus | None = None
    """The serving configuration."""
    lineage: Lineage | None = None
    """Base model revision, dataset fingerprint and config hash."""
    run: int = 1
    """Run number; increases when a finished job's spec changes."""
    runs: list[RunRecord] = Field(default_factory=list)
    """Earlier runs of this FineTuneJob (latest last, at most 10)."""
    start_time: str | None = None
    """When the current run started."""
    completion_time: str | None = None
    """When the current run ended."""
