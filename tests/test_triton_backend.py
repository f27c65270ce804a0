"""The Triton backend, run in Triton's CPU interpreter (CI has no GPU).

TRITON_INTERPRET=1 must be set before a ``@triton.jit`` function is decorated (triton 3.9 picks
``InterpretedFunction`` at decoration time), so it is set here, when pytest imports this module,
before any test imports optgen's Triton modules. Interpreter gaps these tests account for:
- ``x.to(tl.bfloat16)`` truncates (and its "rtne" mode rounds ties away from zero); the kernels
  round with integer ops instead (``triton_lib.round_to_bfloat16``), checked below against torch;
- ``triton.autotune`` benchmarks with CUDA events; under the interpreter we give it a CPU
  ``do_bench`` (``autotune.cpu_bench``), so tuned *choices* here are meaningless, only the
  persistence and lookup logic and the in-place safety (restore_value) are tested;
- bf16 ``tl.dot`` is wrong in the interpreter: no generated kernel uses ``tl.dot`` (matrix stages
  run torch.matmul inside the op), so nothing here depends on it;
- a ``tl.reduce`` with a Python combine function runs one element at a time: the reduction kernels
  sum with triton's own combine function, which the interpreter runs with numpy.
Reduce and matrix stages have their own tests in tests/test_triton_reductions.py.
The oracle is the torch backend (itself tested against torch.optim and the fp64 oracles).
"""

from __future__ import annotations

import os

os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import optgen  # noqa: E402
from optgen.codegen.build import header  # noqa: E402
from optgen.codegen.emit_triton import emit_triton  # noqa: E402
from optgen.codegen.plan import make_plan  # noqa: E402
from optgen.codegen.spec import builtin_specs, load_spec, parse_spec  # noqa: E402
from optgen.runtime import autotune, triton_lib  # noqa: E402
from optgen.runtime.state import QuantizedState  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`"),
]

SPECS = sorted(builtin_specs())
# Odd sizes (not multiples of any tile or block), 1-D/2-D/3-D, both sides of keep_full_precision.
SHAPES = [(1,), (127,), (129,), (4097,), (70, 61), (3, 5, 277)]
BF16_SHAPES = [(129,), (70, 61)]
STEPS = 3


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, b = actual.detach().double(), expected.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def unpack(codes: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Codes per element, read from the bytes directly (4-bit: even element in the low nibble)."""
    if bits == 8:
        return codes.long()
    return torch.stack([codes & 15, codes >> 4], dim=-1).reshape(-1)[:numel].long()


def hyper_kwargs(cls) -> dict:
    """Non-default settings that exercise more of each update (weight decay, Nesterov, maximize)."""
    keys = {h.key for h in cls.hypers}
    kwargs = {"lr": 1e-2}
    kwargs |= {k: v for k, v in {"weight_decay": 0.05, "momentum": 0.9, "nesterov": True}.items() if k in keys}
    return kwargs


def program_for(cls, shape):
    param = torch.zeros(shape)
    return next((p for p in cls.programs if p.takes(param)), cls.programs[-1])


def assert_same_state(triton_state: dict, torch_state: dict, dtype_tol: float) -> None:
    assert triton_state.keys() == torch_state.keys()
    for key, expected in torch_state.items():
        actual = triton_state[key]
        if isinstance(expected, QuantizedState):
            assert isinstance(actual, QuantizedState), key
            numel = expected.shape.numel()
            a, b = unpack(actual.codes, actual.scheme.bits, numel), unpack(expected.codes, expected.scheme.bits, numel)
            # Equal, or one apart where a value sits within rounding of a midpoint (a tie).
            assert (a - b).abs().max().item() <= 1, key
            assert (a == b).double().mean().item() >= 0.99, key
            assert rel_err(actual.scales, expected.scales) <= 1e-6, key
        else:
            assert rel_err(actual, expected) <= dtype_tol, key


def run_both(spec: str, shape: tuple, dtype: torch.dtype, steps: int = STEPS):
    cls = optgen.load(spec)
    gen = torch.Generator().manual_seed(len(shape) * 1000 + shape[-1])
    start = torch.randn(shape, generator=gen).to(dtype)
    p_torch, p_triton = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    kwargs = hyper_kwargs(cls)
    o_torch, o_triton = cls([p_torch], backend="torch", **kwargs), cls([p_triton], backend="triton", **kwargs)
    for _ in range(steps):
        grad = torch.randn(shape, generator=gen).to(dtype)
        p_torch.grad, p_triton.grad = grad.clone(), grad.clone()
        o_torch.step()
        o_triton.step()
    return (p_triton, o_triton.state[p_triton]), (p_torch, o_torch.state[p_torch]), start


@pytest.mark.parametrize(
    "spec,shape,dtype",
    [(s, shape, torch.float32) for s in SPECS for shape in SHAPES]
    + [(s, shape, torch.bfloat16) for s in SPECS for shape in BF16_SHAPES],
    ids=str,
)
def test_triton_matches_torch_backend(spec, shape, dtype):
    cls = optgen.load(spec)
    program = program_for(cls, shape)
    assert "triton" in program.kernels  # no built-in spec is declined (reduce and matrix stages included)
    (p_triton, s_triton), (p_torch, s_torch), start = run_both(spec, shape, dtype)
    assert not torch.equal(p_torch, start)  # the step did something
    # fp32: a few ulps (FMA/ordering; the reduction kernels sum in another order than torch, which
    # tests/test_triton_reductions.py measures: <= 2e-7 of the update); bf16 storage: at most one
    # bf16 rounding step apart.
    tol = 1e-6 if dtype == torch.float32 else 2.0**-8
    assert p_triton.dtype == dtype
    assert rel_err(p_triton, p_torch) <= tol
    assert_same_state(s_triton, s_torch, 1e-6)


@pytest.mark.parametrize("spec", ["adamw", "adamw4bit", "adamw8bit"])
def test_triton_step_is_in_place(spec):
    cls = optgen.load(spec)
    param = torch.nn.Parameter(torch.randn(70, 61))
    opt = cls([param], backend="triton")
    param.grad = torch.randn_like(param)
    opt.step()
    storage = {k: (v.codes if isinstance(v, QuantizedState) else v) for k, v in opt.state[param].items()}
    pointers = {k: t.data_ptr() for k, t in storage.items()} | {"param": param.data_ptr()}
    before = param.detach().clone()
    param.grad = torch.randn_like(param)
    opt.step()
    after = {k: (v.codes if isinstance(v, QuantizedState) else v) for k, v in opt.state[param].items()}
    assert {k: t.data_ptr() for k, t in after.items()} | {"param": param.data_ptr()} == pointers
    assert not torch.equal(param, before)


def test_non_contiguous_parameter_is_updated_in_place():
    cls = optgen.load("adamw")
    base = torch.randn(13, 7)
    p_torch, p_triton = torch.nn.Parameter(base.t().clone()), torch.nn.Parameter(base.clone().t())
    assert not p_triton.is_contiguous()
    o_torch, o_triton = cls([p_torch], backend="torch"), cls([p_triton], backend="triton")
    grad = torch.randn(7, 13)
    p_torch.grad, p_triton.grad = grad.clone(), grad.clone()
    o_torch.step()
    o_triton.step()
    assert rel_err(p_triton, p_torch) <= 1e-6


@triton.jit
def _casts(x_ptr, native_ptr, ours_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(native_ptr + offs, x.to(tl.bfloat16), mask=mask)
    tl.store(ours_ptr + offs, triton_lib.round_to_bfloat16(x), mask=mask)


def test_interpreter_truncates_bfloat16_casts_and_the_kernels_round_like_torch():
    ulp = 2.0**-7  # bfloat16 spacing in [1, 2)
    special = [1 + 0.75 * ulp, 1 + 0.5 * ulp, 1 + 1.5 * ulp, -(1 + 0.5 * ulp), float("inf"), float("nan"), 0.0]
    x = torch.cat([torch.tensor(special), torch.randn(500) * 1e3]).float()
    native, ours = torch.empty(len(x), dtype=torch.bfloat16), torch.empty(len(x), dtype=torch.bfloat16)
    _casts[(1,)](x, native, ours, len(x), BLOCK=512)
    expected = x.to(torch.bfloat16)  # round to nearest, ties to even
    assert native[0].item() == 1.0 != expected[0].item()  # the interpreter truncated 1 + 0.75 ulp
    assert torch.equal(ours.float().nan_to_num(7.0), expected.float().nan_to_num(7.0))
    assert torch.isnan(ours[5])


def test_triton_on_cpu_without_interpreter_is_a_clear_error():
    from optgen.runtime import triton_runtime as rt

    compiled_for_gpu = rt.KernelStage("map_0", "map", kernel=object())  # not an InterpretedFunction
    param = torch.zeros(3)
    with pytest.raises(RuntimeError, match="CUDA tensors.*TRITON_INTERPRET=1"):
        rt.step(None, (compiled_for_gpu,), param, param, [], param)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "spec,shape",
    [("adamw", (7, 13)), ("adamw4bit", (70, 61)), ("factor4bit", (70, 61)), ("swan", (9, 13))],  # swan: matrix stage
)
def test_compiled_triton_step_fullgraph_no_recompile_on_lr_change(spec, shape, fresh_dynamo, monkeypatch):
    from optgen.runtime import triton_runtime as rt

    launches = []
    run_stages = rt.run_stages
    monkeypatch.setattr(rt, "run_stages", lambda *a: launches.append(1) or run_stages(*a))
    cls = optgen.load(spec)
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(shape, generator=gen)
    p_eager, p_compiled = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    eager = cls([p_eager], lr=torch.tensor(0.01), backend="triton")
    compiled = cls([p_compiled], lr=torch.tensor(0.01), backend="triton")
    compiled_step = torch.compile(compiled.step, fullgraph=True)
    schedule = lambda epoch: 0.8**epoch  # noqa: E731
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, schedule) for o in (eager, compiled)]
    graphs = None
    for step in range(5):
        grad = torch.randn(shape, generator=gen)
        p_eager.grad, p_compiled.grad = grad.clone(), grad.clone()
        eager.step()
        # The first step (state creation) runs eagerly: creating quantized state does not trace yet
        # (optgen.runtime.distributed reads a ContextVar there); every later step is compiled.
        compiled_step() if step else compiled.step()
        for s in scheds:
            s.step()
        assert rel_err(p_compiled, p_eager) <= 1e-6, f"step {step + 1}"
        if step == 1:
            graphs = counters["stats"]["unique_graphs"]
        elif step > 1:
            assert counters["stats"]["unique_graphs"] == graphs, "recompiled after lr changed"
    assert graphs == 1
    assert len(launches) == 2 * 5  # every eager and every compiled step ran the Triton kernels
    assert_same_state(compiled.state[p_compiled], eager.state[p_eager], 1e-6)


def test_autotune_round_trip_keeps_the_step_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path))
    cls = optgen.load("adamw4bit")
    start, grad = torch.randn(70, 61), torch.randn(70, 61)
    p_ref, p_tuned = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ref, tuned = cls([p_ref], backend="torch"), cls([p_tuned], backend="triton")
    p_ref.grad, p_tuned.grad = grad.clone(), grad.clone()
    ref.step()
    two = lambda multiple: [  # noqa: E731
        {"BLOCK": 256, "num_warps": 2, "num_stages": 1},
        {"BLOCK": 4096, "num_warps": 4, "num_stages": 1},
    ]
    with autotune.tuning(configs=two) as session:
        tuned.step()  # each launch runs every config: restore_value / reset_to_zero must undo them
    assert rel_err(p_tuned, p_ref) <= 1e-6
    assert_same_state(tuned.state[p_tuned], ref.state[p_ref], 1e-6)
    assert sorted(row[2] for row in session.chosen) == ["map_1", "stats_0"]
    saved = json.loads((tmp_path / "autotune.json").read_text())
    spec_key = cls.spec_sha256[:16]
    entries = saved["cpu-interpreter"][spec_key]
    assert set(entries) == {"map_1", "stats_0"}
    bucket = str(autotune.size_bucket(70 * 61))
    for kernel, by_bucket in entries.items():
        chosen = by_bucket[bucket]
        assert chosen in two(2)
        # Looked up for a size two buckets away: the closest bucket (the only one) is used.
        assert autotune.config_for("cpu-interpreter", cls.spec_sha256, kernel, 70 * 61 * 4) == chosen
    # Another device falls back to the shipped table, then to the default.
    assert autotune.config_for("another GPU", cls.spec_sha256, "map_1", 4270)["BLOCK"] in autotune.BLOCKS


def test_closest_bucket():
    buckets = {"10": {"BLOCK": 256}, "20": {"BLOCK": 2048}, "14": {"BLOCK": 512}}
    assert autotune.closest(buckets, 2**10) == {"BLOCK": 256}
    assert autotune.closest(buckets, 2**12) == {"BLOCK": 512}  # 12 is 2 from 10 and 2 from 14: the larger wins
    assert autotune.closest(buckets, 2**30) == {"BLOCK": 2048}
    assert autotune.closest({}, 100) is None


def test_cli_autotune_prints_the_table(tmp_path, monkeypatch, capsys):
    from optgen.cli import main

    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(
        autotune, "candidate_configs", lambda multiple: [{"BLOCK": 256, "num_warps": 4, "num_stages": 1}]
    )
    assert main(["autotune", "sgdm4bit", "--sizes", "5000"]) == 0
    out = capsys.readouterr()
    assert "map_0" in out.out and "256" in out.out and "2^12" in out.out
    assert "[1/1]" in out.err
    assert (tmp_path / "autotune.json").is_file()


DECLINED = {  # what the emitter cannot run: (store of m, a temporary's name, the update of param)
    "block not a power of two": ("{bits: 4, signed: true, normalize: {block: 96}, table: dynamic_exponent}", "g", "m"),
    "matrix stage on quantized state": ("q8_block256_de", "g", "whiten(m, steps=3)"),
    "a name the kernels use": ("float32", "acc", "m"),
}


def test_emitter_declines_only_what_it_cannot_run(tmp_path):
    for name in SPECS:  # every built-in spec runs, reduce and matrix stages included
        for sub in load_spec(name).all_specs():
            source = emit_triton(make_plan(sub), header(sub))
            assert source is not None, sub.name
            assert header(sub) in source and "lr" in source  # readable: the spec's lines in the docstrings
    control = parse_spec(DECLINE_SPEC.format(store="q8_block256_de", temporary="g", update="whiten(g, steps=3)"))
    assert emit_triton(make_plan(control), header(control)) is not None  # each case below changes one thing
    for reason, (store, temporary, update) in DECLINED.items():
        text = DECLINE_SPEC.format(store=store, temporary=temporary, update=update)
        spec = parse_spec(text)
        assert emit_triton(make_plan(spec), header(spec)) is None, reason
        path = tmp_path / "declined.yaml"
        path.write_text(text)
        cls = optgen.load(str(path))
        assert "triton" not in cls.programs[0].kernels
        param = torch.nn.Parameter(torch.randn(8, 8))
        param.grad = torch.randn(8, 8)
        with pytest.raises(RuntimeError, match="triton backend has no kernels"):
            cls([param], backend="triton").step()
        cls([param], backend="auto").step()  # auto falls back to kernels that exist


DECLINE_SPEC = """\
optgen: 1
name: declined
class: Declined
hyper: {{lr: 0.01}}
state:
  m: {{init: 0, store: {store}}}
update:
  - {temporary} = grad
  - param = param - lr * {update}
  - m = 0.9 * m + {temporary}
"""
