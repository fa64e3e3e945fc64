"""MODPO (Zhou et al., 2024): multi-objective DPO, one model per preference, and plain DPO, its margin model.

    moalign dpo   --config FILE.yaml   DPO on one objective's pairs: a margin model and the w = e_j end of the front
    moalign modpo --config FILE.yaml   one model per weight vector, trained on objective k's pairs

MODPO trains on the pairs (x, y_w, y_l) of one objective k; the other objectives enter as fixed margins
m = r_{-k}(x, y), computed once before training and carried as dataset columns:

    L = -log σ( (1/w_k) · [ β·log(π(y_w)/π_ref(y_w)) - β·log(π(y_l)/π_ref(y_l)) - w_{-k}ᵀ(m_w - m_l) ] )

`MODPOTrainer` does not copy TRL's loss: with β' = β/w_k and the reference log-probabilities shifted by
w_{-k}ᵀm/β, TRL's sigmoid DPO loss is this loss exactly (see `MODPOTrainer._compute_loss`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference

from moalign import data
from moalign.errors import MoalignError
from moalign.methods.common import (
    CommonArguments,
    finish_stage,
    finished_stage,
    last_checkpoint,
    load_causal_lm,
    load_tokenizer,
    lora_config,
    objective_names,
    parse_config,
    stage_args,
    write_run_manifest,
)
from moalign.pareto import validate_weights

log = logging.getLogger("moalign")

MARGIN_CHOSEN = "margin_chosen"
MARGIN_REJECTED = "margin_rejected"
MARGIN_COLUMNS = (MARGIN_CHOSEN, MARGIN_REJECTED)
DPO_MARGIN = "dpo:"


# --------------------------------------------------------------------------------------------------- the loss


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
    """Per-pair MODPO loss (METHODS.md §3); `weights` has the trained objective first, margins B×(N-1).

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
        if list(args.loss_type) != ["sigmoid"] or args.f_divergence_type != "reverse_kl":
            raise MoalignError(
                "MODPO is the sigmoid DPO loss with reverse KL: set loss_type sigmoid, f_divergence_type reverse_kl"
            )
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


# --------------------------------------------------------------------------------------------------- configs


@dataclass
class PairArguments:
    """How preference pairs for the trained objective come out of the dataset."""

    objective_index: int = field(
        default=0, metadata={"help": "k: which of `objectives` the dataset's pairs express (0-based)"}
    )
    pairs_from: str | None = field(
        default=None,
        metadata={
            "help": "score column to build pairs from when the dataset holds scored samples (default: objective k)"
        },
    )
    pairs_min_gap: float = field(default=0.0, metadata={"help": "minimum score gap of a pair built from scores"})
    pair_choice_column: str | None = field(
        default=None,
        metadata={
            "help": "for response_0/response_1 datasets: the column naming the preferred one, e.g. safer_response_id"
        },
    )
    prompt_template: str = field(
        default="{prompt}", metadata={"help": "training prompt, e.g. 'USER: {prompt} ASSISTANT:'"}
    )
    save_adapters: bool = field(
        default=False, metadata={"help": "with use_peft, save only the LoRA adapter per model instead of merging it"}
    )


@dataclass
class MODPOConfig(CommonArguments, PairArguments, DPOConfig):
    """TRL's DPOConfig plus MODPO's preference grid and margin sources."""

    weights: list[str] = field(
        default_factory=lambda: ["0.1,0.9", "0.5,0.5", "0.9,0.1"],
        metadata={"help": "preference vectors in the order of `objectives`, e.g. 0.1,0.9 0.5,0.5; one model each"},
    )
    margin_objectives: list[str] = field(
        default_factory=list,
        metadata={
            "help": "one margin source per other objective, in objective order: an objective spec or dpo:RUN_DIR "
            "(implicit reward of a `moalign dpo` run); default: the other objectives' specs"
        },
    )
    margin_normalize: bool = field(
        default=True, metadata={"help": "z-score objective margins over the training samples"}
    )
    margin_batch_size: int = field(default=16, metadata={"help": "batch size for computing margins"})
    end_runs: list[str] = field(
        default_factory=list,
        metadata={"help": "extra `moalign dpo` run dirs whose model serves its objective's corner e_j"},
    )
    dpo_margin_ends: bool = field(
        default=True, metadata={"help": "list each dpo:RUN margin model as the corner e_j of the front"}
    )


@dataclass
class DPORunConfig(MODPOConfig):
    """Plain DPO on objective k's pairs. MODPO's fields are accepted and ignored, so one YAML serves both
    steps of the paper's recipe (`moalign dpo` on one objective, then `moalign modpo` with margin dpo:RUN)."""


# --------------------------------------------------------------------------------------------------- pairs


def pairs_from_scores(frame: pd.DataFrame, objective: str, min_gap: float = 0.0) -> pd.DataFrame:
    """Preference pairs from scored samples: per prompt, best with worst, second best with second worst, ...

    Nested pairs use every response at most once and come largest gap first; a pair needs a gap > 0 and
    ≥ `min_gap`. Returns prompt, chosen, rejected, chosen_score, rejected_score.
    """
    for column in ("prompt", "response", objective):
        if column not in frame.columns:
            raise MoalignError(
                f"cannot build pairs: the samples have no {column!r} column (have {sorted(frame.columns)})"
            )
    if min_gap < 0 or not math.isfinite(min_gap):
        raise MoalignError(f"pairs_min_gap must be a finite number ≥ 0, got {min_gap}")
    scores = pd.to_numeric(frame[objective], errors="coerce")
    if not np.isfinite(scores.to_numpy(dtype=float)).all():
        raise MoalignError(f"score column {objective!r} has NaN, infinite or non-numeric values")
    samples = pd.DataFrame({"prompt": frame["prompt"], "response": frame["response"], "score": scores})
    samples = samples.drop_duplicates(["prompt", "response"])
    rows = []
    for prompt, group in samples.groupby("prompt", sort=False):
        ranked = group.sort_values("score", ascending=False, kind="stable")
        responses, values = ranked["response"].tolist(), ranked["score"].tolist()
        for i in range(len(ranked) // 2):
            j = len(ranked) - 1 - i
            gap = values[i] - values[j]
            if gap <= 0 or gap < min_gap:
                break  # the gaps only shrink from here
            rows.append((prompt, responses[i], responses[j], values[i], values[j]))
    if not rows:
        raise MoalignError(f"no prompt has two responses whose {objective!r} scores differ by > 0 and ≥ {min_gap}")
    return pd.DataFrame(rows, columns=["prompt", "chosen", "rejected", "chosen_score", "rejected_score"])


def pairs_from_choice(dataset: datasets.Dataset, column: str) -> datasets.Dataset:
    """prompt/chosen/rejected from two-response rows (`response_0`, `response_1`) and the preferred one's id."""
    needed = {"prompt", "response_0", "response_1", column}
    if not needed <= set(dataset.column_names):
        raise MoalignError(f"pair_choice_column {column!r} needs columns {sorted(needed)}; have {dataset.column_names}")
    choice = np.asarray(dataset[column], dtype=int)
    if not np.isin(choice, (0, 1)).all():
        raise MoalignError(f"column {column!r} must hold 0 or 1 (the preferred response)")
    first, second = list(dataset["response_0"]), list(dataset["response_1"])
    return datasets.Dataset.from_dict(
        {
            "prompt": list(dataset["prompt"]),
            "chosen": [a if c == 0 else b for a, b, c in zip(first, second, choice)],
            "rejected": [b if c == 0 else a for a, b, c in zip(first, second, choice)],
        }
    )


def completion_text(response: str) -> str:
    """Training text is prompt + " " + response (the convention of moalign's data and SFT)."""
    return response if response[:1].isspace() else " " + response


def load_pairs(config: PairArguments | Any, names: Sequence[str]) -> datasets.Dataset:
    """The trained objective's pairs (prompt, chosen, rejected; raw responses, templated prompt)."""
    raw = data.load_raw(config.dataset, config.dataset_split)
    if config.pair_choice_column:
        raw = pairs_from_choice(raw, config.pair_choice_column)
    else:
        raw = data.standardize(raw, config.dataset)
    if config.max_samples:
        raw = raw.select(range(min(config.max_samples, len(raw))))
    if not data.is_pairs(raw):
        column = config.pairs_from or (names[config.objective_index] if names else None)
        if column is None:
            raise MoalignError("the dataset holds samples, not pairs: set pairs_from (a score column) or objectives")
        frame = raw.to_pandas()
        if column not in frame.columns and names and column == names[config.objective_index]:
            from moalign.objectives import build
            from moalign.scores import score

            objective = build(config.objectives[config.objective_index])
            frame[column] = score([objective], frame["prompt"], frame["response"], _score_cache(config))[objective.name]
        pairs = pairs_from_scores(frame, column, config.pairs_min_gap)
        raw = datasets.Dataset.from_pandas(pairs[["prompt", "chosen", "rejected"]], preserve_index=False)
        log.info(f"built {len(raw)} pairs from the {column!r} scores")
    if "{prompt}" not in config.prompt_template:
        raise MoalignError(f"prompt_template {config.prompt_template!r} must contain {{prompt}}")
    prompts = [config.prompt_template.format(prompt=p) for p in raw["prompt"]]
    return datasets.Dataset.from_dict(
        {"prompt": prompts, "chosen": list(raw["chosen"]), "rejected": list(raw["rejected"])}
    )


def training_dataset(pairs: datasets.Dataset, margins: tuple[np.ndarray, np.ndarray] | None = None) -> datasets.Dataset:
    """The rows TRL tokenizes: responses with their leading space, plus the margin columns for MODPO."""
    columns: dict[str, list] = {
        "prompt": list(pairs["prompt"]),
        "chosen": [completion_text(r) for r in pairs["chosen"]],
        "rejected": [completion_text(r) for r in pairs["rejected"]],
    }
    if margins is not None:
        columns[MARGIN_CHOSEN] = np.asarray(margins[0], dtype=np.float32).tolist()
        columns[MARGIN_REJECTED] = np.asarray(margins[1], dtype=np.float32).tolist()
    return datasets.Dataset.from_dict(columns)


def _score_cache(config: Any):
    from moalign.scores import ScoreCache, cache_dir

    return ScoreCache(config.score_cache or cache_dir() / "scores.sqlite")


# --------------------------------------------------------------------------------------------------- margins


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


@torch.no_grad()
def sequence_logps(
    model,
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    batch_size: int = 8,
    max_length: int | None = None,
) -> np.ndarray:
    """log π(completion + EOS | prompt) summed over the completion tokens, tokenized as TRL's DPOTrainer does."""
    device = next(model.parameters()).device
    eos = tokenizer.eos_token or ""
    values: list[float] = []
    for start in range(0, len(prompts), batch_size):
        rows, starts = [], []
        for prompt, completion in zip(prompts[start : start + batch_size], completions[start : start + batch_size]):
            text = completion if completion.endswith(eos) else completion + eos
            prompt_ids = tokenizer(prompt)["input_ids"]
            full = tokenizer(prompt + text)["input_ids"]
            starts.append(_common_prefix(prompt_ids, full))
            rows.append(full[:max_length] if max_length else full)
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        position = torch.arange(1, width, device=device)[None, :]
        completion = (position >= torch.tensor(starts, device=device)[:, None]) & mask[:, 1:].bool()
        values += (token_logps * completion).sum(dim=1).tolist()
    return np.asarray(values, dtype=float)


def dpo_run_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A `moalign dpo` run's manifest, checked to be one (the implicit reward needs its model, base and β)."""
    from moalign.run import read_manifest

    manifest = read_manifest(run_dir)
    if manifest["method"] != "dpo":
        raise MoalignError(f"margin dpo:{run_dir} is a {manifest['method']!r} run; it must be a `moalign dpo` run")
    model = Path(run_dir) / manifest.get("model", "model")
    if not model.is_dir():
        raise MoalignError(f"margin dpo:{run_dir} has no trained model at {model}")
    return manifest


def implicit_rewards(
    run_dir: str | os.PathLike,
    prompts: Sequence[str],
    responses: Sequence[str],
    beta: float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
) -> np.ndarray:
    """β·log(π_φ(y|x)/π_ref(y|x)) of a `moalign dpo` run, π_ref its base model and β its training β."""
    from moalign.generation import load_model

    manifest = dpo_run_info(run_dir)
    beta = float(manifest.get("beta", 0.1) if beta is None else beta)
    completions = [completion_text(r) for r in responses]
    values = []
    for path in (Path(run_dir) / manifest.get("model", "model"), manifest["base_model"]):
        model, tokenizer = load_model(str(path))
        values.append(sequence_logps(model, tokenizer, list(prompts), completions, batch_size, max_length))
        del model
    return beta * (values[0] - values[1])


def margin_spec_kind(spec: str) -> str:
    return "dpo" if spec.startswith(DPO_MARGIN) else "objective"


def _dpo_margin_parts(spec: str) -> tuple[str, float | None]:
    from moalign.objectives import parse_spec

    _, run_dir, options = parse_spec(spec)
    unknown = set(options) - {"beta"}
    if unknown or not run_dir:
        raise MoalignError(f"margin {spec!r}: write dpo:RUN_DIR (optionally ?beta=X)")
    return run_dir, (float(options["beta"]) if "beta" in options else None)


def compute_margins(
    pairs: datasets.Dataset, specs: Sequence[str], config: Any, built: dict[str, Any] | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any] | None]:
    """The other objectives' rewards of chosen and rejected (two B×(N-1) arrays), once, before training.

    Objective specs are scored (with the score cache) and z-scored over all training samples (chosen and
    rejected); their statistics are returned. `dpo:RUN` margins are the implicit rewards of that DPO model.
    `built` maps specs to objectives already built (a reward model is then not loaded twice).
    """
    from moalign.objectives import build
    from moalign.scores import NormStats, score

    prompts, chosen, rejected = list(pairs["prompt"]), list(pairs["chosen"]), list(pairs["rejected"])
    n = len(prompts)
    margin_c = np.zeros((n, len(specs)))
    margin_r = np.zeros((n, len(specs)))
    scorer_columns = [i for i, s in enumerate(specs) if margin_spec_kind(s) == "objective"]
    stats = None
    if scorer_columns:
        built = built or {}
        objectives = [built.get(specs[i]) or build(specs[i]) for i in scorer_columns]
        names = [o.name for o in objectives]
        if len(set(names)) != len(names):
            raise MoalignError(f"margin objective names must be unique; give ?name=... to tell apart: {names}")
        raw = score(objectives, prompts + prompts, chosen + rejected, _score_cache(config))
        fitted = NormStats.fit(raw, names)
        matrix = fitted.matrix(raw)
        if config.margin_normalize:
            matrix = fitted.zscore(matrix)
        for column, i in enumerate(scorer_columns):
            margin_c[:, i], margin_r[:, i] = matrix[:n, column], matrix[n:, column]
        stats = fitted.to_dict()
    for i, spec in enumerate(specs):
        if margin_spec_kind(spec) == "dpo":
            run_dir, beta = _dpo_margin_parts(spec)
            log.info(f"implicit-reward margins from {run_dir}")
            rewards = implicit_rewards(
                run_dir, prompts + prompts, chosen + rejected, beta, config.margin_batch_size, config.max_length
            )
            margin_c[:, i], margin_r[:, i] = rewards[:n], rewards[n:]
    return margin_c, margin_r, stats


def check_margins(margin_chosen: np.ndarray, margin_rejected: np.ndarray, specs: Sequence[str]) -> None:
    for matrix in (margin_chosen, margin_rejected):
        bad = ~np.isfinite(matrix)
        if bad.any():
            column = int(np.argwhere(bad)[0][1])
            raise MoalignError(f"margin {specs[column]!r} gave {int(bad[:, column].sum())} NaN or infinite values")


# --------------------------------------------------------------------------------------------------- validation


@dataclass
class MODPOPlan:
    """What a validated MODPO config means: objective names, k, margin sources, and the weight vectors."""

    names: list[str]
    k: int
    margin_specs: list[str]
    preferences: list[list[float]]  # in objective order, as the manifest lists them
    objectives: dict[str, Any] = field(default_factory=dict)  # spec -> built objective, reused for margins

    def trainer_weights(self, preference: Sequence[float]) -> list[float]:
        """The same vector with objective k first (the order of `modpo_loss` and the margin columns)."""
        return [preference[self.k]] + [w for i, w in enumerate(preference) if i != self.k]

    @property
    def other_indices(self) -> list[int]:
        return [i for i in range(len(self.names)) if i != self.k]


def parse_preference(text: str, n: int, k: int) -> list[float]:
    """'0.1,0.9' into a weight vector: right length, on the simplex, w_k > 0."""
    try:
        values = [float(part) for part in str(text).split(",")]
    except ValueError:
        raise MoalignError(f"weights {text!r} must be comma-separated numbers, e.g. 0.3,0.7") from None
    if len(values) != n:
        raise MoalignError(f"weights {text!r} have {len(values)} entries; there are {n} objectives (one weight each)")
    w = validate_weights(values, n)
    if w[k] <= 0:
        raise MoalignError(f"weights {text!r}: the trained objective's weight (index {k}) must be > 0")
    return w.tolist()


def check_dpo_config(config: Any) -> None:
    if list(config.loss_type) != ["sigmoid"] or config.f_divergence_type != "reverse_kl":
        raise MoalignError(
            "MODPO builds on the sigmoid DPO loss: set loss_type sigmoid and f_divergence_type reverse_kl"
        )
    if config.beta <= 0:
        raise MoalignError(f"beta must be > 0, got {config.beta}")


def plan_modpo(config: MODPOConfig) -> MODPOPlan:
    """Every check that needs no training: objectives, k, margins (one per other objective), weights.

    The cheap checks come first, before any objective or reward model is built.
    """
    n, k = len(config.objectives), config.objective_index
    if n < 2:
        raise MoalignError("MODPO needs at least two objectives (YAML key or --objectives), the trained one and others")
    if not 0 <= k < n:
        raise MoalignError(f"objective_index {k} is out of range for {n} objectives")
    specs = list(config.margin_objectives) or [config.objectives[i] for i in range(n) if i != k]
    if len(specs) != n - 1:
        raise MoalignError(
            f"margin_objectives has {len(specs)} entries; it needs one per other objective ({n - 1}), "
            "in the order of `objectives` without the trained one"
        )
    if not config.weights:
        raise MoalignError("weights is empty: give one or more preference vectors, e.g. 0.5,0.5")
    preferences = [parse_preference(text, n, k) for text in config.weights]
    seen = set()
    for text, w in zip(config.weights, preferences):
        key = tuple(round(x, 9) for x in w)
        if key in seen:
            raise MoalignError(f"weights {text!r} are listed twice")
        seen.add(key)
    check_dpo_config(config)
    for spec in specs:
        if margin_spec_kind(spec) == "dpo":
            manifest = dpo_run_info(_dpo_margin_parts(spec)[0])
            if manifest.get("base_model") != config.model_name_or_path:
                log.warning(
                    f"margin {spec}: its reference is its own base model {manifest.get('base_model')}, "
                    f"not this run's {config.model_name_or_path}"
                )
    for run in config.end_runs:
        dpo_run_info(run)
    from moalign.objectives import build_all

    objectives = build_all(config.objectives)
    built = {spec: objective for spec, objective in zip(config.objectives, objectives) if isinstance(spec, str)}
    return MODPOPlan([o.name for o in objectives], k, specs, preferences, built)


# --------------------------------------------------------------------------------------------------- training


def model_name(preference: Sequence[float]) -> str:
    return "w" + "-".join(f"{x:g}" for x in preference)


def _token_count(trainer) -> int:
    """Tokens the stage trained on: epochs done × the dataset's tokens (prompt counted in both sequences)."""
    dataset = trainer.train_dataset
    per_pass = sum(
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])
    )
    return int((trainer.state.epoch or 0.0) * per_pass)


def train_preference_stage(
    model_path: str,
    dataset: datasets.Dataset,
    config: Any,
    stage_dir: Path,
    final_dir: Path,
    weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """One resumable DPO (weights None) or MODPO stage; a finished one (its folder holds the marker) is skipped.

    An interrupted stage resumes from its newest checkpoint in `stage_dir`. With LoRA the adapter is merged
    into the saved model unless `save_adapters` (`moalign.generation.load_model` reads either).
    """
    if (done := finished_stage(final_dir)) is not None:
        log.info(f"{final_dir.name}: already trained, skipping")
        return done
    args = stage_args(config, stage_dir)
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path)
    common = dict(model=model, args=args, processing_class=tokenizer, peft_config=lora_config(config))
    if weights is None:
        plain = dataset.remove_columns([c for c in MARGIN_COLUMNS if c in dataset.column_names])
        trainer = DPOTrainer(train_dataset=plain, **common)
    else:
        trainer = MODPOTrainer(weights=weights, train_dataset=dataset, **common)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=last_checkpoint(stage_dir))
    seconds = time.perf_counter() - start
    stats = {
        "seconds": seconds,
        "tokens": _token_count(trainer),
        "steps": trainer.state.global_step,
        "pairs": len(dataset),
    }
    if weights is not None:
        stats["weights"] = list(weights)
    # merged: one plain model; adapters: the policy loads base + adapter
    merge = config.use_peft and not config.save_adapters
    return finish_stage(trainer.model, tokenizer, final_dir, stage_dir, stats, merge=merge)


def _pairs_manifest(config: Any) -> dict[str, Any]:
    return {
        "dataset": config.dataset,
        "split": config.dataset_split,
        "max_samples": config.max_samples,
        "pair_choice_column": config.pair_choice_column,
        "pairs_from": config.pairs_from,
        "pairs_min_gap": config.pairs_min_gap,
        "prompt_template": config.prompt_template,
    }


def _margins(config: MODPOConfig, plan: MODPOPlan, pairs: datasets.Dataset, run_dir: Path):
    """Margins computed once per run and kept in the run dir, so a resumed run does not recompute them."""
    key = {
        **_pairs_manifest(config),
        "margins": plan.margin_specs,
        "normalize": config.margin_normalize,
        "dpo_models": [
            _model_stamp(_dpo_margin_parts(s)[0]) for s in plan.margin_specs if margin_spec_kind(s) == "dpo"
        ],
    }
    path, meta_path = run_dir / "margins.parquet", run_dir / "margins.json"
    if path.exists() and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        frame = pd.read_parquet(path)
        if meta.get("key") == key and len(frame) == len(pairs):
            log.info("margins: reusing margins.parquet")
            return np.stack(frame[MARGIN_CHOSEN].to_numpy()), np.stack(frame[MARGIN_REJECTED].to_numpy()), meta["stats"]
    margin_c, margin_r, stats = compute_margins(pairs, plan.margin_specs, config, plan.objectives)
    check_margins(margin_c, margin_r, plan.margin_specs)
    frame = pairs.to_pandas()
    frame[MARGIN_CHOSEN] = list(margin_c)
    frame[MARGIN_REJECTED] = list(margin_r)
    tmp = path.with_name(f".{path.name}.tmp")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, path)
    from moalign.run import write_json

    write_json(meta_path, {"key": key, "stats": stats})
    return margin_c, margin_r, stats


def _model_stamp(run_dir: str) -> float:
    """When a DPO run's model was saved: margins from a retrained model are recomputed."""
    manifest = dpo_run_info(run_dir)
    return os.path.getmtime(Path(run_dir) / manifest.get("model", "model"))


def _end_entries(config: MODPOConfig, plan: MODPOPlan, run_dir: Path) -> list[dict[str, Any]]:
    """DPO models that serve the corners e_j: the dpo: margin runs (if asked) and `end_runs`."""
    runs: list[tuple[str, int | None]] = [(run, None) for run in config.end_runs]
    if config.dpo_margin_ends:
        for j, spec in zip(plan.other_indices, plan.margin_specs):
            if margin_spec_kind(spec) == "dpo":
                runs.append((_dpo_margin_parts(spec)[0], j))
    entries, seen = [], set()
    for run, j in runs:
        manifest = dpo_run_info(run)
        corner = _dpo_objective(run, manifest, plan) if j is None else j
        model = (Path(run) / manifest.get("model", "model")).resolve()
        if model in seen:
            continue
        seen.add(model)
        preference = [1.0 if i == corner else 0.0 for i in range(len(plan.names))]
        # Relative, so the MODPO run and its DPO margin run can move together.
        entries.append({"preference": preference, "path": os.path.relpath(model, run_dir.resolve()), "source": "dpo"})
    return entries


def _dpo_objective(run: str, manifest: dict[str, Any], plan: MODPOPlan) -> int:
    name = manifest.get("trained_objective")
    if name not in plan.names:
        raise MoalignError(f"end run {run}: its trained objective {name!r} is not one of the objectives {plan.names}")
    return plan.names.index(name)


def train(config: MODPOConfig) -> Path:
    """Validate, compute the margins once, then one resumable MODPO model per weight vector."""
    plan = plan_modpo(config)
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pairs = load_pairs(config, plan.names)
    start = time.perf_counter()
    margin_c, margin_r, stats = _margins(config, plan, pairs, run_dir)
    margin_seconds = time.perf_counter() - start
    dataset = training_dataset(pairs, (margin_c, margin_r))
    ends = _end_entries(config, plan, run_dir)
    models: list[dict[str, Any]] = []
    stages: dict[str, Any] = {}
    for preference in plan.preferences:
        name = model_name(preference)
        stages[name] = train_preference_stage(
            config.model_name_or_path,
            dataset,
            config,
            run_dir / "checkpoints" / name,
            run_dir / "models" / name,
            weights=plan.trainer_weights(preference),
        )
        models.append({"preference": preference, "path": f"models/{name}", "source": "modpo"})
        _write_modpo_manifest(config, plan, models + ends, stats, stages, margin_seconds)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return run_dir


def _write_modpo_manifest(config, plan, models, stats, stages, margin_seconds) -> None:
    seconds = margin_seconds + sum(s["seconds"] for s in stages.values())
    write_run_manifest(
        config,
        "modpo",
        models=models,
        stats=stats,
        trained_objective=plan.names[plan.k],
        objective_index=plan.k,
        margin_objectives=plan.margin_specs,
        margin_objective_names=[plan.names[i] for i in plan.other_indices],
        beta=config.beta,
        pairs=_pairs_manifest(config),
        prompt_template=config.prompt_template,
        training={
            "seconds": seconds,
            "tokens": sum(s["tokens"] for s in stages.values()),
            "margin_seconds": margin_seconds,
            "stages": stages,
        },
    )


def train_dpo(config: DPORunConfig) -> Path:
    """Plain DPO (TRL's DPOTrainer) on objective k's pairs; the run is a MODPO margin model (dpo:RUN)."""
    check_dpo_config(config)
    names = objective_names(config.objectives) if config.objectives else []
    if names and not 0 <= config.objective_index < len(names):
        raise MoalignError(f"objective_index {config.objective_index} is out of range for {len(names)} objectives")
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    pairs = load_pairs(config, names)
    stats = train_preference_stage(
        config.model_name_or_path, training_dataset(pairs), config, run_dir / "checkpoints", run_dir / "model"
    )
    trained = names[config.objective_index] if names else None
    write_run_manifest(
        config,
        "dpo",
        model="model",
        beta=config.beta,
        trained_objective=trained,
        objective_index=config.objective_index,
        preference=[1.0 if i == config.objective_index else 0.0 for i in range(len(names))] or None,
        pairs=_pairs_manifest(config),
        prompt_template=config.prompt_template,
        training={"seconds": stats["seconds"], "tokens": stats["tokens"], "stages": {"dpo": stats}},
    )
    return run_dir


def cli(argv: list[str]) -> None:
    config = parse_config(MODPOConfig, argv)
    print(f"MODPO run written to {train(config)}")


def dpo_cli(argv: list[str]) -> None:
    config = parse_config(DPORunConfig, argv)
    print(f"DPO run written to {train_dpo(config)}")


__all__ = [
    "DPORunConfig",
    "DataCollatorForMODPO",
    "MODPOConfig",
    "MODPOTrainer",
    "check_trainer_weights",
    "compute_margins",
    "implicit_rewards",
    "modpo_loss",
    "pairs_from_scores",
    "train",
    "train_dpo",
]
