"""Evaluation prompts: a JSONL file with a `prompt` field per line, a list, or the prompts a run names."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from moalign.errors import MoalignError


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from a JSONL file with a `prompt` field per line."""
    path = Path(path)
    if not path.is_file():
        raise MoalignError(f"prompt file {path} does not exist")
    prompts = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise MoalignError(f"{path}:{number} is not valid JSON ({error.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise MoalignError(f"{path}:{number} has no string 'prompt' field")
            prompts.append(row["prompt"])
    if not prompts:
        raise MoalignError(f"prompt file {path} holds no prompts")
    return prompts


def resolve_prompts(
    prompts: Sequence[str] | str | Path | None, manifests: list[tuple[Path, dict]], n_prompts: int | None
) -> list[str]:
    """The prompts to evaluate on: a JSONL file, a list, or else the first run's `eval_prompts` (relative to
    that run); the first `n_prompts` of them."""
    if isinstance(prompts, (str, Path)):
        loaded = load_prompts(prompts)
    elif prompts is not None:
        loaded = [str(p) for p in prompts]
    else:
        source = next(((run, m["eval_prompts"]) for run, m in manifests if m.get("eval_prompts")), None)
        if source is None:
            raise MoalignError(
                "no evaluation prompts: pass --prompts FILE.jsonl or train with eval_prompts set in the manifest"
            )
        run, path = source
        path = Path(path)
        loaded = load_prompts(path if path.is_absolute() else run / path)
    if n_prompts is not None:
        if n_prompts < 1:
            raise MoalignError(f"--n-prompts must be ≥ 1, got {n_prompts}")
        loaded = loaded[:n_prompts]
    if not loaded:
        raise MoalignError("no evaluation prompts: the prompt list is empty")
    return loaded
