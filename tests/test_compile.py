"""torch.compile: the generated optimizers trace in one graph, match eager, and do not recompile when an
LR scheduler changes a tensor lr (the torch.optim contract: pass lr as a tensor under torch.compile)."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import optgen

pytestmark = [
    pytest.mark.slow,
    # The compiled step bypasses the wrapper an LR scheduler puts around opt.step, so the scheduler
    # cannot see that the optimizer stepped and warns; the same happens with torch.optim.
    pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`"),
]

# Compiled and eager code may order / fuse float32 operations differently: a few ulps per step.
RTOL = 1e-6
SHAPES = [(4097,), (7, 13)]
CASES = {
    "adamw": ("adamw", dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)),
    "sgd_momentum": ("sgd", dict(lr=0.05, momentum=0.9, weight_decay=0.01)),
}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max|a - b| / max|b|``: relative to the tensor's scale (elementwise is unbounded near zero)."""
    a, b = actual.detach().double(), expected.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def make_params(dtype=torch.float32, seed=0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in SHAPES]


def set_grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("case", sorted(CASES))
def test_compiled_step_matches_eager(case):
    spec, kwargs = CASES[case]
    cls = optgen.load(spec)
    eager_params, compiled_params = make_params(), make_params()
    eager, compiled = cls(eager_params, **kwargs), cls(compiled_params, **kwargs)
    compiled_step = torch.compile(compiled.step, fullgraph=True)
    start = [p.detach().clone() for p in eager_params]
    for step in range(6):
        set_grads(eager_params, step)
        set_grads(compiled_params, step)
        eager.step()
        compiled_step()
        for a, b in zip(compiled_params, eager_params, strict=True):
            assert rel_err(a, b) <= RTOL, f"step {step + 1}, shape {tuple(a.shape)}"
    assert unique_graphs() >= 1  # it really was compiled (fullgraph=True: one graph per state layout)
    for p, s in zip(eager_params, start, strict=True):
        assert not torch.equal(p, s)
    for a, b in zip(compiled_params, eager_params, strict=True):
        for key, value in eager.state[b].items():
            assert rel_err(compiled.state[a][key], value) <= RTOL, key


@pytest.mark.parametrize("case", sorted(CASES))
def test_tensor_lr_with_scheduler_does_not_recompile(case):
    spec, kwargs = CASES[case]
    cls = optgen.load(spec)
    kwargs = dict(kwargs, lr=torch.tensor(kwargs["lr"]))
    eager_params, compiled_params = make_params(), make_params()
    eager = cls(eager_params, **dict(kwargs, lr=kwargs["lr"].clone()))
    compiled = cls(compiled_params, **kwargs)
    # Compile the optimizer's own step before a scheduler wraps it (lr_scheduler.py is never traced).
    compiled_step = torch.compile(compiled.step, fullgraph=True)
    schedule = lambda epoch: 0.8**epoch  # noqa: E731
    eager_sched = torch.optim.lr_scheduler.LambdaLR(eager, schedule)
    compiled_sched = torch.optim.lr_scheduler.LambdaLR(compiled, schedule)

    def one_step(step: int) -> None:
        set_grads(eager_params, step)
        set_grads(compiled_params, step)
        eager.step()
        compiled_step()
        eager_sched.step()
        compiled_sched.step()

    # Warm-up: the first step creates the state (a graph for "no state yet"), the second one
    # compiles the steady-state graph.
    one_step(0)
    one_step(1)
    graphs = unique_graphs()
    assert graphs >= 1
    lrs = []
    for step in range(2, 7):
        one_step(step)
        lrs.append(float(compiled.param_groups[0]["lr"]))
        assert unique_graphs() == graphs, f"recompiled after lr changed to {lrs[-1]}"
        for a, b in zip(compiled_params, eager_params, strict=True):
            assert rel_err(a, b) <= RTOL, f"step {step + 1}, shape {tuple(a.shape)}"
    assert isinstance(compiled.param_groups[0]["lr"], torch.Tensor)
    assert len(set(lrs)) == len(lrs), "the scheduler did not change lr every step"
    assert lrs[-1] == pytest.approx(CASES[case][1]["lr"] * 0.8**7, rel=1e-6)  # LambdaLR fills the tensor in place


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_inductor_backend_matches_torch_backend(case, dtype):
    spec, kwargs = CASES[case]
    cls = optgen.load(spec)
    eager_params, inductor_params = make_params(dtype), make_params(dtype)
    eager = cls(eager_params, backend="torch", **kwargs)
    inductor = cls(inductor_params, backend="inductor", **kwargs)
    # One bfloat16 ulp where float32 rounding differences cross a rounding boundary (2^-7 relative).
    rtol = RTOL if dtype == torch.float32 else 2.0**-7
    for step in range(5):
        set_grads(eager_params, step)
        set_grads(inductor_params, step)
        eager.step()
        inductor.step()
        for a, b in zip(inductor_params, eager_params, strict=True):
            assert a.dtype == dtype
            assert rel_err(a, b) <= rtol, f"step {step + 1}, shape {tuple(a.shape)}"
    assert unique_graphs() >= 1  # the inductor backend did go through torch.compile
    # The class-level default from optgen.load(..., backend=) reaches the constructor too.
    assert optgen.load(spec, backend="inductor")(make_params(dtype), **kwargs).backend == "inductor"
