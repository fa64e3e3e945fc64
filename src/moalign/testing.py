"""Tiny Hugging Face models built on the spot and saved like real ones, for tests and benchmarks.

Nothing is downloaded: the tokenizer is a byte-level BPE trained on a few sentences, the models are
randomly initialised GPT-2s. `customize(model, tokenizer)` may edit a model's weights before saving
(for example to make it always emit one token).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

CORPUS = (
    "the cat sat on the mat and was happy",
    "a good day is a sunny day with friends",
    "the weather is bad and the road is closed",
    "cook the rice slowly and add some salt",
    "travel light and keep your passport safe",
    "great question, I love to help you today",
    "plants need water, light and good soil",
    "the computer is slow because the disk is full",
    "yes yes yes the answer is yes",
    "no no no the answer is no",
    "\n\nHuman: what should I do?\n\nAssistant: rest and drink water <rm> 1.0 -0.5 A B",
)
EOS = "<|endoftext|>"


def build_tokenizer(directory: str | Path, texts: Sequence[str] = CORPUS, vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on `texts`, saved as a PreTrainedTokenizerFast."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(list(texts) * 3, vocab_size=vocab_size, special_tokens=[EOS])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, pad_token=EOS)
    tokenizer.save_pretrained(directory)
    return tokenizer


def _gpt2_config(tokenizer, seed: int, **sizes: Any):
    from transformers import GPT2Config

    torch.manual_seed(seed)
    settings = {"n_positions": 256, "n_embd": 32, "n_layer": 2, "n_head": 2, **sizes}
    return GPT2Config(
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )


def build_causal_lm(
    directory: str | Path,
    seed: int = 0,
    customize: Callable[[Any, Any], None] | None = None,
    texts: Sequence[str] = CORPUS,
    **sizes: Any,
) -> Path:
    """A tiny GPT-2 causal LM with its tokenizer, saved to `directory` (sizes: n_embd, n_layer, …)."""
    from transformers import GPT2LMHeadModel

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory, texts)
    model = GPT2LMHeadModel(_gpt2_config(tokenizer, seed, **sizes))
    if customize is not None:
        with torch.no_grad():
            customize(model, tokenizer)
    model.save_pretrained(directory)
    return directory


def build_classifier(
    directory: str | Path, seed: int = 0, num_labels: int = 1, texts: Sequence[str] = CORPUS, **sizes: Any
) -> Path:
    """A tiny GPT-2 sequence-classification model with its tokenizer, saved to `directory`."""
    from transformers import GPT2ForSequenceClassification

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(directory, texts)
    config = _gpt2_config(tokenizer, seed, **sizes)
    config.num_labels = num_labels
    GPT2ForSequenceClassification(config).save_pretrained(directory)
    return directory


class ServerThread:
    """A FastAPI app under a real uvicorn on 127.0.0.1 (a free port), in a background thread; `options` go to
    `uvicorn.Config`."""

    def __init__(self, app: Any, **options: Any):
        import threading

        import uvicorn

        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", **options)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        import time

        self.thread.start()
        deadline = time.time() + 30
        while not (self.server.started and self.server.servers):
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    @property
    def stats(self) -> dict[str, Any]:
        """The server's /health answer: status, request and batch counters."""
        import httpx

        return httpx.get(f"{self.url}/health").json()


def serve_run(run_dir: str | Path, **options: Any) -> ServerThread:
    """`moalign serve RUN_DIR` as a test server; options are ServeConfig fields."""
    from moalign.policy import load_policy
    from moalign.serve import ServeConfig, create_app, uvicorn_options

    config = ServeConfig(**options)
    return ServerThread(create_app(load_policy(run_dir, device="cpu"), config), **uvicorn_options(config))
