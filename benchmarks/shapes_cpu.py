"""CPU step time per parameter shape: where the generated MLIR kernels fall off a cliff.

    python benchmarks/shapes_cpu.py                  # ~2M elements per shape, 1 thread
    python benchmarks/shapes_cpu.py --threads 2

Each shape (a square matrix, conv weights, LoRA factors, a 1-D vector, a tall-skinny matrix) is a
list of tensors of about ``--elements`` elements in all; every optimizer steps the same tensors,
round-robin, and the median per-round ratio to torch.optim.AdamW(fused=True) is reported with the
median nanoseconds per element.  A shape whose ratio is far above the square matrix's is a cliff
in the kernels' loop structure (rank-1 row segments, block seams), not in the arithmetic.  Writes
benchmarks/results/shapes_cpu.csv and shapes_cpu.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from step_cpu import BASELINE, RESULTS, isa_note, measure, write_results

import optgen

SHAPES = {
    "matrix 1000×1000": (1000, 1000),
    "conv 3×3 (256, 256, 3, 3)": (256, 256, 3, 3),
    "conv 1×1 (512, 512, 1, 1)": (512, 512, 1, 1),
    "LoRA A (16, 4096)": (16, 4096),
    "LoRA B (4096, 16)": (4096, 16),
    "vector (1000000,)": (1_000_000,),
    "tall (100000, 10)": (100_000, 10),
}
SPECS = ("adamw", "adamw4bit", "adamw8bit", "factor4bit")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=2_000_000, help="elements per shape's list of tensors")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    makers = {BASELINE: lambda ps: torch.optim.AdamW(ps, fused=True)}
    for spec in SPECS:
        cls = optgen.load(spec)
        makers[f"optgen {spec} (mlir)"] = lambda ps, cls=cls: cls(ps, backend="mlir")
    rows = []
    for label, shape in SHAPES.items():
        count = max(1, round(args.elements / math.prod(shape)))
        params = [torch.randn(shape) for _ in range(count)]
        numel = count * math.prod(shape)
        for name, (seconds, ratio) in measure(makers, params, args.rounds).items():
            rows.append([label, str(count), name, f"{seconds / numel * 1e9:.2f}", f"{ratio:.2f}"])
            print(
                f"{label:28s} {count:4d} {name:28s} {seconds / numel * 1e9:6.2f} ns/element  x{ratio:.2f}", flush=True
            )
    notes = [
        ["# setting", f"{args.threads} threads", f"torch {torch.__version__}", f"{args.rounds} rounds"],
        ["# machine", f"MLIR kernels: {isa_note()}"],
    ]
    header = {
        "shape": "shape",
        "tensors": "tensors",
        "implementation": "implementation",
        "ns_per_element": "ns / element",
        "ratio_to_fused": "vs torch fused AdamW",
    }
    write_results(args.out_dir / "shapes_cpu.csv", args.out_dir / "shapes_cpu.md", notes, header, rows)


if __name__ == "__main__":
    main()
