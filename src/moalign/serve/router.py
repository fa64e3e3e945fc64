"""The router engine: generation forwarded to an OpenAI-compatible upstream (vLLM, SGLang, `transformers serve`).

What moalign owns at serving time is the preference, not the sampler: for each request the policy
writes the exact prompt its model is given (RiC: the desired rewards) and names the upstream model
that serves the preference (per-preference runs: the nearest trained one, under the name
`moalign export` gave it). Every row goes to the upstream's `/v1/completions` with its own seed, so a
chat request is rendered here exactly as the native server renders it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
from fastapi import Request

from moalign.errors import first_line
from moalign.serve.openai_format import Piece, Row
from moalign.serve.schemas import ApiError

log = logging.getLogger("moalign.serve")

IN_FLIGHT = 64  # requests to the upstream at once (the native engine batches up to 64 rows)


class UpstreamEngine:
    """Sends each row to the upstream; upstream failures become one-line 502 / 504 answers."""

    def __init__(self, policy: Any, url: str, api_key: str | None, timeout_s: float, tokenizer: Any):
        self.policy, self.url, self.timeout_s, self.tokenizer = policy, url.rstrip("/"), timeout_s, tokenizer
        self.api_key = api_key
        self.client: openai.AsyncOpenAI | None = None
        self.stats = {"requests": 0, "upstream_errors": 0}

    async def start(self) -> None:
        # Every row carries its seed, so a retried request (e.g. on a keep-alive connection the upstream had
        # just closed) gives the same answer. At most IN_FLIGHT requests and as many connections: httpx's
        # pool scans its connections for every request, which costs more CPU than the request beyond ~100.
        limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
        self.slots = asyncio.Semaphore(IN_FLIGHT)
        self.client = openai.AsyncOpenAI(
            base_url=self.url,
            api_key=self.api_key or "none",
            max_retries=2,
            timeout=self.timeout_s,
            http_client=httpx.AsyncClient(limits=limits, timeout=self.timeout_s),
        )

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()

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
        if isinstance(error, openai.APITimeoutError | httpx.TimeoutException):
            message = f"{where} did not answer within {self.timeout_s:g} s (--upstream-timeout)"
            return ApiError(504, message, kind="upstream_error")
        if isinstance(error, openai.APIStatusError):
            detail = first_line(error)
            if error.status_code in (400, 422):  # the upstream refused what the client asked
                return ApiError(400, f"{where} refused the request: {detail}")
            hint = ""
            if error.status_code in (404, 500):
                hint = f" (does it serve a model named {model!r}? `moalign export` prints the command that does)"
            return ApiError(
                502, f"{where} answered {error.status_code} for model {model!r}: {detail}{hint}", kind="upstream_error"
            )
        if isinstance(error, openai.APIConnectionError | httpx.TransportError):
            detail = first_line(error.__cause__ or error)
            return ApiError(502, f"{where} is unreachable or closed the connection: {detail}", kind="upstream_error")
        if isinstance(error, ValueError | openai.APIResponseValidationError | KeyError | TypeError | IndexError):
            detail = first_line(error)
            return ApiError(502, f"{where} sent a malformed answer: {detail}", kind="upstream_error")
        if isinstance(error, openai.APIError):
            return ApiError(502, f"{where} failed: {first_line(error)}", kind="upstream_error")
        raise error

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return 0
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def whole_row(self, plan: Any, row: int) -> Row:
        assert self.client is not None, "the server was not started"
        body = self.request(plan, row, stream=False)
        try:
            async with self.slots:
                answer = await self.client.completions.create(**body)
            if not isinstance(answer, openai.types.Completion):  # the client hands back text it could not parse
                raise ValueError(f"not a JSON completion object: {str(answer)[:80]!r}")
            choice = answer.choices[0]
            text, finish = choice.text, choice.finish_reason
            if not isinstance(text, str):
                raise ValueError(f"choices[0].text is {type(text).__name__}, not a string")
        except (openai.OpenAIError, httpx.HTTPError, ValueError, KeyError, TypeError, IndexError) as error:
            raise self.failure(error, body["model"]) from None
        used = answer.usage
        prompt_tokens = used.prompt_tokens if used else self.count_tokens(body["prompt"])
        completion_tokens = used.completion_tokens if used else self.count_tokens(text)
        return Row(text, finish if finish in ("stop", "length") else "stop", prompt_tokens, completion_tokens)

    async def row_pieces(self, plan: Any, row: int) -> AsyncIterator[Piece]:
        """The upstream's chunks for one row, passed on as they arrive."""
        assert self.client is not None, "the server was not started"
        body = self.request(plan, row, stream=True)
        finish, parts, counts = None, [], None
        try:
            async with self.slots:
                stream = await self.client.completions.create(**body)
            async with stream:
                async for chunk in stream:
                    if chunk.usage is not None:
                        counts = chunk.usage
                    if not chunk.choices:
                        continue
                    choice = chunk.choices[0]
                    if choice.text:
                        parts.append(choice.text)
                        yield Piece(row, choice.text)
                    if choice.finish_reason:
                        finish = choice.finish_reason
        except (openai.OpenAIError, httpx.HTTPError, ValueError, KeyError, TypeError, IndexError) as error:
            raise self.failure(error, body["model"]) from None
        if finish is None:
            self.stats["upstream_errors"] += 1
            message = f"upstream {self.url} closed the stream before the answer finished"
            raise ApiError(502, message, kind="upstream_error")
        prompt_tokens = counts.prompt_tokens if counts else self.count_tokens(body["prompt"])
        completion_tokens = counts.completion_tokens if counts else self.count_tokens("".join(parts))
        yield Piece(row, "", None, finish if finish in ("stop", "length") else "stop", prompt_tokens, completion_tokens)

    # --- a request

    async def rows(self, request: Request, plan: Any) -> list[Row]:
        self.stats["requests"] += 1
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
