"""ParetoHqD's selection (Gu et al., AAAI 2026), the mathematics: a preference is a direction, the ray from the
ideal point through the compromise point `low + w ⊙ (high − low)` in min-max normalised space; its training set
is the k samples of the first non-dominated layers nearest that ray."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moalign.errors import MoalignError
from moalign.pareto import pareto_ranks, preference_name, ray_distance, validate_weights
from moalign.run import atomic_write_text

log = logging.getLogger("moalign")

DISTANCES = ("perpendicular", "angle")


def normalise(scores: np.ndarray, low: Sequence[float] | None = None, high: Sequence[float] | None = None):
    """Min-max normalise (n × N) scores; returns (normalised, low, high). A constant objective maps to 0."""
    matrix = np.asarray(scores, dtype=float)
    low_a = matrix.min(axis=0) if low is None else np.asarray(low, dtype=float)
    high_a = matrix.max(axis=0) if high is None else np.asarray(high, dtype=float)
    span = np.where(high_a > low_a, high_a - low_a, 1.0)
    return (matrix - low_a) / span, low_a, high_a


def ray_angle(points: np.ndarray, preference: Sequence[float]) -> np.ndarray:
    """Angle (radians) between each normalised point, seen from the ideal point 1, and the preference ray."""
    direction = np.asarray(preference, dtype=float) - 1.0
    direction = direction / np.linalg.norm(direction)
    offset = np.asarray(points, dtype=float) - 1.0
    norms = np.linalg.norm(offset, axis=1)
    cosine = np.divide(offset @ direction, norms, out=np.ones(len(offset)), where=norms > 0)
    return np.arccos(np.clip(cosine, -1.0, 1.0))


def select(
    scores: np.ndarray | Sequence[Sequence[float]],
    preference: Sequence[float],
    k: int,
    n_layers: int = 10,
    distance: str = "perpendicular",
    low: Sequence[float] | None = None,
    high: Sequence[float] | None = None,
    layers: np.ndarray | None = None,
) -> np.ndarray:
    """Indices of the (at most) k samples of the first `n_layers` layers nearest the preference's ray.

    `scores` are raw (n × N, all maximised); they are min-max normalised inside (by `low`/`high` when
    given). Nearest first; ties (to 1e-9) go to the better layer, then the lower index, so the result
    does not depend on rounding noise. Pass `layers` (0-based non-dominated ranks) to sort only once
    for many preferences.
    """
    matrix = np.asarray(scores, dtype=float)
    if matrix.ndim != 2 or matrix.shape[1] < 2:
        raise MoalignError(f"ParetoHqD needs scores for at least two objectives (n × N), got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise MoalignError("scores contain NaN or infinite values; fix the scorer or the score columns")
    if k < 1:
        raise MoalignError(f"k must be ≥ 1 (samples per preference), got {k}")
    if n_layers < 1:
        raise MoalignError(f"n_layers must be ≥ 1, got {n_layers}")
    if distance not in DISTANCES:
        raise MoalignError(f"distance {distance!r}: use one of {', '.join(DISTANCES)}")
    w = validate_weights(preference, matrix.shape[1])
    if len(matrix) == 0:
        return np.zeros(0, dtype=int)
    points, low_a, high_a = normalise(matrix, low, high)
    ranks = pareto_ranks(matrix) if layers is None else np.asarray(layers, dtype=int)
    pool = np.flatnonzero(ranks < n_layers)
    if distance == "perpendicular":
        gap = ray_distance(points[pool], w, np.zeros_like(low_a), np.ones_like(high_a))
    else:
        gap = ray_angle(points[pool], w)
    gap = np.round(gap, 9)  # distances equal up to rounding noise count as ties
    order = np.lexsort((pool, ranks[pool], gap))  # last key first: distance, then layer, then index
    return pool[order[:k]]


def representatives(preferences: np.ndarray) -> list[int]:
    """The N+1 stage-1 models that generate stage-2 data: nearest to each e_i and to the balanced w (L1)."""
    n = preferences.shape[1]
    targets = list(np.eye(n)) + [np.full(n, 1.0 / n)]
    chosen: list[int] = []
    for target in targets:
        index = int(np.abs(preferences - target[None, :]).sum(axis=1).argmin())
        if index not in chosen:
            chosen.append(index)
    return chosen


def select_all(
    frame: pd.DataFrame, names: list[str], preferences: np.ndarray, k: int, n_layers: int, distance: str
) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]:
    """Every preference's selection from one scored frame (sorted once): selections, layers, low, high."""
    raw = frame[names].to_numpy(dtype=float)
    layers = pareto_ranks(raw)
    _, low, high = normalise(raw)
    selections = [select(raw, w, k, n_layers=n_layers, distance=distance, layers=layers) for w in preferences]
    for w, chosen in zip(preferences, selections):
        if len(chosen) < k:
            log.warning(f"{preference_name(w)}: only {len(chosen)} samples in the first {n_layers} layers")
    return selections, layers, low, high


def write_selection(
    directory: Path,
    frame: pd.DataFrame,
    names: list[str],
    preferences: np.ndarray,
    selections: list[np.ndarray],
    layers: np.ndarray,
    n_layers: int,
    low: np.ndarray,
    high: np.ndarray,
    plots: bool,
) -> list[dict[str, Any]]:
    """One JSONL (and plot) per preference with the selected samples; returns a summary per preference."""
    from moalign.report import plot_selection

    directory.mkdir(parents=True, exist_ok=True)
    raw = frame[names].to_numpy(dtype=float)
    points, _, _ = normalise(raw, low, high)
    summary = []
    for w, chosen in zip(preferences, selections):
        name = preference_name(w)
        gap, angle = [], []
        if len(chosen):
            gap = ray_distance(points[chosen], w, np.zeros(len(names)), np.ones(len(names)))
            angle = ray_angle(points[chosen], w)
        lines = []
        for index, d, a in zip(chosen, gap, angle):
            row = {
                "index": int(index),
                "prompt": frame["prompt"].iat[index],
                "response": frame["response"].iat[index],
                "layer": int(layers[index]),
                "ray_distance": float(d),
                "ray_angle": float(a),
                "scores": {n: float(raw[index, j]) for j, n in enumerate(names)},
                "normalised": {n: float(points[index, j]) for j, n in enumerate(names)},
            }
            lines.append(json.dumps(row, ensure_ascii=False))
        atomic_write_text(directory / f"{name}.jsonl", "".join(line + "\n" for line in lines))
        mean = points[chosen].mean(axis=0).tolist() if len(chosen) else [float("nan")] * len(names)
        summary.append({"preference": w.tolist(), "name": name, "samples": len(chosen), "mean_normalised": mean})
        if plots:
            plot_selection(directory / f"{name}.png", points, layers < n_layers, names, [w], [chosen])
    if plots:
        plot_selection(directory / "overview.png", points, layers < n_layers, names, preferences, selections)
    return summary
