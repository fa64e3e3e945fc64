"""`moalign demo --task images`: RiC on a text-to-image model, end to end with no downloads.

1. Draw a corpus of captioned 16×16 images on the spot: a coloured shape on a background whose texture
   and colours vary together, so that colorfulness and JPEG compressibility conflict (busy, many-hued
   backgrounds are colourful and large; plain grey ones are small and dull).
2. Assemble a tiny text-to-image pipeline from diffusers and transformers parts: a 0.26M-parameter
   `UNet2DConditionModel` in pixel space (see `PixelDiffusionPipeline`), a tiny CLIP text encoder (frozen
   at its random initialisation, as RiC freezes Stable Diffusion's) and a word-level tokenizer trained on
   the captions and the reward numbers; pretrain the UNet on the plain captions: the base pipeline.
3. Train RiC on it (`moalign ric-image` with configs/ric_image_demo.yaml) and evaluate base and RiC on one
   preference grid with one reference point: fronts, plot, image grids, report.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from moalign.demo.base_model import DEMO_THREADS, demo_threads
from moalign.errors import MoalignError
from moalign.run import atomic_path, read_manifest, write_manifest

log = logging.getLogger("moalign")

SIZE = 16
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 60, 220),
    "yellow": (235, 215, 30),
    "purple": (150, 40, 190),
    "orange": (245, 140, 20),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
# Background textures in the order of their detail: the hidden "busyness" picks one and sets its colours.
TEXTURES = ("plain", "striped", "checkered", "noisy")
NUMBER_RANGE = 6.0  # reward numbers the demo tokenizer knows: -6.0 … 6.0 at one decimal
CONFIG = "ric_image_demo.yaml"


def _shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    y, x = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":
        return (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.6)
    return ((np.abs(dx) <= r * 0.3) & (np.abs(dy) <= r)) | ((np.abs(dy) <= r * 0.3) & (np.abs(dx) <= r))


def _background(texture: str, busy: float, rng: np.random.Generator) -> np.ndarray:
    """A background whose saturation and contrast both grow with `busy`."""
    grey = rng.uniform(70, 180)
    saturation = float(np.clip(busy + rng.normal(0, 0.15), 0, 1))
    contrast = float(np.clip(busy + rng.normal(0, 0.15), 0.05, 1))

    def hue() -> np.ndarray:
        colour = rng.uniform(0, 255, size=3)
        return grey + saturation * (colour - grey)

    first, second = hue(), hue()
    second = first + contrast * (second - first + rng.choice([-1, 1]) * 60)
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    if texture == "plain":
        return np.broadcast_to(first, (SIZE, SIZE, 3)).copy()
    if texture == "striped":
        width = rng.integers(1, 3)
        pattern = ((y if rng.random() < 0.5 else x) // width) % 2
    elif texture == "checkered":
        width = rng.integers(1, 3)
        pattern = ((x // width) + (y // width)) % 2
    else:
        colours = grey + saturation * (rng.uniform(0, 255, size=(SIZE, SIZE, 3)) - grey)
        return first + contrast * (colours - first)
    return np.where(pattern[..., None] == 1, second, first)


def draw_sample(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """One image and its caption; the caption names the background half of the time."""
    busy = rng.uniform()
    texture = TEXTURES[min(int(busy * len(TEXTURES)), len(TEXTURES) - 1)]
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    pixels = _background(texture, busy, rng)
    mask = _shape_mask(shape, SIZE / 2 + rng.uniform(-2, 2), SIZE / 2 + rng.uniform(-2, 2), rng.uniform(3.5, 5.5))
    pixels[mask] = np.asarray(COLOURS[colour]) + rng.normal(0, 6, size=3)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    caption = f"a {colour} {shape}"
    if rng.random() < 0.5:
        caption += f" on a {texture} background"
    return image, caption


def write_corpus(folder: Path, n: int, seed: int = 0) -> Path:
    """`n` images and a metadata.jsonl (imagefolder convention) in `folder`; reused when complete."""
    if (folder / "metadata.jsonl").exists():
        return folder
    rng = np.random.default_rng(seed)
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        rows = []
        for i in range(n):
            image, caption = draw_sample(rng)
            image.save(tmp / f"{i:05d}.png")
            rows.append(json.dumps({"file_name": f"{i:05d}.png", "text": caption}))
        (tmp / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


def eval_captions() -> list[str]:
    """The held-out prompts: every colour–shape pair, the background left to the preference."""
    return [f"a {colour} {shape}" for shape in SHAPES for colour in COLOURS]


def demo_tokenizer(captions: list[str], tags: list[str], max_length: int = 16):
    """A word-level tokenizer over the captions' words, the reward tags and every reward number: each
    number RiC writes is one token."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from moalign.methods.ric import RewardTemplate

    template = RewardTemplate(tags=tags)
    numbers = {template.render(v) for v in np.arange(-NUMBER_RANGE, NUMBER_RANGE + 0.05, 0.1)}
    words = sorted({w for c in captions for w in c.lower().split()} | set(tags) | numbers)
    vocab = {token: i for i, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *words])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.normalizer = normalizers.Lowercase()
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def tiny_pipeline(tokenizer, seed: int = 0, channels: tuple[int, int] = (16, 32), text_width: int = 64):
    """The untrained pipeline: by default a 0.26M-parameter UNet (channels 16/32, cross-attention at 8×8) and a
    2-layer CLIP text encoder of width 64 (tests make smaller ones).

    Channels 16/32 rather than the 32/64 of the issue's yardstick: at half the CPU per training step the demo
    affords its full 1 100 steps within its 10-minute budget on 2 cores, where the 1.0M UNet with 600 steps
    steered worse (steerability 0.65/0.77 against 0.89/0.86, measured on this task)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from moalign.image.pipeline import PixelDiffusionPipeline

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_width,
            intermediate_size=2 * text_width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=text_width,
        attention_head_dim=8,
        norm_num_groups=min(8, channels[0]),
    )
    # Ancestral DDPM sampling with the predicted image clipped to [-1, 1]: in 20 steps it gives this small,
    # briefly trained UNet clean colours and shapes where deterministic DDIM drifts to saturated noise.
    scheduler = DDPMScheduler(num_train_timesteps=1000, clip_sample=True, steps_offset=1)
    return PixelDiffusionPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler)


def base_pipeline(out: Path, corpus: Path, config_path: Path) -> Path:
    """The base model: the tiny pipeline with its UNet pretrained on the plain captions (no reward tags)."""
    import shutil

    from moalign.image.data import load_images
    from moalign.image.denoiser import train_denoiser
    from moalign.image.ric import RiCImageConfig
    from moalign.methods.config import parse_config

    final = out / "base_pipeline"
    if (final / "model_index.json").exists():
        return final
    init = out / "pipeline_init"
    images = load_images(str(corpus))
    tags = [f"<rm{i + 1}>" for i in range(2)]
    if not (init / "model_index.json").exists():
        pipeline = tiny_pipeline(demo_tokenizer(list(images["caption"]), tags))
        with atomic_path(init) as tmp:
            pipeline.save_pretrained(tmp)
    config = parse_config(
        RiCImageConfig,
        ["--config", str(config_path), "--model_name_or_path", str(init), "--dataset", str(corpus)],
        section="base",
        required=(),
    )
    config.output_dir = str(out / "base_training")
    train_denoiser(config, None, images, list(images["caption"]), out / "checkpoints" / "base", out / "base_unet")
    with atomic_path(final) as tmp:
        shutil.copytree(init, tmp)
        shutil.rmtree(tmp / "unet")
        shutil.copytree(out / "base_unet", tmp / "unet")
    return final


def run_image_demo(out: Path, configs: Path, n_images: int, n_eval_prompts: int, divisions: int) -> Path:
    from moalign.demo.pipeline import write_prompts
    from moalign.evaluate import evaluate_runs
    from moalign.image import ric
    from moalign.methods.config import parse_config

    config_path = configs / CONFIG
    if not config_path.exists():
        raise MoalignError(f"demo config {config_path} does not exist; pass --configs DIR")
    out = out.resolve()
    start, cpu_start = time.perf_counter(), time.process_time()
    timings: dict[str, tuple[float, float]] = {}  # stage: (wall, CPU) seconds

    @contextmanager
    def timed(stage: str) -> Iterator[None]:
        """A stage on the demo's fixed torch threads (the same numbers on any machine), timed."""
        wall, cpu = time.perf_counter(), time.process_time()
        with demo_threads():
            yield
        timings[stage] = (time.perf_counter() - wall, time.process_time() - cpu)

    with timed("corpus"):
        corpus = write_corpus(out / "data" / "train", n_images)
        prompts = write_prompts(out / "data" / "eval_prompts.jsonl", eval_captions()[:n_eval_prompts])
    with timed("base"):
        base = base_pipeline(out, corpus, config_path)
    with timed("ric"):
        argv = ["--config", str(config_path), "--model_name_or_path", str(base), "--dataset", str(corpus)]
        argv += ["--output_dir", str(out / "ric"), "--eval_prompts", str(prompts)]
        ric.train(parse_config(ric.RiCImageConfig, argv, section="ric"))
    # The base pipeline is evaluated like any run: a manifest naming it, with RiC's sampling settings.
    manifest = read_manifest(out / "ric")
    (out / "base").mkdir(exist_ok=True)
    (out / "base" / "eval_prompts.jsonl").write_text(prompts.read_text())
    fields = ("objectives", "objective_names", "sampling", "modality", "eval_prompts")
    write_manifest(
        out / "base",
        {"method": "base", "policy": "moalign.image.policy:ImagePolicy", "base_model": str(base)}
        | {key: manifest[key] for key in fields},
    )
    with timed("eval"):
        results = evaluate_runs([out / "base", out / "ric"], divisions=divisions, output_dir=out)
    names = manifest["objective_names"]
    steps = ", ".join(f"{step} {wall:.0f}s/{cpu:.0f}s" for step, (wall, cpu) in timings.items())
    print(
        f"\nmoalign demo --task images finished in {time.perf_counter() - start:.0f}s wall, "
        f"{time.process_time() - cpu_start:.0f}s CPU on {DEMO_THREADS} torch thread (wall/CPU: {steps})"
    )
    print(f"{'run':<6} {'hypervolume':>12} {'collapse':>9}  steerability ({', '.join(names)})")
    for run, result in zip(("base", "ric"), results):
        steer = ", ".join("n/a" if np.isnan(s := result["steerability"][n]) else f"{s:+.3f}" for n in names)
        print(f"{run:<6} {result['hypervolume']:12.4f} {result['collapse_rate']:9.3f}  {steer}")
    print(f"reference point: {np.round(results[0]['reference_point'], 4).tolist()}")
    print(f"report: {out / 'report.html'}\nplot:   {out / 'fronts.png'}\ngrid:   {out / 'ric' / 'grid.png'}")
    return out


def cli(argv: list[str]) -> None:
    from moalign.demo.pipeline import SHIPPED_CONFIGS

    parser = argparse.ArgumentParser(prog="moalign demo --task images", description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/image_demo", help="where the runs and the report go")
    parser.add_argument("--configs", default=str(SHIPPED_CONFIGS), help=f"folder with {CONFIG}")
    parser.add_argument("--images", type=int, default=4000, help="training images drawn")
    parser.add_argument("--eval-prompts", type=int, default=32, help="held-out prompts per preference")
    parser.add_argument("--divisions", type=int, default=10, help="preference grid resolution")
    args = parser.parse_args(argv)
    run_image_demo(Path(args.output_dir), Path(args.configs), args.images, args.eval_prompts, args.divisions)
