"""The run directory: its manifest `moalign.json` and the atomic writes everything uses."""

from __future__ import annotations

import json
import os
import platform
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from moalign.errors import MoalignError

MANIFEST = "moalign.json"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write to a temporary file beside `path`, then rename: a crash never leaves half a file."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write a file or folder into; it becomes `path` only on success.

    A crash or an exception leaves `path` as it was (a folder that exists is complete) and no temporary behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    _remove(tmp)
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` then rename onto `path`: for writers that take a path (parquet, images, save_pretrained)."""
    with atomic_path(path) as tmp:
        write(tmp)


def atomic_write_parquet(frame: Any, path: str | os.PathLike) -> None:
    """A pandas DataFrame to parquet, atomically."""
    atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as handle:
        return json.load(handle)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def guard_output(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse to overwrite an existing file unless asked to."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise MoalignError(f"{path} exists; pass --overwrite to replace it or choose another output path")
    return path


SETTINGS = "moalign_settings.json"
# Config fields that do not change what a run trains: logging, checkpointing, hub, evaluation and where files
# go; and the fields whose change extends a finished run instead of redoing it (more preferences, RiC's next
# online iteration, ParetoHqD's stage 2).
NOT_RESULT_PREFIXES = ("logging_", "log_", "save_", "hub_", "push_to_hub", "eval", "dataloader_", "report_")
NOT_RESULT = {
    "output_dir",
    "overwrite",
    "run_name",
    "disable_tqdm",
    "do_eval",
    "per_device_eval_batch_size",
    "batch_eval_metrics",
    "bf16_full_eval",
    "fp16_full_eval",
    "resume_from_checkpoint",
    "score_cache",
    "generation_batch_size",
    "margin_batch_size",
    "selection_plots",
    "select_only",
    "preferences",
    "online_iterations",
    "stages",
}


def result_settings(config: Any) -> dict[str, Any]:
    """The config's fields that decide what the run trains, as JSON values (nothing secret: no hub token)."""
    import dataclasses

    return {
        f.name: json.loads(json.dumps(getattr(config, f.name), default=str))
        for f in dataclasses.fields(config)
        if f.name not in NOT_RESULT and not f.name.startswith(NOT_RESULT_PREFIXES)
    }


def claim_run_dir(run_dir: str | os.PathLike, method: str, settings: dict[str, Any], overwrite: bool = False) -> Path:
    """Make `run_dir` this run's, or refuse in one line: a run directory knows the settings it was trained with.

    A rerun with the same settings resumes (finished stages are skipped); with settings that change the result
    it refuses, naming the setting, unless `overwrite` (then the old run is deleted first).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise MoalignError(f"output_dir {run_dir} is a file; give a folder for the run")
    path = run_dir / SETTINGS
    current = {"method": method, **settings}
    if overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
        if not (path.exists() or (run_dir / MANIFEST).exists()):
            raise MoalignError(f"--overwrite: {run_dir} is not a moalign run directory; refusing to delete it")
        shutil.rmtree(run_dir)
    if path.exists():
        previous = read_json(path)
        changed = [key for key in sorted(set(previous) | set(current)) if previous.get(key) != current.get(key)]
        if changed:
            key = changed[0]
            more = (
                f" (and {len(changed) - 1} more setting{'s' if len(changed) > 2 else ''})" if len(changed) > 1 else ""
            )
            raise MoalignError(
                f"{run_dir} was trained with {key}={previous.get(key)!r}, not {current.get(key)!r}{more}; "
                "pass --overwrite to retrain it from scratch, or choose another output_dir"
            )
    elif (run_dir / MANIFEST).exists():  # a run from before settings were recorded: what its manifest says
        manifest = read_json(run_dir / MANIFEST)
        known = {"method": "method", "base_model": "model_name_or_path", "objectives": "objectives"}
        for key, setting in known.items():
            if key in manifest and setting in current and manifest[key] != current[setting]:
                raise MoalignError(
                    f"{run_dir} holds a {manifest.get('method')} run with {key}={manifest[key]!r}, not "
                    f"{current[setting]!r}; pass --overwrite to retrain it from scratch, or choose another output_dir"
                )
    if not run_dir.exists():
        CLAIMED.append(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(path, current)
    return run_dir


CLAIMED: list[Path] = []  # run directories this process created, until it finishes


def discard_empty_claims() -> None:
    """After a failed command: remove the run directories it created that hold nothing but their settings."""
    while CLAIMED:
        run_dir = CLAIMED.pop()
        if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {SETTINGS}:
            shutil.rmtree(run_dir, ignore_errors=True)


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("moalign", "torch", "transformers", "trl", "peft", "datasets", "accelerate"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            continue
    return versions


def write_manifest(run_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Write `moalign.json`; `method` names the producer, library versions are added."""
    if "method" not in manifest:
        raise ValueError("a manifest needs a 'method'")
    write_json(Path(run_dir) / MANIFEST, {**manifest, "versions": library_versions()})


def read_manifest(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / MANIFEST
    if not Path(run_dir).is_dir():
        raise MoalignError(f"run directory {run_dir} does not exist")
    if not path.exists():
        raise MoalignError(f"{run_dir} is not a run directory: it has no {MANIFEST} (train a method into it first)")
    try:
        manifest = read_json(path)
    except json.JSONDecodeError as error:
        raise MoalignError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if "method" not in manifest:
        raise MoalignError(f"{path} has no 'method' key")
    return manifest
