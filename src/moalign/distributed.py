"""Ranks under `torchrun` / `accelerate launch`: the main process writes while the others wait, and work
that splits by rows (generation) is done in chunks, shared out between ranks and gathered in input order.

One process (no launcher, or a launcher that started one) takes the same code paths with a world of
size 1, so a recipe never branches on whether it is distributed. The run directory is assumed to be on
a filesystem every rank sees (one node, or a shared filesystem across nodes), as the Trainer's
checkpoints already require.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from moalign.errors import MoalignError, first_line
from moalign.run import read_json, write_json

T = TypeVar("T")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device() -> str:
    """This rank's device: its own GPU (LOCAL_RANK) under a launcher, else the GPU or the CPU."""
    from moalign.models import pick_device

    return pick_device("auto")


def _state():
    """accelerate's process state, set up once. On a machine without CUDA it must be told `cpu=True`, or a
    `torchrun` launch silently runs every rank alone (DistributedType.NO) instead of gloo DDP."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    if world_size() > 1:
        _state().wait_for_everyone()


def broadcast(value: T) -> T:
    """The main process's `value`, on every rank."""
    if world_size() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    _state()
    return broadcast_object_list([value])[0]


def gather(values: list[Any]) -> list[Any]:
    """Every rank's list, concatenated in rank order, on every rank."""
    if world_size() == 1:
        return list(values)
    from accelerate.utils import gather_object

    _state()
    return gather_object(list(values))


def run_on_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn` on the main process only (it writes files); the others wait and receive its result.

    An error on the main process reaches the others as a one-line MoalignError instead of leaving them
    waiting in a collective until the timeout (`--ddp_timeout`, which bounds how long they wait).
    """
    if world_size() == 1:
        return fn(*args, **kwargs)
    outcome: tuple[bool, Any] = (False, "the main process was interrupted")
    try:
        if is_main():
            try:
                outcome = (True, fn(*args, **kwargs))
            except BaseException as error:
                outcome = (False, first_line(error) or type(error).__name__)
                raise
    finally:
        outcome = broadcast(outcome)
    ok, value = outcome
    if not ok:
        raise MoalignError(f"the main process failed: {value}")
    return value


@contextmanager
def main_first() -> Iterator[None]:
    """The body runs on the main process first (it computes and caches, e.g. scores to parquet), then on the
    others, which find the cache. An error on the main process stops the others with one line."""
    if world_size() == 1:
        yield
        return
    if not is_main():
        ok, message = broadcast(None)
        if not ok:
            raise MoalignError(f"the main process failed: {message}")
        yield
        return
    try:
        yield
    except BaseException as error:
        broadcast((False, first_line(error) or type(error).__name__))
        raise
    broadcast((True, None))


def launch_warning(environ: dict[str, str] | None = None) -> str | None:
    """One line when `accelerate launch` started a single process although several were asked for.

    `accelerate launch --cpu --num_processes N` runs ONE process: accelerate's simple launcher sets
    MASTER_ADDR/MASTER_PORT (only done for N > 1 or several machines) and ACCELERATE_USE_CPU, but no
    WORLD_SIZE, which every real multi-process launcher (torchrun, accelerate's MULTI_CPU/GPU configs) sets.
    """
    env = os.environ if environ is None else environ
    if "ACCELERATE_USE_CPU" in env and "MASTER_ADDR" in env and int(env.get("WORLD_SIZE", "1")) <= 1:
        return (
            "accelerate launch started ONE process although several were asked for (--cpu with --num_processes "
            "runs one); on CPU use `--config_file configs/accelerate/cpu_2proc.yaml` or `torchrun --nproc_per_node N`"
        )
    return None


# ----------------------------------------------------------------------------- chunked, sharded work

CHUNK_INFO = "chunks.json"


def fingerprint(*parts: Any) -> str:
    """A short hash of a stage's inputs: chunks written for other inputs are not reused."""
    text = json.dumps(parts, sort_keys=True, default=lambda value: getattr(value, "__dict__", str(value)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _chunk_path(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:06d}.json"


def map_chunks(
    folder: Path,
    n_items: int,
    work: Callable[[int, int], list[Any]],
    key: str,
    chunk_size: int,
) -> tuple[list[Any], dict[str, Any]]:
    """`work(start, stop)` over rows [0, n_items) in chunks of `chunk_size`, resumable and shared out by rank.

    Each chunk's rows are saved (by the main process, atomically) as soon as a round of chunks is gathered,
    so an interruption loses at most one round; a rerun with the same `key` (a fingerprint of the inputs)
    does only the missing chunks, and one with another key starts over. In round r, rank i takes the
    (r·W + i)-th missing chunk; a chunk's result depends only on its rows, never on which rank made it.
    Returns every row in input order (on every rank) and the stage's statistics: `seconds` summed over the
    chunks of every invocation, and `wait_seconds`, how long the main process waited for the others.
    """
    if chunk_size < 1:
        raise MoalignError(f"generation_chunk_size must be ≥ 1, got {chunk_size}")  # the flag of every caller
    n_chunks = -(-n_items // chunk_size)

    def prepare() -> list[int]:
        info_path = folder / CHUNK_INFO
        if info_path.exists() and read_json(info_path).get("key") != key:
            shutil.rmtree(folder)  # chunks of other inputs (another model, prompts or settings)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(info_path, {"key": key, "items": n_items, "chunk_size": chunk_size})
        return [i for i in range(n_chunks) if not _chunk_path(folder, i).exists()]

    todo = run_on_main(prepare)
    size, me = world_size(), rank()
    wait = 0.0
    for start in range(0, len(todo), size):
        mine = todo[start + me] if start + me < len(todo) else None
        produced: list[Any] = []
        if mine is not None:
            began = time.perf_counter()
            rows = work(mine * chunk_size, min(n_items, (mine + 1) * chunk_size))
            produced = [{"index": mine, "rank": me, "seconds": time.perf_counter() - began, "rows": rows}]
        began = time.perf_counter()
        gathered = gather(produced)
        wait += time.perf_counter() - began
        if is_main():
            for chunk in gathered:
                write_json(_chunk_path(folder, chunk["index"]), chunk)
    barrier()  # every chunk file is on disk before any rank reads them
    rows, ranks, rank_seconds = [], {}, {}
    for index in range(n_chunks):
        chunk = read_json(_chunk_path(folder, index))
        rows.extend(chunk["rows"])
        key = str(chunk["rank"])
        ranks[key] = ranks.get(key, 0) + len(chunk["rows"])
        rank_seconds[key] = rank_seconds.get(key, 0.0) + chunk["seconds"]
    stats = {
        "seconds": sum(rank_seconds.values()),
        "wait_seconds": wait,
        "chunks": n_chunks,
        "resumed_chunks": n_chunks - len(todo),
        "world_size": size,
        "rows_per_rank": ranks,
        "seconds_per_rank": rank_seconds,
    }
    return rows, stats


def remove(folder: Path) -> None:
    """The main process deletes a folder (a finished stage's chunks or checkpoints); the others wait."""
    run_on_main(shutil.rmtree, folder, ignore_errors=True)
