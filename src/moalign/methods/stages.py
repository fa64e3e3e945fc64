"""Resumable training stages: one SFT stage, checkpoints that survive a kill, a stage saved complete or not at all."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from moalign import distributed
from moalign.errors import MoalignError
from moalign.methods.common import load_causal_lm, load_tokenizer, lora_config
from moalign.run import atomic_write_text

log = logging.getLogger("moalign")
STAGE_MARKER = "moalign_stage.json"  # written last: a model folder holding it is complete


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
