"""ParetoHqD's stage 2: the representative stage-1 models answer training prompts; their scored answers are
re-selected (k/2 per preference) to continue each preference's SFT, which fights over-fitting to k samples."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moalign import data
from moalign.errors import MoalignError
from moalign.methods.common import sampling_params, score_cache
from moalign.run import atomic_write_parquet, read_json, write_json
from moalign.scores import score

log = logging.getLogger("moalign")


def stage2_prompts(frame: pd.DataFrame, count: int, seed: int) -> list[str]:
    """`count` distinct training prompts drawn with the run's seed (all of them if there are fewer)."""
    unique = list(dict.fromkeys(frame["prompt"].tolist()))
    if len(unique) < count:
        log.info(f"stage 2: only {len(unique)} distinct prompts (asked for {count}); using all")
    order = np.random.default_rng(seed).permutation(len(unique))[:count]
    return [unique[i] for i in sorted(order)]


def usable_responses(generated: pd.DataFrame, drop_degenerate: bool) -> tuple[pd.DataFrame, dict[str, int]]:
    """Drop what stage 2 must not imitate: empty and (optionally) collapsed answers, and duplicates.

    Training on collapsed text is how a per-preference model learns to collapse; duplicates (two
    representative models giving the same answer) would count twice in a preference's k/2.
    """
    empty = generated["response"].str.strip() == ""
    if drop_degenerate:
        degenerate = generated["response"].map(data.is_degenerate) & ~empty
    else:
        degenerate = pd.Series(False, index=generated.index)
    kept = generated[~(empty | degenerate)]
    unique = kept.drop_duplicates(["prompt", "response"])
    dropped = {"empty": int(empty.sum()), "degenerate": int(degenerate.sum()), "duplicate": len(kept) - len(unique)}
    return unique.reset_index(drop=True), dropped


def generate_stage2(
    config: Any, objectives, stage1_dirs: list[Path], frame: pd.DataFrame, run_dir: Path
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Responses of the representative stage-1 models, scored; cached so a resumed run skips it.

    Each model's part is saved as it finishes (`stage2_parts/`), so an interruption loses one model's work.
    """
    import torch

    from moalign.generation import generate, load_model

    cached, info_path = run_dir / "stage2_generated.parquet", run_dir / "stage2_generated.json"
    if cached.exists() and info_path.exists():
        log.info(f"stage 2: reusing the generated data in {cached}")
        return pd.read_parquet(cached), read_json(info_path)
    parts = run_dir / "stage2_parts"
    parts.mkdir(parents=True, exist_ok=True)
    prompts = stage2_prompts(frame, config.stage2_prompts, config.seed)
    generation_seconds, generated_tokens = 0.0, 0
    pieces = []
    for m, model_dir in enumerate(stage1_dirs):
        part, part_info = parts / f"{model_dir.name}.parquet", parts / f"{model_dir.name}.json"
        if not (part.exists() and part_info.exists()):
            log.info(f"stage 2: {model_dir.name} answers {len(prompts)} prompts")
            start = time.perf_counter()
            model, tokenizer = load_model(str(model_dir))
            # a turn the model invents is not part of its answer
            params = [
                sampling_params(config, seed=config.seed + m * len(prompts) + i, stop=data.TURN_MARKERS)
                for i in range(len(prompts))
            ]
            outputs = generate(model, tokenizer, prompts, params, batch_size=config.generation_batch_size)
            del model
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            responses = [output.text.strip() for output in outputs]
            tokens = sum(output.prompt_tokens + len(output.token_ids) for output in outputs)
            atomic_write_parquet(
                pd.DataFrame({"prompt": prompts, "response": responses, "generator": model_dir.name}), part
            )
            write_json(part_info, {"seconds": time.perf_counter() - start, "tokens": tokens})
        info = read_json(part_info)
        generation_seconds += info["seconds"]
        generated_tokens += info["tokens"]
        pieces.append(pd.read_parquet(part))
    generated = pd.concat(pieces, ignore_index=True)
    generated, dropped = usable_responses(generated, config.stage2_drop_degenerate)
    if generated.empty:
        raise MoalignError(
            f"stage 2: no usable generated response ({dropped}); train stage 1 longer, "
            "or pass --stage2_drop_degenerate false"
        )
    start = time.perf_counter()
    for name, values in score(objectives, generated["prompt"], generated["response"], score_cache(config)).items():
        generated[name] = values
    info = {
        "generation_seconds": generation_seconds,
        "generated_tokens": generated_tokens,
        "scoring_seconds": time.perf_counter() - start,
        "prompts": len(prompts),
        "generators": [d.name for d in stage1_dirs],
        "dropped": dropped,
    }
    write_json(info_path, info)
    atomic_write_parquet(generated, cached)  # last: its presence means stage 2's data is complete
    shutil.rmtree(parts, ignore_errors=True)
    return generated, info
