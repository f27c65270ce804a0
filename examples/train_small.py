"""The main job: train a small model on CPU with a generated optimizer, next to torch.optim.AdamW.

    optgen build specs/adamw.yaml -o out
    python examples/train_small.py --optimizer out/adamw      # a built package, a spec, or a name

A two-layer MLP learns a fixed random teacher network (regression); prints the loss as it trains.
"""

from __future__ import annotations

import argparse
import time

import torch

import optgen


def make_data(seed: int, n: int = 4096, d_in: int = 32, d_out: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    teacher = torch.nn.Sequential(torch.nn.Linear(d_in, 64), torch.nn.Tanh(), torch.nn.Linear(64, d_out))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        y = teacher(x)
    return x, y


def train(make_optimizer, steps: int, seed: int, log_every: int, label: str) -> float:
    torch.manual_seed(seed)
    x, y = make_data(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))
    optimizer = make_optimizer(model.parameters())
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    gen = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = torch.randint(0, x.shape[0], (128,), generator=gen)
        loss = torch.nn.functional.mse_loss(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step % log_every == 0 or step == 1:
            print(f"[{label}] step {step:4d}  loss {loss.item():.5f}")
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x), y).item()
    print(f"[{label}] final full-data loss {final:.5f}  ({time.perf_counter() - start:.1f} s)")
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", default="adamw", help="built package folder, spec file or built-in name")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "inductor"])
    args = parser.parse_args()

    generated = optgen.load(args.optimizer)
    print(f"optimizer: {generated.__name__} from {args.optimizer} (backend {args.backend})")
    ours = train(lambda ps: generated(ps, lr=args.lr, backend=args.backend), args.steps, args.seed, 100, "optgen")
    ref = train(lambda ps: torch.optim.AdamW(ps, lr=args.lr), args.steps, args.seed, 100, "torch.optim.AdamW")
    print(f"final loss: {generated.__name__} (optgen) {ours:.5f} vs torch.optim.AdamW {ref:.5f}")


if __name__ == "__main__":
    main()
