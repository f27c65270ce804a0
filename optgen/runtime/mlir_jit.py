"""Run MLIR kernels modules: lower to LLVM, JIT once per process, call in place on torch tensors.

A generated ``mlir_<spec>.py`` holds MLIR text per variant (parameter dtype, layout) and a
``Kernels`` object.  On first use of a variant the text goes through ``PIPELINE`` and the MLIR
ExecutionEngine (opt level 3); the engine is cached per process by the text's hash.  A launch is
zero-copy: memref arguments are the tensors' ``data_ptr()``, and each kernel's team entry
(optgen/codegen/mlir_team.py) splits the element range (whole super-blocks for quantized state)
across ``torch.get_num_threads()`` threads of torch's OpenMP team in native code, so
``torch.set_num_threads`` is the knob; a launch is cut into up to ``PIECES_PER_THREAD`` pieces per
thread, each of ``MIN_ELEMENTS_PER_PIECE`` elements at least, and results are the same bits for any
thread count.  The foreign call releases the GIL.  Sizes are dynamic, so one compiled function
serves every numel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib
import itertools
import math
import os
import re
import struct
import threading
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from optgen.codegen.quant import QuantScheme
from optgen.runtime.quant_torch import _rank1_scales
from optgen.runtime.state import QuantizedState

PIPELINE = (
    "builtin.module("
    "arith-expand{include-bf16=true},"
    "func.func(convert-linalg-to-loops),"
    "convert-scf-to-cf,convert-cf-to-llvm,convert-vector-to-llvm,convert-math-to-llvm,arith-expand{include-bf16=true},convert-arith-to-llvm,"
    "expand-strided-metadata,finalize-memref-to-llvm,convert-func-to-llvm,convert-index-to-llvm,"
    "reconcile-unrealized-casts)"
)
OPT_LEVEL = 3
MIN_ELEMENTS_PER_PIECE = 1 << 15  # smaller tensors run on the calling thread alone
# pieces are claimed by whichever thread is free: a thread that another tenant (or the OS) slows
# leaves its later pieces to the others (one piece per thread: launches ~3-4% slower on 2 threads)
PIECES_PER_THREAD = 4
MIN_ROW = 128  # rank-1 kernels: elements per row of the (rows, cols) view they walk, where the shape allows
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


class MlirBackendError(RuntimeError):
    """The MLIR of a stage failed to lower or compile; the message names the file holding it."""


@dataclass(frozen=True)
class Stage:
    """One plan stage as the runtime calls it (tensor keys: "param", "grad" or a state key)."""

    name: str
    op: str  # "map" | "stats"
    tensors: tuple[str, ...]
    writes: tuple[str, ...]
    scalars: tuple[str, ...]
    target: str | None = None  # stats: the quantized state whose maxima it reduces


def memref(tensor: torch.Tensor) -> tuple[int, int]:
    """A 1-D memref argument over a contiguous tensor's storage (no copy): (address, length)."""
    return tensor.data_ptr(), tensor.numel()


class F64(float):
    """An f64 scalar argument (a plain float is an f32 one)."""


_PACKED = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_FUNCTIONS: dict[int, ctypes._CFuncPtr] = {}  # address -> callable (made once: creating one costs microseconds)
_LAYOUTS: dict[tuple[type, ...], struct.Struct] = {}
# the team entry's packed wrapper follows two pointers to the data: claim counter, pieces, count, args
_HEADER = "<5q"
_HEADER_BYTES = struct.calcsize(_HEADER)
_COUNTER_AT = 16  # byte offset of the claim counter (the data's first word)
_CODES = {tuple: "Qq", int: "q", float: "f4x", F64: "d"}
_MEMREF = struct.Struct("<Qq")
_COUNTER = struct.Struct("<q")


def _layout(kinds: tuple[type, ...]) -> struct.Struct:
    codes = [_HEADER]
    for kind in kinds:
        if kind not in _CODES:
            raise TypeError(f"MLIR call argument of type {kind.__name__}: expected a memref (tuple), int or float")
        codes.append(_CODES[kind])
    return struct.Struct("".join(codes))


def pieces(count: int, unit: int) -> int:
    """How many pieces a launch over ``count`` units of ``unit`` elements is split into: one on one
    thread, else ``PIECES_PER_THREAD`` per thread, each of ``MIN_ELEMENTS_PER_PIECE`` elements at least."""
    threads = num_threads()
    if threads == 1:
        return 1
    return max(1, min(PIECES_PER_THREAD * threads, count * unit // MIN_ELEMENTS_PER_PIECE, count))


def launch(team: int, count: int, args: list, split: int = 1) -> None:
    """Run a kernel over [0, count) in ``split`` pieces through its team entry (``team``: the address
    of ``<kernel>_team``, see optgen/codegen/mlir_team.py) on torch's OpenMP team, of at most
    ``torch.get_num_threads()`` threads; each thread claims pieces until none are left.

    ``args``: the kernel's arguments after lo/hi — a memref as ``memref()``'s (address, length), an
    i64 as an int, an f32 as a float, an f64 as an ``F64``.  They are written into one buffer by one
    ``struct.pack_into`` (layout made once per argument signature); the threads claim the pieces in
    native code.  torch's team, not a pool of our own: after a torch op its workers spin-wait on
    the other cores, so a second pool would only share those cores with them.  A plan's launches
    (``Launch``) pack their buffer once and rewrite only what changes per step."""
    buffer, _ = _pack(count, args, split)
    _start(team, ctypes.addressof(buffer), split)


def _pack(count: int, args: list, split: int) -> tuple[ctypes.Array, list[int]]:
    """A launch's data block (see ``launch``) and the byte offset of each argument in it."""
    kinds = tuple(arg.__class__ for arg in args)
    layout = _LAYOUTS.get(kinds) or _LAYOUTS.setdefault(kinds, _layout(kinds))
    buffer = ctypes.create_string_buffer(layout.size)
    base = ctypes.addressof(buffer)
    values: list = []
    for arg in args:
        if arg.__class__ is tuple:
            values += arg
        else:
            values.append(arg)
    layout.pack_into(buffer, 0, base + 8, base + 16, 0, split, count, *values)
    offsets = list(itertools.accumulate((struct.calcsize("<" + _CODES[kind]) for kind in kinds), initial=_HEADER_BYTES))
    return buffer, offsets[:-1]


def _start(team: int, base: int, split: int) -> None:
    """Runs the packed launch at address ``base`` (claim counter at 0) on torch's OpenMP team, of at
    most ``torch.get_num_threads()`` threads."""
    threads = min(split, num_threads())
    gomp = _gomp() if threads > 1 else None
    if gomp is not None:
        gomp.GOMP_parallel(team, base, threads, 0)  # ctypes releases the GIL for the whole launch
        return
    entry = _FUNCTIONS.get(team) or _FUNCTIONS.setdefault(team, _PACKED(team))
    if threads > 1:
        futures = [_pool().submit(entry, base) for _ in range(threads - 1)]
        entry(base)
        for future in futures:
            future.result()
    else:
        entry(base)


# -- compilation -----------------------------------------------------------------------------------
_ENGINES: dict[str, tuple] = {}
_LOCK = threading.Lock()


def failure_dir() -> Path:
    from optgen.codegen.build import cache_dir

    return cache_dir() / "mlir-failures"


def compile_module(spec: str, variant: str, source: str, pipeline: str = PIPELINE) -> dict[str, int]:
    """Function name → address of its packed wrapper, compiling ``source`` on first use."""
    digest = hashlib.sha256((pipeline + source).encode()).hexdigest()
    with _LOCK:
        if digest not in _ENGINES:
            _ENGINES[digest] = _compile(spec, variant, source, pipeline, digest)
        return _ENGINES[digest][2]


def _compile(spec: str, variant: str, source: str, pipeline: str, digest: str) -> tuple:
    from torch_mlir import ir
    from torch_mlir.execution_engine import ExecutionEngine
    from torch_mlir.passmanager import PassManager

    names = re.findall(r"func\.func @(\w+)\(", source)
    context = ir.Context()
    diagnostics: list[str] = []  # what passes and the JIT report through the context (not in the exception)

    def collect(diagnostic) -> bool:
        diagnostics.append(f"{diagnostic.location}: {diagnostic.message}")
        return True

    context.attach_diagnostic_handler(collect)
    step = "parsing"
    try:
        with context:
            module = ir.Module.parse(source)
            step = "lowering"
            PassManager.parse(pipeline).run(module.operation)
            step = "JIT compilation"
            engine = ExecutionEngine(module, opt_level=OPT_LEVEL)
            addresses = {name: engine.raw_lookup("_mlir_ciface_" + name) for name in names}
    except Exception as error:  # the bindings raise MLIRError / ValueError / RuntimeError
        path = failure_dir() / f"{spec}-{variant}-{digest[:12]}.mlir"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{source}\n// pipeline: {pipeline}\n")  # source first: diagnostics' line numbers hold
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] + diagnostics
        detail = "; ".join(dict.fromkeys(lines[:4])) or type(error).__name__
        stage = _failing_stage(source, " ".join(lines)) or ", ".join(names)
        raise MlirBackendError(
            f"MLIR backend: {step} failed for spec {spec!r}, variant {variant}, stage {stage}: {detail}. "
            f"The MLIR is in {path} (reproduce with: torch-mlir-opt --pass-pipeline='{pipeline}' {path}); "
            "backend='torch' avoids it"
        ) from error
    missing = [name for name, address in addresses.items() if not address]
    if missing:
        raise MlirBackendError(f"MLIR backend: spec {spec!r}, variant {variant}: no compiled function {missing}")
    return context, engine, addresses


def _failing_stage(source: str, message: str) -> str | None:
    """The function holding the first line a diagnostic points at (``<file>:LINE:COL``)."""
    match = re.search(r":(\d+):\d+", message)
    if not match:
        return None
    line = int(match.group(1))
    stage = None
    for number, text in enumerate(source.splitlines(), start=1):
        if number > line:
            break
        found = re.search(r"func\.func @(\w+)\(", text)
        if found:
            stage = found.group(1)
    return stage


# -- threads ---------------------------------------------------------------------------------------
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="optgen-mlir")
    return _POOL


def num_threads() -> int:
    return max(1, torch.get_num_threads())


@functools.cache
def _gomp():
    """The libgomp torch loaded (its OpenMP team), or None."""
    path = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if not path.is_file():
        return None
    try:
        library = ctypes.CDLL(str(path))
        library.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        library.GOMP_parallel.restype = None
    except (OSError, AttributeError):
        return None
    return library


# -- kernels ---------------------------------------------------------------------------------------
def reference_module(name: str):
    """The torch kernels module beside the MLIR module ``<package>.mlir_<suffix>``."""
    package, _, module = name.rpartition(".")
    return importlib.import_module(f"{package}.torch_{module[len('mlir_') :]}")


class Kernels:
    """The compiled variants of one spec's MLIR module and the calls that run a step."""

    def __init__(
        self,
        spec: str,
        sources: dict[str, str],
        stages: tuple[Stage, ...],
        schemes: dict[str, QuantScheme],
        superblocks: dict[str, dict[str, int]],  # layout -> stage -> elements per super-block
    ):
        self.spec, self.sources, self.stages, self.schemes, self.superblocks = (
            spec,
            sources,
            stages,
            schemes,
            superblocks,
        )
        self.rank1 = any(s.normalize == "rank1" for s in schemes.values())
        self._compiled: dict[str, tuple[str, dict[str, int]]] = {}
        self._plans = PerParam()  # a plan holds no tensor of the param's

    def functions(self, variant: str) -> dict[str, int]:
        source = self.sources[variant]
        cached = self._compiled.get(variant)
        if cached is None or cached[0] is not source:  # compiled once per variant (and per source text)
            cached = self._compiled[variant] = (source, compile_module(self.spec, variant, source))
        return cached[1]

    def variant(self, param: torch.Tensor, grad: torch.Tensor, state: dict) -> str | None:
        """The variant that runs this parameter, or None where the torch kernels must."""
        dtype = kernel_dtype(param, grad)
        if dtype is None:
            return None
        kept = 0  # quantized stores holding a float32 tensor (small tensors: keep_full_precision)
        for key, value in state.items():
            if key == "step":
                continue
            if key in self.schemes and isinstance(value, QuantizedState):
                if not (value.codes.is_contiguous() and value.scales.is_contiguous()):
                    return None
            elif not isinstance(value, torch.Tensor) or not value.is_contiguous() or value.device.type != "cpu":
                return None
            elif key in self.schemes:
                if value.dtype != torch.float32 or value.shape != param.shape:
                    return None
                kept += 1
        if kept:
            name = f"{dtype}-float"
            return name if kept == len(self.schemes) and name in self.sources else None
        layout = ("nd" if param.ndim >= 2 else "flat") if self.rank1 else "any"
        return self.fastest(f"{dtype}-{layout}")

    def fastest(self, name: str) -> str:
        """Variant ``name``, or its ``<name>-<isa>`` form where this CPU runs one (``host_isa``)."""
        fast = f"{name}-{host_isa()}"
        return fast if fast in self.sources else name

    def plan(self, param: torch.Tensor, grad: torch.Tensor, state: dict) -> LaunchPlan | None:
        """This parameter's launches, or None where the torch kernels must run it.  Made on its first
        step and again only when its tensors move (``param.data``, state replaced, thread count):
        making them cost ~40 µs (adamw) to ~100 µs (adamw4bit) per parameter and step."""
        if not (grad.dtype == param.dtype and grad.is_cpu and grad.is_contiguous()) or torch.compiler.is_compiling():
            return None
        key = _plan_key(param, state)
        plan = self._plans.get(param)
        if plan is None or plan.key != key:
            variant = self.variant(param, grad, state)
            if variant is None:
                return None
            plan = self._plans[param] = self._make_plan(variant, key, param, state)
        return plan

    def _make_plan(self, variant: str, key: tuple, param: torch.Tensor, state: dict) -> LaunchPlan:
        functions = self.functions(variant)
        tensors = {"param": param, "grad": GRAD, **state}
        if self.schemes and not variant.endswith("-float"):
            return self._quantized_plan(variant, key, functions, param, tensors)
        numel = param.numel()
        split = pieces(numel, 1)
        steps = [
            Launch(functions[f"{s.name}_team"], numel, [argument(tensors[k]) for k in s.tensors], s.scalars, split)
            for s in self.stages
            if s.op != "stats"  # the maxima behind quantization scales: none for float32 state
        ]
        return LaunchPlan(key, tuple(param.shape), steps, [], [])

    # -- quantized plans ---------------------------------------------------------------------------
    def _quantized_plan(
        self, variant: str, key: tuple, functions: dict, param: torch.Tensor, tensors: dict
    ) -> LaunchPlan:
        """The buffers the stats launches write and the write launches read are the plan's own."""
        layout = variant.split("-")[1]
        numel = param.numel()
        shape = tuple(param.shape)
        cut = rank1_cut(shape)
        cols = math.prod(shape[cut:]) if layout == "nd" else 1
        fixed = [numel, cols]
        steps: list = []
        stores: list[tuple[str, torch.Tensor | None]] = []
        new: dict[str, tuple] = {}  # rank-1 / per-tensor targets: (scales to store, kernel scale memrefs)
        olds: dict[str, tuple] = {}  # per key, memrefs of the kernel scales made from the stored ones
        held: list[torch.Tensor] = []  # the plan's buffers
        for stage in self.stages:
            block = self.superblocks[layout][stage.name]
            count = -(-numel // block)
            split = pieces(count, block)
            args = []
            for k in stage.tensors:
                args += self._bundle(k, tensors[k], shape, new.get(k), olds, held, steps, cut)
            if stage.op == "stats":
                target: QuantizedState = tensors[stage.target]
                normalize, _ = target.scheme.layout(shape)
                if normalize == "block":
                    continue  # block-wise: the write stage reduces each block itself
                sizes = (numel // cols, cols) if normalize == "rank1" else (1,)
                total = sum(sizes)
                # one row per piece (its row maxima, then its column maxima: for a matrix, the stored
                # scales' layout), each on cache lines of its own: threads sharing a line at the seams
                # stalled each other on every matrix row (1000x1000 stats on 2 threads: 1.25x -> 1.8x one's speed)
                maxima = torch.zeros(split, _whole_lines(total))
                held.append(maxima)
                base, width = maxima.data_ptr(), maxima.shape[1]
                outputs = [(base + 4 * sum(sizes[:i]), width) for i in range(len(sizes))]  # width: a piece's stride
                team = functions[f"{stage.name}_team"]
                steps.append(maxima.zero_)  # the kernel raises the maxima it finds there
                steps.append(Launch(team, count, [*fixed, *args, *outputs], stage.scalars, split))
                if split == 1:  # its row holds the maxima
                    merged = maxima[0, :total]
                else:
                    merged = torch.empty(total)
                    held.append(merged)
                    steps.append(functools.partial(torch.amax, maxima[:, :total], dim=0, out=merged))  # keeps NaN
                if normalize == "tensor":
                    new[stage.target] = merged, (memref(merged),)
                elif len(shape) == 2:  # the stored scales as they are, and their two parts
                    new[stage.target] = merged, _halves(merged, sizes[0])
                else:  # N-d rank-1: per-dim maxima and the kernels' scales made from the merged maxima
                    stored = torch.empty(sum(shape))
                    kernel = (torch.empty(numel // cols), torch.empty(cols))
                    held += [stored, *kernel]
                    steps.append(functools.partial(_new_scales, merged, sizes, shape, cut, stored, kernel))
                    new[stage.target] = stored, tuple(memref(t) for t in kernel)
                continue
            steps.append(Launch(functions[f"{stage.name}_team"], count, [*fixed, *args], stage.scalars, split))
            stores += [(k, new[k][0] if k in new else None) for k in stage.writes if k in self.schemes]
        return LaunchPlan(key, shape, steps, stores, held)

    @staticmethod
    def _bundle(
        key: str, value, shape: tuple, new: tuple | None, olds: dict, held: list, steps: list, cut: int
    ) -> list:
        """The memref arguments of one tensor (``arguments``), or a rank-1 / per-tensor quantized
        state's codes and scales.  ``olds``: per key, memrefs of the kernel scales made from the stored ones: the
        stored scales themselves, or (N-d rank-1) buffers of the plan (``held``) refilled by a step
        added to ``steps``; ``cut``: see ``rank1_cut``."""
        normalize = value.scheme.layout(shape)[0] if isinstance(value, QuantizedState) else None
        if normalize in (None, "block"):
            return arguments(value)
        if key not in olds:
            if normalize != "rank1":
                olds[key] = (memref(value.scales),)
            elif len(shape) == 2:
                olds[key] = _halves(value.scales, shape[0])
            else:
                kernel = (torch.empty(math.prod(shape[:cut])), torch.empty(math.prod(shape[cut:])))
                held += kernel
                steps.append(_OldScales(key, shape, cut, kernel))
                olds[key] = tuple(memref(t) for t in kernel)
        old = olds[key]
        fresh = new[1] if new is not None else old
        return [memref(value.codes), *old, *fresh]


class PerParam:
    """Values kept per parameter tensor, by identity, each dropped when its tensor is freed (torch's
    WeakIdKeyDictionary made a weak reference per lookup: ~4 µs of a parameter's step)."""

    def __init__(self):
        self._values: dict[int, object] = {}

    def get(self, param: torch.Tensor):
        return self._values.get(id(param))

    def __setitem__(self, param: torch.Tensor, value) -> None:
        key = id(param)
        if key not in self._values:  # an id is reused only after its tensor is freed, which drops the entry
            weakref.finalize(param, self._values.pop, key, None)
        self._values[key] = value

    def __getitem__(self, param: torch.Tensor):
        return self._values[id(param)]

    def __contains__(self, param: torch.Tensor) -> bool:
        return id(param) in self._values

    def __len__(self) -> int:
        return len(self._values)


@dataclass(eq=False)
class Slot:
    """A plan argument filled in per step: the gradient's memref (``GRAD``: autograd may allocate a
    new gradient each step), or a scratch buffer of ``numel`` entries allocated per step (``fill``:
    its first value, None: uninitialized).  A full-size scratch buffer kept between steps would be
    optimizer state by another name."""

    numel: int = 0
    dtype: torch.dtype = torch.float32
    fill: float | None = None

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


GRAD = Slot()


def argument(value) -> object:
    """A tensor's memref argument, or the ``Slot`` that stands for one until a step fills it in."""
    return value if isinstance(value, Slot) else memref(value)


def arguments(value) -> list:
    """The memref arguments of a tensor (or its ``Slot``), or of a block-wise quantized state: its
    codes, then its scales."""
    if isinstance(value, QuantizedState):
        return [memref(value.codes), memref(value.scales)]
    return [argument(value)]


@dataclass
class Launch:
    """A launch of a plan; ``args`` hold a ``Slot`` where the gradient or a scratch buffer goes, the
    scalars follow.  Its data block is packed once, with the fixed arguments; a run writes the
    slots' memrefs and the scalars into it and sets the claim counter back to 0 (packing every
    argument per run, in a new buffer, was ~5 µs of Python per launch)."""

    team: int
    count: int
    args: list
    scalars: tuple[str, ...]
    split: int

    def __post_init__(self) -> None:
        fixed = [(0, 0) if isinstance(arg, Slot) else arg for arg in self.args]
        self._buffer, offsets = _pack(self.count, fixed + [0.0] * len(self.scalars), self.split)
        self._base = ctypes.addressof(self._buffer)
        self._slots = [(at, arg) for at, arg in zip(offsets, self.args) if isinstance(arg, Slot)]
        self._scalars_at = offsets[len(self.args)] if self.scalars else 0
        self._scalars = struct.Struct("<" + _CODES[float] * len(self.scalars))

    def bind(self, slots: dict, state: dict, scalars: dict) -> Callable[[], None]:
        return functools.partial(self.run, slots, [scalars[name] for name in self.scalars])

    def run(self, slots: dict, values: list) -> None:
        """``slots``: their memrefs, filled in by the time the launch runs; ``values``: the scalars."""
        buffer = self._buffer
        for at, slot in self._slots:
            _MEMREF.pack_into(buffer, at, *slots[slot])
        self._scalars.pack_into(buffer, self._scalars_at, *values)
        _COUNTER.pack_into(buffer, _COUNTER_AT, 0)
        _start(self.team, self._base, self.split)


@dataclass
class _OldScales:
    """Refills an N-d rank-1 state's kernel scales (``kernel``: rows, cols) from its stored ones."""

    key: str
    shape: tuple
    cut: int
    kernel: tuple[torch.Tensor, torch.Tensor]

    def bind(self, slots: dict, state: dict, scalars: dict) -> Callable[[], None]:
        stored = state[self.key].scales
        return functools.partial(_fill_kernel_scales, stored.split(list(self.shape)), self.shape, self.cut, self.kernel)


_BOUND = (Launch, _OldScales)  # plan steps bound per step; the others (torch ops on held buffers) run as they are


@dataclass
class LaunchPlan:
    """One parameter's step as launches over fixed addresses (``key``: those addresses, see
    ``_plan_key``); ``steps``: launches, their fillers (``_OldScales``) and torch ops on ``held``,
    the plan's buffers; ``stores``: the quantized states written, with their new scales (None:
    written by the kernels); ``scratch``: buffers made per step."""

    key: tuple
    shape: tuple
    steps: list
    stores: list[tuple[str, torch.Tensor | None]]
    held: list[torch.Tensor]
    scratch: list[Slot] = field(default_factory=list)  # allocated per step

    def __post_init__(self) -> None:
        # the scratch as one allocation per step (one per slot was ~4 µs each, ~26 for sinkgd): slots
        # at cache-line offsets, those filled with one value next to each other so one fill_ sets them
        order = sorted(self.scratch, key=lambda slot: (slot.fill is None, str(slot.dtype), slot.fill or 0.0))
        self._offsets: dict[Slot, int] = {}
        self._fills: list[tuple[int, int, torch.dtype, float]] = []  # (first byte, end byte, dtype, value)
        size = 0
        for slot in order:
            self._offsets[slot] = size
            if slot.fill is not None:
                joins = bool(self._fills) and self._fills[-1][2:] == (slot.dtype, slot.fill)
                start = self._fills.pop()[0] if joins else size
                self._fills.append((start, size + slot.nbytes, slot.dtype, slot.fill))
            size += -(-slot.nbytes // 64) * 64
        self._arena_bytes = size

    def run(self, grad: torch.Tensor, state: dict, scalars: dict) -> None:
        """One step: now, or inside ``deferred()`` when the block ends."""
        slots = {GRAD: memref(grad)}
        calls = [s.bind(slots, state, scalars) if isinstance(s, _BOUND) else s for s in self.steps]
        if self.scratch:  # made when the job's launches run and dropped after them, so deferred jobs
            buffers: list[torch.Tensor] = []  # do not all hold theirs at once (sinkgd: 1.5x slower)
            calls = [functools.partial(self._allocate, slots, buffers), *calls, buffers.clear]
        job = _Job(calls, [(state[k], new) for k, new in self.stores], self.shape, self.held)
        queue = getattr(_DEFERRED, "jobs", None)
        if queue is None:
            _run_jobs([job])
        else:
            queue.append(job)

    def _allocate(self, slots: dict, buffers: list) -> None:
        arena = torch.empty(self._arena_bytes, dtype=torch.uint8)  # 64-byte aligned (torch's CPU allocator)
        buffers[:] = [arena]
        base = arena.data_ptr()
        slots.update((slot, (base + offset, slot.numel)) for slot, offset in self._offsets.items())
        for start, end, dtype, value in self._fills:  # gaps between a run's slots are filled too: unused
            arena[start:end].view(dtype).fill_(value)


def _plan_key(param: torch.Tensor, state: dict) -> tuple:
    """What a plan's launches depend on: the tensors' addresses (and identities: a state replaced by
    ``load_state_dict``), the shape, the thread count and the variants this CPU runs."""
    key = [param.data_ptr(), param.dtype, param.shape, num_threads(), host_isa()]
    for value in state.values():
        if isinstance(value, QuantizedState):
            key += (id(value), value.codes.data_ptr(), value.scales.data_ptr())
        elif isinstance(value, torch.Tensor):
            key += (id(value), value.data_ptr())
    return tuple(key)


@functools.cache
def host_isa() -> str:
    """The instruction set of the variants this CPU runs besides the portable ones: "avx512" or
    "avx2" where torch finds it (the JIT compiles for the host CPU), else "portable"."""
    return {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "portable")


def kernel_dtype(param: torch.Tensor, grad: torch.Tensor) -> str | None:
    """The param dtype's variant name where the kernels can take this param and grad (contiguous CPU
    tensors of one supported dtype, outside torch.compile), else None."""
    dtype = _DTYPES.get(param.dtype)
    if (
        dtype is None
        or param.device.type != "cpu"
        or grad.dtype != param.dtype
        or grad.device.type != "cpu"
        or param.numel() == 0
        or not param.is_contiguous()
        or not grad.is_contiguous()
        or torch.compiler.is_compiling()
    ):
        return None
    return dtype


def warn_if_not_finite(target: QuantizedState, shape: tuple) -> None:
    # scales are maxima of magnitudes (never negative) and amax propagates NaN: one reduction, a tenth
    # of isfinite().all()'s time, which mattered at ~40 µs per tensor and step
    if not math.isfinite(float(target.scales.amax())):
        warnings.warn(
            f"non-finite values (NaN/Inf) reached quantized optimizer state {target.scheme.name} of "
            f"shape {shape}: the affected blocks now dequantize to NaN/Inf. Check the gradients "
            "(clip them, or skip steps whose gradients are not finite, as torch.amp.GradScaler does).",
            RuntimeWarning,
            stacklevel=5,
        )


def _halves(scales: torch.Tensor, rows: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """A matrix's rank-1 scales (row maxima, then column maxima, contiguous) as the two memrefs the
    kernels read, without making views."""
    return (scales.data_ptr(), rows), (scales.data_ptr() + 4 * rows, scales.numel() - rows)


def _whole_lines(n: int) -> int:
    """``n`` float32 entries rounded up to whole 64-byte cache lines."""
    return -(-n // 16) * 16


def rank1_cut(shape: tuple) -> int:
    """The dim where rank-1 kernels cut an N-d parameter into the (rows, cols) view they walk: the
    last dims whose extent reaches ``MIN_ROW``, else all but the first.  The kernels walk a row at a
    time, so a conv weight (O, I, 3, 3) walked as (O * I * 3, 3) paid a loop per 3 elements (8x
    slower per element than a 1000x1000 matrix); as (O, I * 9) it does not."""
    cut = max(len(shape) - 1, 1)
    while cut > 1 and math.prod(shape[cut:]) < MIN_ROW:
        cut -= 1
    return cut


def _new_scales(
    merged: torch.Tensor, sizes: tuple, shape: tuple, cut: int, stored: torch.Tensor, kernel: tuple
) -> None:
    """From an N-d parameter's merged row and column maxima (the (rows, cols) view cut at ``cut``):
    the per-dim maxima to store into ``stored`` and the kernels' rank-1 scales into ``kernel``."""
    per_dim = []
    for vector, dims in zip(merged.split(sizes), (shape[:cut], shape[cut:])):  # row maxima, column maxima
        view = vector.view(dims)
        per_dim += [
            view.amax(dim=[d for d in range(view.ndim) if d != keep]) if view.ndim > 1 else vector
            for keep in range(view.ndim)
        ]
    torch.cat(per_dim, out=stored)
    _fill_kernel_scales(per_dim, shape, cut, kernel)


def _fill_kernel_scales(maxima, shape: tuple, cut: int, kernel: tuple[torch.Tensor, torch.Tensor]) -> None:
    """An N-d parameter's rank-1 scales as the kernels read them over the (rows, cols) view cut at dim
    ``cut``, from its per-dim maxima: per row the minimum of the leading dims' maxima, per column the
    minimum of the trailing dims'."""
    for buffer, part, dims in zip(kernel, (maxima[:cut], maxima[cut:]), (shape[:cut], shape[cut:])):
        buffer.view(dims).copy_(_rank1_scales(list(part), torch.Size(dims)))


def _store_scales(stores: list[tuple[QuantizedState, torch.Tensor | None, tuple]]) -> None:
    """After the write launches: each written state's new rank-1 / per-tensor scales (None: written
    by the kernels) stored and every state checked for NaN/Inf, in a few torch ops per step: a few
    per parameter cost ~30 µs each with the caches cold after the kernels."""
    copies = [(target.scales, new) for target, new, _ in stores if new is not None]
    if copies:
        torch._foreach_copy_(*map(list, zip(*copies)))
    if not math.isfinite(float(torch.stack(torch._foreach_max([target.scales for target, _, _ in stores])).max())):
        for target, _, shape in stores:  # max propagates NaN: the maxima of the states' scales are all finite, or
            warn_if_not_finite(target, shape)  # one is not


@dataclass
class _Job:
    """One parameter's step: its launches (and the torch ops between them) in order; the quantized
    states they write, with their new scales (see ``_store_scales``), of a parameter of ``shape``;
    ``held``: tensors the launches' memrefs point into."""

    calls: list
    stores: list[tuple[QuantizedState, torch.Tensor | None]]
    shape: tuple
    held: list


_DEFERRED = threading.local()


def host_scalars(compute: Callable[[object, dict], dict], step, hyper: dict) -> dict[str, float]:
    """``compute(step, hyper)``: a generated module's host scalars, as Python floats (what the
    launches pack).  Inside a ``deferred`` block they are computed once per hyperparameter dict and
    step value and shared by its parameters (~16 µs per parameter with the caches cold after a
    step's kernels).  The block's memo holds each dict, so no other dict takes its id while it
    lasts, and only optimizer code runs inside it, which changes no hyperparameter."""
    memo = getattr(_DEFERRED, "scalars", None)
    value, key = float(step), (id(hyper), compute)
    known = memo.get(key) if memo is not None else None
    if known is not None and known[1] == value:
        return known[2]
    scalars = {name: float(number) for name, number in compute(step, hyper).items()}
    if memo is not None:
        memo[key] = (hyper, value, scalars)
    return scalars


class deferred:
    """Inside the block each parameter's plan (``Kernels.plan``) queues its launches; at
    its end the queued launches run back to back, then the stored scales are updated.  Between
    kernels that stream megabytes, Python runs with cold caches: a step of 10 1000x1000 adamw4bit
    parameters spent ~20% of its time outside the kernels when each was made between launches.
    The queue runs even when the block raises (the parameters before it had their step counted).
    Host scalars are shared inside the block (``host_scalars``)."""

    def __enter__(self) -> None:
        self.outermost = getattr(_DEFERRED, "jobs", None) is None  # a nested block joins the outer queue
        if self.outermost:
            _DEFERRED.jobs, _DEFERRED.scalars = [], {}

    def __exit__(self, *exc) -> None:
        if self.outermost:
            jobs, _DEFERRED.jobs, _DEFERRED.scalars = _DEFERRED.jobs, None, None
            _run_jobs(jobs)


def _run_jobs(jobs: list[_Job]) -> None:
    for job in jobs:
        for call in job.calls:
            call()
    stores = [(target, new, job.shape) for job in jobs for target, new in job.stores]
    if stores:
        _store_scales(stores)


__all__ = ["Kernels", "MlirBackendError", "Stage", "compile_module"]
