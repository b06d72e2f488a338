"""The Gradio Blocks app: Compare, Samples and Report tabs over one Target.

Offline by construction: analytics and the version check are off (GRADIO_ANALYTICS_ENABLED), the theme uses
system fonts (the default one would make the browser fetch web fonts), no share link, no server-side rendering.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from .engine import MAX_NEW_TOKENS_LIMIT, Engine, append_feedback, feedback_record
from .target import Target

OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "GRADIO_SSR_MODE": "False",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "1",
}
LABELS = {"better": "Tuned is better", "worse": "Tuned is worse", "same": "About the same"}
LOAD_WAIT_SECONDS = 900  # a comparison waits this long for the models to load, then says they are still loading
SAMPLE_COLUMNS = ["prompt", "reference", "base", "tuned", "tuned = reference"]


def offline() -> None:
    """Set before gradio is imported: it reads these at import time."""
    for key, value in OFFLINE_ENV.items():
        os.environ[key] = value


def _no_stub_regeneration(module: Any) -> None:
    """Gradio's component metaclass regenerates the .pyi stub of every component class on every `import gradio`
    (reads the module's source, parses it, renders a template, compares it with the file on disk): an aid for
    editors, about 40% of the import's CPU time on these cores, never used by a served app, and a write into
    site-packages that a read-only image refuses."""
    if callable(getattr(module, "create_or_modify_pyi", None)):
        module.create_or_modify_pyi = lambda *args, **kwargs: None


def _plain_event_docs(module: Any) -> None:
    """Gradio compiles a Jinja template for each of ~200 event listeners' docstrings at import, only to put the
    component's name in place of `{{ component }}` (their only placeholder): a plain replace gives the same text."""
    listener = getattr(module, "EventListener", None)
    if listener is None or not callable(getattr(listener, "set_doc", None)):
        return

    def set_doc(self: Any, component: str) -> None:
        if self.listener.__doc__:
            self.listener.__doc__ = self.listener.__doc__.replace("{{ component }}", component)

    listener.set_doc = set_doc


GRADIO_IMPORT_PATCHES = {"gradio.component_meta": _no_stub_regeneration, "gradio.events": _plain_event_docs}


class _PatchAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Loads each module of GRADIO_IMPORT_PATCHES as usual (with the finders after this one), then patches it."""

    def __init__(self) -> None:
        self.pending = dict(GRADIO_IMPORT_PATCHES)
        self.loaders: dict[str, importlib.abc.Loader] = {}

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in self.pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    self.loaders[name] = spec.loader
                    spec.loader = self
                return spec
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self.loaders[spec.name].create_module(spec)

    def exec_module(self, module: Any) -> None:
        name = module.__spec__.name
        self.loaders.pop(name).exec_module(module)  # type: ignore[attr-defined]
        self.pending.pop(name)(module)
        if not self.pending and self in sys.meta_path:
            sys.meta_path.remove(self)


def lean_gradio_import() -> None:
    """For the command's own process, before gradio is first imported: skip what a served app never uses.

    - the components' .pyi stub regeneration and the Jinja rendering of event docstrings (GRADIO_IMPORT_PATCHES);
    - IPython, which Gradio imports (1-4 s on busy cores) only to offer notebook cell magics: a None in sys.modules
      makes that optional import fail at once, as it does where IPython is not installed (never in a notebook)."""
    if "gradio" in sys.modules:
        return
    if not any(isinstance(finder, _PatchAfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _PatchAfterImport())
    sys.modules.setdefault("IPython", None)  # type: ignore[arg-type]


def models_loading(engine: Engine) -> Iterator[str]:
    """A progress line every half second while the models load (the page is served before they are)."""
    started = time.monotonic()
    while not engine.wait_loaded(0.5) and time.monotonic() - started < LOAD_WAIT_SECONDS:
        yield f"loading the models… {time.monotonic() - started:.0f} s"


def samples_rows(target: Target, only_differing: bool) -> list[list[Any]]:
    rows = []
    for sample in target.samples():
        same = sample.get("tuned", "").strip() == sample.get("reference", "").strip()
        if only_differing and same:
            continue
        rows.append([sample.get("prompt", ""), sample.get("reference", ""), sample.get("base", ""),
                     sample.get("tuned", ""), "yes" if same else "no"])  # fmt: skip
    return rows


def samples_count(target: Target, only_differing: bool) -> str:
    shown, total = len(samples_rows(target, only_differing)), len(target.samples())
    return f"showing {shown} of {total} samples" + (" (tuned ≠ reference)" if only_differing else "")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _number(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else str(value))


def report_markdown(target: Target) -> str:
    """The status, readable: phase, metrics base vs tuned, gates, artifacts with digests, lineage, runs."""
    status = target.status
    parts = [f"### {target.job}, run {target.run}: {status.get('phase', 'no status')}"]
    if status.get("message"):
        parts.append(status["message"])
    metrics = status.get("metrics") or {}
    base, tuned = metrics.get("base") or {}, metrics.get("tuned") or {}
    if base or tuned:
        rows = []
        for key in sorted(set(base) | set(tuned)):
            b, t = base.get(key), tuned.get(key)
            delta = _number(t - b) if isinstance(b, int | float) and isinstance(t, int | float) else ""
            rows.append([key, _number(b), _number(t), delta])
        parts += ["#### Metrics", _table(["metric", "base", "tuned", "tuned - base"], rows)]
    gates = metrics.get("gates") or []
    if gates:
        rows = [[g.get("metric"), _number(g.get("value")), _number(g.get("min")), _number(g.get("max")),
                 "passed" if g.get("passed") else "FAILED"] for g in gates]  # fmt: skip
        parts += ["#### Gates", _table(["metric", "value", "min", "max", "result"], rows)]
    artifacts = status.get("artifacts") or []
    if artifacts:
        rows = [[a.get("name"), a.get("format"), a.get("uri"), f"`{a.get('sha256', '')}`", a.get("sizeBytes")]
                for a in artifacts]  # fmt: skip
        parts += ["#### Artifacts", _table(["name", "format", "uri", "sha256", "bytes"], rows)]
    lineage = status.get("lineage") or {}
    serving_lineage = target.serving.get("lineage") or {}
    facts = {**{k: v for k, v in serving_lineage.items() if v}, **{k: v for k, v in lineage.items() if v}}
    if facts:
        parts += ["#### Lineage", _table(["field", "value"], [[k, v] for k, v in facts.items()])]
    gen = target.generation
    parts += ["#### Playing with", _table(["", ""], [
        ["tuned model", f"{target.tuned_kind}: {target.tuned_path}"],
        ["base model", str(target.base_path)],
        ["generation defaults", f"maxNewTokens {gen.max_new_tokens}, temperature {gen.temperature}, "
                                f"topP {gen.top_p} (from {gen.source})"],
        ["judgements", str(target.feedback_file)],
    ])]  # fmt: skip
    runs = status.get("runs") or []
    if runs:
        rows = [[r.get("run"), r.get("phase"), r.get("completionTime"), r.get("message", "")] for r in runs]
        parts += ["#### Earlier runs", _table(["run", "phase", "ended", "message"], rows)]
    return "\n\n".join(parts)


def build_app(engine: Engine) -> Any:
    offline()
    import gradio as gr

    target = engine.target
    gen = target.generation
    artifact = target.tuned_artifact() or {}
    title = f"{target.job} playground"
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        digest = f" (sha256 `{artifact['sha256'][:12]}`)" if artifact.get("sha256") else ""
        gr.Markdown(
            f"## {title}\nrun {target.run}: base `{target.base_path.name}` vs tuned **{target.tuned_kind}** "
            f"`{target.tuned_path.name}`{digest}" + (" · chat template applied" if target.chat else "")
        )
        pair = gr.State(None)
        with gr.Tab("Compare", id="compare"):
            prompt = gr.Textbox(
                label="Prompt",
                lines=3,
                elem_id="prompt",
                placeholder="A prompt as your users would write it; the job's template is applied",
            )
            with gr.Row():
                max_new = gr.Slider(1, MAX_NEW_TOKENS_LIMIT, value=gen.max_new_tokens, step=1,
                                    label="max new tokens", elem_id="max-new-tokens")  # fmt: skip
                temperature = gr.Slider(0.0, 2.0, value=gen.temperature, step=0.05,
                                        label="temperature (0 = greedy)", elem_id="temperature")  # fmt: skip
                top_p = gr.Slider(0.05, 1.0, value=gen.top_p, step=0.05, label="top-p", elem_id="top-p")
            run_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
            with gr.Row():
                base_out = gr.Textbox(label="Base model", lines=6, interactive=False, elem_id="base-answer")
                tuned_out = gr.Textbox(label=f"Tuned model ({target.tuned_kind})", lines=6, interactive=False,
                                       elem_id="tuned-answer")  # fmt: skip
            state = gr.Markdown("", elem_id="compare-state")
            rendered = gr.Textbox(label="What both models are given (the job's prompt template applied)", lines=2,
                                  interactive=False, elem_id="rendered-prompt")  # fmt: skip
            with gr.Row():
                buttons = {label: gr.Button(text, elem_id=f"label-{label}") for label, text in LABELS.items()}
            saved = gr.Markdown("", elem_id="feedback-state")

        def compare(text: str, tokens: float, temp: float, p: float) -> Iterator[tuple[Any, ...]]:
            if not text.strip():
                yield "", "", "Type a prompt first.", "", None
                return
            for waiting in models_loading(engine):
                yield "", "", waiting, "", None
            if engine.error or not engine.wait_loaded(0):
                yield "", "", f"stopped: {engine.error or 'the models are still loading'}", "", None
                return
            shown = engine.render(text)
            settings = {"maxNewTokens": int(tokens), "temperature": float(temp), "topP": float(p)}
            for answer in engine.stream(text, int(tokens), float(temp), float(p)):
                if not answer.done:
                    yield answer.base, answer.tuned, f"generating… {answer.seconds:.1f} s", shown, None
                    continue
                if answer.error:
                    yield answer.base, answer.tuned, f"stopped: {answer.error}", shown, None
                    return
                kept = {"prompt": text, "rendered": shown, "base": answer.base, "tuned": answer.tuned,
                        "generation": settings}  # fmt: skip
                yield answer.base, answer.tuned, f"done in {answer.seconds:.1f} s", shown, kept

        run_button.click(compare, [prompt, max_new, temperature, top_p], [base_out, tuned_out, state, rendered, pair])
        prompt.submit(compare, [prompt, max_new, temperature, top_p], [base_out, tuned_out, state, rendered, pair])

        def keep(label: str) -> Any:
            def handler(current: dict[str, Any] | None) -> str:
                if not current:
                    return "Compare a prompt first: there is no pair to label yet."
                append_feedback(target, feedback_record(target, label, current))
                return f"saved as **{label}** to `{target.feedback_file}`"

            return handler

        for label, button in buttons.items():
            button.click(keep(label), [pair], [saved])

        with gr.Tab("Samples", id="samples"):
            file = target.samples_file
            gr.Markdown(f"Evaluation samples from `{file}`" if file else "This run kept no evaluation samples "
                        "(generation metrics such as exactMatch, bleu or rouge produce them).")  # fmt: skip
            only = gr.Checkbox(label="only where tuned ≠ reference", value=False, elem_id="only-differing")
            table = gr.Dataframe(value=samples_rows(target, False), headers=SAMPLE_COLUMNS, interactive=False,
                                 wrap=True, elem_id="samples-table")  # fmt: skip
            gr.Markdown("Select a row to put its prompt in Compare.")
            count = gr.Markdown(samples_count(target, False), elem_id="samples-count")
            only.change(lambda flag: (samples_rows(target, flag), samples_count(target, flag)), [only], [table, count])

            def pick(flag: bool, event: gr.SelectData) -> str:
                rows = samples_rows(target, flag)
                row = event.index[0] if isinstance(event.index, list | tuple) else event.index
                return str(rows[row][0]).rstrip("\n") if 0 <= row < len(rows) else ""

            table.select(pick, [only], [prompt])

        with gr.Tab("Report", id="report"):
            gr.Markdown(report_markdown(target), elem_id="report")
    return app


def theme() -> Any:
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    return gr.themes.Default(font=system, font_mono=["ui-monospace", "monospace"])


def _patient_url_ok(url: str, timeout: float = 120) -> bool:
    """Gradio checks that its own page answers, but gives up at the first 3-second timeout, which a busy CPU or a
    cold pod exceeds; this waits up to `timeout` seconds. Plain HTTP on loopback through urllib: an httpx client
    per try would load the CA bundle into a new SSL context each time (~0.1 s of CPU)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=10) as reply:
                if reply.status in (200, 302, 303, 307):
                    return True
        except urllib.error.HTTPError as exc:
            if exc.code == 401:  # served, behind a login
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


def launch(
    engine: Engine, host: str, port: int, *, block: bool = True, on_ready: Any = None, on_loaded: Any = None
) -> Any:
    """Serve the app, then load the models in the background (`on_loaded(engine)` when that has ended); with
    block=False it returns (app, url) and the caller closes the app."""
    import gradio.networking

    app = build_app(engine)  # Gradio's queue runs one event per listener at a time (its default concurrency limit)
    gradio.networking.url_ok = _patient_url_ok
    _, url, _ = app.launch(
        server_name=host, server_port=port, share=False, ssr_mode=False, prevent_thread_lock=True,
        quiet=True, theme=theme(), footer_links=[], show_error=True, mcp_server=False,
    )  # fmt: skip
    if on_ready is not None:
        on_ready(url)
    engine.start_loading(on_loaded)
    if not block:
        return app, url
    try:
        app.block_thread()
    finally:
        app.close()
    return app, url
