"""torch backend: a plan → a readable Python module of plain tensor code."""

from __future__ import annotations

import sympy

from optgen.codegen.expr import Kind
from optgen.codegen.plan import Plan
from optgen.codegen.printer import TorchPrinter
from optgen.codegen.templates import render

_DTYPES = {"float32": "torch.float32", "bfloat16": "torch.bfloat16"}
_SHAPE = {
    Kind.ROWS: "param.shape[:-1] + (1,)",
    Kind.COLS: "param.shape[:-2] + (1,) + param.shape[-1:]",
    Kind.SCALAR: "()",
}


def emit_torch(plan: Plan, header: str) -> str:
    printer = TorchPrinter(plan.kinds)
    spec = plan.spec
    state_by_symbol = {sympy.Symbol(s.name): s for s in spec.state}

    quantized = {s.name for s in spec.state if s.store.quant}
    init_state = []
    for s in spec.state:
        dtype = _DTYPES[s.store.dtype]
        if s.kind is Kind.FULL:
            empty = f"torch.zeros_like(param, dtype={dtype}, memory_format=torch.preserve_format)"
        else:
            empty = f"param.new_zeros({_SHAPE[s.kind]}, dtype={dtype})"
        value = empty if s.init == 0 else f"{empty}.copy_({printer.doprint(s.init)})"
        if s.name in quantized:
            value = f'quantized_or_float({value}, SCHEMES["{s.saved_as}"], {spec.keep_full_precision})'
        init_state.append((s.saved_as, value))
    init_reads = set().union(*(s.init.free_symbols for s in spec.state)) if spec.state else set()
    init_lines = _unpack_lines(plan, {str(x) for x in init_reads}, include_all=False)
    if sympy.Symbol("param") in init_reads:
        init_lines.insert(0, "param = param.float()")

    def load(symbol: sympy.Symbol) -> str:
        if symbol in state_by_symbol:
            key = state_by_symbol[symbol].saved_as
            return f'load(state["{key}"])' if str(symbol) in quantized else f'state["{key}"].float()'
        if str(symbol) in ("param", "grad"):
            return f"{symbol}.float()"
        return str(symbol)

    def order(symbol: sympy.Symbol) -> tuple:
        name = str(symbol)
        return (("param", "grad").index(name) if name in ("param", "grad") else 2, symbol not in state_by_symbol, name)

    stages, calls = [], []
    for stage in plan.stages:
        if stage.op == "stats":  # torch materializes the new value; store() reduces its maxima
            continue
        body = [f"{let.symbol} = {printer.doprint(let.expr)}" for let in stage.lets]
        doc = [let.comment for let in stage.lets if let.comment and let.comment != "reduce"]
        stages.append(
            {
                "name": stage.name,
                "op": stage.op,
                "kind": str(stage.kind),
                "args": [str(s) for s in sorted(stage.inputs, key=order)],
                "doc": doc or [f"{let.symbol} = {printer.doprint(let.expr)}" for let in stage.lets],
                "body": body,
                "returns": [str(s) for s in stage.outputs],
            }
        )
        outputs = ", ".join(str(s) for s in stage.outputs)
        inputs = sorted(stage.inputs, key=order)
        args = ", ".join(load(s) for s in inputs)
        # A matrix stage needs whole matrices: on a sharded parameter on_whole gathers them.
        call = f"on_whole({stage.name}, {args})" if stage.op == "matrix" else f"{stage.name}({args})"
        calls.append(f"{outputs} = {call}")

    stores = []
    for name, symbol in plan.outputs.items():
        if name in quantized:
            stores.append(f'store(state["{next(s.saved_as for s in spec.state if s.name == name)}"], {symbol})')
            continue
        target = "param" if name == "param" else f'state["{next(s.saved_as for s in spec.state if s.name == name)}"]'
        stores.append(f"{target}.copy_({symbol})")

    reads = {str(s) for s in plan.host_symbols} | {str(s) for stage in plan.stages for s in stage.inputs}
    reads |= {str(s) for let in plan.host for s in let.expr.free_symbols}
    return render(
        "torch/kernels.py.j2",
        header=header,
        class_name=spec.class_name,
        init_lines=init_lines,
        init_state=init_state,
        state_dtypes=[(s.saved_as, _DTYPES[s.store.dtype]) for s in spec.state],
        schemes=[(s.saved_as, _scheme_literal(s.store.quant)) for s in spec.state if s.store.quant],
        matrix_ops=any(stage.op == "matrix" for stage in plan.stages),
        reductions=any(stage.op == "reduce" for stage in plan.stages),
        unpack_lines=_unpack_lines(plan, reads, include_all=False),
        host_lines=[
            f"{let.symbol} = {printer.doprint(let.expr)}" + (f"  # {let.comment}" if let.comment else "")
            for let in plan.host
        ],
        stage_calls=calls,
        store_lines=stores,
        stages=stages,
    )


def _unpack_lines(plan: Plan, reads: set[str], include_all: bool) -> list[str]:
    """``lr = hyper["lr"]`` / ``beta1, beta2 = hyper["betas"]`` for the hyperparameters used."""
    lines = []
    for h in plan.spec.hypers:
        if include_all or any(n in reads for n in h.names):
            target = ", ".join(h.names) if h.is_tuple else h.name
            lines.append(f'{target} = hyper["{h.name}"]')
    return lines


def _scheme_literal(scheme) -> str:
    return (
        f"QuantScheme(bits={scheme.bits}, signed={scheme.signed}, normalize={scheme.normalize!r}, "
        f"table={scheme.table!r}, block={scheme.block})"
    )
