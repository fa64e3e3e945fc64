"""The `moalign` command: one subcommand per method plus scoring, evaluation, generation and serving.

Each subcommand lives beside the code it drives as a `cli(argv)` function, imported only when used so
that `moalign --help` is instant.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from moalign.cpu_memory import keep_freed_memory
from moalign.distributed import launch_warning
from moalign.errors import MoalignError, first_line
from moalign.run import discard_empty_claims

COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("moalign.demo", "run the embedded task end to end (no downloads) and write a report"),
    "objectives": ("moalign.objectives", "list the objective kinds and what each needs"),
    "score": ("moalign.scores", "score every sample of a dataset with every objective"),
    "sft": ("moalign.methods.sft", "supervised fine-tuning baseline"),
    "ric": ("moalign.methods.ric", "Rewards-in-Context: one model steered by rewards in its prompt"),
    "ric-image": ("moalign.image.ric", "Rewards-in-Context for text-to-image (diffusion) pipelines"),
    "paretohqd": ("moalign.methods.paretohqd", "ParetoHqD: Pareto high-quality data, two-stage SFT"),
    "dpo": ("moalign.methods.modpo", "plain DPO on one objective's pairs (MODPO's margin model)"),
    "modpo": ("moalign.methods.modpo", "MODPO: DPO with margins from the other objectives"),
    "feedback": ("moalign.methods.feedback", "MORLAIF: AI feedback per principle from a judge"),
    "pm": ("moalign.methods.preference_model", "MORLAIF: one preference model per principle"),
    "morl": ("moalign.methods.morl", "MORLHF / MORLAIF: RL on a scalarised reward"),
    "soups": ("moalign.methods.soups", "Rewarded Soups: weight averages of per-objective models"),
    "cost": ("moalign.cost", "estimate a recipe's FLOPs and GPU-hours from its config, before running it"),
    "eval": ("moalign.evaluate", "evaluate runs on the preference grid: fronts, hypervolume, report"),
    "generate": ("moalign.policy", "generate from a run for a preference"),
    "serve": ("moalign.serve", "serve a run over an OpenAI-compatible HTTP API (in-process or routed to --upstream)"),
    "export": ("moalign.export", "write a run's models for vLLM or transformers serve; print the commands"),
}

# Subcommands whose module serves several commands get their own entry point name.
ENTRY_POINTS = {"dpo": "dpo_cli", "generate": "generate_cli"}


running: str | None = None  # the command being run, for the name in help and error lines


def is_library_error(error: BaseException) -> bool:
    """Errors the libraries raise for a user's files: unreadable, corrupt, malformed. One line is enough."""
    if isinstance(error, (OSError, UnicodeDecodeError)):
        return True
    kinds = {
        "yaml": "YAMLError",
        "safetensors": "SafetensorError",
        "datasets.exceptions": "DatasetGenerationError",
        "pyarrow": "ArrowException",
        "json": "JSONDecodeError",
    }
    for module, name in kinds.items():
        kind = getattr(sys.modules.get(module), name, None)  # only libraries already loaded can have raised
        if isinstance(kind, type) and isinstance(error, kind):
            return True
    return False


def usage() -> str:
    lines = ["usage: moalign COMMAND [options]   (moalign COMMAND --help for each)", "", "commands:"]
    lines += [f"  {name:<11} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"moalign: error: unknown command {command!r}; run `moalign --help`", file=sys.stderr)
        return 2
    if (warning := launch_warning()) is not None:
        print(f"moalign {command}: warning: {warning}", file=sys.stderr)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = importlib.import_module(COMMANDS[command][0])
    entry = getattr(module, ENTRY_POINTS.get(command, "cli"))
    global running
    running = command
    try:
        entry(rest)
    except MoalignError as error:
        discard_empty_claims()
        print(f"moalign {command}: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        if not is_library_error(error):
            raise  # a bug in moalign: the traceback is what to report
        discard_empty_claims()
        print(f"moalign {command}: error: {type(error).__name__}: {first_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moalign {command}: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
