"""MLIR backend for plans with reductions and rows / cols / scalar values (Factor, SinkGD, ...).

The plan is scheduled into launches exactly as for the Triton backend (``emit_triton.schedule``:
element-wise work recomputed inside the reductions that read it — at most ``MAX_RECOMPUTED`` lines
per value, longer chains go through a scratch buffer —, a rows+cols pair of reductions
over the same values in one pass, values that cross launches in float32 scratch buffers of their
kind's size).  The parameter is viewed as (batch, R, C) with C = shape[-1] and R = shape[-2]; a rows
value has one entry per row (numel / C), a cols value one per column of each matrix (batch * C),
a scalar one.  Each launch is one MLIR function over a range of work units, so the runtime
(``optgen.runtime.mlir_steps``) can split the units across threads:

- a launch over full-size values walks *stripes* (``STRIPE`` rows of one matrix), row by row, each
  row in chunks of ``WIDTH`` columns.  A reduction along rows (dim=-1) or over everything gets the
  chunk's operand values through a stack buffer, folded into float64 accumulators (so the
  element loop carries no value from one element to the next, and vectorizes); along rows it
  finishes per row into its rows buffer, over everything into a float64 partial per stripe.  One
  along columns (dim=-2) adds into a float64 partial per stripe and column.  ``finish_<op>``
  functions then combine the partials of each output entry in stripe order.  Stripes, chunks and
  lanes are fixed by the shape, not by the thread count, so results are the same bits for any
  number of threads.  Scalar and rows subexpressions of per-element lines are computed once per
  launch / row (``_Levels``);
- a launch over rows / cols / scalar values walks ``CHUNK`` entries per unit;
- a map launch that reads or writes block-wise quantized state is the quantized stage of
  ``emit_mlir`` (super-blocks of the flat tensor), which first gathers the super-block's rows / cols
  values into stack buffers (``gather``).

Reductions accumulate in float64 (sum, mean, norm: squares of float32 values are exact in float64)
and round once to float32, so the order of summation hardly matters; torch sums float32 in its own
order, so the two differ by about an ulp of the statistic.  ``max`` / ``min``
propagate NaN as torch.amax / amin do (``arith.maximumf`` / ``minimumf``).

Declined (``modules`` says why; the torch kernels run the plan): matrix stages, rank-1 / per-tensor
quantized state, quantized state a reduction or a rows/cols launch reads, a launch storing a smaller
value than it walks when it touches quantized state or reads that value's old state (full-size
launches otherwise store it once: per row, from each matrix's first row, from the first unit), and
plans ``schedule`` cannot order.
"""

from __future__ import annotations

import collections
import dataclasses

import sympy

from optgen.codegen import expr as E
from optgen.codegen.emit_mlir import (
    LOOKUP_ISAS,
    Body,
    Lowering,
    Unsupported,
    _doc,
    _Program,
    _quantized_stage,
)
from optgen.codegen.emit_torch import _scheme_literal
from optgen.codegen.emit_triton import _buffers, _reductions, schedule
from optgen.codegen.expr import Kind
from optgen.codegen.mlir_team import with_teams
from optgen.codegen.plan import Plan, fold_scalings, hoist_smaller_values
from optgen.codegen.templates import render

STRIPE = 32  # rows per work unit of a full-size launch (and per float64 column partial)
CHUNK = 4096  # entries per work unit of a rows / cols / scalar launch
WIDTH = 256  # columns per chunk of a row whose values a rows / all reduction folds
LANES = 4  # float64 accumulators a rows / all reduction carries along a row (same bits on any thread count)
# values a chunk's fold adds per iteration, into as many accumulators of its own, merged into the LANES
# after: folded by LANES alone it was one chain of dependent vector adds (FOLD 16: sinkgd's launches
# x0.85-0.92, factor4bit's x0.94-0.96, 10x1M on 1 and 2 threads, AVX2, paired same-process A/B; 32 no
# faster); a chunk's last values (a short row's all) still go by LANES: rows of 10 folded by 16 were ~10% slower
FOLD = 16
# element-wise lines a launch recomputes for a value rather than read it back from a scratch buffer:
# a CPU core divides slower than a GPU, and SinkGD's rounds, each recomputed from grad by every later
# round's reduction, made its step quadratic in the rounds (10x1M, 1 thread: 80 -> 44 ms with 4; 1-8 tried)
MAX_RECOMPUTED = 4
_NEUTRAL = {"mean": "0.0", "sum": "0.0", "norm": "0.0", "amax": "0xFFF0000000000000", "amin": "0x7FF0000000000000"}
_NEUTRAL32 = {"mean": "0.0", "sum": "0.0", "norm": "0.0", "amax": "0xFF800000", "amin": "0x7F800000"}
_COMBINE = {"mean": "addf", "sum": "addf", "norm": "addf", "amax": "maximumf", "amin": "minimumf"}


def step_program(plan: Plan) -> _StepProgram:
    """The plan's launches as this backend schedules them: after ``hoist_smaller_values`` and
    ``fold_scalings`` (raises ``Unsupported`` for a plan it declines)."""
    return _StepProgram(fold_scalings(hoist_smaller_values(plan)))


def emit(plan: Plan, header: str) -> str | None:
    try:
        program = step_program(plan)
        variants = program.modules()
    except Unsupported:
        return None
    return render(
        "mlir/steps.py.j2",
        header=header,
        class_name=plan.spec.class_name,
        spec_name=plan.spec.name,
        variants=list(variants.items()),
        schemes=[(key, _scheme_literal(scheme)) for key, scheme in program.quantized_keys.items()],
        buffers=program.buffer_kinds(),
        state_kinds={s.saved_as: (str(s.kind), s.store.dtype) for s in plan.spec.state},
        superblock=program.superblock("any") if program.quantized_keys else 0,
        unpack_lines=program.unpack_lines(),
        host_lines=program.host_lines(),
        steps=program.step_rows(),
        scalar_names=program.scalar_names,
        min_ndim=plan.min_ndim,
        stripe=STRIPE,
        chunk=CHUNK,
    )


def modules(plan: Plan) -> dict[str, str]:
    try:
        return step_program(plan).modules()
    except Unsupported as error:
        return {"unsupported": f"// {plan.spec.name}: the MLIR backend declines this plan ({error}); torch runs it"}


def _buffer_key(symbol: sympy.Symbol) -> str:
    return f"buf.{symbol}"


@dataclasses.dataclass
class _StepProgram(_Program):
    """The plan's launches (``schedule``) with their tensors: param, grad, state keys, ``buf.NAME``."""

    float_state: bool = False  # the variant for small tensors whose quantized state stays float32

    def __post_init__(self) -> None:
        plan = self.plan
        spec = plan.spec
        if any(stage.op == "matrix" for stage in plan.stages):
            raise Unsupported("matrix stages")
        self.state_by_symbol = {sympy.Symbol(s.name): s for s in spec.state}
        quantized = {s.saved_as: s.store.quant for s in spec.state if s.store.quant}
        self.quantized_keys = {} if self.float_state else quantized
        for s in spec.state:
            quant = s.store.quant
            if quant and (s.kind is not Kind.FULL or quant.normalize != "block"):
                raise Unsupported(f"quantized state {s.name} is {s.kind}, {quant.normalize}-wise")
            if quant and quant.block % 2:
                raise Unsupported("odd block size")
        if len(set(plan.outputs.values())) != len(plan.outputs):
            raise Unsupported("two outputs share one value")
        if any(let.kind is Kind.HOST for stage in plan.stages for let in stage.lets):
            raise Unsupported("host values inside a stage")
        steps = schedule(plan, MAX_RECOMPUTED)
        if steps is None:
            raise Unsupported("a launch would read a state after it is overwritten")
        self.steps = steps
        self.buffers = _buffers(steps, plan)
        self.buffer_symbols = {sympy.Symbol(name) for name in self.buffers}
        scalars = set()
        for step in steps:
            for symbol in step.inputs:
                if not self.is_tensor(symbol):
                    if plan.kinds.get(symbol, Kind.HOST) is not Kind.HOST:
                        raise Unsupported(f"input {symbol} is not a tensor or host value")
                    scalars.add(str(symbol))
            self._check(step)
        self.scalar_names = sorted(scalars)
        self.layouts = ("quantized", "float") if self.quantized_keys else ("any",)

    def _check(self, step) -> None:
        if step.op not in ("map", "reduce"):
            raise Unsupported(f"{step.op} launches")
        touches_quantized = {self.key(s) for s in [*step.inputs, *step.outputs] if self.is_tensor(s)} & set(
            self.quantized_keys
        )
        if touches_quantized and (step.op != "map" or step.domain is not Kind.FULL):
            raise Unsupported(f"{step.name} reads quantized state outside an element-wise launch")
        if step.op != "map":
            return
        old = {s.saved_as for symbol, s in self.state_by_symbol.items() if symbol in step.inputs}
        for key, symbol in self.stores(step):
            kind = self.kind_of_key(key)
            # a full-size launch stores a smaller value once (per launch, row or column), unless it also
            # reads the old one: another thread could read it after the store
            smaller = step.domain is Kind.FULL and not self.quantized(step) and key not in old
            if kind is not step.domain and not smaller:
                raise Unsupported(f"{step.name} stores {symbol} ({kind}) over {step.domain}")

    # -- tensors -----------------------------------------------------------------------------------
    def is_tensor(self, symbol: sympy.Symbol) -> bool:
        return super().is_tensor(symbol) or symbol in self.buffer_symbols

    def key(self, symbol: sympy.Symbol) -> str:
        if symbol in self.buffer_symbols:  # values computed by a launch (never param, grad or an old state)
            return _buffer_key(symbol)
        return super().key(symbol)

    def kind_of_key(self, key: str) -> Kind:
        if key in ("param", "grad"):
            return Kind.FULL
        if key.startswith("buf."):
            return self.buffers[key[4:]]
        return next(s.kind for s in self.plan.spec.state if s.saved_as == key)

    def storage_type(self, key: str, param_dtype: str) -> str:
        if key.startswith("buf."):
            return "f32"
        if self.float_state and key in {s.saved_as for s in self.plan.spec.state if s.store.quant}:
            return "f32"
        return super().storage_type(key, param_dtype)

    def stores(self, step) -> list[tuple[str, sympy.Symbol]]:
        """(key, symbol) for every tensor a launch writes: outputs of the plan, then scratch buffers.
        A reduce launch writes its rows reductions' buffers directly (columns / all: through partials)."""
        if step.op == "reduce":
            return [(_buffer_key(let.symbol), let.symbol) for let in _reductions(step) if _dim(let) == -1]
        names = {symbol: name for name, symbol in self.plan.outputs.items()}
        saved = {s.name: s.saved_as for s in self.plan.spec.state}
        out = [(saved.get(names[s], "param"), s) for s in step.outputs if s in names]
        return out + [(_buffer_key(s), s) for s in step.outputs if str(s) in self.buffers]

    def extra_args(self) -> list[str]:
        return ["%rc: index"]

    def element_index(self, key: str, e: str, body: Body, indent: int) -> str:
        """A quantized stage reads scalar values at 0 (rows / cols values are ``gathered``)."""
        return body.index(0) if self.kind_of_key(key) is Kind.SCALAR else e

    def gathered(self, step, body: Body, size: int) -> dict[str, str]:
        keys = [self.key(s) for s in step.inputs if self.is_tensor(s)]
        out = {k: f"%gather.{k}" for k in keys if self.kind_of_key(k) in (Kind.ROWS, Kind.COLS)}
        for name in out.values():
            body.raw(f"{name} = memref.alloca() : memref<{size}xf32>", 2)
        return out

    def gather(self, body: Body, indent: int, buffers: dict[str, str], start: str, end: str, size: int) -> None:
        """Rows / cols values of elements [start, end), row segment by row segment: one division per
        row rather than three per element, and an element loop that loads contiguous values."""
        if not buffers:
            return
        one = body.index(1)
        first = body.op(f"arith.divui {start}, %cols : index", indent)
        last = body.op(f"arith.divui {body.op(f'arith.subi {end}, {one} : index', indent)}, %cols : index", indent)
        rows = body.op("arith.divui %rc, %cols : index", indent)
        body.raw(
            f"scf.for %g.r = {first} to {body.op(f'arith.addi {last}, {one} : index', indent)} step {one} {{", indent
        )
        k = indent + 1
        row_start = body.op("arith.muli %g.r, %cols : index", k)
        lo = body.op(f"arith.subi {body.op(f'arith.maxui {row_start}, {start} : index', k)}, {start} : index", k)
        row_end = body.op(f"arith.addi {row_start}, %cols : index", k)
        hi = body.op(f"arith.subi {body.op(f'arith.minui {row_end}, {end} : index', k)}, {start} : index", k)
        # element start + i is column start + i - row_start of matrix g.r // rows: cols entry
        # (g.r // rows) * cols + start - row_start + i
        matrix_base = body.op(f"arith.muli {body.op(f'arith.divui %g.r, {rows} : index', k)}, %cols : index", k)
        offset = body.op(
            f"arith.subi {body.op(f'arith.addi {matrix_base}, {start} : index', k)}, {row_start} : index", k
        )
        row_values = {key: self._load(body, key, "%g.r", k) for key in buffers if self.kind_of_key(key) is Kind.ROWS}
        body.raw(f"scf.for %g.i = {lo} to {hi} step {one} {{", k)
        for key, buffer in buffers.items():
            value = row_values.get(key)
            if value is None:
                value = self._load(body, key, body.op(f"arith.addi {offset}, %g.i : index", k + 1), k + 1)
            body.raw(f"memref.store {value}, {buffer}[%g.i] : memref<{size}xf32>", k + 1)
        body.raw("}", k)
        body.raw("}", indent)

    def _load(self, body: Body, key: str, at: str, indent: int) -> str:
        return _load(self, body, key, "float32", at, indent)  # a state's or buffer's type, whatever the param's

    def partials(self, step) -> list:
        """The reductions a launch finishes through float64 partials (along columns, over all)."""
        return [let for let in _reductions(step) if _dim(let) != -1] if step.op == "reduce" else []

    def quantized(self, step) -> bool:
        keys = {self.key(s) for s in [*step.inputs, *step.outputs] if self.is_tensor(s)}
        return bool(keys & set(self.quantized_keys))

    def buffer_kinds(self) -> list[tuple[str, str]]:
        return [(_buffer_key(sympy.Symbol(name)), str(kind)) for name, kind in self.buffers.items()]

    def step_rows(self) -> list[dict]:
        return [
            {
                "name": step.name,
                "domain": str(step.domain),
                "tensors": self.tensors(step),
                "writes": self.writes(step),
                "scalars": self.scalars_of(step),
                "partials": [(_buffer_key(let.symbol), str(let.expr.func), _dim(let)) for let in self.partials(step)],
                "quantized": self.quantized(step),
            }
            for step in self.steps
        ]

    # -- MLIR --------------------------------------------------------------------------------------
    def modules(self) -> dict[str, str]:
        """Variant name → MLIR text: "<dtype>-<layout>", and "<dtype>-quantized-<isa>" where that
        instruction set's register lookups decode (and search) codes of whole super-blocks, as in
        ``emit_mlir``."""
        out = {}
        for dtype, layout in self.variant_keys():
            out[f"{dtype}-{layout}"] = self.module(dtype, layout)
            for isa in LOOKUP_ISAS if layout == "quantized" else ():
                if self.lookup_keys("any", isa):
                    out[f"{dtype}-{layout}-{isa}"] = self.module(dtype, layout, isa)
        return out

    def module(self, dtype: str, layout: str, isa: str = "portable") -> str:
        program = dataclasses.replace(self, float_state=True) if layout == "float" else self
        functions, globals_ = [], {}
        for step in program.steps:
            if program.quantized(step):
                functions.append(_quantized_stage(program, step, dtype, "any", globals_, isa))
            elif step.domain is Kind.FULL:
                functions.append(_full_launch(program, step, dtype))
            else:
                functions.append(_vector_launch(program, step, dtype))
        ops = sorted({str(let.expr.func) for step in program.steps for let in program.partials(step)})
        functions += [_finish(op) for op in ops]
        return render("mlir/module.mlir.j2", globals=list(globals_.values()), functions=with_teams(functions))


def _dim(let) -> int:
    return int(let.expr.args[1])


# -- launches --------------------------------------------------------------------------------------
class _Accumulators:
    """float64 accumulators of reductions: neutral values, combining, finishing to float32."""

    def __init__(self, body: Body):
        self.body = body

    def neutral(self, how: str) -> str:
        return self.body.const(_NEUTRAL[how], "f64")

    def combine(self, how: str, acc: str, value: str, indent: int) -> str:
        """``acc`` (f64) combined with an f32 ``value`` (norm: its square)."""
        wide = self.body.op(f"arith.extf {value} : f32 to f64", indent)
        if how == "norm":
            wide = self.body.op(f"arith.mulf {wide}, {wide} : f64", indent)
        return self.body.op(f"arith.{_COMBINE[how]} {acc}, {wide} : f64", indent)

    def neutral32(self, how: str) -> str:
        return self.body.const(_NEUTRAL32[how], "f32")

    def merge(self, how: str, accs: list[str], indent: int) -> str:
        """Accumulators of one reduction combined pairwise, in a fixed order."""
        while len(accs) > 1:
            pairs = zip(accs[::2], accs[1::2])
            merged = [self.body.op(f"arith.{_COMBINE[how]} {a}, {b} : f64", indent) for a, b in pairs]
            accs = merged + accs[len(accs) - len(accs) % 2 :]
        return accs[0]

    def finish(self, how: str, acc: str, count: str | None, indent: int) -> str:
        """The float32 result: mean divides by ``count`` (an f64 SSA value), norm takes the root."""
        if how == "mean":
            acc = self.body.op(f"arith.divf {acc}, {count} : f64", indent)
        elif how == "norm":
            acc = self.body.op(f"math.sqrt {acc} : f64", indent)
        return self.body.op(f"arith.truncf {acc} : f64 to f32", indent)

    def count(self, index: str, indent: int) -> str:
        wide = self.body.op(f"arith.index_cast {index} : index to i64", indent)
        return self.body.op(f"arith.uitofp {wide} : i64 to f64", indent)


def _signature(program: _StepProgram, step, dtype: str, fixed: list[str]) -> tuple[list[str], dict]:
    """The arguments of a launch (work-unit range, sizes, tensors, partials, scalars) and the
    environment of its scalar arguments."""
    args = ["%k.lo: index", "%k.hi: index", *fixed]
    args += [f"%{k}: memref<?x{program.storage_type(k, dtype)}>" for k in program.tensors(step)]
    args += [f"%part.{let.symbol}: memref<?xf64>" for let in program.partials(step)]
    scalars = program.scalars_of(step)
    args += [f"%{n}: f32" for n in scalars]
    return args, {sympy.Symbol(n): f"%{n}" for n in scalars}


def _load(program: _StepProgram, body: Body, key: str, dtype: str, at: str, indent: int) -> str:
    t = program.storage_type(key, dtype)
    loaded = body.op(f"memref.load %{key}[{at}] : memref<?x{t}>", indent)
    return loaded if t == "f32" else body.op(f"arith.extf {loaded} : {t} to f32", indent)


def _store(program: _StepProgram, body: Body, key: str, dtype: str, value: str, at: str, indent: int) -> None:
    t = program.storage_type(key, dtype)
    stored = body.narrow(value, t, indent)
    body.raw(f"memref.store {stored}, %{key}[{at}] : memref<?x{t}>", indent)


def _loop(body: Body, var: str, lo: str, hi: str, accs: list, indent: int, step: int = 1) -> str | None:
    """Open ``scf.for var = lo to hi`` carrying float64 ``accs`` ((name, initial value)); returns the
    name of its results (``%name#i``) or None without accumulators."""
    one = body.index(step)
    if not accs:
        body.raw(f"scf.for {var} = {lo} to {hi} step {one} {{", indent)
        return None
    result = f"%k.res{body.count}"
    body.count += 1
    carried = ", ".join(f"{name} = {init}" for name, init in accs)
    types = ", ".join(["f64"] * len(accs))
    loop = f"scf.for {var} = {lo} to {hi} step {one} iter_args({carried}) -> ({types}) {{"
    body.raw(f"{result}:{len(accs)} = {loop}", indent)
    return result


def _yield(body: Body, values: list[str], indent: int) -> None:
    if values:
        body.raw(f"scf.yield {', '.join(values)} : {', '.join(['f64'] * len(values))}", indent)


def _fold_lane(body: Body, acc: _Accumulators, let, buffer: str, at: str, lane: int, into: str, indent: int) -> str:
    """``into`` combined with the stack buffer's value at ``at + lane``."""
    index = body.op(f"arith.addi {at}, {body.index(lane)} : index", indent)
    value = body.op(f"memref.load {buffer}[{index}] : memref<{WIDTH}xf32>", indent)
    return acc.combine(_how(let), into, value, indent)


def _how(let) -> str:
    return str(let.expr.func)


def _full_launch(program: _StepProgram, step, dtype: str) -> dict:
    """Units are stripes: unit u is stripe u % S of matrix u // S (rows [s * STRIPE, ...) of R)."""
    body = Body()
    acc = _Accumulators(body)
    args, env = _signature(program, step, dtype, ["%k.C: index", "%k.R: index", "%k.S: index", "%k.B: index"])
    reductions = _reductions(step) if step.op == "reduce" else []
    along_rows = [let for let in reductions if _dim(let) == -1]
    along_cols = [let for let in reductions if _dim(let) == -2]
    over_all = [let for let in reductions if _dim(let) == E.DIM_ALL]
    inputs = [s for s in step.inputs if program.is_tensor(s)]
    by_kind = {kind: [s for s in inputs if program.kind_of_key(program.key(s)) is kind] for kind in Kind}
    for symbol in by_kind[Kind.SCALAR]:
        env[symbol] = _load(program, body, program.key(symbol), dtype, body.index(0), 2)
    cache: dict = {}  # values computed once per launch / row, reused by the element loop
    levels = _Levels(program, step, cache, env)
    levels.lower(body, Kind.SCALAR, 2)
    stores = {kind: [] for kind in Kind}  # (key, value symbol) by the kind of the tensor written
    for key, symbol in program.stores(step) if step.op == "map" else []:
        stores[program.kind_of_key(key)].append((key, symbol))
    if stores[Kind.SCALAR]:  # the thread with the first unit stores it
        body.raw(f"scf.if {body.op(f'arith.cmpi eq, %k.lo, {body.index(0)} : index', 2)} {{", 2)
        for key, symbol in stores[Kind.SCALAR]:
            _store(program, body, key, dtype, env[symbol], body.index(0), 3)
        body.raw("}", 2)
    row_count = acc.count("%k.C", 2) if along_rows else None
    stripe = body.index(STRIPE)

    _loop(body, "%k.u", "%k.lo", "%k.hi", [], 2)
    u = 3
    batch = body.op("arith.divui %k.u, %k.S : index", u)
    within = body.op("arith.remui %k.u, %k.S : index", u)
    first = body.op(f"arith.muli {within}, {stripe} : index", u)
    last = body.op(f"arith.minui {body.op(f'arith.addi {first}, {stripe} : index', u)}, %k.R : index", u)
    row_base = body.op(f"arith.muli {batch}, %k.R : index", u)
    col_base = body.op(f"arith.muli {batch}, %k.C : index", u)
    if along_cols:  # the partials of stripe s of every matrix: [s * B * C, (s + 1) * B * C)
        width = body.op("arith.muli %k.B, %k.C : index", u)
        stripe_base = body.op(f"arith.muli {within}, {width} : index", u)
    # rows and all reductions: each chunk of a row's values goes through a stack buffer, folded into
    # LANES accumulators (independent chains: the element loop has no loop-carried value and vectorizes)
    folded = along_rows + over_all
    buffers = [f"%k.vals{j}" for j in range(len(folded))]
    for buffer in buffers:
        body.raw(f"{buffer} = memref.alloca() : memref<{WIDTH}xf32>", 2)
    lanes = range(LANES)
    all_accs = [(f"%k.all{j}_{lane}", acc.neutral(_how(let))) for j, let in enumerate(over_all) for lane in lanes]
    rows_result = _loop(body, "%k.r", first, last, all_accs, u)
    r = u + 1
    row = body.op(f"arith.addi {row_base}, %k.r : index", r)
    element_base = body.op(f"arith.muli {row}, %k.C : index", r)
    for symbol in by_kind[Kind.ROWS]:
        env[symbol] = _load(program, body, program.key(symbol), dtype, row, r)
    levels.lower(body, Kind.ROWS, r)
    for key, symbol in stores[Kind.ROWS]:
        _store(program, body, key, dtype, env[symbol], row, r)
    if stores[Kind.COLS]:  # stored by the first row of each matrix
        first_row = body.op(f"arith.cmpi eq, %k.r, {body.index(0)} : index", r)
    row_accs = [(f"%k.row{j}_{lane}", acc.neutral(_how(let))) for j, let in enumerate(along_rows) for lane in lanes]
    carried = [(f"%k.rall{i}", name) for i, (name, _) in enumerate(all_accs)]
    if folded:
        chunks_result = _loop(body, "%k.c0", body.index(0), "%k.C", row_accs + carried, r, step=WIDTH)
        ch = r + 1
        chunk_end = body.op(f"arith.addi %k.c0, {body.index(WIDTH)} : index", ch)
        chunk_end = body.op(f"arith.minui {chunk_end}, %k.C : index", ch)
        _loop(body, "%k.c", "%k.c0", chunk_end, [], ch)
    else:
        ch = r
        _loop(body, "%k.c", body.index(0), "%k.C", [], r)
    c = ch + 1
    e = body.op(f"arith.addi {element_base}, %k.c : index", c)
    column = body.op(f"arith.addi {col_base}, %k.c : index", c)
    for symbol in by_kind[Kind.FULL]:
        env[symbol] = _load(program, body, program.key(symbol), dtype, e, c)
    for symbol in by_kind[Kind.COLS]:
        env[symbol] = _load(program, body, program.key(symbol), dtype, column, c)
    lowering = _CachedLowering(body, env, c, cache)
    lowering.lets(levels.lets[Kind.FULL])
    for key, symbol in stores[Kind.FULL]:
        _store(program, body, key, dtype, env[symbol], e, c)
    if stores[Kind.COLS]:
        body.raw(f"scf.if {first_row} {{", c)
        for key, symbol in stores[Kind.COLS]:
            _store(program, body, key, dtype, env[symbol], column, c + 1)
        body.raw("}", c)
    for let in along_cols:
        at = body.op(f"arith.addi {stripe_base}, {column} : index", c)
        old = body.op(f"memref.load %part.{let.symbol}[{at}] : memref<?xf64>", c)
        new = acc.combine(_how(let), old, lowering.value(let.expr.args[0]), c)
        body.raw(f"memref.store {new}, %part.{let.symbol}[{at}] : memref<?xf64>", c)
    if folded:
        slot = body.op("arith.subi %k.c, %k.c0 : index", c)
        for let, buffer in zip(folded, buffers):
            body.raw(f"memref.store {lowering.value(let.expr.args[0])}, {buffer}[{slot}] : memref<{WIDTH}xf32>", c)
    body.raw("}", ch)
    if folded:
        count = body.op(f"arith.subi {chunk_end}, %k.c0 : index", ch)
        width = body.index(LANES)
        padded = body.op(f"arith.muli {body.op(f'arith.ceildivui {count}, {width} : index', ch)}, {width} : index", ch)
        _loop(body, "%k.pad", count, padded, [], ch)  # the last chunk's tail: neutral values
        for let, buffer in zip(folded, buffers):
            body.raw(f"memref.store {acc.neutral32(_how(let))}, {buffer}[%k.pad] : memref<{WIDTH}xf32>", ch + 1)
        body.raw("}", ch)
        # FOLD values at a time into as many accumulators of the chunk's own (independent chains),
        # merged into the row's LANES (skipped for a chunk of fewer values); the rest LANES at a time
        fold = body.index(FOLD)
        whole = body.op(f"arith.muli {body.op(f'arith.divui {count}, {fold} : index', ch)}, {fold} : index", ch)
        names = [name for name, _ in row_accs + carried]
        branch = f"%k.merged{body.count}"
        body.count += 1
        any_whole = body.op(f"arith.cmpi ugt, {whole}, {body.index(0)} : index", ch)
        body.raw(f"{branch}:{len(names)} = scf.if {any_whole} -> ({', '.join(['f64'] * len(names))}) {{", ch)
        b = ch + 1
        locals_ = [(f"%k.fold{j}_{k}", acc.neutral(_how(let))) for j, let in enumerate(folded) for k in range(FOLD)]
        chunk = _loop(body, "%k.q", body.index(0), whole, [(f"{n}f", init) for n, init in locals_], b, step=FOLD)
        yields = [
            _fold_lane(body, acc, let, buffer, "%k.q", k, f"{locals_[j * FOLD + k][0]}f", b + 1)
            for j, (let, buffer) in enumerate(zip(folded, buffers))
            for k in range(FOLD)
        ]
        _yield(body, yields, b + 1)
        body.raw("}", b)
        into_lanes = [
            acc.merge(
                _how(let), [names[j * LANES + lane], *(f"{chunk}#{j * FOLD + k}" for k in range(lane, FOLD, LANES))], b
            )
            for j, let in enumerate(folded)
            for lane in lanes
        ]
        _yield(body, into_lanes, b)
        body.raw("} else {", ch)
        _yield(body, names, b)
        body.raw("}", ch)
        merged = [f"{branch}#{i}" for i in range(len(names))]
        tail = _loop(body, "%k.t", whole, padded, [(f"{n}t", m) for n, m in zip(names, merged)], ch, step=LANES)
        yields = [
            _fold_lane(body, acc, let, buffer, "%k.t", lane, f"{names[j * LANES + lane]}t", ch + 1)
            for j, (let, buffer) in enumerate(zip(folded, buffers))
            for lane in lanes
        ]
        _yield(body, yields, ch + 1)
        body.raw("}", ch)
        _yield(body, [f"{tail}#{i}" for i in range(len(names))], ch)
        body.raw("}", r)
    for j, let in enumerate(along_rows):
        total = acc.merge(_how(let), [f"{chunks_result}#{j * LANES + lane}" for lane in lanes], r)
        value = acc.finish(_how(let), total, row_count, r)
        body.raw(f"memref.store {value}, %{_buffer_key(let.symbol)}[{row}] : memref<?xf32>", r)
    if all_accs:
        _yield(body, [f"{chunks_result}#{len(row_accs) + i}" for i in range(len(all_accs))], r)
    body.raw("}", u)
    for j, let in enumerate(over_all):
        total = acc.merge(_how(let), [f"{rows_result}#{j * LANES + lane}" for lane in lanes], u)
        body.raw(f"memref.store {total}, %part.{let.symbol}[%k.u] : memref<?xf64>", u)
    body.raw("}", 2)
    return _function(step, args, body.lines)


class _CachedLowering(Lowering):
    """A Lowering that reuses values already computed for the same subexpression (in an outer loop)."""

    def __init__(self, body: Body, env: dict, indent: int, cache: dict):
        super().__init__(body, env, indent)
        self.cache = cache

    def value(self, e: sympy.Basic) -> str:
        if e.args and e in self.cache:
            return self.cache[e]
        value = super().value(e)
        if e.args:
            self.cache[e] = value
        return value


class _Levels:
    """What a full-size launch computes once per launch (scalar values), once per row (rows values)
    or per element: whole lets by their kind, and the scalar / rows subexpressions of per-element
    lines (SinkGD's ``norm_eps + sqrt(r0)`` once per row, not once per element).  The same ops in
    the same order, so the same roundings."""

    def __init__(self, program: _StepProgram, step, cache: dict, env: dict):
        self.kinds = collections.defaultdict(lambda: Kind.HOST, program.plan.kinds)
        self.cache, self.env = cache, env
        self.lets = {Kind.SCALAR: [], Kind.ROWS: [], Kind.FULL: []}
        for let in step.lets:
            if let.comment != "reduce":
                level = let.kind if let.kind in (Kind.SCALAR, Kind.ROWS) else Kind.FULL
                self.lets[level].append(let)
        self.per_element = [let.expr for let in self.lets[Kind.FULL]]
        self.per_element += [let.expr.args[0] for let in _reductions(step)]

    def lower(self, body: Body, level: Kind, indent: int) -> None:
        lowering = _CachedLowering(body, self.env, indent, self.cache)
        lowering.lets(self.lets[level])
        for expr in self.per_element:
            for part in self._parts(expr, level):
                lowering.value(part)

    def _parts(self, expr: sympy.Basic, level: Kind) -> list:
        """The largest subexpressions of ``expr`` of kind ``level`` that are worth computing once."""
        kind = E.kind_of(expr, self.kinds)
        if kind is level:
            arithmetic = isinstance(expr, sympy.Expr) and not isinstance(expr, (sympy.Symbol, sympy.Number))
            return [expr] if arithmetic and expr.args else []
        if kind <= level:  # host values, or scalar ones at the rows level: computed already
            return []
        return [part for arg in expr.args for part in self._parts(arg, level)]


def _vector_launch(program: _StepProgram, step, dtype: str) -> dict:
    """A launch over rows / cols / scalar entries: unit u is entries [u * CHUNK, ...) of N."""
    body = Body()
    acc = _Accumulators(body)
    args, env = _signature(program, step, dtype, ["%k.N: index"])
    over_all = _reductions(step) if step.op == "reduce" else []
    chunk = body.index(CHUNK)
    _loop(body, "%k.u", "%k.lo", "%k.hi", [], 2)
    u = 3
    first = body.op(f"arith.muli %k.u, {chunk} : index", u)
    last = body.op(f"arith.minui {body.op(f'arith.addi {first}, {chunk} : index', u)}, %k.N : index", u)
    accs = [(f"%k.all{i}", acc.neutral(str(let.expr.func))) for i, let in enumerate(over_all)]
    result = _loop(body, "%k.i", first, last, accs, u)
    i = u + 1
    for symbol in (s for s in step.inputs if program.is_tensor(s)):
        key = program.key(symbol)
        at = body.index(0) if program.kind_of_key(key) is Kind.SCALAR else "%k.i"
        env[symbol] = _load(program, body, key, dtype, at, i)
    lowering = Lowering(body, env, i)
    lowering.lets([let for let in step.lets if let.comment != "reduce"])
    if step.op == "map":
        for key, symbol in program.stores(step):
            _store(program, body, key, dtype, env[symbol], "%k.i", i)
    yields = [
        acc.combine(str(let.expr.func), name, lowering.value(let.expr.args[0]), i)
        for let, (name, _) in zip(over_all, accs)
    ]
    if yields:
        body.raw(f"scf.yield {', '.join(yields)} : {', '.join(['f64'] * len(yields))}", i)
    body.raw("}", u)
    for n, let in enumerate(over_all):
        body.raw(f"memref.store {result}#{n}, %part.{let.symbol}[%k.u] : memref<?xf64>", u)
    body.raw("}", 2)
    return _function(step, args, body.lines)


def _finish(how: str) -> dict:
    """``finish_<how>``: out[j] = the combined partials part[t * width + j], t < count, in order of t."""
    body = Body()
    acc = _Accumulators(body)
    args = ["%k.lo: index", "%k.hi: index", "%k.count: index", "%k.width: index", "%k.n: f64"]
    args += ["%part: memref<?xf64>", "%out: memref<?xf32>"]
    _loop(body, "%k.j", "%k.lo", "%k.hi", [], 2)
    result = _loop(body, "%k.t", body.index(0), "%k.count", [("%k.acc", acc.neutral(how))], 3)
    at = body.op(f"arith.addi {body.op('arith.muli %k.t, %k.width : index', 4)}, %k.j : index", 4)
    part = body.op(f"memref.load %part[{at}] : memref<?xf64>", 4)
    combined = body.op(f"arith.{_COMBINE[how]} %k.acc, {part} : f64", 4)  # partials hold squares already
    body.raw(f"scf.yield {combined} : f64", 4)
    body.raw("}", 3)
    value = acc.finish(how, f"{result}#0", "%k.n", 3)
    body.raw(f"memref.store {value}, %out[%k.j] : memref<?xf32>", 3)
    body.raw("}", 2)
    doc = [f"combines the float64 partials of {how} reductions in a fixed order"]
    lines = _lines(f"finish_{how}", args, body.lines)
    return {"kind": "raw", "name": f"finish_{how}", "doc": doc, "args": args, "lines": lines}


def _function(step, args: list[str], lines: list[str]) -> dict:
    return {"kind": "raw", "name": step.name, "doc": _doc(step), "args": args, "lines": _lines(step.name, args, lines)}


def _lines(name: str, args: list[str], lines: list[str]) -> list[str]:
    head = f"  func.func @{name}({', '.join(args)}) attributes {{llvm.emit_c_interface}} {{"
    return [head, *lines, "    return", "  }"]


__all__ = ["CHUNK", "STRIPE", "emit", "modules"]
