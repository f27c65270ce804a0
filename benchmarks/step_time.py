"""Optimizer step time: generated optimizers vs torch.optim on the same tensors, in one run.

    python benchmarks/step_time.py [--tensors 10 --numel 1000000 --repeats 20]

Reports the median step time per optimizer and its ratio to torch.optim's default
implementation; writes benchmarks/results/step_time_<device>.csv.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import time
from pathlib import Path

import torch

import optgen

RESULTS = Path(__file__).resolve().parent / "results"


def median_step_seconds(make, params, repeats: int) -> float:
    opt = make(params)
    for p in params:
        p.grad = torch.randn_like(p)
    for _ in range(3):  # warm-up: state allocation, compilation
        opt.step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        if params[0].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=10)
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    def params():
        torch.manual_seed(0)
        # 1000 x (numel/1000) matrices, so rank-1 normalization applies as on real weights
        shape = (1000, args.numel // 1000) if args.numel % 1000 == 0 else (args.numel,)
        return [torch.nn.Parameter(torch.randn(shape, device=device)) for _ in range(args.tensors)]

    AdamW, SGD = optgen.load("adamw"), optgen.load("sgd")
    AdamW4bit, AdamW8bit = optgen.load("adamw4bit"), optgen.load("adamw8bit")
    cases = {
        "adamw": {
            "torch.optim (default)": lambda ps: torch.optim.AdamW(ps),
            "torch.optim foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
            "torch.optim fused": lambda ps: torch.optim.AdamW(ps, fused=True),
            "optgen torch": lambda ps: AdamW(ps, backend="torch"),
            "optgen inductor": lambda ps: AdamW(ps, backend="inductor"),
            "optgen adamw8bit torch": lambda ps: AdamW8bit(ps, backend="torch"),
            "optgen adamw8bit inductor": lambda ps: AdamW8bit(ps, backend="inductor"),
            "optgen adamw4bit torch": lambda ps: AdamW4bit(ps, backend="torch"),
            "optgen adamw4bit inductor": lambda ps: AdamW4bit(ps, backend="inductor"),
        },
        "sgd momentum": {
            "torch.optim (default)": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
            "torch.optim foreach": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=True),
            "optgen torch": lambda ps: SGD(ps, lr=0.1, momentum=0.9, backend="torch"),
            "optgen inductor": lambda ps: SGD(ps, lr=0.1, momentum=0.9, backend="inductor"),
        },
    }
    rows = []
    for family, makers in cases.items():
        baseline = None
        for name, make in makers.items():
            seconds = median_step_seconds(make, params(), args.repeats)
            baseline = baseline or seconds
            rows.append([family, name, f"{seconds * 1e3:.2f}", f"{seconds / baseline:.2f}"])
            print(f"{family:13s} {name:28s} {seconds * 1e3:8.2f} ms  x{seconds / baseline:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"step_time_{device}.csv"
    with out.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["# machine", platform.processor() or platform.machine(), f"threads={torch.get_num_threads()}"])
        writer.writerow(["# shape", f"{args.tensors} x {args.numel}", f"torch {torch.__version__}"])
        writer.writerow(["optimizer", "implementation", "median_ms", "ratio_to_default"])
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
