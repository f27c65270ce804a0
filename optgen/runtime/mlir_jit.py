"""Run MLIR kernels modules: lower to LLVM, JIT once per process, call in place on torch tensors.

A generated ``mlir_<spec>.py`` holds MLIR text per variant (parameter dtype, layout) and a
``Kernels`` object.  On first use of a variant the text goes through ``PIPELINE`` and the MLIR
ExecutionEngine (opt level 3); the engine is cached per process by the text's hash.  Calls are
zero-copy: each memref argument is a descriptor over the tensor's ``data_ptr()``.  Element ranges
(whole super-blocks for quantized state) are split across ``torch.get_num_threads()`` threads, so
``torch.set_num_threads`` is the knob; a tensor gets one thread per ``MIN_ELEMENTS_PER_THREAD``
elements at most, and results are the same bits for any thread count.  The foreign call releases
the GIL.  Sizes are dynamic, so one compiled function serves every numel.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from optgen.codegen.quant import QuantScheme
from optgen.runtime.quant_torch import _rank1_scales
from optgen.runtime.state import QuantizedState

PIPELINE = (
    "builtin.module("
    "arith-expand{include-bf16=true},"
    "func.func(convert-linalg-to-loops),"
    "convert-scf-to-cf,convert-cf-to-llvm,convert-math-to-llvm,arith-expand{include-bf16=true},convert-arith-to-llvm,"
    "expand-strided-metadata,finalize-memref-to-llvm,convert-func-to-llvm,convert-index-to-llvm,"
    "reconcile-unrealized-casts)"
)
OPT_LEVEL = 3
MIN_ELEMENTS_PER_THREAD = 1 << 15  # smaller tensors run on the calling thread alone
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


def memref(tensor: torch.Tensor, start: int = 0, stop: int | None = None) -> tuple[int, int]:
    """A 1-D memref argument over elements [start, stop) of a contiguous tensor's storage (no copy):
    (address of element ``start``, length)."""
    stop = tensor.numel() if stop is None else stop
    return tensor.data_ptr() + start * tensor.element_size(), stop - start


class F64(float):
    """An f64 scalar argument (a plain float is an f32 one)."""


_PACKED = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_FUNCTIONS: dict[int, ctypes._CFuncPtr] = {}  # address -> callable (made once: creating one costs microseconds)


@dataclass(frozen=True)
class _Layout:
    """One buffer holding a call's arguments for a packed wrapper: per argument its value (a memref:
    its descriptor — allocated, aligned, offset, size, stride — then a pointer to it), then the
    ``void*`` array pointing at each (a memref: at that pointer)."""

    struct: struct.Struct
    descriptors: tuple[int | None, ...]  # per argument: its descriptor's offset (memrefs), else None
    pointers: tuple[int, ...]  # offset of what each packed entry points at
    packed: int  # offset of the packed array


_LAYOUTS: dict[tuple[type, ...], _Layout] = {}
_CODES = {int: "q", float: "f4x", F64: "d"}


def _layout(kinds: tuple[type, ...]) -> _Layout:
    codes, descriptors, pointers, offset = ["<"], [], [], 0
    for kind in kinds:
        if kind is tuple:
            codes.append("6q")
            descriptors.append(offset)
            pointers.append(offset + 40)
            offset += 48
        elif kind in _CODES:
            codes.append(_CODES[kind])
            descriptors.append(None)
            pointers.append(offset)
            offset += 8
        else:
            raise TypeError(f"MLIR call argument of type {kind.__name__}: expected a memref (tuple), int or float")
    codes.append(f"{len(kinds)}Q")
    return _Layout(struct.Struct("".join(codes)), tuple(descriptors), tuple(pointers), offset)


def _call(address: int, args: list) -> None:
    """Call an ``llvm.emit_c_interface`` function through its packed wrapper (``void**`` args).

    ``args``: a memref as ``memref()``'s (address, length), an i64 as an int, an f32 as a float, an
    f64 as an ``F64``.  They are written into one buffer by one ``struct.pack_into`` (its layout
    made once per argument signature): this runs once per tensor, stage and thread, and building
    a ctypes object per argument took twice as long."""
    kinds = tuple(arg.__class__ for arg in args)
    layout = _LAYOUTS.get(kinds) or _LAYOUTS.setdefault(kinds, _layout(kinds))
    buffer = ctypes.create_string_buffer(layout.struct.size)
    base = ctypes.addressof(buffer)
    values: list = []
    for arg, at in zip(args, layout.descriptors):
        if at is None:
            values.append(arg)
        else:
            values += (arg[0], arg[0], 0, arg[1], 1, base + at)
    values += [base + at for at in layout.pointers]
    layout.struct.pack_into(buffer, 0, *values)
    function = _FUNCTIONS.get(address)
    if function is None:
        function = _FUNCTIONS[address] = _PACKED(address)
    function(base + layout.packed)


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


def _parallel(run, count: int, unit: int) -> list:
    """``run(lo, hi)`` over [0, count) in contiguous pieces, one per thread; returns their results.

    The threads are torch's own OpenMP team where torch ships libgomp: after a torch op its workers
    spin-wait on the other cores, so a second thread pool would only share those cores with them
    (measured: adamw4bit on 2 threads as slow as on 1). Pieces are claimed, not assigned, so a team
    smaller than asked for (nested parallelism) still runs them all."""
    threads = min(num_threads(), max(1, count * unit // MIN_ELEMENTS_PER_THREAD), count)
    if threads <= 1:
        return [run(0, count)]
    bounds = [count * t // threads for t in range(threads + 1)]
    results: list = [None] * threads
    errors: list[BaseException] = []
    claim = itertools.count().__next__  # atomic under the GIL

    def work(_data=None) -> None:
        try:
            while (i := claim()) < threads:
                results[i] = run(bounds[i], bounds[i + 1])
        except BaseException as error:  # a ctypes callback cannot raise: hand it to the caller
            errors.append(error)

    gomp = _gomp()
    if gomp is not None:
        callback = _TEAM_BODY(work)
        gomp.GOMP_parallel(callback, None, threads, 0)
    else:
        futures = [_pool().submit(work) for _ in range(threads - 1)]
        work()
        for future in futures:
            future.result()
    if errors:
        raise errors[0]
    return results


_TEAM_BODY = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


@functools.cache
def _gomp():
    """The libgomp torch loaded (its OpenMP team), or None."""
    path = Path(torch.__file__).parent / "lib" / "libgomp.so.1"
    if not path.is_file():
        return None
    try:
        library = ctypes.CDLL(str(path))
        library.GOMP_parallel.argtypes = [_TEAM_BODY, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
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
        superblocks: dict[str, int],
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
        for key, value in state.items():
            if key == "step":
                continue
            if key in self.schemes:
                if not isinstance(value, QuantizedState) or not value.codes.is_contiguous():
                    return None
            elif not isinstance(value, torch.Tensor) or not value.is_contiguous() or value.device.type != "cpu":
                return None
        layout = ("nd" if param.ndim >= 2 else "flat") if self.rank1 else "any"
        return f"{dtype}-{layout}"

    def run(self, variant: str, param: torch.Tensor, grad: torch.Tensor, state: dict, scalars: dict) -> None:
        functions = self.functions(variant)
        tensors = {"param": param, "grad": grad, **state}
        if self.schemes:
            self._run_quantized(variant, functions, param, tensors, scalars)
            return
        numel = param.numel()
        for stage in self.stages:
            address = functions[stage.name]
            values = [float(scalars[n]) for n in stage.scalars]
            chosen = [tensors[k] for k in stage.tensors]

            def call(lo: int, hi: int, address=address, chosen=chosen, values=values) -> None:
                _call(address, [*(memref(t, lo, hi) for t in chosen), *values])

            _parallel(call, numel, 1)

    # -- quantized plans ---------------------------------------------------------------------------
    def _run_quantized(self, variant: str, functions: dict, param: torch.Tensor, tensors: dict, scalars: dict) -> None:
        layout = variant.split("-")[1]
        block = self.superblocks[layout]
        numel = param.numel()
        shape = tuple(param.shape)
        cols = shape[-1] if layout == "nd" else 1
        count = -(-numel // block)
        fixed = [numel, cols]
        new: dict[str, tuple] = {}  # rank-1 / per-tensor targets: (scales to store, kernel scale tensors)
        alive = []  # tensors the descriptors point into, held until the calls are done
        olds: dict[str, tuple] = {}
        for stage in self.stages:
            values = [float(scalars[n]) for n in stage.scalars]
            args = []
            for key in stage.tensors:
                args += self._bundle(key, tensors[key], shape, new.get(key), alive, olds)
            if stage.op == "stats":
                target: QuantizedState = tensors[stage.target]
                normalize, _ = target.scheme.layout(shape)
                if normalize == "block":
                    continue  # block-wise: the write stage reduces each block itself
                sizes = (numel // cols, cols) if normalize == "rank1" else (1,)

                def reduce(lo, hi, address=functions[stage.name], args=args, values=values, sizes=sizes):
                    maxima = [torch.zeros(n) for n in sizes]
                    _call(address, [lo, hi, *fixed, *args, *(memref(m) for m in maxima), *values])
                    return maxima

                parts = _parallel(reduce, count, block)
                maxima = [functools.reduce(torch.maximum, group) for group in zip(*parts)]  # keeps NaN
                new[stage.target] = _new_scales(maxima, shape, normalize)
                continue

            def write(lo, hi, address=functions[stage.name], args=args, values=values) -> None:
                _call(address, [lo, hi, *fixed, *args, *values])

            _parallel(write, count, block)
            for key in stage.writes:
                target = tensors[key]
                if not isinstance(target, QuantizedState):
                    continue
                if key in new:
                    target.scales.copy_(new[key][0])
                warn_if_not_finite(target, shape)

    @staticmethod
    def _bundle(key: str, value, shape: tuple, new: tuple | None, alive: list, olds: dict) -> list[tuple[int, int]]:
        """The memref arguments of one tensor: itself, or a quantized state's codes and scales.
        ``olds``: the kernel scales made from the stored ones, per key, made once per step."""
        if not isinstance(value, QuantizedState):
            return [memref(value)]
        normalize, _ = value.scheme.layout(shape)
        if normalize == "block":
            return [memref(value.codes), memref(value.scales)]
        if key not in olds:
            rank1 = normalize == "rank1"
            olds[key] = _kernel_scales(list(value.scales.split(list(shape))), shape) if rank1 else (value.scales,)
        old = olds[key]
        fresh = new[1] if new is not None else old
        alive += [*old, *fresh]
        return [memref(value.codes), *(memref(t) for t in old), *(memref(t) for t in fresh)]


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


def _kernel_scales(maxima: list[torch.Tensor], shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-1 scales as the kernels read them over the (rows, last dim) view: the minimum of
    the leading dims' maxima per row, and the last dim's maxima."""
    if len(shape) == 2:
        return maxima[0].contiguous(), maxima[1].contiguous()
    rows = _rank1_scales(maxima[:-1], torch.Size(shape[:-1])).reshape(-1).contiguous()
    return rows, maxima[-1].contiguous()


def _new_scales(maxima: list[torch.Tensor], shape: tuple, normalize: str) -> tuple:
    """From the stats kernels' maxima: (the scales to store, the tensors the write kernel reads)."""
    if normalize == "tensor":
        return maxima[0], (maxima[0],)
    rows, cols = maxima
    lead = rows.view(shape[:-1])
    per_dim = [
        lead.amax(dim=[d for d in range(lead.ndim) if d != keep]) if lead.ndim > 1 else lead
        for keep in range(lead.ndim)
    ]
    per_dim.append(cols)
    return torch.cat(per_dim), _kernel_scales(per_dim, shape)


__all__ = ["Kernels", "MlirBackendError", "Stage", "compile_module"]
