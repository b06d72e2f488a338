"""`FineTuneJob.spec`: what a user writes. The CRD in crds/ is generated from these models."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from .base import NON_BLANK, ApiModel, DnsLabel, Quantity, Uri, cel, rules

STAGES = ("prepare", "search", "train", "evaluate", "export")
Stage = Literal["prepare", "search", "train", "evaluate", "export"]
Metric = Literal["perplexity", "bleu", "rouge1", "rouge2", "rougeL", "exactMatch", "rewardAccuracy"]
GENERATION_METRICS = ("bleu", "rouge1", "rouge2", "rougeL", "exactMatch")
# Which metrics each objective's model can be scored by (the README's "Evaluation metrics per objective").
METRICS_BY_OBJECTIVE: dict[str, tuple[str, ...]] = {
    "sft": ("perplexity", *GENERATION_METRICS),
    "dpo": ("perplexity", *GENERATION_METRICS),  # perplexity and references: the chosen answers
    "grpo": ("perplexity", *GENERATION_METRICS),
    "reward": ("rewardAccuracy",),  # a sequence classifier: it scores pairs, it neither predicts tokens nor generates
}

# Which roles `spec.dataset.columns` may map, per format. The value of each role is the data's column name.
COLUMN_ROLES: dict[str, tuple[str, ...]] = {
    "text": ("text",),
    "completion": ("prompt", "input", "completion", "system"),
    "chat": ("messages", "role", "content", "system"),
    "preference": ("prompt", "chosen", "rejected", "system"),
}


def _roles_rule() -> str:
    allowed = ", ".join(f"'{fmt}': [{', '.join(repr(r) for r in roles)}]" for fmt, roles in COLUMN_ROLES.items())
    return f"self.columns.all(k, k in {{{allowed}}}[self.format])"


class SecretKeyRef(ApiModel):
    """A Secret in the FineTuneJob's namespace. Its value is mounted into the stage pods, never copied into status."""

    name: DnsLabel
    """Name of the Secret."""
    key: Annotated[str, Field(max_length=253)] | None = None
    """Key inside the Secret. Given: its value becomes the token for the source (HF_TOKEN for hf://).
    Left out: every key of the Secret becomes an environment variable (e.g. AWS_ACCESS_KEY_ID for s3://)."""


class Credentials(ApiModel):
    """Credentials for a private model, dataset or bucket."""

    secret_ref: SecretKeyRef
    """The Secret holding the credentials."""


class TokenizerSpec(ApiModel):
    """Where the tokenizer comes from when it is not the model's own, and how chats are rendered."""

    source: Uri | None = None
    """Tokenizer location (same URI schemes as spec.model.source). Default: the model's own tokenizer."""
    revision: Annotated[str, Field(max_length=256)] | None = None
    """Branch, tag or commit of the tokenizer source (hf:// only)."""
    chat_template: Annotated[str, Field(max_length=65536)] | None = None
    """Jinja chat template used for the chat format, overriding the tokenizer's own."""


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    source: Uri
    """hf://org/name, s3://bucket/prefix, gs://bucket/prefix, pvc://CLAIM/path, or file:///abs/path (local mode)."""
    revision: Annotated[str, Field(max_length=256)] | None = None
    """Branch, tag or commit of an hf:// model. Pin a commit for reproducible runs."""
    trust_remote_code: bool = False
    """Run custom modelling code shipped with the model. Only for sources you trust."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Weights dtype when loading the base model (auto: the checkpoint's own)."""
    tokenizer: TokenizerSpec | None = None
    """Tokenizer and chat template settings."""
    credentials: Credentials | None = None
    """Secret with a hub token or bucket keys for a private model."""


class CleaningSpec(ApiModel):
    """Row cleaning done in the prepare stage, before any GPU is requested."""

    model_config = rules(
        cel(
            "!has(self.minTokens) || !has(self.maxTokens) || self.minTokens <= self.maxTokens",
            "minTokens must not exceed maxTokens: lower spec.dataset.cleaning.minTokens or raise maxTokens",
            ".minTokens",
        )
    )

    deduplicate: bool = True
    """Drop exact duplicate rows (after normalisation)."""
    drop_empty: bool = True
    """Drop rows whose text or target is empty or whitespace only."""
    min_tokens: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    """Drop rows shorter than this many tokens."""
    max_tokens: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    """Drop rows longer than this many tokens (otherwise they are truncated to maxSeqLength)."""
    normalize_unicode: Literal["NFC", "NFKC", "none"] = "NFC"
    """Unicode normalisation applied to every text field."""


class DatasetSpec(ApiModel):
    """Training data: where it is, its format and how its columns map to the format's roles."""

    model_config = rules(
        cel(
            "!(has(self.evalSource) && has(self.validationFraction))",
            "set either evalSource or validationFraction, not both",
            ".validationFraction",
        ),
        cel(
            _roles_rule(),
            "columns maps roles of the format to column names; roles allowed: text: [text]; completion: "
            "[prompt, input, completion, system]; chat: [messages, role, content, system]; "
            "preference: [prompt, chosen, rejected, system]",
            ".columns",
        ),
        cel(
            "!(self.packing && self.format == 'preference')",
            "preference pairs cannot be packed: set spec.dataset.packing: false",
            ".packing",
        ),
    )

    source: Uri
    """File or directory of jsonl/json/csv/parquet/txt files, or hf://org/dataset (a Hub dataset)."""
    format: Literal["text", "completion", "chat", "preference"]
    """text: plain text; completion: prompt + completion (Alpaca); chat: a list of messages (OpenAI, ShareGPT);
    preference: prompt + chosen + rejected (DPO, reward models)."""
    columns: Annotated[dict[str, Annotated[str, Field(max_length=256, pattern=NON_BLANK)]], Field(max_length=8)] = (
        Field(default_factory=dict)
    )
    """Role -> column name, e.g. {prompt: instruction, input: input, completion: output} for Alpaca or
    {messages: conversations, role: from, content: value} for ShareGPT. Roles not given use the role's own name."""
    split: Annotated[str, Field(max_length=128)] = "train"
    """Split to read from a Hub dataset or a directory with split files."""
    eval_source: Uri | None = None
    """Separate evaluation data in the same format. Default: hold out validationFraction of the training rows."""
    validation_fraction: Annotated[float, Field(gt=0, lt=0.5)] | None = None
    """Share of rows held out for evaluation when evalSource is not set (the prepare stage uses 0.05 if unset)."""
    max_seq_length: Annotated[int, Field(ge=16, le=131072)] = 1024
    """Maximum tokens per training sequence; longer rows are truncated (and counted in the preflight report)."""
    packing: bool = False
    """Pack several short rows into each sequence to avoid padding waste."""
    max_rows: Annotated[int, Field(ge=1)] | None = None
    """Use only the first N rows (after cleaning); handy for a trial run."""
    cleaning: CleaningSpec = Field(default_factory=CleaningSpec)
    """Cleaning rules."""
    credentials: Credentials | None = None
    """Secret with a hub token or bucket keys for private data."""


class LoraSpec(ApiModel):
    """LoRA adapter settings (used by method types lora and qlora)."""

    model_config = rules(
        cel(
            "!('all-linear' in self.targetModules) || size(self.targetModules) == 1",
            "'all-linear' already selects every linear layer; list it alone or name modules instead",
            ".targetModules",
        )
    )

    r: Annotated[int, Field(ge=1, le=1024)] = 16
    """Rank of the LoRA update matrices."""
    alpha: Annotated[int, Field(ge=1, le=4096)] = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    """Dropout on the LoRA input."""
    target_modules: Annotated[list[Annotated[str, Field(max_length=128)]], Field(min_length=1, max_length=64)] = Field(
        default_factory=lambda: ["all-linear"]
    )
    """Module names to adapt (e.g. q_proj, v_proj), or all-linear for every linear layer but the output head."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained."""
    modules_to_save: Annotated[list[Annotated[str, Field(max_length=128)]], Field(max_length=16)] = Field(
        default_factory=list
    )
    """Extra modules trained in full and saved with the adapter (e.g. embed_tokens after adding tokens)."""


class QuantizationSpec(ApiModel):
    """bitsandbytes quantization of the frozen base model (QLoRA)."""

    bits: Literal[4, 8] = 4
    """4-bit (QLoRA) or 8-bit base weights."""
    type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""
    double_quant: bool = True
    """Quantize the quantization constants too (saves about 0.4 bits per parameter)."""
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """dtype of the matrix multiplications on dequantized weights."""


class MethodSpec(ApiModel):
    """How the weights are updated."""

    model_config = rules(
        cel(
            "self.type != 'qlora' || has(self.quantization)",
            "method type qlora needs a quantization block: add spec.method.quantization (e.g. bits: 4, type: nf4)",
            ".quantization",
            "FieldValueRequired",
        ),
        cel(
            "!has(self.quantization) || self.type == 'qlora'",
            "quantization is only used by method type qlora: set spec.method.type: qlora or remove quantization",
            ".quantization",
        ),
    )

    type: Literal["lora", "qlora", "full"] = "lora"
    """lora: train a LoRA adapter; qlora: LoRA on a 4/8-bit quantized base; full: update every weight."""
    lora: LoraSpec = Field(default_factory=LoraSpec)
    """LoRA settings (ignored by type full)."""
    quantization: QuantizationSpec | None = None
    """Base model quantization; required by qlora."""


class DpoSpec(ApiModel):
    """Direct Preference Optimization settings."""

    beta: Annotated[float, Field(gt=0, le=10)] = 0.1
    """Strength of the KL penalty towards the reference model."""
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    """DPO loss variant."""
    max_prompt_length: Annotated[int, Field(ge=1, le=131072)] | None = None
    """Truncate prompts to this many tokens (default: half of maxSeqLength)."""


class GrpoRewardSpec(ApiModel):
    """The reward GRPO optimises."""

    model_config = rules(
        cel(
            "self.type != 'rewardModel' || has(self.source)",
            "reward type rewardModel needs source: the reward model's URI",
            ".source",
            "FieldValueRequired",
        )
    )

    type: Literal["exactMatch", "contains", "rewardModel"] = "exactMatch"
    """exactMatch: 1 when the completion equals the dataset's completion column (normalised), else 0;
    contains: 1 when it contains it; rewardModel: the score of a sequence-classification reward model."""
    source: Uri | None = None
    """Reward model location, for type rewardModel."""


class GrpoSpec(ApiModel):
    """Group Relative Policy Optimization settings."""

    reward: GrpoRewardSpec = Field(default_factory=GrpoRewardSpec)
    """The reward function."""
    num_generations: Annotated[int, Field(ge=2, le=64)] = 4
    """Completions sampled per prompt; batchSize must be a multiple of it."""
    max_completion_length: Annotated[int, Field(ge=1, le=32768)] = 64
    """Maximum tokens per sampled completion."""
    temperature: Annotated[float, Field(gt=0, le=2)] = 1.0
    """Sampling temperature."""
    beta: Annotated[float, Field(ge=0, le=10)] = 0.0
    """KL coefficient towards the reference model (0 skips loading a reference model)."""


class TrainingSpec(ApiModel):
    """The training loop."""

    model_config = rules(
        cel(
            "!(has(self.epochs) && has(self.maxSteps))",
            "set at most one of spec.training.epochs or spec.training.maxSteps (neither: one epoch)",
            ".epochs",
        ),
        cel(
            "!has(self.dpo) || self.objective == 'dpo'",
            "the dpo block is only used by objective dpo: set objective: dpo or remove it",
            ".dpo",
        ),
        cel(
            "self.objective != 'grpo' || has(self.grpo)",
            "objective grpo needs a grpo block with its reward (e.g. grpo: {reward: {type: exactMatch}})",
            ".grpo",
            "FieldValueRequired",
        ),
        cel(
            "!has(self.grpo) || self.objective == 'grpo'",
            "the grpo block is only used by objective grpo: set objective: grpo or remove it",
            ".grpo",
        ),
        cel(
            "!has(self.grpo) || type(self.batchSize) == string || self.batchSize % self.grpo.numGenerations == 0",
            "batchSize must be a multiple of grpo.numGenerations (each prompt is sampled numGenerations times)",
            ".batchSize",
        ),
        cel(
            "type(self.batchSize) == string ? self.batchSize == 'auto' "
            ": (self.batchSize >= 1 && self.batchSize <= 4096)",
            "batchSize is a number of sequences from 1 to 4096, or auto",
            ".batchSize",
        ),
        cel(
            "type(self.batchSize) != string || has(self.effectiveBatchSize)",
            "batchSize: auto needs effectiveBatchSize, the sequences per optimizer step it keeps (e.g. 32)",
            ".effectiveBatchSize",
            "FieldValueRequired",
        ),
        cel(
            "!has(self.grpo) || type(self.batchSize) != string",
            "GRPO samples numGenerations completions per prompt: give batchSize as a number, not auto",
            ".batchSize",
        ),
    )

    objective: Literal["sft", "dpo", "reward", "grpo"] = "sft"
    """sft: supervised fine-tuning; dpo: preference optimisation; reward: train a reward model on preference
    pairs; grpo: reinforcement learning with a reward function."""
    epochs: Annotated[float, Field(gt=0, le=1000)] | None = None
    """Passes over the training data (fractions allowed). At most one of epochs and maxSteps; neither: 1 epoch."""
    max_steps: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    """Optimizer steps to run (instead of epochs). At most one of epochs and maxSteps."""
    learning_rate: Annotated[float, Field(gt=0, le=1)] = 2e-4
    """Peak learning rate."""
    batch_size: Annotated[
        Annotated[int, Field(ge=1, le=4096)] | Literal["auto"],
        Field(json_schema_extra={"x-kubernetes-int-or-string": True}),
    ] = 4
    """Sequences per device per micro-batch (1-4096), or auto: the largest micro-batch the memory estimate fits on
    the GPU (spec.resources.gpuMemory or a known GPU in the node selector), with gradient accumulation raised to
    keep effectiveBatchSize."""
    effective_batch_size: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    """Sequences per optimizer step over all GPUs (micro-batch x gradient accumulation x GPUs). Required by
    batchSize: auto; with a numeric batchSize it sets gradientAccumulationSteps to keep this batch. The train
    stage keeps it when it recovers from out-of-memory by halving the micro-batch."""
    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=4096)] = 1
    """Micro-batches per optimizer step."""
    warmup_ratio: Annotated[float, Field(ge=0, lt=1)] = 0.03
    """Share of the steps spent warming the learning rate up."""
    lr_scheduler: Literal[
        "linear", "cosine", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial"
    ] = "cosine"
    """Learning-rate schedule after warm-up."""
    weight_decay: Annotated[float, Field(ge=0, le=1)] = 0.0
    """AdamW weight decay."""
    max_grad_norm: Annotated[float, Field(ge=0, le=1000)] = 1.0
    """Gradient clipping norm (0 disables clipping)."""
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "paged_adamw_8bit", "adafactor", "sgd"] = "adamw_torch"
    """Optimizer (paged_adamw_8bit needs bitsandbytes and a GPU)."""
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 42
    """Seed for data order, splits and initialisation."""
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """Mixed precision. auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    checkpoint_every_steps: Annotated[int, Field(ge=1, le=1_000_000)] = 100
    """Save a resumable checkpoint every N optimizer steps."""
    keep_checkpoints: Annotated[int, Field(ge=1, le=100)] = 2
    """Checkpoints kept on the workspace (older ones are deleted)."""
    logging_steps: Annotated[int, Field(ge=1, le=100_000)] = 10
    """Report progress (one JSON line, and status.progress) every N steps."""
    dpo: DpoSpec | None = None
    """DPO settings (objective dpo)."""
    grpo: GrpoSpec | None = None
    """GRPO settings (objective grpo; required there)."""


class StageResources(ApiModel):
    """CPU and memory for one stage's pods (requests = limits)."""

    cpu: Quantity | None = None
    """CPU, e.g. "4" or "500m"."""
    memory: Quantity | None = None
    """Memory, e.g. "32Gi"."""


class ResourcesSpec(ApiModel):
    """Compute for the stages. prepare and export never request GPUs."""

    workers: Annotated[int, Field(ge=1, le=256)] = 1
    """Pods in the train stage (nodes, for multi-node training)."""
    gpus_per_worker: Annotated[int, Field(ge=0, le=16)] = 1
    """GPUs each train (and evaluate) pod requests; one training process per GPU."""
    gpu_resource_name: Annotated[str, Field(pattern=r"^[a-z0-9.\-]+/[a-z0-9.\-_]+$", max_length=253)] = "nvidia.com/gpu"
    """Extended resource name of the GPUs (e.g. nvidia.com/gpu, amd.com/gpu, or a MIG profile)."""
    gpu_memory: Quantity | None = None
    """Memory of one GPU (e.g. 80Gi, or 40Gi for a MIG slice). With it, or a known GPU product (H100, H200, A100,
    L40S, L4) in spec.scheduling.nodeSelector, the operator refuses a run whose memory estimate does not fit before
    any GPU is held, and batchSize: auto can size the micro-batch."""
    prepare: StageResources | None = None
    """Overrides for the prepare stage."""
    search: StageResources | None = None
    """Overrides for the search stage (GPUs as for train: gpusPerWorker)."""
    train: StageResources | None = None
    """Overrides for the train stage (per worker)."""
    evaluate: StageResources | None = None
    """Overrides for the evaluate stage."""
    export: StageResources | None = None
    """Overrides for the export stage."""


class DistributedSpec(ApiModel):
    """Data parallelism across GPUs and workers."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    """ddp: every GPU holds a replica; fsdp: parameters, gradients and optimizer state are sharded."""
    master_port: Annotated[int, Field(ge=1024, le=65535)] = 29500
    """Rendezvous port on worker 0."""
    collective_timeout_seconds: Annotated[int, Field(ge=30, le=86_400)] = 300
    """How long a collective (all-reduce, barrier) may wait for a peer before the worker fails, so a hung or
    lost worker becomes a restart of all workers from the last checkpoint instead of a 30-minute hang."""


class Toleration(ApiModel):
    """A Kubernetes toleration, passed through to the stage pods."""

    key: Annotated[str, Field(max_length=316)] | None = None
    """Taint key the toleration matches (empty with operator Exists: every taint)."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (default Equal)."""
    value: Annotated[str, Field(max_length=63)] | None = None
    """Taint value, for operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect matched (empty: all effects)."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class GangSpec(ApiModel):
    """All-or-nothing scheduling of the train workers through Volcano."""

    scheduler: Literal["volcano"] = "volcano"
    """The gang scheduler."""
    queue: DnsLabel | None = None
    """Volcano queue for the PodGroup."""


class SchedulingSpec(ApiModel):
    """Where and when the stage pods run."""

    model_config = rules(
        cel(
            "!(has(self.queueName) && has(self.gang))",
            "use either Kueue (queueName) or Volcano gang scheduling (gang), not both",
            ".gang",
        )
    )

    queue_name: DnsLabel | None = None
    """Kueue LocalQueue for the GPU stages (train, evaluate)."""
    cpu_queue_name: DnsLabel | None = None
    """Kueue LocalQueue for the CPU stages (prepare, export). Default: none (not queued)."""
    priority_class_name: DnsLabel | None = None
    """PriorityClass of the stage pods."""
    node_selector: Annotated[dict[str, Annotated[str, Field(max_length=63)]], Field(max_length=32)] = Field(
        default_factory=dict
    )
    """Node labels the stage pods require."""
    tolerations: Annotated[list[Toleration], Field(max_length=32)] = Field(default_factory=list)
    """Tolerations of the stage pods (e.g. for tainted GPU nodes)."""
    affinity: dict[str, Any] | None = None
    """A Kubernetes affinity block, passed through to the stage pods."""
    gang: GangSpec | None = None
    """Volcano gang scheduling for the train stage."""


class GenerationSpec(ApiModel):
    """Decoding used by generation-based metrics."""

    max_new_tokens: Annotated[int, Field(ge=1, le=8192)] = 64
    """Tokens generated per sample."""
    temperature: Annotated[float, Field(ge=0, le=2)] = 0.0
    """0: greedy decoding; above 0: sampling."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Nucleus sampling threshold (with temperature > 0)."""


class GateSpec(ApiModel):
    """A quality gate: export runs only if every gate passes."""

    model_config = rules(
        cel("has(self.min) || has(self.max)", "a gate needs min or max (or both)", ".min", "FieldValueRequired"),
        cel(
            "!has(self.min) || !has(self.max) || self.min <= self.max",
            "a gate's min must not exceed its max",
            ".min",
        ),
    )

    metric: Metric
    """The tuned model's metric the gate checks (it must be listed in spec.evaluation.metrics)."""
    min: float | None = None
    """Lowest acceptable value."""
    max: float | None = None
    """Highest acceptable value (e.g. for perplexity)."""


class EvaluationSpec(ApiModel):
    """The evaluate stage."""

    model_config = rules(
        cel(
            "self.gates.all(g, g.metric in self.metrics)",
            "every gate's metric must also be listed in spec.evaluation.metrics",
            ".gates",
        ),
        cel(
            "self.enabled || size(self.gates) == 0",
            "gates need evaluation: set spec.evaluation.enabled: true or remove the gates",
            ".gates",
        ),
    )

    enabled: bool = True
    """Run the evaluate stage."""
    metrics: Annotated[
        list[Metric], Field(min_length=1, max_length=7, json_schema_extra={"x-kubernetes-list-type": "set"})
    ] = Field(default_factory=lambda: ["perplexity"])
    """Metrics to compute on the eval split: perplexity, bleu, rouge1, rouge2, rougeL, exactMatch (objectives sft,
    dpo, grpo); rewardAccuracy (objective reward, which is always scored by it)."""
    max_samples: Annotated[int, Field(ge=1, le=1_000_000)] = 200
    """Eval rows used (generation-based metrics are the slow ones)."""
    compare_base: bool = True
    """Also evaluate the base model, so status shows the gain."""
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    """Decoding for bleu, rouge and exactMatch."""
    gates: Annotated[list[GateSpec], Field(max_length=16)] = Field(default_factory=list)
    """Quality gates; a failed gate fails the job with reason GateFailed and export does not run."""


class OnnxSpec(ApiModel):
    """ONNX export through Optimum."""

    opset: Annotated[int, Field(ge=14, le=23)] | None = None
    """ONNX opset (default: Optimum's choice for the architecture)."""
    quantize: Literal["none", "dynamic-int8"] = "none"
    """Dynamic int8 quantisation of the exported graph."""
    tolerance: Annotated[float, Field(gt=0, le=1)] = 1e-3
    """Largest absolute difference allowed between ONNX and PyTorch logits in the export check."""


class BatchingSpec(ApiModel):
    """Dynamic batching hints for the serving runtime."""

    model_config = rules(
        cel(
            "self.preferredBatchSizes.all(b, b <= self.maxBatchSize)",
            "preferredBatchSizes must not exceed maxBatchSize",
            ".preferredBatchSizes",
        )
    )

    max_batch_size: Annotated[int, Field(ge=1, le=4096)] = 8
    """Largest batch the server forms."""
    preferred_batch_sizes: Annotated[list[Annotated[int, Field(ge=1)]], Field(max_length=16)] = Field(
        default_factory=list
    )
    """Batch sizes the server prefers to form."""
    max_queue_delay_microseconds: Annotated[int, Field(ge=0, le=10_000_000)] = 100
    """How long a request may wait for a batch to fill."""


class ServingSpec(ApiModel):
    """A serving configuration written next to the artifacts."""

    runtime: Literal["triton", "kserve"]
    """triton: a Triton model repository for the ONNX model; kserve: an InferenceService manifest."""
    name: DnsLabel | None = None
    """Served model name (default: the FineTuneJob's name)."""
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    """Batching hints."""


class ExportSpec(ApiModel):
    """The export stage."""

    model_config = rules(
        cel(
            "!has(self.onnx) || 'onnx' in self.formats",
            "onnx options are set but 'onnx' is not in spec.export.formats: add it or remove spec.export.onnx",
            ".onnx",
        ),
        cel(
            "!has(self.serving) || self.serving.runtime != 'triton' || 'onnx' in self.formats",
            "serving runtime triton serves the ONNX model: add 'onnx' to spec.export.formats",
            ".formats",
        ),
        cel(
            "!has(self.serving) || self.serving.runtime != 'kserve' || 'merged' in self.formats "
            "|| 'onnx' in self.formats",
            "serving runtime kserve needs a full model: add 'merged' (or 'onnx') to spec.export.formats",
            ".formats",
        ),
    )

    formats: Annotated[
        list[Literal["adapter", "merged", "onnx"]],
        Field(min_length=1, max_length=3, json_schema_extra={"x-kubernetes-list-type": "set"}),
    ] = Field(default_factory=lambda: ["merged"])
    """adapter: the PEFT adapter directory; merged: adapter merged into the base model (safetensors);
    onnx: the merged model exported to ONNX with past key values."""
    onnx: OnnxSpec | None = None
    """ONNX options."""
    serving: ServingSpec | None = None
    """Serving configuration to write."""


class OutputSpec(ApiModel):
    """Where the artifacts land."""

    uri: Uri
    """pvc://CLAIM/path, s3://bucket/prefix, gs://bucket/prefix, or a local path (local mode)."""
    credentials: Credentials | None = None
    """Secret with bucket keys for s3:// or gs://."""


class WorkspaceSpec(ApiModel):
    """The volume the stages share (downloaded model, prepared data, checkpoints)."""

    model_config = rules(
        cel(
            "has(self.claimName) != has(self.size)",
            "set exactly one of claimName (an existing PVC) or size (a PVC the operator creates)",
            ".claimName",
        )
    )

    claim_name: DnsLabel | None = None
    """An existing PersistentVolumeClaim in the job's namespace."""
    size: Quantity | None = None
    """Size of a PVC the operator creates and deletes with the job."""
    storage_class_name: Annotated[str, Field(max_length=253)] | None = None
    """StorageClass of the created PVC."""
    access_modes: Annotated[
        list[Literal["ReadWriteOnce", "ReadWriteMany", "ReadWriteOncePod"]],
        Field(min_length=1, max_length=3, json_schema_extra={"x-kubernetes-list-type": "set"}),
    ] = Field(default_factory=lambda: ["ReadWriteOnce"])
    """Access modes of the created PVC; multi-node training needs ReadWriteMany."""


class StorageSpec(ApiModel):
    """Shared storage of the stages."""

    workspace: WorkspaceSpec | None = None
    """Default: the operator creates a 100Gi ReadWriteOnce PVC."""


class EnvVar(ApiModel):
    """An extra environment variable for the stage containers."""

    name: Annotated[str, Field(pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256)]
    """Variable name."""
    value: Annotated[str, Field(max_length=32768)] = ""
    """Variable value."""


class RunPolicy(ApiModel):
    """Retries, deadlines, suspension and clean-up."""

    suspend: bool = False
    """Stop the active stage (finished stages are kept) until set back to false."""
    backoff_limit: Annotated[int, Field(ge=0, le=20)] = 2
    """Retries of each stage before it fails. A train retry restarts all workers from the newest complete
    checkpoint. Preemptions and evictions (SIGTERM, DisruptionTarget) do not count; config errors (exit 3), failed
    gates (4) and bugs (5) are never retried."""
    termination_grace_period_seconds: Annotated[int, Field(ge=5, le=86_400)] = 300
    """The stage pods' terminationGracePeriodSeconds: on SIGTERM (preemption, eviction, spot reclaim) training
    finishes its step and saves a checkpoint at the same step on every worker within this time."""
    active_deadline_seconds: Annotated[int, Field(ge=1)] | None = None
    """Fail the whole run when it has been active this long."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    """Delete the stage Jobs and the created workspace this long after the run finished."""


class PlaygroundResources(ApiModel):
    """Compute for the playground pod (requests; memory is also the limit)."""

    cpu: Quantity | None = None
    """CPU, e.g. "2" (default 2)."""
    memory: Quantity | None = None
    """Memory, e.g. "8Gi" (default 8Gi): room for the base and the tuned model side by side."""
    gpus: Annotated[int, Field(ge=0, le=8)] = 0
    """GPUs (spec.resources.gpuResourceName); 0 runs both models on CPU."""


class PlaygroundSpec(ApiModel):
    """A Gradio app that puts the base and the tuned model side by side, run on the exported artifacts."""

    enabled: bool = False
    """Run the playground (a Deployment and a ClusterIP Service) once the export succeeded."""
    ttl_seconds_after_finished: Annotated[int, Field(ge=0)] | None = None
    """Remove the playground this long after the run finished (default: it stays until the job is deleted)."""
    tuned: Literal["auto", "merged", "adapter", "onnx"] = "auto"
    """Which exported artifact the tuned side loads (auto: merged, else adapter, else onnx)."""
    resources: PlaygroundResources = Field(default_factory=PlaygroundResources)
    """CPU, memory and GPUs of the playground pod."""


SearchParameterName = Literal["learningRate", "warmupRatio", "weightDecay", "lora.r", "lora.alpha"]
SearchMetric = Literal["evalLoss", "perplexity", "bleu", "rouge1", "rouge2", "rougeL", "exactMatch", "rewardAccuracy"]
# Metrics where lower is better; the others are maximised unless spec.search.objective.direction says otherwise.
LOWER_IS_BETTER = ("evalLoss", "perplexity")
# The range each searchable parameter may take (the same bounds as the spec fields they override).
SEARCH_LIMITS: dict[str, tuple[float, float]] = {
    "learningRate": (1e-8, 1.0),
    "warmupRatio": (0.0, 0.99),
    "weightDecay": (0.0, 1.0),
    "lora.r": (1, 1024),
    "lora.alpha": (1, 4096),
}


def _limits_rule() -> str:
    return " && ".join(
        f"(self.name != '{name}' || (self.min >= {float(low)!r} && self.max <= {float(high)!r}))"
        for name, (low, high) in SEARCH_LIMITS.items()
    )


class SearchParameter(ApiModel):
    """One hyper-parameter to search and its range."""

    model_config = rules(
        cel("self.min < self.max", "min must be below max", ".max"),
        cel(
            "self.scale != 'log' || self.min > 0.0",
            "a log-scale range must start above 0: raise min or use scale: linear",
            ".min",
        ),
        cel(
            _limits_rule(),
            "the range lies outside what the parameter allows: learningRate (0, 1], warmupRatio [0, 0.99], "
            "weightDecay [0, 1], lora.r [1, 1024], lora.alpha [1, 4096]",
            ".max",
        ),
    )

    name: SearchParameterName
    """The spec field the search sets: learningRate, warmupRatio, weightDecay (spec.training) or lora.r,
    lora.alpha (spec.method.lora; rounded to whole numbers)."""
    min: float
    """Lowest value tried."""
    max: float
    """Highest value tried."""
    scale: Literal["log", "linear"] = "log"
    """log searches the exponent (right for learning rates and ranks); linear the value itself."""


class SearchObjective(ApiModel):
    """What a trial is scored by, on the eval split after its short training."""

    metric: SearchMetric = "evalLoss"
    """evalLoss (the objective's loss on the eval rows), perplexity, a generation metric (bleu, rouge1, rouge2,
    rougeL, exactMatch) or rewardAccuracy (objective reward)."""
    direction: Literal["minimize", "maximize"] | None = None
    """Default: minimize for evalLoss and perplexity, maximize for the others."""


class SearchSpec(ApiModel):
    """Hyper-parameter search with SciPy before the main train stage: short trials on the prepared data."""

    model_config = rules(
        cel(
            "self.parameters.all(p, self.parameters.exists_one(q, q.name == p.name))",
            "each parameter may be listed once",
            ".parameters",
        ),
        cel(
            "!has(self.trialEpochs) || !has(self.trialSteps)",
            "give the trial length as trialSteps or as trialEpochs, not both",
            ".trialEpochs",
        ),
    )

    parameters: Annotated[list[SearchParameter], Field(min_length=1, max_length=5)]
    """The parameters to search (1 to 5)."""
    trials: Annotated[int, Field(ge=2, le=32)] = 8
    """The trial budget: how many short training runs the search may make."""
    trial_steps: Annotated[int, Field(ge=1, le=100_000)] | None = None
    """Optimizer steps per trial (default 50 when trialEpochs is not given)."""
    trial_epochs: Annotated[float, Field(gt=0, le=10)] | None = None
    """Trial length as a fraction of an epoch of the trial data, instead of trialSteps."""
    max_train_rows: Annotated[int, Field(ge=1, le=10_000_000)] = 2000
    """Training rows a trial draws from (the first rows of the prepared, shuffled train split)."""
    max_eval_rows: Annotated[int, Field(ge=1, le=1_000_000)] = 200
    """Eval rows a trial is scored on."""
    objective: SearchObjective = Field(default_factory=SearchObjective)
    """What the search optimises."""


class FineTuneJobSpec(ApiModel):
    """A fine-tuning run: base model, data, method, training, evaluation and export."""

    model_config = rules(
        cel(
            "self.method.type != 'qlora' || self.resources.gpusPerWorker >= 1",
            "method type qlora needs GPUs: set spec.resources.gpusPerWorker to 1 or more",
            ".resources.gpusPerWorker",
        ),
        cel(
            "!(self.training.objective in ['dpo', 'reward']) || self.dataset.format == 'preference'",
            "objectives dpo and reward train on preference pairs: set spec.dataset.format: preference "
            "(columns prompt, chosen, rejected)",
            ".dataset.format",
        ),
        cel(
            "self.dataset.format != 'preference' || self.training.objective in ['dpo', 'reward']",
            "preference data is for objectives dpo or reward: set spec.training.objective accordingly",
            ".training.objective",
        ),
        cel(
            "self.training.objective != 'grpo' || self.dataset.format in ['completion', 'chat']",
            "objective grpo samples from prompts: use spec.dataset.format completion or chat",
            ".dataset.format",
        ),
        cel(
            "self.dataset.format != 'text' || !has(self.evaluation) "
            "|| self.evaluation.metrics.all(m, m == 'perplexity')",
            "bleu, rouge and exactMatch compare generations with references, which text data has none of: "
            "use format completion or chat, or evaluate perplexity only",
            ".evaluation.metrics",
        ),
        cel(
            "self.training.objective != 'reward' || !has(self.evaluation) "
            "|| self.evaluation.metrics.all(m, m in ['perplexity', 'rewardAccuracy'])",
            "a reward model scores pairs and does not generate: objective reward is evaluated by rewardAccuracy "
            "(set spec.evaluation.metrics: [rewardAccuracy])",
            ".evaluation.metrics",
        ),
        cel(
            "self.training.objective == 'reward' || !has(self.evaluation) "
            "|| !('rewardAccuracy' in self.evaluation.metrics)",
            "rewardAccuracy scores a reward model's pairs: it applies to objective reward only",
            ".evaluation.metrics",
        ),
        cel(
            "self.method.type != 'full' || !has(self.export) || !('adapter' in self.export.formats)",
            "a full fine-tune has no adapter to export: use formats merged or onnx",
            ".export.formats",
        ),
        cel(
            "!(has(self.distributed) && self.distributed.strategy == 'fsdp' && self.method.type == 'qlora')",
            "FSDP with QLoRA is not supported: use spec.distributed.strategy: ddp",
            ".distributed.strategy",
        ),
        cel(
            "!has(self.training.dpo) || !has(self.training.dpo.maxPromptLength) "
            "|| self.training.dpo.maxPromptLength < self.dataset.maxSeqLength",
            "spec.training.dpo.maxPromptLength must be less than spec.dataset.maxSeqLength, to leave room for the "
            "responses",
            ".training.dpo.maxPromptLength",
        ),
        cel(
            "!has(self.training.grpo) || self.training.grpo.maxCompletionLength < self.dataset.maxSeqLength",
            "spec.training.grpo.maxCompletionLength must be less than spec.dataset.maxSeqLength, to leave room for "
            "the prompt",
            ".training.grpo.maxCompletionLength",
        ),
        cel(
            "self.training.optimizer != 'paged_adamw_8bit' || self.resources.gpusPerWorker >= 1",
            "optimizer paged_adamw_8bit needs GPUs: use adamw_torch on CPU workers, or set "
            "spec.resources.gpusPerWorker",
            ".training.optimizer",
        ),
        cel(
            "!has(self.search) || self.method.type != 'full' || "
            "self.search.parameters.all(p, !p.name.startsWith('lora.'))",
            "lora.r and lora.alpha are searched only for method types lora and qlora",
            ".search.parameters",
        ),
        cel(
            "!has(self.search) || self.training.objective != 'grpo'",
            "search scores trials on the eval split, which grpo has no loss for: remove spec.search for grpo",
            ".search",
        ),
        cel(
            "!has(self.search) || !has(self.search.objective) || "
            "self.search.objective.metric != 'rewardAccuracy' || self.training.objective == 'reward'",
            "rewardAccuracy scores reward models: use it with spec.training.objective reward, or use evalLoss",
            ".search.objective.metric",
        ),
        cel(
            "!has(self.search) || !has(self.search.objective) || "
            "!(self.search.objective.metric in ['bleu', 'rouge1', 'rouge2', 'rougeL', 'exactMatch', 'perplexity']) "
            "|| self.training.objective == 'sft'",
            "perplexity and generation metrics score sft trials; use evalLoss for dpo and reward",
            ".search.objective.metric",
        ),
        cel(
            "!has(self.search) || !has(self.search.objective) || "
            "!(self.search.objective.metric in ['bleu', 'rouge1', 'rouge2', 'rougeL', 'exactMatch']) "
            "|| self.dataset.format in ['completion', 'chat']",
            "generation metrics need references: use format completion or chat, or evalLoss",
            ".search.objective.metric",
        ),
        cel(
            "self.resources.workers == 1 || (has(self.storage) && has(self.storage.workspace) && "
            "(has(self.storage.workspace.claimName) || 'ReadWriteMany' in self.storage.workspace.accessModes))",
            "workers > 1 share one workspace across nodes: set spec.storage.workspace.claimName to a "
            "ReadWriteMany PVC, or accessModes: [ReadWriteMany] with size",
            ".storage.workspace",
        ),
    )

    model: ModelSpec
    """The base model."""
    dataset: DatasetSpec
    """The training (and evaluation) data."""
    method: MethodSpec = Field(default_factory=MethodSpec)
    """LoRA, QLoRA or full fine-tuning."""
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    """Objective and hyper-parameters (default: sft for one epoch)."""
    search: SearchSpec | None = None
    """Hyper-parameter search before training (a search stage between prepare and train); its best values
    replace the searched spec.training / spec.method.lora fields in the main run."""
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    """Workers, GPUs and per-stage CPU/memory."""
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    """DDP or FSDP."""
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    """Kueue queues, Volcano gang, priority and placement."""
    evaluation: EvaluationSpec = Field(default_factory=EvaluationSpec)
    """Metrics and quality gates."""
    export: ExportSpec = Field(default_factory=ExportSpec)
    """Artifact formats and serving configuration."""
    output: OutputSpec
    """Where artifacts land."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """The stages' shared workspace."""
    image: Annotated[str, Field(max_length=1024)] | None = None
    """Trainer image for the stage pods (default: the operator's configured trainer image)."""
    image_pull_secrets: Annotated[list[DnsLabel], Field(max_length=8)] = Field(default_factory=list)
    """Secrets for pulling the trainer image."""
    service_account_name: DnsLabel | None = None
    """ServiceAccount of the stage pods (e.g. for workload identity to a bucket). Its token is not mounted."""
    env: Annotated[list[EnvVar], Field(max_length=64)] = Field(default_factory=list)
    """Extra environment variables for every stage container."""
    run_policy: RunPolicy = Field(default_factory=RunPolicy)
    """Retries, deadline, suspension, clean-up."""
    playground: PlaygroundSpec | None = None
    """The playground: compare the base and the tuned model in a browser after export (not part of a run's
    identity: turning it on does not start a new run)."""
