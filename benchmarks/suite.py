"""The benchmark suite behind `make bench`: training quality, memory, step time; then the README's tables.

    python benchmarks/suite.py                 # CPU suite (about 15 minutes on 2 cores)
    python benchmarks/suite.py --readme-only   # re-render the README section from benchmarks/results/

Runs train_lm.py once per optimizer (torch.optim.AdamW, adamw8bit, adamw4bit, and factor4bit / swan
when those specs load), plot.py on the runs, memory.py and step_time.py, each as its own process (so
peak memory is per run), then rewrites the README between the ``results`` markers.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import optgen

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from train_lm import BASELINE, RESULTS, read_csv  # noqa: E402

BEGIN, END = "<!-- results:begin (written by benchmarks/suite.py) -->", "<!-- results:end -->"
# optimizer -> extra train_lm.py arguments (its own learning rate where the AdamW one does not suit it)
CANDIDATES: dict[str, list[str]] = {
    BASELINE: [],
    "adamw8bit": [],
    "adamw4bit": [],
    "factor4bit": [],
    "swan": ["--param-groups", "split"],  # the paper's setup: embeddings, head and norms on AdamW
}


def loadable(name: str) -> bool:
    if name == BASELINE:
        return True
    try:
        optgen.load(name)
    except Exception as error:  # a spec still being written elsewhere: leave it out, say why
        print(f"suite: leaving out {name}: {type(error).__name__}: {error}", file=sys.stderr)
        return False
    return True


def run(args: list[str]) -> None:
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT)


def steps_to_reach(rows: list[dict[str, float]], target: float) -> float | None:
    """First evaluated step whose eval loss is at or below ``target`` (None if never)."""
    return next((r["step"] for r in rows if r["eval_loss"] <= target), None)


def quality_table(paths: list[Path]) -> str:
    runs = sorted((read_csv(p) for p in paths), key=lambda run: run[0]["optimizer"] != BASELINE)  # baseline first
    base_meta, base_rows = next((m, r) for m, r in runs if m["optimizer"] == BASELINE)
    base_final, base_steps = base_rows[-1]["eval_loss"], base_rows[-1]["step"]
    lines = [
        "| optimizer | state bytes/param | final eval loss | vs AdamW | reaches AdamW's final loss at "
        "| train s | peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for meta, rows in runs:
        final = rows[-1]["eval_loss"]
        reached = steps_to_reach(rows, base_final)
        reached_text = f"{reached / base_steps:.0%} of the steps" if reached is not None else "not reached"
        name = "torch.optim.AdamW" if meta["optimizer"] == BASELINE else f"optgen `{meta['label']}`"
        lines.append(
            f"| {name} | {int(meta['state_bytes']) / int(meta['params']):.2f} | {final:.4f} | "
            f"{final / base_final - 1:+.2%} | {reached_text} | {rows[-1]['wall_s']:.0f} | "
            f"{int(meta['peak_memory_bytes']) / 2**20:.0f} MiB |"
        )
    setup = (
        f"{base_meta['size']} model ({int(base_meta['params']):,} parameters), {int(base_meta['steps'])} steps × "
        f"{int(base_meta['tokens_per_step']):,} tokens = {int(base_rows[-1]['tokens']):,} tokens, peak lr "
        f"{base_meta['lr']}, weight decay {base_meta['weight_decay']}, seed {base_meta['seed']}; "
        f"{base_meta['device']}, {base_meta['threads']} threads, torch {base_meta['torch']}, "
        f"Python {base_meta['python']}"
    )
    return "\n".join(lines) + f"\n\n{setup}."


def memory_table(path: Path, model: str) -> str:
    rows = [r for r in csv.DictReader(path.open()) if r["model"] == model]
    lines = [
        f"| spec | state bytes/param | state ({model}) | params + grads + state, fp32 | same, bf16 params | vs adamw |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['spec']} | {float(r['state_bytes_per_param']):.2f} | {float(r['state_GiB']):.1f} GiB | "
            f"{float(r['train_GiB_fp32']):.1f} GiB | {float(r['train_GiB_bf16']):.1f} GiB | "
            f"{float(r['train_fp32_vs_first']):.2f} |"
        )
    return "\n".join(lines)


def step_time_table(path: Path) -> str:
    lines = path.read_text().splitlines()
    notes = [line.split(",", 1)[1].replace(",", ", ") for line in lines if line.startswith("#")]
    lines = ["| optimizer | implementation | median ms | vs torch.optim default |", "|---|---|---|---|"]
    for r in csv.DictReader(line for line in path.read_text().splitlines() if not line.startswith("#")):
        lines.append(f"| {r['optimizer']} | {r['implementation']} | {r['median_ms']} | {r['ratio_to_default']} |")
    return "\n".join(lines) + f"\n\n({'; '.join(notes)}.)"


def render(results: Path, size: str, readme: Path) -> str:
    runs = sorted(results.glob(f"train_{size}_*.csv"))
    rel = lambda p: p.relative_to(readme.parent).as_posix() if p.is_relative_to(readme.parent) else str(p)
    parts = [
        BEGIN,
        "Regenerate everything below with `make bench` (CPU, about 15 minutes on 2 cores; the same scripts use "
        "the GPU when there is one). The machine was shared with other jobs while these ran, so wall times are "
        "noisy; losses are a deterministic function of the seed on a given machine.",
    ]
    if runs:
        parts += [
            "### Does it still train as well?",
            f"`python benchmarks/train_lm.py --optimizer NAME --size {size}` — a LLaMA-style decoder (RMSNorm, "
            "rotary embeddings, SwiGLU) trained on the bytes of the Python standard library's own source "
            "(every 10th file held out), warmup + cosine schedule; eval loss in nats per byte.",
            quality_table(runs),
            f"![eval loss vs tokens]({rel(results / f'train_{size}_loss.png')})",
            f"![optimizer state bytes per parameter]({rel(results / f'train_{size}_state.png')})",
        ]
    if (results / "memory.csv").is_file():
        parts += [
            "### Memory",
            "`python benchmarks/memory.py` — predicted from each spec's plan for LLaMA-7B's parameter shapes "
            "(untied head); training memory counts parameters + gradients + optimizer state, not activations. "
            "`benchmarks/results/memory.csv` has 60M, 350M and 1.3B too, and `memory_measured_<device>.csv` "
            "the state counted after a real `step()` (equal to the prediction on LLaMA-60M).",
            memory_table(results / "memory.csv", "llama-7b"),
        ]
    if (results / "step_time_cpu.csv").is_file():
        parts += [
            "### Step time (CPU)",
            "`python benchmarks/step_time.py` — one `step()` over 10 float32 1000×1000 tensors, median, "
            "ratio to torch.optim's default in the same run. The quantized specs on the `torch`/`inductor` "
            "backends are the reference implementation (nearest-code search by `torch.bucketize`): correct "
            "and memory-light, not fast; fused MLIR (CPU) and Triton (CUDA) kernels are the fast path.",
            step_time_table(results / "step_time_cpu.csv"),
        ]
    parts.append(END)
    return "\n\n".join(parts)


def replace_section(text: str, section: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"suite: README has no results markers ({BEGIN} ... {END}); add them where the tables go")
    head, rest = text.split(BEGIN, 1)
    return head + section + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizers", nargs="+", default=list(CANDIDATES), help="train_lm.py --optimizer values")
    parser.add_argument("--size", default="1m")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--jobs", type=int, default=1, help="training runs at once (each gets cores/jobs threads)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["train", "memory", "step_time"])
    parser.add_argument("--readme-only", action="store_true", help="only re-render the README from --results")
    args = parser.parse_args(argv)
    if not args.readme_only:
        if "train" not in args.skip:
            commands = []
            threads = ["--threads", str(max(1, (os.cpu_count() or 1) // args.jobs))] if args.jobs > 1 else []
            for name in args.optimizers:
                path = args.results / f"train_{args.size}_{Path(name).stem}.csv"
                if not loadable(name):
                    path.unlink(missing_ok=True)  # a stale run of a spec that no longer loads must not linger
                    continue
                common = ["--size", args.size, "--steps", str(args.steps)]
                extra = [*threads, *CANDIDATES.get(name, [])]
                commands.append(["benchmarks/train_lm.py", "--optimizer", name, *common, "--out", str(path), *extra])
            with ThreadPoolExecutor(args.jobs) as pool:
                list(pool.map(run, commands))
            paths = [str(p) for p in sorted(args.results.glob(f"train_{args.size}_*.csv"))]
            run(["benchmarks/plot.py", *paths, "--out-dir", str(args.results), "--prefix", f"train_{args.size}"])
        if "memory" not in args.skip:
            run(["benchmarks/memory.py", "--out-dir", str(args.results)])
        if "step_time" not in args.skip:
            run(["benchmarks/step_time.py"])
    readme = args.readme.read_text()
    args.readme.write_text(replace_section(readme, render(args.results, args.size, args.readme)))
    print(f"updated {args.readme} ({platform.machine()})")


if __name__ == "__main__":
    main()
