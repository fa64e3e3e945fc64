"""The benchmark with a known answer: MODPO, RiC, MORLHF, Rewarded Soups, SFT and ParetoHqD on the candidate
task, against its exact front.

Per method: the gap to the exact front at equal KL for each objective, the hypervolume as a share of the exact
front's at the same KL, KL(π*_w‖π_θ) for the methods that target π*_w at β, training seconds and counted FLOPs,
and `moalign cost`'s estimate of the same recipe as a ratio of what the run counted. Every number comes from the
policies' exact distributions over the candidates (no sampling), so a rerun with the same seed on the same
machine gives the same table. Runs go to runs/bench_exact/ (removed first); the plot is copied to
benchmarks/results/exact_front.png.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent / "runs" / "bench_exact"
SECTION = "exact task: gap to the KL-regularised optimum"


def run(quick: bool) -> list[dict[str, Any]]:
    from moalign.exact.pipeline import run_exact

    shutil.rmtree(ROOT, ignore_errors=True)
    result = run_exact(ROOT, quick=quick)
    (HERE / "results").mkdir(exist_ok=True)
    shutil.copyfile(ROOT / "exact_front.png", HERE / "results" / "exact_front.png")
    task = result["task"]
    setting = f"{task['prompts']} prompts × {task['candidates']} candidates, β {task['beta']}"
    rows: list[dict[str, Any]] = []
    base_flops = None
    for row in result["rows"]:
        name = row["name"]
        gaps = ", ".join(f"{n} {v:.3f}" for n, v in row["objective_gaps"].items())
        rows.append(
            {
                "section": SECTION,
                "metric": f"{name}: hypervolume / exact",
                "value": round(row["hypervolume_ratio"], 4),
                "unit": "share",
                "note": f"KL to π_ref ≤ {row['kl_budget']:.3f}; gap per objective (z) {gaps}; {setting}",
            }
        )
        if "kl_to_optimum" in row:
            rows.append(
                {
                    "section": SECTION,
                    "metric": f"{name}: KL(π*_w ‖ π)",
                    "value": round(row["kl_to_optimum"], 4),
                    "unit": "nats",
                    "note": "mean over its preferences; π*_w at the β it trained with",
                }
            )
        if row.get("flops"):
            base_flops = base_flops or row["flops"]
            rows.append(
                {
                    "section": SECTION,
                    "metric": f"{name}: training FLOPs",
                    "value": float(f"{row['flops']:.4g}"),
                    "unit": "FLOPs",
                    "baseline": float(f"{base_flops:.4g}"),
                    "ratio": round(row["flops"] / base_flops, 3),
                    "note": f"{row['seconds']:.0f} s; baseline: the first method's FLOPs",
                }
            )
        if row.get("flops") and row.get("estimated_flops"):  # a soup has no estimate: its ingredients are MORLHF's
            rows.append(
                {
                    "section": SECTION,
                    "metric": f"{name}: moalign cost / counted",
                    "value": round(row["estimated_flops"] / row["flops"], 4),
                    "unit": "ratio",
                    "note": "the estimate of the same YAML (runs/bench_exact/configs) over the FLOPs the run recorded"
                    + (
                        "; rollouts at the length the initial policy samples (--pilot_prompts 32)"
                        if "PPO" in name
                        else ""
                    ),
                }
            )
    rows.append(
        {
            "section": SECTION,
            "metric": "whole exact benchmark",
            "value": round(result["seconds"], 1),
            "unit": "s",
            "note": "task, training, exact evaluation and plot (exact_front.png)",
        }
    )
    return rows
