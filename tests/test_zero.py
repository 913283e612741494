"""ZeRO-1 (HybridZeroOptimizer), with and without the overlapped gradient reduce, in 4 gloo processes against
the same model trained in one process."""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_results import RankResults
from torch import nn

from pytrain.parallel import ParallelDims, ParallelMesh
from pytrain.solver import HybridZeroOptimizer
from pytrain.solver.optimizer import assign_owners

WORLD = 4
STEPS = 4
GLOBAL_BATCH = 16


def make_model(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 24),
        nn.LayerNorm(24),
        nn.GELU(),
        nn.Linear(24, 24),
        nn.Linear(24, 24),
        nn.Linear(24, 24),
        nn.Linear(24, 3),
    ).to(dtype)
    model.unused = nn.Parameter(torch.zeros(5, dtype=dtype))  # never in the forward: its grad stays None
    return model


def batches():
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(GLOBAL_BATCH, 6, generator=g), torch.randn(GLOBAL_BATCH, 3, generator=g)) for _ in range(STEPS)
    ]


def train(model, optimizer, rank=0, world=1):
    losses = []
    per_rank = GLOBAL_BATCH // world
    for inputs, targets in batches():
        inputs, targets = (
            inputs[rank * per_rank : (rank + 1) * per_rank],
            targets[rank * per_rank : (rank + 1) * per_rank],
        )
        optimizer.zero_grad()
        for micro, (x, y) in enumerate(zip(inputs.chunk(2), targets.chunk(2))):  # gradient accumulation
            loss = (model(x.to(model[0].weight.dtype)).float() - y).pow(2).mean() / 2
            optimizer.backward(loss, last=micro == 1)
        for reducer in getattr(optimizer, "grad_reducers", []):
            assert reducer.handles, "some buckets' all-reduce started during the backward"
        success, norm = optimizer.step()
        assert success
        losses.append(norm)
    return losses


def mesh_of(world: int, zero_size: int) -> ParallelMesh:
    """A data-parallel layout of `world` ranks whose optimizer state is sharded over runs of `zero_size`."""
    return ParallelMesh(ParallelDims(world_size=world, zero1=zero_size), "cpu", datetime.timedelta(seconds=120))


def optimizer_for(model, mesh=None, overlap=False):
    # A small bucket size: several buckets, so the overlapped reduce starts some before the backward ends.
    return HybridZeroOptimizer(
        model,
        lr=1e-2,
        weight_decay=0.1,
        clip_grad_norm=0.5,
        mesh=mesh,
        reduce_bucket_size=700,
        overlap_sync_grad=overlap,
    )


def worker(rank, init_method, dtype, results):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        for zero_size, overlap in ((1, False), (2, True), (4, False), (4, True)):
            model = make_model(dtype)
            optimizer = optimizer_for(model, mesh=mesh_of(WORLD, zero_size), overlap=overlap)
            assert bool(optimizer.grad_reducers) == overlap and all(len(r.buckets) > 2 for r in optimizer.grad_reducers)
            norms = train(model, optimizer, rank, WORLD)
            results[(zero_size, overlap, rank)] = (
                [p.detach().float() for p in model.parameters()],
                norms,
                optimizer.optimizer_state_bytes(),
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()


# slow (about 14 s each): test_parallel.py's dp2 and ZeRO-1 layouts check the same against one process in the fast suite
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero1_matches_one_process_and_shards_the_state(dtype, init_method):
    model = make_model(dtype)
    optimizer = optimizer_for(model)
    reference_norms = train(model, optimizer)
    reference_params = [p.detach().float() for p in model.parameters()]
    unsharded_bytes = optimizer.optimizer_state_bytes()

    with RankResults() as results:
        mp.spawn(worker, args=(init_method, dtype, results), nprocs=WORLD, join=True)
        results = dict(results)

    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=0.02, atol=0.02)
    for params, norms, _state_bytes in results.values():
        torch.testing.assert_close(norms, reference_norms, **tolerance)
        for got, want in zip(params, reference_params):
            torch.testing.assert_close(got, want, **tolerance)
    sizes = [p.numel() for p in make_model(dtype).parameters()]
    largest_share = unsharded_bytes * max(sizes) / sum(sizes)
    for zero_size, overlap in ((1, False), (2, True), (4, False)):
        per_rank = [results[(zero_size, overlap, rank)][2] for rank in range(WORLD)]
        # Each zero1 group holds the whole state once, split over its ranks within one parameter of even.
        assert sum(per_rank[:zero_size]) == unsharded_bytes
        assert max(per_rank) <= unsharded_bytes / zero_size + largest_share
    peak = {
        zero_size: max(results[(zero_size, overlap, r)][2] for r in range(WORLD))
        for zero_size, overlap in ((1, False), (2, True), (4, False))
    }
    assert peak[4] < peak[2] < peak[1] == unsharded_bytes


def test_assign_owners_balances_largest_first():
    assert assign_owners([10, 1, 7, 3, 3], 2) == [0, 1, 1, 1, 0]  # 10 | 7, 3 (3 ties go to rank 0), 1
    owners = assign_owners([100, 60, 50, 40, 10], 3)
    loads = [sum(s for s, o in zip([100, 60, 50, 40, 10], owners) if o == r) for r in range(3)]
    assert loads == [100, 70, 90] and owners[0] == 0
    assert assign_owners([5, 5], 4) == [0, 1]


def nan_worker(rank, init_method, results):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    try:
        model = make_model(torch.float32)
        optimizer = optimizer_for(model, mesh=mesh_of(2, zero_size=2))
        outcomes = []
        for step, (inputs, targets) in enumerate(batches()):
            optimizer.zero_grad()
            loss = (model(inputs[rank::2]) - targets[rank::2]).pow(2).mean()
            if step == 1 and rank == 1:
                loss = loss * float("nan")  # one rank's gradients go bad
            optimizer.backward(loss)
            before = [p.detach().clone() for p in model.parameters()]
            success, _ = optimizer.step()
            unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            outcomes.append((success, unchanged))
        results[rank] = outcomes
    finally:
        dist.destroy_process_group()


def test_nan_on_one_rank_skips_the_step_on_every_rank(init_method):
    with RankResults() as results:
        mp.spawn(nan_worker, args=(init_method, results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        assert [success for success, _ in results[rank]] == [True, False, True, True]
        assert results[rank][1][1], "a skipped step must leave the parameters untouched"
        assert not results[rank][2][1], "the run goes on after the skipped step"
