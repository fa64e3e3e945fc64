"""Cost in FLOPs: what every trained stage records beside its seconds, and `moalign cost`, the estimate before a run.

    moalign cost CONFIG.yaml [--method ric] [--gpu A100] [--utilisation 0.4]

Conventions (Kaplan et al., 2020, "Scaling laws for neural language models", §2.1), with N the parameters that
multiply every token (linear layers and the LM head; embedding lookups cost nothing) and N_t those trained:
- a trained token costs 2·N forward, 2·N backward through the activations and 2·N_t for the weight gradients:
  6·N when every weight trains; LoRA still pays 4·N for the frozen base (N then includes the adapters), plus
  2·N for the recomputed forward under gradient checkpointing;
- a forward-only token (reference model, log-probabilities of a rollout, precomputed reference passes) 2·N;
- a generated token 2·N (with the KV cache), and each prompt token once at prefill 2·N;
- a token scored by a model-based objective 2·N_rm; lexical objectives cost nothing here;
- attention's own FLOPs (about 2·layers·context·width per token) are left out: at 512 tokens on a 7B model they
  add about 1%.
GPU-hours = FLOPs / (utilisation × peak), both stated in the output. Model sizes come from the model config
alone: the model is built on PyTorch's meta device, so no weights are read or downloaded.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moalign.errors import MoalignError

SHIPPED_CONFIGS = Path(__file__).resolve().parent / "model_configs"
# Dense bf16 tensor-core peaks from the vendors' data sheets (TFLOP/s, no sparsity); H200-measured is the
# 8192³ bf16 matmul measured on this project's H200 (STACK_NOTES).
PEAK_TFLOPS = {"A100": 312.0, "H100": 989.0, "H200": 989.0, "H200-measured": 779.0, "V100": 125.0, "L40S": 362.0}
# Hub datasets the papers' configs name, for estimates without a download: rows of the split and mean tokens
# per prompt and per response under a Llama-2 tokenizer. Assumptions, not measurements: pass
# --prompt_tokens / --response_tokens / --rows to use other values.
KNOWN_DATASETS = {
    "Anthropic/hh-rlhf": {"rows": 160800, "pairs": True, "prompt_tokens": 160, "response_tokens": 70},
    "PKU-Alignment/PKU-SafeRLHF-10K": {"rows": 10000, "pairs": True, "prompt_tokens": 40, "response_tokens": 90},
}


# --------------------------------------------------------------------------------------------- model sizes


@dataclass(frozen=True)
class ModelSize:
    """Parameters that multiply each token (N) and, of those, the trained ones (N_t)."""

    matmul: int
    trained: int

    def train_per_token(self, recompute: bool = False) -> float:
        return 4.0 * self.matmul + 2.0 * self.trained + (2.0 * self.matmul if recompute else 0.0)

    @property
    def forward_per_token(self) -> float:
        return 2.0 * self.matmul


def _linear_layers(model) -> list[tuple[str, Any]]:
    import torch
    from transformers.pytorch_utils import Conv1D

    return [(name, m) for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def model_size(model) -> ModelSize:
    """N and N_t of a model in memory (a PEFT model counts its frozen base and its adapters)."""
    layers = _linear_layers(model)
    return ModelSize(
        matmul=sum(m.weight.numel() for _, m in layers),
        trained=sum(m.weight.numel() for _, m in layers if m.weight.requires_grad),
    )


def recomputes(model) -> bool:
    """Whether training recomputes the forward pass (gradient checkpointing, "activation" in transformers 5)."""
    value = getattr(model, "is_activation_checkpointing", None)  # a PEFT model forwards it to its base
    return bool(getattr(model, "is_gradient_checkpointing", False) if value is None else value)


def stage_flops(
    size: ModelSize,
    trained_tokens: float = 0,
    forward_tokens: float = 0,
    prefill_tokens: float = 0,
    generated_tokens: float = 0,
    recompute: bool = False,
) -> float:
    """FLOPs of one model's work in a stage (scoring by other models is added by the caller)."""
    return trained_tokens * size.train_per_token(recompute) + size.forward_per_token * (
        forward_tokens + prefill_tokens + generated_tokens
    )


def record_stage_flops(model, stats: dict[str, Any]) -> dict[str, Any]:
    """Add `flops` and `parameters` to a trained stage's statistics (`finish_stage` calls this for every method).

    Reads the counts a method put in `stats`: `trained_tokens` (default: `tokens`), `forward_tokens`,
    `prefill_tokens`, `generated_tokens`, and `scoring_flops` already computed for other models."""
    size = model_size(model)
    flops = stage_flops(
        size,
        trained_tokens=stats.get("trained_tokens", stats.get("tokens", 0)),
        forward_tokens=stats.get("forward_tokens", 0),
        prefill_tokens=stats.get("prefill_tokens", 0),
        generated_tokens=stats.get("generated_tokens", 0),
        recompute=recomputes(model),
    )
    stats["parameters"] = {"matmul": size.matmul, "trained": size.trained}
    stats["flops"] = flops + stats.get("scoring_flops", 0.0)
    return stats


def generation_stats(model, completions: Sequence[Any]) -> dict[str, Any]:
    """Prefill and generated tokens of a generation stage and their FLOPs (2·N each)."""
    size = model_size(model)
    prefill = int(sum(c.prompt_tokens for c in completions))
    generated = int(sum(len(c.token_ids) for c in completions))
    return {
        "prefill_tokens": prefill,
        "generated_tokens": generated,
        "flops": stage_flops(size, prefill_tokens=prefill, generated_tokens=generated),
    }


def scoring_flops(objectives: Sequence[Any], prompts: Sequence[str], responses: Sequence[str]) -> float:
    """2·N_rm per token each model-based objective reads (its own tokenizer, its own truncation)."""
    total = 0.0
    for objective in objectives:
        model, tokenizer = getattr(objective, "model", None), getattr(objective, "tokenizer", None)
        if model is None or tokenizer is None or not hasattr(model, "named_modules"):
            continue  # lexical scorers
        limit = getattr(objective, "max_length", None)
        texts = [p + r for p, r in zip(prompts, responses)]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]]
        tokens = sum(min(n, limit) if limit else n for n in lengths)
        total += model_size(model).forward_per_token * tokens
    return total


def _shipped_name(name: str) -> Path:
    return SHIPPED_CONFIGS / f"{name.replace('/', '--')}.json"


def model_config(name: str):
    """A transformers config from a local folder, a config shipped with moalign for the papers' hub models,
    or the local Hugging Face cache (no download)."""
    from transformers import AutoConfig

    local = Path(name)
    if (local / "config.json").exists():
        return AutoConfig.from_pretrained(str(local))
    if (local / "adapter_config.json").exists():
        base = json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"]
        return model_config(base)
    shipped = _shipped_name(name)
    if shipped.exists():
        values = {k: v for k, v in json.loads(shipped.read_text()).items() if not k.startswith("_")}
        return AutoConfig.for_model(values.pop("model_type"), **values)
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        raise MoalignError(
            f"no config for model {name!r}: not a local folder, not shipped in {SHIPPED_CONFIGS.name}/, not in the "
            f"Hugging Face cache; download its config.json into a folder and pass that folder"
        ) from None


@dataclass(frozen=True)
class LoraShape:
    r: int
    target_modules: tuple[str, ...] | str  # "all-linear" or module names


def size_from_config(name: str, lora: LoraShape | None = None) -> ModelSize:
    """N and N_t of a model from its config alone (built on the meta device); LoRA adds r·(in + out) per
    targeted layer, PEFT's count, and trains only those."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = model_config(name)
    classify = any("SequenceClassification" in a for a in (getattr(config, "architectures", None) or []))
    with torch.device("meta"):
        model = (AutoModelForSequenceClassification if classify else AutoModelForCausalLM).from_config(config)
    layers = _linear_layers(model)
    base = sum(m.weight.numel() for _, m in layers)
    if lora is None:
        return ModelSize(base, base)
    output = model.get_output_embeddings()
    adapters = 0
    for module_name, module in layers:
        last = module_name.rsplit(".", 1)[-1]
        targeted = (
            module is not output
            if lora.target_modules == "all-linear"
            else any(last == t or module_name.endswith(f".{t}") for t in lora.target_modules)
        )
        if targeted:
            rows, cols = module.weight.shape
            adapters += lora.r * (rows + cols)
    return ModelSize(base + adapters, adapters)


def lora_shape(config: Any) -> LoraShape | None:
    if not getattr(config, "use_peft", False):
        return None
    targets = config.lora_target_modules
    return LoraShape(config.lora_r, tuple(targets) if targets else "all-linear")


# --------------------------------------------------------------------------------------------- the estimate


@dataclass
class DataShape:
    """What the estimate needs of the dataset: rows, whether they are pairs, mean tokens per prompt/response."""

    rows: int
    pairs: bool
    prompt_tokens: float
    response_tokens: float
    source: str  # "measured" or "assumed"

    @property
    def samples(self) -> int:
        return self.rows * (2 if self.pairs else 1)


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


def gpu_hours(flops: float, gpu: str, utilisation: float) -> float:
    return flops / (utilisation * PEAK_TFLOPS[gpu] * 1e12) / 3600.0


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
        """Generated tokens per response: as given (`--new_tokens`), else the data's mean response length; capped
        by the generation limit. A policy that answers shorter than its data costs less than this."""
        limit = getattr(self.config, "max_completion_length", None) or self.config.sample_max_new_tokens
        given = getattr(self.config, "cost_new_tokens", None)
        return min(self.shape.response_tokens if given is None else given, limit)


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


def estimate_sft(config: Any, shape: DataShape) -> Estimate:
    recipe, estimate = Recipe(config, shape), Estimate("sft")
    flops, tokens = recipe.train(_sequences(config, None, shape.rows), recipe.sample_length())
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
            steps = total_steps(config, shape.rows)
            completions = steps * rollout
            epochs, forward = config.ppo_epochs, 2  # rollout: policy log-probs and values, then the reference
        else:  # TRL's RLOO / GRPO: per_device_train_batch_size counts completions, num_generations per prompt
            steps = (
                config.max_steps
                if config.max_steps > 0
                else math.ceil(config.num_train_epochs * shape.rows * config.num_generations / rollout)
            )
            completions = steps * rollout
            epochs, forward = getattr(config, "num_iterations", 1), (1 if config.beta > 0 else 0)
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
    flops, tokens = recipe.train(_sequences(config, config.stage1_max_steps, config.k), length)
    estimate.add("stage 1", preferences * flops, f"{preferences} preferences", preferences * tokens)
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
) -> tuple[Estimate, DataShape, Any]:
    """Parse a recipe YAML with its method's own config class (so defaults are the method's) and estimate it."""
    import importlib

    from moalign.methods.common import config_section, parse_config

    method = method or guess_method(config_section(path, None))
    if method not in ESTIMATORS:
        raise MoalignError(f"method {method!r} has no estimate; use one of {', '.join(ESTIMATORS)}")
    target, estimator = ESTIMATORS[method]
    module, _, name = target.partition(":")
    config_class = getattr(importlib.import_module(module), name)
    config = parse_config(config_class, ["--config", path], section=method)
    config.cost_processes, config.cost_new_tokens = num_processes, new_tokens
    shape = data_shape(config, config.model_name_or_path, rows, prompt_tokens, response_tokens)
    result = estimator(config, shape)
    result.notes.append(
        f"data: {shape.rows} rows ({'pairs' if shape.pairs else 'samples'}), {shape.prompt_tokens:.1f} prompt and "
        f"{shape.response_tokens:.1f} response tokens on average ({shape.source})"
    )
    return result, shape, config


@dataclass
class CostArguments:
    """`moalign cost CONFIG.yaml`: a recipe's FLOPs and GPU-hours before running it."""

    method: str | None = field(
        default=None, metadata={"help": "sft, ric, morl, modpo or paretohqd (default: from the keys)"}
    )
    gpu: str = field(default="A100", metadata={"help": f"peak from the data sheet: {', '.join(PEAK_TFLOPS)}"})
    utilisation: float = field(default=0.4, metadata={"help": "share of the peak a training run reaches (MFU)"})
    rows: int | None = field(default=None, metadata={"help": "dataset rows (default: measured or known)"})
    prompt_tokens: float | None = field(
        default=None, metadata={"help": "mean prompt tokens (default: measured or known)"}
    )
    response_tokens: float | None = field(default=None, metadata={"help": "mean response tokens"})
    new_tokens: float | None = field(
        default=None, metadata={"help": "mean tokens each generation samples (default: the data's response length)"}
    )
    num_processes: int = field(default=1, metadata={"help": "data-parallel processes (GPUs): the global batch"})
    json_output: str | None = field(default=None, metadata={"help": "also write the estimate as JSON here"})


def cli(argv: list[str]) -> None:
    from moalign.methods.common import parse_config
    from moalign.report import markdown_table

    args = parse_config(CostArguments, argv, required=(), positionals=[("recipe", None, "the method's YAML config")])
    if args.gpu not in PEAK_TFLOPS:
        raise MoalignError(f"gpu {args.gpu!r} is not known; use one of {', '.join(PEAK_TFLOPS)}")
    if not 0 < args.utilisation <= 1:
        raise MoalignError(f"utilisation must be in (0, 1], got {args.utilisation}")
    if args.num_processes < 1:
        raise MoalignError(f"num_processes must be ≥ 1, got {args.num_processes}")
    result, _, config = estimate(
        args.recipe,
        args.method,
        args.rows,
        args.prompt_tokens,
        args.response_tokens,
        num_processes=args.num_processes,
        new_tokens=args.new_tokens,
    )
    rows = [
        {
            "stage": s.name,
            "PFLOPs": f"{s.flops / 1e15:.4g}",
            "GPU-hours": f"{gpu_hours(s.flops, args.gpu, args.utilisation):.3g}",
            "detail": s.detail,
        }
        for s in result.stages
    ]
    total = gpu_hours(result.flops, args.gpu, args.utilisation)
    rows.append({"stage": "total", "PFLOPs": f"{result.flops / 1e15:.4g}", "GPU-hours": f"{total:.3g}", "detail": ""})
    print(f"{result.method} recipe {args.recipe}: policy {config.model_name_or_path}, {args.num_processes} process(es)")
    print(markdown_table(rows, ["stage", "PFLOPs", "GPU-hours", "detail"]))
    print(f"GPU-hours at {args.utilisation:.0%} of a {args.gpu}'s {PEAK_TFLOPS[args.gpu]:g} TFLOP/s (bf16 dense)")
    for note in result.notes:
        print(note)
    if args.json_output:
        from moalign.run import write_json

        write_json(
            args.json_output,
            {
                "method": result.method,
                "recipe": args.recipe,
                "flops": result.flops,
                "gpu": args.gpu,
                "utilisation": args.utilisation,
                "gpu_hours": total,
                "stages": [vars(s) for s in result.stages],
                "notes": result.notes,
            },
        )
