"""The pairs a judge compares: (prompt, response_a, response_b), ids stable across runs."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from moalign import data
from moalign.errors import MoalignError


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: str
    response_a: str
    response_b: str
    human: str | None = None  # "A" or "B" where a person labelled the pair (chosen/rejected data)


def pair_id(prompt: str, response_a: str, response_b: str) -> str:
    """A content hash: the same pair has the same id in every run, whatever the row order."""
    return hashlib.sha1("\x00".join((prompt, response_a, response_b)).encode()).hexdigest()[:16]


def load_pairs(source: str, split: str = "train", max_samples: int | None = None) -> list[Pair]:
    """Pairs from (prompt, response_a, response_b) or (prompt, chosen, rejected) data (chosen becomes A)."""
    raw = data.load_raw(source, split)
    columns = set(raw.column_names)
    if {"prompt", "response_a", "response_b"} <= columns:
        dataset, first, second, human = raw, "response_a", "response_b", "human" if "human" in columns else None
    else:
        try:
            dataset = data.standardize(raw, source)
        except MoalignError:
            raise MoalignError(
                f"{source} has columns {sorted(columns)}; feedback needs 'prompt', 'response_a' and 'response_b', "
                "or 'prompt', 'chosen' and 'rejected'"
            ) from None
        if not data.is_pairs(dataset):
            raise MoalignError(f"{source} holds single responses; feedback needs pairs (chosen/rejected)")
        first, second, human = "chosen", "rejected", None
    dataset = data.head(dataset, max_samples)
    ids = [str(i) for i in dataset["id"]] if "id" in dataset.column_names else None
    pairs = []
    for index, row in enumerate(dataset):
        label = "A" if first == "chosen" else (row.get(human) if human else None)
        if label not in ("A", "B", None):
            raise MoalignError(f"{source}: column 'human' must hold 'A', 'B' or nothing, got {label!r}")
        pid = ids[index] if ids else pair_id(row["prompt"], row[first], row[second])
        pairs.append(Pair(pid, row["prompt"], row[first], row[second], label))
    if not pairs:
        raise MoalignError(f"{source} has no pairs")
    return pairs
