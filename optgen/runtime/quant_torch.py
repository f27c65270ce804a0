"""Quantized state in plain torch: the reference every faster backend is tested against.

``QuantizedState`` holds what a quantized state tensor needs — packed codes (uint8), fp32 scales
and the scheme — and is what ``optimizer.state[p][key]`` holds.  ``dequantize`` returns float32;
``quantize_`` writes new values in place (codes and scales), with zero scales guarded so an
all-zero block reads back as zeros, never NaN.
"""

from __future__ import annotations

import math
import warnings

import torch

from optgen.codegen.quant import QuantScheme
from optgen.runtime import distributed
from optgen.runtime.state import QuantizedState

__all__ = ["QuantScheme", "QuantizedState", "dequantize", "load", "quantize_", "quantized_or_float", "store"]


def zeros(param: torch.Tensor, scheme: QuantScheme) -> QuantizedState:
    shape = param.shape
    numel = param.numel()
    codes = torch.zeros(scheme.code_bytes(numel), dtype=torch.uint8, device=param.device)
    scales = torch.zeros(scheme.scale_count(tuple(shape)), dtype=torch.float32, device=param.device)
    state = QuantizedState(codes, scales, scheme, shape)
    quantize_(state, torch.zeros(shape, device=param.device))  # the codes of exact zeros
    return state


def quantized_or_float(value: torch.Tensor, scheme: QuantScheme, numel_at_most: int) -> torch.Tensor | QuantizedState:
    """Fresh state: ``value`` itself for small tensors (keep_full_precision), else quantized."""
    if distributed.global_numel(value) <= numel_at_most:  # a shard's decision is its whole tensor's
        return value
    state = zeros(value, scheme)
    quantize_(state, value)
    return state


def load(value: torch.Tensor | QuantizedState) -> torch.Tensor:
    """A state tensor's value in float32, whatever its storage."""
    return dequantize(value) if isinstance(value, QuantizedState) else value.float()


def store(target: torch.Tensor | QuantizedState, value: torch.Tensor) -> None:
    """Write ``value`` into a state tensor in place, in its storage format."""
    if isinstance(target, QuantizedState):
        quantize_(target, value)
    else:
        target.copy_(value)


def _pack(index: torch.Tensor, bits: int) -> torch.Tensor:
    index = index.to(torch.uint8)
    if bits == 8:
        return index
    if index.numel() % 2:
        index = torch.cat([index, index.new_zeros(1)])
    pairs = index.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def _unpack(codes: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    if bits == 8:
        return codes.long()
    both = torch.stack([codes & 0xF, codes >> 4], dim=-1).view(-1)
    return both[:numel].long()


def element_scales(state: QuantizedState) -> torch.Tensor:
    """The scale of every element, shaped like the tensor (float32)."""
    normalize, block = state.scheme.layout(tuple(state.shape))
    numel = math.prod(state.shape)
    if normalize == "block":
        per_block = state.scales.repeat_interleave(block)[:numel]
        return per_block.view(state.shape)
    if normalize == "tensor":
        return state.scales.expand(numel).view(state.shape)
    return _rank1_scales(list(state.scales.split(list(state.shape))), state.shape)


def _rank1_scales(maxima: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    scale = None
    for dim, vector in enumerate(maxima):
        view = [1] * len(shape)
        view[dim] = shape[dim]
        vector = vector.view(view)
        scale = vector if scale is None else torch.minimum(scale, vector)
    return scale.expand(shape)


def dequantize(state: QuantizedState) -> torch.Tensor:
    index = _unpack(state.codes, state.scheme.bits, math.prod(state.shape))
    return state.table[index].view(state.shape) * element_scales(state)


def new_scales(state: QuantizedState, x: torch.Tensor) -> torch.Tensor:
    """The scales of ``x`` under the state's normalization (absmax per block / per dim / total)."""
    normalize, block = state.scheme.layout(tuple(state.shape))
    magnitude = x.detach().abs().float()
    if normalize == "block":
        flat = magnitude.reshape(-1)
        pad = (-flat.numel()) % block
        if pad:
            flat = torch.cat([flat, flat.new_zeros(pad)])
        return flat.view(-1, block).amax(dim=1)
    if normalize == "tensor":
        return distributed.all_reduce_max_(magnitude.amax().reshape(1))
    return torch.cat(distributed.rank1_maxima(magnitude))


def quantize_(state: QuantizedState, x: torch.Tensor) -> None:
    """Store ``x`` (any float dtype, shaped like the tensor) into ``state`` in place."""
    state.scales.copy_(new_scales(state, x))
    if not torch.compiler.is_compiling() and not bool(torch.isfinite(state.scales).all()):
        warnings.warn(
            f"non-finite values (NaN/Inf) reached quantized optimizer state {state.scheme.name} of shape "
            f"{tuple(state.shape)}: the affected blocks now dequantize to NaN/Inf. Check the gradients "
            "(clip them, or skip steps whose gradients are not finite, as torch.amp.GradScaler does).",
            RuntimeWarning,
            stacklevel=3,
        )
    scale = element_scales(state)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero blocks: 0/1, not 0/0
    normalized = (x.float() / safe).reshape(-1)
    index = torch.bucketize(normalized, state.midpoints)  # nearest entry: count of midpoints below
    state.codes.copy_(_pack(index, state.scheme.bits))
