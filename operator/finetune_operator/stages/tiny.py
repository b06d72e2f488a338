"""Small random-init causal LMs with tokenizers trained on a given corpus.

The offline quickstart, the tests and the benchmarks need a real Hugging Face model directory without the Hub:
this builds one (a GPT-2 config, random weights, a fast BPE tokenizer trained with `tokenizers`, a
SentencePiece tokenizer trained with `sentencepiece`, or a byte-level character tokenizer for string tasks) and
saves it with `save_pretrained`, so every stage loads it exactly as it would load a downloaded model.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

SPECIAL_TOKENS = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>", "unk": "<|unk|>"}

# A minimal chat template so the chat format works on the tiny model (real models bring their own).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

PRESETS: dict[str, dict[str, int]] = {
    # ~0.1M parameters: fast enough for unit tests on two CPU cores.
    "micro": {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 512},
    # ~3M parameters: the quickstart and the benchmarks.
    "tiny-gpt2": {"n_layer": 4, "n_head": 4, "n_embd": 256, "vocab_size": 1024},
}


def corpus_from_jsonl(path: Path) -> list[str]:
    """Every string value of every row of a jsonl file (for training a tokenizer on a dataset)."""
    texts: list[str] = []

    def collect(value: object) -> None:
        if isinstance(value, str):
            texts.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list):
            for v in value:
                collect(v)

    with path.open() as handle:
        for line in handle:
            if line.strip():
                collect(json.loads(line))
    return texts


def _byte_level(model):
    """A tokenizers.Tokenizer over `model` that splits and decodes bytes the way GPT-2's does."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _fast_tokenizer(tok):
    """The transformers tokenizer over a tokenizers.Tokenizer, with this module's special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
    )


def _bpe_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import models, pre_tokenizers, trainers

    tok = _byte_level(models.BPE(unk_token=SPECIAL_TOKENS["unk"]))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _fast_tokenizer(tok)


def _char_tokenizer():
    """One token per byte (so per character for ASCII): a tiny model sees every letter of every word.

    A BPE tokenizer trained on a small dataset turns most words into single tokens, which makes string tasks
    (spell, reverse, change case, count letters) unlearnable for a model that never saw those words' letters.
    """
    from tokenizers import models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS.values(), *alphabet])}
    tok = _byte_level(models.BPE(vocab=vocab, merges=[], unk_token=SPECIAL_TOKENS["unk"]))
    tok.add_special_tokens(list(SPECIAL_TOKENS.values()))
    return _fast_tokenizer(tok)


def _sentencepiece_tokenizer(texts: list[str], vocab_size: int, workdir: Path):
    import sentencepiece as spm
    from transformers import LlamaTokenizerFast

    corpus = workdir / "corpus.txt"
    corpus.write_text("\n".join(texts))
    prefix = workdir / "spm"
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        pad_piece=SPECIAL_TOKENS["pad"],
        unk_piece=SPECIAL_TOKENS["unk"],
        bos_piece=SPECIAL_TOKENS["bos"],
        eos_piece=SPECIAL_TOKENS["eos"],
        hard_vocab_limit=False,
        byte_fallback=True,
        user_defined_symbols=["\n"],
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_by_whitespace=True,
        minloglevel=2,
    )
    # The fast tokenizer is converted from the SentencePiece model (sentencepiece + protobuf do the reading).
    return LlamaTokenizerFast(
        vocab_file=str(prefix.with_suffix(".model")),
        bos_token=SPECIAL_TOKENS["bos"],
        eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"],
        unk_token=SPECIAL_TOKENS["unk"],
        add_bos_token=False,
        add_eos_token=False,
        legacy=False,
    )


def build_tiny_model(
    out_dir: Path,
    texts: Iterable[str],
    *,
    preset: str = "tiny-gpt2",
    tokenizer: Literal["bpe", "sentencepiece", "char"] = "bpe",
    seed: int = 0,
    n_positions: int = 512,
) -> Path:
    """Train a tokenizer on `texts`, build a random-init GPT-2 sized by `preset`, save both to `out_dir`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    dims = PRESETS[preset]
    corpus = [t for t in texts if t]
    if not corpus:
        raise ValueError("the corpus to train the tokenizer on is empty")
    with tempfile.TemporaryDirectory() as scratch:
        if tokenizer == "bpe":
            tok = _bpe_tokenizer(corpus, dims["vocab_size"])
        elif tokenizer == "char":
            tok = _char_tokenizer()
        else:
            tok = _sentencepiece_tokenizer(corpus, dims["vocab_size"], Path(scratch))
        tok.chat_template = CHAT_TEMPLATE
        # GPT-2 adds a token-type embedding when it is given token_type_ids; a causal LM has none.
        tok.model_input_names = ["input_ids", "attention_mask"]
        tok.model_max_length = n_positions
        torch.manual_seed(seed)
        config = GPT2Config(
            vocab_size=len(tok),
            n_positions=n_positions,
            n_layer=dims["n_layer"],
            n_head=dims["n_head"],
            n_embd=dims["n_embd"],
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            tie_word_embeddings=True,
        )
        model = GPT2LMHeadModel(config)
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        model.generation_config.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
    return out_dir
