"""The FastAPI app: validation, the preference, and one path from request to answer for both endpoints.

A request is validated into a `Plan` (the rows to generate, each with its prompt, sampling settings and
seed, under one preference); an engine generates it (`NativeEngine`: the run's models in this process;
`UpstreamEngine`: an OpenAI-compatible server), and `Formatter` writes the answer in the endpoint's shape.
"""

from __future__ import annotations

import copy
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moalign.data import HUMAN as HH_HUMAN
from moalign.errors import MoalignError
from moalign.generation import SamplingParams
from moalign.pareto import parse_weights
from moalign.serve.batcher import ClientGone
from moalign.serve.native import NativeEngine
from moalign.serve.openai_format import Formatter, Kind, Piece, sse
from moalign.serve.router import IN_FLIGHT, UpstreamEngine
from moalign.serve.schemas import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    RequestBase,
    error_body,
    render_chat,
    validation_message,
)
from moalign.serve.transport import GuardMiddleware

log = logging.getLogger("moalign.serve")

MAX_ROWS_PER_REQUEST = 64  # prompts × n of one request


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
    header_timeout_s: float = 10.0  # a client must send its request line and headers within this
    body_timeout_s: float = 30.0  # … and its whole body within this
    upstream: str | None = None  # an OpenAI-compatible base URL: generation goes there
    upstream_api_key: str | None = None
    upstream_timeout_s: float = 120.0
    upstream_concurrency: int = IN_FLIGHT  # requests in flight to the upstream


@dataclass
class Plan:
    """One validated request: rows (prompt × n) to generate under one preference."""

    kind: Kind
    prompts: list[str]  # per row, before the run's template (chat: rendered messages)
    params: list[SamplingParams]  # per row; row i of a prompt samples with seed + i
    weights: np.ndarray
    seed: int
    n: int
    logprobs: int | None  # None: not asked for
    stream: bool
    include_usage: bool


class Server:
    """Request handling shared by both endpoints and both engines."""

    def __init__(self, policy: Any, config: ServeConfig):
        self.policy, self.config = policy, config
        self.model_id = config.model_id or Path(getattr(policy, "run_dir", "run")).resolve().name
        self.tokenizer = policy.load_tokenizer()
        if self.tokenizer is None and getattr(policy, "tokenizer", None) is not None:
            # A policy without model folders of its own (a soup) still has the tokenizer it generates with:
            # a copy, since the worker thread uses the original and a fast tokenizer is not thread-safe.
            self.tokenizer = copy.deepcopy(policy.tokenizer)
        if self.tokenizer is None:
            log.warning("no tokenizer found for %s: prompt lengths are counted in bytes", policy.run_dir)
        self.context = policy.context_length()
        self.routed = config.upstream is not None
        if self.routed:
            self.engine: Any = UpstreamEngine(
                policy,
                config.upstream,
                config.upstream_api_key,
                config.upstream_timeout_s,
                self.tokenizer,
                config.upstream_concurrency,
            )
        else:
            max_batch, wait_s = (config.max_batch, config.batch_wait_ms / 1000) if config.batching else (1, 0.0)
            self.engine = NativeEngine(policy, self.tokenizer, max_batch, wait_s)
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

    def refuse_unsupported(self, request: RequestBase) -> None:
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
        if self.routed and (request.logprobs or getattr(request, "top_logprobs", None)):
            raise ApiError(400, "logprobs are not forwarded to the upstream by this router; leave them out", "logprobs")

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
        """The user's prompt against --max-prompt-tokens; the prompt as the model sees it (template and
        preference included) against the model's context."""
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
        seen = self.count_tokens(self.policy.prompt_for(prompt, weights))
        if seen + max_tokens > self.context:
            raise ApiError(
                400,
                f"{param} ({seen} tokens as the model sees it) plus max_tokens ({max_tokens}) exceeds the model's "
                f"context of {self.context} tokens",
                param,
            )

    def plan(self, body: CompletionRequest | ChatRequest) -> Plan:
        """Validate a request into the rows to generate: every prompt n times, choice i with seed + i
        (a request without a seed gets a random one, reported back)."""
        self.check_model(body.model)
        self.refuse_unsupported(body)
        weights = self.preference(body.preference)
        stops = self.stops(body.stop)
        if isinstance(body, ChatRequest):
            kind: Kind = "chat"
            if body.top_logprobs and not body.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            if body.max_tokens is not None and body.max_completion_tokens is not None:
                raise ApiError(400, "give max_tokens or max_completion_tokens, not both", "max_tokens")
            limit_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
            max_tokens = self.max_tokens(body.max_completion_tokens or body.max_tokens, limit_name)
            prompts = [render_chat(body.messages, self.tokenizer)]
            self.check_prompt(prompts[0], max_tokens, "messages", weights)
            if not (self.tokenizer is not None and getattr(self.tokenizer, "chat_template", None)):
                stops.append(HH_HUMAN)  # an HH-format model would go on to write the user's next turn
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
        else:
            kind = "text"
            prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
            if not prompts:
                raise ApiError(400, "prompt is an empty list", "prompt")
            max_tokens = self.max_tokens(body.max_tokens)
            for i, prompt in enumerate(prompts):
                self.check_prompt(prompt, max_tokens, "prompt" if len(prompts) == 1 else f"prompt[{i}]", weights)
            logprobs = body.logprobs
        if len(prompts) * body.n > MAX_ROWS_PER_REQUEST:
            raise ApiError(
                400, f"prompts × n is {len(prompts) * body.n}; at most {MAX_ROWS_PER_REQUEST} per request", "n"
            )
        seed = secrets.randbelow(2**31) if body.seed is None else body.seed  # small: JSON readers lose bits above 2**53
        rows = range(len(prompts) * body.n)
        params = [
            SamplingParams(max_tokens, body.temperature, body.top_p, list(stops), seed + i, logprobs or 0) for i in rows
        ]
        return Plan(
            kind=kind,
            prompts=[prompts[i // body.n] for i in rows],
            params=params,
            weights=weights,
            seed=seed,
            n=body.n,
            logprobs=logprobs,
            stream=body.stream,
            include_usage=bool((body.stream_options or {}).get("include_usage")),
        )

    # --- answers

    def extension(self, plan: Plan) -> dict[str, Any]:
        """The `moalign` block of every answer: which preference, which model answered it, the seed."""
        return {
            **self.engine.extension(plan.weights),
            "preference": [float(x) for x in plan.weights],
            "objectives": list(getattr(self.policy, "objectives", [])),
            "seed": plan.seed,
        }

    async def answer(self, request: Request, body: CompletionRequest | ChatRequest) -> Any:
        plan = self.plan(body)
        formatter = Formatter(plan.kind, self.model_id, self.extension(plan), plan.n)
        if not plan.stream:  # the answer is plain JSON already: FastAPI's jsonable_encoder would only cost CPU
            return JSONResponse(formatter.whole(await self.engine.rows(request, plan)))
        pieces = self.engine.pieces(request, plan)
        # The first piece is awaited here, so a request that fails before any text is answered with its
        # status (400, 502, 504) rather than with a stream that opens and errors.
        try:
            first = await anext(pieces)
        except StopAsyncIteration:
            first = None

        async def replay() -> AsyncIterator[Piece]:
            if first is not None:
                yield first
                async for piece in pieces:
                    yield piece

        events = sse(formatter.chunks(replay(), plan.include_usage))
        return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def models(self) -> dict[str, Any]:
        manifest = getattr(self.policy, "manifest", {}) or {}
        info: dict[str, Any] = {
            "method": manifest.get("method"),
            "objectives": list(getattr(self.policy, "objectives", [])),
            "default_preference": [float(x) for x in self.policy.default_weights()],
        }
        if manifest.get("models"):
            info["trained_preferences"] = [entry.get("preference") for entry in manifest["models"]]
        if self.routed:
            info["upstream"] = self.config.upstream
        card = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "moalign"}
        return {"object": "list", "data": [{**card, "moalign": info}]}


def create_app(policy: Any, config: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app for one policy; `app.state.server` exposes the engine's stats to tests."""
    config = config or ServeConfig()
    server = Server(policy, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await server.engine.start()
        yield
        await server.engine.stop()

    app = FastAPI(title="moalign", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error_body(error.message, error.kind, error.param), status_code=error.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body(validation_message(error.errors())), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        # Unknown paths (404) and methods (405) in OpenAI's shape too, not FastAPI's {"detail": …}.
        message = f"{request.method} {request.url.path}: {error.detail}"
        return JSONResponse(error_body(message), status_code=error.status_code, headers=error.headers)

    @app.exception_handler(ClientGone)
    async def gone(request: Request, error: ClientGone) -> Response:
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def crashed(request: Request, error: Exception) -> JSONResponse:
        log.exception("request failed")
        message = f"internal error: {type(error).__name__}: {error}"
        return JSONResponse(error_body(message, "server_error"), status_code=500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": server.model_id, **server.engine.health()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return server.models()

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        server.check_model(model_id)
        return server.models()["data"][0]

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await server.answer(request, body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        return await server.answer(request, body)

    if getattr(policy, "modality", "text") == "image":  # image runs answer OpenAI's images API
        from moalign.image.serve import add_image_routes

        add_image_routes(app, server)

    app.add_middleware(
        GuardMiddleware, api_key=config.api_key, max_bytes=config.max_body_bytes, timeout_s=config.body_timeout_s
    )
    return app
