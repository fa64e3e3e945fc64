"""moalign at foundation-model scale: training and generation against the hardware's own pace.

    python benchmarks/gpu.py [--shape 1.1b|tiny] [--json PATH] [--skip-dpo]

Builds a Llama-shaped model with random weights (nothing is downloaded; `1.1b`: hidden 2048, 22 layers,
32 heads, 4 KV heads, vocabulary 32 000) and a word-level tokenizer over its vocabulary, then reports in
one run, as a table and JSON:
- the measured bf16 matmul peak (the denominator of every "share of peak": 6 · parameters · tokens/s);
- a plain PyTorch training step (same model, same batches, AdamW, gradient clipping) against moalign's
  SFT step, unpacked and packed, and the DPO step of MODPO's recipe;
- moalign's generation against transformers' `generate` at batch 1, 64 and 256 (same prompts, same
  settings: sampling at temperature 1, 128 new tokens);
- the peak GPU memory of each.
`--shape tiny` runs the same on a CPU in about a minute (a dry run of the script; its numbers mean little).
It needs no package beyond moalign's own.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SHAPES: dict[str, dict[str, Any]] = {
    "1.1b": dict(
        hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000,
        batch=16, max_length=1024, samples=512, steps=8, gen_batches=(1, 64, 256), new_tokens=128, prompt=64,
    ),
    "tiny": dict(
        hidden=64, intermediate=172, layers=2, heads=4, kv_heads=2, vocab=512,
        batch=4, max_length=64, samples=64, steps=3, gen_batches=(1, 8, 16), new_tokens=16, prompt=8,
    ),
}  # fmt: skip


# Trainer options every timed step shares: no checkpoints, logs or progress bars inside the measurement.
QUIET_TRAINER = dict(
    gradient_checkpointing=False, save_strategy="no", report_to="none", logging_steps=10**6, disable_tqdm=True
)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


@contextlib.contextmanager
def peak_memory() -> Iterator[dict[str, float]]:
    """The peak GPU memory (GiB) allocated inside the block; 0 on a CPU."""
    found: dict[str, float] = {"gib": 0.0}
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    yield found
    if torch.cuda.is_available():
        found["gib"] = torch.cuda.max_memory_allocated() / 2**30


def matmul_peak(size: int, repeats: int = 10) -> float:
    """Measured bf16 matmul TFLOP/s (size³, mean of `repeats` after warm-up): the hardware's own ceiling."""
    a = torch.randn(size, size, device=device(), dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device(), dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def build_model(folder: Path, shape: dict[str, Any]) -> int:
    """A random Llama of `shape` and a word-level tokenizer whose words t0 … tV-1 are its vocabulary, saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(shape["vocab"])}
    words = Tokenizer(models.WordLevel(vocab, unk_token="t2"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, pad_token="t0", eos_token="t1", unk_token="t2")
    config = LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        vocab_size=shape["vocab"],
        max_position_embeddings=max(2048, shape["max_length"] * 2),
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device()):
        model = LlamaForCausalLM(config).to(torch.bfloat16 if device() == "cuda" else torch.float32)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def words(generator: torch.Generator, vocab: int, n: int) -> str:
    return " ".join(f"t{i}" for i in torch.randint(3, vocab, (n,), generator=generator).tolist())


def sft_dataset(shape: dict[str, Any]):
    """prompt/completion rows of random words, 1/8 to all of max_length long: packing and padding both matter."""
    import datasets

    generator = torch.Generator().manual_seed(0)
    top = shape["max_length"]
    lengths = torch.randint(max(4, top // 8), top + 1, (shape["samples"],), generator=generator).tolist()
    rows = [(words(generator, shape["vocab"], n // 4), words(generator, shape["vocab"], n - n // 4)) for n in lengths]
    return datasets.Dataset.from_dict({"prompt": [p for p, _ in rows], "completion": [" " + c for _, c in rows]})


def dpo_dataset(shape: dict[str, Any]):
    import datasets

    generator = torch.Generator().manual_seed(1)
    top, vocab = shape["max_length"] // 2, shape["vocab"]
    prompts = [words(generator, vocab, top // 4) for _ in range(shape["samples"])]
    return datasets.Dataset.from_dict(
        {
            "prompt": prompts,
            "chosen": [" " + words(generator, vocab, top - top // 4) for _ in prompts],
            "rejected": [" " + words(generator, vocab, top - top // 4) for _ in prompts],
        }
    )


@dataclass
class StepTimes:
    """Step times (s) recorded by a Trainer callback, from on_step_begin to on_step_end, device synced."""

    seconds: list[float]
    tokens: list[int]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def tokens_per_second(self) -> float:
        return statistics.median(t / s for t, s in zip(self.tokens, self.seconds))


def step_timer(times: StepTimes, trainer) -> Any:
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            times.seconds.append(time.perf_counter() - self.start)
            times.tokens.append(trainer._total_train_tokens - sum(times.tokens))

    return Timer()


def sft_config(output_dir: str, shape: dict[str, Any], packing: bool, bf16: bool, **extra: Any):
    from moalign.methods.sft import SFTRunConfig

    return SFTRunConfig(
        output_dir=output_dir,
        per_device_train_batch_size=shape["batch"],
        max_length=shape["max_length"],
        max_steps=shape["steps"] + 1,  # the first step warms up and is not counted
        packing=packing,
        completion_only_loss=True,
        learning_rate=1e-5,
        bf16=bf16,
        **QUIET_TRAINER,
        seed=0,
        **extra,
    )


def moalign_sft_step(model_path: str, dataset, config) -> tuple[StepTimes, list[dict[str, torch.Tensor]]]:
    """moalign's SFT step (the trainer `moalign sft` builds, loaded by moalign's loader) and its batches."""
    from moalign.methods.common import load_causal_lm, load_tokenizer
    from moalign.training import sft_trainer

    trainer = sft_trainer(load_causal_lm(model_path, config), config, dataset, load_tokenizer(model_path))
    times = StepTimes([], [])
    trainer.add_callback(step_timer(times, trainer))
    with contextlib.redirect_stdout(sys.stderr):  # the Trainer prints its summary: keep stdout for the table
        trainer.train()
    batches = [batch for _, batch in zip(range(config.max_steps), trainer.get_train_dataloader())]
    del trainer
    return StepTimes(times.seconds[1:], times.tokens[1:]), batches


def plain_step(model_path: str, batches: list[dict[str, torch.Tensor]], bf16: bool, config) -> StepTimes:
    """The plain PyTorch loop on the same batches: forward with labels, backward, clip, (fused) AdamW, zero."""
    from moalign.methods.common import load_causal_lm

    model = load_causal_lm(model_path, config).to(device()).train()
    fused = {"fused": True} if device() == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, **fused)
    times = StepTimes([], [])
    autocast = torch.autocast(device(), dtype=torch.bfloat16, enabled=bf16 and model.dtype == torch.float32)
    for batch in batches:
        batch = {k: v.to(device()) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        sync()
        start = time.perf_counter()
        with autocast:
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.seconds.append(time.perf_counter() - start)
        mask = batch.get("attention_mask")
        times.tokens.append(int(mask.sum()) if mask is not None else int(batch["input_ids"].numel()))
    return StepTimes(times.seconds[1:], times.tokens[1:])


def dpo_step(model_path: str, shape: dict[str, Any], bf16: bool, output_dir: str) -> StepTimes:
    """The DPO step of moalign's MODPO recipe (`moalign dpo`: TRL's DPOTrainer with MODPO's config), on pairs
    of random words; MODPO's own step adds margin columns to the same loss (benchmarks/bench_modpo.py)."""
    from trl import DPOTrainer

    from moalign.methods.common import load_causal_lm, load_tokenizer
    from moalign.methods.modpo.recipe import DPORunConfig

    config = DPORunConfig(
        output_dir=output_dir,
        per_device_train_batch_size=max(1, shape["batch"] // 2),
        max_length=shape["max_length"],
        max_steps=shape["steps"] + 1,
        learning_rate=1e-6,
        bf16=bf16,
        **QUIET_TRAINER,
    )
    trainer = DPOTrainer(
        model=load_causal_lm(model_path, config),
        args=config,
        train_dataset=dpo_dataset(shape),
        processing_class=load_tokenizer(model_path),
    )
    times = StepTimes([], [])
    trainer.add_callback(step_timer(times, trainer))
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    # DPOTrainer counts no tokens: a pair step holds batch × 2 sequences of at most max_length
    per_step = config.per_device_train_batch_size * 2 * shape["max_length"]
    return StepTimes(times.seconds[1:], [per_step] * len(times.seconds[1:]))


@torch.inference_mode()
def transformers_generate(model, tokenizer, prompts: list[str], new_tokens: int) -> int:
    """transformers' own `generate` on the same prompts and settings as moalign's engine (sampling at
    temperature 1, no top-k or top-p); returns the tokens generated before each row's EOS."""
    tokenizer.padding_side = "left"
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    out = model.generate(
        **encoded, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new_tokens,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    eos = tokenizer.eos_token_id
    rows = out[:, encoded["input_ids"].size(1) :].tolist()
    return sum(row.index(eos) if eos in row else len(row) for row in rows)


def generation_rates(model_path: str, shape: dict[str, Any], batch: int) -> dict[str, float]:
    """tokens/s of moalign's engine and of transformers' generate: `batch` prompts, same settings."""
    from moalign.generation import SamplingParams, generate, load_model

    model, tokenizer = load_model(model_path)
    generator = torch.Generator().manual_seed(2)
    prompts = [words(generator, shape["vocab"], shape["prompt"]) for _ in range(batch)]
    new = shape["new_tokens"]
    params = [SamplingParams(max_new_tokens=new, temperature=1.0, seed=i) for i in range(batch)]

    def ours() -> int:
        return sum(len(c.token_ids) for c in generate(model, tokenizer, prompts, params, batch_size=batch))

    result: dict[str, float] = {}
    for name, run in (
        ("moalign", ours),
        ("transformers", lambda: transformers_generate(model, tokenizer, prompts, new)),
    ):
        run()  # warm-up: allocations, kernel choices
        with peak_memory() as memory:
            sync()
            start = time.perf_counter()
            tokens = run()
            sync()
            result[name] = tokens / (time.perf_counter() - start)
        result[f"{name} GiB"] = memory["gib"]
    return result


def measure(shape_name: str, skip_dpo: bool = False, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every row of the report: metric, value, unit, baseline, ratio, note."""
    from moalign.models import installed

    shape = SHAPES[shape_name]
    bf16 = device() == "cuda"
    rows: list[dict[str, Any]] = []
    peak = matmul_peak(8192 if device() == "cuda" else 512)
    rows.append({"metric": "bf16 matmul peak", "value": peak, "unit": "TFLOP/s", "note": "measured, size³ mean of 10"})
    with tempfile.TemporaryDirectory(prefix="moalign-gpu-") as tmp:
        path = f"{tmp}/model"
        n_params = build_model(Path(path), shape)
        log(f"model: {n_params / 1e9:.3f} B parameters on {device()}; shape {shape_name}")

        def share(tokens_per_second: float) -> str:
            return f"{6 * n_params * tokens_per_second / (peak * 1e12):.1%} of peak"

        dataset = sft_dataset(shape)
        variants = [("unpacked", False, {})]
        variants.append(("packed", True, {}))  # sdpa: moalign falls back to length-grouped batches (logged)
        if device() == "cuda":
            variants.append(("packed, flex attention", True, {"attn_implementation": "flex_attention"}))
            if installed("flash_attn"):
                variants.append(("packed, flash-attention 2", True, {"attn_implementation": "flash_attention_2"}))
        for name, packing, extra in variants:
            config = sft_config(f"{tmp}/sft", shape, packing, bf16, **extra)
            try:
                with peak_memory() as memory:
                    ours, batches = moalign_sft_step(path, dataset, config)
                with peak_memory() as plain_memory:
                    plain = plain_step(path, batches, bf16, config)
            except Exception as error:  # one variant failing (a kernel missing here) must not hide the others
                rows.append({"metric": f"SFT step, {name}", "value": None, "unit": "", "note": f"failed: {error}"})
                continue
            rate, plain_rate = ours.tokens_per_second(), plain.tokens_per_second()
            rows.append(
                {
                    "metric": f"moalign SFT step, {name}",
                    "value": rate,
                    "unit": "tokens/s",
                    "baseline": plain_rate,
                    "ratio": rate / plain_rate,
                    "note": f"{share(rate)}; plain loop {share(plain_rate)} on the same batches; "
                    f"{ours.median * 1e3:.0f} vs {plain.median * 1e3:.0f} ms per step; "
                    f"peak {memory['gib']:.1f} vs {plain_memory['gib']:.1f} GiB",
                }
            )
            log(f"SFT {name}: {rate:.0f} tokens/s, plain {plain_rate:.0f}")
        if not skip_dpo:
            with peak_memory() as memory:
                dpo = dpo_step(path, shape, bf16, f"{tmp}/dpo")
            rate = dpo.tokens_per_second()
            rows.append(
                {
                    "metric": "DPO step (as MODPO's dpo stage trains)",
                    "value": rate,
                    "unit": "tokens/s",
                    "note": f"{share(rate)} (tokens padded to max_length); {dpo.median * 1e3:.0f} ms per step; "
                    f"peak {memory['gib']:.1f} GiB",
                }
            )
            log(f"DPO: {rate:.0f} tokens/s")
        for batch in shape["gen_batches"]:
            rates = generation_rates(path, shape, batch)
            rows.append(
                {
                    "metric": f"generation, batch {batch}",
                    "value": rates["moalign"],
                    "unit": "tokens/s",
                    "baseline": rates["transformers"],
                    "ratio": rates["moalign"] / rates["transformers"],
                    "note": f"baseline: transformers generate; {shape['new_tokens']} new tokens, temperature 1; "
                    f"peak {rates['moalign GiB']:.1f} vs {rates['transformers GiB']:.1f} GiB",
                }
            )
            log(f"generation batch {batch}: {rates['moalign']:.0f} vs {rates['transformers']:.0f} tokens/s")
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    from moalign.report import markdown_table

    columns = ["metric", "value", "unit", "baseline", "ratio", "note"]
    return markdown_table(rows, columns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--skip-dpo", action="store_true", help="leave out the DPO step")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    rows = measure(args.shape, args.skip_dpo, log=lambda line: print(line, file=sys.stderr))
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    print(f"# moalign on {gpu}, shape {args.shape}\n\n{table(rows)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": gpu, "shape": args.shape, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
