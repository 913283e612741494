"""Expert parallelism (pytrain.parallel.expert) against one process: a mixture-of-experts model trained
under expert x data (ZeRO-1), expert x tensor (with and without sequence parallelism) and expert x pipeline
layouts gives the single-process run's per-step losses, gradient norms and final parameters (each rank's
shard of them), through the real construction path (tests/test_parallel.py's harness), in gloo processes.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_parallel import TOLERANCE, config, reference, train

from pytrain.config import ConfigError, check_world_size
from pytrain.parallel.expert import ExpertParallelDispatcher

FAMILY = "MIXTRALMOE"
# test_parallel's model with 4 experts, top-2, GShard capacity (min_capacity 0: some tokens really are
# dropped), beside a shared MLP.
MOE = dict(
    num_experts=4,
    top_k=2,
    num_shared_experts=1,
    mlp_ratio=1.0,
    moe_layer_kwargs=dict(capacity_factor=1.0, min_capacity=0),
)

# name: (world size, parallel section, model overrides, optimizer overrides)
LAYOUTS = {
    "ep2": (2, dict(expert=dict(size=2)), {}, {}),
    "tp2": (2, dict(tensor=2), {}, {}),
    "ep2-dp2-zero1": (4, dict(expert=dict(size=2), zero1=-1), {}, dict(overlap_sync_grad=True)),
    "ep2-tp2": (4, dict(expert=dict(size=2), tensor=2), {}, {}),
    "ep2-tp2-msp": (4, dict(expert=dict(size=2), tensor=dict(size=2, mode="msp")), dict(checkpoint=True), {}),
    "ep2-pp2": (4, dict(expert=dict(size=2), pipeline=2), {}, {}),
}


def worker(rank, world, init_method, names, want, run_folder, results):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for name in names:
            _, parallel, model, optimizer = LAYOUTS[name]
            cfg = config(parallel, dict(MOE, **model), optimizer, world, run_folder, family=FAMILY)
            history, _, _, part = train(cfg, rank, world)
            expected = part.local_state(want[1])
            shards = [(n, p.detach().clone(), expected[n]) for n, p in part.full_state_names().items()]
            dispatchers = {type(m.dispatcher).__name__ for m in part.modules() if hasattr(m, "dispatcher")}
            results[(name, rank)] = (history, shards, dispatchers)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    return reference(FAMILY, MOE, tmp_path_factory.mktemp("reference"))


@pytest.mark.parametrize("world", [2, 4])
def test_expert_layouts_match_one_process(world, single_process, tmp_path, init_method, fresh_context):
    names = [name for name, (size, *_) in LAYOUTS.items() if size == world]
    with mp.Manager() as manager:
        results = manager.dict()
        args = (world, init_method, names, single_process, tmp_path, results)
        mp.spawn(worker, args=args, nprocs=world, join=True)
        results = dict(results)
    want_history = single_process[0]
    for name in names:
        for rank in range(world):
            history, shards, dispatchers = results[(name, rank)]
            assert dispatchers == {ExpertParallelDispatcher.__name__}, (name, dispatchers)
            assert all(success for _, _, success, _ in history), (name, rank, history)
            for column, what in ((0, "losses"), (1, "grad norms")):
                torch.testing.assert_close(
                    [h[column] for h in history],
                    [h[column] for h in want_history],
                    **TOLERANCE,
                    msg=lambda m, what=what: f"{name} rank {rank} {what}: {m}",
                )
            for full_name, got, want in shards:
                torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda m: f"{name} rank {rank} {full_name}: {m}")
            experts = [(n, got.shape[0]) for n, got, _ in shards if n.endswith("experts.w1")]
            parallel = LAYOUTS[name][1]
            split = parallel.get("expert", {}).get("size", 1) * _size(parallel.get("tensor", 1))
            assert experts and all(local == MOE["num_experts"] // split for _, local in experts), (name, experts)


def _size(section) -> int:
    return section["size"] if isinstance(section, dict) else section


@pytest.mark.parametrize(
    "world, parallel, message",
    [
        (4, dict(expert=dict(size=3)), r"parallel.expert.size=3 must divide the data-parallel size 4"),
        (8, dict(expert=dict(size=4), tensor=2), r"num_experts=4 .* expert size 4 x tensor size 2"),
    ],
)
def test_layouts_that_cannot_split_the_experts_are_config_errors(world, parallel, message, tmp_path):
    cfg = config(parallel, MOE, {}, None, tmp_path, family=FAMILY)
    with pytest.raises(ConfigError, match=message):
        check_world_size(cfg, world)
