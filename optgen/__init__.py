"""optgen: a compiler for deep-learning optimizers (YAML spec → plan → kernels → torch.optim)."""

from __future__ import annotations

__version__ = "0.1.0"

from optgen.codegen.source import SpecError  # noqa: E402
from optgen.runtime.loader import build, load  # noqa: E402
from optgen.runtime.param_groups import param_groups  # noqa: E402

__all__ = ["SpecError", "build", "load", "optim", "param_groups", "__version__"]


def __getattr__(name: str):
    if name == "optim":
        import importlib

        return importlib.import_module("optgen.optim")
    raise AttributeError(f"module 'optgen' has no attribute '{name}'")
