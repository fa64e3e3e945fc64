"""Evaluating runs on the preference grid: one point per preference, hypervolume, collapse, steerability.

Every method is judged the same way, as the papers compare their fronts: for each weight vector on a
simplex grid the policy answers the same held-out prompts with the same decoding settings and seeds, the
objectives score the answers, and the mean score per objective is that preference's point. Fronts of several runs are compared
by hypervolume against ONE reference point shared by all of them, which is reported with the numbers.
"""

from __future__ import annotations

import math
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from moalign import distributed, uncertainty
from moalign.cost import generation_flops
from moalign.data import is_degenerate
from moalign.errors import MoalignError
from moalign.fronts import (
    check_reference_point,
    default_reference_point,
    finite,
    fmt_number,
    front_metrics,
    steerability,
    summary_table,
)
from moalign.generation import SamplingParams
from moalign.objectives import Objective, build_all
from moalign.pareto import non_dominated, simplex_grid, validate_weights
from moalign.policy import check_complete
from moalign.prompts import resolve_prompts
from moalign.run import read_manifest, write_json
from moalign.scores import ScoreCache, score

N_SAMPLES = 3  # responses per preference kept for the report
EVAL_CHUNKS = "eval_chunks"  # a run's generation chunks while `moalign eval` runs (removed once front.json is written)


def _count_tokens(policy: Any, texts: list[str]) -> tuple[int, str]:
    """Generated tokens, re-tokenised with the policy's tokenizer where it has one (words otherwise)."""
    if unit := getattr(policy, "output_unit", None):  # an image policy counts the images it made
        return len(texts), unit
    tokenizer = getattr(policy, "tokenizer", None)
    if tokenizer is not None:
        try:
            ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
            return sum(len(row) for row in ids), "tokens"
        except Exception:  # a tokenizer that cannot batch plain text: fall back to words
            pass
    return sum(len(text.split()) for text in texts), "words"


def evaluate_policy(
    policy: Any,
    prompts: Sequence[str],
    objectives: Sequence[Objective],
    preferences: np.ndarray | Sequence[Sequence[float]],
    sampling: SamplingParams | None = None,
    cache: ScoreCache | None = None,
    progress: bool = False,
    chunks: Path | None = None,
    chunks_key: Any = None,
    chunk_size: int = 256,
) -> dict[str, Any]:
    """One point (mean score per objective) per preference, plus samples, collapse and steerability.

    `policy.generate` gives every prompt the same seed under every preference, so points differ only
    because the preference does. With `chunks` (a folder), a text policy's responses are generated in
    chunks saved there and shared out between ranks: a rerun after a kill resumes from the last chunk
    (`chunks_key` names the model, so a retrained run starts over); `chunk_size` prompts per chunk.
    """
    prompts = list(prompts)
    if not prompts:
        raise MoalignError("no evaluation prompts: give a non-empty prompt list (--prompts FILE)")
    objectives = list(objectives)
    if not objectives:
        raise MoalignError("no objectives to evaluate with")
    names = [objective.name for objective in objectives]
    grid = np.asarray(preferences, dtype=float)
    if grid.ndim != 2 or len(grid) == 0:
        raise MoalignError(f"preferences must be a non-empty list of weight vectors, got shape {grid.shape}")
    for w in grid:
        validate_weights(w, len(names))
    sampling = sampling or getattr(policy, "sampling", None) or SamplingParams()
    cache = cache if cache is not None else ScoreCache()

    points, scored, samples, collapse_rates = [], [], [], []
    tokens, unit, seconds, flops = 0, "tokens", 0.0, 0.0
    label = f"evaluating {getattr(policy, 'run_dir', Path('policy')).name}"
    done: dict[Any, tuple[list[float], float, list[dict[str, Any]]]] = {}
    variant = getattr(policy, "variant", lambda weights: tuple(weights))
    for w in tqdm(grid, desc=label, unit="preference", disable=not progress):
        key = variant(w)
        if key not in done:  # preferences the policy serves alike share one generation
            start = time.perf_counter()
            responses = _responses(policy, prompts, w, sampling, chunks, chunks_key, chunk_size)
            seconds += time.perf_counter() - start
            if len(responses) != len(prompts):
                raise MoalignError(f"the policy returned {len(responses)} responses for {len(prompts)} prompts")
            count, unit = _count_tokens(policy, responses)
            tokens += count
            flops += generation_flops(policy, prompts, responses, w)
            # on the main process, which has every response: the other ranks would score them all again
            scores = distributed.run_on_main(score, objectives, prompts, responses, cache, progress=False)
            collapse = getattr(policy, "degenerate", None)  # a policy's own rule (images: identical images)
            degenerate = collapse(responses) if collapse else [is_degenerate(text) for text in responses]
            shown = [
                {
                    "prompt": prompts[i],
                    "response": responses[i],
                    "scores": {name: float(scores[name][i]) for name in names},
                    "degenerate": degenerate[i],
                }
                for i in range(min(getattr(policy, "report_samples", N_SAMPLES), len(prompts)))
            ]
            per_prompt = np.stack([np.asarray(scores[name], dtype=float) for name in names], axis=1)
            done[key] = (per_prompt, float(np.mean(degenerate)), shown)
        per_prompt, collapse, shown = done[key]
        points.append(per_prompt.mean(axis=0))
        scored.append(per_prompt)
        collapse_rates.append(collapse)
        samples.append(shown)
    matrix = np.asarray(points, dtype=float)
    resampled = uncertainty.resampled_points(np.stack(scored))
    return {
        "objectives": names,
        "preferences": grid.tolist(),
        "points": matrix.tolist(),
        "non_dominated": np.flatnonzero(non_dominated(matrix)).tolist(),
        "collapse_rate": float(np.mean(collapse_rates)),
        "collapse_rates": collapse_rates,
        "steerability": steerability(grid, matrix, names),
        # 95% bootstrap intervals over prompts (moalign.uncertainty); the hypervolume's needs the reference point
        "point_intervals": uncertainty.interval(resampled).tolist(),
        "steerability_interval": uncertainty.steerability_intervals(grid, resampled, names),
        "_resampled_points": resampled,
        "prompts": len(prompts),
        "samples": samples,
        "seconds": seconds,
        "generated": tokens,
        "generated_unit": unit,
        "generated_per_second": tokens / seconds if seconds > 0 else math.nan,
        "flops": flops,
        "sampling": dict(vars(sampling)),
    }


def _responses(
    policy: Any, prompts: list[str], w: np.ndarray, sampling: Any, chunks: Path | None, key: Any, chunk_size: int
) -> list[Any]:
    """The policy's responses to `prompts` under preference `w`, through `generate_stage` when `chunks` is
    given and the policy generates text (an image policy renders in one go)."""
    from moalign.methods.common import generate_stage
    from moalign.pareto import preference_name
    from moalign.policy import Policy

    if chunks is None or type(policy).generate is not Policy.generate:
        return list(policy.generate(prompts, w, sampling))
    weights = policy.check_weights(w)
    rows = [SamplingParams(**{**vars(sampling), "seed": sampling.seed + i}) for i in range(len(prompts))]  # as generate

    def complete(some: list[str], params: list[SamplingParams]) -> list[Any]:
        return policy.complete(some, [weights] * len(some), params)

    folder = chunks / preference_name(w)
    completions, _ = generate_stage(folder, prompts, rows, complete, chunk_size, key=[key, weights.tolist()])
    return [c.text for c in completions]


def _objective_specs(manifests: list[tuple[Path, dict]]) -> tuple[list, list[str]]:
    """The first run's objectives; every run compared must name the same ones."""
    first_run, first = manifests[0]
    specs = first.get("objectives") or []
    if not specs:
        raise MoalignError(f"{first_run}/moalign.json lists no 'objectives'; cannot score its outputs")
    names = list(first.get("objective_names") or [])
    for run, manifest in manifests[1:]:
        other = list(manifest.get("objective_names") or [])
        if other != names:
            raise MoalignError(
                f"runs have different objectives: {first_run} has {names}, {run} has {other}; "
                "compare only runs trained on the same objectives"
            )
    return specs, names


def _sampling_for(policy: Any, sampling: SamplingParams | dict | None) -> SamplingParams:
    if isinstance(sampling, SamplingParams):
        return sampling
    base = getattr(policy, "sampling", None) or SamplingParams()
    return type(base)(**{**vars(base), **(sampling or {})})  # an image policy's settings are its own type


def evaluate_runs(
    run_dirs: Sequence[str | Path],
    prompts: Sequence[str] | str | Path | None = None,
    n_prompts: int | None = None,
    divisions: int = 10,
    reference_point: Sequence[float] | str | None = None,
    sampling: SamplingParams | dict | None = None,
    output_dir: str | Path | None = None,
    progress: bool = True,
    chunk_size: int = 256,
    allow_incomplete: bool = False,
    engine: Any = None,
) -> list[dict[str, Any]]:
    """Evaluate every run on the same grid and prompts; write front.json/png and report.html per run.

    `engine` (a `moalign.engines.OpenAIEngine`) generates on an OpenAI-compatible server instead of in
    this process: each run's models must be served there under the names `moalign export` gives them.

    `sampling` is either the exact decoding settings or a dict of overrides on each run's own. With
    several runs a combined plot and report go to `output_dir` (default: the first run's parent).
    Responses are generated in chunks of `chunk_size` prompts saved in each run (`eval_chunks/`, removed
    when its front is written), so an interrupted evaluation resumes; under a launcher, ranks share them.
    """
    from moalign.policy import load_policy

    runs = [Path(run) for run in run_dirs]
    if not runs:
        raise MoalignError("no run directories given")
    manifests = [(run, read_manifest(run)) for run in runs]
    for run, manifest in manifests:  # before any work: an unfinished run would give a partial front
        check_complete(manifest, run, allow_incomplete)
    specs, names = _objective_specs(manifests)
    n = len(names) or len(specs)
    if reference_point is not None:
        reference_point = check_reference_point(reference_point, n)
    if divisions < 1:
        raise MoalignError(f"--divisions must be ≥ 1, got {divisions}")
    if chunk_size < 1:
        raise MoalignError(f"--generation_chunk_size must be ≥ 1, got {chunk_size}")
    prompt_list = resolve_prompts(prompts, manifests, n_prompts)
    objectives = build_all(specs)
    if names and [o.name for o in objectives] != names:
        raise MoalignError(
            f"{runs[0]}/moalign.json: objective_names {names} do not match its objectives "
            f"{[o.name for o in objectives]}"
        )
    names = [o.name for o in objectives]
    grid = simplex_grid(len(names), divisions)
    cache = ScoreCache()

    fronts = []
    for run, manifest in manifests:
        # several ranks: each on its own device (one GPU per rank), else where the policy chooses
        options = {"device": distributed.device()} if distributed.world_size() > 1 else {}
        policy = load_policy(run, allow_incomplete=allow_incomplete, **options)
        policy.engine = engine
        result = evaluate_policy(
            policy,
            prompt_list,
            objectives,
            grid,
            _sampling_for(policy, sampling),
            cache,
            progress=progress and distributed.is_main(),
            chunks=run / EVAL_CHUNKS,
            chunks_key=[manifest, engine.base_url if engine is not None else "local"],  # engines sample apart
            chunk_size=chunk_size,
        )
        if hasattr(policy, "sample_grid"):  # image runs: a grid of images per preference for the report
            result["grid"] = str(policy.sample_grid(result, run / "grid.png"))
        del policy  # one model in memory at a time
        result.update(run=str(run), name=run.name, method=manifest["method"])
        for key in ("stats", "training", "base_model"):
            if key in manifest:
                result[key] = manifest[key]
        fronts.append(result)

    return distributed.run_on_main(_write_fronts, fronts, runs, reference_point, output_dir)


def _write_fronts(
    fronts: list[dict[str, Any]],
    runs: list[Path],
    reference_point: Sequence[float] | None,
    output_dir: str | Path | None,
) -> list[dict[str, Any]]:
    """Add the front metrics; write front.json, front.png and report.html per run (and combined ones for
    several runs). The main process writes; every rank gets the fronts."""
    from moalign import report

    reference = reference_point or default_reference_point([f["points"] for f in fronts])
    for front in fronts:
        front.update(front_metrics(front["points"], reference))
        resampled = front.pop("_resampled_points", None)
        if resampled is not None:
            front["hypervolume_interval"] = uncertainty.hypervolume_interval(resampled, front["reference_point"])
        run = Path(front["run"])
        write_json(run / "front.json", finite(front))
        report.plot_fronts([front], run / "front.png")
        report.write_html([front], run / "report.html", plot=run / "front.png")
        shutil.rmtree(run / EVAL_CHUNKS, ignore_errors=True)
    if len(fronts) > 1:
        out = Path(output_dir) if output_dir else runs[0].resolve().parent
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "fronts.json", finite({"reference_point": reference, "runs": fronts}))
        report.plot_fronts(fronts, out / "fronts.png")
        report.write_html(fronts, out / "report.html", plot=out / "fronts.png")
    return fronts


def _join_negative_values(argv: list[str], flag: str) -> list[str]:
    """`--reference-point -1,-60` would read as a flag to argparse; pass it as `--reference-point=-1,-60`."""
    out: list[str] = []
    index = 0
    while index < len(argv):
        if (
            argv[index] in (flag, "--" + flag[2:].replace("-", "_"))
            and index + 1 < len(argv)
            and re.fullmatch(r"-[\d.][^ ]*", argv[index + 1])
        ):
            out.append(f"{flag}={argv[index + 1]}")
            index += 2
        else:
            out.append(argv[index])
            index += 1
    return out


@dataclass
class EvalConfig:
    """`moalign eval RUN [RUN ...]`: every run answers the same prompts on the same preference grid."""

    prompts: str | None = field(default=None, metadata={"help": "JSONL with a 'prompt' field (default: the run's)"})
    n_prompts: int | None = field(default=None, metadata={"help": "use only the first N prompts"})
    divisions: int = field(default=10, metadata={"help": "grid steps per objective (10: w1=0,0.1,…,1)"})
    reference_point: str | None = field(default=None, metadata={"help": "shared hypervolume reference, e.g. -1,-60"})
    max_new_tokens: int | None = None
    temperature: float | None = None
    output_dir: str | None = field(default=None, metadata={"help": "where the combined report goes (several runs)"})
    allow_incomplete: bool = field(default=False, metadata={"help": "evaluate an unfinished per-preference run"})
    engine: str = field(default="local", metadata={"help": "local (in-process) or openai (a server at --base_url)"})
    base_url: str | None = field(
        default=None, metadata={"help": "with --engine openai: the server, e.g. http://127.0.0.1:8001/v1"}
    )
    engine_concurrency: int = field(default=32, metadata={"help": "with --engine openai: requests in flight"})
    generation_chunk_size: int = field(
        default=256, metadata={"help": "prompts per chunk: saved when done (a rerun resumes), shared out between ranks"}
    )


def cli(argv: list[str]) -> None:
    from moalign.engines import engine_from
    from moalign.methods.config import parse_config

    args = parse_config(
        EvalConfig,
        _join_negative_values(argv, "--reference-point"),
        required=(),
        positionals=[("runs", "+", "run directories (each with moalign.json)")],
        prog="moalign eval",
    )
    overrides = {
        key: value
        for key, value in (("max_new_tokens", args.max_new_tokens), ("temperature", args.temperature))
        if value is not None
    }
    fronts = evaluate_runs(
        args.runs,
        prompts=args.prompts,
        n_prompts=args.n_prompts,
        divisions=args.divisions,
        reference_point=args.reference_point,
        sampling=overrides,
        output_dir=args.output_dir,
        allow_incomplete=args.allow_incomplete,
        chunk_size=args.generation_chunk_size,
        engine=engine_from(args.engine, args.base_url, args.engine_concurrency, ("--engine", "--base_url")),
    )
    print(summary_table(fronts))
    print(f"reference point: {', '.join(fmt_number(v, 4) for v in fronts[0]['reference_point'])}")
    if len(fronts) > 1:
        out = Path(args.output_dir) if args.output_dir else Path(args.runs[0]).resolve().parent
        print(f"report: {out / 'report.html'}")
    else:
        print(f"report: {Path(fronts[0]['run']) / 'report.html'}")
