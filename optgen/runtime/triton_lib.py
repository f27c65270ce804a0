"""Hand-written Triton helpers the generated kernels call: quantized layouts, packing, rounding.

Only generated ``triton_<spec>.py`` modules import this (it imports triton). The storage format is
the one in ``optgen/runtime/quant_torch.py``: codes index the sorted table, 4-bit codes are packed
two per byte with the even element in the low nibble, block scales are the absmax of B consecutive
row-major elements, rank-1 scales are the per-dim maxima concatenated in dim order (an element's
scale is the minimum over its dims), a per-tensor scale is one number.

Rank-1 shapes are passed as four dims ``s0..s3`` right-aligned (a 2-D ``(R, C)`` tensor is
``1, 1, R, C`` with ``NDIM = 2``).
"""

import triton
import triton.language as tl

# Layout of one state for one parameter: a constexpr kernel argument (the kernel specializes on it).
FLOAT = tl.constexpr(0)  # kept in full precision (keep_full_precision, or a float32/bfloat16 store)
BLOCK = tl.constexpr(1)
RANK1 = tl.constexpr(2)
TENSOR = tl.constexpr(3)


# Only language builtins and these helpers are called: triton's own @jit library functions
# (tl.max, tl.cdiv, tl.zeros) stay compiled-only when triton was imported before TRITON_INTERPRET
# was set, and then cannot run inside an interpreted kernel.


@triton.jit
def _maximum(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)  # a NaN reaches the scale, as torch.amax


# Combine functions of the reduction kernels (tl.reduce). Sums use triton's own (what tl.sum uses):
# the interpreter recognizes it and sums with numpy instead of calling a Python combine per element
# (it is passed, never called, so it works when triton was imported before TRITON_INTERPRET was set).
# max / min keep NaN, as torch.amax / amin do.
add = tl.standard._sum_combine


@triton.jit
def maximum(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def minimum(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def load_float(ptr, offs, mask):
    """Element values in float32, whatever the storage dtype."""
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def round_to_bfloat16(x):
    """float32 -> bfloat16, round to nearest even, NaN kept. Written with integer ops because
    Triton's interpreter truncates ``x.to(tl.bfloat16)`` (and its "rtne" mode rounds ties up);
    on a GPU this is the same rounding as the native cast and as torch's ``copy_``."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def store_float(ptr, offs, x, mask):
    """Store float32 ``x`` in the pointer's dtype (rounding to nearest, as torch's ``copy_``)."""
    if ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr + offs, round_to_bfloat16(x), mask=mask)
    else:
        tl.store(ptr + offs, x.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def load_codes(codes_ptr, offs, mask, BITS: tl.constexpr):
    """The code (table index) of each element, int32."""
    if BITS == 8:
        return tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    byte = tl.load(codes_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    return (byte >> ((offs % 2) * 4).to(tl.int32)) & 0xF


@triton.jit
def store_codes(codes_ptr, code, start, mask, numel, BITS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Store one tile's codes; a 4-bit tile (even start, even size) packs pairs into bytes."""
    code = tl.where(mask, code, 0)  # the padding nibble of an odd-sized tensor is code 0
    if BITS == 8:
        tl.store(codes_ptr + start + tl.arange(0, BLOCK_SIZE), code.to(tl.uint8), mask=mask)
    else:
        even, odd = tl.split(tl.reshape(code, [BLOCK_SIZE // 2, 2]))
        byte_offs = start // 2 + tl.arange(0, BLOCK_SIZE // 2)
        tl.store(codes_ptr + byte_offs, (even | (odd << 4)).to(tl.uint8), mask=byte_offs < (numel + 1) // 2)


@triton.jit
def rank1_scale(scales_ptr, offs, mask, s0, s1, s2, s3, NDIM: tl.constexpr):
    """min over dims of the dim's max vector at the element's index along that dim."""
    i3 = offs % s3
    rest = offs // s3
    i2 = rest % s2
    rest = rest // s2
    i1 = rest % s1
    i0 = rest // s1
    scale = tl.full(offs.shape, float("inf"), tl.float32)
    start = 0
    if NDIM >= 4:
        scale = tl.minimum(scale, tl.load(scales_ptr + start + i0, mask=mask, other=1.0))
        start += s0
    if NDIM >= 3:
        scale = tl.minimum(scale, tl.load(scales_ptr + start + i1, mask=mask, other=1.0))
        start += s1
    scale = tl.minimum(scale, tl.load(scales_ptr + start + i2, mask=mask, other=1.0))
    start += s2
    scale = tl.minimum(scale, tl.load(scales_ptr + start + i3, mask=mask, other=1.0))
    return scale


@triton.jit
def element_scale(
    scales_ptr, offs, mask, LAYOUT: tl.constexpr, QBLOCK: tl.constexpr, s0, s1, s2, s3, NDIM: tl.constexpr
):
    """The scale of each element under a block / rank-1 / per-tensor layout."""
    if LAYOUT == BLOCK:
        return tl.load(scales_ptr + offs // QBLOCK, mask=mask, other=1.0)
    elif LAYOUT == RANK1:
        return rank1_scale(scales_ptr, offs, mask, s0, s1, s2, s3, NDIM)
    else:
        return tl.load(scales_ptr + offs * 0, mask=mask, other=1.0)


@triton.jit
def reduce_maxima(new_scales_ptr, offs, magnitude, mask, LAYOUT: tl.constexpr, s0, s1, s2, s3, NDIM: tl.constexpr):
    """Stats pass: fold ``magnitude`` into the rank-1 (per-dim) or per-tensor maxima.
    NaN becomes +inf so a non-finite value reaches the scales instead of being dropped by max."""
    magnitude = tl.where(magnitude != magnitude, float("inf"), magnitude)
    magnitude = tl.where(mask, magnitude, 0.0)
    if LAYOUT == TENSOR:
        tl.atomic_max(new_scales_ptr, tl.reduce(magnitude, 0, _maximum))
    else:
        i3 = offs % s3
        rest = offs // s3
        i2 = rest % s2
        rest = rest // s2
        i1 = rest % s1
        i0 = rest // s1
        start = 0
        if NDIM >= 4:
            tl.atomic_max(new_scales_ptr + start + i0, magnitude, mask=mask)
            start += s0
        if NDIM >= 3:
            tl.atomic_max(new_scales_ptr + start + i1, magnitude, mask=mask)
            start += s1
        tl.atomic_max(new_scales_ptr + start + i2, magnitude, mask=mask)
        start += s2
        tl.atomic_max(new_scales_ptr + start + i3, magnitude, mask=mask)


@triton.jit
def block_scales(x, start, mask, scales_ptr, numel, QBLOCK: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Block-wise store: absmax of each block of this tile (a tile is whole blocks), stored in
    place of the old scales (already read by this program), and returned per element."""
    magnitude = tl.reshape(tl.where(mask, tl.abs(x), 0.0), [BLOCK_SIZE // QBLOCK, QBLOCK])
    per_block = tl.reduce(magnitude, 1, _maximum)
    block_ids = start // QBLOCK + tl.arange(0, BLOCK_SIZE // QBLOCK)
    tl.store(scales_ptr + block_ids, per_block, mask=block_ids < (numel + QBLOCK - 1) // QBLOCK)
    per_element = tl.broadcast_to(tl.reshape(per_block, [BLOCK_SIZE // QBLOCK, 1]), [BLOCK_SIZE // QBLOCK, QBLOCK])
    return tl.reshape(per_element, [BLOCK_SIZE])


@triton.jit
def normalized(x, scale):
    """x / scale with zero scales guarded (an all-zero block reads back as zeros, not NaN);
    IEEE division, as torch's, so ties at a midpoint fall the same way."""
    return tl.div_rn(x, tl.where(scale > 0, scale, 1.0))


@triton.jit
def search_midpoints(x, mids_ptr, NMIDS: tl.constexpr, BITS: tl.constexpr):
    """8-bit codes: the count of midpoints below x, by binary search over the midpoints table."""
    code = tl.full(x.shape, 0, tl.int32)
    step: tl.constexpr = 1 << (BITS - 1)
    for level in tl.static_range(BITS):
        width = step >> level  # not annotated: a constexpr cannot be reassigned across iterations
        probe = code + width - 1
        mid = tl.load(mids_ptr + probe, mask=probe < NMIDS, other=float("inf"))
        code = tl.where(mid < x, code + width, code)
    return code
