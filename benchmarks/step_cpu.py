"""CPU optimizer step time: generated MLIR kernels vs torch.optim (fused, foreach, torch.compile), in one run.

    python benchmarks/step_cpu.py                 # 10 tensors x 1e6 (1000 x 1000), float32 then bfloat16
    python benchmarks/step_cpu.py --llama         # also a ~95M-parameter LLaMA-shaped list of tensors
    python benchmarks/step_cpu.py --threads 1     # only on one thread (default: torch's default, then 1)

Every optimizer steps the same parameters and gradients (its own state), round-robin: one round
runs each optimizer's step() once, so all see the same machine load; the ratio of each to
torch.optim.AdamW(fused=True) is taken per round, and the medians of times and of ratios over the
rounds are reported.  The bfloat16 list compares what each gives for bf16 parameters: torch's
fused AdamW keeps bfloat16 moments (14 bytes moved per parameter), optgen's adamw float32 ones (22).
torchao's AdamW4bit / AdamW8bit join when torchao is installed.  Specs with
reductions (factor4bit, sinkgd) run on both their MLIR and their torch kernels (the latter on the
square workload only), so the table also shows what the MLIR reductions buy.  Writes
benchmarks/results/step_time_cpu.csv (rendered into the README by suite.py) and step_cpu.md.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import optgen

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "torch.optim.AdamW fused"


def square_tensors(count: int, numel: int) -> list[torch.Tensor]:
    """``count`` matrices of ``numel`` elements (1000 rows when it divides), so rank-1 scales apply."""
    shape = (1000, numel // 1000) if numel % 1000 == 0 else (numel,)
    return [torch.randn(shape) for _ in range(count)]


def llama_tensors(dim: int = 768, layers: int = 10, ffn: int = 2048, vocab: int = 32000) -> list[torch.Tensor]:
    """A LLaMA-style decoder's parameter shapes (tied embedding, SwiGLU MLP, RMSNorm weights): ~95M."""
    shapes = [(vocab, dim)]
    for _ in range(layers):
        shapes += [(dim, dim)] * 4 + [(ffn, dim), (ffn, dim), (dim, ffn), (dim,), (dim,)]
    shapes.append((dim,))
    return [torch.randn(s) * 0.02 for s in shapes]


def isa_note() -> str:
    """Which MLIR variants ran: the vector instruction set the CPU has (see emit_mlir.LOOKUP_ISAS)."""
    from optgen.runtime.mlir_jit import host_isa

    return f"{host_isa()} variants ({torch.backends.cpu.get_cpu_capability()} CPU)"


def optimizers(compile_step: bool) -> dict[str, Callable]:
    """Implementation name → (params → object with .step())."""
    AdamW, AdamW4bit, AdamW8bit = optgen.load("adamw"), optgen.load("adamw4bit"), optgen.load("adamw8bit")
    makers: dict[str, Callable] = {
        BASELINE: lambda ps: torch.optim.AdamW(ps, fused=True),
        "torch.optim.AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True),
        "torch.optim.AdamW for-loop": lambda ps: torch.optim.AdamW(ps, foreach=False),
    }
    if compile_step:
        makers["torch.compile(torch.optim.AdamW.step)"] = compiled_adamw
    makers |= {
        "optgen adamw (mlir)": lambda ps: AdamW(ps, backend="mlir"),
        "optgen adamw8bit (mlir)": lambda ps: AdamW8bit(ps, backend="mlir"),
        "optgen adamw4bit (mlir)": lambda ps: AdamW4bit(ps, backend="mlir"),
    }
    for spec in ("factor4bit", "sinkgd"):  # reductions and factored state: MLIR vs the spec's own torch kernels
        cls = optgen.load(spec)
        for backend in ("mlir", "torch"):
            makers[f"optgen {spec} ({backend})"] = lambda ps, cls=cls, backend=backend: cls(ps, backend=backend)
    if importlib.util.find_spec("torchao") is not None:
        from torchao.optim import AdamW4bit as Ao4bit
        from torchao.optim import AdamW8bit as Ao8bit

        makers["torchao AdamW8bit"] = lambda ps: Ao8bit(ps)
        makers["torchao AdamW4bit"] = lambda ps: Ao4bit(ps)
    return makers


def compiled_adamw(params: list[torch.Tensor]):
    optimizer = torch.optim.AdamW(params, foreach=True)
    step = torch.compile(optimizer.step, fullgraph=False)

    class Compiled:
        def step(self) -> None:
            step()

    return Compiled()


def measure(makers: dict[str, Callable], params: list[torch.Tensor], rounds: int) -> dict[str, tuple[float, float]]:
    """Implementation → (median seconds per step, median per-round ratio to the baseline)."""
    for p in params:
        p.requires_grad_(True)
        p.grad = torch.randn_like(p)
    opts = {}
    for name, make in makers.items():
        opts[name] = make(params)
        for _ in range(2):  # warm-up: state allocation, JIT / torch.compile
            opts[name].step()
    seconds: dict[str, list[float]] = {name: [] for name in opts}
    for _ in range(rounds):
        for name, opt in opts.items():
            start = time.perf_counter()
            opt.step()
            seconds[name].append(time.perf_counter() - start)
    ratios = {name: [t / b for t, b in zip(times, seconds[BASELINE])] for name, times in seconds.items()}
    return {name: (statistics.median(seconds[name]), statistics.median(ratios[name])) for name in opts}


def copy_bandwidth(numel: int = 10_000_000, rounds: int = 30) -> float:
    """GB/s of ``dst.copy_(src)`` on float32 (read + write): the floor a memory-bound step runs at."""
    src, dst = torch.randn(numel), torch.empty(numel)
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        dst.copy_(src)
        seconds.append(time.perf_counter() - start)
    return 8 * numel / statistics.median(seconds) / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tensors", type=int, default=10)
    parser.add_argument("--numel", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--llama", action="store_true", help="also the ~95M-parameter LLaMA-shaped list (slower)")
    parser.add_argument(
        "--threads", type=int, nargs="+", help="torch.set_num_threads values, one measurement each (MLIR splits alike)"
    )
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile'd step")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    threads = args.threads or sorted({torch.get_num_threads(), 1}, reverse=True)
    torch.manual_seed(0)
    makers = optimizers(compile_step=not args.no_compile)
    if not any(name.startswith("torchao") for name in makers):
        print("torchao is not installed: its AdamW4bit / AdamW8bit are left out")
    workloads = {
        "": lambda: square_tensors(args.tensors, args.numel),
        "bfloat16, ": lambda: [p.bfloat16() for p in square_tensors(args.tensors, args.numel)],
    }
    if args.llama:
        workloads["LLaMA-shaped, "] = llama_tensors
    rows = []
    bandwidth = []  # per thread count: copy_ GB/s and fused AdamW's GB/s at 28 bytes per parameter
    for workload, make_params in workloads.items():
        params = make_params()
        numel = sum(p.numel() for p in params)
        shapes = {tuple(p.shape) for p in params}
        each = "×".join(map(str, shapes.pop())) if len(shapes) == 1 else "various"
        label = f"{workload}{len(params)} × {each} ({numel / 1e6:.1f}M params)"
        for count in threads:
            torch.set_num_threads(count)
            # the torch kernels of factor4bit / sinkgd take seconds per step on the LLaMA list: square workload only
            chosen = {k: v for k, v in makers.items() if not workload or not k.endswith("(torch)")}
            results = measure(chosen, params, args.rounds)
            if not workload:
                fused = 28 * numel / results[BASELINE][0] / 1e9
                bandwidth.append(f"{count} threads: copy_ {copy_bandwidth():.0f} GB/s vs fused AdamW {fused:.0f} GB/s")
            for name, (seconds, ratio) in results.items():
                rows.append([label, str(count), name, f"{seconds * 1e3:.2f}", f"{ratio:.2f}"])
                print(f"{label:42s} {count:2d} {name:40s} {seconds * 1e3:9.2f} ms  x{ratio:.2f}", flush=True)
    notes = [
        [
            "# machine",
            platform.processor() or platform.machine(),
            f"{os.cpu_count()} cores",
            f"MLIR kernels: {isa_note()}",
        ],
        ["# ratio", f"median per-round ratio to {BASELINE} (same run)", f"torch {torch.__version__}"],
        ["# bandwidth", "; ".join(bandwidth)],
    ]
    header = {
        "workload": "workload",
        "threads": "threads",
        "implementation": "implementation",
        "median_ms": "median ms",
        "ratio_to_fused": "vs torch fused AdamW",
    }
    write_results(args.out_dir / "step_time_cpu.csv", args.out_dir / "step_cpu.md", notes, header, rows)


def write_results(csv_path: Path, table_path: Path, notes: list[list[str]], header: dict[str, str], rows) -> None:
    """Rows as CSV (``#`` note lines, then the column names: ``header``'s keys) and as a markdown
    table (columns titled by ``header``'s values)."""
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with csv_path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerows(notes)
        writer.writerow(header)
        writer.writerows(rows)
    table = [f"| {' | '.join(header.values())} |", f"|{'---|' * len(header)}"]
    table += [f"| {' | '.join(row)} |" for row in rows]
    table_path.write_text("\n".join(table) + "\n")
    print(f"wrote {csv_path} and {table_path.name}")


if __name__ == "__main__":
    main()
