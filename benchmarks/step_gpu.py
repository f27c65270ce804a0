"""GPU step time of the Triton backend against the bandwidth roofline and its peers, in one run.

    python benchmarks/step_gpu.py [--specs adamw adamw4bit adamw8bit sgdm4bit] [--sizes 1e6 1e7 1e8 1e9]
                                  [--model llama-1.3b] [--dtype float32]

For each spec and tensor size (one 2-D tensor of about N elements) and for a LLaMA-shaped parameter
list: the median optimizer step (``triton.testing.do_bench``, L2 flushed between runs), the bytes the
step must move (param read + write, grad read, every state read + write in its storage format; a
rank-1 store's stats pass reads grad and state once more, which is not counted), the achieved
GB/s, and that as a fraction of this card's measured copy bandwidth (``dst.copy_(src)`` on a 1 GiB
buffer) — the roofline. Peers in the same run:
``torch.optim.AdamW(fused=True)`` / ``torch.optim.SGD(fused=True)`` and, when installed, torchao's
``AdamW4bit`` / ``AdamW8bit``. Writes ``benchmarks/results/step_gpu_<gpu>.csv`` and ``.md``.

Targets (issue 4): 32-bit adamw >= 85% of the copy roofline and no slower than fused AdamW;
adamw4bit >= 80% of its roofline and faster than torchao's AdamW4bit.
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from pathlib import Path

import torch

import optgen
from optgen.codegen.spec import load_spec
from optgen.memory import MODELS, model_shapes

RESULTS = Path(__file__).resolve().parent / "results"
PEERS = {  # spec -> (name, factory(params, lr)) of the same algorithm elsewhere
    "adamw": [("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True))],
    "adamw8bit": [("torchao AdamW8bit", lambda ps: _torchao("AdamW8bit")(ps, lr=1e-3))],
    "adamw4bit": [
        ("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
        ("torchao AdamW4bit", lambda ps: _torchao("AdamW4bit")(ps, lr=1e-3)),
    ],
    "sgdm4bit": [("torch SGD fused", lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9, fused=True))],
}


def _torchao(name: str):
    import torchao.optim

    return getattr(torchao.optim, name)


def shape_for(numel: int) -> tuple[int, int]:
    cols = 4096 if numel >= 4096 * 4 else 256
    return (max(1, round(numel / cols)), cols)


def copy_bandwidth(do_bench) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted)."""
    src = torch.empty(2**28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / (ms * 1e-3)


def bytes_moved(spec_name: str, shapes: list[tuple[int, ...]], dtype: torch.dtype) -> int:
    """What one step must read and write: param r/w, grad r, each state r/w in its storage."""
    spec = load_spec(spec_name)
    width = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for shape in shapes:
        sub = spec.spec_for(shape)
        numel = math.prod(shape)
        state = sub.state_nbytes(shape)
        total += 3 * numel * width + 2 * state  # a rank-1 store's stats pass reads more: not counted
    return total


def time_step(make, shapes, dtype, do_bench) -> float:
    params = [torch.nn.Parameter(torch.randn(s, device="cuda", dtype=dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = make(params)
    opt.step()  # state, compilation
    ms = do_bench(opt.step, return_mode="median")
    del opt, params
    torch.cuda.empty_cache()
    return ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", nargs="+", default=["adamw", "adamw4bit", "adamw8bit", "sgdm4bit"])
    parser.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8, 1e9])
    parser.add_argument("--model", default="llama-1.3b", choices=sorted(MODELS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("step_gpu.py needs a CUDA GPU (the Triton kernels' CPU interpreter says nothing about speed)")
        return 1
    from triton.testing import do_bench

    dtype = getattr(torch, args.dtype)
    gpu = torch.cuda.get_device_name()
    roof = copy_bandwidth(do_bench)
    print(f"{gpu}: copy bandwidth {roof / 1e9:.0f} GB/s")
    cases = [(f"{int(n):.0e}".replace("+", ""), [shape_for(int(n))]) for n in args.sizes]
    cases.append((args.model, model_shapes(args.model)))
    rows = []
    for spec in args.specs:
        cls = optgen.load(spec)
        impls = [("optgen triton", lambda ps, cls=cls: cls(ps, lr=1e-3, backend="triton"))] + PEERS.get(spec, [])
        for case, shapes in cases:
            numel = sum(math.prod(s) for s in shapes)
            need = bytes_moved(spec, shapes, dtype)
            for impl, make in impls:
                try:
                    ms = time_step(make, shapes, dtype, do_bench)
                except (ImportError, torch.cuda.OutOfMemoryError, RuntimeError) as err:
                    print(f"  {spec} {case} {impl}: skipped ({type(err).__name__}: {str(err)[:80]})")
                    torch.cuda.empty_cache()
                    continue
                gbps = need / (ms * 1e-3) / 1e9
                rows.append(
                    {
                        "spec": spec,
                        "impl": impl,
                        "case": case,
                        "tensors": len(shapes),
                        "numel": numel,
                        "dtype": args.dtype,
                        "median_ms": round(ms, 4),
                        "bytes_per_step": need,
                        "GB_per_s": round(gbps, 1),
                        "fraction_of_copy_bw": round(gbps * 1e9 / roof, 3),
                    }
                )
                print(f"  {spec:<10} {case:<11} {impl:<20} {ms:9.3f} ms {gbps:7.0f} GB/s {gbps * 1e9 / roof:6.1%}")
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"step_gpu_{re.sub(r'[^A-Za-z0-9]+', '_', gpu).strip('_')}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [
        f"# Optimizer step on {gpu} ({args.dtype} params), copy bandwidth {roof / 1e9:.0f} GB/s",
        "",
        "| spec | case | impl | median ms | GB/s | of copy BW |",
        "|---|---|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['spec']} | {r['case']} | {r['impl']} | {r['median_ms']} | {r['GB_per_s']} | "
        f"{r['fraction_of_copy_bw']:.0%} |"
        for r in rows
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.csv and {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
