"""Float64 reference of Lion, written from the paper, independent of optgen.

Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023 (arXiv 2302.06675), Program 1 /
Algorithm 2, with decoupled weight decay::

    c = beta1 * m + (1 - beta1) * g          # interpolation used only for the update direction
    p = p * (1 - lr * wd) - lr * sign(c)     # sign update plus decoupled weight decay
    m = beta2 * m + (1 - beta2) * g          # momentum tracked with the second beta

Everything is computed in float64; a caller that mimics low-precision parameters rounds ``p``
itself after each step.
"""

from __future__ import annotations

import torch


def lion_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lion step in float64; returns the new ``(param, exp_avg)`` (inputs are left untouched)."""
    p = param.to(torch.float64)
    g = grad.to(torch.float64)
    m = exp_avg.to(torch.float64)
    c = beta1 * m + (1.0 - beta1) * g
    p = p * (1.0 - lr * weight_decay) - lr * torch.sign(c)
    m = beta2 * m + (1.0 - beta2) * g
    return p, m


class LionReference:
    """Float64 Lion over a list of parameter groups ``[{"params": [...], "lr": ..., "betas": ..., ...}]``.

    Holds its own float64 copies of the parameters (``self.params``) and momentum (``self.exp_avg``);
    ``step(grads)`` takes one gradient (or None, meaning "skip") per parameter, in group order.
    """

    def __init__(self, groups: list[dict], *, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        self.groups = []
        self.params: list[torch.Tensor] = []
        self.exp_avg: list[torch.Tensor | None] = []
        for group in groups:
            hyper = {
                "lr": float(group.get("lr", lr)),
                "betas": tuple(float(b) for b in group.get("betas", betas)),
                "weight_decay": float(group.get("weight_decay", weight_decay)),
            }
            start = len(self.params)
            for p in group["params"]:
                self.params.append(p.detach().to(torch.float64).clone())
                self.exp_avg.append(None)
            self.groups.append((hyper, range(start, len(self.params))))

    def step(self, grads: list[torch.Tensor | None]) -> None:
        for hyper, indices in self.groups:
            beta1, beta2 = hyper["betas"]
            for i in indices:
                if grads[i] is None:
                    continue
                if self.exp_avg[i] is None:
                    self.exp_avg[i] = torch.zeros_like(self.params[i])
                self.params[i], self.exp_avg[i] = lion_step(
                    self.params[i],
                    grads[i],
                    self.exp_avg[i],
                    lr=hyper["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    weight_decay=hyper["weight_decay"],
                )

    def round_params(self, dtype: torch.dtype) -> None:
        """Round every parameter to ``dtype`` and back (the oracle of a low-precision parameter)."""
        self.params = [p.to(dtype).to(torch.float64) for p in self.params]
