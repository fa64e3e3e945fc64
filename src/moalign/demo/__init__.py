"""The embedded demo task: a corpus with conflicting objectives and a tiny base model, no downloads."""

from __future__ import annotations

from moalign.errors import MoalignError

TASKS = {"text": "moalign.demo.pipeline", "images": "moalign.demo.images", "exact": "moalign.exact.pipeline"}


def cli(argv: list[str]) -> None:
    """`moalign demo [--task text|images|exact] [options]`: the text task by default."""
    import importlib

    argv, task = list(argv), "text"
    for index, arg in enumerate(argv):
        if arg == "--task" or arg.startswith("--task="):
            task = arg.partition("=")[2] if "=" in arg else (argv[index + 1] if index + 1 < len(argv) else "")
            del argv[index : index + (1 if "=" in arg else 2)]
            break
    if task not in TASKS:
        raise MoalignError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    importlib.import_module(TASKS[task]).cli(argv)


__all__ = ["cli"]
