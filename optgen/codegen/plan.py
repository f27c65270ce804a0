"""Plan: a validated spec → host scalars + stages, with common subexpressions shared.

1. Host hoisting: every subexpression that depends only on hyperparameters and the step (bias
   corrections, ``lr * weight_decay``) is pulled out of the element-wise work and computed once per
   parameter per step.
2. Stages: the program is cut at reductions and matrix primitives.  ``map`` stages are
   element-wise (they may read rows/cols/scalar values, which broadcast); ``reduce`` stages produce
   rows/cols/scalar values; ``matrix`` stages apply ``standardize``/``whiten`` to whole matrices
   (their operands are symbols: element-wise work before and after stays in the map stages around
   them).  Backends dispatch on ``Stage.op`` so adding one does not disturb the others.
3. CSE (sympy.cse) per stage and over the host scalars.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import sympy

from optgen.codegen import expr as E
from optgen.codegen.expr import Kind
from optgen.codegen.spec import Spec


@dataclass(frozen=True)
class Let:
    """``symbol = expr`` inside the host block or a stage."""

    symbol: sympy.Symbol
    expr: sympy.Expr
    kind: Kind
    comment: str = ""


@dataclass
class Stage:
    op: str  # "map" | "reduce" | "matrix" | "stats" (recompute a value for its quantization maxima)
    index: int
    lets: list[Let]
    inputs: list[sympy.Symbol] = field(default_factory=list)  # read from outside the stage
    outputs: list[sympy.Symbol] = field(default_factory=list)  # needed after the stage
    note: str = ""  # what a stats stage reduces

    @property
    def name(self) -> str:
        return f"{self.op}_{self.index}"

    @property
    def kind(self) -> Kind:
        return E.join_kinds(*(let.kind for let in self.lets))


@dataclass
class Plan:
    spec: Spec
    hyper_inputs: list[str]  # hyperparameter names the program reads (unpacked names)
    host: list[Let]  # in order; reads hyper_inputs and step
    stages: list[Stage]
    outputs: dict[str, sympy.Symbol]  # "param" / state name -> symbol with the new value
    kinds: dict[sympy.Symbol, Kind]

    @property
    def min_ndim(self) -> int:
        """Fewest dims a parameter needs: cols values need a matrix, rows values a vector."""
        kinds = set(self.kinds.values()) | {s.kind for s in self.spec.state}
        if Kind.COLS in kinds or any(stage.op == "matrix" for stage in self.stages):
            return 2
        return 1 if Kind.ROWS in kinds else 0

    @property
    def shard_local(self) -> bool:
        """Whether each shard of a sharded parameter can step on its own: element-wise work and
        block-wise quantization only (no reductions, matrix stages, rank-1 or per-tensor scales)."""
        whole_tensor = any(s.store.quant and s.store.quant.normalize != "block" for s in self.spec.state)
        return not whole_tensor and all(stage.op == "map" for stage in self.stages)

    @property
    def host_symbols(self) -> list[sympy.Symbol]:
        return [let.symbol for let in self.host]

    def render(self) -> str:
        return render_plan(self)


def make_plan(spec: Spec) -> Plan:
    return _Planner(spec).run()


def fresh_symbols(prefix: str, taken) -> Iterator[sympy.Symbol]:
    """``prefix0``, ``prefix1``, ... skipping the names of the symbols ``taken`` holds now."""
    names = {str(s) for s in taken}
    return (sympy.Symbol(f"{prefix}{i}") for i in itertools.count() if f"{prefix}{i}" not in names)


class _Planner:
    def __init__(self, spec: Spec):
        self.spec = spec
        self.kinds = dict(spec.kinds)
        self.host_names = fresh_symbols("h", self.kinds)
        self.temp_names = fresh_symbols("t", self.kinds)
        self.reduce_names = fresh_symbols("r", self.kinds)
        self.matrix_names = fresh_symbols("x", self.kinds)
        self.matrix_values: dict[sympy.Expr, sympy.Symbol] = {}  # one matrix op computed once
        self.host: list[Let] = []
        self.hoisted: dict[sympy.Expr, sympy.Symbol] = {}

    def run(self) -> Plan:
        items: list[Let] = []
        for assignment in live_assignments(self.spec):
            if assignment.kind is Kind.HOST:
                self.host.append(Let(assignment.symbol, assignment.expr, Kind.HOST, assignment.text))
                continue
            expr = self.hoist(assignment.expr)
            if E.is_matrix_op(expr):  # `u = whiten(...)`: the matrix stage writes u itself
                expr = self.matrix_call(expr, items)
            else:
                expr = self.extract_reductions(expr, items)
            items.append(Let(assignment.symbol, expr, self.kinds[assignment.symbol], assignment.text))
        stages = self.cut(items)
        self.host = cse_lets(self.host, self.temp_names, self.kinds)
        final = set(self.spec.outputs.values())
        for i, stage in enumerate(stages):
            later = set().union(*(free_symbols(s.lets) for s in stages[i + 1 :]))
            defined = [let.symbol for let in stage.lets]
            stage.inputs = sorted(free_symbols(stage.lets) - set(defined), key=str)
            stage.outputs = [s for s in defined if s in final or s in later]
            if stage.op == "map":
                stage.lets = cse_lets(stage.lets, self.temp_names, self.kinds, keep=set(stage.outputs))
        stages = self.add_stats_stages(stages)
        hyper_inputs = [
            n
            for h in self.spec.hypers
            for n in h.names
            if sympy.Symbol(n) in free_symbols(self.host) | _stage_reads(stages)
        ]
        return Plan(self.spec, hyper_inputs, self.host, stages, dict(self.spec.outputs), self.kinds)

    def add_stats_stages(self, stages: list[Stage]) -> list[Stage]:
        """Rank-1 / per-tensor quantized stores need the new tensor's maxima before any code is
        written: a stats stage recomputes the value (without storing it) and reduces its maxima;
        the write stage then quantizes with them.  Block-wise stores fit in the write stage."""
        out: list[Stage] = []
        for stage in stages:
            for state in self.spec.state:
                symbol = self.spec.outputs.get(state.name)
                quant = state.store.quant
                if stage.op == "map" and quant and quant.normalize != "block" and symbol in stage.outputs:
                    lets = needed_lets(stage.lets, symbol)
                    defined = {let.symbol for let in lets}
                    inputs = sorted(free_symbols(lets) - defined, key=str)
                    out.append(
                        Stage("stats", 0, lets, inputs, [symbol], note=f"{quant.normalize} maxima of {state.name}")
                    )
            out.append(stage)
        for index, stage in enumerate(out):
            stage.index = index
        return out

    # -- hoisting ------------------------------------------------------------------------------
    def kind(self, expr: sympy.Basic) -> Kind:
        return E.kind_of(expr, self.kinds)

    def host_symbol(self, expr: sympy.Expr) -> sympy.Symbol:
        if expr not in self.hoisted:
            symbol = next(self.host_names)
            self.kinds[symbol] = Kind.HOST
            self.hoisted[expr] = symbol
            self.host.append(Let(symbol, expr, Kind.HOST))
        return self.hoisted[expr]

    def hoist(self, expr: sympy.Basic) -> sympy.Basic:
        if not expr.args:
            return expr
        if self.kind(expr) is Kind.HOST:
            return self.host_symbol(expr)
        if isinstance(expr, (sympy.Add, sympy.Mul)):
            host = [a for a in expr.args if self.kind(a) is Kind.HOST]
            rest = [self.hoist(a) for a in expr.args if self.kind(a) is not Kind.HOST]
            if len(host) > 1 or (host and host[0].args):
                host = [self.host_symbol(expr.func(*host))]
            return expr.func(*host, *rest)
        if isinstance(expr, sympy.Function) and expr.func in E.REDUCTIONS.values():
            return expr.func(self.hoist(expr.args[0]), expr.args[1])
        return expr.func(*(self.hoist(a) for a in expr.args))

    # -- stages --------------------------------------------------------------------------------
    def matrix_call(self, expr: sympy.Function, items: list[Let]) -> sympy.Function:
        """The matrix op with its operand made a symbol (computed by a map let first if needed)."""
        operand = self.extract_reductions(expr.args[0], items)
        if not isinstance(operand, sympy.Symbol):
            symbol = next(self.temp_names)
            self.kinds[symbol] = self.kind(operand)
            items.append(Let(symbol, operand, self.kinds[symbol]))
            operand = symbol
        return expr.func(operand, *expr.args[1:])

    def extract_reductions(self, expr: sympy.Basic, items: list[Let]) -> sympy.Basic:
        """Pull reductions and matrix ops out of ``expr`` into their own lets; returns what is left."""
        if E.is_matrix_op(expr):
            call = self.matrix_call(expr, items)
            if call not in self.matrix_values:
                symbol = self.matrix_values[call] = next(self.matrix_names)
                self.kinds[symbol] = Kind.FULL
                items.append(Let(symbol, call, Kind.FULL))
            return self.matrix_values[call]
        if isinstance(expr, sympy.Function) and expr.func in E.REDUCTIONS.values():
            operand = self.extract_reductions(expr.args[0], items)
            symbol = next(self.reduce_names)
            self.kinds[symbol] = self.kind(expr)
            items.append(Let(symbol, expr.func(operand, expr.args[1]), self.kinds[symbol], "reduce"))
            return symbol
        if not expr.args:
            return expr
        return expr.func(*(self.extract_reductions(a, items) for a in expr.args))

    def cut(self, items: list[Let]) -> list[Stage]:
        stages: list[Stage] = []
        for let in items:
            op = "reduce" if let.comment == "reduce" else "matrix" if E.is_matrix_op(let.expr) else "map"
            if stages and stages[-1].op == op and op in ("map", "matrix"):
                stages[-1].lets.append(let)
            else:
                stages.append(Stage(op, len(stages), [let]))
        return stages


def hoist_smaller_values(plan: Plan) -> Plan:
    """The plan with the parts of full-size map lets over rows / cols values only (SinkGD's
    ``1 / (norm_eps + sqrt(r))``) made lets of their own kind before them, so a backend computes them
    once per row or column, not once per element: a square root and a division per element become a
    multiplication (x * (1 / d) is within an ulp of x / d).  The MLIR steps backend plans with it
    (SinkGD 4x1000x1000 on one thread 48.7 -> 21 ms); a GPU recomputes such parts more cheaply than
    it launches a kernel for them, so the Triton backend plans without it."""
    kinds = dict(plan.kinds)
    names = fresh_symbols("t", kinds)

    def part(expr: sympy.Basic, lets: list[Let], made: dict) -> sympy.Basic:
        kind = E.kind_of(expr, kinds)
        if kind is Kind.FULL:
            return expr.func(*(part(arg, lets, made) for arg in expr.args)) if expr.args else expr
        if kind in (Kind.HOST, Kind.SCALAR) or isinstance(expr, sympy.Symbol) or not expr.args:
            return expr  # scalar parts: computed once per launch already
        if expr not in made:
            made[expr] = symbol = next(names)
            kinds[symbol] = kind
            lets.append(Let(symbol, expr, kind))
        return made[expr]

    stages = []
    for stage in plan.stages:
        lets: list[Let] = []
        made: dict[sympy.Expr, sympy.Symbol] = {}  # per stage: a later stage does not read this one's lets
        for let in stage.lets:
            expr = part(let.expr, lets, made) if stage.op == "map" and let.kind is Kind.FULL else let.expr
            lets.append(dataclasses.replace(let, expr=expr))
        stages.append(dataclasses.replace(stage, lets=lets))
    return dataclasses.replace(plan, stages=stages, kinds=kinds)


def fold_scalings(plan: Plan) -> Plan:
    """The plan with each full-size map let that scales one full-size value by rows / cols values
    (``x_3 = t1 * x_2`` after ``hoist_smaller_values``) rewritten over that value's base, the rows
    factors so far multiplied into one rows let and the cols factors into one cols let (SinkGD's
    rounds: ``x_k = x * a_k * b_k``, x the gradient): a launch then recomputes a round from the
    gradient in one line, and no round goes through a full-size scratch buffer.  A base is never a
    state or the parameter (a launch may overwrite their storage before a later one reads it)."""
    kinds = dict(plan.kinds)
    names = fresh_symbols("s", kinds)
    stored = {sympy.Symbol(name) for name in plan.outputs}
    folded: dict[sympy.Symbol, tuple] = {}  # full-size symbol -> (base, rows factor, cols factor)

    def times(old: sympy.Symbol | None, factors: list, kind: Kind, lets: list[Let]) -> sympy.Symbol | None:
        """``old`` (None: 1) times ``factors``: a new let of ``kind`` unless that is one symbol already."""
        product = [old, *factors] if old is not None else factors
        if len(product) <= 1:
            return product[0] if product else None
        symbol = next(names)
        kinds[symbol] = kind
        lets.append(Let(symbol, sympy.Mul(*product), kind))
        return symbol

    stages = []
    for stage in plan.stages:
        lets: list[Let] = []
        for let in stage.lets:
            args = let.expr.args if isinstance(let.expr, sympy.Mul) else ()
            full = [a for a in args if kinds.get(a) is Kind.FULL]
            rows = [a for a in args if kinds.get(a) is Kind.ROWS]
            cols = [a for a in args if kinds.get(a) is Kind.COLS]
            scaling = len(full) == 1 and len(full) + len(rows) + len(cols) == len(args) and full[0] not in stored
            if stage.op != "map" or let.kind is not Kind.FULL or not scaling:
                lets.append(let)
                continue
            base, a, b = folded.get(full[0], (full[0], None, None))
            a, b = times(a, rows, Kind.ROWS, lets), times(b, cols, Kind.COLS, lets)
            folded[let.symbol] = (base, a, b)
            lets.append(dataclasses.replace(let, expr=sympy.Mul(*(f for f in (base, a, b) if f is not None))))
        stages.append(dataclasses.replace(stage, lets=lets))
    return dataclasses.replace(plan, stages=stages, kinds=kinds)


def live_assignments(spec: Spec) -> list:
    """The program without assignments no output depends on (an unused temporary costs nothing)."""
    needed = set(spec.outputs.values())
    live = []
    for assignment in reversed(spec.program):
        if assignment.symbol in needed:
            live.append(assignment)
            needed |= assignment.expr.free_symbols
    return live[::-1]


def free_symbols(lets: list[Let]) -> set[sympy.Symbol]:
    symbols: set[sympy.Symbol] = set()
    for let in lets:
        symbols |= {s for s in let.expr.free_symbols if isinstance(s, sympy.Symbol)}
    return symbols


def needed_lets(lets: list[Let], symbol: sympy.Symbol) -> list[Let]:
    """The lets (in order) that computing ``symbol`` needs."""
    wanted = {symbol}
    needed = []
    for let in reversed(lets):
        if let.symbol in wanted:
            needed.append(let)
            wanted |= let.expr.free_symbols
    return needed[::-1]


def _stage_reads(stages: list[Stage]) -> set[sympy.Symbol]:
    return set().union(*(set(stage.inputs) for stage in stages)) if stages else set()


def cse_lets(lets: list[Let], names, kinds: dict, keep: set | None = None) -> list[Let]:
    """Share common subexpressions, emitting each shared value just before its first use."""
    if not lets:
        return lets
    replacements, reduced = sympy.cse([let.expr for let in lets], symbols=names, optimizations=None)
    for symbol, value in replacements:
        kinds[symbol] = E.kind_of(value, kinds)
    pending = dict(replacements)
    out: list[Let] = []

    def emit_needed(expr: sympy.Basic) -> None:
        for symbol in sorted(expr.free_symbols, key=str):
            if symbol in pending:
                value = pending.pop(symbol)
                emit_needed(value)
                out.append(Let(symbol, value, kinds[symbol]))

    for let, expr in zip(lets, reduced):
        emit_needed(expr)
        out.append(Let(let.symbol, expr, let.kind, let.comment))
    return out


def render_plan(plan: Plan) -> str:
    from optgen.codegen.printer import TextPrinter

    text = TextPrinter()
    spec = plan.spec
    lines = [f"plan for {spec.class_name} ({spec.path}, sha256 {spec.sha256[:12]})"]
    lines.append("  state: " + (", ".join(f"{s.name} [{s.kind}, {s.store.name}]" for s in spec.state) or "none"))
    quantized = [s for s in spec.state if s.store.quant]
    if quantized:
        lines.append(
            f"  quantized: load = dequantize, store = quantize;"
            f" tensors <= {spec.keep_full_precision} elements stay float32"
        )
    lines.append("  hyper read: " + (", ".join(plan.hyper_inputs) or "none") + "; step")
    lines.append("  host (once per parameter per step):")
    for let in plan.host:
        lines.append(f"    {let.symbol} = {text.doprint(let.expr)}" + (f"    # {let.comment}" if let.comment else ""))
    for stage in plan.stages:
        writes = f"{stage.note} (recomputed, not stored)" if stage.op == "stats" else ", ".join(map(str, stage.outputs))
        lines.append(f"  stage {stage.name} over {stage.kind}: reads {', '.join(map(str, stage.inputs))} -> {writes}")
        for let in stage.lets:
            lines.append(f"    {let.symbol} = {text.doprint(let.expr)}    [{let.kind}]")
    store_names = {s.name: s.store for s in spec.state}
    outs = ", ".join(
        f"{name} <- {symbol}"
        + (f" (quantize {store_names[name].name})" if name in store_names and store_names[name].quant else "")
        for name, symbol in plan.outputs.items()
    )
    lines.append(f"  store: {outs}")
    if spec.routing:
        lines.append(f"  applies_to: {spec.routing.condition_text}; otherwise: {spec.routing.otherwise.class_name}")
    return "\n".join(lines)
