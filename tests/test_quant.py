"""Quantized storage: exact code tables, round-trip error bounds, packing, zero handling, byte counts.

Facts from /work/shared/ALGORITHMS.md §1-2 (Li, Chen & Zhu 2023; Dettmers et al. 2022).  Expected
values are written out here or recomputed in float64 numpy, never taken from optgen itself.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import optgen
from optgen.codegen.quant import PRESETS, QuantScheme, code_table, midpoints
from optgen.codegen.spec import load_spec
from optgen.runtime import quant_torch as qt
from optgen.runtime.state import QuantizedState, scheme_from_name

# -- exact tables --------------------------------------------------------------------------------

DE4_SIGNED = sorted(
    [0.0, 1.0] + [s * v for v in (0.0055, 0.0325, 0.0775, 0.2125, 0.4375, 0.6625, 0.8875) for s in (1, -1)]
)


def test_4bit_signed_dynamic_exponent_table_is_exact():
    table = code_table("dynamic_exponent", 4, True)
    assert len(table) == 16
    np.testing.assert_allclose(table, DE4_SIGNED, rtol=0, atol=1e-12)
    assert table[-1] == 1.0 and table[0] == pytest.approx(-0.8875)  # asymmetric: +1, no -1
    assert table.count(0.0) == 1


def test_4bit_unsigned_dynamic_exponent_nozero_table():
    table = code_table("dynamic_exponent_nozero", 4, False)
    assert len(table) == 15
    assert 0.0 not in table and min(table) > 0
    assert min(table) == pytest.approx(0.00325, abs=1e-12)
    assert table[-1] == 1.0
    assert list(table) == sorted(table)
    # The unsigned DE table is the same table with zero added back.
    assert code_table("dynamic_exponent", 4, False) == tuple(sorted((0.0,) + table))
    # Exponent levels (k = 2, 4, 8 midpoints of linspace(0.1, 1, k + 1), scaled by 1e-2, 1e-1, 1).
    expected = [0.00325, 0.00775]
    expected += [0.1 * v for v in (0.2125, 0.4375, 0.6625, 0.8875)]
    expected += [0.1 + 0.9 * (2 * i + 1) / 16 for i in range(8)] + [1.0]
    np.testing.assert_allclose(table, sorted(expected), rtol=0, atol=1e-12)


def test_4bit_linear_nozero_table():
    table = code_table("linear_nozero", 4, False)
    assert table == tuple((i + 1) / 16 for i in range(16))
    assert table[0] == 1 / 16 and table[-1] == 1.0


def test_linear_signed_table():
    np.testing.assert_allclose(code_table("linear", 4, True), np.linspace(-1, 1, 16), rtol=0, atol=1e-12)
    np.testing.assert_allclose(code_table("linear", 4, False), np.linspace(0, 1, 16), rtol=0, atol=1e-12)


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_dynamic_exponent_tables(signed):
    table = code_table("dynamic_exponent", 8, signed)
    assert len(table) == 256
    assert len(set(table)) == 256
    assert list(table) == sorted(table)
    assert 0.0 in table and table[-1] == 1.0
    if signed:
        assert table[0] < 0
    else:
        assert table[0] == 0.0
        nozero = code_table("dynamic_exponent_nozero", 8, False)
        assert len(nozero) == 255 and min(nozero) > 0


def test_linear_nozero_refuses_signed():
    with pytest.raises(ValueError, match="unsigned"):
        code_table("linear_nozero", 4, True)


def test_midpoints_are_between_neighbours():
    table = code_table("dynamic_exponent", 4, True)
    mids = midpoints(table)
    assert len(mids) == 15
    for lo, mid, hi in zip(table, mids, table[1:]):
        assert lo < mid < hi and mid == pytest.approx((lo + hi) / 2)


# -- quantize -> dequantize error bounds --------------------------------------------------------

SCHEMES = {
    **PRESETS,
    "q4_tensor_linear_signed": QuantScheme(4, True, "tensor", "linear"),
    "q4_block64_de_nozero": QuantScheme(4, False, "block", "dynamic_exponent_nozero", 64),
    "q8_rank1_linear_nozero": QuantScheme(8, False, "rank1", "linear_nozero"),
}
SHAPES = [(1000,), (4097,), (37, 129), (3, 5, 7)]


def sample(shape: tuple[int, ...], signed: bool, seed: int) -> torch.Tensor:
    """Data with a wide dynamic range (so many table entries are used), some exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g))
    x.view(-1)[::97] = 0.0
    return x if signed else x.abs()


def expected_scales(x: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """Scales recomputed in numpy from the documented layout."""
    a = np.abs(x)
    normalize, block = scheme.normalize, scheme.block
    if normalize == "rank1" and a.ndim < 2:
        normalize, block = "block", 128
    if normalize == "block":
        flat = np.concatenate([a.reshape(-1), np.zeros((-a.size) % block)])
        return flat.reshape(-1, block).max(axis=1)
    if normalize == "tensor":
        return np.array([a.max()])
    return np.concatenate([a.max(axis=tuple(d for d in range(a.ndim) if d != k)) for k in range(a.ndim)])


def expected_element_scales(scales: np.ndarray, scheme: QuantScheme, shape: tuple[int, ...]) -> np.ndarray:
    numel = math.prod(shape)
    if scheme.normalize == "tensor":
        return np.full(shape, scales[0])
    if scheme.normalize == "block" or len(shape) < 2:
        block = scheme.block if scheme.normalize == "block" else 128
        return np.repeat(scales, block)[:numel].reshape(shape)
    out, start = None, 0
    for dim, size in enumerate(shape):
        view = [1] * len(shape)
        view[dim] = size
        vector = scales[start : start + size].reshape(view)
        start += size
        out = vector if out is None else np.minimum(out, vector)
    return np.broadcast_to(out, shape)


def error_bound(normalized: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Half the gap between the neighbouring entries; beyond the ends, the distance to the end entry."""
    j = np.clip(np.searchsorted(table, normalized, side="right") - 1, 0, len(table) - 2)
    bound = (table[j + 1] - table[j]) / 2
    bound = np.where(normalized < table[0], table[0] - normalized, bound)
    return np.where(normalized > table[-1], normalized - table[-1], bound)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(SCHEMES))
def test_round_trip_error_is_within_half_a_gap(name, shape):
    scheme = SCHEMES[name]
    x = sample(shape, scheme.signed, seed=len(name) * 31 + len(shape))
    state = qt.zeros(x, scheme)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qt.quantize_(state, x)
    assert state.codes.dtype == torch.uint8 and state.scales.dtype == torch.float32
    assert state.codes.numel() == ((math.prod(shape) + 1) // 2 if scheme.bits == 4 else math.prod(shape))

    xs = x.double().numpy()
    scales = expected_scales(xs, scheme)
    np.testing.assert_allclose(state.scales.double().numpy(), scales, rtol=1e-7, atol=0)
    per_element = expected_element_scales(scales, scheme, shape)
    np.testing.assert_allclose(qt.element_scales(state).double().numpy(), per_element, rtol=1e-7, atol=0)

    table = np.array(scheme.values, dtype=np.float64)
    normalized = np.where(per_element > 0, xs / np.where(per_element > 0, per_element, 1), 0.0)
    bound = error_bound(normalized, table) * per_element
    restored = qt.dequantize(state).double().numpy()
    assert restored.shape == shape and np.isfinite(restored).all()
    error = np.abs(restored - xs)
    slack = 1e-6 * per_element + 1e-30
    assert (error <= bound + slack).all(), f"worst excess {(error - bound).max():.3g}"
    # The bound is attained only by nearest rounding: every restored value is a table entry times its scale.
    entries = np.where(per_element > 0, restored / np.where(per_element > 0, per_element, 1), table[0])
    distance = np.abs(entries[..., None] - table)
    assert distance.min(axis=-1).max() < 1e-6
    # Non-trivial data: many distinct table entries are in use.
    assert len(np.unique(distance.argmin(axis=-1))) >= 6


def test_nearest_entry_on_chosen_values():
    """Values just either side of a midpoint land on the nearer entry."""
    scheme = QuantScheme(4, False, "tensor", "linear_nozero")
    x = torch.tensor([1.0, 0.0, 0.02, 0.09, 0.095, 0.5, 0.53, 0.5 + 1 / 32 + 1e-4, 1 / 16])
    state = qt.zeros(x, scheme)
    qt.quantize_(state, x)
    got = qt.dequantize(state)
    expected = torch.tensor([1.0, 1 / 16, 1 / 16, 1 / 16, 2 / 16, 8 / 16, 8 / 16, 9 / 16, 1 / 16])
    assert torch.equal(got, expected)


# -- packing -------------------------------------------------------------------------------------


def hand_state(codes: list[int], scheme: QuantScheme, shape: tuple[int, ...], scales: list[float]) -> QuantizedState:
    return QuantizedState(
        torch.tensor(codes, dtype=torch.uint8), torch.tensor(scales, dtype=torch.float32), scheme, torch.Size(shape)
    )


def test_4bit_packing_even_element_in_low_nibble():
    scheme = QuantScheme(4, False, "block", "linear_nozero", 128)
    # Elements 0..4 have codes 1, 2, 3, 4, 5; the last byte's high nibble is padding (set to 15 here).
    state = hand_state([0x21, 0x43, 0xF5], scheme, (5,), [2.0])
    expected = torch.tensor([2, 3, 4, 5, 6], dtype=torch.float32) / 16 * 2.0
    assert torch.equal(qt.dequantize(state), expected)
    # Swapping nibbles swaps neighbours.
    swapped = hand_state([0x12, 0x34, 0x05], scheme, (5,), [2.0])
    assert torch.equal(qt.dequantize(swapped), torch.tensor([3, 2, 5, 4, 6], dtype=torch.float32) / 16 * 2.0)


def test_4bit_quantize_writes_even_element_to_low_nibble():
    scheme = QuantScheme(4, False, "block", "linear_nozero", 128)
    x = torch.tensor([1 / 16, 1.0, 3 / 16, 5 / 16, 10 / 16])  # codes 0, 15, 2, 4, 9
    state = qt.zeros(x, scheme)
    qt.quantize_(state, x)
    assert state.codes.tolist() == [0xF0, 0x42, 0x09]
    assert torch.equal(qt.dequantize(state), x)


def test_4bit_packing_is_row_major_for_matrices():
    scheme = QuantScheme(4, True, "block", "linear", 4)
    # 2x3 matrix, codes row-major 0, 15, 7, 8, 1, 14 -> bytes (15<<4|0), (8<<4|7), (14<<4|1); two blocks of 4.
    state = hand_state([0xF0, 0x87, 0xE1], scheme, (2, 3), [1.0, 4.0])
    table = torch.linspace(-1, 1, 16)
    expected = torch.stack([table[0], table[15], table[7], table[8], 4 * table[1], 4 * table[14]]).view(2, 3)
    torch.testing.assert_close(qt.dequantize(state), expected, rtol=0, atol=1e-7)


def test_8bit_codes_are_one_per_element():
    scheme = PRESETS["q8_block256_de"]
    state = hand_state(list(range(256)), scheme, (256,), [3.0])
    expected = torch.tensor(code_table("dynamic_exponent", 8, True), dtype=torch.float32) * 3.0
    assert torch.equal(qt.dequantize(state), expected)
    assert scheme.code_bytes(1001) == 1001 and PRESETS["q4_block128_de"].code_bytes(1001) == 501


# -- zeros ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(SCHEMES))
def test_all_zero_input_dequantizes_to_exact_zeros(name, shape):
    scheme = SCHEMES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no division warnings, no NaN warning
        state = qt.zeros(torch.empty(shape), scheme)
        restored = qt.dequantize(state)
        assert torch.equal(restored, torch.zeros(shape)), name
        # Overwriting non-zero content with zeros also gives exact zeros.
        qt.quantize_(state, sample(shape, scheme.signed, seed=3))
        assert qt.dequantize(state).abs().max() > 0
        qt.quantize_(state, torch.zeros(shape))
        restored = qt.dequantize(state)
    assert not torch.isnan(restored).any()
    assert torch.equal(restored, torch.zeros(shape))
    assert torch.equal(state.scales, torch.zeros_like(state.scales))


def test_a_zero_block_among_nonzero_blocks_stays_zero_for_a_nozero_table():
    scheme = PRESETS["q4_block128_linear_nozero"]
    x = torch.rand(384)
    x[128:256] = 0
    state = qt.zeros(x, scheme)
    qt.quantize_(state, x)
    restored = qt.dequantize(state)
    assert torch.equal(restored[128:256], torch.zeros(128))
    assert (restored[:128] > 0).all() and (restored[256:] > 0).all()  # no zero entry in the table


# -- rank-1 layout -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1000, 4097, 128, 1])
def test_rank1_on_1d_falls_back_to_block_128(n):
    scheme = PRESETS["q4_rank1_linear_nozero"]
    assert scheme.layout((n,)) == ("block", 128)
    x = torch.rand(n) + 0.01
    state = qt.zeros(x, scheme)
    qt.quantize_(state, x)
    assert state.scales.numel() == -(-n // 128) == scheme.scale_count((n,))
    padded = torch.cat([x, x.new_zeros((-n) % 128)]).view(-1, 128)
    assert torch.equal(state.scales, padded.amax(dim=1))


def test_rank1_scales_are_per_dim_maxima_in_dim_order():
    scheme = PRESETS["q4_rank1_linear_nozero"]
    x = torch.rand(3, 5, 7)
    state = qt.zeros(x, scheme)
    qt.quantize_(state, x)
    assert state.scales.numel() == 3 + 5 + 7 == scheme.scale_count((3, 5, 7))
    expected = torch.cat([x.amax(dim=(1, 2)), x.amax(dim=(0, 2)), x.amax(dim=(0, 1))])
    assert torch.equal(state.scales, expected)
    # Element scale = min over dims of that dim's maximum.
    s = qt.element_scales(state)
    i, j, k = 2, 3, 6
    assert s[i, j, k] == min(expected[i], expected[3 + j], expected[8 + k])


# -- byte counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape, nbytes",
    [
        ("q4_block128_de", (37, 129), (4773 + 1) // 2 + 4 * 38),
        ("q4_rank1_linear_nozero", (37, 129), (4773 + 1) // 2 + 4 * (37 + 129)),
        ("q4_rank1_linear_nozero", (4097,), 2049 + 4 * 33),
        ("q4_block128_linear_nozero", (3, 5, 7), 53 + 4 * 1),
        ("q8_block256_de", (3, 5, 7), 105 + 4 * 1),
        ("q8_block256_de_nozero", (4097,), 4097 + 4 * 17),
        ("q4_block128_de", (4096, 4096), 4096 * 4096 // 2 + 4 * 4096 * 4096 // 128),
    ],
)
def test_nbytes_arithmetic(name, shape, nbytes):
    scheme = PRESETS[name]
    assert scheme.nbytes(shape) == nbytes
    if math.prod(shape) < 10**6:
        state = qt.zeros(torch.empty(shape), scheme)
        assert state.nbytes == nbytes


def test_state_bytes_counts_codes_scales_float_state_and_step():
    cls = optgen.load("adamw4bit")
    big = torch.nn.Parameter(torch.randn(70, 90))
    small = torch.nn.Parameter(torch.randn(300))
    opt = cls([big, small])
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    assert isinstance(opt.state[big]["exp_avg"], QuantizedState)
    assert isinstance(opt.state[small]["exp_avg"], torch.Tensor)
    m_bytes = 6300 // 2 + 4 * math.ceil(6300 / 128)  # 3150 + 200
    v_bytes = 6300 // 2 + 4 * (70 + 90)  # 3150 + 640
    small_bytes = 2 * 4 * 300
    expected = m_bytes + v_bytes + 4 + small_bytes + 4
    assert expected == 9548
    assert opt.state_bytes() == expected
    spec = load_spec("adamw4bit")
    assert spec.state_nbytes((70, 90)) + spec.state_nbytes((300,)) == expected


def test_scheme_names_round_trip():
    for scheme in SCHEMES.values():
        assert scheme_from_name(scheme.name) == scheme
    assert PRESETS["q4_block128_de"].name == "q4-block128-dynamic_exponent-signed"
