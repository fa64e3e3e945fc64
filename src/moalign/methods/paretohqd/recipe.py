"""ParetoHqD (Gu et al., AAAI 2026): one model per preference, SFT on the few samples near its ray.

Why it works: alignment needs little data if it is the right data. A preference w is a direction, the
ray from the ideal point through the compromise point `low + w ⊙ (high − low)`; the training set of w
is the k samples of the first non-dominated layers that lie nearest that ray . Stage 2
fights over-fitting: N+1 stage-1 models generate fresh responses, which are scored, sorted and
re-selected (k/2 per preference) to continue each preference's SFT.

Usage: moalign paretohqd --config configs/paretohqd_demo.yaml [--flag value ...]
       moalign paretohqd --config ... --select_only   (write the selection and its plots, train nothing)

The run directory:
  scores.parquet                 the scored training data (reused when the run resumes)
  selection/stage1/<w>.jsonl     what each preference's stage-1 model trains on, <w>.png, overview.png
  stage1/                        a run directory of its own with the stage-1 models (stage 1 alone)
  stage2_generated.parquet       the representative models' responses, scored (cached for resuming)
  selection/stage2/<w>.jsonl     the stage-2 data of each preference (and plots)
  models/<w>/                    the final model, or LoRA adapter with `save_adapters`, per preference
  moalign.json                   the manifest `moalign.policy.load_policy` reads
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
from trl import SFTConfig

from moalign import data, distributed
from moalign.errors import MoalignError
from moalign.methods.common import (
    load_training_data,
    score_cache,
    start_run,
    train_per_preference,
    training_totals,
    write_run_manifest,
)
from moalign.methods.config import CommonArguments, parse_config
from moalign.methods.paretohqd.selection import DISTANCES, representatives, select_all, write_selection
from moalign.methods.paretohqd.stage2 import generate_stage2
from moalign.methods.stages import train_sft
from moalign.pareto import parse_preferences, preference_name
from moalign.policy import PER_PREFERENCE_POLICY
from moalign.run import atomic_write_parquet, read_json, write_json
from moalign.scores import NormStats, score

log = logging.getLogger("moalign")


@dataclass
class ParetoHqDConfig(CommonArguments, SFTConfig):
    """TRL's SFTConfig, moalign's common fields and ParetoHqD's options ((?) = unverified paper value)."""

    preferences: list[str] = field(
        default_factory=lambda: ["grid:10"],
        metadata={"help": "one model per preference: 1,0 0.5,0.5 0,1 or grid:D (simplex grid of step 1/D)"},
    )
    k: int = field(default=100, metadata={"help": "stage-1 samples per preference (?)"})
    n_layers: int = field(default=10, metadata={"help": "keep only the first L non-dominated layers (?)"})
    distance: str = field(default="perpendicular", metadata={"help": "to the ray: perpendicular (?) or angle"})
    stages: int = field(default=2, metadata={"help": "1: stage 1 only; 2: also the stage-2 re-selection"})
    stage1_max_steps: int = field(default=200, metadata={"help": "SFT steps of stage 1 (?) (batch: per_device_…)"})
    stage2_max_steps: int | None = field(default=None, metadata={"help": "SFT steps of stage 2 (default: stage 1's)"})
    stage2_k: int | None = field(default=None, metadata={"help": "stage-2 samples per preference (default k/2)"})
    stage2_prompts: int = field(default=10000, metadata={"help": "prompts each representative model answers (?)"})
    generation_batch_size: int = field(default=64, metadata={"help": "prompts per generation batch in stage 2"})
    stage2_drop_degenerate: bool = field(
        default=True, metadata={"help": "drop collapsed stage-2 responses (moalign.data.is_degenerate)"}
    )
    select_only: bool = field(default=False, metadata={"help": "write the selection (JSONL, plots) and exit"})
    use_score_columns: bool = field(
        default=True, metadata={"help": "reuse a sample dataset's columns named like the objectives as scores"}
    )
    selection_plots: bool = field(default=True, metadata={"help": "plot each selection beside its JSONL"})


def validate(config: ParetoHqDConfig) -> None:
    """Catch what a user can get wrong before anything is loaded or trained."""
    if config.k < 1:
        raise MoalignError(f"k must be ≥ 1 (samples per preference), got {config.k}")
    if config.stage2_k is not None and config.stage2_k < 1:
        raise MoalignError(f"stage2_k must be ≥ 1, got {config.stage2_k}")
    if config.n_layers < 1:
        raise MoalignError(f"n_layers must be ≥ 1, got {config.n_layers}")
    if config.distance not in DISTANCES:
        raise MoalignError(f"distance {config.distance!r}: use one of {', '.join(DISTANCES)}")
    if config.stages not in (1, 2):
        raise MoalignError(f"stages must be 1 or 2, got {config.stages}")
    if config.stage2_prompts < 1 or config.generation_batch_size < 1:
        raise MoalignError("stage2_prompts and generation_batch_size must be ≥ 1")
    if config.stage1_max_steps < 1 or (config.stage2_max_steps is not None and config.stage2_max_steps < 1):
        raise MoalignError("stage1_max_steps and stage2_max_steps must be ≥ 1")
    if config.save_adapters and not config.use_peft:
        raise MoalignError("save_adapters needs use_peft (there are no adapters to save otherwise)")
    if len(config.objectives) < 2:
        raise MoalignError(f"ParetoHqD needs at least two objectives, got {list(config.objectives)}")


def training_frame(config: ParetoHqDConfig) -> tuple[pd.DataFrame, datasets.Dataset]:
    """The training samples as a prompt/response frame (pairs: both responses, with their pair and which won)."""
    source = load_training_data(config)
    prompts, responses = data.to_samples(source)
    if not prompts:
        raise MoalignError(f"dataset {config.dataset} has no samples")
    frame = pd.DataFrame({"prompt": prompts, "response": responses})
    if data.is_pairs(source):
        frame["pair"] = list(range(len(source))) * 2
        frame["preferred"] = [True] * len(source) + [False] * len(source)
    return frame, source


def reuse_scores(frame: pd.DataFrame, names: list[str], cached: Path) -> bool:
    """Fill `frame`'s score columns from `cached` (a run's scores.parquet) when it scored exactly these samples."""
    if not cached.exists():
        return False
    previous = pd.read_parquet(cached)
    same = (
        len(previous) == len(frame)
        and set(names) <= set(previous.columns)
        and previous["prompt"].tolist() == frame["prompt"].tolist()
        and previous["response"].tolist() == frame["response"].tolist()
    )
    if same:
        for name in names:
            frame[name] = previous[name].to_numpy(dtype=float)
    return same


def dataset_scores(config: ParetoHqDConfig, source: datasets.Dataset, names: list[str]) -> dict[str, np.ndarray] | None:
    """The dataset's own score columns, one per objective, when `use_score_columns` allows (samples, not pairs)."""
    if not (config.use_score_columns and not data.is_pairs(source) and set(names) <= set(source.column_names)):
        return None
    scores = {name: np.asarray(source[name], dtype=float) for name in names}
    for name, values in scores.items():
        if not np.isfinite(values).all():
            raise MoalignError(f"score column {name!r} of {config.dataset} has NaN or infinite values")
    return scores


def score_training_data(config: ParetoHqDConfig, objectives, run_dir: Path) -> tuple[pd.DataFrame, float, float]:
    """The training samples with a score column per objective, cached in `scores.parquet`; and the seconds and
    FLOPs (moalign.cost: model-based objectives) the scoring spent."""
    names = [objective.name for objective in objectives]
    frame, source = training_frame(config)
    cached = run_dir / "scores.parquet"
    if reuse_scores(frame, names, cached):
        log.info(f"scores: reusing {cached}")
        return frame, 0.0, 0.0
    prompts, responses = frame["prompt"].tolist(), frame["response"].tolist()
    start, flops = time.perf_counter(), 0.0
    given = dataset_scores(config, source, names)
    if given is not None:
        log.info(f"scores: using the dataset's columns {names}")
    else:
        from moalign.cost import scoring_flops

        given = score(objectives, prompts, responses, score_cache(config))
        flops = scoring_flops(objectives, prompts, responses)
    for name in names:
        frame[name] = given[name]
    seconds = time.perf_counter() - start
    atomic_write_parquet(frame, cached)
    return frame, seconds, flops


def completions(frame: pd.DataFrame, rows: np.ndarray) -> datasets.Dataset:
    """prompt/completion rows for SFT; the completion starts with the space that separates it from the prompt."""
    return datasets.Dataset.from_dict(
        {
            "prompt": [frame["prompt"].iat[i] for i in rows],
            "completion": [" " + frame["response"].iat[i] for i in rows],
        }
    )


def train_one(
    model_path: str, dataset: datasets.Dataset, config: ParetoHqDConfig, stage_dir: Path, final_dir: Path, steps: int
) -> dict[str, Any]:
    """One preference's SFT stage, from the base model or from its stage-1 model (full or adapter)."""
    keep = bool(config.use_peft and config.save_adapters)
    return train_sft(model_path, dataset, config, stage_dir, final_dir, keep_adapter=keep, max_steps=steps)


def train_stage(
    stage: str,
    sources: list[str],
    train_sets: list[datasets.Dataset],
    preferences: np.ndarray,
    config: ParetoHqDConfig,
    run_dir: Path,
    models_dir: str,
    steps: int,
) -> dict[str, dict[str, Any]]:
    """One SFT per preference into `run_dir/models_dir/<w>` (a finished model is skipped); each model's stats."""
    work = {preference_name(w): (source, dataset) for w, source, dataset in zip(preferences, sources, train_sets)}

    def train_one(preference: Sequence[float], stage_dir: Path, final_dir: Path) -> dict[str, Any]:
        source, dataset = work[final_dir.name]
        log.info(f"{stage}: {final_dir.name} on {len(dataset)} samples")
        keep = bool(config.use_peft and config.save_adapters)
        return train_sft(source, dataset, config, stage_dir, final_dir, keep_adapter=keep, max_steps=steps)

    _, stats = train_per_preference(preferences, run_dir, train_one, models_dir, checkpoint_prefix=f"{stage}-")
    return stats


def write_manifest_for(
    config: ParetoHqDConfig,
    run_dir: Path,
    models_prefix: str,
    preferences: np.ndarray,
    training: dict[str, Any],
    fields: dict[str, Any],
) -> None:
    """The manifest of `run_dir`, whose model for preference w is `models_prefix/<w>`."""
    models = [{"preference": w.tolist(), "path": f"{models_prefix}/{preference_name(w)}"} for w in preferences]
    scoped = config if Path(config.output_dir) == run_dir else dataclasses.replace(config, output_dir=str(run_dir))
    write_run_manifest(scoped, "paretohqd", PER_PREFERENCE_POLICY, models=models, training=training, **fields)


def train(config: ParetoHqDConfig) -> Path:
    """Score, select, train stage 1 (and stage 2) per preference; write the run directory."""
    from moalign.objectives import build_all

    validate(config)
    objectives = build_all(config.objectives)
    names = [objective.name for objective in objectives]
    preferences = parse_preferences(config.preferences, len(names))
    run_dir = start_run(config, "paretohqd")
    timings_path = run_dir / "paretohqd_timings.json"
    timings = read_json(timings_path) if timings_path.exists() else {}

    with distributed.main_first():  # the main process scores and caches; the others read its cache
        frame, scoring_seconds, flops = score_training_data(config, objectives, run_dir)
    if scoring_seconds or "scoring_seconds" not in timings:
        timings["scoring_seconds"] = scoring_seconds
        timings["scoring_flops"] = flops
        distributed.run_on_main(write_json, timings_path, timings)
    selections, layers, low, high = select_all(frame, names, preferences, config.k, config.n_layers, config.distance)
    plots = config.selection_plots or config.select_only
    folder = run_dir / "selection" / "stage1"
    summary1 = distributed.run_on_main(
        write_selection, folder, frame, names, preferences, selections, layers, config.n_layers, low, high, plots
    )
    if config.select_only:
        return run_dir

    # Stage 1: every preference's model from the base model, on its k offline samples.
    base = [config.model_name_or_path] * len(preferences)
    data1 = [completions(frame, chosen) for chosen in selections]
    stage1 = train_stage("stage1", base, data1, preferences, config, run_dir, "stage1/models", config.stage1_max_steps)
    scoring = {"seconds": timings["scoring_seconds"], "flops": timings.get("scoring_flops", 0.0)}
    training1 = training_totals({"scoring": scoring, "stage1": training_totals(stage1)})
    details = {"k": config.k, "n_layers": config.n_layers, "distance": config.distance}
    details.update(preferences=preferences.tolist(), selection_stage1=summary1)
    fields = {"stats": NormStats.fit(frame, names).to_dict(), "normalisation": "minmax"}
    stage1_fields = {**fields, "paretohqd": {**details, "stages": 1}}
    stage1_dir = run_dir / "stage1"
    write_manifest_for(config, stage1_dir, "models", preferences, training1, stage1_fields)  # stage 1 alone
    if config.stages == 1:
        write_manifest_for(config, run_dir, "stage1/models", preferences, training1, stage1_fields)
        return run_dir

    # Stage 2: the representative stage-1 models generate; each preference continues on its k/2 best.
    chosen_models = representatives(preferences)
    generators = [stage1_dir / "models" / preference_name(preferences[i]) for i in chosen_models]
    generated, info = generate_stage2(config, objectives, generators, frame, run_dir)
    k2 = config.stage2_k or max(1, config.k // 2)
    selections2, layers2, low2, high2 = select_all(generated, names, preferences, k2, config.n_layers, config.distance)
    folder = run_dir / "selection" / "stage2"
    summary2 = distributed.run_on_main(
        write_selection,
        folder,
        generated,
        names,
        preferences,
        selections2,
        layers2,
        config.n_layers,
        low2,
        high2,
        config.selection_plots,
    )
    sources = [str(stage1_dir / "models" / preference_name(w)) for w in preferences]
    data2 = [completions(generated, chosen) for chosen in selections2]
    steps2 = config.stage2_max_steps or config.stage1_max_steps
    stage2 = train_stage("stage2", sources, data2, preferences, config, run_dir, "models", steps2)
    generation = {"seconds": info["generation_seconds"] + info["scoring_seconds"], "tokens": info["generated_tokens"]}
    training = training_totals(
        {**training1["stages"], "stage2_generation": {**generation, **info}, "stage2": training_totals(stage2)}
    )
    details.update(
        stages=2,
        stage1_run="stage1",
        stage2_k=k2,
        generators=[preferences[i].tolist() for i in chosen_models],
        selection_stage2=summary2,
    )
    write_manifest_for(config, run_dir, "models", preferences, training, {**fields, "paretohqd": details})
    distributed.remove(run_dir / "checkpoints")
    return run_dir


def cli(argv: list[str]) -> None:
    config = parse_config(ParetoHqDConfig, argv)
    run_dir = train(config)
    if config.select_only:
        print(f"ParetoHqD selection written to {run_dir / 'selection' / 'stage1'}")
    else:
        print(f"ParetoHqD run written to {run_dir}")
