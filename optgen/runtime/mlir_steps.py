"""Run the MLIR kernels of plans with reductions (``emit_mlir_steps``): launches over work units.

The parameter is viewed as (batch B, rows R, columns C).  Per step the runtime allocates the scratch
values that cross launches (float32: rows numel / C, cols B * C, scalar 1, full numel) and the
float64 partials of reductions along columns (one per stripe of ``stripe`` rows and column) and
over everything (one per work unit), calls each launch over its work units split across threads,
then ``finish_<op>`` over the partials (in unit order: the same bits for any thread count).
Compilation, the memref calling convention, the threads and the launch plans kept per parameter
(``StepKernels._make_plan``; scratch values and partials are ``Slot``s, made per step) are ``mlir_jit``'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from optgen.codegen.quant import QuantScheme
from optgen.runtime.mlir_jit import (
    F64,
    GRAD,
    Kernels,
    Launch,
    LaunchPlan,
    Slot,
    argument,
    arguments,
    kernel_dtype,
    pieces,
)
from optgen.runtime.state import QuantizedState

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_NEUTRAL = {"mean": 0.0, "sum": 0.0, "norm": 0.0, "amax": -math.inf, "amin": math.inf}


@dataclass(frozen=True)
class Step:
    """One launch: its function, the kind of entries it walks, tensor keys ("param", "grad", a
    state key, ``buf.NAME``), and the reductions it finishes through partials (buffer, op, dim)."""

    name: str
    domain: str  # "full" | "rows" | "cols" | "scalar"
    tensors: tuple[str, ...]
    writes: tuple[str, ...]
    scalars: tuple[str, ...]
    partials: tuple[tuple[str, str, int], ...] = ()
    quantized: bool = False  # touches quantized state: in the quantized variants, emit_mlir's super-block loop


class StepKernels(Kernels):
    """The compiled variants of a plan with reductions and the calls that run a step."""

    def __init__(
        self,
        spec: str,
        sources: dict[str, str],
        steps: tuple[Step, ...],
        buffers: dict[str, str],
        state_kinds: dict[str, tuple[str, str]],
        schemes: dict[str, QuantScheme],
        superblock: int,
        min_ndim: int,
        stripe: int,
        chunk: int,
    ):
        super().__init__(spec, sources, (), schemes, {})  # its quantized launches: self.superblock
        self.steps, self.buffers, self.state_kinds = steps, buffers, state_kinds
        self.min_ndim, self.stripe, self.chunk = min_ndim, stripe, chunk
        self.superblock = superblock

    def variant(self, param: torch.Tensor, grad: torch.Tensor, state: dict) -> str | None:
        """The variant for this parameter (quantized state as codes, or kept float32), or None."""
        dtype = kernel_dtype(param, grad)
        if dtype is None or param.ndim < self.min_ndim:
            return None
        quantized = set()
        extents = _extents(param.shape)
        for key, value in state.items():
            if key == "step":
                continue
            if isinstance(value, QuantizedState):
                if key not in self.schemes or not value.codes.is_contiguous():
                    return None
                quantized.add(key)
            elif (
                not isinstance(value, torch.Tensor)
                or key not in self.state_kinds
                or value.dtype != (torch.float32 if key in self.schemes else _TORCH[self.state_kinds[key][1]])
                or not value.is_contiguous()
                or value.device.type != "cpu"
                or value.numel() != extents[self.state_kinds[key][0]]  # the torch kernels say what is wrong
            ):
                return None
        if not self.schemes:
            return f"{dtype}-any"
        if quantized == set(self.schemes):
            return self.fastest(f"{dtype}-quantized")
        return f"{dtype}-float" if not quantized else None

    def _make_plan(self, variant: str, key: tuple, param: torch.Tensor, state: dict) -> LaunchPlan:
        """The launches, and the finishes of their partials, in order; every scratch value and partial
        is a ``Slot``, made per step (the plan keeps addresses, no buffer)."""
        functions = self.functions(variant)
        shape = tuple(param.shape)
        numel = param.numel()
        cols = shape[-1] if shape else 1
        rows = shape[-2] if len(shape) >= 2 else 1
        batch = numel // cols // rows
        stripes = -(-rows // self.stripe)
        extents = _extents(shape)
        tensors = {"param": param, "grad": GRAD, **state}
        scratch = [Slot(extents[kind]) for kind in self.buffers.values()]
        tensors |= dict(zip(self.buffers, scratch))
        steps, stores = [], []
        for step in self.steps:
            team = functions[f"{step.name}_team"]
            memrefs = [a for k in step.tensors for a in arguments(tensors[k])]
            if step.quantized and "-quantized" in variant:  # the float variant walks stripes
                count = -(-numel // self.superblock)
                args = [numel, cols, cols * rows, *memrefs]
                steps.append(Launch(team, count, args, step.scalars, pieces(count, self.superblock)))
                stores += [(k, None) for k in step.writes if isinstance(tensors[k], QuantizedState)]  # NaN check
                continue
            if step.domain == "full":
                units, per_unit = batch * stripes, self.stripe * cols
                fixed = [cols, rows, stripes, batch]
            else:
                units, per_unit = -(-extents[step.domain] // self.chunk), self.chunk
                fixed = [extents[step.domain]]
            partials = [
                Slot(stripes * batch * cols if dim == -2 else units, torch.float64, _NEUTRAL[how])
                for _, how, dim in step.partials
            ]
            scratch += partials
            args = [*fixed, *memrefs, *partials]
            steps.append(Launch(team, units, args, step.scalars, pieces(units, per_unit)))
            for (k, how, dim), partial in zip(step.partials, partials):
                count, width, n = (stripes, batch * cols, rows) if dim == -2 else (units, 1, extents[step.domain])
                finish = [count, width, F64(n), partial, argument(tensors[k])]
                steps.append(Launch(functions[f"finish_{how}_team"], width, finish, (), pieces(width, count)))
        return LaunchPlan(key, shape, steps, stores, [], scratch)


def _extents(shape: tuple) -> dict[str, int]:
    """Entries of each kind of value for a parameter of ``shape`` (viewed as batch x rows x cols)."""
    numel = math.prod(shape)
    cols = shape[-1] if shape else 1
    rows = shape[-2] if len(shape) >= 2 else 1
    return {"full": numel, "rows": numel // cols, "cols": numel // rows, "scalar": 1}


__all__ = ["Step", "StepKernels"]
