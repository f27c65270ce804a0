"""Matrix primitives in the spec language: errors at their line and column, the plan's matrix stages,
the generated code, and the CLI (show --plan, list, memory) on the new built-in specs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import optgen
from optgen.cli import main
from optgen.codegen.plan import make_plan
from optgen.codegen.source import SpecError
from optgen.codegen.spec import load_spec, parse_spec

SPEC = """\
optgen: 1
name: whitened
class: Whitened
hyper:
  lr: 0.01
  eps: 1.0e-8
state:
  r: {kind: rows, init: 0}
update:
  - r = 0.9 * r + mean(grad**2, dim=-1)
  - u = {line}
  - param = param - lr * u
"""


def error(line: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(SPEC.replace("{line}", line), "bad.yaml")
    return info.value


@pytest.mark.parametrize(
    ("line", "column", "message"),
    [
        ("standardize(grad, dim=0)", 31, "dim must be -1 (along rows), -2 (along columns), long"),
        ("standardize(grad)", 9, "standardize() needs dim="),
        ("standardize(grad, dim=-1, eps=-1)", 39, "eps must be positive"),
        ("standardize(grad, dim=-1, eps=grad)", 39, "eps must be a number or hyperparameter expression"),
        ("standardize(r, dim=-1)", 21, "kind clash: standardize() needs a full value (a matrix), got rows"),
        ("standardize(grad, dim=-1, steps=3)", 41, "standardize() takes no keyword 'steps'"),
        ("whiten(grad, steps=5, method=svd)", 38, "unknown method 'svd'"),
        ("whiten(grad, steps=5, method='quintic')", 38, "unknown method 'a string'"),
        ("whiten(grad, steps=0)", 28, "steps must be a whole number from 1 to 100"),
        ("whiten(grad, steps=2.5)", 28, "steps must be a whole number from 1 to 100"),
        ("whiten(grad, steps=lr)", 28, "steps must be a whole number from 1 to 100"),
        ("whiten(grad, steps=True)", 28, "steps must be a whole number from 1 to 100"),
        ("whiten(grad)", 9, "whiten() needs steps="),
        ("whiten(grad, steps=5, dtype=float16)", 37, "unknown dtype 'float16'"),
        ("whiten(mean(grad, dim=all), steps=5)", 16, "kind clash: whiten() needs a full value (a matrix), got scalar"),
        ("whiten(grad, grad, steps=5)", 9, "whiten() takes 1 positional argument, got 2"),
        ("mean(grad, dim=long)", 24, "dim must be -1 (along rows), -2 (along columns) or all"),
        ("whitten(grad, steps=5)", 9, "unknown function 'whitten' (did you mean 'whiten'?)"),
    ],
)
def test_matrix_primitive_errors_point_at_the_token(line, column, message):
    err = error(line)
    assert err.line == 11, err
    assert err.where.column == column, err
    assert message in str(err), err


def test_primitive_names_are_reserved():
    with pytest.raises(SpecError, match="'whiten' is reserved"):
        parse_spec(SPEC.replace("{line}", "grad").replace("  eps: 1.0e-8", "  whiten: 1.0"), "bad.yaml")
    with pytest.raises(SpecError, match="'matrix_0' is reserved"):
        parse_spec(SPEC.replace("{line}", "grad").replace("- u = grad", "- matrix_0 = grad"), "bad.yaml")


def test_plan_puts_primitives_in_one_matrix_stage_between_map_stages():
    spec = parse_spec(
        SPEC.replace("{line}", "whiten(standardize(2 * grad + r, dim=-1, eps=eps), steps=7, method=quintic) + 1"),
        "ok.yaml",
    )
    plan = make_plan(spec)
    ops = [stage.op for stage in plan.stages]
    assert ops == ["reduce", "map", "matrix", "map"], plan.render()
    matrix = plan.stages[2]
    assert len(matrix.lets) == 2 and {str(s) for s in matrix.inputs} == {"eps", plan.stages[1].outputs[-1].name}
    assert plan.min_ndim == 2
    text = plan.render()
    assert "stage matrix_2 over full" in text
    assert "whiten(x0, steps=7, method=quintic, dtype=float32)" in text
    assert "standardize(" in text and "eps=eps" in text


def test_the_same_primitive_call_is_computed_once():
    spec = parse_spec(SPEC.replace("{line}", "whiten(grad, steps=3) * whiten(grad, steps=3)"), "ok.yaml")
    plan = make_plan(spec)
    matrix = [stage for stage in plan.stages if stage.op == "matrix"]
    assert len(matrix) == 1 and len(matrix[0].lets) == 1


def test_generated_code_calls_the_runtime_module(tmp_path):
    text = SPEC.replace("{line}", "whiten(standardize(grad, dim=-2, eps=eps), steps=4, dtype=bfloat16)")
    (tmp_path / "w.yaml").write_text(text)
    cls = optgen.load(tmp_path / "w.yaml")
    source = (tmp_path / "out").mkdir() or optgen.build(tmp_path / "w.yaml", tmp_path / "out")
    module = (source / "torch_whitened.py").read_text()
    assert "from optgen.runtime.matrix import standardize, whiten" in module
    assert 'whiten(x0, steps=4, method="newton_schulz", dtype=torch.bfloat16)' in module
    param = torch.nn.Parameter(torch.randn(6, 10))
    opt = cls([param], lr=0.1)
    param.grad = torch.randn(6, 10)
    before = param.detach().clone()
    opt.step()
    assert torch.isfinite(param).all() and not torch.equal(param.detach(), before)
    vector = torch.nn.Parameter(torch.randn(5))
    vector.grad = torch.randn(5)
    with pytest.raises(ValueError, match="at least 2 dims"):
        cls([vector]).step()


def test_cli_show_plan_list_and_memory(capsys):
    assert main(["show", "swan", "--plan"]) == 0
    out = capsys.readouterr().out
    assert "stage matrix_0 over full" in out and "whiten(x0, steps=10, method=newton_schulz" in out
    assert main(["list"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows["swan"][1] == "SWAN" and float(rows["swan"][2]) == 0.0
    assert rows["factor4bit"][1] == "Factor4bit" and float(rows["factor4bit"][2]) <= 0.6
    assert rows["sinkgd"][1] == "SinkGD"
    assert main(["memory", "swan", "adamw", "--shapes", "4096x4096,4096"]) == 0
    lines = capsys.readouterr().out.splitlines()
    swan = next(line for line in lines if line.startswith("swan")).split()
    # the matrix keeps a 4-byte step only; the vector gets AdamW's 8 bytes/param + its step
    state_bytes = 4 + 4 + 8 * 4096
    assert float(swan[-1]) == pytest.approx(state_bytes / (4096 * 4096 + 4096), abs=1e-3)


def test_sinkgd_alternates_row_and_column_normalization():
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(12, 20))
    grad = torch.randn(12, 20) * torch.exp(torch.randn(12, 1)) * torch.exp(torch.randn(1, 20))
    opt = optgen.load("sinkgd")([param], lr=0.1, weight_decay=0.0)
    before = param.detach().double().numpy()
    param.grad = grad
    opt.step()
    x = grad.double().numpy()
    for _ in range(5):  # fp64 reference: rows to unit RMS, then columns
        x = x / (np.sqrt((x**2).mean(axis=1, keepdims=True)) + 1e-8)
        x = x / (np.sqrt((x**2).mean(axis=0, keepdims=True)) + 1e-8)
    np.testing.assert_allclose(param.detach().double().numpy(), before - 0.1 * x, rtol=0, atol=1e-5)
    assert np.abs(np.sqrt((x**2).mean(axis=1)) - 1).max() < 0.05  # rows nearly balanced too
    assert load_spec("sinkgd").spec_for((7,)).name == "adamw"
