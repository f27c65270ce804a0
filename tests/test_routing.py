"""applies_to / otherwise: parameters routed to different specs inside one optimizer."""

import pytest
import torch

import optgen
from optgen.codegen.source import SpecError

ROUTED = """optgen: 1
name: signmat
class: SignMat
summary: sign descent for matrices, AdamW (lr renamed adam_lr) for everything else.
hyper:
  lr: 0.01
  weight_decay: 0.0
applies_to: ndim >= 2 and numel > 4
otherwise: {spec: adamw, rename: {lr: adam_lr}}
update:
  - param = param * (1 - lr * weight_decay) - lr * sign(grad)
"""


@pytest.fixture
def routed_spec(tmp_path):
    path = tmp_path / "signmat.yaml"
    path.write_text(ROUTED)
    return path


def test_parameters_follow_applies_to_and_renamed_hyperparameters(routed_spec):
    cls = optgen.load(routed_spec)
    matrix = torch.nn.Parameter(torch.randn(4, 3))
    vector = torch.nn.Parameter(torch.randn(5))
    tiny = torch.nn.Parameter(torch.randn(2, 2))  # ndim 2 but numel 4: goes to AdamW
    params = [matrix, vector, tiny]
    ref = [p.detach().clone().requires_grad_() for p in params[1:]]
    adamw = torch.optim.AdamW(ref, lr=0.003, weight_decay=0.0)
    opt = cls(params, lr=0.01, adam_lr=0.003, weight_decay=0.0)
    before = matrix.detach().clone()
    for _ in range(3):
        for p, r in zip(params, [None, *ref]):
            g = torch.randn_like(p)
            p.grad = g
            if r is not None:
                r.grad = g.clone()
        opt.step()
        adamw.step()
    assert set(opt.state[matrix]) == {"step"}  # stateless route
    assert set(opt.state[vector]) == {"step", "exp_avg", "exp_avg_sq"}
    assert (matrix.detach() - before).abs().max() <= 0.03 + 1e-6  # 3 sign steps of lr 0.01
    for p, r in zip(params[1:], ref):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
    assert "adam_lr" in cls.__init__.__code__.co_varnames


def test_otherwise_cycle_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text(
        ROUTED.replace("name: signmat", "name: a")
        .replace("{spec: adamw, ", "{spec: b.yaml, ")
        .replace("rename: {lr: adam_lr}", "rename: {}")
    )
    (tmp_path / "b.yaml").write_text(
        ROUTED.replace("name: signmat", "name: b")
        .replace("{spec: adamw, ", "{spec: a.yaml, ")
        .replace("rename: {lr: adam_lr}", "rename: {}")
    )
    with pytest.raises(SpecError, match="cycle in otherwise"):
        optgen.load(tmp_path / "a.yaml")
