"""The evaluate stage: the base and the tuned model on the eval split, then the quality gates.

The tuned model is also scored on as many training rows ("train"): a train score far above the eval score means
the model memorised its rows rather than learned the task.

perplexity uses the eval rows' loss masks (the same tokens training learned from); bleu, rouge and exactMatch
generate from the eval prompts (greedy unless spec.evaluation.generation.temperature > 0) and compare with the
references. Metric modules are the project's own Evaluate modules, loaded by path (no Hub).
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..api.spec import GENERATION_METRICS
from ..metrics import load_metric
from .contract import EXIT_GATE_FAILED, StageConfig, StageError, Workdir, emit

SAMPLES_KEPT = 10
ROUND = 6


def load_for_inference(config: StageConfig, workdir: Workdir, which: str) -> Any:
    """The base model or the tuned one (base + adapter, or the full fine-tune), in eval mode."""
    import torch

    from .train import load_base_model, resolve_precision

    precision = resolve_precision(config.spec.training.precision)
    base_path = workdir.read_sources().get("model", {}).get("path")
    if not base_path:
        raise StageError("the prepare stage has not completed in this workdir", config_error=True)
    final = workdir.final
    if which == "tuned" and not final.exists():
        raise StageError("the train stage has not completed in this workdir (no train/final)")
    reward = config.spec.training.objective == "reward"
    if which == "tuned" and config.spec.method.type == "full":
        model = load_base_model(config, str(final), precision, for_reward=reward, for_training=False)
    else:
        model = load_base_model(config, base_path, precision, for_reward=reward, for_training=False)
        if which == "tuned":
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(final))
    if torch.cuda.is_available() and not getattr(model, "hf_device_map", None):
        model = model.to("cuda")
    return model.eval()


def _device(model: Any) -> Any:
    return next(model.parameters()).device


def perplexity(model: Any, rows: Any, pad_id: int, batch_size: int) -> dict[str, float]:
    import torch

    nll_sums: list[float] = []
    counts: list[int] = []
    device = _device(model)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            longest = max(len(x) for x in chunk["input_ids"])
            ids = torch.full((len(chunk["input_ids"]), longest), pad_id)
            labels = torch.full_like(ids, -100)
            mask = torch.zeros_like(ids)
            for i, (x, y) in enumerate(zip(chunk["input_ids"], chunk["labels"], strict=True)):
                ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
            ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), reduction="none",
                ignore_index=-100,
            ).view(shift_labels.shape)  # fmt: skip
            valid = shift_labels != -100
            nll_sums += (loss * valid).sum(dim=1).tolist()
            counts += valid.sum(dim=1).tolist()
    return load_metric("perplexity").compute(predictions=nll_sums, references=counts)


def generate(model: Any, tokenizer: Any, prompts: list[str], config: StageConfig, batch_size: int) -> list[str]:
    import torch

    gen = config.spec.evaluation.generation
    add_special = config.spec.dataset.format != "chat"
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the right edge
    outputs: list[str] = []
    device = _device(model)
    try:
        for start in range(0, len(prompts), batch_size):
            encoded = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True,
                                add_special_tokens=add_special)  # fmt: skip
            # Only what training fed the model: some tokenizers add token_type_ids, which GPT-2 would embed.
            batch = {k: encoded[k].to(device) for k in ("input_ids", "attention_mask")}
            kwargs: dict[str, Any] = {"max_new_tokens": gen.max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                                      "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
            if gen.temperature > 0:
                kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p)
            else:
                kwargs.update(do_sample=False)
            with torch.no_grad():
                out = model.generate(**batch, **kwargs)
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
    return outputs


def generation_metrics(names: list[str], predictions: list[str], references: list[str]) -> dict[str, float]:
    results: dict[str, float] = {}
    if "bleu" in names:
        results.update(load_metric("bleu").compute(predictions=predictions, references=references))
    rouge = [n for n in names if n.startswith("rouge")]
    if rouge:
        scores = load_metric("rouge1").compute(predictions=predictions, references=references)
        results.update({n: scores[n] for n in rouge})
    if "exactMatch" in names:
        results.update(load_metric("exactMatch").compute(predictions=predictions, references=references))
    return results


def reward_accuracy(model: Any, tokenizer: Any, rows: Any, batch_size: int) -> dict[str, float]:
    """Share of pairs whose chosen answer the reward model scores above the rejected one."""
    import torch

    wins = 0
    device = _device(model)
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            scores = {}
            for side in ("chosen", "rejected"):
                # the one join prepare saved (formats.preference_texts), as the reward model was trained on it
                texts = [p + a for p, a in zip(chunk["prompt"], chunk[side], strict=True)]
                encoded = tokenizer(texts, return_tensors="pt", padding=True)
                batch = {k: encoded[k].to(device) for k in ("input_ids", "attention_mask")}
                scores[side] = model(**batch).logits.squeeze(-1)
            wins += int((scores["chosen"] > scores["rejected"]).sum())
    return {"rewardAccuracy": wins / max(len(rows), 1)}


def evaluate_model(config: StageConfig, model: Any, tokenizer: Any, rows: Any) -> tuple[dict[str, float], list[str]]:
    spec = config.spec
    batch = max(1, min(spec.training.batch_size * 2, 32)) if isinstance(spec.training.batch_size, int) else 8
    if spec.training.objective == "reward":
        return {k: round(float(v), ROUND) for k, v in reward_accuracy(model, tokenizer, rows, batch).items()}, []
    metrics: dict[str, float] = {}
    names = list(spec.evaluation.metrics)
    if "perplexity" in names:
        metrics.update(perplexity(model, rows, tokenizer.pad_token_id, batch))
    predictions: list[str] = []
    wanted = [n for n in names if n in GENERATION_METRICS]
    if wanted:
        predictions = generate(model, tokenizer, list(rows["prompt_text"]), config, batch)
        metrics.update(generation_metrics(wanted, predictions, list(rows["reference"])))
    return {k: round(float(v), ROUND) for k, v in metrics.items()}, predictions


def check_gates(config: StageConfig, tuned: dict[str, float]) -> list[dict[str, Any]]:
    results = []
    for gate in config.spec.evaluation.gates:
        value = tuned.get(gate.metric)
        passed = value is not None and not math.isnan(value)
        if passed and gate.min is not None:
            passed = value >= gate.min
        if passed and gate.max is not None:
            passed = value <= gate.max
        result: dict[str, Any] = {"metric": gate.metric, "value": value, "passed": passed}
        if gate.min is not None:
            result["min"] = gate.min
        if gate.max is not None:
            result["max"] = gate.max
        results.append(result)
    return results


def _gate_text(gate: dict[str, Any]) -> str:
    bounds = " and ".join(f"{k} {gate[k]}" for k in ("min", "max") if k in gate)
    return f"{gate['metric']} = {gate['value']} (needs {bounds})"


def summary_line(tuned: dict[str, float], base: dict[str, float], train: dict[str, float] | None = None) -> str:
    for key in ("exactMatch", "rougeL", "bleu", "perplexity", "rewardAccuracy"):
        if key in tuned:
            others = [f"{name} {values[key]:.4g}" for name, values in (("base", base), ("train", train or {}))
                      if key in values]  # fmt: skip
            return f"{key} {tuned[key]:.4g}" + (f" ({', '.join(others)})" if others else "")
    return ""


def run_evaluate(config: StageConfig, workdir: Workdir) -> dict[str, Any]:
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    spec = config.spec
    if not workdir.eval_data.exists():
        raise StageError("the prepare stage has not completed in this workdir (no eval data)", config_error=True)
    tokenizer = AutoTokenizer.from_pretrained(str(workdir.tokenizer))
    rows = load_from_disk(str(workdir.eval_data))
    rows = rows.select(range(min(len(rows), spec.evaluation.max_samples)))
    if len(rows) == 0:
        raise StageError(
            "spec.dataset: the eval split is empty; set evalSource or validationFraction", config_error=True
        )

    results: dict[str, Any] = {"rows": len(rows)}
    predictions: dict[str, list[str]] = {}
    plan = (["base"] if spec.evaluation.compare_base else []) + ["tuned"]
    train_rows = load_from_disk(str(workdir.train_sample)) if workdir.train_sample.exists() else None
    for which in plan:
        emit("step", "evaluate", message=f"evaluating the {which} model on {len(rows)} rows")
        model = load_for_inference(config, workdir, which)
        results[which], predictions[which] = evaluate_model(config, model, tokenizer, rows)
        if which == "tuned" and train_rows is not None and len(train_rows):
            # The same metrics on training rows: far above the eval score means memorised, not learned.
            emit("step", "evaluate", message=f"scoring the tuned model on {len(train_rows)} training rows")
            results["train"], _ = evaluate_model(config, model, tokenizer, train_rows)
        del model

    tuned, base, train = results["tuned"], results.get("base", {}), results.get("train", {})
    gates = check_gates(config, tuned)
    passed = all(g["passed"] for g in gates)
    results.update({"gates": gates, "gatesPassed": passed, "summary": summary_line(tuned, base, train)})
    workdir.evaluation.mkdir(parents=True, exist_ok=True)
    (workdir.evaluation / "results.json").write_text(json.dumps(results, indent=2))
    if predictions.get("tuned"):
        with (workdir.evaluation / "samples.jsonl").open("w") as handle:
            for i in range(min(SAMPLES_KEPT, len(rows))):
                sample = {"prompt": rows[i]["prompt_text"], "reference": rows[i]["reference"],
                          "tuned": predictions["tuned"][i]}  # fmt: skip
                if predictions.get("base"):
                    sample["base"] = predictions["base"][i]
                handle.write(json.dumps(sample, ensure_ascii=False) + "\n")

    failed = [g for g in gates if not g["passed"]]
    message = results["summary"] or "evaluated"
    summary: dict[str, Any] = {"ok": passed, "metrics": {"base": base, "tuned": tuned, "train": train}, "gates": gates,
                               "gatesPassed": passed, "summary": results["summary"]}  # fmt: skip
    if failed:
        summary.update(reason="GateFailed", exitCode=EXIT_GATE_FAILED,
                       message="quality gate failed: " + "; ".join(_gate_text(g) for g in failed))  # fmt: skip
    else:
        summary["message"] = message + (f"; {len(gates)} gate(s) passed" if gates else "")
    return summary
