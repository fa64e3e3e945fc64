"""Training a diffusion denoiser with the Transformers Trainer: the noise-prediction loss, caption dropout for
classifier-free guidance, optional LoRA and EMA; one resumable stage per call, as diffusers' text-to-image
training scripts do it."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import torch
from transformers import Trainer, TrainerCallback

from moalign import distributed
from moalign.image.pipeline import encode_captions, load_pipeline, to_latents, to_pixels
from moalign.methods.stages import STAGE_MARKER, finished_stage, last_checkpoint, stage_args
from moalign.run import atomic_write

if TYPE_CHECKING:
    from moalign.image.ric import RiCImageConfig

log = logging.getLogger("moalign")
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]  # the UNet's attention projections, as diffusers' LoRA scripts


class ConditionedImages(torch.utils.data.Dataset):
    """Rows of an image dataset with the caption each is trained on (the caption with its reward tags)."""

    def __init__(self, images: datasets.Dataset, captions: list[str], resolution: int | None):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.images, self.captions, self.resolution = images, captions, resolution

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixels = to_pixels([self.images[index]["image"]], self.resolution)[0]
        return {"pixel_values": pixels, "caption": self.captions[index]}


class CaptionDropout:
    """Batches pixels and drops each whole caption, tags included, to "" with probability `p`: the
    unconditional branch that classifier-free guidance samples with (the pipeline's negative prompt "")."""

    def __init__(self, p: float, seed: int):
        self.p = p
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        keep = torch.rand(len(rows), generator=self.generator) >= self.p
        return {
            "pixel_values": torch.stack([row["pixel_values"] for row in rows]),
            "caption": [row["caption"] if k else "" for row, k in zip(rows, keep.tolist())],
        }


class DenoiserTrainer(Trainer):
    """The Transformers Trainer on a diffusion denoiser; `compute_loss` is the noise-prediction loss.

    The pipeline's text encoder (and VAE) are frozen and held beside the model, which is the UNet alone,
    so checkpoints hold only what trains."""

    def __init__(self, *args, pipeline, **kwargs):
        from diffusers import DDPMScheduler

        super().__init__(*args, **kwargs)
        self.pipeline = pipeline
        # The training noise schedule of the pipeline's scheduler (Stable Diffusion ships PNDM for sampling).
        self.noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        latents = to_latents(self.pipeline, inputs["pixel_values"]).to(self.args.device)
        hidden = encode_captions(self.pipeline, inputs["caption"], latents.device)
        noise = torch.randn_like(latents)
        steps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (len(latents),), device=latents.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, steps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, steps)
        else:
            target = noise
        prediction = model(noisy, steps, encoder_hidden_states=hidden.to(noisy.dtype)).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), target.float())
        return (loss, prediction) if return_outputs else loss


class EMACallback(TrainerCallback):
    """An exponential moving average of the trained weights, saved in every checkpoint to resume with."""

    FILE = "ema.pt"

    def __init__(self, parameters: list[torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.parameters = parameters
        self.ema = EMAModel(parameters, decay=decay)

    def on_step_end(self, args, state, control, **kwargs):
        self.ema.step(self.parameters)

    def on_save(self, args, state, control, **kwargs):
        torch.save(self.ema.state_dict(), Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.FILE)

    def resume(self, checkpoint: str | None) -> None:
        if checkpoint and (Path(checkpoint) / self.FILE).exists():
            self.ema.load_state_dict(torch.load(Path(checkpoint) / self.FILE, weights_only=False))


def trainer_args(config, stage_dir: Path, **overrides: Any):
    """A stage's Trainer arguments. The UNet checkpoints itself (`config.gradient_checkpointing`, in
    `train_denoiser`): the Trainer's own switch would call `gradient_checkpointing_enable`, which diffusers' models
    lack, so it is off, by its transformers 5 name (a copy that sets only the old name keeps the new one's value)."""
    return stage_args(config, stage_dir, remove_unused_columns=False, activation_checkpointing=False, **overrides)


def train_denoiser(
    config: RiCImageConfig,
    denoiser: Path | None,
    images: datasets.Dataset,
    captions: list[str],
    stage_dir: Path,
    final_dir: Path,
    **overrides: Any,
) -> dict[str, Any]:
    """One resumable training stage of the denoiser (from the base pipeline's, or `denoiser`), saved as a
    `UNet2DConditionModel` folder in `final_dir` (a finished stage is skipped; LoRA is merged, EMA copied in)."""
    if (done := finished_stage(final_dir)) is not None:
        log.info(f"stage {final_dir.name}: already trained, skipping")
        return done
    args = trainer_args(config, stage_dir, **overrides)
    pipeline = load_pipeline(config.model_name_or_path, denoiser, device=args.device)
    for module in (pipeline.text_encoder, getattr(pipeline, "vae", None)):
        if module is not None:
            module.requires_grad_(False)
    unet = pipeline.unet
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if config.use_peft:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=config.lora_dropout,
                target_modules=config.lora_target_modules or LORA_TARGETS,
                init_lora_weights="gaussian",
            )
        )
    unet.train()
    callbacks = []
    if config.use_ema:
        callbacks.append(EMACallback([p for p in unet.parameters() if p.requires_grad], config.ema_decay))
    trainer = DenoiserTrainer(
        model=unet,
        args=args,
        train_dataset=ConditionedImages(images, captions, config.resolution),
        data_collator=CaptionDropout(config.caption_dropout, config.seed),
        callbacks=callbacks,
        pipeline=pipeline,
    )
    resume = last_checkpoint(stage_dir)
    for callback in callbacks:
        callback.resume(resume)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    stats = {
        "seconds": time.perf_counter() - start,
        "steps": trainer.state.global_step,
        "samples": len(captions),
        "images": trainer.state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps,
        "resumed_from": int(Path(resume).name.rpartition("-")[2]) if resume else 0,  # the checkpoint's step
    }
    unet = trainer.accelerator.unwrap_model(trainer.model)
    if callbacks:
        callbacks[0].ema.copy_to(callbacks[0].parameters)
    if config.use_peft:
        unet.fuse_lora()
        unet.unload_lora()
    distributed.run_on_main(save_denoiser, unet, final_dir, stats, stage_dir)  # one writer under DDP
    return stats


def save_denoiser(unet, final_dir: Path, stats: dict[str, Any], stage_dir: Path) -> None:
    """Save atomically with the stage marker inside (a folder that exists is complete), then drop the stage's
    checkpoints."""

    def write(tmp: Path) -> None:
        unet.save_pretrained(tmp)
        (tmp / STAGE_MARKER).write_text(json.dumps(stats))

    atomic_write(final_dir, write)
    shutil.rmtree(stage_dir, ignore_errors=True)
