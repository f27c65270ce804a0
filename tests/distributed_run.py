"""Run a function on N gloo ranks (CPU) from a test: bounded time, no leftover processes.

Each rank's return value is written with torch.save and handed back as a list, rank order.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out: str, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": result}, Path(out) / f"rank{rank}.pt")
    except BaseException:
        torch.save({"error": traceback.format_exc()}, Path(out) / f"rank{rank}.pt")
        raise
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, *args, timeout: float = 120.0) -> list:
    """``fn(rank, world, *args)`` on ``world`` processes; returns their results in rank order."""
    with tempfile.TemporaryDirectory() as out:
        context = mp.start_processes(
            _entry, args=(world, free_port(), out, fn, args), nprocs=world, join=False, start_method="spawn"
        )
        deadline, finished = time.monotonic() + timeout, False
        try:
            while not finished and time.monotonic() < deadline:  # join() returns as each rank ends
                finished = context.join(timeout=max(deadline - time.monotonic(), 0.01))
        except mp.ProcessExitedException:
            finished = True  # a rank failed: its saved traceback below says why
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
        if not finished:
            raise TimeoutError(f"{world} ranks did not finish within {timeout:.0f} s (killed)")
        results = []
        for rank in range(world):
            path = Path(out) / f"rank{rank}.pt"
            if not path.exists():
                raise RuntimeError(f"rank {rank} of {world} ended without a result (killed or timed out)")
            saved = torch.load(path, weights_only=False)
            if "error" in saved:
                raise RuntimeError(f"rank {rank} of {world} failed:\n{saved['error']}")
            results.append(saved["ok"])
        return results
