"""Preference pairs for MODPO's trained objective: from a pair dataset, from two-response rows and a choice
column, or built from scored samples."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import pandas as pd

from moalign import data
from moalign.errors import MoalignError
from moalign.methods.modpo.trainer import MARGIN_CHOSEN, MARGIN_REJECTED

log = logging.getLogger("moalign")


@dataclass
class PairArguments:
    """How preference pairs for the trained objective come out of the dataset."""

    objective_index: int = field(
        default=0, metadata={"help": "k: which of `objectives` the dataset's pairs express (0-based)"}
    )
    pairs_from: str | None = field(
        default=None,
        metadata={
            "help": "score column to build pairs from when the dataset holds scored samples (default: objective k)"
        },
    )
    pairs_min_gap: float = field(default=0.0, metadata={"help": "minimum score gap of a pair built from scores"})
    pair_choice_column: str | None = field(
        default=None,
        metadata={
            "help": "for response_0/response_1 datasets: the column naming the preferred one, e.g. safer_response_id"
        },
    )
    prompt_template: str = field(
        default="{prompt}", metadata={"help": "training prompt, e.g. 'USER: {prompt} ASSISTANT:'"}
    )


def pairs_from_scores(frame: pd.DataFrame, objective: str, min_gap: float = 0.0) -> pd.DataFrame:
    """Preference pairs from scored samples: per prompt, best with worst, second best with second worst, ...

    Nested pairs use every response at most once and come largest gap first; a pair needs a gap > 0 and
    ≥ `min_gap`. Returns prompt, chosen, rejected, chosen_score, rejected_score.
    """
    for column in ("prompt", "response", objective):
        if column not in frame.columns:
            raise MoalignError(
                f"cannot build pairs: the samples have no {column!r} column (have {sorted(frame.columns)})"
            )
    if min_gap < 0 or not math.isfinite(min_gap):
        raise MoalignError(f"pairs_min_gap must be a finite number ≥ 0, got {min_gap}")
    scores = pd.to_numeric(frame[objective], errors="coerce")
    if not np.isfinite(scores.to_numpy(dtype=float)).all():
        raise MoalignError(f"score column {objective!r} has NaN, infinite or non-numeric values")
    samples = pd.DataFrame({"prompt": frame["prompt"], "response": frame["response"], "score": scores})
    samples = samples.drop_duplicates(["prompt", "response"])
    rows = []
    for prompt, group in samples.groupby("prompt", sort=False):
        ranked = group.sort_values("score", ascending=False, kind="stable")
        responses, values = ranked["response"].tolist(), ranked["score"].tolist()
        for i in range(len(ranked) // 2):
            j = len(ranked) - 1 - i
            gap = values[i] - values[j]
            if gap <= 0 or gap < min_gap:
                break  # the gaps only shrink from here
            rows.append((prompt, responses[i], responses[j], values[i], values[j]))
    if not rows:
        raise MoalignError(f"no prompt has two responses whose {objective!r} scores differ by > 0 and ≥ {min_gap}")
    return pd.DataFrame(rows, columns=["prompt", "chosen", "rejected", "chosen_score", "rejected_score"])


def pairs_from_choice(dataset: datasets.Dataset, column: str) -> datasets.Dataset:
    """prompt/chosen/rejected from two-response rows (`response_0`, `response_1`) and the preferred one's id."""
    needed = {"prompt", "response_0", "response_1", column}
    if not needed <= set(dataset.column_names):
        raise MoalignError(f"pair_choice_column {column!r} needs columns {sorted(needed)}; have {dataset.column_names}")
    choice = np.asarray(dataset[column], dtype=int)
    if not np.isin(choice, (0, 1)).all():
        raise MoalignError(f"column {column!r} must hold 0 or 1 (the preferred response)")
    first, second = list(dataset["response_0"]), list(dataset["response_1"])
    return datasets.Dataset.from_dict(
        {
            "prompt": list(dataset["prompt"]),
            "chosen": [a if c == 0 else b for a, b, c in zip(first, second, choice)],
            "rejected": [b if c == 0 else a for a, b, c in zip(first, second, choice)],
        }
    )


def completion_text(response: str) -> str:
    """Training text is prompt + " " + response (the convention of moalign's data and SFT)."""
    return response if response[:1].isspace() else " " + response


def load_pairs(config: Any, names: Sequence[str]) -> datasets.Dataset:
    """The trained objective's pairs (prompt, chosen, rejected; raw responses, templated prompt)."""
    raw = data.load_raw(config.dataset, config.dataset_split)
    if config.pair_choice_column:
        raw = pairs_from_choice(raw, config.pair_choice_column)
    else:
        raw = data.standardize(raw, config.dataset)
    raw = data.head(raw, config.max_samples)
    if not data.is_pairs(raw):
        column = config.pairs_from or (names[config.objective_index] if names else None)
        if column is None:
            raise MoalignError("the dataset holds samples, not pairs: set pairs_from (a score column) or objectives")
        frame = raw.to_pandas()
        if column not in frame.columns and names and column == names[config.objective_index]:
            from moalign.methods.common import score_cache
            from moalign.objectives import build
            from moalign.scores import score

            objective = build(config.objectives[config.objective_index])
            frame[column] = score([objective], frame["prompt"], frame["response"], score_cache(config))[objective.name]
        pairs = pairs_from_scores(frame, column, config.pairs_min_gap)
        raw = datasets.Dataset.from_pandas(pairs[["prompt", "chosen", "rejected"]], preserve_index=False)
        log.info(f"built {len(raw)} pairs from the {column!r} scores")
    if "{prompt}" not in config.prompt_template:
        raise MoalignError(f"prompt_template {config.prompt_template!r} must contain {{prompt}}")
    prompts = [config.prompt_template.format(prompt=p) for p in raw["prompt"]]
    return datasets.Dataset.from_dict(
        {"prompt": prompts, "chosen": list(raw["chosen"]), "rejected": list(raw["rejected"])}
    )


def training_dataset(pairs: datasets.Dataset, margins: tuple[np.ndarray, np.ndarray] | None = None) -> datasets.Dataset:
    """The rows TRL tokenizes: responses with their leading space, plus the margin columns for MODPO."""
    columns: dict[str, list] = {
        "prompt": list(pairs["prompt"]),
        "chosen": [completion_text(r) for r in pairs["chosen"]],
        "rejected": [completion_text(r) for r in pairs["rejected"]],
    }
    if margins is not None:
        columns[MARGIN_CHOSEN] = np.asarray(margins[0], dtype=np.float32).tolist()
        columns[MARGIN_REJECTED] = np.asarray(margins[1], dtype=np.float32).tolist()
    return datasets.Dataset.from_dict(columns)


def pairs_settings(config: Any) -> dict[str, Any]:
    """What decides the pairs: kept in the manifest and in the margins' cache key."""
    return {
        "dataset": config.dataset,
        "split": config.dataset_split,
        "max_samples": config.max_samples,
        "pair_choice_column": config.pair_choice_column,
        "pairs_from": config.pairs_from,
        "pairs_min_gap": config.pairs_min_gap,
        "prompt_template": config.prompt_template,
    }
