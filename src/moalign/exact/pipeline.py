"""`moalign demo --task exact`: the methods trained on a candidate task and measured against its exact optimum.

Each method runs through its own recipe (`moalign modpo`, `moalign ric`, …) from a YAML written under
`OUT/configs/`, so `moalign cost OUT/configs/NAME.yaml` estimates exactly what ran. What each trains on:
- MODPO (and DPO, its w = (1, 0) end): Bradley–Terry pairs of vader, brevity as the margin, at β;
- RiC: every candidate as a scored sample (offline stage only: MORS would generate outside the candidates);
- MORLHF: PPO on the task's prompts with free generation, reward wᵀz at the same β and temperature 1. Its
  optimum over all sequences, π_ref·exp(wᵀr/β), restricted to the candidates and renormalised is π*_w, so
  free generation targets the same policy. It also trains the one-hot w = (0, 1) for the soups;
- Rewarded Soups: MORLHF's one-hot models as ingredients, θ_w = Σ w_i θ_i (nothing trained of its own);
- SFT: every candidate as a sample, one model for every preference (the baseline that ignores the rewards);
- ParetoHqD: every candidate as a scored sample, the k nearest each preference's ray among the first
  non-dominated layers (stage 1 only: stage 2 generates outside the candidates, as MORS does).
Every run is then read exactly (no sampling) over the candidates.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moalign.errors import MoalignError
from moalign.exact.evaluate import candidate_logps, plot, policy_point, summarise
from moalign.exact.task import CandidateTask, build_candidate_task
from moalign.run import atomic_write_text, read_manifest, write_json

log = logging.getLogger("moalign")

OBJECTIVES = ["vader", "brevity"]
BETA = 0.5  # the KL coefficient MODPO and MORLHF train at, and the β of the π*_w they are compared with
PREFERENCES = ["0.2,0.8", "0.5,0.5", "0.8,0.2", "1,0"]  # MODPO trains on vader's pairs: w_vader > 0
# prompts, candidates, Bradley–Terry draws per pair, each method's steps, ParetoHqD's samples per preference,
# and the length (tokens) training cuts a prompt + candidate at
SIZES = {
    "quick": {"prompts": 16, "k": 8, "draws": 2, "modpo_steps": 20, "ric_steps": 60, "ppo_steps": 4}
    | {"sft_steps": 20, "hqd_k": 16, "hqd_steps": 10, "max_length": 160},
    "full": {"prompts": 48, "k": 12, "draws": 2, "modpo_steps": 30, "ric_steps": 150, "ppo_steps": 10}
    | {"sft_steps": 30, "hqd_k": 48, "hqd_steps": 15, "max_length": 160},
}
PILOT = 32  # prompts `moalign cost --pilot_prompts` samples to estimate how long rollouts are
METHODS = ("modpo", "ric", "morl", "soups", "sft", "paretohqd")  # soups after morl: its ingredients
# methods trained side by side, one process and one thread each: MODPO alone is about half the FLOPs
CHAINS = (("modpo",), ("ric", "morl", "soups", "sft", "paretohqd"))
LABELS = {
    "modpo": "MODPO",
    "ric": "RiC (offline)",
    "morl": "MORLHF (PPO)",
    "soups": "Rewarded Soups",
    "sft": "SFT",
    "paretohqd": "ParetoHqD (stage 1)",
}


def _common(base_model: str, seed: int) -> dict[str, Any]:
    return {
        "model_name_or_path": base_model,
        "objectives": OBJECTIVES,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 20,
        "dataloader_num_workers": 0,
        "seed": seed,
        "sample_max_new_tokens": 48,
    }


def write_recipes(out: Path, base_model: str, size: dict[str, int], seed: int) -> dict[str, Path]:
    """One YAML per method: what trains, and what `moalign cost` reads."""
    common = _common(base_model, seed)
    recipes = {
        "modpo": {
            **common,
            "dataset": str(out / "data" / "pairs.jsonl"),
            "objective_index": 0,
            "preferences": PREFERENCES,
            "beta": BETA,
            "loss_type": ["sigmoid"],
            "max_steps": size["modpo_steps"],
            "per_device_train_batch_size": 16,
            "learning_rate": 1e-3,
            "lr_scheduler_type": "linear",
            "max_length": size["max_length"],
            "output_dir": str(out / "modpo"),
        },
        "ric": {
            **common,
            "dataset": str(out / "data" / "samples.jsonl"),
            "reward_tags": OBJECTIVES,
            "number_format": "{:.0f}",
            "online_iterations": 0,
            "max_steps": size["ric_steps"],
            "per_device_train_batch_size": 8,
            "learning_rate": 2e-3,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 10,
            "max_length": size["max_length"],
            "output_dir": str(out / "ric"),
        },
        "morl": {
            **common,
            "dataset": str(out / "data" / "samples.jsonl"),
            "algorithm": "ppo",
            "preferences": ["0,1", *PREFERENCES],
            "beta": BETA,
            "max_steps": size["ppo_steps"],
            "per_device_train_batch_size": 16,
            "ppo_epochs": 2,
            "num_mini_batches": 1,
            "max_completion_length": 48,
            "temperature": 1.0,
            "learning_rate": 3e-4,
            "output_dir": str(out / "morlhf"),
        },
        "soups": {
            "objectives": OBJECTIVES,
            "ingredients": [str(out / "morlhf")] * len(OBJECTIVES),  # its models at w = (1, 0) and (0, 1)
            "model_name_or_path": base_model,
            "sample_max_new_tokens": 48,
            "output_dir": str(out / "soups"),
        },
        "sft": {
            **common,
            "dataset": str(out / "data" / "samples.jsonl"),
            "max_steps": size["sft_steps"],
            "per_device_train_batch_size": 16,
            "learning_rate": 1e-3,
            "lr_scheduler_type": "linear",
            "max_length": size["max_length"],
            "output_dir": str(out / "sft"),
        },
        "paretohqd": {
            **common,
            "dataset": str(out / "data" / "samples.jsonl"),
            "preferences": PREFERENCES,
            "stages": 1,
            "k": size["hqd_k"],
            "stage1_max_steps": size["hqd_steps"],
            "per_device_train_batch_size": 16,
            "learning_rate": 1e-3,
            "lr_scheduler_type": "linear",
            "max_length": size["max_length"],
            "selection_plots": False,
            "output_dir": str(out / "paretohqd"),
        },
    }
    paths = {}
    for name, values in recipes.items():
        paths[name] = out / "configs" / f"{name}.yaml"
        atomic_write_text(paths[name], yaml.safe_dump(values, sort_keys=False))
    return paths


def write_data(out: Path, task: CandidateTask, draws: int, seed: int) -> None:
    data = out / "data"
    samples = task.samples()[["prompt", "response"]]
    atomic_write_text(data / "samples.jsonl", samples.to_json(orient="records", lines=True))
    pairs = task.pairs(0, seed=seed, draws=draws)[["prompt", "chosen", "rejected"]]
    atomic_write_text(data / "pairs.jsonl", pairs.to_json(orient="records", lines=True))


def policy_logps(policy, task: CandidateTask, weights) -> np.ndarray:
    """A run's exact distribution over the candidates for one preference (the model and prompt it serves)."""
    w = policy.check_weights(weights)
    if hasattr(policy, "nearest"):  # one model per preference
        model, tokenizer = policy.model_for(policy.nearest(w))
    elif hasattr(policy, "model_for"):  # a soup, built for w
        model, tokenizer = policy.model_for(w), policy.tokenizer
    elif hasattr(policy, "model"):
        model, tokenizer = policy.model, policy.tokenizer
    else:
        raise MoalignError(f"{type(policy).__name__} has no single model to read log-probabilities from")
    return candidate_logps(model, tokenizer, task, prompt_for=lambda x: policy.prompt_for(x, w))


RECIPES = {  # the module whose `train` runs the method, and its config class (or its command's own parser)
    "modpo": "moalign.methods.modpo:MODPOConfig",
    "ric": "moalign.methods.ric:RiCConfig",
    "morl": "moalign.methods.morl:MORLConfig",
    "soups": "moalign.methods.soups:parse_soups_config",
    "sft": "moalign.methods.sft:SFTRunConfig",
    "paretohqd": "moalign.methods.paretohqd:ParetoHqDConfig",
}


def train_method(name: str, recipe: Path) -> float:
    """Train one method from its YAML with its own recipe (its module's `train`); returns seconds."""
    import importlib

    from moalign.methods.config import parse_config

    module_name, _, attribute = RECIPES[name].partition(":")
    module = importlib.import_module(module_name)
    target, argv = getattr(module, attribute), ["--config", str(recipe)]
    start = time.perf_counter()
    module.train(parse_config(target, argv) if isinstance(target, type) else target(argv))
    return time.perf_counter() - start


def train_and_read(name: str, recipe: Path, task: CandidateTask, ref_logp: np.ndarray, preferences) -> dict:
    """Train one method from its YAML, read its policy exactly at every preference and estimate its recipe's
    cost: the method's row of the table."""
    from moalign.cost import estimate
    from moalign.policy import load_policy

    seconds = train_method(name, recipe)
    run_dir = Path(yaml.safe_load(recipe.read_text())["output_dir"])
    policy = load_policy(run_dir, device="cpu")
    targets_beta = name in ("modpo", "morl")  # they optimise E[wᵀr] − β·KL at this β
    read: dict = {}  # preferences a policy serves alike (SFT: one model, one prompt) are read once
    points = []
    for w in preferences:
        variant = policy.variant(policy.check_weights(w))
        if variant not in read:
            read[variant] = policy_logps(policy, task, w)
        points.append(policy_point(read[variant], task, ref_logp, w, BETA if targets_beta else None))
    row = summarise(LABELS[name], points, task, ref_logp)
    # a soup's training is its ingredients' (the manifest sums their stages): MORLHF's one-hot models
    training = read_manifest(run_dir)["training"]
    counted, seconds = float(training.get("flops", 0.0)), float(training.get("seconds", seconds))
    # the estimate made before a run, with rollouts at the length the initial policy samples (a pilot)
    predicted = None if name == "soups" else estimate(str(recipe), name, pilot_prompts=PILOT)[0].flops
    row.update(seconds=seconds, flops=counted, estimated_flops=predicted)
    log.info(f"exact task: {LABELS[name]} trained in {seconds:.0f}s and read")
    return row


def run_chain(
    names: list[str], recipes: dict[str, Path], task: CandidateTask, ref_logp: np.ndarray, preferences
) -> dict[str, dict]:
    """`train_and_read` for `names`, one after another on one torch thread (a worker process's job)."""
    from moalign.demo.base_model import demo_threads

    with demo_threads():
        return {name: train_and_read(name, recipes[name], task, ref_logp, preferences) for name in names}


def run_methods(
    methods: tuple[str, ...],
    recipes: dict[str, Path],
    workers: int,
    task: CandidateTask,
    ref_logp: np.ndarray,
    preferences,
) -> list:
    """Every method's row, in the order of `methods`; the chains run in parallel processes when `workers` > 1
    (the numbers are the same: each method trains on one thread from its own seed and is read exactly)."""
    chains = [[name for name in chain if name in methods] for chain in CHAINS]
    chains = [chain for chain in chains if chain]
    rows: dict[str, dict] = {}
    if workers <= 1 or len(chains) <= 1:
        rows = run_chain([name for chain in chains for name in chain], recipes, task, ref_logp, preferences)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            jobs = [pool.submit(run_chain, chain, recipes, task, ref_logp, preferences) for chain in chains]
            for future in jobs:
                rows.update(future.result())
    return [rows[name] for name in methods]


def run_exact(
    out: Path,
    quick: bool = False,
    seed: int = 0,
    methods: tuple[str, ...] = METHODS,
    base_model: str | None = None,
    size: dict[str, int] | None = None,
    workers: int | None = None,
) -> dict:
    """Build the task, train the methods, evaluate them exactly; writes exact.json, exact.md and exact_front.png.
    `size` replaces the quick or full sizes (`SIZES`' keys); `workers` processes train (default: 2 where there
    are 2 cores).

    Every method trains on one torch thread: the numbers then depend on the seed, not on the machine's core count
    or the number of workers."""
    from moalign.demo.base_model import demo_threads

    workers = workers if workers is not None else min(len(CHAINS), os.cpu_count() or 1)
    with demo_threads():
        return _run_exact(out, size or SIZES["quick" if quick else "full"], seed, methods, base_model, workers)


def _run_exact(
    out: Path, size: dict[str, int], seed: int, methods: tuple[str, ...], base_model: str | None, workers: int
) -> dict:
    from moalign.demo.task import prepare_task
    from moalign.generation import load_model
    from moalign.pareto import parse_preferences

    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    base_model = base_model or str(prepare_task().base_model)
    task = build_candidate_task(size["prompts"], size["k"], OBJECTIVES, seed=seed + 1)
    task.save(out)
    write_data(out, task, size["draws"], seed)
    recipes = write_recipes(out, base_model, size, seed)
    base, tokenizer = load_model(base_model, device="cpu")
    ref_logp = candidate_logps(base, tokenizer, task)
    del base
    preferences = parse_preferences(PREFERENCES, 2)
    # π_ref at each preference: where training starts, so KL(π*_w‖π_ref) is the distance a method should close
    start_points = [policy_point(ref_logp, task, ref_logp, w, BETA) for w in preferences]
    rows = [summarise("base (π_ref)", start_points, task, ref_logp)]
    rows += run_methods(methods, recipes, workers, task, ref_logp, preferences)
    plot(task, ref_logp, rows, out / "exact_front.png")
    result = {
        "task": {"prompts": task.shape[0], "candidates": task.shape[1], "objectives": task.names, "beta": BETA},
        "seed": seed,
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }
    write_json(out / "exact.json", result)
    atomic_write_text(out / "exact.md", table(rows, task.names) + "\n")
    return result


def table(rows: list[dict[str, Any]], names: list[str]) -> str:
    from moalign.report import markdown_table

    lines = []
    for row in rows:
        ratio = row.get("flops") and row.get("estimated_flops") and row["estimated_flops"] / row["flops"]
        lines.append(
            {
                "method": row["name"],
                "KL to π_ref (max)": f"{row['kl_budget']:.3f}",
                **{f"gap {n}": f"{row['objective_gaps'][n]:.3f}" for n in names},
                "mean gap at w": f"{np.mean([p.get('gap', 0.0) for p in row['points']]):.3f}",
                "HV / exact HV": f"{row['hypervolume_ratio']:.3f}",
                "KL(π*_w‖π)": f"{row['kl_to_optimum']:.3f}" if "kl_to_optimum" in row else "",
                "seconds": f"{row['seconds']:.0f}" if "seconds" in row else "",
                "GFLOPs": f"{row['flops'] / 1e9:.1f}" if row.get("flops") else "",
                "cost estimate / counted": f"{ratio:.3f}" if ratio else "",
            }
        )
    return markdown_table(lines, list(lines[0]))


def print_summary(result: dict, out: Path) -> None:
    names = result["task"]["objectives"]
    print(
        f"\nexact task: {result['task']['prompts']} prompts × {result['task']['candidates']} candidates, "
        f"β = {result['task']['beta']}, finished in {result['seconds']:.0f}s"
    )
    print(table(result["rows"], names))
    print(f"plot: {out / 'exact_front.png'}\nresults: {out / 'exact.json'}")


@dataclass
class ExactDemoConfig:
    """`moalign demo --task exact`: MODPO, RiC, MORLHF, Rewarded Soups, SFT and ParetoHqD against the exact
    KL-regularised front."""

    output_dir: str = field(default="runs/demo_exact", metadata={"help": "where the task, runs and results go"})
    quick: bool = field(default=False, metadata={"help": "a smaller task and fewer steps (a smoke run)"})
    seed: int = field(default=0, metadata={"help": "the task's and the training's seed"})
    base_model: str | None = field(default=None, metadata={"help": "π_ref (default: the demo task's base model)"})


def cli(argv: list[str]) -> None:
    from moalign.methods.config import parse_config

    args = parse_config(ExactDemoConfig, argv, required=(), prog="moalign demo --task exact")
    out = Path(args.output_dir)
    print_summary(run_exact(out, quick=args.quick, seed=args.seed, base_model=args.base_model), out)
