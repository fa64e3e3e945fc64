"""The HTTP server: any run directory behind an OpenAI-compatible API, the preference chosen per request.

`moalign serve RUN_DIR` answers `POST /v1/completions` and `POST /v1/chat/completions` (the `openai`
client works unchanged; the preference travels in the extra field `preference`), `GET /v1/models` and
`GET /health`. Generation goes through `Policy.complete`, the same path as `moalign generate`.

Concurrent requests are gathered for a few milliseconds and generated as one batch by a single worker
thread (the event loop stays free). Generation samples each row from its own seeded generator, so a
request's output does not depend on what else is in its batch: the same seed gives the same text.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import hmac
import json
import logging
import os
import secrets
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from moalign.errors import MoalignError
from moalign.generation import Completion, SamplingParams
from moalign.pareto import parse_weights

log = logging.getLogger("moalign.serve")

HH_HUMAN, HH_ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
MAX_ROWS_PER_REQUEST = 64  # prompts × n of one request
MAX_SEED = 2**62


@dataclass
class ServeConfig:
    """What `moalign serve` is told on its command line."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_tokens_cap: int = 512
    max_prompt_tokens: int = 1024
    batch_wait_ms: float = 5.0
    max_batch: int = 64
    batching: bool = True
    max_body_bytes: int = 1_000_000
    model_id: str | None = None  # default: the run directory's name


# ----------------------------------------------------------------------------- errors


class ApiError(Exception):
    """A request the server refuses; becomes an OpenAI-style `{"error": {...}}` answer."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class ClientGone(Exception):
    """The client disconnected while its request waited; nobody is left to answer."""


# ----------------------------------------------------------------------------- request schemas


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]] | None = None


class _Request(BaseModel):
    """Fields both endpoints share; unknown OpenAI fields are ignored, unsupported behaviours refused."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    preference: list[float] | dict[str, float] | str | None = None


class CompletionRequest(_Request):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


# ----------------------------------------------------------------------------- chat prompts


def message_text(message: ChatMessage | dict[str, Any]) -> str:
    """A message's text: a string, or the text parts of a content list (other parts are refused)."""
    content = message.content if isinstance(message, ChatMessage) else message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"message content part of type {part.get('type')!r} is not supported; send text")
        texts.append(part["text"])
    return "".join(texts)


def render_chat(messages: Sequence[ChatMessage | dict[str, Any]], tokenizer: Any = None) -> str:
    """Chat messages as one prompt: the tokenizer's chat template if it has one, else the HH format.

    The HH format ("\\n\\nHuman: …\\n\\nAssistant:") is what the Anthropic HH data the methods train on
    looks like; a system message becomes a preamble before the first turn.
    """
    plain = [
        {"role": m.role if isinstance(m, ChatMessage) else m["role"], "content": message_text(m)} for m in messages
    ]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
        except Exception as error:  # templates raise their own errors, e.g. on roles out of order
            raise ApiError(400, f"the model's chat template refused these messages: {error}", "messages") from None
    parts = []
    for message in plain:
        role, text = message["role"], message["content"].strip()
        if role in {"system", "developer"}:
            parts.append(text)
        else:
            parts.append(f"{HH_HUMAN if role == 'user' else HH_ASSISTANT} {text}")
    return "".join(parts) + HH_ASSISTANT


# ----------------------------------------------------------------------------- the policy's tokenizer


def policy_tokenizer(policy: Any) -> Any:
    """A private copy of the run's tokenizer for counting, templates and token strings.

    A copy, because the worker thread tokenizes with the policy's own one and a fast tokenizer used
    from two threads at once can fail ("Already borrowed").
    """
    tokenizer = getattr(policy, "tokenizer", None)
    if tokenizer is not None:
        return copy.deepcopy(tokenizer)
    from transformers import AutoTokenizer

    manifest = getattr(policy, "manifest", {}) or {}
    run_dir = Path(getattr(policy, "run_dir", "."))
    candidates = [Path(p) for p in getattr(policy, "paths", [])]
    candidates += [run_dir / str(manifest[key]) for key in ("model", "base_model") if manifest.get(key)]
    for path in candidates:
        adapter_config = path / "adapter_config.json"
        for source in (path, None):
            try:
                if source is None:
                    if not adapter_config.exists():
                        break
                    source = json.loads(adapter_config.read_text())["base_model_name_or_path"]
                return AutoTokenizer.from_pretrained(str(source))
            except (OSError, ValueError, KeyError):
                continue
    log.warning("no tokenizer found for %s: prompt lengths are counted in bytes", run_dir)
    return None


def context_length(policy: Any) -> int | None:
    """The model's context window, to refuse prompt + max_tokens that would not fit."""
    model = getattr(policy, "model", None)
    config = getattr(model, "config", None)
    if config is None and getattr(policy, "paths", None):
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(policy.paths[0]))
        except (OSError, ValueError):
            config = None
    value = getattr(config, "max_position_embeddings", None) if config is not None else None
    return int(value) if isinstance(value, int) and value > 0 else None


# ----------------------------------------------------------------------------- batching


@dataclass
class Job:
    """One request's rows, waiting for the worker."""

    prompts: list[str]
    weights: list[np.ndarray]
    params: list[SamplingParams]
    future: asyncio.Future
    arrived: float


@dataclass
class BatchStats:
    requests: int = 0
    batches: int = 0
    rows: int = 0
    dropped: int = 0  # requests whose client left before generation
    batch_sizes: list[int] = field(default_factory=list)  # rows of the most recent batches

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "rows": self.rows,
            "dropped": self.dropped,
            "largest_batch": max(self.batch_sizes, default=0),
        }


class Batcher:
    """Gathers requests for `wait_s` (or until `max_batch` rows) and runs them as one `policy.complete`.

    One worker thread runs the batches, so the event loop keeps accepting requests while the model
    works, and the policy (whose model cache is not thread-safe) is only ever used by one thread.
    """

    def __init__(self, policy: Any, max_batch: int = 64, wait_s: float = 0.005):
        self.policy, self.max_batch, self.wait_s = policy, max(1, max_batch), max(0.0, wait_s)
        self.pending: deque[Job] = deque()
        self.stats = BatchStats()
        self.wakeup = asyncio.Event()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moalign-generate")
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for job in self.pending:
            job.future.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    def submit(self, prompts: list[str], weights: list[np.ndarray], params: list[SamplingParams]) -> Job:
        loop = asyncio.get_running_loop()
        job = Job(prompts, weights, params, loop.create_future(), loop.time())
        self.pending.append(job)
        self.stats.requests += 1
        self.wakeup.set()
        return job

    def cancel(self, job: Job) -> None:
        """Drop a job whose client has gone; if it is already generating, its result is discarded."""
        if job in self.pending:
            self.pending.remove(job)
            self.stats.dropped += 1
        job.future.cancel()

    def pending_rows(self) -> int:
        return sum(len(job.prompts) for job in self.pending)

    def take(self) -> list[Job]:
        batch: list[Job] = []
        rows = 0
        while self.pending:
            job = self.pending[0]
            if job.future.done():  # cancelled while waiting
                self.pending.popleft()
                continue
            if batch and rows + len(job.prompts) > self.max_batch:
                break
            batch.append(self.pending.popleft())
            rows += len(job.prompts)
        return batch

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
            deadline = self.pending[0].arrived + self.wait_s
            while self.pending_rows() < self.max_batch and (delay := deadline - loop.time()) > 0:
                self.wakeup.clear()
                try:
                    await asyncio.wait_for(self.wakeup.wait(), delay)
                except asyncio.TimeoutError:
                    break
            batch = self.take()
            if batch:
                await self.execute(batch)

    async def execute(self, batch: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        prompts = [p for job in batch for p in job.prompts]
        weights = [w for job in batch for w in job.weights]
        params = [p for job in batch for p in job.params]
        self.stats.batches += 1
        self.stats.rows += len(prompts)
        self.stats.batch_sizes = [*self.stats.batch_sizes[-99:], len(prompts)]
        try:
            outputs = await loop.run_in_executor(self.executor, self.policy.complete, prompts, weights, params)
        except Exception as error:
            if len(batch) > 1:  # one bad request must not fail the others: run each alone
                for job in batch:
                    await self.execute([job])
                return
            if not batch[0].future.done():
                batch[0].future.set_exception(error)
            return
        start = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result(outputs[start : start + len(job.prompts)])
            start += len(job.prompts)


# ----------------------------------------------------------------------------- streaming text


def token_pieces(tokenizer: Any, token_ids: Sequence[int], text: str) -> list[str]:
    """Split `text` into one piece per token for streaming; the pieces always join to `text`.

    Each token's new text is decoded with the previous token as context (so SentencePiece's leading
    spaces and multi-byte characters come out right); a token that ends inside a character yields "".
    """
    if tokenizer is None or not token_ids:
        return [text] if token_ids else []
    pieces: list[str] = []
    prefix = read = pos = 0
    for i in range(len(token_ids)):
        before = tokenizer.decode(token_ids[prefix:read], skip_special_tokens=True)
        now = tokenizer.decode(token_ids[prefix : i + 1], skip_special_tokens=True)
        new = now[len(before) :] if now.startswith(before) else ""
        if not new or new.endswith("\ufffd"):
            pieces.append("")
            continue
        if not text.startswith(new, pos):  # the text was cut at a stop string: give the rest and end
            pieces.append(text[pos:])
            pos = len(text)
            pieces += [""] * (len(token_ids) - i - 1)
            break
        pieces.append(new)
        pos += len(new)
        prefix, read = read, i + 1
    if pos < len(text):
        pieces[-1] += text[pos:]
    return pieces


# ----------------------------------------------------------------------------- the app


class Server:
    """Request handling shared by both endpoints: validation, preference, batching, answers."""

    def __init__(self, policy: Any, config: ServeConfig):
        self.policy, self.config = policy, config
        self.model_id = config.model_id or Path(getattr(policy, "run_dir", "run")).resolve().name
        self.tokenizer = policy_tokenizer(policy)
        self.context = context_length(policy)
        self.batcher: Batcher | None = None
        self.created = int(time.time())

    # --- validation

    def check_model(self, model: str | None) -> None:
        if model not in (None, "", self.model_id):
            raise ApiError(404, f"model {model!r} is not served here; this server serves {self.model_id!r}", "model")

    def preference(self, value: list[float] | dict[str, float] | str | None) -> np.ndarray:
        """The request's preference as a validated weight vector (missing: the run's default)."""
        names = list(getattr(self.policy, "objectives", []))
        try:
            if value is None:
                return np.asarray(self.policy.default_weights(), dtype=float)
            if isinstance(value, str):
                value = parse_weights(value, len(names)).tolist()
            if isinstance(value, dict):
                if not names:
                    raise ApiError(400, "this run names no objectives; give the preference as a list", "preference")
                unknown = sorted(set(value) - set(names))
                if unknown:
                    raise ApiError(
                        400,
                        f"unknown objective(s) {', '.join(map(repr, unknown))} in preference; "
                        f"this run's objectives are {', '.join(names)}",
                        "preference",
                    )
                value = [float(value.get(name, 0.0)) for name in names]
            return np.asarray(self.policy.check_weights(value), dtype=float)
        except MoalignError as error:
            objectives = f" (objectives: {', '.join(names)})" if names else ""
            raise ApiError(400, f"preference: {error}{objectives}", "preference") from None

    def refuse_unsupported(self, request: _Request) -> None:
        unsupported = {
            "presence_penalty": bool(request.presence_penalty),
            "frequency_penalty": bool(request.frequency_penalty),
            "logit_bias": bool(request.logit_bias),
        }
        if isinstance(request, CompletionRequest):
            unsupported |= {
                "echo": request.echo,
                "suffix": bool(request.suffix),
                "best_of": request.best_of not in (None, 1, request.n),
            }
        if isinstance(request, ChatRequest):
            unsupported |= {
                "tools": bool(request.tools),
                "response_format": bool(request.response_format)
                and request.response_format.get("type") not in (None, "text"),
            }
        for name, used in unsupported.items():
            if used:
                raise ApiError(400, f"{name} is not supported by this server; leave it out", name)

    def max_tokens(self, value: int | None, name: str = "max_tokens") -> int:
        cap = self.config.max_tokens_cap
        if value is None:
            return min(int(getattr(getattr(self.policy, "sampling", None), "max_new_tokens", 16)), cap)
        if value < 1:
            raise ApiError(400, f"{name} must be at least 1, got {value}", name)
        if value > cap:
            raise ApiError(400, f"{name} is {value}, above this server's cap of {cap} (--max-tokens-cap)", name)
        return value

    def stops(self, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", "stop")
        return stops

    def count_tokens(self, prompt: str) -> int:
        if self.tokenizer is None:
            return len(prompt.encode())
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def check_prompt(self, prompt: str, max_tokens: int, param: str, weights: np.ndarray) -> None:
        """The user's prompt against --max-prompt-tokens; the prompt as the model sees it against its context."""
        if not prompt:
            raise ApiError(400, f"{param} is empty; give some text to continue", param)
        if len(prompt) > 8 * self.config.max_prompt_tokens + 64:  # far too long to be worth tokenizing
            raise ApiError(400, f"{param} is too long ({len(prompt)} characters)", param)
        tokens = self.count_tokens(prompt)
        if tokens > self.config.max_prompt_tokens:
            raise ApiError(
                400,
                f"{param} has {tokens} tokens, above this server's limit of "
                f"{self.config.max_prompt_tokens} (--max-prompt-tokens)",
                param,
            )
        if self.context is None:
            return
        prepare = getattr(self.policy, "prepare_prompt", None)  # RiC writes the preference into the prompt
        if prepare is not None:
            tokens = self.count_tokens(prepare(prompt, weights))
        if tokens + max_tokens > self.context:
            raise ApiError(
                400,
                f"{param} ({tokens} tokens as the model sees it) plus max_tokens ({max_tokens}) exceeds the model's context "
                f"of {self.context} tokens",
                param,
            )

    # --- generation

    async def generate(
        self, request: Request, prompts: list[str], weights: np.ndarray, params: list[SamplingParams]
    ) -> list[Completion]:
        """Queue the rows for the batch worker; a client that leaves while waiting is dropped."""
        assert self.batcher is not None, "the server was not started"
        job = self.batcher.submit(prompts, [weights] * len(prompts), params)
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            await asyncio.wait({job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self.batcher.cancel(job)
            raise
        finally:
            watcher.cancel()
        if not job.future.done():
            self.batcher.cancel(job)
            raise ClientGone()
        try:
            return job.future.result()
        except MoalignError as error:
            raise ApiError(400, str(error)) from None
        except Exception as error:
            log.exception("generation failed")
            raise ApiError(500, f"generation failed: {type(error).__name__}: {error}", kind="server_error") from None

    def rows(self, prompts: list[str], n: int, base: SamplingParams, seed: int | None) -> tuple[list, list, int]:
        """Every prompt n times; choice i samples with seed + i (a request without seed gets a random one)."""
        if len(prompts) * n > MAX_ROWS_PER_REQUEST:
            raise ApiError(400, f"prompts × n is {len(prompts) * n}; at most {MAX_ROWS_PER_REQUEST} per request", "n")
        seed = secrets.randbelow(2**31) if seed is None else seed  # small: JSON readers lose bits above 2**53
        row_prompts, row_params = [], []
        for index in range(len(prompts) * n):
            row_prompts.append(prompts[index // n])
            row_params.append(SamplingParams(**{**vars(base), "stop": list(base.stop), "seed": seed + index}))
        return row_prompts, row_params, seed

    def extension(self, weights: np.ndarray, seed: int) -> dict[str, Any]:
        """The `moalign` field of every answer: which trained model served which preference."""
        return {
            "served_by": self.policy.served_by(weights),
            "preference": [float(x) for x in weights],
            "objectives": list(getattr(self.policy, "objectives", [])),
            "seed": seed,
        }

    def token_string(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    @staticmethod
    def usage(outputs: list[Completion], n: int) -> dict[str, int]:
        prompt_tokens = sum(c.prompt_tokens for c in outputs[::n])
        completion_tokens = sum(len(c.token_ids) for c in outputs)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    # --- /v1/completions

    def completion_logprobs(self, c: Completion, start: int = 0, stop: int | None = None) -> dict[str, Any]:
        tokens = [self.token_string(t) for t in c.token_ids[start:stop]]
        offsets, at = [], 0
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": c.logprobs[start:stop],
            "top_logprobs": c.top_logprobs[start:stop] if c.top_logprobs else None,
            "text_offset": offsets,
        }

    async def completions(self, request: Request, body: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        self.check_model(body.model)
        self.refuse_unsupported(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise ApiError(400, "prompt is an empty list", "prompt")
        max_tokens = self.max_tokens(body.max_tokens)
        weights = self.preference(body.preference)
        for i, prompt in enumerate(prompts):
            self.check_prompt(prompt, max_tokens, "prompt" if len(prompts) == 1 else f"prompt[{i}]", weights)
        base = SamplingParams(max_tokens, body.temperature, body.top_p, self.stops(body.stop), 0, body.logprobs or 0)
        row_prompts, row_params, seed = self.rows(prompts, body.n, base, body.seed)
        outputs = await self.generate(request, row_prompts, weights, row_params)
        head = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
            "moalign": self.extension(weights, seed),
        }
        want_logprobs = body.logprobs is not None
        if not body.stream:
            choices = [
                {
                    "index": i,
                    "text": c.text,
                    "logprobs": self.completion_logprobs(c) if want_logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(outputs)
            ]
            return {**head, "choices": choices, "usage": self.usage(outputs, body.n)}

        def chunks() -> list[dict[str, Any]]:
            events = []
            for i, c in enumerate(outputs):
                pieces = token_pieces(self.tokenizer, c.token_ids, c.text)
                for t, piece in enumerate(pieces):
                    logprobs = self.completion_logprobs(c, t, t + 1) if want_logprobs else None
                    events.append(
                        {**head, "choices": [{"index": i, "text": piece, "logprobs": logprobs, "finish_reason": None}]}
                    )
                events.append(
                    {**head, "choices": [{"index": i, "text": "", "logprobs": None, "finish_reason": c.finish_reason}]}
                )
            if (body.stream_options or {}).get("include_usage"):
                events.append({**head, "choices": [], "usage": self.usage(outputs, body.n)})
            return events

        return sse(chunks())

    # --- /v1/chat/completions

    def chat_logprobs(self, c: Completion, start: int = 0, stop: int | None = None) -> dict[str, Any]:
        def entry(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        content = []
        for t in range(start, len(c.token_ids) if stop is None else stop):
            item = entry(self.token_string(c.token_ids[t]), c.logprobs[t])
            tops = c.top_logprobs[t] if t < len(c.top_logprobs) else {}
            item["top_logprobs"] = [entry(token, value) for token, value in tops.items()]
            content.append(item)
        return {"content": content, "refusal": None}

    async def chat(self, request: Request, body: ChatRequest) -> dict[str, Any] | StreamingResponse:
        self.check_model(body.model)
        self.refuse_unsupported(body)
        if body.top_logprobs and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if body.max_tokens is not None and body.max_completion_tokens is not None:
            raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
        limit_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_tokens = self.max_tokens(body.max_completion_tokens or body.max_tokens, limit_name)
        templated = self.tokenizer is not None and bool(getattr(self.tokenizer, "chat_template", None))
        prompt = render_chat(body.messages, self.tokenizer)
        weights = self.preference(body.preference)
        self.check_prompt(prompt, max_tokens, "messages", weights)
        stops = self.stops(body.stop)
        if not templated:  # an HH-format model would go on to write the user's next turn
            stops.append(HH_HUMAN)
        base = SamplingParams(max_tokens, body.temperature, body.top_p, stops, 0, body.top_logprobs or 0)
        row_prompts, row_params, seed = self.rows([prompt], body.n, base, body.seed)
        outputs = await self.generate(request, row_prompts, weights, row_params)
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": self.model_id,
            "system_fingerprint": None,
            "moalign": self.extension(weights, seed),
        }
        if not body.stream:
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": c.text, "refusal": None},
                    "logprobs": self.chat_logprobs(c) if body.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for i, c in enumerate(outputs)
            ]
            return {**head, "object": "chat.completion", "choices": choices, "usage": self.usage(outputs, body.n)}

        head["object"] = "chat.completion.chunk"

        def chunks() -> list[dict[str, Any]]:
            events = []
            for i, c in enumerate(outputs):
                events.append(
                    {
                        **head,
                        "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
                    }
                )
                for t, piece in enumerate(token_pieces(self.tokenizer, c.token_ids, c.text)):
                    choice = {"index": i, "delta": {"content": piece}, "finish_reason": None}
                    if body.logprobs:
                        choice["logprobs"] = self.chat_logprobs(c, t, t + 1)
                    events.append({**head, "choices": [choice]})
                events.append({**head, "choices": [{"index": i, "delta": {}, "finish_reason": c.finish_reason}]})
            if (body.stream_options or {}).get("include_usage"):
                events.append({**head, "choices": [], "usage": self.usage(outputs, body.n)})
            return events

        return sse(chunks())

    # --- /v1/models

    def models(self) -> dict[str, Any]:
        manifest = getattr(self.policy, "manifest", {}) or {}
        info: dict[str, Any] = {
            "method": manifest.get("method"),
            "objectives": list(getattr(self.policy, "objectives", [])),
            "default_preference": [float(x) for x in self.policy.default_weights()],
        }
        if manifest.get("models"):
            info["trained_preferences"] = [entry.get("preference") for entry in manifest["models"]]
        card = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "moalign"}
        return {"object": "list", "data": [{**card, "moalign": info}]}


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes its connection (the request body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def sse(events: list[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events in OpenAI's format; Starlette stops sending when the client disconnects."""

    async def stream() -> AsyncIterator[str]:
        for event in events:
            yield f"data: {json.dumps(event)}\n\n"
            await asyncio.sleep(0)  # a cancellation point between chunks
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class GuardMiddleware:
    """API-key check and body-size limit, before any JSON is parsed.

    The key is checked first so an unauthenticated client cannot make the server buffer a body; the
    body is read here in full (at most `max_bytes`, by Content-Length and by what actually arrives)
    and handed on to the app.
    """

    def __init__(self, app: Any, api_key: str | None, max_bytes: int):
        self.app, self.api_key, self.max_bytes = app, api_key, max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key and scope["path"].startswith("/v1"):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                message = "missing API key" if not token else "wrong API key"
                return await respond(send, 401, f"{message}: send 'Authorization: Bearer KEY'", "authentication_error")
        if scope["method"] not in {"POST", "PUT", "PATCH"}:
            return await self.app(scope, receive, send)
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await respond(send, 413, f"request body is larger than {self.max_bytes} bytes")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await respond(send, 413, f"request body is larger than {self.max_bytes} bytes")
            if not message.get("more_body"):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


async def respond(send: Any, status: int, message: str, kind: str = "invalid_request_error") -> None:
    payload = json.dumps(error_body(message, kind)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


def validation_message(errors: Sequence[dict[str, Any]]) -> str:
    """Pydantic's errors as one line that names each field to fix."""
    parts = []
    for error in errors:
        if error.get("type") == "json_invalid":
            return f"the request body is not valid JSON ({error.get('ctx', {}).get('error', 'parse error')})"
        where = ".".join(str(x) for x in error.get("loc", ()) if x != "body") or "body"
        parts.append(f"{where}: {error.get('msg')}")
    return "; ".join(parts[:5])


def create_app(policy: Any, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app for one policy; `app.state.server` exposes the batcher's stats to tests."""
    config = config or ServeConfig()
    server = Server(policy, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        max_batch, wait_s = (config.max_batch, config.batch_wait_ms / 1000) if config.batching else (1, 0.0)
        server.batcher = Batcher(policy, max_batch=max_batch, wait_s=wait_s)
        server.batcher.start()
        yield
        await server.batcher.stop()

    app = FastAPI(title="moalign", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error_body(error.message, error.kind, error.param), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(validation_message(error.errors())), status_code=400)

    @app.exception_handler(ClientGone)
    async def gone(request: Request, error: ClientGone) -> Response:
        return Response(status_code=499)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        stats = server.batcher.stats.as_dict() if server.batcher else {}
        pending = len(server.batcher.pending) if server.batcher else 0
        return {"status": "ok", "model": server.model_id, "pending": pending, **stats}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return server.models()

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        server.check_model(model_id)
        return server.models()["data"][0]

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await server.completions(request, body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        return await server.chat(request, body)

    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_bytes=config.max_body_bytes)
    return app


def cli(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="moalign serve", description="Serve a run over an OpenAI-compatible HTTP API, the preference per request."
    )
    parser.add_argument("run_dir", help="a run directory (one with moalign.json)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (or $MOALIGN_API_KEY)")
    parser.add_argument("--max-tokens-cap", type=int, default=512, help="largest max_tokens a request may ask")
    parser.add_argument("--max-prompt-tokens", type=int, default=1024, help="longest prompt accepted, in tokens")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long to gather concurrent requests")
    parser.add_argument("--max-batch", type=int, default=64, help="most rows generated together")
    parser.add_argument("--no-batching", action="store_true", help="generate every request alone")
    parser.add_argument("--model-name", default=None, help="model id clients send (default: run directory name)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    if args.max_tokens_cap < 1 or args.max_prompt_tokens < 1 or args.max_batch < 1 or args.batch_wait_ms < 0:
        raise MoalignError("--max-tokens-cap, --max-prompt-tokens and --max-batch must be ≥ 1, --batch-wait-ms ≥ 0")
    import uvicorn

    from moalign.policy import load_policy

    config = ServeConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get("MOALIGN_API_KEY") or None,
        max_tokens_cap=args.max_tokens_cap,
        max_prompt_tokens=args.max_prompt_tokens,
        batch_wait_ms=args.batch_wait_ms,
        max_batch=args.max_batch,
        batching=not args.no_batching,
        model_id=args.model_name,
    )
    if config.host not in {"127.0.0.1", "localhost", "::1"} and not config.api_key:
        log.warning("serving on %s without an API key: anyone who can reach it can use it", config.host)
    policy = load_policy(args.run_dir)
    app = create_app(policy, config)
    log.info("serving %s as model %r on http://%s:%d/v1", args.run_dir, app.state.server.model_id, args.host, args.port)
    uvicorn.run(app, host=config.host, port=config.port, log_level=args.log_level)
