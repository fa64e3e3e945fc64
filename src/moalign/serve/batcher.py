"""The native engine's request batching: concurrent requests generated together by one worker thread.

Requests are gathered for a few milliseconds and generated as one batch; the event loop stays free
while the model works. Generation samples each row from its own seeded generator, so a request's
output does not depend on what else is in its batch: the same seed gives the same text.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from moalign.generation import SamplingParams, TokenCallback


class ClientGone(Exception):
    """The client disconnected while its request waited; nobody is left to answer."""


@dataclass(eq=False)
class Job:
    """One request's rows, waiting for the worker.

    Compared by identity (`eq=False`): a dataclass's generated `==` would compare the weight arrays,
    and numpy refuses to say whether two arrays are equal ("truth value … is ambiguous") when a
    cancelled job is looked up in the queue.
    """

    prompts: list[str]
    weights: list[np.ndarray]
    params: list[SamplingParams]
    future: asyncio.Future
    arrived: float
    on_tokens: TokenCallback | None = None  # a streaming request's rows, as their tokens are sampled


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

    def submit(
        self,
        prompts: list[str],
        weights: list[np.ndarray],
        params: list[SamplingParams],
        on_tokens: TokenCallback | None = None,
    ) -> Job:
        """Queue a request's rows; `on_tokens(row, new_ids, finished)` is called from the worker thread."""
        loop = asyncio.get_running_loop()
        job = Job(prompts, weights, params, loop.create_future(), loop.time(), on_tokens)
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
        complete = partial(self.policy.complete, prompts, weights, params)
        if any(job.on_tokens for job in batch):  # streaming jobs hear about their own rows only
            owners = [(job, row) for job in batch for row in range(len(job.prompts))]

            def on_tokens(index: int, ids: list[int], finished: bool) -> None:
                job, row = owners[index]
                if job.on_tokens is not None:
                    job.on_tokens(row, ids, finished)

            complete = partial(complete, on_tokens=on_tokens)
        try:
            outputs = await loop.run_in_executor(self.executor, complete)
        except Exception as error:
            if len(batch) > 1:  # one bad request must not fail the others: run each alone
                for job in batch:
                    # Tokens already streamed would come again: the rest of a streaming job's text is
                    # sent from its completion instead.
                    job.on_tokens = None
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
