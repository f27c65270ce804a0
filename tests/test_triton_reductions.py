"""Triton backend, reduce and matrix stages (Factor, SinkGD, SWAN and small specs that exercise every
reduction), in Triton's CPU interpreter. See tests/test_triton_backend.py for why TRITON_INTERPRET is
set at import and which interpreter gaps the tests account for.

The oracle is the torch backend. The parameters start at zero here, so the parameter after a few
steps *is* the sum of the updates and a relative error measures the update itself (from a random
start, the rounding of the parameter would hide it).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import optgen  # noqa: E402
from optgen.codegen.build import header  # noqa: E402
from optgen.codegen.emit_triton import emit_triton, schedule  # noqa: E402
from optgen.codegen.plan import make_plan  # noqa: E402
from optgen.codegen.spec import load_spec, parse_spec  # noqa: E402
from optgen.runtime.state import QuantizedState  # noqa: E402

pytestmark = pytest.mark.slow

# Relative tolerance (max |triton - torch| / max |torch|) on parameters and float state, float32.
# The reduction kernels sum in another order than torch's CPU kernels (per-lane partial sums, then a
# tree; numpy's pairwise sum under the interpreter), so rows/cols/scalar statistics differ by a few
# ulps. Measured on the shapes below: at most 2.0e-7 (Factor's row/column means and its update,
# SinkGD after 10 normalization rounds, SWAN's RMS rescaling), so no spec needs more than 1e-6.
TOLERANCE = {"factor4bit": 1e-6, "sinkgd": 1e-6, "swan": 1e-6, "reductions": 1e-6, "rownormadam": 1e-6, "muonq": 1e-6}

REDUCTIONS = """\
optgen: 1
name: reductions
class: Reductions
hyper:
  lr: 0.01
  beta: 0.9
state:
  r: {kind: rows, init: 0}
  s: {kind: scalar, init: 1}
update:
  - a = max(abs(grad), dim=-1)
  - b = min(grad * param, dim=-2)
  - c = norm(grad, dim=all)
  - d = sum(grad, dim=-1)
  - r = beta * r + (1 - beta) * a
  - s = beta * s + max(r, dim=all)
  - param = param - lr * (grad / (r + 1) + b / s + c * d / (1 + sum(abs(d), dim=all)))
"""

# A reduction before a rank-1 quantized store: the stats kernel reads the row statistics too.
ROW_NORM_ADAM = """\
optgen: 1
name: rownormadam
class: RowNormAdam
hyper:
  lr: 0.01
  betas: {default: [0.9, 0.99]}
  eps: 1.0e-8
state:
  m: {init: 0, store: q4_block128_de}
  v: {init: 0, store: {bits: 4, signed: false, normalize: rank1, table: linear_nozero}}
keep_full_precision: {numel_at_most: 64}
update:
  - g = grad / (sqrt(mean(grad**2, dim=-1)) + 1.0e-8)
  - m = beta1 * m + (1 - beta1) * g
  - v = beta2 * v + (1 - beta2) * g**2
  - param = param - lr * m / (sqrt(v) + eps)
"""

# A matrix stage reading a quantized state's new value (kept in float32 scratch for it).
MUON_Q = """\
optgen: 1
name: muonq
class: MuonQ
hyper:
  lr: 0.01
  beta: 0.95
state:
  m: {init: 0, store: q8_block256_de}
keep_full_precision: {numel_at_most: 64}
update:
  - m = beta * m + grad
  - param = param - lr * whiten(standardize(m, dim=-1), steps=5, method=quintic)
"""

CUSTOM = {"reductions": REDUCTIONS, "rownormadam": ROW_NORM_ADAM, "muonq": MUON_Q}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, b = actual.detach().double(), expected.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def codes(state: QuantizedState) -> torch.Tensor:
    numel = state.shape.numel()
    if state.scheme.bits == 8:
        return state.codes.long()
    return torch.stack([state.codes & 15, state.codes >> 4], dim=-1).reshape(-1)[:numel].long()


def optimizer_class(spec: str, tmp_path):
    if spec in CUSTOM:
        path = tmp_path / f"{spec}.yaml"
        path.write_text(CUSTOM[spec])
        return optgen.load(str(path))
    return optgen.load(spec)


def run_both(cls, shape, dtype=torch.float32, steps=3, grads=None, **kwargs):
    gen = torch.Generator().manual_seed(shape[-1] * 7 + len(shape))
    params = [torch.nn.Parameter(torch.zeros(shape, dtype=dtype)) for _ in range(2)]
    torch_opt = cls([params[0]], backend="torch", **kwargs)
    triton_opt = cls([params[1]], backend="triton", **kwargs)
    for step in range(steps):
        grad = grads[step] if grads else torch.randn(shape, generator=gen)
        for p in params:
            p.grad = grad.to(dtype).clone()
        torch_opt.step()
        triton_opt.step()
    return (params[1], triton_opt.state[params[1]]), (params[0], torch_opt.state[params[0]])


def assert_close(triton_side, torch_side, tol):
    (p_triton, s_triton), (p_torch, s_torch) = triton_side, torch_side
    assert p_torch.abs().max() > 0  # the steps did something
    assert rel_err(p_triton, p_torch) <= tol
    assert s_triton.keys() == s_torch.keys()
    for key, expected in s_torch.items():
        actual = s_triton[key]
        if isinstance(expected, QuantizedState):
            a, b = codes(actual), codes(expected)
            assert (a - b).abs().max().item() <= 1, key  # equal, or one apart at a tie
            assert (a == b).double().mean().item() >= 0.99, key
            assert rel_err(actual.scales, expected.scales) <= tol, key
        else:
            assert rel_err(actual, expected) <= tol, key


@pytest.mark.parametrize(
    "spec,shape",
    [
        ("factor4bit", (70, 61)),  # 4270 elements: m is 4-bit
        ("factor4bit", (33, 35)),  # m stays float32 (keep_full_precision)
        ("sinkgd", (61, 70)),
        ("sinkgd", (3, 5, 277)),  # a batch of matrices
        ("swan", (70, 61)),  # tall: whitened on the transposed side
        ("swan", (3, 9, 5)),
        ("reductions", (70, 61)),
        ("reductions", (3, 5, 277)),
        ("reductions", (200, 1)),
        ("rownormadam", (300,)),  # a vector: one row; rank-1 falls back to blocks
        ("rownormadam", (70, 61)),
        ("rownormadam", (3, 5, 277)),  # rank-1 statistics over three dims
        ("muonq", (40, 27)),
    ],
    ids=str,
)
def test_triton_matches_torch_from_zero(spec, shape, tmp_path):
    cls = optimizer_class(spec, tmp_path)
    program = next(p for p in cls.programs if p.takes(torch.zeros(shape)))
    assert program.name == spec  # the routed spec itself, not its fall-back
    kwargs = {"weight_decay": 0.1, "maximize": True} if spec == "factor4bit" else {}
    assert_close(*run_both(cls, shape, **kwargs), TOLERANCE[spec])


@pytest.mark.parametrize("spec", ["factor4bit", "sinkgd", "swan"])
def test_bfloat16_parameters(spec, tmp_path):
    cls = optimizer_class(spec, tmp_path)
    (p_triton, _), (p_torch, _) = run_both(cls, (40, 70), dtype=torch.bfloat16)
    assert p_triton.dtype == torch.bfloat16
    assert rel_err(p_triton, p_torch) <= 2.0**-8  # at most one bf16 rounding step apart


def test_nan_in_a_reduction_reaches_the_same_entries(tmp_path):
    cls = optimizer_class("reductions", tmp_path)
    grad = torch.randn(9, 11)
    grad[4, 6] = float("nan")  # max over row 4, min over column 6, and the norm of everything turn NaN
    (p_triton, s_triton), (p_torch, s_torch) = run_both(cls, (9, 11), steps=1, grads=[grad])
    assert torch.isnan(p_torch).all()  # the norm over all entries spreads it everywhere
    assert torch.equal(torch.isnan(p_triton), torch.isnan(p_torch))
    assert torch.equal(torch.isnan(s_triton["r"]), torch.isnan(s_torch["r"]))
    assert torch.isnan(s_torch["r"][4]).all() and not torch.isnan(s_torch["r"][3]).any()


def kernels_module(spec: str, tmp_path):
    cls = optimizer_class(spec, tmp_path)
    program = cls.programs[0]
    assert "triton" in program.kernels  # not declined any more
    return importlib.import_module(f"{program.package}.{program.kernels['triton']}")


def test_factor_row_and_column_statistics_share_one_pass_over_the_gradient(tmp_path):
    module = kernels_module("factor4bit", tmp_path)
    launches = [(s.op, s.domain, s.dim, s.columns) for s in module.STAGES]
    assert launches == [
        ("reduce", "full", -2, "mean"),  # means of g² along columns and (riding along) rows, from grad
        ("map", "rows", 0, ""),
        ("map", "cols", 0, ""),
        ("reduce", "rows", 0, ""),  # mean(r): one partial per program
        ("map", "full", 0, ""),  # m's update moved here, beside the parameter's
    ]
    # No full-size scratch tensor: grad is read twice per step, m and param once each.
    assert "full" not in {kind for _, kind in module.BUFFERS}


def test_sinkgd_rounds_are_recomputed_not_stored(tmp_path):
    module = kernels_module("sinkgd", tmp_path)
    assert [s.op for s in module.STAGES] == ["reduce"] * 10 + ["map"]
    assert [s.dim for s in module.STAGES[:10]] == [-1, -2] * 5
    assert "full" not in {kind for _, kind in module.BUFFERS}


def test_swan_matrix_stage_runs_inside_the_op(tmp_path):
    module = kernels_module("swan", tmp_path)
    assert [s.op for s in module.STAGES] == ["matrix", "reduce", "map"]
    assert module.BUFFERS == (("d", "full"), ("r0", "scalar"))  # the whitened gradient crosses launches


@pytest.mark.parametrize("spec", ["factor4bit", "sinkgd", "swan"])
def test_builtin_matrix_specs_are_emitted(spec):
    for sub in load_spec(spec).all_specs():
        plan = make_plan(sub)
        assert emit_triton(plan, header(sub)) is not None, sub.name


def test_schedule_keeps_a_value_whose_inputs_are_overwritten(tmp_path):
    """``mo`` reads m before m's store, which stays in the first launch (the reduction reads m's new
    value): ``mo`` cannot be recomputed after that store, so it goes through memory."""
    spec = parse_spec(
        """\
optgen: 1
name: keepold
class: KeepOld
hyper: {lr: 0.01}
state:
  m: {init: 0}
update:
  - mo = m * 2
  - m = 0.9 * m + grad
  - param = param - lr * (m + mo) / (1 + mean(m**2, dim=all))
"""
    )
    steps = schedule(make_plan(spec))
    assert [s.op for s in steps] == ["map", "reduce", "map"]
    assert "mo" in map(str, steps[0].outputs) and "mo" in map(str, steps[2].inputs)
    path = tmp_path / "keepold.yaml"
    path.write_text(spec.text)
    assert_close(*run_both(optgen.load(str(path)), (13, 17)), 1e-6)


def test_cli_show_triton_prints_reduction_kernels(capsys):
    from optgen.cli import main

    assert main(["show", "sinkgd", "--triton"]) == 0
    out = capsys.readouterr().out
    assert "declines" not in out
    assert "def reduce_1_kernel(" in out and "for first in range(0, C, BLOCK_N):" in out
    assert "r1 = mean(x_2**2, dim=-2)" in out  # each kernel's docstring holds the lines it runs


def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter is lenient: every launch of these specs also goes through triton's compiler
    (PTX for sm_90, no GPU needed), in a process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("triton_compile.py")
    specs = ["factor4bit", "sinkgd", "swan", "adamw8bit"]  # + the fall-backs adamw4bit and adamw
    done = subprocess.run(
        [sys.executable, str(script), *specs], env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.split()
    assert "reduce_1_reduce_3" in lines and "map_20" in lines and "reduce_1" in lines  # Factor, SinkGD, SWAN
