"""Bit-for-bit comparison of two runs' parameters and optimizer state (thread-count tests)."""

import torch

from optgen.runtime.state import QuantizedState


def assert_same_result(name: str, one: tuple, other: tuple) -> None:
    """``one`` and ``other``: (parameter, its state dict); quantized state compares codes and scales."""
    (param, state), (other_param, other_state) = one, other
    assert torch.equal(param, other_param), name
    for key, value in state.items():
        twin = other_state[key]
        if isinstance(value, QuantizedState):
            assert torch.equal(value.codes, twin.codes) and torch.equal(value.scales, twin.scales), key
        else:
            assert torch.equal(value, twin), key
