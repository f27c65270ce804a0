"""Generated code stays safe and correct whatever names and text a spec uses (regressions)."""

import pytest
import torch

import optgen
from optgen.codegen.build import render_package
from optgen.codegen.source import SpecError
from optgen.codegen.spec import load_spec, parse_spec

SPEC = """optgen: 1
name: demo
class: Demo
hyper: {{lr: 0.1}}
state:
{state}
update:
{update}
"""


def write(tmp_path, update: str, state: str = "  m: 0", name: str = "demo.yaml"):
    path = tmp_path / name
    path.write_text(SPEC.format(state=state, update=update))
    return path


def test_comments_in_spec_lines_never_reach_generated_code(tmp_path):
    path = write(
        tmp_path, "  - m = m + grad\n" + """  - 'param = param - lr * m  # \"\"\"; raise SystemExit(41); \"\"\"'"""
    )
    files = render_package(load_spec(path))
    assert not any("SystemExit" in text for name, text in files.items() if name.endswith(".py"))
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    optgen.load(path)([p]).step()
    torch.testing.assert_close(p.detach(), torch.full((2,), -0.1))


def test_a_spec_path_with_a_newline_stays_one_comment_line(tmp_path):
    path = write(tmp_path, "  - m = m + grad\n  - param = param - lr * m", name="a\nimport os.yaml")
    files = render_package(load_spec(path))
    header = files["__init__.py"].split('"""')[0]
    assert all(line.startswith("#") or not line for line in header.splitlines())


def test_internal_version_names_never_collide_with_spec_names(tmp_path):
    update = """  - g = grad
  - g_2 = 2 * grad
  - g = g + 1
  - m_new = g_2 * 10
  - m = m + g
  - param = param - lr * (m + g_2 + m_new + g)"""
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.ones(3)
    optgen.load(write(tmp_path, update))([p]).step()
    # g = 2, g_2 = 2, m_new (a temporary) = 20, new m = 2: param = -0.1 * (2 + 2 + 20 + 2)
    torch.testing.assert_close(p.detach(), torch.full((3,), -2.6))


@pytest.mark.parametrize("name", ["torch", "state", "hyper", "self", "dict", "map_0", "h1"])
def test_names_the_generated_code_uses_are_reserved(name):
    with pytest.raises(SpecError, match="reserved"):
        parse_spec(SPEC.format(state=f"  {name}: 0", update=f"  - {name} = grad\n  - param = param"), "r.yaml")


def test_applies_to_cannot_call_functions():
    text = SPEC.format(state="  m: 0", update="  - m = grad\n  - param = param") + (
        "applies_to: sqrt(numel) > 3\notherwise: sgd\n"
    )
    with pytest.raises(SpecError, match="cannot call functions") as err:
        parse_spec(text, "a.yaml")
    assert err.value.line == 10


def test_unused_temporaries_are_dropped(tmp_path):
    update = "  - unused = grad * 2\n  - r = beta2 * 0 + mean(grad, dim=-1)\n  - m = m + r\n  - param = param - lr * m"
    path = write(tmp_path, update.replace("beta2 * 0 + ", ""))
    p = torch.nn.Parameter(torch.zeros(2, 3))
    p.grad = torch.arange(6.0).view(2, 3)
    optgen.load(path)([p]).step()
    torch.testing.assert_close(p.detach(), -0.1 * p.grad.mean(dim=-1, keepdim=True).expand(2, 3))


def test_cols_values_need_a_matrix(tmp_path):
    path = write(
        tmp_path, "  - c = c + mean(grad, dim=-2)\n  - param = param - lr * c", state="  c: {init: 0, kind: cols}"
    )
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.ones(4)
    with pytest.raises(ValueError, match="at least 2 dims"):
        optgen.load(path)([p]).step()


def test_optim_attribute_on_the_package():
    assert optgen.optim.AdamW.__name__ == "AdamW"
    assert "SGD" in dir(optgen.optim)
