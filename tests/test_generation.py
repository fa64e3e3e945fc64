"""Batched generation: left padding, stop strings, length limits, seeds and batch independence."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from moalign.generation import SamplingParams, generate, load_model
from moalign.testing import build_causal_lm

PROMPTS = ["the cat", "a good day is a sunny day with friends and", "cook the rice slowly", "travel"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@pytest.fixture
def lm(tiny_lm: Path):
    """The conftest's tiny GPT-2, loaded back from disk the way a run's model is."""
    return load_model(str(tiny_lm), device="cpu")


def sampled(seed: int, max_new_tokens: int = 12) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed)


def test_left_padding_matches_each_prompt_alone(lm):
    model, tokenizer = lm
    batch = generate(model, tokenizer, PROMPTS, GREEDY)
    for prompt, completion in zip(PROMPTS, batch):
        alone = generate(model, tokenizer, [prompt], GREEDY)[0]
        assert completion.token_ids == alone.token_ids
        assert completion.text == alone.text
        assert completion.prompt_tokens == len(tokenizer(prompt, add_special_tokens=False)["input_ids"])


@torch.inference_mode()
def test_temperature_zero_is_greedy(lm):
    model, tokenizer = lm
    prompt = PROMPTS[1]
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = []
    for _ in range(GREEDY.max_new_tokens):  # the plain loop: full forward, argmax, append
        token = int(model(input_ids=ids).logits[0, -1].argmax())
        if token == tokenizer.eos_token_id:
            break
        expected.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert generate(model, tokenizer, [prompt], GREEDY)[0].token_ids == expected
    reseeded = SamplingParams(max_new_tokens=12, temperature=0, seed=9)  # temperature 0 ignores the seed
    assert generate(model, tokenizer, [prompt], reseeded)[0].token_ids == expected


def test_stop_string_cuts_text_and_sets_finish_reason(lm):
    model, tokenizer = lm
    params = SamplingParams(max_new_tokens=20, temperature=0)
    # an ASCII answer, so that no half-decoded byte can match the stop string early
    prompt, full = next(
        (p, c.text)
        for p, c in zip(PROMPTS, generate(model, tokenizer, PROMPTS, params))
        if c.text.isascii() and len(c.text) > 6
    )
    stop = full[-3:]
    cut = generate(model, tokenizer, [prompt], SamplingParams(max_new_tokens=20, temperature=0, stop=[stop]))[0]
    assert cut.text == full[: full.find(stop)]
    assert stop not in cut.text
    assert cut.finish_reason == "stop"
    assert len(cut.token_ids) == len(cut.logprobs) <= len(tokenizer(full, add_special_tokens=False)["input_ids"])


def test_max_new_tokens_is_respected_per_row(lm):
    model, tokenizer = lm
    limits = [1, 3, 7, 5]
    rows = [SamplingParams(max_new_tokens=n, temperature=0) for n in limits]
    for completion, limit in zip(generate(model, tokenizer, PROMPTS, rows), limits):
        assert len(completion.token_ids) <= limit
        assert len(completion.logprobs) == len(completion.token_ids)
        if completion.finish_reason == "length":
            assert len(completion.token_ids) == limit


def test_same_seed_same_output(lm):
    model, tokenizer = lm
    rows = [sampled(seed) for seed in range(len(PROMPTS))]
    first = [c.token_ids for c in generate(model, tokenizer, PROMPTS, rows)]
    second = [c.token_ids for c in generate(model, tokenizer, PROMPTS, rows)]
    assert first == second
    other = [c.token_ids for c in generate(model, tokenizer, PROMPTS, [sampled(100 + s) for s in range(4)])]
    assert other != first  # the seed does steer sampling


def test_row_output_does_not_depend_on_its_batch(lm):
    model, tokenizer = lm
    alone = generate(model, tokenizer, [PROMPTS[1]], [sampled(7)])[0]
    neighbours = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3], PROMPTS[1]]
    rows = [sampled(1, 4), sampled(7), sampled(2, 20), sampled(3), sampled(8)]
    batch = generate(model, tokenizer, neighbours, rows, batch_size=4)
    assert batch[1].token_ids == alone.token_ids and batch[1].text == alone.text
    # across batch boundaries too: row 4 (in the second batch of size 4) equals its solo run
    assert batch[4].token_ids == generate(model, tokenizer, [PROMPTS[1]], [sampled(8)])[0].token_ids


def test_nucleus_and_full_rows_share_a_batch_without_changing_each_other(lm):
    """A top_p = 1 row draws from the unsorted distribution, a top_p < 1 row from the sorted nucleus: in one
    batch each still gives exactly what it gives alone."""
    model, tokenizer = lm
    full = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=5)
    nucleus = SamplingParams(max_new_tokens=8, temperature=1.0, top_p=0.5, seed=6)
    batch = generate(model, tokenizer, [PROMPTS[0], PROMPTS[2]], [full, nucleus])
    assert batch[0].token_ids == generate(model, tokenizer, [PROMPTS[0]], [full])[0].token_ids
    assert batch[1].token_ids == generate(model, tokenizer, [PROMPTS[2]], [nucleus])[0].token_ids


def test_streamed_tokens_join_to_each_rows_completion(lm):
    """The streaming hook: every row's pieces join to its token ids, in order, and it finishes exactly once,
    with row indices counted over the whole call (across batches)."""
    model, tokenizer = lm
    rows = [sampled(seed, max_new_tokens=3 + 2 * seed) for seed in range(len(PROMPTS))]
    streamed: dict[int, list[int]] = {i: [] for i in range(len(PROMPTS))}
    finished: list[int] = []

    def on_tokens(row: int, ids: list[int], done: bool) -> None:
        assert row not in finished  # nothing arrives after a row's last call
        streamed[row] += ids
        if done:
            finished.append(row)

    completions = generate(model, tokenizer, PROMPTS, rows, batch_size=3, on_tokens=on_tokens)
    assert sorted(finished) == list(range(len(PROMPTS)))
    assert [streamed[i] for i in range(len(PROMPTS))] == [c.token_ids for c in completions]


@pytest.fixture(scope="module")
def peaked_lm(tmp_path_factory):
    """A tiny GPT-2 whose next-token distribution is peaked (a scaled final layer norm): a sampler drawing at
    the wrong temperature or outside the nucleus then shows in a few thousand draws."""

    def sharpen(model, tokenizer) -> None:
        model.transformer.ln_f.weight.mul_(15.0)

    return load_model(str(build_causal_lm(tmp_path_factory.mktemp("peaked") / "lm", customize=sharpen)), device="cpu")


def target_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> np.ndarray:
    """softmax(logits / T) cut to the smallest set of top tokens whose mass reaches top_p, renormalised."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = probs.argsort(descending=True)
    before = probs[order].cumsum(0) - probs[order]
    kept = torch.zeros_like(probs)
    kept[order[before < top_p]] = probs[order[before < top_p]]
    return (kept / kept.sum()).numpy()


def chi_square_p(counts: Counter, expected: np.ndarray, n: int) -> float:
    """Pearson's test over tokens expected ≥ 5 times, the rest pooled in one bin (itself ≥ 5 or dropped)."""
    big = expected * n >= 5
    observed = [counts.get(int(i), 0) for i in np.flatnonzero(big)]
    wanted = list(expected[big] * n)
    rest_observed, rest_wanted = n - sum(observed), n - sum(wanted)
    if rest_wanted >= 5:
        observed.append(rest_observed)
        wanted.append(rest_wanted)
    return float(chisquare(observed, np.asarray(wanted) * sum(observed) / sum(wanted)).pvalue)


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.6, 1.0), (1.5, 1.0), (1.0, 0.6)])
@torch.inference_mode()
def test_sampler_draws_from_the_models_distribution(peaked_lm, temperature, top_p):
    """The first sampled token over 3000 seeds follows softmax(logits / T) within the top_p nucleus
    (chi-square), and the same draws reject the distribution at a neighbouring temperature."""
    model, tokenizer = peaked_lm
    n, prompt = 3000, "the cat"
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    logits = model(input_ids=ids).logits[0, -1]
    rows = [SamplingParams(max_new_tokens=1, temperature=temperature, top_p=top_p, seed=s) for s in range(n)]
    completions = generate(model, tokenizer, [prompt] * n, rows, batch_size=n)
    counts = Counter(c.token_ids[0] if c.token_ids else tokenizer.eos_token_id for c in completions)
    expected = target_distribution(logits, temperature, top_p)
    assert all(expected[token] > 0 for token in counts)  # nothing outside the nucleus, ever
    assert chi_square_p(counts, expected, n) > 1e-3
    assert chi_square_p(counts, target_distribution(logits, temperature * 1.25, top_p), n) < 1e-6


def test_static_cache_decoding_gives_what_dynamic_decoding_gives(lm, monkeypatch):
    """The GPU's decode path (a static KV cache, fixed shapes, finished rows kept but no longer read) run on
    the CPU without compiling: the same tokens and log-probabilities as the CPU's dynamic path."""
    model, tokenizer = lm
    rows = [sampled(1, 4), sampled(7), SamplingParams(max_new_tokens=9, temperature=0), sampled(3, 20)]
    dynamic = generate(model, tokenizer, PROMPTS, rows)
    monkeypatch.setattr("moalign.generation.static_decoding", lambda device: True)
    static = generate(model, tokenizer, PROMPTS, rows)
    assert [c.token_ids for c in static] == [c.token_ids for c in dynamic]
    assert [c.finish_reason for c in static] == [c.finish_reason for c in dynamic]
    for a, b in zip(static, dynamic):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
