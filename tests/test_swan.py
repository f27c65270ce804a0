"""SWAN, generated from specs/swan.yaml, against the fp64 oracle (tests/oracles/swan.py: GradNorm + SVD polar).

Also: the matrix primitives' contracts (optgen/runtime/matrix.py), routing of vectors to AdamW,
zero state for matrices, bf16 parameters, constant rows and all-zero gradients.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from oracles import swan as oracle

import optgen
from optgen.codegen.spec import load_spec
from optgen.runtime.matrix import standardize, whiten

HYPER = dict(lr=0.01, alpha=1.0, norm_eps=1e-8, weight_decay=0.1)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float((a * b).sum() / (np.linalg.norm(a) * np.linalg.norm(b)))


def one_step(shape, seed, dtype=torch.float32, grad=None, **hyper):
    torch.manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(shape).to(dtype))
    opt = optgen.load("swan")([param], **{**HYPER, **hyper})
    param.grad = (torch.randn(shape) if grad is None else grad).to(dtype)
    before = param.detach().double().numpy().copy()
    opt.step()
    return opt, param, before


def generated_direction(param, before, lr, alpha, weight_decay) -> np.ndarray:
    """D' recovered from the generated step: p1 = p0 (1 - lr wd) - lr alpha D'."""
    return (before * (1 - lr * weight_decay) - param.detach().double().numpy()) / (lr * alpha)


@pytest.mark.parametrize("shape", [(16, 64), (64, 16), (96, 40), (3, 20, 30)], ids=lambda s: "x".join(map(str, s)))
def test_swan_matches_gradnorm_then_the_exact_polar_factor(shape):
    opt, param, before = one_step(shape, seed=sum(shape))
    g = param.grad.double().numpy()
    got = generated_direction(param, before, HYPER["lr"], HYPER["alpha"], HYPER["weight_decay"])
    want = oracle.swan_direction(g, HYPER["norm_eps"])
    assert cosine(got, want) >= 0.999
    # The direction is the polar factor rescaled to unit RMS; undo the rescaling (k = min(m, n)
    # singular values of 1 give an RMS of sqrt(k / (m n))) and every singular value is 1.
    m, n = shape[-2:]
    singular = np.linalg.svd(got * math.sqrt(min(m, n) / (m * n)), compute_uv=False)
    assert np.abs(singular - 1).max() <= 1e-3, singular
    np.testing.assert_allclose(param.detach().double().numpy(), oracle.swan_step(before, g, **HYPER), rtol=0, atol=2e-5)
    assert set(opt.state[param]) == {"step"}  # stateless: no buffer at all for a matrix


def test_square_matrix_is_whitened_on_its_range():
    """A row-standardized square matrix is singular (its rows sum to zero): the whitening is the
    polar factor on the range and ~0 along the null direction (the ridge keeps fp32 finite)."""
    n = 24
    torch.manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    g = (q1 @ torch.diag(torch.linspace(1, 2, n, dtype=torch.float64)) @ q2.T).float()
    opt, param, before = one_step((n, n), seed=1, grad=g)
    got = generated_direction(param, before, HYPER["lr"], HYPER["alpha"], HYPER["weight_decay"])
    want = oracle.swan_direction(g.double().numpy(), HYPER["norm_eps"], drop_null=1)
    assert np.isfinite(got).all()
    assert cosine(got, want) >= 0.999
    singular = np.sort(np.linalg.svd(got * math.sqrt((n - 1) / (n * n)), compute_uv=False))
    assert singular[0] <= 1e-2 and np.abs(singular[1:] - 1).max() <= 1e-3, singular


def test_vectors_go_to_adamw_and_matrices_keep_no_state():
    torch.manual_seed(0)
    matrix = torch.nn.Parameter(torch.randn(8, 12))
    vector = torch.nn.Parameter(torch.randn(12))
    ref = vector.detach().clone().requires_grad_()
    opt = optgen.load("swan")([matrix, vector], lr=1e-2, weight_decay=0.0)
    adamw = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.0)
    for _ in range(3):
        matrix.grad = torch.randn_like(matrix)
        vector.grad = torch.randn_like(vector)
        ref.grad = vector.grad.clone()
        opt.step()
        adamw.step()
    torch.testing.assert_close(vector.detach(), ref.detach(), rtol=1e-6, atol=1e-7)
    assert set(opt.state[matrix]) == {"step"}
    assert set(opt.state[vector]) == {"step", "exp_avg", "exp_avg_sq"}
    # Only step counters (4 bytes each) and AdamW's two fp32 buffers for the vector.
    assert opt.state_bytes() == 4 + 4 + 2 * 12 * 4
    spec = load_spec("swan")
    assert spec.spec_for((4096, 4096)).state_nbytes((4096, 4096)) == 4  # the step counter only
    assert spec.spec_for((4096,)).name == "adamw"


def test_bf16_parameters_follow_the_fp32_result():
    _, p32, before32 = one_step((32, 48), seed=3, weight_decay=0.0, lr=0.1)
    _, p16, before16 = one_step((32, 48), seed=3, weight_decay=0.0, lr=0.1, dtype=torch.bfloat16)
    assert p16.dtype == torch.bfloat16
    delta32 = p32.detach().double().numpy() - before32
    delta16 = p16.detach().double().numpy() - before16
    assert cosine(delta16, delta32) >= 0.98


def test_constant_rows_and_zero_gradients_give_no_nan():
    g = torch.randn(10, 40)
    g[3] = 2.5  # std = 0: GradNorm gives zeros, whitening keeps the row at zero
    opt, param, before = one_step((10, 40), seed=4, grad=g, weight_decay=0.0)
    after = param.detach().double().numpy()
    assert np.isfinite(after).all()
    np.testing.assert_array_equal(after[3], before[3])
    assert np.abs(after - before).max() > 1e-3  # the other rows move
    opt, param, before = one_step((10, 40), seed=5, grad=torch.zeros(10, 40), weight_decay=0.0)
    np.testing.assert_array_equal(param.detach().double().numpy(), before)


# -- the primitives' contracts ------------------------------------------------------------------


@pytest.mark.parametrize("dim", [-1, -2, None, "long"])
def test_standardize_contract(dim):
    torch.manual_seed(0)
    x = torch.randn(6, 9) * 3 + 1
    x[2] = 7.0
    x[:, 4] = -1.5
    got = standardize(x, dim, 1e-8).double().numpy()
    xd = x.double().numpy()
    axis = {-1: -1, -2: -2, None: None, "long": -1}[dim]
    mean = xd.mean(axis=axis, keepdims=True)
    std = np.sqrt(((xd - mean) ** 2).mean(axis=axis, keepdims=True))
    want = np.where(np.ptp(xd, axis=axis, keepdims=True) == 0, 0.0, (xd - mean) / (std + 1e-8))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.isfinite(got).all()


@pytest.mark.parametrize("method", ["newton_schulz", "quintic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_whiten_methods_and_dtypes(method, dtype):
    torch.manual_seed(0)
    x = torch.randn(2, 24, 40)
    got = whiten(x, steps=10, method=method, dtype=dtype)
    assert got.dtype == torch.float32 and got.shape == x.shape
    want = oracle.polar(x.double().numpy())
    singular = np.linalg.svd(got.double().numpy(), compute_uv=False)
    if method == "newton_schulz" and dtype == torch.float32:
        assert cosine(got.double().numpy(), want) >= 0.9999
        assert np.abs(singular - 1).max() <= 1e-3
    else:  # Muon's quintic aims at singular values in about [0.7, 1.2]; bf16 rounds at ~1e-2
        assert cosine(got.double().numpy(), want) >= 0.95
        assert singular.min() >= 0.5 and singular.max() <= 1.3
    tall = whiten(x.mT, steps=10, method=method, dtype=dtype)
    torch.testing.assert_close(tall, got.mT, rtol=0, atol=5e-2 if dtype == torch.bfloat16 else 1e-5)
    assert torch.equal(whiten(torch.zeros(5, 7), steps=5, method=method), torch.zeros(5, 7))
