"""Exact evaluation of a trained policy on a candidate task: no sampling, no sampling noise.

The policy's distribution restricted to each prompt's candidates is its sequence log-probabilities
(log π(y + EOS | x), tokenized as TRL's DPOTrainer does), renormalised over the candidates. From it: expected
rewards, KL to π_ref, and for a method that targets π*_w at a known β, KL(π*_w ‖ π_θ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moalign.exact.front import (
    expected_rewards,
    hypervolume_ratio,
    kl,
    objective_gaps,
    optimal_logp,
    renormalise,
    scalarised_gap,
)
from moalign.exact.task import CandidateTask


def candidate_logps(
    model, tokenizer, task: CandidateTask, prompt_for: Callable[[str], str] | None = None, batch_size: int = 32
) -> np.ndarray:
    """Renormalised log π(y|x) over each prompt's candidates (P×K); `prompt_for` rewrites the prompt the
    model sees (RiC writes the desired rewards into it)."""
    import torch

    from moalign.methods.modpo import completion_text, sequence_logps

    p, k, _ = task.shape
    prompts = [(prompt_for or (lambda x: x))(x) for x in task.prompts for _ in range(k)]
    responses = [completion_text(y) for row in task.candidates for y in row]
    was_training = model.training
    model.eval()  # dropout off: the distribution, not a sample of it
    try:
        with torch.no_grad():
            values = sequence_logps(model, tokenizer, prompts, responses, batch_size=batch_size)
    finally:
        model.train(was_training)
    return renormalise(values.reshape(p, k))


def policy_point(
    logp: np.ndarray,
    task: CandidateTask,
    ref_logp: np.ndarray,
    weights: Sequence[float] | None = None,
    beta: float | None = None,
) -> dict[str, Any]:
    """Expected rewards, KL to π_ref, and, given the (w, β) a method targets, KL(π*_w‖π) and the gap to the
    exact optimum of wᵀE[r] at the policy's own KL."""
    rewards = expected_rewards(logp, task.rewards)
    divergence = kl(logp, ref_logp)
    point: dict[str, Any] = {"rewards": rewards.tolist(), "kl_ref": divergence}
    if weights is not None:
        point["preference"] = [float(w) for w in weights]
        point["gap"] = scalarised_gap(ref_logp, task.rewards, rewards, weights, divergence)
        if beta is not None:
            point["kl_to_optimum"] = kl(optimal_logp(ref_logp, task.rewards, weights, beta), logp)
    return point


def summarise(name: str, points: list[dict[str, Any]], task: CandidateTask, ref_logp: np.ndarray) -> dict[str, Any]:
    """A method's row: its points, per-objective gaps and hypervolume against the exact front, both at the
    method's largest KL to π_ref (the budget it spent)."""
    matrix = np.asarray([p["rewards"] for p in points], dtype=float)
    budget = max(p["kl_ref"] for p in points)
    # The per-objective gap of the method's best point for that objective.
    gaps = np.min(
        [objective_gaps(ref_logp, task.rewards, row, budget) for row in matrix],
        axis=0,
    )
    method_hv, exact_hv = hypervolume_ratio(ref_logp, task.rewards, matrix, budget)
    row: dict[str, Any] = {
        "name": name,
        "points": points,
        "kl_budget": budget,
        "objective_gaps": dict(zip(task.names, gaps.tolist())),
        "hypervolume": method_hv,
        "exact_hypervolume": exact_hv,
        "hypervolume_ratio": method_hv / exact_hv if exact_hv > 0 else float("nan"),
    }
    targeted = [p["kl_to_optimum"] for p in points if "kl_to_optimum" in p]
    if targeted:
        row["kl_to_optimum"] = float(np.mean(targeted))
    return row


def plot(
    task: CandidateTask,
    ref_logp: np.ndarray,
    rows: list[dict[str, Any]],
    path: str | Path,
    budgets: Sequence[float] = (0.05, 0.2, 0.5, 1.0),
) -> Path:
    """The exact front at several KL budgets (grey lines, w from (0, 1) to (1, 0)) and every method's points (KL
    to π_ref in the legend); the axes frame what is drawn."""
    from moalign.exact.front import front_at_kl
    from moalign.pareto import simplex_grid
    from moalign.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.5))
    grid = simplex_grid(2, 40)
    shown = []  # everything drawn, so the axes frame it
    for budget in budgets:
        front = front_at_kl(ref_logp, task.rewards[..., :2], grid, budget)
        ax.plot(front[:, 0], front[:, 1], "-", color="0.55", lw=1)
        ax.annotate(f"KL {budget:g}", front[-1], fontsize=7, color="0.35", xytext=(3, 0), textcoords="offset points")
        shown.append(front)
    base = expected_rewards(ref_logp, task.rewards)[:2]
    ax.plot(*base, "k*", ms=10, label="π_ref (base model)")
    shown.append(base[None])
    for row in rows:
        matrix = np.asarray([p["rewards"] for p in row["points"]], dtype=float)[:, :2]
        ax.plot(matrix[:, 0], matrix[:, 1], "-o", ms=4, lw=1, label=f"{row['name']} (KL ≤ {row['kl_budget']:.2f})")
        shown.append(matrix)
    points = np.concatenate(shown)
    pad = 0.08 * np.maximum(points.max(axis=0) - points.min(axis=0), 1e-3)
    ax.set_xlim(points[:, 0].min() - pad[0], points[:, 0].max() + 3 * pad[0])
    ax.set_ylim(points[:, 1].min() - pad[1], points[:, 1].max() + pad[1])
    ax.set_xlabel(f"E[{task.names[0]}] (z)")
    ax.set_ylabel(f"E[{task.names[1]}] (z)")
    ax.set_title("Exact KL-regularised front (grey, per KL budget) and trained policies")
    ax.legend(fontsize=7, loc="best")  # where it hides the fewest points
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
