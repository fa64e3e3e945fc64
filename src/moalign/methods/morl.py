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

Every weight vector trains into `models/w_<weights>` of one run directory; finished weights are skipped when
the command is rerun, and an interrupted one resumes from its newest checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
from trl import GRPOConfig

from moalign import data
from moalign.errors import MoalignError
from moalign.methods.common import (
    CommonArguments,
    finish_stage,
    finished_stage,
    last_checkpoint,
    load_tokenizer,
    lora_config,
    parse_config,
    write_run_manifest,
)
from moalign.methods.ppo import PPOArguments, train_ppo
from moalign.methods.ppo import check_config as check_ppo_config
from moalign.objectives import Objective, build_all
from moalign.pareto import SCALARIZATIONS, scalarize, simplex_grid, validate_weights
from moalign.scores import NormStats, ScoreCache, cache_dir, score

log = logging.getLogger("moalign")

ALGORITHMS = ("rloo", "grpo", "ppo")
NORMALIZATIONS = ("zscore", "none")


@dataclass
class MORLConfig(CommonArguments, PPOArguments, GRPOConfig):
    """TRL's GRPOConfig (KL `beta`, `num_generations`, `max_completion_length`, `temperature`, …) plus the
    scalarised reward, the weight vectors, the algorithm and PPO's own fields."""

    algorithm: str = field(default="rloo", metadata={"help": "rloo | grpo | ppo"})
    scalarization: str = field(default="linear", metadata={"help": f"one of {', '.join(SCALARIZATIONS)}"})
    weights: list[str] = field(
        default_factory=lambda: ["uniform"],
        metadata={"help": "one run per entry: '0.2,0.8', 'grid:D' (simplex grid, D divisions), 'onehot', 'uniform'"},
    )
    normalization: str = field(
        default="zscore", metadata={"help": "zscore: scores z-scored with the training samples' stats; none"}
    )
    normalization_samples: int = field(
        default=0, metadata={"help": "fit the z-score stats on this many random training samples (0: all)"}
    )
    scalarization_temperature: float = field(default=1.0, metadata={"help": "soft_max_min: τ of the softmin"})
    uncertainty_penalty: float = field(default=1.0, metadata={"help": "uncertainty_weighted: λ of the variance"})
    nash_positive: str = field(default="softplus", metadata={"help": "bernoulli_nash: softplus | shift"})
    nash_shift: float = field(default=0.0, metadata={"help": "bernoulli_nash with nash_positive=shift"})
    save_adapter: bool = field(
        default=False, metadata={"help": "with use_peft, save the LoRA adapter instead of the merged model"}
    )
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


def expand_weights(entries: Sequence[Any], n_objectives: int) -> list[np.ndarray]:
    """The weight vectors of a run, validated, duplicates dropped, in the order given."""
    vectors: list[np.ndarray] = []
    for entry in entries or ["uniform"]:
        text = entry.strip() if isinstance(entry, str) else None
        if text == "uniform":
            rows = [np.full(n_objectives, 1.0 / n_objectives)]
        elif text == "onehot":
            rows = list(np.eye(n_objectives))
        elif text is not None and text.startswith("grid"):
            _, _, divisions = text.partition(":")
            if divisions and not divisions.isdigit():
                raise MoalignError(f"weights entry {entry!r}: write grid:D with D a whole number, e.g. grid:4")
            rows = list(simplex_grid(n_objectives, int(divisions or 10)))
        else:
            try:
                values = [float(x) for x in text.split(",")] if text is not None else [float(x) for x in entry]
            except (TypeError, ValueError):
                raise MoalignError(f"weights entry {entry!r}: use '0.2,0.8', 'grid:D', 'onehot' or 'uniform'") from None
            rows = [np.asarray(values)]
        for row in rows:
            w = validate_weights(row, n_objectives)
            if not any(np.allclose(w, v) for v in vectors):
                vectors.append(w)
    return vectors


def preference_dirname(weights: np.ndarray) -> str:
    """models/<this>: the preference in the folder name, e.g. w_0.25_0.75."""
    return "w_" + "_".join(f"{round(float(x), 4):g}" for x in weights)


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

    def normalized(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(raw, normalised) score matrices, one row per sample and one column per objective."""
        scores = score(self.objectives, prompts, responses, progress=False)
        raw = np.column_stack([scores[o.name] for o in self.objectives])
        return raw, (self.stats.zscore(raw) if self.stats is not None else raw)

    def __call__(self, prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
        responses = [c.strip() for c in completions]
        raw, normalized = self.normalized(prompts, responses)
        log_metric = kwargs.get("log_metric")
        if log_metric is not None:  # TRL's hook: per-objective means beside the scalarised reward
            for i, objective in enumerate(self.objectives):
                log_metric(f"objectives/{objective.name}", float(raw[:, i].mean()))
        return scalarize(normalized, self.weights, self.method, **self.options).tolist()


def load_training_data(config: MORLConfig) -> tuple[list[str], datasets.Dataset | None]:
    """The unique training prompts, and the sample/pair dataset (None when the data holds prompts only)."""
    raw = data.load_raw(config.dataset, config.dataset_split)
    if config.max_samples:
        raw = raw.select(range(min(config.max_samples, len(raw))))
    columns = set(raw.column_names)
    if "prompt" in columns and not ({"response"} <= columns or {"chosen", "rejected"} <= columns):
        return list(dict.fromkeys(raw["prompt"])), None
    samples = data.standardize(raw, config.dataset)
    return list(dict.fromkeys(samples["prompt"])), samples


def fit_normalization(
    config: MORLConfig, objectives: list[Objective], samples: datasets.Dataset | None
) -> NormStats | None:
    """z-score statistics of the training samples' scores; score columns named after the objectives are
    used as they are, anything else is scored once (through the score cache)."""
    if config.normalization == "none":
        return None
    if samples is None:
        raise MoalignError(
            f"{config.dataset} holds prompts only: normalization zscore needs responses to fit its statistics "
            "(give samples or pairs, or set normalization: none)"
        )
    names = [o.name for o in objectives]
    if set(names) <= set(samples.column_names) and not data.is_pairs(samples):
        return NormStats.fit({name: np.asarray(samples[name], dtype=float) for name in names}, names)
    prompts, responses = data.to_samples(samples)
    if 0 < config.normalization_samples < len(prompts):  # scoring every sample of a big set costs hours
        picked = np.random.default_rng(config.seed).choice(len(prompts), config.normalization_samples, replace=False)
        prompts, responses = [prompts[i] for i in picked], [responses[i] for i in picked]
    cache = ScoreCache(config.score_cache or cache_dir() / "scores.sqlite")
    return NormStats.fit(score(objectives, prompts, responses, cache), names)


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
        raise MoalignError(f"{config.algorithm}: {str(error).strip().splitlines()[0]}") from None
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=last_checkpoint(stage_dir))
    seconds = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    trainer.accelerator.wait_for_everyone()
    if not trainer.accelerator.is_main_process:  # under `accelerate launch` one process writes the model
        return {}
    model = trainer.accelerator.unwrap_model(trainer.model)
    stats = {
        "seconds": seconds,
        "tokens": int(max((entry.get("num_tokens", 0) for entry in logs), default=0)),
        "steps": trainer.state.global_step,
        "score_first": logs[0]["reward"] if logs else None,
        "score_last": logs[-1]["reward"] if logs else None,
        "kl_last": logs[-1].get("kl") if logs else None,
    }
    return finish_stage(
        model, tokenizer, final_dir, stage_dir, stats, merge=config.use_peft and not config.save_adapter
    )


def train(config: MORLConfig) -> Path:
    """Train one model per weight vector into the run directory and keep its manifest current."""
    check_config(config)
    objectives = build_all(config.objectives)
    weight_list = expand_weights(config.weights, len(objectives))
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    prompts, samples = load_training_data(config)
    if not prompts:
        raise MoalignError(f"{config.dataset} has no prompts")
    stats = fit_normalization(config, objectives, samples)
    method = "morlhf" if config.scalarization == "linear" else "morl"
    options = config.scalarization_options()
    models: list[dict[str, Any]] = []
    stages: dict[str, Any] = {}
    for weights in weight_list:
        name = preference_dirname(weights)
        log.info(f"{method} ({config.algorithm}): training for preference {weights.tolist()}")
        reward = ScalarizedReward(objectives, weights, config.scalarization, options, stats)
        stage_dir, final_dir = run_dir / "checkpoints" / name, run_dir / "models" / name
        if (final_dir / "moalign_stage.json").exists():  # finished in an earlier invocation
            log.info(f"stage {name}: already trained, skipping")
            stages[name] = json.loads((final_dir / "moalign_stage.json").read_text())
        elif config.algorithm == "ppo":
            keep = config.use_peft and config.save_adapter
            stages[name] = train_ppo(config, config.model_name_or_path, prompts, reward, stage_dir, final_dir, keep)
        else:
            stages[name] = train_trl(config, prompts, reward, stage_dir, final_dir)
        models.append({"preference": weights.tolist(), "path": f"models/{name}"})
        # The manifest lists finished models only, so an interrupted run is already usable.
        write_run_manifest(
            config,
            method,
            algorithm=config.algorithm,
            scalarization=config.scalarization,
            scalarization_options=options,
            beta=config.beta,
            normalization={"method": config.normalization, "stats": stats.to_dict() if stats else None},
            models=models,
            training={
                "seconds": sum(s.get("seconds", 0.0) for s in stages.values()),
                "tokens": sum(s.get("tokens", 0) for s in stages.values()),
                "stages": stages,
            },
        )
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return run_dir


def cli(argv: list[str]) -> None:
    config = parse_config(MORLConfig, argv)
    print(f"MORL run written to {train(config)}")
