"""MLIR backend (CPU) for plans with reductions and rows / cols / scalar values: Factor4bit, SinkGD and
a spec that stores every reduction (mean, sum, max, min, norm) along every dim (-1, -2, all) in its
own state, each checked against the torch backend of the same spec.

The torch backend is the oracle (it is itself tested against the fp64 oracles in tests/oracles/).
Parameters start at zero, so a parameter after a few steps is the sum of its updates and a relative
error measures the updates themselves.

Tolerance (fp32): max |mlir - torch| / max |torch| <= 1e-6 for parameters and every float state.
The MLIR reductions accumulate in float64 and round once; torch sums float32 in its own (cascade)
order, so a statistic differs by about one float32 ulp (1.2e-7 relative) and the values computed from
it by a few.  Measured on the shapes below: at most 2.4e-7 (Factor's update, SinkGD after 10
normalization rounds, every op x dim of ``allreductions``).  bf16 parameters: one bf16 rounding step
at most (the same float32 value rounded to nearest even, except where the float32 values straddle a
rounding boundary); float state computed from such parameters within that step (2**-8 relative).
4-bit codes: equal, or one apart at a tie.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import sympy
import torch
from mlir_launches import Launches, launches_before_each_run  # tests/ is on sys.path
from same_result import assert_same_result

import optgen
from optgen.codegen.emit_mlir import mlir_modules
from optgen.codegen.plan import make_plan
from optgen.codegen.spec import load_spec
from optgen.runtime import mlir_jit
from optgen.runtime.state import QuantizedState

TOLERANCE = 1e-6
SHAPES = [(1, 1), (1, 129), (127, 3), (129, 257), (3, 5, 277)]
OPS = ("mean", "sum", "max", "min", "norm")
DIMS = {"r": "-1", "c": "-2", "a": "all"}
KINDS = {"r": "rows", "c": "cols", "a": "scalar"}


def _all_reductions_spec() -> str:
    """Every op along every dim, each stored in its own state; sums of rows / cols values over all."""
    state = [f"  {op}_{d}: {{kind: {KINDS[d]}, init: 0}}" for op in OPS for d in DIMS]
    state += ["  rows_all: {kind: scalar, init: 0}", "  cols_all: {kind: scalar, init: 0}"]
    update = [
        "  - x = grad + param",  # signed: max / min
        "  - y = grad * grad + abs(param) + 0.5",  # positive: sums without cancellation (relative error holds)
    ]
    # bare (a state set to a reduction: stored by the launch that reads it next) and moving averages
    for op in OPS:
        operand = "x" if op in ("max", "min") else "y"
        old = "0.5 * {} + " if op in ("sum", "min") else ""
        update += [f"  - {op}_{d} = {old.format(f'{op}_{d}')}{op}({operand}, dim={DIMS[d]})" for d in DIMS]
    update += [
        "  - rows_all = sum(mean_r, dim=all)",
        "  - cols_all = 0.5 * cols_all + max(norm_c, dim=all) + min(sum_c, dim=all)",
        "  - param = param - lr * (x + mean_r * min_c - max_r / (1 + norm_a) + rows_all / (1 + cols_all))",
    ]
    lines = ["optgen: 1", "name: allreductions", "class: AllReductions", "hyper:", "  lr: 0.01", "state:"]
    return "\n".join([*lines, *state, "update:", *update]) + "\n"


ALL_REDUCTIONS = _all_reductions_spec()


@pytest.fixture
def all_reductions(tmp_path):
    path = tmp_path / "allreductions.yaml"
    path.write_text(ALL_REDUCTIONS)
    return optgen.load(str(path))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, b = actual.detach().double(), expected.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def codes(state: QuantizedState) -> torch.Tensor:
    numel = state.shape.numel()
    return torch.stack([state.codes & 15, state.codes >> 4], dim=-1).reshape(-1)[:numel].long()


STEPS = 3


def run(cls, backend: str, shape, dtype=torch.float32, steps: int = STEPS, grads=None, **hyper):
    gen = torch.Generator().manual_seed(shape[-1] * 7 + len(shape))
    param = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
    opt = cls([param], backend=backend, **hyper)
    for step in range(steps):
        param.grad = (grads[step] if grads else torch.randn(shape, generator=gen)).to(dtype)
        opt.step()
    return param.detach(), opt.state[param]


def assert_matches_torch(cls, shape, monkeypatch, dtype=torch.float32, **hyper):
    calls = Launches(monkeypatch)
    p_mlir, s_mlir = run(cls, "mlir", shape, dtype, **hyper)
    assert calls.launches, "the MLIR kernels never ran"
    p_torch, s_torch = run(cls, "torch", shape, dtype, **hyper)
    assert p_torch.abs().max() > 0  # the steps did something
    if dtype == torch.float32:
        assert rel_err(p_mlir, p_torch) <= TOLERANCE, f"param {shape}: {rel_err(p_mlir, p_torch):.3g}"
    else:
        assert p_mlir.dtype == torch.bfloat16
        # fp32 updates an ulp apart (reductions summed in float64; x * (1 / d) for x / d, see
        # hoist_smaller_values) may round to neighbouring bf16 values: one rounding step per step taken
        step = torch.finfo(torch.bfloat16).eps * p_torch.float().abs() * STEPS
        assert bool(((p_mlir.float() - p_torch.float()).abs() <= step).all()), f"bf16 param {shape}"
    assert s_mlir.keys() == s_torch.keys()
    # bf16: a parameter one rounding step apart feeds later statistics: those stay within that step
    tolerance = TOLERANCE if dtype == torch.float32 else 2.0**-8
    for key, expected in s_torch.items():
        actual = s_mlir[key]
        if isinstance(expected, QuantizedState):
            gap = (codes(actual) - codes(expected)).abs()
            assert gap.max().item() <= 1, key  # equal, or one apart at a tie
            assert (gap == 0).double().mean().item() >= 0.99, key
            assert rel_err(actual.scales, expected.scales) <= tolerance, key
        elif key != "step":
            assert actual.shape == expected.shape and actual.dtype == expected.dtype, key
            assert rel_err(actual, expected) <= tolerance, f"{key} {shape}: {rel_err(actual, expected):.3g}"


# -- kernels match the torch backend ---------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_every_reduction_op_and_dim_matches_torch(shape, all_reductions, monkeypatch):
    assert_matches_torch(all_reductions, shape, monkeypatch)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_sinkgd_matches_torch(shape, monkeypatch):
    assert_matches_torch(optgen.load("sinkgd"), shape, monkeypatch, weight_decay=0.1)


# rounds that are not plain rescalings of x (a softsign first): each is a line of its own to recompute
CHAINED = (
    """\
optgen: 1
name: chained
class: Chained
hyper:
  lr: 0.01
update:
  - x = grad
"""
    + "".join(f"  - x = x / (1 + abs(x)) / (0.1 + sqrt(mean(x**2, dim={dim})))\n" for dim in (-1, -2) * 4)
    + """\
  - param = param - lr * x
"""
)


@pytest.fixture
def chained(tmp_path):
    path = tmp_path / "chained.yaml"
    path.write_text(CHAINED)
    return path


def _step_program(path):
    from optgen.codegen.emit_mlir_steps import step_program

    return step_program(make_plan(load_spec(path)))


def test_rounds_go_through_memory_past_max_recomputed(chained, monkeypatch):
    # each round's reduction recomputed every earlier round from grad: a step quadratic in the rounds
    from optgen.codegen.emit_mlir_steps import MAX_RECOMPUTED
    from optgen.codegen.expr import Kind

    program = _step_program(chained)
    assert Kind.FULL in program.buffers.values(), "no round is written to a full-size scratch buffer"
    for step in program.steps:
        rounds = [let for let in step.lets if str(let.symbol).startswith("x_")]  # x = grad is a rename
        # a launch computes the rounds it stores itself, and at most MAX_RECOMPUTED more
        assert len(rounds) <= MAX_RECOMPUTED + 1, f"{step.name} computes {len(rounds)} rounds"
    assert_matches_torch(optgen.load(str(chained)), (129, 257), monkeypatch)


def test_sinkgd_rounds_fold_into_row_and_column_factors():
    # x_k = x_(k-1) * (row or column factor) is x * a_k * b_k (running products of the row and column
    # factors): every launch recomputes a round from the gradient in one line, none goes through memory
    from optgen.codegen.expr import Kind

    program = _step_program("sinkgd")
    assert Kind.FULL not in program.buffers.values(), "a round went through a full-size scratch buffer"
    kinds = program.plan.kinds
    for step in program.steps:
        for let in step.lets:
            if str(let.symbol).startswith("x_"):
                factors = let.expr.args
                assert [f for f in factors if kinds.get(f) is Kind.FULL] == [sympy.Symbol("x")], let
                assert sorted(kinds[f].name for f in factors if f != sympy.Symbol("x")) in (
                    ["ROWS"],
                    ["COLS", "ROWS"],
                ), let


SCALED_STATE = """\
optgen: 1
name: scaledstate
class: ScaledState
hyper:
  lr: 0.01
state:
  m: {kind: full, init: 1}
update:
  - m = m / (1 + sqrt(mean(grad**2, dim=-1)))
  - m = m / (1 + sqrt(mean(m**2, dim=-2)))
  - x = m / (1 + sqrt(mean(m**2, dim=-1)))
  - param = param - lr * x
"""


def test_a_state_is_never_the_base_of_folded_scalings(tmp_path, monkeypatch):
    # x rescales the new m, itself the old m rescaled twice: folded over the old m, x would read its storage after
    # the launch that stores the new m overwrote it (and the plan would be declined)
    path = tmp_path / "scaledstate.yaml"
    path.write_text(SCALED_STATE)
    assert "unsupported" not in mlir_modules(make_plan(load_spec(path)))
    assert_matches_torch(optgen.load(str(path)), (129, 257), monkeypatch)


# (129, 257) and (70, 4100): m is 4-bit (more than keep_full_precision elements); smaller: float32
@pytest.mark.parametrize("shape", [(1, 1), (1, 129), (127, 3), (129, 257), (70, 4100)], ids=str)
def test_factor4bit_matches_torch(shape, monkeypatch):
    cls = optgen.load("factor4bit")
    assert next(p for p in cls.programs if p.takes(torch.zeros(shape))).name == "factor4bit"
    assert_matches_torch(cls, shape, monkeypatch, weight_decay=0.1, maximize=True)


@pytest.mark.parametrize("spec", ["factor4bit", "sinkgd", "allreductions"])
def test_bf16_parameters(spec, all_reductions, monkeypatch):
    cls = all_reductions if spec == "allreductions" else optgen.load(spec)
    for shape in [(129, 257), (3, 5, 277)] if spec != "factor4bit" else [(127, 3), (129, 257)]:
        assert_matches_torch(cls, shape, monkeypatch, dtype=torch.bfloat16)


# A state set to a bare reduction, read next by the parameter update: the full-size launch stores it
# once (rows: per row; cols: from each matrix's first row; scalar: from the first work unit).  The
# update reads r, c and a themselves (``1 + r`` would be a rows value of its own: see hoist_smaller_values).
BARE = """\
optgen: 1
name: bare
class: Bare
hyper:
  lr: 0.01
state:
  r: {kind: rows, init: 0}
  c: {kind: cols, init: 0}
  a: {kind: scalar, init: 0}
update:
  - r = max(abs(grad), dim=-1)
  - c = min(grad, dim=-2)
  - a = norm(grad, dim=all)
  - param = param - lr * grad * (r + c + a)
"""


def test_states_set_to_a_bare_reduction(tmp_path, monkeypatch):
    path = tmp_path / "bare.yaml"
    path.write_text(BARE)
    text = mlir_modules(make_plan(load_spec(path)))["float32-any"]
    guards = [line for line in text.splitlines() if "scf.if" in line and "= scf.if" not in line]  # not folds
    assert len(guards) == 2  # the scalar and the cols value: stored once, guarded
    for shape in [(1, 1), (127, 3), (3, 5, 277)]:
        assert_matches_torch(optgen.load(str(path)), shape, monkeypatch)


BF16_STATE = """\
optgen: 1
name: bfstate
class: BfState
hyper:
  lr: 0.01
state:
  r: {kind: rows, init: 0, store: bfloat16}
  c: {kind: cols, init: 0, store: bfloat16}
update:
  - r = 0.9 * r + 0.1 * mean(grad**2, dim=-1)
  - c = 0.9 * c + 0.1 * max(abs(grad), dim=-2)
  - param = param - lr * grad / (sqrt(r) + c + 1.0e-8)
"""


def test_bf16_rows_and_cols_state(tmp_path, monkeypatch):
    path = tmp_path / "bfstate.yaml"
    path.write_text(BF16_STATE)
    for shape in [(129, 257), (3, 5, 277)]:
        assert_matches_torch(optgen.load(str(path)), shape, monkeypatch)


# -- NaN, threads, in place ------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["factor4bit", "allreductions"])
def test_nan_in_a_gradient_reaches_the_same_entries(spec, all_reductions):
    cls = all_reductions if spec == "allreductions" else optgen.load(spec)
    grad = torch.randn(70, 61)
    grad[4, 6] = float("nan")
    results = {}
    for backend in ("mlir", "torch"):
        if spec == "factor4bit":  # quantized state: the blocks holding NaN dequantize to NaN, with a warning
            with pytest.warns(RuntimeWarning, match="non-finite"):
                results[backend] = run(cls, backend, (70, 61), steps=1, grads=[grad])
        else:
            results[backend] = run(cls, backend, (70, 61), steps=1, grads=[grad])
    (p_mlir, s_mlir), (p_torch, s_torch) = results["mlir"], results["torch"]
    assert torch.isnan(p_mlir).any()
    assert torch.equal(torch.isnan(p_mlir), torch.isnan(p_torch))
    for key, expected in s_torch.items():
        if isinstance(expected, torch.Tensor) and key != "step":
            assert torch.equal(torch.isnan(s_mlir[key]), torch.isnan(expected)), key
    if spec == "allreductions":  # max / min propagate NaN, as torch.amax / amin: row 4 and column 6 only
        assert torch.isnan(s_mlir["max_r"][4]).all() and not torch.isnan(s_mlir["max_r"][3]).any()
        assert torch.isnan(s_mlir["min_c"][..., 6]).all() and not torch.isnan(s_mlir["min_c"][..., 5]).any()


def test_threads_give_the_same_result_as_one_thread(all_reductions, monkeypatch):
    shape = (300, 457)  # enough stripes and elements that every launch is split
    threads = torch.get_num_threads()
    results = {}
    try:
        for count in (1, 2):
            torch.set_num_threads(count)  # the knob: the launches split over torch.get_num_threads() threads
            for name, cls in (("factor4bit", optgen.load("factor4bit")), ("allreductions", all_reductions)):
                calls = Launches(monkeypatch)
                results[(name, count)] = run(cls, "mlir", shape, steps=2)
                splits = {split for _, split in calls.launches}
                # one piece on one thread; on two, more pieces than threads (each thread claims several)
                assert (max(splits) > count) if count > 1 else splits == {1}, f"{name}: split in {sorted(splits)}"
    finally:
        torch.set_num_threads(threads)
    for name in ("factor4bit", "allreductions"):
        assert_same_result(name, results[(name, 1)], results[(name, 2)])


def test_updates_in_place_and_auto_picks_mlir(monkeypatch):
    calls = Launches(monkeypatch)
    param = torch.nn.Parameter(torch.randn(129, 257))
    view = param.detach().view(-1)  # shares the storage: sees an in-place update, not a rebound .data
    before = view.clone()
    opt = optgen.load("factor4bit")([param])  # backend="auto": mlir on CPU
    param.grad = torch.randn(129, 257)
    opt.step()
    storage = {k: (v.codes if isinstance(v, QuantizedState) else v).data_ptr() for k, v in opt.state[param].items()}
    for _ in range(2):
        old = {k: (v.codes if isinstance(v, QuantizedState) else v).clone() for k, v in opt.state[param].items()}
        param.grad = torch.randn(129, 257)
        opt.step()
        for key, value in opt.state[param].items():
            tensor = value.codes if isinstance(value, QuantizedState) else value
            assert tensor.data_ptr() == storage[key], f"{key} was reallocated"
            assert not torch.equal(tensor, old[key]), f"{key} was not updated"
    assert calls.launches and not torch.equal(view, before)


def test_state_of_the_wrong_size_is_not_handed_to_the_kernels(monkeypatch):
    calls = Launches(monkeypatch)
    param = torch.nn.Parameter(torch.randn(129, 257))
    opt = optgen.load("factor4bit")([param])
    param.grad = torch.randn(129, 257)
    opt.step()
    assert calls.launches
    calls.launches.clear()
    opt.state[param]["exp_avg_sq_row"] = torch.zeros(5)  # e.g. from another model's state_dict
    with pytest.raises(RuntimeError):  # the torch kernels' own error, not memory past the tensor
        opt.step()
    assert not calls.launches


# -- what the emitter declines ---------------------------------------------------------------------
RANK1_AFTER_REDUCTION = """\
optgen: 1
name: rownormadam
class: RowNormAdam
hyper:
  lr: 0.01
state:
  v: {init: 0, store: {bits: 4, signed: false, normalize: rank1, table: linear_nozero}}
update:
  - g = grad / (sqrt(mean(grad**2, dim=-1)) + 1.0e-8)
  - v = 0.9 * v + 0.1 * g**2
  - param = param - lr * g / (sqrt(v) + 1.0e-8)
"""


@pytest.mark.parametrize(
    ("source", "reason"), [("swan", "matrix stages"), (RANK1_AFTER_REDUCTION, "quantized state v is full, rank1-wise")]
)
def test_declined_plans_say_why_and_run_on_torch(source, reason, tmp_path, monkeypatch):
    path = "swan"
    if source != "swan":
        path = tmp_path / "rownormadam.yaml"
        path.write_text(source)
    modules = mlir_modules(make_plan(load_spec(path)))
    assert list(modules) == ["unsupported"] and reason in modules["unsupported"]
    calls = Launches(monkeypatch)
    param = torch.nn.Parameter(torch.randn(40, 70))
    opt = optgen.load(str(path))([param])
    param.grad = torch.randn(40, 70)
    opt.step()  # backend="auto": the torch kernels
    assert not calls.launches and torch.isfinite(param).all()


def test_scratch_values_are_made_per_step_not_kept(chained, monkeypatch):
    # a full-size scratch value and float64 partials (a column partial is 0.25 B/param) are made
    # when a parameter's launches run and dropped after them: kept, they would be optimizer state by
    # another name, and deferred jobs holding theirs all at once made sinkgd 1.5x slower
    made, alive = [], []
    allocate = mlir_jit.LaunchPlan._allocate

    def recorded(self, slots, buffers):
        alive.append(sum(ref() is not None for ref in made))  # other parameters' (and steps') buffers
        allocate(self, slots, buffers)
        made.extend(weakref.ref(b) for b in buffers)

    monkeypatch.setattr(mlir_jit.LaunchPlan, "_allocate", recorded)
    params = [torch.nn.Parameter(torch.randn(300, 200)) for _ in range(2)]
    opt = optgen.load(str(chained))(params, backend="mlir")
    for _ in range(2):
        for param in params:
            param.grad = torch.randn(300, 200)
        opt.step()
    plan = opt.programs[0].module("mlir").KERNELS._plans[params[0]]
    assert any(slot.numel == params[0].numel() for slot in plan.scratch) and not plan.held
    assert alive == [0, 0, 0, 0] and len(made) == 4, alive  # one allocation per parameter and step
    gc.collect()
    assert all(ref() is None for ref in made), "a scratch value outlived its step"


def test_scratch_slots_share_one_allocation_without_overlap():
    inf = float("inf")
    fills = [None, 0.0, -inf, None, 0.0, inf, -inf, None]
    scratch = [
        mlir_jit.Slot(numel, torch.float64 if fill is not None else torch.float32, fill)
        for numel, fill in zip([1, 3, 17, 100, 1000, 5, 2, 33], fills)
    ]
    plan = mlir_jit.LaunchPlan((), (), [], [], [], scratch)
    slots, buffers = {}, []
    plan._allocate(slots, buffers)
    (arena,) = buffers
    spans = sorted((slots[slot][0], slots[slot][0] + slot.nbytes) for slot in scratch)
    assert all(start % 64 == 0 for start, _ in spans)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), "slots overlap"
    first, last = arena.data_ptr(), arena.data_ptr() + arena.numel()
    assert first <= spans[0][0] and spans[-1][1] <= last
    for slot in scratch:
        address, numel = slots[slot]
        assert numel == slot.numel
        if slot.fill is not None:
            offset = address - first
            values = arena[offset : offset + slot.nbytes].view(torch.float64)
            assert torch.equal(values, torch.full((numel,), slot.fill, dtype=torch.float64)), slot


def test_a_step_makes_the_reduction_launches_before_running_any(monkeypatch):
    # as for element-wise plans: each matrix's launches (and its scratch values' allocation) are
    # queued and run back to back after the last parameter's Python
    counter, before = launches_before_each_run(monkeypatch)
    params = [torch.nn.Parameter(torch.randn(67, 131)), torch.nn.Parameter(torch.randn(129, 257))]
    for param in params:
        param.grad = torch.randn(param.shape)
    optgen.load("factor4bit")(params, backend="mlir").step()
    assert before == [0, 0] and len(counter.launches) >= 2 * 5, (before, counter.launches)
