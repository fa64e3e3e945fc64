"""The router engine: generation forwarded to an OpenAI-compatible upstream (vLLM, SGLang, `transformers serve`).

What moalign owns at serving time is the preference, not the sampler: for each request the policy
writes the exact prompt its model is given (RiC: the desired rewards) and names the upstream model
that serves the preference (per-preference runs: the nearest trained one, under the name
`moalign export` gave it). Every row goes to the upstream's `/v1/completions` with its own seed, so a
chat request is rendered here exactly as the native server renders it.

The forwarding path is one shared `aiohttp.ClientSession` with keep-alive connections, and the
upstream's JSON is read with `json.loads`: at 200 concurrent clients the openai client (Pydantic models
over httpx) cost ~11 ms of CPU per request and httpx's connection pool alone ~1.5 ms, aiohttp's client
~0.25 ms (benchmarks/bench_serve.py measures the router's CPU per request).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from fastapi import Request

from moalign.errors import first_line
from moalign.serve.openai_format import Piece, Row
from moalign.serve.schemas import ApiError

log = logging.getLogger("moalign.serve")

# Requests to the upstream at once (`--upstream_concurrency`): vLLM's default batch (max_num_seqs), so that a
# vLLM engine's batch can fill; moalign's native engine (batches of 64) measured the same with 64 and 256
IN_FLIGHT = 256
RETRIES = 2  # a request that met a dropped keep-alive connection is sent again: rows carry seeds
# A connection closed under a request: before its headers (ClientConnectorError is a ClientOSError) or while its
# body was written or read
DROPPED = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError)
# Idle connections are closed before the upstream closes them: uvicorn (vLLM, transformers serve, SGLang) after
# 5 s; aiohttp's default of 15 s reused connections the upstream was closing
KEEPALIVE_S = 4.0
T = TypeVar("T")


class Malformed(ValueError):
    """The upstream answered 200 with something that is not an OpenAI completion."""


def completion_choice(event: Any) -> dict[str, Any] | None:
    """The first choice of a completion object (None: a chunk without choices, e.g. the usage chunk)."""
    if not isinstance(event, dict) or not isinstance(event.get("choices", []), list):
        raise Malformed(f"not a completion object: {json.dumps(event)[:80]}")
    if not event.get("choices"):
        return None
    choice = event["choices"][0]
    if not isinstance(choice, dict) or not isinstance(choice.get("text", ""), str):
        raise Malformed(f"choices[0] has no text: {json.dumps(choice)[:80]}")
    return choice


def counted(usage: Any, name: str) -> int | None:
    value = usage.get(name) if isinstance(usage, dict) else None
    return value if isinstance(value, int) else None


def upstream_message(content: bytes, reason: str | None) -> str:
    """The upstream's own error message, in one line."""
    try:
        body = json.loads(content)
        error = body.get("error", body.get("detail", body)) if isinstance(body, dict) else body
        detail = error.get("message", error) if isinstance(error, dict) else error
    except ValueError:
        detail = content.decode(errors="replace")
    text = str(detail).strip()
    return text.splitlines()[0][:300] if text else str(reason)


class UpstreamStatus(Exception):
    """The upstream answered with an HTTP error status (None: an error event in a stream it had opened)."""

    def __init__(self, status: int | None, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class UpstreamEngine:
    """Sends each row to the upstream; upstream failures become one-line 502 / 504 answers."""

    def __init__(
        self,
        policy: Any,
        url: str,
        api_key: str | None,
        timeout_s: float,
        tokenizer: Any,
        in_flight: int = IN_FLIGHT,
    ):
        self.policy, self.url, self.timeout_s, self.tokenizer = policy, url.rstrip("/"), timeout_s, tokenizer
        self.api_key, self.in_flight = api_key, in_flight
        self.session: aiohttp.ClientSession | None = None
        self.stats = {"requests": 0, "upstream_errors": 0}

    async def start(self) -> None:
        # At most `in_flight` requests, each on its own keep-alive connection. The timeout bounds connecting and
        # each wait for data, not a whole (long) stream.
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        self.slots = asyncio.Semaphore(self.in_flight)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.in_flight, keepalive_timeout=KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s, sock_read=self.timeout_s),
            headers=headers,
        )

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()

    def health(self) -> dict[str, Any]:
        return {"upstream": self.url, **self.stats}

    def extension(self, weights: Any) -> dict[str, Any]:
        return {"served_by": self.policy.served_by(weights), "upstream_model": self.policy.upstream_model(weights)}

    # --- one row

    def request(self, plan: Any, row: int, stream: bool) -> dict[str, Any]:
        params = plan.params[row]
        body: dict[str, Any] = {
            "model": self.policy.upstream_model(plan.weights),
            "prompt": self.policy.prompt_for(plan.prompts[row], plan.weights),
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "seed": params.seed,
            "stream": stream,
        }
        if params.stop:
            body["stop"] = list(params.stop)
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def failure(self, error: BaseException, model: str) -> ApiError:
        """One line that names the upstream and what went wrong; the router itself stays healthy."""
        self.stats["upstream_errors"] += 1
        where = f"upstream {self.url}"
        if isinstance(error, asyncio.TimeoutError):  # aiohttp's timeouts (on Python 3.10 not a TimeoutError)
            message = f"{where} did not answer within {self.timeout_s:g} s (--upstream-timeout)"
            return ApiError(504, message, kind="upstream_error")
        if isinstance(error, UpstreamStatus):
            status, detail = error.status, error.message
            if status is None:
                return ApiError(502, f"{where} failed mid-stream: {detail}", kind="upstream_error")
            if status in (400, 422):  # the upstream refused what the client asked
                return ApiError(400, f"{where} refused the request: {detail}")
            hint = ""
            if status in (404, 500):
                hint = f" (does it serve a model named {model!r}? `moalign export` prints the command that does)"
            return ApiError(
                502, f"{where} answered {status} for model {model!r}: {detail}{hint}", kind="upstream_error"
            )
        if isinstance(error, aiohttp.ClientError):
            detail = first_line(error)
            return ApiError(502, f"{where} is unreachable or closed the connection: {detail}", kind="upstream_error")
        if isinstance(error, ValueError):  # json.JSONDecodeError, UnicodeDecodeError and Malformed among them
            return ApiError(502, f"{where} sent a malformed answer: {first_line(error)}", kind="upstream_error")
        raise error

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return 0
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def send(self, body: dict[str, Any]) -> aiohttp.ClientResponse:
        """The upstream's response with its headers read (the body still to read), or the error that ended it."""
        assert self.session is not None, "the server was not started"
        response = await self.session.post(f"{self.url}/completions", data=json.dumps(body).encode())
        if response.status >= 400:
            async with response:
                raise UpstreamStatus(response.status, upstream_message(await response.read(), response.reason))
        return response

    async def resend_if_dropped(self, exchange: Callable[[], Awaitable[T]]) -> T:
        """`exchange()`, run again when it met a connection the upstream closed as the router reused it: rows
        carry their seeds, so a request sent again is answered alike."""
        for attempt in range(RETRIES):
            with contextlib.suppress(*DROPPED):
                return await exchange()
            log.info("upstream %s dropped a connection; sending again (%d)", self.url, attempt + 1)
        return await exchange()

    async def read_answer(self, body: dict[str, Any]) -> Any:
        async with await self.send(body) as response:
            return json.loads(await response.read())

    async def whole_row(self, plan: Any, row: int) -> Row:
        body = self.request(plan, row, stream=False)
        try:
            async with self.slots:
                answer = await self.resend_if_dropped(lambda: self.read_answer(body))
            choice = completion_choice(answer)
            if choice is None:
                raise Malformed("a completion without choices")
        except (aiohttp.ClientError, UpstreamStatus, asyncio.TimeoutError, ValueError) as error:
            raise self.failure(error, body["model"]) from None
        text, finish, used = choice.get("text", ""), choice.get("finish_reason"), answer.get("usage")
        prompt_tokens = counted(used, "prompt_tokens")
        completion_tokens = counted(used, "completion_tokens")
        return Row(
            text,
            finish if finish in ("stop", "length") else "stop",
            self.count_tokens(body["prompt"]) if prompt_tokens is None else prompt_tokens,
            self.count_tokens(text) if completion_tokens is None else completion_tokens,
        )

    async def events(self, response: aiohttp.ClientResponse) -> AsyncIterator[Any]:
        """The JSON events of a server-sent event stream, up to `[DONE]`."""
        async for line in response.content:  # one line at a time, as the upstream sends them
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, `event:` lines
            data = line[5:].strip()
            if data == b"[DONE]":
                return
            event = json.loads(data)
            if isinstance(event, dict) and "error" in event:  # the upstream failed after the stream opened
                raise UpstreamStatus(None, upstream_message(data, "an error event"))
            yield event

    async def row_pieces(self, plan: Any, row: int) -> AsyncIterator[Piece]:
        """The upstream's chunks for one row, passed on as they arrive."""
        body = self.request(plan, row, stream=True)
        finish, parts, used = None, [], None
        try:
            async with self.slots:
                response = await self.resend_if_dropped(lambda: self.send(body))
            async with response:
                async for event in self.events(response):
                    choice = completion_choice(event)  # checks the event is a completion object
                    used = event.get("usage") or used
                    if choice is None:
                        continue
                    if choice.get("text"):
                        parts.append(choice["text"])
                        yield Piece(row, choice["text"])
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
        except (aiohttp.ClientError, UpstreamStatus, asyncio.TimeoutError, ValueError) as error:
            raise self.failure(error, body["model"]) from None
        if finish is None:
            self.stats["upstream_errors"] += 1
            message = f"upstream {self.url} closed the stream before the answer finished"
            raise ApiError(502, message, kind="upstream_error")
        prompt_tokens = counted(used, "prompt_tokens")
        completion_tokens = counted(used, "completion_tokens")
        yield Piece(
            row,
            "",
            None,
            finish if finish in ("stop", "length") else "stop",
            self.count_tokens(body["prompt"]) if prompt_tokens is None else prompt_tokens,
            self.count_tokens("".join(parts)) if completion_tokens is None else completion_tokens,
        )

    # --- a request

    async def rows(self, request: Request, plan: Any) -> list[Row]:
        self.stats["requests"] += 1
        if len(plan.prompts) == 1:  # the common case: no task to schedule
            return [await self.whole_row(plan, 0)]
        tasks = [asyncio.ensure_future(self.whole_row(plan, row)) for row in range(len(plan.prompts))]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # one row failed: the others' upstream requests are not wanted any more
                task.cancel()

    async def pieces(self, request: Request, plan: Any) -> AsyncIterator[Piece]:
        """Every row streamed at once; pieces are passed on in the order they arrive."""
        self.stats["requests"] += 1
        if len(plan.prompts) == 1:
            async for piece in self.row_pieces(plan, 0):
                yield piece
            return
        queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

        async def pump(row: int) -> None:
            try:
                async for piece in self.row_pieces(plan, row):
                    await queue.put(piece)
            except BaseException as error:  # handed to the consumer, which raises it
                await queue.put(error)
            finally:
                await queue.put(None)

        tasks = [asyncio.ensure_future(pump(row)) for row in range(len(plan.prompts))]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
