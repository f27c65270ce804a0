"""Optimizer-state and training memory per spec for LLaMA-shaped models: predicted, and measured.

    python benchmarks/memory.py [--specs adamw adamw8bit adamw4bit ...] [--models llama-60m llama-7b ...]

Predicted (no tensors made) from each spec's plan, exactly as ``optgen memory``: state bytes for
the model's parameter shapes (`optgen.memory.model_shapes`, untied head). "Training memory" counts
parameters + gradients + optimizer state, for float32 and for bfloat16 parameters and gradients
(optgen keeps state in the spec's storage dtypes either way); activations, which depend on batch and
sequence length, are not counted. A routed spec (``applies_to`` / ``otherwise``, e.g. swan) gets a
second row, ``<spec>, param_groups``: the embedding and head on its fall-back, as
``optgen.param_groups(model)`` sends them (SWAN's paper setup); the plain row routes by shape alone.

Measured: the parameters of ``--measure`` models are allocated on the device with random gradients,
one ``step()`` runs, and the optimizer's state is counted — ``state_bytes()`` on CPU; on CUDA also
``torch.cuda.memory_allocated`` growth (state) and ``max_memory_allocated`` (peak of the step,
temporaries included). Writes benchmarks/results/memory.csv (predicted) and memory_measured_<device>.csv.
"""

from __future__ import annotations

import argparse
import csv
import gc
from pathlib import Path

import torch

import optgen
from optgen.codegen.spec import Spec, load_spec
from optgen.memory import MODELS, model_shapes, state_memory

RESULTS = Path(__file__).resolve().parent / "results"
GIB = 1024**3


def split_state_bytes(spec: Spec, shapes: list[tuple[int, ...]], vocab: int) -> int:
    """State bytes with the vocabulary-sized matrices (embedding, head) on the spec's fall-back."""
    fallback = spec.routing.otherwise
    return sum((fallback if shape[0] == vocab else spec).spec_for(shape).state_nbytes(shape) for shape in shapes)


def predicted_rows(specs: list[str], models: list[str]) -> list[dict[str, object]]:
    rows = []
    for model in models:
        shapes = model_shapes(model)
        baseline = None
        for name in specs:
            spec = load_spec(name)
            m = state_memory(spec, shapes)
            n = m["params"]
            variants = [(name, m["state_bytes"])]
            if spec.routing:
                variants.append((f"{name}, param_groups", split_state_bytes(spec, shapes, MODELS[model][3])))
            for label, state in variants:
                total32, total16 = (2 * width * n + state for width in (4, 2))
                baseline = baseline or total32
                rows.append(
                    {
                        "model": model,
                        "spec": label,
                        "params": n,
                        "state_GiB": state / GIB,
                        "state_bytes_per_param": state / n,
                        "train_GiB_fp32": total32 / GIB,
                        "train_GiB_bf16": total16 / GIB,
                        "train_fp32_vs_first": total32 / baseline,
                    }
                )
    return rows


def measured_row(name: str, model: str, device: torch.device) -> dict[str, object]:
    shapes = model_shapes(model)
    cls = optgen.load(name)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = cls(params)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    optimizer.step()
    row: dict[str, object] = {"model": model, "spec": name, "params": sum(p.numel() for p in params)}
    row["measured_bytes_per_param"] = optimizer.state_bytes() / row["params"]
    row["predicted_bytes_per_param"] = state_memory(load_spec(name), shapes)["bytes_per_param"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        row["allocated_growth_bytes_per_param"] = (torch.cuda.memory_allocated(device) - before) / row["params"]
        row["step_peak_GiB"] = torch.cuda.max_memory_allocated(device) / GIB
    del optimizer, params
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def write_table(path: Path, rows: list[dict[str, object]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in row.items()} for row in rows)
    print(f"wrote {path}")


def print_table(rows: list[dict[str, object]]) -> None:
    keys = list(rows[0])
    cells = [
        [
            f"{r[k]:.3f}" if isinstance(r[k], float) else f"{r[k]:,}" if isinstance(r[k], int) else str(r[k])
            for k in keys
        ]
        for r in rows
    ]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--specs", nargs="+", default=["adamw", "adamw8bit", "adamw4bit", "factor4bit", "swan", "sgdm4bit"]
    )
    parser.add_argument("--models", nargs="+", default=["llama-60m", "llama-350m", "llama-1.3b", "llama-7b"])
    parser.add_argument(
        "--measure", nargs="*", help="models to allocate and step (default: llama-60m; on CUDA up to 1.3b)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    unknown = [m for m in args.models + (args.measure or []) if m not in MODELS]
    if unknown:
        raise SystemExit(f"memory: unknown model {', '.join(unknown)}; known: {', '.join(MODELS)}")
    device = torch.device(args.device)
    if args.measure is None:
        args.measure = ["llama-60m", "llama-350m", "llama-1.3b"] if device.type == "cuda" else ["llama-60m"]

    rows = predicted_rows(args.specs, args.models)
    print_table(rows)
    write_table(args.out_dir / "memory.csv", rows)
    if args.measure:
        measured = [measured_row(name, model, device) for model in args.measure for name in args.specs]
        print_table(measured)
        write_table(args.out_dir / f"memory_measured_{device.type}.csv", measured)


if __name__ == "__main__":
    main()
