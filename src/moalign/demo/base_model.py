"""The demo's base policy: a tiny GPT-2 with its own byte-level BPE, pretrained on the demo corpus with TRL.

Everything is made here so the demo needs no download: the tokenizer is trained on the corpus text, the
model is initialised from a config and trained with TRL's SFTTrainer for a fixed number of steps (with a
wall-clock guard, because the demo must stay a few-minute job on a laptop CPU). The result is an ordinary
`save_pretrained` folder that `AutoModelForCausalLM` / `AutoTokenizer` load like any hub model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from moalign.run import atomic_path

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass
class BaseModelConfig:
    """Size and training budget of the base model (the defaults train in about two minutes on 2 CPU cores)."""

    vocab_size: int = 3000
    n_embd: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_positions: int = 256
    max_steps: int = 1000
    batch_size: int = 8  # small batches, many updates: what learns fastest per CPU second here
    learning_rate: float = 3e-3
    warmup_steps: int = 10
    seed: int = 0
    n_eval_samples: int = 100  # prompts sampled for distinct-2


def train_tokenizer(texts: Sequence[str], vocab_size: int = 3000):
    """A byte-level BPE trained on the corpus, wrapped as a PreTrainedTokenizerFast (so AutoTokenizer loads it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    # Words split at whitespace only, so a signed number (" -1") can be one token; bytes as in GPT-2.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r" ?\S+|\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    # Small signed integers are single tokens (" 2", " -1"): the corpus has no digits, and numbers written into
    # prompts (RiC's rewards) should reach the model as one token each, directly after their tag.
    numbers = " ".join(str(i) for i in range(-9, 10))
    tokenizer.train_from_iterator([*texts, *[numbers] * 100], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD, model_max_length=256)


def build_model(tokenizer, config: BaseModelConfig):
    """A freshly initialised GPT-2 sized by `config`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=config.n_positions,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(config.seed)
    return GPT2LMHeadModel(gpt2)


# The demos compute on a fixed number of torch threads: CPU kernels sum in an order that depends on the thread count
# (two threads and one give different weights after 30 steps), so a fixed count gives the same numbers on any
# machine. One thread for what other tasks build on (the base model, which the exact task starts from; the image
# demo): it never fights other processes for the cores (two threads on two busy cores ran 5x slower than one).
DEMO_THREADS = 1
# The text demo's SFT, RiC and evaluation: two threads, measured on an idle 2-core machine at 0.152 s per training
# step of the demo model against 0.214 s on one (the base model's steps, batch 8).
TEXT_DEMO_THREADS = 2


@contextmanager
def demo_threads(threads: int = DEMO_THREADS) -> Iterator[int]:
    """Run the block on `threads` torch threads, then restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        torch.set_num_threads(before)


@torch.inference_mode()
def perplexity(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 32) -> float:
    """Perplexity of `" " + response + EOS` given the prompt: how well the model knows held-out answers."""
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(prompts), batch_size):
        rows = []
        for prompt, response in zip(prompts[start : start + batch_size], responses[start : start + batch_size]):
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            r = tokenizer(" " + response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = (p + r)[: model.config.n_positions]
            rows.append((ids, len(p)))
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        labels = torch.full((len(rows), width), -100)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (ids, n_prompt) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
            labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), reduction="sum"
        )
        total_nll += float(nll)
        total_tokens += int((shift_labels != -100).sum())
    return math.exp(total_nll / max(total_tokens, 1))


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct-n (Li et al., 2016): unique word n-grams over all n-grams of all texts; 0 when there are none."""
    grams = [tuple(words[i : i + n]) for text in texts for words in [text.split()] for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def sample(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 96, temperature: float = 1.0) -> list[str]:
    """One sampled response per prompt (seeded per prompt), through moalign's own generation loop."""
    from moalign.generation import SamplingParams, generate

    params = [
        SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=i) for i in range(len(prompts))
    ]
    return [c.text.strip() for c in generate(model, tokenizer, list(prompts), params)]


def train_base_model(
    corpus_texts: Sequence[str],
    out_dir: str | os.PathLike,
    max_steps: int | None = None,
    config: BaseModelConfig | None = None,
    eval_prompts: Sequence[str] = (),
    eval_responses: Sequence[str] = (),
    progress: bool = True,
) -> dict:
    """Train tokenizer and model on `corpus_texts` (prompt + " " + response), save both to `out_dir`.

    Writes into a temporary folder and renames it at the end, so `out_dir` either holds a finished model
    (with `metrics.json`) or does not exist. Returns the metrics: perplexity on the held-out
    (`eval_prompts`, `eval_responses`), distinct-2 of samples for those prompts, train_seconds, n_params.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    config = config or BaseModelConfig()
    if max_steps is not None:
        config.max_steps = max_steps
    with atomic_path(out_dir) as tmp:  # out_dir holds a finished model or does not exist
        tmp.mkdir(parents=True)

        started = time.monotonic()
        tokenizer = train_tokenizer(corpus_texts, config.vocab_size)
        model = build_model(tokenizer, config)
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            "tokenizer: %d tokens (%.1f s); model: %.2fM parameters",
            len(tokenizer),
            time.monotonic() - started,
            n_params / 1e6,
        )

        args = SFTConfig(
            output_dir=str(tmp / "trainer"),
            max_steps=config.max_steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            lr_scheduler_type="cosine",
            warmup_steps=config.warmup_steps,
            weight_decay=0.01,
            logging_steps=max(1, config.max_steps // 8),
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,  # transformers 5 name of gradient_checkpointing (TRL defaults it to on)
            max_length=config.n_positions,
            dataset_text_field="text",
            seed=config.seed,
            disable_tqdm=not progress,
            dataloader_num_workers=0,
            train_sampling_strategy="group_by_length",  # less padding: the demo is compute-bound on a CPU
        )
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"text": list(corpus_texts)}),
            processing_class=tokenizer,
        )
        with demo_threads() as threads:
            log.info("base model: training %d steps on %d torch thread(s)", config.max_steps, threads)
            train_start = time.monotonic()
            result = trainer.train()
            train_seconds = time.monotonic() - train_start
        steps = trainer.state.global_step
        log.info("base model: %d steps in %.1f s, train loss %.3f", steps, train_seconds, result.training_loss)

        model = trainer.model.eval()
        metrics: dict = {
            "n_params": n_params,
            "train_seconds": round(train_seconds, 1),
            "threads": threads,
            "steps": steps,
            "train_loss": round(float(result.training_loss), 4),
            "config": asdict(config),
        }
        if len(eval_prompts):
            start = time.monotonic()
            prompts = list(eval_prompts[: config.n_eval_samples])
            with demo_threads():
                metrics["perplexity"] = round(perplexity(model, tokenizer, eval_prompts, eval_responses), 3)
                samples = sample(model, tokenizer, prompts)
            metrics["distinct_2"] = round(distinct_n(samples), 4)
            metrics["reference_distinct_2"] = round(distinct_n(list(eval_responses[: config.n_eval_samples])), 4)
            metrics["eval_seconds"] = round(time.monotonic() - start, 1)
            metrics["samples"] = [{"prompt": p, "response": s} for p, s in zip(prompts[:3], samples[:3])]
            log.info("base model: perplexity %.2f, distinct-2 %.3f", metrics["perplexity"], metrics["distinct_2"])

        shutil.rmtree(tmp / "trainer", ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
