"""Load the base and the tuned model and stream both answers to one prompt.

The tuned side is the merged model, the base with the PEFT adapter, or the ONNX graph through Optimum's
ORTModelForCausalLM when that is all the export holds. Generation follows the evaluate stage exactly (same
tokenisation, greedy at temperature 0, the same eos/pad ids, the answer stripped), so what the playground shows
for an eval prompt is what the metrics were computed from.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .target import Target

SIDES = ("base", "tuned")
MAX_NEW_TOKENS_LIMIT = 2048
WAIT_SECONDS = 600  # one streamed piece must arrive within this, or the answer is reported as stuck


@dataclass
class Answer:
    base: str = ""
    tuned: str = ""
    done: bool = False
    seconds: float = 0.0
    error: str | None = None


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _torch_model(path: str, adapter: str | None = None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    device = _device()
    dtype = torch.float32
    if device == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.to(device).eval()


def _onnx_model(path: str) -> Any:
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    providers = ort.get_available_providers()
    provider = "CUDAExecutionProvider" if "CUDAExecutionProvider" in providers else "CPUExecutionProvider"
    return ORTModelForCausalLM.from_pretrained(path, provider=provider, use_cache=True, local_files_only=True)


class LoadError(RuntimeError):
    """A model or tokenizer of the target could not be loaded; the message names which one and where."""


@contextlib.contextmanager
def _naming(what: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        raise LoadError(f"{what}: {type(exc).__name__}: {exc}") from exc


class Engine:
    """The tokenizer and the two models of a Target, loaded once, in the background.

    Importing torch and transformers and loading both models is most of a start; the app serves its page (and the
    Samples and Report tabs, which need no model) first, and a comparison asked for before the models are there
    waits for them (`wait_loaded`).
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self.tokenizer: Any = None
        self.base: Any = None
        self.tuned: Any = None
        self.error: str | None = None
        """Why the models could not be loaded (shown on the page and printed), once loading has ended."""
        self.load_seconds: float | None = None
        self._loaded = threading.Event()
        self._loader: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self.lock = threading.Lock()  # one comparison at a time: two models already share the cores

    def load(self) -> None:
        """Load the tokenizer and both models in this thread."""
        from transformers import AutoTokenizer

        target = self.target
        with _naming(f"the tokenizer {target.tokenizer_path}"):
            self.tokenizer = AutoTokenizer.from_pretrained(str(target.tokenizer_path), local_files_only=True)
        with _naming(f"the base model {target.base_path}"):
            self.base = _torch_model(str(target.base_path))
        with _naming(f"the tuned model ({target.tuned_kind}) {target.tuned_path}"):
            if target.tuned_kind == "onnx":
                self.tuned = _onnx_model(str(target.tuned_path))
            elif target.tuned_kind == "adapter":
                self.tuned = _torch_model(str(target.base_path), adapter=str(target.tuned_path))
            else:
                self.tuned = _torch_model(str(target.tuned_path))

    def start_loading(self, on_done: Callable[[Engine], None] | None = None) -> None:
        """Load in a background thread (once); `on_done(engine)` runs when it has ended, loaded or failed."""
        with self._start_lock:
            if self._loader is None:
                self._loader = threading.Thread(target=self._load, args=(on_done,), name="load-models", daemon=True)
                self._loader.start()

    def _load(self, on_done: Callable[[Engine], None] | None) -> None:
        started = time.monotonic()
        try:
            self.load()
        except LoadError as exc:  # a broken artifact is reported on the page; the app keeps serving
            self.error = str(exc)
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        self.load_seconds = time.monotonic() - started
        self._loaded.set()
        if on_done is not None:
            on_done(self)

    def wait_loaded(self, timeout: float) -> bool:
        """True once loading has ended (check `error`), False if it is still going after `timeout` seconds."""
        self.start_loading()
        return self._loaded.wait(timeout)

    def render(self, prompt: str) -> str:
        """What the models are given: the job's prompt template (the chat template for chat jobs)."""
        from ..stages.formats import prompt_text

        if self.target.chat:
            messages = [{"role": "user", "content": prompt}]
            return prompt_text("chat", {"messages": messages}, self.tokenizer)
        return prompt_text("completion", {"prompt": prompt.rstrip("\n")}, self.tokenizer)

    def _kwargs(self, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "max_new_tokens": max(1, min(int(max_new_tokens), MAX_NEW_TOKENS_LIMIT)),
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p))
        else:
            kwargs.update(do_sample=False)
        return kwargs

    def _inputs(self, text: str, model: Any) -> dict[str, Any]:
        encoded = self.tokenizer([text], return_tensors="pt", add_special_tokens=not self.target.chat)
        device = getattr(model, "device", "cpu")
        return {k: encoded[k].to(device) for k in ("input_ids", "attention_mask")}

    def generate(self, side: str, text: str, max_new_tokens: int, temperature: float, top_p: float) -> str:
        """One side's whole answer (what the stream ends with)."""
        import torch

        model = self.base if side == "base" else self.tuned
        inputs = self._inputs(text, model)
        with torch.no_grad():
            out = model.generate(**inputs, **self._kwargs(max_new_tokens, temperature, top_p))
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()

    def stream(self, prompt: str, max_new_tokens: int, temperature: float, top_p: float) -> Iterator[Answer]:
        """Both answers as they grow; the last Answer has done=True and the exact decoded texts."""
        from transformers import TextStreamer

        text = self.render(prompt)
        pieces: queue.Queue[tuple[str, str | None, str | None]] = queue.Queue()

        class QueueStreamer(TextStreamer):
            def __init__(self, tokenizer: Any, side: str) -> None:
                super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
                self.side = side

            def on_finalized_text(self, piece: str, stream_end: bool = False) -> None:
                pieces.put((self.side, piece, None))

        def work(side: str) -> None:
            import torch

            model = self.base if side == "base" else self.tuned
            try:
                inputs = self._inputs(text, model)
                with torch.no_grad():
                    out = model.generate(**inputs, streamer=QueueStreamer(self.tokenizer, side),
                                         **self._kwargs(max_new_tokens, temperature, top_p))  # fmt: skip
                final = self.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
                pieces.put((side, None, final.strip()))
            except Exception as exc:  # shown on the page, the app keeps serving
                pieces.put((side, None, f"error: {type(exc).__name__}: {exc}"))

        with self.lock:
            started = time.monotonic()
            answer = Answer()
            partial = {side: "" for side in SIDES}
            threads = [threading.Thread(target=work, args=(side,), daemon=True) for side in SIDES]
            for thread in threads:
                thread.start()
            finished: set[str] = set()
            while len(finished) < len(SIDES):
                try:
                    side, piece, final = pieces.get(timeout=WAIT_SECONDS)
                except queue.Empty:
                    answer.error = f"no output for {WAIT_SECONDS} s"
                    break
                if final is not None:
                    partial[side] = final
                    finished.add(side)
                elif piece:
                    partial[side] += piece
                answer.base, answer.tuned = partial["base"], partial["tuned"]
                answer.seconds = time.monotonic() - started
                yield answer
            for thread in threads:
                thread.join(timeout=5)
        answer.done = True
        answer.seconds = time.monotonic() - started
        yield answer


def feedback_record(target: Target, label: str, pair: dict[str, Any]) -> dict[str, Any]:
    """One human judgement, with what is needed to reproduce it (settings, artifact digest, run)."""
    artifact = target.tuned_artifact() or {}
    lineage = target.status.get("lineage") or {}
    return {
        "time": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "label": label,
        "prompt": pair["prompt"],
        "renderedPrompt": pair["rendered"],
        "base": pair["base"],
        "tuned": pair["tuned"],
        "generation": pair["generation"],
        "job": target.job,
        "run": target.run,
        "tunedModel": {"kind": target.tuned_kind, "path": str(target.tuned_path), "sha256": artifact.get("sha256")},
        "configHash": lineage.get("configHash"),
    }


def append_feedback(target: Target, record: dict[str, Any]) -> None:
    target.feedback_file.parent.mkdir(parents=True, exist_ok=True)
    with target.feedback_file.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
