"""Dataset formats: map a user's columns onto canonical records, check every row, render and tokenize.

Canonical records, per format:
  text        {text}
  completion  {prompt, completion}                (prompt = prompt [+ "\n" + input], Alpaca style)
  chat        {messages: [{role, content}, ...]}  (roles normalised: human->user, gpt->assistant, ...)
  preference  {prompt, chosen, rejected}          (HH-style rows without a prompt get it split off)

Rendering for training (the same functions render the eval prompts, so evaluation sees what training saw):
  text        text + EOS, loss on every token
  completion  prompt + "\n" + completion + EOS, loss on the completion tokens only
  chat        the chat template, loss on the assistant turns only (character spans -> token offsets)
"""

from __future__ import annotations

import unicodedata
from typing import Any

from ..api.spec import DatasetSpec
from .contract import DataError

ROLE_ALIASES = {
    "user": "user", "human": "user", "prompter": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "system": "system",
    "tool": "tool", "function": "tool", "ipython": "tool",
}  # fmt: skip

REQUIRED_ROLES = {
    "text": ("text",),
    "completion": ("prompt", "completion"),
    "chat": ("messages",),
    "preference": ("chosen", "rejected"),
}
OPTIONAL_ROLES = {
    "completion": ("input", "system"),
    "chat": ("system",),
    "preference": ("prompt", "system"),
    "text": (),
}


def column_of(spec: DatasetSpec, role: str) -> str:
    return spec.columns.get(role, role)


def check_columns(spec: DatasetSpec, available: list[str], field: str) -> None:
    """Fail fast when a role's column is missing, naming the role, the column and what the data has."""
    for role in REQUIRED_ROLES[spec.format]:
        column = column_of(spec, role)
        if column not in available:
            raise DataError(
                f"{field}: format {spec.format} needs a '{role}' column, but the data has no column '{column}' "
                f"(columns: {', '.join(available)}). Map it with spec.dataset.columns.{role}: <column name>"
            )


def _normalizer(form: str):
    if form == "none":
        return lambda s: s
    return lambda s: unicodedata.normalize(form, s)


def _text(value: Any, role: str, column: str, row: int, field: str, *, optional: bool = False) -> str:
    if value is None:
        if optional:
            return ""
        raise DataError(f"{field}: row {row}: column '{column}' ({role}) is empty (null); expected a string")
    if not isinstance(value, str):
        raise DataError(
            f"{field}: row {row}: column '{column}' ({role}) is a {type(value).__name__}; expected a string"
        )
    return value


def _messages(value: Any, spec: DatasetSpec, row: int, field: str, norm) -> list[dict[str, str]]:
    column = column_of(spec, "messages")
    role_key, content_key = column_of(spec, "role"), column_of(spec, "content")
    if not isinstance(value, list) or not value:
        raise DataError(f"{field}: row {row}: column '{column}' must be a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or role_key not in message or content_key not in message:
            keys = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise DataError(
                f"{field}: row {row}: message {i} needs keys '{role_key}' and '{content_key}' (has {keys}); "
                "map them with spec.dataset.columns.role / .content (ShareGPT: role: from, content: value)"
            )
        raw_role = str(message[role_key]).strip().lower()
        role = ROLE_ALIASES.get(raw_role)
        if role is None:
            raise DataError(
                f"{field}: row {row}: message {i} has role '{message[role_key]}'; expected one of "
                f"{', '.join(sorted(set(ROLE_ALIASES)))}"
            )
        content = _text(message[content_key], "content", content_key, row, field)
        out.append({"role": role, "content": norm(content)})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{field}: row {row}: the conversation has no assistant message to learn from")
    return out


def canonicalize(spec: DatasetSpec, record: dict[str, Any], row: int, field: str) -> dict[str, Any]:
    """One raw row -> its canonical record (row numbers are 1-based, in file order)."""
    norm = _normalizer(spec.cleaning.normalize_unicode)
    fmt = spec.format

    def get(role: str, optional: bool = False) -> str:
        column = column_of(spec, role)
        if optional and column not in record:
            return ""
        return norm(_text(record.get(column), role, column, row, field, optional=optional))

    system = get("system", optional=True) if fmt != "text" else ""
    if fmt == "text":
        return {"text": get("text")}
    if fmt == "completion":
        prompt, extra = get("prompt"), get("input", optional=True)
        if extra.strip():
            prompt = f"{prompt}\n{extra}"
        if system.strip():
            prompt = f"{system}\n{prompt}"
        return {"prompt": prompt, "completion": get("completion")}
    if fmt == "chat":
        messages = _messages(record.get(column_of(spec, "messages")), spec, row, field, norm)
        if system.strip() and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return {"messages": messages}
    # preference
    chosen, rejected = get("chosen"), get("rejected")
    prompt = get("prompt", optional=True)
    if not prompt:
        from trl.data_utils import extract_prompt

        split = extract_prompt({"chosen": chosen, "rejected": rejected})
        prompt, chosen, rejected = split["prompt"], split["chosen"], split["rejected"]
        if not prompt.strip():
            raise DataError(
                f"{field}: row {row}: no prompt column and chosen/rejected share no prompt prefix; "
                "map the prompt with spec.dataset.columns.prompt"
            )
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def is_empty(fmt: str, record: dict[str, Any]) -> bool:
    if fmt == "text":
        return not record["text"].strip()
    if fmt == "completion":
        return not record["prompt"].strip() or not record["completion"].strip()
    if fmt == "chat":
        return not any(m["content"].strip() for m in record["messages"] if m["role"] == "assistant")
    return not record["prompt"].strip() or not record["chosen"].strip() or not record["rejected"].strip()


def prompt_text(fmt: str, record: dict[str, Any], tokenizer: Any) -> str:
    """What the model is given at generation time (evaluation, GRPO)."""
    if fmt == "completion" or fmt == "preference":
        return record["prompt"] + "\n"
    if fmt == "chat":
        history = record["messages"][:-1] if record["messages"][-1]["role"] == "assistant" else record["messages"]
        return tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    raise ValueError("text rows have no prompt")


def reference_text(fmt: str, record: dict[str, Any]) -> str:
    """The expected answer for generation-based metrics."""
    if fmt == "completion":
        return record["completion"]
    if fmt == "chat":
        return next(m["content"] for m in reversed(record["messages"]) if m["role"] == "assistant")
    if fmt == "preference":
        return record["chosen"]
    raise ValueError("text rows have no reference")


def render(fmt: str, record: dict[str, Any], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The training text and the character spans the loss is computed on."""
    eos = tokenizer.eos_token or ""
    if fmt == "text":
        text = record["text"] + eos
        return text, [(0, len(text))]
    if fmt == "completion":
        prompt = prompt_text(fmt, record, tokenizer)
        text = prompt + record["completion"] + eos
        return text, [(len(prompt), len(text))]
    if fmt == "chat":
        messages = record["messages"]
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
            if not text.startswith(through) or not through.startswith(before):
                # A template that is not prefix-stable (e.g. it stamps dates): train on the whole conversation.
                return text, [(0, len(text))]
            spans.append((len(before), len(through)))
        return text, spans
    raise ValueError("preference rows are tokenized by the preference trainers")


def tokenize_batch(
    fmt: str, records: list[dict[str, Any]], tokenizer: Any, max_length: int | None
) -> list[dict[str, Any]]:
    """input_ids + labels (-100 outside the loss spans) for each record; lengths before truncation."""
    rendered = [render(fmt, r, tokenizer) for r in records]
    add_special = fmt != "chat"  # chat templates write their own BOS
    encoded = tokenizer([text for text, _ in rendered], add_special_tokens=add_special, return_offsets_mapping=True)
    out = []
    for (_, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True):
        labels = []
        for token_id, (start, end) in zip(ids, offsets, strict=True):
            inside = end > start and any((s <= start and end <= e) or (start < e and end > s) for s, e in spans)
            labels.append(token_id if inside else -100)
        if tokenizer.bos_token_id is not None and ids and ids[0] == tokenizer.bos_token_id and fmt == "text":
            labels[0] = -100  # nothing predicts the BOS
        full = len(ids)
        if max_length is not None and full > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
        out.append({"input_ids": ids, "labels": labels, "full_length": full})
    return out
