"""state_dict: round trips through torch.save, bit-exact resume, and interchange with torch.optim."""

from __future__ import annotations

import io

import pytest
import torch

import optgen

SHAPES = [(4097,), (7, 13), (1,), (3, 5, 7)]
CASES = {
    "adamw": ("adamw", dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)),
    "adam": ("adam", dict(lr=1e-2, weight_decay=0.05)),
    "sgd_momentum": ("sgd", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "lion": ("lion", dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
}
STATE_KEYS = {
    "adamw": {"step", "exp_avg", "exp_avg_sq"},
    "adam": {"step", "exp_avg", "exp_avg_sq"},
    "sgd": {"step", "momentum_buffer"},
    "lion": {"step", "exp_avg"},
}
DTYPES = [torch.float32, torch.bfloat16]
# Generated vs torch.optim after a hand-over: float32 operations ordered differently, a few ulps
# per step; measured against the tensor's scale (elementwise is unbounded where values cross zero).
RTOL_VS_TORCH = 1e-6


# -- helpers --------------------------------------------------------------------------------------
def make_params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen).to(dtype)) for shape in SHAPES]


def set_grads(params, step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def run(opt, params, steps: range) -> None:
    for step in steps:
        set_grads(params, step)
        opt.step()


def groups(params, kwargs) -> list[dict]:
    """Two param groups, the second with a smaller lr, so group bookkeeping is exercised too."""
    return [dict(params=params[:2]), dict(params=params[2:], lr=kwargs["lr"] / 3)]


def through_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, b = actual.detach().double(), expected.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


# -- round trip and bit-exact resume ----------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_through_torch_save(case, dtype):
    spec, kwargs = CASES[case]
    cls = optgen.load(spec)
    params = make_params(dtype)
    opt = cls(groups(params, kwargs), **kwargs)
    run(opt, params, range(3))
    saved = through_bytes(opt.state_dict())

    fresh_params = make_params(dtype)
    fresh = cls(groups(fresh_params, kwargs), **kwargs)
    fresh.load_state_dict(saved)

    assert len(fresh.state) == len(SHAPES)
    for p, q in zip(params, fresh_params, strict=True):
        ours, theirs = opt.state[p], fresh.state[q]
        assert set(theirs) == STATE_KEYS[spec]
        for key, value in ours.items():
            assert theirs[key].dtype == value.dtype == torch.float32, key
            assert torch.equal(theirs[key], value), key
            assert theirs[key] is not value
    assert float(fresh.state[fresh_params[0]]["step"]) == 3
    for ours, theirs in zip(opt.param_groups, fresh.param_groups, strict=True):
        assert {k: v for k, v in ours.items() if k != "params"} == {k: v for k, v in theirs.items() if k != "params"}
    assert fresh.param_groups[1]["lr"] == pytest.approx(kwargs["lr"] / 3)
    # And the reloaded optimizer's own state_dict is the one it was given.
    again = fresh.state_dict()
    for index, state in saved["state"].items():
        assert set(again["state"][index]) == set(state)
        for key, value in state.items():
            assert torch.equal(again["state"][index][key], value)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_resume_is_bit_exact(case, dtype):
    spec, kwargs = CASES[case]
    cls = optgen.load(spec)
    params = make_params(dtype)
    opt = cls(groups(params, kwargs), **kwargs)
    run(opt, params, range(5))
    checkpoint = through_bytes({"params": [p.detach() for p in params], "optimizer": opt.state_dict()})
    run(opt, params, range(5, 10))
    p1 = [p.detach().clone() for p in params]

    resumed_params = [torch.nn.Parameter(t.clone()) for t in checkpoint["params"]]
    resumed = cls(groups(resumed_params, kwargs), **kwargs)
    resumed.load_state_dict(checkpoint["optimizer"])
    for p in resumed_params:
        assert p.dtype == dtype
        for key, value in resumed.state[p].items():
            assert value.dtype == torch.float32, f"{key} is {value.dtype} after load"
    run(resumed, resumed_params, range(5, 10))
    p2 = [p.detach().clone() for p in resumed_params]

    for a, b in zip(p1, p2, strict=True):
        assert torch.equal(a, b)
    # The 5 steps after the checkpoint did move the params (a lone bf16 element may stay put: its
    # updates can be below half an ulp, so only the large tensors are checked).
    for a, start in zip(p1, checkpoint["params"], strict=True):
        assert a.numel() == 1 or not torch.equal(a, start)
    for p, q in zip(params, resumed_params, strict=True):
        assert float(resumed.state[q]["step"]) == 10
        for key, value in opt.state[p].items():
            assert torch.equal(resumed.state[q][key], value), key


@pytest.mark.parametrize("case", sorted(CASES))
def test_missing_state_key_raises_key_error(case):
    spec, kwargs = CASES[case]
    cls = optgen.load(spec)
    params = make_params()
    opt = cls(params, **kwargs)
    run(opt, params, range(2))
    saved = through_bytes(opt.state_dict())
    dropped = sorted(STATE_KEYS[spec] - {"step"})[-1]
    del saved["state"][1][dropped]
    fresh = cls(make_params(), **kwargs)
    with pytest.raises(KeyError, match=dropped) as error:
        fresh.load_state_dict(saved)
    assert "(7, 13)" in str(error.value)  # names the parameter it is about


# -- interchange with torch.optim ------------------------------------------------------------------
def continue_both(ours, ours_params, ref, ref_params, steps: range) -> None:
    for step in steps:
        set_grads(ours_params, step)
        set_grads(ref_params, step)
        ours.step()
        ref.step()
        for a, b in zip(ours_params, ref_params, strict=True):
            assert rel_err(a, b) <= RTOL_VS_TORCH, f"step {step + 1}, shape {tuple(a.shape)}"


TORCH_PAIRS = {
    "adamw": (torch.optim.AdamW, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.05)),
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=0.05)),
    "sgd": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
}


@pytest.mark.parametrize("spec", sorted(TORCH_PAIRS))
def test_load_torch_optim_state_dict(spec):
    torch_cls, kwargs = TORCH_PAIRS[spec]
    ref_params = make_params()
    ref = torch_cls(groups(ref_params, kwargs), **kwargs)
    run(ref, ref_params, range(5))
    saved = through_bytes(ref.state_dict())

    ours_params = [torch.nn.Parameter(p.detach().clone()) for p in ref_params]
    ours = optgen.load(spec)(groups(ours_params, kwargs), lr=123.0)  # the hypers come from the state_dict
    ours.load_state_dict(saved)
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in ref.param_groups]
    for p in ours_params:
        assert set(ours.state[p]) == STATE_KEYS[spec]
    if spec != "sgd":  # torch's SGD keeps no step count
        assert float(ours.state[ours_params[0]]["step"]) == 5
    continue_both(ours, ours_params, ref, ref_params, range(5, 10))


@pytest.mark.parametrize("spec", sorted(TORCH_PAIRS))
def test_torch_optim_loads_generated_state_dict(spec):
    torch_cls, kwargs = TORCH_PAIRS[spec]
    ours_params = make_params()
    ours = optgen.load(spec)(groups(ours_params, kwargs), **kwargs)
    run(ours, ours_params, range(5))
    saved = through_bytes(ours.state_dict())

    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in ours_params]
    ref = torch_cls(groups(ref_params, kwargs), lr=123.0)
    ref.load_state_dict(saved)
    assert [g["lr"] for g in ref.param_groups] == [g["lr"] for g in ours.param_groups]
    for p, q in zip(ours_params, ref_params, strict=True):
        for key, value in ours.state[p].items():
            if key != "step" or spec != "sgd":
                assert torch.equal(ref.state[q][key], value), key
    continue_both(ours, ours_params, ref, ref_params, range(5, 10))


def test_torch_adamw_hand_over_matches_uninterrupted_torch_run():
    # The hand-over itself loses nothing: torch.optim.AdamW for 10 steps vs torch for 5, then
    # generated for 5 (loaded from torch's state_dict), vs generated for 5, then torch for 5.
    torch_cls, kwargs = TORCH_PAIRS["adamw"]
    AdamW = optgen.load("adamw")
    straight = make_params()
    opt = torch_cls(straight, **kwargs)
    run(opt, straight, range(10))

    for first, second in ((torch_cls, AdamW), (AdamW, torch_cls)):
        params = make_params()
        a = first(params, **kwargs)
        run(a, params, range(5))
        b = second(params, **kwargs)
        b.load_state_dict(through_bytes(a.state_dict()))
        run(b, params, range(5, 10))
        for p, q in zip(params, straight, strict=True):
            assert rel_err(p, q) <= RTOL_VS_TORCH, f"{first.__name__} -> {second.__name__}"
