"""Quantized storage schemes: code tables and normalizations, one source for every backend.

A quantizer is a normalization N (each element into [-1, 1] or [0, 1]) followed by the nearest
entry of a code table T (Li, Chen & Zhu 2023; Dettmers et al. 2022).  Tables are sorted ascending
and a code is the index of its entry; nearest-entry rounding compares against the midpoints
between neighbouring entries.  4-bit codes are packed two per uint8, the even element in the low
nibble (as lpmm; torchao uses the high nibble).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

TABLES = ("dynamic_exponent", "dynamic_exponent_nozero", "linear", "linear_nozero")
NORMALIZATIONS = ("block", "rank1", "tensor")
RANK1_FALLBACK_BLOCK = 128  # 1-D tensors under rank-1 normalization use blocks of 128


def _linspace(start: float, stop: float, count: int) -> list[float]:
    return [start + (stop - start) * i / (count - 1) for i in range(count)]


@functools.cache
def code_table(name: str, bits: int, signed: bool) -> tuple[float, ...]:
    """The sorted table of 2**bits entries (DE-0 has one fewer: zero removed)."""
    if name in ("dynamic_exponent", "dynamic_exponent_nozero"):
        values = [0.0, 1.0]
        for i in range(bits - 1):
            k = 2**i if signed else 2 ** (i + 1)
            bounds = _linspace(0.1, 1.0, k + 1)
            scale = 10.0 ** -(bits - 2 - i)
            mids = [scale * (a + b) / 2 for a, b in zip(bounds, bounds[1:])]
            values += mids + ([-m for m in mids] if signed else [])
        if name == "dynamic_exponent_nozero":
            values.remove(0.0)
    elif name == "linear":
        values = _linspace(-1.0, 1.0, 2**bits) if signed else _linspace(0.0, 1.0, 2**bits)
    elif name == "linear_nozero":
        if signed:
            raise ValueError("linear_nozero is an unsigned table")
        values = [(i + 1) / 2**bits for i in range(2**bits)]
    else:
        raise ValueError(f"unknown table {name!r}")
    return tuple(sorted(values))


def midpoints(table: tuple[float, ...]) -> tuple[float, ...]:
    return tuple((a + b) / 2 for a, b in zip(table, table[1:]))


@dataclass(frozen=True)
class QuantScheme:
    """``store: {bits, signed, normalize, table}`` of a spec."""

    bits: int
    signed: bool
    normalize: str  # block | rank1 | tensor
    table: str
    block: int = 0  # block size when normalize == "block"

    @property
    def name(self) -> str:
        norm = f"block{self.block}" if self.normalize == "block" else self.normalize
        return f"q{self.bits}-{norm}-{self.table}-{'signed' if self.signed else 'unsigned'}"

    @property
    def values(self) -> tuple[float, ...]:
        return code_table(self.table, self.bits, self.signed)

    @property
    def has_zero(self) -> bool:
        return 0.0 in self.values

    def layout(self, shape: tuple[int, ...]) -> tuple[str, int]:
        """(normalization, block) actually used for a tensor of ``shape`` (rank-1 needs >= 2-D)."""
        if self.normalize == "rank1" and len(shape) < 2:
            return "block", RANK1_FALLBACK_BLOCK
        return self.normalize, self.block

    def code_bytes(self, numel: int) -> int:
        return (numel + 1) // 2 if self.bits == 4 else numel

    def scale_count(self, shape: tuple[int, ...]) -> int:
        normalize, block = self.layout(shape)
        numel = math.prod(shape)
        if normalize == "block":
            return -(-numel // block)
        if normalize == "rank1":
            return sum(shape)
        return 1

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes held for a tensor of ``shape``: packed codes + fp32 scales."""
        return self.code_bytes(math.prod(shape)) + 4 * self.scale_count(shape)


PRESETS = {
    # The 4-bit AdamW paper's schemes (Li, Chen & Zhu 2023, Tab. 1 and Sec. 4).
    "q4_block128_de": QuantScheme(4, True, "block", "dynamic_exponent", 128),
    "q4_rank1_linear_nozero": QuantScheme(4, False, "rank1", "linear_nozero"),
    "q4_block128_linear_nozero": QuantScheme(4, False, "block", "linear_nozero", 128),
    # 8-bit optimizers (Dettmers et al. 2022; bitsandbytes' current block size 256).
    "q8_block256_de": QuantScheme(8, True, "block", "dynamic_exponent", 256),
    "q8_block256_de_nozero": QuantScheme(8, False, "block", "dynamic_exponent_nozero", 256),
}
