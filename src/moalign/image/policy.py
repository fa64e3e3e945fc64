"""Image policies: a text-to-image pipeline answering prompts under a preference with images.

`ImagePolicy.images(prompts, weights)` returns PIL images (the Python API); `generate` returns them as
`ImageResponse` strings, the contract `moalign eval` scores through. `RiCImagePolicy` writes the
preference's desired rewards into each caption with the paper's quantile mapping by default.
"""

from __future__ import annotations

import argparse
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from moalign.errors import MoalignError
from moalign.image.pipeline import conditioned_caption, load_pipeline
from moalign.methods.ric import MAPPINGS, RewardTemplate, preference_to_targets
from moalign.models import pick_device
from moalign.objectives.image import ImageResponse
from moalign.pareto import preference_name
from moalign.policy import Policy
from moalign.run import atomic_write

COLLAPSE_DISTANCE = 0.01  # mean absolute pixel difference (0–1 scale) under which two images are "the same"
GRID_CELL = 64  # pixels per image in the report's grid


@dataclass
class ImageSampling:
    """How images are sampled: denoising steps, classifier-free guidance scale, the first row's seed."""

    steps: int = 50
    guidance_scale: float = 7.5
    seed: int = 0
    batch_size: int = 16

    def validate(self) -> None:
        if self.steps < 1:
            raise MoalignError(f"steps must be ≥ 1, got {self.steps}")
        if not 0 <= self.guidance_scale <= 100:
            raise MoalignError(f"guidance scale must be in [0, 100], got {self.guidance_scale}")
        if self.batch_size < 1:
            raise MoalignError(f"batch size must be ≥ 1, got {self.batch_size}")


@torch.no_grad()
def render(
    pipeline, captions: Sequence[str], seeds: Sequence[int], steps: int, guidance_scale: float, batch_size: int
) -> list[Image.Image]:
    """One image per caption, each from its own seed's noise: an image does not depend on its batch."""
    images: list[Image.Image] = []
    for start in range(0, len(captions), batch_size):
        chunk = list(captions[start : start + batch_size])
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[start : start + batch_size]]
        output = pipeline(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generators)
        images.extend(output.images)
    return images


def collapsed(images: Sequence[Image.Image]) -> list[bool]:
    """Whether each image is (nearly) the image another prompt got: mean absolute pixel difference under 1%.

    Different prompts with different seeds never give the same picture; a model that has collapsed onto
    one output regardless of its prompt ("all-identical images") gives it to every prompt."""
    if len(images) < 2:
        return [False] * len(images)
    size = images[0].size
    pixels = np.stack([np.asarray(i.convert("RGB").resize(size), dtype=np.float32).reshape(-1) / 255 for i in images])
    distance = np.abs(pixels[:, None, :] - pixels[None, :, :]).mean(axis=2)
    np.fill_diagonal(distance, np.inf)
    return (distance.min(axis=1) < COLLAPSE_DISTANCE).tolist()


def image_grid(result: dict[str, Any], path: Path) -> Path:
    """A PNG with one row per preference and one column per sampled prompt (the same seed down a column)."""
    rows = [samples for samples in result["samples"] if samples]
    columns = max(len(samples) for samples in rows)
    label = 90
    canvas = Image.new("RGB", (label + columns * (GRID_CELL + 2), len(rows) * (GRID_CELL + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (preference, samples) in enumerate(zip(result["preferences"], rows)):
        y = r * (GRID_CELL + 2)
        draw.text((4, y + GRID_CELL // 2 - 6), f"w={preference_name(preference).removeprefix('w')}", fill="black")
        for c, sample in enumerate(samples):
            image = getattr(sample["response"], "image", None)
            if image is None:
                continue
            small = image.width < GRID_CELL  # tiny images are shown as pixels, large ones smoothly scaled
            resample = Image.Resampling.NEAREST if small else Image.Resampling.LANCZOS
            canvas.paste(
                image.convert("RGB").resize((GRID_CELL, GRID_CELL), resample), (label + c * (GRID_CELL + 2), y)
            )
    atomic_write(path, lambda tmp: canvas.save(tmp, format="PNG"))
    return path


class ImagePolicy(Policy):
    """A text-to-image pipeline that ignores the preference: the base pipeline of an image comparison."""

    modality = "image"
    output_unit = "images"
    report_samples = 8  # prompts per preference shown in the report's grid

    def __init__(self, manifest: dict[str, Any], run_dir: Path, device: str = "auto"):
        super().__init__({**manifest, "sampling": {}}, run_dir)
        self.sampling = ImageSampling(**manifest.get("sampling", {}))
        denoiser, device = manifest.get("denoiser"), pick_device(device)
        # Half precision on a GPU, as diffusers pipelines are usually run; float32 on the CPU.
        half = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else None
        self.pipeline = load_pipeline(
            str(manifest["base_model"]), self.run_dir / denoiser if denoiser else None, device=device, dtype=half
        )

    def model_paths(self) -> dict[str, Path]:
        denoiser = self.manifest.get("denoiser")
        return {self.run_dir.resolve().name: self.run_dir / denoiser if denoiser else Path(self.manifest["base_model"])}

    def load_tokenizer(self) -> Any:
        return None  # prompts are captions cut to the text encoder's budget, not counted against a context

    def context_length(self) -> int | None:
        return None

    def variant(self, weights: np.ndarray) -> Hashable:
        return None

    def prompt_for(self, prompt: str, weights: np.ndarray) -> str:
        return prompt

    def images(
        self, prompts: Sequence[str], weights: Sequence[float] | None = None, sampling: ImageSampling | None = None
    ) -> list[Image.Image]:
        """PIL images for the prompts under one preference; prompt i uses seed `sampling.seed + i`."""
        prompts = list(prompts)
        if not prompts:
            raise MoalignError("no prompts given")
        sampling = sampling or self.sampling
        sampling.validate()
        w = self.check_weights(weights)
        captions = [self.prompt_for(p, w) for p in prompts]
        seeds = [sampling.seed + i for i in range(len(prompts))]
        return render(self.pipeline, captions, seeds, sampling.steps, sampling.guidance_scale, sampling.batch_size)

    def generate(self, prompts, weights=None, params=None) -> list[str]:
        return [ImageResponse(image) for image in self.images(prompts, weights, params)]

    def _complete(self, prompts, weights, params, on_tokens=None):
        raise MoalignError("this run generates images: POST /v1/images/generations or `moalign generate --out DIR`")

    def degenerate(self, responses: Sequence[Any]) -> list[bool]:
        """The collapse rule `moalign eval` applies to image runs (see `collapsed`)."""
        return collapsed([r.image for r in responses])

    def sample_grid(self, result: dict[str, Any], path: Path) -> Path:
        return image_grid(result, path)


class RiCImagePolicy(ImagePolicy):
    """The RiC denoiser, steered by writing the preference's desired rewards into each caption."""

    def __init__(self, manifest: dict[str, Any], run_dir: Path, device: str = "auto", mapping: str | None = None):
        super().__init__(manifest, run_dir, device=device)
        settings = manifest["ric"]
        self.template = RewardTemplate(**settings["template"])
        self.mapping = mapping or settings["mapping"]
        if self.mapping not in MAPPINGS:
            raise MoalignError(f"unknown preference mapping {self.mapping!r}; choose one of {', '.join(MAPPINGS)}")
        self.low, self.high = np.asarray(settings["low"]), np.asarray(settings["high"])
        self.quantiles = np.asarray(settings["quantiles"])

    def variant(self, weights: np.ndarray) -> Hashable:
        return Policy.variant(self, weights)

    def prompt_for(self, prompt: str, weights: np.ndarray) -> str:
        targets = preference_to_targets(weights, self.low, self.high, self.mapping, self.quantiles)
        return conditioned_caption(prompt, targets, self.template, self.pipeline.tokenizer)


def write_images(policy: ImagePolicy, args: argparse.Namespace, weights: np.ndarray | None) -> None:
    """`moalign generate` for image runs: one PNG per prompt in `args.out`, named by prompt number and seed."""
    if not args.out:
        raise MoalignError("this run generates images: give --out DIR for the PNGs")
    overrides = {"steps": args.steps, "guidance_scale": args.guidance_scale, "seed": args.seed}
    sampling = replace(policy.sampling, **{k: v for k, v in overrides.items() if v is not None})
    images = policy.images(args.prompts, weights, sampling)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for i, (prompt, image) in enumerate(zip(args.prompts, images)):
        path = out / f"{i:03d}-seed{sampling.seed + i}.png"
        atomic_write(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
        print(f"{path}\t{prompt}")
