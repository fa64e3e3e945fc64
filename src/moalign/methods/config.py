"""A method's configuration: the fields every method adds to its TRL config, and one parser for every command.

Method configs extend TRL's configs (SFTConfig, DPOConfig, …) with `CommonArguments`, so every Trainer
option works and `--config file.yaml` behaves as in TRL's own scripts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moalign.errors import MoalignError, first_line

log = logging.getLogger("moalign")


@dataclass
class CommonArguments:
    """Fields every method adds to its TRL config."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "base model: hub id or local path"})
    dataset: str | None = field(default=None, metadata={"help": "hub id or local .json/.jsonl/.csv/.parquet"})
    dataset_split: str = field(default="train", metadata={"help": "split of the training dataset"})
    max_samples: int | None = field(default=None, metadata={"help": "use only the first N rows of the dataset"})
    objectives: list[str] = field(default_factory=list, metadata={"help": "objective specs, e.g. vader brevity"})
    eval_prompts: str | None = field(default=None, metadata={"help": "JSONL of held-out prompts for `moalign eval`"})
    score_cache: str | None = field(default=None, metadata={"help": "SQLite score cache (default: user cache)"})
    use_peft: bool = field(default=False, metadata={"help": "train LoRA adapters instead of all weights"})
    overwrite: bool = field(
        default=False, metadata={"help": "delete a run already in output_dir and train it again from scratch"}
    )
    save_adapters: bool = field(
        default=False,
        metadata={"help": "with use_peft, save each trained LoRA adapter on its own instead of merging it"},
    )
    # How weights load (moalign.models); the names are those of TRL's ModelConfig.
    dtype: str = field(
        default="auto",
        metadata={"help": "auto (bfloat16 on a GPU that has it, else float32), bfloat16, float16 or float32"},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "sdpa (default), eager, flex_attention, flash_attention_2 (needs flash-attn)"}
    )
    load_in_4bit: bool = field(default=False, metadata={"help": "4-bit base weights for QLoRA (needs bitsandbytes)"})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit base weights (needs bitsandbytes)"})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit quantization type: nf4 or fp4"})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "quantize the 4-bit quantization constants"})
    device_map: str | None = field(default=None, metadata={"help": "e.g. auto: spread a large model over devices"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "default: all linear layers"})
    sample_max_new_tokens: int = field(default=64, metadata={"help": "max new tokens when the method generates"})
    generation_backend: str = field(
        default="local",
        metadata={"help": "where the method generates: local, or openai (the server at generation_base_url)"},
    )
    generation_base_url: str | None = field(
        default=None,
        metadata={"help": "OpenAI-compatible server serving each model under its path (transformers serve)"},
    )
    sample_temperature: float = 1.0
    sample_top_p: float = 1.0
    generation_chunk_size: int = field(
        default=256,
        metadata={"help": "prompts per saved chunk when the method generates: what a kill loses, what a rank takes"},
    )

    def __post_init__(self) -> None:
        # TRL defaults to bf16 and gradient checkpointing, which a CPU run cannot use. Checkpointing is set by its
        # transformers 5 name: the old one only counts while the new one is unset, and then mirrors it.
        if not torch.cuda.is_available():
            self.bf16 = False
            self.fp16 = False
            self.activation_checkpointing = False
            self.use_cpu = True
        from moalign.models import ModelOptions

        ModelOptions.from_config(self).validate()  # a bad dtype or a missing package fails before any work
        from moalign.engines import engine_from

        engine_from(self.generation_backend, self.generation_base_url)  # a missing URL fails before any work too
        super().__post_init__()


def config_section(path: str, section: str | None) -> dict[str, Any]:
    """A YAML config's mapping for one step: its `section:` mapping if it has one, else the whole file.

    One recipe file can then hold several steps side by side (MORLAIF's `feedback:`, `pm:`, `morl:`).
    """
    import yaml

    if not os.path.isfile(path):
        raise MoalignError(f"config file {path} does not exist")
    try:
        with open(path) as handle:
            content = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise MoalignError(
            f"config file {path} is not valid YAML{where} ({getattr(error, 'problem', None) or 'syntax error'})"
        ) from None
    if not isinstance(content, dict):
        raise MoalignError(f"config file {path} must hold a YAML mapping")
    if section and isinstance(content.get(section), dict):
        return dict(content[section])
    return content


REQUIRED = ("model_name_or_path", "dataset", "output_dir")


def _parser_class() -> type:
    """TRL's parser, reporting a bad flag as moalign's one-line error instead of argparse's usage dump."""
    from trl import TrlParser

    class OneLineParser(TrlParser):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, allow_abbrev=False, **kwargs)  # --learning_rat is a typo, not --learning_rate

        def error(self, message: str):
            raise MoalignError(message)

    return OneLineParser


def parse_config(
    config_class: type,
    argv: list[str],
    section: str | None = None,
    required: Sequence[str] = REQUIRED,
    positionals: Sequence[tuple[str, str, str]] = (),
    prog: str | None = None,
):
    """Parse `--config FILE.yaml` plus flags into one config with TRL's parser (flags win over the file).

    Every moalign command parses this way. With `section`, a file that has a mapping under that key
    contributes only that mapping. Flags are snake_case as in TRL (`--output_dir`); kebab-case
    (`--output-dir`) works too. `positionals` are (name, nargs, help) of bare arguments (run directories,
    prompts); they are set on the config as attributes of those names.
    """
    argv = list(argv)
    from moalign import cli

    if prog is None and cli.running:  # `moalign COMMAND`, as help and errors should name it
        prog = f"moalign {cli.running}"
    parser = _parser_class()((config_class,), prog=prog)
    for name, nargs, help_text in positionals:
        parser.add_argument(name, nargs=nargs, help=help_text)
    values: dict[str, Any] = {}
    if "--config" in argv:
        index = argv.index("--config")
        if index + 1 >= len(argv):
            raise MoalignError("--config needs a YAML file")
        path = argv[index + 1]
        values = config_section(path, section)
        del argv[index : index + 2]
        for key, value in (values.pop("env", None) or {}).items():  # TRL's `env:` mapping
            os.environ[key] = str(value)
        unknown = parser.set_defaults_with_config(**values)[::2]  # ["--key", "value", ...]
        if unknown:
            keys = ", ".join(key.removeprefix("--") for key in unknown)
            raise MoalignError(f"config file {path}: unknown keys {keys} (see --help for the options)")
    try:
        config, *extra, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ValueError as error:
        raise MoalignError(first_line(error)) from None
    if unknown:
        raise MoalignError(f"unknown options {' '.join(unknown)} (see --help)")
    for namespace in extra:
        for name, value in vars(namespace).items():
            setattr(config, name, value)
    given = {arg[2:].split("=", 1)[0].replace("-", "_") for arg in argv if arg.startswith("--")} | set(values)
    for name in required:  # given by the user: a library default (TrainingArguments' "trainer_output") is not
        if name not in given or not getattr(config, name, None):
            raise MoalignError(f"{name} is not set (YAML key or --{name})")
    return config


def objective_names(specs: list[str]) -> list[str]:
    from moalign.objectives import build_all

    return [objective.name for objective in build_all(specs)]
