"""ZeroPP (pytrain.parallel.zeropp): its layouts against one process (test_parallel's harness: the same model,
global batches and steps give the same losses, gradient norms and final parameters), the order of work its
units give each rank, and its config errors before any process group."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_results import RankResults
from test_parallel import assert_rank_matches, config, reference, train

from pytrain.config import Config, ConfigError
from pytrain.parallel.pipeline import _InterleavedOrder

ZEROPP = dict(size=2, use_zeropp=True)
CHUNKS = dict(num_chunks=2)

# name: (world size, parallel section, model overrides, data.unit_schedule_size)
LAYOUTS = {
    "zeropp-pp2-units2": (2, dict(pipeline=ZEROPP), CHUNKS, 2),
    # InternEvo's 7B_llama2_zeropp.py in small: the stages sharded over weight runs of the data ranks (isp, tensor 1)
    "zeropp-pp2-weight2-units2": (
        4,
        dict(pipeline=ZEROPP, tensor=dict(size=1, mode="isp"), weight=dict(size=2)),
        CHUNKS,
        2,
    ),
    "zeropp-pp2-weight2-1f1b": (
        4,
        dict(pipeline=ZEROPP, tensor=dict(size=1, mode="isp"), weight=dict(size=2)),
        CHUNKS,
        None,
    ),
    "zeropp-pp2-fsdp2-units2": (4, dict(pipeline=ZEROPP, zero1=dict(size=-1, fsdp=True)), CHUNKS, 2),
}


def zeropp_config(name: str, world: int, run_folder) -> Config:
    _, parallel, model, unit = LAYOUTS[name]
    cfg = config(parallel, model, {}, world, run_folder)
    cfg.data.unit_schedule_size = unit
    return cfg


def worker(rank, world, init_method, names, references, run_folder, results, steps=3):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(1)
    work = []  # this rank's (kind, chunk, micro-batch) in the order run

    def recording(kind, run):
        def record(order, k):
            work.append((kind, order.chunk_of(k, kind == "F"), order.micro_of(k)))
            return run(order, k)

        return record

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_InterleavedOrder, "run_forward", recording("F", _InterleavedOrder.run_forward))
        patch.setattr(_InterleavedOrder, "run_backward", recording("B", _InterleavedOrder.run_backward))
        try:
            for name in names:
                work.clear()
                history, _, _, model = train(zeropp_config(name, world, run_folder), rank, world, steps=steps)
                shards = []
                if references:
                    want = model.local_state(references[name][1])
                    shards = [(n, p.detach().clone(), want[n]) for n, p in model.full_state_names().items()]
                results[(name, rank)] = (history, shards, list(work))
            dist.barrier()
        finally:
            dist.destroy_process_group()


def run_against_one_process(world, names, tmp_path, init_method):
    one_process = reference("INTERNLM", {}, tmp_path)  # chunks are a layout, not a model: every layout's reference
    references = dict.fromkeys(names, one_process)
    with RankResults() as results:
        args = (world, init_method, names, references, tmp_path, results)
        mp.spawn(worker, args=args, nprocs=world, join=True)
        results = dict(results)
    for name in names:
        want_history, _ = references[name]
        for rank in range(world):
            history, shards, _ = results[(name, rank)]
            assert_rank_matches(f"{name} rank {rank}", history, shards, want_history)
    return results


def unit_order(first: int, forwards_first: int) -> list[tuple]:
    """One unit of 2 micro-batches through 2 chunks on a rank that runs `forwards_first` forwards before its
    first backward: forwards chunk by chunk (F c0 m0, F c0 m1, F c1 m0, F c1 m1), backwards from the last chunk
    down (B c1 m0, B c1 m1, B c0 m0, B c0 m1), then one forward and one backward at a time."""
    forwards = [("F", chunk, first + micro) for chunk in (0, 1) for micro in (0, 1)]
    backwards = [("B", chunk, first + micro) for chunk in (1, 0) for micro in (0, 1)]
    order = forwards[:forwards_first]
    for forward, backward in zip(forwards[forwards_first:], backwards):
        order += [forward, backward]
    return order + backwards[len(forwards) - forwards_first :]


def test_zeropp_unit_order_on_two_stages(tmp_path, init_method, fresh_context):
    """pp2, 2 chunks per rank, a step of 8 micro-batches in units of 2: each rank's order of work."""
    name = "zeropp-pp2-units2"
    with RankResults() as results:
        mp.spawn(worker, args=(2, init_method, [name], {}, tmp_path, results, 1), nprocs=2, join=True)
        results = dict(results)
    # the validation pass at the end: forward-only over 6 micro-batches in groups of the pipeline size
    validation = [("F", chunk, group + micro) for group in (0, 2, 4) for chunk in (0, 1) for micro in (0, 1)]
    # rank 0 runs all of a unit's forwards first (min(4, 2 (P - 1) + (C - 1) U) = 4), rank 1 the first chunk's 2
    for rank, forwards_first in ((0, 4), (1, 2)):
        one_step = [work for first in (0, 2, 4, 6) for work in unit_order(first, forwards_first)]
        assert results[(name, rank)][2] == one_step + validation, rank


@pytest.mark.slow  # about 90 s on the shared 2-core machine
def test_zeropp_units_on_two_stages_match_one_process(tmp_path, init_method, fresh_context):
    run_against_one_process(2, ["zeropp-pp2-units2"], tmp_path, init_method)


@pytest.mark.slow  # about 155 s on the shared 2-core machine: three layouts in 4 processes
def test_zeropp_sharded_over_data_ranks_matches_one_process(tmp_path, init_method, fresh_context):
    """pp2 x data 2 (4 micro-batches per rank and step): weight parallelism (InternEvo's) in units of 2 and without
    units (interleaved 1F1B), FSDP in units of 2."""
    run_against_one_process(
        4, ["zeropp-pp2-weight2-units2", "zeropp-pp2-weight2-1f1b", "zeropp-pp2-fsdp2-units2"], tmp_path, init_method
    )


@pytest.mark.parametrize(
    "parallel, data, message",
    [
        (dict(pipeline=dict(size=1, use_zeropp=True)), {}, "parallel.pipeline.use_zeropp: ZeroPP schedules pipeline"),
        (dict(pipeline=2), dict(unit_schedule_size=4), "data.unit_schedule_size: 4: scheduling units are ZeroPP's"),
        (dict(pipeline=dict(size=4, use_zeropp=True)), dict(unit_schedule_size=2), "2: units of parallel.pipeline"),
        (dict(pipeline=ZEROPP), dict(unit_schedule_size=4, micro_num=8), "4: units of parallel.pipeline.size=2"),
        (dict(pipeline=ZEROPP), dict(unit_schedule_size=0), "data.unit_schedule_size = 0: must be > 0"),
        (
            dict(pipeline=ZEROPP),
            dict(unit_schedule_size=2, micro_num=8, rampup_batch_size="3 2 1"),
            "'3 2 1': the interleaved schedule needs every step's micro-batch count to be a multiple",
        ),
        (dict(pipeline=ZEROPP), dict(micro_num=3), "the interleaved schedule needs micro_num \\(3\\)"),
    ],
)
def test_zeropp_config_errors(parallel, data, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_dict(
            dict(
                model_type="INTERNLM",
                model=dict(num_layers=8),
                parallel=parallel,
                data=dict(dict(micro_num=4), **data),
            )
        )
