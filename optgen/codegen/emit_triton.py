"""triton backend: a plan → fused Triton kernels, behind one torch.library custom op per spec.

A map stage becomes one kernel that reads each tensor once and writes it once: load param, grad
and state (dequantizing codes with the table in registers), run the stage's lines in float32,
requantize (block absmax in the tile, or the maxima a stats kernel reduced; nearest code by
midpoint compares) and store.  Stats stages (rank-1 / per-tensor stores) become kernels that
recompute the value and fold its maxima into fresh scales.  The kernels specialize per parameter
on each state's layout (float, block, rank-1, tensor) through constexpr arguments.

Reduce stages become reduction kernels over the parameter viewed as (batch, rows, cols): along
rows (-1) and along columns (-2) each program owns whole output entries and loops over the reduced
dim; ``all`` writes one partial per program, combined by the runtime.  Element-wise work is fused
into them (``schedule``): a value a reduction reads is recomputed from its inputs in the reduction
kernel rather than written to memory.  Values that must cross launches (rows/cols statistics, a
matrix stage's result) live in float32 scratch tensors the op allocates.  Matrix stages are torch
functions (``optgen.runtime.matrix``: standardize, Newton–Schulz on torch.matmul) called inside the
same custom op, so a step is still one opaque op to torch.compile.

The emitter declines (returns None, and the runtime uses the torch kernels) what it cannot run:
quantized rows/cols state, block sizes that are not powers of two, matrix stages on quantized state,
names that clash with the kernels' own, and plans that read a state after overwriting it.
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from dataclasses import dataclass, field

import sympy

from optgen.codegen import expr as E
from optgen.codegen.emit_torch import _scheme_literal
from optgen.codegen.expr import Kind
from optgen.codegen.plan import Let, Plan, free_symbols, needed_lets
from optgen.codegen.printer import _PREC_ATOM, _PREC_POW, _PREC_UNARY, TextPrinter, TorchPrinter
from optgen.codegen.quant import QuantScheme, midpoints
from optgen.codegen.templates import render

# Names the generated kernels use themselves; a spec using one of them stays on the torch kernels.
_KERNEL_NAMES = {"tl", "triton", "torch", "lib", "rt", "offs", "mask", "start", "scale", "code", "env", "standardize"}
_KERNEL_NAMES |= {"whiten", "at_rows", "at_cols", "row_ids", "col_ids", "acc", "total", "partial", "first", "batch"}
_KERNEL_NAMES |= {"extent", "numel", "stripes"}
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


@dataclass
class _Step:
    """One launch of the generated module: a kernel, or (matrix) a torch function of the step."""

    op: str  # "map" | "stats" | "reduce" | "matrix"
    name: str
    lets: list[Let]
    domain: Kind  # the elements the kernel walks: full, rows, cols or scalar
    inputs: list[sympy.Symbol] = field(default_factory=list)
    outputs: list[sympy.Symbol] = field(default_factory=list)
    note: str = ""


def emit_triton(plan: Plan, header: str) -> str | None:
    spec = plan.spec
    if not _supported(plan):
        return None
    steps = schedule(plan)
    if steps is None:
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
            "kind": s.kind,
        }
        for i, s in enumerate(spec.state)
    ]
    by_symbol = {sympy.Symbol(s["name"]): s for s in states}
    buffers = _buffers(steps, plan)
    pointers = {f"{b}_ptr" for b in buffers}
    taken = {f"{s['key']}_{part}ptr" for s in states for part in ("", "scales_", "new_scales_", "table_", "mids_")}
    if pointers & (taken | {"param_ptr", "grad_ptr", "host_ptr", "partials_ptr"}):
        return None  # a scratch buffer's pointer would shadow a state's
    bools = _boolean_symbols(plan)
    tensors = {"param", "grad"} | {str(s) for s in by_symbol} | set(buffers)
    host_order = sorted({str(x) for step in steps for x in step.inputs} - tensors)
    output_of = {symbol: name for name, symbol in plan.outputs.items()}
    context = _Context(plan, by_symbol, buffers, host_order, bools, output_of, states)
    try:
        kernels = [_kernel(step, context) for step in steps if step.op != "matrix"]
        matrices = [_matrix(step, context) for step in steps if step.op == "matrix"]
    except NotImplementedError:
        return None
    quantizers = [_quantizer(s) for s in states if s["scheme"]]
    module = render(
        "triton/kernels.py.j2",
        header=header,
        class_name=spec.class_name,
        op_name="OP_NAME_PLACEHOLDER",
        states=states,
        buffers=[(name, str(kind)) for name, kind in buffers.items()],
        quantizers=quantizers,
        kernels=kernels,
        matrices=matrices,
        stages=[_stage_entry(step, context) for step in steps],
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
    for s in spec.state:
        quant = s.store.quant
        if quant and s.kind is not Kind.FULL:
            return False
        if quant and quant.normalize == "block" and (quant.block < 2 or quant.block & (quant.block - 1)):
            return False  # a tile holds whole blocks and Triton tiles are powers of two
        if quant and quant.bits not in (4, 8):
            return False
    if any(let.kind is Kind.HOST for stage in plan.stages for let in stage.lets):
        return False  # host values live in the host vector, not in kernels
    names = {str(x) for x in plan.kinds} | {s.name for s in spec.state} | {s.saved_as for s in spec.state}
    names |= {n for h in spec.hypers for n in h.names}
    return not any(n in _KERNEL_NAMES or _KERNEL_NAME.search(n) for n in names)


# -- scheduling: plan stages -> launches ---------------------------------------------------------
def schedule(plan: Plan, max_recomputed: int | None = None) -> list[_Step] | None:
    """The plan's stages as launches: map stages split by kind (a rows value is computed once per
    row, not once per element), element-wise work recomputed where its consumers read it instead
    of going through memory (at most ``max_recomputed`` element-wise lines per value, when given),
    and every stage's inputs and outputs wired.  None if a stage would read a state after a
    previous launch overwrote it."""
    steps: list[_Step] = []
    for stage in plan.stages:
        if stage.op == "map":
            parts: dict[Kind, list[Let]] = {}
            for let in stage.lets:
                parts.setdefault(let.kind, []).append(let)
            for kind, lets in sorted(parts.items()):
                name = stage.name if len(parts) == 1 else f"{stage.name}_{kind}"
                steps.append(_Step("map", name, lets, kind))
        elif stage.op == "reduce":
            operand = stage.lets[0].expr.args[0]
            steps.append(_Step("reduce", stage.name, list(stage.lets), E.kind_of(operand, plan.kinds)))
        else:
            # matrix, or stats: its output is the quantized value whose maxima it reduces
            steps.append(
                _Step(stage.op, stage.name, list(stage.lets), Kind.FULL, outputs=stage.outputs, note=stage.note)
            )
    steps = _pair_reductions(_recompute(steps, plan, max_recomputed), plan)
    _wire(steps, plan)
    owner = _owners(steps, plan)
    for j, step in enumerate(steps):
        for symbol in step.inputs:
            if symbol in owner and owner[symbol] < j:
                return None  # the old value is gone by then
    return steps


def _owners(steps: list[_Step], plan: Plan) -> dict[sympy.Symbol, int]:
    """Old-value symbol (``param``, a state's name) -> the launch that overwrites its storage."""
    owner = {}
    for name, symbol in plan.outputs.items():
        for index, step in enumerate(steps):
            if step.op != "stats" and any(let.symbol == symbol for let in step.lets):
                owner[sympy.Symbol(name)] = index
    return owner


def _defines(step: _Step) -> set[sympy.Symbol]:
    return {let.symbol for let in step.lets}


def _reads(step: _Step) -> set[sympy.Symbol]:
    return free_symbols(step.lets) - _defines(step)


def _full_reads(symbols: set[sympy.Symbol], plan: Plan) -> set[sympy.Symbol]:
    return {s for s in symbols if plan.kinds.get(s) is Kind.FULL or str(s) in ("param", "grad")}


def _recompute(steps: list[_Step], plan: Plan, max_recomputed: int | None) -> list[_Step]:
    """Element-wise fusion across reductions (issue 6, item 2, for this backend).

    A full-size value computed by a map launch and read by later launches is not written to memory
    when that can be avoided:
    - a final value (a state's or the parameter's new value) moves, with the lines it needs, into
      the first later map launch that reads it (Factor's m update moves into the parameter update);
    - any other value is recomputed by each later map or reduce launch that reads it (the row and
      column means of g² read g; SinkGD's rounds each read grad and the row/column norms), when that
      reads at most one full-size tensor the launch does not read already: no more traffic than
      reading the value back, and its write is saved; and, with ``max_recomputed``, when that takes
      at most so many element-wise lines (a CPU computes SinkGD's tenth round faster from the fifth,
      read back, than from grad).  Smaller values are only renamed this way
      (``c = r0``): computing them once per row, column or tensor is cheaper than per element.
    The moved lines are the plan's own, so the arithmetic is the same as the torch kernels'."""
    final = set(plan.outputs.values())
    quantized_elsewhere = {  # stats launches recompute these right before their map launch: keep them there
        plan.outputs[s.name] for s in plan.spec.state if s.store.quant and s.store.quant.normalize != "block"
    }
    changed = True
    while changed:
        changed = False
        for i, step in enumerate(steps):
            if step.op != "map":
                continue
            for let in reversed(step.lets):
                symbol = let.symbol
                consumers = [j for j in range(i + 1, len(steps)) if symbol in _reads(steps[j])]
                if not consumers:
                    continue
                closure = needed_lets(step.lets, symbol)
                inputs = free_symbols(closure) - {x.symbol for x in closure}
                if any(x.symbol in final for x in closure[:-1]):
                    continue  # it needs another stored value: a copy would store that twice
                if step.domain is not Kind.FULL and not all(isinstance(x.expr, sympy.Symbol) for x in closure):
                    continue  # a rows/cols/scalar value is computed once, except plain renames (c = r0)
                if symbol in final:
                    j = consumers[0]
                    read_here = any(symbol in other.expr.free_symbols for other in step.lets)
                    if read_here or symbol in quantized_elsewhere or steps[j].op != "map":
                        continue
                    if steps[j].domain is not Kind.FULL or not _valid_at(inputs, j, steps, plan, moving=let):
                        continue
                    _prepend(steps[j], closure)
                    step.lets = [x for x in step.lets if x.symbol != symbol]
                else:
                    if any(steps[j].op not in ("map", "stats", "reduce") for j in consumers):
                        continue
                    if (
                        max_recomputed is not None
                        and sum(not isinstance(x.expr, sympy.Symbol) for x in closure) > max_recomputed
                    ):
                        continue
                    if any(len(_full_reads(inputs, plan) - _full_reads(_reads(steps[j]), plan)) > 1 for j in consumers):
                        continue
                    if not all(_valid_at(inputs, j, steps, plan) for j in consumers):
                        continue
                    for j in consumers:
                        _prepend(steps[j], closure)
                _prune(steps, i, final)
                changed = True
                break
            if changed:
                steps = [s for s in steps if s.lets]
                break
    return steps


def _reductions(step: _Step) -> list[Let]:
    return [let for let in step.lets if let.comment == "reduce"]


def _reduce_dim(step: _Step) -> int | None:
    """The dim of a launch that runs one reduction over a full value (None otherwise)."""
    lets = _reductions(step)
    if step.op != "reduce" or step.domain is not Kind.FULL or len(lets) != 1:
        return None
    return int(lets[0].expr.args[1])


def _pair_reductions(steps: list[_Step], plan: Plan) -> list[_Step]:
    """A reduction along rows and one along columns of the same full-size values share one pass
    (Factor's row and column means of g²): the later one moves up when nothing between them
    produces what it reads.  The fused kernel keeps per-stripe column partials."""
    i = 0
    while i < len(steps):
        dim = _reduce_dim(steps[i])
        if dim in (-1, -2):
            for k in range(i + 1, len(steps)):
                produced = set().union(*(_defines(s) for s in steps[i:k]))
                if _reduce_dim(steps[k]) == -3 - dim and not (_reads(steps[k]) & produced):
                    rows, cols = (steps[i], steps[k]) if dim == -1 else (steps[k], steps[i])
                    body = [let for let in rows.lets + cols.lets if let.comment != "reduce"]
                    merged = list({let.symbol: let for let in body}.values())  # shared lines once
                    lets = merged + _reductions(rows) + _reductions(cols)
                    steps[i] = _Step("reduce", f"{rows.name}_{cols.name}", lets, Kind.FULL)
                    del steps[k]
                    break
        i += 1
    return steps


def _valid_at(inputs: set, j: int, steps: list[_Step], plan: Plan, moving: Let | None = None) -> bool:
    """Whether the old values ``inputs`` reads are still in memory when launch ``j`` runs."""
    owner = _owners(steps, plan)
    for symbol in inputs:
        if symbol in owner and owner[symbol] < j:
            if moving is None or plan.outputs.get(str(symbol)) != moving.symbol:
                return False
    return True


def _prepend(step: _Step, lets: list[Let]) -> None:
    have = _defines(step)
    step.lets = [let for let in lets if let.symbol not in have] + step.lets


def _prune(steps: list[_Step], i: int, final: set) -> None:
    """Drop lines of launch ``i`` that nothing needs any more."""
    later = set().union(*(_reads(s) for s in steps[i + 1 :]))
    wanted = final | later
    kept = []
    for let in reversed(steps[i].lets):
        if let.symbol in wanted:
            kept.append(let)
            wanted |= let.expr.free_symbols
    steps[i].lets = kept[::-1]


def _wire(steps: list[_Step], plan: Plan) -> None:
    final = set(plan.outputs.values())
    for i, step in enumerate(steps):
        later = set().union(*(_reads(s) for s in steps[i + 1 :]))
        step.inputs = sorted(_reads(step), key=str)
        if step.op == "reduce":
            step.outputs = [let.symbol for let in _reductions(step)]
        elif step.op != "stats":
            step.outputs = [let.symbol for let in step.lets if let.symbol in final or let.symbol in later]


def _buffers(steps: list[_Step], plan: Plan) -> dict[str, Kind]:
    """Values that cross launches: float32 scratch tensors, one per value, of its kind's shape."""
    buffers = {}
    for i, step in enumerate(steps):
        if step.op == "stats":
            continue
        later = set().union(*(_reads(s) for s in steps[i + 1 :]))
        for symbol in step.outputs:
            if symbol in later:
                buffers[str(symbol)] = plan.kinds[symbol]
    return buffers


# -- code ------------------------------------------------------------------------------------------
@dataclass
class _Context:
    plan: Plan
    by_symbol: dict
    buffers: dict[str, Kind]
    host_order: list[str]
    bools: set[str]
    output_of: dict
    states: list[dict]


_EXTENT = {Kind.FULL: "numel", Kind.ROWS: "numel // C", Kind.COLS: "numel // R", Kind.SCALAR: "1"}
_INDEX = {Kind.ROWS: "at_rows", Kind.COLS: "at_cols"}  # a full launch's index into rows / cols values
_TILE = "[BLOCK_M, BLOCK_N]"
_INDEX_FORMULA = {  # by how the launch walks; the 2-D tiles index from their coordinates
    "all": {Kind.ROWS: "offs // C", Kind.COLS: "offs // (R * C) * C + offs % C"},
    "rows": {
        Kind.ROWS: f"tl.broadcast_to(row_ids[:, None], {_TILE})",
        Kind.COLS: f"tl.broadcast_to(row_ids[:, None] // R * C, {_TILE}) + col_ids[None, :]",
    },
    "stripes": {
        Kind.ROWS: f"tl.broadcast_to(batch * R + row_ids[:, None], {_TILE})",
        Kind.COLS: f"tl.broadcast_to(batch * C + col_ids[None, :], {_TILE})",
    },
}


_FORM_DIM = {"all": E.DIM_ALL, "rows": -1, "stripes": -2}  # KernelStage.dim of each form


def _form(step: _Step) -> str:
    """How a launch walks its elements: ``all`` (flat: maps, reductions over all), ``rows`` (a
    program owns whole rows), ``stripes`` (a program owns a stripe of rows of one matrix and writes
    partial column results: reductions along columns, alone or fused with one along rows)."""
    dims = {int(let.expr.args[1]) for let in _reductions(step)}
    return "stripes" if -2 in dims else "rows" if -1 in dims else "all"


_NEUTRAL = {"mean": "0.0", "sum": "0.0", "norm": "0.0", "amax": 'float("-inf")', "amin": 'float("inf")'}
_COMBINE = {"mean": "add", "sum": "add", "norm": "add", "amax": "maximum", "amin": "minimum"}


def _index(kind: Kind, domain: Kind) -> str:
    return "offs" if kind is domain else _INDEX[kind]


def _loads(step: _Step, ctx: _Context) -> tuple[list[str], list[str], list[str]]:
    """(host-value lines, index lines, tensor-load lines) for the step's inputs."""
    host_lines, index_lines, lines = [], [], []

    def order(symbol: sympy.Symbol) -> tuple:  # host scalars, then param, grad, the state, scratch values
        name = str(symbol)
        tensor = ("param", "grad").index(name) if name in ("param", "grad") else 2 if symbol in ctx.by_symbol else 3
        return (tensor if name in ctx.buffers or name in ("param", "grad") or symbol in ctx.by_symbol else -1, name)

    needed: set[Kind] = set()
    for symbol in sorted(step.inputs, key=order):
        name = str(symbol)
        if name in ("param", "grad"):
            lines.append(f"{name} = lib.load_float({name}_ptr, offs, mask)")
        elif symbol in ctx.by_symbol:
            state = ctx.by_symbol[symbol]
            if state["scheme"]:
                key, upper = state["key"], state["upper"]
                lines += [
                    f"if {upper}_LAYOUT == lib.FLOAT:",
                    f"    {name} = lib.load_float({key}_ptr, offs, mask)",
                    "else:",
                    f"    code = lib.load_codes({key}_ptr, offs, mask, {state['bits']})",
                    f"    scale = lib.element_scale({key}_scales_ptr, offs, mask, {upper}_LAYOUT, {upper}_QBLOCK,"
                    " s0, s1, s2, s3, NDIM)",
                    f"    {name} = dequantize_{key}(code, {key}_table_ptr) * scale",
                ]
            else:
                lines.append(_tensor_load(name, f"{state['key']}_ptr", state["kind"], step.domain, needed))
        elif name in ctx.buffers:
            lines.append(_tensor_load(name, f"{name}_ptr", ctx.buffers[name], step.domain, needed))
        else:
            flag = " != 0" if name in ctx.bools else ""
            host_lines.append(f"{name} = tl.load(host_ptr + {ctx.host_order.index(name)}){flag}")
    form = _form(step)
    for kind in (Kind.ROWS, Kind.COLS):
        if kind in needed:
            index_lines.append(f"{_INDEX[kind]} = {_INDEX_FORMULA[form][kind]}")
    return host_lines, index_lines, lines


def _tensor_load(name: str, pointer: str, kind: Kind, domain: Kind, needed: set) -> str:
    if kind is Kind.SCALAR:
        return f"{name} = tl.load({pointer}).to(tl.float32)"
    if kind is not domain:
        needed.add(kind)
    return f"{name} = lib.load_float({pointer}, {_index(kind, domain)}, mask)"


def _kernel(step: _Step, ctx: _Context) -> dict:
    printer = TritonPrinter()
    host_lines, index_lines, loads = _loads(step, ctx)
    body = [let for let in step.lets if let.comment != "reduce"] if step.op == "reduce" else step.lets
    lets = [f"{let.symbol} = {printer.doprint(let.expr)}" for let in body]
    stores, reduce, reduction = [], None, None
    if step.op == "stats":
        symbol = step.outputs[0]
        state = next(s for s in ctx.states if s["name"] == ctx.output_of[symbol])
        reduce = {"value": str(symbol), "state": state}
    elif step.op == "reduce":
        by_dim = {int(let.expr.args[1]): _reduction(let, printer, step.domain) for let in _reductions(step)}
        rows, cols, everything = by_dim.get(-1), by_dim.get(-2), by_dim.get(E.DIM_ALL)
        title = "along rows and along columns, in one pass" if rows and cols else "along rows" if rows else ""
        reduction = {
            "form": _form(step),
            "rows": rows,
            "cols": cols,
            "all": everything,
            "title": title or ("along columns" if cols else f"of all {step.domain} entries"),
        }
    else:
        for symbol in step.outputs:
            if ctx.plan.kinds[symbol] is not step.domain:
                raise NotImplementedError("a launch stores only values of its own kind")
            value = str(symbol)
            if E.kind_of(next(x.expr for x in step.lets if x.symbol == symbol), ctx.plan.kinds) < step.domain:
                value = f"tl.where(mask, {value}, 0.0)"  # a smaller value stored broadcast
            name = ctx.output_of.get(symbol)
            if name == "param":
                stores.append({"kind": "float", "value": value, "ptr": "param_ptr"})
            elif name is not None:
                state = next(s for s in ctx.states if s["name"] == name)
                stores.append({"kind": "state", "value": value, "state": state})
            if str(symbol) in ctx.buffers:
                stores.append({"kind": "float", "value": value, "ptr": f"{symbol}_ptr"})
    text = TextPrinter()
    spec_lines = [let.comment for let in body if let.comment and let.comment != "reduce"]
    doc = spec_lines or [f"{let.symbol} = {text.doprint(let.expr)}" for let in body]
    if step.op == "reduce":
        doc += [f"{let.symbol} = {text.doprint(let.expr)}" for let in _reductions(step)]
    if step.op == "stats":
        doc = [f"{step.note}: recomputed, folded into fresh scales, not stored"] + doc
    return {
        "name": step.name,
        "op": step.op,
        "domain": str(step.domain),
        "extent": _EXTENT[step.domain],
        "host_loads": host_lines,
        "index_lines": index_lines,
        "loads": loads,
        "lets": lets,
        "stores": stores,
        "reduce": reduce,
        "reduction": reduction,
        "doc": doc,
    }


def _reduction(let: Let, printer: TritonPrinter, domain: Kind) -> dict:
    call = let.expr
    how, value, dim = str(call.func), printer.doprint(call.args[0]), int(call.args[1])
    count = {-1: "C", -2: "R"}.get(dim, _EXTENT[domain])
    return {
        "dim": dim,
        "value": f"({value}) * ({value})" if how == "norm" else value,
        "neutral": _NEUTRAL[how],
        "combine": _COMBINE[how],
        "finish": {"mean": f"total = tl.div_rn(total, ({count}) * 1.0)", "norm": "total = tl.sqrt_rn(total)"}.get(
            how, ""
        ),
        "out": str(let.symbol),
    }


def _matrix(step: _Step, ctx: _Context) -> dict:
    """A matrix launch: a torch function (optgen.runtime.matrix, torch.matmul) called inside the op."""
    printer = TorchPrinter()
    lines = []
    for symbol in step.inputs:
        name = str(symbol)
        if name in ("param", "grad"):
            lines.append(f"{name} = env.{name}()")
        elif symbol in ctx.by_symbol:
            if ctx.by_symbol[symbol]["scheme"]:
                raise NotImplementedError("a matrix stage reading quantized state")
            lines.append(f"{name} = env.state({ctx.by_symbol[symbol]['index']})")
        elif name in ctx.buffers:
            lines.append(f'{name} = env.buffer("{name}")')
        else:
            lines.append(f"{name} = env.host({ctx.host_order.index(name)})")
    lines += [f"{let.symbol} = {printer.doprint(let.expr)}" for let in step.lets]
    for symbol in step.outputs:
        name = ctx.output_of.get(symbol)
        if name == "param":
            lines.append(f"env.set_param({symbol})")
        elif name is not None:
            state = next(s for s in ctx.states if s["name"] == name)
            if state["scheme"]:
                raise NotImplementedError("a matrix stage writing quantized state")
            lines.append(f"env.set_state({state['index']}, {symbol})")
        if str(symbol) in ctx.buffers:
            lines.append(f'env.set_buffer("{symbol}", {symbol})')
    doc = [f"{let.symbol} = {TextPrinter().doprint(let.expr)}" for let in step.lets]
    return {"name": step.name, "lines": lines, "doc": doc}


def _stage_entry(step: _Step, ctx: _Context) -> str:
    """The ``rt.KernelStage(...)`` line the runtime launches."""
    function = step.name if step.op == "matrix" else f"{step.name}_kernel"
    extra = [f'domain="{step.domain}"']
    if step.op == "stats":
        symbol = step.outputs[0]
        extra.append(f"reduces={next(s['index'] for s in ctx.states if s['name'] == ctx.output_of[symbol])}")
    if step.op == "reduce":
        extra.append(f"dim={_FORM_DIM[_form(step)]}")
        for let in _reductions(step):  # finished by the runtime from partials: all, and along columns
            dim = int(let.expr.args[1])
            if dim != -1:
                key = "combine" if dim == E.DIM_ALL else "columns"
                extra += [f'{key}="{let.expr.func}"', f"output={list(ctx.buffers).index(str(let.symbol))}"]
    return f'rt.KernelStage("{step.name}", "{step.op}", {function}, {", ".join(extra)})'


def _host_reads(plan: Plan) -> set[str]:
    return {str(s) for let in plan.host for s in let.expr.free_symbols}


def _host_line(let) -> str:
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
