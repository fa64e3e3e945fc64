"""What every method's recipe shares beyond config and stages: models and LoRA, sampling and generation stages,
training data, the score cache, the run directory, the per-preference loop and the manifest."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moalign import distributed
from moalign.errors import MoalignError, first_line
from moalign.methods.config import CommonArguments, objective_names
from moalign.run import atomic_write_text

log = logging.getLogger("moalign")


def load_tokenizer(path: str):
    from moalign.models import load_tokenizer as load

    return load(path)


def load_causal_lm(path: str, config: Any = None, trainable: bool = False):
    """A causal LM with the config's loading options (dtype, attention, 4/8-bit, device_map, TRL's
    model_init_kwargs); an adapter folder loads onto its base, kept as a trainable adapter with `trainable`.
    The Trainer moves it where it trains."""
    from moalign.models import ModelOptions, load_pretrained

    return load_pretrained(path, ModelOptions.from_config(config) if config is not None else None, trainable=trainable)


def lora_config(config: CommonArguments, task_type: str = "CAUSAL_LM"):
    """PEFT's LoRA config from the method config, or None for full fine-tuning.

    For a classifier pass task_type="SEQ_CLS": PEFT then trains the new score head in full beside the
    adapters."""
    if not config.use_peft:
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target_modules or "all-linear",
        task_type=task_type,
    )


def sampling_fields(config: CommonArguments) -> dict[str, Any]:
    """The decoding settings a run's policy uses by default (stored in the manifest)."""
    return {
        "max_new_tokens": config.sample_max_new_tokens,
        "temperature": config.sample_temperature,
        "top_p": config.sample_top_p,
    }


def sampling_params(config: CommonArguments, seed: int = 0, stop: Sequence[str] = ()):
    """`SamplingParams` for a method's own generation (RiC's MORS, ParetoHqD's stage 2, RL rollouts)."""
    from moalign.generation import SamplingParams

    return SamplingParams(**sampling_fields(config), seed=seed, stop=list(stop))


def generate_stage(
    folder: Path,
    prompts: Sequence[str],
    params: Sequence[Any],
    complete: Callable[[list[str], list[Any]], list[Any]],
    chunk_size: int = 256,
    key: Any = None,
    model_path: str | Path | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """A generation stage (RiC's MORS, ParetoHqD's stage 2, evaluation): `complete(prompts, params)` over
    every prompt, in chunks saved to `folder` as they are done and shared out between ranks.

    A rerun after a kill generates only the missing chunks (same prompts, settings and `key`, e.g. the
    model's path); rows are seeded one by one, so the completions do not depend on the chunking or on
    which rank made them. Returns the completions in the prompts' order, on every rank, and the stage's
    statistics (seconds summed over every invocation's chunks, tokens, the main process's wait; with the
    generating model's `model_path`, its FLOPs: 2·N per prompt and generated token, `moalign.cost`).
    """
    from moalign.generation import Completion

    def work(start: int, stop: int) -> list[dict[str, Any]]:
        return [dataclasses.asdict(c) for c in complete(list(prompts[start:stop]), list(params[start:stop]))]

    key = distributed.fingerprint(list(prompts), [vars(p) for p in params], key)
    rows, stats = distributed.map_chunks(folder, len(prompts), work, key, chunk_size)
    completions = [Completion(**row) for row in rows]
    stats["tokens"] = sum(len(c.token_ids) for c in completions)
    if model_path is not None:
        from moalign.cost import size_from_config

        stats["prefill_tokens"] = sum(c.prompt_tokens for c in completions)
        stats["generated_tokens"] = stats["tokens"]
        per_token = size_from_config(str(model_path)).forward_per_token
        stats["flops"] = per_token * (stats["prefill_tokens"] + stats["generated_tokens"])
    return completions, stats


def model_completer(path: str | Path, config: Any) -> Callable[[list[str], list[Any]], list[Any]]:
    """`complete` for `generate_stage`: the model at `path` on this rank's device, loaded at the first chunk
    this rank generates (a resumed stage with every chunk done loads nothing), `config.generation_batch_size`
    rows at a time. With `generation_backend: openai` the rows go to the server at `generation_base_url`
    instead, asking for the model by its absolute path (`transformers serve` loads any local folder so)."""
    from moalign import generation
    from moalign.engines import engine_from

    engine = engine_from(config.generation_backend, config.generation_base_url)
    if engine is not None:
        return engine.completer(str(Path(path).resolve()))
    batch_size = config.generation_batch_size
    loaded: list[Any] = []

    def complete(prompts: list[str], params: list[Any]) -> list[Any]:
        if not loaded:
            loaded.extend(generation.load_model(str(path), device=distributed.device()))
        model, tokenizer = loaded
        return generation.generate(model, tokenizer, prompts, params, batch_size=batch_size)

    return complete


def generate_with_model(
    folder: Path, prompts: Sequence[str], params: Sequence[Any], model_dir: Path, config: Any
) -> tuple[list[Any], dict[str, Any]]:
    """`generate_stage` with the model a method just trained (RiC's MORS, ParetoHqD's stage 2): chunks keyed by
    the model's path, FLOPs counted at its size."""
    return generate_stage(
        folder,
        prompts,
        params,
        model_completer(model_dir, config),
        config.generation_chunk_size,
        key=str(model_dir),
        model_path=model_dir,
    )


def load_training_data(config: CommonArguments):
    """The method's dataset in moalign's standard columns, cut to `max_samples` rows."""
    from moalign import data

    return data.head(data.load(config.dataset, config.dataset_split), config.max_samples)


def score_cache(config: CommonArguments):
    """The SQLite score cache the config names, else the user's cache: a text is never scored twice."""
    from moalign.scores import ScoreCache, cache_dir

    return ScoreCache(config.score_cache or cache_dir() / "scores.sqlite")


def check_model_source(path: str) -> None:
    """A local model folder that holds a model (or a LoRA adapter), or a hub id the cache knows: else one line."""
    local = Path(path).expanduser()
    if local.exists():
        if not ((local / "config.json").exists() or (local / "adapter_config.json").exists()):
            raise MoalignError(f"model {path} has no config.json: give a saved model or adapter folder")
        return
    if path.startswith((".", "/", "~")):
        raise MoalignError(f"model path {path} does not exist")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise MoalignError(f"cannot load model {path} ({first_line(error)})") from None


def start_run(config: CommonArguments, method: str) -> Path:
    """The run directory, claimed for this method and config: a rerun with other settings refuses in one line."""
    from moalign.run import claim_run_dir, result_settings

    check_model_source(config.model_name_or_path)  # before scoring a whole dataset for a model that is not there
    settings, overwrite = result_settings(config), getattr(config, "overwrite", False)
    return distributed.run_on_main(claim_run_dir, config.output_dir, method, settings, overwrite)


def train_per_preference(
    preferences: Sequence[Sequence[float]],
    run_dir: Path,
    train_one: Callable[[Sequence[float], Path, Path], dict[str, Any]],
    models_dir: str = "models",
    checkpoint_prefix: str = "",
    on_trained: Callable[[list[dict[str, Any]], dict[str, Any], bool], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One model per preference, named `models_dir/w0.2-0.8`: the loop every per-preference method runs.

    `train_one(preference, checkpoint_dir, final_dir)` trains (or skips a finished) model and returns its
    stats; `on_trained(models, stages, complete)` runs after each, so the manifest of an interrupted run lists
    its finished models and says it is incomplete. Returns the manifest's `models` and the stats per model.
    """
    from moalign.pareto import preference_name

    models: list[dict[str, Any]] = []
    stages: dict[str, Any] = {}
    for index, preference in enumerate(preferences):
        name = preference_name(preference)
        stages[name] = train_one(
            preference, run_dir / "checkpoints" / f"{checkpoint_prefix}{name}", run_dir / models_dir / name
        )
        models.append({"preference": [float(x) for x in preference], "path": f"{models_dir}/{name}"})
        if on_trained is not None:
            on_trained(models, stages, index == len(preferences) - 1)
    return models, stages


def training_totals(stages: dict[str, dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """The manifest's `training` entry: seconds, tokens and FLOPs summed over the stages, plus `extra`."""
    return {
        "seconds": sum(float(s.get("seconds", 0.0)) for s in stages.values()),
        "tokens": int(sum(s.get("tokens", 0) for s in stages.values())),
        "flops": float(sum(s.get("flops", 0.0) for s in stages.values())),
        "stages": stages,
        "world_size": distributed.world_size(),
        **extra,
    }


def write_run_manifest(
    config: CommonArguments, method: str, policy: str | None, complete: bool = True, **fields: Any
) -> None:
    """The run's manifest: method, the policy class that serves it ("module:Class"; None for runs that are
    not policies, such as preference models), base model, objectives, sampling, held-out prompts, plus
    `fields`. Written by the main process only."""
    # "complete" is False while a per-preference run has models left to train: eval and serve then refuse it
    distributed.run_on_main(_write_run_manifest, config, method, policy, {"complete": complete, **fields})


def _write_run_manifest(config: CommonArguments, method: str, policy: str | None, fields: dict[str, Any]) -> None:
    from moalign.run import write_manifest

    run_dir = Path(config.output_dir)
    manifest: dict[str, Any] = {
        "method": method,
        **({"policy": policy} if policy else {}),
        "base_model": config.model_name_or_path,
        "objectives": list(config.objectives),
        "objective_names": objective_names(config.objectives) if config.objectives else [],
        "sampling": sampling_fields(config),
    }
    if config.eval_prompts:
        if not os.path.exists(config.eval_prompts):
            raise MoalignError(f"eval_prompts file {config.eval_prompts} does not exist")
        atomic_write_text(run_dir / "eval_prompts.jsonl", Path(config.eval_prompts).read_text())
        manifest["eval_prompts"] = "eval_prompts.jsonl"
    manifest.update(fields)
    write_manifest(run_dir, manifest)
