"""FSDP's pieces that need no process group: the shard specs of its cut (torch.chunk of a rank's tensor along
dim 0) and the refusals. The layouts themselves run against one process in test_parallel.py and
test_expert_parallel.py; their checkpoints in test_checkpoint_training.py."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pytrain.checkpoint.layout import check_spec, overlaps, spec_from_json, spec_to_json
from pytrain.config import Config, ConfigError
from pytrain.parallel.shard_spec import ShardSpec


def tensor_parallel_specs():
    """A whole tensor, a column-parallel (dim 0) shard of a fused weight, a row-parallel (dim 1) shard."""
    whole = st.builds(lambda r, c: ShardSpec.whole((r, c)), st.integers(1, 9), st.integers(1, 5))
    fused = st.builds(
        lambda seg, world, rank, c: ShardSpec.split(
            (sum(seg) * world, c), 0, rank % world, world, [s * world for s in seg]
        ),
        st.lists(st.integers(1, 4), min_size=1, max_size=3),
        st.integers(1, 3),
        st.integers(0, 2),
        st.integers(1, 4),
    )
    rowwise = st.builds(
        lambda r, c, world, rank: ShardSpec.split((r, c * world), 1, rank % world, world),
        st.integers(1, 9),
        st.integers(1, 3),
        st.integers(1, 3),
        st.integers(0, 2),
    )
    return st.one_of(whole, fused, rowwise)


@settings(max_examples=200, deadline=None)
@given(spec=tensor_parallel_specs(), world=st.integers(1, 6))
def test_fsdp_cut_is_torch_chunk_of_the_shard_and_reads_back_through_the_checkpoint_layout(spec, world):
    full = torch.arange(torch.Size(spec.full_shape).numel(), dtype=torch.float32).view(spec.full_shape)
    local = spec.cut(full)
    chunks = torch.chunk(local, world, dim=0)
    for rank in range(world):
        cut = spec.chunk_rows(rank, world)
        want = chunks[rank] if rank < len(chunks) else local[:0]  # torch.chunk gives fewer chunks than asked
        assert cut.local_shape == tuple(want.shape)
        assert torch.equal(cut.cut(full), want)
        check_spec("w", cut)
        assert spec_from_json(cut.full_shape, spec_to_json(cut)) == cut
        placed = torch.full_like(full, -1.0)
        cut.place(want, placed)
        assert torch.equal(placed[placed >= 0].sort().values, want.flatten().sort().values)
        # what a checkpoint reader does: the FSDP shard filled from the tensor-parallel shard and back
        filled = torch.empty(cut.local_shape)
        for source, target, _ in overlaps(spec, cut):
            filled[target] = local[source]
        assert torch.equal(filled, want)


def test_fsdp_cut_of_a_cut_is_refused():
    once = ShardSpec.split((4, 6), 1, 0, 2).chunk_rows(0, 2)
    with pytest.raises(ValueError, match="already cut into rows"):
        once.chunk_rows(0, 2)


def test_a_model_without_a_tensor_parallel_plan_is_refused_under_fsdp(fresh_context):
    from pytrain.registry import MODEL_INITIALIZER
    from pytrain.train import initialize_model

    MODEL_INITIALIZER.register_module(module_name="PLAIN_FOR_FSDP", module=lambda **_: torch.nn.Linear(4, 4))
    try:
        cfg = Config.from_dict(dict(model_type="PLAIN_FOR_FSDP", model=dict(), parallel=dict(zero1=dict(fsdp=True))))
        with pytest.raises(ConfigError, match=r"fsdp=True.*without tensor_parallel_plan.*fsdp=False"):
            initialize_model(cfg)
    finally:
        MODEL_INITIALIZER.unregister("PLAIN_FOR_FSDP")
