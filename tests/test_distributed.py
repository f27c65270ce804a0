"""Generated optimizers under FSDP2 (DTensor shards, gloo, 2 CPU processes).

The oracle is the same model trained in one process on the same global batch. The reference's
gradient is built exactly as FSDP2 builds it (per-rank halves, summed, halved), so the two runs
see bit-identical gradients and any difference comes from the optimizer's handling of shards.
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.slow

WORLD = 2
STEPS = 10
GLOBAL_BATCH = 16
# spec -> quantized state tensors expected on the two big weights (the rest is kept in float)
QUANTIZED = {"adamw": 0, "adamw4bit": 4, "adamw8bit": 4, "adamw4bit_block": 4, "factor4bit": 2, "swan": 0}


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 96x64 and 64x96 weights: 6144 elements, above keep_full_precision (4096), so they are
    # quantized; each rank's shard holds 3072 elements = whole 128- and 256-element blocks.
    # The 5x64 head is split unevenly (3 rows and 2), as FSDP2 splits it.
    return torch.nn.Sequential(
        torch.nn.Linear(64, 96), torch.nn.Tanh(), torch.nn.Linear(96, 64), torch.nn.Tanh(), torch.nn.Linear(64, 5)
    )


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(GLOBAL_BATCH, 64, generator=gen), torch.randn(GLOBAL_BATCH, 5, generator=gen)


def shard_model(model: torch.nn.Module, world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def codes_of(value) -> torch.Tensor | None:
    from optgen.runtime.quant_torch import _unpack
    from optgen.runtime.state import QuantizedState

    if not isinstance(value, QuantizedState):
        return None
    return _unpack(value.codes, value.scheme.bits, math.prod(value.shape))


def train_sharded_and_single(rank: int, world: int, spec: str) -> dict:
    import optgen
    from optgen.runtime.distributed import local

    cls = optgen.load(spec)
    sharded, single = shard_model(make_model(), world), make_model()
    # SWAN's matrix updates have unit RMS whatever the gradient, so its lr is 10x smaller (its default):
    # at lr=1e-2 each step moves these ~0.1-sized weights by 10%, and the whitening of the next
    # gradients amplifies the last-bit difference of the update's all-reduced RMS ~30x per step.
    lr = 1e-3 if spec == "swan" else 1e-2
    opt_sharded = cls(sharded.parameters(), lr=lr, weight_decay=0.1)
    # The reference runs the torch kernels, as shards do for specs with whole-tensor statistics, so
    # quantization ties cannot round differently between the two runs.
    opt_single = cls(single.parameters(), lr=lr, weight_decay=0.1, backend="torch")
    per_rank = GLOBAL_BATCH // world
    whitened = count_whitenings()
    for step in range(STEPS):
        x, y = batch(step)
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        torch.nn.functional.mse_loss(sharded(x[mine]), y[mine]).backward()
        whitened.active = True
        opt_sharded.step()
        whitened.active = False
        opt_sharded.zero_grad()
        for r in range(world):  # FSDP2 averages per-rank gradients: sum the halves, then halve
            part = slice(r * per_rank, (r + 1) * per_rank)
            torch.nn.functional.mse_loss(single(x[part]), y[part]).backward()
        for p in single.parameters():
            p.grad /= world
        opt_single.step()
        opt_single.zero_grad()

    worst, code_mismatches, quantized = 0.0, 0, 0
    for p, q in zip(sharded.parameters(), single.parameters(), strict=True):
        full = p.full_tensor()
        worst = max(worst, ((full - q).abs().max() / q.abs().max()).item())
        rows = slice(rank * math.ceil(q.shape[0] / world), (rank + 1) * math.ceil(q.shape[0] / world))
        for key, value in opt_sharded.state[p].items():
            mine = codes_of(value)
            if mine is None:
                continue
            quantized += 1
            reference = opt_single.state[q][key]
            expected = codes_of(reference).view(q.shape)[rows].reshape(-1)
            code_mismatches += int((mine != expected).sum())
            assert local(p).shape == value.shape
    return {"worst_rel": worst, "code_mismatches": code_mismatches, "quantized": quantized, "whitened": whitened.count}


def count_whitenings():
    """Counts the whitenings this process computes while ``active``."""
    from optgen.runtime import matrix

    class Counter:
        active, count = False, 0

    counter, original = Counter(), matrix._coupled_newton_schulz

    def counted(*args):
        counter.count += counter.active
        return original(*args)

    matrix._coupled_newton_schulz = counted
    return counter


@pytest.mark.parametrize("spec", list(QUANTIZED))
def test_fsdp2_matches_single_process(spec):
    """factor4bit all-reduces row/column means over the sharded dim; swan gathers each matrix to
    whiten it and all-reduces its update's RMS; the rank-1 specs all-reduce their maxima."""
    from distributed_run import run_ranks

    results = run_ranks(train_sharded_and_single, WORLD, spec)
    for rank, result in enumerate(results):
        assert result["worst_rel"] <= 1e-5, f"rank {rank}: {result}"
        assert result["code_mismatches"] == 0, f"rank {rank}: {result}"
        assert result["quantized"] == QUANTIZED[spec], result  # the big weights' states really are quantized
    if spec == "swan":  # 3 matrices per step, each whitened once, by one rank: the work is spread
        assert [r["whitened"] for r in results] == [2 * STEPS, 1 * STEPS], results


# -- distributed checkpoints (torch.distributed.checkpoint) --------------------------------------

HYPER = dict(lr=1e-2, weight_decay=0.1)


def sharded_step(model, opt, step: int, rank: int, world: int) -> None:
    x, y = batch(step)
    per_rank = GLOBAL_BATCH // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    torch.nn.functional.mse_loss(model(x[mine]), y[mine]).backward()
    opt.step()
    opt.zero_grad()


def single_step(model, opt, step: int, halves: int) -> None:
    x, y = batch(step)
    per_rank = GLOBAL_BATCH // halves
    for r in range(halves):  # the gradient exactly as FSDP2 forms it on ``halves`` ranks
        part = slice(r * per_rank, (r + 1) * per_rank)
        torch.nn.functional.mse_loss(model(x[part]), y[part]).backward()
    for p in model.parameters():
        p.grad /= halves
    opt.step()
    opt.zero_grad()


def full_params(model) -> list[torch.Tensor]:
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone() for p in model.parameters()]


def save_after_three_steps(rank: int, world: int, spec: str, checkpoint: str) -> list[torch.Tensor]:
    """Train 3 steps sharded, save with DCP, then take step 4: the parameters it must reproduce."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import optgen

    model = shard_model(make_model(), world)
    opt = optgen.load(spec)(model.parameters(), **HYPER)
    for step in range(3):
        sharded_step(model, opt, step, rank, world)
    model_sd, optim_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    sharded_step(model, opt, 3, rank, world)
    return full_params(model)


def opt_is_shard_local(spec: str) -> bool:
    import optgen

    return all(program.shard_local for program in optgen.load(spec).programs)


def load_and_step(rank: int, world: int, spec: str, checkpoint: str, sharded: bool) -> list[torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import optgen

    torch.manual_seed(1)  # a different initialization: everything must come from the checkpoint
    model = make_model()
    for p in model.parameters():
        torch.nn.init.normal_(p)
    if sharded:
        model = shard_model(model, world)
    # One process has no shards: pick the kernels the 2-rank run used (torch for whole-tensor
    # statistics) so that "identical" can mean bit for bit.
    backend = "auto" if sharded or opt_is_shard_local(spec) else "torch"
    opt = optgen.load(spec)(model.parameters(), **HYPER, backend=backend)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    if sharded:
        sharded_step(model, opt, 3, rank, world)
    else:
        single_step(model, opt, 3, halves=WORLD)
    return full_params(model)


@pytest.mark.parametrize("spec", ["adamw", "adamw4bit", "adamw8bit", "factor4bit", "swan"])
def test_dcp_save_on_two_ranks_resumes_on_two_and_on_one(spec, tmp_path):
    """Bit-identical, except one process resuming factor4bit or swan: its row/column means and
    update RMS are one local reduction where two ranks sum two partial ones (float32 rounding)."""
    from distributed_run import run_ranks

    checkpoint = str(tmp_path / "checkpoint")
    expected = run_ranks(save_after_three_steps, WORLD, spec, checkpoint)[0]
    on_two = run_ranks(load_and_step, WORLD, spec, checkpoint, True)
    on_one = run_ranks(load_and_step, 1, spec, checkpoint, False)[0]
    reordered = 1e-5 if spec in ("factor4bit", "swan") else 0.0  # sums in another order
    resumed_runs = [("rank 0 of 2", on_two[0], 0.0), ("rank 1 of 2", on_two[1], 0.0), ("1 process", on_one, reordered)]
    for where, resumed, tol in resumed_runs:
        for index, (got, want) in enumerate(zip(resumed, expected, strict=True)):
            label = f"{where}, parameter {index}"
            torch.testing.assert_close(got, want, rtol=tol, atol=tol / 10, msg=lambda m, label=label: f"{label}: {m}")


def train_ddp_and_single(rank: int, world: int, spec: str) -> float:
    import optgen

    ddp = torch.nn.parallel.DistributedDataParallel(make_model())
    single = make_model()
    opt_ddp = optgen.load(spec)(ddp.parameters(), **HYPER)
    opt_single = optgen.load(spec)(single.parameters(), **HYPER)
    for step in range(STEPS):
        sharded_step(ddp, opt_ddp, step, rank, world)  # DDP all-reduces (averages) the gradients
        single_step(single, opt_single, step, halves=world)
    return max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(ddp.parameters(), single.parameters()))


def test_ddp_works_unchanged():
    from distributed_run import run_ranks

    for worst in run_ranks(train_ddp_and_single, WORLD, "adamw4bit"):
        assert worst <= 1e-5


@pytest.fixture(autouse=True)
def no_leftover_processes():
    import multiprocessing

    yield
    assert not multiprocessing.active_children(), "rank processes outlived the test"


# -- reductions and matrix primitives on shards ---------------------------------------------------


def reductions_on_shards(rank: int, world: int) -> list[str]:
    """Every reduction and primitive on a shard must give the whole tensor's value (its shard of it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from optgen.runtime import distributed, matrix, reductions

    mesh = init_device_mesh("cpu", (world,))
    problems, calls, expected = [], [], []
    for shape in [(5, 7), (1, 6), (3, 4, 6)]:  # uneven rows; one row: rank 1's shard is empty; batched
        whole = torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        shard = distribute_tensor(whole, mesh, [Shard(0)])
        local, sharding = shard.to_local(), distributed.sharding_of(shard)
        rows = slice(rank * math.ceil(shape[0] / world), (rank + 1) * math.ceil(shape[0] / world))
        operands = {  # kind -> (local operand, whole operand, is the local one a shard of the whole)
            "full": (local, whole, True),
            "rows": (local.sum(-1, keepdim=True), whole.sum(-1, keepdim=True), True),
            # a cols value is split along dim 0 only when it has one beside its rows and cols dims
            "cols": (
                (local if len(shape) > 2 else whole).sum(-2, keepdim=True),
                whole.sum(-2, keepdim=True),
                len(shape) > 2,
            ),
        }
        for name in ("mean", "sum", "amax", "amin", "norm"):
            for kind, (mine, full, split) in operands.items():
                for dim in (-1, -2, None):
                    with distributed.sharded(sharding):
                        got = getattr(reductions, name)(mine, dim, kind)
                    want = getattr(reductions, name)(full, dim, kind)  # no sharding: plain torch
                    if split and dim is not None and dim % len(shape) != 0:
                        want = want[rows]  # a reduction that kept the sharded dim: this rank's part
                    if not torch.allclose(got, want, rtol=1e-12, atol=1e-12):
                        problems.append(f"{name} {kind} dim={dim} shape={shape}")

        def stage(x, eps):  # a matrix stage with two outputs, as generated code may have
            x0 = matrix.standardize(x, dim="long", eps=eps)
            return x0, matrix.whiten(x0, steps=8)

        want = tuple(out[rows] for out in stage(whole, 1e-8))
        with distributed.sharded(sharding):
            got = distributed.on_whole(stage, local, 1e-8)  # every rank gathers and computes
        if not all(torch.equal(g, w) for g, w in zip(got, want, strict=True)):
            problems.append(f"on_whole shape={shape}")
        # spread_whole: each rank computes a share of the stages and scatters the parts
        calls += [(sharding, stage, (local, 1e-8)), (sharding, lambda x: matrix.whiten(x, steps=3), (local,))]
        expected += [want, matrix.whiten(whole, steps=3)[rows]]
    for index, (got, want) in enumerate(zip(distributed.spread_whole(calls), expected, strict=True)):
        got, want = (got, want) if isinstance(want, tuple) else ((got,), (want,))
        if not all(torch.equal(g, w) for g, w in zip(got, want, strict=True)):
            problems.append(f"spread_whole call {index}")
    return problems


def test_reductions_and_matrix_primitives_on_shards_equal_the_whole_tensors():
    from distributed_run import run_ranks

    for rank, problems in enumerate(run_ranks(reductions_on_shards, WORLD)):
        assert not problems, f"rank {rank}: {problems}"


def explicit_backend_on_shards(rank: int, world: int) -> str:
    import optgen

    model = shard_model(make_model(), world)
    opt = optgen.load("factor4bit")(model.parameters(), backend="inductor")
    x, y = batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    try:
        opt.step()
    except RuntimeError as error:
        return str(error)
    return "stepped"


def test_a_backend_that_cannot_combine_shards_is_a_clear_error():
    from distributed_run import run_ranks

    for message in run_ranks(explicit_backend_on_shards, WORLD):
        assert "only the torch backend combines across FSDP shards" in message, message
