"""Spawn gloo ranks on CPU from inside a test (OLMo-core's run_distributed_test, our way).

Ranks are forked from the test process (no re-import, so a 2-rank test costs well under a
second of start-up) and run with one torch thread each: forking after OpenMP has run is safe
only when the child stays single-threaded, and 2 cores are shared by all ranks anyway.
"""

from __future__ import annotations

import faulthandler
import io
import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world_size: int, port: int, queue, timeout: float, backend: str, args) -> None:
    # A rank stuck in a collective prints where it is stuck instead of hanging silently.
    faulthandler.dump_traceback_later(timeout, exit=True)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), GLOO_SOCKET_IFNAME="lo",
                      OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=90))
        result = fn(rank, world_size, *args)
        buf = io.BytesIO()
        torch.save(result, buf)  # tensors by value: a shared-memory handle would die with this process
        queue.put((rank, None, buf.getvalue()))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit from a test helper
        queue.put((rank, traceback.format_exc(), None))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        queue.close()
        queue.join_thread()  # flush the result through the pipe before the hard exit below
        os._exit(0)  # skip atexit handlers inherited from pytest


def run_distributed(fn: Callable[..., Any], world_size: int = 2, *args: Any, timeout: float = 180,
                    backend: str = "gloo", spawn_env: dict[str, str] | None = None) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` ranks; returns each rank's result.

    nccl ranks are spawned, not forked (CUDA cannot be used in a forked child), and so are ranks
    given `spawn_env` (environment read once at start-up, e.g. by torch's or glibc's allocator);
    `fn` must then be importable from its module."""
    ctx = mp.get_context("spawn" if backend == "nccl" or spawn_env is not None else "fork")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, queue, timeout - 5, backend, args))
             for r in range(world_size)]
    saved = {k: os.environ.get(k) for k in spawn_env or {}}
    os.environ.update(spawn_env or {})
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        for _ in range(world_size):
            try:
                rank, err, payload = queue.get(timeout=max(deadline - time.monotonic(), 0.1))
            except queue_mod.Empty:
                if errors:
                    break
                raise
            if err:
                errors.append(f"rank {rank}:\n{err}")
                # The first error is often a peer's broken connection: give the rank that
                # failed first a moment to report too, then stop waiting on stuck ones.
                deadline = min(deadline, time.monotonic() + 10)
                continue
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise AssertionError("\n".join(errors))
    return [results[r] for r in range(world_size)]
