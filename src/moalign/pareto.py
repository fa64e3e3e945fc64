"""Pareto math: non-dominated sorting and hypervolume (moocore), preference grids, rays, scalarisations.

Every objective is maximised everywhere in moalign.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import moocore
import numpy as np

from moalign.errors import MoalignError

SCALARIZATIONS = (
    "linear",
    "worst_case",
    "soft_max_min",
    "uncertainty_weighted",
    "lower_quantile",
    "median",
    "bernoulli_nash",
)


def _as_matrix(points: np.ndarray | Sequence, name: str = "points") -> np.ndarray:
    array = np.asarray(points, dtype=float)
    if array.ndim != 2:
        raise MoalignError(f"{name} must be a 2-D array (n samples × N objectives), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise MoalignError(f"{name} contain NaN or infinite values")
    return array


def validate_weights(weights: Sequence[float] | np.ndarray, n_objectives: int) -> np.ndarray:
    """Check that a preference vector lies on the simplex and has one weight per objective."""
    w = np.asarray(weights, dtype=float).reshape(-1)
    if w.size != n_objectives:
        raise MoalignError(f"weights {w.tolist()} have {w.size} entries, expected {n_objectives} (one per objective)")
    if not np.isfinite(w).all() or (w < 0).any():
        raise MoalignError(f"weights {w.tolist()} must be finite and non-negative")
    if abs(w.sum() - 1.0) > 1e-6:
        raise MoalignError(f"weights {w.tolist()} must sum to 1 (they sum to {w.sum():g})")
    return w


def parse_weights(text: str, n_objectives: int) -> np.ndarray:
    """Parse '0.2,0.8' into a validated weight vector."""
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        raise MoalignError(f"weights {text!r} must be comma-separated numbers, e.g. 0.3,0.7") from None
    return validate_weights(values, n_objectives)


def parse_preferences(entries: Sequence[Any] | None, n_objectives: int) -> np.ndarray:
    """A run's preference list, validated, in the order given (one row per preference).

    An entry is "0.2,0.8" or [0.2, 0.8], "grid:D" (the simplex grid of step 1/D), "onehot" (the corners) or
    "uniform"; an empty list means "uniform". A preference listed twice is a mistake worth one line.
    """
    rows: list[np.ndarray] = []
    for entry in entries or ["uniform"]:
        text = entry.strip() if isinstance(entry, str) else None
        if text == "uniform":
            expanded = [np.full(n_objectives, 1.0 / n_objectives)]
        elif text == "onehot":
            expanded = list(np.eye(n_objectives))
        elif text is not None and text.startswith("grid"):
            _, _, divisions = text.partition(":")
            if not divisions.isdigit() or int(divisions) < 1:
                raise MoalignError(f"preference {entry!r}: write grid:D with D a whole number ≥ 1, e.g. grid:10")
            expanded = list(simplex_grid(n_objectives, int(divisions)))
        else:
            try:
                values = [float(x) for x in text.split(",")] if text is not None else [float(x) for x in entry]
            except (TypeError, ValueError):
                raise MoalignError(f"preference {entry!r}: use '0.2,0.8', 'grid:D', 'onehot' or 'uniform'") from None
            expanded = [validate_weights(values, n_objectives)]
        for row in expanded:
            if any(np.allclose(row, seen, atol=1e-9) for seen in rows):
                raise MoalignError(f"preferences list {np.round(row, 6).tolist()} twice; give each once")
            rows.append(np.asarray(row, dtype=float))
    return np.stack(rows)


def preference_name(preference: Sequence[float]) -> str:
    """The folder and model name of a per-preference model: [0.2, 0.8] -> 'w0.2-0.8'."""
    return "w" + "-".join(f"{round(float(x), 4):g}" for x in preference)


def hypervolume(points: np.ndarray | Sequence, reference_point: Sequence[float]) -> float:
    """Hypervolume dominated by `points` (maximised) above `reference_point`, computed by moocore.

    Points that do not strictly dominate the reference point contribute nothing.
    """
    pts = _as_matrix(points)
    ref = np.asarray(reference_point, dtype=float)
    if ref.shape != (pts.shape[1],):
        raise MoalignError(f"reference point has {ref.size} entries, expected {pts.shape[1]}")
    pts = pts[(pts > ref).all(axis=1)]
    if len(pts) == 0:
        return 0.0
    return float(moocore.hypervolume(pts, ref=ref, maximise=True))


def non_dominated(points: np.ndarray | Sequence) -> np.ndarray:
    """Boolean mask of the points no other point dominates (duplicates are all kept)."""
    pts = _as_matrix(points)
    return np.asarray(moocore.is_nondominated(pts, maximise=True, keep_weakly=True), dtype=bool)


def pareto_ranks(points: np.ndarray | Sequence) -> np.ndarray:
    """Non-dominated sorting: layer index of every point, 0 for the first front."""
    pts = _as_matrix(points)
    return np.asarray(moocore.pareto_rank(pts, maximise=True), dtype=int)


def simplex_grid(n_objectives: int, divisions: int = 10) -> np.ndarray:
    """All weight vectors with entries in {0, 1/d, …, 1} summing to 1 (N=2, d=10: 11 points)."""
    if n_objectives < 1 or divisions < 1:
        raise MoalignError("simplex_grid needs n_objectives ≥ 1 and divisions ≥ 1")
    rows = [combo for combo in itertools.product(range(divisions + 1), repeat=n_objectives) if sum(combo) == divisions]
    # First objective's weight ascending, so an N=2 grid reads w1 = 0, 0.1, …, 1.
    rows.sort()
    return np.asarray(rows, dtype=float) / divisions


def ray_distance(
    points: np.ndarray | Sequence,
    preference: Sequence[float],
    low: Sequence[float],
    high: Sequence[float],
) -> np.ndarray:
    """Distance of each point to a preference's ray in min-max normalised space (ParetoHqD).

    The ray starts at the ideal point (every objective at `high`) and passes through the compromise
    point W = low + w ⊙ (high − low); in normalised coordinates that is the ray from 1 through w.
    """
    pts = _as_matrix(points)
    w = validate_weights(preference, pts.shape[1])
    low_a, high_a = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    span = np.where(high_a > low_a, high_a - low_a, 1.0)
    normalised = (pts - low_a) / span
    direction = w - 1.0
    direction = direction / np.linalg.norm(direction)
    offset = normalised - 1.0
    along = np.clip(offset @ direction, 0.0, None)
    return np.linalg.norm(offset - along[:, None] * direction[None, :], axis=1)


def scalarize(
    rewards: np.ndarray | Sequence,
    weights: Sequence[float] | np.ndarray,
    method: str = "linear",
    *,
    temperature: float = 1.0,
    uncertainty_penalty: float = 0.5,
    positive: str = "softplus",
    shift: float = 0.0,
) -> np.ndarray:
    """One scalar reward per row of `rewards` (B×N) from the weighted scores r̃ = w ⊙ r (MORLAIF §4).

    Every method reduces over the objectives of one sample, never over the batch.
    - linear: Σ r̃;  worst_case: min r̃
    - median: median r̃; for an even N the mean of the two middle values (numpy's median; MORLAIF's
      reference code takes the lower one, as `torch.median` does)
    - soft_max_min: Σ softmin_τ(r̃) r̃ with τ = `temperature`
    - uncertainty_weighted: mean(r̃) − λ var(r̃), the population variance (divided by N), with
      λ = `uncertainty_penalty`, 0.5 as in MORLAIF's reference code
    - lower_quantile: mean of the ⌊N/3⌋ smallest r̃ (at least one)
    - bernoulli_nash: geometric mean of positive utilities, made positive by softplus or by adding `shift`
    """
    r = _as_matrix(rewards, "rewards")
    w = validate_weights(weights, r.shape[1])
    weighted = r * w
    if method == "linear":
        return weighted.sum(axis=1)
    if method == "worst_case":
        return weighted.min(axis=1)
    if method == "median":
        return np.median(weighted, axis=1)
    if method == "soft_max_min":
        if temperature <= 0:
            raise MoalignError("soft_max_min needs temperature > 0")
        logits = -weighted / temperature
        logits -= logits.max(axis=1, keepdims=True)
        soft = np.exp(logits)
        soft /= soft.sum(axis=1, keepdims=True)
        return (soft * weighted).sum(axis=1)
    if method == "uncertainty_weighted":
        return weighted.mean(axis=1) - uncertainty_penalty * weighted.var(axis=1)
    if method == "lower_quantile":
        k = max(1, r.shape[1] // 3)
        return np.sort(weighted, axis=1)[:, :k].mean(axis=1)
    if method == "bernoulli_nash":
        if positive == "softplus":
            utilities = np.logaddexp(0.0, weighted)
        elif positive == "shift":
            utilities = weighted + shift
            if (utilities <= 0).any():
                raise MoalignError(f"bernoulli_nash with shift={shift:g} leaves non-positive utilities; raise it")
        else:
            raise MoalignError(f"bernoulli_nash positive={positive!r}: use 'softplus' or 'shift'")
        return np.exp(np.log(utilities).mean(axis=1))
    raise MoalignError(f"unknown scalarisation {method!r}; choose one of {', '.join(SCALARIZATIONS)}")
