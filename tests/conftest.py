"""Shared fixtures: tiny Hugging Face models built on the spot and saved like real ones."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

CORPUS = [
    "the cat sat on the mat and was happy",
    "a good day is a sunny day with friends",
    "the weather is bad and the road is closed",
    "cook the rice slowly and add some salt",
    "travel light and keep your passport safe",
    "great question, I love to help you today",
    "plants need water, light and good soil",
    "the computer is slow because the disk is full",
]


def build_tokenizer(directory: Path, texts=CORPUS, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on `texts`, saved as a PreTrainedTokenizerFast."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    extra = ["\n\nHuman: what should I do?\n\nAssistant: <rm> 1.0 -0.5"]
    bpe.train_from_iterator(list(texts) + extra, vocab_size=vocab_size, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def build_causal_lm(directory: Path, seed: int = 0, n_embd: int = 32, n_layer: int = 2) -> Path:
    """A tiny GPT-2 causal LM with its tokenizer, saved to `directory`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def build_classifier(directory: Path, seed: int = 0, num_labels: int = 1) -> Path:
    """A tiny GPT-2 sequence-classification model with its tokenizer, saved to `directory`."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        num_labels=num_labels,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2ForSequenceClassification(config).save_pretrained(directory)
    return directory


@pytest.fixture
def tiny_lm(tmp_path: Path) -> Path:
    return build_causal_lm(tmp_path / "tiny-lm")


@pytest.fixture
def tiny_classifier(tmp_path: Path) -> Path:
    return build_classifier(tmp_path / "tiny-rm")
