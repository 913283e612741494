"""The layout's process groups, from the device mesh: which ranks each group holds, for every rank of a layout,
built in this one process over torch's fake backend (no communication, only the bookkeeping every rank does)."""

import datetime
import gc

import pytest
import torch.distributed as dist
from torch._C._distributed_c10d import FakeProcessGroup
from torch.testing._internal.distributed.fake_pg import FakeStore

from pytrain.config import ConfigError
from pytrain.parallel import ParallelDims, ParallelMesh
from pytrain.parallel import mesh as mesh_module

GROUPS = (
    "tensor_group",
    "data_group",
    "pipeline_group",
    "model_group",
    "zero1_group",
    "embedding_group",
    "expert_group",
    "expert_data_group",
    "expert_zero1_group",
)


def build_every_rank(dims: ParallelDims, timeout=datetime.timedelta(seconds=60)) -> list[dict]:
    """For each rank: {group name: its ranks (None for no group)} plus its coordinates and stage ranks."""
    assert not dist.is_initialized()
    out = []
    for rank in range(dims.world_size):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=dims.world_size)
        try:
            mesh = ParallelMesh(dims, "cpu", timeout)
            seen = {name: getattr(mesh, name) for name in GROUPS}
            seen = {name: None if g is None else dist.get_process_group_ranks(g) for name, g in seen.items()}
            seen["coordinates"] = (mesh.pipeline_rank, mesh.data_rank, mesh.tensor_rank)
            seen["stages"] = [mesh.stage_rank(stage) for stage in range(dims.pipeline)]
            out.append(seen)
        finally:
            mesh = None
            dist.destroy_process_group()
    # a DeviceMesh holds reference cycles: free its groups now, not in a process forked later (a
    # multiprocessing Manager) whose garbage collector would finalize them there
    gc.collect()
    return out


def groups(per_rank: list[dict], name: str) -> list[list[int]]:
    """The distinct groups named `name`, in order of their lowest rank."""
    found = {tuple(g[name]) for g in per_rank if g[name] is not None}
    return sorted(map(list, found))


def test_groups_follow_megatron_order():
    per_rank = build_every_rank(ParallelDims(world_size=8, tensor=2, pipeline=2))
    assert groups(per_rank, "tensor_group") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups(per_rank, "data_group") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert groups(per_rank, "pipeline_group") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert groups(per_rank, "model_group") == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert groups(per_rank, "embedding_group") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert per_rank[6]["coordinates"] == (1, 1, 0) and per_rank[6]["stages"] == [2, 6]
    # a dense model: no expert group, and its "expert data" group is the data group
    assert all(g["expert_group"] is None and g["expert_data_group"] == g["data_group"] for g in per_rank)
    assert all(g["zero1_group"] is None and g["expert_zero1_group"] is None for g in per_rank)


def test_zero1_groups_are_runs_of_consecutive_data_ranks():
    per_rank = build_every_rank(ParallelDims(world_size=8, zero1=2))
    assert groups(per_rank, "zero1_group") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    whole = build_every_rank(ParallelDims(world_size=4, tensor=2, zero1=2))
    assert groups(whole, "zero1_group") == groups(whole, "data_group") == [[0, 2], [1, 3]]
    assert all(g["embedding_group"] is None for g in whole)  # no pipeline


def test_expert_groups_cut_each_data_group_into_runs():
    per_rank = build_every_rank(ParallelDims(world_size=8, expert=2, zero1=8, expert_zero1=2))
    assert groups(per_rank, "expert_group") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert groups(per_rank, "expert_data_group") == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert groups(per_rank, "expert_zero1_group") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    with_tensor = build_every_rank(ParallelDims(world_size=8, tensor=2, expert=2, zero1=4, expert_zero1=2))
    assert groups(with_tensor, "expert_group") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert (
        groups(with_tensor, "expert_data_group")
        == groups(with_tensor, "expert_zero1_group")
        == [[0, 4], [1, 5], [2, 6], [3, 7]]
    )


def test_every_group_waits_the_configured_timeout(monkeypatch):
    """DeviceMesh's groups take the timeout through backend options; the embedding groups directly."""
    configured = datetime.timedelta(seconds=77)
    given = []
    for module in (dist, mesh_module.dist, dist.device_mesh):
        real = module.new_group
        monkeypatch.setattr(module, "new_group", lambda *a, real=real, **k: given.append(k["timeout"]) or real(*a, **k))

    def fake_backend_options(timeout):  # what _timeout_options makes for NCCL and gloo, for the fake backend
        options = FakeProcessGroup.Options()
        options._timeout = timeout
        return options

    monkeypatch.setattr(mesh_module, "_timeout_options", fake_backend_options)
    build_every_rank(ParallelDims(world_size=8, pipeline=2, expert=2, zero1=2, expert_zero1=2), timeout=configured)
    assert len(given) > 8 and set(given) == {configured}


def test_a_layout_that_does_not_divide_is_refused():
    with pytest.raises(ValueError, match="does not divide"):
        ParallelDims(world_size=6, tensor=4)
    with pytest.raises(ValueError, match="zero1 size 3 does not divide 4"):
        ParallelDims(world_size=4, zero1=3)


def test_dims_come_from_the_config(tmp_path):
    from conftest import CONFIGS

    from pytrain.config import Config

    cfg = Config.from_file(CONFIGS / "tiny.py", overrides=["parallel.tensor.size=2", "parallel.zero1.size=-1"])
    assert ParallelDims.from_config(cfg, 8) == ParallelDims(world_size=8, tensor=2, zero1=4)
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        ParallelDims.from_config(cfg, 3)
