"""Fuzzing `optgen check`: whatever the input, the outcome is "ok" (exit 0) or a located SpecError (exit 2).

Inputs are the built-in specs mutated line by line (deleted, duplicated, swapped lines; inserted
characters, tokens and YAML values of the wrong type), plus random text and random token soup.  Any
other exception escaping ``optgen.cli.main`` fails the test.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optgen.cli import main
from optgen.codegen.spec import builtin_specs

BUILTIN_TEXTS = [path.read_text() for path in builtin_specs().values()]

TOKENS = [
    "**", "*", "(", ")", "[", "]", "{", "}", ",", "__", ":", ": ", "- ", "  ", "\t", "\n", "#", "'", '"', "|", ">",
    "&a ", "*a", "!!python/name:os.system ", "!!int ", "!!float ", "!!set ", "? ", "=", "+=", "**=", "==", "<", " < ",
    " and ", " or ", "not ", "lambda: ", "dim=", "dim=-1", "dim=-2", "dim=all", "dim=-3", "mean(", "sum(", "norm(",
    "max(", "min(", "where(", "sqrt(", "clamp(", "sign(", "grad", "param", "step", "ndim", "numel", "beta1", "lr",
    "m", "v", "_x", "x.y", "[0]", "1e400", "9" * 40, ".nan", ".inf", "-", "1/0", "0", "1", "-1", "2.5", ";",
    "kind: rows", "kind: cols", "kind: scalar", "store: bfloat16", "store: q4_block128_de", "saved_as: step",
    "applies_to: ndim >= 2", "otherwise: adam", "otherwise: sgd", "define:", "  a: lr * 2", "hyper:", "state:",
    "update:", "optgen: 1", "\u00e4", "\u03b2", "\x00", "\ufeff",
]  # fmt: skip
VALUES = [
    "[1]", "[]", "{}", "{a: 1}", "null", "~", "true", "false", "''", "[a, b]", "[[1]]", "x", "-1", "0", "1.5",
    "9" * 400, ".inf", "-.inf", ".nan", "1.0e+400", "!!binary aGk=", "2001-12-14", "!!str 1", "!!int x",
    "{default: {a: 1}}", "{default: [1, 2], names: [p, q]}", "{spec: [1]}", "{spec: adam, rename: [1]}",
    "{spec: adam, rename: {lr: 1}}", "{spec: adam, rename: {zz: lr}}", "rows", "cols", "scalar", "full",
    "bfloat16", "q8_block256_de", "{bits: 4}", "{bits: 8, signed: true, normalize: {block: 3}, table: linear}",
    "{bits: 4, signed: false, normalize: rank1, table: linear_nozero}",
    "{bits: [4], signed: 1, normalize: [], table: {}}",
    '"mean(param, dim=-1)"', '"ndim >= 2"', '"(("', '"\\x00"', "'a'", "|\n  x", "&a 1", "*a",
]  # fmt: skip
IDENTIFIERS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True)


@st.composite
def mutated_builtin(draw) -> str:
    lines = draw(st.sampled_from(BUILTIN_TEXTS)).splitlines()
    for _ in range(draw(st.integers(1, 5))):
        if not lines:
            lines = [""]
        i = draw(st.integers(0, len(lines) - 1))
        j = draw(st.integers(0, len(lines) - 1))
        line = lines[i]
        k = draw(st.integers(0, len(line)))
        op = draw(st.sampled_from(["delete", "duplicate", "swap", "char", "token", "ident", "cut", "value", "append"]))
        if op == "delete":
            del lines[i]
        elif op == "duplicate":
            lines.insert(j, line)
        elif op == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "char":
            lines[i] = line[:k] + draw(st.text(min_size=1, max_size=3)) + line[k:]
        elif op == "token":
            lines[i] = line[:k] + draw(st.sampled_from(TOKENS)) + line[k:]
        elif op == "ident":
            lines[i] = line[:k] + draw(IDENTIFIERS) + line[k:]
        elif op == "cut":
            lines[i] = line[:k] + line[k + draw(st.integers(1, 8)) :]
        elif op == "value":  # a value of another type after one of the line's `key: `
            spots = [m.end() for m in re.finditer(r":\s", line)]
            if spots:
                at = draw(st.sampled_from(spots))
                rest = line[at:]
                end = re.match(r"[^,}]*", rest).end()
                lines[i] = line[:at] + draw(st.sampled_from(VALUES)) + rest[end:]
        else:  # append a whole line
            lines.append(draw(st.sampled_from(TOKENS + VALUES)))
    return "\n".join(lines) + draw(st.sampled_from(["\n", "", "\n\n", "\r\n"]))


token_soup = st.lists(st.sampled_from(TOKENS + VALUES) | IDENTIFIERS, max_size=40).map("".join)
random_text = st.text(max_size=400)


def check(text: str) -> tuple[int, str]:
    """`optgen check FILE` on ``text``: (exit code, stderr)."""
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "fuzz.yaml")
        with open(path, "w", encoding="utf-8", errors="surrogatepass", newline="") as f:
            f.write(text)
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(["check", path])
    return code, err.getvalue()


def assert_clean_outcome(text: str) -> None:
    code, stderr = check(text)
    assert code in (0, 2), (code, text)
    if code == 2:
        assert stderr.startswith("optgen: error: "), stderr
        assert re.search(r"fuzz\.yaml:\d+:\d+: ", stderr), stderr  # every error names file:line:column
        assert "Traceback" not in stderr
    else:
        assert stderr == ""


FUZZ = settings(
    deadline=None,
    max_examples=200,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@FUZZ
@given(mutated_builtin())
def test_check_on_mutated_builtin_specs(text):
    assert_clean_outcome(text)


@settings(FUZZ, max_examples=100)
@given(random_text)
def test_check_on_random_text(text):
    assert_clean_outcome(text)


@settings(FUZZ, max_examples=100)
@given(token_soup)
def test_check_on_token_soup(text):
    assert_clean_outcome(text)


def test_unmutated_builtins_pass_and_a_broken_one_fails():
    """The harness can tell the outcomes apart."""
    for text in BUILTIN_TEXTS:
        assert check(text) == (0, "")
    code, stderr = check(BUILTIN_TEXTS[0].replace("sqrt(", "sqrtt("))
    assert code == 2 and "unknown function 'sqrtt'" in stderr


# Crashes the fuzzer found (each escaped as a non-SpecError exception before the fix).
REGRESSIONS = [
    "optgen: 1\nname: x\nclass: X\nhyper:\n  lr: {default: 1.0e-4, !!in: '[0, inf)'}\nupdate:\n  - param = param\n",
    "optgen: 1\nname: x\nclass: X\nhyper:\n  lr: !!int 1 c = 2\nupdate:\n  - param = param\n",
    "optgen: 1\nname: x\nclass: X\nhyper:\n  lr: !!float x\nupdate:\n  - param = param\n",
    "optgen: 1\nname: x\nclass: X\nhyper:\n  lr: " + "9" * 400 + "\nupdate:\n  - param = param\n",
    "optgen: 1\nname: x\nclass: X\nhyper: {lr: 1}\nstate:\n  m: {init: .inf}\nupdate:\n  - m = m\n  - param = param\n",
    "optgen: 1\nname: x\nclass: X\nhyper: {lr: 1}\nstate:\n  m: {init: " + "9" * 400 + "}\nupdate:\n  - param = m\n",
    "optgen: 1\nname: x\nclass: X\nhyper: {lr: 1}\nstate:\n  m: {kind: [1]}\nupdate:\n  - param = param\n",
    "optgen: 1\nname: x\nclass: X\nhyper: {lr: 1}\nstate:\n  m: {kind: {a: 1}}\nupdate:\n  - param = param\n",
    "optgen: 1\nname: x\nclass: X\nhyper: {lr: 1}\nupdate: !!python/object/apply:os.system ['param = param']\n",
    "!!int ",
    "!!float ",
    "optgen: !!int\n",
]


def test_fuzzer_regressions():
    for text in REGRESSIONS:
        code, stderr = check(text)
        assert code == 2, text
        assert re.search(r"fuzz\.yaml:\d+:\d+: ", stderr), stderr
