"""Quantized ``store:`` in specs: invalid schemes are SpecErrors at the right line, presets work, and
the zero-point problem (a state with 0 in its table that the update divides by) is a SpecWarning.

Line numbers of BASE (the second moment's store is written out one key per line):

     1 optgen          11 state:                     21 keep_full_precision
     2 name            12   m: {..., store: {...}}   22 update:
     3 class           13   v:                       23   - g = ...
     4 summary         14     init: 0                24   - m = ...
     5 hyper           15     store:                 25   - v = ...
     6   lr            16       bits: 4              26   - param = ...
     7   betas         17       signed: false
     8   eps           18       normalize: rank1
     9   weight_decay  19       table: linear_nozero
    10   maximize      20     saved_as: exp_avg_sq
"""

from __future__ import annotations

import warnings

import pytest

from optgen.codegen.quant import PRESETS, QuantScheme
from optgen.codegen.source import SpecError, SpecWarning
from optgen.codegen.spec import load_spec, parse_spec

BASE = """\
optgen: 1
name: adamw4
class: AdamW4
summary: a 4-bit AdamW-like spec for the quantized-store error tests
hyper:
  lr: {default: 1.0e-3, in: "[0, inf)"}
  betas: {default: [0.9, 0.999], in: "[0, 1)"}
  eps: {default: 1.0e-8, in: "[0, inf)"}
  weight_decay: {default: 1.0e-2, in: "[0, inf)"}
  maximize: false
state:
  m: {init: 0, store: {bits: 4, signed: true, normalize: {block: 128}, table: dynamic_exponent}, saved_as: exp_avg}
  v:
    init: 0
    store:
      bits: 4
      signed: false
      normalize: rank1
      table: linear_nozero
    saved_as: exp_avg_sq
keep_full_precision: {numel_at_most: 4096}
update:
  - g = where(maximize, -grad, grad)
  - m = beta1 * m + (1 - beta1) * g
  - v = beta2 * v + (1 - beta2) * g**2
  - param = param * (1 - lr * weight_decay) - lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)
"""

LINE = {
    "m": 12,
    "v": 13,
    "store": 15,
    "bits": 16,
    "signed": 17,
    "normalize": 18,
    "table": 19,
    "keep_full_precision": 21,
}


def edit(old: str, new: str, text: str = BASE) -> str:
    assert text.count(old) == 1, f"{old!r} must occur exactly once"
    return text.replace(old, new)


def error(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(text, "bad.yaml")
    return info.value


def test_line_table_matches_base():
    lines = BASE.splitlines()
    for key, line in LINE.items():
        assert lines[line - 1].lstrip().startswith(key + ":"), (key, lines[line - 1])


def test_base_is_valid_and_quantized():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = parse_spec(BASE, "ok.yaml")
    stores = {s.name: s.store.quant for s in spec.state}
    assert stores["m"] == PRESETS["q4_block128_de"]
    assert stores["v"] == PRESETS["q4_rank1_linear_nozero"]
    assert spec.keep_full_precision == 4096


CASES = [
    # (old text, new text, expected line, message fragment)
    ("      bits: 4", "      bits: 3", "bits", "bits must be 4 or 8"),
    ("      bits: 4", "      bits: 16", "bits", "bits must be 4 or 8"),
    ("      bits: 4", "      bits: true", "bits", "bits must be 4 or 8"),
    ("      bits: 4", '      bits: "4"', "bits", "bits must be 4 or 8"),
    ("      bits: 4", "      bits: 4.0", "bits", "bits must be 4 or 8"),
    (
        "      signed: false\n      normalize: rank1\n      table: linear_nozero",
        "      signed: true\n      normalize: rank1\n      table: dynamic_exponent",
        "normalize",
        "rank-1 normalization needs a non-negative",
    ),
    ("      signed: false", "      signed: 1", "signed", "signed must be true or false"),
    ("      normalize: rank1", "      normalize: {block: 0}", "normalize", "block size must be a positive even"),
    ("      normalize: rank1", "      normalize: {block: 127}", "normalize", "block size must be a positive even"),
    ("      normalize: rank1", "      normalize: {block: -2}", "normalize", "block size must be a positive even"),
    ("      normalize: rank1", '      normalize: {block: "x"}', "normalize", "block size must be a positive even"),
    ("      normalize: rank1", "      normalize: {block: 1.5}", "normalize", "block size must be a positive even"),
    ("      normalize: rank1", "      normalize: rank2", "normalize", "unknown normalization 'rank2'"),
    ("      normalize: rank1", "      normalize: {blocks: 128}", "normalize", "unknown normalization"),
    ("      normalize: rank1", "      normalize: blockwise", "normalize", "unknown normalization"),
    ("      table: linear_nozero", "      table: nf4", "table", "unknown table 'nf4'"),
    ("      table: linear_nozero", "      table: dynamic", "table", "unknown table"),
    ("      table: linear_nozero", "      table: 4", "table", "unknown table"),
    ("      bits: 4\n", "", "store", "quantized store needs bits"),
    ("      table: linear_nozero\n", "", "store", "quantized store needs table"),
    ("      signed: false\n      normalize: rank1\n", "", "store", "quantized store needs signed, normalize"),
    ("      table: linear_nozero", "      table: linear_nozero\n      block: 128", 20, "unknown key 'block'"),
    ("      bits: 4", "      bits: 4\n      stochastic: true", 17, "unknown key 'stochastic'"),
    ("keep_full_precision: {numel_at_most: 4096}", "keep_full_precision: {numel_at_most: -1}", 21, "keep_full"),
    ("keep_full_precision: {numel_at_most: 4096}", "keep_full_precision: {numel_at_most: 1.5}", 21, "keep_full"),
    ("keep_full_precision: {numel_at_most: 4096}", "keep_full_precision: {numel_at_most: true}", 21, "keep_full"),
    ("keep_full_precision: {numel_at_most: 4096}", "keep_full_precision: {numel: 4096}", 21, "keep_full"),
    ("keep_full_precision: {numel_at_most: 4096}", "keep_full_precision: 4096", 21, "keep_full"),
    ("keep_full_precision: {numel_at_most: 4096}", "keep_full_precision: {numel_at_most: 1, x: 2}", 21, "keep_full"),
]


@pytest.mark.parametrize("old, new, line, message", CASES)
def test_invalid_quantized_store_is_refused_at_its_line(old, new, line, message):
    err = error(edit(old, new))
    expected = LINE[line] if isinstance(line, str) else line
    assert err.line == expected, f"{err} (expected line {expected})"
    assert message in err.message, str(err)
    assert str(err).startswith(f"bad.yaml:{expected}:")


def test_linear_nozero_signed_is_refused_at_the_table_line():
    text = edit("      signed: false\n      normalize: rank1", "      signed: true\n      normalize: {block: 128}")
    err = error(text)
    assert err.line == LINE["table"]
    assert "linear_nozero is an unsigned table" in err.message and "signed: false" in (err.hint or "")


def test_unknown_preset_name_lists_the_presets():
    text = edit(
        "    store:\n      bits: 4\n      signed: false\n      normalize: rank1\n      table: linear_nozero\n",
        "    store: q4_block128_nope\n",
    )
    err = error(text)
    assert err.line == LINE["store"]
    assert "unknown storage scheme 'q4_block128_nope'" in err.message
    for name in PRESETS:
        assert name in err.hint


def test_flow_style_store_errors_point_at_the_state_line():
    err = error(edit("table: dynamic_exponent}", "table: dynamic_exponent, bits2: 4}"))
    assert err.line == LINE["m"] and "unknown key 'bits2'" in err.message
    err = error(edit("{bits: 4, signed: true", "{bits: 5, signed: true"))
    assert err.line == LINE["m"] and "bits must be 4 or 8" in err.message


# -- presets -------------------------------------------------------------------------------------

V_BLOCK = "    store:\n      bits: 4\n      signed: false\n      normalize: rank1\n      table: linear_nozero\n"


@pytest.mark.parametrize(
    "m_store, v_store",
    [
        ("q4_block128_de", "q4_rank1_linear_nozero"),
        ("q4_block128_de", "q4_block128_linear_nozero"),
        ("q8_block256_de", "q8_block256_de_nozero"),
    ],
)
def test_named_presets_are_accepted(m_store, v_store):
    text = edit("store: {bits: 4, signed: true, normalize: {block: 128}, table: dynamic_exponent}", f"store: {m_store}")
    text = edit(V_BLOCK, f"    store: {v_store}\n", text)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = parse_spec(text, "presets.yaml")
    stores = {s.name: s.store for s in spec.state}
    assert stores["m"].quant == PRESETS[m_store] and stores["v"].quant == PRESETS[v_store]
    assert stores["v"].name == PRESETS[v_store].name


def test_builtin_quantized_specs_parse_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("adamw4bit", "adamw4bit_block", "adamw8bit", "sgdm4bit"):
            spec = load_spec(name)
            assert any(s.store.quant for s in spec.state)
    assert {s.name: s.store.quant for s in load_spec("adamw4bit").state}["v"] == QuantScheme(
        4, False, "rank1", "linear_nozero"
    )


# -- the zero-point warning -----------------------------------------------------------------------


def with_v_table(table: str, signed: bool = False, normalize: str = "{block: 128}", text: str = BASE) -> str:
    return edit(
        V_BLOCK,
        f"    store:\n      bits: 4\n      signed: {str(signed).lower()}\n      normalize: {normalize}\n"
        f"      table: {table}\n",
        text,
    )


def zero_point_warnings(text: str) -> list[warnings.WarningMessage]:
    with pytest.warns(SpecWarning) as record:
        parse_spec(text, "zero.yaml")
    return [w for w in record if issubclass(w.category, SpecWarning)]


@pytest.mark.parametrize("table, signed", [("linear", False), ("dynamic_exponent", False), ("dynamic_exponent", True)])
def test_divided_state_with_zero_in_its_table_warns(table, signed):
    found = zero_point_warnings(with_v_table(table, signed))
    assert len(found) == 1
    message = str(found[0].message)
    assert "state 'v'" in message and f"'{table}'" in message and "zero-point" in message
    assert found[0].filename == "zero.yaml" and found[0].lineno == LINE["v"]


def test_divided_through_a_temporary_warns():
    text = with_v_table("dynamic_exponent")
    text = edit("  - param = ", "  - d = sqrt(v) / sqrt(1 - beta2**step) + eps\n  - param = ", text)
    text = edit("m / (sqrt(v) / sqrt(1 - beta2**step) + eps)\n", "m / d\n", text)
    assert "  - d = sqrt(v)" in text and text.rstrip().endswith("* m / d")
    found = zero_point_warnings(text)
    assert len(found) == 1 and "state 'v'" in str(found[0].message)
    assert found[0].lineno == LINE["v"]


def test_divided_through_a_power_warns():
    text = with_v_table("linear")
    text = edit("m / (sqrt(v) / sqrt(1 - beta2**step) + eps)", "m * (v + eps)**-0.5", text)
    found = zero_point_warnings(text)
    assert len(found) == 1 and found[0].lineno == LINE["v"]


def test_both_states_divided_both_warn_at_their_lines():
    text = with_v_table("dynamic_exponent")
    text = edit("m / (sqrt(v)", "1 / m / (sqrt(v)", text)
    found = zero_point_warnings(text)
    assert sorted(w.lineno for w in found) == [LINE["m"], LINE["v"]]
    assert any("state 'm'" in str(w.message) for w in found)


@pytest.mark.parametrize(
    "table, signed, normalize",
    [
        ("linear_nozero", False, "rank1"),
        ("linear_nozero", False, "{block: 128}"),
        ("dynamic_exponent_nozero", False, "{block: 64}"),
        ("linear", True, "{block: 128}"),  # linspace(-1, 1, 16) has no exact zero
    ],
)
def test_zero_free_second_moment_and_multiplied_first_moment_do_not_warn(table, signed, normalize):
    # m uses dynamic_exponent (contains 0) but is only multiplied; v's table has no zero.
    text = with_v_table(table, signed=signed, normalize=normalize)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = parse_spec(text, "fine.yaml")
    assert {s.name: s.store.quant.has_zero for s in spec.state} == {"m": True, "v": False}


def test_float_state_that_is_divided_by_does_not_warn():
    text = edit(V_BLOCK, "    store: float32\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parse_spec(text, "float.yaml")
