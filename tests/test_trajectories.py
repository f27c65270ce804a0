"""Generated optimizers against oracles over many steps: torch.optim for AdamW / Adam / SGD, and an
independent float64 reference (tests/oracles/lion.py) for Lion.

Both sides see exactly the same gradients (drawn once per step from a seeded generator) and start
from the same parameter values; the parameters are compared after every step.
"""

from __future__ import annotations

import pytest
import torch
from oracles.lion import LionReference  # tests/ is on sys.path (pytest rootdir-less test dir)

import optgen

# -- tolerances (the only place they are stated) ------------------------------------------------
#
# Error metric: ``max|a - b| / max|b|`` over a whole tensor (relative error in the inf-norm).
# An elementwise relative error would be dishonest here: coordinates that pass near zero suffer
# catastrophic cancellation (p - lr * d with p ~= lr * d), where a one-ulp difference in the
# operands — e.g. torch's CPU kernels using a fused multiply-add where the generated code rounds
# twice — becomes an arbitrarily large relative error of the tiny result.  Measured against the
# scale of the tensor, the errors are a few float32 ulps.
#
# float32 vs torch.optim (float32): the same algorithm with the operations ordered differently;
#   each step adds a few ulps (2^-24 ~= 6e-8), which stays well below 1e-6 over 20 steps.
# bfloat16 vs torch.optim on a float32 copy re-rounded to bfloat16 after every step: both sides
#   compute in float32 and round the parameter once per step, so they agree exactly except where a
#   float32 difference of an ulp pushes the value across a bfloat16 rounding boundary; such an
#   element then differs by one bfloat16 ulp (relative 2^-7 at most).  Because a wrong bfloat16
#   path would make nearly every element differ, we also bound the fraction of differing elements.
# float32 vs the float64 Lion reference: the reference is exact to float32 precision, so the error
#   is the float32 rounding of every step accumulated: looser than float32 vs float32.
TOL_VS_TORCH = {torch.float32: 1e-6, torch.bfloat16: 2.0**-7}
TOL_VS_FP64 = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}
MAX_DIFFERING_FRACTION = {torch.float32: 1.0, torch.bfloat16: 0.01}

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(1,), (4095,), (4097,), (7, 13), (3, 5, 7)]
STEPS = 20

AdamW = optgen.load("adamw")
Adam = optgen.load("adam")
SGD = optgen.load("sgd")
Lion = optgen.load("lion")

PAIRS = {"adamw": (AdamW, torch.optim.AdamW), "adam": (Adam, torch.optim.Adam), "sgd": (SGD, torch.optim.SGD)}

CASES = [
    ("adamw", "default_betas", dict(lr=1e-2, weight_decay=1e-2)),
    ("adamw", "odd_betas_maximize", dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, maximize=True)),
    ("adam", "weight_decay", dict(lr=1e-2, weight_decay=0.05)),
    ("adam", "weight_decay_maximize", dict(lr=5e-3, betas=(0.85, 0.995), weight_decay=0.2, maximize=True)),
    ("sgd", "plain", dict(lr=0.05)),
    ("sgd", "momentum", dict(lr=0.05, momentum=0.9)),
    ("sgd", "momentum_dampening", dict(lr=0.05, momentum=0.9, dampening=0.3)),
    ("sgd", "nesterov", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("sgd", "weight_decay", dict(lr=0.05, momentum=0.5, weight_decay=0.1)),
    ("sgd", "weight_decay_no_momentum", dict(lr=0.05, weight_decay=0.1)),
    ("sgd", "maximize", dict(lr=0.05, momentum=0.9, maximize=True)),
]


# -- helpers --------------------------------------------------------------------------------------
def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` in float64 (see the comment on tolerances above)."""
    a, b = actual.detach().double(), expected.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(torch.finfo(torch.float64).tiny)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, dtype: torch.dtype, what: str) -> None:
    err = rel_err(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
    differing = (actual.detach().double() != expected.detach().double()).double().mean().item()
    assert differing <= MAX_DIFFERING_FRACTION[dtype], f"{what}: {differing:.2%} of the elements differ"


def make_params(shapes, dtype: torch.dtype, seed: int) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """(params of ``dtype`` for the generated optimizer, float32 copies with the same values for the oracle)."""
    gen = torch.Generator().manual_seed(seed)
    ours, oracle = [], []
    for shape in shapes:
        value = torch.randn(shape, generator=gen).to(dtype)
        ours.append(torch.nn.Parameter(value.clone()))
        oracle.append(torch.nn.Parameter(value.float()))
    return ours, oracle


def grads_for(step: int, shapes, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """The gradients of one step: fixed by (seed, step), already rounded to ``dtype``."""
    gen = torch.Generator().manual_seed(seed * 1_000 + step)
    return [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]


def set_grads(ours, oracle, grads) -> None:
    for p, q, g in zip(ours, oracle, grads, strict=True):
        p.grad = None if g is None else g.clone()
        q.grad = None if g is None else g.float()


@torch.no_grad()
def reround(params, dtype: torch.dtype) -> None:
    """The oracle of a low-precision parameter: after each float32 step, keep only float(dtype(p))."""
    if dtype != torch.float32:
        for q in params:
            q.copy_(q.to(dtype).float())


def run_against_torch(ours, oracle, opt, ref, shapes, dtype, seed, steps=STEPS, after_step=None) -> None:
    for step in range(steps):
        set_grads(ours, oracle, grads_for(step, shapes, dtype, seed))
        opt.step()
        ref.step()
        reround(oracle, dtype)
        if after_step is not None:
            after_step(step)
        for i, (p, q) in enumerate(zip(ours, oracle, strict=True)):
            assert p.dtype == dtype
            assert_close(p, q, TOL_VS_TORCH[dtype], dtype, f"step {step + 1}, param {i} {tuple(p.shape)}")


# -- torch.optim as the oracle --------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name,case,kwargs", CASES, ids=[f"{n}-{c}" for n, c, _ in CASES])
def test_matches_torch_optim(name, case, kwargs, shape, dtype):
    ours_cls, ref_cls = PAIRS[name]
    ours, oracle = make_params([shape], dtype, seed=1)
    opt, ref = ours_cls(ours, **kwargs), ref_cls(oracle, **kwargs)
    start = ours[0].detach().clone()
    run_against_torch(ours, oracle, opt, ref, [shape], dtype, seed=2)
    # The trajectory went somewhere (a no-op optimizer would match a no-op oracle, but not this).
    assert not torch.equal(ours[0].detach(), start)
    # State matches torch's: same keys (torch's SGD keeps no step), fp32 whatever the param dtype, same values.
    state, ref_state = opt.state[ours[0]], ref.state[oracle[0]]
    expected_keys = {"step", "momentum_buffer"} if name == "sgd" else set(ref_state)
    assert set(state) == expected_keys
    assert float(state["step"]) == STEPS
    for key, value in state.items():
        if key == "step":
            continue
        assert value.dtype == torch.float32 and value.shape == ours[0].shape, key
        if ref_state.get(key) is not None:
            assert rel_err(value, ref_state[key]) <= TOL_VS_TORCH[dtype], key


def test_exercises_odd_sizes():
    # Guard the shape list itself: odd sizes around a power of two, a single element, 1-D/2-D/3-D.
    numels = {torch.Size(s).numel() for s in SHAPES}
    assert {1, 4095, 4097} <= numels
    assert {len(s) for s in SHAPES} == {1, 2, 3}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_param_groups_with_different_hypers(name, dtype):
    ours_cls, ref_cls = PAIRS[name]
    shapes = [(4097,), (7, 13), (1,), (3, 5, 7), (4095,)]
    ours, oracle = make_params(shapes, dtype, seed=3)
    if name == "sgd":
        hypers = [
            dict(lr=0.1, momentum=0.9, weight_decay=0.0),
            dict(lr=0.02, momentum=0.5, dampening=0.2, weight_decay=0.05),
            dict(lr=0.05, momentum=0.0, weight_decay=0.1),
        ]
        defaults = dict(lr=0.01, momentum=0.8, nesterov=False)
    else:
        hypers = [
            dict(lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0),
            dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1),
            dict(lr=2e-2, betas=(0.5, 0.9), weight_decay=0.01, eps=1e-4),
        ]
        defaults = dict(lr=1e-3, weight_decay=0.02)
    split = [[0, 1], [2], [3, 4]]

    def groups(params):
        return [dict(params=[params[i] for i in idx], **h) for idx, h in zip(split, hypers, strict=True)]

    opt, ref = ours_cls(groups(ours), **defaults), ref_cls(groups(oracle), **defaults)
    assert [g["lr"] for g in opt.param_groups] == [h["lr"] for h in hypers]
    run_against_torch(ours, oracle, opt, ref, shapes, dtype, seed=4)

    # The groups really do differ: the same run with every group given group 0's hypers diverges.
    same, _ = make_params(shapes, dtype, seed=3)
    uniform = ours_cls([dict(params=[same[i] for i in idx], **hypers[0]) for idx in split], **defaults)
    for step in range(STEPS):
        for p, g in zip(same, grads_for(step, shapes, dtype, seed=4), strict=True):
            p.grad = g.clone()
        uniform.step()
    assert not torch.equal(same[2].detach(), ours[2].detach())


SCHEDULERS = {
    "step_lr": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.5),
    "lambda_lr": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 / (1.0 + 0.3 * epoch)),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_lr_scheduler_drives_both(name, scheduler, dtype):
    ours_cls, ref_cls = PAIRS[name]
    kwargs = dict(lr=0.05, momentum=0.9) if name == "sgd" else dict(lr=1e-2, weight_decay=0.05)
    shapes = [(4097,), (7, 13), (1,)]
    ours, oracle = make_params(shapes, dtype, seed=5)
    opt, ref = ours_cls(ours, **kwargs), ref_cls(oracle, **kwargs)
    sched, ref_sched = SCHEDULERS[scheduler](opt), SCHEDULERS[scheduler](ref)
    lrs = []

    def after_step(step):
        sched.step()
        ref_sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        assert opt.param_groups[0]["lr"] == ref.param_groups[0]["lr"]

    run_against_torch(ours, oracle, opt, ref, shapes, dtype, seed=6, after_step=after_step)
    assert len(set(lrs)) > 1, "the scheduler never changed lr"
    assert lrs[-1] < kwargs["lr"]


def test_a_tensor_lr_changed_in_place_is_used():
    # the hyperparameter tensors are kept while a group's numbers stay the same, never for a tensor
    # value: a float32 lr halved in place each step (as a scheduler fills one) is read every step
    shapes = [(4097,), (7, 13)]
    ours, oracle = make_params(shapes, torch.float32, seed=5)
    lr = torch.tensor(1e-2)
    opt, ref = AdamW(ours, lr=lr, weight_decay=0.05), torch.optim.AdamW(oracle, lr=float(lr), weight_decay=0.05)

    def after_step(step):
        lr.mul_(0.5)
        ref.param_groups[0]["lr"] = float(lr)

    run_against_torch(ours, oracle, opt, ref, shapes, torch.float32, seed=6, after_step=after_step)


@pytest.mark.parametrize("name", ["adamw", "adam", "sgd"])
def test_params_without_grad_are_skipped(name):
    ours_cls, ref_cls = PAIRS[name]
    kwargs = dict(lr=0.05, momentum=0.9, weight_decay=0.1) if name == "sgd" else dict(lr=1e-2, weight_decay=0.1)
    shapes = [(7, 13), (4097,), (3, 5, 7)]
    ours, oracle = make_params(shapes, torch.float32, seed=7)
    opt, ref = ours_cls(ours, **kwargs), ref_cls(oracle, **kwargs)
    frozen = ours[1].detach().clone()
    for step in range(STEPS):
        grads = grads_for(step, shapes, torch.float32, seed=8)
        grads[1] = None  # never has a gradient
        if step % 3 == 0:
            grads[2] = None  # has one only on some steps
        set_grads(ours, oracle, grads)
        opt.step()
        ref.step()
        for p, q in zip(ours, oracle, strict=True):
            assert rel_err(p, q) <= TOL_VS_TORCH[torch.float32]
    assert torch.equal(ours[1].detach(), frozen)
    assert ours[1] not in opt.state or len(opt.state[ours[1]]) == 0
    assert float(opt.state[ours[0]]["step"]) == STEPS
    assert float(opt.state[ours[2]]["step"]) == STEPS - len(range(0, STEPS, 3))
    if name != "sgd":  # torch's SGD keeps no step count
        assert float(opt.state[ours[2]]["step"]) == float(ref.state[oracle[2]]["step"])


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_tensor_hyperparameters_match_floats(name):
    ours_cls, ref_cls = PAIRS[name]
    kwargs = dict(lr=0.05, momentum=0.9) if name == "sgd" else dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)
    as_tensors = {
        k: tuple(torch.tensor(x) for x in v) if isinstance(v, tuple) else torch.tensor(v) for k, v in kwargs.items()
    }
    shapes = [(4095,), (3, 5, 7)]
    ours, oracle = make_params(shapes, torch.float32, seed=9)
    opt, ref = ours_cls(ours, **as_tensors), ref_cls(oracle, **kwargs)
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    run_against_torch(ours, oracle, opt, ref, shapes, torch.float32, seed=10)


# -- Lion against the float64 reference ------------------------------------------------------------
LION_CASES = {
    # lrs large enough to move bfloat16 params of magnitude ~1 (half a bf16 ulp there is ~2e-3).
    "default_betas": dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0),
    "weight_decay": dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.1),
}


def run_lion(opt, ref: LionReference, ours, shapes, dtype, seed) -> None:
    for step in range(STEPS):
        grads = grads_for(step, shapes, dtype, seed)
        for p, g in zip(ours, grads, strict=True):
            p.grad = None if g is None else g.clone()
        opt.step()
        ref.step(grads)
        if dtype != torch.float32:
            ref.round_params(dtype)
        for i, (p, q) in enumerate(zip(ours, ref.params, strict=True)):
            assert_close(p, q, TOL_VS_FP64[dtype], dtype, f"lion step {step + 1}, param {i} {tuple(p.shape)}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("case", sorted(LION_CASES))
def test_lion_matches_fp64_reference(case, shape, dtype):
    kwargs = LION_CASES[case]
    ours, _ = make_params([shape], dtype, seed=11)
    ref = LionReference([dict(params=ours)], **kwargs)
    opt = Lion(ours, **kwargs)
    start = ours[0].detach().clone()
    run_lion(opt, ref, ours, [shape], dtype, seed=12)
    assert not torch.equal(ours[0].detach(), start)
    m = opt.state[ours[0]]["exp_avg"]
    assert m.dtype == torch.float32
    assert rel_err(m, ref.exp_avg[0]) <= TOL_VS_FP64[torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lion_param_groups(dtype):
    shapes = [(4097,), (7, 13), (1,), (3, 5, 7)]
    ours, _ = make_params(shapes, dtype, seed=13)
    hypers = [
        dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0),
        dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.1),
    ]
    groups = [dict(params=ours[:2], **hypers[0]), dict(params=ours[2:], **hypers[1])]
    ref = LionReference(groups)
    opt = Lion(groups, lr=1e-4)
    assert [g["lr"] for g in opt.param_groups] == [1e-2, 3e-3]
    assert [g["betas"] for g in opt.param_groups] == [(0.9, 0.99), (0.95, 0.98)]
    # The reference applies each group's own hypers, so a mix-up of groups fails the comparison.
    run_lion(opt, ref, ours, shapes, dtype, seed=14)


def test_lion_reference_is_sign_descent():
    # The oracle itself, on numbers worked by hand: one step from m = 0 with g = [2, -3, 0].
    p = torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64)
    ref = LionReference([dict(params=[p])], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    ref.step([torch.tensor([2.0, -3.0, 0.0])])
    # p * (1 - 0.1 * 0.5) - 0.1 * sign(0.1 * g)
    assert torch.allclose(ref.params[0], torch.tensor([0.85, 1.05, 0.95], dtype=torch.float64))
    assert torch.allclose(ref.exp_avg[0], torch.tensor([0.02, -0.03, 0.0], dtype=torch.float64))
