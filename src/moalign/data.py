"""Loading datasets (hub or local files) into moalign's standard columns.

Standard shapes: samples (`prompt`, `response`) or pairs (`prompt`, `chosen`, `rejected`). HH-RLHF's raw
`chosen`/`rejected` dialogues are split at the last "Assistant:" turn into a shared prompt and responses.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import datasets

from moalign.errors import MoalignError, first_line

# The turn markers of Anthropic's HH dialogues, the format the papers' data and moalign's demo use.
HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
TURN_MARKERS = [HUMAN, ASSISTANT]  # stop strings: a turn the model invents is not part of its answer
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def split_dialogue(text: str) -> tuple[str, str]:
    """Split an HH-style dialogue at its last assistant turn: (prompt ending in 'Assistant:', response)."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise MoalignError("a dialogue has no '\\n\\nAssistant:' turn; give a 'prompt' column instead")
    end = cut + len(ASSISTANT)
    return text[:end], text[end:].removeprefix(" ")


def _looks_local(source: str) -> bool:
    return os.path.exists(source) or source.startswith((".", "/", "~")) or Path(source).suffix in LOCAL_FORMATS


def load_raw(source: str, split: str = "train", subset: str | None = None) -> datasets.Dataset:
    """Load a dataset from a local file or folder, or from the hub (cache only when offline)."""
    if _looks_local(source):
        path = Path(source).expanduser()
        if not path.exists():
            raise MoalignError(f"dataset path {source} does not exist")
        if path.is_dir() and (path / "dataset_info.json").exists():
            return datasets.load_from_disk(str(path))
        if path.is_dir():
            return datasets.load_dataset(str(path), split=split)
        if path.suffix not in LOCAL_FORMATS:
            raise MoalignError(f"dataset {source}: use a .json, .jsonl, .csv or .parquet file")
        if path.stat().st_size == 0:
            raise MoalignError(f"dataset {source} is empty")
        bars = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()  # a local file loads in a blink: no bar on the terminal
        try:
            return datasets.load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as error:  # a corrupt file fails deep inside datasets/pyarrow: say which file, once
            cause = error.__cause__ or error
            if "corresponds to no data" in str(cause):  # a header and no rows
                raise MoalignError(f"dataset {source} has no rows") from None
            raise MoalignError(f"cannot read dataset {source} ({type(cause).__name__}: {first_line(cause)})") from None
        finally:
            if bars:
                datasets.enable_progress_bars()
    try:
        return datasets.load_dataset(source, subset, split=split)
    except Exception as error:  # the hub client raises many types; the user needs one line
        raise MoalignError(f"cannot load dataset {source!r} ({first_line(error)})") from None


def check_text_columns(dataset: datasets.Dataset, columns: Sequence[str], source: str = "dataset") -> None:
    """Every value of the text columns is a string: a null or a number would fail later, far from its cause."""
    if len(dataset) == 0:
        raise MoalignError(f"{source} has no rows")
    for column in columns:
        values = dataset[column]
        if missing := sum(value is None for value in values):
            raise MoalignError(f"column {column!r} of {source} has {missing} empty (null) values; fill or drop them")
        wrong = [value for value in values if not isinstance(value, str)]
        if wrong:
            raise MoalignError(
                f"column {column!r} of {source} must hold text, found {type(wrong[0]).__name__} {wrong[0]!r}"
            )


def standardize(dataset: datasets.Dataset, source: str = "dataset") -> datasets.Dataset:
    """Return the dataset with standard columns: (prompt, response) or (prompt, chosen, rejected)."""
    columns = set(dataset.column_names)
    for shape in (("prompt", "chosen", "rejected"), ("prompt", "response")):
        if set(shape) <= columns:
            check_text_columns(dataset, shape, source)
            return dataset
    if {"chosen", "rejected"} <= columns:
        check_text_columns(dataset, ("chosen", "rejected"), source)

        def split_pair(row):
            prompt, chosen = split_dialogue(row["chosen"])
            _, rejected = split_dialogue(row["rejected"])
            # When the two dialogues diverge before the last turn, keep the chosen one's context.
            return {"prompt": prompt, "chosen": chosen, "rejected": rejected}

        return dataset.map(split_pair, desc="splitting dialogues")
    raise MoalignError(
        f"{source} has columns {sorted(columns)}; it needs 'prompt' and 'response', "
        "or 'prompt', 'chosen' and 'rejected' (or HH-RLHF's 'chosen' and 'rejected' dialogues)"
    )


def load(source: str, split: str = "train", subset: str | None = None) -> datasets.Dataset:
    return standardize(load_raw(source, split, subset), source)


def head(dataset: datasets.Dataset, max_samples: int | None) -> datasets.Dataset:
    """The first `max_samples` rows (all of them when None or 0)."""
    return dataset.select(range(min(max_samples, len(dataset)))) if max_samples else dataset


def is_pairs(dataset: datasets.Dataset) -> bool:
    return {"chosen", "rejected"} <= set(dataset.column_names)


def to_samples(dataset: datasets.Dataset) -> tuple[list[str], list[str]]:
    """Every (prompt, response) sample: both the chosen and the rejected response of a pair count."""
    if is_pairs(dataset):
        prompts = list(dataset["prompt"])
        return prompts + prompts, list(dataset["chosen"]) + list(dataset["rejected"])
    return list(dataset["prompt"]), list(dataset["response"])


_WORD = re.compile(r"\S+")


def is_degenerate(text: str, min_words: int = 3) -> bool:
    """Whether a response has collapsed: empty, under `min_words` words, or repetitive.

    Repetitive means fewer than half of its word bigrams are distinct, or some word trigram occurs
    3 times or more; reward hacking and mode collapse show up as exactly these outputs.
    """
    words = _WORD.findall(text.lower())
    if len(words) < max(1, min_words):
        return True
    if len(words) < 2:
        return False
    bigrams = list(zip(words, words[1:]))
    if len(set(bigrams)) / len(bigrams) < 0.5:
        return True
    trigrams = Counter(zip(words, words[1:], words[2:]))
    return bool(trigrams) and max(trigrams.values()) >= 3
