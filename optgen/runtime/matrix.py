"""Matrix primitives that generated code calls: ``standardize`` (GradNorm) and ``whiten`` (GradWhitening).

Written once, in plain torch, for every backend: matrix products go through ``torch.matmul``
(cuBLAS / oneDNN).  Tensors with more than two dims are batches of matrices over their leading
dims.  (On a sharded parameter, generated code calls a whole matrix stage through
``distributed.on_whole``, so these always see whole matrices.)  Contracts
(docs/spec-language.md#matrix-primitives):

- ``standardize(x, dim, eps)``: ``(x - mean) / (std + eps)`` along ``dim`` (-1: each row across
  its entries; -2: each column; "long": along the longer of the last two dims, i.e. each row of the
  matrix made wide, as SWAN's GradNorm does; None: the whole tensor), population std.  A constant
  slice (std = 0) gives exact zeros, never NaN.
- ``whiten(x, steps, method, dtype)``: an approximation of ``(X Xᵀ)^-1/2 X`` on the smaller side
  (the polar factor U Vᵀ of X = U S Vᵀ), the matrix transposed first when it is taller than wide.
  ``method="newton_schulz"``: the coupled Newton–Schulz iteration for the inverse square root of
  A = X Xᵀ (SWAN's route, ALGORITHMS.md §3; with a 1e-6 ridge, see ``NEWTON_SCHULZ_RIDGE``);
  ``method="quintic"``: Muon's quintic iteration on X with (a, b, c) = (3.4445, -4.7750, 2.0315).
  The products run in ``dtype`` (float32 by default, or bfloat16); the result is float32.  An
  all-zero matrix gives zeros.
"""

from __future__ import annotations

import torch

__all__ = ["standardize", "whiten"]

QUINTIC = (3.4445, -4.7750, 2.0315)  # KellerJordan/Muon
_TINY = 1e-30  # guards the norms of all-zero matrices (0 / tiny = 0, never 0 / 0)
# Ridge added to A/||A||_F (whose eigenvalues lie in [0, 1]) before Newton–Schulz: it bounds the
# inverse square root on (nearly) rank-deficient matrices — a square row-standardized gradient is
# always singular, its rows summing to zero — where float32 iterations otherwise blow up after
# ~25 steps.  Directions with eigenvalue λ come out scaled by sqrt(λ / (λ + ridge)): 1 - 5e-4 at
# λ = 1e-3, and ~0 in a null direction (the pseudo-inverse's behaviour).
NEWTON_SCHULZ_RIDGE = 1e-6


def standardize(x: torch.Tensor, dim: int | str | None, eps: float | torch.Tensor) -> torch.Tensor:
    x = x.float()
    if dim == "long":
        dim = -1 if x.shape[-1] >= x.shape[-2] else -2
    dims = tuple(range(x.ndim)) if dim is None else (dim,)
    centered = x - x.mean(dim=dims, keepdim=True)
    std = centered.square().mean(dim=dims, keepdim=True).sqrt()
    # A constant slice's mean is not exactly its value in float32, so test constancy exactly.
    constant = x.amax(dim=dims, keepdim=True) == x.amin(dim=dims, keepdim=True)
    return torch.where(constant, 0.0, centered / (std + eps))


def whiten(x: torch.Tensor, steps: int, method: str = "newton_schulz", dtype: torch.dtype = torch.float32):
    if x.ndim < 2:
        raise ValueError(f"whiten needs a matrix (ndim >= 2), got shape {tuple(x.shape)}")
    tall = x.shape[-2] > x.shape[-1]
    m = (x.mT if tall else x).to(dtype)
    if method == "newton_schulz":
        out = _coupled_newton_schulz(m, steps)
    elif method == "quintic":
        out = _quintic(m, steps)
    else:
        raise ValueError(f"unknown whiten method {method!r} (newton_schulz or quintic)")
    out = out.float()
    return out.mT if tall else out


def _frobenius(a: torch.Tensor) -> torch.Tensor:
    return a.float().square().sum(dim=(-2, -1), keepdim=True).sqrt().clamp_min(_TINY)


def _coupled_newton_schulz(x: torch.Tensor, steps: int) -> torch.Tensor:
    """(X Xᵀ)^-1/2 X: Y0 = A/||A||_F (+ ridge I), Z0 = I; T = 3I - Z Y; Y = Y T / 2; Z = T Z / 2.

    Z converges to Y0^-1/2, so A^-1/2 ≈ Z / sqrt(||A||_F).
    """
    a = x @ x.mT
    norm = _frobenius(a)
    eye = torch.eye(a.shape[-1], dtype=x.dtype, device=x.device).expand_as(a)
    y = (a / norm.to(a.dtype) + NEWTON_SCHULZ_RIDGE * eye).to(x.dtype)
    z = eye
    for _ in range(steps):
        t = 3 * eye - z @ y
        y = 0.5 * (y @ t)
        z = 0.5 * (t @ z)
    return (z @ x) / norm.sqrt().to(x.dtype)


def _quintic(x: torch.Tensor, steps: int) -> torch.Tensor:
    """Muon's iteration: X = G/||G||_F; X = a X + (b A + c A²) X with A = X Xᵀ."""
    a, b, c = QUINTIC
    x = x / (_frobenius(x) + 1e-7).to(x.dtype)
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x
