"""MODPO's loss inside TRL's DPOTrainer: the margin columns reach the loss, and β' = β/w_k.

MODPO (Zhou et al., 2024, "Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct Preference
Optimization") trains on the pairs (x, y_w, y_l) of one objective k; the other objectives enter as fixed
margins m = r_{-k}(x, y):

    L = -log σ( (1/w_k) · [ β·log(π(y_w)/π_ref(y_w)) - β·log(π(y_l)/π_ref(y_l)) - w_{-k}ᵀ(m_w - m_l) ] )

`MODPOTrainer` does not copy TRL's loss: with β' = β/w_k and the reference log-probabilities shifted by
w_{-k}ᵀm/β, TRL's sigmoid DPO loss is this loss exactly (see `MODPOTrainer._compute_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from moalign.errors import MoalignError
from moalign.pareto import validate_weights

MARGIN_CHOSEN = "margin_chosen"

MARGIN_REJECTED = "margin_rejected"

MARGIN_COLUMNS = (MARGIN_CHOSEN, MARGIN_REJECTED)

# DPOConfig options that change TRL's loss or reference away from the sigmoid DPO loss MODPO is built on,
# with the value that leaves the loss alone.
LOSS_CHANGING_OPTIONS = {
    "ld_alpha": None,
    "use_weighting": False,
    "loss_weights": None,
    "label_smoothing": 0.0,
    "sync_ref_model": False,
    "use_liger_kernel": False,
}


def check_dpo_config(config: Any) -> None:
    """MODPO is the sigmoid DPO loss with reverse KL and nothing else: refuse options that change it."""
    if list(config.loss_type) != ["sigmoid"] or config.f_divergence_type != "reverse_kl":
        raise MoalignError(
            "MODPO builds on the sigmoid DPO loss: set loss_type sigmoid and f_divergence_type reverse_kl"
        )
    changed = [
        name
        for name, neutral in LOSS_CHANGING_OPTIONS.items()
        if hasattr(config, name) and getattr(config, name) != neutral
    ]
    if changed:
        raise MoalignError(f"MODPO's loss is plain sigmoid DPO with margins: unset {', '.join(changed)}")
    if config.beta <= 0:
        raise MoalignError(f"beta must be > 0, got {config.beta}")


def modpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    margin_chosen: torch.Tensor,
    margin_rejected: torch.Tensor,
    weights: torch.Tensor | Sequence[float],
    beta: float,
) -> torch.Tensor:
    """Per-pair MODPO loss (Zhou et al., 2024, eq. 8); `weights` has the trained objective first, margins B×(N-1).

    The formula written out, as the reference the trainer is tested against.
    """
    w = torch.as_tensor(weights, dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device)
    margin_chosen = torch.as_tensor(margin_chosen, dtype=w.dtype, device=w.device).reshape(len(policy_chosen_logps), -1)
    margin_rejected = torch.as_tensor(margin_rejected, dtype=w.dtype, device=w.device).reshape(margin_chosen.shape)
    if margin_chosen.shape[1] != w.numel() - 1:
        raise MoalignError(
            f"{margin_chosen.shape[1]} margins per pair but {w.numel()} weights: need one per other objective"
        )
    chosen_reward = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected_reward = beta * (policy_rejected_logps - ref_rejected_logps)
    margin = (margin_chosen - margin_rejected) @ w[1:]
    return -F.logsigmoid((chosen_reward - rejected_reward - margin) / w[0])


@dataclass
class DataCollatorForMODPO(DataCollatorForPreference):
    """TRL's preference collator plus the margin columns as B×(N-1) float tensors.

    TRL's collator emits only its own keys, so without this the margins would never reach the loss.
    """

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        output = super().torch_call(examples)
        for column in MARGIN_COLUMNS:
            if column in examples[0]:
                output[column] = torch.tensor([example[column] for example in examples], dtype=torch.float32)
        return output


class MODPOTrainer(DPOTrainer):
    """TRL's DPOTrainer with MODPO's margin term and 1/w_k scaling; everything else is DPO as TRL does it.

    `weights` has the trained objective first; the train dataset needs `margin_chosen`/`margin_rejected`
    columns (N-1 floats each, in the order of `weights[1:]`). TRL's logged `rewards/*` are MODPO's: scaled
    by 1/w_k and net of the margins (`rewards/margins` is the mean MODPO logit).
    """

    # The private TRL methods this class relies on (checked against trl 1.16's dpo_trainer.py).
    TRL_HOOKS = ("_compute_loss", "compute_ref_log_probs", "_set_signature_columns_if_needed")

    def __init__(
        self,
        model,
        weights: Sequence[float],
        args: DPOConfig,
        train_dataset: datasets.Dataset,
        processing_class,
        ref_model=None,
        peft_config=None,
        **kwargs: Any,
    ):
        missing_hooks = [name for name in self.TRL_HOOKS if not hasattr(DPOTrainer, name)]
        if missing_hooks:
            import trl

            raise MoalignError(
                f"trl {trl.__version__}'s DPOTrainer lacks {missing_hooks}; MODPO was written for trl 1.16"
            )
        w = check_trainer_weights(weights)
        check_dpo_config(args)
        missing = [c for c in MARGIN_COLUMNS if c not in train_dataset.column_names]
        if missing:
            raise MoalignError(f"the MODPO train dataset lacks the margin columns {missing}")
        width = len(train_dataset[0][MARGIN_CHOSEN])
        if width != len(w) - 1:
            raise MoalignError(f"the dataset has {width} margins per pair but the weights need {len(w) - 1}")
        # The same pad-token choice as DPOTrainer makes for its own collator.
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        tokenizer.pad_token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
        collator = DataCollatorForMODPO(
            pad_token_id=tokenizer.pad_token_id,
            max_length=args.max_length,
            truncation_mode=args.truncation_mode,
            pad_to_multiple_of=args.pad_to_multiple_of,
        )
        super().__init__(
            model=model,
            ref_model=ref_model,
            args=args,
            data_collator=collator,
            train_dataset=train_dataset,
            processing_class=processing_class,
            peft_config=peft_config,
            **kwargs,
        )
        self.modpo_weights = torch.tensor(w, dtype=torch.float32)
        self.beta = args.beta / w[0]  # β' = β / w_k (TRL's loss reads self.beta)

    def _set_signature_columns_if_needed(self) -> None:
        # Trainer drops dataset columns outside the signature: keep the margins.
        super()._set_signature_columns_if_needed()
        for column in MARGIN_COLUMNS:
            if column not in self._signature_columns:
                self._signature_columns.append(column)

    def compute_ref_log_probs(self, model, inputs):
        # The margins are loss inputs, not model inputs.
        return super().compute_ref_log_probs(model, {k: v for k, v in inputs.items() if k not in MARGIN_COLUMNS})

    def _compute_loss(self, model, inputs, return_outputs):
        """DPO's loss with β' = β/w_k and reference log-probs shifted by s = w_{-k}ᵀm/β, which is MODPO's loss:

        β'·[(logπ_w - logπref_w - s_w) - (logπ_l - logπref_l - s_l)]
          = (1/w_k)·[β·(logπ_w - logπref_w) - β·(logπ_l - logπref_l) - w_{-k}ᵀ(m_w - m_l)].
        The margins are removed from the inputs before the model call.
        """
        inputs = dict(inputs)
        margin_chosen, margin_rejected = inputs.pop(MARGIN_CHOSEN), inputs.pop(MARGIN_REJECTED)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:  # the reference forward TRL would run inside its loss (same model), run here to add the shift
            ref_model = self.ref_model if self.ref_model is not None else self.model  # PEFT: adapter disabled
            ref_chosen, ref_rejected = self.compute_ref_log_probs(ref_model, inputs)
        w_rest = self.modpo_weights[1:].to(device=margin_chosen.device, dtype=margin_chosen.dtype)
        beta = self.args.beta
        inputs["ref_chosen_logps"] = ref_chosen + (margin_chosen @ w_rest / beta).to(ref_chosen.dtype)
        inputs["ref_rejected_logps"] = ref_rejected + (margin_rejected @ w_rest / beta).to(ref_rejected.dtype)
        precompute, self.precompute_ref_logps = self.precompute_ref_logps, True  # read the shifted ones
        try:
            return super()._compute_loss(model, inputs, return_outputs)
        finally:
            self.precompute_ref_logps = precompute


def check_trainer_weights(weights: Sequence[float]) -> list[float]:
    """Trained objective first: on the simplex, w_k > 0, at least one weight."""
    w = np.asarray(list(weights), dtype=float).reshape(-1)
    if w.size < 1:
        raise MoalignError("MODPO needs a weight vector with the trained objective first")
    validate_weights(w, w.size)
    if w[0] <= 0:
        raise MoalignError(
            f"weights {w.tolist()}: the trained objective's weight w_k must be > 0 (MODPO divides by it)"
        )
    return w.tolist()
