"""Load test of `moalign serve`: many concurrent clients, with request batching and without.

The server runs in a subprocess on loopback (as a user would start it); 200 clients (quick: 50) each
send one completion request (max_tokens 32, its own seed and preference) at once. Reported per mode:
errors, p50 / p99 latency, requests/s and tokens/s, and the batched / unbatched ratio. The model is
the embedded demo's base model.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

MAX_TOKENS = 32
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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """`moalign serve` in a subprocess on 127.0.0.1, stopped (by its own pid) on exit."""

    def __init__(self, run_dir: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "moalign.cli", "serve", str(run_dir), "--port", str(self.port)]
        self.command = [*command, "--log-level", "warning", *flags]

    def __enter__(self) -> ServerProcess:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.setdefault("OMP_NUM_THREADS", THREADS)
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


async def load(url: str, prompts: list[str], clients: int, limit_s: float) -> dict[str, Any]:
    """`clients` requests at once, one per client; latencies, errors and generated tokens."""

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

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=limit_s, limits=limits) as http:
        start = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(one(http, i) for i in range(clients))), limit_s + 10)
        wall = time.perf_counter() - start
    latencies = np.array([r[0] for r in results])
    errors = [r[2] for r in results if r[2]]
    return {
        "wall": wall,
        "p50": float(np.percentile(latencies, 50)),
        "p99": float(np.percentile(latencies, 99)),
        "requests_per_s": (clients - len(errors)) / wall,
        "tokens_per_s": sum(r[1] for r in results) / wall,
        "tokens": sum(r[1] for r in results),
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


def run(quick: bool) -> list[dict[str, Any]]:
    clients = 50 if quick else 200
    limit_s = 240.0 if quick else 480.0
    with tempfile.TemporaryDirectory() as tmp:
        run_dir, prompts = make_run(Path(tmp))
        batched = measure(run_dir, prompts, clients, limit_s)
        alone = measure(run_dir, prompts, clients, limit_s, "--no-batching")
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
    return rows


if __name__ == "__main__":
    for row in run("--quick" in sys.argv):
        print(f"{row['metric']:<38} {row['value']:>10.3f} {row['unit']:<11} {row['note']}")
