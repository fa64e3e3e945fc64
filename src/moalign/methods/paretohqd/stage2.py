"""ParetoHqD's stage 2: the representative stage-1 models answer training prompts; their scored answers are
re-selected (k/2 per preference) to continue each preference's SFT, which fights over-fitting to k samples."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moalign import data, distributed
from moalign.errors import MoalignError
from moalign.methods.common import generate_with_model, sampling_params, score_cache
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

    Each model's answers are generated in chunks saved as they finish (`stage2_parts/<model>/`) and shared
    out between ranks, so an interruption loses at most one round of chunks; the main process scores.
    """
    cached, info_path = run_dir / "stage2_generated.parquet", run_dir / "stage2_generated.json"
    if cached.exists() and info_path.exists():
        log.info(f"stage 2: reusing the generated data in {cached}")
        return pd.read_parquet(cached), read_json(info_path)
    parts = run_dir / "stage2_parts"
    prompts = stage2_prompts(frame, config.stage2_prompts, config.seed)
    pieces, generation = [], {"seconds": 0.0, "tokens": 0, "wait_seconds": 0.0, "flops": 0.0}
    for m, model_dir in enumerate(stage1_dirs):
        log.info(f"stage 2: {model_dir.name} answers {len(prompts)} prompts")
        # a turn the model invents is not part of its answer
        params = [
            sampling_params(config, seed=config.seed + m * len(prompts) + i, stop=data.TURN_MARKERS)
            for i in range(len(prompts))
        ]
        outputs, stats = generate_with_model(parts / model_dir.name, prompts, params, model_dir, config)
        generation["seconds"] += stats["seconds"]
        generation["flops"] += stats["flops"]
        generation["wait_seconds"] += stats["wait_seconds"]
        generation["tokens"] += sum(output.prompt_tokens + len(output.token_ids) for output in outputs)
        responses = [output.text.strip() for output in outputs]
        pieces.append(pd.DataFrame({"prompt": prompts, "response": responses, "generator": model_dir.name}))
    generated = pd.concat(pieces, ignore_index=True)
    distributed.run_on_main(score_stage2, config, objectives, generated, prompts, stage1_dirs, generation, run_dir)
    distributed.remove(parts)
    return pd.read_parquet(cached), read_json(info_path)


def score_stage2(
    config: Any,
    objectives,
    generated: pd.DataFrame,
    prompts: list[str],
    stage1_dirs: list[Path],
    generation: dict[str, Any],
    run_dir: Path,
) -> None:
    """Drop unusable answers, score the rest and save them with the stage's statistics (main process)."""
    generated, dropped = usable_responses(generated, config.stage2_drop_degenerate)
    if generated.empty:
        raise MoalignError(
            f"stage 2: no usable generated response ({dropped}); train stage 1 longer, "
            "or pass --stage2_drop_degenerate false"
        )
    start = time.perf_counter()
    for name, values in score(objectives, generated["prompt"], generated["response"], score_cache(config)).items():
        generated[name] = values
    from moalign.cost import scoring_flops

    info = {
        "generation_seconds": generation["seconds"],
        "generated_tokens": generation["tokens"],
        # the representative models' generation and the model-based objectives' scoring of it (moalign.cost)
        "flops": generation["flops"] + scoring_flops(objectives, generated["prompt"], generated["response"]),
        "generation_wait_seconds": generation["wait_seconds"],
        "scoring_seconds": time.perf_counter() - start,
        "prompts": len(prompts),
        "generators": [d.name for d in stage1_dirs],
        "dropped": dropped,
        "world_size": distributed.world_size(),
    }
    write_json(run_dir / "stage2_generated.json", info)
    # last: its presence means stage 2's data is complete
    atomic_write_parquet(generated, run_dir / "stage2_generated.parquet")
