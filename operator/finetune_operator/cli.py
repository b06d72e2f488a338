"""The `finetune-operator` command line."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


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
    for path in iter_manifest_files(Path(p) for p in args.files):
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
            _, problems = validate_object(doc, target=args.target, base_dir=path.parent.resolve())
            for problem in problems:
                if problem.severity == "warning" and args.quiet:
                    continue
                print(problem.format(source))
            errors += sum(p.severity == "error" for p in problems)
            warnings += sum(p.severity == "warning" for p in problems)
    sys.stdout.flush()
    print(f"{jobs} FineTuneJob(s) checked: {errors} error(s), {warnings} warning(s)", file=sys.stderr)
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
    if args.namespace:
        metadata["namespace"] = args.namespace
    metadata.setdefault("namespace", "default")
    job = FineTuneJob(metadata=metadata, spec=spec)
    settings = OperatorSettings(trainer_image=args.image) if args.image else OperatorSettings()
    objects = render(job, args.stage or None, settings)
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
    return 0


def _cmd_operator(args: argparse.Namespace) -> int:
    from .controller import run_operator

    try:
        run_operator(args.namespace or [], args.liveness, args.peering, args.metrics_port or None, args.priority)
    except ValueError as exc:  # operator settings from the environment (the chart's values)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    import yaml

    from .api.validation import InvalidJobError
    from .live import RichReporter
    from .local import execute

    reporter = RichReporter()
    try:
        job, run = execute(Path(args.file), fresh=args.fresh, init=args.init_model, reporter=reporter)
    except InvalidJobError as exc:
        for problem in exc.problems:
            print(problem.format(exc.source), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        reporter.console.print("[yellow]stopped[/]: run the same command again to resume (--fresh starts over)")
        return 130
    if not args.quiet:
        print(yaml.safe_dump({"status": job.status.wire()}, sort_keys=False))
    reporter.console.print(f"status written to {run.status_file}")
    return 0 if job.status.phase == "Succeeded" else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune-operator", description=__doc__)
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

    run = sub.add_parser("run", help="run a FineTuneJob manifest on this machine (the embedded local mode)")
    run.add_argument("file", help="the FineTuneJob manifest")
    run.add_argument("--fresh", action="store_true", help="start over instead of resuming")
    run.add_argument(
        "--init-model",
        metavar="PRESET",
        choices=["micro", "tiny-gpt2"],
        help="build a random-init model of this size at spec.model.source if nothing is there yet (offline)",
    )
    run.add_argument("--quiet", "-q", action="store_true", help="do not print the final status YAML")
    run.set_defaults(func=_cmd_run)

    op = sub.add_parser("operator", help="run the operator against the current cluster (kopf)")
    op.add_argument("--namespace", "-n", action="append", help="watch only this namespace (repeatable)")
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
