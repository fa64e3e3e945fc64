"""The generation engine: batched sampling from any Hugging Face causal LM with per-row seeds and settings.

The decoding loop is written out (nanoGPT-style) rather than delegated to `model.generate` so that each
row samples from its own seeded draws: a prompt's output never depends on what else is in its batch,
which the server's request batching relies on, and each token's log-probability comes for free. Prompts
are prefilled in length-sorted batches with a KV cache; each decode step does no host work per row (see
`_Decoder`). Evaluation, every method that generates and the server go through `generate`.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from moalign.errors import MoalignError, first_line
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
        if not all(math.isfinite(float(v)) for v in (self.temperature, self.top_p)):
            raise MoalignError(f"temperature and top_p must be finite numbers, got {self.temperature}, {self.top_p}")
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


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    uniform: torch.Tensor,
    nucleus: bool = True,
    greedy: bool = True,
) -> torch.Tensor:
    """One token per row by inverting the row's CDF at its own uniform draw: greedy where temperature is 0,
    else from softmax(logits / temperature) cut to the top_p nucleus.

    The uniform draws come from the row's seeded generator, drawn in bulk before decoding, so sampling
    needs no host work per step and a row's token never depends on the other rows. Rows with top_p = 1
    invert the unsorted distribution (sorting the vocabulary is the costliest part of sampling);
    `nucleus=False` says no row has top_p < 1 and skips the sort altogether; `greedy=False`, that no row has
    temperature 0.
    """
    last = logits.size(-1) - 1
    probs = torch.softmax(logits.float() / temperature.clamp(min=1e-6)[:, None], dim=-1)
    cumulative = probs.cumsum(dim=-1)
    # right=True: the first token whose cumulative mass exceeds the draw, never a zero-probability one
    drawn = torch.searchsorted(cumulative, (uniform * cumulative[:, -1])[:, None], right=True).clamp(max=last)
    drawn = drawn.squeeze(1)
    if nucleus:
        sorted_probs, sorted_ids = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        before = sorted_probs.cumsum(dim=-1) - sorted_probs
        kept = sorted_probs.masked_fill(before >= top_p[:, None], 0.0).cumsum(dim=-1)
        position = torch.searchsorted(kept, (uniform * kept[:, -1])[:, None], right=True).clamp(max=last)
        drawn = torch.where(top_p < 1, sorted_ids.gather(1, position).squeeze(1), drawn)
    return torch.where(temperature == 0, logits.argmax(dim=-1), drawn) if greedy else drawn


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    cuts = [text.find(s) for s in stops if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


SYNC_EVERY = 8  # decode steps between host syncs: bookkeeping, streaming and dropping finished rows
log = logging.getLogger("moalign")


def static_decoding(device: torch.device) -> bool:
    """Whether to decode with a static KV cache and fixed shapes, replayed as CUDA graphs: on a GPU, where
    the per-step launch work of a small batch costs more than its compute. (A CPU gains nothing from it.)"""
    return device.type == "cuda"


def _compiled_forward(model):
    """`model.forward` compiled once per model (mode reduce-overhead: CUDA graphs) for the decode step."""
    if getattr(model, "_moalign_decode", None) is None:
        model._moalign_decode = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False)
    return model._moalign_decode


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    batch_size: int = 64,
    on_tokens: TokenCallback | None = None,
) -> list[Completion]:
    """Sample a completion for every prompt (`on_tokens`: see TokenCallback).

    Prompts are decoded `batch_size` at a time in order of length, so a batch pads little; completions
    come back in the prompts' order.
    """
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
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    if empty := [i for i, row in enumerate(ids) if not row]:
        raise MoalignError(f"prompt {empty[0]} tokenizes to nothing; give non-empty prompts")
    context = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if context and (long := [i for i, row in enumerate(ids) if len(row) + params[i].max_new_tokens > context]):
        i = long[0]
        raise MoalignError(
            f"prompt {i} has {len(ids[i])} tokens; with max_new_tokens {params[i].max_new_tokens} it exceeds the "
            f"model's context of {context} tokens: shorten it or lower max_new_tokens"
        )
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    results: list[Completion | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        stream = None if on_tokens is None else (lambda j, new, done, _rows=rows: on_tokens(_rows[j], new, done))
        decoder = _Decoder(model, tokenizer, [ids[i] for i in rows], [params[i] for i in rows], stream)
        for row, completion in zip(rows, decoder.run()):
            results[row] = completion
    return results  # type: ignore[return-value]


class _Decoder:
    """One batch's decode loop with no per-row, per-step host work.

    Each step stays on the device: sampling from uniform draws made up front from the rows' seeds, the
    sampled tokens and their log-probabilities written into buffers. Every SYNC_EVERY steps the host reads
    the new tokens once, finds each row's end (EOS, its length, a stop string), streams them, and drops
    the finished rows (and their KV cache) in one go.
    """

    def __init__(self, model, tokenizer, ids: list[list[int]], params: list[SamplingParams], on_tokens):
        self.model, self.tokenizer, self.params, self.on_tokens = model, tokenizer, params, on_tokens
        device = next(model.parameters()).device
        accepted = inspect.signature(model.forward).parameters
        # transformers 5 renames `past_key_values` to `cache` model by model; use whichever this one takes.
        self.cache_name = "cache" if "cache" in accepted else "past_key_values"
        # Only the last position's logits are needed: projecting every prompt token onto the vocabulary is waste.
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
        rows = len(ids)
        self.prompt_tokens = [len(row) for row in ids]
        self.width, self.max_new = max(self.prompt_tokens), max(p.max_new_tokens for p in params)
        self.eos = tokenizer.eos_token_id
        self.want_top = max(p.top_logprobs for p in params)
        self.sampling = any(p.temperature > 0 for p in params)
        self.nucleus = any(p.temperature > 0 and p.top_p < 1 for p in params)
        self.greedy = any(p.temperature == 0 for p in params)
        self.active = list(range(rows))  # the batch row of each tensor row; tensors shrink with it
        self.live = list(range(rows))  # tensor rows still decoding (static decoding keeps finished ones)
        self.static = static_decoding(device)
        self.tokens: list[list[int]] = [[] for _ in range(rows)]
        self.logps: list[list[float]] = [[] for _ in range(rows)]
        self.tops: list[list[dict[str, float]]] = [[] for _ in range(rows)]
        self.stopped = [False] * rows

        input_ids = torch.full((rows, self.width), tokenizer.pad_token_id, dtype=torch.long)
        for i, row in enumerate(ids):  # left padding: every prompt ends at the last position
            input_ids[i, self.width - len(row) :] = torch.tensor(row)
        # The attention mask of the whole decode, made once: step t attends to its first width + t columns.
        starts = self.width - torch.tensor(self.prompt_tokens)
        mask = (torch.arange(self.width + self.max_new)[None, :] >= starts[:, None]).long()
        uniform = torch.zeros(rows, self.max_new)
        for i, p in enumerate(params):  # exactly max_new_tokens draws per row: its own settings, nothing else
            uniform[i, : p.max_new_tokens] = torch.rand(
                p.max_new_tokens, generator=torch.Generator().manual_seed(p.seed)
            )
        self.input_ids, self.mask, self.uniform = input_ids.to(device), mask.to(device), uniform.to(device)
        self.temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
        self.sampled = torch.zeros(rows, self.max_new, dtype=torch.long, device=device)
        self.sampled_logp = torch.zeros(rows, self.max_new, dtype=torch.float32, device=device)
        if self.want_top:
            self.top_values = torch.zeros(rows, self.max_new, self.want_top, device=device)
            self.top_ids = torch.zeros(rows, self.max_new, self.want_top, dtype=torch.long, device=device)

    def run(self) -> list[Completion]:
        positions = (self.mask[:, : self.width].cumsum(-1) - 1).clamp(min=0)
        cache, forward = {}, self.model
        if self.static:  # fixed shapes throughout: a cache of the whole decode, the whole mask every step
            from transformers import StaticCache

            cache = {self.cache_name: StaticCache(config=self.model.config, max_cache_len=self.mask.size(1))}
            if self.mask.device.type == "cuda":
                forward = _compiled_forward(self.model)
        out = self.model(
            input_ids=self.input_ids,
            attention_mask=self.mask if self.static else self.mask[:, : self.width],
            position_ids=positions,
            use_cache=True,
            **cache,
            **self.last_only,
        )
        cache, logits = getattr(out, self.cache_name), out.logits[:, -1]
        self.next_position = positions[:, -1] + 1
        synced, next_limit = 0, min(p.max_new_tokens for p in self.params)
        # On a CPU reading a flag costs nothing (there is no queue of device work to drain): look for EOS every
        # step there, so a finished row stops costing compute at once. On a GPU only every SYNC_EVERY steps.
        eager = self.mask.device.type == "cpu"
        for step in range(self.max_new):
            self.record(step, logits)
            if (
                step + 1 == next_limit
                or (step + 1) % SYNC_EVERY == 0
                or (eager and bool((self.sampled[:, step] == self.eos).any()))
            ):
                finished = self.sync(synced, step + 1)
                synced = step + 1
                if len(finished) == len(self.live):
                    break
                if finished:
                    cache = self.drop(finished, cache)
                # every live row has sampled step + 1 tokens: the next to reach its length does so here
                next_limit = min(self.params[self.active[j]].max_new_tokens for j in self.live)
            inputs = dict(
                input_ids=self.sampled[:, step, None],
                attention_mask=self.mask if self.static else self.mask[:, : self.width + step + 1],
                position_ids=(self.next_position + step)[:, None],
                use_cache=True,
            )
            out = self.decode(forward, inputs, cache)
            cache, logits = getattr(out, self.cache_name), out.logits[:, -1]
        return self.completions()

    def decode(self, forward, inputs: dict[str, Any], cache):
        """One decode step; a compiled step that fails falls back to the eager forward (said once)."""
        if forward is self.model:
            return forward(**inputs, **{self.cache_name: cache})
        try:
            torch.compiler.cudagraph_mark_step_begin()
            return forward(**inputs, **{self.cache_name: cache})
        except Exception as error:  # a model torch.compile cannot capture still generates, eagerly
            log.warning(f"generation: compiled decoding failed ({first_line(error)}); decoding eagerly")
            self.model._moalign_decode = self.model.forward
            return self.model(**inputs, **{self.cache_name: cache})

    def record(self, step: int, logits: torch.Tensor) -> None:
        """Sample step `step`'s tokens and keep them and their log-probabilities on the device."""
        logits = logits.float()
        if self.sampling:
            choice = sample_tokens(
                logits, self.temperature, self.top_p, self.uniform[:, step], self.nucleus, self.greedy
            )
        else:
            choice = logits.argmax(dim=-1)
        self.sampled[:, step] = choice
        self.sampled_logp[:, step] = logits.gather(1, choice[:, None]).squeeze(1) - logits.logsumexp(dim=-1)
        if self.want_top:
            values, ids = torch.log_softmax(logits, dim=-1).topk(self.want_top, dim=-1)
            self.top_values[:, step], self.top_ids[:, step] = values, ids

    def sync(self, start: int, stop: int) -> set[int]:
        """Read steps [start, stop) on the host: extend every active row, stream, return the finished rows
        (positions in `active`)."""
        chunk = self.sampled[:, start:stop].tolist()
        chunk_logp = self.sampled_logp[:, start:stop].tolist()
        if self.want_top:
            top_values, top_ids = self.top_values[:, start:stop].tolist(), self.top_ids[:, start:stop].tolist()
        finished = set()
        for j in self.live:
            row = self.active[j]
            params, new = self.params[row], chunk[j]
            end = min(len(new), params.max_new_tokens - len(self.tokens[row]))
            if self.eos in new[:end]:
                end = new.index(self.eos)
                self.stopped[row] = True
            self.tokens[row] += new[:end]
            self.logps[row] += chunk_logp[j][:end]
            if params.top_logprobs:
                k, decode = params.top_logprobs, self.tokenizer.decode
                self.tops[row] += [
                    {decode([i]): v for i, v in zip(top_ids[j][t][:k], top_values[j][t][:k])} for t in range(end)
                ]
            if params.stop and not self.stopped[row]:
                self.stopped[row] = _cut_at_stop(self.tokenizer.decode(self.tokens[row]), params.stop)[1]
            done = self.stopped[row] or len(self.tokens[row]) >= params.max_new_tokens
            if done:
                finished.add(j)
            if self.on_tokens is not None and (new[:end] or done):
                self.on_tokens(row, new[:end], done)
        return finished

    def drop(self, finished: set[int], cache):
        """Finished rows stop being read; in chunks they leave the batch with their KV cache rows, and stop
        costing compute. Static decoding keeps every shape (and so its captured graphs)."""
        self.live = [j for j in self.live if j not in finished]
        # Compacting copies the whole cache: wait until an eighth of the batch is done (a done row still costs
        # its share of each step until then).
        if self.static or len(self.active) - len(self.live) < max(1, len(self.active) // 8):
            return cache
        keep = self.live
        index = torch.tensor(keep, device=self.mask.device)
        cache.batch_select_indices(index)
        for name in ("mask", "uniform", "temperature", "top_p", "sampled", "sampled_logp", "next_position"):
            setattr(self, name, getattr(self, name)[index])
        if self.want_top:
            self.top_values, self.top_ids = self.top_values[index], self.top_ids[index]
        self.active = [self.active[j] for j in keep]
        self.live = list(range(len(self.active)))
        return cache

    def completions(self) -> list[Completion]:
        completions = []
        for row, params in enumerate(self.params):
            tokens, logps, tops = self.tokens[row], self.logps[row], self.tops[row]
            text, hit = _cut_at_stop(self.tokenizer.decode(tokens, skip_special_tokens=True), params.stop)
            if hit:  # keep token-level fields consistent with the cut text
                kept = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
                tokens, logps, tops = tokens[:kept], logps[:kept], tops[:kept]
            completions.append(
                Completion(
                    text=text,
                    token_ids=tokens,
                    logprobs=logps,
                    finish_reason="stop" if self.stopped[row] or hit else "length",
                    top_logprobs=tops,
                    prompt_tokens=self.prompt_tokens[row],
                )
            )
        return completions
