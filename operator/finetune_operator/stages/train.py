"""The train stage: TRL trainers by objective, PEFT LoRA / QLoRA or full fine-tuning, resumable checkpoints.

Defaults are chosen, not inherited. TRL's SFTConfig turns gradient checkpointing and bf16 on, and its packing
default runs padding-free batches; on a GPU without flash-attention and on CPUs those cost 10-40x (see the README's
benchmarks). Here precision follows spec.training.precision (auto: bf16 / fp16 / fp32 by device), gradient
checkpointing follows the spec (default off), and the prepare stage has already tokenized, truncated and (when
asked) packed the data, so the trainer only pads each batch to its longest row.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import time
from pathlib import Path
from typing import Any

from .contract import EXIT_PREEMPTED, StageConfig, StageError, Workdir, emit, freeze_what_is_loaded

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
BATCH_STATE = "finetune-batch.json"  # the micro-batch after out-of-memory recoveries, kept across restarts
INJECT_OOM_ENV = "FINETUNE_INJECT_OOM_AT_STEP"  # fault injection: raise CUDA OOM once at this step (tests, drills)
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
TRAIN_META = "finetune-train.json"


CHECKPOINT_MARKER = "finetune-checkpoint.json"
"""Written by rank 0 into a checkpoint after every rank has saved its part (weights, optimizer, RNG state)."""


def latest_valid_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint that every rank wrote completely (a worker killed mid-save leaves a partial one).

    Complete means: our marker is there (written after a barrier over all ranks). Checkpoints written before the
    marker existed (none in the folder has one) fall back to: trainer_state.json readable and weights present."""
    if not folder.exists():
        return None
    numbered = sorted(
        (int(m.group(1)), path) for path in folder.iterdir() if (m := CHECKPOINT_RE.match(path.name)) and path.is_dir()
    )
    marked = any((path / CHECKPOINT_MARKER).exists() for _, path in numbered)
    for _, path in reversed(numbered):
        if marked and not (path / CHECKPOINT_MARKER).exists():
            continue
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if any((path / f).exists() for f in WEIGHT_FILES):
            return path
    return None


def remove_partial_checkpoints(folder: Path, resume: Path | None) -> list[str]:
    """Delete checkpoints newer than the one resumed from (left half-written by a killed worker)."""
    if not folder.exists():
        return []
    newest = int(CHECKPOINT_RE.match(resume.name).group(1)) if resume else -1  # type: ignore[union-attr]
    removed = []
    for path in folder.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and int(match.group(1)) > newest:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


class GangCheckpointing:
    """Callbacks that make checkpoints a gang's: one marker once every rank saved, and preemption handling.

    On SIGTERM (eviction, preemption, spot reclaim; torchrun forwards it to its ranks) a rank only sets a flag.
    After every optimizer step the ranks all-reduce the flag (one scalar), so all of them stop after the same step,
    save one checkpoint at that step and leave training; the stage then exits EXIT_PREEMPTED and the next attempt
    resumes at exactly that step."""

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter
        self.signalled = False
        self.preempted_at: int | None = None
        self.save_started: float | None = None
        self.save_seconds: list[float] = []
        self.last_checkpoint: dict[str, Any] | None = None

    def install_signal_handler(self) -> None:
        def on_sigterm(signum: int, frame: Any) -> None:
            self.signalled = True

        signal.signal(signal.SIGTERM, on_sigterm)

    def _anyone_signalled(self, device: Any) -> bool:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self.signalled
        flag = torch.tensor([1.0 if self.signalled else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def as_callback(self) -> Any:
        from transformers import TrainerCallback

        gang = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                if gang._anyone_signalled(args.device):
                    gang.preempted_at = state.global_step
                    control.should_save = True
                    control.should_training_stop = True
                if control.should_save:
                    gang.save_started = time.monotonic()
                return control

            def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                gang.mark_complete(args, state)

        return _Callback()

    def mark_complete(self, args: Any, state: Any) -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # every rank has written its files
        seconds = time.monotonic() - self.save_started if self.save_started else None
        if seconds is not None:
            self.save_seconds.append(seconds)
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        record = {
            "step": state.global_step,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "location": str(folder),
        }
        self.last_checkpoint = record
        self.reporter.last_checkpoint = record
        if state.is_world_process_zero:
            marker = {**record, "worldSize": args.world_size, "saveSeconds": round(seconds or 0.0, 3)}
            (folder / CHECKPOINT_MARKER).write_text(json.dumps(marker))
            emit("checkpoint", "train", step=record["step"], location=record["location"],
                 completedAt=record["time"], saveSeconds=round(seconds or 0.0, 3))  # fmt: skip


def resolve_precision(precision: str) -> dict[str, Any]:
    """TrainingArguments precision flags for spec.training.precision on this machine."""
    import torch

    cuda = torch.cuda.is_available()
    if precision == "auto":
        if not cuda:
            return {"bf16": False, "fp16": False, "use_cpu": True, "name": "fp32"}
        if torch.cuda.is_bf16_supported():
            return {"bf16": True, "fp16": False, "use_cpu": False, "name": "bf16"}
        return {"bf16": False, "fp16": True, "use_cpu": False, "name": "fp16"}
    if precision == "fp16" and not cuda:
        raise StageError("spec.training.precision: fp16 needs a GPU; use auto, bf16 or fp32 on CPU", config_error=True)
    return {"bf16": precision == "bf16", "fp16": precision == "fp16", "use_cpu": not cuda, "name": precision}


def _torch_dtype(name: str, fallback: Any) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(name, fallback)


def load_base_model(
    config: StageConfig,
    model_path: str,
    precision: dict[str, Any],
    *,
    for_reward: bool = False,
    for_training: bool = True,
) -> Any:
    """The base model as the method wants it: full precision, half precision base for LoRA, or 4/8-bit for QLoRA."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    spec = config.spec
    method = spec.method
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision["name"], torch.float32)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.model.trust_remote_code}
    if method.type == "full":
        # Master weights stay fp32 under mixed precision unless the spec pins a dtype.
        kwargs["dtype"] = _torch_dtype(spec.model.dtype, torch.float32)
    else:
        kwargs["dtype"] = _torch_dtype(spec.model.dtype, half)
    if method.type == "qlora":
        quant = method.quantization
        assert quant is not None  # the CRD guarantees it
        compute = _torch_dtype(quant.compute_dtype, torch.bfloat16)
        if quant.bits == 4:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type=quant.type,
                bnb_4bit_use_double_quant=quant.double_quant,
                bnb_4bit_compute_dtype=compute,
                bnb_4bit_quant_storage=kwargs["dtype"],
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = (
            {"": int(os.environ.get("LOCAL_RANK", "0"))} if torch.cuda.is_available() else {"": "cpu"}
        )
    if torch.cuda.is_available():
        import importlib.util

        kwargs["attn_implementation"] = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    try:
        if for_reward:
            model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=1, **kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError) as exc:
        raise StageError(f"spec.model: cannot load {model_path}: {exc}", config_error=True) from exc
    if method.type == "qlora" and for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.training.gradient_checkpointing)
    return model


def lora_config(config: StageConfig, *, for_reward: bool = False) -> Any:
    from peft import LoraConfig

    lora = config.spec.method.lora
    targets: Any = "all-linear" if lora.target_modules == ["all-linear"] else list(lora.target_modules)
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        bias=lora.bias,
        modules_to_save=list(lora.modules_to_save) or None,
        task_type="SEQ_CLS" if for_reward else "CAUSAL_LM",
    )


class ProgressReporter:
    """A TrainerCallback that prints one JSON progress line per logging step (rank 0 only)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.last_time = self.started
        self.last_tokens = 0
        self.start_tokens = 0
        self.last_step = 0
        self.first_step: int | None = None
        self.history: list[dict[str, Any]] = []
        self.last_checkpoint: dict[str, Any] | None = None

    def as_callback(self) -> Any:
        from transformers import TrainerCallback

        reporter = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
                reporter.first_step = state.global_step
                reporter.last_step = state.global_step
                reporter.last_tokens = reporter.start_tokens = state.num_input_tokens_seen or 0
                reporter.started = reporter.last_time = time.monotonic()

            def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
                if state.is_world_process_zero and logs and "loss" in logs:
                    reporter.report(state, logs)

        return _Callback()

    def report(self, state: Any, logs: dict[str, Any]) -> None:
        now = time.monotonic()
        tokens = state.num_input_tokens_seen or 0
        rate = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        done = state.global_step - (self.first_step or 0)
        per_step = (now - self.started) / max(done, 1)
        remaining = max(state.max_steps - state.global_step, 0) * per_step
        record = {
            "step": state.global_step,
            "totalSteps": state.max_steps,
            "epoch": round(state.epoch or 0.0, 4),
            "loss": round(float(logs["loss"]), 6),
            "learningRate": float(logs.get("learning_rate", 0.0)),
            "tokensPerSecond": round(rate, 1),
            "etaSeconds": round(remaining, 1),
        }
        if self.last_checkpoint:
            record["lastCheckpoint"] = self.last_checkpoint
        self.history.append(record)
        self.last_time, self.last_tokens, self.last_step = now, tokens, state.global_step
        emit("progress", "train", **record)


def resolve_batch(config: StageConfig, workdir: Workdir) -> dict[str, Any]:
    """Micro-batch and accumulation: after an out-of-memory recovery, what it chose; else batchSize (auto: the
    largest micro-batch the estimate fits, from the inputs prepare recorded) with effectiveBatchSize kept."""
    from .. import estimate as estimator

    state_file = workdir.checkpoints / BATCH_STATE
    if state_file.exists():
        return json.loads(state_file.read_text())
    tr = config.spec.training
    inputs_file = workdir.reports / "estimate.json"
    if inputs_file.exists():
        inputs = json.loads(inputs_file.read_text())
        try:
            plan = estimator.job_estimate(config.spec, inputs["architecture"], inputs["data"]).plan
            return {"microBatch": plan.micro_batch, "gradientAccumulationSteps": plan.grad_accum, "oomRecoveries": []}
        except (estimator.EstimateError, KeyError, TypeError, ValueError) as exc:
            emit("step", "train", message=f"no estimate for the batch size ({exc}); using the spec's")
    micro = tr.batch_size if isinstance(tr.batch_size, int) else 1
    accumulation = tr.gradient_accumulation_steps
    if tr.effective_batch_size:
        world = config.spec.resources.workers * max(1, config.spec.resources.gpus_per_worker)
        accumulation = max(1, math.ceil(tr.effective_batch_size / (micro * world)))
    return {"microBatch": micro, "gradientAccumulationSteps": accumulation, "oomRecoveries": []}


def halve_batch(batch: dict[str, Any], at_step: int) -> dict[str, Any]:
    """The next micro-batch after an out-of-memory error: the largest divisor at most half, with accumulation
    raised by the same factor (same effective batch, so the same sequences per optimizer step)."""
    micro = batch["microBatch"]
    smaller = next(d for d in range(micro // 2, 0, -1) if micro % d == 0)
    accumulation = batch["gradientAccumulationSteps"] * (micro // smaller)
    record = {"atStep": at_step, "microBatch": smaller, "gradientAccumulationSteps": accumulation}
    return {"microBatch": smaller, "gradientAccumulationSteps": accumulation,
            "oomRecoveries": [*batch.get("oomRecoveries", []), record]}  # fmt: skip


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError) or "CUDA out of memory" in str(exc)


def _common_args(
    config: StageConfig, workdir: Workdir, precision: dict[str, Any], batch: dict[str, Any] | None = None
) -> dict[str, Any]:
    spec = config.spec
    tr = spec.training
    batch = batch or resolve_batch(config, workdir)
    args: dict[str, Any] = {
        "output_dir": str(workdir.checkpoints),
        "per_device_train_batch_size": batch["microBatch"],
        "gradient_accumulation_steps": batch["gradientAccumulationSteps"],
        "learning_rate": tr.learning_rate,
        "lr_scheduler_type": tr.lr_scheduler,
        "warmup_ratio": tr.warmup_ratio,
        "weight_decay": tr.weight_decay,
        "max_grad_norm": tr.max_grad_norm,
        "optim": tr.optimizer,
        "seed": tr.seed,
        "data_seed": tr.seed,
        "num_train_epochs": tr.epochs if tr.epochs is not None else 1.0,
        "max_steps": tr.max_steps if tr.max_steps is not None else -1,
        "bf16": precision["bf16"],
        "fp16": precision["fp16"],
        "use_cpu": precision["use_cpu"],
        "gradient_checkpointing": tr.gradient_checkpointing,
        "gradient_checkpointing_kwargs": {"use_reentrant": False} if tr.gradient_checkpointing else None,
        "logging_steps": tr.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps",
        "save_steps": tr.checkpoint_every_steps,
        "save_total_limit": tr.keep_checkpoints,
        "report_to": [],
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "include_num_input_tokens_seen": "non_padding",
        "ddp_find_unused_parameters": False,
        # A lost peer fails the collective after this long (then all workers restart), not after 30 minutes.
        "ddp_timeout": spec.distributed.collective_timeout_seconds,
    }
    if spec.distributed.strategy == "fsdp":
        args["fsdp"] = "full_shard auto_wrap"
        args["fsdp_config"] = {"use_orig_params": spec.method.type != "full", "sync_module_states": True}
    return args


def _exact_match_reward(kind: str):
    def normalise(text: str) -> str:
        return " ".join(text.strip().lower().split())

    def reward(completions: list[Any], reference: list[str], **_: Any) -> list[float]:
        scores = []
        for completion, expected in zip(completions, reference, strict=True):
            text = completion if isinstance(completion, str) else completion[-1]["content"]
            got, want = normalise(text.split("\n")[0] if kind == "exactMatch" else text), normalise(expected)
            scores.append(float(got == want) if kind == "exactMatch" else float(want in got))
        return scores

    reward.__name__ = f"{kind}_reward"
    return reward


def build_trainer(
    config: StageConfig,
    workdir: Workdir,
    tokenizer: Any,
    precision: dict[str, Any],
    batch: dict[str, Any] | None = None,
) -> Any:
    from datasets import load_from_disk

    spec = config.spec
    objective = spec.training.objective
    sources = workdir.read_sources()
    model_path = sources.get("model", {}).get("path")
    if not model_path or not workdir.train_data.exists():
        raise StageError("the prepare stage has not completed in this workdir (no prepared data)", config_error=True)
    train = load_from_disk(str(workdir.train_data))
    common = _common_args(config, workdir, precision, batch)
    peft = spec.method.type in ("lora", "qlora")
    model = load_base_model(config, model_path, precision, for_reward=objective == "reward")
    if objective == "reward" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id

    if objective == "sft":
        from trl import SFTConfig, SFTTrainer

        padding_free = "seq_lengths" in train.column_names
        args = SFTConfig(
            **common,
            max_length=None,  # prepare already truncated or packed to maxSeqLength
            packing=False,
            padding_free=padding_free,
            dataset_kwargs={"skip_prepare_dataset": True},
            completion_only_loss=None,
        )
        return SFTTrainer(
            model=model, args=args, train_dataset=train, processing_class=tokenizer,
            peft_config=lora_config(config) if peft else None,
        )  # fmt: skip
    if objective == "dpo":
        from trl import DPOConfig, DPOTrainer

        dpo = spec.training.dpo
        args = DPOConfig(
            **common,
            beta=dpo.beta if dpo else 0.1,
            loss_type=[dpo.loss_type if dpo else "sigmoid"],
            max_length=spec.dataset.max_seq_length,
        )
        return DPOTrainer(
            model=model, args=args, train_dataset=train.select_columns(["prompt", "chosen", "rejected"]),
            processing_class=tokenizer, peft_config=lora_config(config) if peft else None,
        )  # fmt: skip
    if objective == "reward":
        from trl import RewardConfig, RewardTrainer

        args = RewardConfig(**common, max_length=spec.dataset.max_seq_length)
        # prepare saved the one join (formats.preference_texts): a sequence is prompt + answer, as DPO sees it.
        pairs = train.map(
            lambda r: {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]},
            remove_columns=train.column_names,
        )
        return RewardTrainer(
            model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
            peft_config=lora_config(config, for_reward=True) if peft else None,
        )  # fmt: skip
    # grpo
    from trl import GRPOConfig, GRPOTrainer

    grpo = spec.training.grpo
    assert grpo is not None  # the CRD guarantees it
    reward: Any
    if grpo.reward.type == "rewardModel":
        reward = sources.get("rewardModel", {}).get("path")
        if not reward:
            raise StageError("the reward model was not fetched by prepare", config_error=True)
    else:
        reward = _exact_match_reward(grpo.reward.type)
    args = GRPOConfig(
        **common,
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature,
        beta=grpo.beta,
    )
    prompts = train.map(lambda r: {"prompt": r["prompt_text"]}).select_columns(["prompt", "reference"])
    return GRPOTrainer(
        model=model, reward_funcs=[reward], args=args, train_dataset=prompts, processing_class=tokenizer,
        peft_config=lora_config(config) if peft else None,
    )  # fmt: skip


def _prepared_trainer(
    config: StageConfig,
    workdir: Workdir,
    tokenizer: Any,
    precision: dict[str, Any],
    batch: dict[str, Any],
    reporter: ProgressReporter,
    gang: GangCheckpointing,
) -> tuple[Any, Path | None]:
    from transformers.trainer_callback import PrinterCallback

    trainer = build_trainer(config, workdir, tokenizer, precision, batch)
    trainer.remove_callback(PrinterCallback)  # our JSON progress lines replace its dict prints
    trainer.add_callback(reporter.as_callback())
    trainer.add_callback(gang.as_callback())
    if os.environ.get(INJECT_OOM_ENV):
        trainer.add_callback(_injected_oom(int(os.environ[INJECT_OOM_ENV]), workdir.checkpoints / ".oom-injected"))
    resume = latest_valid_checkpoint(workdir.checkpoints)
    if trainer.is_world_process_zero():
        removed = remove_partial_checkpoints(workdir.checkpoints, resume)
        if removed:
            emit("step", "train", message=f"removed incomplete checkpoints {', '.join(sorted(removed))}")
    if resume is not None:
        _rebase_checkpoint(resume, batch["microBatch"])
        emit("step", "train", message=f"resuming from {resume.name}")
        reporter.last_checkpoint = _checkpoint_record(resume)
    return trainer, resume


def _rebase_checkpoint(checkpoint: Path, micro_batch: int) -> None:
    """The Trainer restores a checkpoint's own batch size on resume; after a recovery it must take the new one."""
    state_file = checkpoint / "trainer_state.json"
    state = json.loads(state_file.read_text())
    if state.get("train_batch_size") not in (None, micro_batch):
        state["train_batch_size"] = micro_batch
        state_file.write_text(json.dumps(state, indent=2))


def _recover_from_oom(
    config: StageConfig, workdir: Workdir, batch: dict[str, Any], resume: Path | None, exc: BaseException
) -> dict[str, Any]:
    if batch["microBatch"] <= 1:
        raise StageError(
            "CUDA out of memory at micro-batch 1: enable spec.training.gradientCheckpointing, use method qlora, "
            f"shard with spec.distributed.strategy: fsdp, or lower spec.dataset.maxSeqLength ({exc})".rstrip()
        ) from exc
    checkpoint = latest_valid_checkpoint(workdir.checkpoints)
    at_step = int(CHECKPOINT_RE.match(checkpoint.name).group(1)) if checkpoint else 0  # type: ignore[union-attr]
    halved = halve_batch(batch, at_step)
    workdir.checkpoints.mkdir(parents=True, exist_ok=True)
    (workdir.checkpoints / BATCH_STATE).write_text(json.dumps(halved, indent=2))
    emit(
        "step", "train", message=f"CUDA out of memory at micro-batch {batch['microBatch']}: resuming from step "
        f"{at_step} with micro-batch {halved['microBatch']} x accumulation {halved['gradientAccumulationSteps']}",
    )  # fmt: skip
    return halved


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _injected_oom(step: int, marker: Path) -> Any:
    """Raise a CUDA out-of-memory error once, when training reaches `step` (the marker keeps it to once)."""
    import torch
    from transformers import TrainerCallback

    class _InjectOom(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            if state.global_step >= step and not marker.exists():
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(str(step))
                raise torch.OutOfMemoryError(f"CUDA out of memory (injected by {INJECT_OOM_ENV}={step})")

    return _InjectOom()


def run_train(config: StageConfig, workdir: Workdir) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    from .search import searched_config

    meta_file = workdir.final / TRAIN_META
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("run") == config.run:
            return {**meta["summary"], "message": f"already trained (run {config.run}): {meta['summary']['message']}"}
    config, searched = searched_config(config, workdir)
    spec = config.spec
    if searched:
        chosen = ", ".join(f"{k}={v:g}" for k, v in searched.items())
        emit("step", "train", message=f"with the search's values: {chosen}")

    reporter = ProgressReporter()
    gang = GangCheckpointing(reporter)
    gang.install_signal_handler()  # before the slow part: a SIGTERM while loading still ends in a checkpoint
    precision = resolve_precision(spec.training.precision)
    allow_cpu_index_locations()
    torch.manual_seed(spec.training.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(workdir.tokenizer))
    batch = resolve_batch(config, workdir)
    freeze_what_is_loaded()  # before the model: one that an out-of-memory retry drops is still collected
    started = time.monotonic()
    while True:
        trainer, resume = _prepared_trainer(config, workdir, tokenizer, precision, batch, reporter, gang)
        try:
            result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
            break
        except Exception as exc:  # CUDA OOM: halve the micro-batch, keep the effective batch, resume
            if not _is_oom(exc):
                raise
            batch = _recover_from_oom(config, workdir, batch, resume, exc)
            if trainer.args.world_size > 1:
                # The other ranks wait in a collective: fail this attempt; the retry reads the halved batch.
                raise StageError(
                    f"CUDA out of memory; the retry continues with micro-batch {batch['microBatch']}"
                ) from exc
            del trainer
            _free_memory()
    elapsed = time.monotonic() - started
    state = trainer.state
    if gang.preempted_at is not None:
        return _preempted(gang, trainer)

    summary: dict[str, Any] = {}
    if trainer.is_world_process_zero():
        staging = workdir.final.with_name("final.partial")
        shutil.rmtree(staging, ignore_errors=True)
        trainer.save_model(str(staging))
        tokenizer.save_pretrained(str(staging))
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        tokens = state.num_input_tokens_seen or 0
        steps_run = state.global_step - (reporter.first_step or 0)
        summary = {
            "ok": True,
            "message": f"trained {state.global_step} steps"
            + (f" (resumed at step {reporter.first_step})" if resume else "")
            + (f", final loss {losses[-1]:.4f}" if losses else "")
            + (
                f"; recovered from {len(batch['oomRecoveries'])} CUDA out-of-memory error(s), now micro-batch "
                f"{batch['microBatch']} x accumulation {batch['gradientAccumulationSteps']}"
                if batch.get("oomRecoveries")
                else ""
            ),
            "steps": state.global_step,
            "totalSteps": state.max_steps,
            "epoch": state.epoch,
            "finalLoss": losses[-1] if losses else None,
            "firstLoss": losses[0] if losses else None,
            "trainLoss": float(result.training_loss) if not math.isnan(result.training_loss) else None,
            "resumedFrom": resume.name if resume else None,
            "microBatch": batch["microBatch"],
            "gradientAccumulationSteps": batch["gradientAccumulationSteps"],
            "oomRecoveries": batch.get("oomRecoveries", []),
            "tokensPerSecond": round((tokens - reporter.start_tokens) / elapsed, 1) if steps_run else None,
            "runtimeSeconds": round(elapsed, 1),
            "precision": precision["name"],
            "worldSize": trainer.args.world_size,
            "artifact": "adapter" if spec.method.type != "full" else "model",
            "objective": spec.training.objective,
            "learningRate": spec.training.learning_rate,
            "searched": searched,
            "progress": reporter.history[-1] if reporter.history else None,
            "lastCheckpoint": reporter.last_checkpoint,
            "checkpointSeconds": round(sum(gang.save_seconds) / len(gang.save_seconds), 3)
            if gang.save_seconds
            else None,
        }
        (staging / TRAIN_META).write_text(json.dumps({"run": config.run, "summary": summary}, indent=2))
        shutil.rmtree(workdir.final, ignore_errors=True)
        os.replace(staging, workdir.final)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    return summary or {"ok": True, "message": "worker finished"}


def _restore_cpu_index(storage: Any, location: str) -> Any:
    return storage if location.startswith("cpu:") else None


def allow_cpu_index_locations() -> None:
    """Let torch.load map to "cpu:N". Under DDP on CPU the Trainer resumes the optimizer with
    map_location=args.device, which is cpu:<local rank>, and torch knows no such location: without this a
    multi-worker CPU run could never resume from its checkpoint."""
    import torch

    if not any(entry[2] is _restore_cpu_index for entry in torch.serialization._package_registry):
        torch.serialization.register_package(11, lambda obj: None, _restore_cpu_index)


def _checkpoint_record(folder: Path) -> dict[str, Any]:
    try:
        marker = json.loads((folder / CHECKPOINT_MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        marker = {}
    step = int(CHECKPOINT_RE.match(folder.name).group(1))  # type: ignore[union-attr]
    stamp = marker.get("time") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(folder.stat().st_mtime))
    return {"step": step, "time": stamp, "location": str(folder)}


def _preempted(gang: GangCheckpointing, trainer: Any) -> dict[str, Any]:
    """SIGTERM ended training after a step: the checkpoint of that step is saved on every rank."""
    step = gang.preempted_at
    return {
        "ok": False,
        "exitCode": EXIT_PREEMPTED,
        "reason": "Preempted",
        "preempted": True,
        "steps": step,
        "lastCheckpoint": gang.last_checkpoint,
        "message": f"stopped by SIGTERM after step {step}: checkpoint-{step} saved on all "
        f"{trainer.args.world_size} worker(s); the next attempt resumes at step {step}",
    }
