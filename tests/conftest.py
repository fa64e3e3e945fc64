"""Shared fixtures: tiny Hugging Face models built on the spot and saved like real ones."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from moalign.testing import (  # noqa: E402, F401
    CORPUS,
    ServerThread,
    build_causal_lm,
    build_classifier,
    build_tokenizer,
    serve_run,
)


@pytest.fixture
def tiny_lm(tmp_path: Path) -> Path:
    return build_causal_lm(tmp_path / "tiny-lm")


@pytest.fixture
def tiny_classifier(tmp_path: Path) -> Path:
    return build_classifier(tmp_path / "tiny-rm")
