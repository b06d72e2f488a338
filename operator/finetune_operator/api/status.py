"""`FineTuneJob.status`: what the operator (or the local mode) writes back."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from .base import ApiModel

Phase = Literal[
    "Pending", "Preparing", "Searching", "Training", "Evaluating", "Exporting", "Succeeded", "Failed", "Suspended"
]
ACTIVE_PHASES = ("Preparing", "Searching", "Training", "Evaluating", "Exporting")
FINISHED_PHASES = ("Succeeded", "Failed")
StageState = Literal["Pending", "Running", "Succeeded", "Failed", "Skipped"]
MAX_RESTARTS_KEPT = 20


class Condition(ApiModel):
    """A metav1.Condition."""

    type: str
    """Ready, Succeeded, Failed, Suspended, Reconciling, Stalled, Synced, or <Stage>Complete (e.g. TrainComplete)."""
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


RestartReason = Literal["WorkerLost", "Preempted", "OOM", "Error"]


class RestartRecord(ApiModel):
    """One attempt of a stage that ended in a retryable failure and was restarted (train: all workers together,
    from the newest complete checkpoint). Kept in the FineTuneJob, so no child clean-up resets the count."""

    attempt: int
    """The attempt that ended (1 is the first)."""
    reason: RestartReason
    """WorkerLost (a worker or its node died, or a collective timed out), Preempted (SIGTERM or a
    DisruptionTarget: eviction, preemption, node drain or shutdown; costs no retry), OOM, or Error (another
    transient failure: I/O, network, a crash)."""
    exit_code: int | None = None
    """The exit code that decided (see the exit-code table in the README)."""
    message: str | None = None
    """What the failed attempt reported."""
    time: str | None = None
    """When the attempt ended (RFC 3339)."""
    counts_against_backoff_limit: bool = True
    """False for disruptions: they do not use up spec.runPolicy.backoffLimit."""
    resume_from: str | None = None
    """The checkpoint the next attempt resumed from (train)."""
    job_uid: str | None = None
    """The uid of the attempt's Job (cluster), so that each attempt is recorded once."""


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
    restarts: Annotated[list[RestartRecord], Field(max_length=MAX_RESTARTS_KEPT)] = Field(default_factory=list)
    """Attempts that ended in a retryable failure, oldest first (the last 20)."""
    retries_used: int = 0
    """Restarts counted against spec.runPolicy.backoffLimit (disruptions are not)."""


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


class CheckpointRef(ApiModel):
    """A complete checkpoint: every worker saved its part."""

    step: int
    """The optimizer step it holds; a resume continues at the next step."""
    time: str | None = None
    """When it was completed (RFC 3339)."""
    location: str | None = None
    """Where it is (a path on the shared workspace)."""


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
    last_checkpoint: CheckpointRef | None = None
    """The newest complete checkpoint: where a restart or a resume continues from."""


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
    train: dict[str, float] = Field(default_factory=dict)
    """The fine-tuned model's metrics on as many training rows: far above tuned means memorised, not learned."""
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


class OomRecovery(ApiModel):
    """One CUDA out-of-memory the train stage recovered from."""

    at_step: int
    """Optimizer step of the checkpoint training resumed from."""
    micro_batch: int
    """The halved micro-batch it continued with."""
    gradient_accumulation_steps: int
    """The doubled accumulation that keeps the effective batch."""


class EstimateStatus(ApiModel):
    """Memory per GPU and the work of the run, estimated after prepare and before the train Job exists."""

    memory_per_gpu_gi_b: float = Field(alias="memoryPerGpuGiB")
    """What one GPU must hold: tensors, allocator slack and the CUDA context."""
    allocated_peak_gi_b: float | None = Field(None, alias="allocatedPeakGiB")
    """The tensors alone (what torch.cuda.max_memory_allocated would show)."""
    gpu_memory_gi_b: float | None = Field(None, alias="gpuMemoryGiB")
    """Memory of one GPU (spec.resources.gpuMemory, or a known product in the node selector)."""
    fits: bool | None = None
    """Whether the estimate fits the GPU (unknown without gpuMemory or a known GPU)."""
    biggest_term: str | None = None
    """The largest memory term (e.g. optimizer states, activations)."""
    terms_gi_b: dict[str, float] = Field(default_factory=dict, alias="termsGiB")
    """Every memory term in GiB."""
    parameters: int | None = None
    """Parameters of the base model."""
    trainable_parameters: int | None = None
    """Parameters trained (the LoRA adapters, or every weight)."""
    micro_batch: int | None = None
    """Sequences per GPU per forward pass (batchSize, or what batchSize: auto chose)."""
    gradient_accumulation_steps: int | None = None
    """Micro-batches per optimizer step."""
    effective_batch_size: int | None = None
    """Sequences per optimizer step over all GPUs."""
    sequence_length: int | None = None
    """Tokens per sequence the memory is estimated for (the longest prepared row, clipped to maxSeqLength)."""
    world_size: int | None = None
    """Training processes (workers x gpusPerWorker)."""
    sequences: int | None = None
    """Training sequences per epoch (after cleaning and packing)."""
    tokens_per_epoch: int | None = None
    """Tokens in one pass over the prepared training data."""
    steps: int | None = None
    """Optimizer steps of the run."""
    training_flops: float | None = None
    """Floating-point operations of the run (6N per token for full, less for LoRA)."""
    gpu: str | None = None
    """The GPU product the time band is for."""
    time_hours: list[float] = Field(default_factory=list)
    """Wall-clock band [fast, slow] in hours, from the GPU's peak bf16 FLOP/s and an MFU of 25-50%."""
    gpu_hours: list[float] = Field(default_factory=list)
    """GPU-hours band [fast, slow]."""
    config_source: str | None = None
    """Where the model's config.json came from."""
    architecture: dict[str, Any] = Field(
        default_factory=dict, json_schema_extra={"x-kubernetes-preserve-unknown-fields": True}
    )
    """The config.json keys the estimate reads (to re-estimate when spec.resources changes)."""
    notes: list[str] = Field(default_factory=list)
    """Caveats of the estimate."""
    message: str | None = None
    """Why it does not fit, and what to change."""
    oom_recoveries: list[OomRecovery] = Field(default_factory=list)
    """CUDA out-of-memory errors the train stage recovered from by halving the micro-batch."""


class PlaygroundStatus(ApiModel):
    """The playground Deployment of the current run."""

    state: Literal["Starting", "Ready", "Expired", "Removed"]
    """Starting, Ready (its pod answers), Expired (ttlSecondsAfterFinished passed) or Removed."""
    run: int
    """The run whose artifacts it serves."""
    name: str
    """The Deployment and Service name."""
    url: str | None = None
    """In-cluster URL of the Service (absent once removed)."""
    port_forward: str | None = None
    """The command that opens it on your machine."""
    expires_at: str | None = None
    """When it is removed (RFC 3339), when spec.playground.ttlSecondsAfterFinished is set."""


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
    """Ready, Succeeded, Failed, Suspended, one <Stage>Complete per stage, kstatus Reconciling/Stalled, and Synced
    (False, reason ApiError, while an API error keeps the operator from acting on the job)."""
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
    estimate: EstimateStatus | None = None
    """Memory per GPU, batch size and time of the run, estimated after prepare, before any GPU is held."""
    run: int = 1
    """Run number; increases when a finished job's spec changes."""
    runs: list[RunRecord] = Field(default_factory=list)
    """Earlier runs of this FineTuneJob (latest last, at most 10)."""
    start_time: str | None = None
    """When the current run started."""
    completion_time: str | None = None
    """When the current run ended."""
    playground: PlaygroundStatus | None = None
    """The playground (spec.playground): its URL and state."""
