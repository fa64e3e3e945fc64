"""The exact KL-regularised optimum on a finite candidate set, and how far a policy is from it.

Every array is per prompt: log-probabilities `logp` are P×K (one row per prompt, one column per candidate,
each row normalised over its candidates), rewards are P×K×N. Expectations and KL divergences are means over
prompts of the per-prompt quantities.

For weights w and temperature β the policy maximising E[wᵀr] − β·KL(π‖π_ref) over the candidates is the
exponential tilt of π_ref (the closed form behind DPO, Rafailov et al., 2023, and MODPO, Zhou et al., 2024):

    π*_w(y|x) = π_ref(y|x)·exp(wᵀr(x,y)/β) / Z_w(x).

With one β shared by all prompts, π*_w is also the exact maximiser of E[wᵀr] under the budget
mean_x KL(π(·|x)‖π_ref(·|x)) ≤ κ when β is chosen so that its own KL equals κ (Lagrange duality): the front at
equal KL that a trained policy is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.special import log_softmax

from moalign.errors import MoalignError
from moalign.pareto import hypervolume

BETA_RANGE = (1e-4, 1e4)  # where the search for a β of given KL looks (rewards are z-scores: ±3 or so)


def renormalise(logp: np.ndarray) -> np.ndarray:
    """Log-probabilities of the candidates renormalised over each prompt's candidate set."""
    return log_softmax(np.asarray(logp, dtype=float), axis=-1)


def optimal_logp(ref_logp: np.ndarray, rewards: np.ndarray, weights: Sequence[float], beta: float) -> np.ndarray:
    """log π*_w over the candidates (P×K) for weights w and temperature β > 0."""
    if beta <= 0:
        raise MoalignError(f"beta must be > 0, got {beta}")
    return renormalise(np.asarray(ref_logp, dtype=float) + rewards @ np.asarray(weights, dtype=float) / beta)


def expected_rewards(logp: np.ndarray, rewards: np.ndarray) -> np.ndarray:
    """E_π[r], averaged over prompts (N values)."""
    return np.einsum("pk,pkn->n", np.exp(logp), rewards) / len(logp)


def kl(logp: np.ndarray, other_logp: np.ndarray) -> float:
    """mean_x KL(π(·|x) ‖ π'(·|x)), both given as log-probabilities over the same candidates."""
    p = np.exp(logp)
    return float(np.sum(np.where(p > 0, p * (logp - other_logp), 0.0)) / len(logp))


def beta_for_kl(ref_logp: np.ndarray, rewards: np.ndarray, weights: Sequence[float], budget: float) -> float:
    """The β whose π*_w has KL(π*_w‖π_ref) = budget (bisection on log β: the KL falls as β grows).

    A budget beyond what the candidates allow gives the smallest β searched (π*_w is then the argmax)."""
    if budget <= 0:
        return BETA_RANGE[1]
    low, high = np.log(BETA_RANGE[0]), np.log(BETA_RANGE[1])
    if kl(optimal_logp(ref_logp, rewards, weights, np.exp(low)), ref_logp) <= budget:
        return float(np.exp(low))
    for _ in range(60):
        middle = (low + high) / 2
        if kl(optimal_logp(ref_logp, rewards, weights, np.exp(middle)), ref_logp) > budget:
            low = middle
        else:
            high = middle
    return float(np.exp(high))


def front_at_kl(ref_logp: np.ndarray, rewards: np.ndarray, preferences: np.ndarray, budget: float) -> np.ndarray:
    """The exact front at a KL budget: E_{π*_w}[r] for every preference w, each at the β spending the budget."""
    return np.stack(
        [
            expected_rewards(optimal_logp(ref_logp, rewards, w, beta_for_kl(ref_logp, rewards, w, budget)), rewards)
            for w in np.asarray(preferences, dtype=float)
        ]
    )


def reference_point(rewards: np.ndarray) -> np.ndarray:
    """The nadir of the candidate set (mean over prompts of each objective's worst candidate): every policy
    over the candidates lies above it, so one reference point serves all methods and the exact front."""
    return rewards.min(axis=1).mean(axis=0)


def objective_gaps(ref_logp: np.ndarray, rewards: np.ndarray, point: np.ndarray, budget: float) -> np.ndarray:
    """Per objective i, how much of it a policy leaves on the table at equal KL:
    max{E_π[r_i] : KL(π‖π_ref) ≤ budget} − the policy's E[r_i]."""
    n = rewards.shape[-1]
    best = [
        expected_rewards(optimal_logp(ref_logp, rewards, e, beta_for_kl(ref_logp, rewards, e, budget)), rewards)[i]
        for i, e in enumerate(np.eye(n))
    ]
    return np.asarray(best) - np.asarray(point, dtype=float)


def scalarised_gap(
    ref_logp: np.ndarray, rewards: np.ndarray, point: np.ndarray, weights: Sequence[float], budget: float
) -> float:
    """max{E_π[wᵀr] : KL(π‖π_ref) ≤ budget} − wᵀ(the policy's E[r]) ≥ 0 for a policy meant to serve w."""
    w = np.asarray(weights, dtype=float)
    best = expected_rewards(optimal_logp(ref_logp, rewards, w, beta_for_kl(ref_logp, rewards, w, budget)), rewards)
    return float(w @ best - w @ np.asarray(point, dtype=float))


def hypervolume_ratio(
    ref_logp: np.ndarray, rewards: np.ndarray, points: np.ndarray, budget: float, divisions: int = 50
) -> tuple[float, float]:
    """(hypervolume of a method's points, that of the exact front at the same KL budget), one reference point."""
    from moalign.pareto import simplex_grid

    nadir = reference_point(rewards)
    exact = front_at_kl(ref_logp, rewards, simplex_grid(rewards.shape[-1], divisions), budget)
    return hypervolume(np.asarray(points, dtype=float), nadir), hypervolume(exact, nadir)
