"""Invalid specs: every mistake is a SpecError naming the right line (and column) with a useful message.

Each case starts from BASE (a valid AdamW-like spec) and breaks one thing.  Line numbers of BASE:

     1 optgen        5 hyper         11 state        14 update
     2 name          6   lr          12   m          15   - g = ...
     3 class         7   betas       13   v          16   - m = ...
     4 summary       8   eps                         17   - v = ...
                     9   weight_decay                18   - param = ...
                    10   maximize
"""

from __future__ import annotations

import pytest

from optgen.codegen.source import SpecError
from optgen.codegen.spec import load_spec, parse_spec

BASE = """\
optgen: 1
name: adamw
class: AdamW
summary: an AdamW-like spec for the error tests
hyper:
  lr: {default: 1.0e-3, in: "[0, inf)"}
  betas: {default: [0.9, 0.999], in: "[0, 1)"}
  eps: {default: 1.0e-8, in: "[0, inf)"}
  weight_decay: {default: 1.0e-2, in: "[0, inf)"}
  maximize: false
state:
  m: {init: 0, store: float32, saved_as: exp_avg}
  v: {init: 0, store: float32, saved_as: exp_avg_sq}
update:
  - g = where(maximize, -grad, grad)
  - m = beta1 * m + (1 - beta1) * g
  - v = beta2 * v + (1 - beta2) * g**2
  - param = param * (1 - lr * weight_decay) - lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)
"""

G = "  - g = where(maximize, -grad, grad)"  # line 15
M = "  m: {init: 0, store: float32, saved_as: exp_avg}"  # line 12
V = "  v: {init: 0, store: float32, saved_as: exp_avg_sq}"  # line 13
UPDATE = BASE[BASE.index("update:") :]


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, f"{old!r} must occur exactly once"
    return text.replace(old, new)


def replace_lines(first: int, last: int, new: str) -> str:
    """BASE with its lines first..last (1-based, inclusive) replaced by ``new``."""
    lines = BASE.splitlines()
    return "\n".join(lines[: first - 1] + [new] + lines[last:]) + "\n"


def error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "bad.yaml")
    err = info.value
    assert err.where is not None and err.where.file == "bad.yaml"
    return err


def test_base_is_valid():
    spec = parse_spec(BASE, "bad.yaml")
    assert spec.class_name == "AdamW"
    assert [s.saved_as for s in spec.state] == ["exp_avg", "exp_avg_sq"]


# (text, line, message substring, hint substring or None)
CASES = [
    # -- top level ------------------------------------------------------------------------------
    pytest.param(
        edit("summary:", "sumary:"), 4, "unknown key 'sumary'", "did you mean 'summary'?", id="unknown-top-key"
    ),
    pytest.param(edit("class: AdamW\n", ""), 1, "missing required key 'class'", None, id="missing-class"),
    pytest.param(BASE[: BASE.index("update:")], 1, "missing required key 'update'", None, id="missing-update"),
    pytest.param(edit("optgen: 1\n", ""), 1, "missing required key 'optgen'", None, id="missing-version"),
    pytest.param(edit("optgen: 1", "optgen: 2"), 1, "unsupported spec version 2", "write optgen: 1", id="version-2"),
    pytest.param(edit("optgen: 1", "optgen: true"), 1, "unsupported spec version True", None, id="version-bool"),
    pytest.param(edit("optgen: 1", 'optgen: "1"'), 1, "unsupported spec version '1'", None, id="version-text"),
    pytest.param(edit("name: adamw", "name: adam-w"), 2, "spec name must be a Python identifier", None, id="name-dash"),
    pytest.param(
        edit("name: adamw", "name: 2adamw"), 2, "spec name must be a Python identifier", None, id="name-digit"
    ),
    pytest.param(edit("name: adamw", "name: _adamw"), 2, "must not start with '_'", None, id="name-underscore"),
    pytest.param(
        edit("class: AdamW", "class: lambda"), 3, "class name must be a Python identifier", None, id="class-kw"
    ),
    pytest.param(
        edit("summary: an AdamW-like spec for the error tests", "summary: [an]"),
        4,
        "summary must be text",
        None,
        id="summary-list",
    ),
    pytest.param("- a\n- b\n", 1, "a spec must be a YAML mapping", "keys: optgen", id="not-a-mapping"),
    pytest.param("", 1, "spec is empty", None, id="empty"),
    pytest.param("# only a comment\n", 1, "spec is empty", None, id="only-comment"),
    # -- YAML level -----------------------------------------------------------------------------
    pytest.param(edit("summary: an", "summary: an: b"), 4, "YAML syntax error", None, id="yaml-syntax"),
    pytest.param(edit("  eps:", "\teps:"), 8, "YAML syntax error", None, id="yaml-tab"),
    pytest.param(edit(V, V + "\n  - oops"), 14, "YAML syntax error", None, id="yaml-list-in-mapping"),
    pytest.param(edit("state:", "summary: again\nstate:"), 11, "duplicate key 'summary'", None, id="duplicate-top-key"),
    pytest.param(
        edit("  maximize: false", "  maximize: false\n  eps: 1.0"), 11, "duplicate key 'eps'", None, id="dup-hyper"
    ),
    pytest.param(
        edit('  lr: {default: 1.0e-3, in: "[0, inf)"}', '  lr: &lr {default: 1.0e-3, in: "[0, inf)"}\n  lr2: *lr'),
        6,  # the anchored node (the alias refers to it)
        "anchors and aliases are not supported",
        None,
        id="yaml-alias",
    ),
    pytest.param(edit("summary: an", "summary: !!set {a, b}\nx: an"), 4, "unsupported YAML tag", None, id="yaml-set"),
    pytest.param(edit("summary: an", "summary: !!int an"), 4, "invalid YAML value", None, id="yaml-bad-int-tag"),
    pytest.param(
        edit("summary: an", "? [a, b]\n: 1\nx: an"), 4, "mapping keys must be plain names", None, id="yaml-key"
    ),
    # -- hyper ----------------------------------------------------------------------------------
    pytest.param(
        edit("  maximize: false", "  maximize: {default: false, doc: flip, typo: 1}"),
        10,
        "unknown key 'typo' in hyperparameter 'maximize'",
        "keys: default, doc, in, names",
        id="unknown-hyper-key",
    ),
    pytest.param(
        edit("eps: {default: 1.0e-8", "eps: {default: small"), 8, "wrong type for 'eps'", "e.g. 1.0e-3", id="text"
    ),
    pytest.param(
        edit("betas: {default: [0.9, 0.999]", "betas: {default: [a, b]"),
        7,
        "wrong type for 'betas': expected a number, got str 'a'",
        None,
        id="default-list-of-text",
    ),
    pytest.param(edit("eps: {default: 1.0e-8", "eps: {default: .nan"), 8, "'eps' must not be NaN", None, id="nan"),
    pytest.param(edit("eps: {default: 1.0e-8", "eps: {default: " + "9" * 400), 8, "too large", None, id="huge-int"),
    pytest.param(edit("  maximize: false", "  maximize: null"), 10, "wrong type for 'maximize'", None, id="null"),
    pytest.param(
        edit("weight_decay: {default: 1.0e-2", "weight_decay: {default: -1.0"),
        9,
        "default -1.0 of 'weight_decay' is outside [0, inf)",
        None,
        id="default-outside-in",
    ),
    pytest.param(
        edit("betas: {default: [0.9, 0.999]", "betas: {default: [0.9, 1.0]"),
        7,
        "default 1.0 of 'betas' is outside [0, 1)",
        None,
        id="tuple-default-outside-in",
    ),
    pytest.param(
        edit('"[0, inf)"}\n  betas', '"0 to inf"}\n  betas'), 6, "invalid interval '0 to inf'", '"[0, 1)"', id="in"
    ),
    pytest.param(
        edit('lr: {default: 1.0e-3, in: "[0, inf)"}', "lr: {default: 1.0e-3, in: [0, 1]}"), 6, "invalid interval", None
    ),
    pytest.param(
        edit('in: "[0, inf)"}\n  betas', 'in: "[0, nan]"}\n  betas'), 6, "wrong type for 'interval bound'", None
    ),
    pytest.param(
        edit("eps: {default: 1.0e-8, ", "eps: {"), 8, "hyperparameter 'eps' needs a default", None, id="no-default"
    ),
    pytest.param(
        edit("betas: {default: [0.9, 0.999],", "betas: {default: [0.9, 0.999], names: [b1],"),
        7,
        "'betas' has 2 values, so names needs 2 names",
        None,
        id="tuple-names",
    ),
    pytest.param(
        edit("betas: {default: [0.9, 0.999]", "betas: {default: []"), 7, "needs 1 to 8 numbers", None, id="empty-tuple"
    ),
    pytest.param(edit('  lr: {default: 1.0e-3, in: "[0, inf)"}\n', ""), 6, "needs an 'lr' hyperparameter", "LR sched"),
    pytest.param(replace_lines(5, 10, "hyper: [lr]"), 5, "hyper must be a mapping", None, id="hyper-list"),
    # -- reserved and duplicate names -----------------------------------------------------------
    *[
        pytest.param(
            edit("  maximize: false", f"  {name}: 1.0"),
            10,
            f"'{name}' is reserved and cannot name a hyperparameter",
            None,
            id=f"reserved-hyper-{name}",
        )
        for name in ("grad", "param", "step", "all", "ndim", "sqrt", "mean")
    ],
    *[
        pytest.param(
            edit("state:\n", f"state:\n  {name}: 0\n"),
            12,
            f"'{name}' is reserved and cannot name a state",
            None,
            id=f"reserved-state-{name}",
        )
        for name in ("step", "grad", "numel", "where")
    ],
    pytest.param(
        edit("state:", "define:\n  norm: lr * 2\nstate:"), 12, "'norm' is reserved and cannot name a define", None
    ),
    pytest.param(
        edit("state:\n", "state:\n  eps: 0\n"), 12, "'eps' is already defined", None, id="state-shadows-hyper"
    ),
    pytest.param(
        edit("  maximize: false", "  maximize: false\n  beta1: 0.5"),
        11,
        "'beta1' is already defined",
        None,
        id="unpacked",
    ),
    # -- state ----------------------------------------------------------------------------------
    pytest.param(
        edit("store: float32, saved_as: exp_avg}", "store: int4, saved_as: exp_avg}"), 12, "unknown storage", "float32"
    ),
    pytest.param(
        edit("store: float32, saved_as: exp_avg}", "store: [float32], saved_as: exp_avg}"),
        12,
        "unknown storage scheme ['float32']",
        "valid: bfloat16, float32",
        id="store-list",
    ),
    pytest.param(
        edit("store: float32, saved_as: exp_avg}", "store: {bits: 4}, saved_as: exp_avg}"),
        12,
        "quantized store needs signed, normalize, table",
        None,
        id="store-bits-only",
    ),
    pytest.param(
        edit(
            "0, store: float32, saved_as: exp_avg}",
            "0, store: {bits: 3, signed: true, normalize: tensor, table: linear}}",
        ),
        12,
        "bits must be 4 or 8, got 3",
        None,
        id="store-3-bits",
    ),
    pytest.param(
        edit(
            "0, store: float32, saved_as: exp_avg}",
            "0, store: {bits: 4, signed: true, normalize: tensor, table: linear, bytes: 1}}",
        ),
        12,
        "unknown key 'bytes' in a quantized store",
        None,
        id="store-unknown-key",
    ),
    pytest.param(
        edit("saved_as: exp_avg}", "saved: exp_avg}"),
        12,
        "unknown key 'saved' in state 'm'",
        "keys: doc, init, kind, saved_as, store",
        id="unknown-state-key",
    ),
    pytest.param(
        edit("{init: 0, store: float32, saved_as: exp_avg}", "{init: 0, kind: diag}"),
        12,
        "unknown state kind 'diag'",
        "rows",
    ),
    pytest.param(
        edit("{init: 0, store: float32, saved_as: exp_avg}", "{init: 0, kind: [rows]}"), 12, "unknown state kind", None
    ),
    pytest.param(edit("state:\n", "state:\n  w: 0\n"), 12, "state 'w' is declared but never assigned in update", None),
    pytest.param(
        edit("saved_as: exp_avg_sq", "saved_as: exp_avg"), 13, "state key 'exp_avg' is used twice", None, id="saved"
    ),
    pytest.param(edit("saved_as: exp_avg_sq", "saved_as: step"), 13, "(or is 'step')", None, id="saved-as-step"),
    pytest.param(edit("saved_as: exp_avg_sq", "saved_as: exp-avg"), 13, "saved_as must be a Python identifier", None),
    pytest.param(
        edit("  m: {init: 0,", "  m: {init: grad,"), 12, "init can use param and hyperparameters, not 'grad'", None
    ),
    pytest.param(
        edit("  m: {init: 0,", "  m: {init: .inf,"), 12, "init must be a finite float64 number", None, id="init-inf"
    ),
    pytest.param(
        edit("  m: {init: 0,", "  m: {init: " + "9" * 400 + ","), 12, "init must be a finite", None, id="init-big"
    ),
    pytest.param(
        edit(M, '  m: {init: "mean(param, dim=-2)", kind: rows, saved_as: exp_avg}'),
        12,
        "kind clash: init of rows state 'm' is cols",
        None,
        id="init-kind-clash",
    ),
    pytest.param(replace_lines(11, 13, "state: [m, v]"), 11, "state must be a mapping", None, id="state-list"),
    # -- define ---------------------------------------------------------------------------------
    pytest.param(edit("state:", "define:\n  a: b + 1\n  b: a * 2\nstate:"), 12, "cycle in define: a -> b -> a", None),
    pytest.param(edit("state:", "define:\n  a: a + 1\nstate:"), 12, "cycle in define: a -> a", None, id="self-cycle"),
    pytest.param(edit("state:", "define:\n  a: [1]\nstate:"), 12, "define 'a' must be an expression", None),
    pytest.param(edit("state:", "define:\n  a: lr * lrr\nstate:"), 12, "unknown name 'lrr'", "did you mean 'lr'?"),
    pytest.param(
        edit("state:", "define:\n  a: lr * 2\nstate:", edit(G, "  - a = grad")),
        17,
        "cannot assign to 'a': it is a define",
        None,
        id="assign-define",
    ),
    # -- update statements ----------------------------------------------------------------------
    pytest.param(edit(G, "  - grad = -grad"), 15, "cannot assign to grad (it is read-only)", "assign to a temporary"),
    pytest.param(edit(G, "  - step = step + 1"), 15, "cannot assign to step", None, id="assign-step"),
    pytest.param(
        edit(G, "  - eps = 2 * eps"),
        15,
        "cannot assign to 'eps': it is a hyperparameter",
        "assign to a new temporary name instead",
        id="assign-hyper",
    ),
    pytest.param(edit(G, "  - beta1 = 0.5 * grad"), 15, "'beta1': it is a hyperparameter", None, id="assign-unpacked"),
    pytest.param(edit(G, "  - mean = grad"), 15, "'mean' is reserved", None, id="assign-reserved"),
    pytest.param(
        edit(G, "  - g = where(maximize, -grad, h)\n  - h = grad"),
        15,
        "undefined temporary 'h': it is used before it is assigned (line 16)",
        None,
        id="temporary-before-assignment",
    ),
    pytest.param(
        edit(G, "  - g = where(maximise, -grad, grad)"), 15, "unknown name 'maximise'", "did you mean 'maximize'?"
    ),
    pytest.param(
        edit(V, "  v: {init: 0, store: float32, saved_as: exp_avg_sq, kind: rows}"),
        17,
        "kind clash: 'v' is a rows state but the value is full",
        "mean(x, dim=-1)",
        id="full-into-rows",
    ),
    pytest.param(
        edit(V, "  v: {init: 0, saved_as: exp_avg_sq, kind: scalar}", edit("g**2", "mean(g, dim=-1)")),
        17,
        "kind clash: 'v' is a scalar state but the value is rows",
        None,
        id="rows-into-scalar",
    ),
    pytest.param(
        edit(G, "  - g = mean(mean(grad, dim=-1), dim=-1)"),
        15,
        "cannot reduce a rows value over dim=-1",
        None,
        id="dim",
    ),
    pytest.param(edit(G, "  - g = grad > 0"), 15, "a comparison can only be the condition of where(cond, a, b)", None),
    pytest.param(edit(G, "  - g = where(grad, grad, 0)"), 15, "'grad' is a number, not a condition", "grad > 0"),
    pytest.param(edit(G, "  - g = where(1, grad, 0)"), 15, "expected a condition", None, id="where-constant"),
    pytest.param(edit(G, "  - g = sqrtt(grad)"), 15, "unknown function 'sqrtt'", "did you mean 'sqrt'?", id="function"),
    pytest.param(edit(G, "  - g = sqrt(grad, grad)"), 15, "sqrt() takes 1 argument, got 2", None, id="arity-sqrt"),
    pytest.param(
        edit(G, "  - g = where(maximize, grad)"), 15, "where() takes 3 arguments, got 2", None, id="arity-where"
    ),
    pytest.param(edit(G, "  - g = clamp(grad, 1)"), 15, "clamp() takes 3 arguments, got 2", None, id="arity-clamp"),
    pytest.param(edit(G, "  - g = max(grad)"), 15, "max() takes 2 arguments, got 1", None, id="arity-max"),
    pytest.param(edit(G, "  - g = mean(grad)"), 15, "mean() needs dim=", "dim=-1, dim=-2 or dim=all", id="mean-no-dim"),
    pytest.param(edit(G, "  - g = norm(grad)"), 15, "norm() needs dim=", None, id="norm-no-dim"),
    pytest.param(edit(G, "  - g = sum(grad, grad, dim=-1)"), 15, "takes 1 positional argument, got 2", None),
    pytest.param(
        edit(G, "  - g = mean(grad, dim=-3)"), 15, "dim must be -1 (along rows), -2 (along columns) or all", None
    ),
    pytest.param(edit(G, "  - g = sqrt(grad, dim=-1)"), 15, "sqrt() takes no dim=", None, id="dim-on-elementwise"),
    pytest.param(edit(G, "  - g = mean(grad, axis=-1)"), 15, "mean() takes no keyword 'axis'", "only dim=", id="axis"),
    pytest.param(
        edit(G, "  - g = where(0 < grad < 1, grad, 0)"),
        15,
        "chained comparisons are not allowed",
        "use and: a < b and b < c",
        id="chained-comparison",
    ),
    pytest.param(edit(G, "  - g = grad % 2"), 15, "the operator Mod is not allowed", "allowed: + - * / **", id="mod"),
    pytest.param(edit(G, "  - g = grad / (1 - 1)"), 15, "division by zero", None, id="division-by-zero"),
    pytest.param(edit(G, "  - g = grad * (1 / 0)"), 15, "division by zero", None, id="constant-division-by-zero"),
    pytest.param(edit(G, "  - g = grad * 2 ** 100"), 15, "constant exponent 100 is out of range", None, id="const-exp"),
    pytest.param(edit(G, "  - g = grad * (1e300 * 1e300)"), 15, "overflows or is undefined in float64", None),
    pytest.param(edit(G, "  - g = log(1 - 1)"), 15, "log() of these constants is undefined", None, id="log-zero"),
    pytest.param(edit(G, "  - g = grad ** 100"), 15, "constant exponent 100 is out of range", None, id="exponent"),
    pytest.param(
        edit(G, "  - g = grad if maximize else -grad"),
        15,
        "a conditional expression (use where(cond, a, b)) is not allowed",
        "allowed: numbers, names",
        id="ifexp",
    ),
    pytest.param(edit(G, "  - g = where(maximize, -grad, grad) +"), 15, "syntax error", None, id="syntax"),
    pytest.param(edit(G, "  - g **= 2"), 15, "only += -= *= /= are allowed", None, id="augassign-pow"),
    pytest.param(edit(G, '  - "g = grad; h = grad"'), 15, "one statement per update line", None, id="two-statements"),
    pytest.param(edit(G, "  - g, h = grad, grad"), 15, "the left side of an update must be a single name", None),
    pytest.param(edit(G, "  - grad + 1"), 15, "an update line must be an assignment", "name = expression"),
    pytest.param(edit(G, "  - g = grad\n  - 5"), 16, "an update statement must be text", None, id="update-number"),
    pytest.param(edit(G, "  - g = grad\n  - {g: grad}"), 16, "an update statement must be text", None, id="update-map"),
    pytest.param(
        edit("  - param = param *", "  - param2 = param *"), 15, "the update never assigns param", "param = param"
    ),
    pytest.param(
        BASE[: BASE.index("update:")] + "update: []\n", 14, "update must be a non-empty list", None, id="empty-update"
    ),
    pytest.param(
        BASE[: BASE.index("update:")] + "update:\n", 14, "update must be a non-empty list", None, id="null-update"
    ),
    pytest.param(
        BASE[: BASE.index("update:")] + "update: param = param - lr * grad\n",
        14,
        "non-empty list",
        None,
        id="update-text",
    ),
    # -- routing --------------------------------------------------------------------------------
    pytest.param(BASE + "applies_to: ndim >= 2\n", 19, "'otherwise' is missing", None, id="applies-to-alone"),
    pytest.param(BASE + "otherwise: adam\n", 19, "'applies_to' is missing", None, id="otherwise-alone"),
    pytest.param(
        BASE + "applies_to: ndim >= 2\notherwise: nosuchspec\n",
        20,
        "no spec file or built-in spec named 'nosuchspec'",
        "built-in specs: adam, adamw",
        id="otherwise-missing",
    ),
    pytest.param(
        BASE + "applies_to: ndim >= 2\notherwise: gone.yaml\n", 20, "named 'gone.yaml'", None, id="missing-file"
    ),
    pytest.param(
        BASE + "applies_to: grad > 0\notherwise: adam\n", 19, "applies_to can use ndim, numel, not 'grad'", None
    ),
    pytest.param(
        BASE + "applies_to: ndim + 1\notherwise: adam\n", 19, "expected a condition", None, id="applies-not-cond"
    ),
    pytest.param(
        BASE + "applies_to: 2\notherwise: adam\n", 19, "applies_to must be a condition", None, id="applies-int"
    ),
    pytest.param(BASE + "applies_to: ndim >= 2\notherwise: [adam]\n", 20, "otherwise names a built-in spec", None),
    pytest.param(BASE + "applies_to: ndim >= 2\notherwise: {spec: adam, x: 1}\n", 20, "otherwise takes {spec", None),
    pytest.param(
        BASE + "applies_to: ndim >= 2\notherwise: {spec: adam, rename: {zz: adam_zz}}\n",
        20,
        "rename: 'zz' is not a hyperparameter of adam",
        None,
        id="rename-unknown",
    ),
]


@pytest.mark.parametrize(("text", "line", "message", "hint"), CASES)
def test_invalid_spec_is_refused_at_its_line(text, line, message, hint):
    err = error(text)
    assert err.line == line, f"{err} (expected line {line})"
    assert message in err.message, err
    if hint is not None:
        assert err.hint is not None and hint in err.hint, err
    assert str(err).startswith(f"bad.yaml:{line}:{err.where.column}: ")


def test_at_least_thirty_distinct_cases():
    texts = {case.values[0] for case in CASES}
    assert len(texts) == len(CASES) >= 30


# -- columns -------------------------------------------------------------------------------------


def column_of(token: str, line: str, nth: int = 0) -> int:
    """1-based column of the nth occurrence of token in line."""
    index = -1
    for _ in range(nth + 1):
        index = line.index(token, index + 1)
    return index + 1


@pytest.mark.parametrize(
    ("update_line", "token", "message"),
    [
        ("  - g = where(maximise, -grad, grad)", "maximise", "unknown name"),
        ("  - g = grad * sqrtt(grad)", "sqrtt", "unknown function"),
        ("  - g = where(maximize, -grad, h)", "h)", "undefined temporary"),
        ("  - g = mean(grad, dim=-3)", "-3", "dim must be"),
        ("  - g = where(0 < grad < 1, grad, 0)", "0 < grad", "chained comparisons"),
        ("  - g = grad + param.data", "param.data", "attribute access"),
        ('  - "g = grad * sqrtt(grad)"', "sqrtt", "unknown function"),  # double-quoted: after the quote
        ("  - 'g = grad * sqrtt(grad)'", "sqrtt", "unknown function"),  # single-quoted
        ('  - "   g = grad * sqrtt(grad)"', "sqrtt", "unknown function"),  # leading blanks inside the quotes
        ("  - g = mean(ä, dim=-3)", "-3", "dim must be"),  # a 2-byte character before it (dim= is checked first)
        ("  - g = where(maximize, -grad, grad) + ", "+ ", "syntax error"),
    ],
)
def test_expression_errors_point_at_the_offending_token(update_line, token, message):
    text = edit(G, update_line + ("\n  - h = grad" if "h)" in update_line else ""))
    err = error(text)
    assert message in err.message
    assert err.line == 15
    if message == "syntax error":  # Python reports the position after the dangling operator
        assert err.where.column in (column_of(token, update_line), column_of(token, update_line) + 1)
    else:
        assert err.where.column == column_of(token, update_line), err


def test_assignment_target_column():
    err = error(edit(G, "  - grad = -grad"))
    assert (err.line, err.where.column) == (15, 5)
    err = error(edit(G, '  - "step = step + 1"'))
    assert (err.line, err.where.column) == (15, 6)


def test_multiline_plain_scalar_points_at_the_continuation_line():
    text = edit(G, "  - g = where(maximize,\n      -grad, sqrtt(grad))")
    err = error(text)
    assert "unknown function 'sqrtt'" in err.message
    assert (err.line, err.where.column) == (16, 14)


def test_block_scalar_points_at_its_own_lines():
    err = error(edit(G, "  - |\n    g = where(maximize,\n              -grad, sqrtt(grad))"))
    assert (err.line, err.where.column) == (17, 22)
    err = error(edit(G, "  - >-\n    g = where(maximize, -grad,\n      grad) + nosuch"))
    assert "unknown name 'nosuch'" in err.message
    assert (err.line, err.where.column) == (17, 15)


def test_define_init_and_applies_to_columns():
    err = error(edit("state:", 'define:\n  a: "lr * lrr"\nstate:'))
    assert (err.line, err.where.column) == (12, column_of("lrr", '  a: "lr * lrr"'))
    err = error(edit(M, '  m: {init: "mean(param, dim=-3)", saved_as: exp_avg}'))
    assert (err.line, err.where.column) == (12, column_of("-3", '  m: {init: "mean(param, dim=-3)"'))
    err = error(BASE + "applies_to: ndim >= 2 and grad > 0\notherwise: adam\n")
    assert (err.line, err.where.column) == (19, column_of("grad", "applies_to: ndim >= 2 and grad > 0"))


def test_key_errors_point_at_the_key():
    err = error(edit("  maximize: false", "  maximize: {default: false, typo: 1}"))
    assert (err.line, err.where.column) == (10, column_of("typo", "  maximize: {default: false, typo: 1}"))
    err = error(edit("summary:", "sumary:"))
    assert (err.line, err.where.column) == (4, 1)


@pytest.mark.parametrize(
    ("old", "new", "line", "column"),
    [
        ("name: adamw", "name adamw", 2, 1),  # a key without ':' (the scanner notices on the next line)
        ("  - m = beta1", "  -- m = beta1", 16, 3),
        ("weight_decay: {default: 1.0e-2,", "weight_decay: {default: 1.0e-2 in:", 9, 36),
        ("  eps:", "\teps:", 8, 1),
        ("  lr: {", "  lr {", 6, 26),
        ("summary: an", "summary: !x!y an", 4, 10),
    ],
)
def test_yaml_syntax_error_points_at_the_error(old, new, line, column):
    err = error(edit(old, new))
    assert err.message.startswith("YAML syntax error: ")
    assert (err.line, err.where.column) == (line, column), err


# -- otherwise chains on disk ----------------------------------------------------------------------


def routed(name: str, other: str) -> str:
    return edit("name: adamw", f"name: {name}") + f"applies_to: ndim >= 2\notherwise: {other}\n"


def test_otherwise_file_relative_to_the_spec_loads(tmp_path):
    (tmp_path / "b.yaml").write_text(edit("name: adamw", "name: b"))
    (tmp_path / "a.yaml").write_text(routed("a", "b.yaml"))
    spec = load_spec(tmp_path / "a.yaml")
    assert [s.name for s in spec.all_specs()] == ["a", "b"]


def test_otherwise_cycle_between_two_files(tmp_path):
    (tmp_path / "a.yaml").write_text(routed("a", "b.yaml"))
    (tmp_path / "b.yaml").write_text(routed("b", "a.yaml"))
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "a.yaml")
    err = info.value
    assert "cycle in otherwise" in err.message
    assert err.where.file.endswith("b.yaml") and err.line == 20


def test_otherwise_cycle_to_itself(tmp_path):
    (tmp_path / "c.yaml").write_text(routed("c", "c.yaml"))
    with pytest.raises(SpecError, match="cycle in otherwise") as info:
        load_spec(tmp_path / "c.yaml")
    assert info.value.line == 20


def test_error_in_the_otherwise_spec_names_that_file(tmp_path):
    (tmp_path / "b.yaml").write_text(edit(G, "  - g = sqrtt(grad)"))
    (tmp_path / "a.yaml").write_text(routed("a", "b.yaml"))
    with pytest.raises(SpecError, match="unknown function 'sqrtt'") as info:
        load_spec(tmp_path / "a.yaml")
    assert info.value.where.file.endswith("b.yaml") and info.value.line == 15


def test_otherwise_naming_a_device_is_bounded(tmp_path):
    (tmp_path / "a.yaml").write_text(routed("a", "/dev/zero"))
    with pytest.raises(SpecError, match="larger than"):
        load_spec(tmp_path / "a.yaml")
