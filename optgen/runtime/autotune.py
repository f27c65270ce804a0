"""Launch configurations of the Triton kernels: persisted per GPU, chosen by size bucket.

A configuration is ``{"BLOCK": elements per program, "num_warps": w, "num_stages": s}``. Tables
are JSON, keyed ``device name -> spec sha256 (16 hex digits) -> kernel -> size bucket``, where the
bucket of ``numel`` is ``round(log2(numel))``. At run time the closest bucket is used, from:

1. the user's table, ``cache_dir()/autotune.json`` (written by ``optgen autotune``);
2. the shipped table, ``optgen/runtime/autotune_defaults.json`` (``"*"`` matches any device/spec);
3. ``DEFAULT_CONFIG``.

Nothing is tuned on the training path: tuning runs only inside ``tuning()`` (the CLI uses it),
through ``triton.autotune`` with ``restore_value`` on every tensor a kernel mutates.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = {"BLOCK": 1024, "num_warps": 4, "num_stages": 1}
SHIPPED = Path(__file__).with_name("autotune_defaults.json")
BLOCKS = (256, 512, 1024, 2048, 4096)
WARPS = (2, 4, 8)
STAGES = (1, 2)


def size_bucket(numel: int) -> int:
    return max(0, round(math.log2(max(numel, 1))))


def user_table_path() -> Path:
    from optgen.codegen.build import cache_dir

    return cache_dir() / "autotune.json"


def read_table(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as error:
        raise RuntimeError(f"cannot read the autotune table {path}: {error}; delete it to start afresh") from error


@functools.cache
def _shipped() -> dict[str, Any]:
    return read_table(SHIPPED)


_user_tables: dict[Path, dict[str, Any]] = {}


def _user() -> dict[str, Any]:
    path = user_table_path()
    if path not in _user_tables:
        _user_tables[path] = read_table(path)
    return _user_tables[path]


def closest(buckets: dict[str, dict], numel: int) -> dict | None:
    if not buckets:
        return None
    want = size_bucket(numel)
    best = min(buckets, key=lambda b: (abs(int(b) - want), -int(b)))
    return buckets[best]


def lookup(table: dict[str, Any], device: str, spec: str, kernel: str, numel: int) -> dict | None:
    for dev in (device, "*"):
        for sp in (spec[:16], "*"):
            for name in (kernel, "*"):
                found = closest(table.get(dev, {}).get(sp, {}).get(name, {}), numel)
                if found is not None:
                    return found
    return None


def config_for(device: str, spec: str, kernel: str, numel: int) -> dict[str, int]:
    """The launch configuration for one kernel launch (no tuning here)."""
    for table in (_user(), _shipped()):
        found = lookup(table, device, spec, kernel, numel)
        if found is not None:
            return {**DEFAULT_CONFIG, **found}
    return dict(DEFAULT_CONFIG)


def record(path: Path, device: str, spec: str, kernel: str, numel: int, config: dict[str, int]) -> None:
    """Merge one tuned entry into the table at ``path`` (atomic replace)."""
    table = read_table(path)
    table.setdefault(device, {}).setdefault(spec[:16], {}).setdefault(kernel, {})[str(size_bucket(numel))] = config
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".autotune-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
    _user_tables.pop(path, None)


def candidate_configs(multiple: int) -> list[dict[str, int]]:
    """Block sizes a kernel can take (whole quantization blocks per tile) x warps x stages."""
    return [
        {"BLOCK": b, "num_warps": w, "num_stages": s}
        for b in BLOCKS
        if b % multiple == 0
        for w in WARPS
        for s in STAGES
    ] or [{"BLOCK": multiple, "num_warps": 4, "num_stages": 1}]


def cpu_bench(fn: Callable[[], Any], quantiles=None, repeats: int = 3, **_: Any) -> float | list[float]:
    """``do_bench`` for Triton's interpreter (no CUDA events): wall-clock median, milliseconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    median = statistics.median(times)
    return [median, min(times), max(times)] if quantiles else median


class Session:
    """Active inside ``tuning()``: launches go through ``triton.autotune`` and results are kept."""

    def __init__(self, path: Path, configs: Callable[[int], list[dict[str, int]]] | None = None):
        self.path = path
        self.configs = configs or candidate_configs
        self.chosen: list[tuple[str, str, str, int, dict[str, int]]] = []  # device, spec, kernel, numel, config

    def keep(self, device: str, spec: str, kernel: str, numel: int, config: dict[str, int]) -> None:
        self.chosen.append((device, spec, kernel, numel, config))
        record(self.path, device, spec, kernel, numel, config)


_session: Session | None = None


def active_session() -> Session | None:
    return _session


@contextlib.contextmanager
def tuning(path: Path | None = None, configs: Callable[[int], list[dict[str, int]]] | None = None) -> Iterator[Session]:
    """Tune every Triton launch made inside the block and persist the winners to ``path``."""
    global _session
    previous, _session = _session, Session(path or user_table_path(), configs)
    try:
        yield _session
    finally:
        _session = previous


def tuning_shape(numel: int) -> tuple[int, ...]:
    """A matrix of about ``numel`` elements (rank-1 layouts need two dims)."""
    cols = 1024 if numel >= 2048 else max(numel, 1)
    return (-(-numel // cols), cols)


def tune_spec(
    spec: str, sizes: list[int], path: Path | None = None, progress: Callable[[str], None] | None = None
) -> list[tuple[str, str, str, int, dict[str, int]]]:
    """Tune every Triton kernel of ``spec`` at each size on this machine's GPU (or, under
    TRITON_INTERPRET=1, on the CPU) and persist the winners. Returns the chosen rows."""
    import torch

    from optgen.runtime.loader import load

    if torch.cuda.is_available():
        device = "cuda"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device = "cpu"
    else:
        raise RuntimeError("optgen autotune needs a CUDA GPU (or TRITON_INTERPRET=1 to exercise it on the CPU)")
    cls = load(spec)
    with tuning(path) as session:
        for i, numel in enumerate(sizes):
            shape = tuning_shape(numel)
            if progress:
                progress(f"[{i + 1}/{len(sizes)}] {spec}: tuning {math.prod(shape)} elements {shape}")
            param = torch.nn.Parameter(torch.randn(shape, device=device))
            optimizer = cls([param], backend="triton")
            param.grad = torch.randn_like(param)
            optimizer.step()  # the state is created, then every kernel launch is tuned
    return session.chosen
