"""What every method's recipe shares: config parsing, CPU-safe defaults, models, LoRA, resumable SFT.

Method configs extend TRL's configs (SFTConfig, DPOConfig, …) with `CommonArguments`, so every Trainer
option works and `--config file.yaml` behaves as in TRL's own scripts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moalign import distributed
from moalign.errors import MoalignError, first_line
from moalign.run import atomic_write_text

log = logging.getLogger("moalign")
STAGE_MARKER = "moalign_stage.json"  # written last: a model folder holding it is complete


@dataclass
class CommonArguments:
    """Fields every method adds to its TRL config."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "base model: hub id or local path"})
    dataset: str | None = field(default=None, metadata={"help": "hub id or local .json/.jsonl/.csv/.parquet"})
    dataset_split: str = field(default="train", metadata={"help": "split of the training dataset"})
    max_samples: int | None = field(default=None, metadata={"help": "use only the first N rows of the dataset"})
    objectives: list[str] = field(default_factory=list, metadata={"help": "objective specs, e.g. vader brevity"})
    eval_prompts: str | None = field(default=None, metadata={"help": "JSONL of held-out prompts for `moalign eval`"})
    score_cache: str | None = field(default=None, metadata={"help": "SQLite score cache (default: user cache)"})
    use_peft: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    overwrite: bool = field(
        default=False, metadata={"help": "delete a run already in output_dir and train it again from scratch"}
    )
    save_adapters: bool = field(
        default=False,
        metadata={"help": "with use_peft, save each trained LoRA adapter on its own instead of merging it"},
    )
    # How weights load (moalign.models); the names are those of TRL's ModelConfig.
    dtype: str = field(
        default="auto",
        metadata={"help": "auto (bfloat16 on a GPU that has it, else float32), bfloat16, float16 or float32"},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa (default), eager, flex_attention, flash_attention_2 (needs flash-attn)"}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "4-bit base weights for QLoRA (needs bitsandbytes)"})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit base weights (needs bitsandbytes)"})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit quantization type: nf4 or fp4"})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "quantize the 4-bit quantization constants"})
    device_map: str | None = field(default=None, metadata={"help": "e.g. auto: spread a large model over devices"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "default: all linear layers"})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "max new tokens when the method generates"})
    generation_backend: str = field(
        default="local",
        metadata={"help": "where the method generates: local, or openai (the server at generation_base_url)"},
    )
    generation_base_url: str | None = field(
        default=None,
        metadata={"help": "OpenAI-compatible server serving each model under its path (transformers serve)"},
    )
    sample_temperature: float = 1.0
    sample_top_p: float = 1.0
    generation_chunk_size: int = field(
        default=256,
        metadata={"help": "prompts per saved chunk when the method generates: what a kill loses, what a rank takes"},
    )

    def __post_init__(self) -> None:
        # TRL defaults to bf16 and gradient checkpointing, which a CPU run cannot use.
        if not torch.cuda.is_available():
            self.bf16 = False
            self.fp16 = False
            self.gradient_checkpointing = False
            self.use_cpu = True
        from moalign.models import ModelOptions

        ModelOptions.from_config(self).validate()  # a bad dtype or a missing package fails before any work
        from moalign.engines import engine_from

        engine_from(self.generation_backend, self.generation_base_url)  # a missing URL fails before any work too
        super().__post_init__()


def config_section(path: str, section: str | None) -> dict[str, Any]:
    """A YAML config's mapping for one step: its `section:` mapping if it has one, else the whole file.

    One recipe file can then hold several steps side by side (MORLAIF's `feedback:`, `pm:`, `morl:`).
    """
    import yaml

    if not os.path.isfile(path):
        raise MoalignError(f"config file {path} does not exist")
    try:
        with open(path) as handle:
            content = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise MoalignError(
            f"config file {path} is not valid YAML{where} ({getattr(error, 'problem', None) or 'syntax error'})"
        ) from None
    if not isinstance(content, dict):
        raise MoalignError(f"config file {path} must hold a YAML mapping")
    if section and isinstance(content.get(section), dict):
        return dict(content[section])
    return content


REQUIRED = ("model_name_or_path", "dataset", "output_dir")


def _parser_class() -> type:
    """TRL's parser, reporting a bad flag as moalign's one-line error instead of argparse's usage dump."""
    from trl import TrlParser

    class OneLineParser(TrlParser):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, allow_abbrev=False, **kwargs)  # --learning_rat is a typo, not --learning_rate

        def error(self, message: str):
            raise MoalignError(message)

    return OneLineParser


def parse_config(
    config_class: type,
    argv: list[str],
    section: str | None = None,
    required: Sequence[str] = REQUIRED,
    positionals: Sequence[tuple[str, str, str]] = (),
    prog: str | None = None,
):
    """Parse `--config FILE.yaml` plus flags into one config with TRL's parser (flags win over the file).

    Every moalign command parses this way. With `section`, a file that has a mapping under that key
    contributes only that mapping. Flags are snake_case as in TRL (`--output_dir`); kebab-case
    (`--output-dir`) works too. `positionals` are (name, nargs, help) of bare arguments (run directories,
    prompts); they are set on the config as attributes of those names.
    """
    argv = list(argv)
    from moalign import cli

    if prog is None and cli.running:  # `moalign COMMAND`, as help and errors should name it
        prog = f"moalign {cli.running}"
    parser = _parser_class()((config_class,), prog=prog)
    for name, nargs, help_text in positionals:
        parser.add_argument(name, nargs=nargs, help=help_text)
    values: dict[str, Any] = {}
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise MoalignError("--config needs a YAML file")
        path = argv[index + 1]
        values = config_section(path, section)
        del argv[index : index + 2]
        for key, value in (values.pop("env", None) or {}).items():  # TRL's `env:` mapping
            os.environ[key] = str(value)
        unknown = parser.set_defaults_with_config(**values)[::2]  # ["--key", "value", ...]
        if unknown:
            keys = ", ".join(key.removeprefix("--") for key in unknown)
            raise MoalignError(f"config file {path}: unknown keys {keys} (see --help for the options)")
    try:
        config, *extra, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:
        raise MoalignError(first_line(error)) from None
    if unknown:
        raise MoalignError(f"unknown options {' '.join(unknown)} (see --help)")
    for namespace in extra:
        for name, value in vars(namespace).items():
            setattr(config, name, value)
    given = {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")} | set(values)
    for name in required:  # given by the user: a library default (TrainingArguments' "trainer_output") is not
        if name not in given or not getattr(config, name, None):
            raise MoalignError(f"{name} is not set (YAML key or --{name})")
    return config


def objective_names(specs: list[str]) -> list[str]:
    from moalign.objectives import build_all

    return [objective.name for objective in build_all(specs)]


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


COMPLETE_CHECKPOINT = "trainer_state.json"  # the Trainer writes it last, after weights, optimizer and RNG


def last_checkpoint(output_dir: str | Path, complete: str = COMPLETE_CHECKPOINT) -> str | None:
    """The newest complete checkpoint in `output_dir`, to resume an interrupted stage from.

    A process killed while saving leaves a `checkpoint-N` without its last file (`complete`); resuming from
    it fails ("Can't find a valid checkpoint"), so the main process deletes such folders and every rank
    resumes from the same complete one.
    """
    folder = Path(output_dir)

    def clean() -> str | None:
        found = [p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
        for partial in [p for p in found if not (p / complete).exists()]:
            log.warning(f"removing the incomplete checkpoint {partial} (interrupted while saving)")
            shutil.rmtree(partial, ignore_errors=True)
        done = [p for p in found if (p / complete).exists()]
        return str(max(done, key=lambda p: int(p.name.split("-")[-1]))) if done else None

    return distributed.run_on_main(clean)


def save_final(model, tokenizer, destination: Path, state_dict: dict[str, Any] | None = None) -> None:
    """Save a model (or adapter) under a temporary name, then rename: a folder that exists is complete.
    `state_dict`: the weights gathered from ranks that each hold a shard (see `gathered_state_dict`)."""
    from moalign.run import atomic_path

    with atomic_path(destination) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)


def gathered_state_dict(trainer) -> dict[str, Any] | None:
    """The whole model's weights when ranks each hold a shard of them (FSDP, DeepSpeed ZeRO-3), gathered by
    every rank together (each must call this); None when every rank holds the whole model (DDP, one process)."""
    if trainer.is_fsdp_enabled:
        return trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3:
        return trainer.accelerator.get_state_dict(trainer.deepspeed)
    return None


def stage_args(config, output_dir: Path, **overrides):
    """A copy of the method config for one training stage, writing its checkpoints under `output_dir`."""
    return dataclasses.replace(config, output_dir=str(output_dir), **overrides)


def finished_stage(final_dir: Path) -> dict[str, Any] | None:
    """The statistics of a stage that finished before (its model folder is complete), else None."""
    marker = final_dir / STAGE_MARKER
    return json.loads(marker.read_text()) if marker.exists() else None


def train_sft(
    model_path: str,
    dataset,
    config,
    stage_dir: Path,
    final_dir: Path,
    keep_adapter: bool = False,
    **overrides,
) -> dict[str, Any]:
    """One resumable SFT stage on a prompt/completion dataset, loss on the completion only.

    With LoRA the adapter is merged into the saved model unless `keep_adapter` (then only the adapter is
    saved, and `moalign.generation.load_model` finds its base). A `model_path` that is a LoRA adapter
    folder keeps training that adapter and saves it as an adapter: a fresh LoRA on top would need merging
    (losing the shared base) or stack two adapters. Returns timing and token counts. A stage whose
    `final_dir` exists is skipped (it finished before); an interrupted one resumes from its newest
    checkpoint in `stage_dir`.
    """
    from moalign.models import adapter_base
    from moalign.training import sft_trainer

    if (done := finished_stage(final_dir)) is not None:
        log.info(f"stage {final_dir.name}: already trained, skipping")
        return done
    args = stage_args(config, stage_dir, completion_only_loss=True, **overrides)
    tokenizer = load_tokenizer(model_path)
    if adapter_base(model_path) is not None:
        model, peft_config, keep_adapter = load_causal_lm(model_path, config, trainable=True), None, True
    else:
        model, peft_config = load_causal_lm(model_path, config), lora_config(config)
    trainer = sft_trainer(model, args, dataset, tokenizer, peft_config)
    seconds = train_resumable(trainer, stage_dir)
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    sequences = trainer.state.global_step * per_step
    tokens = int(sequences * sum(lengths) / max(1, len(lengths)))
    stats = {"seconds": seconds, "tokens": tokens, "steps": trainer.state.global_step, "samples": len(dataset)}
    # merged, later stages and policies load one plain model
    merge = config.use_peft and not keep_adapter
    return finish_stage(trainer.model, tokenizer, final_dir, stage_dir, stats, merge, gathered_state_dict(trainer))


CLOCK_FILE = "moalign_clock.json"  # in a checkpoint: the stage's training seconds up to that checkpoint


def stage_clock(resume: str | None):
    """A Trainer callback that stores the stage's training seconds in every checkpoint it saves, so that a
    resumed stage reports the seconds of every invocation (up to its checkpoint), not only of the last."""
    from transformers import TrainerCallback

    class StageClock(TrainerCallback):
        def __init__(self) -> None:
            clock = Path(resume) / CLOCK_FILE if resume else None
            self.previous = float(json.loads(clock.read_text())["seconds"]) if clock and clock.exists() else 0.0
            self.start = time.perf_counter()

        def seconds(self) -> float:
            return self.previous + time.perf_counter() - self.start

        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if state.is_world_process_zero and folder.is_dir():
                atomic_write_text(folder / CLOCK_FILE, json.dumps({"seconds": self.seconds()}))
            return control

    return StageClock()


def train_resumable(trainer, stage_dir: Path) -> float:
    """`trainer.train()` from the newest complete checkpoint in `stage_dir` (incomplete ones are cleaned);
    returns the stage's training seconds summed over every invocation.

    A stage shorter than `save_steps` would never be checkpointed and restart from scratch after a kill
    (RiC's online SFT, a short preference stage): it is saved half-way instead.
    """
    import math

    args = trainer.args
    if getattr(args.save_strategy, "value", args.save_strategy) == "steps" and args.save_steps >= 1:
        per_epoch = math.ceil(len(trainer.get_train_dataloader()) / args.gradient_accumulation_steps)
        total = args.max_steps if args.max_steps > 0 else math.ceil(per_epoch * args.num_train_epochs)
        if total >= 2 and args.save_steps >= total:
            args.save_steps = total // 2
    resume = last_checkpoint(stage_dir)
    clock = stage_clock(resume)
    trainer.add_callback(clock)
    trainer.train(resume_from_checkpoint=resume)
    return clock.seconds()


def finish_stage(
    model,
    tokenizer,
    final_dir: Path,
    stage_dir: Path,
    stats: dict[str, Any],
    merge: bool,
    state_dict: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save a trained stage: merge its LoRA adapter if asked, save, write the marker last (a folder holding it
    is complete, and a rerun skips it) and drop the stage's checkpoints. Returns `stats` (the main process's:
    it alone writes, while the other ranks wait). `state_dict`: the gathered weights of a sharded model."""

    from moalign.cost import record_stage_flops

    record_stage_flops(model, stats)  # counted before a LoRA merge: the adapters are what trained

    if merge and state_dict is not None:
        raise MoalignError("LoRA adapters trained sharded (FSDP, ZeRO-3) are not merged: set save_adapters: true")

    def save() -> dict[str, Any]:
        final = model.merge_and_unload() if merge else model
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        save_final(final, tokenizer, final_dir, state_dict)
        atomic_write_text(final_dir / STAGE_MARKER, json.dumps(stats))
        shutil.rmtree(stage_dir, ignore_errors=True)
        return stats

    return distributed.run_on_main(save)


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
