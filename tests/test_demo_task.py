"""The embedded demo task: a deterministic corpus whose objectives conflict, pairs, held-out prompts, caching."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from moalign.demo.corpus import MAX_WORDS, build_corpus
from moalign.demo.task import DemoTask, prepare_task
from moalign.errors import MoalignError

# Small enough to score in seconds; the corpus of N samples is the first N samples of the full corpus.
N_SAMPLES = 1500
# All three scorers: the corpus is built so that every pair of them conflicts (the demo itself scores two).
SETTINGS = dict(
    n_samples=N_SAMPLES, progress=False, n_test=40, base_max_steps=3, objectives=("relevance", "vader", "brevity")
)


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> DemoTask:
    root = tmp_path_factory.mktemp("demo")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MOALIGN_CACHE", str(root / "cache"))  # score from scratch, not from the user's cache
        yield prepare_task(root / "task", **SETTINGS)


def question_of(prompt: str) -> str:
    """The question itself, without greeting and situation (no question template contains '. ')."""
    body = prompt.removeprefix("\n\nHuman: ").removesuffix("\n\nAssistant:")
    return body.rsplit(". ", 1)[-1]


def test_corpus_is_deterministic_and_well_formed():
    first, again, other = (
        build_corpus(300, n_test=20, seed=3),
        build_corpus(300, n_test=20, seed=3),
        build_corpus(300, n_test=20, seed=4),
    )
    assert first == again
    assert first.responses != other.responses
    assert len(first.prompts) == len(first.responses) == 300 and len(first.test_prompts) == 20
    for prompt, response in zip(first.prompts, first.responses):
        assert prompt.startswith("\n\nHuman: ") and prompt.endswith("\n\nAssistant:")
        assert response == response.strip() and 1 <= len(response.split()) <= MAX_WORDS
    assert first.texts()[0] == first.prompts[0] + " " + first.responses[0]
    # Several distinct responses per prompt: what preference pairs are made of.
    assert pd.Series(first.prompts).value_counts().min() >= 2


def test_objectives_conflict(task: DemoTask):
    found = task.conflicts()
    assert set(found["first_layer"]) == {"relevance/vader", "relevance/brevity", "vader/brevity"}
    assert all(size >= 10 for size in found["first_layer"].values()), found
    assert sum(rho < 0 for rho in found["spearman"].values()) >= 2, found


def test_pairs_prefer_the_higher_score(task: DemoTask):
    samples = task.samples().set_index(["prompt", "response"])
    assert set(task.pairs_paths) == set(task.names) == {"relevance", "vader", "brevity"}
    for name, path in task.pairs_paths.items():
        pairs = pd.read_json(path, lines=True)
        assert list(pairs.columns) == ["prompt", "chosen", "rejected"]
        assert len(pairs) > N_SAMPLES // 8, name
        chosen = samples.loc[list(zip(pairs["prompt"], pairs["chosen"])), name].to_numpy()
        rejected = samples.loc[list(zip(pairs["prompt"], pairs["rejected"])), name].to_numpy()
        assert (chosen - rejected >= 0.25 * samples[name].std() - 1e-9).all(), name


def test_test_prompts_ask_unseen_questions(task: DemoTask):
    train_prompts = set(task.samples()["prompt"])
    assert len(task.test_prompts) == 40
    assert not set(task.test_prompts) & train_prompts
    assert not {question_of(p) for p in task.test_prompts} & {question_of(p) for p in train_prompts}


def test_base_model_reloads_and_generates(task: DemoTask):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moalign.generation import SamplingParams, generate

    tokenizer = AutoTokenizer.from_pretrained(task.base_model)
    model = AutoModelForCausalLM.from_pretrained(task.base_model)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert 1000 < len(tokenizer) <= 3000
    text = task.test_prompts[0] + " Sure."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level BPE round-trips
    # Small signed integers (RiC's whole z-scores) are one token each, as in the tokenizers of real LMs.
    assert all(len(tokenizer.tokenize(f" {i}")) == 1 for i in range(-3, 4))
    completions = generate(model, tokenizer, task.test_prompts[:2], SamplingParams(max_new_tokens=8, seed=1))
    assert len(completions) == 2 and all(c.token_ids for c in completions)
    metrics = task.base_metrics
    assert metrics["steps"] == 3 and metrics["n_params"] == model.num_parameters()
    assert metrics["perplexity"] > 1 and 0 < metrics["distinct_2"] <= 1 and metrics["train_seconds"] > 0


def test_second_call_reuses_everything(task: DemoTask):
    files = [task.train_path, *task.pairs_paths.values(), task.base_model / "model.safetensors"]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = prepare_task(task.root, **SETTINGS)
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert again.test_prompts == task.test_prompts and again.base_metrics == task.base_metrics
    with pytest.raises(MoalignError, match="other settings"):
        prepare_task(task.root, **{**SETTINGS, "seed": 1})


def test_interrupted_build_redoes_only_what_is_missing(task: DemoTask, tmp_path: Path):
    root = tmp_path / "copy"
    shutil.copytree(task.root, root)
    (root / "task.json").unlink()  # as if the build stopped before its last step
    (root / "pairs" / "vader.jsonl").unlink()
    (root / ".samples.parquet.tmp").write_text("half-written")  # a leftover temporary file is ignored
    kept = [root / "samples.parquet", root / "pairs" / "relevance.jsonl", root / "base_model" / "model.safetensors"]
    stamps = [f.stat().st_mtime_ns for f in kept]
    rebuilt = prepare_task(root, **SETTINGS)
    assert [f.stat().st_mtime_ns for f in kept] == stamps
    assert rebuilt.pairs_paths["vader"].read_text() == task.pairs_paths["vader"].read_text()
