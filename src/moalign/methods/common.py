"""What every method's recipe shares: config parsing, CPU-safe defaults, models, LoRA, resumable SFT.

Method configs extend TRL's configs (SFTConfig, DPOConfig, …) with `CommonArguments`, so every Trainer
option works and `--config file.yaml` behaves as in TRL's own scripts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moalign.errors import MoalignError

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
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "default: all linear layers"})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "max new tokens when the method generates"})
    sample_temperature: float = 1.0
    sample_top_p: float = 1.0

    def __post_init__(self) -> None:
        # TRL defaults to bf16 and gradient checkpointing, which a CPU run cannot use.
        if not torch.cuda.is_available():
            self.bf16 = False
            self.fp16 = False
            self.gradient_checkpointing = False
            self.use_cpu = True
        super().__post_init__()


def config_section(path: str, section: str | None) -> dict[str, Any]:
    """A YAML config's mapping for one step: its `section:` mapping if it has one, else the whole file.

    One recipe file can then hold several steps side by side (MORLAIF's `feedback:`, `pm:`, `morl:`).
    """
    import yaml

    if not os.path.exists(path):
        raise MoalignError(f"config file {path} does not exist")
    with open(path) as handle:
        content = yaml.safe_load(handle) or {}
    if not isinstance(content, dict):
        raise MoalignError(f"config file {path} must hold a YAML mapping")
    if section and isinstance(content.get(section), dict):
        return dict(content[section])
    return content


def parse_config(config_class: type, argv: list[str], section: str | None = None):
    """Parse `--config FILE.yaml` plus flags into one method config (flags win over the file).

    With `section`, a file that has a mapping under that key contributes only that mapping.
    """
    import tempfile

    import yaml
    from trl import TrlParser

    argv = list(argv)
    tmp = None
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise MoalignError("--config needs a YAML file")
        values = config_section(argv[index + 1], section)
        fd, tmp = tempfile.mkstemp(suffix=".yaml", prefix="moalign-config-")
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump(values, handle)
        argv[index + 1] = tmp
    parser = TrlParser((config_class,))
    try:
        (config,) = parser.parse_args_and_config(argv)
    except ValueError as error:
        raise MoalignError(str(error).strip().splitlines()[0]) from None
    finally:
        if tmp:
            os.unlink(tmp)
    if not config.model_name_or_path:
        raise MoalignError("model_name_or_path is not set (YAML key or --model_name_or_path)")
    if not config.dataset:
        raise MoalignError("dataset is not set (YAML key or --dataset)")
    if not config.output_dir:
        raise MoalignError("output_dir is not set: the run directory to write")
    return config


def objective_names(specs: list[str]) -> list[str]:
    from moalign.objectives import build_all

    return [objective.name for objective in build_all(specs)]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str):
    """A causal LM in float32 on CPU (the Trainer moves it where it trains)."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except OSError as error:
        raise MoalignError(f"cannot load model {path} ({str(error).strip().splitlines()[0]})") from None


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


def last_checkpoint(output_dir: str | Path) -> str | None:
    """The newest Trainer checkpoint in `output_dir`, to resume an interrupted stage from."""
    from transformers.trainer_utils import get_last_checkpoint

    return get_last_checkpoint(str(output_dir)) if Path(output_dir).is_dir() else None


def save_final(model, tokenizer, destination: Path) -> None:
    """Save a model (or adapter) under a temporary name, then rename: a folder that exists is complete."""
    tmp = destination.with_name(f".{destination.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(destination, ignore_errors=True)
    os.replace(tmp, destination)


def stage_args(config, output_dir: Path, **overrides):
    """A copy of the method config for one training stage, writing its checkpoints under `output_dir`."""
    import dataclasses

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
    from trl import SFTTrainer

    if (done := finished_stage(final_dir)) is not None:
        log.info(f"stage {final_dir.name}: already trained, skipping")
        return done
    args = stage_args(config, stage_dir, completion_only_loss=True, **overrides)
    tokenizer = load_tokenizer(model_path)
    adapter = Path(model_path) / "adapter_config.json"
    if adapter.exists():
        from peft import PeftModel

        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        model = PeftModel.from_pretrained(load_causal_lm(base), model_path, is_trainable=True)
        peft_config, keep_adapter = None, True
    else:
        model, peft_config = load_causal_lm(model_path), lora_config(config)
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config
    )
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=last_checkpoint(stage_dir))
    seconds = time.perf_counter() - start
    lengths = [len(ids) for ids in trainer.train_dataset["input_ids"]]
    sequences = trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
    tokens = int(sequences * sum(lengths) / max(1, len(lengths)))
    stats = {"seconds": seconds, "tokens": tokens, "steps": trainer.state.global_step, "samples": len(dataset)}
    # merged, later stages and policies load one plain model
    return finish_stage(
        trainer.model, tokenizer, final_dir, stage_dir, stats, merge=config.use_peft and not keep_adapter
    )


def finish_stage(
    model, tokenizer, final_dir: Path, stage_dir: Path, stats: dict[str, Any], merge: bool
) -> dict[str, Any]:
    """Save a trained stage: merge its LoRA adapter if asked, save, write the marker last (a folder holding it
    is complete, and a rerun skips it) and drop the stage's checkpoints. Returns `stats`."""
    if merge:
        model = model.merge_and_unload()
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    save_final(model, tokenizer, final_dir)
    (final_dir / STAGE_MARKER).write_text(json.dumps(stats))
    shutil.rmtree(stage_dir, ignore_errors=True)
    return stats


def sampling_fields(config: CommonArguments) -> dict[str, Any]:
    """The decoding settings a run's policy uses by default (stored in the manifest)."""
    return {
        "max_new_tokens": config.sample_max_new_tokens,
        "temperature": config.sample_temperature,
        "top_p": config.sample_top_p,
    }


def write_run_manifest(config: CommonArguments, method: str, **fields: Any) -> None:
    """The run's manifest: method, base model, objectives, sampling, held-out prompts, plus `fields`."""
    from moalign.run import write_manifest

    run_dir = Path(config.output_dir)
    manifest: dict[str, Any] = {
        "method": method,
        "base_model": config.model_name_or_path,
        "objectives": list(config.objectives),
        "objective_names": objective_names(config.objectives) if config.objectives else [],
        "sampling": sampling_fields(config),
    }
    if config.eval_prompts:
        if not os.path.exists(config.eval_prompts):
            raise MoalignError(f"eval_prompts file {config.eval_prompts} does not exist")
        shutil.copyfile(config.eval_prompts, run_dir / "eval_prompts.jsonl")
        manifest["eval_prompts"] = "eval_prompts.jsonl"
    manifest.update(fields)
    write_manifest(run_dir, manifest)
