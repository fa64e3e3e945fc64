"""Bootstrap confidence intervals over prompts: is a difference between two fronts more than sampling noise?

Every preference answers the same prompts, so one resample of the prompts is applied to every preference
at once (a paired bootstrap): a resampled front is the mean score per preference over the resampled prompts,
and its hypervolume and steerability follow. The intervals are percentile intervals of those resamples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from moalign.pareto import hypervolume, non_dominated

RESAMPLES = 200
LEVEL = 0.95
SEED = 0  # the same resamples every time: a report reads the same on any machine


def resampled_points(per_prompt: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """Fronts of resampled prompts: (preferences × prompts × objectives) scores → (resamples × preferences ×
    objectives) means, every preference resampled with the same prompt indices."""
    scores = np.asarray(per_prompt, dtype=float)
    n_prompts = scores.shape[1]
    rows = np.random.default_rng(seed).integers(0, n_prompts, size=(resamples, n_prompts))
    return np.stack([scores[:, row, :].mean(axis=1) for row in rows])


def interval(values: np.ndarray, level: float = LEVEL) -> np.ndarray:
    """Percentile interval over the first axis: shape (..., 2) of [low, high]; NaN resamples are ignored."""
    tail = 100 * (1 - level) / 2
    return np.moveaxis(np.nanpercentile(np.asarray(values, dtype=float), [tail, 100 - tail], axis=0), 0, -1)


def hypervolume_interval(fronts: np.ndarray, reference_point: Sequence[float]) -> list[float]:
    """The interval of the hypervolume of the resampled fronts' non-dominated points."""
    volumes = [hypervolume(front[non_dominated(front)], reference_point) for front in np.asarray(fronts)]
    return interval(np.asarray(volumes)).tolist()


def steerability_intervals(preferences: np.ndarray, fronts: np.ndarray, names: Sequence[str]) -> dict[str, list[float]]:
    """Per objective, the interval of the rank correlation of its weight with its mean score."""
    from moalign.fronts import spearman

    grid = np.asarray(preferences, dtype=float)
    out: dict[str, list[float]] = {}
    for i, name in enumerate(names):
        values = np.array([spearman(grid[:, i], front[:, i]) for front in fronts])
        out[name] = [float("nan"), float("nan")] if np.isnan(values).all() else interval(values).tolist()
    return out
