"""The embedded demo task: a scored corpus, preference pairs, held-out prompts and a base model, all cached.

`prepare_task()` builds everything once (a few minutes on a laptop CPU, no downloads) and returns at once
afterwards. Each artifact is written under a temporary name and renamed when complete, and `task.json` is
written last, so an interrupted build resumes from the last finished step.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from moalign.errors import MoalignError
from moalign.run import atomic_write
from moalign.scores import cache_dir

log = logging.getLogger(__name__)

CORPUS_VERSION = "v9"  # bump when the corpus generator, the pairs or the base model recipe change
DEFAULT_OBJECTIVES = ("vader", "brevity")  # what the demo trains on; relevance (MiniLM) is scored where asked
DEFAULT_SAMPLES = 12000
MANIFEST = "task.json"
SPEC = "spec.json"


@dataclass
class DemoTask:
    """Paths and facts of a prepared demo task; everything lives under `root`."""

    root: Path
    objectives: list[str]  # specs of all scorers used; their names are the score columns
    train_path: Path  # samples.parquet: prompt, response, one score column per objective name
    pairs_paths: dict[str, Path]  # objective name -> pairs jsonl (prompt, chosen, rejected)
    test_prompts: list[str]
    base_model: Path  # save_pretrained folder of the base model
    base_metrics: dict  # perplexity, distinct_2, train_seconds, n_params, ...
    names: list[str] = field(default_factory=list)  # objective names, in the order of `objectives`
    test_path: Path | None = None  # test.jsonl: held-out prompt and one reference response
    timings: dict = field(default_factory=dict)  # seconds per build step

    def samples(self) -> pd.DataFrame:
        return pd.read_parquet(self.train_path)

    def conflicts(self) -> dict:
        """First-layer sizes and Spearman correlations of every pair of objectives on the training samples."""
        return conflicts(self.samples(), self.names or list(self.pairs_paths))


def conflicts(frame: pd.DataFrame, names: list[str]) -> dict:
    """How much the objectives disagree: per pair, distinct points on the first non-dominated layer and rho.

    Objectives that agreed would leave one or two points on the first layer and correlate positively; the
    demo needs a real front (many points) and negative correlations for multi-objective methods to matter.
    """
    from scipy.stats import spearmanr

    from moalign.pareto import non_dominated

    layers, rhos = {}, {}
    for a, b in itertools.combinations(names, 2):
        points = frame[[a, b]].to_numpy(dtype=float)
        front = points[non_dominated(points)]
        layers[f"{a}/{b}"] = int(len(np.unique(front, axis=0)))
        rhos[f"{a}/{b}"] = round(float(spearmanr(points[:, 0], points[:, 1]).statistic), 4)
    return {"first_layer": layers, "spearman": rhos}


def make_pairs(frame: pd.DataFrame, name: str, min_gap: float, max_per_prompt: int = 2, seed: int = 0) -> list[dict]:
    """Preference pairs for one objective: two responses to one prompt, chosen scores at least `min_gap` higher."""
    rng = random.Random(seed)
    pairs = []
    for prompt, group in frame.groupby("prompt", sort=True):
        rows = list(zip(group["response"], group[name]))
        candidates = [(x, y) for x, y in itertools.combinations(rows, 2) if abs(x[1] - y[1]) >= min_gap]
        for x, y in rng.sample(candidates, min(max_per_prompt, len(candidates))):
            chosen, rejected = (x, y) if x[1] > y[1] else (y, x)
            pairs.append({"prompt": prompt, "chosen": chosen[0], "rejected": rejected[0]})
    rng.shuffle(pairs)
    return pairs


def default_root(n_samples: int = DEFAULT_SAMPLES) -> Path:
    """cache_dir()/demo/VERSION for the default size, a sibling folder for any other size."""
    suffix = "" if n_samples == DEFAULT_SAMPLES else f"-n{n_samples}"
    return cache_dir() / "demo" / f"{CORPUS_VERSION}{suffix}"


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")

    atomic_write(path, write)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_task(root: str | Path) -> DemoTask:
    """The task a finished `prepare_task` left in `root`."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.exists():
        raise MoalignError(f"{root} holds no finished demo task; run prepare_task() (or `moalign demo`) first")
    manifest = json.loads(manifest_path.read_text())
    return DemoTask(
        root=root,
        objectives=manifest["objectives"],
        train_path=root / manifest["train_path"],
        pairs_paths={name: root / rel for name, rel in manifest["pairs_paths"].items()},
        test_prompts=[row["prompt"] for row in _read_jsonl(root / manifest["test_path"])],
        base_model=root / manifest["base_model"],
        base_metrics=json.loads((root / manifest["base_model"] / "metrics.json").read_text()),
        names=manifest["names"],
        test_path=root / manifest["test_path"],
        timings=manifest.get("timings", {}),
    )


def prepare_task(
    root: str | Path | None = None,
    n_samples: int = DEFAULT_SAMPLES,
    progress: bool = True,
    *,
    objectives: tuple[str, ...] | list[str] = DEFAULT_OBJECTIVES,
    n_test: int = 300,
    seed: int = 0,
    base_max_steps: int | None = None,
    min_gap_std: float = 0.25,
) -> DemoTask:
    """Build (or load from cache) the demo task: corpus, scores, pairs per objective, test prompts, base model.

    `base_max_steps` overrides the base model's training steps (tests use a handful); `min_gap_std` is the
    smallest score gap of a preference pair, in standard deviations of that objective.
    """
    if n_samples < 8:
        raise MoalignError(f"n_samples={n_samples}: the demo task needs at least 8 samples")
    root = Path(root) if root is not None else default_root(n_samples)
    spec = {
        "version": CORPUS_VERSION,
        "n_samples": n_samples,
        "objectives": list(objectives),
        "n_test": n_test,
        "seed": seed,
        "base_max_steps": base_max_steps,
        "min_gap_std": min_gap_std,
    }
    if (root / MANIFEST).exists() and json.loads((root / SPEC).read_text()) == spec:
        return load_task(root)
    root.mkdir(parents=True, exist_ok=True)
    if (root / SPEC).exists() and json.loads((root / SPEC).read_text()) != spec:
        raise MoalignError(
            f"{root} holds a demo task built with other settings ({(root / SPEC).read_text().strip()}); "
            "pass another root or delete that folder"
        )
    atomic_write(root / SPEC, lambda tmp: tmp.write_text(json.dumps(spec, indent=2)))
    timings: dict[str, float] = {}

    from moalign.demo.corpus import build_corpus

    start = time.monotonic()
    corpus = build_corpus(n_samples, n_test=n_test, seed=seed)
    timings["corpus_s"] = round(time.monotonic() - start, 2)
    log.info("demo corpus: %d samples, %d test prompts in %.1f s", len(corpus.prompts), n_test, timings["corpus_s"])

    test_path = root / "test.jsonl"
    if not test_path.exists():
        _write_jsonl(
            test_path, [{"prompt": p, "response": r} for p, r in zip(corpus.test_prompts, corpus.test_responses)]
        )

    train_path = root / "samples.parquet"
    if train_path.exists():
        frame = pd.read_parquet(train_path)
        names = [c for c in frame.columns if c not in {"prompt", "response"}]
    else:
        from moalign.demo.base_model import demo_threads
        from moalign.objectives import build_all
        from moalign.scores import ScoreCache, score

        start = time.monotonic()
        built = build_all(list(objectives))
        with demo_threads():
            cache = ScoreCache(cache_dir() / "scores.sqlite")
            scores = score(built, corpus.prompts, corpus.responses, cache=cache, progress=progress)
        timings["score_s"] = round(time.monotonic() - start, 2)
        log.info(
            "demo scores: %d samples x %d objectives in %.1f s", len(corpus.prompts), len(built), timings["score_s"]
        )
        frame = pd.DataFrame({"prompt": corpus.prompts, "response": corpus.responses, **scores})
        names = list(scores)
        atomic_write(train_path, lambda tmp: frame.to_parquet(tmp, index=False))

    start = time.monotonic()
    pairs_dir = root / "pairs"
    pairs_dir.mkdir(exist_ok=True)
    pairs_paths = {}
    for name in names:
        path = pairs_dir / f"{name}.jsonl"
        if not path.exists():
            gap = min_gap_std * float(frame[name].std())
            pairs = make_pairs(frame, name, gap, seed=seed)
            _write_jsonl(path, pairs)
            log.info("demo pairs for %s: %d (score gap >= %.3g)", name, len(pairs), gap)
        pairs_paths[name] = path
    timings["pairs_s"] = round(time.monotonic() - start, 2)

    base_dir = root / "base_model"
    if not (base_dir / "metrics.json").exists():
        from moalign.demo.base_model import train_base_model

        start = time.monotonic()
        train_base_model(
            corpus.texts(),
            base_dir,
            max_steps=base_max_steps,
            eval_prompts=corpus.test_prompts,
            eval_responses=corpus.test_responses,
            progress=progress,
        )
        timings["base_model_s"] = round(time.monotonic() - start, 2)

    manifest = {
        **spec,
        "names": names,
        "train_path": train_path.name,
        "pairs_paths": {name: str(path.relative_to(root)) for name, path in pairs_paths.items()},
        "test_path": test_path.name,
        "base_model": base_dir.name,
        "timings": timings,
        "conflicts": conflicts(frame, names),
    }
    atomic_write(root / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
    log.info("demo task ready in %s: %s", root, manifest["conflicts"])
    return load_task(root)
