"""Bulk generation on an OpenAI-compatible server (vLLM, SGLang, `transformers serve`, `moalign serve`).

The in-process sampler (`generation.generate`) is one engine; this is the other: evaluation, RiC's online
stages, ParetoHqD's stage 2 and RL rollouts can send their rows to a server built for throughput. Rows
go out as concurrent `/v1/completions` requests (at most `concurrency` in flight), each with its own
seed, through the `openai` client and its own retries (with backoff, honouring Retry-After); results
come back in the rows' order whatever order the server answers in.

What the server cannot give back: token ids and log-probabilities (a completion's `token_ids` and
`logprobs` are empty); whether a seed reproduces a sample is the server's business (vLLM and moalign's
own server do; `transformers serve` seeds its global generator, which concurrent requests share).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
from collections.abc import Callable, Sequence
from typing import Any

from moalign.errors import MoalignError, first_line
from moalign.generation import Completion, SamplingParams

BACKENDS = ("local", "openai")


class OpenAIEngine:
    """`complete(models, prompts, params)`: one completion per row from the server at `base_url`."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        concurrency: int = 32,
        timeout_s: float = 600.0,
        max_retries: int = 3,
    ):
        if not base_url or not base_url.startswith(("http://", "https://")):
            raise MoalignError(f"the generation server's base URL must be http:// or https://, got {base_url!r}")
        if concurrency < 1:
            raise MoalignError(f"generation concurrency must be ≥ 1, got {concurrency}")
        self.base_url, self.concurrency, self.timeout_s, self.max_retries = (
            base_url,
            concurrency,
            timeout_s,
            max_retries,
        )
        self.api_key = api_key or os.environ.get("OPENAI_API_KEY") or "none"

    def complete(
        self, models: str | Sequence[str], prompts: Sequence[str], params: Sequence[SamplingParams]
    ) -> list[Completion]:
        """Row i asks model `models[i]` (or the one `models`) for `prompts[i]` with `params[i]`."""
        prompts, params = list(prompts), list(params)
        names = [models] * len(prompts) if isinstance(models, str) else list(models)
        if not len(names) == len(prompts) == len(params):
            raise MoalignError(f"{len(prompts)} prompts, {len(params)} sampling settings and {len(names)} models")
        for p in params:
            p.validate()
        work = self._complete_all(names, prompts, params)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(work)
        # Called from inside an event loop (a notebook): run on a loop of its own in a helper thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, work).result()

    def completer(self, model: str) -> Callable[[list[str], list[Any]], list[Completion]]:
        """`complete(prompts, params)` for one model: the shape `methods.common.generate_stage` takes."""
        return lambda prompts, params: self.complete(model, prompts, params)

    async def _complete_all(
        self, models: list[str], prompts: list[str], params: list[SamplingParams]
    ) -> list[Completion]:
        import httpx
        import openai

        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
        client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=self.api_key,
            max_retries=self.max_retries,
            timeout=self.timeout_s,
            http_client=httpx.AsyncClient(limits=limits, timeout=self.timeout_s),
        )
        slots = asyncio.Semaphore(self.concurrency)

        async def one(i: int) -> Completion:
            p = params[i]
            async with slots:
                try:
                    answer = await client.completions.create(
                        model=models[i],
                        prompt=prompts[i],
                        max_tokens=p.max_new_tokens,
                        temperature=p.temperature,
                        top_p=p.top_p,
                        stop=list(p.stop) or None,
                        seed=p.seed,
                    )
                except openai.OpenAIError as error:
                    raise MoalignError(
                        f"generation on {self.base_url} failed for model {models[i]!r} (after "
                        f"{self.max_retries} retries): {first_line(error)}"
                    ) from None
            if not isinstance(answer, openai.types.Completion) or not answer.choices:
                raise MoalignError(f"{self.base_url} answered model {models[i]!r} with something not a completion")
            choice = answer.choices[0]
            return Completion(
                text=choice.text,
                token_ids=[],
                logprobs=[],
                finish_reason="length" if choice.finish_reason == "length" else "stop",
                prompt_tokens=answer.usage.prompt_tokens if answer.usage else 0,
            )

        tasks = [asyncio.ensure_future(one(i)) for i in range(len(prompts))]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # one row failed for good: stop the rest
                task.cancel()
            await client.close()


def engine_from(
    backend: str,
    base_url: str | None,
    concurrency: int = 32,
    names: tuple[str, str] = ("generation_backend", "generation_base_url"),
) -> OpenAIEngine | None:
    """The engine a config names: None for the in-process sampler, else an `OpenAIEngine`; `names` are the
    two settings as the user spells them (a method's config fields, or `moalign eval`'s flags)."""
    backend_name, url_name = names
    if backend not in BACKENDS:
        raise MoalignError(f"{backend_name} must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "local":
        if base_url:
            raise MoalignError(f"{url_name} is set but {backend_name} is local: set {backend_name} to openai")
        return None
    if not base_url:
        raise MoalignError(f"{backend_name} openai needs {url_name}, e.g. http://127.0.0.1:8000/v1")
    return OpenAIEngine(base_url, concurrency=concurrency)
