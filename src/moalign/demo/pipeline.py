"""`moalign demo`: the embedded task end to end, with no downloads.

Builds (or reuses) the task and its base model, trains the SFT baseline and Rewards-in-Context, and
evaluates the three runs on one preference grid with one reference point under `runs/demo/`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from moalign.configs import FOLDER as SHIPPED_CONFIGS
from moalign.errors import MoalignError
from moalign.methods.config import objective_names, parse_config
from moalign.run import read_manifest, write_manifest

log = logging.getLogger("moalign")


def demo_objectives(config_path: Path) -> list[str]:
    import yaml

    return list(yaml.safe_load(config_path.read_text())["objectives"])


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def preference_pairs(samples: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """Pairs for the SFT baseline: per prompt, the response with the best mean z-score is chosen.

    This stands in for a human label that weighs every objective equally.
    """
    z = (samples[names] - samples[names].mean()) / samples[names].std()
    frame = samples.assign(utility=z.mean(axis=1))
    rows = []
    for prompt, group in frame.groupby("prompt", sort=False):
        if len(group) < 2:
            continue
        ordered = group.sort_values("utility")
        rows.append({"prompt": prompt, "chosen": ordered["response"].iloc[-1], "rejected": ordered["response"].iloc[0]})
    return pd.DataFrame(rows)


def method_config(config_class, yaml_path: Path, **values):
    argv = ["--config", str(yaml_path)]
    for key, value in values.items():
        argv += [f"--{key}", str(value)]
    return parse_config(config_class, argv)


def train_demo_runs(out: Path, configs: Path = SHIPPED_CONFIGS, n_eval_prompts: int = 128) -> dict[str, float]:
    """Train (or reuse) the base, SFT and RiC runs of the demo under `out`; returns seconds per step."""
    from moalign.demo.task import prepare_task
    from moalign.methods import ric, sft

    start = time.perf_counter()
    ric_yaml, sft_yaml = configs / "ric_demo.yaml", configs / "sft_demo.yaml"
    for path in (ric_yaml, sft_yaml):
        if not path.exists():
            raise MoalignError(f"demo config {path} does not exist; pass --configs DIR")
    specs = demo_objectives(ric_yaml)
    names = objective_names(specs)

    task = prepare_task()
    log.info(f"demo task ready in {time.perf_counter() - start:.0f}s: {task.root}")
    eval_prompts = write_prompts(out / "data" / "eval_prompts.jsonl", task.test_prompts[:n_eval_prompts])
    samples = pd.read_parquet(task.train_path)
    missing = [n for n in names if n not in samples.columns]
    if missing:
        raise MoalignError(f"the demo corpus has no score column for {missing}; use objectives of {task.objectives}")
    pairs_path = out / "data" / "sft_pairs.jsonl"
    if not pairs_path.exists():
        preference_pairs(samples, names).to_json(pairs_path, orient="records", lines=True)

    common = {"model_name_or_path": task.base_model, "eval_prompts": eval_prompts}
    timings = {"task": time.perf_counter() - start}
    t = time.perf_counter()
    sft.train(method_config(sft.SFTRunConfig, sft_yaml, dataset=pairs_path, output_dir=out / "sft", **common))
    timings["sft"] = time.perf_counter() - t
    # The base model is evaluated like any run: a manifest naming it, with the SFT run's decoding settings.
    base = out / "base"
    base.mkdir(parents=True, exist_ok=True)
    (base / "eval_prompts.jsonl").write_text(eval_prompts.read_text())
    sft_manifest = read_manifest(out / "sft")
    write_manifest(
        base,
        {
            "method": "base",
            "model": str(task.base_model),
            "objectives": specs,
            "objective_names": names,
            "eval_prompts": "eval_prompts.jsonl",
            "sampling": sft_manifest["sampling"],
            "base_metrics": task.base_metrics,
        },
    )
    t = time.perf_counter()
    ric.train(method_config(ric.RiCConfig, ric_yaml, dataset=task.train_path, output_dir=out / "ric", **common))
    timings["ric"] = time.perf_counter() - t
    return timings


def _interval(bounds: list[float]) -> str:
    return f" [{bounds[0]:.2f}, {bounds[1]:.2f}]"


def run_demo(out: Path, configs: Path, n_eval_prompts: int, divisions: int) -> Path:
    from moalign.demo.base_model import TEXT_DEMO_THREADS, demo_threads
    from moalign.evaluate import evaluate_runs

    start = time.perf_counter()
    with demo_threads(TEXT_DEMO_THREADS):  # the same numbers on any machine, whatever else runs on it
        timings = train_demo_runs(out, configs, n_eval_prompts)
        names = read_manifest(out / "ric")["objective_names"]
        t = time.perf_counter()
        results = evaluate_runs([out / "base", out / "sft", out / "ric"], divisions=divisions, output_dir=out)
        timings["eval"] = time.perf_counter() - t
    steps = ", ".join(f"{step} {seconds:.0f}s" for step, seconds in timings.items())
    print(f"\nmoalign demo finished in {time.perf_counter() - start:.0f}s ({steps})")
    print(f"{'run':<6} {'hypervolume [95% interval]':>28} {'collapse':>9}  steerability ({', '.join(names)})")
    for run, result in zip(("base", "sft", "ric"), results):
        # A fixed model's steerability is undefined (its points do not move): shown as n/a.
        steer = ", ".join(
            "n/a"
            if np.isnan(s := result["steerability"][n])
            else f"{s:+.3f}{_interval(result['steerability_interval'][n])}"
            for n in names
        )
        hv = f"{result['hypervolume']:.4f}{_interval(result['hypervolume_interval'])}"
        print(f"{run:<6} {hv:>28} {result['collapse_rate']:9.3f}  {steer}")
    print(f"reference point: {np.round(results[0]['reference_point'], 4).tolist()}")
    print(f"report: {out / 'report.html'}\nplot:   {out / 'fronts.png'}")
    return out


@dataclass
class DemoConfig:
    """`moalign demo`: the embedded task, the SFT baseline and RiC, evaluated on one preference grid."""

    output_dir: str = field(default="runs/demo", metadata={"help": "where the three runs and the report go"})
    configs: str = field(default=str(SHIPPED_CONFIGS), metadata={"help": "folder with ric_demo.yaml and sft_demo.yaml"})
    eval_prompts: int = field(default=128, metadata={"help": "held-out prompts per preference"})
    divisions: int = field(default=10, metadata={"help": "preference grid resolution"})


def cli(argv: list[str]) -> None:
    args = parse_config(DemoConfig, argv, required=(), prog="moalign demo")
    run_demo(Path(args.output_dir), Path(args.configs), args.eval_prompts, args.divisions)
