"""triton backend: a plan → one fused Triton kernel per stage, behind a torch.library custom op.

A map stage becomes one kernel that reads each tensor once and writes it once: load param, grad
and state (dequantizing codes with the table in registers), run the stage's lines in float32,
requantize (block absmax in the tile, or the maxima a stats kernel reduced; nearest code by
midpoint compares) and store.  Stats stages (rank-1 / per-tensor stores) become kernels that
recompute the value and fold its maxima into fresh scales.  The kernels specialize per parameter
on each state's layout (float, block, rank-1, tensor) through constexpr arguments.

The emitter declines (returns None, and the runtime uses the torch kernels) plans it cannot run:
reduce or matrix stages, rows/cols/scalar values, block sizes that are not powers of two.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct

import sympy

from optgen.codegen import expr as E
from optgen.codegen.emit_torch import _scheme_literal
from optgen.codegen.expr import Kind
from optgen.codegen.plan import Plan, Stage
from optgen.codegen.printer import _PREC_ATOM, _PREC_POW, _PREC_UNARY, TextPrinter
from optgen.codegen.quant import QuantScheme, midpoints
from optgen.codegen.templates import render

# Names the generated kernels use themselves; a spec using one of them stays on the torch kernels.
_KERNEL_NAMES = {"tl", "triton", "torch", "lib", "rt", "offs", "mask", "start", "scale", "code", "BLOCK", "NDIM"}
_KERNEL_NAME = re.compile(r"^s[0-3]$|_ptr$|^[A-Z0-9_]+$")
_REGISTER_TABLE_BITS = 4  # tables up to 16 entries live in registers; 8-bit tables are gathered


def fp32(value: float) -> str:
    """A float32 constant as an exact Python literal (what torch's float32 tables hold)."""
    return repr(struct.unpack("f", struct.pack("f", value))[0])


class TritonPrinter(TextPrinter):
    """Triton language: float32 tensors, IEEE division and square root (as torch computes)."""

    def mul(self, e: sympy.Mul) -> tuple[str, int]:
        text, prec = super().mul(e)
        numer, denom = e.as_numer_denom()
        if denom == 1 or text.startswith("-"):
            return text, prec
        return f"tl.div_rn({self.as_float(numer)}, {self.as_float(denom)})", _PREC_ATOM

    def as_float(self, e: sympy.Basic) -> str:
        if e.is_Number:
            return f"{float(e)!r}"
        return self.p(e)[0]

    def pow(self, e: sympy.Pow) -> tuple[str, int]:
        base, exp = e.args
        if exp == sympy.Rational(1, 2):
            return f"tl.sqrt_rn({self.p(base)[0]})", _PREC_ATOM
        if exp.is_Integer and 1 < int(exp) <= 8:
            factor = self.wrap(base, _PREC_POW)
            return "(" + " * ".join([factor] * int(exp)) + ")", _PREC_ATOM  # torch's x**n: the power first
        if exp.is_Number and exp < 0:
            return f"tl.div_rn(1.0, {self.p(sympy.Pow(base, -exp))[0]})", _PREC_ATOM
        return f"tl.exp2(tl.log2({self.p(base)[0]}) * {self.as_float(exp)})", _PREC_ATOM

    def boolean(self, value: bool) -> str:
        return str(value)

    def logic(self, e: sympy.Basic) -> tuple[str, int]:
        joiner = " & " if isinstance(e, sympy.And) else " | "
        return joiner.join(f"({self.p(a)[0]})" for a in e.args), 0

    def negate(self, e: sympy.Basic) -> tuple[str, int]:
        return f"~({self.p(e)[0]})", _PREC_UNARY

    def call(self, e: sympy.Basic) -> tuple[str, int]:
        args = [self.p(a)[0] for a in e.args]
        if e.func == E.WHERE:
            return f"tl.where({args[0]}, {args[1]}, {args[2]})", _PREC_ATOM
        if e.func in (sympy.Min, sympy.Max):
            name = "tl.minimum" if e.func is sympy.Min else "tl.maximum"
            text = args[0]
            for other in args[1:]:
                text = f"{name}({text}, {other})"
            return text, _PREC_ATOM
        if e.func is sympy.Abs:
            return f"tl.abs({args[0]})", _PREC_ATOM
        if e.func is sympy.sign:  # NaN stays NaN, as torch.sign
            return f"tl.where({args[0]} > 0, 1.0, tl.where({args[0]} < 0, -1.0, {args[0]}))", _PREC_ATOM
        if e.func in (sympy.exp, sympy.log):
            return f"tl.{e.func.__name__}({args[0]})", _PREC_ATOM
        raise NotImplementedError(f"no Triton form for {e.func}")


def emit_triton(plan: Plan, header: str) -> str | None:
    spec = plan.spec
    if not _supported(plan):
        return None
    printer = TritonPrinter()
    try:
        for stage in plan.stages:
            for let in stage.lets:
                printer.doprint(let.expr)
    except NotImplementedError:
        return None
    states = [
        {
            "index": i,
            "name": s.name,
            "key": s.saved_as,
            "upper": s.saved_as.upper(),
            "scheme": s.store.quant,
            "bits": s.store.quant.bits if s.store.quant else 0,
            "literal": _scheme_literal(s.store.quant) if s.store.quant else "None",
        }
        for i, s in enumerate(spec.state)
    ]
    by_symbol = {sympy.Symbol(s["name"]): s for s in states}
    bools = _boolean_symbols(plan)
    host_order = sorted(
        {str(x) for stage in plan.stages for x in stage.inputs} - {"param", "grad"} - set(map(str, by_symbol))
    )
    output_of = {symbol: name for name, symbol in plan.outputs.items()}
    kernels = []
    for stage in plan.stages:
        kernels.append(_kernel(stage, printer, by_symbol, host_order, bools, output_of, states))
    quantizers = [_quantizer(s) for s in states if s["scheme"]]
    module = render(
        "triton/kernels.py.j2",
        header=header,
        class_name=spec.class_name,
        op_name="OP_NAME_PLACEHOLDER",
        states=states,
        quantizers=quantizers,
        kernels=kernels,
        host_names=host_order,
        unpack_lines=[
            f'{", ".join(h.names) if h.is_tuple else h.name} = hyper["{h.name}"]'
            for h in spec.hypers
            if any(n in host_order or n in _host_reads(plan) for n in h.names)
        ],
        host_lines=[_host_line(let) for let in plan.host],
        spec_sha256=spec.sha256,
    )
    digest = hashlib.sha256(module.encode()).hexdigest()[:12]
    return module.replace("OP_NAME_PLACEHOLDER", f"{spec.name}_{digest}")


def _supported(plan: Plan) -> bool:
    spec = plan.spec
    maps = [s for s in plan.stages if s.op == "map"]
    if len(maps) != 1 or any(s.op not in ("map", "stats") for s in plan.stages):
        return False  # reduce / matrix stages: the torch kernels run these plans
    if any(s.kind is not Kind.FULL for s in spec.state):
        return False
    for stage in plan.stages:
        for let in stage.lets:
            if let.kind is not Kind.FULL:
                return False
        for symbol in stage.inputs:
            if plan.kinds.get(symbol, Kind.HOST) not in (Kind.FULL, Kind.HOST):
                return False
    for s in spec.state:
        quant = s.store.quant
        if quant and quant.normalize == "block" and (quant.block < 2 or quant.block & (quant.block - 1)):
            return False  # a tile holds whole blocks and Triton tiles are powers of two
        if quant and quant.bits not in (4, 8):
            return False
    names = {str(x) for x in plan.kinds} | {s.name for s in spec.state} | {s.saved_as for s in spec.state}
    names |= {n for h in spec.hypers for n in h.names}
    return not any(n in _KERNEL_NAMES or _KERNEL_NAME.search(n) for n in names)


def _host_reads(plan: Plan) -> set[str]:
    return {str(s) for let in plan.host for s in let.expr.free_symbols}


def _host_line(let) -> str:
    from optgen.codegen.printer import TorchPrinter

    line = f"{let.symbol} = {TorchPrinter().doprint(let.expr)}"
    return line + (f"  # {let.comment}" if let.comment else "")


def _boolean_symbols(plan: Plan) -> set[str]:
    """Host values that are flags (loaded as ``!= 0`` from the float32 host vector)."""
    flags = {n for h in plan.spec.hypers if h.is_bool for n in h.names}
    for let in plan.host:
        if isinstance(let.expr, (sympy.core.relational.Relational, sympy.logic.boolalg.Boolean)):
            flags.add(str(let.symbol))
        elif isinstance(let.expr, sympy.Symbol) and str(let.expr) in flags:
            flags.add(str(let.symbol))
    return flags


def _kernel(stage: Stage, printer, by_symbol, host_order, bools, output_of, states) -> dict:
    loads = []

    def order(symbol: sympy.Symbol) -> tuple:  # host scalars, then param, grad and the state
        name = str(symbol)
        tensor = ("param", "grad").index(name) if name in ("param", "grad") else 2 if symbol in by_symbol else -1
        return (tensor, name)

    for symbol in sorted(stage.inputs, key=order):
        name = str(symbol)
        if name in ("param", "grad"):
            loads.append({"kind": "float", "name": name, "ptr": f"{name}_ptr"})
        elif symbol in by_symbol:
            loads.append({"kind": "state", "name": name, "state": by_symbol[symbol]})
        else:
            flag = " != 0" if name in bools else ""
            loads.append(
                {"kind": "host", "name": name, "line": f"{name} = tl.load(host_ptr + {host_order.index(name)}){flag}"}
            )
    lets = [f"{let.symbol} = {printer.doprint(let.expr)}" for let in stage.lets]
    stores, reduce = [], None
    if stage.op == "stats":
        symbol = stage.outputs[0]
        state = next(s for s in states if s["name"] == output_of[symbol])
        reduce = {"value": str(symbol), "state": state}
    else:
        for symbol in stage.outputs:
            name = output_of.get(symbol)
            if name == "param":
                stores.append({"kind": "float", "value": str(symbol), "ptr": "param_ptr"})
            elif name is not None:
                state = next(s for s in states if s["name"] == name)
                stores.append({"kind": "state", "value": str(symbol), "state": state})
    doc = [let.comment for let in stage.lets if let.comment] or lets
    if stage.op == "stats":
        doc = [f"{stage.note}: recomputed, folded into fresh scales, not stored"] + doc
    return {
        "name": stage.name,
        "op": stage.op,
        "loads": loads,
        "lets": lets,
        "stores": stores,
        "reduce": reduce,
        "doc": doc,
    }


def _quantizer(state: dict) -> dict:
    scheme: QuantScheme = state["scheme"]
    table = scheme.values
    mids = midpoints(table)
    in_registers = scheme.bits <= _REGISTER_TABLE_BITS
    dequant = []
    if in_registers:  # a select chain over the codes: the table lives in registers
        dequant.append(f"value = tl.full(code.shape, {fp32(table[0])}, tl.float32)")
        dequant += [f"value = tl.where(code == {i}, {fp32(v)}, value)" for i, v in enumerate(table) if i]
    quant = (
        [f"code = (x > {fp32(mids[0])}).to(tl.int32)"] + [f"code += (x > {fp32(m)}).to(tl.int32)" for m in mids[1:]]
        if in_registers
        else [f"code = lib.search_midpoints(x, mids_ptr, {len(mids)}, {scheme.bits})"]
    )
    return {
        "key": state["key"],
        "scheme": scheme.name,
        "in_registers": in_registers,
        "dequant": dequant,
        "quant": quant,
        "entries": len(table),
        "lcm": math.lcm(2, scheme.block or 2),
    }
