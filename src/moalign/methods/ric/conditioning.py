"""RiC's mathematics (Yang et al., ICML 2024): rewards written into the prompt, a preference mapped to desired
rewards, and multi-objective rejection sampling (MORS). One function each, for training and inference alike."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moalign import data
from moalign.errors import MoalignError
from moalign.pareto import validate_weights

MAPPINGS = ("linf", "l2", "linear", "quantile")

# The quantile mapping's table of the training scores: 1001 levels keep the tails within a 0.1% quantile step
# (a 101-level table read the top 1% as one straight line, up to 1.3 z off on the demo task).
QUANTILE_LEVELS = np.linspace(0.0, 1.0, 1001)


# --- the reward-in-context prompt -------------------------------------------------------------------------


@dataclass
class RewardTemplate:
    """How desired rewards are written into a prompt: `<tag> 1.3 <tag2> -0.4` before the assistant turn."""

    tags: list[str]
    number_format: str = "{:.1f}"
    assistant: str = data.ASSISTANT

    def render(self, value: float) -> str:
        text = self.number_format.format(value)
        # A value that rounds to zero is written as zero is, whatever its sign: "-0" and "0" are one prompt.
        return self.number_format.format(0.0) if float(text) == 0 else text


def format_prompt(prompt: str, rewards: np.ndarray | list[float], template: RewardTemplate) -> str:
    """`"...Human: q\\n\\nAssistant:"` → `"...Human: q <r1> 1.3 <r2> -0.4 \\n\\nAssistant:"`.

    The suffix is removed with `removesuffix` (never `rstrip`, which eats characters, not a suffix).
    """
    if len(rewards) != len(template.tags):
        raise MoalignError(f"{len(rewards)} rewards for {len(template.tags)} reward tags")
    body = prompt.removesuffix(template.assistant)
    tags = " ".join(f"{tag} {template.render(float(value))}" for tag, value in zip(template.tags, rewards))
    suffix = template.assistant if body != prompt else ""
    return f"{body} {tags} {suffix}" if suffix else f"{body} {tags}"


def parse_prompt(text: str, template: RewardTemplate) -> tuple[str, list[float]]:
    """The inverse of `format_prompt` (rewards as rounded in the text)."""
    had_assistant = text.endswith(" " + template.assistant)
    body = text.removesuffix(" " + template.assistant) if had_assistant else text
    values: list[float] = []
    for tag in reversed(template.tags):
        head, sep, number = body.rpartition(f" {tag} ")
        if not sep:
            raise MoalignError(f"prompt has no reward tag {tag!r}")
        values.append(float(number))
        body = head
    return body + (template.assistant if had_assistant else ""), values[::-1]


# --- preference → desired rewards (the paper's eq. 3 is linf) ---------------------------------------------


def preference_to_targets(
    weights: np.ndarray | list[float],
    low: np.ndarray | list[float],
    high: np.ndarray | list[float],
    method: str = "linf",
    quantiles: np.ndarray | None = None,
) -> np.ndarray:
    """The desired normalised reward per objective for a preference (before rounding).

    linf (the paper's rule): high_i if w_i ≥ 1/N, else low_i + N·w_i·(high_i − low_i)
    l2 (the reference evaluation script): low + w_i/‖w‖₂·(high − low)
    linear: low + w_i·(high − low)
    quantile: the linf level N·w_i (capped at 1) read through the empirical quantile function of the
    training scores; `quantiles` is a (levels × N) table at evenly spaced levels from 0 to 1.
    """
    low_a, high_a = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    w = validate_weights(weights, low_a.size)
    n = w.size
    level = np.where(w >= 1.0 / n - 1e-9, 1.0, n * w)
    if method == "linf":
        return low_a + level * (high_a - low_a)
    if method == "l2":
        return low_a + w / np.linalg.norm(w) * (high_a - low_a)
    if method == "linear":
        return low_a + w * (high_a - low_a)
    if method == "quantile":
        if quantiles is None:
            raise MoalignError("the quantile mapping needs the training scores' quantile table")
        table = np.asarray(quantiles, dtype=float)
        levels = np.linspace(0.0, 1.0, len(table))  # runs written with a coarser table read it as it is
        return np.array([np.interp(level[i], levels, table[:, i]) for i in range(n)])
    raise MoalignError(f"unknown preference mapping {method!r}; choose one of {', '.join(MAPPINGS)}")


def mapping_settings(template: RewardTemplate, mapping: str, z: np.ndarray) -> dict:
    """What a RiC policy needs to turn a preference into a prompt, from the training data's z-scores: the
    template, the mapping, each objective's range, and the quantile table of the `quantile` mapping."""
    from dataclasses import asdict

    return {
        "template": asdict(template),
        "mapping": mapping,
        "low": z.min(axis=0).tolist(),
        "high": z.max(axis=0).tolist(),
        "quantiles": np.quantile(z, QUANTILE_LEVELS, axis=0).tolist(),
    }


# --- multi-objective rejection sampling ---------------------------------------------------------------------


def sample_targets(n: int, low: np.ndarray, high: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """MORS targets: draw every objective uniformly in [low, high], then raise all but the lowest to high.

    "Lowest" compares positions within each objective's range, so this is the image of the linf mapping.
    """
    low_a, high_a = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
    position = rng.uniform(size=(n, low_a.size))
    keep = position.argmin(axis=1)
    level = np.ones_like(position)
    level[np.arange(n), keep] = position[np.arange(n), keep]
    return low_a + level * (high_a - low_a)


def mors_filter(scores: np.ndarray, q: float = 0.7) -> np.ndarray:
    """Keep a sample if any objective is at or above that objective's q-quantile within the batch."""
    matrix = np.asarray(scores, dtype=float)
    if not 0.0 <= q <= 1.0:
        raise MoalignError(f"the MORS quantile must be in [0, 1], got {q}")
    if len(matrix) == 0:
        return np.zeros(0, dtype=bool)
    return (matrix >= np.quantile(matrix, q, axis=0)).any(axis=1)
