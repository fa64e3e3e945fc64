"""moalign's SFT step: TRL's SFTTrainer at the cost of a plain PyTorch step, and packing that never falls off a cliff.

Two things made TRL's step dear (measured in benchmarks/bench_sft.py and benchmarks/gpu.py):
- its loss computes, on every step, the entropy and token accuracy it only logs every `logging_steps`;
- packing without variable-length attention: padding-free batches carry `position_ids` only, and sdpa or
  eager attention then materialise a block-diagonal mask per layer and step (82% of a packed step's GPU
  time on a 1.1B model). Where no variable-length kernel is loaded, length-grouped batches give most of
  packing's saving (little padding) at a plain step's cost. Flex attention packs with block-sparse masks on
  a GPU; on a CPU it cannot train ("FlexAttention does not support backward on CPU", torch 2.13).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any

import torch
from trl import SFTTrainer

from moalign.models import VARLEN_ATTENTION

log = logging.getLogger("moalign")
_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)


def packs_without_masks(attention: str, on_gpu: bool) -> bool:
    """Whether this attention implementation trains on packed sequences without a dense mask: variable-length
    kernels (flash-attention, a `kernels` hub implementation), or flex attention's block-sparse masks on a
    GPU (PyTorch 2.13's flex attention has no backward on a CPU)."""
    return attention in VARLEN_ATTENTION or "/" in attention or (attention == "flex_attention" and on_gpu)


def packing_args(args, model):
    """The config to train with: `args` unchanged, or, when it asks for packing that this model's attention can
    only do with materialised block masks, a copy that trains on length-grouped batches instead (said once)."""
    if not (args.packing or args.padding_free):
        return args
    attention = getattr(model.config, "_attn_implementation", None) or "eager"
    if packs_without_masks(attention, on_gpu=torch.cuda.is_available() and not args.use_cpu):
        return args
    _say_once(
        f"packing: attn_implementation={attention} would materialise a block-diagonal mask for every packed batch "
        "(the slowest step there is) or cannot train on this device; training on length-grouped batches "
        "instead. Install flash-attn and set attn_implementation=flash_attention_2 (or flex_attention on a "
        "GPU) to pack."
    )
    return dataclasses.replace(args, packing=False, padding_free=False, train_sampling_strategy="group_by_length")


class LeanSFTTrainer(SFTTrainer):
    """TRL's SFTTrainer whose plain negative log-likelihood step computes the loss and nothing else.

    Entropy and mean token accuracy are still logged, computed only on the steps that log them. Any loss
    beyond plain NLL (DFT, label smoothing, a custom loss function, MoE auxiliary losses, sequence
    parallelism) goes through TRL's own `compute_loss`.
    """

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plain = (
            not return_outputs
            and self.args.loss_type == "nll"
            and self.compute_loss_func is None
            and self.label_smoother is None
            and not self.aux_loss_enabled
            and self.accelerator.num_processes == 1
        )
        if not plain or (self.model.training and self._logs_this_step()):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        # The model's own loss (cross-entropy over the logits, labels shifted inside, -100 ignored), divided by
        # the batch's label count or by `num_items_in_batch` like TRL's: what a plain PyTorch step computes,
        # cheaper than TRL's tiled log-probabilities with entropy and accuracy (benchmarks/bench_sft.py).
        extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
        loss = model(**inputs, **extra).loss
        if self.model.training:
            self._total_train_tokens += _batch_tokens(inputs)
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        return loss

    def _logs_this_step(self) -> bool:
        """Whether the Trainer logs after the step being computed (its `logging_steps` schedule)."""
        step, every = self.state.global_step + 1, self.args.logging_steps
        if self.args.logging_strategy != "steps":
            return False
        if step == 1 and self.args.logging_first_step:
            return True
        if every < 1:  # a fraction of the run's steps
            every = math.ceil(every * (self.state.max_steps or 1))
        return step % int(every) == 0


def _batch_tokens(inputs: dict[str, Any]) -> int:
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum())
    return int(inputs["position_ids"].size(1))  # padding-free: one row of packed tokens


def sft_trainer(model, args, train_dataset, tokenizer, peft_config=None) -> SFTTrainer:
    """The SFT trainer every moalign method uses (see the module docstring)."""
    return LeanSFTTrainer(
        model=model,
        args=packing_args(args, model),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
