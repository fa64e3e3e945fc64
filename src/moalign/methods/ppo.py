"""PPO with a value head and GAE, the RL algorithm of the MORLHF and MORLAIF papers.

TRL 1.x no longer ships PPO, so it is written out here in one loop (nanoGPT-style), step by step:

    rollout     sample a response per prompt from π (moalign.generation.generate), score it: one scalar s
    shaping     per-token reward r_t = −β·(log π(y_t) − log π_ref(y_t)), plus s on the last token
    advantage   GAE:  δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1};  returns R_t = A_t + V_t
    update      `ppo_epochs` passes over the rollout of the clipped losses
                  L_pg = E max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)),  ρ = π(y_t) / π_old(y_t)
                  L_v  = ½·E max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²)
                  L    = L_pg + c_v·L_v

The value head is one linear layer on the policy's last hidden state (a shared trunk, like TRL's old
AutoModelForCausalLMWithValueHead). With LoRA the reference policy is the same network with its adapter
switched off, so a 7B model is held in memory once. The policy stays in eval mode throughout: dropout
would make π and π_old differ on identical inputs and bias the ratio ρ.

A rollout holds `per_device_train_batch_size × gradient_accumulation_steps` prompts; each PPO epoch over it
takes `num_mini_batches` optimiser steps (micro-batches of `per_device_train_batch_size` accumulate). Every
`save_steps` rollouts the policy, value head and optimiser are saved; rerunning resumes from the newest.
The learning rate is constant (no scheduler).

On several processes (`torchrun`, `accelerate launch`) it is data-parallel: each rank samples its own
`per_device_train_batch_size × gradient_accumulation_steps` prompts of the global rollout, advantages are
whitened over the global rollout, the losses are token means over the global mini-batch and the policy's
and value head's gradients are all-reduced (DDP, wrapped by accelerate), so every replica takes the step one
process would take on the whole rollout; the main process saves.
"""

from __future__ import annotations

import copy
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moalign import distributed
from moalign.errors import MoalignError
from moalign.generation import SamplingParams, generate, prepare_tokenizer
from moalign.methods.common import lora_config
from moalign.methods.rollouts import Rollout, ValueHead, gae, logprobs_and_values, masked_whiten, pad_sequences
from moalign.methods.stages import finish_stage, finished_stage, last_checkpoint
from moalign.run import atomic_path

log = logging.getLogger("moalign")

RewardFn = Callable[[list[str], list[str]], Sequence[float]]
STATE_FILE = "ppo_state.pt"


@dataclass
class PPOArguments:
    """PPO's own fields; the KL coefficient (`beta`), policy clip (`epsilon`) and sampling settings
    (`temperature`, `top_p`, `max_completion_length`) are the GRPO config's, shared by every algorithm."""

    ppo_epochs: int = field(default=4, metadata={"help": "PPO: optimisation epochs over each rollout batch"})
    vf_coef: float = field(default=0.1, metadata={"help": "PPO: weight of the value loss"})
    cliprange_value: float = field(default=0.2, metadata={"help": "PPO: clip range of the value update"})
    gamma: float = field(default=1.0, metadata={"help": "PPO: discount factor of GAE"})
    lam: float = field(default=0.95, metadata={"help": "PPO: λ of GAE"})
    num_mini_batches: int = field(default=1, metadata={"help": "PPO: optimiser steps per epoch over a rollout"})


class PPO:
    """Policy, frozen reference, value head and optimiser, and the two halves of a step."""

    def __init__(self, config, model_path: str, tokenizer, device: str, resume: Path | None = None):
        from transformers import AutoModelForCausalLM

        self.config, self.tokenizer, self.device = config, tokenizer, device
        self.dtype = torch.bfloat16 if device.startswith("cuda") and config.bf16 else torch.float32
        self.peft = bool(config.use_peft)

        def load(path: str | Path):
            try:
                return AutoModelForCausalLM.from_pretrained(str(path), dtype=self.dtype)
            except OSError as error:
                raise MoalignError(f"cannot load model {path} ({str(error).strip().splitlines()[0]})") from None

        if self.peft:
            from peft import PeftModel, get_peft_model

            base = load(model_path)
            if resume is not None:
                self.policy = PeftModel.from_pretrained(base, str(resume), is_trainable=True)
            else:
                self.policy = get_peft_model(base, lora_config(config))
            self.reference = None  # the policy with its adapter disabled
        else:
            self.policy = load(resume or model_path)
            self.reference = load(model_path) if resume is not None else copy.deepcopy(self.policy)
            self.reference.requires_grad_(False).to(device).eval()
        self.policy.to(device).eval()
        self.head = ValueHead(self.policy.get_input_embeddings().embedding_dim).to(device)
        self.parameters = [p for p in self.policy.parameters() if p.requires_grad] + list(self.head.parameters())
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=config.learning_rate, weight_decay=config.weight_decay, eps=config.adam_epsilon
        )
        # Under a launcher: DDP replicas whose gradients are all-reduced (one process: the modules themselves).
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=not device.startswith("cuda"), device_placement=False)
        self.trained_policy = self.accelerator.prepare_model(self.policy)
        self.trained_head = self.accelerator.prepare_model(self.head)

    def total(self, value: torch.Tensor) -> torch.Tensor:
        """`value` summed over the ranks."""
        return self.accelerator.reduce(value, reduction="sum")

    def reference_logprobs(self, input_ids, attention_mask, width) -> torch.Tensor:
        temperature = self.config.temperature
        if self.reference is not None:
            return logprobs_and_values(self.reference, None, input_ids, attention_mask, width, temperature)[0]
        with self.policy.disable_adapter():
            return logprobs_and_values(self.policy, None, input_ids, attention_mask, width, temperature)[0]

    @torch.no_grad()
    def rollout(self, prompts: list[str], reward_fn: RewardFn, seed: int) -> Rollout:
        """Sample, score, and turn the scores into per-token advantages and value targets."""
        config = self.config
        params = [
            SamplingParams(
                max_new_tokens=config.max_completion_length,
                temperature=config.temperature,
                top_p=config.top_p,
                seed=seed + i,
            )
            for i in range(len(prompts))
        ]
        completions = generate(self.policy, self.tokenizer, prompts, params, batch_size=len(prompts))
        scores = torch.tensor([float(s) for s in reward_fn(prompts, [c.text for c in completions])], device=self.device)
        eos = self.tokenizer.eos_token_id
        # Ending is an action too: the EOS the sampler stopped at is part of the response it learns from.
        responses = [c.token_ids + ([eos] if c.finish_reason == "stop" else []) for c in completions]
        queries = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        ids, attention, mask, width = pad_sequences(queries, responses, self.tokenizer.pad_token_id, self.device)

        logprobs, values, ref_logprobs = [], [], []
        micro = self.config.per_device_train_batch_size
        for start in range(0, len(prompts), micro):
            rows = slice(start, start + micro)
            lp, v = logprobs_and_values(self.policy, self.head, ids[rows], attention[rows], width, config.temperature)
            logprobs.append(lp)
            values.append(v)
            ref_logprobs.append(self.reference_logprobs(ids[rows], attention[rows], width))
        logprobs, values, ref_logprobs = (torch.cat(x) * mask for x in (logprobs, values, ref_logprobs))

        per_token_kl = (logprobs - ref_logprobs) * mask
        rewards = -config.beta * per_token_kl
        last = mask.sum(1).long() - 1
        rewards[torch.arange(len(prompts), device=self.device), last] += scores
        advantages, returns = gae(rewards, values, config.gamma, config.lam)
        return Rollout(
            input_ids=ids,
            attention_mask=attention,
            prompt_width=width,
            mask=mask,
            logprobs=logprobs,
            values=values,
            advantages=masked_whiten(advantages, mask, self.total),
            returns=returns,
            scores=scores,
            kl=per_token_kl.sum(1),
        )

    def update(self, batch: Rollout, seed: int) -> dict[str, float]:
        """`ppo_epochs` passes of the clipped policy and value losses over one rollout, each pass split
        into `num_mini_batches` optimiser steps (micro-batches of `per_device_train_batch_size` add up).

        Each step minimises the losses' mean over the real tokens of its whole mini-batch, on every rank
        together: a micro-batch contributes its tokens' sum over the mini-batch's global token count (times
        the world size, which DDP's gradient averaging divides back out). Micro-batching and the number of
        processes therefore leave the step as one process with the whole batch would take it; a mean of
        per-micro-batch means would weigh a short response's tokens more in a batch of short responses.
        Returns the losses' token means over the global rollout and the gradient norm before clipping."""
        config = self.config
        size, micro = batch.input_ids.size(0), config.per_device_train_batch_size
        mini = size // config.num_mini_batches
        world = distributed.world_size()
        generator = torch.Generator().manual_seed(seed)
        sums = torch.zeros(4, device=self.device)  # policy loss, value loss, clipped tokens, tokens (this rank)
        norms = []
        for _ in range(config.ppo_epochs):
            order = torch.randperm(size, generator=generator).to(self.device)
            for mini_start in range(0, size, mini):
                self.optimizer.zero_grad(set_to_none=True)
                chosen = order[mini_start : mini_start + mini]
                tokens = self.total(batch.mask[chosen].sum()).clamp(min=1.0)
                for start in range(0, len(chosen), micro):
                    rows = chosen[start : start + micro]
                    losses = self.loss(batch, rows)
                    ((losses["policy_loss"] + config.vf_coef * losses["value_loss"]) * world / tokens).backward()
                    sums += torch.stack([*(value.detach() for value in losses.values()), batch.mask[rows].sum()])
                norms.append(float(torch.nn.utils.clip_grad_norm_(self.parameters, config.max_grad_norm)))
                self.optimizer.step()
        sums = self.total(sums)
        means = (sums[:3] / sums[3].clamp(min=1.0)).tolist()
        return {
            **dict(zip(("policy_loss", "value_loss", "clip_fraction"), means)),
            "grad_norm": sum(norms) / len(norms),
        }

    def loss(self, batch: Rollout, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The clipped surrogate and clipped value losses, and the clipped ratios, summed over the real tokens of
        some rows of a rollout (`update` divides by the mini-batch's tokens)."""
        config = self.config
        logprobs, values = logprobs_and_values(
            self.trained_policy,
            self.trained_head,
            batch.input_ids[rows],
            batch.attention_mask[rows],
            batch.prompt_width,
            config.temperature,
        )
        mask, advantages, returns, old_values = (
            batch.mask[rows],
            batch.advantages[rows],
            batch.returns[rows],
            batch.values[rows],
        )
        ratio = torch.exp(logprobs - batch.logprobs[rows])
        clipped_ratio = ratio.clamp(1.0 - config.epsilon, 1.0 + config.epsilon)
        clipped_values = old_values + (values - old_values).clamp(-config.cliprange_value, config.cliprange_value)
        return {
            "policy_loss": (torch.max(-advantages * ratio, -advantages * clipped_ratio) * mask).sum(),
            "value_loss": 0.5 * (torch.max((values - returns) ** 2, (clipped_values - returns) ** 2) * mask).sum(),
            "clip_fraction": (((ratio - 1.0).abs() > config.epsilon).float() * mask).sum().detach(),
        }

    def save_checkpoint(self, stage_dir: Path, step: int, history: list[dict]) -> None:
        """Write `checkpoint-STEP` under a temporary name, then rename; older checkpoints are removed."""
        stage_dir.mkdir(parents=True, exist_ok=True)
        final = stage_dir / f"checkpoint-{step}"
        state = {
            "step": step,
            "value_head": self.head.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "history": history,
        }
        with atomic_path(final) as tmp:
            self.policy.save_pretrained(tmp)
            torch.save(state, tmp / STATE_FILE)
        for old in stage_dir.glob("checkpoint-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)

    def load_state(self, checkpoint: Path) -> tuple[int, list[dict]]:
        state = torch.load(checkpoint / STATE_FILE, map_location=self.device, weights_only=False)
        self.head.load_state_dict(state["value_head"])
        self.optimizer.load_state_dict(state["optimizer"])
        return int(state["step"]), list(state["history"])


def prompt_batch(prompts: list[str], step: int, size: int, seed: int) -> list[str]:
    """The prompts of rollout `step`: a fresh seeded shuffle each epoch, so a resumed run sees the same ones."""
    n = len(prompts)
    orders: dict[int, list[int]] = {}
    picked = []
    for position in range(step * size, (step + 1) * size):
        epoch, offset = divmod(position, n)
        if epoch not in orders:
            orders[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        picked.append(prompts[orders[epoch][offset]])
    return picked


def total_steps(config, n_prompts: int) -> int:
    rollout = config.per_device_train_batch_size * config.gradient_accumulation_steps
    if config.max_steps and config.max_steps > 0:
        return int(config.max_steps)
    return max(1, math.ceil(config.num_train_epochs * n_prompts / rollout))


def every(value: float, steps: int) -> int:
    """A Trainer-style interval: a count of steps, or below 1 a fraction of all steps."""
    return max(1, int(value) if value >= 1 else math.ceil(value * steps))


def check_config(config) -> None:
    """PPO settings a user can get wrong, reported before any model loads."""
    if config.temperature <= 0:
        raise MoalignError("ppo samples from the policy: temperature must be > 0")
    if config.ppo_epochs < 1:
        raise MoalignError(f"ppo_epochs must be ≥ 1, got {config.ppo_epochs}")
    if config.max_completion_length is None or config.max_completion_length < 1:
        raise MoalignError("max_completion_length must be ≥ 1 for ppo")
    rollout = config.per_device_train_batch_size * config.gradient_accumulation_steps
    if config.num_mini_batches < 1 or rollout % config.num_mini_batches:
        raise MoalignError(
            f"num_mini_batches ({config.num_mini_batches}) must divide the rollout of {rollout} prompts "
            "(per_device_train_batch_size × gradient_accumulation_steps)"
        )
    if not 0 <= config.lam <= 1 or not 0 <= config.gamma <= 1:
        raise MoalignError("gamma and lam must lie in [0, 1]")


def train_ppo(
    config,
    model_path: str,
    prompts: list[str],
    reward_fn: RewardFn,
    stage_dir: Path,
    final_dir: Path,
    keep_adapter: bool = False,
) -> dict[str, Any]:
    """Train `model_path` with PPO on `reward_fn(prompts, responses)` and save it to `final_dir`.

    A stage whose `final_dir` has its marker is skipped (it finished before); an interrupted one resumes from
    its newest checkpoint in `stage_dir`. With LoRA the adapter is merged unless `keep_adapter`.
    Returns timing, token count and the mean score / KL of the first and last rollouts.
    """
    from moalign.methods.common import load_tokenizer

    if (done := finished_stage(final_dir)) is not None:
        log.info(f"stage {final_dir.name}: already trained, skipping")
        return done
    check_config(config)
    if not prompts:
        raise MoalignError("no training prompts")
    tokenizer = load_tokenizer(model_path)
    prepare_tokenizer(tokenizer)
    found = last_checkpoint(stage_dir, complete=STATE_FILE)  # a half-written one has no state file yet
    resume = Path(found) if found else None
    torch.manual_seed(config.seed)
    ppo = PPO(config, model_path, tokenizer, distributed.device(), resume)
    start_step, history = ppo.load_state(resume) if resume else (0, [])
    if resume:
        log.info(f"stage {final_dir.name}: resuming PPO from {resume.name}")
    steps = total_steps(config, len(prompts))
    rollout_size = config.per_device_train_batch_size * config.gradient_accumulation_steps
    strategy = getattr(config.save_strategy, "value", config.save_strategy)
    save_every = every(config.save_steps, steps) if strategy != "no" else 0
    if save_every >= steps >= 2:  # a run shorter than save_steps is still checkpointed, half-way
        save_every = steps // 2
    log_every = every(config.logging_steps, steps)
    world, rank = distributed.world_size(), distributed.rank()
    for step in range(start_step, steps):
        started = time.perf_counter()
        # The global rollout of this step, of which this rank samples (and seeds) its own share.
        seed = config.seed + (step * world + rank) * rollout_size
        shared = prompt_batch(prompts, step, rollout_size * world, config.seed)
        scored = getattr(reward_fn, "scoring_flops", 0.0)  # a ScalarizedReward counts its model-based scoring
        batch = ppo.rollout(shared[rank * rollout_size : (rank + 1) * rollout_size], reward_fn, seed)
        scored = getattr(reward_fn, "scoring_flops", 0.0) - scored
        losses = ppo.update(batch, seed)
        rows = ppo.total(torch.tensor(float(len(batch.scores)), device=batch.scores.device))
        record = {
            "step": step + 1,
            "score": (ppo.total(batch.scores.sum()) / rows).item(),
            "kl": (ppo.total(batch.kl.sum()) / rows).item(),
            "response_length": (ppo.total(batch.mask.sum()) / rows).item(),
            "tokens": int(ppo.total(batch.attention_mask.sum())),
            "generated_tokens": int(ppo.total(batch.mask.sum())),
            "scoring_flops": float(ppo.total(torch.tensor(scored, device=batch.scores.device))),
            **losses,
            "seconds": time.perf_counter() - started,
        }
        history.append(record)
        if (step + 1) % log_every == 0 or step + 1 == steps:
            log.info(
                f"ppo {final_dir.name} step {step + 1}/{steps}: score {record['score']:.3f} kl {record['kl']:.3f} "
                f"policy loss {record['policy_loss']:.4f} value loss {record['value_loss']:.4f}"
            )
        if save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            distributed.run_on_main(ppo.save_checkpoint, stage_dir, step + 1, history)
    stats = {
        "seconds": sum(r["seconds"] for r in history),  # every session's steps, resumed or not
        "tokens": sum(r["tokens"] for r in history),
        # what moalign.cost counts: ppo_epochs passes with gradients over each rollout, two forward passes (the
        # rollout's log-probs and values, the reference), and the rollout's generation (prefill + sampled tokens)
        "trained_tokens": config.ppo_epochs * sum(r["tokens"] for r in history),
        "forward_tokens": 2 * sum(r["tokens"] for r in history),
        "generated_tokens": sum(r.get("generated_tokens", 0) for r in history),
        "prefill_tokens": sum(r["tokens"] - r.get("generated_tokens", 0) for r in history),
        "scoring_flops": sum(r.get("scoring_flops", 0.0) for r in history),
        "steps": steps,
        "resumed_from_step": start_step,
        "score_first": history[0]["score"] if history else None,
        "score_last": history[-1]["score"] if history else None,
        "kl_last": history[-1]["kl"] if history else None,
    }
    return finish_stage(ppo.policy, tokenizer, final_dir, stage_dir, stats, merge=ppo.peft and not keep_adapter)
