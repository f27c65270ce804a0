"""The generated factor4bit against the fp64 oracle (tests/oracles/factor4bit.py), step by step.

Matrices: each step decodes the optimizer's raw first-moment codes with the oracle's layout, runs
one fp64 step from the current parameter and state, and compares parameters (1e-5 relative),
fp32 row / column statistics, and codes (equal, or within one at a tie).  Other shapes go to
adamw4bit (its own oracle test covers that spec); here only the routing is checked.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from oracles import factor4bit as oracle
from test_adamw4bit_oracle import compare_codes, decode, gradient

import optgen
from optgen.codegen.spec import load_spec
from optgen.runtime.state import QuantizedState

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, factor_eps=1e-30)
STEPS = 12


@pytest.mark.parametrize("shape", [(70, 90), (129, 65), (40, 50)], ids=lambda s: "x".join(map(str, s)))
def test_factor4bit_matches_the_fp64_oracle(shape):
    seed = sum(shape)
    torch.manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(shape))
    opt = optgen.load("factor4bit")([param], **HYPER)
    quantized = math.prod(shape) > oracle.QUANTIZE_ABOVE
    mq = oracle.m_quantizer()
    beta1, beta2 = HYPER["betas"]
    ties = 0
    for step in range(1, STEPS + 1):
        g = gradient(shape, step, seed)
        p0 = param.detach().double().numpy().copy()
        if step == 1:
            m0, r0, c0 = np.zeros(shape), np.zeros((shape[0], 1)), np.zeros((1, shape[1]))
        else:
            state = opt.state[param]
            assert isinstance(state["exp_avg"], QuantizedState) == quantized
            m0 = decode(state["exp_avg"], mq, shape)
            r0 = state["exp_avg_sq_row"].double().numpy()
            c0 = state["exp_avg_sq_col"].double().numpy()
        p1, m1, r1, c1 = oracle.factor_step(
            p0, g.double().numpy(), m0, r0, c0, step, HYPER["lr"], beta1, beta2, HYPER["eps"],
            HYPER["weight_decay"], HYPER["factor_eps"],
        )  # fmt: skip
        param.grad = g
        opt.step()
        state = opt.state[param]
        got = param.detach().double().numpy()
        rel = np.abs(got - p1).max() / np.abs(p1).max()
        assert rel <= 1e-5, f"step {step}: param rel error {rel:.3g}"
        assert np.abs(got - p0).max() > 1e-3
        for key, want in (("exp_avg_sq_row", r1), ("exp_avg_sq_col", c1)):
            assert state[key].dtype == torch.float32 and state[key].shape == want.shape
            np.testing.assert_allclose(state[key].double().numpy(), want, rtol=1e-5, err_msg=f"{key} step {step}")
        if quantized:
            ties += compare_codes("exp_avg", state["exp_avg"], mq, m1, step)
        else:
            err = np.abs(state["exp_avg"].double().numpy() - m1).max() / np.abs(m1).max()
            assert err <= 1e-5
    assert ties <= max(3, math.prod(shape) * STEPS // 10000)


def test_other_shapes_go_to_adamw4bit():
    shapes = [(300,), (5000,), (3, 50, 33)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = optgen.load("factor4bit")(params)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    for p in params:
        assert set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"}
    spec = load_spec("factor4bit")
    assert [spec.spec_for(s).name for s in [(4, 4), (300,), (3, 50, 33)]] == ["factor4bit", "adamw4bit", "adamw4bit"]


def test_state_bytes_per_param_on_4096_square():
    spec = load_spec("factor4bit")
    predicted = spec.state_nbytes((4096, 4096)) / 4096**2
    assert predicted <= 0.6
    param = torch.nn.Parameter(torch.zeros(4096, 4096))
    opt = optgen.load("factor4bit")([param])
    param.grad = torch.randn(4096, 4096)
    opt.step()
    measured = opt.state_bytes() / param.numel()
    assert measured == pytest.approx(predicted, rel=1e-9)
    # 4-bit codes (0.5) + a block scale per 128 (0.03125) + fp32 rows and cols (~0.002)
    assert 0.53 <= measured <= 0.6
