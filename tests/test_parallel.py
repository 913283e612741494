"""Every parallel layout against one process: the same model, global batch and steps must give the same
per-step losses, gradient norms and final parameters (each rank's shard of them).

The layouts run through the real construction path (launch, initialize_model / _optimizer / _trainer)
in 2 or 4 gloo processes; one process runs each model variant as the reference.
"""

import gc

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from rank_results import RankResults

from pytrain.config import Config, ConfigError, check_world_size
from pytrain.initialize.launch import launch
from pytrain.parallel import gpc
from pytrain.parallel.model_part import partition_layers
from pytrain.parallel.schedule import IGNORE_INDEX

STEPS = 3
MICRO_NUM = 8  # micro-batches per step over all data-parallel ranks
VALID_MICRO_NUM = 6  # per forward-only (validation) step: 3 or 6 per rank, not the training step's count
MICRO_BSZ, SEQ_LEN, VOCAB = 2, 16, 256

MODEL = dict(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_kv_attention_heads=2,
    vocab_size=VOCAB,
    multiple_of=32,
    dtype="torch.float32",
    checkpoint=0.5,
)

# name: (world size, parallel section, model overrides, optimizer overrides)
LAYOUTS = {
    "dp2": (2, dict(zero1=1), {}, {}),
    "dp2-zero1-overlap": (
        2,
        dict(zero1=-1),
        {},
        dict(overlap_sync_grad=True, overlap_sync_param=True, reduce_bucket_size=20000),
    ),
    "tp2": (2, dict(tensor=2), {}, {}),
    "tp2-vocab-gathered": (2, dict(tensor=2), dict(embed_split_hidden=False, parallel_output=False), {}),
    "tp2-msp": (2, dict(tensor=dict(size=2, mode="msp")), dict(checkpoint=True), {}),
    "pp2": (2, dict(pipeline=2), {}, {}),
    "pp2-interleaved": (2, dict(pipeline=dict(size=2, interleaved_overlap=True)), dict(num_chunks=2), {}),
    "pp2-tied": (2, dict(pipeline=2), dict(tie_word_embeddings=True), {}),
    "pp4": (4, dict(pipeline=4), {}, {}),
    "pp4-interleaved": (4, dict(pipeline=4), dict(num_layers=8, num_chunks=2), {}),
    "tp2-pp2": (4, dict(tensor=2, pipeline=2), {}, {}),
    "dp2-pp2-interleaved-overlap": (
        4,
        dict(pipeline=2, zero1=-1),
        dict(num_chunks=2),
        dict(overlap_sync_grad=True, overlap_sync_param=True, reduce_bucket_size=20000),
    ),
    "dp2-tp2-zero1": (4, dict(tensor=2, zero1=-1), {}, dict(overlap_sync_grad=True)),
    # FSDP (torch's fully_shard over the zero1 group) instead of ZeRO-1, alone and with each other axis
    "fsdp2": (2, dict(zero1=dict(size=-1, fsdp=True)), {}, {}),
    "fsdp2-tp2": (4, dict(zero1=dict(size=-1, fsdp=True), tensor=2), {}, {}),
    "fsdp2-tp2-msp": (
        4,
        dict(zero1=dict(size=-1, fsdp=True), tensor=dict(size=2, mode="msp")),
        dict(checkpoint=True),
        {},
    ),
    "fsdp2-pp2": (4, dict(zero1=dict(size=-1, fsdp=True), pipeline=2), {}, {}),
    "fsdp2-pp2-interleaved-tied-kept": (
        4,
        dict(zero1=dict(size=-1, fsdp=True, reshard_after_forward=False), pipeline=2),
        dict(num_chunks=2, tie_word_embeddings=True),
        {},
    ),
    "tp2-pp2-interleaved-msp-tied": (
        4,
        dict(tensor=dict(size=2, mode="msp"), pipeline=2),
        dict(num_chunks=2, tie_word_embeddings=True, embed_split_hidden=False),
        {},
    ),
}


# Every layout runs for every family: their attention projections (fused, grouped, separate), biases
# (column- and row-parallel, summed over the tensor group under sequence parallelism) and rotary
# conventions (LLAMA2's default is the interleaved one) are split and cut differently.
# The README's test command runs INTERNLM's; the others are `slow` (CI runs them after it).
FAMILIES = ["INTERNLM", *(pytest.param(family, marks=pytest.mark.slow) for family in ("INTERNLM2", "LLAMA2", "QWEN2"))]


def config(
    parallel: dict,
    model: dict,
    optimizer: dict,
    world: int | None,
    run_folder,
    dtype="torch.float32",
    family="INTERNLM",
) -> Config:
    """The test's run config; MICRO_NUM micro-batches per step shared by the data-parallel ranks of `world`."""
    cfg = Config.from_dict(
        dict(
            model_type=family,
            model=dict(MODEL, **model, dtype=dtype),
            parallel=parallel,
            data=dict(seq_len=SEQ_LEN, micro_bsz=MICRO_BSZ, micro_num=MICRO_NUM, total_steps=STEPS),
            adam=dict(lr=1e-3, weight_decay=0.01, adam_eps=1e-6),
            lr_scheduler=dict(warmup_ratio=0.0),
            hybrid_zero_optimizer=dict(dict(overlap_sync_grad=False, clip_grad_norm=1.0), **optimizer),
            grad_scaler=dict(fp16=dict(initial_scale=2**14, growth_interval=2), hysteresis=1),
            monitor=dict(run_folder=str(run_folder), tensorboard=dict(enable=False)),
        )
    )
    if world is not None:
        cfg.data.micro_num = MICRO_NUM // check_world_size(cfg, world)
    return cfg


def batches(data_parallel_rank: int, data_parallel: int, steps: int = STEPS, micro_num: int = MICRO_NUM, seed: int = 5):
    """The same global batches for every layout; this data-parallel rank's micro-batches of each. A count the
    data-parallel ranks cannot share evenly is completed with micro-batches whose labels are all ignored, as the
    validation loader completes its last step: they change no loss."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (steps, micro_num, MICRO_BSZ, SEQ_LEN + 1), generator=generator)
    per_rank = -(-micro_num // data_parallel)
    labels = torch.full((steps, per_rank * data_parallel, MICRO_BSZ, SEQ_LEN), IGNORE_INDEX)
    labels[:, :micro_num] = tokens[..., 1:]
    inputs = tokens[..., :-1].repeat(1, 2, 1, 1)[:, : per_rank * data_parallel]
    mine = slice(data_parallel_rank * per_rank, (data_parallel_rank + 1) * per_rank)
    return [{"input_ids": i, "labels": lab} for i, lab in zip(inputs[:, mine], labels[:, mine])]


def train(cfg: Config, rank: int, world: int, inject_nan_at=None, steps: int = STEPS):
    """Runs `steps` steps, then a forward-only pass over a validation batch of VALID_MICRO_NUM micro-batches;
    returns per-step (loss, grad norm, success, loss scale) with the forward-only loss last, the parameters as {full name: this rank's
    shard}, the optimizer's state bytes and the model."""
    from pytrain.initialize import initialize_trainer
    from pytrain.train import initialize_model, initialize_optimizer

    launch(cfg, rank=rank, world_size=world, local_rank=0, init_method=None, backend="gloo", seed=11)
    model = initialize_model()
    optimizer, beta2_scheduler, lr_scheduler = initialize_optimizer(model)
    trainer, *_ = initialize_trainer(model, optimizer, lr_scheduler=lr_scheduler, beta2_scheduler=beta2_scheduler)
    history = []
    for step, batch in enumerate(batches(gpc.data_parallel_rank, gpc.data_parallel_size, steps=steps), start=1):
        trainer.zero_grad()
        _, loss = trainer.execute_schedule(batch)
        if step == inject_nan_at and gpc.is_last_stage:  # one rank's gradient: every rank must skip
            optimizer.flat_grad[0] = float("nan")  # the gradients accumulate there (no parameter keeps a .grad)
        success, norm = trainer.step()
        dist.all_reduce(loss, group=gpc.data_parallel_group)
        history.append((loss.item() / gpc.data_parallel_size, norm, success, optimizer.loss_scale))
    optimizer.sync_params()  # overlap_sync_param: the last step's broadcasts are still in flight
    (valid,) = batches(gpc.data_parallel_rank, gpc.data_parallel_size, steps=1, micro_num=VALID_MICRO_NUM, seed=6)
    _, loss = trainer.execute_schedule(valid, forward_only=True)
    dist.all_reduce(loss, group=gpc.data_parallel_group)
    history.append((loss.item() / gpc.data_parallel_size, 0.0, True, optimizer.loss_scale))
    params = {name: p.detach().clone() for name, p in model.full_state_names().items()}
    return history, params, optimizer.optimizer_state_bytes(), model


def reference(family: str, model: dict, run_folder):
    """The single-process run of a model variant: its history and full parameters."""
    try:
        history, params, _state_bytes, _ = train(config({}, model, {}, 1, run_folder, family=family), 0, 1)
    finally:
        dist.destroy_process_group()
    return history, params


def worker(rank, world, init_method, family, names, references, run_folder, results):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for name in names:
            _, parallel, model_overrides, optimizer = LAYOUTS[name]
            history, _, state_bytes, model = train(
                config(parallel, model_overrides, optimizer, world, run_folder, family=family), rank, world
            )
            want = model.local_state(references[name][1])
            # (full name, this rank's parameter, the same shard of the reference's)
            shards = [(n, p.detach().clone(), want[n]) for n, p in model.full_state_names().items()]
            results[(name, rank)] = (history, shards, state_bytes)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_layouts(world, family, names, references, tmp_path, init_method):
    with RankResults() as results:
        args = (world, init_method, family, names, references, tmp_path, results)
        mp.spawn(worker, args=args, nprocs=world, join=True)
        return dict(results)


@pytest.fixture(scope="module", params=FAMILIES)
def family_references(request, tmp_path_factory):
    """(family, {layout name: the single-process run of its model variant})."""
    family = request.param
    folder = tmp_path_factory.mktemp("reference")
    by_variant = {}
    out = {}
    for name, (_, _, model, _) in LAYOUTS.items():
        key = tuple(
            sorted(
                (k, v)
                for k, v in model.items()
                if k not in ("checkpoint", "num_chunks", "embed_split_hidden", "parallel_output")
            )
        )
        if key not in by_variant:
            by_variant[key] = reference(family, dict(key), folder)
        out[name] = by_variant[key]
    return family, out


# fp32: the layouts differ from one process only in the order of floating-point sums (matmuls split over
# tensor ranks, gradients summed over data ranks), which Adam amplifies where a gradient is near zero
# (its update is about lr whatever the gradient's size); adam_eps=1e-6 above damps that.
TOLERANCE = dict(rtol=2e-4, atol=2e-5)


def assert_rank_matches(label: str, history, shards, want_history) -> None:
    """One rank's run of a layout against one process: every step succeeded, the losses and gradient norms, and
    its final parameter shards (full name, this rank's, the same shard of the reference's), within TOLERANCE."""
    assert all(success for _, _, success, _ in history), (label, history)
    for column, what in ((0, "losses"), (1, "grad norms")):
        torch.testing.assert_close(
            [h[column] for h in history],
            [h[column] for h in want_history],
            **TOLERANCE,
            msg=lambda m, what=what: f"{label} {what}: {m}",
        )
    for full_name, got, want in shards:
        torch.testing.assert_close(
            got, want, **TOLERANCE, msg=lambda m, full_name=full_name: f"{label} {full_name}: {m}"
        )


# slow (about 30 s at 2 processes, minutes at 4): CI runs every layout after the README's test command; the fast
# suite trains dp2 / ZeRO-1 / tensor / pipeline layouts of the MoE families against one process (test_moe_families)
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_layout_matches_one_process(world, family_references, tmp_path, init_method, fresh_context):
    family, references = family_references
    names = [name for name, (size, *_) in LAYOUTS.items() if size == world]
    results = run_layouts(world, family, names, references, tmp_path, init_method)
    for name in names:
        want_history, _ = references[name]
        for rank in range(world):
            history, shards, _ = results[(name, rank)]
            assert_rank_matches(f"{family} {name} rank {rank}", history, shards, want_history)
    if world == 2:  # ZeRO-1 and FSDP over both ranks hold about half the optimizer state of plain data parallel
        replicated, sharded = results[("dp2", 0)][2], results[("dp2-zero1-overlap", 0)][2]
        assert sharded < 0.7 * replicated, (sharded, replicated)
        assert results[("fsdp2", 0)][2] < 0.7 * replicated


def nan_worker(rank, init_method, run_folder, results):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        cfg = config(dict(pipeline=2), {}, {}, 2, run_folder, dtype="torch.float16")
        results[rank] = train(cfg, rank, 2, inject_nan_at=3, steps=5)[0]
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # about 9 s; test_zero checks a NaN on one rank skips the step everywhere in the fast suite
def test_nan_gradient_on_one_stage_skips_the_step_everywhere_and_fp16_scale_backs_off(
    tmp_path, init_method, fresh_context
):
    with RankResults() as results:
        mp.spawn(nan_worker, args=(init_method, tmp_path, results), nprocs=2, join=True)
        results = dict(results)
    first, last = results[0][:-1], results[1][:-1]  # the steps, without the forward-only pass
    assert [h[2] for h in first] == [h[2] for h in last] == [True, True, False, True, True]
    # growth_interval=2: x2 after steps 1-2 clean; the overflow at 3 halves it; steps 4-5 clean: x2 again
    scales = [h[3] for h in first]
    assert scales == [h[3] for h in last] == [2**14, 2**15, 2**14, 2**14, 2**15], scales
    assert all(h[0] == h[0] for h in first)  # the losses are finite and the run went on


@pytest.mark.parametrize(
    "world, parallel, model, message",
    [
        (6, dict(pipeline=4), {}, r"tensor.size=1 x pipeline.size=4 does not divide the world size 6"),
        (8, dict(pipeline=2, zero1=3), {}, r"zero1.size=3 does not divide the data-parallel size 4"),
        (4, dict(zero1=dict(size=1, fsdp=True)), {}, r"fsdp=True shards over the zero1 group.*zero1.size=-1"),
    ],
)
def test_bad_layouts_fail_before_any_process_group(world, parallel, model, message, tmp_path):
    cfg = config(parallel, model, {}, None, tmp_path)
    with pytest.raises(ConfigError, match=message):
        check_world_size(cfg, world)
    with pytest.raises(ConfigError, match=message):  # launch checks before joining the process group
        launch(cfg, rank=0, world_size=world, local_rank=0, init_method="tcp://127.0.0.1:1", backend="gloo", seed=0)
    assert not dist.is_initialized()


def test_layers_are_partitioned_in_balanced_consecutive_ranges():
    assert partition_layers(10, 4) == [range(0, 3), range(3, 6), range(6, 8), range(8, 10)]
    assert partition_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    assert [len(r) for r in partition_layers(32, 6)] == [6, 6, 5, 5, 5, 5]


def test_a_model_not_built_in_stages_is_refused_by_the_pipeline(tmp_path, fresh_context):
    from pytrain.initialize import initialize_trainer

    cfg = config(dict(pipeline=2), {}, {}, None, tmp_path)
    with pytest.raises(TypeError, match=r"needs this rank's pipeline stages as initialize_model\(\) returns them"):
        initialize_trainer(torch.nn.Linear(2, 2), optimizer=None, config=cfg)


# The newer families, one step each under every mode of layout against one process, all in one launch of two
# processes: what they add splits or replicates in its own way (QWEN3's q/k norms act on a tensor rank's heads,
# so their gradients are summed over the tensor group, under msp over its sequence shards too; GEMMA's tied head
# and (1 + weight) norms, the tie crossing stages under pp2; BAICHUAN2's normalised head, each rank normalising
# its vocabulary rows; QWEN3MOE's experts split over tensor ranks or, under ep2, over expert ranks).
NEWER_FAMILIES = {
    "QWEN3": dict(head_dim=24),
    "QWEN3MOE": dict(head_dim=24, num_experts=4, top_k=2),  # Dropless: no capacity, so no drop differs by layout
    "GEMMA": dict(head_dim=24, embed_split_hidden=False),  # the tied head split over the vocabulary
    "INTERNLM3": {},
    "BAICHUAN2": dict(num_kv_attention_heads=None),  # the normalised head's rows whole on each tensor rank
}
# name: (parallel section, model overrides, whether it needs experts)
NEWER_LAYOUTS = {
    "tp2": (dict(tensor=2), {}, False),
    "tp2-msp": (dict(tensor=dict(size=2, mode="msp")), {}, False),
    "pp2": (dict(pipeline=2), {}, False),
    "pp2-interleaved": (dict(pipeline=dict(size=2, interleaved_overlap=True)), dict(num_chunks=2), False),
    # expert size 1: plain data parallelism for QWEN3MOE too (its experts would otherwise split over the data ranks)
    "dp2-zero1": (dict(zero1=-1, expert=dict(size=1)), {}, False),
    "ep2": (dict(expert=dict(size=2)), {}, True),
}


def newer_families_worker(rank, init_method, references, run_folder, results):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        for family, model in NEWER_FAMILIES.items():
            for name, (parallel, model_overrides, needs_experts) in NEWER_LAYOUTS.items():
                if needs_experts and "num_experts" not in model:
                    continue
                cfg = config(parallel, dict(model, **model_overrides), {}, 2, run_folder, family=family)
                history, _, _, part = train(cfg, rank, 2, steps=1)
                want = part.local_state(references[family][1])
                shards = [(n, p.detach().clone(), want[n]) for n, p in part.full_state_names().items()]
                results[(family, name, rank)] = (history, shards)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # about 60 s on the 2-core machine: five families, 26 one-step runs, one launch
def test_newer_families_match_one_process_in_every_layout(tmp_path, init_method, fresh_context):
    references = {}
    for family, model in NEWER_FAMILIES.items():
        try:
            history, params, _, _ = train(config({}, model, {}, 1, tmp_path, family=family), 0, 1, steps=1)
            references[family] = (history, params)
        finally:
            dist.destroy_process_group()
    gpc.mesh = None  # the runs' DeviceMesh holds reference cycles: free them here, not in the Manager forked next
    gc.collect()
    with RankResults() as results:
        mp.spawn(newer_families_worker, args=(init_method, references, tmp_path, results), nprocs=2, join=True)
        results = dict(results)
    assert len(results) == 2 * (len(NEWER_FAMILIES) * (len(NEWER_LAYOUTS) - 1) + 1)  # ep2: QWEN3MOE only
    for (family, name, rank), (history, shards) in results.items():
        want_history = references[family][0]
        torch.testing.assert_close(
            [h[:2] for h in history],
            [h[:2] for h in want_history],
            **TOLERANCE,
            msg=lambda m: f"{family} {name} rank {rank}: {m}",
        )
        for full_name, got, want in shards:
            torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda m: f"{family} {name} {full_name}: {m}")


def mixed_precision_worker(rank, init_method, run_folder, results):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        for name, parallel in (("zero1", dict(zero1=-1)), ("fsdp", dict(zero1=dict(size=-1, fsdp=True)))):
            history, _, _, model = train(config(parallel, {}, {}, 2, run_folder, dtype="torch.bfloat16"), rank, 2)
            params = {n: p.detach().clone() for n, p in model.full_state_names().items()}
            results[(name, rank)] = (history, params, {info.name: info.spec for _, info in model.infos()})
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # about 25 s: two bf16 layouts in 2 processes
def test_fsdp_in_bf16_stays_close_to_zero1(tmp_path, init_method, fresh_context):
    """Both keep fp32 masters; FSDP gathers bf16 weights and reduces gradients in fp32 where ZeRO-1 accumulates
    the micro-batches' bf16 gradients: after 3 steps they differ by bf16 rounding, no more (losses within 1%;
    FSDP's fp32 weights within 1% + 2e-3 of ZeRO-1's bf16 ones, which are rounded to 2^-8 relative)."""
    with RankResults() as results:
        mp.spawn(mixed_precision_worker, args=(init_method, tmp_path, results), nprocs=2, join=True)
        results = dict(results)
    zero1_history, zero1_params, _ = results[("zero1", 0)]
    for rank in range(2):
        history, params, specs = results[("fsdp", rank)]
        torch.testing.assert_close([h[0] for h in history], [h[0] for h in zero1_history], rtol=1e-2, atol=0)
        torch.testing.assert_close([h[1] for h in history], [h[1] for h in zero1_history], rtol=5e-2, atol=0)
        for name, got in params.items():
            assert got.dtype == torch.float32, name  # FSDP's parameters are the fp32 masters
            want = specs[name].cut(zero1_params[name]).float()  # this rank's FSDP shard of ZeRO-1's whole weight
            torch.testing.assert_close(got, want, rtol=1e-2, atol=2e-3, msg=lambda m: f"rank {rank} {name}: {m}")
