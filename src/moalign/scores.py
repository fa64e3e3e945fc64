"""Scoring a dataset once, a persistent score cache, and the normalisation statistics saved with a run."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from moalign import data
from moalign.errors import MoalignError
from moalign.objectives import Objective, build_all
from moalign.run import atomic_write_parquet, guard_output

QUANTILES = (0.05, 0.1, 0.25, 0.5, 0.7, 0.75, 0.9, 0.95)


def cache_dir() -> Path:
    """Where moalign keeps caches: $MOALIGN_CACHE, else ~/.cache/moalign."""
    root = os.environ.get("MOALIGN_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "moalign"
    )
    return Path(root)


class ScoreCache:
    """Scores keyed by (objective, prompt, response) in SQLite: the same text is never scored twice."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = str(path) if path is not None else ":memory:"
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, value REAL)")

    @staticmethod
    def key(objective: Objective, prompt: str, response: str) -> str:
        text = "\x00".join((objective.cache_key, prompt, response))
        return hashlib.sha1(text.encode()).hexdigest()

    def get(self, keys: list[str]) -> dict[str, float]:
        found: dict[str, float] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self.db.execute(f"SELECT key, value FROM scores WHERE key IN ({marks})", chunk))
        return found

    def put(self, items: dict[str, float]) -> None:
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO scores VALUES (?, ?)", items.items())


def score(
    objectives: Sequence[Objective],
    prompts: Sequence[str],
    responses: Sequence[str],
    cache: ScoreCache | None = None,
    batch_size: int = 256,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Score every sample with every objective, in batches, skipping what the cache already holds."""
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise MoalignError(f"{len(prompts)} prompts but {len(responses)} responses")
    cache = cache if cache is not None else ScoreCache()
    results: dict[str, np.ndarray] = {}
    for objective in objectives:
        keys = [ScoreCache.key(objective, p, r) for p, r in zip(prompts, responses)]
        known = cache.get(keys)
        todo = [i for i, k in enumerate(keys) if k not in known]
        values = np.array([known.get(k, np.nan) for k in keys], dtype=float)
        # closed on an error too, so the error starts a line of its own
        with tqdm(total=len(todo), desc=f"scoring {objective.name}", disable=not progress or not todo) as bar:
            for start in range(0, len(todo), batch_size):
                index = todo[start : start + batch_size]
                batch = objective.score([prompts[i] for i in index], [responses[i] for i in index])
                values[index] = batch
                cache.put({keys[i]: float(v) for i, v in zip(index, batch)})
                bar.update(len(index))
        results[objective.name] = values
    return results


@dataclass
class NormStats:
    """Per-objective statistics of the training scores; saved in the run's manifest and reused."""

    names: list[str]
    mean: list[float]
    std: list[float]
    min: list[float]
    max: list[float]
    quantiles: dict[str, list[float]] = field(default_factory=dict)

    @classmethod
    def fit(cls, scores: dict[str, np.ndarray] | pd.DataFrame, names: Sequence[str]) -> NormStats:
        matrix = np.column_stack([np.asarray(scores[name], dtype=float) for name in names])
        return cls(
            names=list(names),
            mean=matrix.mean(axis=0).tolist(),
            std=np.maximum(matrix.std(axis=0), 1e-8).tolist(),
            min=matrix.min(axis=0).tolist(),
            max=matrix.max(axis=0).tolist(),
            quantiles={f"{q:g}": np.quantile(matrix, q, axis=0).tolist() for q in QUANTILES},
        )

    def matrix(self, scores: dict[str, np.ndarray] | pd.DataFrame) -> np.ndarray:
        return np.column_stack([np.asarray(scores[name], dtype=float) for name in self.names])

    def zscore(self, raw: np.ndarray) -> np.ndarray:
        return (np.asarray(raw, dtype=float) - np.asarray(self.mean)) / np.asarray(self.std)

    def minmax(self, raw: np.ndarray) -> np.ndarray:
        span = np.maximum(np.asarray(self.max) - np.asarray(self.min), 1e-12)
        return (np.asarray(raw, dtype=float) - np.asarray(self.min)) / span

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> NormStats:
        return cls(**values)


def score_dataset(
    source: str,
    objective_specs: Sequence[str | dict] | str,
    split: str = "train",
    cache: ScoreCache | None = None,
    limit: int | None = None,
) -> pd.DataFrame:
    """Load a dataset and return one row per sample with a score column per objective."""
    objectives = build_all(objective_specs)
    dataset = data.load(source, split)
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    prompts, responses = data.to_samples(dataset)
    frame = pd.DataFrame({"prompt": prompts, "response": responses})
    if data.is_pairs(dataset):
        half = len(dataset)
        frame["pair"] = list(range(half)) * 2
        frame["preferred"] = [True] * half + [False] * half
    for name, values in score(objectives, prompts, responses, cache).items():
        frame[name] = values
    return frame


@dataclass
class ScoreConfig:
    """`moalign score`: every sample of a dataset scored once by every objective, into a parquet file."""

    dataset: str | None = field(default=None, metadata={"help": "hub id or local .json/.jsonl/.csv/.parquet"})
    objectives: str | None = field(default=None, metadata={"help": "comma-separated specs, e.g. vader,brevity"})
    output: str | None = field(default=None, metadata={"help": "parquet file to write"})
    split: str = "train"
    limit: int | None = field(default=None, metadata={"help": "score only the first N rows"})
    cache: str | None = field(default=None, metadata={"help": "SQLite score cache (default: the user cache)"})
    overwrite: bool = False


def cli(argv: list[str]) -> None:
    from moalign.methods.config import parse_config

    args = parse_config(ScoreConfig, argv, required=("dataset", "objectives", "output"), prog="moalign score")
    output = guard_output(args.output, args.overwrite)
    if output.suffix != ".parquet":
        raise MoalignError(f"--output {output} must end in .parquet")
    if args.limit is not None and args.limit < 1:
        raise MoalignError(f"--limit must be ≥ 1 (rows to score), got {args.limit}")
    cache = ScoreCache(args.cache or cache_dir() / "scores.sqlite")
    frame = score_dataset(args.dataset, args.objectives, args.split, cache, args.limit)
    atomic_write_parquet(frame, output)
    names = [c for c in frame.columns if c not in {"prompt", "response", "pair", "preferred"}]
    stats = NormStats.fit(frame, names)
    print(f"scored {len(frame)} samples -> {output}")
    for i, name in enumerate(names):
        print(
            f"  {name:<14} mean {stats.mean[i]:9.4f}  std {stats.std[i]:9.4f}  "
            f"min {stats.min[i]:9.4f}  max {stats.max[i]:9.4f}"
        )
