"""ParetoHqD: how fast the selection is, and what stage 2 adds on the embedded task.

- Selection: non-dominated sorting plus the k nearest samples to each of 11 rays, on synthetic score
  sets of hh-rlhf's size (320 000 samples: both responses of 160 000 pairs), N = 2 and 3.
- The embedded task: ParetoHqD trained with configs/paretohqd_demo.yaml, its time per stage and the
  hypervolume of the data each stage selected. The stage-1 models form a run of their own
  (`<run>_stage1`), so the all-methods benchmark (bench_methods.py, which calls `train_on_demo`)
  evaluates stage 1 alone and stages 1 + 2 on one grid with every other method.

The run is runs/bench/paretohqd, shared with bench_methods.py: within one `make bench` it is trained once
(bench_methods.py runs first and clears runs/bench/); run alone, this module trains it if it is absent.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "paretohqd_demo.yaml"
ROOT = HERE.parent / "runs" / "bench"  # shared with bench_methods.py
SECTION = "ParetoHqD"

# quick: a smoke-sized run (6 preferences, few steps); full: the demo config as written
QUICK = {
    "preferences": ["grid:5"],
    "k": 50,
    "stage1_max_steps": 60,
    "stage2_max_steps": 30,
    "stage2_prompts": 256,
    "selection_plots": False,
}


def row(metric: str, value: Any, unit: str = "", note: str = "") -> dict[str, Any]:
    return {"section": SECTION, "metric": metric, "value": value, "unit": unit, "note": note}


def demo_config(task: Any, run_dir: Path, quick: bool, stages: int = 2, eval_prompts: Path | None = None):
    """configs/paretohqd_demo.yaml with the task's cache paths filled in (the YAML cannot know them)."""
    from moalign.methods.config import parse_config
    from moalign.methods.paretohqd import ParetoHqDConfig

    argv = ["--config", str(CONFIG), "--model_name_or_path", str(task.base_model)]
    argv += ["--dataset", str(task.train_path), "--output_dir", str(run_dir), "--stages", str(stages)]
    if eval_prompts is not None:
        argv += ["--eval_prompts", str(eval_prompts)]
    config = parse_config(ParetoHqDConfig, argv)
    return dataclasses.replace(config, **QUICK) if quick else config


def stage1_run(run_dir: Path, out: Path) -> Path:
    """A run directory beside `run_dir` serving its stage-1 models (paths relative to `out`)."""
    from moalign.run import read_manifest, write_manifest

    manifest = read_manifest(run_dir / "stage1")
    out.mkdir(parents=True, exist_ok=True)
    for entry in manifest["models"]:
        entry["path"] = os.path.relpath(run_dir / "stage1" / entry["path"], out)
    if manifest.get("eval_prompts"):
        shutil.copyfile(run_dir / "stage1" / manifest["eval_prompts"], out / manifest["eval_prompts"])
    write_manifest(out, manifest)
    return out


def train_on_demo(task: Any, run_dir: Path, quick: bool, stages: int = 2) -> dict[str, Any]:
    """Train ParetoHqD on the demo task; with 2 stages also write the stage-1 run `<run_dir>_stage1`.

    Returns train_seconds and tokens of the whole run (scoring, SFT, stage-2 generation) and per stage.
    """
    from moalign.methods.paretohqd import train

    run_dir = Path(run_dir)
    prompts = run_dir.parent / "data" / "paretohqd_eval_prompts.jsonl"
    prompts.parent.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in task.test_prompts[: 32 if quick else 64]))
    train(demo_config(task, run_dir, quick, stages, prompts))
    return run_info(run_dir)


def run_info(run_dir: Path) -> dict[str, Any]:
    """Seconds and tokens of a trained run, whole and per stage, from its manifest."""
    from moalign.run import read_manifest

    training = read_manifest(run_dir)["training"]
    parts = training["stages"]
    info: dict[str, Any] = {
        "train_seconds": training["seconds"],
        "tokens": training["tokens"],
        "scoring_seconds": parts["scoring"]["seconds"],
        "stage1_seconds": parts["stage1"]["seconds"],
        "stage1_tokens": parts["stage1"]["tokens"],
        "models": len(parts["stage1"]["stages"]),
    }
    if "stage2" in parts:
        info.update(
            stage2_generation_seconds=parts["stage2_generation"]["seconds"],
            stage2_generation_tokens=parts["stage2_generation"]["tokens"],
            stage2_seconds=parts["stage2"]["seconds"],
            stage2_tokens=parts["stage2"]["tokens"],
            stage1_run_dir=str(stage1_run(run_dir, run_dir.parent / f"{run_dir.name}_stage1")),
        )
    return info


def selection_speed(n: int, n_objectives: int, preferences: int = 11, k: int = 100) -> dict[str, Any]:
    """Seconds to sort n samples into layers and pick k per preference (synthetic, correlated scores)."""
    from moalign.methods.paretohqd import select
    from moalign.pareto import pareto_ranks, simplex_grid

    rng = np.random.default_rng(0)
    scores = rng.normal(size=(n, n_objectives))
    scores[:, 1] -= 0.5 * scores[:, 0]  # a conflict, as harmless vs helpful
    grid = simplex_grid(n_objectives, 10 if n_objectives == 2 else 3)[:preferences]
    start = time.perf_counter()
    layers = pareto_ranks(scores)
    sort_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for w in grid:
        select(scores, w, k, n_layers=10, layers=layers)
    return {
        "sort": sort_seconds,
        "select": (time.perf_counter() - start) / len(grid),
        "pool": int((layers < 10).sum()),
        "layers": int(layers.max()) + 1,
    }


def selected_hypervolume(run_dir: Path, stage: str) -> float:
    """Hypervolume (min-max space, reference 0) of the per-preference means of the selected data."""
    from moalign.pareto import hypervolume
    from moalign.run import read_manifest

    summary = read_manifest(run_dir)["paretohqd"][f"selection_{stage}"]
    points = np.array([s["mean_normalised"] for s in summary if s["samples"]])
    return hypervolume(points, np.zeros(points.shape[1]))


def run(quick: bool) -> list[dict[str, Any]]:
    from moalign.demo.task import prepare_task

    rows = []
    n = 50_000 if quick else 320_000
    for n_objectives in (2, 3):
        speed = selection_speed(n, n_objectives)
        note = f"{speed['layers']} layers; first 10 hold {speed['pool']}; k = 100"
        rows.append(row(f"non-dominated sort, n = {n}, N = {n_objectives}", round(speed["sort"], 3), "s", note))
        rows.append(row(f"selection per preference, N = {n_objectives}", round(speed["select"] * 1000, 1), "ms"))

    run_dir = ROOT / "paretohqd"
    trained_here = not (run_dir / "moalign.json").exists()
    info = train_on_demo(prepare_task(), run_dir, quick) if trained_here else run_info(run_dir)
    where = (
        "trained here" if trained_here else "reused from runs/bench (bench_methods.py trains it first in make bench)"
    )
    rows += [
        row("training, stages 1 + 2", round(info["train_seconds"], 1), "s", f"{info['tokens']} tokens; {where}"),
        row(
            "stage 1 SFT",
            round(info["stage1_seconds"], 1),
            "s",
            f"{info['models']} models, {info['stage1_tokens']} tokens",
        ),
        row(
            "stage 2 generation + scoring",
            round(info["stage2_generation_seconds"], 1),
            "s",
            f"{info['stage2_generation_tokens']} tokens (prompt + generated)",
        ),
        row("stage 2 SFT", round(info["stage2_seconds"], 1), "s", f"{info['stage2_tokens']} tokens"),
        row(
            "selected data, stage 1: hypervolume",
            round(selected_hypervolume(run_dir, "stage1"), 4),
            "",
            "means per preference, min-max space, reference 0",
        ),
        row(
            "selected data, stage 2: hypervolume",
            round(selected_hypervolume(run_dir, "stage2"), 4),
            "",
            "generated data's own min-max space",
        ),
    ]
    return rows
