"""`moalign cost`'s estimate: a recipe's FLOPs per stage from its config, its data's shape and its models' sizes.

Each method's estimator mirrors what its recipe runs (stages, steps, batch sizes, sequence lengths) with the
per-token costs of `moalign.cost`; the same counts are what a run records in its manifest, so the two can be
compared on a real run of the same YAML (tests/test_cost.py, benchmarks/bench_exact.py).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from moalign.cost.sizes import ModelSize, lora_shape, size_from_config
from moalign.errors import MoalignError

# Hub datasets the papers' configs name, for estimates without a download: rows of the split and mean tokens
# per prompt and per response under a Llama-2 tokenizer. Assumptions, not measurements: pass
# --prompt_tokens / --response_tokens / --rows to use other values.
KNOWN_DATASETS = {
    "Anthropic/hh-rlhf": {"rows": 160800, "pairs": True, "prompt_tokens": 160, "response_tokens": 70},
    "PKU-Alignment/PKU-SafeRLHF-10K": {"rows": 10000, "pairs": True, "prompt_tokens": 40, "response_tokens": 90},
}


@dataclass
class DataShape:
    """What the estimate needs of the dataset: rows, whether they are pairs, mean tokens per prompt/response."""

    rows: int
    pairs: bool
    prompt_tokens: float
    response_tokens: float
    source: str  # "measured" or "assumed"
    unique_prompts: int | None = None  # what RL trains on (MORL keeps each prompt once); None: every row's own
    chosen_tokens: float | None = None  # pairs: mean tokens of the chosen responses (what SFT trains on)

    @property
    def samples(self) -> int:
        return self.rows * (2 if self.pairs else 1)

    @property
    def prompts(self) -> int:
        return self.rows if self.unique_prompts is None else self.unique_prompts


@dataclass
class StageEstimate:
    name: str
    flops: float
    detail: str
    tokens: float = 0.0


@dataclass
class Estimate:
    method: str
    stages: list[StageEstimate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, flops: float, detail: str, tokens: float = 0.0) -> None:
        self.stages.append(StageEstimate(name, float(flops), detail, float(tokens)))

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.stages)


def data_shape(
    config: Any, tokenizer_name: str, rows: int | None, prompt_tokens: float | None, response_tokens: float | None
) -> DataShape:
    """Measured on the first 2 000 rows when the dataset and tokenizer are on disk, else the known hub shape."""
    from moalign import data

    source = str(config.dataset)
    if os.path.exists(source):
        from moalign.methods.common import load_tokenizer

        dataset = data.head(data.load(source, config.dataset_split), config.max_samples)
        tokenizer = load_tokenizer(tokenizer_name)
        head = dataset.select(range(min(2000, len(dataset))))
        pairs = data.is_pairs(head)
        prompts, responses = data.to_samples(head)
        mean = lambda texts: sum(len(ids) for ids in tokenizer(list(texts))["input_ids"]) / max(1, len(texts))  # noqa: E731
        shape = DataShape(len(dataset), pairs, mean(prompts), mean([" " + r for r in responses]) + 1, "measured")
        shape.unique_prompts = len(set(dataset["prompt"]))
        if pairs:
            shape.chosen_tokens = mean([" " + r for r in head["chosen"]]) + 1
    elif source in KNOWN_DATASETS:
        known = KNOWN_DATASETS[source]
        total = known["rows"] if not config.max_samples else min(known["rows"], config.max_samples)
        shape = DataShape(total, known["pairs"], known["prompt_tokens"], known["response_tokens"], "assumed")
    else:
        if None in (rows, prompt_tokens, response_tokens):
            raise MoalignError(
                f"dataset {source} is not on disk and its shape is not known: pass --rows, --prompt_tokens and "
                "--response_tokens"
            )
        shape = DataShape(int(rows), True, float(prompt_tokens), float(response_tokens), "given")  # type: ignore[arg-type]
    if rows is not None:
        shape.rows = rows
    if prompt_tokens is not None:
        shape.prompt_tokens = prompt_tokens
    if response_tokens is not None:
        shape.response_tokens = response_tokens
    return shape


def _batch(config: Any) -> int:
    """The global batch: per device × accumulation × the processes the estimate assumes (`num_processes`)."""
    return (
        config.per_device_train_batch_size * config.gradient_accumulation_steps * getattr(config, "cost_processes", 1)
    )


def _sequences(config: Any, max_steps: int | None, examples: int) -> int:
    """Sequences one Trainer stage trains on: `max_steps` global batches (an epoch's last batch holds what is
    left), or epochs × examples."""
    batch = _batch(config)
    steps = config.max_steps if max_steps is None else max_steps
    if not steps or steps <= 0:
        return int(math.ceil(config.num_train_epochs * examples))
    per_epoch = max(1, math.ceil(examples / batch))
    epochs, rest = divmod(steps, per_epoch)
    return int(epochs * examples + min(rest * batch, examples))


def _capped(length: float, config: Any) -> float:
    limit = getattr(config, "max_length", None)
    return min(length, limit) if limit else length


class Recipe:
    """The shared arithmetic of every method's estimate."""

    def __init__(self, config: Any, shape: DataShape):
        self.config, self.shape = config, shape
        self.policy = size_from_config(config.model_name_or_path, lora_shape(config))
        self.recompute = bool(getattr(config, "gradient_checkpointing", False))
        self.scorers: list[tuple[str, ModelSize, int | None]] = []
        for spec in config.objectives:
            from moalign.objectives import parse_spec

            kind, argument, options = parse_spec(spec)
            if kind == "hf":
                limit = int(options["max_length"]) if "max_length" in options else None
                self.scorers.append((argument, size_from_config(argument), limit))

    def train(self, sequences: float, length: float) -> tuple[float, float]:
        tokens = sequences * length
        return tokens * self.policy.train_per_token(self.recompute), tokens

    def score(self, samples: float, length: float) -> float:
        return sum(
            size.forward_per_token * samples * (min(length, lim) if lim else length) for _, size, lim in self.scorers
        )

    def generate(self, prompts: float, prompt_length: float, new_tokens: float) -> float:
        return self.policy.forward_per_token * prompts * (prompt_length + new_tokens)

    def sample_length(self, extra_prompt_tokens: float = 0.0) -> float:
        return _capped(self.shape.prompt_tokens + extra_prompt_tokens + self.shape.response_tokens, self.config)

    def new_tokens(self) -> float:
        """Generated tokens per response: as given (`--new_tokens`), measured on the initial policy
        (`--pilot_prompts`, sampled once, at the first generation the estimate meets), else the config's cap
        (`max_completion_length` for RL rollouts, `sample_max_new_tokens` for a recipe's own generation): how long
        a policy answers is only known once it runs, so the default is the most it can cost."""
        config = self.config
        config.cost_generates = True
        limit = getattr(config, "max_completion_length", None) or config.sample_max_new_tokens
        if config.cost_new_tokens is None and config.cost_pilot_prompts > 0:
            config.cost_new_tokens = pilot_new_tokens(config, config.cost_pilot_prompts)
            config.cost_new_tokens_source = f"the initial policy's mean over {config.cost_pilot_prompts} prompts"
        given = config.cost_new_tokens
        return float(limit if given is None else min(given, limit))


def _objective_name(spec: str) -> str:
    """An objective's name from its spec alone (building an `hf:` objective would load its model)."""
    from moalign.objectives import parse_spec

    kind, argument, options = parse_spec(spec)
    return str(options.get("name") or (os.path.basename(argument.rstrip("/")) if argument else kind))


def _tag_tokens(config: Any, names: list[str]) -> float:
    """Tokens RiC's reward tags add to a prompt (measured with the tokenizer when it is on disk)."""
    from moalign.methods.ric.conditioning import format_prompt
    from moalign.methods.ric.recipe import _template

    template = _template(config, names)
    try:
        from moalign.methods.common import load_tokenizer

        tokenizer = load_tokenizer(config.model_name_or_path)
    except Exception:  # a hub model: the tags are about 3 tokens per objective
        return 3.0 * len(names)
    plain = "\n\nHuman: a question\n\nAssistant:"
    tagged = format_prompt(plain, [0.0] * len(names), template)
    return len(tokenizer(tagged)["input_ids"]) - len(tokenizer(plain)["input_ids"])


def pilot_new_tokens(config: Any, prompts: int) -> float:
    """Mean tokens the initial policy samples for the first `prompts` distinct prompts of the data, with the
    settings and cap of the recipe's own generation (an RL rollout's `temperature`, `top_p` and
    `max_completion_length`; else `sample_*` and the turn markers as stops). A measurement before the run for a
    policy that stops before the cap; training moves the length, and RiC's tags and ParetoHqD's stage-1 models
    are not in the pilot. Needs the policy's weights and the data on disk."""
    from moalign import data, generation
    from moalign.generation import SamplingParams
    from moalign.methods.common import sampling_fields
    from moalign.models import pick_device

    if not (os.path.exists(str(config.dataset)) and os.path.exists(str(config.model_name_or_path))):
        raise MoalignError("--pilot_prompts samples the initial policy: it needs the model and the dataset on disk")
    dataset = data.head(data.load(str(config.dataset), config.dataset_split), config.max_samples)
    questions = list(dict.fromkeys(data.to_samples(dataset)[0]))[:prompts]
    rollout = getattr(config, "max_completion_length", None)
    if rollout:
        fields, stop = {"max_new_tokens": rollout, "temperature": config.temperature, "top_p": config.top_p}, []
    else:
        fields, stop = sampling_fields(config), list(data.TURN_MARKERS)
    params = [SamplingParams(**fields, seed=config.seed + i, stop=stop) for i in range(len(questions))]
    model, tokenizer = generation.load_model(str(config.model_name_or_path), device=pick_device("auto"))
    completions = generation.generate(model, tokenizer, questions, params, batch_size=64)
    # an RL step trains on the EOS it stopped at (PPO appends it; TRL's completions hold it)
    lengths = [len(c.token_ids) + (bool(rollout) and c.finish_reason == "stop") for c in completions]
    return sum(lengths) / max(1, len(lengths))


def selected_lengths(config: Any, shape: DataShape, scorers: list) -> list[float] | None:
    """Mean tokens (prompt + response + EOS) of the samples ParetoHqD's stage 1 selects for each preference,
    selected as the run will: with the run's scores.parquet (a run, or `moalign paretohqd --select_only`, wrote
    it), the data's score columns, or scores computed here when no objective needs a model. None otherwise: the
    estimate then takes the data's mean."""
    from pathlib import Path

    from moalign.methods.common import load_tokenizer
    from moalign.methods.paretohqd.recipe import dataset_scores, reuse_scores, training_frame
    from moalign.methods.paretohqd.selection import select_all
    from moalign.objectives import build_all
    from moalign.pareto import parse_preferences
    from moalign.scores import score

    if shape.source != "measured":
        return None
    names = [_objective_name(spec) for spec in config.objectives]
    frame, source = training_frame(config)
    if not reuse_scores(frame, names, Path(config.output_dir) / "scores.parquet"):
        given = dataset_scores(config, source, names)
        if given is None and scorers:
            return None
        if given is None:
            given = score(
                build_all(config.objectives), frame["prompt"].tolist(), frame["response"].tolist(), progress=False
            )
        for name in names:
            frame[name] = given[name]
    preferences = parse_preferences(config.preferences, len(names))
    selections = select_all(frame, names, preferences, config.k, config.n_layers, config.distance)[0]
    rows = sorted({int(i) for chosen in selections for i in chosen})  # only what stage 1 trains on
    tokenizer = load_tokenizer(config.model_name_or_path)
    prompts = tokenizer(frame["prompt"].iloc[rows].tolist())["input_ids"]
    responses = tokenizer([" " + r for r in frame["response"].iloc[rows]])["input_ids"]
    lengths = {row: len(p) + len(r) + 1 for row, p, r in zip(rows, prompts, responses)}
    return [sum(lengths[int(i)] for i in chosen) / max(1, len(chosen)) for chosen in selections]


def estimate_sft(config: Any, shape: DataShape) -> Estimate:
    recipe, estimate = Recipe(config, shape), Estimate("sft")
    length = recipe.sample_length()
    if shape.chosen_tokens is not None:  # SFT on pairs trains on the chosen responses
        length = _capped(shape.prompt_tokens + shape.chosen_tokens, config)
    flops, tokens = recipe.train(_sequences(config, None, shape.rows), length)
    estimate.add("sft", flops, f"{tokens:.3g} trained tokens", tokens)
    return estimate


def estimate_ric(config: Any, shape: DataShape) -> Estimate:
    recipe, estimate = Recipe(config, shape), Estimate("ric")
    names = [_objective_name(spec) for spec in config.objectives]
    tags = _tag_tokens(config, names)
    length = recipe.sample_length(tags)
    if recipe.scorers:
        estimate.add(
            "score offline data", recipe.score(shape.samples, recipe.sample_length()), f"{shape.samples} samples"
        )
    flops, tokens = recipe.train(_sequences(config, None, shape.samples), length)
    estimate.add("offline", flops, f"{tokens:.3g} trained tokens", tokens)
    n = config.online_prompts
    prompt = shape.prompt_tokens + tags
    new = recipe.new_tokens()
    kept = (1 - config.online_quantile ** len(names)) * n  # a sample stays if any objective clears its quantile
    for k in range(1, config.online_iterations + 1):
        estimate.add(f"generate_{k}", recipe.generate(n, prompt, new), f"{n} prompts × {new:.0f} new tokens")
        if recipe.scorers:
            estimate.add(f"score_{k}", recipe.score(n, shape.prompt_tokens + new), f"{n} generations")
        examples = int(k * kept + config.offline_mix_samples)
        flops, tokens = recipe.train(
            _sequences(config, config.online_max_steps, examples), _capped(prompt + new, config)
        )
        estimate.add(f"online_{k}", flops, f"{tokens:.3g} trained tokens", tokens)
    return estimate


def _preferences(config: Any) -> int:
    from moalign.pareto import parse_preferences

    return len(parse_preferences(config.preferences, len(config.objectives)))


def estimate_morl(config: Any, shape: DataShape) -> Estimate:
    from moalign.methods.ppo import total_steps

    recipe, estimate = Recipe(config, shape), Estimate("morl")
    rollout = _batch(config)  # PPO under a launcher: every rank samples its own rollout
    new = recipe.new_tokens()
    prompt = shape.prompt_tokens
    if recipe.scorers and config.normalization == "zscore":
        fitted = config.normalization_samples or shape.samples
        estimate.add("normalisation scores", recipe.score(fitted, recipe.sample_length()), f"{fitted} samples")
    for index in range(_preferences(config)):
        if config.algorithm == "ppo":
            steps = total_steps(config, shape.prompts)
            completions = steps * rollout
            epochs, forward = config.ppo_epochs, 2  # rollout: policy log-probs and values, then the reference
        else:  # TRL's RLOO / GRPO: per_device_train_batch_size counts completions, num_generations per prompt
            # each generated batch is trained num_iterations times (an epoch is that many passes over the prompts),
            # read by the reference when beta ≠ 0 and by the old policy when RLOO always, GRPO when its generation
            # and optimiser steps are out of step
            epochs = config.num_iterations
            steps = (
                config.max_steps
                if config.max_steps > 0
                else math.ceil(config.num_train_epochs * shape.prompts * config.num_generations * epochs / rollout)
            )
            completions = math.ceil(steps * rollout / epochs)
            old_pass = config.algorithm == "rloo" or config.gradient_accumulation_steps % (
                config.steps_per_generation * epochs
            )
            forward = bool(old_pass) + (config.beta != 0.0)
        tokens = completions * (prompt + new)
        flops = recipe.generate(completions, prompt, new)
        flops += forward * recipe.policy.forward_per_token * tokens
        flops += epochs * tokens * recipe.policy.train_per_token(recipe.recompute)
        flops += recipe.score(completions, prompt + new)
        estimate.add(
            f"preference {index + 1}", flops, f"{steps} steps × {rollout} completions, {epochs} epochs", epochs * tokens
        )
    return estimate


def _pair_tokens(shape: DataShape, config: Any) -> float:
    return 2 * _capped(shape.prompt_tokens + shape.response_tokens, config)


def _dpo_stage(recipe: Recipe, config: Any, shape: DataShape) -> tuple[float, float]:
    pairs = _sequences(config, None, shape.rows)
    tokens = pairs * _pair_tokens(shape, config)
    reference = shape.rows * _pair_tokens(shape, config) if config.precompute_ref_log_probs else tokens
    return tokens * recipe.policy.train_per_token(
        recipe.recompute
    ) + recipe.policy.forward_per_token * reference, tokens


def estimate_modpo(config: Any, shape: DataShape) -> Estimate:
    from moalign.methods.modpo.margins import margin_spec_kind

    recipe, estimate = Recipe(config, shape), Estimate("modpo")
    dpo_margins = [s for s in config.margin_objectives if margin_spec_kind(s) == "dpo"]
    for spec in dpo_margins:
        flops, tokens = _dpo_stage(recipe, config, shape)
        estimate.add(f"margin model ({spec})", flops, "moalign dpo, the recipe's first step", tokens)
        # implicit reward: the DPO model and its reference read every chosen and rejected response
        estimate.add(
            "margins",
            2 * recipe.policy.forward_per_token * shape.rows * _pair_tokens(shape, config),
            f"{shape.rows} pairs",
        )
    if not dpo_margins and recipe.scorers:
        estimate.add("margins", recipe.score(shape.samples, recipe.sample_length()), f"{shape.samples} samples")
    for index in range(_preferences(config)):
        flops, tokens = _dpo_stage(recipe, config, shape)
        estimate.add(f"preference {index + 1}", flops, f"{tokens:.3g} trained tokens", tokens)
    return estimate


def estimate_paretohqd(config: Any, shape: DataShape) -> Estimate:
    recipe, estimate = Recipe(config, shape), Estimate("paretohqd")
    preferences = _preferences(config)
    length = recipe.sample_length()
    if recipe.scorers:
        estimate.add("score data", recipe.score(shape.samples, length), f"{shape.samples} samples")
    selected = selected_lengths(config, shape, recipe.scorers)
    sequences = _sequences(config, config.stage1_max_steps, config.k)
    trained = [recipe.train(sequences, _capped(each, config)) for each in selected or [length] * preferences]
    how = "the selected samples' lengths" if selected else "the data's mean length"
    estimate.add("stage 1", sum(f for f, _ in trained), f"{preferences} preferences, {how}", sum(t for _, t in trained))
    if config.stages >= 2:
        models, n, new = len(config.objectives) + 1, config.stage2_prompts, recipe.new_tokens()
        generated = recipe.generate(models * n, shape.prompt_tokens, new) + recipe.score(
            models * n, shape.prompt_tokens + new
        )
        estimate.add("stage 2 generation", generated, f"{models} models × {n} prompts")
        k2 = config.stage2_k or config.k // 2
        flops, tokens = recipe.train(_sequences(config, config.stage2_max_steps or config.stage1_max_steps, k2), length)
        estimate.add("stage 2", preferences * flops, f"{preferences} preferences", preferences * tokens)
    return estimate


ESTIMATORS = {
    "sft": ("moalign.methods.sft:SFTRunConfig", estimate_sft),
    "ric": ("moalign.methods.ric:RiCConfig", estimate_ric),
    "morl": ("moalign.methods.morl:MORLConfig", estimate_morl),
    "modpo": ("moalign.methods.modpo:MODPOConfig", estimate_modpo),
    "paretohqd": ("moalign.methods.paretohqd:ParetoHqDConfig", estimate_paretohqd),
}


def guess_method(values: dict[str, Any]) -> str:
    """The method a recipe YAML is for, from the keys only that method has (MORLAIF's file: its `morl:` step)."""
    if isinstance(values.get("morl"), dict):
        return "morl"
    if "online_iterations" in values or "reward_tags" in values:
        return "ric"
    if "algorithm" in values or "ppo_epochs" in values:
        return "morl"
    if "margin_objectives" in values or "objective_index" in values or "loss_type" in values:
        return "modpo"
    if "stage1_max_steps" in values or "n_layers" in values:
        return "paretohqd"
    return "sft"


def estimate(
    path: str,
    method: str | None = None,
    rows: int | None = None,
    prompt_tokens: float | None = None,
    response_tokens: float | None = None,
    num_processes: int = 1,
    new_tokens: float | None = None,
    pilot_prompts: int = 0,
) -> tuple[Estimate, DataShape, Any]:
    """Parse a recipe YAML with its method's own config class (so defaults are the method's) and estimate it;
    with `pilot_prompts`, generations are estimated at the length the initial policy samples (`pilot_new_tokens`)."""
    import importlib

    from moalign.methods.config import config_section, parse_config

    method = method or guess_method(config_section(path, None))
    if method not in ESTIMATORS:
        raise MoalignError(f"method {method!r} has no estimate; use one of {', '.join(ESTIMATORS)}")
    target, estimator = ESTIMATORS[method]
    module, _, name = target.partition(":")
    config_class = getattr(importlib.import_module(module), name)
    config = parse_config(config_class, ["--config", path], section=method)
    config.cost_processes, config.cost_new_tokens, config.cost_pilot_prompts = num_processes, new_tokens, pilot_prompts
    config.cost_new_tokens_source, config.cost_generates = "given", False
    shape = data_shape(config, config.model_name_or_path, rows, prompt_tokens, response_tokens)
    result = estimator(config, shape)
    result.notes.append(
        f"data: {shape.rows} rows ({'pairs' if shape.pairs else 'samples'}), {shape.prompt_tokens:.1f} prompt and "
        f"{shape.response_tokens:.1f} response tokens on average ({shape.source})"
    )
    if config.cost_generates:
        result.notes.append(
            "generations: at the config's cap, the most they can cost (--pilot_prompts N measures)"
            if config.cost_new_tokens is None
            else f"generations: {config.cost_new_tokens:.1f} new tokens each ({config.cost_new_tokens_source})"
        )
    return result, shape, config
