"""MORLHF and Rewarded Soups on the embedded task: does RL on wᵀr̂ raise wᵀr̂, and what a step costs.

`run(quick)`:
- MORLHF (linear scalarisation, PPO, configs/morlhf_demo.yaml) at a coarse weight grid; for every weight w
  it was trained at, the mean of wᵀr̂ on held-out prompts from the base model and from the trained model
  (r̂: the objectives z-scored with the statistics in the run's manifest; the same prompts, decoding
  settings and seeds for both);
- Rewarded Soups from the one-hot MORLHF models, measured the same way at every weight of the grid, beside
  the MORLHF model trained at that weight;
- TRL's RLOO at w = (0.5, 0.5), 32 completions a step as PPO's rollout: seconds per step against PPO's,
  and its wᵀr̂.

`train_on_demo(task, run_dir, quick)` and `train_soups_on_demo(task, run_dir, quick)` are what the shared
all-methods benchmark (bench_methods.py) calls. The MORLHF and soup runs are runs/bench/morlhf and
runs/bench/soups, shared with bench_methods.py: within one `make bench` they are trained once
(bench_methods.py runs first and clears runs/bench/); run alone, this module trains what is absent.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
MORLHF_CONFIG = HERE.parent / "configs" / "morlhf_demo.yaml"
SOUPS_CONFIG = HERE.parent / "configs" / "soups_demo.yaml"
ROOT = HERE.parent / "runs" / "bench"  # shared with bench_methods.py
SECTION = "MORLHF and Rewarded Soups"

# quick: the simplex's vertices and centre, few steps; full: the YAML as written (grid:4, its max_steps)
QUICK_FLAGS = ["--preferences", "onehot", "uniform", "--max_steps", "20"]
# RLOO with as many completions per step as PPO's rollout (8 prompts × 4 completions)
RLOO_FLAGS = ["--algorithm", "rloo", "--preferences", "0.5,0.5", "--per_device_train_batch_size", "32"]
RLOO_FLAGS += ["--gradient_accumulation_steps", "1"]


def row(metric: str, value: Any, unit: str = "", note: str = "", **extra: Any) -> dict[str, Any]:
    return {"section": SECTION, "metric": metric, "value": value, "unit": unit, "note": note, **extra}


def eval_prompts_file(task: Any, run_dir: Path, n: int = 64) -> Path:
    """The held-out prompts the other demo runs use (the pipeline's file when present)."""
    shared = run_dir.parent / "data" / "eval_prompts.jsonl"
    if shared.exists():
        return shared
    path = run_dir.parent / "data" / f"{run_dir.name}_eval_prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in task.test_prompts[:n]))
    return path


def demo_config(task: Any, run_dir: Path, quick: bool, *flags: str):
    """configs/morlhf_demo.yaml with the task's cache paths filled in (flags win over the file)."""
    from moalign.methods.config import parse_config
    from moalign.methods.morl import MORLConfig

    argv = ["--config", str(MORLHF_CONFIG), "--model_name_or_path", str(task.base_model)]
    argv += ["--dataset", str(task.train_path), "--output_dir", str(run_dir)]
    argv += ["--eval_prompts", str(eval_prompts_file(task, run_dir))]
    argv += (QUICK_FLAGS if quick else []) + list(flags)
    return parse_config(MORLConfig, argv)


def train_on_demo(task: Any, run_dir: Path, quick: bool, *flags: str) -> dict[str, Any]:
    """MORLHF on the demo task: one RL run per weight of a coarse grid (quick: vertices and centre)."""
    from moalign.methods.morl import train

    run_dir = Path(run_dir)
    train(demo_config(task, run_dir, quick, *flags))
    return run_info(run_dir)


def run_info(run_dir: Path) -> dict[str, Any]:
    """Seconds, tokens, steps and weights of a trained MORL run, from its manifest."""
    from moalign.run import read_manifest

    manifest = read_manifest(run_dir)
    training = manifest["training"]
    return {
        "train_seconds": training["seconds"],
        "tokens": training["tokens"],
        "steps": sum(s.get("steps", 0) for s in training["stages"].values()),
        "weights": [m["preference"] for m in manifest["models"]],
    }


def _has_vertices(run_dir: Path) -> bool:
    """Does a MORL run hold a model at every one-hot preference (the soups' ingredients)?"""
    path = run_dir / "moalign.json"
    if not path.exists():
        return False
    manifest = json.loads(path.read_text())
    n = len(manifest.get("objective_names") or [])
    found = [m["preference"] for m in manifest.get("models", [])]
    return n > 0 and all(any(np.allclose(p, e) for p in found) for e in np.eye(n))


def train_soups_on_demo(task: Any, run_dir: Path, quick: bool, morl_run: Path | None = None) -> dict[str, Any]:
    """Rewarded Soups on the demo task, its ingredients the one-hot MORLHF models.

    Reuses `morl_run` (default: a `morlhf` run beside `run_dir`, as bench_methods.py trains one first) when
    it has a model at every vertex; otherwise trains the one-hot models into `<run_dir>_ingredients`. The
    soup's cost is its ingredients' training (a soup itself trains nothing).
    """
    from moalign.methods.soups import parse_soups_config, train
    from moalign.run import read_manifest

    run_dir = Path(run_dir)
    morl_run = Path(morl_run) if morl_run else run_dir.parent / "morlhf"
    if not _has_vertices(morl_run):
        morl_run = run_dir.parent / f"{run_dir.name}_ingredients"
        train_on_demo(task, morl_run, quick, "--preferences", "onehot")
    argv = ["--config", str(SOUPS_CONFIG), "--output_dir", str(run_dir), "--model_name_or_path", str(task.base_model)]
    argv += ["--eval_prompts", str(eval_prompts_file(task, run_dir))]
    config = parse_soups_config(argv)
    config.ingredients = [str(morl_run)] * len(config.objectives)
    train(config)
    training = read_manifest(run_dir)["training"]
    return {"train_seconds": training["seconds"], "tokens": training["tokens"], "ingredients_run": str(morl_run)}


def normalized_scores(model, tokenizer, prompts: list[str], manifest: dict[str, Any], objectives) -> np.ndarray:
    """r̂ of one sampled response per prompt (seed = prompt index), z-scored with the run's statistics."""
    from moalign.generation import SamplingParams, generate
    from moalign.scores import NormStats, score

    sampling = manifest["sampling"]
    params = [SamplingParams(**sampling, seed=i) for i in range(len(prompts))]
    responses = [c.text.strip() for c in generate(model, tokenizer, prompts, params)]
    scores = score(objectives, prompts, responses, progress=False)
    raw = np.column_stack([scores[o.name] for o in objectives])
    stats = manifest["normalization"]["stats"]
    return NormStats.from_dict(stats).zscore(raw) if stats else raw


def utility(z: np.ndarray, weights: list[float]) -> tuple[float, float]:
    """Mean of wᵀr̂ over prompts and its standard error."""
    values = z @ np.asarray(weights)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def measure(task: Any, morl_dir: Path, soups_dir: Path | None, n_prompts: int) -> list[dict[str, Any]]:
    """wᵀr̂ before (base model) and after (trained model, and soup) at every weight MORLHF trained at."""
    from moalign.generation import load_model
    from moalign.methods.soups import SoupPolicy
    from moalign.objectives import build_all
    from moalign.run import read_manifest

    manifest = read_manifest(morl_dir)
    objectives = build_all(manifest["objectives"])
    prompts = list(task.test_prompts[:n_prompts])
    base = normalized_scores(*load_model(str(task.base_model)), prompts, manifest, objectives)
    soups = SoupPolicy(read_manifest(soups_dir), soups_dir) if soups_dir else None
    rows = []
    for entry in manifest["models"]:
        w = entry["preference"]
        label = "(" + ", ".join(f"{x:g}" for x in w) + ")"
        before, before_se = utility(base, w)
        trained = normalized_scores(*load_model(str(morl_dir / entry["path"])), prompts, manifest, objectives)
        after, after_se = utility(trained, w)
        means = ", ".join(f"{o.name} {m:+.2f}" for o, m in zip(objectives, trained.mean(axis=0)))
        rows.append(
            row(
                f"MORLHF w = {label}: mean wᵀr̂",
                round(after, 3),
                "z",
                f"base {before:+.3f} ± {before_se:.3f}, trained ± {after_se:.3f} (SE, {len(prompts)} prompts); "
                f"Δ {after - before:+.3f}; r̂ {means}",
                baseline=round(before, 3),
            )
        )
        if soups is not None:
            soup = normalized_scores(soups.model_for(w), soups.tokenizer, prompts, manifest, objectives)
            value, se = utility(soup, w)
            rows.append(
                row(
                    f"Soup w = {label}: mean wᵀr̂",
                    round(value, 3),
                    "z",
                    f"± {se:.3f} (SE); MORLHF trained at w: {after:+.3f}; base {before:+.3f}",
                    baseline=round(before, 3),
                )
            )
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    from moalign.demo.task import prepare_task
    from moalign.run import read_manifest

    ROOT.mkdir(parents=True, exist_ok=True)
    task = prepare_task()
    n_prompts = 32 if quick else 64
    rows: list[dict[str, Any]] = []

    reused = (ROOT / "morlhf" / "moalign.json").exists()
    start = time.perf_counter()
    info = run_info(ROOT / "morlhf") if reused else train_on_demo(task, ROOT / "morlhf", quick)
    where = "reused from runs/bench (bench_methods.py trains it first in make bench)" if reused else "trained here"
    wall = time.perf_counter() - start
    ppo_config = demo_config(task, ROOT / "morlhf", quick)
    rows.append(
        row(
            f"MORLHF ({ppo_config.algorithm.upper()}) training",
            round(info["train_seconds"], 1),
            "s",
            f"{len(info['weights'])} weights, {info['steps']} steps, {info['tokens']} tokens; {where}"
            + ("" if reused else f", {wall:.0f}s wall with scoring and saving"),
        )
    )
    if not (ROOT / "soups" / "moalign.json").exists():
        train_soups_on_demo(task, ROOT / "soups", quick, morl_run=ROOT / "morlhf")
    soups = read_manifest(ROOT / "soups")["training"]
    rows.append(row("Rewarded Soups cost", round(soups["seconds"], 1), "s", "its one-hot ingredients' training"))
    rows += measure(task, ROOT / "morlhf", ROOT / "soups", n_prompts)

    shutil.rmtree(ROOT / "rloo", ignore_errors=True)  # only this module trains it: measured in this run
    rloo = train_on_demo(task, ROOT / "rloo", quick, *RLOO_FLAGS)
    rloo_config = demo_config(task, ROOT / "rloo", quick, *RLOO_FLAGS)
    ppo_step = info["train_seconds"] / max(1, info["steps"])
    rloo_step = rloo["train_seconds"] / max(1, rloo["steps"])
    completions = rloo_config.per_device_train_batch_size * rloo_config.gradient_accumulation_steps
    rollout = ppo_config.per_device_train_batch_size * ppo_config.gradient_accumulation_steps
    rows.append(
        row(
            f"{ppo_config.algorithm.upper()} step",
            round(ppo_step, 2),
            "s",
            f"{rollout} prompts × 1 completion, {ppo_config.ppo_epochs} epochs; {info['steps']} steps",
        )
    )
    rows.append(
        row(
            "RLOO step",
            round(rloo_step, 2),
            "s",
            f"{completions // rloo_config.num_generations} prompts × {rloo_config.num_generations} completions; "
            f"{rloo['steps']} steps",
            baseline=round(ppo_step, 2),
            ratio=round(rloo_step / ppo_step, 2),
        )
    )
    rloo_rows = measure(task, ROOT / "rloo", None, n_prompts)
    for entry in rloo_rows:
        entry["metric"] = entry["metric"].replace("MORLHF", "MORLHF (RLOO)")
    rows += rloo_rows
    stats = read_manifest(ROOT / "morlhf")["normalization"]["stats"]
    rows.append(
        row(
            "z-score statistics",
            len(stats["names"]),
            "objectives",
            ", ".join(f"{n} mean {m:.3f} std {s:.3f}" for n, m, s in zip(stats["names"], stats["mean"], stats["std"])),
        )
    )
    return rows


if __name__ == "__main__":
    import sys

    for entry in run("--quick" in sys.argv):
        print(entry)
