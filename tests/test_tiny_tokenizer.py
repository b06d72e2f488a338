"""`--init-tokenizer char`: a tiny model that sees every character, so string tasks are learnable."""

from __future__ import annotations

from transformers import AutoTokenizer

from finetune_operator.cli import build_parser
from finetune_operator.stages.tiny import build_tiny_model


def test_char_tokenizer_gives_every_character_its_own_token(tmp_path):
    built = build_tiny_model(tmp_path / "m", ["Upper-case: abc\nABC"], preset="micro", tokenizer="char")
    tok = AutoTokenizer.from_pretrained(built)
    for word in ("qzmfa", "QZMFA", "never seen in the corpus"):
        ids = tok(word)["input_ids"]
        assert len(ids) == len(word) and tok.decode(ids) == word
    assert [tok.decode([i]) for i in tok("dog")["input_ids"]] == ["d", "o", "g"]
    # A BPE tokenizer trained on the same rows would give "qzmfa" a handful of opaque pieces instead.
    assert tok("é")["input_ids"] != [tok.unk_token_id] and tok.decode(tok("é")["input_ids"]) == "é"  # bytes
    assert tok.eos_token == "<|eos|>" and tok("x<|eos|>")["input_ids"][-1] == tok.eos_token_id
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|user|>\nhi<|eos|>\n<|assistant|>\n"


def test_run_takes_the_tokenizer_choice():
    args = build_parser().parse_args(["run", "job.yaml", "--init-model", "micro", "--init-tokenizer", "char"])
    assert args.init_tokenizer == "char"
    assert build_parser().parse_args(["run", "job.yaml"]).init_tokenizer == "bpe"
