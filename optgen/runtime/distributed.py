"""Sharded parameters (FSDP2's DTensor shards): each rank steps its own shard, no gather.

The kernels run on ``param.to_local()`` and local state. Element-wise work and block-wise
quantization need nothing else. Statistics that span the whole tensor are reduced across the
shard group while a kernel runs (``sharded(...)`` makes the sharding visible to the runtime
helpers): rank-1 maxima of every dim but the sharded one, per-tensor maxima, reductions over the
sharded dim (``reductions.py``). Matrix primitives (whitening) gather the whole matrix on every rank
and keep their shard of the result (``on_whole``).

State is kept as DTensors placed like their parameter (rows/cols/scalar state replicated where
the sharded dim was reduced away), so ``torch.distributed.checkpoint`` can save on N ranks and load
on M. Block-wise quantized state is cut into blocks per shard: blocks start at each shard's first
element, so the codes equal an unsharded run's exactly when every shard holds a whole number of
blocks (e.g. ``Shard(0)`` of a 4096×4096 weight on any power-of-two number of ranks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

try:  # DTensor exists in every torch this package supports; guarded for minimal builds
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None


@dataclass(frozen=True)
class Sharding:
    """How a parameter is split: along ``dim`` over ``group``; ``shape`` is the whole tensor's."""

    group: dist.ProcessGroup
    dim: int
    shape: torch.Size
    mesh: object
    placements: tuple

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# The sharding of the parameter whose kernels are running. A plain global, not a ContextVar:
# torch.compile traces reads of it, and an optimizer steps its parameters one at a time.
_current: Sharding | None = None


def is_dtensor(value: object) -> bool:
    return DTensor is not None and isinstance(value, DTensor)


def sharding_of(param: torch.Tensor) -> Sharding | None:
    """The sharding of a DTensor parameter, or None for a plain (or fully replicated) tensor."""
    if not is_dtensor(param):
        return None
    mesh, placements = param.device_mesh, tuple(param.placements)
    if all(p.is_replicate() for p in placements):
        return None
    if mesh.ndim != 1 or not placements[0].is_shard():
        raise NotImplementedError(
            f"optgen supports parameters sharded along one dim of a 1-D device mesh (FSDP2's Shard(0)); "
            f"got placements {placements} on a {mesh.ndim}-D mesh"
        )
    return Sharding(mesh.get_group(0), placements[0].dim % param.ndim, param.shape, mesh, placements)


@contextmanager
def sharded(sharding: Sharding | None) -> Iterator[None]:
    global _current
    outer, _current = _current, sharding
    try:
        yield
    finally:
        _current = outer


def current() -> Sharding | None:
    """The sharding of the parameter whose kernel is running (None when it is not sharded)."""
    return _current


class Deferred(Exception):
    """Raised by ``on_whole`` while collecting: the parameter's first matrix stage, not yet computed.

    Generated code stores nothing before its last stage, so abandoning ``update`` here is harmless.
    """

    def __init__(self, compute: Callable, args: tuple):
        super().__init__("matrix stage deferred")
        self.compute, self.args = compute, args


# How on_whole answers while a sharded parameter's kernels run: "collect" (raise Deferred), or the
# precomputed local result of its first matrix stage (from ``spread_whole``), else gather and compute.
_collecting = False
_precomputed: list = []


@contextmanager
def collecting() -> Iterator[None]:
    global _collecting
    _collecting = True
    try:
        yield
    finally:
        _collecting = False


@contextmanager
def precomputed(result) -> Iterator[None]:
    _precomputed[:] = [result]
    try:
        yield
    finally:
        _precomputed.clear()


def on_whole(compute: Callable, *args):
    """``compute(*args)`` — a matrix stage — of whole matrices; on a shard, this rank's part of it.

    Args that are shards (the parameter's ndim) stand for their whole tensors. Unsharded (no
    ``sharded`` context): ``compute(*args)``. Sharded: the result ``spread_whole`` computed for this
    parameter, else every rank gathers the whole matrices and computes the same result.
    """
    sharding = current()
    if sharding is None:
        return compute(*args)
    if _collecting:
        raise Deferred(compute, args)
    if _precomputed:
        return _precomputed.pop()
    spread = [
        _as_dtensor(a, sharding).full_tensor() if isinstance(a, torch.Tensor) and a.ndim == len(sharding.shape) else a
        for a in args
    ]
    with sharded(None):
        return _local_part(compute(*spread), sharding, dist.get_rank(sharding.group))


def spread_whole(calls: list[tuple[Sharding, Callable, tuple]]) -> list:
    """Compute many parameters' matrix stages with the work spread over ranks.

    Call ``i`` belongs to rank ``i % world``: every rank sends it its shards (gather), the owner
    computes the stage on the whole matrices, and sends each rank its part back (scatter). Every
    rank passes the same calls in the same order (its parameters' order). Returns this rank's
    local results, as ``on_whole`` would.
    """
    if not calls:
        return []
    group = calls[0][0].group
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    owner = [i % world for i in range(len(calls))]
    wholes = [
        [
            _gather_whole(a, sharding, dist.get_global_rank(group, owner[i]), owner[i] == rank)
            if isinstance(a, torch.Tensor) and a.ndim == len(sharding.shape)
            else a
            for a in args
        ]
        for i, (sharding, _, args) in enumerate(calls)
    ]
    computed = {}  # call index -> this rank's whole results
    with sharded(None):
        for i, (_, compute, _) in enumerate(calls):
            if owner[i] == rank:
                computed[i] = compute(*wholes[i])
    del wholes
    # The result's structure (a tensor or a tuple of them) is known once computed: tell every rank.
    layouts = [None] * world
    dist.all_gather_object(layouts, {i: _layout(r) for i, r in computed.items()}, group=group)
    results = []
    for i, (sharding, _, args) in enumerate(calls):
        count = layouts[owner[i]][i]
        outputs = computed.get(i)
        outputs = (outputs,) if count is None and outputs is not None else outputs
        like = next(a for a in args if isinstance(a, torch.Tensor) and a.ndim == len(sharding.shape))
        src = dist.get_global_rank(group, owner[i])
        parts = tuple(
            _scatter_part(None if outputs is None else outputs[k], sharding, src, like) for k in range(count or 1)
        )
        results.append(parts if count is not None else parts[0])
    return results


def _layout(result) -> int | None:
    """None for a single tensor, else the length of the tuple."""
    return len(result) if isinstance(result, tuple) else None


def _split(sharding: Sharding) -> list[int]:
    """Each rank's size along the sharded dim: torch.chunk's split, as FSDP2's Shard(dim) makes it."""
    world, size = dist.get_world_size(sharding.group), sharding.shape[sharding.dim]
    chunk = math.ceil(size / world)
    return [max(0, min(chunk, size - r * chunk)) for r in range(world)]


def _padded(shard: torch.Tensor, sharding: Sharding) -> torch.Tensor:
    """``shard`` padded with zeros along the sharded dim to the largest rank's size (gloo needs equal sizes)."""
    shape = list(shard.shape)
    shape[sharding.dim] = max(_split(sharding))
    out = shard.new_zeros(shape)
    out.narrow(sharding.dim, 0, shard.shape[sharding.dim]).copy_(shard)
    return out.contiguous()


def _gather_whole(shard: torch.Tensor, sharding: Sharding, owner: int, mine: bool) -> torch.Tensor | None:
    padded = _padded(shard, sharding)
    pieces = [torch.empty_like(padded) for _ in _split(sharding)] if mine else None
    dist.gather(padded, pieces, dst=owner, group=sharding.group)
    if not mine:
        return None
    return torch.cat([p.narrow(sharding.dim, 0, n) for p, n in zip(pieces, _split(sharding))], dim=sharding.dim)


def _scatter_part(whole: torch.Tensor | None, sharding: Sharding, owner: int, like: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``whole`` (given on the owner only), as float32."""
    sizes = _split(sharding)
    shape = list(sharding.shape)
    shape[sharding.dim] = max(sizes)
    received = torch.empty(shape, dtype=torch.float32, device=like.device)
    pieces = None
    if whole is not None:
        pieces = [_padded(_local_part(whole.float(), sharding, r), sharding) for r in range(len(sizes))]
    dist.scatter(received, pieces, src=owner, group=sharding.group)
    return received.narrow(sharding.dim, 0, sizes[dist.get_rank(sharding.group)])


def _local_part(whole, sharding: Sharding, rank: int):
    """Rank ``rank``'s rows (along the sharded dim) of a whole result, or of each of a tuple's."""
    if isinstance(whole, tuple):
        return tuple(_local_part(w, sharding, rank) for w in whole)
    sizes = _split(sharding)
    return whole.narrow(sharding.dim, sum(sizes[:rank]), sizes[rank])


def _as_dtensor(shard: torch.Tensor, sharding: Sharding) -> torch.Tensor:
    return DTensor.from_local(
        shard,
        sharding.mesh,
        sharding.placements,
        run_check=False,
        shape=sharding.shape,
        stride=_contiguous(sharding.shape),
    )


def global_numel(local: torch.Tensor) -> int:
    """Elements of the whole tensor ``local`` is a shard of (keep_full_precision decides on it)."""
    sharding = current()
    return sharding.numel if sharding is not None and local.ndim == len(sharding.shape) else local.numel()


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    sharding = current()
    if sharding is not None:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=sharding.group)
    return tensor


def rank1_maxima(magnitude: torch.Tensor) -> list[torch.Tensor]:
    """Per-dim maxima of a non-negative tensor; under sharding, those of the whole tensor (the
    sharded dim's own vector is local: each of its entries is a max over dims the shard holds whole)."""
    sharding = current()
    dims = range(magnitude.ndim)
    maxima = []
    for keep in dims:
        others = [d for d in dims if d != keep]
        vector = (
            magnitude.amax(dim=others)
            if magnitude.numel()
            else magnitude.new_zeros(magnitude.shape[keep])  # an empty shard: identity of max over |x|
        )
        if sharding is not None and keep != sharding.dim:
            dist.all_reduce(vector, op=dist.ReduceOp.MAX, group=sharding.group)
        maxima.append(vector)
    return maxima


# -- state placement ---------------------------------------------------------------------------


def state_placement(kind: str, sharding: Sharding, ndim: int) -> tuple:
    """Placements of a state tensor of ``kind`` ("full", "rows", "cols", "scalar") beside a
    parameter sharded as ``sharding``: sharded like it unless the kind reduced the sharded dim."""
    reduced = {"full": None, "rows": ndim - 1, "cols": ndim - 2}.get(kind, "all")
    if reduced == "all" or reduced == sharding.dim:
        return (Replicate(),)
    return (Shard(sharding.dim),)


def as_dtensor(local: torch.Tensor, kind: str, sharding: Sharding) -> torch.Tensor:
    """Wrap a local state tensor as a DTensor placed beside its parameter."""
    placements = state_placement(kind, sharding, len(sharding.shape))
    shape = list(local.shape)
    if placements[0].is_shard():
        shape[sharding.dim] = sharding.shape[sharding.dim]
    return DTensor.from_local(
        local, sharding.mesh, placements, run_check=False, shape=torch.Size(shape), stride=_contiguous(shape)
    )


def _contiguous(shape: list[int]) -> tuple[int, ...]:
    strides, running = [], 1
    for size in reversed(shape):
        strides.append(running)
        running *= max(size, 1)
    return tuple(reversed(strides))


def local(value):
    """The local shard of a DTensor; anything else unchanged."""
    return value.to_local() if is_dtensor(value) else value


# -- state_dict: a shard's quantized state in a form torch.distributed.checkpoint can reshard ------


def saved_quantized(saved: dict, sharding: Sharding, local_shape: torch.Size) -> dict:
    """Codes and block scales become 1-D DTensors over the whole tensor's layout (each rank holds
    its shard's span); rank-1 maxima are gathered whole (a few floats per row/column) and
    replicated; ``shape`` is the whole tensor's. Loading on any number of ranks slices it back."""
    from optgen.runtime.state import scheme_from_name

    scheme = scheme_from_name(saved["scheme"])
    normalize, block = scheme.layout(tuple(sharding.shape))
    out = dict(saved, shape=list(sharding.shape))
    out["codes"] = _span_dtensor(saved["codes"], math.ceil(sharding.numel * scheme.bits / 8), sharding, "codes")
    if normalize == "block":
        out["scales"] = _span_dtensor(saved["scales"], math.ceil(sharding.numel / block), sharding, "block scales")
    elif normalize == "rank1":
        maxima = list(saved["scales"].split(list(local_shape)))
        pieces = [None] * dist.get_world_size(sharding.group)
        dist.all_gather_object(pieces, maxima[sharding.dim].cpu(), group=sharding.group)
        maxima[sharding.dim] = torch.cat(pieces).to(saved["scales"].device)
        out["scales"] = DTensor.from_local(torch.cat(maxima), sharding.mesh, (Replicate(),), run_check=False)
    else:  # per-tensor: one all-reduced maximum, the same on every rank
        out["scales"] = DTensor.from_local(saved["scales"], sharding.mesh, (Replicate(),), run_check=False)
    return out


def loaded_quantized(saved: dict, param: torch.Tensor) -> dict:
    """Inverse of ``saved_quantized`` for the shard ``param`` holds (or the whole tensor)."""
    from optgen.runtime.state import scheme_from_name

    out = dict(saved, codes=local(saved["codes"]), scales=local(saved["scales"]))
    sharding = sharding_of(param)
    if sharding is None:
        return out
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    scheme = scheme_from_name(saved["scheme"])
    if scheme.layout(tuple(param.shape))[0] == "rank1" and tuple(saved["shape"]) == tuple(param.shape):
        maxima = list(out["scales"].split(list(param.shape)))
        start = offset[sharding.dim]
        maxima[sharding.dim] = maxima[sharding.dim][start : start + shape[sharding.dim]]
        out["scales"] = torch.cat(maxima)
    out["shape"] = list(shape)
    return out


def _span_dtensor(shard: torch.Tensor, length: int, sharding: Sharding, what: str) -> torch.Tensor:
    """``shard`` as its rank's part of a 1-D DTensor of ``length`` (torch.chunk's split)."""
    world, rank = dist.get_world_size(sharding.group), dist.get_rank(sharding.group)
    chunk = math.ceil(length / world)
    expected = max(0, min(chunk, length - rank * chunk))
    if shard.numel() != expected:
        raise NotImplementedError(
            f"cannot save quantized {what} of a sharded {tuple(sharding.shape)} parameter for resharding: this "
            f"rank holds {shard.numel()} of {length}, not an even split ({expected}). Shards must hold whole "
            "quantization blocks: shard a dim whose size the number of ranks divides, with a block size that "
            "divides each shard's element count"
        )
    return DTensor.from_local(
        shard.reshape(-1), sharding.mesh, (Shard(0),), run_check=False, shape=torch.Size([length]), stride=(1,)
    )
