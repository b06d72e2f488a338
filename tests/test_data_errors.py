"""Broken data files: one line naming the field, the line and the cause, on every path (prepare and --init-model)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from finetune_operator.cli import main
from finetune_operator.stages.contract import EXIT_CONFIG_ERROR
from finetune_operator.stages.runner import run_stage

from .conftest import first_word_rows, local_spec, stage_config, write_jsonl

BAD_LINE_37 = "spec.dataset.source: line 37: invalid JSON (expecting ',' delimiter)"


def jsonl_with_bad_line_37(path: Path) -> Path:
    lines = [json.dumps(r) for r in first_word_rows(40)]
    lines[36] = lines[36].replace('", "input"', '" "input"')  # a comma lost between two keys
    path.write_text("\n".join(lines) + "\n")
    return path


def prepare_message(tmp: Path, spec: dict) -> tuple[int, str]:
    code = run_stage("prepare", stage_config(tmp, spec), tmp / "work")
    return code, json.loads((tmp / "work" / "summaries" / "prepare.json").read_text())["message"]


def manifest(tmp: Path, data: str, **dataset) -> Path:
    spec = {
        "model": {"source": "./model"},
        "dataset": {"source": data, "format": "completion", "maxSeqLength": 64,
                    "columns": {"prompt": "instruction", "input": "input", "completion": "output"}, **dataset},
        "training": {"maxSteps": 1},
        "resources": {"gpusPerWorker": 0},
        "output": {"uri": "./out"},
    }  # fmt: skip
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "finetune.dev/v1alpha1", "kind": "FineTuneJob",
                                    "metadata": {"name": "broken"}, "spec": spec}))  # fmt: skip
    return path


def test_a_bad_jsonl_line_is_named_by_prepare(tmp_path, micro_model):
    data = jsonl_with_bad_line_37(tmp_path / "d.jsonl")
    code, message = prepare_message(tmp_path, local_spec(micro_model, data))
    assert code == EXIT_CONFIG_ERROR
    assert message == BAD_LINE_37


def test_a_bad_jsonl_line_is_named_before_init_model_builds_anything(tmp_path, capsys):
    jsonl_with_bad_line_37(tmp_path / "d.jsonl")
    code = main(["run", str(manifest(tmp_path, "./d.jsonl")), "--init-model", "micro", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert BAD_LINE_37 in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "model").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.jsonl", "", "spec.dataset.source: the file is empty"),
        ("blank.json", "\n  \n", "spec.dataset.source: the file is empty"),
        ("array.json", '[\n  {"instruction": "a", "input": "b", "output": "c"},\n  {"instruction": "d"\n]\n',
         "spec.dataset.source: line 4: invalid JSON (expecting ',' delimiter)"),
        ("list-line.jsonl", '{"instruction": "a", "input": "b", "output": "c"}\n["d", "e"]\n',
         "spec.dataset.source: line 2: a JSON list; expected one object per line"),
    ],
)  # fmt: skip
def test_malformed_files_say_what_and_where(tmp_path, micro_model, name, content, message):
    data = tmp_path / name
    data.write_text(content)
    code, got = prepare_message(tmp_path, local_spec(micro_model, data))
    assert code == EXIT_CONFIG_ERROR and got == message


def test_a_bad_file_in_a_folder_source_is_named(tmp_path, micro_model):
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", first_word_rows(5))
    jsonl_with_bad_line_37(folder / "b.jsonl")
    code, message = prepare_message(tmp_path, local_spec(micro_model, folder))
    assert code == EXIT_CONFIG_ERROR
    assert message == "spec.dataset.source: b.jsonl: line 37: invalid JSON (expecting ',' delimiter)"


def test_a_missing_key_is_called_missing_and_the_row_keys_are_listed(tmp_path, micro_model):
    rows = first_word_rows(4)
    del rows[2]["output"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    code, message = prepare_message(tmp_path, local_spec(micro_model, data))
    assert code == EXIT_CONFIG_ERROR
    assert message == (
        "spec.dataset.source: row 3 (line 3): has no key 'output' (completion); the row has keys: instruction, "
        "input. Add the key, or map the completion to another one with spec.dataset.columns.completion"
    )


def test_a_missing_key_is_named_on_the_init_model_path_too(tmp_path, capsys):
    rows = first_word_rows(4)
    del rows[1]["instruction"]
    write_jsonl(tmp_path / "d.jsonl", rows)
    code = main(["run", str(manifest(tmp_path, "./d.jsonl")), "--init-model", "micro", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "spec.dataset.source: row 2 (line 2): has no key 'instruction' (prompt)" in err


def test_init_model_tokenizer_learns_the_mapped_columns_not_the_json(tmp_path):
    from transformers import AutoTokenizer

    from finetune_operator.api.job import FineTuneJob
    from finetune_operator.api.spec import FineTuneJobSpec
    from finetune_operator.local import init_model

    # A JSON array file whose keys never occur in the values: keys and quotes must not become vocabulary.
    rows = [{"zqxprompt": r["instruction"], "zqxinput": r["input"], "zqxanswer": r["output"]}
            for r in first_word_rows(300)]  # fmt: skip
    (tmp_path / "d.json").write_text(json.dumps(rows, indent=2))
    path = manifest(tmp_path, "./d.json", columns={"prompt": "zqxprompt", "input": "zqxinput",
                                                   "completion": "zqxanswer"})  # fmt: skip
    spec = yaml.safe_load(path.read_text())["spec"]
    built = init_model("micro", FineTuneJob(metadata={"name": "x"}, spec=FineTuneJobSpec.model_validate(spec)), path)
    vocab = AutoTokenizer.from_pretrained(built).get_vocab()
    merged = [t for t in vocab if len(t) > 1]  # single bytes are the byte-level alphabet, always there
    assert not [t for t in merged if "zqx" in t or '"' in t or "{" in t or ":" in t]
    assert {"Give", "Ġfirst", "Ġword"} <= vocab.keys()  # the columns' own words are learned
