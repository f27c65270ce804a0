"""Runtime of the Triton backend: layouts, launches and the torch custom op around a step.

A generated ``triton_<spec>.py`` holds the kernels (one per plan stage) and calls ``step`` from its
``update``.  ``step`` works out each state's layout for this parameter and calls the module's
custom op (``torch.library.custom_op`` with a fake implementation), so ``torch.compile`` sees one
opaque, in-place op per parameter: no graph break, and the hyperparameters travel in a float32
tensor (``host_vector``), so a new lr never recompiles anything.  The op runs the module's
launches in order — stats kernels (rank-1 / per-tensor maxima into fresh scales), map kernels,
reduction kernels, and matrix stages (torch functions, called here so they stay inside the op) —
with float32 scratch tensors for the values that cross launches, then commits the scales.  Map
launch configurations come from ``optgen.runtime.autotune``; reduction tiles from ``_tiles``.
"""

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction

from optgen.codegen.quant import QuantScheme, midpoints
from optgen.runtime import autotune
from optgen.runtime.state import QuantizedState

FLOAT, BLOCK, RANK1, TENSOR = 0, 1, 2, 3  # as optgen.runtime.triton_lib
_LAYOUTS = {"block": BLOCK, "rank1": RANK1, "tensor": TENSOR}
MAX_RANK1_DIMS = 4


@dataclass(frozen=True)
class KernelStage:
    name: str
    op: str  # "map" | "stats" | "reduce" | "matrix"
    kernel: Any  # a Triton kernel; for "matrix" a Python function of an ``Env``
    domain: str = "full"  # the elements a map / stats / reduce kernel walks: full, rows, cols or scalar
    reduces: int = -1  # stats: the state whose maxima it folds
    # reduce: -1 (a program owns whole rows), -2 (a program owns a stripe of rows of one matrix and
    # writes partial columns; a reduction along rows may ride along), 0 (all: one partial per program)
    dim: int = 0
    combine: str = ""  # dim 0: the reduction the partials finish ("mean", "sum", "norm", "amax", "amin")
    columns: str = ""  # dim -2: the reduction along columns the partials finish
    output: int = -1  # dims 0 and -2: the scratch buffer the runtime finishes from the partials


class Env:
    """What a matrix stage reads and writes: float32 views of the step's tensors."""

    def __init__(self, param, grad, states, buffers, host, shape):
        self._param, self._grad, self._states, self._buffers, self._host = param, grad, states, buffers, host
        self._shape = shape

    def param(self) -> torch.Tensor:
        return self._param.view(self._shape).float()

    def grad(self) -> torch.Tensor:
        return self._grad.view(self._shape).float()

    def state(self, index: int) -> torch.Tensor:
        return self._states[index].float()

    def host(self, index: int) -> torch.Tensor:
        return self._host[index]

    def buffer(self, name: str) -> torch.Tensor:
        return self._buffers[name]

    def set_param(self, value: torch.Tensor) -> None:
        self._param.view(self._shape).copy_(value)

    def set_state(self, index: int, value: torch.Tensor) -> None:
        self._states[index].copy_(value)

    def set_buffer(self, name: str, value: torch.Tensor) -> None:
        self._buffers[name] = value.float().reshape(self._buffers[name].shape).contiguous()


def interpreted(kernel: Any) -> bool:
    return isinstance(kernel, InterpretedFunction)


def host_vector(values: tuple, param: torch.Tensor) -> torch.Tensor:
    """Hyperparameters and host scalars (0-d float64/bool tensors) as one float32 device vector.
    torch rounds a 0-d float64 operand to float32 against a float32 tensor too, so the kernels
    see the same numbers as the torch kernels."""
    if not values:
        return param.new_zeros(1, dtype=torch.float32)
    stacked = torch.stack([torch.as_tensor(v).to(torch.float64) for v in values])
    return stacked.to(device=param.device, dtype=torch.float32)


def step(op, stages: tuple, param: torch.Tensor, grad: torch.Tensor, states: list, host) -> None:
    """One in-place step of one parameter through the module's custom op."""
    if param.numel() == 0:
        return
    kernels = [stage.kernel for stage in stages if stage.op != "matrix"]
    if not param.is_cuda and kernels and not interpreted(kernels[0]):
        raise RuntimeError(
            f"the triton backend runs on CUDA tensors; this parameter is on {param.device.type}. Use "
            "backend='auto' or 'torch' here, or set TRITON_INTERPRET=1 before the Triton kernels are first "
            "imported to run them in Triton's (slow) CPU interpreter, as the tests do"
        )
    layouts, qblocks, data, scales = [], [], [], []
    for value in states:
        if isinstance(value, QuantizedState):
            normalize, block = value.scheme.layout(tuple(value.shape))
            if normalize == "rank1" and len(value.shape) > MAX_RANK1_DIMS:
                raise NotImplementedError(
                    f"the triton backend handles rank-1 state up to {MAX_RANK1_DIMS} dims, got shape "
                    f"{tuple(value.shape)}; use backend='torch' for this optimizer"
                )
            layouts.append(_LAYOUTS[normalize])
            qblocks.append(block or 1)
            data.append(value.codes)
            scales.append(value.scales)
        else:
            layouts.append(FLOAT)
            qblocks.append(1)
            data.append(value.contiguous())
            scales.append(value.new_empty(0, dtype=torch.float32))
    work = param.contiguous()  # the kernels walk row-major element order (the codes' order)
    op(work, grad.contiguous(), data, scales, host, layouts, qblocks, list(param.shape))
    if work is not param:
        param.copy_(work)
    for value, contiguous in zip(states, data, strict=True):
        if isinstance(value, torch.Tensor) and contiguous is not value:
            value.copy_(contiguous)


_OPS: dict[str, Any] = {}


def step_op(name: str, stages: tuple, state_keys: tuple, schemes: tuple, spec_sha256: str, buffers: tuple = ()):
    """The custom op ``optgen_triton::<name>`` (``name`` hashes the module's source, so a module
    imported again — another cache folder, same code — reuses the op registered first)."""
    if name in _OPS:
        return _OPS[name]

    def run(
        param: torch.Tensor,
        grad: torch.Tensor,
        states: list[torch.Tensor],
        scales: list[torch.Tensor],
        host: torch.Tensor,
        layouts: list[int],
        qblocks: list[int],
        shape: list[int],
    ) -> None:
        run_stages(
            stages,
            state_keys,
            schemes,
            spec_sha256,
            buffers,
            param,
            grad,
            states,
            scales,
            host,
            layouts,
            qblocks,
            shape,
        )

    op = torch.library.custom_op(f"optgen_triton::{name}", run, mutates_args=("param", "states", "scales"))

    @op.register_fake
    def _(param, grad, states, scales, host, layouts, qblocks, shape) -> None:
        return None

    _OPS[name] = op
    return op


def run_stages(
    stages, state_keys, schemes, spec_sha256, buffers, param, grad, states, scales, host, layouts, qblocks, shape
):
    numel = param.numel()
    dims = ([1] * MAX_RANK1_DIMS + list(shape))[-MAX_RANK1_DIMS:]
    cols = shape[-1] if shape else 1
    rows = shape[-2] if len(shape) >= 2 else 1
    extents = {"full": numel, "rows": numel // cols, "cols": numel // rows, "scalar": 1}
    kind_shapes = {
        "full": tuple(shape),
        "rows": (*shape[:-1], 1),
        "cols": (*shape[:-2], 1, cols),
        "scalar": (),
    }
    scratch = {name: param.new_empty(kind_shapes[kind], dtype=torch.float32) for name, kind in buffers}
    new_scales = [torch.zeros_like(s) if layout in (RANK1, TENSOR) else s for s, layout in zip(scales, layouts)]
    head: list[Any] = [param, grad]
    meta: dict[str, int] = {}
    for i, (key, scheme) in enumerate(zip(state_keys, schemes)):
        if scheme is None:
            head.append(states[i])
            continue
        table, mids = _tables(scheme, param.device)
        head += [states[i], scales[i], new_scales[i], table, mids]
        meta[f"{key.upper()}_LAYOUT"] = layouts[i]
        meta[f"{key.upper()}_QBLOCK"] = qblocks[i]
    tail = [host, numel, *dims, rows, cols]
    meta["NDIM"] = max(len(shape), 1)
    multiple = math.lcm(2, *qblocks)
    device = _device_name(param.device)
    nothing = param.new_empty(0, dtype=torch.float32)
    for stage in stages:
        if stage.op == "stats" and layouts[stage.reduces] not in (RANK1, TENSOR):
            continue  # block / float layout for this parameter: the write kernel needs no maxima
        if stage.op == "matrix":
            stage.kernel(Env(param, grad, states, scratch, host, tuple(shape)))
            continue
        extent = extents[stage.domain]
        if stage.op == "reduce":
            _reduce(stage, head + list(scratch.values()), tail, meta, extent, rows, cols, scratch, buffers)
            continue
        args = [*head, *scratch.values(), nothing, *tail]
        _launch(stage, args, meta, extent, multiple, device, spec_sha256, state_keys, schemes)
    for old, new in zip(scales, new_scales):
        if new is not old:
            old.copy_(new)


_TILE = 4096  # elements a reduction program holds per loop step


def _finish(how: str, partials: torch.Tensor, dim: int, count: int) -> torch.Tensor:
    """Combine per-program partials along ``dim`` (in a fixed order: a step is deterministic)."""
    if how in ("amax", "amin"):
        return getattr(partials, how)(dim=dim)
    total = partials.sum(dim=dim)
    return total / count if how == "mean" else total.sqrt() if how == "norm" else total


def _tiles(inner: int, cap: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): a tile of ``_TILE`` elements, at most ``cap`` along the contiguous dim."""
    block_n = min(triton.next_power_of_2(max(inner, 1)), cap)
    return _TILE // block_n, block_n


def _reduce(stage, head, tail, meta, extent, rows, cols, scratch, buffers) -> None:
    """A reduction launch: along rows each program owns whole rows and loops over the columns;
    along columns each program owns a stripe of rows of one matrix (also looping over the columns,
    so a reduction along rows can share the pass) and writes its partial column results; ``all``
    writes one partial per program. Partials are combined here, in a fixed order."""
    batches = extent // max(rows * cols, 1)
    if stage.dim == 0:
        block = min(triton.next_power_of_2(max(extent, 1)), _TILE)
        grid = triton.cdiv(extent, block)
        partials = head[0].new_empty(grid, dtype=torch.float32)
        stage.kernel[(grid,)](*head, partials, *tail, **meta, BLOCK=block, num_warps=4)
        scratch[buffers[stage.output][0]].copy_(_finish(stage.combine, partials, 0, extent))
        return
    if stage.dim == -2:
        block_m, block_n = _tiles(cols, 128)  # tall stripes: few partials per column
        stripes = triton.cdiv(rows, block_m)
        grid = batches * stripes
        partials = head[0].new_empty((batches, stripes, cols), dtype=torch.float32)
    else:
        block_m, block_n = _tiles(cols, 1024)
        grid = triton.cdiv(extent // max(cols, 1), block_m)
        partials = head[0].new_empty(0, dtype=torch.float32)
    stage.kernel[(grid,)](*head, partials, *tail, **meta, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)
    if stage.dim == -2:
        target = scratch[buffers[stage.output][0]]
        target.copy_(_finish(stage.columns, partials, 1, rows).view(target.shape))


def _launch(stage, args, meta, numel, multiple, device, spec_sha256, state_keys, schemes) -> None:
    if numel == 0:
        return
    session = autotune.active_session()
    if session is None:
        config = autotune.config_for(device, spec_sha256, stage.name, numel)
        block = max(config["BLOCK"], multiple)  # a tile holds whole quantization blocks (powers of two)
        grid = (triton.cdiv(numel, block),)
        stage.kernel[grid](*args, **meta, BLOCK=block, num_warps=config["num_warps"], num_stages=config["num_stages"])
        return
    configs = [
        triton.Config({"BLOCK": c["BLOCK"]}, num_warps=c["num_warps"], num_stages=c["num_stages"])
        for c in session.configs(multiple)
    ]
    quantized = [key for key, scheme in zip(state_keys, schemes) if scheme is not None]
    if stage.op == "stats":
        restore, reset = [], [f"{state_keys[stage.reduces]}_new_scales_ptr"]
    else:  # every tensor the kernel writes in place goes back between configurations
        restore = ["param_ptr", *(f"{k}_ptr" for k in state_keys), *(f"{k}_scales_ptr" for k in quantized)]
        reset = []
    tuner = triton.autotune(
        configs,
        key=["numel"],
        restore_value=restore,
        reset_to_zero=reset,
        do_bench=autotune.cpu_bench if interpreted(stage.kernel) else None,
    )(stage.kernel)
    tuner[lambda m: (triton.cdiv(numel, m["BLOCK"]),)](*args, **meta)
    best = tuner.best_config
    chosen = {"BLOCK": best.kwargs["BLOCK"], "num_warps": best.num_warps, "num_stages": best.num_stages}
    session.keep(device, spec_sha256, stage.name, numel, chosen)


_TABLES: dict[tuple[QuantScheme, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _tables(scheme: QuantScheme, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The table and midpoints as float32 device tensors (8-bit kernels gather from them)."""
    key = (scheme, device)
    if key not in _TABLES:
        values = scheme.values
        _TABLES[key] = (
            torch.tensor(values, dtype=torch.float32, device=device),
            torch.tensor(midpoints(values), dtype=torch.float32, device=device),
        )
    return _TABLES[key]


@functools.cache
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}-interpreter"
