"""Judges: the log-probabilities of "A" and "B" as the first answer token, from an OpenAI-compatible
endpoint or a local causal LM."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

from scipy.special import logsumexp

from moalign.errors import MoalignError, first_line

log = logging.getLogger("moalign")


@dataclass
class Answer:
    """The judge's log-probabilities of the letters "A" and "B" as its first answer token."""

    logp_A: float
    logp_B: float
    found: list[str] = field(default_factory=list)  # letters that were in the returned top logprobs
    top: dict[str, float] = field(default_factory=dict)  # kept in the log for auditing


def letters_from_top(top: dict[str, float], floor: float | None = None) -> Answer:
    """The log-probabilities of "A" and "B" from one position's top logprobs.

    Tokens that read as the letter (" A", "A", "(A") are summed in probability. A letter missing from the
    top-k list gets `floor`, by default the smallest listed logprob (its true value is at most that).
    """
    if not top:
        raise MoalignError("the judge returned no top logprobs; it must support logprobs (top_logprobs ≥ 2)")
    found: dict[str, list[float]] = {"A": [], "B": []}
    for token, logp in top.items():
        letter = token.strip().strip("()[]*.:").strip()
        if letter in found:
            found[letter].append(float(logp))
    missing = min(top.values()) if floor is None else floor
    values = {letter: float(logsumexp(found[letter])) if found[letter] else missing for letter in found}
    return Answer(values["A"], values["B"], [letter for letter in "AB" if found[letter]], dict(top))


class Judge:
    """Answers judge prompts with the log-probabilities of "A" and "B"; `spec` says which judge."""

    spec: str = ""

    def ask(self, prompts: list[str], on_answer: Callable[[int, Answer], None]) -> None:
        """Answer every prompt, calling `on_answer(index, answer)` as each answer arrives."""
        raise NotImplementedError


class OpenAIJudge(Judge):
    """Any OpenAI-compatible endpoint (OpenAI, vLLM, `moalign serve`) through the `openai` client.

    The key is read from the environment variable `api_key_env` and kept only in the client. The client
    retries rate limits, 5xx answers, timeouts and dropped connections `max_retries` times with exponential
    back-off, waiting as long as the server's Retry-After says; `concurrency` bounds the requests in flight.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        api: str = "chat",
        top_logprobs: int | None = None,
        max_retries: int = 6,
        timeout: float = 60.0,
        concurrency: int = 4,
        floor: float | None = None,
    ):
        import openai

        if api not in ("chat", "completions"):
            raise MoalignError(f"judge api must be 'chat' or 'completions', got {api!r}")
        if max_retries < 0:
            raise MoalignError(f"max_retries must be ≥ 0, got {max_retries}")
        key = os.environ.get(api_key_env)
        if not key:
            if base_url is None:
                raise MoalignError(f"set ${api_key_env} to the judge's API key (or name another with --api_key_env)")
            key = "EMPTY"  # local OpenAI-compatible servers need no key
        self.model, self.api, self.floor = model, api, floor
        # OpenAI allows 20 top logprobs in chat and 5 in legacy completions.
        self.top_logprobs = int(top_logprobs or (20 if api == "chat" else 5))
        # The model names the judge; the URL may change between runs (a server restarted on another port).
        self.spec, self.base_url = f"openai:{model}", base_url
        self.max_retries = int(max_retries)
        self.client = openai.OpenAI(api_key=key, base_url=base_url, max_retries=self.max_retries, timeout=timeout)
        self.concurrency = max(1, int(concurrency))

    def _request(self, prompt: str) -> dict[str, float]:
        """One request (the client's retries included): the top logprobs of the first answer token."""
        if self.api == "chat":
            response = self.client.chat.completions.create(
                model=self.model,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=1,
                temperature=0,
                logprobs=True,
                top_logprobs=self.top_logprobs,
            )
            content = response.choices[0].logprobs.content if response.choices[0].logprobs else None
            return {entry.token: entry.logprob for entry in content[0].top_logprobs} if content else {}
        response = self.client.completions.create(
            model=self.model, prompt=prompt, max_tokens=1, temperature=0, logprobs=self.top_logprobs
        )
        logprobs = response.choices[0].logprobs
        return dict(logprobs.top_logprobs[0]) if logprobs and logprobs.top_logprobs else {}

    def answer(self, prompt: str) -> Answer:
        """Ask one prompt; an error the client's retries did not cure ends the run in one line."""
        import openai

        try:
            return letters_from_top(self._request(prompt), self.floor)
        except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as error:
            # the kinds the client retries
            raise MoalignError(
                f"judge {self.spec}: {type(error).__name__} after {self.max_retries + 1} tries ({first_line(error)})"
            ) from None
        except openai.APIStatusError as error:
            raise MoalignError(f"judge {self.spec}: HTTP {error.status_code} ({first_line(error)})") from None

    def ask(self, prompts: list[str], on_answer: Callable[[int, Answer], None]) -> None:
        if self.concurrency == 1:
            for index, prompt in enumerate(prompts):
                on_answer(index, self.answer(prompt))
            return
        executor = ThreadPoolExecutor(self.concurrency)
        futures = {executor.submit(self.answer, prompt): index for index, prompt in enumerate(prompts)}
        reported: set[int] = set()
        try:
            for future in as_completed(futures):
                on_answer(futures[future], future.result())
                reported.add(futures[future])
        finally:
            executor.shutdown(wait=True, cancel_futures=True)
            # On a failure or Ctrl-C, answers that arrived meanwhile are still recorded (paid for, not lost).
            for future, index in futures.items():
                if index not in reported and future.done() and not future.cancelled() and not future.exception():
                    on_answer(index, future.result())


class HFJudge(Judge):
    """A local causal LM: one forward pass per prompt, the next-token logprobs of "A"/" A" and "B"/" B"."""

    def __init__(self, path: str, device: str = "auto", batch_size: int = 8, top: int = 5):
        import torch

        from moalign.generation import load_model

        self.torch = torch
        self.model, self.tokenizer = load_model(path, device=device)  # float32 on CPU, bfloat16 on a GPU
        self.tokenizer.truncation_side = "left"  # a long conversation loses its start, never the question
        self.max_length = getattr(self.model.config, "max_position_embeddings", None) or getattr(
            self.model.config, "n_positions", 2048
        )
        self.spec, self.batch_size, self.top = f"hf:{path}", max(1, int(batch_size)), int(top)
        self.letter_ids: dict[str, list[int]] = {}
        for letter in "AB":
            ids = {
                encoded[0]
                for variant in (letter, " " + letter)
                if len(encoded := self.tokenizer.encode(variant, add_special_tokens=False)) == 1
            }
            if not ids:
                raise MoalignError(f"judge {self.spec}: its tokenizer has no single token for {letter!r}")
            self.letter_ids[letter] = sorted(ids)

    def ask(self, prompts: list[str], on_answer: Callable[[int, Answer], None]) -> None:
        torch = self.torch
        device = next(self.model.parameters()).device
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            encoded = self.tokenizer(
                batch,
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=False,
            ).to(device)
            positions = (encoded["attention_mask"].cumsum(-1) - 1).clamp(min=0)  # left padding
            with torch.inference_mode():
                logits = self.model(**encoded, position_ids=positions).logits[:, -1].float()
            logps = torch.log_softmax(logits, dim=-1)
            top_values, top_ids = logps.topk(min(self.top, logps.size(-1)), dim=-1)
            for row in range(len(batch)):
                letters = {
                    letter: float(torch.logsumexp(logps[row, ids], dim=0)) for letter, ids in self.letter_ids.items()
                }
                top = {self.tokenizer.decode([int(i)]): float(v) for i, v in zip(top_ids[row], top_values[row])}
                on_answer(start + row, Answer(letters["A"], letters["B"], ["A", "B"], top))


def build_judge(spec: str, **options: Any) -> Judge:
    """`openai:MODEL` (with base_url, api_key_env, api, ... options) or `hf:PATH` (device, batch_size)."""
    kind, _, target = spec.partition(":")
    if not target:
        raise MoalignError(f"judge {spec!r}: give openai:MODEL or hf:PATH")
    if kind == "openai":
        return OpenAIJudge(target, **options)
    if kind == "hf":
        return HFJudge(target, **{k: v for k, v in options.items() if k in ("device", "batch_size")})
    raise MoalignError(f"unknown judge kind {kind!r} in {spec!r}; use openai:MODEL or hf:PATH")
