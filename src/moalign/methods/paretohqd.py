"""ParetoHqD (Gu et al., AAAI 2026): one model per preference, SFT on the few samples near its ray.

Why it works: alignment needs little data if it is the right data. A preference w is a direction, the
ray from the ideal point through the compromise point `low + w ⊙ (high − low)`; the training set of w
is the k samples of the first non-dominated layers that lie nearest that ray (METHODS.md §2). Stage 2
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
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
from trl import SFTConfig

from moalign import data
from moalign.errors import MoalignError
from moalign.methods.common import (
    CommonArguments,
    parse_config,
    train_sft,
    write_run_manifest,
)
from moalign.pareto import pareto_ranks, parse_weights, ray_distance, simplex_grid, validate_weights
from moalign.run import atomic_write_text, read_json, write_json
from moalign.scores import NormStats, ScoreCache, cache_dir, score

log = logging.getLogger("moalign")

DISTANCES = ("perpendicular", "angle")
STAGE2_STOPS = ["\n\nHuman:", "\n\nAssistant:"]  # a turn the model invents is not part of its answer


@dataclass
class ParetoHqDConfig(CommonArguments, SFTConfig):
    """TRL's SFTConfig, moalign's common fields and ParetoHqD's options ((?) = unverified paper value)."""

    preferences: list[str] | None = field(
        default=None,
        metadata={"help": "preferences to train, e.g. 1,0 0.5,0.5 0,1 (YAML: strings or lists); default: the grid"},
    )
    grid_divisions: int = field(default=10, metadata={"help": "simplex grid step 1/d when no preferences are given"})
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
    save_adapters: bool = field(default=False, metadata={"help": "with use_peft: keep LoRA adapters, not merged"})
    select_only: bool = field(default=False, metadata={"help": "write the selection (JSONL, plots) and exit"})
    use_score_columns: bool = field(
        default=True, metadata={"help": "reuse a sample dataset's columns named like the objectives as scores"}
    )
    selection_plots: bool = field(default=True, metadata={"help": "plot each selection beside its JSONL"})


# ----------------------------------------------------------------------------- the selection (pure math)


def normalise(scores: np.ndarray, low: Sequence[float] | None = None, high: Sequence[float] | None = None):
    """Min-max normalise (n × N) scores; returns (normalised, low, high). A constant objective maps to 0."""
    matrix = np.asarray(scores, dtype=float)
    low_a = matrix.min(axis=0) if low is None else np.asarray(low, dtype=float)
    high_a = matrix.max(axis=0) if high is None else np.asarray(high, dtype=float)
    span = np.where(high_a > low_a, high_a - low_a, 1.0)
    return (matrix - low_a) / span, low_a, high_a


def ray_angle(points: np.ndarray, preference: Sequence[float]) -> np.ndarray:
    """Angle (radians) between each normalised point, seen from the ideal point 1, and the preference ray."""
    direction = np.asarray(preference, dtype=float) - 1.0
    direction = direction / np.linalg.norm(direction)
    offset = np.asarray(points, dtype=float) - 1.0
    norms = np.linalg.norm(offset, axis=1)
    cosine = np.divide(offset @ direction, norms, out=np.ones(len(offset)), where=norms > 0)
    return np.arccos(np.clip(cosine, -1.0, 1.0))


def select(
    scores: np.ndarray | Sequence[Sequence[float]],
    preference: Sequence[float],
    k: int,
    n_layers: int = 10,
    distance: str = "perpendicular",
    low: Sequence[float] | None = None,
    high: Sequence[float] | None = None,
    layers: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the (at most) k samples of the first `n_layers` layers nearest the preference's ray.

    `scores` are raw (n × N, all maximised); they are min-max normalised inside (by `low`/`high` when
    given). Nearest first; ties (to 1e-9) go to the better layer, then the lower index, so the result
    does not depend on rounding noise. Pass `layers` (0-based non-dominated ranks) to sort only once
    for many preferences.
    """
    matrix = np.asarray(scores, dtype=float)
    if matrix.ndim != 2 or matrix.shape[1] < 2:
        raise MoalignError(f"ParetoHqD needs scores for at least two objectives (n × N), got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise MoalignError("scores contain NaN or infinite values; fix the scorer or the score columns")
    if k < 1:
        raise MoalignError(f"k must be ≥ 1 (samples per preference), got {k}")
    if n_layers < 1:
        raise MoalignError(f"n_layers must be ≥ 1, got {n_layers}")
    if distance not in DISTANCES:
        raise MoalignError(f"distance {distance!r}: use one of {', '.join(DISTANCES)}")
    w = validate_weights(preference, matrix.shape[1])
    if len(matrix) == 0:
        return np.zeros(0, dtype=int)
    points, low_a, high_a = normalise(matrix, low, high)
    ranks = pareto_ranks(matrix) if layers is None else np.asarray(layers, dtype=int)
    pool = np.flatnonzero(ranks < n_layers)
    if distance == "perpendicular":
        gap = ray_distance(points[pool], w, np.zeros_like(low_a), np.ones_like(high_a))
    else:
        gap = ray_angle(points[pool], w)
    gap = np.round(gap, 9)  # distances equal up to rounding noise count as ties
    order = np.lexsort((pool, ranks[pool], gap))  # last key first: distance, then layer, then index
    return pool[order[:k]]


def preference_name(preference: Sequence[float]) -> str:
    """A folder name for a preference: [0.2, 0.8] -> 'w0.2-0.8'."""
    return "w" + "-".join(f"{round(float(x), 4):g}" for x in preference)


def resolve_preferences(config: ParetoHqDConfig, n_objectives: int) -> np.ndarray:
    """The preferences to train: the explicit list, else `simplex_grid(N, grid_divisions)`."""
    if not config.preferences:
        return simplex_grid(n_objectives, config.grid_divisions)
    rows = []
    for entry in config.preferences:
        if isinstance(entry, str):
            rows.append(parse_weights(entry, n_objectives))
        else:
            rows.append(validate_weights([float(x) for x in entry], n_objectives))
    unique = np.unique(np.round(np.asarray(rows), 8), axis=0)
    if len(unique) != len(rows):
        raise MoalignError("preferences lists the same preference twice; give each once")
    return np.asarray(rows)


def representatives(preferences: np.ndarray) -> list[int]:
    """The N+1 stage-1 models that generate stage-2 data: nearest to each e_i and to the balanced w (L1)."""
    n = preferences.shape[1]
    targets = list(np.eye(n)) + [np.full(n, 1.0 / n)]
    chosen: list[int] = []
    for target in targets:
        index = int(np.abs(preferences - target[None, :]).sum(axis=1).argmin())
        if index not in chosen:
            chosen.append(index)
    return chosen


# ----------------------------------------------------------------------------- writing the selection down


def write_selection(
    directory: Path,
    frame: pd.DataFrame,
    names: list[str],
    preferences: np.ndarray,
    selections: list[np.ndarray],
    layers: np.ndarray,
    config: ParetoHqDConfig,
    low: np.ndarray,
    high: np.ndarray,
    plots: bool,
) -> list[dict[str, Any]]:
    """One JSONL (and plot) per preference with the selected samples; returns a summary per preference."""
    directory.mkdir(parents=True, exist_ok=True)
    raw = frame[names].to_numpy(dtype=float)
    points, _, _ = normalise(raw, low, high)
    summary = []
    for w, chosen in zip(preferences, selections):
        name = preference_name(w)
        gap, angle = [], []
        if len(chosen):
            gap = ray_distance(points[chosen], w, np.zeros(len(names)), np.ones(len(names)))
            angle = ray_angle(points[chosen], w)
        lines = []
        for index, d, a in zip(chosen, gap, angle):
            row = {
                "index": int(index),
                "prompt": frame["prompt"].iat[index],
                "response": frame["response"].iat[index],
                "layer": int(layers[index]),
                "ray_distance": float(d),
                "ray_angle": float(a),
                "scores": {n: float(raw[index, j]) for j, n in enumerate(names)},
                "normalised": {n: float(points[index, j]) for j, n in enumerate(names)},
            }
            lines.append(json.dumps(row, ensure_ascii=False))
        atomic_write_text(directory / f"{name}.jsonl", "".join(line + "\n" for line in lines))
        mean = points[chosen].mean(axis=0).tolist() if len(chosen) else [float("nan")] * len(names)
        summary.append({"preference": w.tolist(), "name": name, "samples": len(chosen), "mean_normalised": mean})
        if plots:
            plot_selection(directory / f"{name}.png", points, layers < config.n_layers, names, [w], [chosen])
    if plots:
        plot_selection(directory / "overview.png", points, layers < config.n_layers, names, preferences, selections)
    return summary


def plot_selection(
    path: Path,
    points: np.ndarray,
    pool: np.ndarray,
    names: list[str],
    preferences: Sequence[np.ndarray],
    selections: Sequence[np.ndarray],
    max_background: int = 20000,
) -> None:
    """Normalised scores (grey), the first layers (blue), each ray and its selected samples, per objective pair.

    N=2 is one scatter; N≥3 shows every pairwise projection (the rays projected with them).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = points.shape[1]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.6 * len(pairs), 4.4), squeeze=False)
    rng = np.random.default_rng(0)
    background = np.arange(len(points))
    if len(background) > max_background:
        background = np.sort(rng.choice(background, max_background, replace=False))
    colors = plt.get_cmap("viridis")(np.linspace(0, 1, max(2, len(preferences))))
    single = len(preferences) == 1
    for ax, (i, j) in zip(axes[0], pairs):
        ax.scatter(points[background, i], points[background, j], s=4, c="0.82", label="scored data", rasterized=True)
        ax.scatter(points[pool, i], points[pool, j], s=6, c="tab:blue", alpha=0.5, label="first layers")
        for c, (w, chosen) in enumerate(zip(preferences, selections)):
            w = np.asarray(w, dtype=float)
            end = 1.0 + (w - 1.0) / max(1e-12, float(np.max(1.0 - w)))  # where the ray leaves the unit box
            color = "tab:red" if single else colors[c]
            label = f"w = {', '.join(f'{x:.2g}' for x in w)}"
            ax.plot([1.0, end[i]], [1.0, end[j]], "--", color=color, lw=1.2, label=label)
            ax.scatter(points[chosen, i], points[chosen, j], s=16, color=color, edgecolor="k", lw=0.3, zorder=3)
        ax.set_xlabel(f"{names[i]} (min-max)")
        ax.set_ylabel(f"{names[j]} (min-max)")
        ax.set_xlim(-0.03, 1.03)
        ax.set_ylim(-0.03, 1.03)
    title = f"ParetoHqD selection, w = {np.round(preferences[0], 3).tolist()}" if single else "ParetoHqD selections"
    fig.suptitle(title)
    axes[0][0].legend(loc="lower left", fontsize=7, ncol=1 if len(preferences) <= 6 else 2)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- scoring


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
    if config.grid_divisions < 1:
        raise MoalignError(f"grid_divisions must be ≥ 1, got {config.grid_divisions}")
    if config.stage2_prompts < 1 or config.generation_batch_size < 1:
        raise MoalignError("stage2_prompts and generation_batch_size must be ≥ 1")
    if config.stage1_max_steps < 1 or (config.stage2_max_steps is not None and config.stage2_max_steps < 1):
        raise MoalignError("stage1_max_steps and stage2_max_steps must be ≥ 1")
    if config.save_adapters and not config.use_peft:
        raise MoalignError("save_adapters needs use_peft (there are no adapters to save otherwise)")
    if len(config.objectives) < 2:
        raise MoalignError(f"ParetoHqD needs at least two objectives, got {list(config.objectives)}")


def score_training_data(config: ParetoHqDConfig, objectives, run_dir: Path) -> tuple[pd.DataFrame, float]:
    """The training samples with a score column per objective, cached in `scores.parquet`; and seconds spent."""
    names = [objective.name for objective in objectives]
    source = data.load(config.dataset, config.dataset_split)
    if config.max_samples:
        source = source.select(range(min(config.max_samples, len(source))))
    prompts, responses = data.to_samples(source)
    if not prompts:
        raise MoalignError(f"dataset {config.dataset} has no samples")
    frame = pd.DataFrame({"prompt": prompts, "response": responses})
    if data.is_pairs(source):
        frame["pair"] = list(range(len(source))) * 2
        frame["preferred"] = [True] * len(source) + [False] * len(source)
    cached = run_dir / "scores.parquet"
    if cached.exists():
        previous = pd.read_parquet(cached)
        same = (
            len(previous) == len(frame)
            and set(names) <= set(previous.columns)
            and previous["prompt"].tolist() == prompts
            and previous["response"].tolist() == responses
        )
        if same:
            log.info(f"scores: reusing {cached}")
            for name in names:
                frame[name] = previous[name].to_numpy(dtype=float)
            return frame, 0.0
    start = time.perf_counter()
    columns = set(source.column_names)
    if config.use_score_columns and not data.is_pairs(source) and set(names) <= columns:
        log.info(f"scores: using the dataset's columns {names}")
        for name in names:
            values = np.asarray(source[name], dtype=float)
            if not np.isfinite(values).all():
                raise MoalignError(f"score column {name!r} of {config.dataset} has NaN or infinite values")
            frame[name] = values
    else:
        cache = ScoreCache(config.score_cache or cache_dir() / "scores.sqlite")
        for name, values in score(objectives, prompts, responses, cache).items():
            frame[name] = values
    seconds = time.perf_counter() - start
    tmp = cached.with_name(f".{cached.name}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, cached)
    return frame, seconds


# ----------------------------------------------------------------------------- training


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


def stage2_prompts(frame: pd.DataFrame, count: int, seed: int) -> list[str]:
    """`count` distinct training prompts drawn with the run's seed (all of them if there are fewer)."""
    unique = list(dict.fromkeys(frame["prompt"].tolist()))
    if len(unique) < count:
        log.info(f"stage 2: only {len(unique)} distinct prompts (asked for {count}); using all")
    order = np.random.default_rng(seed).permutation(len(unique))[:count]
    return [unique[i] for i in sorted(order)]


def usable_responses(generated: pd.DataFrame, drop_degenerate: bool) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop what stage 2 must not imitate: empty and (optionally) collapsed answers, and duplicates.

    Training on collapsed text is how a per-preference model learns to collapse; duplicates (two
    representative models giving the same answer) would count twice in a preference's k/2.
    """
    from moalign.data import is_degenerate

    empty = generated["response"].str.strip() == ""
    if drop_degenerate:
        degenerate = generated["response"].map(is_degenerate) & ~empty
    else:
        degenerate = pd.Series(False, index=generated.index)
    kept = generated[~(empty | degenerate)]
    unique = kept.drop_duplicates(["prompt", "response"])
    dropped = {"empty": int(empty.sum()), "degenerate": int(degenerate.sum()), "duplicate": len(kept) - len(unique)}
    return unique.reset_index(drop=True), dropped


def generate_stage2(
    config: ParetoHqDConfig, objectives, stage1_dirs: list[Path], frame: pd.DataFrame, run_dir: Path
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Responses of the representative stage-1 models, scored; cached so a resumed run skips it.

    Each model's part is saved as it finishes (`stage2_parts/`), so an interruption loses one model's work.
    """
    import torch

    from moalign.generation import SamplingParams, generate, load_model

    cached, info_path = run_dir / "stage2_generated.parquet", run_dir / "stage2_generated.json"
    if cached.exists() and info_path.exists():
        log.info(f"stage 2: reusing the generated data in {cached}")
        return pd.read_parquet(cached), read_json(info_path)
    parts = run_dir / "stage2_parts"
    parts.mkdir(parents=True, exist_ok=True)
    prompts = stage2_prompts(frame, config.stage2_prompts, config.seed)
    generation_seconds, generated_tokens = 0.0, 0
    pieces = []
    for m, model_dir in enumerate(stage1_dirs):
        part, part_info = parts / f"{model_dir.name}.parquet", parts / f"{model_dir.name}.json"
        if not (part.exists() and part_info.exists()):
            log.info(f"stage 2: {model_dir.name} answers {len(prompts)} prompts")
            start = time.perf_counter()
            model, tokenizer = load_model(str(model_dir))
            params = [
                SamplingParams(
                    max_new_tokens=config.sample_max_new_tokens,
                    temperature=config.sample_temperature,
                    top_p=config.sample_top_p,
                    stop=list(STAGE2_STOPS),
                    seed=config.seed + m * len(prompts) + i,
                )
                for i in range(len(prompts))
            ]
            outputs = generate(model, tokenizer, prompts, params, batch_size=config.generation_batch_size)
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            responses = [output.text.strip() for output in outputs]
            tokens = sum(output.prompt_tokens + len(output.token_ids) for output in outputs)
            pd.DataFrame({"prompt": prompts, "response": responses, "generator": model_dir.name}).to_parquet(part)
            write_json(part_info, {"seconds": time.perf_counter() - start, "tokens": tokens})
        info = read_json(part_info)
        generation_seconds += info["seconds"]
        generated_tokens += info["tokens"]
        pieces.append(pd.read_parquet(part))
    generated = pd.concat(pieces, ignore_index=True)
    generated, dropped = usable_responses(generated, config.stage2_drop_degenerate)
    if generated.empty:
        raise MoalignError(
            f"stage 2: no usable generated response ({dropped}); train stage 1 longer, "
            "or pass --stage2_drop_degenerate false"
        )
    start = time.perf_counter()
    cache = ScoreCache(config.score_cache or cache_dir() / "scores.sqlite")
    for name, values in score(objectives, generated["prompt"], generated["response"], cache).items():
        generated[name] = values
    info = {
        "generation_seconds": generation_seconds,
        "generated_tokens": generated_tokens,
        "scoring_seconds": time.perf_counter() - start,
        "prompts": len(prompts),
        "generators": [d.name for d in stage1_dirs],
        "dropped": dropped,
    }
    tmp = cached.with_name(f".{cached.name}.tmp")
    generated.to_parquet(tmp, index=False)
    write_json(info_path, info)
    os.replace(tmp, cached)
    shutil.rmtree(parts, ignore_errors=True)
    return generated, info


def select_all(
    frame: pd.DataFrame, names: list[str], preferences: np.ndarray, k: int, config: ParetoHqDConfig
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Every preference's selection from one scored frame (sorted once): selections, layers, low, high."""
    raw = frame[names].to_numpy(dtype=float)
    layers = pareto_ranks(raw)
    _, low, high = normalise(raw)
    selections = [
        select(raw, w, k, n_layers=config.n_layers, distance=config.distance, layers=layers) for w in preferences
    ]
    for w, chosen in zip(preferences, selections):
        if len(chosen) < k:
            log.warning(f"{preference_name(w)}: only {len(chosen)} samples in the first {config.n_layers} layers")
    return selections, layers, low, high


def _sum(stats: dict[str, dict[str, Any]], key: str) -> float:
    return sum(float(s.get(key, 0)) for s in stats.values())


SETTINGS = (
    "model_name_or_path",
    "dataset",
    "dataset_split",
    "max_samples",
    "objectives",
    "k",
    "n_layers",
    "distance",
    "stage2_k",
    "stage2_prompts",
    "stage2_drop_degenerate",
    "use_peft",
    "save_adapters",
    "seed",
)


def check_settings(config: ParetoHqDConfig, preferences: np.ndarray, run_dir: Path) -> None:
    """Refuse to resume a run directory whose finished models were trained with other settings.

    Resuming skips every finished model folder, so a changed k or dataset would silently mix models.
    Going from `stages: 1` to `stages: 2` is fine: stage 1 is reused and stage 2 is added.
    """
    current = {name: getattr(config, name) for name in SETTINGS}
    current["preferences"] = np.round(preferences, 8).tolist()
    path = run_dir / "paretohqd_settings.json"
    if path.exists():
        previous = read_json(path)
        changed = sorted(key for key in current if previous.get(key) != json.loads(json.dumps(current[key])))
        if changed:
            raise MoalignError(
                f"{run_dir} was trained with other {', '.join(changed)}; use a new output_dir or delete it"
            )
    else:
        write_json(path, current)


def train_stage(
    stage: str,
    sources: list[str],
    train_sets: list[datasets.Dataset],
    preferences: np.ndarray,
    config: ParetoHqDConfig,
    run_dir: Path,
    models_dir: Path,
    steps: int,
) -> dict[str, dict[str, Any]]:
    """One SFT per preference (a finished model folder is skipped); returns each model's stats."""
    stats: dict[str, dict[str, Any]] = {}
    for w, source, dataset in zip(preferences, sources, train_sets):
        name = preference_name(w)
        log.info(f"{stage}: {name} on {len(dataset)} samples")
        checkpoints = run_dir / "checkpoints" / f"{stage}-{name}"
        stats[name] = train_one(source, dataset, config, checkpoints, models_dir / name, steps)
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
    write_run_manifest(scoped, "paretohqd", models=models, training=training, **fields)


def train(config: ParetoHqDConfig) -> Path:
    """Score, select, train stage 1 (and stage 2) per preference; write the run directory."""
    from moalign.objectives import build_all

    validate(config)
    objectives = build_all(config.objectives)
    names = [objective.name for objective in objectives]
    preferences = resolve_preferences(config, len(names))
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    timings_path = run_dir / "paretohqd_timings.json"
    timings = read_json(timings_path) if timings_path.exists() else {}

    frame, scoring_seconds = score_training_data(config, objectives, run_dir)
    if scoring_seconds or "scoring_seconds" not in timings:
        timings["scoring_seconds"] = scoring_seconds
        write_json(timings_path, timings)
    selections, layers, low, high = select_all(frame, names, preferences, config.k, config)
    plots = config.selection_plots or config.select_only
    folder = run_dir / "selection" / "stage1"
    summary1 = write_selection(folder, frame, names, preferences, selections, layers, config, low, high, plots)
    if config.select_only:
        return run_dir
    check_settings(config, preferences, run_dir)

    # Stage 1: every preference's model from the base model, on its k offline samples.
    stage1_dir = run_dir / "stage1"
    base = [config.model_name_or_path] * len(preferences)
    data1 = [completions(frame, chosen) for chosen in selections]
    stage1 = train_stage(
        "stage1", base, data1, preferences, config, run_dir, stage1_dir / "models", config.stage1_max_steps
    )
    scoring = {"seconds": timings["scoring_seconds"]}
    training1 = {
        "seconds": scoring["seconds"] + _sum(stage1, "seconds"),
        "tokens": int(_sum(stage1, "tokens")),
        "stages": {"scoring": scoring, "stage1": stage1},
    }
    details = {"k": config.k, "n_layers": config.n_layers, "distance": config.distance}
    details.update(preferences=preferences.tolist(), selection_stage1=summary1)
    fields = {"stats": NormStats.fit(frame, names).to_dict(), "normalisation": "minmax"}
    stage1_fields = {**fields, "paretohqd": {**details, "stages": 1}}
    write_manifest_for(config, stage1_dir, "models", preferences, training1, stage1_fields)  # stage 1 alone
    if config.stages == 1:
        write_manifest_for(config, run_dir, "stage1/models", preferences, training1, stage1_fields)
        return run_dir

    # Stage 2: the representative stage-1 models generate; each preference continues on its k/2 best.
    chosen_models = representatives(preferences)
    generators = [stage1_dir / "models" / preference_name(preferences[i]) for i in chosen_models]
    generated, info = generate_stage2(config, objectives, generators, frame, run_dir)
    k2 = config.stage2_k or max(1, config.k // 2)
    selections2, layers2, low2, high2 = select_all(generated, names, preferences, k2, config)
    folder = run_dir / "selection" / "stage2"
    summary2 = write_selection(
        folder, generated, names, preferences, selections2, layers2, config, low2, high2, config.selection_plots
    )
    sources = [str(stage1_dir / "models" / preference_name(w)) for w in preferences]
    data2 = [completions(generated, chosen) for chosen in selections2]
    steps2 = config.stage2_max_steps or config.stage1_max_steps
    stage2 = train_stage("stage2", sources, data2, preferences, config, run_dir, run_dir / "models", steps2)
    generation = {"seconds": info["generation_seconds"] + info["scoring_seconds"], "tokens": info["generated_tokens"]}
    training = {
        "seconds": training1["seconds"] + generation["seconds"] + _sum(stage2, "seconds"),
        "tokens": int(training1["tokens"] + generation["tokens"] + _sum(stage2, "tokens")),
        "stages": {**training1["stages"], "stage2_generation": {**generation, **info}, "stage2": stage2},
    }
    details.update(
        stages=2,
        stage1_run="stage1",
        stage2_k=k2,
        generators=[preferences[i].tolist() for i in chosen_models],
        selection_stage2=summary2,
    )
    write_manifest_for(config, run_dir, "models", preferences, training, {**fields, "paretohqd": details})
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return run_dir


def cli(argv: list[str]) -> None:
    config = parse_config(ParetoHqDConfig, argv)
    run_dir = train(config)
    if config.select_only:
        print(f"ParetoHqD selection written to {run_dir / 'selection' / 'stage1'}")
    else:
        print(f"ParetoHqD run written to {run_dir}")
