"""Rewards-in-Context (Yang et al., ICML 2024): one model, SFT only, steered by rewards in its prompt.

Usage: moalign ric --config configs/ric_demo.yaml [--flag value ...]

Stages, each resumable (a finished stage is skipped, an interrupted one resumes from its checkpoint):
  prepare   score every sample (both responses of a pair), z-score statistics, reward-in-context data
  offline   SFT on the reward-conditioned data, loss on the response only
  online_k  multi-objective rejection sampling (MORS): sample targets, generate, score, relabel with the
            scores obtained, keep samples with any objective ≥ its q-quantile, mix filtered offline data,
            continue SFT
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
from trl import SFTConfig

from moalign import data, distributed
from moalign.cost import scoring_flops
from moalign.errors import MoalignError
from moalign.methods.common import (
    generate_with_model,
    load_training_data,
    sampling_params,
    score_cache,
    start_run,
    training_totals,
    write_run_manifest,
)
from moalign.methods.config import CommonArguments, parse_config
from moalign.methods.ric.conditioning import (
    MAPPINGS,
    RewardTemplate,
    format_prompt,
    mapping_settings,
    mors_filter,
    sample_targets,
)
from moalign.methods.stages import finished_stage, train_sft
from moalign.objectives import build_all
from moalign.run import atomic_write_parquet, read_json, write_json
from moalign.scores import NormStats, score

log = logging.getLogger("moalign")


@dataclass
class RiCConfig(CommonArguments, SFTConfig):
    """TRL's SFTConfig plus RiC's options (the paper's values are the defaults where it gives them)."""

    reward_tags: list[str] | None = field(default=None, metadata={"help": "tags per objective; default <name>"})
    number_format: str = field(default="{:.1f}", metadata={"help": "how a reward is written (paper: 1 decimal)"})
    preference_mapping: str = field(default="linf", metadata={"help": "linf (paper), l2, linear or quantile"})
    online_iterations: int = field(default=2, metadata={"help": "MORS iterations K (paper: 2)"})
    online_prompts: int = field(default=20000, metadata={"help": "responses generated per online iteration"})
    online_quantile: float = field(default=0.7, metadata={"help": "keep samples with any objective ≥ this quantile"})
    offline_mix_samples: int = field(
        default=10000, metadata={"help": "filtered offline samples mixed in per iteration"}
    )
    online_max_steps: int = field(default=-1, metadata={"help": "max steps of each online SFT (-1: epochs)"})
    online_learning_rate: float = field(default=1e-5, metadata={"help": "learning rate of the online stages"})
    online_lr_scheduler_type: str = field(default="constant", metadata={"help": "scheduler of the online stages"})
    online_drop_degenerate: bool = field(
        default=True, metadata={"help": "drop collapsed generations (moalign.data.is_degenerate) before MORS"}
    )
    online_min_words: int = field(
        default=3,
        metadata={"help": "with online_drop_degenerate, shorter answers count as collapsed (1 keeps short ones)"},
    )
    generation_batch_size: int = 64


def _template(config: RiCConfig, names: list[str]) -> RewardTemplate:
    tags = config.reward_tags or [f"<{name}>" for name in names]
    if len(tags) != len(names):
        raise MoalignError(f"reward_tags has {len(tags)} tags for {len(names)} objectives")
    return RewardTemplate(tags=list(tags), number_format=config.number_format)


def _validate(config: RiCConfig) -> None:
    if len(config.objectives) < 2:
        raise MoalignError("RiC needs at least two objectives (objectives: [spec, spec, ...])")
    if config.preference_mapping not in MAPPINGS:
        raise MoalignError(f"preference_mapping must be one of {', '.join(MAPPINGS)}")
    if not 0.0 <= config.online_quantile <= 1.0:
        raise MoalignError("online_quantile must be in [0, 1]")
    if config.online_iterations < 0:
        raise MoalignError("online_iterations must be ≥ 0")


def _conditioned(frame: pd.DataFrame, names: list[str], template: RewardTemplate) -> datasets.Dataset:
    """prompt/completion rows whose prompts carry the samples' normalised scores."""
    z = frame[[f"z_{name}" for name in names]].to_numpy()
    prompts = [format_prompt(p, row, template) for p, row in zip(frame["prompt"], z)]
    return datasets.Dataset.from_dict({"prompt": prompts, "completion": [" " + r for r in frame["response"]]})


class RiCRecipe:
    """The stages of one RiC run, sharing the objectives, statistics and template."""

    def __init__(self, config: RiCConfig):
        _validate(config)
        self.config = config
        self.run_dir = Path(config.output_dir)
        self.objectives = build_all(config.objectives)
        self.names = [o.name for o in self.objectives]
        self.template = _template(config, self.names)
        self.cache = score_cache(config)
        self.stages: dict[str, Any] = {}

    def record(self, name: str, stats: dict[str, Any] | None = None) -> None:
        """Keep a data stage's statistics beside its data, so a resumed run's manifest still has them."""
        path = self.run_dir / "data" / f"{name}.json"
        if stats is not None:
            write_json(path, stats)
        if path.exists():
            self.stages[name] = read_json(path)

    def prepare(self) -> pd.DataFrame:
        path = self.run_dir / "data" / "offline.parquet"
        if path.exists():
            self.record("prepare")
            return pd.read_parquet(path)
        start = time.perf_counter()
        prompts, responses = data.to_samples(load_training_data(self.config))
        raw = score(self.objectives, prompts, responses, cache=self.cache)
        stats = NormStats.fit(raw, self.names)
        z = stats.zscore(stats.matrix(raw))
        frame = pd.DataFrame({"prompt": prompts, "response": responses})
        for i, name in enumerate(self.names):
            frame[name] = raw[name]
            frame[f"z_{name}"] = z[:, i]
        atomic_write_parquet(frame, path)
        flops = scoring_flops(self.objectives, prompts, responses)  # model-based objectives (moalign.cost)
        self.record("prepare", {"seconds": time.perf_counter() - start, "samples": len(frame), "flops": flops})
        return frame

    def stats(self, offline: pd.DataFrame) -> NormStats:
        return NormStats.fit(offline, self.names)

    def offline_stage(self, offline: pd.DataFrame) -> Path:
        final = self.run_dir / "stages" / "offline"
        self.stages["offline"] = train_sft(
            self.config.model_name_or_path,
            _conditioned(offline, self.names, self.template),
            self.config,
            self.run_dir / "checkpoints" / "offline",
            final,
        )
        return final

    def online_stage(self, k: int, model_dir: Path, offline: pd.DataFrame, stats: NormStats) -> Path:
        config = self.config
        name = f"online_{k}"
        generated_path = self.run_dir / "data" / f"{name}.parquet"
        final = self.run_dir / "stages" / name
        if (done := finished_stage(final)) is not None:
            self.record(f"generate_{k}")
            self.stages[name] = done
            return final
        z_offline = offline[[f"z_{n}" for n in self.names]].to_numpy()
        low, high = z_offline.min(axis=0), z_offline.max(axis=0)
        if not generated_path.exists():
            prompts, completions, generation = self.generate_online(k, model_dir, offline, low, high)
            distributed.run_on_main(self.label_online, k, prompts, completions, generation, stats)
            distributed.remove(self.run_dir / "data" / f"{name}_chunks")
        self.record(f"generate_{k}")
        # The buffer grows: every earlier iteration's kept samples stay in.
        buffer = pd.concat([pd.read_parquet(self.run_dir / "data" / f"online_{j}.parquet") for j in range(1, k + 1)])
        buffer = buffer[buffer["kept"]]
        keep_offline = mors_filter(z_offline, config.online_quantile)
        pool = offline[keep_offline]
        n_mix = min(len(pool), config.offline_mix_samples)
        mix = pool.sample(n=n_mix, random_state=config.seed + k) if n_mix else pool.iloc[:0]
        columns = ["prompt", "response"] + [f"z_{n}" for n in self.names]
        train = pd.concat([buffer[columns], mix[columns]])
        if len(train) == 0:
            raise MoalignError(f"online iteration {k} kept no samples; lower online_quantile or raise online_prompts")
        overrides: dict[str, Any] = {
            "max_steps": config.online_max_steps,
            "learning_rate": config.online_learning_rate,
            "lr_scheduler_type": config.online_lr_scheduler_type,
        }
        self.stages[name] = train_sft(
            str(model_dir),
            _conditioned(train.sample(frac=1.0, random_state=config.seed + k), self.names, self.template),
            config,
            self.run_dir / "checkpoints" / name,
            final,
            **overrides,
        )
        self.stages[name].update(kept=int(len(buffer)), offline_mixed=int(n_mix))
        return final

    def generate_online(
        self, k: int, model_dir: Path, offline: pd.DataFrame, low: np.ndarray, high: np.ndarray
    ) -> tuple[list[str], list[Any], dict[str, Any]]:
        """Generate for sampled targets, in chunks saved as they finish and shared out between ranks."""
        config = self.config
        rng = np.random.default_rng(config.seed + 1000 * k)
        unique_prompts = offline["prompt"].unique()
        prompts = list(rng.choice(unique_prompts, size=config.online_prompts, replace=True))
        targets = sample_targets(len(prompts), low, high, rng)
        # Stop at a turn the model invents ("\n\nHuman: ..."): it is not part of the answer to score and train on.
        params = [
            sampling_params(config, seed=config.seed + 100_000 * k + i, stop=data.TURN_MARKERS)
            for i in range(len(prompts))
        ]
        conditioned = [format_prompt(p, t, self.template) for p, t in zip(prompts, targets)]
        completions, generation = generate_with_model(
            self.run_dir / "data" / f"online_{k}_chunks", conditioned, params, model_dir, config
        )
        return prompts, completions, generation

    def label_online(
        self, k: int, prompts: list[str], completions: list[Any], generation: dict[str, Any], stats: NormStats
    ) -> None:
        """Drop degenerate responses, score, relabel (hindsight), filter; written by the main process."""
        config = self.config
        responses = [c.text.strip() for c in completions]
        fine = [
            i
            for i, r in enumerate(responses)
            if not (config.online_drop_degenerate and data.is_degenerate(r, config.online_min_words))
        ]
        frame = pd.DataFrame({"prompt": [prompts[i] for i in fine], "response": [responses[i] for i in fine]})
        raw = score(self.objectives, frame["prompt"], frame["response"], cache=self.cache)
        z = stats.zscore(stats.matrix(raw))  # hindsight relabelling with the offline statistics
        for i, name in enumerate(self.names):
            frame[name] = raw[name]
            frame[f"z_{name}"] = z[:, i]
        frame["kept"] = mors_filter(z, config.online_quantile)
        log.info(
            f"online {k}: generated {len(prompts)} in {generation['seconds']:.1f}s, "
            f"{len(prompts) - len(fine)} degenerate, kept {int(frame['kept'].sum())}"
        )
        atomic_write_parquet(frame, self.run_dir / "data" / f"online_{k}.parquet")
        self.record(
            f"generate_{k}",
            {
                **generation,
                # the generation's FLOPs and the model-based objectives' scoring of its usable answers (moalign.cost)
                "flops": generation.get("flops", 0.0)
                + scoring_flops(self.objectives, frame["prompt"], frame["response"]),
                "generated": len(prompts),
                "degenerate": len(prompts) - len(fine),
                "kept": int(frame["kept"].sum()),
            },
        )

    def run(self) -> Path:
        start_run(self.config, "ric")
        with distributed.main_first():  # the main process scores and caches; the others read its cache
            offline = self.prepare()
        stats = self.stats(offline)
        model_dir = self.offline_stage(offline)
        stage_models = {"offline": str(model_dir.relative_to(self.run_dir))}
        for k in range(1, self.config.online_iterations + 1):
            model_dir = self.online_stage(k, model_dir, offline, stats)
            stage_models[f"online_{k}"] = str(model_dir.relative_to(self.run_dir))
        z = offline[[f"z_{n}" for n in self.names]].to_numpy()
        write_run_manifest(
            self.config,
            "ric",
            "moalign.methods.ric.policy:RiCPolicy",
            model=str(model_dir.relative_to(self.run_dir)),
            stage_models=stage_models,
            stats=stats.to_dict(),
            ric=mapping_settings(self.template, self.config.preference_mapping, z),
            training=training_totals(self.stages),
        )
        return self.run_dir


def train(config: RiCConfig) -> Path:
    return RiCRecipe(config).run()


def cli(argv: list[str]) -> None:
    config = parse_config(RiCConfig, argv)
    print(f"RiC run written to {train(config)}")
