"""Text-to-image pipelines from diffusers: loading, the caption the text encoder sees, and the denoiser's inputs.

Training and inference encode captions through the pipeline's own `encode_prompt`, so the conditioning
a model learns is exactly the one it is sampled with. Stable Diffusion-style pipelines (a tokenizer, a
text encoder, a `UNet2DConditionModel`, a scheduler, optionally a VAE) are supported; without a VAE the
UNet denoises pixels (`PixelDiffusionPipeline`, which the embedded demo uses).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from PIL import Image

from moalign.errors import MoalignError, first_line
from moalign.methods.ric import RewardTemplate, format_prompt


class PixelDiffusionPipeline(StableDiffusionPipeline):
    """Stable Diffusion's pipeline without the autoencoder: the UNet denoises the image's pixels.

    Pixel space is what DeepFloyd IF's first stage does; at 16×16 an autoencoder has nothing to compress
    and would itself need training. Sampling, classifier-free guidance and prompt encoding are Stable
    Diffusion's own; only the decoding is the identity."""

    _optional_components = ["vae", "safety_checker", "feature_extractor", "image_encoder"]

    def __init__(
        self,
        tokenizer,
        text_encoder,
        unet,
        scheduler,
        vae=None,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker: bool = False,
    ):
        # Stable Diffusion's __init__ turns clip_sample off (and warns): right for latents, wrong for pixels,
        # where clipping the predicted image to [-1, 1] keeps sampling in range. The scheduler is kept as given.
        config = dict(scheduler.config)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="(?s).*clip_sample")
            self._init_stable_diffusion(tokenizer, text_encoder, unet, scheduler)
        self.scheduler = type(scheduler).from_config(config)
        self.vae_scale_factor = 1

    def _init_stable_diffusion(self, tokenizer, text_encoder, unet, scheduler) -> None:
        super().__init__(
            vae=None,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            image_encoder=None,
            requires_safety_checker=False,
        )

    def __call__(self, *args, output_type: str = "pil", **kwargs):
        size = self.unet.config.sample_size
        kwargs.setdefault("height", size)
        kwargs.setdefault("width", size)
        pixels = super().__call__(*args, output_type="latent", **kwargs).images
        array = (pixels / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        images = self.numpy_to_pil(array) if output_type == "pil" else array
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)


def load_pipeline(path: str, denoiser: str | Path | None = None, device: str = "cpu", dtype: torch.dtype | None = None):
    """A pipeline folder or hub id, with its UNet replaced by a trained one from `denoiser` if given."""
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    index = Path(path) / "model_index.json"
    pixel = index.exists() and json.loads(index.read_text()).get("_class_name") == PixelDiffusionPipeline.__name__
    kwargs: dict[str, Any] = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        if denoiser is not None:
            kwargs["unet"] = UNet2DConditionModel.from_pretrained(str(denoiser), **kwargs)
        cls = PixelDiffusionPipeline if pixel else DiffusionPipeline
        pipeline = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise MoalignError(f"cannot load the pipeline {path} ({first_line(error)})") from None
    if getattr(pipeline, "unet", None) is None or not hasattr(pipeline, "encode_prompt"):
        raise MoalignError(
            f"{path} is a {type(pipeline).__name__}; RiC for images needs a text-to-image pipeline with a text "
            "encoder and a UNet (Stable Diffusion style)"
        )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def token_budget(tokenizer) -> int:
    """Tokens the text encoder reads, special tokens (BOS/EOS) excluded."""
    specials = len(tokenizer("", add_special_tokens=True)["input_ids"])
    return int(tokenizer.model_max_length) - specials


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def conditioned_caption(caption: str, rewards, template: RewardTemplate, tokenizer) -> str:
    """`"{caption} <rm1> 0.3 <rm2> -1.2"` within the text encoder's budget: the caption is cut, never the tags
    (a truncated tag would condition on a reward nobody asked for)."""
    full = format_prompt(caption, rewards, template)
    budget = token_budget(tokenizer)
    if _count(tokenizer, full) <= budget:
        return full
    tags = format_prompt("", rewards, template).strip()
    room = budget - _count(tokenizer, tags)
    if room < 0:
        raise MoalignError(
            f"the reward tags {tags!r} alone take {_count(tokenizer, tags)} tokens, more than the text encoder's "
            f"{budget}; use shorter reward_tags"
        )
    ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
    while room >= 0:  # decoding may re-tokenise differently at the cut: shrink until it fits
        text = format_prompt(tokenizer.decode(ids[:room], skip_special_tokens=True).strip(), rewards, template)
        if _count(tokenizer, text) <= budget:
            return text.strip()
        room -= 1
    return tags


@torch.no_grad()
def encode_captions(pipeline, captions: list[str], device: torch.device | str) -> torch.Tensor:
    """The text encoder's hidden states for captions, exactly as the pipeline computes them when sampling."""
    return pipeline.encode_prompt(list(captions), device, 1, False)[0]


def to_pixels(images: list[Image.Image], resolution: int | None = None) -> torch.Tensor:
    """RGB images as a (N, 3, H, W) tensor in [-1, 1]; resized (short side) and centre-cropped to `resolution`."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if resolution is not None and image.size != (resolution, resolution):
            scale = resolution / min(image.size)
            size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.BICUBIC)
            left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
            image = image.crop((left, top, left + resolution, top + resolution))
        arrays.append(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def to_latents(pipeline, pixels: torch.Tensor) -> torch.Tensor:
    """What the denoiser works on: the VAE's scaled latents, or the pixels themselves when there is no VAE."""
    vae = getattr(pipeline, "vae", None)
    if vae is None:
        return pixels
    latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.sample()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor
