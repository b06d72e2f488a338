"""The prepare stage on every format and public layout, its cleaning report, and its fail-fast messages."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from datasets import load_from_disk
from transformers import AutoTokenizer

from finetune_operator.stages.contract import EXIT_CONFIG_ERROR, parse_line
from finetune_operator.stages.runner import limit_math_threads, run_stage

from .conftest import first_word_rows, local_spec, stage_config, write_jsonl


def prepare(tmp: Path, spec: dict) -> tuple[int, dict, Path]:
    work = tmp / "work"
    code = run_stage("prepare", stage_config(tmp, spec), work)
    summary_file = work / "summaries" / "prepare.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    return code, summary, work


def trained_text(work: Path, row: int = 0) -> tuple[str, str]:
    """The decoded training row and the decoded tokens that carry loss."""
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    record = load_from_disk(str(work / "data" / "train"))[row]
    return tok.decode(record["input_ids"]), tok.decode([t for t in record["labels"] if t != -100])


def test_alpaca_layout_with_completion_only_loss(tmp_path, micro_model):
    data = write_jsonl(tmp_path / "alpaca.jsonl", first_word_rows(60))
    code, summary, work = prepare(tmp_path, local_spec(micro_model, data))
    assert code == 0, summary
    text, trained = trained_text(work)
    prompt, answer = text.split("\n")[0:2], text.split("\n")[2]
    assert prompt[0] == "Give the first word." and len(prompt[1].split()) == 3
    assert trained == answer  # the loss covers the answer and EOS, never the prompt
    report = json.loads((work / "reports" / "preflight.json").read_text())
    assert report["rows"]["in"] == 60 and report["rows"]["train"] + report["rows"]["eval"] <= 60
    assert 0 < report["tokens"]["label_coverage"] < 0.5
    assert set(report["tokens"]["percentiles"]) == {"p50", "p90", "p95", "p99"}
    ev = load_from_disk(str(work / "data" / "eval"))
    assert {"prompt_text", "reference", "input_ids", "labels"} <= set(ev.column_names)
    assert ev[0]["prompt_text"].startswith("Give the first word.\n") and ev[0]["prompt_text"].endswith("\n")


def test_sharegpt_layout_trains_on_assistant_turns_only(tmp_path, micro_model):
    rows = [
        {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"pick {w}"},
                           {"from": "gpt", "value": w}, {"from": "human", "value": "again"},
                           {"from": "gpt", "value": f"{w} {w}"}]}
        for w in ("red", "blue", "green", "cat", "dog", "fox")
    ]  # fmt: skip
    data = write_jsonl(tmp_path / "sharegpt.jsonl", rows)
    spec = local_spec(micro_model, data, dataset={"format": "chat", "validationFraction": 0.2, "maxSeqLength": 512,
                                                  "columns": {"messages": "conversations", "role": "from",
                                                              "content": "value"}})  # fmt: skip
    code, summary, work = prepare(tmp_path, spec)
    assert code == 0, summary
    text, trained = trained_text(work)
    assert "<|user|>\npick" in text and "<|system|>\nBe brief." in text
    word = text.split("<|assistant|>\n")[1].split("<|eos|>")[0]
    assert [t.strip() for t in trained.split("<|eos|>")] == [word, f"{word} {word}", ""]
    assert summary["tokens"]["truncation_rate"] == 0


def test_openai_messages_layout_and_chat_eval_prompt(tmp_path, micro_model):
    rows = [{"messages": [{"role": "user", "content": f"say {w}"}, {"role": "assistant", "content": w}]}
            for w in ("red", "blue", "green", "cat", "dog")]  # fmt: skip
    data = write_jsonl(tmp_path / "openai.jsonl", rows)
    spec = local_spec(micro_model, data, dataset={"format": "chat", "columns": {}, "validationFraction": 0.2})
    code, summary, work = prepare(tmp_path, spec)
    assert code == 0, summary
    ev = load_from_disk(str(work / "data" / "eval"))[0]
    assert ev["prompt_text"].endswith("<|assistant|>\n") and f"say {ev['reference']}<|eos|>" in ev["prompt_text"]


def test_hh_preference_pairs_get_their_prompt_split_off(tmp_path, micro_model):
    rows = [
        {
            "chosen": f"\n\nHuman: favourite {w}?\n\nAssistant: {w} is great",
            "rejected": f"\n\nHuman: favourite {w}?\n\nAssistant: no",
        }
        for w in ("red", "cat", "dog", "owl")
    ]
    data = write_jsonl(tmp_path / "hh.jsonl", rows)
    spec = local_spec(micro_model, data, dataset={"format": "preference", "columns": {}, "validationFraction": 0.25},
                      training={"objective": "dpo"})  # fmt: skip
    code, summary, work = prepare(tmp_path, spec)
    assert code == 0, summary
    row = load_from_disk(str(work / "data" / "train"))[0]
    record = json.loads(row["record"])
    assert record["prompt"].endswith("Assistant:") and record["rejected"] == " no"
    assert record["chosen"].endswith("is great")
    # The tokenizer has a chat template: the transcript becomes a user turn, the answers assistant turns.
    assert row["prompt"].startswith("<|user|>\nfavourite ") and row["prompt"].endswith("<|assistant|>\n")
    assert row["rejected"] == "no<|eos|>" and row["chosen"].endswith("is great<|eos|>")


def test_text_format_from_txt_and_sentencepiece_tokenizer(tmp_path, micro_sp_model):
    data = tmp_path / "corpus.txt"
    data.write_text("\n".join(f"the {w} cat sat on the mat" for w in ("red", "blue", "big", "old", "new", "shy")))
    spec = local_spec(micro_sp_model, data, dataset={"format": "text", "columns": {}, "validationFraction": 0.2})
    code, summary, work = prepare(tmp_path, spec)
    assert code == 0, summary
    text, trained = trained_text(work)
    assert "cat sat on the mat" in text and trained == text  # loss on every token of plain text
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    assert type(tok).__name__ == "LlamaTokenizerFast"


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_other_file_types(tmp_path, micro_model, suffix):
    import pandas as pd

    frame = pd.DataFrame(first_word_rows(20))
    path = tmp_path / f"data{suffix}"
    {".csv": lambda: frame.to_csv(path, index=False), ".parquet": lambda: frame.to_parquet(path),
     ".json": lambda: path.write_text(frame.to_json(orient="records"))}[suffix]()  # fmt: skip
    code, summary, _ = prepare(tmp_path, local_spec(micro_model, path))
    assert code == 0 and summary["rows"]["in"] == 20


def test_cleaning_counts_every_drop_reason(tmp_path, micro_model):
    rows = first_word_rows(30)
    rows += [rows[0], rows[1]]  # duplicates
    rows += [{"instruction": "Give the first word.", "input": "", "output": "  "}]  # empty target
    rows += [{"instruction": "Give the first word. " * 20, "input": "x", "output": "y"}]  # too long
    rows += [{"instruction": "Cafe\u0301", "input": "", "output": "ok"}]  # NFC-normalised
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    spec = local_spec(micro_model, data, dataset={"cleaning": {"maxTokens": 40}, "validationFraction": 0.1})
    code, summary, work = prepare(tmp_path, spec)
    assert code == 0, summary
    dropped = summary["rows"]["dropped"]
    assert dropped["duplicate"] == 2 and dropped["empty"] == 1 and dropped["too_long"] == 1
    records = [json.loads(r)["prompt"] for r in load_from_disk(str(work / "data" / "eval"))["record"]]
    records += [json.loads(r)["prompt"] for r in _all_records(work)]
    assert "Caf\u00e9" in records and "Cafe\u0301" not in records


def _all_records(work: Path) -> list[str]:
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    return [json.dumps({"prompt": tok.decode(r["input_ids"]).split("\n")[0]})
            for r in load_from_disk(str(work / "data" / "train"))]  # fmt: skip


def test_truncation_is_reported_and_packing_makes_full_blocks(tmp_path, micro_model):
    long_text = tmp_path / "long.txt"
    long_text.write_text("\n".join(" ".join([f"the {w} cat sat"] * 6) for w in ("red", "blue", "old", "new", "shy")))
    spec = local_spec(micro_model, long_text, dataset={"format": "text", "columns": {}, "maxSeqLength": 16})
    code, summary, work = prepare(tmp_path / "plain", spec)
    assert code == 0 and summary["tokens"]["truncation_rate"] == 1.0
    assert max(len(r) for r in load_from_disk(str(work / "data" / "train"))["input_ids"]) == 16

    data = write_jsonl(tmp_path / "d.jsonl", first_word_rows(80))
    spec = local_spec(micro_model, data, dataset={"maxSeqLength": 32, "packing": True})
    code, summary, work = prepare(tmp_path / "packed", spec)
    assert code == 0
    report = json.loads((work / "reports" / "preflight.json").read_text())
    assert report["packing"]["strategy"] == "wrapped"  # no flash-attention here
    lengths = [len(r) for r in load_from_disk(str(work / "data" / "train"))["input_ids"]]
    assert all(n == 32 for n in lengths[:-1]) and report["packing"]["sequences"] < report["packing"]["rowsIn"]


def test_prompts_that_fill_the_sequence_are_dropped_with_a_reason(tmp_path, micro_model):
    rows = [{**r, "input": " ".join([r["input"]] * 6)} for r in first_word_rows(40)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code, summary, _ = prepare(tmp_path, local_spec(micro_model, data, dataset={"maxSeqLength": 16}))
    assert code == EXIT_CONFIG_ERROR
    assert "no training rows left after cleaning" in summary["message"] and "no_target_tokens" in summary["message"]
    assert "raise maxSeqLength" in summary["message"]


BAD_DATA = [
    (
        "missing-column",
        [{"question": "q", "output": "a"}],
        {},
        "needs a 'prompt' column, but the data has no column 'instruction' (columns: question, output). "
        "Map it with spec.dataset.columns.prompt",
    ),
    (
        "wrong-type",
        [*first_word_rows(3), {"instruction": "x", "input": "y", "output": 42}],
        {},
        "row 4: column 'output' (completion) is a int; expected a string",
    ),
    (
        "null-value",
        [*first_word_rows(2), {"instruction": None, "input": "y", "output": "z"}],
        {},
        "row 3: column 'instruction' (prompt) is empty (null)",
    ),
    (
        "unknown-role",
        [{"messages": [{"role": "narrator", "content": "x"}]}],
        {"format": "chat", "columns": {}},
        "row 1: message 0 has role 'narrator'",
    ),
    (
        "sharegpt-unmapped",
        [{"conversations": [{"from": "human", "value": "x"}]}],
        {"format": "chat", "columns": {"messages": "conversations"}},
        "message 0 needs keys 'role' and 'content' (has ['from', 'value']); map them with spec.dataset.columns.role",
    ),
    (
        "no-assistant",
        [{"messages": [{"role": "user", "content": "x"}]}],
        {"format": "chat", "columns": {}},
        "row 1: the conversation has no assistant message",
    ),
]


@pytest.mark.parametrize(("case", "rows", "dataset", "message"), BAD_DATA, ids=[c[0] for c in BAD_DATA])
def test_bad_data_fails_fast_naming_field_and_row(tmp_path, micro_model, case, rows, dataset, message, capfd):
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, summary, _ = prepare(tmp_path, local_spec(micro_model, data, dataset=dataset))
    assert code == EXIT_CONFIG_ERROR  # the operator's podFailurePolicy does not retry this
    assert summary["ok"] is False and summary["configError"] is True
    assert "spec.dataset.source" in summary["message"] and message in summary["message"]
    assert message in json.loads((tmp_path / "termination-log").read_text())["message"]
    lines = [parse_line(line) for line in capfd.readouterr().out.splitlines()]
    assert any(r and r.get("state") == "Failed" for r in lines)


def test_missing_file_and_missing_chat_template(tmp_path, micro_model):
    code, summary, _ = prepare(tmp_path / "a", local_spec(micro_model, tmp_path / "nope.jsonl"))
    assert code == EXIT_CONFIG_ERROR and "does not exist" in summary["message"]

    import shutil

    model = shutil.copytree(micro_model, tmp_path / "no-template")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "x"}]}])
    code, summary, _ = prepare(tmp_path / "b", local_spec(model, data, dataset={"format": "chat", "columns": {}}))
    assert code == EXIT_CONFIG_ERROR and "spec.model.tokenizer.chatTemplate" in summary["message"]


def test_a_stage_in_a_pod_uses_its_cpu_request_for_math_threads(tmp_path, micro_model, monkeypatch, capfd):
    """In a pod, FINETUNE_CPUS is the CPU request (the downward API): torch gets that many threads, shared among the
    node's training processes, not one per core of the node. The user's OMP_NUM_THREADS wins."""
    import torch

    data = write_jsonl(tmp_path / "d.jsonl", first_word_rows(40))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("FINETUNE_CPUS", "3")
    try:
        code, _, _ = prepare(tmp_path, local_spec(micro_model, data))  # torch already loaded, as in a forked pod
        assert code == 0 and torch.get_num_threads() == 3
        running = [r for r in map(parse_line, capfd.readouterr().out.splitlines()) if r and r.get("state") == "Running"]
        assert running[0]["mathThreads"] == 3
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("FINETUNE_CPUS", "8")
        assert limit_math_threads(processes=2) == 4 == torch.get_num_threads()  # 2 processes on the node
        assert limit_math_threads() is None  # OMP_NUM_THREADS is set now, as a user's would be: left alone
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.delenv("FINETUNE_CPUS")
        assert limit_math_threads() is None and "OMP_NUM_THREADS" not in os.environ  # local mode: torch's default
    finally:
        torch.set_num_threads(1)  # the suite's setting (conftest)
