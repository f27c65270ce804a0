"""Reductions that generated torch code calls: ``mean | sum | amax | amin | norm`` over ``dim``.

``dim`` is -1 (along rows: one value per row, kept as a size-1 dim), -2 (along columns) or None
(the whole tensor: a 0-d result). ``of`` is the operand's kind ("full", "rows", "cols", "scalar").

On an unsharded tensor each is one torch reduction. While a sharded parameter's kernels run
(``distributed.current()``), a reduction over the sharded dim of an operand that is split along it
combines every rank's partial result (an all-reduce of the row/column vector or the scalar), so
the value is the whole tensor's on every rank.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from optgen.runtime import distributed

__all__ = ["amax", "amin", "mean", "norm", "sum"]


def mean(x: torch.Tensor, dim: int | None, of: str) -> torch.Tensor:
    count = _across_shards(x, dim, of)
    if count is None:
        return x.mean() if dim is None else x.mean(dim=dim, keepdim=True)
    return _all_reduced(_local_sum(x, dim), dist.ReduceOp.SUM) / count


def sum(x: torch.Tensor, dim: int | None, of: str) -> torch.Tensor:  # noqa: A001 (the spec's name)
    if _across_shards(x, dim, of) is None:
        return _local_sum(x, dim)
    return _all_reduced(_local_sum(x, dim), dist.ReduceOp.SUM)


def amax(x: torch.Tensor, dim: int | None, of: str) -> torch.Tensor:
    return _extreme(x, dim, of, dist.ReduceOp.MAX, -math.inf)


def amin(x: torch.Tensor, dim: int | None, of: str) -> torch.Tensor:
    return _extreme(x, dim, of, dist.ReduceOp.MIN, math.inf)


def norm(x: torch.Tensor, dim: int | None, of: str) -> torch.Tensor:
    if _across_shards(x, dim, of) is None:
        return torch.linalg.vector_norm(x) if dim is None else torch.linalg.vector_norm(x, dim=dim, keepdim=True)
    return _all_reduced(_local_sum(x.square(), dim), dist.ReduceOp.SUM).sqrt()


def _local_sum(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    return x.sum() if dim is None else x.sum(dim=dim, keepdim=True)


def _extreme(x: torch.Tensor, dim: int | None, of: str, op: dist.ReduceOp, identity: float) -> torch.Tensor:
    reduce = torch.amax if op == dist.ReduceOp.MAX else torch.amin
    if x.numel() == 0:  # an empty shard contributes the identity of its operation
        shape = [] if dim is None else [1 if d == dim % x.ndim else n for d, n in enumerate(x.shape)]
        partial = x.new_full(shape, identity)
    else:
        partial = reduce(x) if dim is None else reduce(x, dim=dim, keepdim=True)
    return partial if _across_shards(x, dim, of) is None else _all_reduced(partial, op)


def _across_shards(x: torch.Tensor, dim: int | None, of: str) -> int | None:
    """The whole tensor's element count along the reduction when it spans shards, else None."""
    sharding = distributed.current()
    if sharding is None or of == "scalar":
        return None
    ndim = len(sharding.shape)
    split = of == "full" or (of == "rows" and sharding.dim != ndim - 1) or (of == "cols" and sharding.dim != ndim - 2)
    if not split or (dim is not None and dim % ndim != sharding.dim):
        return None
    shape = list(x.shape)
    shape[sharding.dim] = sharding.shape[sharding.dim]
    return math.prod(shape) if dim is None else shape[dim]


def _all_reduced(partial: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
    dist.all_reduce(partial, op=op, group=distributed.current().group)
    return partial
