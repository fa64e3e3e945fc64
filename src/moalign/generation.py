"""Batched sampling from any Hugging Face causal LM: left padding, KV cache, per-row seeds and settings.

The decoding loop is written out (nanoGPT-style) rather than delegated to `model.generate` so that each
row samples from its own seeded generator: a prompt's output never depends on what else is in its batch,
which the server's request batching relies on, and each token's log-probability comes for free.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from moalign.errors import MoalignError
from moalign.models import ModelOptions, load_for_generation, pick_device  # noqa: F401  (pick_device: re-exported)


@dataclass
class SamplingParams:
    """Decoding settings of one prompt (the HTTP API's sampling fields map onto these)."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    top_logprobs: int = 0

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise MoalignError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise MoalignError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MoalignError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    top_logprobs: list[dict[str, float]] = field(default_factory=list)
    prompt_tokens: int = 0


# Streaming hook: `on_tokens(row_index, new_token_ids, finished)`, row_index being the prompt's index in the
# call. Called from the decode loop at every host sync with the row's tokens sampled since its last call
# (EOS excluded), and exactly once per row with finished=True (new_token_ids may then be empty). Tokens are
# sent before stop strings are checked: a streaming client holds back text that could start a stop string,
# and the returned Completion holds the final, cut text.
TokenCallback = Callable[[int, list[int], bool], None]


def load_model(path: str, device: str = "auto", dtype: str = "auto", options: ModelOptions | None = None):
    """A causal LM (a PEFT adapter folder loads onto its base) and a left-padding tokenizer for generation."""
    return load_for_generation(path, device, options or ModelOptions(dtype=dtype))


def prepare_tokenizer(tokenizer) -> None:
    """Generation needs a pad token and left padding (so every prompt ends at the last position)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"


def _sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generators: list[torch.Generator]
) -> torch.Tensor:
    """One token per row: greedy where temperature is 0, else nucleus sampling with the row's generator.

    Rows with top_p = 1 draw from the unsorted distribution: sorting the vocabulary every step is the
    costliest part of sampling. Which path a row takes depends only on its own settings, so its output
    never depends on the other rows of its batch.
    """
    greedy = logits.argmax(dim=-1)
    scaled = logits / temperature.clamp(min=1e-6)[:, None]
    probs = torch.softmax(scaled.float(), dim=-1)
    draws = torch.stack([torch.rand((), generator=g) for g in generators]).to(logits.device)
    last = logits.size(-1) - 1
    cumulative = probs.cumsum(dim=-1)
    sampled = torch.searchsorted(cumulative, (draws * cumulative[:, -1])[:, None]).clamp(max=last).squeeze(1)
    nucleus = top_p < 1
    if bool(nucleus.any()):
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        kept = sorted_probs.cumsum(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        sorted_probs = sorted_probs.masked_fill(kept - sorted_probs >= top_p[:, None], 0.0)
        kept = sorted_probs.cumsum(dim=-1)
        position = torch.searchsorted(kept, (draws * kept[:, -1])[:, None]).clamp(max=last)
        sampled = torch.where(nucleus, sorted_ids.gather(1, position).squeeze(1), sampled)
    return torch.where(temperature == 0, greedy, sampled)


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    batch_size: int = 64,
    on_tokens: TokenCallback | None = None,
) -> list[Completion]:
    """Sample a completion for every prompt, `batch_size` prompts at a time (`on_tokens`: see TokenCallback)."""
    prompts = list(prompts)
    if not prompts:
        raise MoalignError("no prompts to generate for")
    if params is None or isinstance(params, SamplingParams):
        params = [params or SamplingParams()] * len(prompts)
    params = list(params)
    if len(params) != len(prompts):
        raise MoalignError(f"{len(prompts)} prompts but {len(params)} sampling settings")
    for p in params:
        p.validate()
    prepare_tokenizer(tokenizer)
    results: list[Completion] = []
    for start in range(0, len(prompts), batch_size):
        stream = None if on_tokens is None else (lambda row, ids, done, _at=start: on_tokens(_at + row, ids, done))
        results += _generate_batch(
            model, tokenizer, prompts[start : start + batch_size], params[start : start + batch_size], stream
        )
    return results


def _generate_batch(
    model, tokenizer, prompts: list[str], params: list[SamplingParams], on_tokens: TokenCallback | None
) -> list[Completion]:
    device = next(model.parameters()).device
    encoded = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    input_ids, attention = encoded["input_ids"], encoded["attention_mask"]
    if input_ids.size(1) == 0:
        raise MoalignError("prompts tokenize to nothing; give non-empty prompts")
    rows = len(prompts)
    max_new = max(p.max_new_tokens for p in params)
    temperature = torch.tensor([p.temperature for p in params], device=device, dtype=torch.float32)
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=torch.float32)
    generators = [torch.Generator().manual_seed(int(p.seed)) for p in params]
    want_top = max(p.top_logprobs for p in params)
    eos = tokenizer.eos_token_id

    accepted = inspect.signature(model.forward).parameters
    # transformers 5 renames `past_key_values` to `cache` model by model; use whichever this one takes.
    cache_name = "cache" if "cache" in accepted else "past_key_values"
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    # Only the last position's logits are needed: projecting every prompt token onto the vocabulary is waste.
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True, **last_only)
    past, logits = getattr(out, cache_name), out.logits[:, -1]
    next_position = positions[:, -1] + 1
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logps: list[list[float]] = [[] for _ in range(rows)]
    tops: list[list[dict[str, float]]] = [[] for _ in range(rows)]
    stopped = [False] * rows
    active = list(range(rows))  # rows still generating; their settings and generators shrink with the batch
    for step in range(max_new):
        choice = _sample(logits, temperature, top_p, generators)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        chosen_logp = log_probs.gather(1, choice[:, None]).squeeze(1)
        if want_top:
            top_values, top_ids = log_probs.topk(want_top, dim=-1)
        # One transfer to Python lists per step: indexing tensors element by element costs more than the
        # tiny demo model's forward pass.
        chosen, chosen_lp = choice.tolist(), chosen_logp.tolist()
        finished = set()
        for j, row in enumerate(active):
            if chosen[j] == eos:
                stopped[row] = True
                finished.add(j)
                if on_tokens is not None:
                    on_tokens(row, [], True)
                continue
            tokens[row].append(chosen[j])
            logps[row].append(chosen_lp[j])
            if params[row].top_logprobs:
                k = params[row].top_logprobs
                tops[row].append(
                    {tokenizer.decode([i]): v for i, v in zip(top_ids[j, :k].tolist(), top_values[j, :k].tolist())}
                )
            if len(tokens[row]) >= params[row].max_new_tokens:
                finished.add(j)
            # Stop strings are checked every few tokens: decoding each step costs time.
            elif (
                step % 4 == 3 and params[row].stop and _cut_at_stop(tokenizer.decode(tokens[row]), params[row].stop)[1]
            ):
                stopped[row] = True
                finished.add(j)
            if on_tokens is not None:
                on_tokens(row, [chosen[j]], j in finished)
        if len(finished) == len(active):
            break
        if finished:  # finished rows leave the batch with their KV cache rows: they stop costing compute
            keep = [j for j in range(len(active)) if j not in finished]
            kept = torch.tensor(keep, device=device)
            past.batch_select_indices(kept)
            choice, attention, next_position = choice[kept], attention[kept], next_position[kept]
            temperature, top_p = temperature[kept], top_p[kept]
            active, generators = [active[j] for j in keep], [generators[j] for j in keep]
        attention = torch.cat([attention, torch.ones(len(attention), 1, dtype=attention.dtype, device=device)], dim=1)
        out = model(
            input_ids=choice[:, None],
            attention_mask=attention,
            position_ids=next_position[:, None],
            use_cache=True,
            **{cache_name: past},
        )
        past, logits = getattr(out, cache_name), out.logits[:, -1]
        next_position = next_position + 1

    completions = []
    for row in range(rows):
        text = tokenizer.decode(tokens[row], skip_special_tokens=True)
        text, hit = _cut_at_stop(text, params[row].stop)
        if hit:  # keep token-level fields consistent with the cut text
            kept = len(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
            tokens[row], logps[row], tops[row] = tokens[row][:kept], logps[row][:kept], tops[row][:kept]
        completions.append(
            Completion(
                text=text,
                token_ids=tokens[row],
                logprobs=logps[row],
                finish_reason="stop" if (stopped[row] or hit) else "length",
                top_logprobs=tops[row],
                prompt_tokens=int(encoded["attention_mask"][row].sum()),
            )
        )
    return completions


def vllm_available() -> bool:
    """vLLM is used only when it is installed and a GPU is present."""
    if not torch.cuda.is_available() or os.environ.get("MOALIGN_NO_VLLM"):
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def generate_vllm(model_path: str, prompts: Sequence[str], params: SamplingParams) -> list[Completion]:
    """The same contract through vLLM (one sampling setting for the batch; seeds per request)."""
    from vllm import LLM
    from vllm import SamplingParams as VLLMParams

    llm = LLM(model=model_path)
    outputs = llm.generate(
        list(prompts),
        [
            VLLMParams(
                max_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p,
                stop=params.stop or None,
                seed=params.seed,
                logprobs=1,
            )
        ]
        * len(prompts),
    )
    completions = []
    for output in outputs:
        choice = output.outputs[0]
        logprobs = [entry[token].logprob for entry, token in zip(choice.logprobs or [], choice.token_ids)]
        completions.append(
            Completion(
                text=choice.text,
                token_ids=list(choice.token_ids),
                logprobs=logprobs,
                finish_reason="stop" if choice.finish_reason == "stop" else "length",
                prompt_tokens=len(output.prompt_token_ids),
            )
        )
    return completions
