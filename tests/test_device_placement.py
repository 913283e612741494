"""Every tensor a collective sees sits on the run's device.

NCCL takes CUDA tensors only ("No backend type associated with device type cpu"), but on a CPU machine
every tensor is on the CPU, so a tensor created without `device=` cannot be told from one created on
the run's device. Here the default device is made `meta` for the whole run: a tensor created without a
device lands on meta, and the collectives, wrapped, refuse any tensor not on the run's device. Start-up
and a few training steps of every parallel layout go through the real command line (main()).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CONFIGS
from rank_results import RankResults

COLLECTIVES = (
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
)


def guard_collectives(device: torch.device) -> None:
    def check(name, tensors):
        for tensor in tensors:
            if isinstance(tensor, torch.Tensor) and tensor.device != device:
                raise AssertionError(f"dist.{name} got a tensor on {tensor.device}; the run's device is {device}")

    def wrap(name, collective):
        def guarded(tensor, *args, **kwargs):
            check(name, tensor if isinstance(tensor, (list, tuple)) else [tensor])
            check(name, [a for a in args if isinstance(a, torch.Tensor)])
            return collective(tensor, *args, **kwargs)

        return guarded

    for name in COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))
    batch_isend_irecv = dist.batch_isend_irecv

    def guarded_p2p(ops):
        check("batch_isend_irecv", [op.tensor for op in ops])
        return batch_isend_irecv(ops)

    dist.batch_isend_irecv = guarded_p2p


LAYOUTS = {
    "dp2-zero1-overlap": (2, ["parallel.zero1.size=-1", "hybrid_zero_optimizer.overlap_sync_param=True"]),
    "tp2": (2, ["parallel.tensor.size=2"]),
    "tp2-msp": (2, ["parallel.tensor.size=2", "parallel.tensor.mode='msp'"]),
    "pp2": (2, ["parallel.pipeline.size=2", "model.tie_word_embeddings=True", "model.embed_split_hidden=False"]),
    "pp2-interleaved": (2, ["parallel.pipeline.size=2", "model.num_chunks=2", "data.micro_num=2"]),
    "tp2-pp2": (4, ["parallel.tensor.size=2", "parallel.pipeline.size=2"]),
}
SMALL = [
    "model.num_layers=4",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "data.seq_len=32",
    "data.micro_bsz=2",
    "data.total_steps=2",
    "data.train_folder=None",
    "monitor.tensorboard.enable=False",
]


class HostIteration:
    """A loader whose batches are built with the CPU as the default device: data loading is host work (and
    torch's DataLoader makes tensors without a device), the rest of the run is what the test watches."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        with torch.device("cpu"):
            batches = iter(self.loader)
        while True:
            with torch.device("cpu"):
                batch = next(batches, None)
            if batch is None:
                return
            yield batch

    def __getattr__(self, name):
        return getattr(self.loader, name)


def worker(rank, world, init_method, names, run_folder, results):
    """Runs each layout's main() in turn, in one process group each (main() ends it)."""
    from pytrain.parallel import gpc
    from pytrain.train import __main__ as run
    from pytrain.train.__main__ import main

    get_loader = run.get_train_data_loader
    run.get_train_data_loader = lambda **kwargs: (lambda pair: (HostIteration(pair[0]), pair[1]))(get_loader(**kwargs))
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1"
    )  # each group below is already joined when main() starts: launch uses it as it is
    torch.set_num_threads(1)
    guard_collectives(torch.device("cpu"))
    for index, name in enumerate(names):
        dist.init_process_group("gloo", init_method=f"{init_method}-{index}", rank=rank, world_size=world)
        torch.set_default_device("meta")
        try:
            overrides = [*SMALL, *LAYOUTS[name][1], f"monitor.run_folder={run_folder / name}"]
            results[(name, rank)] = main(["--config", str(CONFIGS / "tiny.py"), "--set", *overrides])
            assert gpc.device == torch.device("cpu")
        finally:
            torch.set_default_device("cpu")
            if dist.is_initialized():
                dist.destroy_process_group()


@pytest.mark.slow  # about 10 s in 2 processes, 4 in 4: every layout's construction path
@pytest.mark.parametrize("world", [2, 4])
def test_collectives_only_see_tensors_on_the_run_device(world, tmp_path, init_method):
    """Every layout of `world` ranks, one after the other in one launch of its processes."""
    names = [name for name, (size, _) in LAYOUTS.items() if size == world]
    with RankResults() as results:
        mp.spawn(worker, args=(world, init_method, names, tmp_path, results), nprocs=world, join=True)
        assert dict(results) == {(name, rank): 0 for name in names for rank in range(world)}


def test_the_guard_catches_a_tensor_made_without_a_device(init_method):
    dist.init_process_group("gloo", init_method=init_method, rank=0, world_size=1)
    saved = {name: getattr(dist, name) for name in (*COLLECTIVES, "batch_isend_irecv") if hasattr(dist, name)}
    try:
        guard_collectives(torch.device("cpu"))
        with torch.device("meta"), pytest.raises(AssertionError, match="got a tensor on meta"):
            dist.all_reduce(torch.zeros(3))
        dist.all_reduce(torch.zeros(3, device="cpu"))
    finally:
        for name, function in saved.items():
            setattr(dist, name, function)
        dist.destroy_process_group()
