"""MLIR backend (CPU): every built-in spec's MLIR kernels against the torch kernels of the same spec.

The torch backend is the reference here (it is itself tested against torch.optim and the fp64
oracles in tests/oracles/).  Checked: parameters (fp32 within 1e-6 relative; bf16 rounded to
nearest even, so equal), quantized codes (equal, or one code apart at ties) and scales, that the
MLIR kernels really ran (not the torch fall-back), in-place updates, threads vs one thread, the
error of a failing lowering, and `optgen show --mlir`.
"""

from __future__ import annotations

import csv
import gc
import math
import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlir_launches import Launches, launches_before_each_run  # tests/ is on sys.path
from same_result import assert_same_result

import optgen
from optgen.cli import main
from optgen.codegen import emit_mlir as emit_mlir_module
from optgen.codegen.emit_mlir import emit_mlir
from optgen.codegen.mlir_team import team_function
from optgen.codegen.plan import make_plan
from optgen.codegen.quant import midpoints
from optgen.codegen.spec import builtin_specs, load_spec
from optgen.runtime import mlir_jit, mlir_steps, quant_torch
from optgen.runtime.state import QuantizedState

# Plans with matrix stages: the MLIR emitter declines them (the torch kernels run them).  Plans with
# reductions (factor4bit, sinkgd) are tested in tests/test_mlir_reductions.py.
DECLINED = {"swan"}
ODD_SHAPES = [(1,), (127,), (129,), (4097,), (5000,), (67, 131), (3, 5, 301)]
HYPER = {"sgd": {"momentum": 0.9, "weight_decay": 0.01}, "sgdm4bit": {"weight_decay": 0.01}}
LR = 0.01  # large enough that bf16 parameters change every step


def _emitted() -> dict[tuple[str, str], bool]:
    """(built-in spec, routed spec) → whether the MLIR emitter produced a module for it."""
    out = {}
    for name, path in builtin_specs().items():
        for sub in load_spec(path).all_specs():
            out[(name, sub.name)] = emit_mlir(make_plan(sub), "#") is not None
    return out


EMITTED = _emitted()
MLIR_SPECS = sorted({sub for (_, sub), ok in EMITTED.items() if ok})


def _inputs(shapes, dtype, steps: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(steps)]
    return params, grads


def _train(name: str, backend: str, shapes, dtype, steps: int = 3, spec: str | None = None):
    params, grads = _inputs(shapes, dtype, steps)
    opt = optgen.load(spec or name)(params, lr=LR, backend=backend, **HYPER.get(name, {}))
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    return params, opt


def _codes(state: QuantizedState, numel: int) -> torch.Tensor:
    """One integer code per element (4-bit codes unpacked: low nibble first)."""
    raw = state.codes.view(torch.uint8).to(torch.int16)
    if state.scheme.bits == 4:
        raw = torch.stack([raw & 15, raw >> 4], dim=-1).reshape(-1)
    return raw.reshape(-1)[:numel]


def _assert_params_close(a: torch.Tensor, b: torch.Tensor, where: str) -> None:
    if a.dtype == torch.float32:
        error = (a - b).abs().max().item()
        assert error <= 1e-6 * max(b.abs().max().item(), 1e-30), f"{where}: max |mlir - torch| = {error:.3g}"
        return
    # bf16: the same fp32 value rounded to nearest even gives the same bits; allow one ulp where the
    # fp32 values before rounding differ in their last bit (counted, and rare)
    differ = a != b
    ulp = torch.finfo(torch.bfloat16).eps * b.float().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    assert bool(((a.float() - b.float()).abs() <= ulp)[differ].all()), f"{where}: bf16 params differ by > 1 ulp"
    assert int(differ.sum()) <= max(1, a.numel() // 1000), f"{where}: {int(differ.sum())} bf16 params differ"


def _assert_states_match(state_a: dict, state_b: dict, numel: int, where: str) -> int:
    """Returns how many quantized states were compared."""
    quantized = 0
    assert state_a.keys() == state_b.keys()
    for key, a in state_a.items():
        b = state_b[key]
        if isinstance(a, QuantizedState):
            quantized += 1
            codes_a, codes_b = _codes(a, numel), _codes(b, numel)
            gap = (codes_a - codes_b).abs()
            assert int(gap.max()) <= 1, f"{where} {key}: codes differ by {int(gap.max())}"
            assert int((gap > 0).sum()) <= max(1, numel // 4096), f"{where} {key}: {int((gap > 0).sum())} codes differ"
            torch.testing.assert_close(a.scales, b.scales, rtol=1e-6, atol=0, msg=f"{where} {key}: scales")
        elif isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel() == numel:
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()), msg=f"{where} {key}")
    return quantized


def _variants_run(monkeypatch) -> list[str]:
    """The names of the kernel variants the MLIR backend looks up from now on, in order."""
    ran: list[str] = []
    original = mlir_jit.Kernels.functions
    monkeypatch.setattr(mlir_jit.Kernels, "functions", lambda self, v: ran.append(v) or original(self, v))
    return ran


HOSTS_RUNNING = {"avx512": ("avx512",), "avx2": ("avx2", "avx512")}  # an AVX-512 CPU has AVX2 too


def _use_isa(isa: str, monkeypatch) -> None:
    """Run the ``isa`` variants from now on (skip where this CPU cannot run them)."""
    if isa != "portable" and mlir_jit.host_isa() not in HOSTS_RUNNING[isa]:
        pytest.skip(f"this CPU cannot run the {isa} variants")
    monkeypatch.setattr(mlir_jit, "host_isa", lambda: isa)


def _has_variant(isa: str, bits: int) -> bool:
    """Whether a spec whose only table without arithmetic form has ``bits`` gets ``isa`` variants."""
    return isa == "avx512" or (isa == "avx2" and bits == 4)


def _compare(name: str, dtype: torch.dtype, shapes, monkeypatch, spec: str | None = None) -> None:
    counter = Launches(monkeypatch)
    mlir_params, mlir_opt = _train(name, "mlir", shapes, dtype, spec=spec)
    assert counter.launches, f"{name}: the MLIR kernels never ran"
    torch_params, torch_opt = _train(name, "torch", shapes, dtype, spec=spec)
    quantized = 0
    for shape, a, b in zip(shapes, mlir_params, torch_params):
        where = f"{name} {dtype} {shape}"
        _assert_params_close(a.detach(), b.detach(), where)
        quantized += _assert_states_match(mlir_opt.state[a], torch_opt.state[b], math.prod(shape), where)
    if any(isinstance(v, QuantizedState) for s in torch_opt.state.values() for v in s.values()):
        assert quantized, f"{name}: no quantized state compared"


# -- which specs have MLIR kernels -----------------------------------------------------------------
def test_emitter_declines_only_the_matrix_specs():
    declined = {sub for (_, sub), ok in EMITTED.items() if not ok}
    assert declined == DECLINED
    assert set(MLIR_SPECS) == set(
        "adam adamw adamw4bit adamw4bit_block adamw8bit factor4bit lion sgd sgdm4bit sinkgd".split()
    )
    # their routed fall-backs (1-D parameters) do have MLIR kernels
    assert all(EMITTED[(name, sub)] for (name, sub) in EMITTED if name in DECLINED and sub != name)


# -- kernels match the torch backend ---------------------------------------------------------------
def test_smoke_adamw_and_adamw4bit_match_torch(monkeypatch):
    for name in ("adamw", "adamw4bit"):
        _compare(name, torch.float32, [(129,), (67, 131)], monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", MLIR_SPECS)
def test_every_spec_matches_torch_on_odd_shapes(name, dtype, monkeypatch):
    _compare(name, dtype, ODD_SHAPES, monkeypatch)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DECLINED))
def test_routed_fallback_specs_match_torch(name, monkeypatch):
    # 1-D parameters go to the routed spec, which has MLIR kernels (2-D ones would need the declined plan)
    for dtype in (torch.float32, torch.bfloat16):
        _compare(name, dtype, [(1,), (129,), (4097,), (5000,)], monkeypatch)


@pytest.mark.parametrize("name", ["adamw4bit", "adamw8bit", "sgdm4bit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_small_tensors_keep_float_state_on_the_mlir_kernels(name, dtype, monkeypatch):
    # tensors of at most keep_full_precision elements hold float32 state: the "<dtype>-float" variant
    ran = _variants_run(monkeypatch)
    shapes = [(1,), (768,), (64, 64), (4096,)]
    _compare(name, dtype, shapes, monkeypatch)
    assert set(ran) == {f"{str(dtype).removeprefix('torch.')}-float"}, set(ran)
    _, opt = _train(name, "mlir", shapes, dtype)
    assert all(v.dtype == torch.float32 for s in opt.state.values() for k, v in s.items() if k != "step")


ADABELIEF_4BIT_SPEC = """optgen: 1
name: adabelief4bit
class: AdaBelief4bit
summary: AdaBelief with m in 4-bit blocks and s rank-1 (its statistics read m's blocks)
hyper:
  lr: {default: 1.0e-3, in: "[0, inf)"}
  betas: {default: [0.9, 0.999], in: "[0, 1)"}
  eps: {default: 1.0e-8, in: "[0, inf)"}
state:
  m: {init: 0, store: q4_block128_de}
  s: {init: 0, store: q4_rank1_linear_nozero}
keep_full_precision: {numel_at_most: 0}
update:
  - m = beta1 * m + (1 - beta1) * grad
  - s = beta2 * s + (1 - beta2) * (grad - m)**2
  - param = param - lr / (1 - beta1**step) * m / (sqrt(s / (1 - beta2**step)) + eps)
"""


@pytest.mark.filterwarnings("ignore:state 'm' is divided by")  # s depends on m: the zero-point check is cautious
def test_stats_super_blocks_are_larger_unless_they_read_blocks(tmp_path, monkeypatch):
    # statistics over rank-1 state only walk STATS_SUPERBLOCK elements per super-block (fewer fixed
    # costs); ones that read a block-wise state keep the blocks' super-block, and still match torch
    from optgen.codegen.emit_mlir import STATS_SUPERBLOCK, _Program

    path = tmp_path / "adabelief4bit.yaml"
    path.write_text(ADABELIEF_4BIT_SPEC)
    for spec, stats_size in (("adamw4bit", STATS_SUPERBLOCK), (str(path), 128)):
        program = _Program(make_plan(load_spec(spec)))
        sizes = {stage.op: program.stage_superblock(stage, "nd") for stage in program.plan.stages}
        assert sizes == {"stats": stats_size, "map": 128}, spec
    _compare("adabelief4bit", torch.float32, [(129,), (67, 131), (3, 5, 301), (300, 257)], monkeypatch, spec=str(path))


PER_TENSOR_SPEC = """optgen: 1
name: adam_per_tensor
class: AdamPerTensor
summary: Adam with both moments in 4-bit codes under one scale per tensor
hyper:
  lr: {default: 1.0e-3, in: "[0, inf)"}
  betas: {default: [0.9, 0.999], in: "[0, 1)"}
  eps: {default: 1.0e-8, in: "[0, inf)"}
state:
  m: {init: 0, store: {bits: 4, signed: true, normalize: tensor, table: dynamic_exponent}}
  v: {init: 0, store: {bits: 4, signed: false, normalize: tensor, table: linear_nozero}}
keep_full_precision: {numel_at_most: 0}
update:
  - m = beta1 * m + (1 - beta1) * grad
  - v = beta2 * v + (1 - beta2) * grad**2
  - param = param - lr / (1 - beta1**step) * m / (sqrt(v / (1 - beta2**step)) + eps)
"""


# every store a moment can have, each m store paired with a different v store (cycled): the kernels'
# paths (block sizes alone and mixed, per-tensor, rank-1, 4 and 8 bits, tables with and without
# arithmetic form, float) against the torch kernels
M_STORES = [
    "{bits: 4, signed: true, normalize: {block: 64}, table: dynamic_exponent}",
    "{bits: 4, signed: true, normalize: {block: 128}, table: dynamic_exponent}",
    "{bits: 4, signed: true, normalize: {block: 32}, table: linear}",
    "{bits: 8, signed: true, normalize: {block: 256}, table: dynamic_exponent}",
    "{bits: 4, signed: true, normalize: tensor, table: dynamic_exponent}",
    "{bits: 8, signed: true, normalize: {block: 96}, table: linear}",
    "bfloat16",
]
V_STORES = [
    "{bits: 4, signed: false, normalize: rank1, table: linear_nozero}",
    "{bits: 8, signed: false, normalize: rank1, table: dynamic_exponent_nozero}",
    "{bits: 4, signed: false, normalize: {block: 64}, table: linear_nozero}",
    "{bits: 8, signed: false, normalize: {block: 128}, table: dynamic_exponent_nozero}",
    "{bits: 4, signed: false, normalize: tensor, table: linear_nozero}",
    "float32",
]


@pytest.mark.slow
@pytest.mark.parametrize("pair", range(len(M_STORES) * 2), ids=lambda i: f"m{i % len(M_STORES)}-v{i % len(V_STORES)}")
def test_pairs_of_stores_match_torch(tmp_path, pair, monkeypatch):
    m, v = M_STORES[pair % len(M_STORES)], V_STORES[pair % len(V_STORES)]
    text = PER_TENSOR_SPEC.replace("adam_per_tensor", "adam_pair").replace("numel_at_most: 0", "numel_at_most: 100")
    text = text.replace("{bits: 4, signed: true, normalize: tensor, table: dynamic_exponent}", m)
    text = text.replace("{bits: 4, signed: false, normalize: tensor, table: linear_nozero}", v)
    path = tmp_path / "adam_pair.yaml"
    path.write_text(text)
    assert f"store: {m}" in text and f"store: {v}" in text
    shapes = [(1,), (50,), (127,), (4097,), (67, 131), (3, 5, 301), (1, 513), (513, 1), (300, 257)]
    dtype = torch.float32 if pair < len(M_STORES) else torch.bfloat16
    _compare("adam_pair", dtype, shapes, monkeypatch, spec=str(path))


RANK1_8BIT_SPEC = PER_TENSOR_SPEC.replace("adam_per_tensor", "adam_rank1_8bit").replace(
    "bits: 4, signed: false, normalize: tensor, table: linear_nozero",
    "bits: 8, signed: false, normalize: rank1, table: dynamic_exponent_nozero",
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "name, text",
    [
        ("adam_per_tensor", PER_TENSOR_SPEC),  # one scale per tensor: a stats stage with one maximum
        ("adam_rank1_8bit", RANK1_8BIT_SPEC),  # rank-1 scales over 8-bit DE-0 codes (lookup decode, buckets)
    ],
)
def test_other_normalizations_match_torch(tmp_path, name, text, dtype, monkeypatch):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    assert "normalize: tensor" in text or "rank1, table: dynamic_exponent_nozero" in text
    _compare(name, dtype, [*ODD_SHAPES, (300, 257)], monkeypatch, spec=str(path))


# (rows, cols) views rank-1 kernels walk: a 3x3 conv (1, all but the first), a 1x1 conv, trailing
# dims that reach MIN_ROW (2), a 3-D tensor whose last dim does (2, as for every matrix: 1)
CUTS = {(23, 21, 3, 3): 1, (67, 65, 1, 1): 1, (5, 3, 7, 41): 2, (3, 5, 301): 2, (300, 257): 1}


def test_rank1_views_keep_rows_long():
    assert {shape: mlir_jit.rank1_cut(shape) for shape in CUTS} == CUTS
    assert all(math.prod(s[1:]) < mlir_jit.MIN_ROW or math.prod(s[c:]) >= mlir_jit.MIN_ROW for s, c in CUTS.items())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["adamw4bit", "adam_rank1_8bit"])
def test_rank1_state_of_conv_shaped_params_matches_torch(tmp_path, name, dtype, monkeypatch):
    # the stored per-dim maxima are rebuilt from the row and column maxima of the view: codes and
    # scales must equal the torch kernels' (which reduce each dim directly)
    spec = None
    if name != "adamw4bit":
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(RANK1_8BIT_SPEC)
    _compare(name, dtype, list(CUTS), monkeypatch, spec=spec and str(spec))


MIXED_BLOCKS_SPEC = """optgen: 1
name: adam_mixed_blocks
class: AdamMixedBlocks
summary: Adam with m in 4-bit blocks of 64 and v in 8-bit blocks of 256 (super-blocks of 256, sub-blocks of 64)
hyper:
  lr: {default: 1.0e-3, in: "[0, inf)"}
  betas: {default: [0.9, 0.999], in: "[0, 1)"}
  eps: {default: 1.0e-8, in: "[0, inf)"}
state:
  m: {init: 0, store: {bits: 4, signed: true, normalize: {block: 64}, table: dynamic_exponent}}
  v: {init: 0, store: {bits: 8, signed: false, normalize: {block: 256}, table: linear_nozero}}
keep_full_precision: {numel_at_most: 0}
update:
  - m = beta1 * m + (1 - beta1) * grad
  - v = beta2 * v + (1 - beta2) * grad**2
  - param = param - lr / (1 - beta1**step) * m / (sqrt(v / (1 - beta2**step)) + eps)
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_blocks_of_several_sizes_match_torch(tmp_path, dtype, monkeypatch):
    # the element loop walks sub-blocks of the blocks' gcd (a scale indexed per element did not vectorize)
    path = tmp_path / "adam_mixed_blocks.yaml"
    path.write_text(MIXED_BLOCKS_SPEC)
    module = emit_mlir(make_plan(load_spec(path)), str(path))
    assert "scf.for %g = %c_0 to %L step" in module, "no sub-block loop in the whole super-blocks"
    _compare("adam_mixed_blocks", dtype, [*ODD_SHAPES, (300, 257)], monkeypatch, spec=str(path))


LOOKUP_SPECS = ["adamw4bit", "adamw4bit_block", "sgdm4bit", "adamw8bit"]  # tables decoded by lookup
PER_TENSOR_8BIT_SPEC = RANK1_8BIT_SPEC.replace("adam_rank1_8bit", "adam_tensor_8bit").replace("rank1,", "tensor,")


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vector_variants_give_the_portable_bits(tmp_path, dtype, isa, monkeypatch):
    # the vector decodes and searches run on whole super-blocks only: shapes with and without a
    # partial last one; 8-bit codes (AVX-512 only) stored block-wise (adamw8bit), with rank-1 and
    # per-tensor scales; factor4bit's matrices (the other shapes run its AdamW4bit fall-back)
    _use_isa(isa, monkeypatch)
    shapes = [(4097,), (67, 131), (3, 5, 301), (256, 384)]
    specs = {name: None for name in LOOKUP_SPECS if _has_variant(isa, 8 if "8bit" in name else 4)}
    specs["factor4bit"] = None  # its 4-bit m in the reductions backend's quantized launch (mlir_steps)
    if isa == "avx512":
        for name, text in (("adam_rank1_8bit", RANK1_8BIT_SPEC), ("adam_tensor_8bit", PER_TENSOR_8BIT_SPEC)):
            specs[name] = str(tmp_path / f"{name}.yaml")
            Path(specs[name]).write_text(text)
        assert "bits: 8, signed: false, normalize: tensor," in PER_TENSOR_8BIT_SPEC
    ran = _variants_run(monkeypatch)
    for name, spec in specs.items():
        ran.clear()
        fast_params, fast_opt = _train(name, "mlir", shapes, dtype, spec=spec)
        assert any(v.endswith(f"-{isa}") for v in ran), f"{name}: {set(ran)}"
        with monkeypatch.context() as patch:
            patch.setattr(mlir_jit, "host_isa", lambda: "portable")
            ran.clear()
            params, opt = _train(name, "mlir", shapes, dtype, spec=spec)
            assert ran and not any(v.endswith(f"-{isa}") for v in ran)
        for a, b in zip(fast_params, params):
            assert torch.equal(a, b), f"{name} {tuple(a.shape)}: params differ"
            for key, value in opt.state[b].items():
                fast = fast_opt.state[a][key]
                if isinstance(value, QuantizedState):
                    assert torch.equal(fast.codes, value.codes) and torch.equal(fast.scales, value.scales), key
                elif isinstance(value, torch.Tensor):
                    assert torch.equal(fast, value), key


DECODE_SPEC = """optgen: 1
name: add_state
class: AddState
summary: adds its {bits}-bit {table} state to the parameter (a decoder test)
hyper:
  lr: 1.0
state:
  q: {{init: 0, store: {{bits: {bits}, signed: {signed}, normalize: {{block: 256}}, table: {table}}}}}
keep_full_precision: {{numel_at_most: 0}}
update:
  - q = q
  - param = param + lr * q
"""


@pytest.mark.parametrize("bits, table, signed", [(4, "dynamic_exponent", True), (8, "dynamic_exponent", True)])
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_every_code_decodes_to_its_table_entry(tmp_path, bits, table, signed, isa, monkeypatch):
    # each code of the table in every position of a block (whole and partial super-blocks), scale 1:
    # the parameter becomes the table entry, as written in optgen.codegen.quant
    _use_isa(isa, monkeypatch)
    path = tmp_path / "add_state.yaml"
    path.write_text(DECODE_SPEC.format(bits=bits, table=table, signed=str(signed).lower()))
    values = torch.tensor(load_spec(path).state[0].store.quant.values, dtype=torch.float32)
    numel = 256 * 7 + 100
    codes = (torch.arange(numel) * 3 + torch.arange(numel) // len(values)) % len(values)  # every code, shifted
    param = torch.nn.Parameter(torch.zeros(numel))
    param.grad = torch.zeros(numel)
    ran = _variants_run(monkeypatch)
    opt = optgen.load(path)([param], backend="mlir")
    opt.step()  # state made (all zero); then every code with scale 1 (in place: the launches stay)
    state = opt.state[param]["q"]
    packed = codes.to(torch.uint8)
    if bits == 4:
        packed = F.pad(packed, (0, numel % 2)).view(-1, 2)
        packed = packed[:, 0] | (packed[:, 1] << 4)
    state.codes.copy_(packed)
    state.scales.fill_(1.0)
    param.data.zero_()
    opt.step()
    assert ran and all(v.endswith(f"-{isa}") == _has_variant(isa, bits) for v in ran), ran
    assert torch.equal(param.detach(), values[codes])


def test_bf16_store_rounds_to_nearest_even():
    # param - lr * grad lands exactly between two bf16 numbers: ties go to the even mantissa
    param = torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=torch.bfloat16, requires_grad=True)
    param.grad = torch.tensor([-(2**-8), -3 * 2**-8, 2**-8, -(2**-9)], dtype=torch.bfloat16)
    reference = param.detach().clone()
    optgen.load("sgd")([param], lr=1.0, backend="mlir").step()
    expected = [1.0, 1 + 2**-6, -1.0, 1.0]  # truncation would give 1 + 2**-7 in the second
    assert param.detach().float().tolist() == expected
    torch_param = reference.clone().requires_grad_()
    torch_param.grad = param.grad
    optgen.load("sgd")([torch_param], lr=1.0, backend="torch").step()
    assert torch.equal(param.detach(), torch_param.detach())


@pytest.mark.parametrize("name", ["adamw", "adamw4bit"])
def test_nan_gradient_is_not_silent(name):
    results = {}
    for backend in ("mlir", "torch"):
        params, grads = _inputs([(67, 131)], torch.float32, steps=1)
        grads[0][0][3, 5] = float("nan")
        params[0].grad = grads[0][0]
        opt = optgen.load(name)(params, lr=LR, backend=backend)
        if name == "adamw4bit":  # quantized state: the blocks holding NaN dequantize to NaN, with a warning
            with pytest.warns(RuntimeWarning, match="non-finite"):
                opt.step()
        else:
            opt.step()
        results[backend] = params[0].detach()
    assert bool(results["mlir"][3, 5].isnan())
    assert torch.equal(results["mlir"].isnan(), results["torch"].isnan())


def test_host_scalars_are_computed_once_per_group_and_step_count(monkeypatch):
    # inside a step the parameters of a group at the same step count share their host scalars; other
    # counts and other groups get their own (their values against torch.optim: test_trajectories)
    params, grads = _inputs([(67, 131), (5000,), (3, 5, 301), (9, 9)], torch.float32, steps=2)
    opt = optgen.load("adamw")([{"params": params[:3]}, {"params": params[3:], "lr": 0.5}], lr=LR, backend="mlir")
    module = opt.programs[0].module("mlir")
    computed, compute = [], module.host_scalars

    def counted(step, hyper):
        computed.append((float(step), float(hyper["lr"])))
        return compute(step, hyper)

    monkeypatch.setattr(module, "host_scalars", counted)
    params[2].grad = grads[0][2]  # a step ahead of the others
    opt.step()
    for p, g in zip(params, grads[1]):
        p.grad = g
    opt.step()
    assert computed == [(1.0, LR), (1.0, LR), (2.0, LR), (1.0, 0.5)], computed  # step 1: params[2]; step 2: the rest


def test_the_non_finite_warning_names_the_states_it_reached(recwarn):
    # every written state is checked in one reduction per step; a warning then names each state
    # holding NaN/Inf (here both moments of the second parameter), none of the first's
    params, grads = _inputs([(300, 200), (67, 131)], torch.float32, steps=1)
    grads[0][1][3, 5] = float("nan")
    for p, g in zip(params, grads[0]):
        p.grad = g
    optgen.load("adamw4bit")(params, lr=LR, backend="mlir").step()
    messages = [str(w.message) for w in recwarn if "non-finite" in str(w.message)]
    assert len(messages) == 2 and all("(67, 131)" in m for m in messages), messages


@pytest.mark.filterwarnings("ignore:non-finite values")
def test_a_poisoned_rank1_row_and_column_stay_poisoned_in_the_next_step():
    # the next step decodes v with the stored rank-1 scales, NaN in the poisoned row and column: the
    # kernels' min(row, column) propagates NaN from either side, as torch.minimum does
    results = {}
    for backend in ("mlir", "torch"):
        params, grads = _inputs([(67, 131)], torch.float32, steps=2)
        grads[0][0][3, 5] = float("nan")
        opt = optgen.load("adamw4bit")(params, lr=LR, backend=backend)
        for step_grads in grads:
            params[0].grad = step_grads[0]
            opt.step()
        v = quant_torch.dequantize(opt.state[params[0]]["exp_avg_sq"])
        results[backend] = params[0].detach().isnan(), v.isnan()
    (param_nan, v_nan), (torch_param_nan, torch_v_nan) = results["mlir"], results["torch"]
    assert torch.equal(param_nan, torch_param_nan) and torch.equal(v_nan, torch_v_nan)
    assert param_nan[3].all() and param_nan[:, 5].all()  # the poisoned row and column, through the old scales


# -- in place, threads -----------------------------------------------------------------------------
def _storage(opt, param) -> dict[str, int]:
    out = {"param": param.data_ptr()}
    for key, value in opt.state[param].items():
        if isinstance(value, QuantizedState):
            out[f"{key}.codes"], out[f"{key}.scales"] = value.codes.data_ptr(), value.scales.data_ptr()
        elif isinstance(value, torch.Tensor) and value.numel() > 1:
            out[key] = value.data_ptr()
    return out


def _values(state_value) -> torch.Tensor:
    return state_value.codes if isinstance(state_value, QuantizedState) else state_value


@pytest.mark.parametrize("name", ["adamw", "adamw4bit", "adamw8bit", "sgdm4bit"])
def test_updates_in_place(name, monkeypatch):
    counter = Launches(monkeypatch)
    params, grads = _inputs([(67, 131)], torch.float32, steps=3)
    param = params[0]
    view = param.detach().view(-1)  # shares the storage: sees an in-place update, not a rebound .data
    before = view.clone()
    opt = optgen.load(name)(params, lr=LR, backend="mlir")
    param.grad = grads[0][0]
    opt.step()
    storage = _storage(opt, param)
    assert len(storage) >= 2
    for step_grads in grads[1:]:
        snapshot = {k: _values(v).clone() for k, v in opt.state[param].items() if k != "step"}
        param.grad = step_grads[0]
        opt.step()
        assert _storage(opt, param) == storage, "a parameter or state tensor was reallocated"
        for key, old in snapshot.items():
            assert not torch.equal(old, _values(opt.state[param][key])), f"{key} was not updated"
    assert not torch.equal(view, before)
    assert counter.launches


@pytest.mark.parametrize("name", ["adamw", "adamw4bit"])
def test_a_step_makes_every_launch_before_running_any(name, monkeypatch):
    # between kernels that stream megabytes Python runs with cold caches, so opt.step() makes each
    # parameter's launches first and runs them back to back after the last; a direct call of the
    # generated update runs its parameter's launches at once
    counter, before = launches_before_each_run(monkeypatch)
    params, grads = _inputs([(67, 131), (5000,), (3, 5, 301)], torch.float32, steps=1)
    for param, grad in zip(params, grads[0]):
        param.grad = grad
    opt = optgen.load(name)(params, lr=LR, backend="mlir")
    opt.step()
    assert before == [0, 0, 0] and len(counter.launches) >= 3, (before, counter.launches)
    before.clear()
    stepped = len(counter.launches)
    program, group = opt.programs[0], opt.param_groups[0]
    update = program.module("mlir").update
    for param in params:
        update(param, param.grad, opt.state[param], opt._hyper_tensors(group, program))
    assert stepped == before[0] < before[1] < before[2] < len(counter.launches), (before, counter.launches)


@pytest.mark.parametrize("name", ["adamw", "adamw4bit", "factor4bit"])
def test_launch_plans_are_kept_until_the_tensors_move(name, monkeypatch):
    # a parameter's launches are planned on its first step and kept while its tensors stay put (the
    # gradient may move: autograd allocates a new one after zero_grad()); a param moved by
    # ``param.data = ...``, a loaded state_dict or another thread count makes new plans, and every
    # step stays the torch backend's
    made = []
    for kernels in (mlir_jit.Kernels, mlir_steps.StepKernels):  # factor4bit's matrix: the reductions backend's

        def counted(self, *args, make=kernels._make_plan):
            made.append(args[0])
            return make(self, *args)

        monkeypatch.setattr(kernels, "_make_plan", counted)
    params, grads = _inputs([(67, 131), (5000,), (3, 5, 301)], torch.float32, steps=6)
    twins = [p.detach().clone().requires_grad_() for p in params]
    opt = optgen.load(name)(params, lr=LR, backend="mlir")
    reference = optgen.load(name)(twins, lr=LR, backend="torch")
    planned = []
    threads = torch.get_num_threads()
    try:
        for i, step_grads in enumerate(grads):
            if i == 3:
                params[0].data = params[0].data.clone()
            elif i == 4:
                opt.load_state_dict(opt.state_dict())  # every state tensor replaced by a copy
            elif i == 5:
                torch.set_num_threads(threads % 2 + 1)
            for p, twin, g in zip(params, twins, step_grads):
                p.grad, twin.grad = g.clone(), g.clone()
            opt.step()
            reference.step()
            planned.append(len(made))
    finally:
        torch.set_num_threads(threads)
    assert planned == [3, 3, 3, 4, 7, 10], planned
    for a, b in zip(params, twins):
        _assert_params_close(a.detach(), b.detach(), f"{name} {tuple(a.shape)}")
        _assert_states_match(opt.state[a], reference.state[b], a.numel(), f"{name} {tuple(a.shape)}")


def test_a_launch_plan_keeps_no_tensor_alive():
    # plans are kept per parameter (weakly) and hold addresses, not the parameter's tensors: an
    # optimizer deleted, or a state replaced, frees their memory
    param = torch.randn(300, 200, requires_grad=True)
    param.grad = torch.randn(300, 200)
    opt = optgen.load("adamw4bit")([param], backend="mlir")
    opt.step()
    plans = opt.programs[0].module("mlir").KERNELS._plans
    assert param in plans
    codes = weakref.ref(opt.state[param]["exp_avg"].codes)
    opt.load_state_dict(opt.state_dict())
    gc.collect()
    assert codes() is None, "a replaced state's codes are still referenced"
    tensors = [weakref.ref(t) for t in (param, param.grad, opt.state[param]["exp_avg_sq"].scales)]
    before = len(plans)
    del opt, param
    gc.collect()
    assert all(t() is None for t in tensors) and len(plans) == before - 1


def test_a_failing_step_leaves_no_parameter_half_stepped(monkeypatch):
    # a sparse gradient is refused before any parameter of its group is stepped (as torch.optim
    # does); an update failing midway leaves the parameters before it stepped (their launches run
    # when the deferred block ends) and the step counters of it and those after it as they were
    counter = Launches(monkeypatch)
    params, grads = _inputs([(67, 131)] * 3, torch.float32, steps=1)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    params[1].grad = grads[0][1].to_sparse()
    opt = optgen.load("adamw4bit")(params, lr=LR, backend="mlir")
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert not counter.launches and all(torch.equal(p, b) for p, b in zip(params, before))

    params[1].grad = grads[0][1].clone()
    plan = mlir_jit.Kernels.plan

    def failing(self, param, grad, state):
        if param is params[1]:
            raise mlir_jit.MlirBackendError("made to fail")
        return plan(self, param, grad, state)

    monkeypatch.setattr(mlir_jit.Kernels, "plan", failing)
    with pytest.raises(mlir_jit.MlirBackendError, match="made to fail"):
        opt.step()
    assert [float(opt.state[p]["step"]) for p in params] == [1.0, 0.0, 0.0]
    assert counter.launches, "the first parameter's launches did not run"
    assert torch.equal(params[1], before[1]) and torch.equal(params[2], before[2])
    alone = before[0].clone().requires_grad_()
    alone.grad = grads[0][0].clone()
    reference = optgen.load("adamw4bit")([alone], lr=LR, backend="mlir")
    reference.step()
    assert_same_result(
        "adamw4bit", (params[0].detach(), opt.state[params[0]]), (alone.detach(), reference.state[alone])
    )


def test_threads_give_the_same_result_as_one_thread(monkeypatch):
    # big enough that every launch is split in more pieces than threads (MIN_ELEMENTS_PER_PIECE each)
    shape = (300, 457)
    assert math.prod(shape) >= 4 * mlir_jit.MIN_ELEMENTS_PER_PIECE
    threads = torch.get_num_threads()
    results = {}
    try:
        for count in (1, 2, 4):
            torch.set_num_threads(count)  # the knob: mlir_jit splits over torch.get_num_threads() threads
            for name in ("adamw", "adamw4bit", "adamw8bit", "sgdm4bit"):
                counter = Launches(monkeypatch)
                params, opt = _train(name, "mlir", [shape], torch.float32, steps=2)
                splits = {split for _, split in counter.launches}
                assert splits == ({1} if count == 1 else {4}), f"{name} on {count} threads: split in {splits}"
                results[(name, count)] = (params[0].detach().clone(), opt.state[params[0]])
    finally:
        torch.set_num_threads(threads)
    for name in ("adamw", "adamw4bit", "adamw8bit", "sgdm4bit"):
        assert_same_result(name, results[(name, 1)], results[(name, 2)])
        assert_same_result(name, results[(name, 1)], results[(name, 4)])


def test_each_thread_reduces_into_its_own_cache_lines(monkeypatch):
    # rank-1 statistics: one row of row / column maxima per piece; a row sharing a cache line with its
    # neighbour made the threads stall each other at every matrix row (1000 columns: 2 threads 1.25x)
    shape = (300, 457)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        counter = Launches(monkeypatch)
        _train("adamw4bit", "mlir", [shape], torch.float32, steps=1)
    finally:
        torch.set_num_threads(threads)
    split, stats = counter.launches[0][1], counter.arguments[0]  # the stats stage runs first
    rows, cols = [arg for arg in stats if isinstance(arg, tuple)][-2:]  # its outputs: after the inputs
    assert split == 4
    # piece p writes [address + 4 * p * stride, + 4 * entries): its rows' then its columns' maxima in
    # one row of whole cache lines, which no other piece touches
    (rows_at, stride), (cols_at, cols_stride) = rows, cols
    assert rows_at % 64 == 0 and stride * 4 % 64 == 0, "a piece's maxima do not start a cache line"
    assert cols_stride == stride and cols_at == rows_at + 4 * shape[0]
    assert stride >= shape[0] + shape[1]


# A kernel of each kind a team entry serves: over [lo, hi) with whole memrefs and one output per
# piece (``first``), and element-wise over slices of its memrefs.
TEAM_PROBE = """
module {
  func.func @ranged(%lo: index, %hi: index, %hits: memref<?xf32>, %first: memref<?xf32>, %add: f32)
      attributes {llvm.emit_c_interface} {
    %c0 = arith.constant 0 : index
    %c1 = arith.constant 1 : index
    scf.for %i = %lo to %hi step %c1 {
      %old = memref.load %hits[%i] : memref<?xf32>
      %new = arith.addf %old, %add : f32
      memref.store %new, %hits[%i] : memref<?xf32>
    }
    %lo64 = arith.index_cast %lo : index to i64
    %at = arith.sitofp %lo64 : i64 to f32
    memref.store %at, %first[%c0] : memref<?xf32>
    return
  }
  func.func @sliced(%x: memref<?xf32>, %n: memref<?xf32>) attributes {llvm.emit_c_interface} {
    %c0 = arith.constant 0 : index
    %c1 = arith.constant 1 : index
    %len = memref.dim %x, %c0 : memref<?xf32>
    %l64 = arith.index_cast %len : index to i64
    %l = arith.sitofp %l64 : i64 to f32
    scf.for %i = %c0 to %len step %c1 {
      %i64 = arith.index_cast %i : index to i64
      %v = arith.sitofp %i64 : i64 to f32
      memref.store %v, %x[%i] : memref<?xf32>
      memref.store %l, %n[%i] : memref<?xf32>
    }
    return
  }
TEAMS
}
"""


@pytest.mark.parametrize("team", ["openmp", "pool"])
def test_team_runs_every_piece_once(monkeypatch, team):
    # the OpenMP team (torch's libgomp) and the thread-pool fall-back behave the same
    if team == "pool":
        monkeypatch.setattr(mlir_jit, "_gomp", lambda: None)
    elif mlir_jit._gomp() is None:
        pytest.fail("torch ships libgomp on Linux: the OpenMP team should be found")
    ranged = ["%lo: index", "%hi: index", "%hits: memref<?xf32>", "%first: memref<?xf32>", "%add: f32"]
    teams = team_function("ranged", ranged, frozenset({"first"}))
    teams += team_function("sliced", ["%x: memref<?xf32>", "%n: memref<?xf32>"])
    functions = mlir_jit.compile_module("probe", team, TEAM_PROBE.replace("TEAMS", "\n".join(teams)))
    count, split = 1000, 3
    hits, first = torch.zeros(count), torch.full((split,), -1.0)
    mlir_jit.launch(functions["ranged_team"], count, [mlir_jit.memref(hits), (first.data_ptr(), 1), 0.5], split)
    assert torch.equal(hits, torch.full((count,), 0.5)), "an element was visited twice or never"
    assert first.tolist() == [0.0, 333.0, 666.0]  # piece p wrote its own output: its start
    x, n = torch.full((count,), -1.0), torch.zeros(count)
    mlir_jit.launch(functions["sliced_team"], count, [mlir_jit.memref(x), mlir_jit.memref(n)], split)
    bounds = [0, 333, 666, 1000]
    expected = torch.cat([torch.arange(hi - lo, dtype=torch.float32) for lo, hi in zip(bounds, bounds[1:])])
    assert torch.equal(x, expected), "slices do not start at their piece"
    assert n.unique().tolist() == [333.0, 334.0]  # each slice's length is its piece's
    # a plan's Launch is packed once: each run writes its slot's memref and its scalar, and every
    # run claims all pieces again (the claim counter starts at 0 each time)
    slot = mlir_jit.Slot()
    planned = mlir_jit.Launch(functions["ranged_team"], count, [slot, (first.data_ptr(), 1)], ("add",), split)
    a, b = torch.zeros(count), torch.zeros(count)
    for target, add in ((a, 0.5), (b, 2.0), (a, 1.0)):
        planned.bind({slot: mlir_jit.memref(target)}, {}, {"add": add})()
    assert torch.equal(a, torch.full((count,), 1.5)) and torch.equal(b, torch.full((count,), 2.0))


def test_bf16_stores_round_like_torch():
    # Body.narrow, the bf16 store of every kernel, bit for bit against torch's float32 -> bfloat16
    # conversion: nearest even at every tie, carries into the exponent, infinities, subnormals; and
    # any NaN (quiet, signalling, negative, with payload) a NaN
    body = emit_mlir_module.Body()
    loaded = body.op("memref.load %x[%i] : memref<?xf32>", 3)
    body.raw(f"memref.store {body.narrow(loaded, 'bf16', 3)}, %y[%i] : memref<?xbf16>", 3)
    source = "\n".join(
        [
            "module {",
            "  func.func @narrow(%x: memref<?xf32>, %y: memref<?xbf16>) attributes {llvm.emit_c_interface} {",
            "    %zero = arith.constant 0 : index",
            "    %one = arith.constant 1 : index",
            "    %n = memref.dim %x, %zero : memref<?xf32>",
            *[line for line in body.lines if " = arith.constant " in line],
            "    scf.for %i = %zero to %n step %one {",
            *[line for line in body.lines if " = arith.constant " not in line],
            "    }",
            "    return",
            "  }",
            *team_function("narrow", ["%x: memref<?xf32>", "%y: memref<?xbf16>"]),
            "}",
        ]
    )
    functions = mlir_jit.compile_module("narrow", "test", source)
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F80FFFF, 0x3F817FFF, 0x7F7FFFFF, 0x7F7F8000, 0x00008000,
                         0x00018000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFC00001, 0x7FFFFFFF,
                         0x80000000, 0x00000000], dtype=torch.int64).to(torch.int32)  # fmt: skip
    x = torch.cat([ties.view(torch.float32), torch.randn(4097) * 1e3, torch.randn(4097) * 1e-40])
    y = torch.empty(x.numel(), dtype=torch.bfloat16)
    mlir_jit.launch(functions["narrow_team"], x.numel(), [mlir_jit.memref(x), mlir_jit.memref(y)])
    numbers = ~torch.isnan(x)
    assert torch.equal(y.view(torch.int16)[numbers], x.to(torch.bfloat16).view(torch.int16)[numbers])
    # a NaN stays a NaN: the quiet 0x7FC0 (torch's scalar rounding; its vectorized one gives 0xFFFF)
    assert int(numbers.logical_not().sum()) == 4 and (y.view(torch.int16)[~numbers] == 0x7FC0).all()


def test_team_function_refuses_arguments_it_cannot_pass():
    with pytest.raises(ValueError, match=r"memref<4x4xf32>"):
        team_function("k", ["%lo: index", "%hi: index", "%m: memref<4x4xf32>"])


# -- errors, CLI -----------------------------------------------------------------------------------
BROKEN_PARSE = """module {
  func.func @map_0(%a: memref<?xf32>) attributes {llvm.emit_c_interface} {
    return
  }
  func.func @stats_1(%a: memref<?xf32>) attributes {llvm.emit_c_interface} {
    %x = arith.addf %a, %a : f32
    return
  }
}"""
BROKEN_LOWERING = """module {
  func.func @map_0(%a: memref<?xf32>) attributes {llvm.emit_c_interface} {
    return
  }
  func.func @map_1(%a: tensor<4xf32>) -> tensor<4xf32> attributes {llvm.emit_c_interface} {
    %e = tensor.empty() : tensor<4xf32>
    %r = linalg.add ins(%a, %a : tensor<4xf32>, tensor<4xf32>) outs(%e : tensor<4xf32>) -> tensor<4xf32>
    return %r : tensor<4xf32>
  }
}"""


@pytest.mark.parametrize(
    ("source", "step", "stage"), [(BROKEN_PARSE, "parsing", "stats_1"), (BROKEN_LOWERING, "JIT compilation", "map_1")]
)
def test_failing_lowering_names_spec_and_stage_and_keeps_the_mlir(source, step, stage):
    with pytest.raises(mlir_jit.MlirBackendError) as caught:
        mlir_jit.compile_module("my_spec", "float32-any", source)
    message = str(caught.value)
    assert f"{step} failed for spec 'my_spec'" in message
    assert f"stage {stage}:" in message
    path = Path(message.split("The MLIR is in ", 1)[1].split(" ", 1)[0])
    assert path.is_file() and path.read_text().startswith(source)  # line numbers match the diagnostics
    assert "torch-mlir-opt" in message and str(path) in message


def test_generated_mlir_does_not_depend_on_the_hash_seed():
    # two 8-bit states decoded by lookup: their loops come in the spec's order, not a set's
    def show(seed: str) -> str:
        command = [sys.executable, "-m", "optgen.cli", "show", "adamw8bit", "--mlir"]
        env = {**os.environ, "PYTHONHASHSEED": seed}
        return subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout

    outputs = {show(seed) for seed in ("1", "2", "3", "4")}
    assert len(outputs) == 1 and "vpermi2var" in outputs.pop()


def test_show_mlir_prints_the_modules(capsys):
    assert main(["show", "adamw4bit", "--mlir"]) == 0
    out = capsys.readouterr().out
    for variant in ("float32-nd", "float32-flat", "bfloat16-nd", "bfloat16-flat"):
        assert f"// adamw4bit, variant {variant} (" in out
        assert f"// adamw4bit, variant {variant}-avx512 (" in out  # m's table looked up by vpermps
        assert f"// adamw4bit, variant {variant}-avx2 (" in out
    for variant in ("float32-float", "bfloat16-float"):  # small tensors: state kept in float32
        assert f"// adamw4bit, variant {variant} (" in out
    assert (
        out.count("func.func @map_1(") == 14
        and out.count("func.func @map_1_team(") == 14
        and out.count("func.func @stats_0(") == 6  # rank-1 scales: nd variants only
        and out.count("llvm.x86.avx512.permvar.sf.512") == 4
        # AVX2, per variant: the decode (2 halves x 2 table halves), the encode (2 halves x 3 levels)
        and out.count("llvm.x86.avx2.permps") == 4 * 10
        and "i16 to bf16" in out  # bf16 params rounded by Body.narrow
        and "memref<?xi8>" in out
    )
    assert main(["show", "swan", "--mlir"]) == 0
    out = capsys.readouterr().out
    assert "swan: the MLIR backend declines this plan" in out and "// adamw, variant float32-any" in out
    with pytest.raises(SystemExit):
        main(["show", "adamw", "--mlir", "--torch"])


@pytest.mark.slow
def test_step_cpu_benchmark_writes_its_table(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "step_cpu.py"
    args = ["--tensors", "2", "--numel", "5000", "--rounds", "2", "--no-compile", "--threads", "1"]
    result = subprocess.run(
        [sys.executable, str(script), *args, "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(line for line in (tmp_path / "step_time_cpu.csv").open() if not line.startswith("#")))
    names = {r["implementation"] for r in rows}
    assert {"torch.optim.AdamW fused", "optgen adamw (mlir)", "optgen adamw4bit (mlir)"} <= names
    assert all(float(r["median_ms"]) > 0 for r in rows)
    fused = [r for r in rows if r["implementation"] == "torch.optim.AdamW fused"]  # one per workload
    assert [r["ratio_to_fused"] for r in fused] == ["1.00", "1.00"]
    assert fused[1]["workload"].startswith("bfloat16, ")  # the same list as bf16 parameters
    adamw = {r["workload"] for r in rows if r["implementation"] == "optgen adamw (mlir)"}
    assert adamw == {f["workload"] for f in fused}
    assert "| optgen adamw4bit (mlir) |" in (tmp_path / "step_cpu.md").read_text()


# -- arithmetic code tables --------------------------------------------------------------------------
ENCODER_SPEC = """optgen: 1
name: store_grad
class: StoreGrad
summary: keeps {stored} in {bits}-bit {table} codes (an encoder test)
hyper:
  lr: {{default: 1.0e-3}}
state:
  q: {{init: 0, store: {{bits: {bits}, signed: {signed}, normalize: {{block: 128}}, table: {table}}}}}
keep_full_precision: {{numel_at_most: 0}}
update:
  - q = {stored}
  - param = param - lr * q
"""


@pytest.mark.parametrize(
    "bits, table, signed",
    [
        (4, "linear_nozero", False),  # arithmetic decode and encode (first + code * step, a power of two)
        (8, "linear_nozero", False),
        (4, "dynamic_exponent", True),  # portable: a select tree; avx512 too; avx2: vector search
        # portable: buckets of float32 keys (emit_mlir._bucket_encode); avx512: vector search (_search_bytes)
        (8, "dynamic_exponent", True),
        (8, "dynamic_exponent", False),
        (8, "linear", True),
    ],
)
@pytest.mark.parametrize("isa", ["avx512", "avx2", "portable"])
def test_codes_are_the_nearest_entry_at_every_midpoint(tmp_path, bits, table, signed, isa, monkeypatch):
    # Every encoder against the count of float32 midpoints below x: exactly at each midpoint, one
    # float32 ulp either side, at the table's entries, at zeros and subnormals, and at random values
    # of every magnitude; a NaN block gives the torch kernels' codes.
    _use_isa(isa, monkeypatch)
    path = tmp_path / "store_grad.yaml"
    stored = "grad" if signed else "abs(grad)"
    path.write_text(ENCODER_SPEC.format(bits=bits, table=table, signed=str(signed).lower(), stored=stored))
    values = load_spec(path).state[0].store.quant.values
    entries = torch.tensor(values, dtype=torch.float32)
    mids = torch.tensor(midpoints(values), dtype=torch.float32)  # as the generator rounds them
    gen = torch.Generator().manual_seed(0)
    magnitudes = torch.cat([torch.rand(2000, generator=gen), 10 ** (-12 * torch.rand(2000, generator=gen))])
    probes = torch.cat(
        [
            mids,
            mids.nextafter(torch.tensor(-2.0)),
            mids.nextafter(torch.tensor(2.0)),
            entries,
            torch.tensor([0.0, -0.0, 1e-40, -1e-40, 1.0, -1.0]),
            magnitudes,
            -magnitudes,
        ]
    )
    if not signed:
        probes = probes[probes >= 0]
    blocks = -(-probes.numel() // 127)
    grad = torch.zeros(blocks + 1, 128)
    grad[:, 0] = 1.0  # every block's absmax is 1: x is the probe itself
    padded = torch.zeros(blocks * 127)
    padded[: probes.numel()] = probes
    grad[:blocks, 1:] = padded.view(blocks, 127)
    grad[blocks, 1:] = torch.linspace(0, 1, 127)
    grad[blocks, 64] = float("nan")  # its block's scale is NaN: every element there decodes to NaN
    codes, scales = {}, {}
    ran = _variants_run(monkeypatch)
    for backend in ("mlir", "torch"):
        param = torch.nn.Parameter(torch.zeros(blocks + 1, 128))
        param.grad = grad.clone()
        opt = optgen.load(path)([param], backend=backend)
        with pytest.warns(RuntimeWarning, match="non-finite"):
            opt.step()
        codes[backend] = _codes(opt.state[param]["q"], param.numel()).view(blocks + 1, 128).long()
        scales[backend] = opt.state[param]["q"].scales
    looked_up = emit_mlir_module._power_of_two_step(load_spec(path).state[0].store.quant) is None
    assert ran and all(v.endswith(f"-{isa}") == (looked_up and _has_variant(isa, bits)) for v in ran), ran
    expected = (probes[:, None] > mids[None, :]).sum(dim=1)
    assert torch.equal(codes["mlir"][:blocks, 1:].reshape(-1)[: probes.numel()], expected)
    assert torch.equal(codes["torch"][:blocks, 1:].reshape(-1)[: probes.numel()], expected)
    assert scales["mlir"][blocks].isnan() and scales["torch"][blocks].isnan()
    codes["mlir"][blocks, 64] = codes["torch"][blocks, 64]  # a NaN's code: MLIR 0, torch.bucketize the last
    assert torch.equal(codes["mlir"], codes["torch"])


def test_launch_passes_each_kind_of_argument():
    # The team entry's data words (memref, i64, f32, f64): a probe function stores what it got.
    source = """
module {
  func.func @probe(%lo: index, %hi: index, %i: index, %x: f32, %y: f64, %view: memref<?xf32>, %out: memref<?xf64>)
      attributes {llvm.emit_c_interface} {
    %c0 = arith.constant 0 : index
    %c1 = arith.constant 1 : index
    %c2 = arith.constant 2 : index
    %c3 = arith.constant 3 : index
    %c4 = arith.constant 4 : index
    %i64 = arith.index_cast %i : index to i64
    %a = arith.sitofp %i64 : i64 to f64
    memref.store %a, %out[%c0] : memref<?xf64>
    %b = arith.extf %x : f32 to f64
    memref.store %b, %out[%c1] : memref<?xf64>
    memref.store %y, %out[%c2] : memref<?xf64>
    %n = memref.dim %view, %c0 : memref<?xf32>
    %n64 = arith.index_cast %n : index to i64
    %d = arith.sitofp %n64 : i64 to f64
    memref.store %d, %out[%c3] : memref<?xf64>
    %first = memref.load %view[%c0] : memref<?xf32>
    %e = arith.extf %first : f32 to f64
    memref.store %e, %out[%c4] : memref<?xf64>
    return
  }
TEAM
}
"""
    args = ["%lo: index", "%hi: index", "%i: index", "%x: f32", "%y: f64"]
    args += ["%view: memref<?xf32>", "%out: memref<?xf64>"]
    team = "\n".join(team_function("probe", args))
    address = mlir_jit.compile_module("probe", "test", source.replace("TEAM", team))["probe_team"]
    values = torch.arange(3, 9, dtype=torch.float32)
    out = torch.zeros(5, dtype=torch.float64)
    mlir_jit.launch(address, 1, [-7, 1.5, mlir_jit.F64(0.1), mlir_jit.memref(values), mlir_jit.memref(out)])
    assert out.tolist() == [-7.0, 1.5, 0.1, 6.0, 3.0]
    with pytest.raises(TypeError, match="MLIR call argument of type str"):
        mlir_jit.launch(address, 1, ["7"])
