"""A candidate-set task: prompts, each with K fixed candidate responses scored by N objectives.

Built from the embedded demo task's generator and objectives: the same kind of prompts and answer styles, the
same lexical scorers, the demo base model as π_ref. Rewards are z-scores over all candidates (one mean and
standard deviation per objective), so a weight vector and β mean the same for every objective.

What the methods train on, drawn from the task with a seed:
- `samples()`: every candidate with its rewards (SFT, RiC, ParetoHqD read scored samples);
- `pairs(k)`: every pair of a prompt's candidates, labelled by the Bradley–Terry model of objective k,
  P(a ≻ b) = σ(r_k(a) − r_k(b)), with the other objectives' rewards as MODPO's margins. Under exactly this
  labelling the MODPO (and, for w = e_k, DPO) optimum is π*_w over the candidates.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moalign.errors import MoalignError
from moalign.run import atomic_write_text

TASK_FILE = "candidates.json"


@dataclass
class CandidateTask:
    prompts: list[str]
    candidates: list[list[str]]  # K responses per prompt
    rewards: np.ndarray  # P×K×N z-scores
    names: list[str]  # objective names, the order of the rewards' last axis
    raw_mean: list[float]  # the z-score statistics over all candidates, to map back to raw scores
    raw_std: list[float]

    def __post_init__(self) -> None:
        self.rewards = np.asarray(self.rewards, dtype=float)
        p, k, n = self.rewards.shape
        if p != len(self.prompts) or any(len(c) != k for c in self.candidates) or n != len(self.names):
            raise MoalignError(f"candidate task: rewards {self.rewards.shape} do not match prompts and candidates")
        if k < 2 or n < 2:
            raise MoalignError(f"candidate task needs K ≥ 2 candidates and N ≥ 2 objectives, got K={k}, N={n}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.rewards.shape  # type: ignore[return-value]

    def samples(self) -> pd.DataFrame:
        """prompt, response and one z-scored reward column per objective: every candidate once."""
        p, k, _ = self.shape
        frame = pd.DataFrame(
            {
                "prompt": [x for x in self.prompts for _ in range(k)],
                "response": [y for row in self.candidates for y in row],
            }
        )
        for i, name in enumerate(self.names):
            frame[name] = self.rewards[:, :, i].reshape(-1)
        return frame

    def pairs(self, k: int, seed: int = 0, draws: int = 1) -> pd.DataFrame:
        """Every candidate pair of every prompt, `draws` Bradley–Terry labels each from objective k's reward.

        Columns: prompt, chosen, rejected, margin_chosen, margin_rejected (the other objectives' rewards, in
        objective order without k: MODPO's margin columns)."""
        if not 0 <= k < len(self.names):
            raise MoalignError(f"objective index {k} is out of range for {len(self.names)} objectives")
        rng = np.random.default_rng(seed)
        others = [i for i in range(len(self.names)) if i != k]
        rows = []
        for x, prompt in enumerate(self.prompts):
            r = self.rewards[x]
            for a, b in itertools.combinations(range(len(self.candidates[x])), 2):
                p_a = 1.0 / (1.0 + np.exp(r[b, k] - r[a, k]))
                for _ in range(draws):
                    win, lose = (a, b) if rng.random() < p_a else (b, a)
                    rows.append(
                        {
                            "prompt": prompt,
                            "chosen": self.candidates[x][win],
                            "rejected": self.candidates[x][lose],
                            "margin_chosen": r[win, others].tolist(),
                            "margin_rejected": r[lose, others].tolist(),
                        }
                    )
        order = rng.permutation(len(rows))
        return pd.DataFrame([rows[i] for i in order])

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / TASK_FILE
        content = {
            "names": self.names,
            "prompts": self.prompts,
            "candidates": self.candidates,
            "rewards": self.rewards.round(8).tolist(),
            "raw_mean": self.raw_mean,
            "raw_std": self.raw_std,
        }
        atomic_write_text(path, json.dumps(content) + "\n")
        return path


def load_candidate_task(directory: str | Path) -> CandidateTask:
    path = Path(directory) / TASK_FILE
    if not path.exists():
        raise MoalignError(f"{directory} holds no candidate task ({TASK_FILE}); build one with build_candidate_task")
    content = json.loads(path.read_text())
    return CandidateTask(**content)


def task_from_scores(
    prompts: Sequence[str], candidates: Sequence[Sequence[str]], raw: dict[str, Sequence[float]]
) -> CandidateTask:
    """A task from raw scores (one flat list per objective, candidates of a prompt consecutive), z-scored."""
    names = list(raw)
    p, k = len(prompts), len(candidates[0])
    matrix = np.stack([np.asarray(raw[name], dtype=float) for name in names], axis=-1)
    if not np.isfinite(matrix).all():
        raise MoalignError("candidate scores hold NaN or infinite values")
    mean, std = matrix.mean(axis=0), matrix.std(axis=0)
    if (std == 0).any():
        raise MoalignError(f"objective {names[int(np.argmin(std))]} gives every candidate the same score")
    z = ((matrix - mean) / std).reshape(p, k, len(names))
    return CandidateTask(list(prompts), [list(c) for c in candidates], z, names, mean.tolist(), std.tolist())


def build_candidate_task(
    n_prompts: int = 48, k: int = 12, objectives: Sequence[str] = ("vader", "brevity"), seed: int = 1
) -> CandidateTask:
    """Prompts from the demo corpus generator, each with `k` distinct candidates, scored by `objectives`.

    The seed differs from the demo corpus's (0), so the questions and situations are new to the base model."""
    from moalign.demo.corpus import build_corpus
    from moalign.objectives import build_all
    from moalign.scores import score

    if n_prompts < 1 or not 2 <= k <= 64:
        raise MoalignError(f"need n_prompts ≥ 1 and 2 ≤ k ≤ 64, got n_prompts={n_prompts}, k={k}")
    # A few spare prompts: the generator occasionally cannot find k distinct responses for one.
    corpus = build_corpus((n_prompts + 8) * k, n_test=1, responses_per_prompt=k, seed=seed)
    grouped: dict[str, list[str]] = {}
    for prompt, response in zip(corpus.prompts, corpus.responses):
        grouped.setdefault(prompt, []).append(response)
    chosen = [(p, r) for p, r in grouped.items() if len(r) == k][:n_prompts]
    if len(chosen) < n_prompts:
        raise MoalignError(f"the demo generator gave only {len(chosen)} prompts with {k} distinct candidates")
    prompts = [p for p, _ in chosen]
    candidates = [r for _, r in chosen]
    built = build_all(list(objectives))
    flat_prompts = [p for p in prompts for _ in range(k)]
    raw = score(built, flat_prompts, [y for row in candidates for y in row], progress=False)
    return task_from_scores(prompts, candidates, raw)
