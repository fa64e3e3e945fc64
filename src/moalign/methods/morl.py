"""MORLHF and MORLAIF: RL of the policy on a scalarised multi-objective reward, with a KL penalty to π_ref.

Usage: moalign morl --config configs/morlhf_demo.yaml [--flag value ...]

The reward of a response is `scalarize(r̂, w, scalarization)` of its objectives' scores r̂, each z-scored
with statistics fitted on the training data's samples (saved in the manifest). With `scalarization: linear`
and one run per weight vector of a grid this is the MORLHF baseline; the non-linear scalarisations are
MORLAIF's. Three algorithms share that reward:
- `rloo` and `grpo`: TRL's trainers, given ONE reward function that scores every objective and returns the
  scalarised value (TRL only combines several reward functions linearly); per-objective means are logged
  through TRL's `log_metric` hook rather than by scoring twice;
- `ppo`: moalign's own PPO with a value head and GAE (`moalign.methods.ppo`), the papers' algorithm.

Every preference trains into `models/w0.2-0.8` of one run directory; finished preferences are skipped when
the command is rerun, and an interrupted one resumes from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from trl import GRPOConfig

from moalign import data, distributed
from moalign.errors import MoalignError, first_line
from moalign.methods.common import (
    load_tokenizer,
    lora_config,
    score_cache,
    start_run,
    train_per_preference,
    training_totals,
    write_run_manifest,
)
from moalign.methods.config import CommonArguments, parse_config
from moalign.methods.ppo import PPOArguments, train_ppo
from moalign.methods.ppo import check_config as check_ppo_config
from moalign.methods.stages import finish_stage, finished_stage, train_resumable
from moalign.objectives import Objective, build_all
from moalign.pareto import SCALARIZATIONS, parse_preferences, scalarize
from moalign.policy import PER_PREFERENCE_POLICY
from moalign.scores import NormStats, score

log = logging.getLogger("moalign")

ALGORITHMS = ("rloo", "grpo", "ppo")
NORMALIZATIONS = ("zscore", "none")


@dataclass
class MORLConfig(CommonArguments, PPOArguments, GRPOConfig):
    """TRL's GRPOConfig (KL `beta`, `num_generations`, `max_completion_length`, `temperature`, …) plus the
    scalarised reward, the weight vectors, the algorithm and PPO's own fields."""

    algorithm: str = field(default="rloo", metadata={"help": "rloo | grpo | ppo"})
    scalarization: str = field(default="linear", metadata={"help": f"one of {', '.join(SCALARIZATIONS)}"})
    preferences: list[str] = field(
        default_factory=lambda: ["uniform"],
        metadata={"help": "one model per entry: '0.2,0.8', 'grid:D' (simplex grid, D divisions), 'onehot', 'uniform'"},
    )
    normalization: str = field(
        default="zscore", metadata={"help": "zscore: scores z-scored with the training samples' stats; none"}
    )
    normalization_samples: int = field(
        default=0, metadata={"help": "fit the z-score stats on this many random training samples (0: all)"}
    )
    scalarization_temperature: float = field(default=1.0, metadata={"help": "soft_max_min: τ of the softmin"})
    # MORLAIF's reference implementation penalises the variance with λ = 0.5 (Williams, 2024).
    uncertainty_penalty: float = field(default=0.5, metadata={"help": "uncertainty_weighted: λ of the variance"})
    nash_positive: str = field(default="softplus", metadata={"help": "bernoulli_nash: softplus | shift"})
    nash_shift: float = field(default=0.0, metadata={"help": "bernoulli_nash with nash_positive=shift"})
    # RLOOConfig's two fields that GRPOConfig lacks, passed on when algorithm is rloo.
    normalize_advantages: bool = field(default=False, metadata={"help": "rloo: whiten the advantages"})
    reward_clip_range: tuple[float, float] | None = field(default=None, metadata={"help": "rloo: clip rewards"})
    # The MORLHF objective is max E[wᵀr] − β·KL, so a KL penalty is on by default (GRPO's default is 0).
    beta: float = field(default=0.05, metadata={"help": "KL coefficient to the reference policy"})

    def __post_init__(self) -> None:
        if self.algorithm != "ppo":
            super().__post_init__()
            return
        # GRPOConfig checks that its generation batch holds whole groups of num_generations completions;
        # PPO samples one completion per prompt, so the check is satisfied for it and the value restored.
        rollout = self.per_device_train_batch_size * self.gradient_accumulation_steps
        if rollout < 2:
            raise ValueError("ppo needs rollouts of ≥ 2 prompts: raise per_device_train_batch_size")
        user_value, self.num_generations = self.num_generations, rollout
        super().__post_init__()
        self.num_generations = user_value

    def scalarization_options(self) -> dict[str, Any]:
        return {
            "temperature": self.scalarization_temperature,
            "uncertainty_penalty": self.uncertainty_penalty,
            "positive": self.nash_positive,
            "shift": self.nash_shift,
        }


class ScalarizedReward:
    """The RL reward of one weight vector: every objective scores each response, the scores are
    normalised, and one scalarisation per sample turns them into one number."""

    def __init__(
        self,
        objectives: list[Objective],
        weights: np.ndarray,
        method: str,
        options: dict[str, Any],
        stats: NormStats | None,
    ):
        self.objectives, self.weights, self.method, self.options, self.stats = (
            objectives,
            weights,
            method,
            options,
            stats,
        )
        self.__name__ = f"scalarized_{method}"  # TRL names the reward's log columns after this
        # what this process's calls cost, for the stage's FLOPs (moalign.cost): tokens model-based objectives
        # read, and the tokens TRL's trainers generated (they pass `completion_ids`)
        self.scoring_flops, self.generated_tokens = 0.0, 0

    def normalized(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(raw, normalised) score matrices, one row per sample and one column per objective."""
        from moalign.cost import scoring_flops

        scores = score(self.objectives, prompts, responses, progress=False)
        self.scoring_flops += scoring_flops(self.objectives, prompts, responses)
        raw = np.column_stack([scores[o.name] for o in self.objectives])
        return raw, (self.stats.zscore(raw) if self.stats is not None else raw)

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        responses = [c.strip() for c in completions]
        raw, normalized = self.normalized(prompts, responses)
        self.generated_tokens += sum(len(ids) for ids in kwargs.get("completion_ids") or ())
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:  # TRL's hook: per-objective means beside the scalarised reward
            for i, objective in enumerate(self.objectives):
                log_metric(f"objectives/{objective.name}", float(raw[:, i].mean()))
        return scalarize(normalized, self.weights, self.method, **self.options).tolist()


def load_training_data(config: MORLConfig) -> tuple[list[str], datasets.Dataset | None]:
    """The unique training prompts, and the sample/pair dataset (None when the data holds prompts only)."""
    raw = data.head(data.load_raw(config.dataset, config.dataset_split), config.max_samples)
    columns = set(raw.column_names)
    if "prompt" in columns and not ({"response"} <= columns or {"chosen", "rejected"} <= columns):
        return list(dict.fromkeys(raw["prompt"])), None
    samples = data.standardize(raw, config.dataset)
    return list(dict.fromkeys(samples["prompt"])), samples


def fit_normalization(
    config: MORLConfig, objectives: list[Objective], samples: datasets.Dataset | None
) -> tuple[NormStats | None, float]:
    """z-score statistics of the training samples' scores; score columns named after the objectives are
    used as they are, anything else is scored once (through the score cache). Also returns that scoring's FLOPs
    (moalign.cost; model-based objectives only)."""
    if config.normalization == "none":
        return None, 0.0
    if samples is None:
        raise MoalignError(
            f"{config.dataset} holds prompts only: normalization zscore needs responses to fit its statistics "
            "(give samples or pairs, or set normalization: none)"
        )
    names = [o.name for o in objectives]
    if set(names) <= set(samples.column_names) and not data.is_pairs(samples):
        return NormStats.fit({name: np.asarray(samples[name], dtype=float) for name in names}, names), 0.0
    prompts, responses = data.to_samples(samples)
    if 0 < config.normalization_samples < len(prompts):  # scoring every sample of a big set costs hours
        picked = np.random.default_rng(config.seed).choice(len(prompts), config.normalization_samples, replace=False)
        prompts, responses = [prompts[i] for i in picked], [responses[i] for i in picked]
    from moalign.cost import scoring_flops

    fitted = NormStats.fit(score(objectives, prompts, responses, score_cache(config)), names)
    return fitted, scoring_flops(objectives, prompts, responses)


def check_config(config: MORLConfig) -> None:
    """Settings a user can get wrong, reported in one line before anything loads."""
    if config.algorithm not in ALGORITHMS:
        raise MoalignError(f"unknown algorithm {config.algorithm!r}; choose one of {', '.join(ALGORITHMS)}")
    if config.scalarization not in SCALARIZATIONS:
        raise MoalignError(f"unknown scalarisation {config.scalarization!r}; choose one of {', '.join(SCALARIZATIONS)}")
    if config.normalization not in NORMALIZATIONS:
        raise MoalignError(f"unknown normalization {config.normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")
    if config.nash_positive not in {"softplus", "shift"}:
        raise MoalignError(f"nash_positive={config.nash_positive!r}: use 'softplus' or 'shift'")
    if config.scalarization_temperature <= 0:
        raise MoalignError("scalarization_temperature must be > 0")
    if config.algorithm in {"rloo", "grpo"} and (config.num_generations or 0) < 2:
        raise MoalignError(f"{config.algorithm} compares completions of one prompt: num_generations must be ≥ 2")
    if config.algorithm == "ppo":
        check_ppo_config(config)


def trl_args(config: MORLConfig, config_class: type, output_dir: Path):
    """TRL's own config for one stage, carrying every field it shares with the moalign config."""
    names = {f.name for f in dataclasses.fields(config_class) if f.init}
    values = {name: getattr(config, name) for name in names if hasattr(config, name)}
    # The generation batch is derived again from steps_per_generation (setting both is an error in TRL).
    values.update(output_dir=str(output_dir), generation_batch_size=None)
    return config_class(**values)


def train_trl(
    config: MORLConfig, prompts: list[str], reward: ScalarizedReward, stage_dir: Path, final_dir: Path
) -> dict[str, Any]:
    """One resumable RLOO or GRPO stage through TRL's trainer; skipped when `final_dir` is complete."""
    from trl import GRPOTrainer, RLOOConfig, RLOOTrainer

    if (done := finished_stage(final_dir)) is not None:
        log.info(f"stage {final_dir.name}: already trained, skipping")
        return done
    trainer_class, config_class = {"rloo": (RLOOTrainer, RLOOConfig), "grpo": (GRPOTrainer, GRPOConfig)}[
        config.algorithm
    ]
    tokenizer = load_tokenizer(config.model_name_or_path)
    try:
        trainer = trainer_class(
            model=config.model_name_or_path,
            reward_funcs=reward,
            args=trl_args(config, config_class, stage_dir),
            train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
            processing_class=tokenizer,
            peft_config=lora_config(config),
        )
    except ValueError as error:
        raise MoalignError(f"{config.algorithm}: {first_line(error)}") from None
    seconds = train_resumable(trainer, stage_dir)
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    model = trainer.accelerator.unwrap_model(trainer.model)
    args = trainer.args
    # What moalign.cost counts, as TRL's trainers run it: every generated batch (prompt + completion tokens,
    # `num_input_tokens_seen`, over all ranks) is trained `num_iterations` times and read once more by the
    # reference when beta ≠ 0, and by the old policy when RLOO always (its importance ratio) or GRPO's
    # generation and optimiser steps are out of step.
    tokens = int(trainer.state.num_input_tokens_seen)
    generated = sum(distributed.gather([reward.generated_tokens]))
    old_pass = config.algorithm == "rloo" or args.gradient_accumulation_steps % (
        args.steps_per_generation * args.num_iterations
    )
    stats = {
        "seconds": seconds,
        "tokens": tokens,
        "trained_tokens": args.num_iterations * tokens,
        "forward_tokens": (bool(old_pass) + (args.beta != 0.0)) * tokens,
        "generated_tokens": generated,
        "prefill_tokens": tokens - generated,
        "scoring_flops": sum(distributed.gather([reward.scoring_flops])),
        "steps": trainer.state.global_step,
        "score_first": logs[0]["reward"] if logs else None,
        "score_last": logs[-1]["reward"] if logs else None,
        "kl_last": logs[-1].get("kl") if logs else None,
    }
    return finish_stage(
        model, tokenizer, final_dir, stage_dir, stats, merge=config.use_peft and not config.save_adapters
    )


def train(config: MORLConfig) -> Path:
    """Train one model per preference into the run directory and keep its manifest current."""
    check_config(config)
    objectives = build_all(config.objectives)
    preferences = parse_preferences(config.preferences, len(objectives))
    run_dir = start_run(config, "morlhf" if config.scalarization == "linear" else "morl")
    prompts, samples = load_training_data(config)
    if not prompts:
        raise MoalignError(f"{config.dataset} has no prompts")
    stats, normalisation_flops = distributed.run_on_main(fit_normalization, config, objectives, samples)  # once
    # the normalisation's scoring as a stage of its own when a model-based objective did it
    fitted = {"normalisation": {"flops": normalisation_flops}} if normalisation_flops else {}
    method = "morlhf" if config.scalarization == "linear" else "morl"
    options = config.scalarization_options()

    def train_one(preference: np.ndarray, stage_dir: Path, final_dir: Path) -> dict[str, Any]:
        if (done := finished_stage(final_dir)) is not None:
            log.info(f"stage {final_dir.name}: already trained, skipping")
            return done
        log.info(f"{method} ({config.algorithm}): training for preference {preference.tolist()}")
        reward = ScalarizedReward(objectives, preference, config.scalarization, options, stats)
        if config.algorithm == "ppo":
            keep = config.use_peft and config.save_adapters
            return train_ppo(config, config.model_name_or_path, prompts, reward, stage_dir, final_dir, keep)
        return train_trl(config, prompts, reward, stage_dir, final_dir)

    def write(models: list[dict[str, Any]], stages: dict[str, Any], complete: bool) -> None:
        write_run_manifest(
            config,
            method,
            PER_PREFERENCE_POLICY,
            complete=complete,
            algorithm=config.algorithm,
            scalarization=config.scalarization,
            scalarization_options=options,
            beta=config.beta,
            normalization={"method": config.normalization, "stats": stats.to_dict() if stats else None},
            models=models,
            training=training_totals({**fitted, **stages}),
        )

    train_per_preference(preferences, run_dir, train_one, on_trained=write)
    distributed.remove(run_dir / "checkpoints")
    return run_dir


def cli(argv: list[str]) -> None:
    config = parse_config(MORLConfig, argv)
    print(f"MORL run written to {train(config)}")
