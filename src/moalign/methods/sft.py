"""The SFT baseline: fine-tune the base model on the preferred responses (the chosen ones of pairs).

Usage: moalign sft --config configs/sft_demo.yaml [--flag value ...]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import datasets
from trl import SFTConfig

from moalign import data
from moalign.methods.common import load_training_data, start_run, training_totals, write_run_manifest
from moalign.methods.config import CommonArguments, parse_config
from moalign.methods.stages import train_sft
from moalign.policy import FIXED_POLICY


@dataclass
class SFTRunConfig(CommonArguments, SFTConfig):
    """TRL's SFTConfig plus moalign's common fields."""


def preferred_completions(dataset: datasets.Dataset) -> datasets.Dataset:
    """prompt/completion rows: the chosen response of each pair, or every response of a sample set."""
    column = "chosen" if data.is_pairs(dataset) else "response"
    return datasets.Dataset.from_dict(
        {"prompt": list(dataset["prompt"]), "completion": [" " + text for text in dataset[column]]}
    )


def train(config: SFTRunConfig) -> Path:
    run_dir = start_run(config, "sft")
    dataset = preferred_completions(load_training_data(config))
    stats = train_sft(config.model_name_or_path, dataset, config, run_dir / "checkpoints", run_dir / "model")
    write_run_manifest(config, "sft", FIXED_POLICY, model="model", training=training_totals({"sft": stats}))
    return run_dir


def cli(argv: list[str]) -> None:
    config = parse_config(SFTRunConfig, argv)
    print(f"SFT run written to {train(config)}")
