"""Rewards-in-Context for text-to-image models (Yang et al., ICML 2024, §5.3): one denoiser, steered by the
rewards written into its caption.

Usage: moalign ric-image --config configs/ric_image_demo.yaml [--flag value ...]
       accelerate launch -m moalign.cli ric-image --config configs/ric_sd15.yaml   (the paper's setup)

A command of its own rather than `moalign ric` with a modality switch: the config extends the Trainer's
TrainingArguments (there is no TRL trainer for diffusion), with image columns, resolution, EMA and
guidance, none of which a text run has; the mathematics (reward template, preference mapping, MORS) is
RiC's text implementation, imported.

Stages, each resumable (a finished stage is skipped, an interrupted one resumes from its checkpoint):
  prepare   score every image, z-score statistics (data/offline.parquet)
  offline   train the denoiser on `"{caption} <rm1> 0.3 <rm2> -1.2"`, the whole caption dropped to "" 10% of
            the time so that classifier-free guidance has an unconditional branch
  online_k  (optional) multi-objective rejection sampling: sample targets, generate, score, relabel with the
            scores obtained, keep images with any objective ≥ its q-quantile, mix filtered offline data, train on
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
from transformers import TrainingArguments

from moalign import distributed
from moalign.errors import MoalignError, first_line
from moalign.image.data import load_images
from moalign.image.denoiser import train_denoiser
from moalign.image.pipeline import conditioned_caption, load_pipeline
from moalign.methods.common import score_cache, training_totals, write_run_manifest
from moalign.methods.config import CommonArguments, parse_config
from moalign.methods.ric import MAPPINGS, RewardTemplate, mapping_settings, mors_filter, sample_targets
from moalign.methods.stages import finished_stage
from moalign.models import pick_device
from moalign.objectives import build_all
from moalign.objectives.image import ImageResponse
from moalign.objectives.python import PythonFunction
from moalign.run import atomic_path, atomic_write_parquet, claim_run_dir, result_settings
from moalign.scores import NormStats, score

log = logging.getLogger("moalign")
POLICY = "moalign.image.policy:RiCImagePolicy"


@dataclass
class RiCImageConfig(CommonArguments, TrainingArguments):
    """The Trainer's TrainingArguments plus RiC's options (the paper's values are the defaults where it gives them)."""

    image_column: str = field(default="image", metadata={"help": "dataset column holding the images"})
    caption_column: str = field(default="text", metadata={"help": "dataset column (metadata.jsonl key) of captions"})
    resolution: int | None = field(
        default=None, metadata={"help": "resize and centre-crop images to N×N (default: all must share one size)"}
    )
    reward_tags: list[str] | None = field(default=None, metadata={"help": "tags per objective; default <rm1>, <rm2>…"})
    number_format: str = field(default="{:.1f}", metadata={"help": "how a reward is written (paper: 1 decimal)"})
    preference_mapping: str = field(default="quantile", metadata={"help": "quantile (paper), linf, l2 or linear"})
    caption_dropout: float = field(default=0.1, metadata={"help": "share of captions dropped to '' (paper: 0.1)"})
    use_ema: bool = field(default=False, metadata={"help": "keep an EMA of the denoiser's weights and save it"})
    ema_decay: float = 0.9999
    online_iterations: int = field(default=0, metadata={"help": "MORS iterations (0: offline only)"})
    online_prompts: int = field(default=512, metadata={"help": "images generated per online iteration"})
    online_quantile: float = field(default=0.7, metadata={"help": "keep images with any objective ≥ this quantile"})
    offline_mix_samples: int = field(default=512, metadata={"help": "filtered offline images mixed in per iteration"})
    online_max_steps: int = field(default=-1, metadata={"help": "max steps of each online stage (-1: epochs)"})
    sample_steps: int = field(default=50, metadata={"help": "denoising steps when sampling"})
    sample_guidance_scale: float = field(default=7.5, metadata={"help": "classifier-free guidance scale"})
    generation_batch_size: int = field(default=16, metadata={"help": "images denoised at once"})


def _validate(config: RiCImageConfig, objectives) -> None:
    if len(objectives) < 2:
        raise MoalignError("RiC needs at least two objectives (objectives: [spec, spec, ...])")
    text_only = [
        o.spec for o in objectives if getattr(o, "modality", None) != "image" and not isinstance(o, PythonFunction)
    ]
    if text_only:
        raise MoalignError(
            f"objectives {text_only} score text; image runs take image objectives (see `moalign objectives`)"
        )
    if config.preference_mapping not in MAPPINGS:
        raise MoalignError(f"preference_mapping must be one of {', '.join(MAPPINGS)}")
    if not 0.0 <= config.caption_dropout < 1.0:
        raise MoalignError(f"caption_dropout must be in [0, 1), got {config.caption_dropout}")
    if not 0.0 <= config.online_quantile <= 1.0:
        raise MoalignError("online_quantile must be in [0, 1]")
    if config.online_iterations < 0:
        raise MoalignError("online_iterations must be ≥ 0")


def template_for(config: RiCImageConfig, n: int) -> RewardTemplate:
    tags = config.reward_tags or [f"<rm{i + 1}>" for i in range(n)]
    if len(tags) != n:
        raise MoalignError(f"reward_tags has {len(tags)} tags for {n} objectives")
    return RewardTemplate(tags=list(tags), number_format=config.number_format)


# --- the recipe -------------------------------------------------------------------------------------------


class RiCImageRecipe:
    """The stages of one RiC image run, sharing the data, objectives, statistics and template."""

    def __init__(self, config: RiCImageConfig):
        self.config = config
        self.objectives = build_all(config.objectives)
        _validate(config, self.objectives)
        self.names = [o.name for o in self.objectives]
        self.template = template_for(config, len(self.names))
        self.run_dir = Path(config.output_dir)
        self.cache = score_cache(config)
        self.stages: dict[str, Any] = {}
        self._images: datasets.Dataset | None = None
        self._tokenizer = None

    @property
    def images(self) -> datasets.Dataset:
        if self._images is None:
            c = self.config
            self._images = load_images(
                c.dataset, c.dataset_split, c.image_column, c.caption_column, c.max_samples, c.resolution
            )
        return self._images

    @property
    def tokenizer(self):
        if self._tokenizer is None:  # the pipeline's own, without loading its weights
            from transformers import AutoTokenizer

            path = self.config.model_name_or_path
            try:
                self._tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer")
            except (OSError, ValueError) as error:
                raise MoalignError(f"cannot load the tokenizer of pipeline {path} ({first_line(error)})") from None
        return self._tokenizer

    def score_images(self, captions: list[str], images: list) -> dict[str, np.ndarray]:
        return score(self.objectives, captions, [ImageResponse(i) for i in images], cache=self.cache)

    def claim(self) -> None:
        """Make the run directory this config's: a rerun with settings that change the result refuses in one
        line (after the data and scores are checked, so that bad input leaves nothing behind)."""
        if distributed.is_main():
            overwrite = getattr(self.config, "overwrite", False)
            claim_run_dir(self.run_dir, "ric-image", result_settings(self.config), overwrite)

    def prepare(self) -> pd.DataFrame:
        path = self.run_dir / "data" / "offline.parquet"
        if path.exists():
            self.claim()
            return pd.read_parquet(path)
        captions = list(self.images["caption"])
        raw = self.score_images(captions, [row["image"] for row in self.images])
        stats = NormStats.fit(raw, self.names)
        z = stats.zscore(stats.matrix(raw))
        frame = pd.DataFrame({"row": np.arange(len(captions)), "caption": captions})
        for i, name in enumerate(self.names):
            frame[name], frame[f"z_{name}"] = raw[name], z[:, i]
        self.claim()
        atomic_write_parquet(frame, path)
        return frame

    def conditioned(self, frame: pd.DataFrame) -> list[str]:
        z = frame[[f"z_{n}" for n in self.names]].to_numpy()
        return [conditioned_caption(c, row, self.template, self.tokenizer) for c, row in zip(frame["caption"], z)]

    def offline_stage(self, offline: pd.DataFrame) -> Path:
        final = self.run_dir / "stages" / "offline"
        self.stages["offline"] = train_denoiser(
            self.config, None, self.images, self.conditioned(offline), self.run_dir / "checkpoints" / "offline", final
        )
        return final

    def online_stage(self, k: int, denoiser: Path, offline: pd.DataFrame, stats: NormStats) -> Path:
        config, name = self.config, f"online_{k}"
        final = self.run_dir / "stages" / name
        if (done := finished_stage(final)) is not None:
            self.stages[name] = done
            return final
        folder = self.run_dir / "data" / name
        with distributed.main_first():
            if not (folder / "metadata.jsonl").exists():
                self.generate_online(k, denoiser, offline, stats, folder)
        # The buffer grows: every earlier iteration's kept images stay in.
        kept = [self._online_rows(self.run_dir / "data" / f"online_{j}") for j in range(1, k + 1)]
        z_offline = offline[[f"z_{n}" for n in self.names]].to_numpy()
        pool = offline[mors_filter(z_offline, config.online_quantile)]
        mix = pool.sample(n=min(len(pool), config.offline_mix_samples), random_state=config.seed + k)
        parts = [data for data, _ in kept] + [self.images.select(mix["row"].tolist())]
        frames = [frame for _, frame in kept] + [mix]
        train = pd.concat(frames, ignore_index=True)
        if len(train) == 0:
            raise MoalignError(f"online iteration {k} kept no images; lower online_quantile or raise online_prompts")
        self.stages[name] = train_denoiser(
            config,
            denoiser,
            datasets.concatenate_datasets(parts),
            self.conditioned(train),
            self.run_dir / "checkpoints" / name,
            final,
            max_steps=config.online_max_steps,
        )
        self.stages[name].update(kept=int(sum(len(frame) for _, frame in kept)), offline_mixed=len(mix))
        return final

    def _online_rows(self, folder: Path) -> tuple[datasets.Dataset, pd.DataFrame]:
        frame = pd.read_json(folder / "metadata.jsonl", lines=True)
        images = datasets.load_dataset("imagefolder", data_dir=str(folder), split="train")
        keep = [i for i, k in enumerate(images["kept"]) if k]
        return images.select(keep).select_columns(["image", "caption"]), frame[frame["kept"]]

    def generate_online(self, k: int, denoiser: Path, offline: pd.DataFrame, stats: NormStats, folder: Path) -> None:
        """Generate for sampled targets, score, relabel with the scores obtained (hindsight), filter; the
        images and their labels go to `folder` in the imagefolder convention."""
        from moalign.image.policy import render

        config = self.config
        rng = np.random.default_rng(config.seed + 1000 * k)
        z = offline[[f"z_{n}" for n in self.names]].to_numpy()
        captions = list(rng.choice(offline["caption"].to_numpy(), size=config.online_prompts))
        targets = sample_targets(len(captions), z.min(axis=0), z.max(axis=0), rng)
        pipeline = load_pipeline(config.model_name_or_path, denoiser, device=pick_device())
        start = time.perf_counter()
        conditioned = [conditioned_caption(c, t, self.template, pipeline.tokenizer) for c, t in zip(captions, targets)]
        seeds = [config.seed + 100_000 * k + i for i in range(len(captions))]
        images = render(
            pipeline,
            conditioned,
            seeds,
            config.sample_steps,
            config.sample_guidance_scale,
            config.generation_batch_size,
        )
        seconds = time.perf_counter() - start
        raw = self.score_images(captions, images)
        obtained = stats.zscore(stats.matrix(raw))  # hindsight relabelling with the offline statistics
        kept = mors_filter(obtained, config.online_quantile)
        rows = []
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            for i, image in enumerate(images):
                image.save(tmp / f"{i:06d}.png")
                row = {"file_name": f"{i:06d}.png", "caption": captions[i], "kept": bool(kept[i])}
                row.update({n: float(raw[n][i]) for n in self.names})
                row.update({f"z_{n}": float(obtained[i, j]) for j, n in enumerate(self.names)})
                rows.append(row)
            (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        log.info(f"online {k}: generated {len(images)} images in {seconds:.1f}s, kept {int(kept.sum())}")
        self.stages[f"generate_{k}"] = {"seconds": seconds, "images": len(images), "kept": int(kept.sum())}

    def run(self) -> Path:
        with distributed.main_first():  # the main process scores and writes; the others read its parquet
            offline = self.prepare()  # checks data and scores before anything is written
        stats = NormStats.fit(offline, self.names)
        denoiser = self.offline_stage(offline)
        stage_models = {"offline": str(denoiser.relative_to(self.run_dir))}
        for k in range(1, self.config.online_iterations + 1):
            denoiser = self.online_stage(k, denoiser, offline, stats)
            stage_models[f"online_{k}"] = str(denoiser.relative_to(self.run_dir))
        z = offline[[f"z_{n}" for n in self.names]].to_numpy()
        write_run_manifest(
            self.config,
            "ric-image",
            POLICY,
            modality="image",
            denoiser=str(denoiser.relative_to(self.run_dir)),
            stage_models=stage_models,
            sampling=sampling_fields(self.config),
            stats=stats.to_dict(),
            ric=mapping_settings(self.template, self.config.preference_mapping, z),
            training=training_totals(self.stages),
        )
        return self.run_dir


def sampling_fields(config: RiCImageConfig) -> dict[str, Any]:
    """The sampling settings a run's policy uses by default (stored in the manifest)."""
    return {"steps": config.sample_steps, "guidance_scale": config.sample_guidance_scale, "seed": 0}


def train(config: RiCImageConfig) -> Path:
    return RiCImageRecipe(config).run()


def cli(argv: list[str]) -> None:
    config = parse_config(RiCImageConfig, argv, section="ric")
    print(f"RiC image run written to {train(config)}")
