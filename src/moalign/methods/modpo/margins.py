"""MODPO's margins: the other objectives' rewards of chosen and rejected, computed once before training.

A margin source is an objective spec (scored through the score cache, z-scored over the training samples)
or `dpo:RUN_DIR`, the implicit reward β·log(π_φ/π_ref) of a `moalign dpo` run, as in the paper's recipe.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch

from moalign.errors import MoalignError
from moalign.methods.modpo.pairs import completion_text, pairs_settings
from moalign.methods.modpo.trainer import MARGIN_CHOSEN, MARGIN_REJECTED
from moalign.run import atomic_write_parquet, write_json

log = logging.getLogger("moalign")

DPO_MARGIN = "dpo:"


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def sequence_logps(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 8,
    max_length: int | None = None,
) -> np.ndarray:
    """log π(completion + EOS | prompt) summed over the completion tokens, tokenized as TRL's DPOTrainer does."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token or ""
    values: list[float] = []
    for start in range(0, len(prompts), batch_size):
        rows, starts = [], []
        for prompt, completion in zip(prompts[start : start + batch_size], completions[start : start + batch_size]):
            text = completion if completion.endswith(eos) else completion + eos
            prompt_ids = tokenizer(prompt)["input_ids"]
            full = tokenizer(prompt + text)["input_ids"]
            starts.append(_common_prefix(prompt_ids, full))
            rows.append(full[:max_length] if max_length else full)
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        position = torch.arange(1, width, device=device)[None, :]
        completion = (position >= torch.tensor(starts, device=device)[:, None]) & mask[:, 1:].bool()
        values += (token_logps * completion).sum(dim=1).tolist()
    return np.asarray(values, dtype=float)


def dpo_run_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A `moalign dpo` run's manifest, checked to be one (the implicit reward needs its model, base and β)."""
    from moalign.run import read_manifest

    manifest = read_manifest(run_dir)
    if manifest["method"] != "dpo":
        raise MoalignError(f"margin dpo:{run_dir} is a {manifest['method']!r} run; it must be a `moalign dpo` run")
    model = Path(run_dir) / manifest.get("model", "model")
    if not model.is_dir():
        raise MoalignError(f"margin dpo:{run_dir} has no trained model at {model}")
    return manifest


def implicit_rewards(
    run_dir: str | os.PathLike,
    prompts: Sequence[str],
    responses: Sequence[str],
    beta: float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
) -> np.ndarray:
    """β·log(π_φ(y|x)/π_ref(y|x)) of a `moalign dpo` run, π_ref its base model and β its training β."""
    from moalign.generation import load_model

    manifest = dpo_run_info(run_dir)
    beta = float(manifest.get("beta", 0.1) if beta is None else beta)
    completions = [completion_text(r) for r in responses]
    values = []
    for path in (Path(run_dir) / manifest.get("model", "model"), manifest["base_model"]):
        model, tokenizer = load_model(str(path))
        values.append(sequence_logps(model, tokenizer, list(prompts), completions, batch_size, max_length))
        del model
    return beta * (values[0] - values[1])


def margin_spec_kind(spec: str) -> str:
    return "dpo" if spec.startswith(DPO_MARGIN) else "objective"


def _dpo_margin_parts(spec: str) -> tuple[str, float | None]:
    from moalign.objectives import parse_spec

    _, run_dir, options = parse_spec(spec)
    unknown = set(options) - {"beta"}
    if unknown or not run_dir:
        raise MoalignError(f"margin {spec!r}: write dpo:RUN_DIR (optionally ?beta=X)")
    return run_dir, (float(options["beta"]) if "beta" in options else None)


def compute_margins(
    pairs: datasets.Dataset, specs: Sequence[str], config: Any, built: dict[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any] | None]:
    """The other objectives' rewards of chosen and rejected (two B×(N-1) arrays), once, before training.

    Objective specs are scored (with the score cache) and z-scored over all training samples (chosen and
    rejected); their statistics are returned. `dpo:RUN` margins are the implicit rewards of that DPO model.
    `built` maps specs to objectives already built (a reward model is then not loaded twice).
    """
    from moalign.methods.common import score_cache
    from moalign.objectives import build
    from moalign.scores import NormStats, score

    prompts, chosen, rejected = list(pairs["prompt"]), list(pairs["chosen"]), list(pairs["rejected"])
    n = len(prompts)
    margin_c = np.zeros((n, len(specs)))
    margin_r = np.zeros((n, len(specs)))
    scorer_columns = [i for i, s in enumerate(specs) if margin_spec_kind(s) == "objective"]
    stats = None
    if scorer_columns:
        built = built or {}
        objectives = [built.get(specs[i]) or build(specs[i]) for i in scorer_columns]
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise MoalignError(f"margin objective names must be unique; give ?name=... to tell apart: {names}")
        raw = score(objectives, prompts + prompts, chosen + rejected, score_cache(config))
        fitted = NormStats.fit(raw, names)
        matrix = fitted.matrix(raw)
        if config.margin_normalize:
            matrix = fitted.zscore(matrix)
        for column, i in enumerate(scorer_columns):
            margin_c[:, i], margin_r[:, i] = matrix[:n, column], matrix[n:, column]
        stats = fitted.to_dict()
    for i, spec in enumerate(specs):
        if margin_spec_kind(spec) == "dpo":
            run_dir, beta = _dpo_margin_parts(spec)
            log.info(f"implicit-reward margins from {run_dir}")
            rewards = implicit_rewards(
                run_dir, prompts + prompts, chosen + rejected, beta, config.margin_batch_size, config.max_length
            )
            margin_c[:, i], margin_r[:, i] = rewards[:n], rewards[n:]
    return margin_c, margin_r, stats


def margin_flops(pairs: datasets.Dataset, specs: Sequence[str], config: Any, built: dict[str, Any]) -> float:
    """FLOPs of the margin pass (moalign.cost), computed or read from the cache: 2·N_rm per token each model-based
    objective reads, and for `dpo:RUN` its model and its reference each reading every chosen and rejected
    sequence (prompt + response + EOS, cut at `max_length`) at 2·N per token."""
    from moalign.cost import scoring_flops, size_from_config
    from moalign.models import load_tokenizer
    from moalign.objectives import build

    prompts = list(pairs["prompt"]) * 2
    responses = list(pairs["chosen"]) + list(pairs["rejected"])
    objectives = [built.get(s) or build(s) for s in specs if margin_spec_kind(s) == "objective"]
    total = scoring_flops(objectives, prompts, responses)
    for spec in specs:
        if margin_spec_kind(spec) == "dpo":
            run_dir = _dpo_margin_parts(spec)[0]
            model = Path(run_dir) / dpo_run_info(run_dir).get("model", "model")
            tokenizer = load_tokenizer(str(model))
            texts = [p + completion_text(r) + (tokenizer.eos_token or "") for p, r in zip(prompts, responses)]
            lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
            tokens = sum(min(n, config.max_length) if config.max_length else n for n in lengths)
            total += 2 * size_from_config(str(model)).forward_per_token * tokens
    return total


def check_margins(margin_chosen: np.ndarray, margin_rejected: np.ndarray, specs: Sequence[str]) -> None:
    for matrix in (margin_chosen, margin_rejected):
        bad = ~np.isfinite(matrix)
        if bad.any():
            column = int(np.argwhere(bad)[0][1])
            raise MoalignError(f"margin {specs[column]!r} gave {int(bad[:, column].sum())} NaN or infinite values")


def cached_margins(config: Any, specs: Sequence[str], built: dict[str, Any], pairs: datasets.Dataset, run_dir: Path):
    """Margins computed once per run and kept in the run dir, so a resumed run does not recompute them."""
    key = {
        **pairs_settings(config),
        "margins": list(specs),
        "normalize": config.margin_normalize,
        "dpo_models": [_model_stamp(_dpo_margin_parts(s)[0]) for s in specs if margin_spec_kind(s) == "dpo"],
    }
    path, meta_path = run_dir / "margins.parquet", run_dir / "margins.json"
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        frame = pd.read_parquet(path)
        if meta.get("key") == key and len(frame) == len(pairs):
            log.info("margins: reusing margins.parquet")
            return np.stack(frame[MARGIN_CHOSEN].to_numpy()), np.stack(frame[MARGIN_REJECTED].to_numpy()), meta["stats"]
    margin_c, margin_r, stats = compute_margins(pairs, specs, config, built)
    check_margins(margin_c, margin_r, specs)
    frame = pairs.to_pandas()
    frame[MARGIN_CHOSEN] = list(margin_c)
    frame[MARGIN_REJECTED] = list(margin_r)
    atomic_write_parquet(frame, path)
    write_json(meta_path, {"key": key, "stats": stats})
    return margin_c, margin_r, stats


def _model_stamp(run_dir: str) -> float:
    """When a DPO run's model was saved: margins from a retrained model are recomputed."""
    manifest = dpo_run_info(run_dir)
    return os.path.getmtime(Path(run_dir) / manifest.get("model", "model"))
