"""The steerable policy: the one interface every method ends in, `generate(prompts, weights)`.

`load_policy(run_dir)` reads the run's manifest and builds the policy its method needs:
- a fixed model that ignores the preference (`base`, `sft`),
- one model steered by what its prompt says (`ric`: the preference becomes desired rewards),
- one model per trained preference, the nearest serving each request (`modpo`, `paretohqd`, `morlhf`),
- a weight-space average built for the requested preference (`soups`).
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from moalign.errors import MoalignError
from moalign.generation import Completion, SamplingParams, TokenCallback, generate, load_model
from moalign.pareto import parse_weights, validate_weights
from moalign.run import read_manifest


class Policy:
    """Generates for prompts under a preference (a weight per objective)."""

    def __init__(self, manifest: dict[str, Any], run_dir: Path):
        self.manifest = manifest
        self.run_dir = Path(run_dir)
        self.objectives: list[str] = list(manifest.get("objective_names") or [])
        self.sampling = SamplingParams(**manifest.get("sampling", {}))
        # How the method wrapped prompts in training (MODPO's safety setup: "USER: {prompt} ASSISTANT:")
        self.prompt_template: str = manifest.get("prompt_template") or "{prompt}"
        # An OpenAI-compatible server to generate with (`moalign.engines.OpenAIEngine`); None: in-process.
        self.engine: Any = None

    @property
    def n_objectives(self) -> int:
        return len(self.objectives)

    def default_weights(self) -> np.ndarray:
        return np.full(self.n_objectives, 1.0 / max(1, self.n_objectives))

    def check_weights(self, weights: Sequence[float] | None) -> np.ndarray:
        if weights is None:
            return self.default_weights()
        if self.n_objectives == 0:
            return np.asarray(weights, dtype=float)
        return validate_weights(weights, self.n_objectives)

    def served_by(self, weights: np.ndarray) -> str:
        """Which trained model answers for this preference (shown to server clients)."""
        return "model"

    def prompt_for(self, prompt: str, weights: np.ndarray) -> str:
        """The exact text the model is given for a user's prompt under a preference: the run's template,
        then whatever the method writes into it (RiC: the desired rewards). Native generation and an
        upstream engine both get this text, so they see identical prompts."""
        return self.prompt_template.format(prompt=prompt)

    def model_paths(self) -> dict[str, Path]:
        """Every model folder the policy generates with, by the name an upstream engine serves it under
        (`moalign export` writes them; `moalign serve --upstream` asks for them by this name)."""
        return {self.run_dir.resolve().name: self.run_dir / self.manifest.get("model", "model")}

    def upstream_model(self, weights: np.ndarray) -> str:
        """The upstream model name that answers for this preference."""
        return next(iter(self.model_paths()))

    def load_tokenizer(self) -> Any:
        """A fresh tokenizer of the run's model, read without loading any weights (None if none is found)."""
        from moalign.models import load_tokenizer

        for path in self.model_paths().values():
            try:
                return load_tokenizer(str(path))
            except MoalignError:
                continue
        return None

    def context_length(self) -> int | None:
        """The model's context window (prompt + new tokens), from its config; None if it names none."""
        from transformers import AutoConfig

        for path in self.model_paths().values():
            try:
                config = AutoConfig.from_pretrained(str(path))
            except (OSError, ValueError):
                continue
            value = getattr(config, "max_position_embeddings", None)
            return int(value) if isinstance(value, int) and value > 0 else None
        return None

    def variant(self, weights: np.ndarray) -> Hashable:
        """What the output depends on besides prompt and seed: preferences with equal variants generate
        the same text, so evaluation generates once for them."""
        return tuple(np.round(np.asarray(weights, dtype=float), 12))

    def complete(
        self,
        prompts: Sequence[str],
        weights: Sequence[Sequence[float]],
        params: Sequence[SamplingParams],
        on_tokens: TokenCallback | None = None,
    ) -> list[Completion]:
        """Per-row preference and sampling settings; the server's batches come through here (`on_tokens`
        streams each row's tokens as they are sampled, see `generation.TokenCallback`)."""
        if self.engine is not None:  # the policy says what to send where; the engine only generates
            rows = list(zip(prompts, weights))
            models = [self.upstream_model(self.check_weights(w)) for _, w in rows]
            return self.engine.complete(models, [self.prompt_for(p, w) for p, w in rows], params)
        return self._complete([self.prompt_template.format(prompt=p) for p in prompts], weights, params, on_tokens)

    def _complete(
        self,
        prompts: Sequence[str],
        weights: Sequence[Sequence[float]],
        params: Sequence[SamplingParams],
        on_tokens: TokenCallback | None = None,
    ) -> list[Completion]:
        """Generation proper, on prompts already in the run's template."""
        raise NotImplementedError

    def generate(
        self, prompts: Sequence[str], weights: Sequence[float] | None = None, params: SamplingParams | None = None
    ) -> list[str]:
        """Responses for the prompts under one preference."""
        prompts = list(prompts)
        if not prompts:
            raise MoalignError("no prompts given")
        w = self.check_weights(weights)
        base = params or self.sampling
        rows = [SamplingParams(**{**vars(base), "seed": base.seed + i}) for i in range(len(prompts))]
        return [c.text for c in self.complete(prompts, [w] * len(prompts), rows)]


class ModelPolicy(Policy):
    """One causal LM; subclasses rewrite the prompt to carry the preference (RiC).

    The weights load on first use: a router in front of an upstream engine needs only the prompts.
    """

    def __init__(self, manifest: dict[str, Any], run_dir: Path, device: str = "auto"):
        super().__init__(manifest, run_dir)
        self.device = device

    @cached_property
    def loaded(self) -> tuple[Any, Any]:
        return load_model(str(self.run_dir / self.manifest.get("model", "model")), device=self.device)

    @property
    def model(self) -> Any:
        return self.loaded[0]

    @property
    def tokenizer(self) -> Any:
        return self.loaded[1]

    def prepare_prompt(self, prompt: str, weights: np.ndarray) -> str:
        return prompt

    def prompt_for(self, prompt: str, weights: np.ndarray) -> str:
        return self.prepare_prompt(super().prompt_for(prompt, weights), self.check_weights(weights))

    def _complete(self, prompts, weights, params, on_tokens=None):
        conditioned = [self.prepare_prompt(p, self.check_weights(w)) for p, w in zip(prompts, weights)]
        return generate(self.model, self.tokenizer, conditioned, list(params), on_tokens=on_tokens)


class FixedPolicy(ModelPolicy):
    """A model that ignores the preference: the base model and the SFT baseline."""

    def variant(self, weights: np.ndarray) -> Hashable:
        return None


class PerPreferencePolicy(Policy):
    """One model per trained preference; a request goes to the nearest trained preference (L1 distance).

    The manifest lists `models: [{"preference": [...], "path": "models/..."}]`; models load on first use
    and the `max_loaded` most recent stay in memory.
    """

    def __init__(self, manifest: dict[str, Any], run_dir: Path, device: str = "auto", max_loaded: int = 4):
        super().__init__(manifest, run_dir)
        entries = manifest.get("models") or []
        if not entries:
            raise MoalignError(f"{run_dir}/moalign.json lists no 'models'")
        self.preferences = np.asarray([e["preference"] for e in entries], dtype=float)
        self.paths = [run_dir / e["path"] for e in entries]
        self.device, self.max_loaded = device, max_loaded
        self.loaded: OrderedDict[int, tuple[Any, Any]] = OrderedDict()

    def nearest(self, weights: np.ndarray) -> int:
        return int(np.abs(self.preferences - np.asarray(weights)[None, :]).sum(axis=1).argmin())

    def served_by(self, weights: np.ndarray) -> str:
        return Path(self.paths[self.nearest(weights)]).name

    def model_paths(self) -> dict[str, Path]:
        return {Path(path).name: path for path in self.paths}

    def upstream_model(self, weights: np.ndarray) -> str:
        return self.served_by(weights)

    def variant(self, weights: np.ndarray) -> Hashable:
        return self.nearest(weights)

    def model_for(self, index: int):
        if index not in self.loaded:
            self.loaded[index] = load_model(str(self.paths[index]), device=self.device)
            while len(self.loaded) > self.max_loaded:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(index)
        return self.loaded[index]

    def _complete(self, prompts, weights, params, on_tokens=None):
        chosen = [self.nearest(self.check_weights(w)) for w in weights]
        return generate_by_model(chosen, self.model_for, prompts, params, on_tokens)


def generate_by_model(
    keys: Sequence[Hashable],
    model_for: Callable[[Any], tuple[Any, Any]],
    prompts: Sequence[str],
    params: Sequence[SamplingParams],
    on_tokens: TokenCallback | None = None,
) -> list[Completion]:
    """Generate each row with the model its key selects: rows sharing a model are one batch, results in order.

    `model_for(key)` gives (model, tokenizer); keys are visited in order of first appearance."""
    results: list[Completion | None] = [None] * len(prompts)
    for key in dict.fromkeys(keys):
        rows = [i for i, k in enumerate(keys) if k == key]
        model, tokenizer = model_for(key)
        outputs = generate(
            model,
            tokenizer,
            [prompts[i] for i in rows],
            [params[i] for i in rows],
            on_tokens=rows_callback(on_tokens, rows),
        )
        for i, output in zip(rows, outputs):
            results[i] = output
    return results  # type: ignore[return-value]


def rows_callback(on_tokens: TokenCallback | None, rows: Sequence[int]) -> TokenCallback | None:
    """`on_tokens` for a generation over some rows of a batch: its row i is the batch's row `rows[i]`."""
    if on_tokens is None:
        return None
    return lambda i, ids, finished: on_tokens(rows[i], ids, finished)


FIXED_POLICY = "moalign.policy:FixedPolicy"
PER_PREFERENCE_POLICY = "moalign.policy:PerPreferencePolicy"


def policy_class(manifest: dict[str, Any]) -> type[Policy]:
    """The class the manifest names as `"policy": "module:Class"`.

    A run written before manifests named their policy is served by its model(s): one `model` is a fixed
    policy, a `models` list a per-preference one.
    """
    spec = manifest.get("policy") or (PER_PREFERENCE_POLICY if manifest.get("models") else FIXED_POLICY)
    module_name, _, class_name = str(spec).partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError):
        raise MoalignError(f"moalign.json names the policy {spec!r}, which this moalign does not have") from None
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise MoalignError(f"moalign.json names the policy {spec!r}, which is not a moalign Policy")
    return cls


def load_policy(run_dir: str | Path, allow_incomplete: bool = False, **options) -> Policy:
    """Read `run_dir/moalign.json` and build the policy it names.

    A per-preference run interrupted before its last model is refused unless `allow_incomplete`.
    """
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    check_complete(manifest, run_dir, allow_incomplete)
    return policy_class(manifest)(manifest, run_dir, **options)


def check_complete(manifest: dict[str, Any], run_dir: Path, allow_incomplete: bool = False) -> None:
    """Refuse an unfinished per-preference run unless asked: its front would lack the preferences left to train."""
    if manifest.get("complete") is False and not allow_incomplete:
        trained = len(manifest.get("models") or [])
        raise MoalignError(
            f"{run_dir} is an unfinished {manifest['method']} run ({trained} model(s) trained so far): rerun its "
            "training command to finish it, or pass --allow_incomplete"
        )


SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_p", "seed")


@dataclass
class GenerateConfig:
    """`moalign generate RUN PROMPT [PROMPT ...]`: the run's answers for one preference."""

    weights: str | None = field(default=None, metadata={"help": "comma-separated preference, e.g. 0.2,0.8"})
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int = 0
    out: str | None = field(default=None, metadata={"help": "image runs: folder to write the PNGs to"})
    steps: int | None = field(default=None, metadata={"help": "image runs: denoising steps"})
    guidance_scale: float | None = field(default=None, metadata={"help": "image runs: classifier-free guidance"})


def generate_cli(argv: list[str]) -> None:
    from moalign.methods.config import parse_config

    args = parse_config(
        GenerateConfig,
        argv,
        required=(),
        positionals=[("run_dir", None, "the run directory"), ("prompts", "+", "one or more prompts")],
        prog="moalign generate",
    )
    overrides = {key: getattr(args, key) for key in SAMPLING_FLAGS if getattr(args, key) is not None}
    SamplingParams(**overrides).validate()  # before loading a model: a NaN temperature is the user's to fix
    policy = load_policy(args.run_dir)
    weights = parse_weights(args.weights, policy.n_objectives) if args.weights else None
    if getattr(policy, "modality", "text") == "image":
        from moalign.image.policy import write_images

        return write_images(policy, args, weights)
    params = SamplingParams(**{**vars(policy.sampling), **overrides})
    for prompt, response in zip(args.prompts, policy.generate(args.prompts, weights, params)):
        print(f"{prompt}\n{response}\n")
