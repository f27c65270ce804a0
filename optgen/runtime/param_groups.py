"""``optgen.param_groups(model)``: split a model's parameters the way matrix-optimizer papers do.

SWAN, Muon and 4-bit Factor apply their matrix update to the *hidden* weight matrices only; the
embeddings, the output head, norms and biases get Adam(W).  ``applies_to: ndim >= 2`` alone cannot
tell a hidden ``nn.Linear`` weight from an embedding table or an LM head (all are matrices), so
this helper classifies by module and returns torch.optim param groups:

- ``{"params": hidden}``: routed by the spec's ``applies_to`` (the matrix update);
- ``{"params": rest, "route": "fallback"}``: the last spec of the routing chain (e.g. AdamW) for
  every parameter in it, whatever its shape.

``route`` is a param-group key every generated optimizer understands (``"auto"``, ``"fallback"``
or the name of a spec on the routing chain); nothing here depends on which optimizer is used.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def param_groups(
    model: nn.Module,
    *,
    head: nn.Module | None = None,
    conv: bool = False,
    fallback: Iterable[torch.Tensor] = (),
) -> list[dict[str, Any]]:
    """Param groups for a generated optimizer: hidden matrices first, then the fall-back group.

    Args:
        model: the model; only parameters with ``requires_grad`` are returned, each once (tied
            weights count once, in the group of their first role: embedding, head, then hidden).
        head: the output layer. By default: an ``nn.Linear`` whose weight is tied to an embedding
            or whose ``out_features`` equals an embedding's ``num_embeddings`` (an LM head); in a
            model without embeddings, the last ``nn.Linear`` registered (a classifier).
        conv: also treat convolution weights as hidden matrices. Off by default: the matrix
            primitives treat a tensor with more than 2 dims as a batch of matrices over its leading
            dims, which for a kernel ``(out, in, kh, kw)`` whitens each ``kh x kw`` slice.
        fallback: further parameters to send to the fall-back spec (e.g. a positional-embedding
            ``nn.Parameter`` held directly by a module).

    Returns:
        ``[{"params": hidden}, {"params": rest, "route": "fallback"}]`` without empty groups. Add
        hyperparameters to either dict as usual (e.g. ``weight_decay``).
    """
    embeddings = [m for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if head is None:
        tables = {id(m.weight) for m in embeddings}
        vocab = {m.num_embeddings for m in embeddings}
        heads = [m for m in linears if id(m.weight) in tables or m.out_features in vocab]
        if not embeddings and linears:
            heads = [linears[-1]]
    else:
        heads = [head]

    to_fallback: set[int] = {id(p) for p in fallback}
    for module in [*embeddings, *heads]:
        to_fallback |= {id(p) for p in module.parameters()}
    if not conv:
        to_fallback |= {id(m.weight) for m in model.modules() if isinstance(m, _CONV)}

    hidden, rest, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (rest if id(p) in to_fallback or p.ndim < 2 else hidden).append(p)
    groups = [{"params": hidden}] if hidden else []
    if rest:
        groups.append({"params": rest, "route": "fallback"})
    return groups
