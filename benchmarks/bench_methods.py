"""The papers' comparison at small scale: every method trained on the embedded task, one front plot.

Trains the base model's baselines (base, SFT), RiC (offline only and offline + online), MODPO,
ParetoHqD (stage 1 and stages 1 + 2), MORLHF and Rewarded Soups in one run, evaluates all of them on
one preference grid with one reference point, and reports hypervolume, collapse rate, steerability and
training time (seconds and tokens) side by side, with each method's time as a ratio of MORLHF's.

Runs go to runs/bench/ (removed first, so every time is measured in this run; set
MOALIGN_BENCH_REUSE=1 to keep trained runs while iterating). The shared plot is copied to
benchmarks/results/fronts.png.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent / "runs" / "bench"
SECTION = "methods on the embedded task"


def sibling(name: str):
    """Import another benchmark module (benchmarks/ is a folder of scripts, not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def offline_only_run(ric_dir: Path, out: Path) -> Path:
    """A run directory serving RiC's offline-stage model, to compare with offline + online."""
    from moalign.run import read_manifest, write_manifest

    manifest = read_manifest(ric_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ric_dir / manifest["eval_prompts"], out / "eval_prompts.jsonl")
    offline = manifest["training"]["stages"]["offline"]
    manifest.update(
        model=os.path.relpath(ric_dir / manifest["stage_models"]["offline"], out),
        eval_prompts="eval_prompts.jsonl",
        training={
            "seconds": offline["seconds"],
            "tokens": offline["tokens"],
            "flops": offline.get("flops", 0.0),
            "stages": {"offline": offline},
        },
    )
    write_manifest(out, manifest)
    return out


def run(quick: bool) -> list[dict[str, Any]]:
    from moalign.demo.pipeline import train_demo_runs
    from moalign.demo.task import prepare_task
    from moalign.evaluate import evaluate_runs
    from moalign.run import read_manifest

    if not os.environ.get("MOALIGN_BENCH_REUSE"):
        shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True, exist_ok=True)
    task = prepare_task()
    n_prompts, divisions = (32, 5) if quick else (64, 10)

    trained: dict[str, tuple[Path, dict[str, Any]]] = {}
    rows: list[dict[str, Any]] = []

    def train(name: str, fn: Callable[[], dict[str, Any] | None], run_dir: Path) -> None:
        start = time.perf_counter()
        try:
            info = fn() or {}
        except Exception as error:  # one method failing must not hide the others
            traceback.print_exc()
            rows.append(
                {
                    "section": SECTION,
                    "metric": f"{name}: error",
                    "value": None,
                    "unit": "",
                    "note": f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}",
                }
            )
            return
        info.setdefault("train_seconds", time.perf_counter() - start)
        trained[name] = (run_dir, info)

    timings = train_demo_runs(ROOT, n_eval_prompts=n_prompts)
    for name in ("base", "sft", "ric"):
        training = read_manifest(ROOT / name).get("training", {})
        trained[name] = (
            ROOT / name,
            {"train_seconds": training.get("seconds", 0.0), "tokens": training.get("tokens", 0)},
        )
    trained["ric (offline only)"] = (offline_only_run(ROOT / "ric", ROOT / "ric_offline"), {})
    stages = read_manifest(ROOT / "ric")["training"]["stages"]
    trained["ric (offline only)"][1].update(
        train_seconds=stages["offline"]["seconds"], tokens=stages["offline"]["tokens"]
    )
    for stage, info in stages.items():
        rows.append(
            {
                "section": "RiC stages",
                "metric": f"{stage} seconds",
                "value": round(info["seconds"], 1),
                "unit": "s",
                "note": f"{info.get('tokens', 0)} tokens",
            }
        )

    modpo, paretohqd, morl = sibling("bench_modpo"), sibling("bench_paretohqd"), sibling("bench_morl")
    train("modpo", lambda: modpo.train_on_demo(task, ROOT / "modpo", quick), ROOT / "modpo")
    train("paretohqd", lambda: paretohqd.train_on_demo(task, ROOT / "paretohqd", quick), ROOT / "paretohqd")
    if (ROOT / "paretohqd_stage1" / "moalign.json").exists():
        trained["paretohqd (stage 1)"] = (ROOT / "paretohqd_stage1", {})
    train("morlhf", lambda: morl.train_on_demo(task, ROOT / "morlhf", quick), ROOT / "morlhf")
    train("soups", lambda: morl.train_soups_on_demo(task, ROOT / "soups", quick), ROOT / "soups")

    names = list(trained)
    start = time.perf_counter()
    fronts = evaluate_runs(
        [trained[n][0] for n in names], n_prompts=n_prompts, divisions=divisions, output_dir=ROOT, progress=False
    )
    eval_seconds = time.perf_counter() - start
    (HERE / "results").mkdir(exist_ok=True)
    shutil.copyfile(ROOT / "fronts.png", HERE / "results" / "fronts.png")

    morlhf_seconds = trained.get("morlhf", (None, {}))[1].get("train_seconds")
    # FLOPs as each run's manifest counted them (moalign.cost): the column that carries over to a 7B model
    flops = {name: front.get("training", {}).get("flops") for name, front in zip(names, fronts)}
    reference = [round(v, 4) for v in fronts[0]["reference_point"]]
    for name, front in zip(names, fronts):
        info = trained[name][1]
        seconds = info.get("train_seconds") or front.get("training", {}).get("seconds")
        steer = ", ".join(f"{k} {v:+.2f}" for k, v in front["steerability"].items() if v == v)
        rows.append(
            {
                "section": SECTION,
                "metric": f"{name}: hypervolume",
                "value": round(front["hypervolume"], 5),
                "unit": "",
                "note": f"reference point {reference}",
            }
        )
        rows.append(
            {
                "section": SECTION,
                "metric": f"{name}: collapse rate",
                "value": round(front["collapse_rate"], 4),
                "unit": "share",
                "note": f"steerability {steer}",
            }
        )
        if seconds:
            row = {
                "section": SECTION,
                "metric": f"{name}: training time",
                "value": round(seconds, 1),
                "unit": "s",
                "note": f"{info.get('tokens') or front.get('training', {}).get('tokens', 0)} tokens",
            }
            if morlhf_seconds:
                row.update(baseline=round(morlhf_seconds, 1), ratio=round(seconds / morlhf_seconds, 3))
            rows.append(row)
        if flops[name]:
            row = {
                "section": SECTION,
                "metric": f"{name}: training FLOPs",
                "value": float(f"{flops[name]:.4g}"),
                "unit": "FLOPs",
                "note": "trained, reference, rollout and generated tokens; baseline: MORLHF",
            }
            if flops.get("morlhf"):
                row.update(baseline=float(f"{flops['morlhf']:.4g}"), ratio=round(flops[name] / flops["morlhf"], 3))
            rows.append(row)
    rows.append(
        {
            "section": SECTION,
            "metric": "evaluation",
            "value": round(eval_seconds, 1),
            "unit": "s",
            "note": f"{len(names)} runs × {divisions + 1} preferences × {n_prompts} prompts; plot: fronts.png",
        }
    )
    rows.append(
        {
            "section": SECTION,
            "metric": "demo runs (base, sft, ric)",
            "value": round(sum(timings.values()), 1),
            "unit": "s",
            "note": ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()),
        }
    )
    return rows + cost_rows(task, [name for name in ("sft", "ric", "paretohqd", "morlhf") if name in trained])


PILOT = 32  # prompts `moalign cost --pilot_prompts` samples from the initial policy to estimate answer lengths
# run -> (method, shipped config, what the benchmark set beside the task's base model and corpus)
COSTED = {
    "sft": ("sft", "sft_demo.yaml", {"dataset": ROOT / "data" / "sft_pairs.jsonl"}),
    "ric": ("ric", "ric_demo.yaml", {}),
    "paretohqd": ("paretohqd", "paretohqd_demo.yaml", {"stages": 2}),
    "morlhf": ("morl", "morlhf_demo.yaml", {}),
}


def cost_rows(task: Any, runs: list[str]) -> list[dict[str, Any]]:
    """`moalign cost` of the YAML each run was trained from, over the FLOPs the run counted: at the configs'
    generation caps (the default, an upper bound) and with a pilot of the initial policy's answer lengths."""
    import yaml

    from moalign.cost import estimate
    from moalign.demo.pipeline import SHIPPED_CONFIGS
    from moalign.run import read_manifest

    rows = []
    for run in runs:
        method, shipped, extra = COSTED[run]
        values = yaml.safe_load((SHIPPED_CONFIGS / shipped).read_text())
        values.update(model_name_or_path=str(task.base_model), dataset=str(task.train_path), output_dir=str(ROOT / run))
        values.update({key: str(value) if isinstance(value, Path) else value for key, value in extra.items()})
        recipe = ROOT / "configs" / f"{run}.yaml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(yaml.safe_dump(values, sort_keys=False))
        counted = read_manifest(ROOT / run)["training"]["flops"]
        at_cap, piloted = (estimate(str(recipe), method, pilot_prompts=n)[0] for n in (0, PILOT))
        generated = next((n.removeprefix("generations: ") for n in piloted.notes if n.startswith("generations:")), "")
        rows.append(
            {
                "section": "moalign cost on the embedded task",
                "metric": f"{run}: estimate / counted FLOPs",
                "value": round(piloted.flops / counted, 3),
                "unit": "×",
                "note": (f"with --pilot_prompts {PILOT}: {generated}; " if generated else "no generation; ")
                + f"at the configs' caps {at_cap.flops / counted:.3f}; `moalign cost runs/bench/configs/{run}.yaml`",
            }
        )
    return rows
