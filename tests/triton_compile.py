"""Compile a spec's generated Triton kernels to PTX for a Hopper GPU, without a GPU.

The CPU interpreter runs kernels as numpy code and accepts some programs the compiler rejects (a
``tl.constexpr`` reassigned in a loop, say), so the tests also compile every launch of a few specs
with triton's own compiler (``triton.compile`` of an ``ASTSource`` for ``GPUTarget("cuda", 90, 32)``:
TTIR, TTGIR, LLVM IR and PTX, no driver needed). Run as a script, in a process without
TRITON_INTERPRET (the test session sets it, and the kernels pick the interpreter when decorated):

    python tests/triton_compile.py SPEC...   # prints one line per kernel and layout, exits 1 on a failure
"""

from __future__ import annotations

import importlib
import os
import sys

LAYOUTS = {"float": (0, 1), "block": (1, 128), "rank1": (2, 1)}  # (LAYOUT, QBLOCK) of a quantized state
META = {"NDIM": 2, "BLOCK": 1024, "BLOCK_M": 32, "BLOCK_N": 128}


def compile_spec(spec: str) -> list[str]:
    """One line per kernel and quantized layout: ``<program> <kernel> <layout> ok|FAILED ...``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    import optgen

    lines = []
    for program in optgen.load(spec).programs:
        module = importlib.import_module(f"{program.package}.{program.kernels['triton']}")
        quantized = {k for k, scheme in zip(module.STATE_KEYS, module.SCHEMES) if scheme is not None}
        for stage in module.STAGES:
            if stage.op == "matrix":  # torch code
                continue
            for layout, (code, qblock) in LAYOUTS.items() if quantized else [("float", LAYOUTS["float"])]:
                signature, constants = {}, {}
                for index, param in enumerate(stage.kernel.params):
                    name = param.name
                    if param.is_constexpr:
                        signature[name] = "constexpr"
                        value = code if name.endswith("_LAYOUT") else qblock if name.endswith("_QBLOCK") else None
                        constants[(index,)] = META[name] if value is None else value
                    elif name.endswith("_ptr"):
                        signature[name] = "*u8" if name.removesuffix("_ptr") in quantized else "*fp32"
                    else:
                        signature[name] = "i32"
                try:
                    triton.compile(ASTSource(stage.kernel, signature, constants), target=GPUTarget("cuda", 90, 32))
                    lines.append(f"{program.name} {stage.name} {layout} ok")
                except Exception as error:  # noqa: BLE001 - report every kernel, then fail
                    cause = error
                    while cause.__cause__ is not None:
                        cause = cause.__cause__
                    lines.append(f"{program.name} {stage.name} {layout} FAILED {cause}")
    return lines


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: the compiler, not the interpreter, is under test")
    results = [line for spec in sys.argv[1:] for line in compile_spec(spec)]
    print("\n".join(results))
    sys.exit(1 if any(" FAILED " in line for line in results) else 0)
