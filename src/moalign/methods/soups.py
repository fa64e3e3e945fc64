"""Rewarded Soups (Ramé et al., NeurIPS 2023): one model per objective, and for a preference w the
weight average θ = Σ w_i θ_i.

Usage: moalign soups --config configs/soups_demo.yaml [--flag value ...]

Nothing is trained here: the ingredients come from other runs (`moalign morl` with one-hot weights, DPO or
SFT runs) and the soup for a requested preference is built when a client asks for it. LoRA ingredients on
one base model are combined with PEFT's `add_weighted_adapter(combination_type="cat")`, which is exactly
Σ w_i·s_i·B_i A_i on top of the base (the "linear" combination averages A and B separately, which is
not); any other mix is merged into full weights first and averaged tensor by tensor.
"""

from __future__ import annotations

import copy
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moalign import distributed
from moalign.errors import MoalignError, first_line
from moalign.generation import Completion, load_model, prepare_tokenizer
from moalign.methods.common import training_totals, write_run_manifest
from moalign.methods.config import parse_config
from moalign.methods.stages import finished_stage
from moalign.models import adapter_base, load_tokenizer, pick_device
from moalign.policy import Policy, generate_by_model
from moalign.run import MANIFEST, atomic_path, read_manifest

# config fields that must agree for two models' weights to be averaged
ARCHITECTURE_FIELDS = ("model_type", "vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "n_layer")


@dataclass
class SoupsConfig:
    """A Rewarded Soups run: the objectives and one ingredient model per objective, in the same order."""

    output_dir: str | None = field(default=None, metadata={"help": "the run directory to write"})
    objectives: list[str] = field(default_factory=list, metadata={"help": "objective specs, e.g. vader brevity"})
    ingredients: list[str] = field(
        default_factory=list,
        metadata={
            "help": "one per objective: a model folder, a LoRA adapter folder, or a run directory "
            "(its model, or its model trained at that objective's one-hot preference)"
        },
    )
    model_name_or_path: str | None = field(default=None, metadata={"help": "the base model (for the manifest)"})
    copy_ingredients: bool = field(
        default=False, metadata={"help": "copy the ingredients into the run directory instead of pointing at them"}
    )
    eval_prompts: str | None = field(default=None, metadata={"help": "JSONL of held-out prompts for `moalign eval`"})
    sample_max_new_tokens: int = 64
    sample_temperature: float = 1.0
    sample_top_p: float = 1.0


def soup_tensor(parts: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ w_i·t_i accumulated in float32 and returned in the first tensor's dtype (integers: the first)."""
    first = parts[0]
    if not first.is_floating_point():
        return first.clone()
    total = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
    for weight, part in zip(weights, parts):
        total += float(weight) * part.to(first.device, torch.float32)
    return total.to(first.dtype)


def soup_state_dict(
    state_dicts: Sequence[dict[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """The weight average of several state dicts of one architecture."""
    check_compatible(state_dicts)
    return {name: soup_tensor([sd[name] for sd in state_dicts], weights) for name in state_dicts[0]}


def check_compatible(state_dicts: Sequence[dict[str, torch.Tensor]], names: Sequence[str] | None = None) -> None:
    """Averaging is only meaningful tensor by tensor: the same parameter names and shapes everywhere."""
    names = list(names or [f"ingredient {i}" for i in range(len(state_dicts))])
    reference = state_dicts[0]
    for name, sd in zip(names[1:], state_dicts[1:]):
        if sd.keys() != reference.keys():
            missing = sorted(set(reference) ^ set(sd))[:3]
            raise MoalignError(
                f"{name} and {names[0]} have different parameters (e.g. {missing}); soups need one architecture"
            )
        for key, tensor in sd.items():
            if tensor.shape != reference[key].shape:
                raise MoalignError(
                    f"{name}: {key} has shape {tuple(tensor.shape)}, {names[0]} {tuple(reference[key].shape)}"
                )


def resolve_ingredient(path: str, objective: str, index: int, n_objectives: int) -> Path:
    """The model folder an ingredient entry names (a run directory is looked into)."""
    folder = Path(path).expanduser()
    if (folder / MANIFEST).exists():
        manifest = read_manifest(folder)
        if manifest.get("models"):
            names = list(manifest.get("objective_names") or [])
            if objective in names:
                k, n = names.index(objective), len(names)
            elif len(names) in (0, n_objectives):
                k, n = index, n_objectives
            else:
                raise MoalignError(f"ingredient run {path} has objectives {names}, none named {objective!r}")
            target = np.eye(n)[k]
            for entry in manifest["models"]:
                if len(entry["preference"]) == n and np.allclose(entry["preference"], target):
                    return (folder / entry["path"]).resolve()
            raise MoalignError(
                f"ingredient run {path} has no model trained at the one-hot preference {target.tolist()} for "
                f"{objective!r}; train one with `moalign morl --weights onehot`"
            )
        if manifest.get("model"):
            return (folder / manifest["model"]).resolve()
        raise MoalignError(f"ingredient run {path} lists neither 'model' nor 'models' in its {MANIFEST}")
    if (folder / "config.json").exists() or adapter_base(str(folder)) is not None:
        return folder.resolve()
    raise MoalignError(f"ingredient {path} is not a model folder, a LoRA adapter folder or a run directory")


def _architecture(folder: Path) -> dict[str, Any] | None:
    """The config fields that must agree, following an adapter to its base."""
    from transformers import AutoConfig

    try:
        values = AutoConfig.from_pretrained(adapter_base(str(folder)) or str(folder)).to_dict()
    except OSError:
        return None  # a hub id not in the local cache: checked when the policy loads the weights
    return {key: values[key] for key in ARCHITECTURE_FIELDS if key in values}


def train(config: SoupsConfig) -> Path:
    """Write a soups run directory: resolve and check the ingredients, record them in the manifest."""
    from moalign.objectives import build_all

    if not config.output_dir:
        raise MoalignError("output_dir is not set: the run directory to write")
    objectives = build_all(config.objectives)
    if len(config.ingredients) != len(objectives):
        raise MoalignError(
            f"{len(config.ingredients)} ingredients for {len(objectives)} objectives: give one model per objective, "
            "in the objectives' order"
        )
    names = [o.name for o in objectives]
    folders = [resolve_ingredient(p, n, i, len(names)) for i, (p, n) in enumerate(zip(config.ingredients, names))]
    architectures = [(f, _architecture(f)) for f in folders]
    known = [(f, a) for f, a in architectures if a is not None]
    for folder, arch in known[1:]:
        if arch != known[0][1]:
            raise MoalignError(f"ingredients {known[0][0]} and {folder} have different architectures; soups need one")
    run_dir = Path(config.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for name, folder in zip(names, folders):
        path = str(folder)
        if config.copy_ingredients:
            distributed.run_on_main(copy_folder, folder, run_dir / "ingredients" / name)
            path = f"ingredients/{name}"
        entries.append({"objective": name, "path": path})
    if not config.model_name_or_path:
        config.model_name_or_path = adapter_base(str(folders[0])) or str(folders[0])
    # A soup costs nothing itself: its ingredients' training (the markers their methods left) is its cost.
    stages = {name: finished_stage(folder) or {} for name, folder in zip(names, folders)}
    write_run_manifest(
        config, "soups", "moalign.methods.soups:SoupPolicy", ingredients=entries, training=training_totals(stages)
    )
    return run_dir


def copy_folder(source: Path, destination: Path) -> None:
    with atomic_path(destination) as tmp:
        shutil.copytree(source, tmp)


def _lora_soupable(folders: list[Path]) -> bool:
    """PEFT's exact "cat" combination applies: plain LoRA adapters (no DoRA, rsLoRA, extra modules) on one base."""
    from peft import PeftConfig, PeftType

    if any(adapter_base(str(folder)) is None for folder in folders):
        return False
    configs = [PeftConfig.from_pretrained(str(folder)) for folder in folders]
    return all(
        c.peft_type == PeftType.LORA
        and not c.use_dora
        and not c.use_rslora
        and not c.modules_to_save
        and c.base_model_name_or_path == configs[0].base_model_name_or_path
        for c in configs
    )


class SoupPolicy(Policy):
    """Builds the weight average for each requested preference and generates with it.

    Soups are cached by preference rounded to `decimals` (the soup is built for the rounded, renormalised
    weights, so the cache never serves a different average than it claims); the `max_loaded` most recent
    stay in memory.
    """

    def __init__(
        self, manifest: dict[str, Any], run_dir: Path, device: str = "auto", max_loaded: int = 4, decimals: int = 3
    ):
        super().__init__(manifest, run_dir)
        entries = manifest.get("ingredients") or []
        if not entries:
            raise MoalignError(f"{run_dir}/{MANIFEST} lists no 'ingredients'")
        order = [e["objective"] for e in entries]
        if self.objectives and order != self.objectives:
            raise MoalignError(f"{run_dir}: ingredients {order} do not follow the objectives {self.objectives}")
        if not self.objectives:
            self.objectives = order
        self.folders = [Path(run_dir) / e["path"] for e in entries]
        for folder in self.folders:
            if not folder.exists():
                raise MoalignError(f"ingredient {folder} does not exist (moved or deleted since the soups run)")
        self.device, self.max_loaded, self.decimals = pick_device(device), max_loaded, decimals
        self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.soups: OrderedDict[tuple[float, ...], Any] = OrderedDict()
        self.lora = _lora_soupable(self.folders)
        if self.lora:
            self._load_adapters()
        else:
            self._load_state_dicts()
        prepare_tokenizer(self.tokenizer)

    def _load_adapters(self) -> None:
        from peft import AutoPeftModelForCausalLM

        self.adapter_names = [f"ingredient{i}" for i in range(len(self.folders))]
        try:  # the first adapter brings its base model; the others join it
            model = AutoPeftModelForCausalLM.from_pretrained(
                str(self.folders[0]), adapter_name=self.adapter_names[0], dtype=self.dtype
            )
        except OSError as error:
            raise MoalignError(f"cannot load ingredient {self.folders[0]} ({first_line(error)})") from None
        self.tokenizer = load_tokenizer(str(self.folders[0]))  # a bare adapter uses its base's
        for name, folder in zip(self.adapter_names[1:], self.folders[1:]):
            model.load_adapter(str(folder), adapter_name=name)
        self.model = model.to(self.device).eval()
        self._counter = 0

    def _load_state_dicts(self) -> None:
        models = []
        for folder in self.folders:
            model, tokenizer = load_model(str(folder), device="cpu", dtype=str(self.dtype).removeprefix("torch."))
            models.append(model)
        self.tokenizer = tokenizer
        self.state_dicts = [m.state_dict() for m in models]
        check_compatible(self.state_dicts, [str(f) for f in self.folders])
        self.template = models[0]

    def key(self, weights: Sequence[float]) -> tuple[float, ...]:
        w = np.round(self.check_weights(weights), self.decimals)
        return tuple(float(x) for x in w / w.sum())

    def served_by(self, weights: np.ndarray) -> str:
        return "soup(" + ",".join(f"{x:g}" for x in self.key(weights)) + ")"

    @torch.no_grad()
    def model_for(self, weights: Sequence[float]):
        """The soup for a preference: built on first use, then served from the LRU cache."""
        key = self.key(weights)
        if key not in self.soups:
            self.soups[key] = self._build(key)
            while len(self.soups) > self.max_loaded:
                _, evicted = self.soups.popitem(last=False)
                if self.lora:
                    self.model.delete_adapter(evicted)
        self.soups.move_to_end(key)
        soup = self.soups[key]
        if self.lora:
            self.model.set_adapter(soup)
            return self.model
        return soup

    def _build(self, weights: tuple[float, ...]):
        if self.lora:
            name = f"soup{self._counter}"
            self._counter += 1
            self.model.add_weighted_adapter(self.adapter_names, list(weights), name, combination_type="cat")
            return name
        model = copy.deepcopy(self.template)
        model.load_state_dict(soup_state_dict(self.state_dicts, weights))
        return model.to(self.device).eval()

    def _complete(self, prompts, weights, params, on_tokens=None) -> list[Completion]:
        keys = [self.key(w) for w in weights]
        return generate_by_model(keys, lambda key: (self.model_for(key), self.tokenizer), prompts, params, on_tokens)


def parse_soups_config(argv: list[str]) -> SoupsConfig:
    """`--config FILE.yaml` plus flags through TRL's parser, as every method (nothing to train: no base model)."""
    return parse_config(SoupsConfig, argv, required=("output_dir",))


def cli(argv: list[str]) -> None:
    print(f"Rewarded Soups run written to {train(parse_soups_config(argv))}")
