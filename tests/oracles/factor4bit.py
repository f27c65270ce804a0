"""Independent float64 reference of 4-bit Factor's matrix step, written from ALGORITHMS.md §1 (not from optgen).

Second moment factorized Adafactor-style with float64 row / column statistics:
R = b2 R + (1-b2) mean_last(g² + eps_f), C = b2 C + (1-b2) mean_-2(g² + eps_f),
v = (R / mean(R)) outer C; no update clipping, no relative step.  The first moment is AdamW's,
stored 4-bit block-128 DE (quantizers from tests/oracles/adamw4bit.py).
"""

from __future__ import annotations

import numpy as np

from oracles.adamw4bit import BlockQuantizer, dynamic_exponent_table

QUANTIZE_ABOVE = 4096


def m_quantizer() -> BlockQuantizer:
    return BlockQuantizer(dynamic_exponent_table(4, signed=True), 128)


def factor_step(p, g, m, r, c, t, lr, beta1, beta2, eps, weight_decay, factor_eps):
    """One step on a matrix; r has shape (n, 1), c (1, m). Returns (p, m, r, c)."""
    p = p * (1 - lr * weight_decay)
    m = beta1 * m + (1 - beta1) * g
    g2 = g * g + factor_eps
    r = beta2 * r + (1 - beta2) * g2.mean(axis=-1, keepdims=True)
    c = beta2 * c + (1 - beta2) * g2.mean(axis=-2, keepdims=True)
    v = (r / r.mean()) * c
    p = p - (lr / (1 - beta1**t)) * m / (np.sqrt(v) / np.sqrt(1 - beta2**t) + eps)
    return p, m, r, c
