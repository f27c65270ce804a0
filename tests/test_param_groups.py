"""optgen.param_groups(model) and the ``route`` param-group key; training sanity of SWAN, factor4bit and
SinkGD against torch.optim.AdamW on a small model (thresholds below; measured numbers in the docs)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import optgen

V, D, H, T, B = 64, 48, 192, 16, 32


class Tiny(nn.Module):
    """Embedding, two hidden Linear layers, a norm and an untied LM head."""

    def __init__(self, tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.up = nn.Linear(2 * D, H)
        self.down = nn.Linear(H, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # next token from the last two
        e = self.embed(x)
        pair = torch.cat([e[:, 1:], e[:, :-1]], dim=-1)
        return self.head(self.norm(e[:, 1:] + self.down(nn.functional.gelu(self.up(pair)))))


def ids(params) -> set[int]:
    return {id(p) for p in params}


@pytest.mark.parametrize("tied", [False, True])
def test_param_groups_split_hidden_matrices_from_the_rest(tied):
    model = Tiny(tied)
    groups = optgen.param_groups(model)
    assert len(groups) == 2 and "route" not in groups[0] and groups[1]["route"] == "fallback"
    assert ids(groups[0]["params"]) == ids([model.up.weight, model.down.weight])
    rest = [model.embed.weight, model.up.bias, model.down.bias, model.norm.weight, model.norm.bias]
    assert ids(groups[1]["params"]) == ids(rest + ([] if tied else [model.head.weight]))
    total = sum(len(g["params"]) for g in groups)
    assert total == len(list(model.parameters()))  # every parameter once (a tied weight too)


def test_param_groups_without_embeddings_and_with_conv():
    mlp = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    hidden = optgen.param_groups(mlp)[0]["params"]
    assert ids(hidden) == ids([mlp[2].weight])  # the last Linear is the classifier head; conv stays out
    hidden = optgen.param_groups(mlp, conv=True, head=mlp[4])[0]["params"]
    assert ids(hidden) == ids([mlp[0].weight, mlp[2].weight])
    hidden = optgen.param_groups(mlp, fallback=[mlp[2].weight])
    assert len(hidden) == 1 and hidden[0]["route"] == "fallback"


def test_route_key_sends_matrices_to_the_fallback_and_survives_state_dict():
    model = Tiny()
    swan = optgen.load("swan")
    opt = swan(optgen.param_groups(model), lr=1e-3)
    model(torch.randint(0, V, (2, 5))).sum().backward()
    opt.step()
    assert set(opt.state[model.up.weight]) == {"step"}  # SWAN: no state
    assert set(opt.state[model.head.weight]) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW
    assert set(opt.state[model.embed.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    again = swan(optgen.param_groups(model), lr=1e-3)
    again.load_state_dict(opt.state_dict())
    assert again.param_groups[1]["route"] == "fallback"
    named = swan([{"params": [model.up.weight], "route": "adamw"}], lr=1e-3)
    named.step()
    assert set(named.state[model.up.weight]) == {"step", "exp_avg", "exp_avg_sq"}
    with pytest.raises(ValueError, match="invalid route='adam'.*valid: auto, fallback, swan, adamw"):
        swan([{"params": [model.up.weight], "route": "adam"}])


def batches(steps: int) -> list[torch.Tensor]:
    """Sequences from a fixed random second-order chain with 10% noise: learnable, not trivial."""
    g = torch.Generator().manual_seed(0)
    table = torch.randint(0, V, (V, V), generator=g)
    out = []
    for _ in range(steps):
        x = torch.empty(B, T, dtype=torch.long)
        x[:, :2] = torch.randint(0, V, (B, 2), generator=g)
        for t in range(2, T):
            noise = torch.rand(B, generator=g) < 0.1
            x[:, t] = torch.where(noise, torch.randint(0, V, (B,), generator=g), table[x[:, t - 2], x[:, t - 1]])
        out.append(x)
    return out


@pytest.mark.slow
def test_matrix_optimizers_train_a_small_model_as_well_as_adamw():
    data = batches(200)
    lr = 3e-3

    def final_loss(make_opt) -> tuple[float, float]:
        torch.manual_seed(0)
        model = Tiny()
        opt = make_opt(model)
        losses = []
        for x in data:
            loss = nn.functional.cross_entropy(model(x[:, :-1]).reshape(-1, V), x[:, 2:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return sum(losses[:10]) / 10, sum(losses[-20:]) / 20

    first, adamw = final_loss(lambda m: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0))
    assert adamw < 0.6 * first
    results = {
        "swan": final_loss(lambda m: optgen.load("swan")(optgen.param_groups(m), lr=lr)),
        "factor4bit": final_loss(lambda m: optgen.load("factor4bit")(m.parameters(), lr=lr, weight_decay=0.0)),
        "sinkgd": final_loss(lambda m: optgen.load("sinkgd")(optgen.param_groups(m), lr=lr)),
    }
    for name, (start, last) in results.items():
        assert abs(start - first) < 0.2, name
        assert last <= 1.1 * adamw, f"{name}: final loss {last:.3f} vs AdamW {adamw:.3f}"
