"""Load test of `moalign serve`: many concurrent clients, with request batching and without; the router.

The server runs in a subprocess on loopback (as a user would start it); 200 clients (quick: 50) each
send one completion request (max_tokens 32, its own seed and preference) at once. Reported per mode:
errors, p50 / p99 latency, requests/s and tokens/s, and the batched / unbatched ratio. The model is
the embedded demo's base model.

The router (`moalign serve RUN --upstream URL`, another subprocess) is measured against the same
upstream (moalign's native server) reached directly, with the same requests: the latency it adds one
request at a time (p50, p99), and its throughput at 200 concurrent clients relative to the upstream's
(the median over rounds of router / direct, each round one direct run followed by one routed run, so
that both see about the same machine load; in a round each client sends 5 requests one after another,
so 200 are in flight throughout and the rate is a steady state rather than the start of one burst). Native streaming: time to the first chunk against time to
the last, one request of 64 tokens at a time.

Where the CPU goes: the upstream stands for an engine on its own accelerator, so it gets a core of its own
(`os.sched_setaffinity`, inherited by the process it starts) and the router and the clients share the rest: on
two cores the router and the clients share the other one, on three or more each has its own. A direct round and
a routed round then give the upstream the same core; the router's cost shows as the work it adds on the
clients' side and as what the upstream waits for. The CPU seconds each server process used during the
throughput rounds, per request, are reported too: what the router would take from an engine that shared its
cores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

MAX_TOKENS = 32
ROUNDS = 5  # direct-then-routed rounds at full concurrency
EACH = 5  # requests per client in a throughput round: the rate is then a steady state, not the start of a burst
# One intra-op thread for the server unless OMP_NUM_THREADS says otherwise: on a small shared CPU,
# OpenMP threads spin against other processes and a tiny model's step goes from ~1 ms to ~100 ms.
THREADS = "1"


def make_run(workdir: Path) -> tuple[Path, list[str]]:
    """A `base` run directory naming the embedded demo's base model, and the demo's test prompts."""
    from moalign.demo.task import prepare_task
    from moalign.run import write_manifest

    task = prepare_task()
    model, prompts = Path(task.base_model).resolve(), list(task.test_prompts)
    run_dir = workdir / "run"
    write_manifest(
        run_dir,
        {"method": "base", "model": str(model), "objective_names": ["a", "b"], "objectives": ["length", "brevity"]},
    )
    return run_dir, prompts


@contextlib.contextmanager
def pinned(cores: set[int] | None) -> Iterator[None]:
    """This thread, and the processes it starts meanwhile, on `cores` (None: wherever the OS likes)."""
    if not cores:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def placement() -> tuple[dict[str, set[int] | None], str]:
    """Cores for the upstream, the router and the clients: the upstream on one of its own."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cores) >= 3:
        where = {"upstream": {cores[0]}, "router": {cores[1]}, "clients": set(cores[2:])}
        return where, f"upstream on core {cores[0]}, router on core {cores[1]}, clients on {len(cores) - 2} core(s)"
    if len(cores) == 2:
        where = {"upstream": {cores[0]}, "router": {cores[1]}, "clients": {cores[1]}}
        return where, f"upstream on core {cores[0]}, router and clients on core {cores[1]}"
    return {"upstream": None, "router": None, "clients": None}, "one core: upstream, router and clients share it"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used so far (Linux's /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`moalign serve` in a subprocess on 127.0.0.1, stopped (by its own pid) on exit."""

    def __init__(self, run_dir: Path, *flags: str, cores: set[int] | None = None):
        self.port, self.cores = free_port(), cores
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "moalign.cli", "serve", str(run_dir), "--port", str(self.port)]
        self.command = [*command, "--log-level", "warning", *flags]

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("OMP_NUM_THREADS", THREADS)
        with pinned(self.cores):
            self.process = subprocess.Popen(self.command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited: {self.process.stderr.read().decode()[-500:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not answer /health within 180 s")

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def __exit__(self, *exc) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def load(url: str, prompts: list[str], clients: int, limit_s: float, each: int = 1) -> dict[str, Any]:
    """`clients` clients at once, each sending `each` requests one after another (a closed loop: `clients`
    requests in flight throughout); latencies, errors and generated tokens."""

    async def one(http: httpx.AsyncClient, i: int) -> tuple[float, int, str | None]:
        w = (i % 11) / 10
        body = {
            "prompt": prompts[i % len(prompts)],
            "max_tokens": MAX_TOKENS,
            "temperature": 1.0,
            "seed": i,
            "preference": [w, round(1 - w, 10)],
        }
        start = time.perf_counter()
        try:
            response = await http.post(f"{url}/v1/completions", json=body)
            if response.status_code != 200:
                return time.perf_counter() - start, 0, f"HTTP {response.status_code}: {response.text[:200]}"
            return time.perf_counter() - start, response.json()["usage"]["completion_tokens"], None
        except httpx.HTTPError as error:
            return time.perf_counter() - start, 0, f"{type(error).__name__}: {error}"

    async def client(http: httpx.AsyncClient, c: int) -> list[tuple[float, int, str | None]]:
        return [await one(http, c + k * clients) for k in range(each)]

    # idle connections expire before the server closes them (uvicorn: 5 s), or a reused one can fail mid-request
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=4.0)
    async with httpx.AsyncClient(timeout=limit_s, limits=limits) as http:
        start = time.perf_counter()
        batches = await asyncio.wait_for(asyncio.gather(*(client(http, c) for c in range(clients))), limit_s + 10)
        wall = time.perf_counter() - start
    results = [r for batch in batches for r in batch]
    latencies = np.array([r[0] for r in results])
    errors = [r[2] for r in results if r[2]]
    return {
        "wall": wall,
        "p50": float(np.percentile(latencies, 50)),
        "p99": float(np.percentile(latencies, 99)),
        "requests_per_s": (len(results) - len(errors)) / wall,
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "tokens": sum(r[1] for r in results),
        "requests": len(results),
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


def measure(run_dir: Path, prompts: list[str], clients: int, limit_s: float, *flags: str) -> dict[str, Any]:
    with ServerProcess(run_dir, *flags) as server:
        asyncio.run(load(server.url, prompts, 4, limit_s))  # warm-up: first forward passes, connections
        before = server.stats()
        result = asyncio.run(load(server.url, prompts, clients, limit_s))
        after = server.stats()
    result["batches"] = after["batches"] - before["batches"]
    result["largest_batch"] = after["largest_batch"]
    return result


def request_body(prompt: str, i: int, max_tokens: int, stream: bool = False) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "seed": i, "stream": stream}


def sequential_latencies(urls: list[str], prompts: list[str], count: int) -> list[np.ndarray]:
    """One request at a time, the same request to each url in turn: latencies per url."""
    latencies: list[list[float]] = [[] for _ in urls]
    with httpx.Client(timeout=60) as http:
        for i in range(count):
            for k, url in enumerate(urls):
                start = time.perf_counter()
                response = http.post(f"{url}/v1/completions", json=request_body(prompts[i % len(prompts)], i, 8))
                response.raise_for_status()
                latencies[k].append(time.perf_counter() - start)
    return [np.asarray(values) for values in latencies]


def stream_timings(url: str, prompts: list[str], count: int, max_tokens: int) -> tuple[float, float]:
    """Median seconds to the first text chunk and to the last chunk of a streamed completion."""
    first, last = [], []
    with httpx.Client(timeout=60) as http:
        for i in range(count):
            start, seen = time.perf_counter(), None
            body = request_body(prompts[i % len(prompts)], i, max_tokens, stream=True)
            with http.stream("POST", f"{url}/v1/completions", json=body) as response:
                for line in response.iter_lines():
                    if seen is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                        seen = time.perf_counter() - start
            first.append(seen if seen is not None else math.nan)
            last.append(time.perf_counter() - start)
    return float(np.nanmedian(first)), float(np.median(last))  # nan: a row that sent no text


def router_rows(run_dir: Path, prompts: list[str], clients: int, limit_s: float, quick: bool) -> list[dict[str, Any]]:
    where, setup = placement()
    each = 2 if quick else EACH
    with (
        ServerProcess(run_dir, cores=where["upstream"]) as upstream,
        ServerProcess(run_dir, "--upstream", f"{upstream.url}/v1", cores=where["router"]) as router,
        pinned(where["clients"]),
    ):
        urls = [upstream.url, router.url]
        sequential_latencies(urls, prompts, 4)  # warm-up
        direct, routed = sequential_latencies(urls, prompts, 20 if quick else 40)
        rounds: dict[str, list[dict[str, Any]]] = {"direct": [], "router": []}
        for _ in range(ROUNDS):
            for name, url in (("direct", upstream.url), ("router", router.url)):
                before = {p.url: cpu_seconds(p.process.pid) for p in (upstream, router)}
                result = asyncio.run(load(url, prompts, clients, limit_s, each))
                for p, key in ((upstream, "upstream_cpu"), (router, "router_cpu")):  # ms per request
                    result[key] = (cpu_seconds(p.process.pid) - before[p.url]) * 1000 / result["requests"]
                rounds[name].append(result)
        first, last = stream_timings(upstream.url, prompts, 3 if quick else 5, 64)
        routed_first, routed_last = stream_timings(router.url, prompts, 3 if quick else 5, 64)
    speeds = {name: [r["requests_per_s"] for r in results] for name, results in rounds.items()}
    ratio = float(np.median([r / d for r, d in zip(speeds["router"], speeds["direct"])]))
    errors = {name: sum(r["errors"] for r in results) for name, results in rounds.items()}
    first_error = next((r["first_error"] for r in rounds["router"] if r["first_error"]), "")
    upstream_cpu = {name: float(np.mean([r["upstream_cpu"] for r in rounds[name]])) for name in rounds}
    router_cpu = float(np.mean([r["router_cpu"] for r in rounds["router"]]))
    added = {q: (np.percentile(routed, q) - np.percentile(direct, q)) * 1000 for q in (50, 99)}
    note = f"{len(direct)} requests one at a time, max_tokens 8, the same requests direct and routed"
    at = f"{clients} clients × {each} requests, max_tokens {MAX_TOKENS}, mean of {ROUNDS} rounds; {setup}"
    return [
        {"section": "router", "metric": "direct: p50 latency", "value": float(np.percentile(direct, 50)) * 1000, "unit": "ms", "note": note},
        {"section": "router", "metric": "router: p50 latency", "value": float(np.percentile(routed, 50)) * 1000, "unit": "ms", "note": note},
        {"section": "router", "metric": "router added latency, p50", "value": float(added[50]), "unit": "ms", "note": "router p50 − direct p50"},
        {"section": "router", "metric": "direct: p99 latency", "value": float(np.percentile(direct, 99)) * 1000, "unit": "ms", "note": note},
        {"section": "router", "metric": "router: p99 latency", "value": float(np.percentile(routed, 99)) * 1000, "unit": "ms", "note": note},
        {"section": "router", "metric": "router added latency, p99", "value": float(added[99]), "unit": "ms", "note": "router p99 − direct p99"},
        {
            "section": "router",
            "metric": f"router / direct: throughput at {clients} clients",
            "value": ratio,
            "unit": "×",
            "baseline": float(np.median(speeds["direct"])),
            "ratio": ratio,
            "note": f"median of {ROUNDS} rounds; requests/s routed {' '.join(f'{x:.1f}' for x in speeds['router'])}, "
            f"direct {' '.join(f'{x:.1f}' for x in speeds['direct'])}; errors {errors['router']} / {errors['direct']} {first_error}; {setup}",
        },
        {"section": "router", "metric": "router: CPU per request", "value": router_cpu, "unit": "ms", "note": f"the router process's user + system CPU; {at}"},
        {"section": "router", "metric": "upstream: CPU per request, direct", "value": upstream_cpu["direct"], "unit": "ms", "note": f"HTTP, validation and sampling; {at}"},
        {"section": "router", "metric": "upstream: CPU per request, routed", "value": upstream_cpu["router"], "unit": "ms", "note": f"the same requests through the router; {at}"},
        {"section": "router", "metric": "native stream: first chunk", "value": first * 1000, "unit": "ms", "note": "median; 64 tokens, one request at a time"},
        {"section": "router", "metric": "native stream: last chunk", "value": last * 1000, "unit": "ms", "note": "median; 64 tokens, one request at a time"},
        {"section": "router", "metric": "native stream: first / last chunk", "value": first / last, "unit": "×", "note": "chunks leave as tokens are sampled (hand-over every few decode steps)"},
        {"section": "router", "metric": "routed stream: first / last chunk", "value": routed_first / routed_last, "unit": "×", "note": f"the upstream's chunks passed through; {routed_first * 1000:.0f} / {routed_last * 1000:.0f} ms"},
    ]  # fmt: skip


def run(quick: bool) -> list[dict[str, Any]]:
    clients = 50 if quick else 200
    limit_s = 240.0 if quick else 480.0
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, prompts = make_run(Path(tmp))
        batched = measure(run_dir, prompts, clients, limit_s)
        alone = measure(run_dir, prompts, clients, limit_s, "--no-batching")
        routed = router_rows(run_dir, prompts, clients, limit_s, quick)
    rows: list[dict[str, Any]] = []
    for mode, r in (("batched", batched), ("no batching", alone)):
        note = f"{clients} concurrent clients, 1 request each, max_tokens {MAX_TOKENS}; {r['batches']} batches"
        rows += [
            {"section": "serve", "metric": f"{mode}: errors", "value": r["errors"], "unit": "requests", "note": r["first_error"]},
            {"section": "serve", "metric": f"{mode}: p50 latency", "value": r["p50"], "unit": "s", "note": note},
            {"section": "serve", "metric": f"{mode}: p99 latency", "value": r["p99"], "unit": "s", "note": note},
            {"section": "serve", "metric": f"{mode}: throughput", "value": r["requests_per_s"], "unit": "requests/s", "note": f"{r['wall']:.1f} s wall"},
            {"section": "serve", "metric": f"{mode}: tokens/s", "value": r["tokens_per_s"], "unit": "tokens/s", "note": f"{r['tokens']} tokens generated"},
        ]  # fmt: skip
    rows += [
        {
            "section": "serve",
            "metric": "batched / no batching: throughput",
            "value": batched["requests_per_s"] / alone["requests_per_s"],
            "unit": "×",
            "baseline": alone["requests_per_s"],
            "ratio": batched["requests_per_s"] / alone["requests_per_s"],
            "note": f"largest batch {batched['largest_batch']} rows (--max-batch 64, --batch-wait-ms 5)",
        },
        {
            "section": "serve",
            "metric": "no batching / batched: p50 latency",
            "value": alone["p50"] / batched["p50"],
            "unit": "×",
            "note": "how many times longer a request waits without batching",
        },
        {
            "section": "serve",
            "metric": "clients",
            "value": clients,
            "unit": "clients",
            "note": "demo base model; loopback HTTP",
        },
    ]
    return rows + routed


if __name__ == "__main__":
    for row in run("--quick" in sys.argv):
        print(f"{row['metric']:<38} {row['value']:>10.3f} {row['unit']:<11} {row['note']}")
