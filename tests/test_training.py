"""moalign's SFT step: the packing fallback is chosen and said once; the lean loss is TRL's loss."""

from __future__ import annotations

import logging
from pathlib import Path

import datasets
import pytest
import torch

from moalign.methods.common import load_causal_lm, load_tokenizer
from moalign.methods.sft import SFTRunConfig
from moalign.testing import CORPUS
from moalign.training import LeanSFTTrainer, packing_args, packs_without_masks, sft_trainer

DATA = datasets.Dataset.from_dict(
    {"prompt": [t.split(" ", 2)[0] for t in CORPUS] * 2, "completion": [" " + t.split(" ", 1)[1] for t in CORPUS] * 2}
)


def config(tmp_path: Path, **options) -> SFTRunConfig:
    values = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_length=32,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        completion_only_loss=True,
    )
    return SFTRunConfig(**{**values, **options})


@pytest.fixture(autouse=True)
def fresh_messages(monkeypatch):
    monkeypatch.setattr("moalign.training._said", set())


def test_packing_with_sdpa_falls_back_to_length_grouped_batches_and_says_so_once(tiny_lm, tmp_path, caplog):
    model = load_causal_lm(str(tiny_lm))  # sdpa: packed batches would need a materialised block mask
    args = config(tmp_path, packing=True)
    with caplog.at_level(logging.WARNING, logger="moalign"):
        chosen = packing_args(args, model)
        again = packing_args(args, model)
    assert (chosen.packing, chosen.padding_free, chosen.train_sampling_strategy) == (False, False, "group_by_length")
    assert again == chosen and args.packing  # the user's config itself is untouched
    said = [r.getMessage() for r in caplog.records if r.name == "moalign"]
    assert len(said) == 1 and "attn_implementation=sdpa" in said[0] and "length-grouped" in said[0]


@pytest.mark.parametrize("attention", ["flash_attention_2", "kernels-community/flash-attn"])
def test_packing_stays_where_attention_is_variable_length(tiny_lm, tmp_path, attention):
    model = load_causal_lm(str(tiny_lm))
    model.config._attn_implementation = attention  # what the loader sets; the kernel itself is not needed here
    args = config(tmp_path, packing=True)
    assert packing_args(args, model) is args


def test_flex_attention_packs_on_a_gpu_only(tiny_lm, tmp_path):
    """PyTorch's flex attention has no backward on a CPU: packing there falls back too."""
    model = load_causal_lm(str(tiny_lm))
    model.config._attn_implementation = "flex_attention"
    assert packs_without_masks("flex_attention", on_gpu=True)
    if not torch.cuda.is_available():
        assert packing_args(config(tmp_path, packing=True), model).train_sampling_strategy == "group_by_length"


def test_packed_sft_trains_on_padded_length_grouped_batches(tiny_lm, tmp_path, caplog):
    args = config(tmp_path, packing=True, max_steps=2)
    with caplog.at_level(logging.WARNING, logger="moalign"):
        trainer = sft_trainer(load_causal_lm(str(tiny_lm)), args, DATA, load_tokenizer(str(tiny_lm)))
        trainer.train()
    batch = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" in batch and batch["input_ids"].size(0) == 4  # rows, not one packed row
    assert "position_ids" not in batch or batch["position_ids"].size(0) == 4
    assert sum("length-grouped" in r.getMessage() for r in caplog.records) == 1


def test_lean_loss_equals_trls_loss_and_metrics_are_still_logged(tiny_lm, tmp_path):
    args = config(tmp_path, max_steps=4, logging_steps=2)
    trainer = sft_trainer(load_causal_lm(str(tiny_lm)), args, DATA, load_tokenizer(str(tiny_lm)))
    assert isinstance(trainer, LeanSFTTrainer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.state.global_step = 2  # step 3 does not log: it takes the lean path
    assert not trainer._logs_this_step()
    trainer.model.eval()  # no dropout: both losses see the same forward
    lean = trainer.compute_loss(trainer.model, dict(batch))
    full = super(LeanSFTTrainer, trainer).compute_loss(trainer.model, dict(batch))
    torch.testing.assert_close(lean, full)
    trainer.state.global_step = 0
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 2 and all("entropy" in e and "mean_token_accuracy" in e for e in logged)
