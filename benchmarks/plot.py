"""Plots of train_lm.py runs: eval loss vs tokens (one line per optimizer) and state bytes per parameter.

    python benchmarks/plot.py benchmarks/results/train_1m_*.csv [--out-dir benchmarks/results --prefix train_1m]

Writes ``<prefix>_loss.png`` and ``<prefix>_state.png`` (matplotlib, Agg backend: no display needed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_lm import BASELINE, RESULTS, read_csv  # noqa: E402


def plot_runs(paths: list[Path], out_dir: Path, prefix: str) -> tuple[Path, Path]:
    # the baseline first (drawn black, dashed), then by label
    runs = sorted(
        ((path, *read_csv(path)) for path in paths), key=lambda r: (r[1]["optimizer"] != BASELINE, r[1]["label"])
    )
    if not runs:
        raise SystemExit("plot: no CSV files given")
    out_dir.mkdir(parents=True, exist_ok=True)
    first = runs[0][1]
    title = f"{first['size']} model ({int(first['params']):,} params), stdlib bytes, {first['device']}"

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for _, meta, rows in runs:
        style = {"color": "black", "linestyle": "--"} if meta["optimizer"] == BASELINE else {}
        ax.plot([r["tokens"] / 1e6 for r in rows], [r["eval_loss"] for r in rows], label=meta["label"], **style)
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("eval loss (nats/byte)")
    ax.set_title(title, fontsize=9)
    final_losses = [rows[-1]["eval_loss"] for _, _, rows in runs]
    ax.set_ylim(min(final_losses) * 0.95, max(final_losses) * 1.6)  # the interesting end, not the first steps
    ax.grid(alpha=0.3)
    ax.legend()
    loss_png = out_dir / f"{prefix}_loss.png"
    fig.tight_layout()
    fig.savefig(loss_png, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [meta["label"] for _, meta, _ in runs]
    per_param = [int(meta["state_bytes"]) / int(meta["params"]) for _, meta, _ in runs]
    bars = ax.bar(labels, per_param, color="tab:blue")
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylim(0, max(per_param) * 1.15)  # room for the labels
    ax.set_ylabel("optimizer state bytes / param")
    ax.set_title(title, fontsize=9)
    ax.tick_params(axis="x", labelrotation=20)
    state_png = out_dir / f"{prefix}_state.png"
    fig.tight_layout()
    fig.savefig(state_png, dpi=110)
    plt.close(fig)
    return loss_png, state_png


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", nargs="+", type=Path, help="CSV files written by train_lm.py")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--prefix", default="train", help="file name prefix of the PNGs")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.csv if not p.is_file()]
    if missing:
        raise SystemExit(f"plot: no such CSV file: {', '.join(missing)}")
    for png in plot_runs(args.csv, args.out_dir, args.prefix):
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
