"""MLIR backend: a plan → a kernels module whose stages are MLIR functions (linalg / scf over memrefs).

Each variant (parameter dtype, and for rank-1 stores whether the tensor has >= 2 dims) is one MLIR
module; ``optgen.runtime.mlir_jit`` lowers it to LLVM, JIT-compiles it once per process and calls
it on torch tensors in place, split across threads.  Element-wise math is float32 whatever the
storage dtype (bf16 is extended on load and truncated to nearest even on store).  Host scalars are
computed in Python (float64, like the torch kernels' 0-d tensors) and passed as f32 arguments, so a
new learning rate never recompiles anything.

Unquantized plans: each ``map`` stage is one ``linalg.generic`` over 1-D memrefs (the tensors'
storage, flattened), updating param and state in place.  Quantized plans: a ``map`` stage is an scf
loop over super-blocks (a whole number of every block-wise store's blocks): dequantize, update,
keep the new block-wise values in a stack buffer, then per block absmax → scale, nearest code by
midpoint search, pack, write.  Rank-1 / per-tensor stores get their new scales from the plan's
``stats`` stage, which recomputes the value and reduces its row / column (or total) maxima.
``_quantized_stage`` describes the loop shapes that let LLVM vectorize these loops.

Plans with reductions or rows / cols / scalar values go to ``emit_mlir_steps`` (which reuses
``_quantized_stage`` for its block-wise quantized launches).  Plans neither can run (matrix
stages, ...) get no MLIR module (``emit_mlir`` returns None) and run on the torch kernels.
"""

from __future__ import annotations

import bisect
import functools
import math
import struct
from dataclasses import dataclass, field

import sympy

from optgen.codegen import expr as E
from optgen.codegen.emit_torch import _scheme_literal
from optgen.codegen.expr import Kind
from optgen.codegen.mlir_team import with_teams
from optgen.codegen.plan import Plan, Stage
from optgen.codegen.printer import TextPrinter
from optgen.codegen.quant import QuantScheme, midpoints
from optgen.codegen.templates import render

MLIR_TYPES = {"float32": "f32", "bfloat16": "bf16"}
PARAM_DTYPES = ("float32", "bfloat16")
MAX_SUPERBLOCK = 4096  # elements kept on the stack per block-wise quantized state
# a stats stage over rank-1 / per-tensor state only walks super-blocks of at least this many elements:
# fewer per-super-block overheads (unpacking, row bounds) for the maxima (10x1M adamw4bit stats on
# 1 thread 2.6 -> 2.0 ms; on 2 threads 1.6 -> 1.1-1.5 ms); its map stage keeps the blocks' size
STATS_SUPERBLOCK = 512
# tables over 16 entries encode through buckets of 2**16 consecutive float32 keys: small enough that no
# bucket of the 8-bit tables holds two midpoints, so a code is one lookup of the bucket's count and the
# low key bits of the midpoint inside it (adamw8bit's step 33 -> 28 ms per 10x1M on 1 thread with two
# lookups, a count then the midpoint; 2**18: 2-3 midpoints per bucket), for 256 KiB tables (L2)
BUCKET_SHIFT = 16
# top bits of an AVX-512 8-bit encode found by counting, not searching (_search_bytes): adamw8bit's
# map on 10x1M, 1 thread: 2 levels 21.2 ms, 3: 20.0, 4: 21.4, 5: 29.0, binary search only: 23.8
COUNTED_LEVELS = 3
# instruction sets with variants that decode codes by register lookups: the largest table they look up,
# and the bits of the codes they also encode by a register search (AVX-512's 4-bit select tree was as fast)
LOOKUP_ISAS = {"avx512": (256, 8), "avx2": (16, 4)}
_TENSORS = ("param", "grad")
_RELATIONS = {sympy.Eq: "oeq", sympy.Ne: "une", sympy.Lt: "olt", sympy.Le: "ole", sympy.Gt: "ogt", sympy.Ge: "oge"}


class Unsupported(Exception):
    """A plan feature this backend does not lower (the torch kernels run that plan)."""


def emit_mlir(plan: Plan, header: str) -> str | None:
    if needs_steps(plan):
        from optgen.codegen import emit_mlir_steps

        return emit_mlir_steps.emit(plan, header)
    try:
        program = _Program(plan)
        variants = program.modules()
    except Unsupported:
        return None
    return render(
        "mlir/kernels.py.j2",
        header=header,
        class_name=plan.spec.class_name,
        spec_name=plan.spec.name,
        variants=list(variants.items()),
        schemes=[(key, _scheme_literal(scheme)) for key, scheme in program.quantized_keys.items()],
        superblocks={
            layout: {stage.name: program.stage_superblock(stage, layout) for stage in program.plan.stages}
            for layout in program.layouts
        },
        unpack_lines=program.unpack_lines(),
        host_lines=program.host_lines(),
        stages=program.stage_rows(),
        scalar_names=program.scalar_names,
    )


def mlir_modules(plan: Plan) -> dict[str, str]:
    """Variant name → MLIR text (what ``optgen show --mlir`` prints); empty when unsupported."""
    if needs_steps(plan):
        from optgen.codegen import emit_mlir_steps

        return emit_mlir_steps.modules(plan)
    try:
        return _Program(plan).modules()
    except Unsupported as error:
        return {"unsupported": f"// {plan.spec.name}: the MLIR backend declines this plan ({error}); torch runs it"}


def needs_steps(plan: Plan) -> bool:
    """Plans beyond one map stage over full-size values: reduce / matrix stages, rows/cols/scalar
    values or state (``emit_mlir_steps`` lowers them, or declines)."""
    kinds = {let.kind for stage in plan.stages for let in stage.lets} | {s.kind for s in plan.spec.state}
    return any(stage.op not in ("map", "stats") for stage in plan.stages) or bool(kinds - {Kind.FULL, Kind.HOST})


# -- plan analysis ---------------------------------------------------------------------------------
@dataclass
class _Program:
    plan: Plan
    float_state: bool = False  # quantized stores kept in float32 (tensors of at most keep_full_precision)
    state_by_symbol: dict = field(init=False)
    quantized_keys: dict = field(init=False)  # saved_as -> QuantScheme
    scalar_names: list = field(init=False)  # every host symbol / hyperparameter a stage reads
    layouts: tuple = field(init=False)

    def __post_init__(self) -> None:
        spec = self.plan.spec
        self.state_by_symbol = {sympy.Symbol(s.name): s for s in spec.state}
        quantized = {s.saved_as: s.store.quant for s in spec.state if s.store.quant}
        self.quantized_keys = {} if self.float_state else quantized
        if len(set(self.plan.outputs.values())) != len(self.plan.outputs):
            raise Unsupported("two outputs share one value")
        for s in spec.state:
            if s.kind is not Kind.FULL:
                raise Unsupported(f"state {s.name} is {s.kind}")
            if s.store.quant and s.store.quant.normalize == "block" and s.store.quant.block % 2:
                raise Unsupported("odd block size")
        maps = [st for st in self.plan.stages if st.op == "map"]
        if len(maps) != 1 or any(st.op not in ("map", "stats") for st in self.plan.stages):
            raise Unsupported("only a single map stage (plus stats) is lowered")
        scalars = set()
        for stage in self.plan.stages:
            for let in stage.lets:
                if let.kind is not Kind.FULL and let.kind is not Kind.HOST:
                    raise Unsupported(f"{let.symbol} is {let.kind}")
            for symbol in stage.inputs:
                if not self.is_tensor(symbol):
                    if self.plan.kinds.get(symbol, Kind.HOST) is not Kind.HOST:
                        raise Unsupported(f"input {symbol} is not a tensor or host value")
                    scalars.add(str(symbol))
        self.scalar_names = sorted(scalars)
        rank1 = any(q.normalize == "rank1" for q in self.quantized_keys.values())
        self.layouts = ("float",) if self.float_state else ("nd", "flat") if rank1 else ("any",)

    def is_tensor(self, symbol: sympy.Symbol) -> bool:
        return str(symbol) in _TENSORS or symbol in self.state_by_symbol

    def key(self, symbol: sympy.Symbol) -> str:
        return str(symbol) if str(symbol) in _TENSORS else self.state_by_symbol[symbol].saved_as

    def variant_keys(self) -> list[tuple[str, str]]:
        return [(dtype, layout) for dtype in PARAM_DTYPES for layout in self.layouts]

    def modules(self) -> dict[str, str]:
        """Variant name → MLIR text: "<dtype>-<layout>" for any CPU, "<dtype>-<layout>-<isa>" (avx512,
        avx2) where that instruction set's register lookups decode codes faster (the runtime picks the
        one its CPU has), and, for quantized plans, "<dtype>-float" for tensors whose quantized state
        is kept in float32."""
        out = {}
        for dtype, layout in self.variant_keys():
            out[f"{dtype}-{layout}"] = self.module(dtype, layout)
            for isa in LOOKUP_ISAS:
                if self.lookup_keys(layout, isa):
                    out[f"{dtype}-{layout}-{isa}"] = self.module(dtype, layout, isa)
        if self.quantized_keys:  # "<dtype>-float": small tensors, whose quantized stores stay float32
            kept = _Program(self.plan, float_state=True)
            out |= {f"{dtype}-float": kept.module(dtype, "float") for dtype, _ in kept.variant_keys()}
        return out

    def lookup_keys(self, layout: str, isa: str) -> list[str]:
        """States whose table (without arithmetic form) a whole super-block can decode with ``isa``'s
        vector lookups, 16 codes at a time: 4- and 8-bit tables on AVX-512, 4-bit ones on AVX2."""
        if not self.quantized_keys or self.superblock(layout) % 16:
            return []
        largest, _ = LOOKUP_ISAS[isa]
        return [k for k, q in self.quantized_keys.items() if _power_of_two_step(q) is None and len(q.values) <= largest]

    def storage_type(self, key: str, param_dtype: str) -> str:
        if key in _TENSORS:
            return MLIR_TYPES[param_dtype]
        state = next(s for s in self.plan.spec.state if s.saved_as == key)
        return MLIR_TYPES[state.store.dtype]

    def layout_of(self, key: str, layout: str) -> tuple[str, int]:
        scheme = self.quantized_keys[key]
        return scheme.layout((2, 2) if layout == "nd" else (4,))

    def reads(self, stage: Stage) -> list[str]:
        return [self.key(s) for s in sorted(stage.inputs, key=self._order) if self.is_tensor(s)]

    def stores(self, stage: Stage) -> list[tuple[str, sympy.Symbol]]:
        """(tensor key, symbol with its new value) for each tensor the stage writes."""
        if stage.op == "stats":
            return []
        names = {symbol: name for name, symbol in self.plan.outputs.items()}
        saved = {s.name: s.saved_as for s in self.plan.spec.state}
        return [(saved.get(names[s], "param"), s) for s in stage.outputs if s in names]

    def writes(self, stage: Stage) -> list[str]:
        return [key for key, _ in self.stores(stage)]

    def tensors(self, stage: Stage) -> list[str]:
        reads = self.reads(stage)
        return reads + [w for w in self.writes(stage) if w not in reads]

    def _order(self, symbol: sympy.Symbol) -> tuple:
        name = str(symbol)
        return (_TENSORS.index(name) if name in _TENSORS else 2, name)

    def stats_target(self, stage: Stage) -> str:
        symbol = stage.outputs[0]
        return next(self.key(s) for s in self.state_by_symbol if self.plan.outputs[str(s)] == symbol)

    def superblock(self, layout: str) -> int:
        """Elements per outer iteration: a whole number of every block-wise store's blocks; 256 where
        none is block-wise (1024 made a bf16 m + rank-1 8-bit v step 1.7x slower; 128-512 are alike)."""
        blocks = [b for norm, b in (self.layout_of(k, layout) for k in self.quantized_keys) if norm == "block"]
        size = math.lcm(*blocks) if blocks else 256
        if size > MAX_SUPERBLOCK:
            raise Unsupported("block sizes too large together")
        return size

    def stage_superblock(self, stage: Stage, layout: str) -> int:
        """Elements per outer iteration of ``stage``: the layout's super-block, or more for a stats
        stage that reads no block-wise state (STATS_SUPERBLOCK)."""
        size = self.superblock(layout)
        quantized = [k for k in self.tensors(stage) if k in self.quantized_keys]
        if stage.op != "stats" or any(self.layout_of(k, layout)[0] == "block" for k in quantized):
            return size
        larger = math.lcm(size, STATS_SUPERBLOCK)
        return larger if larger <= MAX_SUPERBLOCK else size

    # -- Python side of the module -----------------------------------------------------------------
    def unpack_lines(self) -> list[str]:
        reads = set(self.scalar_names) | {str(s) for let in self.plan.host for s in let.expr.free_symbols}
        lines = []
        for h in self.plan.spec.hypers:
            if any(n in reads for n in h.names):
                if h.is_tuple:
                    lines.append(f'{", ".join(h.names)} = map(np.float64, hyper["{h.name}"])')
                else:
                    lines.append(f'{h.name} = np.float64(hyper["{h.name}"])')
        return lines

    def host_lines(self) -> list[str]:
        printer = HostPrinter()
        return [f"{let.symbol} = {printer.doprint(let.expr)}" for let in self.plan.host]

    def scalars_of(self, stage: Stage) -> list[str]:
        used = {str(s) for s in stage.inputs}
        return [n for n in self.scalar_names if n in used]

    def extra_args(self) -> list[str]:
        """Index arguments a quantized stage takes after lo, hi, n, cols (none here)."""
        return []

    def element_index(self, key: str, e: str, body: Body, indent: int) -> str:
        """Where element ``e`` of the parameter reads an unquantized tensor ``key`` (the same index here)."""
        return e

    def gathered(self, stage: Stage, body: Body, size: int) -> dict[str, str]:
        """Stack buffers (key -> name) a quantized stage fills per super-block before its element
        loop, for values not laid out like the parameter (none here)."""
        return {}

    def gather(self, body: Body, indent: int, buffers: dict[str, str], start: str, end: str, size: int) -> None:
        """Fill ``gathered`` buffers (of ``size`` entries) with elements [start, end) of the super-block."""

    def stage_rows(self) -> list[dict]:
        rows = []
        for stage in self.plan.stages:
            rows.append(
                {
                    "name": stage.name,
                    "op": stage.op,
                    "tensors": self.tensors(stage),
                    "writes": self.writes(stage),
                    "scalars": self.scalars_of(stage),
                    "target": self.stats_target(stage) if stage.op == "stats" else None,
                }
            )
        return rows

    # -- MLIR side ---------------------------------------------------------------------------------
    def module(self, dtype: str, layout: str, isa: str = "portable") -> str:
        functions, globals_ = [], {}
        for stage in self.plan.stages:
            if self.float_state and stage.op == "stats":
                continue  # maxima for scales: none in float
            if not self.quantized_keys:
                functions.append(_linalg_map(self, stage, dtype))
            else:
                function = _quantized_stage(self, stage, dtype, layout, globals_, isa)
                if function is not None:
                    functions.append(function)
        return render("mlir/module.mlir.j2", globals=list(globals_.values()), functions=with_teams(functions))


class HostPrinter(TextPrinter):
    """Host lines as numpy float64 code (IEEE semantics like torch's 0-d float64 tensors)."""

    def boolean(self, value: bool) -> str:
        return f"np.bool_({value})"

    def function(self, name: str, args: list[sympy.Basic]) -> str:
        return f"np.{name}({', '.join(self.p(a)[0] for a in args)})"

    def call(self, e: sympy.Basic) -> tuple[str, int]:
        if e.func == E.WHERE:
            return self.function("where", list(e.args)), 5
        if e.func in (sympy.Min, sympy.Max):
            text = self.p(e.args[0])[0]
            for other in e.args[1:]:
                text = f"np.{'minimum' if e.func is sympy.Min else 'maximum'}({text}, {self.p(other)[0]})"
            return text, 5
        if e.func in E.REDUCTIONS.values():
            raise Unsupported("reduction in host code")
        return super().call(e)


# -- scalar code -----------------------------------------------------------------------------------
def f32_literal(value: float) -> str:
    """An exact f32 attribute: the hex bit pattern of the float32 nearest ``value``."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return f"0x{bits:08X}"


class Body:
    """SSA lines of one function body, with a counter for fresh names and a constant cache."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.count = 0
        self.consts: dict[tuple[str, str], str] = {}

    def op(self, text: str, indent: int = 2) -> str:
        name = f"%v{self.count}"
        self.count += 1
        self.lines.append("  " * indent + f"{name} = {text}")
        return name

    def raw(self, text: str, indent: int = 2) -> None:
        self.lines.append("  " * indent + text)

    def max_magnitude(self, a: str, b: str, indent: int) -> str:
        """max(a, b) of magnitudes (>= 0 or NaN) compared as unsigned integers: their bit patterns
        order the same way and NaN lies above +inf, so NaN propagates as with arith.maximumf, in
        one instruction instead of a compare-max-blend (rank-1 statistics kernel: 30% less time)."""
        bits = [self.op(f"arith.bitcast {x} : f32 to i32", indent) for x in (a, b)]
        larger = self.op(f"arith.maxui {bits[0]}, {bits[1]} : i32", indent)
        return self.op(f"arith.bitcast {larger} : i32 to f32", indent)

    def narrow(self, value: str, type_: str, indent: int) -> str:
        """An f32 value in storage type ``type_`` ("f32" or "bf16"): bf16 rounded to nearest even, NaN
        as the quiet NaN 0x7FC0 (as torch rounds).  Written out rather than ``arith.truncf``:
        arith-expand picks the NaN on the 16-bit result, which LLVM turned into a compare and a
        16-bit store per element (adamw4bit's bf16 map kernel was 1.6x its float32 one); here a NaN
        is replaced by the float32 quiet NaN first, which the rounding below takes to 0x7FC0."""
        if type_ == "f32":
            return value
        sixteen, one, bias = (self.const(str(c), "i32") for c in (16, 1, 0x7FFF))
        nan = self.op(f"arith.cmpf uno, {value}, {value} : f32", indent)
        quiet = self.op(f"arith.select {nan}, {self.const('0x7FC00000', 'f32')}, {value} : f32", indent)
        bits = self.op(f"arith.bitcast {quiet} : f32 to i32", indent)
        odd = self.op(f"arith.andi {self.op(f'arith.shrui {bits}, {sixteen} : i32', indent)}, {one} : i32", indent)
        rounded = self.op(f"arith.addi {bits}, {self.op(f'arith.addi {odd}, {bias} : i32', indent)} : i32", indent)
        high = self.op(f"arith.shrui {rounded}, {sixteen} : i32", indent)
        return self.op(f"arith.bitcast {self.op(f'arith.trunci {high} : i32 to i16', indent)} : i16 to bf16", indent)

    def f32(self, value: float) -> str:
        return self.const(f32_literal(float(value)), "f32")

    def index(self, value: int) -> str:
        return self.const(str(value), "index")

    def const(self, text: str, type_: str) -> str:
        if (text, type_) not in self.consts:
            name = f"%c{len(self.consts)}"
            self.consts[(text, type_)] = name
            self.lines.insert(0, f"    {name} = arith.constant {text} : {type_}")
        return self.consts[(text, type_)]


class Lowering:
    """sympy → f32 arith/math ops, in the order the torch printer evaluates (same roundings)."""

    def __init__(self, body: Body, env: dict[sympy.Symbol, str], indent: int):
        self.body, self.env, self.indent = body, env, indent

    def op(self, text: str) -> str:
        return self.body.op(text, self.indent)

    def lets(self, lets) -> None:
        for let in lets:
            self.env[let.symbol] = self.value(let.expr)

    def value(self, e: sympy.Basic) -> str:
        if isinstance(e, sympy.Symbol):
            return self.env[e]
        if e.is_Number:
            return self.body.f32(float(e))
        if isinstance(e, sympy.Add):
            return self.add(e)
        if isinstance(e, sympy.Mul):
            return self.mul(e)
        if isinstance(e, sympy.Pow):
            return self.pow(e)
        if e.func == E.WHERE:
            cond, a, b = e.args
            return self.op(f"arith.select {self.condition(cond)}, {self.value(a)}, {self.value(b)} : f32")
        if e.func in (sympy.Min, sympy.Max):
            numbers = [a for a in e.args if a.is_Number]
            others = [a for a in e.args if not a.is_Number]
            name = "minimumf" if e.func is sympy.Min else "maximumf"
            out = self.value(others[0])
            for other in [*others[1:], *numbers]:
                out = self.op(f"arith.{name} {out}, {self.value(other)} : f32")
            return out
        if e.func is sympy.Abs:
            return self.op(f"math.absf {self.value(e.args[0])} : f32")
        if e.func is sympy.sign:
            x = self.value(e.args[0])
            zero, one = self.body.f32(0.0), self.body.f32(1.0)
            positive = self.op(f"arith.cmpf ogt, {x}, {zero} : f32")
            negative = self.op(f"arith.cmpf olt, {x}, {zero} : f32")
            minus = self.body.f32(-1.0)
            inner = self.op(f"arith.select {negative}, {minus}, {self.op(f'arith.mulf {x}, {zero} : f32')} : f32")
            return self.op(f"arith.select {positive}, {one}, {inner} : f32")
        if e.func is sympy.exp:
            return self.op(f"math.exp {self.value(e.args[0])} : f32")
        if e.func is sympy.log:
            return self.op(f"math.log {self.value(e.args[0])} : f32")
        raise Unsupported(f"no MLIR lowering for {e.func}")

    def add(self, e: sympy.Add) -> str:
        def negative(a: sympy.Basic) -> bool:
            coeff = a.as_coeff_Mul()[0]
            return bool(coeff.is_Number and coeff < 0)

        terms = sorted(e.args, key=lambda a: (negative(a), not a.is_Number, sympy.default_sort_key(a)))
        out = None
        for term in terms:
            minus = negative(term)
            value = self.value(-term if minus else term)
            if out is None:
                out = self.op(f"arith.negf {value} : f32") if minus else value
            else:
                out = self.op(f"arith.{'subf' if minus else 'addf'} {out}, {value} : f32")
        return out

    def mul(self, e: sympy.Mul) -> str:
        coeff, _ = e.as_coeff_Mul()
        if coeff.is_Number and coeff < 0:
            return self.op(f"arith.negf {self.value(-e)} : f32")
        numer, denom = [], []
        for factor in sympy.Mul.make_args(e):
            if factor.is_Rational and not factor.is_Integer:
                if factor.p != 1:
                    numer.append(sympy.Integer(factor.p))
                denom.append(sympy.Integer(factor.q))
            elif isinstance(factor, sympy.Pow) and factor.exp.is_Number and factor.exp < 0:
                denom.append(sympy.Pow(factor.base, -factor.exp))
            else:
                numer.append(factor)
        out = self.product(numer) if numer else self.body.f32(1.0)
        if denom:
            out = self.op(f"arith.divf {out}, {self.product(denom)} : f32")
        return out

    def product(self, factors: list) -> str:
        out = self.value(factors[0])
        for f in factors[1:]:
            out = self.op(f"arith.mulf {out}, {self.value(f)} : f32")
        return out

    def pow(self, e: sympy.Pow) -> str:
        base, exp = e.args
        if exp == sympy.Rational(1, 2):
            return self.op(f"math.sqrt {self.value(base)} : f32")
        if exp.is_Number and exp < 0:
            return self.op(f"arith.divf {self.body.f32(1.0)}, {self.value(sympy.Pow(base, -exp))} : f32")
        x = self.value(base)
        if exp == 2:  # torch's pow(x, 2) is x * x
            return self.op(f"arith.mulf {x}, {x} : f32")
        if exp == 3:
            return self.op(f"arith.mulf {self.op(f'arith.mulf {x}, {x} : f32')}, {x} : f32")
        return self.op(f"math.powf {x}, {self.value(exp)} : f32")

    def condition(self, c: sympy.Basic) -> str:
        if isinstance(c, sympy.Symbol) or c.is_Number:  # host flags arrive as 0.0 / 1.0
            return self.op(f"arith.cmpf une, {self.value(c)}, {self.body.f32(0.0)} : f32")
        if c is sympy.true or c is sympy.false:
            return self.body.const("true" if c is sympy.true else "false", "i1")
        if type(c) in _RELATIONS:
            a, b = (self.value(x) for x in c.args)
            return self.op(f"arith.cmpf {_RELATIONS[type(c)]}, {a}, {b} : f32")
        if isinstance(c, (sympy.And, sympy.Or)):
            out = self.condition(c.args[0])
            for other in c.args[1:]:
                out = self.op(
                    f"arith.{'andi' if isinstance(c, sympy.And) else 'ori'} {out}, {self.condition(other)} : i1"
                )
            return out
        if isinstance(c, sympy.Not):
            return self.op(f"arith.xori {self.condition(c.args[0])}, {self.body.const('true', 'i1')} : i1")
        raise Unsupported(f"no MLIR lowering for condition {c.func}")


# -- functions -------------------------------------------------------------------------------------
def _linalg_map(program: _Program, stage: Stage, dtype: str) -> dict:
    """An unquantized map stage: one linalg.generic over the flattened tensors, in place."""
    reads, writes = program.reads(stage), program.writes(stage)
    names = program.tensors(stage)
    types = {k: program.storage_type(k, dtype) for k in names}
    scalars = program.scalars_of(stage)
    body = Body()
    env = {sympy.Symbol(n): f"%{n}" for n in scalars}
    args_in = [f"%in_{k}" for k in reads]
    args_out = [f"%out_{k}" for k in writes]
    for k, arg in zip(reads, args_in):
        symbol = next(s for s in stage.inputs if program.is_tensor(s) and program.key(s) == k)
        env[symbol] = arg if types[k] == "f32" else body.op(f"arith.extf {arg} : {types[k]} to f32", 3)
    Lowering(body, env, 3).lets(stage.lets)
    yields = []
    for k, symbol in program.stores(stage):
        value = env[symbol]
        yields.append(body.narrow(value, types[k], 3))
    consts = [line for line in body.lines if " = arith.constant " in line]
    lines = [line for line in body.lines if line not in consts]
    count = len(reads) + len(writes)
    return {
        "kind": "linalg",
        "name": stage.name,
        "doc": _doc(stage),
        "args": [f"%{k}: memref<?x{types[k]}>" for k in names] + [f"%{n}: f32" for n in scalars],
        "maps": ", ".join(["#id"] * count),
        "ins": ", ".join(f"%{k}" for k in reads),
        "in_types": ", ".join(f"memref<?x{types[k]}>" for k in reads),
        "outs": ", ".join(f"%{k}" for k in writes),
        "out_types": ", ".join(f"memref<?x{types[k]}>" for k in writes),
        "block_args": ", ".join(f"{a}: {types[k]}" for a, k in zip(args_in + args_out, reads + writes)),
        "consts": [c.strip() for c in consts],
        "body": lines,
        "yield": ", ".join(yields),
        "yield_types": ", ".join(types[k] for k in writes),
    }


def _doc(stage: Stage) -> list[str]:
    printer = TextPrinter()
    return [f"{let.symbol} = {printer.doprint(let.expr)}" for let in stage.lets]


def _table_global(scheme: QuantScheme, what: str, globals_: dict) -> str:
    """A constant table of the scheme: "table" (its values) or "buckets" (see ``_buckets``, i32)."""
    name = f"@{what}_{scheme.name.replace('-', '_')}"
    if name in globals_:
        return name
    if what == "buckets":
        entries = _buckets(scheme)
        raw = b"".join(struct.pack("<I", e) for e in entries).hex().upper()  # MLIR's hex form: raw bytes
        globals_[name] = f'memref.global "private" constant {name} : memref<{len(entries)}xi32> = dense<"0x{raw}">'
    else:
        dense = ", ".join(f32_literal(v) for v in scheme.values)
        globals_[name] = (
            f'memref.global "private" constant {name} : memref<{len(scheme.values)}xf32> = dense<[{dense}]>'
        )
    return name


def _quantized_stage(
    program: _Program, stage: Stage, dtype: str, layout: str, globals_: dict, isa: str = "portable"
) -> dict | None:
    """A stage of a quantized plan: scf loops over super-blocks [lo, hi) of the flattened tensor.

    Arguments: lo, hi (super-blocks), n (numel), cols (last dim, rank-1), then per tensor either one
    memref (param, grad, float state) or a quantized bundle (block: codes, scales; rank1: codes,
    old rows, old cols, new rows, new cols; tensor: codes, old, new), then for a stats stage its
    maxima outputs (rank1: rows, cols; tensor: one), then the f32 scalars.

    Per super-block the loops are kept simple enough for LLVM to vectorize them: 4-bit codes are
    unpacked into a stack buffer first and packed from one after (no read-modify-write of a shared
    byte inside the element loop), a rank-1 layout walks row segments (row scale fixed, column
    scales contiguous: no integer division per element), and codes come from comparisons with
    constant midpoints rather than a data-dependent search.  ``isa="avx512"``: a whole super-block's
    codes of a table without arithmetic form are decoded 16 at a time by register lookups into a float
    buffer, instead of a 15-select tree (4-bit) or a gather (8-bit) in the element loop, and 8-bit
    codes are encoded 16 at a time by a search in registers (_search_bytes) instead of gathers.
    ``isa="avx2"``: the same for 4-bit tables (decode, and the encode of whole blocks)."""
    names = program.tensors(stage)
    writes = program.writes(stage)
    scalars = program.scalars_of(stage)
    L = program.stage_superblock(stage, layout)
    body = Body()
    args = ["%lo: index", "%hi: index", "%n: index", "%cols: index", *program.extra_args()]
    quant = {k: program.layout_of(k, layout) for k in names if k in program.quantized_keys}
    for k in names:
        if k in quant:
            parts = {"block": ["codes", "scales"], "rank1": ["codes", "orow", "ocol", "nrow", "ncol"]}.get(
                quant[k][0], ["codes", "old", "new"]
            )
            args += [f"%{k}_{p}: memref<?x{'i8' if p == 'codes' else 'f32'}>" for p in parts]
        else:
            args.append(f"%{k}: memref<?x{program.storage_type(k, dtype)}>")
    norm, maxima = None, []
    if stage.op == "stats":
        norm = program.layout_of(program.stats_target(stage), layout)[0]
        if norm == "block":  # the flat variant of a rank-1 store: the write stage reduces it
            return None
        maxima = ["max_rows", "max_cols"] if norm == "rank1" else ["max_all"]
        args += [f"%{m}: memref<?xf32>" for m in maxima]  # one set per piece of the launch
    args += [f"%{n}: f32" for n in scalars]
    schemes = program.quantized_keys
    reads = {program.key(s) for s in stage.inputs if program.is_tensor(s)}
    stores = dict(program.stores(stage))

    # rank-1 scales: row segments (below); blocks of several sizes (L their lcm): the element loop
    # walks sub-blocks of their gcd, each inside one block of every state, so each block's scale is
    # loaded once per sub-block (a scale indexed per element kept LLVM from vectorizing: 6x slower)
    segments = norm == "rank1"
    smallest = math.gcd(*(q[1] for q in quant.values() if q[0] == "block"))  # 0: no block-wise state
    sub = smallest if 0 < smallest < L and not segments else None

    def superblock(length: str, i: int) -> None:
        """The loops over one super-block of ``length`` elements from ``start`` (indent ``i``)."""
        pairs = body.op(f"arith.ceildivui {length}, {body.index(2)} : index", i)
        first_byte = body.op(f"arith.shrui {start}, %c_1 : index", i)
        whole = length == "%L"
        for k, buf in unpacked.items():
            if whole and k in lookups:
                _unpack_lookup(body, i, k, lookups[k], first_byte, L, schemes[k], isa)
            else:
                _unpack(body, i, k, buf, pairs, first_byte, L)
        for k in (k for k in lookups if k not in unpacked and whole):  # 8-bit codes: no unpacking
            _lookup_bytes(body, i, k, lookups[k], start, L, schemes[k])
        program.gather(body, i, gathered, start, end, L)
        # a block-wise input with one block per super-block: its scale is loaded once, before the loops
        block_scales = {
            k: body.op(f"memref.load %{k}_scales[{body.op(f'arith.divui {start}, %L : index', i)}] : memref<?xf32>", i)
            for k in quant
            if k in reads and quant[k] == ("block", L) and not sub
        }

        # rank-1 scales: row segments [max(start, r * cols), min(end, (r + 1) * cols)) of the super-block, so
        # the row scale is fixed and column scales are contiguous (no integer division per element).  A stats
        # stage reduces over the segments directly; a write stage first fills per-element scale buffers.
        if scale_bufs or segments:
            first_row = body.op(f"arith.divui {start}, %cols : index", i)
            last_row = body.op(f"arith.divui {body.op(f'arith.subi {end}, %c_1 : index', i)}, %cols : index", i)
            body.raw(
                f"scf.for %r = {first_row} to {body.op(f'arith.addi {last_row}, %c_1 : index', i)} step %c_1 {{", i
            )
            row_start = body.op("arith.muli %r, %cols : index", i + 1)
            seg_lo = body.op(f"arith.maxui {row_start}, {start} : index", i + 1)
            seg_hi = body.op(
                f"arith.minui {body.op(f'arith.addi {row_start}, %cols : index', i + 1)}, {end} : index", i + 1
            )
            lo, hi = (
                body.op(f"arith.subi {seg_lo}, {start} : index", i + 1),
                body.op(f"arith.subi {seg_hi}, {start} : index", i + 1),
            )
            at = {"row": "%r", "col": lambda e: body.op(f"arith.subi {e}, {row_start} : index", i + 2)}
        if scale_bufs:
            rows = {
                kn: body.op(f"memref.load %{kn[0]}_{'n' if kn[1] else 'o'}row[%r] : memref<?xf32>", i + 1)
                for kn in scale_bufs
            }
            body.raw(f"scf.for %i = {lo} to {hi} step %c_1 {{", i + 1)
            col = at["col"](body.op(f"arith.addi {start}, %i : index", i + 2))
            for (k, new), buf in scale_bufs.items():
                column = body.op(f"memref.load %{k}_{'n' if new else 'o'}col[{col}] : memref<?xf32>", i + 2)
                smaller = _rank1_scale(body, i + 2, rows[(k, new)], column)
                body.raw(f"memref.store {smaller}, {buf}[%i] : memref<{L}xf32>", i + 2)
            body.raw("}", i + 1)
            body.raw("}", i)
        # a block-wise store with one block per super-block: its absmax is reduced by the element loop
        fused = [] if segments else [k for k in buffers if quant[k] == ("block", L)]
        if segments:
            outer = i + 1
        elif sub:
            carried = f"%absmax{body.count}"
            body.count += 1
            inits = ", ".join(f"%sub_amax_{k} = {body.f32(0.0)}" for k in fused)
            results = f"{carried}:{len(fused)} = " if fused else ""
            types = f" iter_args({inits}) -> ({', '.join(['f32'] * len(fused))})" if fused else ""
            body.raw(f"{results}scf.for %g = %c_0 to {length} step {body.index(sub)}{types} {{", i)
            outer = i + 1
            lo = "%g"
            hi = body.op(
                f"arith.minui {body.op(f'arith.addi %g, {body.index(sub)} : index', outer)}, {length} : index", outer
            )
            first = body.op(f"arith.addi {start}, %g : index", outer)
            inputs = [k for k in quant if k in reads and quant[k][0] == "block"]
            blocks = {k: body.op(f"arith.divui {first}, {body.index(quant[k][1])} : index", outer) for k in inputs}
            block_scales = {
                k: body.op(f"memref.load %{k}_scales[{at}] : memref<?xf32>", outer) for k, at in blocks.items()
            }
        else:
            lo, hi, outer = "%c_0", length, i
        j = outer + 1
        if segments:
            loop = body.op(f"scf.for %i = {lo} to {hi} step %c_1 iter_args(%acc = {body.f32(0.0)}) -> (f32) {{", outer)
        elif fused:
            loop = f"%absmax{body.count}"
            body.count += 1
            inits = ", ".join(f"%amax_{k} = {f'%sub_amax_{k}' if sub else body.f32(0.0)}" for k in fused)
            body.raw(
                f"{loop}:{len(fused)} = scf.for %i = {lo} to {hi} step %c_1 iter_args({inits}) -> "
                f"({', '.join(['f32'] * len(fused))}) {{",
                outer,
            )
        else:
            body.raw(f"scf.for %i = {lo} to {hi} step %c_1 {{", outer)
        e = body.op(f"arith.addi {start}, %i : index", j)
        where = {"e": e, "i": "%i", "block_scales": block_scales, "scale_bufs": scale_bufs, "L": L}
        if segments:
            where |= {"row": "%r", "col": at["col"](e)}
        env = {sympy.Symbol(n): f"%{n}" for n in scalars}
        for symbol in stage.inputs:
            if not program.is_tensor(symbol):
                continue
            k = program.key(symbol)
            if k in quant:
                looked_up = lookups.get(k) if whole else None
                env[symbol] = _dequantize(
                    body, j, k, schemes[k], quant[k], where, unpacked.get(k), L, globals_, looked_up
                )
            elif k in gathered:
                env[symbol] = body.op(f"memref.load {gathered[k]}[%i] : memref<{L}xf32>", j)
            else:
                t = program.storage_type(k, dtype)
                loaded = body.op(f"memref.load %{k}[{program.element_index(k, e, body, j)}] : memref<?x{t}>", j)
                env[symbol] = loaded if t == "f32" else body.op(f"arith.extf {loaded} : {t} to f32", j)
        Lowering(body, env, j).lets(stage.lets)
        if stage.op == "stats":
            magnitude = body.op(f"math.absf {env[stage.outputs[0]]} : f32", j)
            if norm == "rank1":
                old = body.op(f"memref.load %max_cols[{where['col']}] : memref<?xf32>", j)
                larger = body.max_magnitude(old, magnitude, j)
                body.raw(f"memref.store {larger}, %max_cols[{where['col']}] : memref<?xf32>", j)
            else:
                old = body.op("memref.load %max_all[%c_0] : memref<?xf32>", j)
                larger = body.max_magnitude(old, magnitude, j)
                body.raw(f"memref.store {larger}, %max_all[%c_0] : memref<?xf32>", j)
        for k, value in ((k, env[s]) for k, s in stores.items()):
            if k in buffers:
                body.raw(f"memref.store {value}, {buffers[k]}[%i] : memref<{L}xf32>", j)
            elif whole and k in searched:
                body.raw(f"memref.store {value}, {searched[k]}[%i] : memref<{L}xf32>", j)
            elif k in quant:
                scale = _element_scale(body, j, k, quant[k], where, new=True)
                code = _encode(body, j, schemes[k], value, scale, globals_)
                if k in packs:
                    body.raw(f"memref.store {code}, {packs[k]}[%i] : memref<{L}xi8>", j)
                else:
                    body.raw(f"memref.store {code}, %{k}_codes[{e}] : memref<?xi8>", j)
            else:
                t = program.storage_type(k, dtype)
                stored = body.narrow(value, t, j)
                body.raw(f"memref.store {stored}, %{k}[{e}] : memref<?x{t}>", j)
        if segments:
            body.raw(f"scf.yield {body.max_magnitude('%acc', magnitude, j)} : f32", j)
        elif fused:
            larger = [
                body.max_magnitude(f"%amax_{k}", body.op(f"math.absf {env[stores[k]]} : f32", j), j) for k in fused
            ]
            body.raw(f"scf.yield {', '.join(larger)} : {', '.join(['f32'] * len(fused))}", j)
        body.raw("}", outer)
        if sub:
            if fused:
                results = ", ".join(f"{loop}#{n}" for n in range(len(fused)))
                body.raw(f"scf.yield {results} : {', '.join(['f32'] * len(fused))}", outer)
                loop = carried
            body.raw("}", i)
        if segments:
            old = body.op("memref.load %max_rows[%r] : memref<?xf32>", outer)
            body.raw(
                f"memref.store {body.max_magnitude(old, loop, outer)}, %max_rows[%r] : memref<?xf32>",
                outer,
            )
        if segments:
            body.raw("}", i)
        for k, buf in packs.items():
            _pack(body, i, k, buf, pairs, first_byte, length, L)
        for k, buf in searched.items() if whole else ():
            if quant[k][0] == "rank1":  # the super-block's scale buffer
                _search_store(
                    body, i, k, schemes[k], buf, L, start, "%c_0", "%L", scale_bufs[(k, True)], per_value=True
                )
            else:  # one scale per tensor
                scale = body.op(f"memref.load %{k}_new[%c_0] : memref<?xf32>", i)
                _search_store(body, i, k, schemes[k], buf, L, start, "%c_0", "%L", scale)
        for k, buf in buffers.items():
            absmax = f"{loop}#{fused.index(k)}" if k in fused else None
            vectorized = whole and k in searches and quant[k][1] % 16 == 0
            _requantize_blocks(
                body, i, k, schemes[k], quant[k][1], L, buf, start, length, globals_, absmax, vectorized, isa
            )

    body.raw(f"%L = arith.constant {L} : index", 2)
    unpacked = {k: f"%unpacked_{k}" for k in quant if k in reads and schemes[k].bits == 4}
    looked_up_keys = program.lookup_keys(layout, isa) if isa in LOOKUP_ISAS else []
    lookups = {k: f"%decoded_{k}" for k in looked_up_keys if k in reads}
    searches = {k for k in looked_up_keys if schemes[k].bits == LOOKUP_ISAS[isa][1]}
    buffers = {k: f"%buf_{k}" for k in writes if k in quant and quant[k][0] == "block"}
    # 8-bit rank-1 / per-tensor stores of whole super-blocks: values kept, then coded 16 at a time
    searched = {
        k: f"%buf_{k}" for k in writes if k in searches and k not in buffers and norm is None and schemes[k].bits == 8
    }
    packs = {k: f"%pack_{k}" for k in writes if k in quant and k not in buffers and schemes[k].bits == 4}
    for buf in [*unpacked.values(), *packs.values()]:
        body.raw(f"{buf} = memref.alloca() : memref<{L}xi8>", 2)
    scale_bufs: dict[tuple[str, bool], str] = {}  # (rank-1 key, new scales?) -> per-element scales
    if norm != "rank1":
        for k in (k for k in quant if quant[k][0] == "rank1"):
            scale_bufs |= {(k, False): f"%scale_{k}_old"} if k in reads else {}
            scale_bufs |= {(k, True): f"%scale_{k}_new"} if k in stores else {}
    for buf in [*buffers.values(), *searched.values(), *scale_bufs.values(), *lookups.values()]:
        body.raw(f"{buf} = memref.alloca() : memref<{L}xf32>", 2)
    gathered = program.gathered(stage, body, L)
    body.raw("scf.for %sb = %lo to %hi step %c_1 {", 2)
    start = body.op("arith.muli %sb, %L : index", 3)
    end = body.op(f"arith.minui {body.op(f'arith.addi {start}, %L : index', 3)}, %n : index", 3)
    length = body.op(f"arith.subi {end}, {start} : index", 3)
    # a whole super-block (all but maybe the last) runs loops of constant trip count: no remainders
    whole = body.op(f"arith.cmpi eq, {length}, %L : index", 3)
    body.raw(f"scf.if {whole} {{", 3)
    superblock("%L", 4)
    body.raw("} else {", 3)
    superblock(length, 4)
    body.raw("}", 3)
    body.raw("}", 2)
    body.raw("return", 2)
    return {
        "kind": "raw",
        "name": stage.name,
        "doc": _doc(stage),
        "args": args,
        "per_piece": frozenset(maxima),
        "lines": [f"  func.func @{stage.name}({', '.join(args)}) attributes {{llvm.emit_c_interface}} {{"]
        + ["    %c_0 = arith.constant 0 : index", "    %c_1 = arith.constant 1 : index"]
        + body.lines
        + ["  }"],
    }


def _unpack(body: Body, ind: int, key: str, buf: str, pairs: str, first_byte: str, L: int) -> None:
    """The super-block's 4-bit codes, one per byte of ``buf`` (low nibble = even element)."""
    body.raw(f"scf.for %q = %c_0 to {pairs} step %c_1 {{", ind)
    k = ind + 1
    byte = body.op(f"memref.load %{key}_codes[{body.op(f'arith.addi {first_byte}, %q : index', k)}] : memref<?xi8>", k)
    even = body.op("arith.shli %q, %c_1 : index", k)
    low = body.op(f"arith.andi {byte}, {body.const('15', 'i8')} : i8", k)
    high = body.op(f"arith.shrui {byte}, {body.const('4', 'i8')} : i8", k)
    body.raw(f"memref.store {low}, {buf}[{even}] : memref<{L}xi8>", k)
    body.raw(f"memref.store {high}, {buf}[{body.op(f'arith.addi {even}, %c_1 : index', k)}] : memref<{L}xi8>", k)
    body.raw("}", ind)


def _pack(body: Body, ind: int, key: str, buf: str, pairs: str, first_byte: str, length: str, L: int) -> None:
    """Pairs of codes from ``buf`` into bytes; the odd partner of an odd-sized tensor's last element is 0."""
    body.raw(f"scf.for %q = %c_0 to {pairs} step %c_1 {{", ind)
    k = ind + 1
    even = body.op("arith.shli %q, %c_1 : index", k)
    odd = body.op(f"arith.addi {even}, %c_1 : index", k)
    low = body.op(f"memref.load {buf}[{even}] : memref<{L}xi8>", k)
    high = body.op(f"memref.load {buf}[{odd}] : memref<{L}xi8>", k)
    high = body.op(
        f"arith.select {body.op(f'arith.cmpi ult, {odd}, {length} : index', k)}, {high}, {body.const('0', 'i8')} : i8",
        k,
    )
    shifted = body.op(f"arith.shli {high}, {body.const('4', 'i8')} : i8", k)
    byte = body.op(f"arith.ori {low}, {shifted} : i8", k)
    body.raw(
        f"memref.store {byte}, %{key}_codes[{body.op(f'arith.addi {first_byte}, %q : index', k)}] : memref<?xi8>", k
    )
    body.raw("}", ind)


def _unpack_lookup(
    body: Body, ind: int, key: str, buf: str, first_byte: str, L: int, scheme: QuantScheme, isa: str
) -> None:
    """The super-block's table values (not yet scaled) into ``buf``, 16 per iteration: 8 bytes split
    into nibbles, interleaved (low nibble = even element), looked up by vpermps (_vector_lookup)."""
    body.raw(f"scf.for %q = %c_0 to {body.index(L // 2)} step {body.index(8)} {{", ind)
    k = ind + 1
    at = body.op(f"arith.addi {first_byte}, %q : index", k)
    packed = body.op(f"vector.load %{key}_codes[{at}] : memref<?xi8>, vector<8xi8>", k)
    low = body.op(f"arith.andi {packed}, {body.const('dense<15>', 'vector<8xi8>')} : vector<8xi8>", k)
    high = body.op(f"arith.shrui {packed}, {body.const('dense<4>', 'vector<8xi8>')} : vector<8xi8>", k)
    order = ", ".join(f"{e}, {e + 8}" for e in range(8))
    codes = body.op(f"vector.shuffle {low}, {high} [{order}] : vector<8xi8>, vector<8xi8>", k)
    index = body.op(f"arith.extui {codes} : vector<16xi8> to vector<16xi32>", k)
    looked_up = _vector_lookup(body, k, _padded_table(scheme, 16), index, isa)
    even = body.op("arith.shli %q, %c_1 : index", k)
    body.raw(f"vector.store {looked_up}, {buf}[{even}] : memref<{L}xf32>, vector<16xf32>", k)
    body.raw("}", ind)


def _lookup_bytes(body: Body, ind: int, key: str, buf: str, start: str, L: int, scheme: QuantScheme) -> None:
    """The super-block's 8-bit table values (not yet scaled) into ``buf``, 16 per iteration, looked
    up in registers (_vector_lookup) instead of a gather per 16 codes."""
    body.raw(f"scf.for %q = %c_0 to {body.index(L)} step {body.index(16)} {{", ind)
    k = ind + 1
    at = body.op(f"arith.addi {start}, %q : index", k)
    codes = body.op(f"vector.load %{key}_codes[{at}] : memref<?xi8>, vector<16xi8>", k)
    index = body.op(f"arith.extui {codes} : vector<16xi8> to vector<16xi32>", k)
    looked_up = _vector_lookup(body, k, _padded_table(scheme, 256), index)
    body.raw(f"vector.store {looked_up}, {buf}[%q] : memref<{L}xf32>, vector<16xf32>", k)
    body.raw("}", ind)


def _search_bytes(body: Body, ind: int, scheme: QuantScheme, value: str, scale: str, isa: str = "avx512") -> str:
    """The codes of 16 values divided by their scales (both vector<16xf32>), as _encode counts them
    (midpoints below x; NaN: none) but without its two gathers per 16 8-bit codes (AMD gathers are
    slow: they were 2/3 of adamw8bit's step) or its select tree for 4-bit ones (AVX2: its constants
    did not fit the 16 registers).  The top bits count the midpoints that split the table evenly
    (independent comparisons: COUNTED_LEVELS bits for 8-bit, one for 4-bit); each further bit is a
    binary-search level probing the 2**level midpoints the bits so far can reach, looked up in
    registers (_vector_lookup).  The codes as vector<16xi32>."""
    x = body.op(f"arith.divf {value}, {_safe_scale(body, ind, scale, 'vector<16xf32>')} : vector<16xf32>", ind)
    mids = _padded_midpoints(scheme)
    levels = len(mids).bit_length()
    ones = body.const("dense<1>", "vector<16xi32>")

    def plus_one_if_below(code: str, probe: str) -> str:
        below = body.op(f"arith.cmpf olt, {probe}, {x} : vector<16xf32>", ind)
        plus = body.op(f"arith.addi {code}, {ones} : vector<16xi32>", ind)
        return body.op(f"arith.select {below}, {plus}, {code} : vector<16xi1>, vector<16xi32>", ind)

    code = body.const("dense<0>", "vector<16xi32>")
    counted_levels = COUNTED_LEVELS if scheme.bits == 8 else 1  # 4-bit: binary search, <= 8 probes a level
    counted = 1 << (levels - counted_levels)
    for k in range(1, 1 << counted_levels):
        code = plus_one_if_below(code, body.const(f"dense<{f32_literal(mids[k * counted - 1])}>", "vector<16xf32>"))
    for level in range(counted_levels, levels):
        step = 1 << (levels - 1 - level)
        nodes = [mids[k * 2 * step + step - 1] for k in range(1 << level)]  # reached by code = k
        code = plus_one_if_below(
            body.op(f"arith.addi {code}, {code} : vector<16xi32>", ind), _vector_lookup(body, ind, nodes, code, isa)
        )
    return code


def _search_store(
    body: Body,
    ind: int,
    key: str,
    scheme: QuantScheme,
    buf: str,
    L: int,
    start: str,
    lo: str,
    hi: str,
    scale: str,
    per_value: bool = False,
    isa: str = "avx512",
) -> None:
    """Codes of the super-block's values ``buf``[lo, hi), 16 at a time (_search_bytes), stored for
    elements start + lo ... (4-bit: two per byte); ``scale``: one f32 for them all, or (``per_value``)
    a buffer like ``buf``."""
    body.raw(f"scf.for %q = {lo} to {hi} step {body.index(16)} {{", ind)
    value = body.op(f"vector.load {buf}[%q] : memref<{L}xf32>, vector<16xf32>", ind + 1)
    if per_value:
        scales = body.op(f"vector.load {scale}[%q] : memref<{L}xf32>, vector<16xf32>", ind + 1)
    else:
        scales = body.op(f"vector.broadcast {scale} : f32 to vector<16xf32>", ind + 1)
    code = _search_bytes(body, ind + 1, scheme, value, scales, isa)
    at = body.op(f"arith.addi {start}, %q : index", ind + 1)
    if scheme.bits == 4:  # pairs into bytes, the even element's code in the low nibble: as 64-bit lanes
        # (even | odd << 32), a lane's low byte is even | odd << 4 once the lane is or-ed with itself >> 28
        # (adamw4bit's launches ~3-4% faster than with byte shuffles, ~13 instructions per 16 codes on AVX2)
        pairs = body.op(f"vector.bitcast {code} : vector<16xi32> to vector<8xi64>", ind + 1)
        moved = body.op(f"arith.shrui {pairs}, {body.const('dense<28>', 'vector<8xi64>')} : vector<8xi64>", ind + 1)
        pairs = body.op(f"arith.ori {pairs}, {moved} : vector<8xi64>", ind + 1)
        code = body.op(f"arith.trunci {pairs} : vector<8xi64> to vector<8xi8>", ind + 1)
        at = body.op(f"arith.shrui {at}, %c_1 : index", ind + 1)
    else:
        code = body.op(f"arith.trunci {code} : vector<16xi32> to vector<16xi8>", ind + 1)
    body.raw(f"vector.store {code}, %{key}_codes[{at}] : memref<?xi8>, vector<{scheme.bits * 2}xi8>", ind + 1)
    body.raw("}", ind)


def _vector_lookup(body: Body, ind: int, table: list[float], index: str, isa: str = "avx512") -> str:
    """``table[index]`` for 16 lanes (index < len(table), a power of two).  AVX-512: vpermps for up to
    16 entries; else each 32-entry slice by vpermt2ps on the low 5 bits, the slice picked by the rest.
    AVX2 (up to 16 entries): per 8 lanes, vpermps of each 8-entry half picked by the index's bit 3."""

    def constant(entries: list[float], lanes: int = 16) -> str:
        padded = entries + entries[-1:] * (lanes - len(entries))
        return body.const(f"dense<[{', '.join(f32_literal(v) for v in padded)}]>", f"vector<{lanes}xf32>")

    if isa == "avx2":

        def permps(entries: list[float], part: str) -> str:
            return body.op(
                f'llvm.call_intrinsic "llvm.x86.avx2.permps"({constant(entries, 8)}, {part}) : '
                "(vector<8xf32>, vector<8xi32>) -> vector<8xf32>",
                ind,
            )

        halves = []
        for first in (0, 8):
            part = body.op(
                f"vector.extract_strided_slice {index} {{offsets = [{first}], sizes = [8], strides = [1]}} : "
                "vector<16xi32> to vector<8xi32>",
                ind,
            )
            value = permps(table[:8], part)
            if len(table) > 8:
                bit = body.op(f"arith.andi {part}, {body.const('dense<8>', 'vector<8xi32>')} : vector<8xi32>", ind)
                upper = body.op(f"arith.cmpi ne, {bit}, {body.const('dense<0>', 'vector<8xi32>')} : vector<8xi32>", ind)
                high = permps(table[8:], part)
                value = body.op(f"arith.select {upper}, {high}, {value} : vector<8xi1>, vector<8xf32>", ind)
            halves.append(value)
        order = ", ".join(str(i) for i in range(16))
        return body.op(f"vector.shuffle {halves[0]}, {halves[1]} [{order}] : vector<8xf32>, vector<8xf32>", ind)

    if len(table) <= 16:
        return body.op(
            f'llvm.call_intrinsic "llvm.x86.avx512.permvar.sf.512"({constant(table)}, {index}) : '
            "(vector<16xf32>, vector<16xi32>) -> vector<16xf32>",
            ind,
        )
    slices = [
        body.op(
            f'llvm.call_intrinsic "llvm.x86.avx512.vpermi2var.ps.512"({constant(table[s : s + 16])}, {index}, '
            f"{constant(table[s + 16 : s + 32])}) : (vector<16xf32>, vector<16xi32>, vector<16xf32>) -> vector<16xf32>",
            ind,
        )
        for s in range(0, len(table), 32)
    ]
    bit = 32
    while len(slices) > 1:
        mask = body.op(f"arith.andi {index}, {body.const(f'dense<{bit}>', 'vector<16xi32>')} : vector<16xi32>", ind)
        is_set = body.op(f"arith.cmpi ne, {mask}, {body.const('dense<0>', 'vector<16xi32>')} : vector<16xi32>", ind)
        slices = [
            body.op(f"arith.select {is_set}, {high}, {low} : vector<16xi1>, vector<16xf32>", ind)
            for low, high in zip(slices[::2], slices[1::2])
        ]
        bit *= 2
    return slices[0]


def _dequantize(body, ind, key, scheme, layout, where, unpacked, L, globals_, looked_up=None) -> str:
    """The element's value: its table entry (from ``looked_up``, the super-block's buffer of table
    values, when given) times its scale."""
    if looked_up is not None:
        entry = body.op(f"memref.load {looked_up}[{where['i']}] : memref<{L}xf32>", ind)
    else:
        if unpacked is not None:
            code = body.op(f"memref.load {unpacked}[{where['i']}] : memref<{L}xi8>", ind)
        else:
            code = body.op(f"memref.load %{key}_codes[{where['e']}] : memref<?xi8>", ind)
        entry = _table_entry(body, ind, scheme, code, globals_)
    scale = _element_scale(body, ind, key, layout, where, new=False)
    return body.op(f"arith.mulf {entry}, {scale} : f32", ind)


def _table_entry(body: Body, ind: int, scheme: QuantScheme, code: str, globals_: dict) -> str:
    """The table value of an i8 code: for 4-bit tables a tree of selects on the code's bits (constants,
    so the element loop vectorizes without gathers); for larger tables a load."""
    step = _power_of_two_step(scheme)
    if step is not None:  # first + code * step, exactly the table's float32 entry
        first, d = step
        index = body.op(f"arith.uitofp {code} : i8 to f32", ind)
        offset = body.op(f"arith.addf {index}, {body.f32(first / d)} : f32", ind)
        return body.op(f"arith.mulf {offset}, {body.f32(d)} : f32", ind)
    size = len(scheme.values)
    if size > 16:
        table = body.op(f"memref.get_global {_table_global(scheme, 'table', globals_)} : memref<{size}xf32>", ind)
        index = body.op(f"arith.index_castui {code} : i8 to index", ind)
        return body.op(f"memref.load {table}[{index}] : memref<{size}xf32>", ind)
    level = [body.f32(v) for v in _padded_table(scheme, 16)]
    for bit in range(4):
        mask = body.op(f"arith.andi {code}, {body.const(str(1 << bit), 'i8')} : i8", ind)
        is_set = body.op(f"arith.cmpi ne, {mask}, {body.const('0', 'i8')} : i8", ind)
        level = [
            body.op(f"arith.select {is_set}, {high}, {low} : f32", ind) for low, high in zip(level[::2], level[1::2])
        ]
    return level[0]


def _padded_table(scheme: QuantScheme, size: int) -> list[float]:
    """The table padded to ``size`` entries with its last (codes past the table never occur)."""
    return [*scheme.values, *[scheme.values[-1]] * (size - len(scheme.values))]


def _element_scale(body: Body, ind: int, key: str, layout: tuple, where: dict, new: bool) -> str:
    norm, block = layout
    if norm == "block":
        if not new and key in where["block_scales"]:
            return where["block_scales"][key]
        at = body.op(f"arith.divui {where['e']}, {body.index(block)} : index", ind)
        return body.op(f"memref.load %{key}_scales[{at}] : memref<?xf32>", ind)
    if norm == "rank1":
        if (key, new) in where["scale_bufs"]:
            L = where["L"]
            return body.op(f"memref.load {where['scale_bufs'][(key, new)]}[{where['i']}] : memref<{L}xf32>", ind)
        rows, cols = (f"%{key}_nrow", f"%{key}_ncol") if new else (f"%{key}_orow", f"%{key}_ocol")
        a = body.op(f"memref.load {rows}[{where['row']}] : memref<?xf32>", ind)
        b = body.op(f"memref.load {cols}[{where['col']}] : memref<?xf32>", ind)
        return _rank1_scale(body, ind, a, b)
    return body.op(f"memref.load %{key}_{'new' if new else 'old'}[%c_0] : memref<?xf32>", ind)


def _rank1_scale(body: Body, ind: int, row: str, column: str) -> str:
    """min(row, column) of a rank-1 state's row and column maxima (never negative), NaN where either is,
    as ``arith.minimumf`` gives: two selects on ``<``, each yielding its second operand when either is
    NaN (x86's vminps), their bits or-ed — equal values where neither is NaN, a NaN's bits where one
    is.  minimumf also orders -0 below +0, which cost ~5 instructions per 8 lanes on AVX2; a select
    and a NaN check of the row made the statistics loop branch per iteration."""
    bits = []
    for a, b in ((row, column), (column, row)):
        below = body.op(f"arith.cmpf olt, {a}, {b} : f32", ind)
        smaller = body.op(f"arith.select {below}, {a}, {b} : f32", ind)
        bits.append(body.op(f"arith.bitcast {smaller} : f32 to i32", ind))
    either = body.op(f"arith.ori {bits[0]}, {bits[1]} : i32", ind)
    return body.op(f"arith.bitcast {either} : i32 to f32", ind)


def _encode(body: Body, ind: int, scheme: QuantScheme, value: str, scale: str, globals_: dict) -> str:
    """Nearest table entry of value / scale: the count of midpoints below it (NaN: none)."""
    x = body.op(f"arith.divf {value}, {_safe_scale(body, ind, scale)} : f32", ind)
    zero = body.f32(0.0)
    step = _power_of_two_step(scheme)
    if step is not None:  # midpoint i is (c + i) * d: the count below x is ceil(x / d - c), clamped
        first, d = step
        y = body.op(f"arith.mulf {x}, {body.f32(1.0 / d)} : f32", ind)  # exact: d is a power of two
        t = body.op(f"arith.subf {y}, {body.f32(first / d + 0.5)} : f32", ind)
        t = body.op(f"math.ceil {t} : f32", ind)
        t = body.op(f"arith.maxnumf {t}, {zero} : f32", ind)  # NaN: no midpoint below, code 0
        t = body.op(f"arith.minnumf {t}, {body.f32(len(scheme.values) - 1)} : f32", ind)
        return body.op(f"arith.fptoui {t} : f32 to i8", ind)
    if len(scheme.values) > 16:
        return _bucket_encode(body, ind, scheme, x, globals_)
    mids = _padded_midpoints(scheme)
    levels = len(mids).bit_length()
    bits: list[str] = []  # "the probed midpoint is below x", per level, most significant first
    code = body.const("0", "i32")
    for level in range(levels):  # branch-free binary search; constants picked by selects on the bits so far
        step = 1 << (levels - 1 - level)
        candidates = [body.f32(mids[k * 2 * step + step - 1]) for k in range(1 << level)]
        for bit in reversed(bits):
            candidates = [
                body.op(f"arith.select {bit}, {b}, {a} : f32", ind) for a, b in zip(candidates[::2], candidates[1::2])
            ]
        bits.append(body.op(f"arith.cmpf olt, {candidates[0]}, {x} : f32", ind))
        moved = body.op(f"arith.ori {code}, {body.const(str(step), 'i32')} : i32", ind)
        code = body.op(f"arith.select {bits[-1]}, {moved}, {code} : i32", ind)
    return body.op(f"arith.trunci {code} : i32 to i8", ind)


def _safe_scale(body: Body, ind: int, scale: str, type_: str = "f32") -> str:
    """The scale values are divided by: 1 for an all-zero block (0 / 1 = 0) or a NaN scale
    (``type_``: f32, or vector<16xf32> for 16 scales)."""
    if type_ == "f32":
        zero, one, condition = body.f32(0.0), body.f32(1.0), ""
    else:
        zero, one, condition = body.const("dense<0.0>", type_), body.const("dense<1.0>", type_), "vector<16xi1>, "
    positive = body.op(f"arith.cmpf ogt, {scale}, {zero} : {type_}", ind)
    return body.op(f"arith.select {positive}, {scale}, {one} : {condition}{type_}", ind)


def _bucket_encode(body: Body, ind: int, scheme: QuantScheme, x: str, globals_: dict) -> str:
    """The count of midpoints below x for a large table: x's float32 bits as an order-preserving key,
    its top bits a bucket, and from one lookup of the bucket's entry (``_buckets``) the count below
    the bucket plus one if x's low key bits are above those of the midpoint inside it.  One load per
    code: a select tree took 57 selects and 2 dependent loads, a count and then a midpoint 2 loads.
    NaN: code 0, as the search gives."""
    entries = _buckets(scheme)
    table = _table_global(scheme, "buckets", globals_)

    def i32(value: int) -> str:
        return body.const(str(value), "i32")

    bits = body.op(f"arith.bitcast {x} : f32 to i32", ind)
    negative = body.op(f"arith.cmpi slt, {bits}, {i32(0)} : i32", ind)
    # negative floats: all bits flipped (larger magnitude, smaller key); others: the sign bit set
    flip = body.op(f"arith.select {negative}, {i32(-1)}, {i32(-(1 << 31))} : i32", ind)
    key = body.op(f"arith.xori {bits}, {flip} : i32", ind)
    bucket = body.op(f"arith.shrui {key}, {i32(BUCKET_SHIFT)} : i32", ind)
    # a signed cast (the index is small): x86 gathers then take 32-bit indices, one instruction per 16
    # lanes instead of two (adamw8bit's step ~10% faster)
    at = body.op(f"arith.index_cast {bucket} : i32 to index", ind)
    lookup = body.op(f"memref.get_global {table} : memref<{len(entries)}xi32>", ind)
    entry = body.op(f"memref.load {lookup}[{at}] : memref<{len(entries)}xi32>", ind)
    low = i32((1 << BUCKET_SHIFT) - 1)
    above = body.op(
        f"arith.cmpi ugt, {body.op(f'arith.andi {key}, {low} : i32', ind)}, "
        f"{body.op(f'arith.andi {entry}, {low} : i32', ind)} : i32",
        ind,
    )
    count = body.op(f"arith.shrui {entry}, {i32(BUCKET_SHIFT)} : i32", ind)
    code = body.op(f"arith.addi {count}, {body.op(f'arith.extui {above} : i1 to i32', ind)} : i32", ind)
    # NaN: code 0 (NaN keys lie beyond the infinities', in buckets whose counts are not 0)
    nan = body.op(f"arith.cmpf uno, {x}, {x} : f32", ind)
    code = body.op(f"arith.select {nan}, {i32(0)}, {code} : i32", ind)
    return body.op(f"arith.trunci {code} : i32 to i8", ind)


@functools.cache
def _buckets(scheme: QuantScheme) -> tuple[int, ...]:
    """Per bucket of float32 keys (see ``_bucket_encode``): the count of float32 midpoints below it,
    shifted up ``BUCKET_SHIFT`` bits, plus the low key bits of the midpoint inside it (all ones where
    none is: no key of the bucket is above them).  A midpoint m is below x exactly when its key is
    below x's, for every x but NaN (-0.0 and +0.0 compare equal: a -0.0 midpoint counts as +0.0)."""
    keys = sorted(_key_of_float(_as_f32(m) + 0.0) for m in midpoints(scheme.values))
    low = (1 << BUCKET_SHIFT) - 1
    entries = []
    for bucket in range(1 << (32 - BUCKET_SHIFT)):
        first = bisect.bisect_left(keys, bucket << BUCKET_SHIFT)
        inside = [k & low for k in keys[first : first + 2] if k >> BUCKET_SHIFT == bucket]
        if len(inside) > 1:
            raise AssertionError(f"table {scheme.name}: two midpoints in one bucket of {1 << BUCKET_SHIFT} keys")
        entries.append(first << BUCKET_SHIFT | (inside[0] if inside else low))
    return tuple(entries)


def _key_of_float(value: float) -> int:
    """The order-preserving key of a float32: its bits with the sign bit set for x >= 0, all bits
    flipped below 0 (larger magnitude, smaller key)."""
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    return bits ^ 0xFFFFFFFF if bits >> 31 else bits | 0x80000000


def _power_of_two_step(scheme: QuantScheme) -> tuple[float, float] | None:
    """(first, d) where every float32 entry is first + i·d and every midpoint first + (i + ½)·d, with
    d a power of two, first/d a whole number in [0, 2**10] (linear_nozero: 1/16 + i/16).  Decoding and
    the nearest-entry search are then arithmetic, bit for bit the table's: x / d is exact, and
    x / d - (first/d + ½) is exact wherever it is not negative (Sterbenz; both are multiples of
    ulp(x / d)), so its ceiling counts the midpoints below x."""
    values = [_as_f32(v) for v in scheme.values]
    first, d = values[0], values[1] - values[0]
    if d <= 0 or math.frexp(d)[0] != 0.5 or not (first / d).is_integer() or not 0 <= first / d <= 1 << 10:
        return None
    mids = [_as_f32(m) for m in midpoints(scheme.values)]
    entries = [first + i * d for i in range(len(values))]
    if values != entries or mids != [(a + b) / 2 for a, b in zip(entries, entries[1:])]:
        return None
    return first, d


def _as_f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def _padded_midpoints(scheme: QuantScheme) -> list[float]:
    """The midpoints, padded with +inf (never below x) to 2**k - 1 entries: a complete search tree."""
    mids = list(midpoints(scheme.values))
    return mids + [math.inf] * ((1 << len(mids).bit_length()) - 1 - len(mids))


def _requantize_blocks(
    body, ind, key, scheme, block, L, buf, start, length, globals_, absmax=None, vectorized=False, isa="portable"
) -> None:
    """Per block of the super-block: absmax → new scale, then codes (4-bit: packed pairs).
    ``absmax``: already reduced by the element loop (one block per super-block); ``vectorized``: codes
    of whole blocks (a multiple of 16) by vector searches in registers (_search_bytes, ``isa``)."""
    B = body.index(block)
    count = body.op(f"arith.ceildivui {length}, {B} : index", ind)
    first = body.op(f"arith.divui {start}, {B} : index", ind)
    body.raw(f"scf.for %b_{key} = %c_0 to {count} step %c_1 {{", ind)
    k = ind + 1
    lo = body.op(f"arith.muli %b_{key}, {B} : index", k)
    hi = body.op(f"arith.minui {body.op(f'arith.addi {lo}, {B} : index', k)}, {length} : index", k)
    if absmax is None:
        absmax = body.op(f"scf.for %j = {lo} to {hi} step %c_1 iter_args(%acc = {body.f32(0.0)}) -> (f32) {{", k)
        x = body.op(f"memref.load {buf}[%j] : memref<{L}xf32>", k + 1)
        magnitude = body.op(f"math.absf {x} : f32", k + 1)
        body.raw(f"scf.yield {body.max_magnitude('%acc', magnitude, k + 1)} : f32", k + 1)
        body.raw("}", k)
    at = body.op(f"arith.addi {first}, %b_{key} : index", k)
    body.raw(f"memref.store {absmax}, %{key}_scales[{at}] : memref<?xf32>", k)
    if vectorized:
        _search_store(body, k, key, scheme, buf, L, start, lo, hi, absmax, isa=isa)
    elif scheme.bits == 8:
        body.raw(f"scf.for %j = {lo} to {hi} step %c_1 {{", k)
        x = body.op(f"memref.load {buf}[%j] : memref<{L}xf32>", k + 1)
        code = _encode(body, k + 1, scheme, x, absmax, globals_)
        body.raw(
            f"memref.store {code}, %{key}_codes[{body.op(f'arith.addi {start}, %j : index', k + 1)}] : memref<?xi8>",
            k + 1,
        )
        body.raw("}", k)
    else:
        pairs_lo = body.op(f"arith.shrui {lo}, %c_1 : index", k)
        pairs_hi = body.op(f"arith.ceildivui {hi}, {body.index(2)} : index", k)
        body.raw(f"scf.for %q = {pairs_lo} to {pairs_hi} step %c_1 {{", k)
        m = k + 1
        even = body.op("arith.shli %q, %c_1 : index", m)
        odd = body.op(f"arith.addi {even}, %c_1 : index", m)
        low = _encode(body, m, scheme, body.op(f"memref.load {buf}[{even}] : memref<{L}xf32>", m), absmax, globals_)
        # the odd partner of the last element of an odd-sized tensor packs as code 0
        has_odd = body.op(f"arith.cmpi ult, {odd}, {hi} : index", m)
        safe_odd = body.op(f"arith.select {has_odd}, {odd}, {even} : index", m)
        high = _encode(
            body, m, scheme, body.op(f"memref.load {buf}[{safe_odd}] : memref<{L}xf32>", m), absmax, globals_
        )
        high = body.op(f"arith.select {has_odd}, {high}, {body.const('0', 'i8')} : i8", m)
        four = body.const("4", "i8")
        byte = body.op(f"arith.ori {low}, {body.op(f'arith.shli {high}, {four} : i8', m)} : i8", m)
        target = body.op(f"arith.addi {body.op(f'arith.shrui {start}, %c_1 : index', m)}, %q : index", m)
        body.raw(f"memref.store {byte}, %{key}_codes[{target}] : memref<?xi8>", m)
        body.raw("}", k)
    body.raw("}", ind)
