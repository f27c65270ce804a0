"""Independent float64 reference of 4-bit AdamW, written from ALGORITHMS.md §1 (not from optgen).

Storage layout it checks against (optgen's documented format): codes index a table sorted
ascending; 4-bit codes are packed two per byte with the even element in the low nibble; block
scales are the absmax of each block of B consecutive (row-major) elements, the last block padded;
rank-1 scales are the per-dimension max vectors concatenated in dimension order.
"""

from __future__ import annotations

import numpy as np

QUANTIZE_ABOVE = 4096  # tensors with <= 4096 elements keep full-precision state


def dynamic_exponent_table(bits: int, signed: bool, zero: bool = True) -> np.ndarray:
    entries = [1.0] + ([0.0] if zero else [])
    for level in range(bits - 1):
        pieces = 2**level if signed else 2 ** (level + 1)
        edges = np.linspace(0.1, 1.0, pieces + 1)
        means = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (-(bits - 2 - level))
        entries += list(means) + (list(-means) if signed else [])
    return np.sort(np.array(entries, dtype=np.float64))


def linear_nozero_table(bits: int) -> np.ndarray:
    return np.arange(1, 2**bits + 1, dtype=np.float64) / 2**bits


def nearest(normalized: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Index of the nearest table entry (ties go to the upper entry)."""
    mids = (table[:-1] + table[1:]) / 2
    return np.searchsorted(mids, normalized, side="left")


def distance_to_tie(normalized: np.ndarray, table: np.ndarray) -> np.ndarray:
    mids = (table[:-1] + table[1:]) / 2
    return np.min(np.abs(normalized[..., None] - mids), axis=-1)


def pack4(index: np.ndarray) -> np.ndarray:
    flat = index.reshape(-1).astype(np.uint8)
    if flat.size % 2:
        flat = np.concatenate([flat, [0]]).astype(np.uint8)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def unpack4(codes: np.ndarray, numel: int) -> np.ndarray:
    both = np.stack([codes & 0xF, codes >> 4], axis=-1).reshape(-1)
    return both[:numel].astype(np.int64)


class BlockQuantizer:
    def __init__(self, table: np.ndarray, block: int):
        self.table, self.block = table, block

    def scales_of(self, x: np.ndarray) -> np.ndarray:
        flat = np.abs(x).reshape(-1)
        padded = np.concatenate([flat, np.zeros((-flat.size) % self.block)])
        return padded.reshape(-1, self.block).max(axis=1)

    def element_scales(self, scales: np.ndarray, shape) -> np.ndarray:
        return np.repeat(scales, self.block)[: int(np.prod(shape))].reshape(shape)


class Rank1Quantizer:
    def __init__(self, table: np.ndarray):
        self.table = table

    def scales_of(self, x: np.ndarray) -> np.ndarray:
        a = np.abs(x)
        return np.concatenate([a.max(axis=tuple(d for d in range(a.ndim) if d != keep)) for keep in range(a.ndim)])

    def element_scales(self, scales: np.ndarray, shape) -> np.ndarray:
        out = None
        start = 0
        for dim, size in enumerate(shape):
            view = [1] * len(shape)
            view[dim] = size
            vector = scales[start : start + size].reshape(view)
            start += size
            out = vector if out is None else np.minimum(out, vector)
        return np.broadcast_to(out, shape)


def quantize(quantizer, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(index, scales, normalized values) of x."""
    scales = quantizer.scales_of(x)
    per_element = quantizer.element_scales(scales, x.shape)
    normalized = np.where(per_element > 0, x / np.where(per_element > 0, per_element, 1.0), 0.0)
    return nearest(normalized, quantizer.table), scales, normalized


def dequantize(quantizer, index: np.ndarray, scales: np.ndarray, shape) -> np.ndarray:
    return quantizer.table[index].reshape(shape) * quantizer.element_scales(scales, shape)


def quantizers_for(shape) -> tuple[object, object]:
    """The paper's scheme: m block-128 signed DE; v rank-1 linear-no-zero (1-D: block 128)."""
    m = BlockQuantizer(dynamic_exponent_table(4, signed=True), 128)
    v_table = linear_nozero_table(4)
    v = Rank1Quantizer(v_table) if len(shape) >= 2 else BlockQuantizer(v_table, 128)
    return m, v


def adamw_step(p, g, m, v, t, lr, beta1, beta2, eps, weight_decay):
    """One fp64 AdamW step (ALGORITHMS.md §1, '4-bit AdamW'), on dequantized moments."""
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p - (lr / (1 - beta1**t)) * m / (np.sqrt(v) / np.sqrt(1 - beta2**t) + eps)
    return p, m, v
