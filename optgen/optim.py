"""Built-in optimizers, generated from optgen/specs/ on first use: ``optgen.optim.AdamW``."""

from __future__ import annotations

from optgen.codegen.spec import builtin_specs, load_spec


def _class_names() -> dict[str, str]:
    return {load_spec(path).class_name: name for name, path in builtin_specs().items()}


def __getattr__(name: str):
    names = _class_names()
    if name not in names:
        raise AttributeError(f"optgen.optim has no optimizer '{name}' (built-in: {', '.join(sorted(names))})")
    from optgen.runtime.loader import load

    cls = load(names[name])
    globals()[name] = cls
    return cls


def __dir__() -> list[str]:
    return sorted(_class_names())
