"""The generated adamw4bit against the independent fp64 oracle (tests/oracles/adamw4bit.py), step by step.

Every step: decode the optimizer's *raw* codes and scales with the oracle's own unpacking and layout
(this checks packing, scale layout and the tables), run one fp64 oracle step from the current
parameter with the same gradient, quantize with the oracle's quantizer, then step the generated
optimizer and compare codes, scales and parameters.  Codes may differ only at ties: where the
oracle's normalized value lies within 1e-5 (relative to the gap between the two entries) of a
midpoint, and there by one code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from oracles import adamw4bit as oracle  # tests/ is on sys.path, as in test_trajectories.py

import optgen
from optgen.runtime.state import QuantizedState

SHAPES = [(300,), (4096,), (4097,), (70, 90), (3, 50, 33), (129, 65)]
STEPS = 12
HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
TIE = 1e-5  # relative to the gap between the two entries around the midpoint
TOTALS = {"ties": 0, "max_param_rel": 0.0}


def gradient(shape: tuple[int, ...], step: int, seed: int) -> torch.Tensor:
    """Gradients whose magnitude varies along every dim and between steps (exercises rank-1 and blocks)."""
    g = torch.Generator().manual_seed(1000 * seed + step)
    out = torch.randn(shape, generator=g)
    for dim, size in enumerate(shape):
        view = [1] * len(shape)
        view[dim] = size
        out = out * torch.exp(torch.randn(size, generator=g)).view(view)
    return out * (0.5 + step % 3)


def decode(state: object, quantizer, shape: tuple[int, ...]) -> np.ndarray:
    """The oracle's reading of a stored state: raw codes and scales, or a float tensor."""
    if isinstance(state, QuantizedState):
        numel = math.prod(shape)
        index = oracle.unpack4(state.codes.numpy(), numel)
        return oracle.dequantize(quantizer, index, state.scales.double().numpy(), shape)
    return state.double().numpy()


def gap_at_nearest_midpoint(normalized: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distance to the nearest midpoint, gap between the two entries around it)."""
    mids = (table[:-1] + table[1:]) / 2
    distance = np.abs(normalized.reshape(-1)[:, None] - mids)
    j = distance.argmin(axis=1)
    return distance[np.arange(len(j)), j], table[j + 1] - table[j]


def compare_codes(name: str, state: QuantizedState, quantizer, x: np.ndarray, step: int) -> int:
    """Codes and scales of ``state`` against the oracle's quantization of ``x``; returns the tie count."""
    shape = x.shape
    numel = math.prod(shape)
    assert state.codes.dtype == torch.uint8 and state.codes.numel() == (numel + 1) // 2
    want_index, want_scales, normalized = oracle.quantize(quantizer, x)
    got_scales = state.scales.double().numpy()
    assert got_scales.shape == want_scales.shape, f"{name} step {step}: scale layout"
    np.testing.assert_allclose(got_scales, want_scales, rtol=1e-5, atol=0, err_msg=f"{name} scales, step {step}")

    got_index = oracle.unpack4(state.codes.numpy(), numel)
    want_index = want_index.reshape(-1)
    differ = got_index != want_index
    if differ.any():
        distance, gap = gap_at_nearest_midpoint(normalized.reshape(-1)[differ], quantizer.table)
        tie = distance <= TIE * gap
        where = np.flatnonzero(differ)[~tie][:5]
        assert tie.all(), (
            f"{name} step {step}: {int((~tie).sum())} codes differ away from a tie, e.g. flat index {where.tolist()} "
            f"normalized {normalized.reshape(-1)[where].tolist()} got {got_index[where].tolist()} "
            f"want {want_index[where].tolist()}"
        )
        assert np.abs(got_index[differ] - want_index[differ]).max() <= 1, f"{name} step {step}: ties differ by > 1"
    # The stored codes are not trivial: several distinct codes in use.
    assert len(np.unique(got_index)) >= 5, f"{name} step {step}: only codes {np.unique(got_index)}"
    return int(differ.sum())


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_adamw4bit_matches_the_fp64_oracle(shape):
    cls = optgen.load("adamw4bit")
    seed = sum(shape)
    torch.manual_seed(seed)
    param = torch.nn.Parameter(torch.randn(shape))
    opt = cls([param], **HYPER)
    quantized = math.prod(shape) > oracle.QUANTIZE_ABOVE
    mq, vq = oracle.quantizers_for(shape)
    beta1, beta2 = HYPER["betas"]
    ties = 0
    for step in range(1, STEPS + 1):
        g = gradient(shape, step, seed)
        p0 = param.detach().double().numpy().copy()
        if step == 1:
            m0 = v0 = np.zeros(shape)
        else:
            state = opt.state[param]
            assert isinstance(state["exp_avg"], QuantizedState) == quantized
            assert isinstance(state["exp_avg_sq"], QuantizedState) == quantized
            m0 = decode(state["exp_avg"], mq, shape)
            v0 = decode(state["exp_avg_sq"], vq, shape)
        p1, m1, v1 = oracle.adamw_step(
            p0, g.double().numpy(), m0, v0, step, HYPER["lr"], beta1, beta2, HYPER["eps"], HYPER["weight_decay"]
        )

        param.grad = g
        opt.step()
        state = opt.state[param]
        assert float(state["step"]) == step

        got = param.detach().double().numpy()
        rel = np.abs(got - p1).max() / np.abs(p1).max()
        assert rel <= 1e-5, f"step {step}: param rel error {rel:.3g}"
        assert np.abs(got - p0).max() > 1e-3  # the parameter really moves (lr 1e-2)
        TOTALS["max_param_rel"] = max(TOTALS["max_param_rel"], float(rel))

        if quantized:
            ties += compare_codes("exp_avg", state["exp_avg"], mq, m1, step)
            ties += compare_codes("exp_avg_sq", state["exp_avg_sq"], vq, v1, step)
        else:
            for key, want in (("exp_avg", m1), ("exp_avg_sq", v1)):
                got_state = state[key]
                assert isinstance(got_state, torch.Tensor) and got_state.dtype == torch.float32
                assert got_state.shape == shape
                err = np.abs(got_state.double().numpy() - want).max() / np.abs(want).max()
                assert err <= 1e-5, f"{key} step {step}: rel error {err:.3g}"
    TOTALS["ties"] += ties
    # Ties are rare: at most a handful per run.
    assert ties <= max(3, math.prod(shape) * STEPS // 10000)


def test_oracle_layout_facts():
    """The oracle's decoding is what the checks above rely on: pin its layout down independently."""
    assert oracle.unpack4(np.array([0x21, 0xF3], dtype=np.uint8), 3).tolist() == [1, 2, 3]
    assert oracle.pack4(np.array([1, 2, 3])).tolist() == [0x21, 0x03]
    table = oracle.dynamic_exponent_table(4, signed=True)
    np.testing.assert_allclose(
        table[8:], [0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875, 1.0], rtol=0, atol=1e-12
    )
    m, v = oracle.quantizers_for((70, 90))
    assert isinstance(m, oracle.BlockQuantizer) and m.block == 128
    assert isinstance(v, oracle.Rank1Quantizer)
    assert isinstance(oracle.quantizers_for((4097,))[1], oracle.BlockQuantizer)


def test_a_wrong_layout_would_be_caught():
    """The comparison is sensitive: swapping nibbles of the stored codes breaks the match."""
    cls = optgen.load("adamw4bit")
    shape = (70, 90)
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(shape))
    opt = cls([param], **HYPER)
    param.grad = gradient(shape, 1, 0)
    opt.step()
    m = opt.state[param]["exp_avg"]
    mq, _ = oracle.quantizers_for(shape)
    want = oracle.dequantize(mq, oracle.unpack4(m.codes.numpy(), 6300), m.scales.double().numpy(), shape)
    swapped = ((m.codes >> 4) | (m.codes << 4)).numpy()
    wrong = oracle.dequantize(mq, oracle.unpack4(swapped, 6300), m.scales.double().numpy(), shape)
    assert np.abs(wrong - want).max() > 0.1 * np.abs(want).max()
    # And the correct decoding is close to the unquantized first moment 0.1 * g.
    g = param.grad.double().numpy()
    assert np.abs(want - 0.1 * g).max() <= 0.12 * np.abs(0.1 * g).max()
