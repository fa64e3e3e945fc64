"""RiC for images on the embedded image task: sampling throughput, training step time, the front, the demo time.

- images per second sampling 64 captions at once against one at a time (the demo's 0.26M-parameter UNet,
  20 steps, guidance 3, so each step runs the UNet on twice the batch);
- one training step (batch 32, 16×16) through `moalign ric-image`'s Trainer against a plain PyTorch loop
  on the same UNet and batch, measured in the same run (the issue's yardstick is this plain loop);
- the cold `moalign demo --task images`: its wall and CPU time, and base vs RiC hypervolume (one reference point)
  and steerability. Quick mode runs a shortened demo (fewer images and steps): its numbers are a smoke
  test, not the front.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

SECTION = "image"
BATCH = 64


def _pipeline():
    from moalign.demo.images import demo_tokenizer, eval_captions, tiny_pipeline

    captions = eval_captions()
    return tiny_pipeline(demo_tokenizer(captions, ["<rm1>", "<rm2>"])), captions


def sampling_rows(quick: bool) -> list[dict[str, Any]]:
    from moalign.image.policy import render

    pipeline, captions = _pipeline()
    captions = (captions * 4)[:BATCH]
    steps, n_single = (5, 4) if quick else (20, 8)
    render(pipeline, captions[:8], range(8), 2, 3.0, 8)  # warm-up
    best_batched = best_single = 0.0
    for _ in range(2 if quick else 3):  # best of: the machine is shared, the best run is the cost
        start = time.perf_counter()
        render(pipeline, captions, range(BATCH), steps, 3.0, BATCH)
        best_batched = max(best_batched, BATCH / (time.perf_counter() - start))
        start = time.perf_counter()
        render(pipeline, captions[:n_single], range(n_single), steps, 3.0, 1)
        best_single = max(best_single, n_single / (time.perf_counter() - start))
    note = f"demo UNet 0.26M params, 16×16, {steps} steps, guidance 3 (CFG doubles the batch), CPU"
    return [
        {"section": SECTION, "metric": f"images/s batched ({BATCH})", "value": best_batched, "unit": "images/s",
         "baseline": best_single, "ratio": best_batched / best_single, "note": note + "; baseline: one at a time"},
    ]  # fmt: skip


def training_rows(quick: bool) -> list[dict[str, Any]]:
    from diffusers import DDPMScheduler

    from moalign.demo.images import write_corpus
    from moalign.image.denoiser import train_denoiser
    from moalign.image.ric import RiCImageConfig
    from moalign.methods.config import parse_config

    steps = 4 if quick else 20
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corpus = write_corpus(root / "corpus", 64)
        pipeline, _ = _pipeline()
        pipeline.save_pretrained(root / "pipeline")
        argv = ["--model_name_or_path", str(root / "pipeline"), "--dataset", str(corpus), "--output_dir", tmp]
        argv += ["--max_steps", str(steps), "--per_device_train_batch_size", "32", "--report_to", "none"]
        argv += ["--save_steps", "1000", "--logging_steps", "1000", "--disable_tqdm", "true"]
        config = parse_config(RiCImageConfig, argv, required=())
        from moalign.image.data import load_images

        images = load_images(str(corpus))
        stats = train_denoiser(config, None, images, list(images["caption"]), root / "ckpt", root / "unet")
        trainer_step = stats["seconds"] / stats["steps"]
        # The yardstick: the same UNet, batch and loss in a plain loop (no text encoding, no data loading).
        unet = pipeline.unet.train()
        optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        x = torch.randn(32, 3, 16, 16)
        hidden = torch.randn(32, pipeline.tokenizer.model_max_length, unet.config.cross_attention_dim)
        start = time.perf_counter()
        for _ in range(steps):
            noise, t = torch.randn_like(x), torch.randint(0, 1000, (32,))
            loss = torch.nn.functional.mse_loss(unet(noise_scheduler.add_noise(x, noise, t), t, hidden).sample, noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        plain = (time.perf_counter() - start) / steps
    return [
        {"section": SECTION, "metric": "training step (batch 32, 16×16)", "value": trainer_step, "unit": "s",
         "baseline": plain, "ratio": trainer_step / plain,
         "note": f"moalign ric-image's Trainer, {steps} steps; baseline: a plain PyTorch loop on the same UNet"},
    ]  # fmt: skip


def demo_rows(quick: bool) -> list[dict[str, Any]]:
    from moalign.demo.images import CONFIG, run_image_demo
    from moalign.demo.pipeline import SHIPPED_CONFIGS

    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        configs = SHIPPED_CONFIGS
        if quick:  # a shortened demo: a smoke test of the whole path, not the front
            config = yaml.safe_load((SHIPPED_CONFIGS / CONFIG).read_text())
            config["base"]["max_steps"] = config["ric"]["max_steps"] = 10
            configs = Path(tmp) / "configs"
            configs.mkdir()
            (configs / CONFIG).write_text(yaml.safe_dump(config))
        os.environ["MOALIGN_CACHE"] = str(Path(tmp) / "cache")  # cold: no scores from earlier runs
        start, cpu = time.perf_counter(), time.process_time()
        out = run_image_demo(
            Path(tmp) / "demo", configs, 400 if quick else 4000, 8 if quick else 32, 4 if quick else 10
        )
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
        from moalign.run import read_json

        fronts = read_json(out / "fronts.json")
    base, ric = fronts["runs"]
    load = max(load, os.getloadavg()[0])
    mode = "shortened (quick)" if quick else "as shipped"
    rows = [
        {"section": SECTION, "metric": "cold image demo", "value": seconds, "unit": "s",
         "note": f"moalign demo --task images, {mode}; load average up to {load:.1f} on {os.cpu_count()} CPUs"},
        {"section": SECTION, "metric": "cold image demo, CPU", "value": cpu_seconds, "unit": "CPU-s",
         "note": "user+sys of the demo's process (one torch thread): less sensitive than wall time to a busy machine"},
        {"section": SECTION, "metric": "hypervolume RiC", "value": ric["hypervolume"], "unit": "",
         "baseline": base["hypervolume"], "ratio": ric["hypervolume"] / max(base["hypervolume"], 1e-12),
         "note": f"baseline: the base pipeline; reference point {np.round(fronts['reference_point'], 4).tolist()}"},
    ]  # fmt: skip
    for name, value in ric["steerability"].items():
        rows.append({"section": SECTION, "metric": f"steerability {name}", "value": value, "unit": "Spearman",
                     "note": "RiC, 11 preferences" if not quick else "RiC, shortened demo"})  # fmt: skip
    return rows


def run(quick: bool) -> list[dict[str, Any]]:
    return sampling_rows(quick) + training_rows(quick) + demo_rows(quick)
