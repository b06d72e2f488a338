"""The `finetune-operator` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# The `--init-model` presets (stages/tiny.py PRESETS), described for --help without importing the ML stack.
PRESET_HELP = {
    "micro": "~0.1M parameters, 2 layers (tests; seconds per 100 steps)",
    "tiny-gpt2": "~3M parameters, 4 layers (the quickstart; learns its word task in ~500 steps)",
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("finetune-operator")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _stage_names() -> tuple[str, ...]:
    from .api.spec import STAGES

    return STAGES


def _cmd_crd(args: argparse.Namespace) -> int:
    from .api.crd import CHART_CRD_FILE, CRD_FILE, render_crd
    from .api.reference import REFERENCE_FILE, render_reference

    crd = render_crd()
    outputs = {CRD_FILE: crd, CHART_CRD_FILE: crd, REFERENCE_FILE: render_reference()}
    if args.check:
        stale = [path for path, text in outputs.items() if not path.exists() or path.read_text() != text]
        for path in stale:
            print(f"{path} is out of date: run `finetune-operator crd --write`", file=sys.stderr)
        return 1 if stale else 0
    if args.write:
        for path, text in outputs.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}")
        return 0
    sys.stdout.write(outputs[REFERENCE_FILE] if args.reference else outputs[CRD_FILE])
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    import yaml

    from .api.base import KIND
    from .api.validation import iter_manifest_files, load_documents, validate_object

    errors = warnings = jobs = 0
    for given in map(Path, args.files):
        if not given.exists():
            print(f"{given}: does not exist")
            errors += 1
        elif given.is_dir() and not any(iter_manifest_files([given])):
            print(f"{given}: the folder holds no .yaml or .yml files")
    for path in iter_manifest_files(Path(p) for p in args.files if Path(p).exists()):
        try:
            docs = load_documents(path)
        except (OSError, yaml.YAMLError) as exc:
            print(f"{path}: cannot read: {exc}")
            errors += 1
            continue
        for index, doc in enumerate(docs):
            looks_like_ours = isinstance(doc, dict) and (
                doc.get("kind") == KIND or str(doc.get("apiVersion", "")).startswith("finetune.dev/")
            )
            if not looks_like_ours and not args.strict_kinds:
                continue  # other kinds (and status files) in the same folder are not ours to judge
            jobs += 1
            source = f"{path}" if len(docs) == 1 else f"{path}[{index}]"
            _, problems = validate_object(
                doc, target=args.target, base_dir=path.parent.resolve(), model_to_build=bool(args.init_model)
            )
            for problem in problems:
                if problem.severity == "warning" and args.quiet:
                    continue
                print(problem.format(source))
            errors += sum(p.severity == "error" for p in problems)
            warnings += sum(p.severity == "warning" for p in problems)
    sys.stdout.flush()
    print(f"{jobs} FineTuneJob(s) checked: {errors} error(s), {warnings} warning(s)", file=sys.stderr)
    if jobs == 0:
        print("no FineTuneJob found (other kinds are skipped; --strict-kinds checks them too)", file=sys.stderr)
    return 1 if errors or jobs == 0 else 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from .stages.runner import run_stage

    return run_stage(args.stage, args.config, args.workdir)


def _cmd_render(args: argparse.Namespace) -> int:
    import yaml

    from .api.job import FineTuneJob
    from .api.validation import InvalidJobError, load_job
    from .cluster.build import render
    from .cluster.context import OperatorSettings

    try:
        raw, spec, _ = load_job(Path(args.file), target="cluster")
    except InvalidJobError as exc:
        for problem in exc.problems:
            print(problem.format(exc.source), file=sys.stderr)
        return 1
    metadata = dict(raw.get("metadata") or {})
    named = metadata.get("namespace")
    if args.namespace and named and named != args.namespace:
        # What `kubectl apply -n` does too: a manifest's own namespace is never silently replaced.
        print(
            f"{args.file}: metadata.namespace is '{named}' but --namespace says '{args.namespace}': "
            "drop one of them (--namespace only fills in a namespace the manifest does not name)",
            file=sys.stderr,
        )
        return 1
    metadata["namespace"] = named or args.namespace or "default"
    job = FineTuneJob(metadata=metadata, spec=spec)
    settings = OperatorSettings(trainer_image=args.image) if args.image else OperatorSettings()
    objects = render(job, args.stage or None, settings)
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    from .cluster.kube import KubeConfigError
    from .controller import run_operator

    try:
        run_operator(
            args.namespace or [],
            args.liveness,
            args.peering,
            args.metrics_port or None,
            args.priority,
            kubeconfig=args.kubeconfig,
            context=args.context,
        )
    except (ValueError, KubeConfigError) as exc:  # the chart's values, or no cluster to talk to
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import yaml

    from .api.validation import InvalidJobError
    from .live import RichReporter
    from .local import Interrupted, LocalRunError, execute, failure_line, stop_on_signals

    reporter = RichReporter(tables=not args.quiet)
    try:
        with stop_on_signals():
            job, run = execute(
                Path(args.file),
                fresh=args.fresh,
                init=args.init_model,
                init_tokenizer=args.init_tokenizer,
                reporter=reporter,
            )
    except InvalidJobError as exc:
        for problem in exc.problems:
            print(problem.format(exc.source), file=sys.stderr)
        return 2
    except LocalRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        reason = exc.args[0] if isinstance(exc, Interrupted) else "SIGINT"
        reporter.console.print(
            f"[yellow]stopped[/] by {reason}: the stage processes were stopped and the run is Suspended; "
            "run the same command again to resume (--fresh starts over)"
        )
        return exc.exit_code if isinstance(exc, Interrupted) else 130
    if args.output == "yaml":
        print(yaml.safe_dump({"status": job.status.wire()}, sort_keys=False))
    reporter.console.print(f"status written to {run.status_file}", soft_wrap=True)
    if job.status.phase != "Succeeded":
        print(failure_line(job, run), file=sys.stderr)
        return 1
    return 0


def _cmd_estimate(args: argparse.Namespace) -> int:
    import json

    from . import estimate as est
    from .api.validation import InvalidJobError, load_job, local_path

    path = Path(args.file)
    try:
        import yaml

        source = str(((yaml.safe_load(path.read_text()) or {}).get("spec") or {}).get("model", {}).get("source", ""))
        remote = source.startswith(("hf://", "s3://", "gs://", "pvc://"))
        _, spec, _ = load_job(path, target="cluster" if remote else "local")
    except (InvalidJobError, OSError, AttributeError) as exc:
        for problem in getattr(exc, "problems", [exc]):
            print(problem.format(exc.source) if hasattr(problem, "format") else f"error: {problem}", file=sys.stderr)
        return 2
    if args.gpu_memory:
        resources = spec.resources.model_copy(update={"gpu_memory": args.gpu_memory})
        spec = spec.model_copy(update={"resources": resources})
    source = spec.model.source
    try:
        if args.config:
            config, origin = json.loads(Path(args.config).read_text()), args.config
        else:
            if not source.startswith(("hf://", "s3://", "gs://", "pvc://")):
                source = str(local_path(source, path.parent.resolve()))
            hub = Path(os.environ.get("HF_HUB_CACHE") or Path.home() / ".cache" / "huggingface" / "hub")
            config, origin = est.load_config(source, (hub,))
        preflight = json.loads(Path(args.preflight).read_text()) if args.preflight else None
        result = est.job_estimate(spec, config, est.data_shape(spec, preflight))
        gpu_bytes, gpu_label, _ = est.gpu_memory_of(spec)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(est.status_estimate(result, spec, config, origin), indent=2))
    else:
        print(f"config.json: {origin}")
        print(est.render(result, gpu_bytes))
        if gpu_bytes and not result.fits(gpu_bytes):
            print(f"refused: {est.refusal(result, gpu_bytes, gpu_label or 'the GPU')}")
        elif not gpu_bytes:
            print("no GPU memory known: set spec.resources.gpuMemory (or --gpu-memory 80Gi) to check the fit")
    return 1 if gpu_bytes and not result.fits(gpu_bytes) else 0


def _cmd_playground(args: argparse.Namespace) -> int:
    import json

    from .playground.target import TargetError, resolve

    try:
        target = resolve(
            Path(args.target), tuned=args.tuned, base=Path(args.base) if args.base else None,
            config_file=Path(args.config) if args.config else None,
            status_file=Path(args.status) if args.status else None,
            feedback=Path(args.feedback) if args.feedback else None,
        )  # fmt: skip
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps(target.describe(), indent=2))
        return 0
    from .playground.app import lean_gradio_import, offline

    offline()
    lean_gradio_import()
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("error: the playground needs Gradio: pip install 'finetune-operator[playground]'", file=sys.stderr)
        return 2
    from .playground.app import launch
    from .playground.engine import Engine

    def loaded(engine: Engine) -> None:
        if engine.error:
            print(f"error: the models could not be loaded: {engine.error}", file=sys.stderr, flush=True)
        else:
            print(f"loaded base {target.base_path} and tuned {target.tuned_kind} {target.tuned_path} "
                  f"in {engine.load_seconds:.1f} s", flush=True)  # fmt: skip

    try:
        launch(Engine(target), args.host, args.port, block=True, on_loaded=loaded,
               on_ready=lambda url: print(f"playground: {url} (loading the models)", flush=True))  # fmt: skip
    except KeyboardInterrupt:
        return 0
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    crd = sub.add_parser("crd", help="print the FineTuneJob CRD generated from the API models")
    mode = crd.add_mutually_exclusive_group()
    mode.add_argument(
        "--write", action="store_true", help="write it to crds/, the chart's crds/ and docs/api-reference.md"
    )
    mode.add_argument("--reference", action="store_true", help="print the Markdown API reference instead")
    mode.add_argument("--check", action="store_true", help="exit 1 if crds/ differs from the models")
    crd.set_defaults(func=_cmd_crd)

    validate = sub.add_parser(
        "validate", help="check FineTuneJob manifests offline (CRD rules + semantic checks); exit 1 on any error"
    )
    validate.add_argument("files", nargs="+", help="manifest files or folders")
    validate.add_argument(
        "--target",
        choices=["cluster", "local"],
        default="cluster",
        help="where the job will run: cluster (default) or local (finetune-operator run)",
    )
    validate.add_argument("--quiet", "-q", action="store_true", help="print errors only")
    validate.add_argument("--strict-kinds", action="store_true", help="treat other kinds as FineTuneJobs too")
    validate.add_argument(
        "--init-model",
        metavar="PRESET",
        choices=list(PRESET_HELP),
        help="with --target local: spec.model.source may not exist yet, as `run --init-model PRESET` builds it",
    )
    validate.set_defaults(func=_cmd_validate)

    render = sub.add_parser("render", help="print the objects the operator would create for a FineTuneJob")
    render.add_argument("file", help="the FineTuneJob manifest")
    render.add_argument(
        "--stage",
        action="append",
        choices=list(_stage_names()),
        help="only this stage (repeatable); default: every stage",
    )
    render.add_argument("--namespace", help="namespace when the manifest names none (default: default)")
    render.add_argument("--image", help="trainer image (default: the operator's default)")
    render.set_defaults(func=_cmd_render)

    estimate = sub.add_parser(
        "estimate", help="memory per GPU, batch size and time of a FineTuneJob, offline, before any GPU is held"
    )
    estimate.add_argument("file", help="a FineTuneJob manifest")
    estimate.add_argument("--config", help="the model's config.json (default: local source, HF cache, or a table)")
    estimate.add_argument("--gpu-memory", help="memory of one GPU, e.g. 80Gi (default: spec.resources.gpuMemory)")
    estimate.add_argument("--preflight", help="a prepare stage's reports/preflight.json, for the real data shape")
    estimate.add_argument("--json", action="store_true", help="print status.estimate as JSON")
    estimate.set_defaults(func=_cmd_estimate)

    run = sub.add_parser("run", help="run a FineTuneJob manifest on this machine (the embedded local mode)")
    run.add_argument("file", help="the FineTuneJob manifest")
    run.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    run.add_argument(
        "--init-model",
        metavar="PRESET",
        choices=list(PRESET_HELP),
        help="build a random-init GPT-2 and a tokenizer trained on the dataset at spec.model.source if nothing is "
        "there yet (offline; no Hub): " + "; ".join(f"{name}: {text}" for name, text in PRESET_HELP.items()),
    )
    run.add_argument(
        "--init-tokenizer",
        choices=["bpe", "sentencepiece", "char"],
        default="bpe",
        help="the tokenizer --init-model trains on the dataset's columns: bpe (default), sentencepiece, or char "
        "(one token per character: lets a tiny model learn string tasks such as spelling or reversing words)",
    )
    run.add_argument(
        "-o", "--output", choices=["yaml"], help="also print the final status (the CR's status schema) as YAML"
    )
    run.add_argument("--quiet", "-q", action="store_true", help="no result tables, only the outcome")
    run.set_defaults(func=_cmd_run)

    op = sub.add_parser("operator", help="run the operator against the current cluster (kopf)")
    op.add_argument("--namespace", "-n", action="append", help="watch only this namespace (repeatable)")
    op.add_argument(
        "--kubeconfig",
        help="kubeconfig file (default: $KUBECONFIG, else the pod's service account, else ~/.kube/config)",
    )
    op.add_argument("--context", help="kubeconfig context to use (default: the current context)")
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="kopf liveness endpoint")
    op.add_argument("--peering", help="kopf peering name (for more than one replica); default: standalone")
    op.add_argument(
        "--priority", type=int, help="kopf peering priority (default with --peering: a random one per process)"
    )
    op.add_argument(
        "--metrics-port",
        type=int,
        default=int(os.environ.get("FINETUNE_METRICS_PORT", "8000")),
        help="port of the Prometheus /metrics endpoint; 0 turns it off (default 8000 or $FINETUNE_METRICS_PORT)",
    )
    op.set_defaults(func=_cmd_operator)

    play = sub.add_parser(
        "playground", help="compare the base and the tuned model in a local Gradio app (the `playground` extra)"
    )
    play.add_argument("target", help="a FineTuneJob manifest (its local output), an output folder, or a run workdir")
    play.add_argument("--host", default=os.environ.get("FINETUNE_PLAYGROUND_HOST", "127.0.0.1"),
                      help="address to listen on (default 127.0.0.1; 0.0.0.0 in a pod)")  # fmt: skip
    play.add_argument("--port", type=int, default=int(os.environ.get("FINETUNE_PLAYGROUND_PORT", "7860")),
                      help="port (default 7860)")  # fmt: skip
    play.add_argument(
        "--tuned",
        default="auto",
        choices=["auto", "merged", "adapter", "onnx"],
        help="which exported artifact the tuned side loads (default: merged, else adapter, else onnx)",
    )
    play.add_argument("--base", help="the base model folder, when the run's sources.json names none that exists here")
    play.add_argument("--config", help="the stage config (the operator's ConfigMap) when TARGET is a run workdir")
    play.add_argument("--status", help="a status.yaml to report (default: TARGET/status.yaml)")
    play.add_argument("--feedback", help="JSONL file for the better/worse/same judgements "
                                         "(default: playground-feedback.jsonl next to the artifacts)")  # fmt: skip
    play.add_argument("--check", action="store_true", help="print what would be loaded and exit (no Gradio needed)")
    play.set_defaults(func=_cmd_playground)

    from .stages.runner import add_arguments

    stage = sub.add_parser("stage", help="run one stage program (what the stage pods run)")
    add_arguments(stage)
    stage.set_defaults(func=_cmd_stage)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
