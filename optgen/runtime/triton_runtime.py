"""Runtime of the Triton backend: layouts, launches and the torch custom op around a step.

A generated ``triton_<spec>.py`` holds the kernels (one per plan stage) and calls ``step`` from its
``update``.  ``step`` works out each state's layout for this parameter and calls the module's
custom op (``torch.library.custom_op`` with a fake implementation), so ``torch.compile`` sees one
opaque, in-place op per parameter: no graph break, and the hyperparameters travel in a float32
tensor (``host_vector``), so a new lr never recompiles anything.  The op launches the stats
kernels (rank-1 / per-tensor maxima into fresh scales), then the map kernel, then commits the
scales.  Launch configurations come from ``optgen.runtime.autotune``.
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
    op: str  # "map" | "stats"
    kernel: Any
    reduces: int = -1  # stats: the state whose maxima it folds


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
    if not param.is_cuda and not interpreted(stages[0].kernel):
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


def step_op(name: str, stages: tuple, state_keys: tuple, schemes: tuple, spec_sha256: str):
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
        run_stages(stages, state_keys, schemes, spec_sha256, param, grad, states, scales, host, layouts, qblocks, shape)

    op = torch.library.custom_op(f"optgen_triton::{name}", run, mutates_args=("param", "states", "scales"))

    @op.register_fake
    def _(param, grad, states, scales, host, layouts, qblocks, shape) -> None:
        return None

    _OPS[name] = op
    return op


def run_stages(stages, state_keys, schemes, spec_sha256, param, grad, states, scales, host, layouts, qblocks, shape):
    numel = param.numel()
    dims = ([1] * MAX_RANK1_DIMS + list(shape))[-MAX_RANK1_DIMS:]
    new_scales = [torch.zeros_like(s) if layout in (RANK1, TENSOR) else s for s, layout in zip(scales, layouts)]
    args: list[Any] = [param, grad]
    meta: dict[str, int] = {}
    for i, (key, scheme) in enumerate(zip(state_keys, schemes)):
        if scheme is None:
            args.append(states[i])
            continue
        table, mids = _tables(scheme, param.device)
        args += [states[i], scales[i], new_scales[i], table, mids]
        meta[f"{key.upper()}_LAYOUT"] = layouts[i]
        meta[f"{key.upper()}_QBLOCK"] = qblocks[i]
    args += [host, numel, *dims]
    meta["NDIM"] = max(len(shape), 1)
    multiple = math.lcm(2, *qblocks)
    device = _device_name(param.device)
    for stage in stages:
        if stage.op == "stats" and layouts[stage.reduces] not in (RANK1, TENSOR):
            continue  # block / float layout for this parameter: the write kernel needs no maxima
        _launch(stage, args, meta, numel, multiple, device, spec_sha256, state_keys, schemes)
    for old, new in zip(scales, new_scales):
        if new is not old:
            old.copy_(new)


def _launch(stage, args, meta, numel, multiple, device, spec_sha256, state_keys, schemes) -> None:
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
