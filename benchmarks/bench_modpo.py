"""MODPO's cost: its training step against plain DPO's, and MODPO trained on the embedded demo task.

`run(quick)`: the same model, the same batches, margins precomputed as dataset columns; MODPO's step
(margin term and 1/w_k scaling on top of TRL's DPO) against TRL's own DPO step. The goal is a ratio of
at most 1.15: precomputed margins must not cost what the reference code's per-step margin forwards do.

`train_on_demo(task, run_dir, quick)`: the MODPO front on the demo task for the shared all-methods
benchmark (bench_methods.py): DPO on the other objective's pairs (the corner e_j) and one MODPO model
per weight on the trained objective's pairs, from configs/modpo_demo.yaml.
"""

from __future__ import annotations

import json
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIG = HERE.parent / "configs" / "modpo_demo.yaml"
SECTION = "MODPO"
TEXT = (
    "the cat sat on a mat and was happy good day is sunny with friends weather bad road closed cook rice "
    "slowly add some salt travel light keep your passport safe great question love to help you today plants "
    "need water sun soil computer slow because disk full"
)
WORDS = TEXT.split(" ")


def _texts(rng: random.Random, n: int, low: int, high: int) -> list[str]:
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))) for _ in range(n)]


def build_model(directory: Path, n_embd: int, n_layer: int) -> Path:
    """A GPT-2 of the given size with a BPE tokenizer trained on the benchmark's words."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator([" ".join(WORDS), "\n\nHuman: ?\n\nAssistant:"], vocab_size=400, special_tokens=["<|eos|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|eos|>", pad_token="<|eos|>")
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=512,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=max(2, n_embd // 64),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_trainer(method: str, model_dir: Path, dataset, out: Path, batch: int):
    """TRL's DPOTrainer (`dpo`) or MODPOTrainer (`modpo`, w = (0.5, 0.5)) on the same model and data."""
    import torch
    from trl import DPOConfig, DPOTrainer

    from moalign.methods.common import load_causal_lm, load_tokenizer
    from moalign.methods.modpo import MARGIN_COLUMNS, MODPOTrainer

    cuda = torch.cuda.is_available()
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=batch,
        max_length=256,
        report_to="none",
        save_strategy="no",
        use_cpu=not cuda,
        bf16=cuda,
        activation_checkpointing=False,
        seed=0,
    )
    model, tokenizer = load_causal_lm(str(model_dir)), load_tokenizer(str(model_dir))
    common = dict(model=model, args=args, processing_class=tokenizer)
    if method == "dpo":
        return DPOTrainer(train_dataset=dataset.remove_columns(list(MARGIN_COLUMNS)), **common)
    return MODPOTrainer(weights=[0.5, 0.5], train_dataset=dataset, **common)


def step_seconds(trainer, batch, optimizer) -> float:
    """One training step as the Trainer runs it: the trainer's loss, backward, optimizer step."""
    _sync()
    start = time.perf_counter()
    with trainer.compute_loss_context_manager():
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _sync()
    return time.perf_counter() - start


def step_time_rows(quick: bool) -> list[dict[str, Any]]:
    """DPO and MODPO steps interleaved one by one on the same batches, so load on a shared machine hits both."""
    import datasets
    import numpy as np
    import torch

    n_embd, n_layer, batch, steps, warmup = (64, 2, 8, 12, 2) if quick else (128, 4, 8, 40, 4)
    if torch.cuda.is_available():
        n_embd, n_layer, batch = (256, 4, 16) if quick else (768, 12, 32)
    rng = random.Random(0)
    n = batch * 4
    prompts = [f"\n\nHuman: {t}?\n\nAssistant:" for t in _texts(rng, n, 5, 15)]
    margins = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": prompts,
            "chosen": [" " + t for t in _texts(rng, n, 20, 60)],
            "rejected": [" " + t for t in _texts(rng, n, 20, 60)],
            "margin_chosen": margins[:, :1].tolist(),
            "margin_rejected": margins[:, 1:].tolist(),
        }
    )
    times: dict[str, list[float]] = {"dpo": [], "modpo": []}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "model", n_embd, n_layer)
        trainers = {m: make_trainer(m, model_dir, dataset, Path(tmp) / m, batch) for m in times}
        optimizers = {m: torch.optim.AdamW(t.model.parameters(), lr=1e-5) for m, t in trainers.items()}
        batches = {
            m: [t.data_collator([t.train_dataset[i] for i in range(s, s + batch)]) for s in range(0, n, batch)]
            for m, t in trainers.items()
        }
        for step in range(steps + warmup):
            order = ("dpo", "modpo") if step % 2 == 0 else ("modpo", "dpo")
            for method in order:
                seconds = step_seconds(trainers[method], batches[method][step % 4], optimizers[method])
                if step >= warmup:
                    times[method].append(seconds)
    dpo, modpo = statistics.median(times["dpo"]), statistics.median(times["modpo"])
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    size = f"GPT-2 {n_embd}x{n_layer} on {device}, batch {batch} pairs, median of {steps} interleaved steps"
    return [
        {
            "section": SECTION,
            "metric": "DPO step time (TRL)",
            "value": round(dpo * 1000, 2),
            "unit": "ms",
            "note": size,
        },
        {
            "section": SECTION,
            "metric": "MODPO step time",
            "value": round(modpo * 1000, 2),
            "unit": "ms",
            "baseline": round(dpo * 1000, 2),
            "ratio": round(modpo / dpo, 3),
            "note": "same model and batches, margins precomputed as columns; goal: ratio <= 1.15",
        },
    ]


def run(quick: bool) -> list[dict[str, Any]]:
    return step_time_rows(quick)


# --------------------------------------------------------------------------------------------------- the demo


def demo_weights(quick: bool) -> list[str]:
    """Weights on the trained objective (first of two): 0.1 … 0.9 and 1 (plain DPO on it); quick: 4 points."""
    values = [0.25, 0.5, 0.75, 1.0] if quick else [round(0.1 * i, 1) for i in range(1, 11)]
    return [f"{w:g},{1 - w:g}" for w in values]


def _eval_prompts(task, run_dir: Path) -> Path:
    """The held-out prompts the other demo runs use (the pipeline's file when present)."""
    shared = run_dir.parent / "data" / "eval_prompts.jsonl"
    if shared.exists():
        return shared
    path = run_dir.parent / "data" / f"{run_dir.name}_eval_prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in task.test_prompts[:64]))
    return path


def train_on_demo(task, run_dir: Path, quick: bool) -> dict[str, Any]:
    """DPO on the second objective's pairs (the corner e_j), then MODPO on the first's; seconds and tokens.

    configs/modpo_demo.yaml holds the settings; the task's base model, pairs files and prompts are filled in.
    Margins come from the other objective's scorer (z-scored), as the demo's objectives are cheap to score.
    """
    import yaml

    from moalign.errors import MoalignError
    from moalign.methods.config import objective_names, parse_config
    from moalign.methods.modpo import DPORunConfig, MODPOConfig, train, train_dpo
    from moalign.run import read_manifest

    run_dir = Path(run_dir)
    specs = list(yaml.safe_load(CONFIG.read_text())["objectives"])
    names = objective_names(specs)
    missing = [name for name in names if name not in task.pairs_paths]
    if len(names) != 2 or missing:
        raise MoalignError(f"modpo_demo.yaml needs two objectives with demo pairs; no pairs for {missing}")
    base = ["--config", str(CONFIG), "--model_name_or_path", str(task.base_model)]
    base += ["--eval_prompts", str(_eval_prompts(task, run_dir))]
    if quick:
        base += ["--max_steps", "15"]
    dpo_dir = run_dir.parent / f"{run_dir.name}_dpo_{names[1]}"
    dpo = parse_config(
        DPORunConfig,
        base + ["--dataset", str(task.pairs_paths[names[1]]), "--objective_index", "1", "--output_dir", str(dpo_dir)],
    )
    train_dpo(dpo)
    modpo = parse_config(
        MODPOConfig,
        base
        + ["--dataset", str(task.pairs_paths[names[0]]), "--objective_index", "0", "--output_dir", str(run_dir)]
        + ["--end_runs", str(dpo_dir), "--preferences", *demo_weights(quick)],
    )
    train(modpo)
    totals = [read_manifest(path)["training"] for path in (dpo_dir, run_dir)]
    return {"train_seconds": sum(t["seconds"] for t in totals), "tokens": sum(t["tokens"] for t in totals)}


if __name__ == "__main__":
    import sys

    for row in run("--quick" in sys.argv):
        print(row)
