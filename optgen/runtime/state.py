"""State containers shared by every backend: quantized state and its saved (state_dict) form."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from optgen.codegen.quant import QuantScheme, midpoints


def scheme_from_name(name: str) -> QuantScheme:
    """Inverse of ``QuantScheme.name`` (used when loading a state_dict)."""
    bits, norm, table, sign = name.split("-")
    block = int(norm[len("block") :]) if norm.startswith("block") else 0
    return QuantScheme(int(bits[1:]), sign == "signed", "block" if block else norm, table, block)


@dataclass
class QuantizedState:
    """A quantized state tensor: what ``optimizer.state[p][key]`` holds for a quantized store."""

    codes: torch.Tensor  # uint8: one code per element (8-bit) or two per byte (4-bit, even element low)
    scales: torch.Tensor  # float32: per block, the concatenated per-dim maxima (rank-1), or one (tensor)
    scheme: QuantScheme
    shape: torch.Size
    # The code table and its midpoints on the codes' device: made once here, not on every step
    # (and not inside a torch.compile'd step). Not saved: the scheme name determines them.
    table: torch.Tensor = field(init=False, repr=False, compare=False)
    midpoints: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        device = self.codes.device
        self.table = torch.tensor(self.scheme.values, dtype=torch.float32, device=device)
        self.midpoints = torch.tensor(midpoints(self.scheme.values), dtype=torch.float32, device=device)

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def to_saved(self) -> dict:
        """Plain tensors and a scheme name, for state_dict."""
        return {"codes": self.codes, "scales": self.scales, "scheme": self.scheme.name, "shape": list(self.shape)}

    @classmethod
    def from_saved(cls, saved: dict, device: torch.device) -> QuantizedState:
        return cls(
            saved["codes"].to(device=device, dtype=torch.uint8, copy=True),
            saved["scales"].to(device=device, dtype=torch.float32, copy=True),
            scheme_from_name(saved["scheme"]),
            torch.Size(saved["shape"]),
        )

    @staticmethod
    def is_saved(value: object) -> bool:
        return isinstance(value, dict) and {"codes", "scales", "scheme", "shape"} <= set(value)
