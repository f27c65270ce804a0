"""Independent float64 reference of SWAN's matrix update, written from ALGORITHMS.md §3 (not from optgen).

For a gradient matrix G (transposed first when taller than wide, so m <= n):
GradNorm standardizes each row across its n entries (population std, eps-guarded; a constant row
becomes zeros), GradWhitening takes the exact polar factor U Vᵀ of the result by SVD (the limit
of Newton–Schulz), the update is rescaled to unit RMS per entry (community code) and multiplied
by lr * alpha.  Leading dims of a 3-D tensor are a batch.
"""

from __future__ import annotations

import numpy as np


def grad_norm(g: np.ndarray, eps: float) -> np.ndarray:
    """Standardize each row (of the matrix made wide) across its entries."""
    axis = -1 if g.shape[-1] >= g.shape[-2] else -2
    mean = g.mean(axis=axis, keepdims=True)
    std = np.sqrt(((g - mean) ** 2).mean(axis=axis, keepdims=True))
    constant = g.max(axis=axis, keepdims=True) == g.min(axis=axis, keepdims=True)
    return np.where(constant, 0.0, (g - mean) / (std + eps))


def polar(x: np.ndarray, drop_null: int = 0) -> np.ndarray:
    """U Vᵀ of x = U S Vᵀ (batched over leading dims); ``drop_null`` smallest directions left out."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    keep = s.shape[-1] - drop_null
    return u[..., :keep] @ vt[..., :keep, :]


def swan_direction(g: np.ndarray, eps: float, drop_null: int = 0) -> np.ndarray:
    """The whitened, unit-RMS update direction D' (the step is -lr * alpha * D')."""
    d = polar(grad_norm(g, eps), drop_null)
    return d / np.sqrt((d**2).mean())


def swan_step(
    p: np.ndarray, g: np.ndarray, lr: float, alpha: float, norm_eps: float, weight_decay: float
) -> np.ndarray:
    return p * (1 - lr * weight_decay) - lr * alpha * swan_direction(g, norm_eps)
