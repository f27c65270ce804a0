"""Load: a spec (path or built-in name) → its generated optimizer class, built through the cache."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from optgen.codegen import build as _build
from optgen.codegen.spec import load_spec

_loaded: dict[str, type] = {}


def build(spec: str | Path, out_dir: str | Path) -> Path:
    """Write the generated package for ``spec`` to ``out_dir/<name>/`` and return its path."""
    return _build.build(spec, out_dir)


def load(spec: str | Path, backend: str = "auto") -> type:
    """The optimizer class generated from ``spec``: a spec file, a built-in name such as "adamw",
    or a package folder written by ``optgen build``.

    ``backend`` becomes the class's default backend; the constructor's ``backend=`` overrides it.
    """
    if (Path(spec) / "manifest.json").is_file():
        cls = _load_package(Path(spec))
    else:
        parsed = load_spec(spec)
        key = _build.cache_key(parsed)
        if key not in _loaded:
            package = _build.cached_build(parsed)
            module = import_package(package, f"optgen_generated_{parsed.name}_{key}")
            _loaded[key] = getattr(module, parsed.class_name)
        cls = _loaded[key]
    if backend == "auto":
        return cls
    return type(cls.__name__, (cls,), {"__init__": _with_backend(cls.__init__, backend), "__module__": cls.__module__})


def _load_package(path: Path) -> type:
    manifest = json.loads((path / "manifest.json").read_text())
    key = f"optgen_built_{manifest['name']}_{manifest['spec_sha256'][:16]}_{manifest['generator'][:8]}"
    return getattr(import_package(path, key), manifest["class"])


def _with_backend(init, backend: str):
    def __init__(self, params, *args, **kwargs):
        kwargs.setdefault("backend", backend)
        init(self, params, *args, **kwargs)

    __init__.__wrapped__ = init
    return __init__


def import_package(path: Path, module_name: str):
    """Import a generated package folder under ``module_name`` (its relative imports work)."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(
        module_name, Path(path) / "__init__.py", submodule_search_locations=[str(path)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
