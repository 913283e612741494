"""isp (InternEvo's intern sequence parallel) and its weight parallelism against one process: the same model,
global batches and steps give the same losses, gradient norms and final parameters (test_parallel's harness:
the real construction path in gloo processes, fp32, its tolerance).

The all-to-alls alone are checked against plain attention in one call (the fast test); the layouts train.
"""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_results import RankResults
from test_parallel import assert_rank_matches, config, reference, train

from pytrain.config import ConfigError, check_world_size

ISP2 = dict(size=2, mode="isp")
MOE = dict(head_dim=24, num_experts=4, top_k=2)  # QWEN3MOE, dropless: no capacity, so no drop differs by layout

# name: (world size, family, parallel section, model overrides)
LAYOUTS = {
    "isp2": (2, "INTERNLM", dict(tensor=ISP2), dict(checkpoint=True)),
    "isp2-weight2-overlap": (2, "INTERNLM", dict(tensor=ISP2, weight=dict(size=2, overlap=True)), {}),
    "isp4-kv-repeated": (4, "INTERNLM", dict(tensor=dict(size=4, mode="isp")), {}),  # 2 kv heads over 4 ranks
    "isp2-dp2-zero1": (4, "INTERNLM", dict(tensor=ISP2, zero1=-1), {}),
    "isp2-weight4-per-module": (
        4,
        "INTERNLM",
        dict(tensor=ISP2, weight=dict(size=4, forward_overlap_per="module")),
        {},
    ),
    "isp2-weight2-pp2-interleaved": (
        4,
        "INTERNLM",
        dict(tensor=ISP2, weight=dict(size=2, overlap=True), pipeline=2),
        dict(num_chunks=2),
    ),
    "isp2-moe-ep2": (4, "QWEN3MOE", dict(tensor=ISP2, expert=dict(size=2)), MOE),
    # the experts sharded over the 2 tensor ranks holding them, the dense weights over all 4
    "isp2-moe-ep2-weight4-expert-weight2": (
        4,
        "QWEN3MOE",
        dict(tensor=ISP2, expert=dict(size=2), weight=4, expert_weight=2),
        MOE,
    ),
    "isp2-moe-weight2": (2, "QWEN3MOE", dict(tensor=ISP2, weight=2), MOE),  # experts replicated, dense sharded
    # sequence_2D: heads over the head group, ring attention (zigzag) over the context group
    "2d-head1-context2": (2, "INTERNLM", dict(tensor=ISP2, sequence_2D=dict(enable=True, context_size=2)), {}),
    "2d-head2-context2": (
        4,
        "INTERNLM",
        dict(tensor=dict(size=4, mode="isp"), sequence_2D=dict(enable=True, head_size=2, context_size=2)),
        {},
    ),
    "2d-context2-weight2-pp2": (
        4,
        "INTERNLM",
        dict(
            tensor=ISP2,
            weight=2,
            pipeline=2,
            sequence_2D=dict(enable=True, head_size=1, context_size=2),
        ),
        {},
    ),
    "2d-head1-context4-double-ring-context-first": (
        4,
        "INTERNLM",
        dict(
            tensor=dict(size=4, mode="isp"),
            sequence_2D=dict(
                enable=True,
                context_size=4,
                window_size=2,
                device_placement_strategy=dict(head_first=False, interleaved=True),
            ),
        ),
        dict(checkpoint=True),
    ),
}


def worker(rank, world, init_method, names, references, run_folder, results):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for name in names:
            _, family, parallel, model_overrides = LAYOUTS[name]
            history, _, _, model = train(
                config(parallel, model_overrides, {}, world, run_folder, family=family), rank, world
            )
            want = model.local_state(references[name][1])
            shards = [(n, p.detach().clone(), want[n]) for n, p in model.full_state_names().items()]
            results[(name, rank)] = (history, shards)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def check_against_one_process(world, names, tmp_path, init_method):
    references = {}
    for name in names:
        _, family, _, model = LAYOUTS[name]
        variant = {k: v for k, v in model.items() if k not in ("checkpoint", "num_chunks")}
        references[name] = reference(family, variant, tmp_path)
    with RankResults() as results:
        mp.spawn(worker, args=(world, init_method, names, references, tmp_path, results), nprocs=world, join=True)
        results = dict(results)
    for name in names:
        want_history, _ = references[name]
        for rank in range(world):
            history, shards = results[(name, rank)]
            assert_rank_matches(f"{name} rank {rank}", history, shards, want_history)


FAST = ["isp2-weight2-overlap", "2d-head1-context2"]  # isp with weight parallelism, the ring: in the fast suite


def test_isp_2_matches_one_process(tmp_path, init_method, fresh_context):
    check_against_one_process(2, FAST, tmp_path, init_method)


@pytest.mark.slow  # 2 processes: about 10 s; 4: about a minute
@pytest.mark.parametrize("world", [2, 4])
def test_isp_layouts_match_one_process(world, tmp_path, init_method, fresh_context):
    names = [name for name, (size, *_) in LAYOUTS.items() if size == world and name not in FAST]
    check_against_one_process(world, names, tmp_path, init_method)


@pytest.mark.parametrize(
    "world, parallel, model, message",
    [
        (2, dict(tensor=dict(size=2, mode="isp")), dict(num_attention_heads=3, hidden_size=48), r"num_attention_heads"),
        (
            4,
            dict(tensor=dict(size=4, mode="isp")),
            dict(num_kv_attention_heads=None, num_attention_heads=6, hidden_size=48),
            r"num_attention_heads",
        ),
        (2, dict(weight=2), {}, r"parallel.weight.size.*tensor.mode='isp'"),
        (6, dict(tensor=ISP2, weight=4), {}, r"weight.size=4 must divide data-parallel size 3 x tensor size 2"),
        (2, dict(tensor=ISP2, weight=2, zero1=dict(size=-1, fsdp=True)), {}, r"parallel.zero1.fsdp"),
        (2, dict(tensor=ISP2, expert_weight=2), {}, r"expert_weight.size: 2: expert weight parallelism comes with"),
        (4, dict(tensor=ISP2, pipeline=2), dict(tie_word_embeddings=True), r"tie_word_embeddings"),
        (4, dict(sequence_2D=dict(enable=True, context_size=2)), {}, r"sequence_2D.enable.*mode='isp'"),
        (
            4,
            dict(tensor=dict(size=4, mode="isp"), sequence_2D=dict(enable=True, head_size=2, context_size=4)),
            {},
            r"head_size 2 x context_size 4 = 8 must equal parallel.tensor.size=4",
        ),
        (
            4,
            dict(tensor=dict(size=4, mode="isp"), sequence_2D=dict(enable=True, context_size=4, window_size=3)),
            {},
            r"window_size: 3 does not divide context_size 4: use one of \[1, 2, 4\]",
        ),
        (
            4,
            dict(
                tensor=dict(size=4, mode="isp"),
                sequence_2D=dict(enable=True, context_size=4, device_placement_strategy=dict(interleaved=True)),
            ),
            {},
            r"interleaved=True needs head_first=False and window_size > 1",
        ),
        (
            4,
            dict(tensor=dict(size=4, mode="isp"), sequence_2D=dict(enable=True, head_size=4, context_size=1)),
            dict(num_attention_heads=2, hidden_size=64, num_kv_attention_heads=None),
            r"sequence_2D.head_size: 4: num_attention_heads \(2\) must be divisible",
        ),
    ],
)
def test_bad_isp_layouts_fail_before_any_process_group(world, parallel, model, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        check_world_size(config(parallel, model, {}, None, tmp_path), world)
    assert not dist.is_initialized()


def test_zigzag_sequence_not_divisible_is_a_config_error():
    from pytrain.config import Config

    parallel = dict(tensor=dict(size=4, mode="isp"), sequence_2D=dict(enable=True, head_size=2, context_size=2))
    model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256)
    with pytest.raises(
        ConfigError, match=r"data.seq_len: 20 cannot be cut into 2 x context_size zigzag.*multiple of 8"
    ):
        Config.from_dict(dict(model_type="INTERNLM", model=model, parallel=parallel, data=dict(seq_len=20)))


def test_isp_sequence_not_divisible_is_a_config_error(tmp_path):
    cfg = dict(tensor=dict(size=4, mode="isp"))
    with pytest.raises(ConfigError, match=r"data.seq_len: 18 cannot be split over parallel.tensor.size=4"):
        from pytrain.config import Config

        Config.from_dict(
            dict(
                model_type="INTERNLM",
                model=dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256),
                parallel=cfg,
                data=dict(seq_len=18),
            )
        )
