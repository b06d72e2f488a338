"""Dataset formats: map a user's columns onto canonical records, check every row, render and tokenize.

Canonical records, per format:
  text        {text}
  completion  {prompt, completion}                (prompt = prompt [+ "\n" + input], Alpaca style)
  chat        {messages: [{role, content}, ...]}  (roles normalised: human->user, gpt->assistant, ...)
  preference  {prompt, chosen, rejected}          (HH-style rows without a prompt get it split off at the last
                                                   assistant turn the two transcripts share)

Rendering for training (the same functions render the eval prompts, so evaluation sees what training saw):
  text        text + EOS, loss on every token
  completion  prompt + "\n" + completion + EOS, loss on the completion tokens only
  chat        the chat template, loss on the assistant turns only (character spans -> token offsets)
  preference  one join for DPO, reward training, perplexity and generation (`preference_texts`): the chat
              template's when the tokenizer has one (HH transcripts become turns), else prompt + "\n" + answer
              (or the transcript as written when the answers start with whitespace)
"""

from __future__ import annotations

import re
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


class NullValue(DataError):
    """A required column is null in a row; the source may know it is missing from the row altogether."""

    def __init__(self, field: str, row: int, column: str, role: str) -> None:
        super().__init__(f"{field}: row {row}: column '{column}' ({role}) is empty (null); expected a string")
        self.field, self.row, self.column, self.role = field, row, column, role

    def missing(self, keys: list[str], where: str) -> DataError:
        """The same problem told as a missing key, with the keys the row does have."""
        return DataError(
            f"{self.field}: row {self.row}{where}: has no key '{self.column}' ({self.role}); the row has keys: "
            f"{', '.join(keys) or '(none)'}. Add the key, or map the {self.role} to another one with "
            f"spec.dataset.columns.{self.role}"
        )


def _text(value: Any, role: str, column: str, row: int, field: str, *, optional: bool = False) -> str:
    if value is None:
        if optional:
            return ""
        raise NullValue(field, row, column, role)
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
        split = split_shared_prompt(chosen, rejected)
        if split is None:
            raise DataError(
                f"{field}: row {row}: no prompt column and chosen/rejected share no prompt prefix; "
                "map the prompt with spec.dataset.columns.prompt"
            )
        prompt, chosen, rejected = split
    if system.strip():
        prompt = f"{system}\n{prompt}"
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


# A turn marker of a plain-text transcript ("\n\nHuman: ...\n\nAssistant: ..."), at the start of a line.
TURN = re.compile(r"(?:^|\n+)[ \t]*(human|user|assistant)[ \t]*:", re.IGNORECASE)


def split_shared_prompt(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Split two transcripts into the prompt they share and the two answers.

    The cut is at the end of the last assistant-turn marker inside the shared text, never at the first differing
    character: "Assistant: 8" and "Assistant: 80" share "Assistant: 8", yet both answers start after the marker.
    Without turn markers the cut is at the last whitespace of the shared text, so no word is split.
    """
    pairs = enumerate(zip(chosen, rejected, strict=False))
    shared = chosen[: next((i for i, (a, b) in pairs if a != b), min(len(chosen), len(rejected)))]
    markers = [m for m in TURN.finditer(shared) if m.group(1).lower() == "assistant"]
    cut = markers[-1].end() if markers else max(shared.rfind(" "), shared.rfind("\n"), shared.rfind("\t"))
    if cut <= 0 or not shared[:cut].strip():
        return None
    return chosen[:cut], chosen[cut:], rejected[cut:]


def transcript_messages(prompt: str) -> list[dict[str, str]] | None:
    """An HH-style prompt ("Human: ... Assistant:") as chat messages, or None when it is not one."""
    parts = TURN.split(prompt)
    if len(parts) < 5 or parts[0].strip():
        return None
    messages = [
        {"role": "assistant" if role.lower() == "assistant" else "user", "content": content.strip()}
        for role, content in zip(parts[1::2], parts[2::2], strict=True)
    ]
    if messages[-1] != {"role": "assistant", "content": ""}:
        return None
    return messages[:-1]


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def preference_texts(record: dict[str, Any], tokenizer: Any) -> dict[str, str]:
    """The one join of a preference row: the prompt as the model is given it and the two answers that follow.

    DPO and reward training, perplexity and generation all use it, so training and evaluation see the same text
    (`prompt + chosen` is the chosen sequence; the tokenizer adds its special tokens as for any plain text).
    """
    prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    if tokenizer.chat_template:
        messages = transcript_messages(prompt) or [{"role": "user", "content": prompt.strip()}]
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        cut = len(tokenizer.bos_token) if _adds_bos(tokenizer) and head.startswith(tokenizer.bos_token) else 0

        def answer(text: str) -> str:
            turn = [*messages, {"role": "assistant", "content": text.strip()}]
            through = tokenizer.apply_chat_template(turn, tokenize=False)
            if through.startswith(head):
                return through[len(head) :].rstrip()
            return text.strip() + (tokenizer.eos_token or "")  # a template that is not prefix-stable

        return {"prompt": head[cut:], "chosen": answer(chosen), "rejected": answer(rejected)}
    # A transcript split off its answers keeps its own turn format; a prompt column gets the completion join.
    joined = (chosen[:1].isspace() and rejected[:1].isspace()) or prompt[-1:].isspace()
    return {"prompt": prompt if joined else prompt + "\n", "chosen": chosen, "rejected": rejected}


def corpus_texts(fmt: str, record: dict[str, Any]) -> list[str]:
    """The texts of a canonical record that a tokenizer built for this data should learn (no JSON keys)."""
    if fmt == "text":
        return [record["text"]]
    if fmt == "completion":
        return [f"{record['prompt']}\n{record['completion']}"]
    if fmt == "chat":
        return ["\n".join(f"<|{m['role']}|>\n{m['content']}" for m in record["messages"])]
    return [record["prompt"] + record["chosen"], record["prompt"] + record["rejected"]]


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
    if fmt == "completion":
        return record["prompt"] + "\n"
    if fmt == "preference":
        return preference_texts(record, tokenizer)["prompt"]
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
        return record["chosen"].strip()
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
    # preference: the chosen sequence, loss on the chosen answer (perplexity of what DPO pushes up)
    texts = preference_texts(record, tokenizer)
    answer = texts["chosen"] if texts["chosen"].endswith(eos) else texts["chosen"] + eos
    return texts["prompt"] + answer, [(len(texts["prompt"]), len(texts["prompt"]) + len(answer))]


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
