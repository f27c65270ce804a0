"""Predicted optimizer-state memory of a spec for a list of parameter shapes (no tensors made)."""

from __future__ import annotations

import math

from optgen.codegen.spec import Spec

# LLaMA-style decoders (untied head): (hidden, intermediate, layers, vocab). 60M-1.3B are the
# GaLore/SWAN pretraining configs; 7B and 13B are LLaMA's.
MODELS = {
    "llama-60m": (512, 1376, 8, 32000),
    "llama-130m": (768, 2048, 12, 32000),
    "llama-350m": (1024, 2736, 24, 32000),
    "llama-1.3b": (2048, 5461, 24, 32000),
    "llama-7b": (4096, 11008, 32, 32000),
    "llama-13b": (5120, 13824, 40, 32000),
}


def model_shapes(name: str) -> list[tuple[int, ...]]:
    hidden, inter, layers, vocab = MODELS[name]
    per_layer = [(hidden, hidden)] * 4 + [(inter, hidden)] * 2 + [(hidden, inter)] + [(hidden,)] * 2
    return [(vocab, hidden)] + per_layer * layers + [(hidden,), (vocab, hidden)]


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """ "4096x4096,11008x4096,4096" -> [(4096, 4096), (11008, 4096), (4096,)]."""
    shapes = []
    for item in text.split(","):
        try:
            shape = tuple(int(d) for d in item.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"bad shape {item!r}: write dimensions joined by x, e.g. 4096x4096") from None
        if not shape or min(shape) <= 0:
            raise ValueError(f"bad shape {item!r}: dimensions must be positive")
        shapes.append(shape)
    return shapes


def state_memory(spec: Spec, shapes: list[tuple[int, ...]]) -> dict[str, float]:
    """Total parameters, state bytes and bytes per parameter for ``shapes``."""
    params = sum(math.prod(s) for s in shapes)
    state = sum(spec.spec_for(s).state_nbytes(s) for s in shapes)
    return {"params": params, "state_bytes": state, "bytes_per_param": state / params}
