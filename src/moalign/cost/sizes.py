"""Model sizes for FLOPs: N, the parameters that multiply every token, and N_t, those trained.

Read from a model in memory (what a run records) or from its config alone (what `moalign cost` estimates
with): the model is then built on PyTorch's meta device, so no weights are read or downloaded. The papers'
hub models ship their published configs in `moalign/model_configs/`. The FLOPs conventions are in
`moalign.cost`'s docstring.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moalign.errors import MoalignError

SHIPPED_CONFIGS = Path(__file__).resolve().parents[1] / "model_configs"


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


def scoring_flops(objectives: Sequence[Any], prompts: Sequence[str], responses: Sequence[str]) -> float:
    """2·N_rm per token each model-based objective reads: its own tokenizer, its own truncation and its input
    (`concat`: prompt + response, `pair`: the two as a text pair, `response`: the response alone)."""
    total = 0.0
    for objective in objectives:
        model, tokenizer = getattr(objective, "model", None), getattr(objective, "tokenizer", None)
        if model is None or tokenizer is None or not hasattr(model, "named_modules"):
            continue  # lexical scorers
        limit = getattr(objective, "max_length", None)
        mode = getattr(objective, "input", "concat")
        texts = {"pair": (list(prompts), list(responses)), "response": (list(responses),)}.get(
            mode, ([p + r for p, r in zip(prompts, responses)],)
        )
        encoded = tokenizer(*texts, truncation=limit is not None, max_length=limit)
        total += model_size(model).forward_per_token * sum(len(ids) for ids in encoded["input_ids"])
    return total


def generation_flops(policy: Any, prompts: Sequence[str], responses: Sequence[str], w: Any) -> float:
    """2·N per prompt token (prefill) and per generated token, counted with the serving model's
    tokenizer; N the run's base model's (every model of a per-preference run or a soup shares its architecture).
    Not counted for images."""
    base = getattr(policy, "manifest", {}).get("base_model")
    if getattr(policy, "output_unit", None) or not base:
        return 0.0
    from moalign.models import load_tokenizer

    weights = policy.check_weights(w)
    # the tokenizer alone (a policy served by an upstream engine has no weights loaded), from the serving model's
    # folder: the preference's model, a soup's first ingredient, or the run's one model
    if hasattr(policy, "nearest"):
        folder = policy.paths[policy.nearest(weights)]
    elif hasattr(policy, "folders"):
        folder = policy.folders[0]
    else:
        folder = policy.run_dir / policy.manifest.get("model", "model")
    tokenizer = load_tokenizer(str(folder))
    prefill = tokenizer([policy.prompt_for(p, weights) for p in prompts])["input_ids"]
    generated = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    tokens = sum(len(ids) for ids in prefill) + sum(len(ids) for ids in generated)
    return size_from_config(base).forward_per_token * tokens


def _shipped_name(name: str) -> Path:
    return SHIPPED_CONFIGS / f"{name.replace('/', '--')}.json"


def model_config(name: str):
    """A transformers config from a local folder, a config shipped with moalign for the papers' hub models,
    or the local Hugging Face cache (no download)."""
    from transformers import AutoConfig

    local = Path(name)
    if (local / "config.json").exists():
        return AutoConfig.from_pretrained(str(local))
    if (local / "adapter_config.json").exists():  # a LoRA adapter: its base model's config
        from peft import PeftConfig

        return model_config(PeftConfig.from_pretrained(str(local)).base_model_name_or_path)
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
