"""GeneratedOptimizer: the torch.optim.Optimizer every generated package subclasses.

A generated class declares its hyperparameters (``hypers``) and one ``Program`` per routed spec
(the spec itself, then its ``otherwise`` fall-backs); this class does what torch.optim users
expect — param groups, closures, schedulers, state_dict — and calls the generated kernels.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from types import ModuleType
from typing import Any, ClassVar

import torch

from optgen.runtime import distributed, mlir_jit
from optgen.runtime.state import QuantizedState

# "auto" picks per parameter: triton for CUDA tensors, mlir for CPU tensors, where the package has
# that backend's kernels for the spec; torch otherwise. Inside torch.compile CPU tensors use torch
# (traceable) and CUDA tensors keep triton (its kernels are torch.library custom ops).
BACKENDS = ("auto", "torch", "inductor", "mlir", "triton")
# Param-group key that overrides applies_to for a group: "auto" (the default: each parameter goes
# to the first routed spec whose applies_to holds), "fallback" (the last spec of the routing chain,
# which takes everything), or the name of a spec on the chain.  optgen.param_groups sets it.
ROUTE_KEY = "route"
# Param-group keys torch.optim optimizers save (a user's own group keys are kept untouched).
_TORCH_KEYS = {"foreach", "fused", "capturable", "differentiable", "amsgrad", "decoupled_weight_decay", "nesterov"}


@dataclass(frozen=True)
class Hyper:
    """A constructor keyword: its default and the interval its values must lie in."""

    key: str
    default: float | bool | tuple[float, ...]
    interval: tuple[float, float, bool, bool] | None = None

    def check(self, value: Any) -> None:
        if isinstance(self.default, bool):
            if not isinstance(value, (bool, int)) and not _is_scalar_tensor(value):
                raise TypeError(f"{self.key} must be a bool, got {value!r}")
            return
        values = value if isinstance(self.default, tuple) else (value,)
        if isinstance(self.default, tuple) and (
            not isinstance(value, (tuple, list)) or len(value) != len(self.default)
        ):
            raise ValueError(f"{self.key} must be a tuple of {len(self.default)} numbers, got {value!r}")
        for v in values:
            if _is_scalar_tensor(v):
                if v.is_floating_point() and torch.isnan(v).any() and not torch.compiler.is_compiling():
                    raise ValueError(f"Invalid {self.key} value: {value!r}")
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"{self.key} must be a number (or a 0-d tensor), got {v!r}")
            if math.isnan(v) or (self.interval and not _inside(v, self.interval)):
                raise ValueError(f"Invalid {self.key} value: {value!r} (expected {_show(self.interval)})")


def _is_scalar_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.numel() == 1


def _inside(v: float, interval: tuple[float, float, bool, bool]) -> bool:
    lo, hi, lo_closed, hi_closed = interval
    return (v >= lo if lo_closed else v > lo) and (v <= hi if hi_closed else v < hi)


def _show(interval) -> str:
    if interval is None:
        return "a number"
    lo, hi, lo_closed, hi_closed = interval
    return f"a value in {'[' if lo_closed else '('}{lo:g}, {hi:g}{']' if hi_closed else ')'}"


@dataclass(frozen=True)
class Program:
    """One routed spec: which parameters it takes and its kernels per backend."""

    name: str
    applies_to: Callable[[int, int], bool] | None  # (ndim, numel) -> takes it; None: every parameter
    hyper_keys: dict[str, str]  # spec hyper name -> param_group key
    state_keys: dict[str, str]  # spec state name -> state_dict key
    state_kinds: dict[str, str]  # state_dict key -> kind ("full", "rows", "cols", "scalar")
    kernels: dict[str, str]  # backend -> kernels module name inside ``package``
    package: str = ""
    shard_local: bool = True  # shards step on their own; else whole-tensor statistics are all-reduced
    whole_matrix: bool = False  # has matrix stages: shards are gathered, the work spread over ranks
    min_ndim: int = 0  # rows/cols values need parameters with this many dims
    _modules: dict[str, ModuleType] = field(default_factory=dict, compare=False, repr=False)

    def takes(self, param: torch.Tensor) -> bool:
        return self.applies_to is None or bool(self.applies_to(param.ndim, param.numel()))

    def module(self, backend: str) -> ModuleType:
        """The kernels module of ``backend``, imported on first use (triton is not imported on CPU)."""
        if backend not in self._modules:
            self._modules[backend] = importlib.import_module(f"{self.package}.{self.kernels[backend]}")
        return self._modules[backend]


class GeneratedOptimizer(torch.optim.Optimizer):
    hypers: ClassVar[tuple[Hyper, ...]] = ()
    programs: ClassVar[tuple[Program, ...]] = ()
    spec_sha256: ClassVar[str] = ""

    def __init__(self, params: Iterable, defaults: dict[str, Any], backend: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
        self.backend = backend
        self._updates: dict[tuple[str, str], Callable] = {}
        self._hypers: dict[tuple[int, str], tuple[tuple, dict[str, Any]]] = {}  # see _hyper_tensors
        for program in self.programs:
            program.module("torch")  # imported before any torch.compile trace reaches it
        super().__init__(params, defaults)

    # -- torch.optim API -------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for hyper in self.hypers:
            hyper.check(group[hyper.key])
        routes = ("auto", "fallback", *(program.name for program in self.programs))
        if group.get(ROUTE_KEY, "auto") not in routes:
            raise ValueError(f"invalid {ROUTE_KEY}={group[ROUTE_KEY]!r} in a param group; valid: {', '.join(routes)}")
        for p in group["params"]:
            if p.is_complex():
                raise ValueError(f"{type(self).__name__} does not support complex parameters")
        if self.backend == "triton" or (self.backend == "auto" and any(p.is_cuda for p in group["params"])):
            for program in self.programs:  # its custom ops must exist before a torch.compile trace
                if "triton" in program.kernels:
                    program.module("triton")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        spread = []  # sharded parameters with matrix stages: stepped together, see _step_spread
        with mlir_jit.deferred():  # MLIR launches are made per parameter, then run back to back
            for group in self.param_groups:
                hypers: dict[str, Any] = {}  # per program
                updates = []  # the group's unsharded parameters: (kernel, param, grad, state, hyper)
                for param in group["params"]:
                    grad = param.grad
                    if grad is None:
                        continue
                    if grad.is_sparse:
                        raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                    program = self._program_for(param, group)
                    hyper = hypers.get(program.name)
                    if hyper is None:
                        hyper = hypers[program.name] = self._hyper_tensors(group, program)
                    sharding = distributed.sharding_of(param)
                    if sharding is None:
                        kernel = self._kernel(program, param)
                        updates.append((kernel, param, grad, self._prepare(program, param, hyper, None), hyper))
                    elif program.whole_matrix:
                        spread.append((program, param, grad, hyper, sharding))
                    else:  # statistics of the whole tensor are all-reduced inside the kernels
                        with distributed.sharded(sharding):
                            state = self._prepare(program, param, hyper, sharding)
                            local_param = distributed.local(param)
                            kernel = self._kernel(program, local_param)
                            _run_updates([(kernel, local_param, distributed.local(grad), state, hyper)])
                _run_updates(updates)
        self._step_spread(spread)
        return loss

    def _step_spread(self, params: list) -> None:
        """Sharded parameters whose matrix stages need whole matrices: each rank computes a share.

        Pass 1 runs each update up to its first matrix stage (``on_whole`` raises ``Deferred``;
        generated code stores nothing before its end); ``spread_whole`` computes those stages, each
        on one rank, and hands every rank its part; pass 2 runs the updates with them.
        """
        runs, calls = [], []
        for program, param, grad, hyper, sharding in params:
            with distributed.sharded(sharding):
                state = self._prepare(program, param, hyper, sharding)
                _advance([state], 1)
                local_param = distributed.local(param)
                kernel = self._kernel(program, local_param)
                args = (local_param, distributed.local(grad), state, hyper)
                try:
                    with distributed.collecting():
                        kernel(*args)
                except distributed.Deferred as first:
                    runs.append((sharding, kernel, args))
                    calls.append((sharding, first.compute, first.args))
        for (sharding, kernel, args), result in zip(runs, distributed.spread_whole(calls), strict=True):
            with distributed.sharded(sharding), distributed.precomputed(result):
                kernel(*args)

    def _prepare(self, program: Program, param, hyper, sharding) -> dict:
        """The parameter's state, initialized on its first step (its ``step`` is advanced by
        ``_run_updates``); for a sharded (DTensor) parameter, the local views the kernels work on."""
        local_param = distributed.local(param)
        state = self.state[param]
        if not state:
            if param.ndim < program.min_ndim:
                raise ValueError(
                    f"{type(self).__name__} ({program.name}) needs parameters with at least {program.min_ndim} "
                    f"dims, got shape {tuple(param.shape)}; route smaller ones with applies_to/otherwise"
                )
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            fresh = program.module("torch").init_state(local_param, hyper)
            if sharding is not None:
                fresh = {
                    k: distributed.as_dtensor(v, program.state_kinds[k], sharding) if isinstance(v, torch.Tensor) else v
                    for k, v in fresh.items()
                }
            state.update(fresh)
        if sharding is not None:
            state = {k: distributed.local(v) for k, v in state.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # torch casts floating state to the parameter's dtype; ours has the dtype its spec stores,
        # so keep the saved tensors' own dtype (and exact values) and only move them to the device.
        saved = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        super().load_state_dict(state_dict)
        self._hypers.clear()  # new group dicts
        params = [(p, g) for g in self.param_groups for p in g["params"]]
        for saved_id, (param, group) in zip(saved_ids, params):
            if saved_id not in saved:
                continue
            program = self._program_for(param, group)
            state = self.state[param]
            missing = [k for k in program.state_keys.values() if k not in saved[saved_id]]
            if missing:
                raise KeyError(f"state_dict has no {', '.join(missing)} for a parameter of shape {tuple(param.shape)}")
            for key, value in saved[saved_id].items():
                if QuantizedState.is_saved(value):
                    state[key] = QuantizedState.from_saved(distributed.loaded_quantized(value, param), param.device)
                elif isinstance(value, torch.Tensor) and key != "step":
                    state[key] = value.detach().to(device=param.device, copy=True)
            if not isinstance(state.get("step"), torch.Tensor):
                # No count saved (torch.optim.SGD keeps none): the parameter has state, so it has
                # stepped at least once; 0 would make the next step look like the first one.
                state["step"] = torch.tensor(float(state.get("step", 1)), dtype=torch.float32)
            else:
                state["step"] = state["step"].to(dtype=torch.float32, device="cpu")
            for key, dtype in program.module("torch").STATE_DTYPES.items():
                if isinstance(state[key], torch.Tensor):
                    state[key] = state[key].to(dtype)
        self._check_loaded_groups()

    def _check_loaded_groups(self) -> None:
        # A torch.optim checkpoint brings its own group keys (foreach, fused, amsgrad, ...). Ones
        # that are off change nothing and are dropped; one that is on may ask for behaviour the
        # spec does not have, so say so (the spec's update is what runs).
        known = {h.key for h in self.hypers} | {"params", ROUTE_KEY}
        for group in self.param_groups:
            for key in [k for k in group if k not in known]:
                if group[key] in (None, False, 0):
                    del group[key]
                elif key in _TORCH_KEYS:
                    warnings.warn(
                        f"the loaded state_dict sets {key}={group[key]!r}, which is not a hyperparameter of "
                        f"{type(self).__name__} (optgen): it is ignored; the spec's update is what runs",
                        RuntimeWarning,
                        stacklevel=3,
                    )
                    del group[key]

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's format; quantized state is saved as plain tensors (codes, scales) + scheme."""
        saved = super().state_dict()
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))  # index -> param
        for index, live in saved["state"].items():
            state = saved["state"][index] = dict(live)  # torch hands out the live dicts
            sharding = distributed.sharding_of(params[index])
            for key, value in state.items():
                if isinstance(value, QuantizedState):
                    state[key] = value.to_saved()
                    if sharding is not None:  # DTensors over the whole tensor, so DCP can reshard
                        state[key] = distributed.saved_quantized(state[key], sharding, value.shape)
        return saved

    def state_bytes(self) -> int:
        """Bytes of memory held in optimizer state (every state tensor, step counters too)."""
        total = 0
        for state in self.state.values():
            for value in state.values():
                if isinstance(value, QuantizedState):
                    total += value.nbytes
                elif isinstance(value, torch.Tensor):
                    total += value.numel() * value.element_size()
        return total

    # -- internals -------------------------------------------------------------------------------
    def _program_for(self, param: torch.Tensor, group: dict[str, Any]) -> Program:
        route = group.get(ROUTE_KEY, "auto")
        if route == "fallback":
            return self.programs[-1]
        if route != "auto":
            return next(program for program in self.programs if program.name == route)
        for program in self.programs:
            if program.takes(param):
                return program
        return self.programs[-1]

    def _hyper_tensors(self, group: dict[str, Any], program: Program) -> dict[str, Any]:
        """The group's hyperparameters as 0-d tensors (float64; bool for flags) for the kernels, made
        again only when a value changes or is a tensor (a user's tensor lr may change in place):
        making them is a torch op per value, ~150 µs per step with the caches cold after a step."""
        traced = torch.compiler.is_compiling()  # a trace makes its own
        values = None if traced else _plain_key(tuple(group[key] for key in program.hyper_keys.values()))
        cached = self._hypers.get((id(group), program.name))
        if values is not None and cached is not None and cached[0] == values:
            return cached[1]
        out: dict[str, Any] = {}
        for name, key in program.hyper_keys.items():
            value = group[key]
            if isinstance(value, (tuple, list)):
                out[name] = tuple(torch.as_tensor(v, dtype=torch.float64) for v in value)
            elif isinstance(value, bool):
                out[name] = torch.tensor(value)
            else:
                out[name] = torch.as_tensor(value, dtype=torch.float64)
        if values is not None:
            self._hypers[(id(group), program.name)] = (values, out)
        return out

    def _kernel(self, program: Program, param: torch.Tensor) -> Callable:
        backend = self._backend_for(program, param)
        if backend in ("torch", "triton") and torch.compiler.is_compiling():
            return program.module(backend).update
        key = (program.name, backend)
        if key not in self._updates:
            if backend == "inductor":
                self._updates[key] = torch.compile(program.module("torch").update, backend="inductor")
            else:
                self._updates[key] = program.module(backend).update
        return self._updates[key]

    def _backend_for(self, program: Program, param: torch.Tensor) -> str:
        if self.backend == "auto":
            preferred = "triton" if param.is_cuda else "mlir"
            if torch.compiler.is_compiling() and preferred != "triton":
                return "torch"  # traceable; the triton kernels are custom ops, which trace as one op each
            if not program.shard_local and distributed.current() is not None:
                return "torch"  # its runtime helpers all-reduce whole-tensor statistics across shards
            return preferred if preferred in program.kernels else "torch"
        if not program.shard_local and distributed.current() is not None and self.backend != "torch":
            raise RuntimeError(
                f"{type(self).__name__}: spec {program.name!r} has statistics over whole tensors, which only the "
                f"torch backend combines across FSDP shards; use backend='torch' or 'auto', not {self.backend!r}"
            )
        if self.backend != "inductor" and self.backend not in program.kernels:
            raise RuntimeError(
                f"{type(self).__name__}: the {self.backend} backend has no kernels for spec {program.name!r}; "
                f"available: {', '.join(sorted(program.kernels))} (or backend='auto')"
            )
        return self.backend


def _advance(states: list[dict], by: int) -> None:
    """Step counters of many parameters moved in one torch op (one per parameter was ~3 µs each)."""
    if states:
        torch._foreach_add_([state["step"] for state in states], by)


def _run_updates(updates: list[tuple]) -> None:
    """``(kernel, param, grad, state, hyper)``: the step counters advanced, then the updates; when
    one raises, its counter and those of the parameters after it are set back (the ones before it
    were stepped: their MLIR launches run when the ``deferred`` block ends)."""
    states = [update[3] for update in updates]
    _advance(states, 1)
    for done, (kernel, param, grad, state, hyper) in enumerate(updates):
        try:
            kernel(param, grad, state, hyper)
        except BaseException:
            _advance(states[done:], -1)
            raise


def _plain_key(value: Any) -> tuple | None:
    """A key equal for equal hyperparameter values made of Python numbers (their types too: a bool
    flag becomes a bool tensor), or None where one is a tensor."""
    if type(value) in (float, int, bool):
        return (type(value), value)
    if type(value) in (tuple, list):
        keys = tuple(_plain_key(v) for v in value)
        return None if None in keys else keys
    return None
