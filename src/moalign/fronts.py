"""A front's numbers and files: steerability, the shared reference point, hypervolume over the non-dominated
points, front.json as written, and the summary table `moalign eval` prints."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moalign.errors import MoalignError
from moalign.pareto import hypervolume, non_dominated
from moalign.run import read_json

REFERENCE_MARGIN = 0.1  # default reference point: the worst score minus this share of the span


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation over the finite pairs; NaN when either side is constant or has < 2 values."""
    from scipy.stats import spearmanr

    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2 or np.ptp(a[keep]) == 0 or np.ptp(b[keep]) == 0:
        return math.nan
    return float(spearmanr(a[keep], b[keep]).statistic)


def steerability(preferences: np.ndarray, points: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    """Per objective, how monotonically its mean score follows its own weight over the grid (1 is perfect)."""
    return {name: spearman(preferences[:, i], points[:, i]) for i, name in enumerate(names)}


def default_reference_point(fronts: Sequence[np.ndarray | Sequence[Sequence[float]]]) -> list[float]:
    """Per objective, the worst mean score of any run minus 10% of the span across runs.

    Shared by every run compared so that their hypervolumes are comparable; where all points agree on
    an objective the margin is 10% of its magnitude (at least 0.1) so that the volume stays positive.
    """
    stacked = np.vstack([np.asarray(front, dtype=float) for front in fronts])
    low, high = stacked.min(axis=0), stacked.max(axis=0)
    span = high - low
    margin = np.where(span > 0, REFERENCE_MARGIN * span, REFERENCE_MARGIN * np.maximum(np.abs(low), 1.0))
    return (low - margin).tolist()


def check_reference_point(reference_point: Sequence[float] | str, n_objectives: int) -> list[float]:
    """Parse 'a,b' or a sequence into one finite number per objective."""
    if isinstance(reference_point, str):
        try:
            reference_point = [float(part) for part in reference_point.split(",")]
        except ValueError:
            raise MoalignError(
                f"reference point {reference_point!r} must be comma-separated numbers, e.g. -1,-50"
            ) from None
    values = [float(v) for v in reference_point]
    if len(values) != n_objectives:
        raise MoalignError(
            f"reference point {values} has {len(values)} entries, expected {n_objectives} (one per objective)"
        )
    if not all(math.isfinite(v) for v in values):
        raise MoalignError(f"reference point {values} must be finite")
    return values


def front_metrics(points: np.ndarray | Sequence[Sequence[float]], reference_point: Sequence[float]) -> dict[str, Any]:
    """The non-dominated points (indices) and their hypervolume above the shared reference point."""
    matrix = np.asarray(points, dtype=float)
    reference = check_reference_point(reference_point, matrix.shape[1])
    mask = non_dominated(matrix)
    return {
        "non_dominated": np.flatnonzero(mask).tolist(),
        "n_non_dominated": int(mask.sum()),
        "reference_point": reference,
        "hypervolume": hypervolume(matrix[mask], reference),
    }


def finite(value: Any) -> Any:
    """JSON has no NaN: undefined numbers (a constant objective's steerability) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def load_front(run_dir: str | Path) -> dict[str, Any]:
    """A run's front.json as `moalign eval` wrote it."""
    path = Path(run_dir) / "front.json"
    if not path.exists():
        raise MoalignError(f"{run_dir} has no front.json; run `moalign eval {run_dir}` first")
    return read_json(path)


def fmt_number(value: Any, digits: int = 3) -> str:
    """A number in `digits` significant digits; "n/a" where it is undefined."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def fmt_interval(bounds: Sequence[float] | None, digits: int) -> str:
    """` [low, high]`, the 95% bootstrap interval, or nothing where there is none."""
    if not bounds or any(not math.isfinite(float(b)) for b in bounds):
        return ""
    return f" [{fmt_number(bounds[0], digits)}, {fmt_number(bounds[1], digits)}]"


def summary_table(fronts: Sequence[dict[str, Any]]) -> str:
    """The short table `moalign eval` prints: run, method, hypervolume, collapse rate, steerability."""
    header = ["run", "method", "hypervolume", "non-dom", "collapse", "steerability"]
    rows = [
        [
            front["name"],
            front["method"],
            fmt_number(front["hypervolume"], 4) + fmt_interval(front.get("hypervolume_interval"), 2),
            f"{front['n_non_dominated']}/{len(front['points'])}",
            f"{front['collapse_rate']:.0%}",
            " ".join(
                f"{name}={fmt_number(value, 2)}{fmt_interval(front.get('steerability_interval', {}).get(name), 2)}"
                for name, value in front["steerability"].items()
            ),
        ]
        for front in fronts
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)
