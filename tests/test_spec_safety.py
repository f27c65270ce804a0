"""Spec text is never executed: injection attempts are refused with a SpecError, quickly, and run nothing.

Every payload tries to create a sentinel file; after parsing, the sentinel must not exist.
"""

from __future__ import annotations

import json
import time

import pytest

from optgen.codegen.source import SpecError
from optgen.codegen.spec import parse_spec

BASE = """\
optgen: 1
name: adamw
class: AdamW
summary: an AdamW-like spec for the safety tests
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
G = "  - g = where(maximize, -grad, grad)"
M = "  m: {init: 0, store: float32, saved_as: exp_avg}"
SECONDS = 2.0

# Each payload is an expression template; SENTINEL is replaced by the sentinel file's path.
PAYLOADS = {
    "import-system": "__import__('os').system('touch SENTINEL')",
    "import-system-in-math": "grad + __import__('os').system('touch SENTINEL')",
    "subclasses": "().__class__.__bases__[0].__subclasses__()",
    "subclasses-walk": "grad.__class__.__mro__[-1].__subclasses__()[0]",
    "open": "open('SENTINEL', 'w')",
    "open-in-call": "sqrt(open('SENTINEL', 'w').write('x'))",
    "attribute": "param.data",
    "attribute-of-call": "sqrt(grad).real",
    "dunder-attribute": "sqrt.__globals__",
    "lambda": "(lambda: __import__('os').system('touch SENTINEL'))()",
    "lambda-arg": "sqrt(lambda x: x)",
    "list-comprehension": "[__import__('os').system('touch SENTINEL') for x in (1,)]",
    "set-comprehension": "{__import__('os').system('touch SENTINEL') for x in (1,)}",
    "dict-comprehension": "{x: __import__('os').system('touch SENTINEL') for x in (1,)}",
    "generator": "sum(__import__('os').system('touch SENTINEL') for x in (1,))",
    "generator-in-mean": "mean((open('SENTINEL', 'w') for x in (1,)), dim=all)",
    "f-string": "f\"{__import__('os').system('touch SENTINEL')}\"",
    "f-string-plus": "grad + len(f\"{open('SENTINEL', 'w')}\")",
    "builtins": "__builtins__",
    "builtins-subscript": "__builtins__['__import__']('os').system('touch SENTINEL')",
    "dunder-name": "__name__",
    "exec": "exec(\"import os; os.system('touch SENTINEL')\")",
    "eval": "eval(\"__import__('os').system('touch SENTINEL')\")",
    "compile": "compile('x', 'y', 'exec')",
    "globals": "globals()",
    "getattr": "getattr(grad, 'data')",
    "system-name": "system('touch SENTINEL')",
    "breakpoint": "breakpoint()",
    "subscript": "grad[0]",
    "slice": "grad[::2]",
    "walrus": "(x := __import__('os'))",
    "walrus-in-where": "where((x := grad) > 0, x, 0)",
    "ifexp": "grad if __import__('os').system('touch SENTINEL') else grad",
    "string": "'touch SENTINEL'",
    "bytes": "b'touch SENTINEL'",
    "starred": "max(*grad)",
    "kwargs": "max(**{'a': grad})",
    "await": "await grad",
    "yield": "(yield grad)",
    "huge-exponent-chain": "grad ** 10 ** 10 ** 10",
    "huge-exponent-int": "2 ** 9999",
    "huge-exponent-nested": "(10**300)**64**64",
    "huge-constant-power": "10 ** 10 ** 10",
    "negative-huge-exponent": "grad ** -(10 ** 10)",
    "float-overflow-literal": "1e400",
    "float-overflow-times-grad": "grad * 1e400",
    "int-400-digits": "1" + "0" * 399,
    "int-400-digits-times-grad": "grad * " + "9" * 400,
    "exp-overflow": "exp(1000) * grad",
    "nested-parentheses-500": "(" * 500 + "grad" + ")" * 500,
    "nested-parentheses-300": "(" * 300 + "grad" + ")" * 300,  # Python's parser refuses > 200
    "nested-calls-100": "sqrt(" * 100 + "grad" + ")" * 100,  # deeper than MAX_DEPTH
    "nested-calls-long": "sqrt(" * 200 + "grad" + ")" * 200,
    "nested-unary": "-" * 300 + "grad",
    "long-expression": " + ".join(["grad"] * 800),  # > 5000 characters
    "long-expression-with-call": "grad + " * 700 + "__import__('os').system('touch SENTINEL')",
    "nul-character": "grad\x00 + 1",
}


def sentinel_payload(template: str, sentinel) -> str:
    return template.replace("SENTINEL", str(sentinel))


def yaml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid YAML double-quoted scalar


def in_update(payload: str) -> str:
    return BASE.replace(G, "  - " + yaml_string("g = " + payload))


def in_define(payload: str) -> str:
    return BASE.replace("state:", "define:\n  a: " + yaml_string(payload) + "\nstate:")


def in_init(payload: str) -> str:
    return BASE.replace(M, "  m: {init: " + yaml_string(payload) + ", saved_as: exp_avg}")


def in_applies_to(payload: str) -> str:
    return BASE + "applies_to: " + yaml_string("ndim >= 2 and " + payload) + "\notherwise: adam\n"


def in_applies_to_alone(payload: str) -> str:
    return BASE + "applies_to: " + yaml_string(payload) + "\notherwise: adam\n"


PLACES = {
    "update": in_update,
    "define": in_define,
    "init": in_init,
    "applies_to": in_applies_to,
    "applies_to-alone": in_applies_to_alone,
}


def test_the_places_accept_a_harmless_expression():
    """The harness itself: a benign expression in each place parses, so refusals below are real."""
    assert parse_spec(in_update("-grad"), "ok.yaml").program
    assert parse_spec(in_define("lr * 2"), "ok.yaml").program[0].target == "a"
    assert parse_spec(in_init("lr * param"), "ok.yaml").state[0].init is not None
    assert parse_spec(in_applies_to("numel > 4"), "ok.yaml").routing.condition_text == "ndim >= 2 and numel > 4"
    assert parse_spec(in_applies_to_alone("ndim >= 2"), "ok.yaml").routing is not None


def refused_quickly(text: str) -> SpecError:
    start = time.perf_counter()
    with pytest.raises(SpecError) as info:
        parse_spec(text, "evil.yaml")
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS, f"took {elapsed:.2f} s"
    assert info.value.line is not None
    return info.value


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("name", PAYLOADS)
def test_injection_is_refused_and_runs_nothing(tmp_path, place, name):
    sentinel = tmp_path / "SENTINEL"
    text = PLACES[place](sentinel_payload(PAYLOADS[name], sentinel))
    err = refused_quickly(text)
    assert err.line >= 1
    assert not sentinel.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "statement",
    [
        "g = 1; import os",
        "import os",
        "g = 1\nimport os",
        "g = __import__('os').system('touch SENTINEL')",
        "exec('touch SENTINEL')",
        "del grad",
        "g: int = 1",
        "g = grad\nos.system('touch SENTINEL')",
        "def g(): pass",
        "class G: pass",
        "with open('SENTINEL', 'w') as f: pass",
        "for g in (1,): pass",
        "grad.data = 0",
        "g.__class__ = 1",
        "__builtins__ = 1",
        "__x = grad",
        "g[0] = 1",
        "g = yield",
        "global g",
        "assert open('SENTINEL', 'w')",
    ],
)
def test_statement_injection_is_refused(tmp_path, statement):
    sentinel = tmp_path / "SENTINEL"
    text = BASE.replace(G, "  - " + yaml_string(statement.replace("SENTINEL", str(sentinel))))
    refused_quickly(text)
    assert not sentinel.exists()


def test_dunder_target_is_refused_with_its_reason():
    err = refused_quickly(BASE.replace(G, "  - __g = grad"))
    assert "'__'" in err.message


def test_messages_name_what_is_not_allowed():
    assert "attribute access" in refused_quickly(in_update("param.data")).message
    assert "lambda" in refused_quickly(in_update("sqrt(lambda: 1)")).message
    assert "only library functions" in refused_quickly(in_update("(lambda: 1)()")).message
    assert "comprehension" in refused_quickly(in_update("[x for x in (1,)]")).message
    assert "f-string" in refused_quickly(in_update("f'{grad}'")).message
    assert "walrus" in refused_quickly(in_update("(x := 1)")).message
    assert "indexing" in refused_quickly(in_update("grad[0]")).message
    assert "unknown function '__import__'" in refused_quickly(in_update("__import__('os')")).message
    assert "'__'" in refused_quickly(in_update("__builtins__")).message
    assert "longer than" in refused_quickly(in_update(PAYLOADS["long-expression"])).message
    assert "out of range" in refused_quickly(in_update("2 ** 9999")).message
    assert "too large" in refused_quickly(in_update("1e400")).message


# -- YAML-level attacks ---------------------------------------------------------------------------

YAML_ATTACKS = {
    "object-apply-summary": 'summary: !!python/object/apply:os.system ["touch SENTINEL"]\n',
    "object-apply-update": 'update: !!python/object/apply:os.system ["touch SENTINEL"]\n',
    "object-apply-as-mapping": 'summary: !!python/object/apply:os.system {args: ["touch SENTINEL"]}\n',
    "object-new": 'summary: !!python/object/new:os.system ["touch SENTINEL"]\n',
    "name-tag": "summary: !!python/name:os.system\n",
    "module-tag": "summary: !!python/module:os\n",
    "local-tag-on-scalar": "summary: !python/object/apply:os.system 'touch SENTINEL'\n",
    "tag-on-key": '? !!python/object/apply:os.system ["touch SENTINEL"]\n: 1\n',
    "tag-on-scalar-key": "!!python/name:os.system : 1\n",
    "set": "summary: !!set {a: null}\n",
    "omap": "summary: !!omap [{a: 1}]\n",
}


@pytest.mark.parametrize("name", YAML_ATTACKS)
def test_yaml_python_tags_are_refused(tmp_path, name):
    sentinel = tmp_path / "SENTINEL"
    attack = YAML_ATTACKS[name].replace("SENTINEL", str(sentinel))
    if attack.startswith("update:"):
        text = BASE[: BASE.index("update:")] + attack
    else:
        text = BASE.replace("summary: an AdamW-like spec for the safety tests\n", attack)
    err = refused_quickly(text)
    assert err.line == (14 if attack.startswith("update:") else 4)  # the line of the tagged value (or key)
    assert not sentinel.exists()


def billion_laughs(levels: int = 9, width: int = 10) -> str:
    lines = ['a0: &a0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def test_billion_laughs_is_refused():
    err = refused_quickly(billion_laughs())
    assert "aliases" in err.message
    err = refused_quickly(BASE.replace("summary: an AdamW-like spec for the safety tests\n", billion_laughs()))
    assert "aliases" in err.message


def test_alias_into_update_is_refused():
    text = BASE.replace(G, "  - &s g = where(maximize, -grad, grad)\n  - *s")
    assert "aliases" in refused_quickly(text).message


def test_huge_and_deep_yaml_are_refused():
    assert "larger than" in refused_quickly(BASE + "#" * (300 * 1024) + "\n").message
    assert "deep" in refused_quickly("summary: " + "[" * 5000 + "]" * 5000 + "\n").message
    assert "deep" in refused_quickly("summary: " + "[" * 40 + "]" * 40 + "\n").message


def test_refused_payloads_leave_no_generated_state(tmp_path, monkeypatch):
    """A refused spec builds nothing: parse failures happen before any file is written."""
    monkeypatch.setenv("OPTGEN_CACHE_DIR", str(tmp_path / "cache"))
    from optgen.codegen.build import build

    spec = tmp_path / "evil.yaml"
    spec.write_text(in_update("__import__('os').system('touch " + str(tmp_path / "SENTINEL") + "')"))
    with pytest.raises(SpecError):
        build(spec, tmp_path / "out")
    assert not (tmp_path / "SENTINEL").exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
