"""The MODPO and DPO recipes: config, plan, one resumable stage per preference, manifest, command.

moalign dpo   --config FILE.yaml   DPO on one objective's pairs: a margin model and the w = e_j end of the front
moalign modpo --config FILE.yaml   one model per preference, trained on objective k's pairs
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from trl import DPOConfig, DPOTrainer

from moalign import distributed
from moalign.errors import MoalignError
from moalign.methods.common import (
    load_causal_lm,
    load_tokenizer,
    lora_config,
    start_run,
    train_per_preference,
    training_totals,
    write_run_manifest,
)
from moalign.methods.config import CommonArguments, objective_names, parse_config
from moalign.methods.modpo.margins import (
    _dpo_margin_parts,
    cached_margins,
    dpo_run_info,
    margin_flops,
    margin_spec_kind,
)
from moalign.methods.modpo.pairs import PairArguments, load_pairs, pairs_settings, training_dataset
from moalign.methods.modpo.trainer import MARGIN_COLUMNS, MODPOTrainer, check_dpo_config
from moalign.methods.stages import finish_stage, finished_stage, gathered_state_dict, stage_args, train_resumable
from moalign.pareto import parse_preferences
from moalign.policy import FIXED_POLICY, PER_PREFERENCE_POLICY

log = logging.getLogger("moalign")


@dataclass
class MODPOConfig(CommonArguments, PairArguments, DPOConfig):
    """TRL's DPOConfig plus MODPO's preference grid and margin sources."""

    preferences: list[str] = field(
        default_factory=lambda: ["0.1,0.9", "0.5,0.5", "0.9,0.1"],
        metadata={"help": "one model per preference, weights in the order of `objectives`: 0.1,0.9 0.5,0.5 or grid:D"},
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
    if not config.preferences:
        raise MoalignError("preferences is empty: give one or more preference vectors, e.g. 0.5,0.5")
    preferences = parse_preferences(config.preferences, n)
    for w in preferences:
        if w[k] <= 0:
            raise MoalignError(
                f"preference {w.tolist()}: the trained objective's weight (index {k}) must be > 0 (MODPO divides by it)"
            )
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
    return MODPOPlan([o.name for o in objectives], k, specs, preferences.tolist(), built)


def _token_count(trainer, epochs: float | None = None) -> int:
    """Tokens the stage trained on: epochs done (or `epochs`) × the dataset's tokens (prompt counted in both
    sequences)."""
    dataset = trainer.train_dataset
    per_pass = sum(
        2 * len(p) + len(c) + len(r)
        for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])
    )
    return int(((trainer.state.epoch or 0.0) if epochs is None else epochs) * per_pass)


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
    into the saved model unless `save_adapters` (the policy loads either).
    """
    if (done := finished_stage(final_dir)) is not None:
        log.info(f"{final_dir.name}: already trained, skipping")
        return done
    args = stage_args(config, stage_dir)
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, config)
    common = dict(model=model, args=args, processing_class=tokenizer, peft_config=lora_config(config))
    if weights is None:
        plain = dataset.remove_columns([c for c in MARGIN_COLUMNS if c in dataset.column_names])
        trainer = DPOTrainer(train_dataset=plain, **common)
    else:
        trainer = MODPOTrainer(weights=weights, train_dataset=dataset, **common)
    seconds = train_resumable(trainer, stage_dir)
    stats = {
        "seconds": seconds,
        "tokens": _token_count(trainer),
        # the reference's forward: one pass over the pairs when precomputed, else beside every trained token
        "forward_tokens": _token_count(trainer, 1.0 if config.precompute_ref_log_probs else None),
        "steps": trainer.state.global_step,
        "pairs": len(dataset),
    }
    if weights is not None:
        stats["weights"] = list(weights)
    # merged: one plain model; adapters: the policy loads base + adapter
    merge = config.use_peft and not config.save_adapters
    return finish_stage(trainer.model, tokenizer, final_dir, stage_dir, stats, merge, gathered_state_dict(trainer))


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
    """Validate, compute the margins once, then one resumable MODPO model per preference."""
    plan = plan_modpo(config)
    run_dir = start_run(config, "modpo")
    start = time.perf_counter()
    with distributed.main_first():  # the main process scores and caches the margins; the others read them
        pairs = load_pairs(config, plan.names)
        margin_c, margin_r, stats = cached_margins(config, plan.margin_specs, plan.objectives, pairs, run_dir)
    margin_seconds = time.perf_counter() - start
    flops = margin_flops(pairs, plan.margin_specs, config, plan.objectives)
    dataset = training_dataset(pairs, (margin_c, margin_r))
    ends = _end_entries(config, plan, run_dir)

    def train_one(preference: Sequence[float], stage_dir: Path, final_dir: Path) -> dict[str, Any]:
        weights = plan.trainer_weights(preference)
        return train_preference_stage(config.model_name_or_path, dataset, config, stage_dir, final_dir, weights)

    def write(models: list[dict[str, Any]], stages: dict[str, Any], complete: bool) -> None:
        write_run_manifest(
            config,
            "modpo",
            PER_PREFERENCE_POLICY,
            complete=complete,
            models=[{**m, "source": "modpo"} for m in models] + ends,
            stats=stats,
            trained_objective=plan.names[plan.k],
            objective_index=plan.k,
            margin_objectives=plan.margin_specs,
            margin_objective_names=[plan.names[i] for i in plan.other_indices],
            beta=config.beta,
            pairs=pairs_settings(config),
            prompt_template=config.prompt_template,
            training=training_totals({"margins": {"seconds": margin_seconds, "flops": flops}, **stages}),
        )

    train_per_preference(plan.preferences, run_dir, train_one, on_trained=write)
    distributed.remove(run_dir / "checkpoints")
    return run_dir


def train_dpo(config: DPORunConfig) -> Path:
    """Plain DPO (TRL's DPOTrainer) on objective k's pairs; the run is a MODPO margin model (dpo:RUN)."""
    check_dpo_config(config)
    names = objective_names(config.objectives) if config.objectives else []
    if names and not 0 <= config.objective_index < len(names):
        raise MoalignError(f"objective_index {config.objective_index} is out of range for {len(names)} objectives")
    run_dir = start_run(config, "dpo")
    pairs = load_pairs(config, names)
    stats = train_preference_stage(
        config.model_name_or_path, training_dataset(pairs), config, run_dir / "checkpoints", run_dir / "model"
    )
    trained = names[config.objective_index] if names else None
    write_run_manifest(
        config,
        "dpo",
        FIXED_POLICY,
        model="model",
        beta=config.beta,
        trained_objective=trained,
        objective_index=config.objective_index,
        preference=[1.0 if i == config.objective_index else 0.0 for i in range(len(names))] or None,
        pairs=pairs_settings(config),
        prompt_template=config.prompt_template,
        training=training_totals({"dpo": stats}),
    )
    return run_dir


def cli(argv: list[str]) -> None:
    config = parse_config(MODPOConfig, argv)
    print(f"MODPO run written to {train(config)}")


def dpo_cli(argv: list[str]) -> None:
    config = parse_config(DPORunConfig, argv)
    print(f"DPO run written to {train_dpo(config)}")
