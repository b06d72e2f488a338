"""The prepare stage (CPU only): fetch, validate, clean, split, tokenize, pack, and report.

Everything that can go wrong with the inputs goes wrong here, before a GPU is requested: a missing column, a
row of the wrong type, a tokenizer without a chat template, a dataset that cleaning empties.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from .contract import DataError, StageConfig, StageError, Workdir, emit
from .formats import (
    NullValue,
    canonicalize,
    check_columns,
    is_empty,
    preference_texts,
    prompt_text,
    reference_text,
    tokenize_batch,
)
from .sources import Rows, fetch_model_dir, load_rows

DEFAULT_VALIDATION_FRACTION = 0.05
PARALLEL_TOKENIZE_ROWS = 20_000


def load_tokenizer(config: StageConfig, workdir: Workdir, model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    spec = config.spec
    source: Path = model_dir
    tok_spec = spec.model.tokenizer
    if tok_spec and tok_spec.source:
        source, _ = fetch_model_dir(
            tok_spec.source,
            tok_spec.revision,
            spec.model.credentials,
            workdir.root / "tokenizer-src",
            config,
            "model.tokenizer",
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(source), use_fast=True, trust_remote_code=spec.model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise StageError(f"spec.model: cannot load a tokenizer from {source}: {exc}", config_error=True) from exc
    if not tokenizer.is_fast:
        raise StageError(
            "spec.model.tokenizer: a fast (Rust) tokenizer is needed for loss masking; install sentencepiece and "
            "protobuf in the image so the slow one converts, or point spec.model.tokenizer.source at a fast one",
            config_error=True,
        )
    if tokenizer.eos_token is None:
        raise StageError("spec.model.tokenizer: the tokenizer has no EOS token", config_error=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padded positions never carry loss, so reusing EOS is safe
    if tok_spec and tok_spec.chat_template:
        tokenizer.chat_template = tok_spec.chat_template
    if spec.dataset.format == "chat" and not tokenizer.chat_template:
        raise StageError(
            "spec.model.tokenizer.chatTemplate: the tokenizer has no chat template; the chat format needs one "
            "(set spec.model.tokenizer.chatTemplate to a Jinja template)",
            config_error=True,
        )
    return tokenizer


def _canonical(config: StageConfig, rows: Rows, field: str) -> Any:
    spec = config.spec.dataset
    raw = rows.dataset
    check_columns(spec, list(raw.column_names), field)

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        records = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        out: dict[str, list] = {"record": [], "drop": []}
        for index, record in zip(indices, records, strict=True):
            canonical = canonicalize(spec, record, index + 1, field)
            out["record"].append(json.dumps(canonical, ensure_ascii=False))
            out["drop"].append("empty" if spec.cleaning.drop_empty and is_empty(spec.format, canonical) else "")
        return out

    try:
        return raw.map(convert, batched=True, with_indices=True, remove_columns=raw.column_names)
    except NullValue as exc:
        raise rows.explain_null(exc) from None


def _dedupe(drops: list[str], records: list[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for reason, record in zip(drops, records, strict=True):
        if reason:
            out.append(reason)
            continue
        digest = hashlib.sha256(record.encode()).hexdigest()
        out.append("duplicate" if digest in seen else "")
        seen.add(digest)
    return out


def _tokenize(config: StageConfig, ds: Any, tokenizer: Any) -> Any:
    spec = config.spec.dataset
    fmt = spec.format
    limit = None if spec.packing else spec.max_seq_length

    def encode(batch: dict[str, list]) -> dict[str, list]:
        records = [json.loads(r) for r in batch["record"]]
        encoded = tokenize_batch(fmt, records, tokenizer, limit)
        if fmt == "preference":
            # input_ids/labels are the chosen sequence (perplexity); the longer answer decides the row's length.
            joined = [preference_texts(r, tokenizer) for r in records]
            rejected = tokenizer([t["prompt"] + t["rejected"] for t in joined])["input_ids"]
            eos = tokenizer.eos_token or ""
            answers = tokenizer([t["chosen"] for t in joined], add_special_tokens=False)["input_ids"]
            for e, r, t, a in zip(encoded, rejected, joined, answers, strict=True):
                e["full_length"] = max(e["full_length"], len(r) + (0 if t["rejected"].endswith(eos) else 1))
                # The DPO trainer truncates long prompts itself (maxPromptLength): only an empty answer is unusable.
                e["label_tokens"] = len(a)
        return {
            "input_ids": [e["input_ids"] for e in encoded],
            "labels": [e["labels"] for e in encoded],
            "full_length": [e["full_length"] for e in encoded],
            "label_tokens": [e.get("label_tokens", sum(t != -100 for t in e["labels"])) for e in encoded],
        }

    workers = min(os.cpu_count() or 1, 8) if len(ds) >= PARALLEL_TOKENIZE_ROWS else None
    return ds.map(encode, batched=True, num_proc=workers, desc="tokenize")


def _length_filter(config: StageConfig, ds: Any) -> tuple[Any, Counter]:
    cleaning = config.spec.dataset.cleaning
    reasons: Counter = Counter()
    keep = []
    for i, (length, labelled) in enumerate(zip(ds["full_length"], ds["label_tokens"], strict=True)):
        if cleaning.min_tokens is not None and length < cleaning.min_tokens:
            reasons["too_short"] += 1
        elif cleaning.max_tokens is not None and length > cleaning.max_tokens:
            reasons["too_long"] += 1
        elif labelled == 0:
            reasons["no_target_tokens"] += 1  # the prompt alone filled maxSeqLength
        else:
            keep.append(i)
    return ds.select(keep), reasons


def _statistics(lengths: list[int], labelled: list[int], max_len: int, batch_size: int, seed: int) -> dict[str, Any]:
    import numpy as np
    from scipy import stats

    if not lengths:
        return {}
    arr = np.asarray(lengths, dtype=np.float64)
    q1, q3 = np.percentile(arr, [25, 75])
    iqr_high = q3 + 1.5 * (q3 - q1)
    clipped = np.minimum(arr, max_len)
    # Padding waste under dynamic padding: random batches of batch_size, each padded to its longest row.
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    padded = real = 0.0
    for start in range(0, len(order), batch_size):
        batch = clipped[order[start : start + batch_size]]
        padded += batch.max() * len(batch)
        real += batch.sum()
    return {
        "rows": len(lengths),
        "mean": round(float(arr.mean()), 2),
        "std": round(float(arr.std()), 2),
        "min": int(arr.min()),
        "max": int(arr.max()),
        "percentiles": {f"p{p}": float(np.percentile(arr, p)) for p in (50, 90, 95, 99)},
        "skewness": round(float(stats.skew(arr)), 3) if len(arr) > 2 and arr.std() > 0 else 0.0,
        "outliers": {"iqr_upper_fence": float(iqr_high), "count": int((arr > iqr_high).sum())},
        "truncation_rate": round(float((arr > max_len).mean()), 4),
        "label_coverage": round(float(np.sum(labelled) / max(clipped.sum(), 1)), 4),
        "padding_waste_dynamic": round(1 - real / padded, 4) if padded else 0.0,
    }


def _fingerprint(ds: Any) -> str:
    digest = hashlib.sha256()
    for record in ds["record"]:
        digest.update(record.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _finish_columns(config: StageConfig, ds: Any, tokenizer: Any, *, is_eval: bool) -> Any:
    """Shape the saved datasets for the consumers: trainers (train) and metrics (eval)."""
    fmt = config.spec.dataset.format
    objective = config.spec.training.objective

    def add_text(batch: dict[str, list]) -> dict[str, list]:
        records = [json.loads(r) for r in batch["record"]]
        out: dict[str, list] = {}
        if fmt == "preference":
            joined = [preference_texts(r, tokenizer) for r in records]
            out = {k: [t[k] for t in joined] for k in ("prompt", "chosen", "rejected")}
            dpo = config.spec.training.dpo
            if dpo and dpo.max_prompt_length:
                # Keep the end of long prompts: the turn being answered matters more than the opening.
                ids = tokenizer(out["prompt"], add_special_tokens=False)["input_ids"]
                out["prompt"] = [
                    tokenizer.decode(x[-dpo.max_prompt_length :]) if len(x) > dpo.max_prompt_length else p
                    for x, p in zip(ids, out["prompt"], strict=True)
                ]
        if fmt != "text" and (is_eval or objective == "grpo"):
            out["prompt_text"] = [prompt_text(fmt, r, tokenizer) for r in records]
            out["reference"] = [reference_text(fmt, r) for r in records]
        return out

    ds = ds.map(add_text, batched=True)
    drop = [c for c in ("full_length", "label_tokens", "drop") if c in ds.column_names]
    if not is_eval and fmt != "preference" and objective != "grpo":
        drop.append("record")
    return ds.remove_columns(drop)


def _pack(ds: Any, seq_length: int) -> tuple[Any, str]:
    """Pack token rows into sequences of seq_length.

    With flash-attention, best-fit-decreasing bins plus padding-free batches keep documents apart at no cost.
    Without it, TRL's padding-free path runs the whole batch as one sequence with quadratic attention (measured:
    ~10 s per 16-row step on CPU), so rows are concatenated and cut into fixed blocks ("wrapped"), EOS between
    documents, as in classic causal-LM packing.
    """
    import importlib.util

    from trl.data_utils import pack_dataset

    strategy = "bfd" if importlib.util.find_spec("flash_attn") else "wrapped"
    return pack_dataset(ds.select_columns(["input_ids", "labels"]), seq_length, strategy), strategy


def run_prepare(config: StageConfig, workdir: Workdir) -> dict[str, Any]:
    spec = config.spec
    ds_spec = spec.dataset
    workdir.root.mkdir(parents=True, exist_ok=True)
    emit("step", "prepare", message="fetching the model")
    model_dir, revision = fetch_model_dir(
        spec.model.source, spec.model.revision, spec.model.credentials, workdir.model, config, "model"
    )
    tokenizer = load_tokenizer(config, workdir, model_dir)
    sources: dict[str, Any] = {"model": {"path": str(model_dir), "revision": revision}}
    grpo = spec.training.grpo
    if grpo and grpo.reward.type == "rewardModel" and grpo.reward.source:
        reward_dir, reward_rev = fetch_model_dir(
            grpo.reward.source, None, spec.model.credentials, workdir.reward_model, config, "training.grpo.reward"
        )
        sources["rewardModel"] = {"path": str(reward_dir), "revision": reward_rev}

    emit("step", "prepare", message="loading and checking the data")
    scratch = workdir.data / "scratch"
    raw = load_rows(ds_spec.source, ds_spec.split, ds_spec.credentials, scratch, config, "spec.dataset.source")
    rows_in = len(raw.dataset)
    if rows_in == 0:
        raise DataError(f"spec.dataset.source: {ds_spec.source} has no rows")
    train = _canonical(config, raw, "spec.dataset.source")
    train = (
        train.add_column("drop_final", _dedupe(train["drop"], train["record"]))
        if ds_spec.cleaning.deduplicate
        else train.add_column("drop_final", train["drop"])
    )
    dropped = Counter(r for r in train["drop_final"] if r)
    train = train.filter(lambda r: not r, input_columns="drop_final").remove_columns("drop_final")

    seed = spec.training.seed
    if ds_spec.eval_source:
        raw_eval = load_rows(
            ds_spec.eval_source, ds_spec.split, ds_spec.credentials, scratch, config, "spec.dataset.evalSource"
        )
        evaluation = _canonical(config, raw_eval, "spec.dataset.evalSource")
        evaluation = evaluation.filter(lambda r: not r, input_columns="drop")
        split_note = f"evalSource ({len(evaluation)} rows)"
    else:
        fraction = ds_spec.validation_fraction or DEFAULT_VALIDATION_FRACTION
        if len(train) < 2:
            raise DataError(f"spec.dataset.source: only {len(train)} usable row(s) after cleaning; need at least 2")
        held = max(1, round(fraction * len(train)))
        parts = train.train_test_split(test_size=held, seed=seed)
        train, evaluation = parts["train"], parts["test"]
        split_note = f"validationFraction {fraction} ({held} rows, seed {seed})"

    emit("step", "prepare", message="tokenizing")
    train = _tokenize(config, train, tokenizer)
    evaluation = _tokenize(config, evaluation, tokenizer)
    train, length_drops = _length_filter(config, train)
    evaluation, _ = _length_filter(config, evaluation)
    dropped.update(length_drops)
    if ds_spec.max_rows is not None and len(train) > ds_spec.max_rows:
        dropped["over_max_rows"] += len(train) - ds_spec.max_rows
        train = train.select(range(ds_spec.max_rows))
    if len(train) == 0:
        raise DataError(
            f"spec.dataset: no training rows left after cleaning ({dict(dropped)}); relax spec.dataset.cleaning "
            "or raise maxSeqLength"
        )

    stats = _statistics(
        train["full_length"],
        train["label_tokens"],
        ds_spec.max_seq_length,
        spec.training.batch_size if isinstance(spec.training.batch_size, int) else 1,  # auto: sized after this
        seed,
    )
    fingerprint = _fingerprint(train)
    train_out = _finish_columns(config, train, tokenizer, is_eval=False)
    eval_out = _finish_columns(config, evaluation, tokenizer, is_eval=True)
    packing: dict[str, Any] | None = None
    if ds_spec.packing and ds_spec.format != "preference" and spec.training.objective != "grpo":
        rows_before = len(train_out)
        train_out, strategy = _pack(train_out, ds_spec.max_seq_length)
        packing = {"strategy": strategy, "rowsIn": rows_before, "sequences": len(train_out)}
        eval_limit = ds_spec.max_seq_length
        eval_out = eval_out.map(
            lambda r: {"input_ids": r["input_ids"][:eval_limit], "labels": r["labels"][:eval_limit]}
        )

    # The same metrics on as many training rows show memorisation next to generalisation.
    sample_size = min(len(train), len(eval_out), spec.evaluation.max_samples)
    train_sample = _finish_columns(config, train.select(range(sample_size)), tokenizer, is_eval=True)
    if packing:
        train_sample = train_sample.map(
            lambda r: {"input_ids": r["input_ids"][:eval_limit], "labels": r["labels"][:eval_limit]}
        )
    outputs = ((workdir.train_data, train_out), (workdir.eval_data, eval_out), (workdir.train_sample, train_sample))
    for target, ds in outputs:
        if target.exists():
            shutil.rmtree(target)
        ds.save_to_disk(str(target))
    tokenizer.save_pretrained(str(workdir.tokenizer))
    shutil.rmtree(scratch, ignore_errors=True)

    report = {
        "rows": {
            "in": rows_in,
            "train": len(train_out) if not packing else packing["rowsIn"],
            "eval": len(eval_out),
            "dropped": dict(dropped),
        },
        "split": split_note,
        "format": ds_spec.format,
        "tokens": stats,
        "maxSeqLength": ds_spec.max_seq_length,
        "packing": packing,
        "fingerprint": fingerprint,
        "tokenizer": {
            "class": type(tokenizer).__name__,
            "vocab": len(tokenizer),
            "chatTemplate": bool(tokenizer.chat_template),
        },
    }
    workdir.reports.mkdir(parents=True, exist_ok=True)
    (workdir.reports / "preflight.json").write_text(json.dumps(report, indent=2))
    estimate = _estimate(config, workdir, model_dir, report)
    sources["datasetFingerprint"] = fingerprint
    workdir.sources_file().write_text(json.dumps(sources, indent=2))
    message = (
        f"{report['rows']['train']} train / {len(eval_out)} eval rows from {rows_in}"
        + (
            f"; dropped {sum(dropped.values())} ({', '.join(f'{k} {v}' for k, v in sorted(dropped.items()))})"
            if dropped
            else ""
        )
        + (f"; truncated {stats['truncation_rate']:.1%}" if stats.get("truncation_rate") else "")
    )
    return {
        "ok": True,
        "message": message,
        "rows": report["rows"],
        "lineage": {"modelRevision": revision, "datasetFingerprint": fingerprint},
        "tokens": {k: stats.get(k) for k in ("mean", "max", "truncation_rate", "label_coverage")},
        **({"estimate": estimate} if estimate else {}),
    }


def _estimate(config: StageConfig, workdir: Workdir, model_dir: Path, report: dict[str, Any]) -> dict[str, Any] | None:
    """Memory per GPU and the work, from the fetched config.json and the counted data (status.estimate). The
    inputs go to reports/estimate.json, where the train stage reads them to resolve batchSize: auto."""
    from .. import estimate as est

    file = model_dir / "config.json"
    try:
        model_config = json.loads(file.read_text())
        data = est.data_shape(config.spec, report)
        result = est.job_estimate(config.spec, model_config, data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        emit("step", "prepare", message=f"no memory estimate: {exc}")
        return None
    summary = est.status_estimate(result, config.spec, model_config, str(file.name))
    inputs = {"architecture": est.architecture_essentials(model_config), "data": data, "estimate": summary}
    (workdir.reports / "estimate.json").write_text(json.dumps(inputs, indent=2))
    emit("step", "prepare", message="estimate: " + est.one_line(summary))
    return summary
