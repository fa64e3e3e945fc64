"""The native engine: the run's own models generate in this process, through `Policy.complete`.

Concurrent requests are batched (see `batcher.py`); a request whose client leaves while it waits is
dropped before it costs any generation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from moalign.errors import MoalignError
from moalign.generation import Completion
from moalign.serve.batcher import Batcher, ClientGone, Job
from moalign.serve.openai_format import Piece, Row, token_pieces
from moalign.serve.schemas import ApiError

log = logging.getLogger("moalign.serve")


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client closes its connection (the request body has been read by then)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class StreamedText:
    """A row's text as its tokens arrive, and how much of it may be sent already.

    Generation checks stop strings only every few tokens, so text that contains a stop string, or ends
    in what could be the start of one, is held back; so is a character still missing some of its bytes.
    What is sent is therefore always the beginning of the row's final text.
    """

    def __init__(self, tokenizer: Any, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = ""

    def add(self, ids: list[int]) -> str:
        """The new text that is safe to send now."""
        self.ids += ids
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [text.find(stop) for stop in self.stops if stop in text]
        if cuts:
            text = text[: min(cuts)]
        else:
            held = max((k for stop in self.stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
            text = text[: len(text) - held]
        text = text.rstrip("\ufffd")
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


class NativeEngine:
    """Generation by the policy itself; `plan` is the validated request (see `app.Plan`)."""

    def __init__(self, policy: Any, tokenizer: Any, max_batch: int, wait_s: float):
        self.policy, self.tokenizer = policy, tokenizer
        self.max_batch, self.wait_s = max_batch, wait_s
        self.batcher: Batcher | None = None

    async def start(self) -> None:
        self.batcher = Batcher(self.policy, max_batch=self.max_batch, wait_s=self.wait_s)
        self.batcher.start()

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()

    def health(self) -> dict[str, Any]:
        if self.batcher is None:
            return {}
        return {"pending": len(self.batcher.pending), **self.batcher.stats.as_dict()}

    def extension(self, weights: Any) -> dict[str, Any]:
        return {"served_by": self.policy.served_by(weights)}

    async def generate(self, request: Request, plan: Any) -> list[Completion]:
        """Queue the rows for the batch worker; a client that leaves while waiting is dropped."""
        assert self.batcher is not None, "the server was not started"
        job = self.batcher.submit(plan.prompts, [plan.weights] * len(plan.prompts), plan.params)
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
        return self.result(job)

    @staticmethod
    def result(job: Job) -> list[Completion]:
        try:
            return job.future.result()
        except MoalignError as error:
            raise ApiError(400, str(error)) from None
        except Exception as error:
            log.exception("generation failed")
            raise ApiError(500, f"generation failed: {type(error).__name__}: {error}", kind="server_error") from None

    async def rows(self, request: Request, plan: Any) -> list[Row]:
        outputs = await self.generate(request, plan)
        return [
            Row(c.text, c.finish_reason, c.prompt_tokens, len(c.token_ids), self.logprobs(plan, c)) for c in outputs
        ]

    async def pieces(self, request: Request, plan: Any) -> AsyncIterator[Piece]:
        """Each row's text as its tokens are sampled; the pieces always join to the whole answer's text.

        With log-probabilities asked for (known per token once a row is done) or no tokenizer to decode
        with, the pieces follow generation instead of accompanying it.
        """
        if plan.logprobs is not None or self.tokenizer is None:
            outputs = await self.generate(request, plan)
            for row, c in enumerate(outputs):
                for t, text in enumerate(token_pieces(self.tokenizer, c.token_ids, c.text)):
                    yield Piece(row, text, self.logprobs(plan, c, t, t + 1))
                yield Piece(row, "", None, c.finish_reason, c.prompt_tokens, len(c.token_ids))
            return
        assert self.batcher is not None, "the server was not started"
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue[tuple[int, list[int]]] = asyncio.Queue()

        def on_tokens(row: int, ids: list[int], finished: bool) -> None:  # on the worker thread
            if ids:
                loop.call_soon_threadsafe(arrived.put_nowait, (row, ids))

        job = self.batcher.submit(plan.prompts, [plan.weights] * len(plan.prompts), plan.params, on_tokens)
        texts = [StreamedText(self.tokenizer, params.stop) for params in plan.params]
        watcher = asyncio.ensure_future(wait_for_disconnect(request))
        try:
            while True:
                getter = asyncio.ensure_future(arrived.get())
                done, _ = await asyncio.wait({getter, job.future, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                row, ids = getter.result()
                if text := texts[row].add(ids):
                    yield Piece(row, text)
            if not job.future.done():
                raise ClientGone()
            # The worker queued every callback before the job's result: what is still queued came first.
            while not arrived.empty():
                row, ids = arrived.get_nowait()
                if text := texts[row].add(ids):
                    yield Piece(row, text)
            outputs = self.result(job)
        finally:
            watcher.cancel()
            if not job.future.done():
                self.batcher.cancel(job)
        for row, c in enumerate(outputs):
            # The completion has the final text (cut at a stop string): send what was held back.
            if rest := c.text[len(texts[row].sent) :] if c.text.startswith(texts[row].sent) else "":
                yield Piece(row, rest)
            yield Piece(row, "", None, c.finish_reason, c.prompt_tokens, len(c.token_ids))

    # --- log-probabilities in each endpoint's format

    def token_string(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else str(token_id)

    def logprobs(self, plan: Any, c: Completion, start: int = 0, stop: int | None = None) -> Any:
        if plan.logprobs is None:
            return None
        if plan.kind == "chat":
            return self.chat_logprobs(c, start, stop)
        return self.completion_logprobs(c, start, stop)

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
