"""`moalign export RUN --for vllm|transformers OUTDIR`: what an upstream engine needs to serve a run.

A run's models are written under the names `moalign serve RUN --upstream URL` asks for (see
`Policy.model_paths`): the run's name for a one-model run (RiC, SFT), each trained preference's folder
name for a per-preference run (MODPO, ParetoHqD, MORLHF). The command that starts the engine and the
matching `moalign serve` command are printed and kept in OUTDIR/moalign-export.json.

- `--for vllm`: LoRA adapters on one base are served by one vLLM process (`--enable-lora
  --lora-modules NAME=PATH …`): OUTDIR/base (when the base is a local folder) and OUTDIR/adapters/NAME.
  A one-model run is OUTDIR/NAME, served under its name. vLLM serves one full model per process, so a
  run of several full models is refused: train it with `save_adapters: true`, or export it for transformers.
- `--for transformers`: `transformers serve` loads any model a request names by its local path, so every
  model is written as a full model at OUTDIR/NAME (adapters merged into their base) and the server is
  started inside OUTDIR.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from moalign.errors import MoalignError
from moalign.run import atomic_path, write_json

EXPORT_MANIFEST = "moalign-export.json"


def copy_folder(source: Path, destination: Path) -> None:
    """A model folder copied; files are hard-linked where the file system allows (weights are large)."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, destination, copy_function=link_or_copy)


def merge_adapter(adapter: Path, destination: Path) -> None:
    """An adapter merged into its base and saved as a full model with its tokenizer."""
    from moalign.models import load_pretrained, load_tokenizer

    model = load_pretrained(str(adapter), device="cpu")
    model.save_pretrained(destination)
    load_tokenizer(str(adapter)).save_pretrained(destination)


def lora_rank(adapter: Path) -> int:
    """The LoRA rank vLLM must be started with for this adapter (`--max-lora-rank`)."""
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(adapter))  # the adapter type's own config class (LoraConfig for LoRA)
    if not isinstance(getattr(config, "r", None), int):
        raise MoalignError(f"{adapter} is a {config.peft_type} adapter; vLLM serves LoRA adapters only")
    return config.r


def plan_models(run_dir: Path) -> tuple[Any, dict[str, Path], dict[str, str | None]]:
    """The run's policy, its model folders by upstream name, and each folder's adapter base (None: full)."""
    from moalign.models import adapter_base
    from moalign.policy import load_policy
    from moalign.run import read_manifest

    if read_manifest(run_dir).get("ingredients"):
        raise MoalignError(
            f"{run_dir} is a Rewarded Soups run: it builds a model for each preference at request time, which an "
            "upstream cannot; serve it with `moalign serve` alone"
        )
    policy = load_policy(run_dir)
    models = policy.model_paths()
    missing = [str(path) for path in models.values() if not path.is_dir()]
    if missing:
        raise MoalignError(f"{run_dir} lists model folders that do not exist: {', '.join(missing)}")
    return policy, models, {name: adapter_base(str(path)) for name, path in models.items()}


def export(run_dir: str | Path, target: str, out_dir: str | Path, port: int = 8001) -> dict[str, Any]:
    """Write OUTDIR for `target` ("vllm" or "transformers"); returns what moalign-export.json holds."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)  # as the user gave them: the printed commands run from here
    if target not in ("vllm", "transformers"):
        raise MoalignError(f"--for takes vllm or transformers, got {target!r}")
    if out_dir.exists():
        raise MoalignError(f"{out_dir} exists; choose a new output folder (nothing was written)")
    _, models, bases = plan_models(run_dir)
    adapters = {name: base for name, base in bases.items() if base is not None}
    if target == "vllm" and len(adapters) < len(models) and len(models) > 1:
        raise MoalignError(
            f"{run_dir} has {len(models) - len(adapters)} full models and vLLM serves one full model per process: "
            "train with use_peft and save_adapters: true, or export --for transformers"
        )
    if target == "vllm" and len(set(adapters.values())) > 1:
        raise MoalignError(
            f"{run_dir}'s adapters were trained on different bases ({', '.join(set(adapters.values()))})"
        )
    url = f"http://127.0.0.1:{port}/v1"
    route = ["moalign", "serve", str(run_dir), "--upstream", url]
    written: dict[str, str] = {}
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        if target == "transformers":
            for name, path in models.items():
                (merge_adapter if name in adapters else copy_folder)(path, tmp / name)
                written[name] = name
            # a subshell, so that the printed `moalign serve` still runs from here
            serve = f"(cd {shlex.quote(str(out_dir))} && transformers serve --port {port})"
        elif adapters:  # vLLM: one base, one LoRA module per trained preference
            base = next(iter(adapters.values()))
            if Path(base).is_dir():
                copy_folder(Path(base), tmp / "base")
                base = str(out_dir / "base")
                written["base"] = "base"
            modules = []
            for name, path in models.items():
                copy_folder(path, tmp / "adapters" / name)
                written[name] = f"adapters/{name}"
                modules.append(f"{name}={out_dir / 'adapters' / name}")
            rank = max(lora_rank(path) for path in models.values())
            serve = shlex.join(
                ["vllm", "serve", base, "--port", str(port), "--enable-lora", "--max-lora-rank", str(rank)]
                + ["--max-loras", str(len(modules)), "--lora-modules", *modules]
            )
        else:  # one full model
            ((name, path),) = models.items()
            copy_folder(path, tmp / name)
            written[name] = name
            serve = shlex.join(["vllm", "serve", str(out_dir / name), "--served-model-name", name, "--port", str(port)])
        summary = {"run": str(run_dir), "for": target, "models": written, "serve": serve, "route": shlex.join(route)}
        write_json(tmp / EXPORT_MANIFEST, summary)
    return summary


def cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="moalign export",
        description="Write a run's models for an OpenAI-compatible engine and print the commands that serve them.",
    )
    parser.add_argument("run_dir", help="a run directory (one with moalign.json)")
    parser.add_argument("out_dir", help="a new folder to write the models into")
    parser.add_argument("--for", dest="target", required=True, choices=["vllm", "transformers"], help="the engine")
    parser.add_argument("--port", type=int, default=8001, help="the port the printed engine command serves on")
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        raise MoalignError(f"--port must be between 1 and 65535, got {args.port}")
    summary = export(args.run_dir, args.target, args.out_dir, args.port)
    print(f"exported {len(summary['models'])} folder(s) to {args.out_dir} for {args.target}; serve them with")
    print(f"  {summary['serve']}")
    print("and route preferences to them with")
    print(f"  {summary['route']}")
