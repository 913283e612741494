"""ZeroPP (pytrain.parallel.zeropp): the order of work and the messages its units give each rank (pure Python), its
layouts against one process (test_parallel's harness: the same model, global batches and steps give the same
losses, gradient norms and final parameters) with their gathers and reduce-scatters counted, and its config
errors before any process group."""

import collections

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_results import RankResults
from test_parallel import MICRO_NUM, STEPS, assert_rank_matches, config, reference, train
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining._backward import stage_backward_input
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from pytrain.config import Config, ConfigError
from pytrain.parallel.pipeline import _PipelineStep
from pytrain.parallel.zeropp import (
    BACKWARD,
    FORWARD,
    ZeroPPScheduler,
    _ResidentStep,
    unit_plan,
    unit_work,
    weight_backward,
)

WEIGHT = "W"  # a deferred weight-gradient computation (decouple_grad), as the recorder sees it
ZEROPP = dict(size=2, use_zeropp=True)
DECOUPLED = dict(ZEROPP, decouple_grad=True)
WEIGHT2 = dict(tensor=dict(size=1, mode="isp"), weight=dict(size=2))
CHUNKS = dict(num_chunks=2)

# name: (world size, parallel section, model overrides, data.unit_schedule_size)
LAYOUTS = {
    "zeropp-pp2-units2": (2, dict(pipeline=ZEROPP), CHUNKS, 2),
    "zeropp-pp2-units4": (2, dict(pipeline=ZEROPP), CHUNKS, 4),  # units larger than the pipeline
    # InternEvo's 7B_llama2_zeropp.py in small: the stages sharded over weight runs of the data ranks (isp, tensor 1)
    "zeropp-pp2-weight2-units2": (4, dict(pipeline=ZEROPP, **WEIGHT2), CHUNKS, 2),
    "zeropp-pp2-weight2-units4-decoupled": (4, dict(pipeline=DECOUPLED, **WEIGHT2), CHUNKS, 4),
    "zeropp-pp2-weight2-1f1b-decoupled": (4, dict(pipeline=DECOUPLED, **WEIGHT2), CHUNKS, None),
    # InternEvo's weight settings: a unit per linear, the next one's gather started early
    "zeropp-pp2-weight2-per-linear-units2-decoupled": (
        4,
        dict(
            pipeline=DECOUPLED,
            tensor=WEIGHT2["tensor"],
            weight=dict(size=2, overlap=True, forward_overlap_per="module"),
        ),
        CHUNKS,
        2,
    ),
    "zeropp-pp2-fsdp2-units2-decoupled": (4, dict(pipeline=DECOUPLED, zero1=dict(size=-1, fsdp=True)), CHUNKS, 2),
}


# decouple_grad's recorded order of one unit (F chunk micro-batch, B chunk: an input gradient, W chunk: a deferred
# weight gradient) on pp2 x 2 chunks in units of 2, per stage. Stage 0 computes a chunk-1 weight gradient in the
# round it waits for the next output gradient, the other when work moves to chunk 0, whose backwards (the model's
# first stage: nothing to send) all wait for the unit's end; stage 1 never waits once a backward ran, its chunk-1
# weight gradients run when work moves to chunk 0.
DECOUPLED_UNIT_ORDER = {
    "zeropp-pp2-fsdp2-units2-decoupled": (
        "F00 F01 F10 F11 B1 W1 B1 W1 B0 B0 W0 W0",
        "F00 F01 F10 B1 F11 B1 W1 W1 B0 B0 W0 W0",
    )
}


def zeropp_config(name: str, world: int, run_folder) -> Config:
    _, parallel, model, unit = LAYOUTS[name]
    cfg = config(parallel, model, {}, world, run_folder)
    cfg.data.unit_schedule_size = unit
    return cfg


def _gathered_chunks(models) -> set[int]:
    """The chunks whose FSDP-sharded parameters are gathered now (FSDP swaps in plain tensors while gathered)."""
    return {c for c, model in enumerate(models) if any(not isinstance(p, DTensor) for p in model.parameters())}


def _chunks_holding_unsharded_grads(models) -> set[int]:
    """The chunks whose FSDP parameters hold gradients not yet reduce-scattered (FSDP's internals: torch 2.13)."""
    return {
        c
        for c, model in enumerate(models)
        for m in model.modules()
        if isinstance(m, FSDPModule) and (group := m._get_fsdp_state()._fsdp_param_group) is not None
        for p in group.fsdp_params
        if p.unsharded_accumulated_grad is not None
        or (hasattr(p, "_unsharded_param") and p._unsharded_param.grad is not None)
    }


def _fsdp_groups(models) -> list[int]:
    """Per chunk: how many FSDP parameter groups (one all-gather, one reduce-scatter each) it has."""
    return [
        sum(isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_group is not None for m in model.modules())
        for model in models
    ]


class _Recorder:
    """One rank's record of a run: its work in order; when each piece of work started, the chunks gathered and those
    holding unsharded gradients; per schedule call (forward_only, all-gathers, reduce-scatters) of FSDP's
    collectives and the chunks left holding unsharded gradients."""

    def __init__(self, patch):
        self.work, self.gathered, self.calls = [], [], []
        self.collectives = collections.Counter()
        for kind, cls, name in (
            (FORWARD, _PipelineStep, "forward"),
            (BACKWARD, _PipelineStep, "backward"),
            (BACKWARD, _ResidentStep, "backward_input"),  # decouple_grad's backward: the input gradient only
            (WEIGHT, _ResidentStep, "backward_weight"),  # and the deferred weight gradients
        ):
            patch.setattr(cls, name, self._recording(kind, getattr(cls, name)))
        for name in ("all_gather_single", "reduce_scatter_single"):
            patch.setattr(dist, name, self._counting(name, getattr(dist, name)))
        patch.setattr(ZeroPPScheduler, "forward_backward_step", self._per_call(ZeroPPScheduler.forward_backward_step))

    def _recording(self, kind, run):
        def record(step, chunk, *args):
            micro = args[0] if kind == FORWARD else None  # a backward's micro-batch: the queue's (not recorded)
            self.work.append((kind, chunk, micro))
            self.gathered.append((chunk, _gathered_chunks(step.models), _chunks_holding_unsharded_grads(step.models)))
            return run(step, chunk, *args)

        return record

    def _counting(self, name, collective):
        def count(*args, **kwargs):
            self.collectives[name] += 1
            return collective(*args, **kwargs)

        return count

    def _per_call(self, forward_backward_step):
        def call(schedule, model, *args, forward_only=False, **kwargs):
            before = dict(self.collectives)
            result = forward_backward_step(schedule, model, *args, forward_only=forward_only, **kwargs)
            self.groups, self.stage = _fsdp_groups(model.stages), schedule.mesh.pipeline_rank
            collectives = (
                self.collectives[n] - before.get(n, 0) for n in ("all_gather_single", "reduce_scatter_single")
            )
            self.calls.append((forward_only, *collectives, _chunks_holding_unsharded_grads(model.stages)))
            return result

        return call


def worker(rank, world, init_method, names, references, run_folder, results):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for name in names:
            with pytest.MonkeyPatch.context() as patch:
                recorder = _Recorder(patch)
                history, _, _, model = train(zeropp_config(name, world, run_folder), rank, world)
            want = model.local_state(references[name][1])
            shards = [(n, p.detach().clone(), want[n]) for n, p in model.full_state_names().items()]
            record = dict(
                work=recorder.work,
                gathered=recorder.gathered,
                calls=recorder.calls,
                groups=recorder.groups,
                stage=recorder.stage,
            )
            results[(name, rank)] = (history, shards, record)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def step_work(rank: int, unit: int, micro_num: int) -> list[tuple]:
    """A training step's work on `rank` of pp2 x 2 chunks in units of `unit`, as the recorder sees it (a backward
    without its micro-batch)."""
    return [
        (kind, chunk, first + micro if kind == FORWARD else None)
        for first in range(0, micro_num, unit)
        for kind, chunk, micro in unit_work(2, 2, unit, rank)
    ]


def runs(work) -> list[int]:
    """The chunk of each run of work (consecutive pieces of work on one chunk)."""
    return [chunk for i, (_, chunk, _) in enumerate(work) if i == 0 or work[i - 1][1] != chunk]


def assert_weights_deferred(work, label) -> None:
    """decouple_grad: each chunk's weight gradients computed after its input gradient, as many as backwards, and
    some of them later than other work (deferred, not at once)."""
    pending = collections.Counter()  # chunk -> input gradients whose weight gradients are still to come
    deferred = 0
    for kind, chunk, _ in work:
        if kind == BACKWARD:
            pending[chunk] += 1
        elif kind == WEIGHT:
            assert pending[chunk] > 0, label
            pending[chunk] -= 1
        deferred += kind != WEIGHT and sum(pending.values()) > 1
    assert not +pending and deferred, (label, work)


def run_against_one_process(world, names, tmp_path, init_method):
    """Each layout against one process, and its recorded work: each step's order is unit_work's; a chunk gathered
    only while it works; one all-gather per FSDP group and run of work, one reduce-scatter per group and micro-batch
    (decouple_grad: per unit), no gradient left unsharded after a step."""
    one_process = reference("INTERNLM", {}, tmp_path)  # chunks are a layout, not a model: every layout's reference
    with RankResults() as results:
        args = (world, init_method, names, dict.fromkeys(names, one_process), tmp_path, results)
        mp.spawn(worker, args=args, nprocs=world, join=True)
        results = dict(results)
    micro_num = MICRO_NUM * 2 // world  # per data-parallel rank (pipeline 2)
    for name in names:
        _, parallel, _, unit = LAYOUTS[name]
        for rank in range(world):
            label = f"{name} rank {rank}"
            history, shards, record = results[(name, rank)]
            assert_rank_matches(label, history, shards, one_process[0])
            work = [w for w in record["work"] if w[0] != WEIGHT]
            if parallel["pipeline"].get("decouple_grad"):
                assert_weights_deferred(record["work"], label)
            if name in DECOUPLED_UNIT_ORDER:
                unit_order = " ".join(
                    f"{kind}{chunk}{'' if m is None else m}" for kind, chunk, m in record["work"][:12]
                )
                assert unit_order == DECOUPLED_UNIT_ORDER[name][record["stage"]], label
            if unit is not None:  # each rank's training steps (validation, last, is interleaved 1F1B's)
                want = step_work(record["stage"], unit, micro_num) * STEPS
                assert work[: STEPS * micro_num * 4] == want, label
            groups = record["groups"]
            if not any(groups):  # nothing sharded
                continue
            assert all(gathered <= {chunk} for chunk, gathered, _ in record["gathered"]), label
            # decouple_grad: one chunk's gradients unsharded through its run of backwards (interleaved with forwards)
            assert all(len(holding) <= 1 for _, _, holding in record["gathered"]), label
            one_step = work[: micro_num * 4]
            gathers = sum(groups[chunk] for chunk in runs(one_step))
            reductions_per_chunk = micro_num // (unit or 2) if parallel["pipeline"].get("decouple_grad") else micro_num
            want = [(False, gathers, reductions_per_chunk * sum(groups), set())] * STEPS
            assert [call for call in record["calls"] if not call[0]] == want, (label, groups)
    return results


def replay(stages: int, chunks: int, unit: int) -> None:
    """Runs unit_plan's rounds with queues for messages (a round's work and sends, then its receives, which wait
    for their messages; sends never wait): every rank finishes, each received message is the one the receiver
    expects, and every input arrives before its work."""
    plan = unit_plan(stages, chunks, unit)
    queues = collections.defaultdict(collections.deque)  # (sender, receiver, kind) -> the (chunk, micro) sent
    done, sent, held = [0] * stages, [False] * stages, [set() for _ in range(stages)]
    while any(d < len(rounds) for d, rounds in zip(done, plan)):
        progressed = False
        for rank, rounds in enumerate(plan):
            if done[rank] == len(rounds):
                continue
            round_ = rounds[done[rank]]
            prev, next_ = (rank - 1) % stages, (rank + 1) % stages
            if not sent[rank]:  # the round's work, and its sends
                sent[rank] = progressed = True
                if round_.work:
                    kind, chunk, micro = round_.work
                    first, last = rank == 0 and chunk == 0, rank == stages - 1 and chunk == chunks - 1
                    assert (first if kind == FORWARD else last) or round_.work in held[rank], (rank, round_)
                    if round_.sends and kind == FORWARD:
                        queues[rank, next_, FORWARD].append((chunk + (rank == stages - 1), micro))
                    elif round_.sends:
                        queues[rank, prev, BACKWARD].append((chunk - (rank == 0), micro))
            receives = [(FORWARD, round_.from_prev, prev), (BACKWARD, round_.from_next, next_)]
            if any(expected and not queues[sender, rank, kind] for kind, expected, sender in receives):
                continue  # waits for a message
            for kind, expected, sender in receives:
                if expected:
                    assert queues[sender, rank, kind].popleft() == expected, (rank, round_)
                    held[rank].add((kind, *expected))
            done[rank], sent[rank], progressed = done[rank] + 1, False, True
        assert progressed, f"deadlock: {stages} stages, {chunks} chunks, units of {unit}"
    assert not any(queues.values())


def unit_order(first: int, unit: int, forwards_first: int) -> list[tuple]:
    """One unit of `unit` micro-batches through 2 chunks on a rank that runs `forwards_first` forwards before its
    first backward: forwards chunk by chunk (F c0 m0, F c0 m1, ..., F c1 m0, ...), backwards from the last chunk
    down, then one forward and one backward at a time."""
    forwards = [(FORWARD, chunk, first + micro) for chunk in (0, 1) for micro in range(unit)]
    backwards = [(BACKWARD, chunk, first + micro) for chunk in (1, 0) for micro in range(unit)]
    order = forwards[:forwards_first]
    for forward, backward in zip(forwards[forwards_first:], backwards):
        order += [forward, backward]
    return order + backwards[len(forwards) - forwards_first :]


# min(2 U, 2 (P - r - 1) + U) forwards first: units of 2, rank 0 all 4, rank 1 the first chunk's 2; units of 4
# (larger than the pipeline), rank 0 6, rank 1 4
@pytest.mark.parametrize("unit, forwards_first", [(2, (4, 2)), (4, (6, 4))])
def test_zeropp_unit_order_on_two_stages(unit, forwards_first):
    """pp2, 2 chunks per rank, a step of 8 micro-batches in units of `unit`: each rank's work as its plan runs it."""
    plan = unit_plan(2, 2, unit)
    for rank in (0, 1):
        step = [
            (kind, chunk, first + micro)
            for first in range(0, 8, unit)
            for kind, chunk, micro in (round_.work for round_ in plan[rank] if round_.work)
        ]
        want = [work for first in range(0, 8, unit) for work in unit_order(first, unit, forwards_first[rank])]
        assert step == want, rank


@pytest.mark.parametrize("stages, chunks", [(2, 1), (2, 2), (3, 2), (4, 1), (4, 2), (4, 4)])
def test_zeropp_unit_plans_pair_every_message(stages, chunks):
    """Any unit size, smaller or larger than the pipeline: each rank runs unit_work's order, and the plan's messages
    pair without deadlock."""
    for unit in range(1, 2 * stages + 2):
        plan = unit_plan(stages, chunks, unit)
        for rank in range(stages):
            assert [r.work for r in plan[rank] if r.work] == unit_work(stages, chunks, unit, rank)
        replay(stages, chunks, unit)


def test_zeropp_weight_gradients_split_off_match_one_backward():
    """decouple_grad's split of a backward (stage_backward_input, later weight_backward): the same input and weight
    gradients as one backward, no weight gradient before weight_backward, and a checkpointed block recomputed once
    for the weights (torch's stage_backward_weight recomputes it once per group of weights)."""
    torch.manual_seed(0)
    block, head = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 8)), nn.Linear(8, 8)
    params = [*block.parameters(), *head.parameters()]
    recomputes = [0]

    def run_block(hidden):
        recomputes[0] += 1
        return block(hidden)

    def loss_of(hidden):
        return head(checkpoint(run_block, hidden, use_reentrant=False)).square().mean()

    hidden = torch.randn(4, 8, requires_grad=True)
    loss_of(hidden).backward()
    want_input, want_weights = hidden.grad, [p.grad for p in params]
    hidden.grad = None
    for param in params:
        param.grad = None
    loss = loss_of(hidden)
    (grad_in,), param_groups = stage_backward_input([loss], [torch.ones_like(loss)], [hidden], params)
    assert all(p.grad is None for p in params)
    before = recomputes[0]
    weight_backward(params, param_groups)
    assert recomputes[0] == before + 1
    torch.testing.assert_close(grad_in, want_input)
    torch.testing.assert_close([p.grad for p in params], want_weights)


@pytest.mark.slow  # 22-33 s on the shared 2-core machine: two layouts in 2 processes
def test_zeropp_units_on_two_stages_match_one_process(tmp_path, init_method, fresh_context):
    """pp2 (8 micro-batches a step) in units of the pipeline size and of twice it."""
    run_against_one_process(2, ["zeropp-pp2-units2", "zeropp-pp2-units4"], tmp_path, init_method)


@pytest.mark.slow  # 14-81 s on the shared 2-core machine (load): five layouts in 4 processes
def test_zeropp_sharded_over_data_ranks_matches_one_process(tmp_path, init_method, fresh_context):
    """pp2 x data 2 (4 micro-batches per rank and step): weight parallelism (InternEvo's) in units of 2, of 4 with
    decouple_grad, and without units (interleaved 1F1B) with decouple_grad (runs of the pipeline size's 2
    backwards); FSDP in units of 2 with decouple_grad; weight parallelism with InternEvo's settings (a unit per
    linear, gathers started early) in units of 2 with decouple_grad. decouple_grad reduce-scatters 4 (units of 4)
    and 2 times less often, and computes the weight gradients after the input gradients."""
    run_against_one_process(
        4,
        [
            "zeropp-pp2-weight2-units2",
            "zeropp-pp2-weight2-units4-decoupled",
            "zeropp-pp2-weight2-1f1b-decoupled",
            "zeropp-pp2-fsdp2-units2-decoupled",
            "zeropp-pp2-weight2-per-linear-units2-decoupled",
        ],
        tmp_path,
        init_method,
    )


@pytest.mark.parametrize(
    "parallel, data, message",
    [
        (dict(pipeline=dict(size=1, use_zeropp=True)), {}, "parallel.pipeline.use_zeropp: ZeroPP schedules pipeline"),
        (dict(pipeline=2), dict(unit_schedule_size=4), "data.unit_schedule_size: 4: scheduling units are ZeroPP's"),
        (
            dict(pipeline=ZEROPP),
            dict(unit_schedule_size=3, micro_num=8),
            "data.micro_num: the interleaved schedule needs micro_num \\(8\\) to be a multiple of "
            "parallel.pipeline.size=2 and data.unit_schedule_size=3: use a multiple of 6",
        ),
        (
            dict(pipeline=dict(size=2, decouple_grad=True)),
            {},
            "decouple_grad: True: ZeroPP's deferred weight gradients",
        ),
        (dict(pipeline=DECOUPLED), {}, "decouple_grad: True: its deferred weight gradients .* but nothing shards them"),
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


@pytest.mark.parametrize(
    "parallel, data",
    [
        (dict(pipeline=ZEROPP), dict(unit_schedule_size=4, micro_num=8)),  # units larger than the pipeline
        (dict(pipeline=dict(size=4, use_zeropp=True)), dict(unit_schedule_size=2, micro_num=4)),  # smaller
        (dict(pipeline=DECOUPLED, zero1=dict(size=-1, fsdp=True)), dict(unit_schedule_size=2, micro_num=4)),
    ],
)
def test_zeropp_configs_load(parallel, data):
    cfg = Config.from_dict(dict(model_type="INTERNLM", model=dict(num_layers=8), parallel=parallel, data=data))
    assert cfg.data.unit_schedule_size == data["unit_schedule_size"]
