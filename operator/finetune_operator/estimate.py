"""Memory and time of a fine-tune, per GPU, from the model's config.json and the spec: before any GPU is held.

Pure: standard library only (no torch, no pydantic), so the operator, the CLI and a bare GPU box can all import it.

The memory model counts what PyTorch keeps alive in the train stage as the operator runs it (see stages/train.py):
- weights: full fine-tunes keep fp32 master weights (bf16 autocast computes); LoRA loads the base in the compute
  dtype; QLoRA packs every decoder linear into 4 (or 8) bits plus its quantization state, and PEFT's
  prepare_model_for_kbit_training upcasts everything it did not quantize (embeddings, norms, lm_head) to fp32.
- LoRA adapters are fp32 (PEFT upcasts adapter weights), so are their gradients and AdamW states.
- activations are counted tensor by tensor from what autograd saves in a Llama-style or GPT-2 block (a frozen
  linear saves nothing for its weight; autocast saves a compute-dtype copy of each linear input), plus the
  logits and the loss' fp32 log-softmax, which dominate for large vocabularies.
- the optimizer step (torch's foreach AdamW) needs one temporary the size of its state.
Tests compare these terms with what torch allocates (tests/test_estimate.py); benchmarks/gpu_memory.py with
torch.cuda.max_memory_allocated on a GPU.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}

# Dense bf16 tensor-core peak FLOP/s (no sparsity), from the vendors' datasheets (SXM parts for H100/H200/A100).
GPU_PEAK_BF16 = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}
GPU_MEMORY_GIB = {"H200": 141, "H100": 80, "A100": 80, "L40S": 48, "L4": 24}
# Model FLOPs utilisation a fine-tune reaches: LoRA and short sequences sit at the low end, long full runs high.
MFU_RANGE = (0.25, 0.50)
# The GPU products as node labels name them (nvidia.com/gpu.product, cloud accelerator labels).
_GPU_PATTERNS = (
    ("H200", re.compile(r"h200", re.I)),
    ("H100", re.compile(r"h100", re.I)),
    ("A100", re.compile(r"a100", re.I)),
    ("L40S", re.compile(r"l40s", re.I)),
    ("L4", re.compile(r"(^|[^a-z0-9])(nvidia-)?l4($|[^0-9a-z])", re.I)),
)
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context + cuBLAS workspaces, outside torch's allocator
NCCL_BYTES = int(0.5 * GIB)  # NCCL communicator buffers when there is more than one process
FRAGMENTATION = 0.10  # caching-allocator slack on top of what tensors need


class EstimateError(ValueError):
    """The config or the spec cannot be estimated; the message names the field and the fix."""


# --------------------------------------------------------------------------------------------------- architecture


@dataclass(frozen=True)
class Linear:
    """One linear layer of a decoder block; `group` names linears that read the same input tensor."""

    name: str
    fan_in: int
    fan_out: int
    bias: bool = False
    group: str = ""
    copies: int = 1  # experts of a mixture-of-experts MLP


@dataclass(frozen=True)
class Architecture:
    """What the estimate needs from a model's config.json."""

    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    learned_positions: int = 0
    norm: str = "rms"  # rms | layer
    qk_norm: bool = False
    activation: str = "silu"  # silu (gated) | gelu_new | gelu
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    experts: int = 1
    experts_per_token: int = 1
    linears: tuple[Linear, ...] = ()
    checkpoint_dtype: str = "float32"

    # ----------------------------------------------------------------------------------------- parameters
    def norm_params(self) -> int:
        return self.hidden * (2 if self.norm == "layer" else 1)

    def layer_params(self) -> int:
        linear = sum(lin.copies * (lin.fan_in * lin.fan_out + (lin.fan_out if lin.bias else 0)) for lin in self.linears)
        return linear + 2 * self.norm_params() + (2 * self.head_dim if self.qk_norm else 0)

    def embedding_params(self) -> int:
        return self.vocab * self.hidden + self.learned_positions * self.hidden

    def head_params(self) -> int:
        return 0 if self.tied_embeddings else self.vocab * self.hidden

    def linear_params_per_layer(self) -> int:
        return sum(lin.copies * lin.fan_in * lin.fan_out for lin in self.linears)

    def parameters(self) -> int:
        return self.embedding_params() + self.layers * self.layer_params() + self.norm_params() + self.head_params()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Architecture:
        """Read a transformers config.json (Llama, Mistral, Mixtral, Qwen2/3, Gemma, Phi-3, GPT-2 and lookalikes)."""
        model_type = str(config.get("model_type", "")).lower()
        if model_type == "gpt2" or "n_embd" in config:
            return _gpt2(config)
        try:
            return _llama_like(config, model_type)
        except KeyError as missing:
            raise EstimateError(
                f"config.json of model_type {model_type or '?'} has no {missing.args[0]}: the estimate knows "
                "decoder-only Llama-, Mistral-, Qwen-, Gemma-, Phi-3- and GPT-2-style configs"
            ) from None


def _dtype_of(config: dict[str, Any]) -> str:
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return name if name in DTYPE_BYTES else "float32"


def _gpt2(config: dict[str, Any]) -> Architecture:
    hidden = int(config["n_embd"])
    inner = int(config.get("n_inner") or 4 * hidden)
    heads = int(config["n_head"])
    act = str(config.get("activation_function", "gelu_new"))
    linears = (
        Linear("c_attn", hidden, 3 * hidden, True, "ln_1"),
        Linear("c_proj", hidden, hidden, True, "attn_out"),
        Linear("c_fc", hidden, inner, True, "ln_2"),
        Linear("mlp.c_proj", inner, hidden, True, "mlp_act"),
    )
    return Architecture(
        model_type="gpt2",
        hidden=hidden,
        layers=int(config["n_layer"]),
        heads=heads,
        kv_heads=heads,
        head_dim=hidden // heads,
        intermediate=inner,
        vocab=int(config["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", True)),
        learned_positions=int(config.get("n_positions", 1024)),
        norm="layer",
        activation="gelu_new" if act == "gelu_new" else "gelu",
        attention_dropout=float(config.get("attn_pdrop", 0.1)),
        hidden_dropout=float(config.get("resid_pdrop", 0.1)),
        linears=linears,
        checkpoint_dtype=_dtype_of(config),
    )


def _llama_like(config: dict[str, Any], model_type: str) -> Architecture:
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    inter = int(config["intermediate_size"])
    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    qkv_bias = bool(config.get("attention_bias", False)) or model_type == "qwen2"
    o_bias = bool(config.get("attention_bias", False)) and model_type != "qwen2"
    mlp_bias = bool(config.get("mlp_bias", False))
    experts = int(config.get("num_local_experts") or config.get("num_experts") or 1)
    attn: tuple[Linear, ...]
    if model_type in ("phi3",):
        attn = (Linear("qkv_proj", hidden, q_out + 2 * kv_out, qkv_bias, "norm1"),)
        mlp: tuple[Linear, ...] = (
            Linear("gate_up_proj", hidden, 2 * inter, mlp_bias, "norm2"),
            Linear("down_proj", inter, hidden, mlp_bias, "mlp_act"),
        )
    else:
        attn = (
            Linear("q_proj", hidden, q_out, qkv_bias, "norm1"),
            Linear("k_proj", hidden, kv_out, qkv_bias, "norm1"),
            Linear("v_proj", hidden, kv_out, qkv_bias, "norm1"),
        )
        if experts > 1:  # Mixtral-style: a router plus w1 (gate), w3 (up), w2 (down) per expert
            mlp = (
                Linear("gate", hidden, experts, False, "norm2"),
                Linear("w1", hidden, inter, False, "norm2", experts),
                Linear("w3", hidden, inter, False, "norm2", experts),
                Linear("w2", inter, hidden, False, "mlp_act", experts),
            )
        else:
            mlp = (
                Linear("gate_proj", hidden, inter, mlp_bias, "norm2"),
                Linear("up_proj", hidden, inter, mlp_bias, "norm2"),
                Linear("down_proj", inter, hidden, mlp_bias, "mlp_act"),
            )
    linears = (*attn, Linear("o_proj", q_out, hidden, o_bias, "attn_out"), *mlp)
    return Architecture(
        model_type=model_type or "llama",
        hidden=hidden,
        layers=int(config["num_hidden_layers"]),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=inter,
        vocab=int(config["vocab_size"]),
        tied_embeddings=bool(config.get("tie_word_embeddings", model_type in ("gemma", "gemma2"))),
        qk_norm=model_type in ("qwen3", "qwen3_moe"),
        attention_dropout=float(config.get("attention_dropout", 0.0) or 0.0),
        experts=experts,
        experts_per_token=int(config.get("num_experts_per_tok") or 1),
        linears=linears,
        checkpoint_dtype=_dtype_of(config),
    )


def _llama(h: int, layers: int, heads: int, kv: int, inter: int, vocab: int, tied: bool, **extra: Any) -> dict:
    return {
        "model_type": "llama", "hidden_size": h, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "intermediate_size": inter, "vocab_size": vocab, "tie_word_embeddings": tied,
        "torch_dtype": "bfloat16", **extra,
    }  # fmt: skip


# config.json essentials of common base models, for remote sources the estimate cannot read offline.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/llama-3.1-8b": _llama(4096, 32, 32, 8, 14336, 128256, False),
    "meta-llama/meta-llama-3-8b": _llama(4096, 32, 32, 8, 14336, 128256, False),
    "meta-llama/llama-3.1-70b": _llama(8192, 80, 64, 8, 28672, 128256, False),
    "meta-llama/llama-3.2-1b": _llama(2048, 16, 32, 8, 8192, 128256, True, head_dim=64),
    "meta-llama/llama-3.2-3b": _llama(3072, 28, 24, 8, 8192, 128256, True, head_dim=128),
    "meta-llama/llama-2-7b-hf": _llama(4096, 32, 32, 32, 11008, 32000, False, torch_dtype="float16"),
    "meta-llama/llama-2-13b-hf": _llama(5120, 40, 40, 40, 13824, 32000, False, torch_dtype="float16"),
    "mistralai/mistral-7b-v0.1": _llama(4096, 32, 32, 8, 14336, 32000, False, model_type="mistral"),
    "mistralai/mistral-7b-v0.3": _llama(4096, 32, 32, 8, 14336, 32768, False, model_type="mistral"),
    "mistralai/mixtral-8x7b-v0.1": _llama(
        4096, 32, 32, 8, 14336, 32000, False, model_type="mixtral", num_local_experts=8, num_experts_per_tok=2
    ),
    "qwen/qwen2.5-0.5b": _llama(896, 24, 14, 2, 4864, 151936, True, model_type="qwen2"),
    "qwen/qwen2.5-1.5b": _llama(1536, 28, 12, 2, 8960, 151936, True, model_type="qwen2"),
    "qwen/qwen2.5-3b": _llama(2048, 36, 16, 2, 11008, 151936, True, model_type="qwen2"),
    "qwen/qwen2.5-7b": _llama(3584, 28, 28, 4, 18944, 152064, False, model_type="qwen2"),
    "qwen/qwen2.5-14b": _llama(5120, 48, 40, 8, 13824, 152064, False, model_type="qwen2"),
    "qwen/qwen3-0.6b": _llama(1024, 28, 16, 8, 3072, 151936, True, model_type="qwen3", head_dim=128),
    "qwen/qwen3-1.7b": _llama(2048, 28, 16, 8, 6144, 151936, True, model_type="qwen3", head_dim=128),
    "qwen/qwen3-4b": _llama(2560, 36, 32, 8, 9728, 151936, True, model_type="qwen3", head_dim=128),
    "qwen/qwen3-8b": _llama(4096, 36, 32, 8, 12288, 151936, False, model_type="qwen3", head_dim=128),
    "google/gemma-2b": _llama(2048, 18, 8, 1, 16384, 256000, True, model_type="gemma", head_dim=256),
    "google/gemma-7b": _llama(3072, 28, 16, 16, 24576, 256000, True, model_type="gemma", head_dim=256),
    "microsoft/phi-3-mini-4k-instruct": _llama(3072, 32, 32, 32, 8192, 32064, False, model_type="phi3"),
    "tinyllama/tinyllama-1.1b-chat-v1.0": _llama(2048, 22, 32, 4, 5632, 32000, False),
    "huggingfacetb/smollm2-135m": _llama(576, 30, 9, 3, 1536, 49152, True),
    "huggingfacetb/smollm2-360m": _llama(960, 32, 15, 5, 2560, 49152, True),
    "huggingfacetb/smollm2-1.7b": _llama(2048, 24, 32, 32, 8192, 49152, True),
    "openai-community/gpt2": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257},
    "gpt2": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257},
}


def known_config(source: str) -> dict[str, Any] | None:
    """The table's config for an hf:// source (or a bare org/name); -Instruct/-chat variants share their base's."""
    name = source.removeprefix("hf://").strip("/").lower()
    if name in KNOWN_CONFIGS:
        return KNOWN_CONFIGS[name]
    base = re.sub(r"-(instruct|chat|it|hf)(-\d+)?$", "", name)
    for candidate in (base, base + "-hf"):
        if candidate in KNOWN_CONFIGS:
            return KNOWN_CONFIGS[candidate]
    # A copy on a volume or bucket (pvc://models/mistral-7b-v0.3) keeps the model's name as its last segment.
    tail = base.rsplit("/", 1)[-1]
    matches = [k for k in KNOWN_CONFIGS if k.rsplit("/", 1)[-1] in (tail, tail + "-hf")]
    return KNOWN_CONFIGS[matches[0]] if len(matches) == 1 else None


def load_config(source: str, cache_dirs: tuple[Path, ...] = ()) -> tuple[dict[str, Any], str]:
    """config.json for a model source, offline: a local directory, the Hugging Face cache, then the table.

    Returns the config and where it came from."""
    if source.startswith("file://") or source.startswith("/") or Path(source).exists():
        path = Path(source.removeprefix("file://"))
        file = path / "config.json" if path.is_dir() else path
        if not file.exists():
            raise EstimateError(f"spec.model.source: no config.json at {file}")
        return json.loads(file.read_text()), str(file)
    if source.startswith("hf://"):
        repo = source.removeprefix("hf://").strip("/")
        for cache in cache_dirs:
            snapshots = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
            found = (
                sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snapshots.exists() else []
            )
            if found:
                return json.loads(found[-1].read_text()), str(found[-1])
    config = known_config(source)
    if config is None:
        raise EstimateError(
            f"spec.model.source: {source} is remote and not in the table of common architectures; pass its "
            "config.json (--config PATH) or download it to the Hugging Face cache"
        )
    return config, "table of common architectures"


# ------------------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """The training setup the estimate is for (built from a FineTuneJob spec by `plan_from_spec`)."""

    method: str = "lora"  # full | lora | qlora
    micro_batch: int = 1
    seq_len: int = 1024
    grad_accum: int = 1
    gradient_checkpointing: bool = False
    compute: str = "bf16"  # bf16 | fp16 | fp32 (fp32: no autocast)
    weights_dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    optimizer: str = "adamw_torch"
    lora_r: int = 16
    lora_targets: tuple[str, ...] = ("all-linear",)
    lora_dropout: float = 0.05
    lora_bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    quant_bits: int = 4
    double_quant: bool = True
    workers: int = 1
    gpus_per_worker: int = 1
    strategy: str = "ddp"  # ddp | fsdp
    attention: str = "sdpa"  # sdpa (flash / memory-efficient kernels) | eager
    attention_mask: bool = True  # padded batches pass a mask (GQA heads are then repeated before SDPA)
    objective: str = "sft"
    device: str = "cuda"  # cuda | cpu: CPU dropout keeps a float mask where CUDA keeps a bool one
    grpo_generations: int = 4
    grpo_completion: int = 64

    @property
    def world_size(self) -> int:
        return max(1, self.workers * max(1, self.gpus_per_worker))

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def plan_from_spec(spec: Any, *, seq_len: int | None = None, micro_batch: int | None = None) -> Plan:
    """A Plan from a FineTuneJobSpec (duck-typed, so this module needs no pydantic)."""
    method, training, resources = spec.method, spec.training, spec.resources
    quant = method.quantization
    batch = micro_batch if micro_batch is not None else _spec_micro_batch(training)
    grpo = getattr(training, "grpo", None)
    return Plan(
        method=method.type,
        micro_batch=batch,
        seq_len=seq_len or spec.dataset.max_seq_length,
        grad_accum=training.gradient_accumulation_steps,
        gradient_checkpointing=training.gradient_checkpointing,
        compute=_compute_dtype(training.precision, resources.gpus_per_worker),
        weights_dtype=spec.model.dtype,
        optimizer=training.optimizer,
        lora_r=method.lora.r,
        lora_targets=tuple(method.lora.target_modules),
        lora_dropout=method.lora.dropout,
        lora_bias=method.lora.bias,
        modules_to_save=tuple(method.lora.modules_to_save),
        quant_bits=quant.bits if quant else 4,
        double_quant=quant.double_quant if quant else True,
        workers=resources.workers,
        gpus_per_worker=resources.gpus_per_worker,
        strategy=spec.distributed.strategy,
        objective=training.objective,
        device="cuda" if resources.gpus_per_worker else "cpu",
        grpo_generations=grpo.num_generations if grpo else 4,
        grpo_completion=grpo.max_completion_length if grpo else 64,
    )


def _compute_dtype(precision: str, gpus: int) -> str:
    """What the train stage computes in (stages/train.py resolve_precision): auto is bf16 on GPUs, fp32 on CPU."""
    if precision == "auto":
        return "bf16" if gpus else "fp32"
    return {"bf16": "bf16", "fp16": "fp16"}.get(precision, "fp32")


def _spec_micro_batch(training: Any) -> int:
    batch = training.batch_size
    return batch if isinstance(batch, int) else 1


# --------------------------------------------------------------------------------------------------- the estimate


@dataclass
class Memory:
    """Bytes per GPU, by term."""

    weights: int = 0
    quantization_state: int = 0
    gradients: int = 0
    optimizer_states: int = 0
    activations: int = 0
    logits: int = 0
    recomputed_block: int = 0
    optimizer_step: int = 0
    autocast_copies: int = 0
    sharding_buffers: int = 0
    cuda_context: int = 0
    fragmentation: int = 0

    @property
    def allocated_peak(self) -> int:
        """What torch.cuda.max_memory_allocated should show: tensors only."""
        steady = self.weights + self.quantization_state + self.optimizer_states + self.sharding_buffers
        forward_backward = (
            self.gradients + self.activations + max(self.logits, self.recomputed_block) + self.autocast_copies
        )
        step = self.gradients + self.optimizer_step
        return steady + max(forward_backward, step)

    @property
    def total(self) -> int:
        """What the GPU must hold: tensors, allocator slack and the CUDA context."""
        return self.allocated_peak + self.fragmentation + self.cuda_context

    def terms(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if v}


TERM_LABELS = {
    "weights": "model weights",
    "quantization_state": "quantization state",
    "gradients": "gradients",
    "optimizer_states": "optimizer states",
    "activations": "activations",
    "logits": "logits and loss",
    "recomputed_block": "recomputed block (checkpointing)",
    "optimizer_step": "optimizer step temporaries",
    "autocast_copies": "autocast weight copies",
    "sharding_buffers": "FSDP/DDP buffers",
    "cuda_context": "CUDA context",
    "fragmentation": "allocator slack",
}


@dataclass
class Estimate:
    """Memory per GPU and the work of the run."""

    architecture: Architecture
    plan: Plan
    memory: Memory
    parameters: int
    trainable_parameters: int
    notes: list[str] = field(default_factory=list)
    work: dict[str, Any] = field(default_factory=dict)

    @property
    def biggest_term(self) -> tuple[str, int]:
        terms = {k: v for k, v in self.memory.terms().items() if k not in ("cuda_context", "fragmentation")}
        name = max(terms, key=lambda k: terms[k])
        return name, terms[name]

    def fits(self, gpu_bytes: int) -> bool:
        return self.memory.total <= gpu_bytes

    def advice(self, gpu_bytes: int | None = None) -> list[str]:
        """What would shrink the biggest terms, most effective first."""
        plan, mem = self.plan, self.memory
        fixes: list[tuple[int, str]] = []
        per_gpu_state = mem.weights + mem.gradients + mem.optimizer_states
        if plan.method == "full":
            fixes.append((per_gpu_state, "spec.method.type: qlora (or lora) trains an adapter instead of every weight"))
            if plan.strategy != "fsdp" or plan.world_size == 1:
                fixes.append(
                    (per_gpu_state, "spec.distributed.strategy: fsdp over more GPUs (spec.resources.workers x "
                     "gpusPerWorker) shards weights, gradients and optimizer states")
                )  # fmt: skip
        elif plan.method == "lora":
            fixes.append((mem.weights, "spec.method.type: qlora stores the base weights in 4 bits"))
        if plan.optimizer in ("adamw_torch", "adamw_torch_fused") and mem.optimizer_states > GIB:
            fixes.append((mem.optimizer_states * 3 // 4, "spec.training.optimizer: paged_adamw_8bit"))
        if not plan.gradient_checkpointing and mem.activations > GIB // 4:
            fixes.append((mem.activations, "spec.training.gradientCheckpointing: true"))
        if plan.micro_batch > 1:
            fixes.append(
                ((mem.activations + mem.logits) // 2, "a smaller spec.training.batchSize (or batchSize: auto) with "
                 "more gradientAccumulationSteps")
            )  # fmt: skip
        if mem.logits > GIB or mem.activations > GIB:
            fixes.append(((mem.activations + mem.logits) // 2, "a shorter spec.dataset.maxSeqLength"))
        return [text for _, text in sorted(fixes, key=lambda f: -f[0])]

    def summary(self) -> dict[str, Any]:
        """The JSON shape that goes into status.estimate and the CLI's --json."""
        name, _ = self.biggest_term
        return {
            "parameters": self.parameters,
            "trainableParameters": self.trainable_parameters,
            "microBatch": self.plan.micro_batch,
            "sequenceLength": self.plan.seq_len,
            "gradientAccumulationSteps": self.plan.grad_accum,
            "worldSize": self.plan.world_size,
            "memoryPerGpuGiB": round(self.memory.total / GIB, 2),
            "allocatedPeakGiB": round(self.memory.allocated_peak / GIB, 2),
            "termsGiB": {k: round(v / GIB, 3) for k, v in self.memory.terms().items()},
            "biggestTerm": TERM_LABELS[name],
            **self.work,
            "notes": list(self.notes),
        }


def _weights_bytes_per_param(plan: Plan, arch: Architecture) -> int:
    """Bytes per unquantized weight as the train stage loads them."""
    if plan.weights_dtype != "auto":
        return DTYPE_BYTES[plan.weights_dtype]
    if plan.method == "full":
        return 4  # fp32 master weights; autocast computes in bf16
    if plan.method == "qlora":
        return 4  # prepare_model_for_kbit_training upcasts every non-quantized weight
    return DTYPE_BYTES[plan.compute]


def _lora_targeted(arch: Architecture, plan: Plan) -> list[Linear]:
    if plan.method == "full":
        return []
    if "all-linear" in plan.lora_targets:
        return list(arch.linears)
    names = set(plan.lora_targets)
    return [lin for lin in arch.linears if lin.name in names or lin.name.split(".")[-1] in names]


def _quantized_bytes(arch: Architecture, plan: Plan) -> tuple[int, int]:
    """Packed weights and the quantization state of every decoder linear (bitsandbytes, blocksize 64)."""
    weights = arch.layers * arch.linear_params_per_layer()
    biases = arch.layers * sum(lin.copies * lin.fan_out for lin in arch.linears if lin.bias)
    tensors = [lin.fan_in * lin.fan_out for lin in arch.linears for _ in range(lin.copies)] * arch.layers
    if plan.quant_bits == 8:
        rows = arch.layers * sum(lin.copies * lin.fan_out for lin in arch.linears)
        return weights + biases * 4, rows * 4  # int8 + a fp32 scale per output row
    state = 0
    for numel in tensors:
        blocks = math.ceil(numel / 64)
        if plan.double_quant:  # uint8 absmax per block, re-quantized with a fp32 absmax per 256 blocks + offset
            state += blocks + 4 * math.ceil(blocks / 256) + 4 + 256 * 4
        else:
            state += 4 * blocks
        state += 16 * 4  # the NF4/FP4 code table
    return weights // 2 + biases * 4, state


def _optimizer_bytes(optimizer: str, shapes: list[tuple[int, ...]], param_bytes: int) -> tuple[int, int]:
    """(states, step temporaries) of the optimizer for trainable tensors of these shapes."""
    numel = [math.prod(s) for s in shapes]
    total = sum(numel)
    if optimizer in ("adamw_torch", "adamw_torch_fused", "adamw_hf"):
        temp = 0 if optimizer == "adamw_torch_fused" else total * param_bytes  # foreach sqrt(exp_avg_sq)
        return 2 * total * param_bytes + 4 * len(shapes), temp  # exp_avg, exp_avg_sq and a fp32 step per tensor
    if optimizer in ("paged_adamw_8bit", "adamw_8bit", "adamw_bnb_8bit"):
        # bitsandbytes: two uint8 states + a fp32 absmax per 256-block; tensors under 4096 elements stay 32-bit.
        return sum(2 * n + 8 * math.ceil(n / 256) if n >= 4096 else 8 * n for n in numel), 0
    if optimizer == "adafactor":
        return sum(4 * (s[0] + s[1]) if len(s) == 2 else 4 * math.prod(s) for s in shapes), total * 4
    return 0, 0  # sgd without momentum


def _trainable_shapes(arch: Architecture, plan: Plan) -> list[tuple[int, ...]]:
    """Shapes of the trainable tensors (for the optimizer's per-tensor rules)."""
    h, layers = arch.hidden, arch.layers
    if plan.method == "full":
        per_layer: list[tuple[int, ...]] = []
        for lin in arch.linears:
            per_layer += [(lin.fan_out, lin.fan_in)] * lin.copies + ([(lin.fan_out,)] * lin.copies if lin.bias else [])
        norms = [(h,)] * (4 if arch.norm == "layer" else 2) + ([(arch.head_dim,)] * 2 if arch.qk_norm else [])
        shapes = (per_layer + norms) * layers
        shapes += [(arch.vocab, h)] + ([(arch.learned_positions, h)] if arch.learned_positions else [])
        shapes += [(h,)] * (2 if arch.norm == "layer" else 1) + ([] if arch.tied_embeddings else [(arch.vocab, h)])
        return shapes
    shapes = []
    for lin in _lora_targeted(arch, plan):
        shapes += [(plan.lora_r, lin.fan_in), (lin.fan_out, plan.lora_r)] * lin.copies
        if plan.lora_bias != "none" and lin.bias:
            shapes += [(lin.fan_out,)] * lin.copies
    shapes *= layers
    for name in plan.modules_to_save:
        if name in ("embed_tokens", "wte"):
            shapes.append((arch.vocab, h))
        elif name in ("lm_head", "score"):
            shapes.append((arch.vocab if name == "lm_head" else 1, h))
    return shapes


def _sequences_per_micro_batch(plan: Plan) -> int:
    if plan.objective in ("dpo", "reward"):
        return 2 * plan.micro_batch  # chosen and rejected go through the model together
    return plan.micro_batch


def _layer_activation_bytes(arch: Architecture, plan: Plan, seq: int) -> int:
    """Bytes autograd saves per token in one decoder block (no checkpointing)."""
    full = plan.method == "full"
    c = DTYPE_BYTES[plan.compute]
    autocast = plan.compute != "fp32"
    r = _weights_bytes_per_param(plan, arch)  # the residual stream has the dtype of the norms / embeddings
    h, hd = arch.hidden, arch.head_dim
    q_out, kv_out = arch.heads * hd, arch.kv_heads * hd
    total = 0.0
    # Two norms. RMSNorm upcasts its input to fp32 and saves it; a trained norm weight also keeps the normed input.
    # A LayerNorm saves its input.
    norm = 4 * h if arch.norm == "rms" else r * h
    total += 2 * (norm + (r * h if full and arch.norm == "rms" else 0))
    if arch.qk_norm:
        total += 4 * (q_out + kv_out)
    # Linear inputs saved for the weight gradient (trained weights only): one shared tensor per group, or under
    # autocast a compute-dtype copy per linear when the input has another dtype.
    if full:
        seen: set[str] = set()
        for lin in arch.linears:
            copy = autocast and (lin.group in ("norm1", "norm2", "ln_1", "ln_2")) and r != c
            if copy:
                total += c * lin.fan_in
            elif lin.group not in seen and lin.group not in ("attn_out", "mlp_act"):
                total += r * lin.fan_in  # the norm output itself (attn_out / mlp_act are counted below)
            seen.add(lin.group)
        if arch.model_type == "gpt2":
            total += r * h  # GPT-2's LayerNorm output is a new tensor read by c_attn / c_fc
    # Attention: SDPA/flash kernels save q, k, v, the output and the log-sum-exp; without them (eager) the
    # softmax probabilities too. A mask makes transformers repeat GQA's k/v heads to all heads first.
    kv_saved = q_out if (plan.attention_mask or plan.attention == "eager") else kv_out
    if arch.model_type == "gpt2":
        total += c * 3 * h  # q, k and v are views of c_attn's output, which stays alive
    else:
        total += c * (q_out + 2 * kv_saved)
    total += c * q_out + 4 * arch.heads  # output and log-sum-exp
    eager = plan.attention == "eager" or arch.attention_dropout > 0
    if eager:
        total += arch.heads * seq * (4 + c + (1 if arch.attention_dropout > 0 else 0)) / 2  # causal half on avg
    total += c * q_out  # heads merged (contiguous), read by o_proj
    # MLP
    inter = arch.intermediate * (arch.experts_per_token if arch.experts > 1 else 1)
    if arch.activation == "silu":
        total += c * inter * (3 + (1 if full else 0))  # gate (silu input), silu output, up; product if trained
    elif arch.activation == "gelu_new":
        total += c * inter * (5 if full else 4)  # transformers' python tanh-GELU keeps four intermediates
    else:
        total += c * inter * (2 if full else 1)
    if arch.hidden_dropout > 0:
        total += 2 * h  # dropout masks after attention and MLP
    # LoRA: the adapter input (dropout mask + the input as the fp32 adapter reads it) and lora_B's input.
    for lin in _lora_targeted(arch, plan):
        total += lin.copies * (lin.fan_in * (_lora_input_bytes(plan) + _mask_bytes(plan)) + plan.lora_r * c)
    return int(total)


def _lora_input_bytes(plan: Plan) -> int:
    return DTYPE_BYTES[plan.compute] if plan.compute != "fp32" else 4


def _mask_bytes(plan: Plan) -> int:
    if plan.lora_dropout <= 0:
        return 0
    return 1 if plan.device == "cuda" else 4  # CUDA's fused dropout keeps a bool mask; CPU keeps fp32 noise


def _first_layer_saving(arch: Architecture, plan: Plan) -> int:
    """Per token: with a frozen embedding the first block's input needs no gradient, so its first norm and the
    dropout masks of the adapters reading it save nothing."""
    if plan.method == "full" or plan.gradient_checkpointing:
        return 0
    first = [lin for lin in _lora_targeted(arch, plan) if lin.group in ("norm1", "ln_1")]
    norm = 4 * arch.hidden if arch.norm == "rms" else _weights_bytes_per_param(plan, arch) * arch.hidden
    return norm + sum(lin.copies * lin.fan_in * _mask_bytes(plan) for lin in first)


def _logits_bytes(arch: Architecture, plan: Plan, tokens: int) -> int:
    """The lm_head output, the loss' fp32 upcast and log-softmax, and their gradient in the backward pass."""
    if plan.objective == "reward":
        return 0
    # Backward of the loss: the fp32 log-softmax output, the gradient nll_loss scatters into, and log-softmax's
    # input gradient (forward peak is lower: compute-dtype logits, their fp32 copy, the log-softmax output).
    return tokens * arch.vocab * 12


def estimate(arch: Architecture, plan: Plan) -> Estimate:
    """Memory per GPU for training `arch` as `plan` says (the work is added by `add_work`)."""
    if plan.method not in ("full", "lora", "qlora"):
        raise EstimateError(f"spec.method.type: unknown method {plan.method}")
    notes: list[str] = []
    mem = Memory()
    params = arch.parameters()
    wbytes = _weights_bytes_per_param(plan, arch)
    c = DTYPE_BYTES[plan.compute]
    world = plan.world_size
    fsdp = plan.strategy == "fsdp" and world > 1

    if plan.method == "qlora":
        packed, state = _quantized_bytes(arch, plan)
        rest = params - arch.layers * (
            arch.linear_params_per_layer() + sum(lin.copies * lin.fan_out for lin in arch.linears if lin.bias)
        )
        mem.weights = packed + rest * wbytes
        mem.quantization_state = state
    else:
        mem.weights = params * wbytes

    shapes = _trainable_shapes(arch, plan)
    trainable = sum(math.prod(s) for s in shapes)
    # Trainable tensors: full fine-tunes train the weights in their dtype; PEFT keeps adapters in fp32.
    tbytes = wbytes if plan.method == "full" else 4
    mem.gradients = trainable * tbytes
    mem.optimizer_states, mem.optimizer_step = _optimizer_bytes(plan.optimizer, shapes, tbytes)
    if plan.optimizer == "paged_adamw_8bit":
        notes.append("paged optimizer states can spill to CPU memory under pressure; counted on the GPU here")

    seqs = _sequences_per_micro_batch(plan)
    seq = plan.seq_len + (plan.grpo_completion if plan.objective == "grpo" else 0)
    tokens = seqs * seq
    per_layer = _layer_activation_bytes(arch, plan, seq)
    residual = _weights_bytes_per_param(plan, arch)
    embed = tokens * arch.hidden * residual
    if plan.gradient_checkpointing:
        # Only each block's input is kept; one block is recomputed at a time in the backward pass, after the
        # loss' temporaries are gone.
        mem.activations = embed + tokens * arch.layers * arch.hidden * residual
        # The recomputed block's backward also holds its gradients: about four fp32 MLP-width tensors at once
        # (measured on CPU: benchmarks/estimate_cpu.py).
        inter = arch.intermediate * (arch.experts_per_token if arch.experts > 1 else 1)
        mem.recomputed_block = tokens * (per_layer + 4 * inter * 4)
    else:
        mem.activations = embed + tokens * (arch.layers * per_layer - _first_layer_saving(arch, plan))
    mem.logits = _logits_bytes(arch, plan, tokens)

    autocast = plan.compute != "fp32"
    if autocast and plan.method == "full" and wbytes != c:
        mem.autocast_copies = arch.layers * arch.linear_params_per_layer() * c  # cached casts of trained weights
        if not arch.tied_embeddings:
            mem.autocast_copies += arch.vocab * arch.hidden * c
    elif autocast and plan.method == "qlora" and plan.objective != "reward":
        mem.autocast_copies = arch.vocab * arch.hidden * c  # the fp32 lm_head cast for the frozen matmul

    if fsdp:
        # Weights, gradients and optimizer states are sharded; each rank gathers a block (and prefetches the next)
        # in the compute dtype, and holds one block's unsharded gradient while it is reduce-scattered.
        mem.weights //= world
        mem.gradients //= world
        mem.optimizer_states //= world
        mem.optimizer_step //= world
        mem.autocast_copies = 0
        unit = max(arch.layer_params(), arch.vocab * arch.hidden)
        mem.sharding_buffers = unit * c * 2 + (unit * tbytes if plan.method == "full" else 0)
    elif world > 1 and plan.method == "full":
        mem.sharding_buffers = mem.gradients  # DDP's gradient buckets are a second copy of the gradients
    if plan.method == "full" and plan.objective in ("dpo", "grpo"):
        mem.weights += params * c // (world if fsdp else 1)  # the frozen reference model
        notes.append("a full DPO/GRPO run keeps a reference copy of the model")
    if plan.objective == "grpo":
        notes.append("GRPO generation (KV cache) is not counted; leave headroom")

    allocated = mem.allocated_peak
    mem.fragmentation = int(allocated * FRAGMENTATION)
    mem.cuda_context = CUDA_CONTEXT_BYTES + (NCCL_BYTES if world > 1 else 0)
    return Estimate(arch, plan, mem, params, trainable, notes)


# ------------------------------------------------------------------------------------------------------- the work


def gpu_product(node_selector: dict[str, str] | None, resource_name: str = "") -> str | None:
    """A known GPU product named in the node selector (or the extended resource name)."""
    values = [*(node_selector or {}).values(), resource_name]
    for product, pattern in _GPU_PATTERNS:
        if any(pattern.search(v or "") for v in values):
            return product
    return None


def training_flops_per_token(arch: Architecture, plan: Plan, seq: int) -> float:
    """6N per token for a full fine-tune (forward 2N + backward 4N) plus attention; LoRA skips the weight
    gradients of the frozen base (about 4N) and adds its adapters' 6 x r(in+out)."""
    active = arch.parameters() - arch.embedding_params()
    if arch.experts > 1:
        mlp = arch.layers * sum(lin.fan_in * lin.fan_out for lin in arch.linears if lin.copies > 1)
        active -= mlp - mlp * arch.experts_per_token // arch.experts
    if arch.tied_embeddings:
        active += arch.vocab * arch.hidden  # the output projection still runs
    attention = 2 * arch.layers * seq * arch.heads * arch.head_dim  # causal QK^T and AV, forward
    if plan.method == "full":
        return 6 * active + 3 * attention
    adapters = arch.layers * sum(
        lin.copies * plan.lora_r * (lin.fan_in + lin.fan_out) for lin in _lora_targeted(arch, plan)
    )
    recompute = 2 * active if plan.gradient_checkpointing else 0
    return 4 * active + 6 * adapters + 3 * attention + recompute  # forward 2N + input-gradient 2N


def add_work(
    est: Estimate,
    *,
    tokens_per_epoch: int | None,
    sequences: int | None,
    epochs: float | None,
    max_steps: int | None,
    gpu: str | None,
) -> Estimate:
    """Steps, FLOPs, a time band for the GPU and GPU-hours."""
    plan = est.plan
    work: dict[str, Any] = {}
    seqs_per_step = plan.effective_batch
    if max_steps is not None:
        steps = max_steps
        tokens = steps * seqs_per_step * plan.seq_len if not tokens_per_epoch or not sequences else (
            steps * seqs_per_step * tokens_per_epoch / max(sequences, 1)
        )  # fmt: skip
    elif sequences and epochs:
        # As the Trainer counts: whole optimizer steps per epoch (the last one partial), then the epochs.
        steps = math.ceil(epochs * math.ceil(sequences / seqs_per_step))
        tokens = (tokens_per_epoch or sequences * plan.seq_len) * epochs
    else:
        est.work = {"gpu": gpu} if gpu else {}
        est.notes.append("steps and time unknown until prepare has counted the data (or set maxSteps)")
        return est
    work["tokensPerEpoch"] = int(tokens_per_epoch) if tokens_per_epoch else None
    work["sequences"] = sequences
    work["steps"] = int(steps)
    per_token = training_flops_per_token(est.architecture, plan, plan.seq_len)
    flops = per_token * tokens
    work["trainingFlops"] = float(f"{flops:.3e}")
    if gpu in GPU_PEAK_BF16:
        peak = GPU_PEAK_BF16[gpu] * (0.5 if plan.compute == "fp32" else 1.0)  # tf32, roughly
        fast, slow = (flops / (peak * mfu * plan.world_size) for mfu in reversed(MFU_RANGE))
        work["gpu"] = gpu
        work["timeSeconds"] = {"low": round(fast), "high": round(slow)}
        work["gpuHours"] = {
            "low": round(fast * plan.world_size / 3600, 2),
            "high": round(slow * plan.world_size / 3600, 2),
        }
        work["mfuRange"] = list(MFU_RANGE)
    est.work = work
    return est


# ------------------------------------------------------------------------------------------- batch size and fit


def largest_micro_batch(arch: Architecture, plan: Plan, gpu_bytes: int, limit: int = 256) -> int | None:
    """The largest micro-batch (power of two) that fits; None when not even 1 does."""
    best = None
    batch = 1
    while batch <= limit:
        trial = Plan(**{**asdict(plan), "micro_batch": batch})
        if estimate(arch, trial).memory.total > gpu_bytes:
            break
        best = batch
        batch *= 2
    return best


def auto_batch(effective: int, world: int, largest: int) -> tuple[int, int]:
    """(micro-batch, accumulation) with micro x accumulation x world == the effective batch, micro <= largest."""
    per_rank = max(1, math.ceil(effective / world))
    micro = max(1, min(largest, per_rank))
    while per_rank % micro:
        micro -= 1
    return micro, per_rank // micro


def gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


def refusal(est: Estimate, gpu_bytes: int, gpu_label: str) -> str | None:
    """None when it fits; else a message naming the biggest term and the fixes."""
    if est.fits(gpu_bytes):
        return None
    name, size = est.biggest_term
    fixes = est.advice(gpu_bytes)
    return (
        f"the estimate needs {gib(est.memory.total)} per GPU but {gpu_label} has {gib(gpu_bytes)}; the biggest "
        f"term is {TERM_LABELS[name]} ({gib(size)}). Try: " + "; or ".join(fixes[:3])
    )


def render(est: Estimate, gpu_bytes: int | None = None) -> str:
    """A human table for the CLI and the local mode's summary."""
    arch, plan = est.architecture, est.plan
    lines = [
        f"model: {arch.model_type}, {est.parameters / 1e9:.2f}B parameters "
        f"({arch.layers} layers, hidden {arch.hidden}, vocab {arch.vocab}); trainable {est.trainable_parameters:,}",
        f"plan: {plan.method}, micro-batch {plan.micro_batch} x {plan.seq_len} tokens, accumulation "
        f"{plan.grad_accum}, {plan.world_size} GPU(s) {plan.strategy}, {plan.optimizer}, "
        f"checkpointing {'on' if plan.gradient_checkpointing else 'off'}",
        "memory per GPU:",
    ]
    for name, size in sorted(est.memory.terms().items(), key=lambda t: -t[1]):
        lines.append(f"  {TERM_LABELS[name]:<34} {gib(size):>10}")
    lines.append(f"  {'total':<34} {gib(est.memory.total):>10}")
    if gpu_bytes:
        verdict = "fits" if est.fits(gpu_bytes) else "DOES NOT FIT"
        lines.append(f"GPU memory {gib(gpu_bytes)}: {verdict}")
    work = est.work
    if work.get("steps") is not None:
        lines.append(f"work: {work['steps']} steps, {work['trainingFlops']:.2e} FLOPs")
    if "timeSeconds" in work:
        t, g = work["timeSeconds"], work["gpuHours"]
        lines.append(
            f"time on {work['gpu']} (MFU {MFU_RANGE[0]:.0%}-{MFU_RANGE[1]:.0%}): {t['low'] / 3600:.2f}-"
            f"{t['high'] / 3600:.2f} h, {g['low']}-{g['high']} GPU-hours"
        )
    lines += [f"note: {n}" for n in est.notes]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- from a FineTuneJob

_QUANTITY = re.compile(r"^([0-9.]+)([KMGTPE]i?|[kmgtpe]|)$")
_SUFFIX = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def parse_quantity(text: str) -> int:
    """A Kubernetes quantity (80Gi, 81920Mi, 80G) in bytes."""
    match = _QUANTITY.match(text.strip())
    if not match:
        raise EstimateError(f"spec.resources.gpuMemory: {text!r} is not a memory quantity; write e.g. 80Gi")
    number, suffix = float(match.group(1)), match.group(2)
    factor = 1024 ** ("KMGTPE".index(suffix[0]) + 1) if suffix.endswith("i") else _SUFFIX[suffix]
    return int(number * factor)


# Usable memory of each product as nvidia-smi reports it (MiB); A100 also comes with 40 GB.
_GPU_MIB = {"H200": 143771, "H100": 81559, "A100": 81920, "L40S": 46068, "L4": 23034}


def gpu_memory_of(spec: Any) -> tuple[int | None, str | None, str | None]:
    """(bytes per GPU, how it is named, the product for the time band) from gpuMemory or the node selector."""
    resources = spec.resources
    product = gpu_product(spec.scheduling.node_selector, resources.gpu_resource_name)
    if resources.gpu_memory:
        return parse_quantity(resources.gpu_memory), f"spec.resources.gpuMemory {resources.gpu_memory}", product
    if product is None:
        return None, None, None
    mib = _GPU_MIB[product]
    if product == "A100" and any("40gb" in v.lower() for v in spec.scheduling.node_selector.values()):
        mib = 40960
    return mib * 1024 * 1024, f"a {product} (from spec.scheduling.nodeSelector)", product


def data_shape(spec: Any, preflight: dict[str, Any] | None) -> dict[str, Any]:
    """Sequence length for memory (the longest row, clipped: the batch holding it sets the peak), tokens and
    sequences per epoch, from the prepare stage's preflight report; maxSeqLength when the data are not counted."""
    max_len = spec.dataset.max_seq_length
    tokens = (preflight or {}).get("tokens") or {}
    rows = (preflight or {}).get("rows") or {}
    packing = (preflight or {}).get("packing")
    if not tokens:
        return {"sequenceLength": max_len, "source": "maxSeqLength (data not counted yet)"}
    if packing:
        sequences = int(packing["sequences"])
        return {"sequenceLength": max_len, "sequences": sequences, "tokensPerEpoch": sequences * max_len,
                "p99": max_len, "source": "preflight (packed)"}  # fmt: skip
    sequences = int(rows.get("train") or tokens.get("rows") or 0)
    mean = min(float(tokens.get("mean") or 0), max_len)
    p99 = (tokens.get("percentiles") or {}).get("p99")
    longest = min(int(tokens.get("max") or max_len), max_len)
    return {"sequenceLength": max(longest, 1), "sequences": sequences, "tokensPerEpoch": int(mean * sequences),
            "p99": min(int(p99), max_len) if p99 else None, "source": "preflight"}  # fmt: skip


ARCHITECTURE_KEYS = (
    "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
    "intermediate_size", "vocab_size", "tie_word_embeddings", "attention_bias", "mlp_bias", "num_local_experts",
    "num_experts", "num_experts_per_tok", "attention_dropout", "torch_dtype", "n_embd", "n_layer", "n_head",
    "n_inner", "n_positions", "activation_function", "attn_pdrop", "resid_pdrop",
)  # fmt: skip


def architecture_essentials(config: dict[str, Any]) -> dict[str, Any]:
    """The few config.json keys the estimate reads (what status.estimate keeps, to re-estimate without I/O)."""
    return {k: config[k] for k in ARCHITECTURE_KEYS if config.get(k) is not None}


def job_estimate(spec: Any, config: dict[str, Any], data: dict[str, Any] | None = None) -> Estimate:
    """The estimate of a FineTuneJob: batchSize auto resolved, effectiveBatchSize kept, work and time added."""
    arch = Architecture.from_config(config)
    data = data or data_shape(spec, None)
    training = spec.training
    plan = plan_from_spec(spec, seq_len=data["sequenceLength"])
    gpu_bytes, _, product = gpu_memory_of(spec)
    effective = training.effective_batch_size
    notes = []
    if training.batch_size == "auto":
        largest = largest_micro_batch(arch, plan, gpu_bytes) if gpu_bytes else None
        if gpu_bytes is None:
            notes.append("batchSize auto without spec.resources.gpuMemory or a known GPU: micro-batch 1")
        plan.micro_batch, plan.grad_accum = auto_batch(effective or plan.world_size, plan.world_size, largest or 1)
    elif effective:
        plan.grad_accum = max(1, math.ceil(effective / (plan.micro_batch * plan.world_size)))
    est = estimate(arch, plan)
    est.notes[:0] = notes
    epochs = training.epochs
    add_work(
        est, tokens_per_epoch=data.get("tokensPerEpoch"), sequences=data.get("sequences"), epochs=epochs,
        max_steps=training.max_steps, gpu=product,
    )  # fmt: skip
    if data.get("p99"):
        est.work["p99Tokens"] = data["p99"]
    return est


def status_estimate(est: Estimate, spec: Any, config: dict[str, Any], source: str) -> dict[str, Any]:
    """status.estimate, on the wire (camelCase): compact enough for a pod's termination message."""
    gpu_bytes, gpu_label, _ = gpu_memory_of(spec)
    name, _ = est.biggest_term
    work = est.work
    out: dict[str, Any] = {
        "memoryPerGpuGiB": round(est.memory.total / GIB, 2),
        "allocatedPeakGiB": round(est.memory.allocated_peak / GIB, 2),
        "gpuMemoryGiB": round(gpu_bytes / GIB, 2) if gpu_bytes else None,
        "fits": est.fits(gpu_bytes) if gpu_bytes else None,
        "biggestTerm": TERM_LABELS[name],
        "termsGiB": {k: round(v / GIB, 3) for k, v in est.memory.terms().items()},
        "parameters": est.parameters,
        "trainableParameters": est.trainable_parameters,
        "microBatch": est.plan.micro_batch,
        "gradientAccumulationSteps": est.plan.grad_accum,
        "effectiveBatchSize": est.plan.effective_batch,
        "sequenceLength": est.plan.seq_len,
        "worldSize": est.plan.world_size,
        "tokensPerEpoch": work.get("tokensPerEpoch"),
        "sequences": work.get("sequences"),
        "steps": work.get("steps"),
        "trainingFlops": work.get("trainingFlops"),
        "gpu": work.get("gpu"),
        "timeHours": [round(work["timeSeconds"]["low"] / 3600, 2), round(work["timeSeconds"]["high"] / 3600, 2)]
        if "timeSeconds" in work
        else None,
        "gpuHours": [work["gpuHours"]["low"], work["gpuHours"]["high"]] if "gpuHours" in work else None,
        "configSource": source,
        "architecture": architecture_essentials(config),
        "notes": est.notes[:4],
    }
    if gpu_bytes and not est.fits(gpu_bytes):
        out["message"] = refusal(est, gpu_bytes, gpu_label or "the GPU")
    return {k: v for k, v in out.items() if v is not None}


def one_line(summary: dict[str, Any]) -> str:
    """status.estimate in one sentence (events, the local summary)."""
    text = f"{summary['memoryPerGpuGiB']} GiB per GPU"
    if summary.get("gpuMemoryGiB"):
        text += f" of {summary['gpuMemoryGiB']} GiB ({'fits' if summary.get('fits') else 'does not fit'})"
    text += (
        f", biggest term {summary['biggestTerm']}; micro-batch {summary['microBatch']} x accumulation "
        f"{summary['gradientAccumulationSteps']} x {summary['worldSize']} GPU(s)"
    )
    if summary.get("steps"):
        text += f"; {summary['steps']} steps"
    if summary.get("timeHours"):
        low, high = summary["timeHours"]
        text += f", {low}-{high} h on {summary.get('gpu')} ({summary['gpuHours'][0]}-{summary['gpuHours'][1]} GPU-h)"
    return text
