"""The one model loader: methods, policies, objectives and the server all load weights through here.

Its options carry the names of TRL's `ModelConfig` (`dtype`, `attn_implementation`, `load_in_4bit`,
`load_in_8bit`, …) and TRL's `model_init_kwargs` is honoured, so a GPU user sets them once, by the names
TRL's own scripts use, in any method's YAML or flags. A folder holding a PEFT adapter loads onto its base.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from moalign.errors import MoalignError, first_line

# attn_implementation values and the package each needs beyond transformers
ATTENTION_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")  # pack sequences without materialising masks


def pick_device(device: str = "auto") -> str:
    """`device`, or for "auto" this process's GPU (its own, LOCAL_RANK, under a launcher: reward models and
    policies of every rank would otherwise all load on cuda:0), else the CPU."""
    if device != "auto":
        return device
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ['LOCAL_RANK'])}" if "LOCAL_RANK" in os.environ else "cuda"


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def require(package: str, what: str) -> None:
    """One line naming the package a chosen option needs, before any weights are read."""
    if not installed(package):
        raise MoalignError(f"{what} needs the {package} package: pip install {package.replace('_', '-')}")


@dataclass
class ModelOptions:
    """How to load weights; field names follow TRL's `ModelConfig`."""

    dtype: str = "auto"  # auto: bfloat16 on a GPU that has it, else float32 (CPUs train and sample in fp32)
    attn_implementation: str | None = None  # None: sdpa
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    bnb_4bit_quant_type: str = "nf4"
    use_bnb_nested_quant: bool = False
    device_map: str | None = None  # e.g. "auto" to spread a model larger than one device
    trust_remote_code: bool = False
    model_init_kwargs: dict[str, Any] = field(default_factory=dict)  # TRL's: passed to from_pretrained last

    @classmethod
    def from_config(cls, config: Any) -> ModelOptions:
        """The options a method config holds (moalign's CommonArguments fields plus TRL's model_init_kwargs)."""
        values = {f.name: getattr(config, f.name) for f in fields(cls) if getattr(config, f.name, None) is not None}
        extra = values.get("model_init_kwargs") or {}
        if isinstance(extra, str):  # TRL accepts it as a JSON string on the command line
            try:
                extra = json.loads(extra)
            except json.JSONDecodeError as error:
                raise MoalignError(f"model_init_kwargs must be a JSON object ({error})") from None
        if not isinstance(extra, dict):
            raise MoalignError(f"model_init_kwargs must be a mapping, got {type(extra).__name__}")
        values["model_init_kwargs"] = dict(extra)
        return cls(**values)

    def validate(self) -> None:
        """Raise the one-line error a bad option or a missing package gives, before any work starts."""
        self.torch_dtype("cpu")
        self.attention()
        self.quantization(torch.float32)

    def torch_dtype(self, device: str) -> torch.dtype:
        if self.dtype == "auto":
            bf16 = device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if bf16 else torch.float32
        value = getattr(torch, str(self.dtype).removeprefix("torch."), None)
        if not isinstance(value, torch.dtype) or not value.is_floating_point:
            raise MoalignError(f"dtype must be auto, bfloat16, float16 or float32, got {self.dtype!r}")
        return value

    def attention(self) -> str:
        name = self.attn_implementation or "sdpa"
        if name in ATTENTION_PACKAGES:
            require(ATTENTION_PACKAGES[name], f"attn_implementation={name}")
        elif "/" in name:  # a hub kernel such as kernels-community/flash-attn, loaded by the kernels package
            require("kernels", f"attn_implementation={name}")
        return name

    def quantization(self, dtype: torch.dtype):
        """bitsandbytes' config for QLoRA-style 4-bit or 8-bit loading (as TRL's get_quantization_config)."""
        if not (self.load_in_4bit or self.load_in_8bit):
            return None
        if self.load_in_4bit and self.load_in_8bit:
            raise MoalignError("give load_in_4bit or load_in_8bit, not both")
        require("bitsandbytes", "load_in_4bit" if self.load_in_4bit else "load_in_8bit")
        from transformers import BitsAndBytesConfig

        if self.load_in_8bit:
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_type=self.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=self.use_bnb_nested_quant,
        )

    def from_pretrained_kwargs(self, device: str) -> dict[str, Any]:
        dtype = self.torch_dtype(device)
        kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": self.attention()}
        if self.trust_remote_code:
            kwargs["trust_remote_code"] = True
        if (quantization := self.quantization(dtype)) is not None:
            kwargs["quantization_config"] = quantization
            # quantized weights are placed when loaded: on this process's GPU unless told otherwise
            if torch.cuda.is_available() and not self.device_map:
                kwargs["device_map"] = {"": torch.cuda.current_device()}
        if self.device_map:
            kwargs["device_map"] = self.device_map
        kwargs.update(self.model_init_kwargs)
        if "torch_dtype" in kwargs:  # the name TRL configs written for transformers 4 still use
            kwargs["dtype"] = kwargs.pop("torch_dtype")
        return kwargs

    @property
    def places_itself(self) -> bool:
        """Whether from_pretrained already put the weights on devices (then `.to(device)` must not move them)."""
        return bool(self.device_map or self.load_in_4bit or self.load_in_8bit or "device_map" in self.model_init_kwargs)


def adapter_base(path: str) -> str | None:
    """The base model a PEFT adapter folder was trained on, or None when `path` holds a whole model."""
    from peft import PeftConfig

    try:
        return PeftConfig.from_pretrained(path).base_model_name_or_path
    except (ValueError, OSError):
        return None


def load_tokenizer(path: str, padding_side: str | None = None):
    """The model's tokenizer with a pad token (its EOS when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:
        base = adapter_base(path)  # an adapter saved without its tokenizer uses its base's
        if base is None:
            raise MoalignError(f"cannot load the tokenizer of {path} ({first_line(error)})") from None
        tokenizer = AutoTokenizer.from_pretrained(base)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if padding_side:
        tokenizer.padding_side = padding_side
    return tokenizer


def load_pretrained(
    path: str,
    options: ModelOptions | None = None,
    device: str | None = None,
    auto_class: Any = None,
    trainable: bool = False,
    **overrides: Any,
):
    """A model from a folder or hub id, with the user's options; `auto_class` defaults to causal LMs.

    A PEFT adapter folder loads onto its base through PEFT's AutoPeftModel: merged for inference, kept as a
    trainable adapter with `trainable`. `device` (None: leave where from_pretrained put it) is ignored
    when the options place the weights themselves (device_map, quantization). `overrides` go to
    from_pretrained after everything else (e.g. num_labels for a classifier).
    """
    from transformers import AutoModelForCausalLM

    options = options or ModelOptions()
    auto_class = auto_class or AutoModelForCausalLM
    kwargs = {**options.from_pretrained_kwargs(pick_device(device or "auto")), **overrides}
    base = adapter_base(path) if auto_class is AutoModelForCausalLM else None
    try:
        if base is not None:
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(path, is_trainable=trainable, **kwargs)
            if not trainable and not options.places_itself:  # quantized bases stay unmerged
                model = model.merge_and_unload()
        else:
            model = auto_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise MoalignError(f"cannot load model {path} ({first_line(error)})") from None
    except ImportError as error:  # an option's package transformers asked for and did not find
        raise MoalignError(f"loading {path}: {first_line(error)}") from None
    if device is not None and not options.places_itself:
        model = model.to(pick_device(device))
    return model


def load_for_generation(path: str, device: str = "auto", options: ModelOptions | None = None):
    """A causal LM in eval mode on `device` and its tokenizer padding on the left (prompts end together)."""
    model = load_pretrained(path, options, device=device)
    return model.eval(), load_tokenizer(path, padding_side="left")
