"""Two processes against one, CPU (`make bench`): informative only on a 2-core machine.
(`python benchmarks/bench_distributed.py fsdp2` is the FSDP2 check for a CUDA machine, at the end.)

- `moalign sft` on the same global batch: two gloo processes (`torchrun --nproc_per_node 2`, 8 rows each)
  against one process (16 rows); the training seconds of the run's manifest (model loading and process
  start-up excluded), as a ratio (two / one).
- Sharded generation (`generate_stage`, what RiC's MORS, ParetoHqD's stage 2 and `moalign eval` run): the
  wall time on two processes against one, and the time rank 0 waits in the gather for the other rank,
  as a share of the generation it did itself.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "moalign" / "configs" / "accelerate"
SECTION = "several processes"
GENERATE = r"""
import json, os, sys, time
from pathlib import Path
from types import SimpleNamespace

from moalign import distributed
from moalign.generation import SamplingParams
from moalign.methods.common import generate_stage, model_completer

model, n, chunk, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
prompts = [f"\n\nHuman: how do I keep item {i} safe?\n\nAssistant:" for i in range(n)]
params = [SamplingParams(max_new_tokens=32, seed=i) for i in range(n)]
settings = SimpleNamespace(generation_backend="local", generation_base_url=None, generation_batch_size=chunk)
distributed.barrier()  # every rank has imported and is ready: time the stage alone
start = time.perf_counter()
_, stats = generate_stage(Path(out) / "chunks", prompts, params, model_completer(model, settings), chunk)
if distributed.is_main():
    json.dump({**stats, "wall": time.perf_counter() - start}, open(os.path.join(out, "stats.json"), "w"))
"""


def launch(processes: int, argv: list[str], cwd: Path) -> None:
    """`python -m moalign.cli ...` on one process, or under torchrun on several."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if processes == 1:
        command = [sys.executable, *argv]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        command += argv
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(argv[:3])} on {processes} processes failed: {done.stderr[-2000:]}")


def sft_seconds(processes: int, model: Path, dataset: Path, out: Path, steps: int) -> float:
    flags = ["--model_name_or_path", str(model), "--dataset", str(dataset), "--output_dir", str(out)]
    flags += ["--max_steps", str(steps), "--per_device_train_batch_size", str(16 // processes), "--max_length", "128"]
    flags += ["--report_to", "none", "--save_strategy", "no", "--learning_rate", "1e-4", "--seed", "0"]
    launch(processes, ["-m", "moalign.cli", "sft", *flags], out.parent)
    return json.loads((out / "moalign.json").read_text())["training"]["seconds"]


def generation(processes: int, model: Path, n: int, chunk: int, out: Path) -> dict[str, Any]:
    out.mkdir(parents=True)
    script = out / "generate.py"
    script.write_text(GENERATE)
    launch(processes, [str(script), str(model), str(n), str(chunk), str(out)], out)
    return json.loads((out / "stats.json").read_text())


def run(quick: bool) -> list[dict[str, Any]]:
    from moalign.testing import CORPUS, build_causal_lm

    steps, n, chunk = (6, 64, 16) if quick else (20, 256, 32)
    with tempfile.TemporaryDirectory(prefix="moalign-bench-distributed-") as tmp:
        root = Path(tmp)
        # A GPT-2 of 0.8M parameters built on the spot (the demo's base model takes minutes to pretrain cold).
        model = build_causal_lm(root / "lm", n_embd=128, n_layer=4, n_head=4, n_positions=256)
        rows = [
            {"prompt": f"\n\nHuman: {CORPUS[i % 10]} ({i})?\n\nAssistant:", "response": " ".join(CORPUS[: 1 + i % 6])}
            for i in range(512)
        ]
        dataset = root / "samples.jsonl"
        dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
        one = sft_seconds(1, model, dataset, root / "sft1", steps)
        two = sft_seconds(2, model, dataset, root / "sft2", steps)
        alone = generation(1, model, n, chunk, root / "gen1")
        shared = generation(2, model, n, chunk, root / "gen2")
    mine = shared["seconds_per_rank"].get("0", 0.0)  # rank 0's own generation
    return [
        {
            "section": SECTION,
            "metric": f"moalign sft, {steps} steps of 16 rows: 2 processes × 8 vs 1 × 16",
            "value": round(two, 2),
            "unit": "s",
            "baseline": round(one, 2),
            "ratio": round(two / one, 3),
            "note": "training seconds from the manifests; gloo all-reduce on a 2-core machine, informative only",
        },
        {
            "section": SECTION,
            "metric": f"sharded generation, {n} prompts × 32 tokens in chunks of {chunk}: 2 processes vs 1",
            "value": round(shared["wall"], 2),
            "unit": "s",
            "baseline": round(alone["wall"], 2),
            "ratio": round(shared["wall"] / alone["wall"], 3),
            "note": f"rows per rank {shared['rows_per_rank']}",
        },
        {
            "section": SECTION,
            "metric": "sharded generation: rank 0 waiting for the other rank in the gathers",
            "value": round(shared["wait_seconds"], 2),
            "unit": "s",
            "baseline": round(mine, 2),
            "ratio": round(shared["wait_seconds"] / mine, 3) if mine else None,
            "note": "baseline: rank 0's own share of the generation seconds",
        },
    ]


# ----------------------------------------------------------------------------- GPU: FSDP2 against plain

LOSS = re.compile(r"'loss': '?([-0-9.e]+)'?")


def losses(processes: str, argv: list[str], cwd: Path) -> list[float]:
    """The Trainer's logged losses of `moalign ...` run plainly ("plain") or under accelerate with FSDP2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if processes == "plain":
        command = [sys.executable, "-m", "moalign.cli", *argv]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "fsdp2.yaml")]
        command += ["--num_processes", "1", "--mixed_precision", "bf16" if cuda() else "no"]
        command += ["-m", "moalign.cli", *argv]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{processes} {argv[0]} failed: {done.stderr[-3000:]}")
    return [float(value) for value in LOSS.findall(done.stdout + done.stderr)]


def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def fsdp2_check(shape_name: str) -> list[dict[str, Any]]:
    """`moalign sft` and `moalign modpo` on benchmarks/gpu.py's shape, plain and under FSDP2 on one GPU: the
    same loss curve (bf16: within 2%) shows FSDP2 wraps, trains and saves the model as the plain run does."""
    from bench_methods import sibling

    gpu = sibling("gpu")
    shape = gpu.SHAPES[shape_name]
    rows = []
    with tempfile.TemporaryDirectory(prefix="moalign-fsdp2-") as tmp:
        root = Path(tmp)
        gpu.build_model(root / "model", shape)
        gpu.sft_dataset(shape).rename_column("completion", "response").to_json(root / "sft.jsonl")
        gpu.dpo_dataset(shape).to_json(root / "pairs.jsonl")
        common = ["--model_name_or_path", str(root / "model"), "--max_steps", str(shape["steps"]), "--seed", "0"]
        common += ["--per_device_train_batch_size", str(shape["batch"]), "--max_length", str(shape["max_length"])]
        common += ["--logging_steps", "1", "--report_to", "none", "--save_strategy", "no"]
        common += ["--bf16", "true"] if cuda() else []
        commands = {
            "sft": ["sft", "--dataset", str(root / "sft.jsonl"), *common],
            "modpo": ["modpo", "--dataset", str(root / "pairs.jsonl"), "--objectives", "length", "brevity"]
            + ["--preferences", "0.5,0.5", *common],
        }
        for method, argv in commands.items():
            curves = {
                launcher: losses(launcher, [*argv, "--output_dir", str(root / f"{method}-{launcher}")], root)
                for launcher in ("plain", "fsdp2")
            }
            plain, sharded = curves["plain"], curves["fsdp2"]
            worst = max(abs(a - b) / max(abs(a), 1e-8) for a, b in zip(plain, sharded)) if plain else float("nan")
            rows.append(
                {
                    "metric": f"{method} on the {shape_name} shape, FSDP2 on one GPU vs plain: worst loss gap",
                    "value": round(worst, 5),
                    "unit": "relative",
                    "note": f"{len(sharded)} of {len(plain)} steps; plain {plain[:3]}…, FSDP2 {sharded[:3]}…",
                }
            )
    return rows


if __name__ == "__main__":
    # python benchmarks/bench_distributed.py fsdp2 [1.1b|tiny]: the FSDP2 check (on a CUDA machine)
    if sys.argv[1:2] == ["fsdp2"]:
        sys.path.insert(0, str(Path(__file__).parent))
        for row in fsdp2_check(sys.argv[2] if len(sys.argv) > 2 else "1.1b"):
            print(json.dumps(row))
