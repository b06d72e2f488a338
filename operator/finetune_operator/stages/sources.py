"""Resolve model, tokenizer and dataset locations and bring them into the workdir (once)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..api.spec import Credentials
from .contract import DataError, StageConfig, StageError
from .formats import NullValue

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}

# Environment variables the operator fills from spec.*.credentials.secretRef (when a key is given).
TOKEN_ENV = {"model": "FT_MODEL_TOKEN", "dataset": "FT_DATASET_TOKEN", "output": "FT_OUTPUT_TOKEN"}


@dataclass(frozen=True)
class Location:
    scheme: str  # hf | s3 | gs | local
    path: str  # repo id for hf, URL for s3/gs, filesystem path for local


def parse_location(uri: str, config: StageConfig) -> Location:
    """pvc:// and file:// and plain paths become filesystem paths; hf/s3/gs stay remote."""
    if uri.startswith("hf://"):
        repo = uri.removeprefix("hf://").removeprefix("datasets/").strip("/")
        return Location("hf", repo)
    if uri.startswith(("s3://", "gs://")):
        return Location(uri[:2], uri)
    if uri.startswith("pvc://"):
        return Location("local", str(Path(config.pvc_root) / uri.removeprefix("pvc://")))
    raw = uri.removeprefix("file://")
    path = Path(raw)
    if not path.is_absolute() and config.base_dir:
        path = Path(config.base_dir) / path
    return Location("local", str(path))


def token_for(kind: str, credentials: Credentials | None) -> str | None:
    """The token mounted for `kind` (model, dataset, output), falling back to the standard HF_TOKEN."""
    if credentials is not None and credentials.secret_ref.key:
        return os.environ.get(TOKEN_ENV[kind]) or None
    return os.environ.get("HF_TOKEN") or None


def copy_remote(url: str, dest: Path) -> Path:
    """Copy a file or a prefix from an fsspec URL (s3://, gs://, memory://...) into `dest`."""
    try:
        import fsspec
    except ImportError as exc:  # pragma: no cover - fsspec is part of the train extra
        raise StageError("fsspec is not installed in the trainer image") from exc
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise StageError(
            f"cannot read {url}: {exc}. The trainer image needs the filesystem package "
            "(s3fs for s3://, gcsfs for gs://)",
            config_error=True,
        ) from exc
    if not fs.exists(path):
        raise StageError(f"{url} does not exist (or the credentials cannot see it)", config_error=True)
    dest.mkdir(parents=True, exist_ok=True)
    if fs.isdir(path):
        fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
        return dest
    target = dest / Path(path).name
    fs.get(path, str(target))
    return target


def fetch_model_dir(
    uri: str, revision: str | None, credentials: Credentials | None, dest: Path, config: StageConfig, kind: str
) -> tuple[Path, str | None]:
    """A local directory holding the model (or tokenizer) files, and the resolved revision."""
    loc = parse_location(uri, config)
    if loc.scheme == "local":
        path = Path(loc.path)
        if not path.exists():
            field = "spec.model.source" if kind == "model" else f"spec.{kind}.source"
            raise StageError(f"{field}: {path} does not exist", config_error=True)
        return path, revision
    marker = dest / ".fetched"
    if marker.exists():
        return dest, marker.read_text().strip() or revision
    if loc.scheme == "hf":
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

        token = token_for("model", credentials)
        try:
            sha = HfApi().model_info(loc.path, revision=revision, token=token).sha
            snapshot_download(loc.path, revision=sha, local_dir=str(dest), token=token)
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise StageError(f"{uri} (revision {revision or 'main'}): {exc}", config_error=True) from exc
        except HfHubHTTPError as exc:
            raise StageError(f"downloading {uri} failed: {exc}") from exc
        resolved = sha
    else:
        copy_remote(loc.path, dest)
        resolved = revision
    marker.write_text(resolved or "")
    return dest, resolved


def _data_files(path: Path, field: str) -> tuple[str, list[str]]:
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.suffix in DATA_SUFFIXES and p.is_file())
    if not files:
        raise StageError(f"{field}: no data files (.jsonl, .json, .csv, .parquet, .txt) at {path}", config_error=True)
    builders = {DATA_SUFFIXES.get(p.suffix) for p in files}
    if None in builders:
        raise StageError(
            f"{field}: {files[0].name} is not a supported file type: use .jsonl, .json, .csv, .parquet or .txt",
            config_error=True,
        )
    if len(builders) > 1:
        raise StageError(f"{field}: mixes file types {sorted(builders)}; keep one type per source", config_error=True)
    return builders.pop(), [str(p) for p in files]


@dataclass(frozen=True)
class Rows:
    """A loaded source: its rows (a `datasets.Dataset`, file order) and, for local files, where they came from."""

    dataset: Any
    builder: str | None = None
    files: tuple[str, ...] = ()

    def raw_record(self, row: int) -> tuple[str, int, Any] | None:
        """(file, line, the row as written) for 1-based `row` of a JSON source; None for other sources.

        datasets fills a key that a row lacks with null, so only the file tells "missing" from "null".
        """
        if self.builder != "json":
            return None
        seen = 0
        for name in self.files:
            path = Path(name)
            try:
                whole = json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" else None
            except json.JSONDecodeError:
                whole = None  # a .json file holding JSON lines
            if isinstance(whole, list):
                if row - seen <= len(whole):
                    return name, 0, whole[row - seen - 1]
                seen += len(whole)
                continue
            with path.open(encoding="utf-8") as handle:
                for line_number, line in enumerate(handle, start=1):
                    if line.strip():
                        seen += 1
                        if seen == row:
                            return name, line_number, json.loads(line)
        return None

    def explain_null(self, exc: NullValue) -> DataError:
        """datasets fills keys a JSON row lacks with null: tell the user which of the two it really is."""
        found = self.raw_record(exc.row)
        if found is None or not isinstance(found[2], dict) or exc.column in found[2]:
            return exc
        name, line, record = found
        place = [Path(name).name] if len(self.files) > 1 else []
        place += [f"line {line}"] if line else []
        return exc.missing(list(record), f" ({', '.join(place)})" if place else "")


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _json_problem(path: Path) -> str | None:
    """Why a JSON / JSON-lines file cannot be read as rows, with its line; None when it looks fine."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (byte {exc.start}): save it as UTF-8"
    if not text.strip():
        return "the file is empty"
    if path.suffix == ".json" and text.lstrip()[:1] in "[{":
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as exc:
            first = text.lstrip().splitlines()[0]
            if not _parses_as_object(first):  # a JSON document, not JSON lines: report where it breaks
                return f"line {exc.lineno}: invalid JSON ({_lower_first(exc.msg)})"
        else:
            if isinstance(whole, list):
                bad = next((i for i, item in enumerate(whole) if not isinstance(item, dict)), None)
                if bad is not None:
                    return f"item {bad + 1} of the array is a {type(whole[bad]).__name__}; expected an object per row"
                return None
            if isinstance(whole, dict):
                return None
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {line_number}: invalid JSON ({_lower_first(exc.msg)})"
        if not isinstance(value, dict):
            return f"line {line_number}: a JSON {type(value).__name__}; expected one object per line"
    return None


def _parses_as_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _root_cause(exc: BaseException) -> BaseException:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars and no parser log lines from datasets: a malformed file gets one line of ours instead."""
    import datasets

    bars_were_on = datasets.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars_were_on:
            datasets.enable_progress_bars()


def read_local_rows(path: Path, field: str, cache: str) -> Rows:
    """Rows of a local file or folder, with the reason and line when a file is malformed."""
    import datasets

    builder, files = _data_files(path, field)
    try:
        with _quiet_datasets():
            dataset = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache)
    except Exception as exc:  # datasets raises a zoo of parser errors; all mean the file is malformed
        if builder == "json":
            for name in files:
                problem = _json_problem(Path(name))
                if problem:
                    raise DataError(f"{field}: {_where(path, name)}{problem}") from None
        cause = _root_cause(exc)
        raise DataError(
            f"{field}: cannot read {path} as {builder}: {type(cause).__name__}: {cause}".rstrip(": ")
        ) from exc
    return Rows(dataset, builder, tuple(files))


def _where(source: Path, name: str) -> str:
    """Nothing for a single-file source (the field names it); the file's name inside a folder source."""
    return "" if Path(name) == source else f"{Path(name).relative_to(source)}: "


def load_rows(
    uri: str, split: str, credentials: Credentials | None, scratch: Path, config: StageConfig, field: str
) -> Rows:
    """Load a dataset source (rows in file order)."""
    import datasets

    cache = str(scratch / ".datasets-cache")
    loc = parse_location(uri, config)
    if loc.scheme == "hf":
        try:
            return Rows(
                datasets.load_dataset(loc.path, split=split, token=token_for("dataset", credentials), cache_dir=cache)
            )
        except Exception as exc:
            raise StageError(f"{field}: cannot load Hub dataset {loc.path} split {split}: {exc}") from exc
    if loc.scheme in ("s3", "gs"):
        path = copy_remote(loc.path, scratch / "raw" / field.rsplit(".", 1)[-1])
    else:
        path = Path(loc.path)
        if not path.exists():
            raise StageError(f"{field}: {path} does not exist", config_error=True)
    return read_local_rows(path, field, cache)
