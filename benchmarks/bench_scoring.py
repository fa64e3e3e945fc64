"""Samples per second of the `hf:` reward-model objective with and without length-sorted batches.

Generated responses vary a lot in length; unsorted batches pad every text to the longest in its batch,
so sorting by length first (`sort=true`, the default) should score the same texts faster at the same
batch size. The model is a small GPT-2 classifier built here and loaded back like a hub model.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moalign.objectives import build

BATCH = 16


def vocabulary(size: int = 800) -> list[str]:
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    return sorted({"".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(size)})


def tiny_classifier(directory: Path, words: list[str]) -> Path:
    """GPT-2 sequence classifier (n_embd 256, 4 layers) with a word-level tokenizer: 1 word = 1 token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2ForSequenceClassification, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(vocab),
        n_positions=1024,
        n_embd=256,
        n_layer=4,
        n_head=4,
        num_labels=1,
        pad_token_id=1,
        bos_token_id=1,
        eos_token_id=1,
    )
    GPT2ForSequenceClassification(config).save_pretrained(directory)
    return directory


def texts(words: list[str], n: int) -> tuple[list[str], list[str]]:
    """Prompts of 5–15 words and responses of 10–400 words, in random order (as generated data is)."""
    rng = random.Random(1)
    prompts = [" ".join(rng.choices(words, k=rng.randint(5, 15))) for _ in range(n)]
    responses = [" ".join(rng.choices(words, k=rng.randint(10, 400))) for _ in range(n)]
    return prompts, responses


def best_rates(specs: list[str], prompts: list[str], responses: list[str], repeats: int):
    """Samples/s of each spec, best of `repeats` interleaved rounds (first-seen shapes cost extra on CPU)."""
    objectives = [build(spec) for spec in specs]
    rates = [0.0] * len(specs)
    scores: list[np.ndarray] = [np.zeros(0)] * len(specs)
    for _ in range(repeats):
        for i, objective in enumerate(objectives):
            start = time.perf_counter()
            scores[i] = objective.score(prompts, responses)
            rates[i] = max(rates[i], len(responses) / (time.perf_counter() - start))
    return rates, scores


def run(quick: bool) -> list[dict[str, Any]]:
    n, repeats = (96, 2) if quick else (192, 3)
    words = vocabulary()
    prompts, responses = texts(words, n)
    with tempfile.TemporaryDirectory() as tmp:
        path = tiny_classifier(Path(tmp) / "rm", words)
        specs = [f"hf:{path}?sort={flag}&batch_size={BATCH}" for flag in ("true", "false")]
        (sorted_rate, plain_rate), (sorted_scores, plain_scores) = best_rates(specs, prompts, responses, repeats)
    agree = float(np.abs(sorted_scores - plain_scores).max())
    note = f"{n} texts of 10–400 words, batch {BATCH}, n_embd 256 × 4 layers, best of {repeats}"
    return [
        {
            "section": "scoring",
            "metric": "hf objective, length-sorted batches",
            "value": sorted_rate,
            "unit": "samples/s",
            "baseline": plain_rate,
            "ratio": sorted_rate / plain_rate,
            "note": note,
        },
        {
            "section": "scoring",
            "metric": "hf objective, input order",
            "value": plain_rate,
            "unit": "samples/s",
            "note": note,
        },
        {
            "section": "scoring",
            "metric": "max |score difference| sorted vs unsorted",
            "value": agree,
            "unit": "",
            "note": "padding must not change a score (right padding, last real token)",
        },
    ]
