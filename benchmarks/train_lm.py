"""Training quality: a small LLaMA-style decoder on the Python standard library's own source, bytes.

    python benchmarks/train_lm.py --optimizer adamw4bit                # built-in name
    python benchmarks/train_lm.py --optimizer specs/swan.yaml --lr 0.01
    python benchmarks/train_lm.py --optimizer torch-adamw              # the baseline, torch.optim.AdamW
    python benchmarks/train_lm.py --optimizer adamw4bit --nproc 2      # FSDP2 on 2 processes (torchrun)

The corpus exists on every machine without a download: the top-level ``*.py`` files of the running
Python's standard library (``sysconfig.get_paths()["stdlib"]``), in sorted order; every 10th file is
held out for evaluation. Tokens are bytes (vocabulary 256). The model is a decoder with RMSNorm,
rotary position embeddings, SwiGLU and a tied or untied head (``--size``: tiny ~0.1M, 1m, 5m, 25m
parameters). Batches are drawn from a seeded generator, so a run is a deterministic function of its
arguments (and the Python version, which fixes the corpus) on a given machine.

Writes one CSV (``--out``, default ``benchmarks/results/train_<size>_<label>.csv``): ``# key,value``
metadata lines (optimizer, parameters, optimizer-state bytes, peak memory, machine, ...) and then one
row per evaluation: step, tokens seen, train loss, eval loss, learning rate, wall seconds.

``--nproc N`` relaunches the script under torchrun: N processes (gloo on CPU, nccl on CUDA), the
model wrapped with FSDP2 (``fully_shard`` on each block, then the root), the global ``--batch``
split evenly across ranks, so the loss curve is that of a 1-process run with the same global
batch (up to float summation order). Rank 0 writes the CSV; state bytes are summed over ranks,
peak memory is the largest rank's. Running the script under ``torchrun`` directly works too.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import math
import os
import platform
import resource
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import optgen

RESULTS = Path(__file__).resolve().parent / "results"
BASELINE = "torch-adamw"  # --optimizer name of torch.optim.AdamW


# -- model ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelConfig:
    dim: int
    layers: int
    heads: int
    hidden: int  # SwiGLU inner width
    vocab: int = 256
    tie_head: bool = False


SIZES = {  # name -> (dim, layers, heads, SwiGLU width); parameter counts are for the untied head
    "tiny": (64, 2, 2, 172),  # ~0.13M, for tests
    "1m": (128, 4, 4, 344),  # ~0.86M
    "5m": (256, 6, 4, 688),  # ~4.9M
    "25m": (512, 8, 8, 1376),  # ~25.6M
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()  # (seq, head_dim / 2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (batch, heads, seq, head_dim); rotates the pairs (first half, second half) of each head
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads = cfg.heads
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.q, self.k, self.v, self.o = (nn.Linear(cfg.dim, cfg.dim, bias=False) for _ in range(4))
        self.gate = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.up = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.down = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        h = self.attn_norm(x)
        q, k, v = (proj(h).view(batch, seq, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(attn.transpose(1, 2).reshape(batch, seq, dim))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, seq_len: int):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        if cfg.tie_head:
            self.head.weight = self.embed.weight
        cos, sin = rotary_tables(seq_len, cfg.dim // cfg.heads)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:  # GPT-2 style: N(0, 0.02), residual projections scaled down by depth
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("o.weight", "down.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        seq = tokens.shape[1]
        for block in self.blocks:
            x = block(x, self.cos[:seq], self.sin[:seq])
        return self.head(self.norm(x))


# -- data ----------------------------------------------------------------------------------------
def stdlib_corpus(eval_every: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """(train bytes, eval bytes): the stdlib's top-level .py files, sorted; every ``eval_every``-th held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    if len(files) < 2 * eval_every:
        raise SystemExit(f"train_lm: found only {len(files)} .py files under the stdlib path; need a full Python")
    train, held_out = bytearray(), bytearray()
    for index, path in enumerate(files):
        (held_out if index % eval_every == eval_every - 1 else train).extend(path.read_bytes())
    return torch.frombuffer(train, dtype=torch.uint8).long(), torch.frombuffer(held_out, dtype=torch.uint8).long()


def windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    chunk = torch.stack([data[s : s + seq_len + 1] for s in starts.tolist()])
    return chunk[:, :-1], chunk[:, 1:]


# -- optimizer -----------------------------------------------------------------------------------
def make_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    weight_decay: float,
    backend: str,
    groups: str = "flat",
    hyper: dict[str, float] | None = None,
):
    """torch.optim.AdamW for ``torch-adamw``; otherwise ``optgen.load(name)`` (built-in name, spec or package).

    ``groups="flat"`` passes ``model.parameters()`` (a routed spec then routes by shape alone);
    ``"split"`` passes ``optgen.param_groups(model)``: embeddings, head, norms to the spec's fall-back.
    ``hyper``: further constructor arguments (a spec's hyperparameters, e.g. SWAN's ``alpha``).
    """
    params = optgen.param_groups(model) if groups == "split" else list(model.parameters())
    if name == BASELINE:
        cls = torch.optim.AdamW
    else:
        try:
            cls = optgen.load(name)
        except optgen.SpecError as error:
            raise SystemExit(f"train_lm: cannot load optimizer {name!r}:\n{error}") from None
        except FileNotFoundError as error:
            raise SystemExit(f"train_lm: cannot load optimizer {name!r}: {error}") from None
    accepted = inspect.signature(cls).parameters
    own = {"params", "lr", "backend"}  # set by train_lm itself
    unknown = sorted(key for key in hyper or {} if key in own or key not in accepted)
    if unknown:
        valid = sorted(set(accepted) - own)
        raise SystemExit(f"train_lm: --hyper {', '.join(unknown)} not accepted by {name!r}; valid: {', '.join(valid)}")
    kwargs = {"lr": lr, **({"backend": backend} if name != BASELINE else {})}
    if "weight_decay" in accepted:
        kwargs["weight_decay"] = weight_decay
    return cls(params, **kwargs, **(hyper or {}))


def parse_hyper(items: list[str]) -> dict[str, float]:
    """``["alpha=0.5", ...]`` -> ``{"alpha": 0.5}``; numbers only."""
    hyper = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            hyper[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not key.strip():
            raise SystemExit(f"train_lm: --hyper takes NAME=NUMBER (e.g. alpha=0.5), got {item!r}")
    return hyper


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this process holds: optgen's own count (one process), or its state tensors.

    Under FSDP2 the state tensors are DTensors, whose ``numel()`` is the whole tensor's: count the
    local shard (quantized state, ``nbytes``, is already local).
    """
    if hasattr(optimizer, "state_bytes") and not dist.is_initialized():
        return optimizer.state_bytes()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value = value.to_local() if hasattr(value, "to_local") else value
                total += value.numel() * value.element_size()
            elif hasattr(value, "nbytes"):
                total += value.nbytes
    return total


def lr_at(step: int, peak: float, warmup: int, total: int, final_fraction: float = 0.1) -> float:
    """Linear warmup to ``peak``, then cosine decay to ``final_fraction * peak`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB (whole process)


class Progress:
    """A one-line stderr progress bar (a line per evaluation when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, show: bool = True):
        self.total, self.label, self.tty, self.show = total, label, sys.stderr.isatty(), show

    def update(self, step: int, text: str, force: bool = False) -> None:
        if not self.show:
            return
        if self.tty:
            done = int(30 * step / self.total)
            sys.stderr.write(f"\r[{self.label}] [{'#' * done}{'.' * (30 - done)}] {step}/{self.total} {text}")
            sys.stderr.flush()
        elif force:
            sys.stderr.write(f"[{self.label}] step {step}/{self.total} {text}\n")

    def close(self) -> None:
        if self.tty and self.show:
            sys.stderr.write("\n")


# -- processes (--nproc) -------------------------------------------------------------------------
@dataclass(frozen=True)
class Ranks:
    """This process's place in a run: rank 0 of 1, or one of the ranks torchrun started."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def mine(self, rows: torch.Tensor) -> torch.Tensor:
        """This rank's share of a global batch (its rows, in rank order)."""
        per_rank = rows.shape[0] // self.world
        return rows[self.rank * per_rank : (self.rank + 1) * per_rank]

    def reduce(self, value: float, op: str = "sum") -> float:
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor.item()


def launch(argv: list[str], nproc: int) -> int:
    """Run this script on ``nproc`` processes under torchrun; its exit status.

    The ranks get ``argv`` without ``--nproc`` (torchrun's parser would take it for an abbreviation
    of its own ``--nproc-per-node``); each learns the world size from torchrun's environment.
    """
    rank_argv, rest = [], iter(argv)
    for arg in rest:
        if arg == "--nproc":
            next(rest, None)  # its value
        elif not arg.startswith("--nproc="):
            rank_argv.append(arg)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    # torchrun's default is 1 thread per rank; share the cores instead (--threads still overrides)
    threads = os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    return subprocess.run([*command, str(Path(__file__).resolve()), *rank_argv], env=env).returncode


def join_ranks(args: argparse.Namespace) -> Ranks:
    """Inside torchrun: join the process group (gloo on CPU, nccl on CUDA); otherwise rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device(args.device)
    if world == 1:
        return Ranks(device=device)
    if args.nproc not in (1, world):
        raise SystemExit(f"train_lm: --nproc {args.nproc} but torchrun started {world} processes")
    if args.batch % world:
        raise SystemExit(f"train_lm: --batch {args.batch} must be divisible by the {world} processes")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), world, device)


def shard(model: Decoder, ranks: Ranks) -> nn.Module:
    """FSDP2: each block its own unit (gathered only while it runs), then the root (embedding, head)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(ranks.device.type, (ranks.world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    return fully_shard(model, mesh=mesh)


# -- training ------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--optimizer", default="adamw", help=f"built-in name, spec file, built package, or {BASELINE}")
    parser.add_argument("--label", help="name in the CSV and plots (default: from --optimizer)")
    parser.add_argument("--backend", default="auto", help="optgen backend: auto, torch, inductor, ... (default auto)")
    parser.add_argument(
        "--param-groups",
        default="flat",
        choices=["flat", "split"],
        help="flat: model.parameters(); split: optgen.param_groups(model), hidden matrices vs the rest (SWAN's setup)",
    )
    parser.add_argument(
        "--hyper", action="append", default=[], metavar="NAME=NUMBER", help="a further optimizer hyperparameter"
    )
    parser.add_argument("--size", default="1m", choices=sorted(SIZES))
    parser.add_argument("--tie-head", action="store_true", help="share the embedding and output-head weights")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--warmup", type=float, default=0.1, help="warmup steps as a fraction of --steps")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--eval-batches", type=int, default=8, help="evaluation windows = this x --batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--nproc", type=int, default=1, help="processes (FSDP2 under torchrun; default 1)")
    parser.add_argument("--out", type=Path, help="CSV path (default benchmarks/results/train_<size>_<label>.csv)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch", "seq", "eval_every", "eval_batches", "nproc"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if not 0 <= args.warmup < 1:
        parser.error(f"--warmup is a fraction of --steps in [0, 1), got {args.warmup}")
    if args.batch % args.nproc:
        parser.error(f"--batch {args.batch} must be divisible by --nproc {args.nproc} (the global batch is split)")
    args.label = args.label or Path(args.optimizer).stem
    args.out = args.out or RESULTS / f"train_{args.size}_{args.label}.csv"
    return args


@torch.no_grad()
def evaluate(model: nn.Module, data: torch.Tensor, starts: torch.Tensor, args: argparse.Namespace, ranks: Ranks):
    """Mean loss per byte over the evaluation windows (each rank takes its share of every batch)."""
    model.eval()
    total = 0.0
    for batch_starts in starts.split(args.batch):
        x, y = windows(data, ranks.mine(batch_starts), args.seq)
        logits = model(x.to(ranks.device))
        total += F.cross_entropy(logits.flatten(0, 1), y.to(ranks.device).flatten(), reduction="sum").item()
    model.train()
    return ranks.reduce(total) / (starts.numel() * args.seq)


def train(args: argparse.Namespace, ranks: Ranks | None = None) -> list[dict[str, float]]:
    """Train, write the CSV (rank 0), return the evaluation rows."""
    ranks = ranks or Ranks(device=torch.device(args.device))
    device, lead = ranks.device, ranks.rank == 0
    if args.threads:
        torch.set_num_threads(args.threads)
    train_data, eval_data = stdlib_corpus()
    dim, layers, heads, hidden = SIZES[args.size]
    torch.manual_seed(args.seed)  # every rank builds the same model, then keeps its shards
    model = Decoder(ModelConfig(dim, layers, heads, hidden, tie_head=args.tie_head), args.seq).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    if ranks.world > 1:
        model = shard(model, ranks)
    optimizer = make_optimizer(
        args.optimizer, model, args.lr, args.weight_decay, args.backend, args.param_groups, parse_hyper(args.hyper)
    )
    batches = torch.Generator().manual_seed(args.seed + 1)
    eval_starts = torch.randint(
        0,
        eval_data.numel() - args.seq - 1,
        (args.eval_batches * args.batch,),
        generator=torch.Generator().manual_seed(1),
    )
    warmup = int(args.warmup * args.steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows: list[dict[str, float]] = []
    progress = Progress(args.steps, args.label, show=lead)
    train_loss, elapsed = float("nan"), 0.0
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:
            eval_loss = evaluate(model, eval_data, eval_starts, args, ranks)
            if not math.isfinite(eval_loss):
                raise SystemExit(f"train_lm: eval loss is {eval_loss} at step {step} ({args.label}); try a lower --lr")
            row = {
                "step": step,
                "tokens": step * args.batch * args.seq,
                "train_loss": train_loss,
                "eval_loss": eval_loss,
                "lr": lr_at(step, args.lr, warmup, args.steps),
                "wall_s": elapsed,
            }
            rows.append(row)
            progress.update(step, f"train {train_loss:.3f} eval {eval_loss:.3f} {elapsed:.0f}s", force=True)
        if step == args.steps:
            break
        start = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.lr, warmup, args.steps)
        starts = torch.randint(0, train_data.numel() - args.seq - 1, (args.batch,), generator=batches)
        x, y = windows(train_data, ranks.mine(starts), args.seq)
        loss = F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under FSDP2, gradients are averaged over ranks: the global batch's gradient
        optimizer.step()
        train_loss = ranks.reduce(loss.item()) / ranks.world  # synchronizes: the wall time below is the step's
        elapsed += time.perf_counter() - start
        progress.update(step + 1, f"train {train_loss:.3f} {elapsed:.0f}s")
    progress.close()
    meta = {
        "optimizer": args.optimizer,
        "label": args.label,
        "backend": args.backend if args.optimizer != BASELINE else "torch.optim",
        "size": args.size,
        "params": n_params,
        "state_bytes": int(ranks.reduce(state_bytes(optimizer))),
        "peak_memory_bytes": int(ranks.reduce(peak_memory_bytes(device), op="max")),
        "peak_memory_kind": ("torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS")
        + (f" (largest of {ranks.world} ranks)" if ranks.world > 1 else ""),
        "nproc": ranks.world,
        "tokens_per_step": args.batch * args.seq,
        "steps": args.steps,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "hyper": " ".join(args.hyper),
        "param_groups": args.param_groups,
        "seed": args.seed,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if not lead:
        return rows
    write_csv(args.out, meta, rows)
    print(
        f"{args.label}: final eval loss {rows[-1]['eval_loss']:.4f} after {rows[-1]['tokens']:,} tokens, "
        f"state {meta['state_bytes'] / n_params:.2f} bytes/param, {elapsed:.0f} s -> {args.out}"
    )
    return rows


def write_csv(path: Path, meta: dict[str, object], rows: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        for key, value in meta.items():
            writer.writerow([f"# {key}", value])
        writer.writerow(list(rows[0]))
        for row in rows:
            writer.writerow([f"{v:.6g}" if isinstance(v, float) else v for v in row.values()])


def read_csv(path: Path) -> tuple[dict[str, str], list[dict[str, float]]]:
    """(metadata, rows) of a CSV written by :func:`write_csv`."""
    meta, lines = {}, []
    for line in path.read_text().splitlines():
        if line.startswith("# "):
            key, _, value = line[2:].partition(",")
            meta[key] = value
        elif line:
            lines.append(line)
    rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(lines)]
    return meta, rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise SystemExit(launch(argv, args.nproc))
    ranks = join_ranks(args)
    try:
        train(args, ranks)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
