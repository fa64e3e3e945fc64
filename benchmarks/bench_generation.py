"""Tokens per second of moalign's generation engine: batched (64 prompts) against one prompt at a time, and
against transformers' own `generate` at the same batch and settings.

Evaluation generates for every prompt under every preference, so batching is what makes `moalign eval`
affordable; the goals are at least 10× the one-at-a-time rate and at least transformers' `generate`
(which cannot keep a row's output independent of its batch). The model is the embedded demo's base
model; sampling at temperature 1. Runs are interleaved and the best of each is kept (the machine is
shared).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench_methods import sibling

from moalign.generation import SamplingParams, generate, load_model

BATCH = 64


def model_and_prompts() -> tuple[Path, list[str]]:
    """The embedded demo's base model and its test prompts, repeated to one full batch."""
    from moalign.demo.task import prepare_task

    task = prepare_task()
    prompts = list(task.test_prompts)
    while len(prompts) < BATCH:
        prompts += prompts
    return Path(task.base_model), prompts[:BATCH]


def tokens_per_second(model, tokenizer, prompts, params, batch_size: int, repeats: int) -> tuple[float, int, float]:
    """Best of `repeats` runs (same seeds, so the same tokens): the machine is shared, the best is the cost."""
    best = (0.0, 0, 0.0)
    for _ in range(repeats):
        start = time.perf_counter()
        completions = generate(model, tokenizer, prompts, params, batch_size=batch_size)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for c in completions)
        best = max(best, (tokens / seconds, tokens, seconds))
    return best


def run(quick: bool) -> list[dict[str, Any]]:
    path, prompts = model_and_prompts()
    model, tokenizer = load_model(str(path), device="auto")
    transformers_generate = sibling("gpu").transformers_generate
    new_tokens = 16 if quick else 48
    n_single = 8 if quick else 16  # one-at-a-time is slow; its rate is stable after a few prompts
    repeats = 2 if quick else 3
    params = [SamplingParams(max_new_tokens=new_tokens, temperature=1.0, seed=i) for i in range(BATCH)]
    warm = [SamplingParams(max_new_tokens=4, seed=i) for i in range(BATCH)]
    generate(model, tokenizer, prompts, warm, batch_size=BATCH)  # warm-up: allocations, kernel choices
    generate(model, tokenizer, prompts[:2], warm[:2], batch_size=1)
    transformers_generate(model, tokenizer, prompts, 4)
    batched, single, theirs = (0.0, 0, 0.0), (0.0, 0, 0.0), (0.0, 0, 0.0)
    for _ in range(repeats):  # interleaved: a burst of load on the shared machine hits all three alike
        batched = max(batched, tokens_per_second(model, tokenizer, prompts, params, BATCH, 1))
        single = max(single, tokens_per_second(model, tokenizer, prompts[:n_single], params[:n_single], 1, 1))
        start = time.perf_counter()
        tokens = transformers_generate(model, tokenizer, prompts, new_tokens)
        seconds = time.perf_counter() - start
        theirs = max(theirs, (tokens / seconds, tokens, seconds))
    device = str(next(model.parameters()).device)
    size = sum(p.numel() for p in model.parameters())
    return [
        {
            "section": "generation",
            "metric": f"batched tokens/s (batch {BATCH})",
            "value": batched[0],
            "unit": "tokens/s",
            "baseline": single[0],
            "ratio": batched[0] / single[0],
            "note": f"{batched[1]} tokens in {batched[2]:.2f} s (best of {repeats}); goal ≥ 10× one-at-a-time",
        },
        {
            "section": "generation",
            "metric": f"batched vs transformers generate (batch {BATCH})",
            "value": batched[0],
            "unit": "tokens/s",
            "baseline": theirs[0],
            "ratio": batched[0] / theirs[0],
            "note": f"transformers: {theirs[1]} tokens in {theirs[2]:.2f} s (best of {repeats}); goal ≥ 1",
        },
        {
            "section": "generation",
            "metric": "one prompt at a time tokens/s",
            "value": single[0],
            "unit": "tokens/s",
            "note": f"{single[1]} tokens in {single[2]:.2f} s over {n_single} prompts (best of {repeats})",
        },
        {
            "section": "generation",
            "metric": "model",
            "value": size / 1e6,
            "unit": "M parameters",
            "note": f"demo base model; {device}; {new_tokens} new tokens, temperature 1",
        },
    ]
