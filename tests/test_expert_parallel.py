"""Expert parallelism (pytrain.parallel.expert) against one process: a mixture-of-experts model trained
under expert x data (ZeRO-1), expert x tensor (with and without sequence parallelism) and expert x pipeline
layouts gives the single-process run's per-step losses, gradient norms and final parameters (each rank's
shard of them), through the real construction path (tests/test_parallel.py's harness), in gloo processes.
"""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT
from host_syncs import count_host_reads, no_value_sized_ops
from rank_results import RankResults
from test_parallel import assert_rank_matches, config, reference, train
from torch import nn

from pytrain.config import ConfigError, check_world_size
from pytrain.model.moe import MoELayer, Routing
from pytrain.parallel import gpc
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
    "ep2-dp2-expert-zero1-off": (4, dict(expert=dict(size=2), zero1=-1, expert_zero1=dict(size=1)), {}, {}),
    "ep2-tp2": (4, dict(expert=dict(size=2), tensor=2), {}, {}),
    "ep2-tp2-msp": (4, dict(expert=dict(size=2), tensor=dict(size=2, mode="msp")), dict(checkpoint=True), {}),
    "ep2-pp2": (4, dict(expert=dict(size=2), pipeline=2), {}, {}),
    # FSDP: the dense weights sharded over the data ranks, the experts over the ranks holding the same experts
    "fsdp2-ep2": (2, dict(expert=dict(size=2), zero1=dict(size=-1, fsdp=True)), {}, {}),
    "fsdp-ep2-dp2": (4, dict(expert=dict(size=2), zero1=dict(size=-1, fsdp=True)), {}, {}),
}
# FSDP's cut of the expert weights' rows (dim 0: the experts) over the ranks holding the same experts
EXPERT_FSDP_SHARDS = {"fsdp-ep2-dp2": 2}

# ZeRO-1 group sizes [dense weights, expert weights]: the expert weights' state is sharded within the ranks
# holding the same experts, unless parallel.expert_zero1.size = 1
ZERO_SIZES = {"ep2-dp2-zero1": [4, 2], "ep2-dp2-expert-zero1-off": [4, 1]}


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
            zero_sizes = [
                dist.get_world_size(g) if g is not None else 1 for g in (gpc.zero1_group, gpc.expert_zero1_group)
            ]
            results[(name, rank)] = (history, shards, dispatchers, zero_sizes)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    return reference(FAMILY, MOE, tmp_path_factory.mktemp("reference"))


# slow (about 20 s at 2 processes): test_moe_families.py runs the MoE layouts against one process in the fast suite
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_expert_layouts_match_one_process(world, single_process, tmp_path, init_method, fresh_context):
    names = [name for name, (size, *_) in LAYOUTS.items() if size == world]
    with RankResults() as results:
        args = (world, init_method, names, single_process, tmp_path, results)
        mp.spawn(worker, args=args, nprocs=world, join=True)
        results = dict(results)
    want_history = single_process[0]
    for name in names:
        for rank in range(world):
            history, shards, dispatchers, zero_sizes = results[(name, rank)]
            assert dispatchers == {ExpertParallelDispatcher.__name__}, (name, dispatchers)
            assert name not in ZERO_SIZES or zero_sizes == ZERO_SIZES[name], (name, zero_sizes)
            assert_rank_matches(f"{name} rank {rank}", history, shards, want_history)
            experts = [(n, got.shape[0]) for n, got, _ in shards if n.endswith("experts.w1")]
            parallel = LAYOUTS[name][1]
            split = parallel.get("expert", {}).get("size", 1) * _size(parallel.get("tensor", 1))
            split *= EXPERT_FSDP_SHARDS.get(name, 1)
            assert experts and all(local == MOE["num_experts"] // split for _, local in experts), (name, experts)


def dispatch_worker(rank, world, init_method, results):
    """One GShard MoE layer (some tokens dropped) on this rank's tokens with its 4 experts split over the ranks, on
    the GPU's code path (Triton through the interpreter): the host reads it makes in forward and backward, and how
    far it is from the whole layer in one process."""
    os.environ["PYTRAIN_TRITON_CPU"] = "1"
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        whole = MoELayer(16, 24, Routing("GShard", 4, 2, capacity_factor=1.0, min_capacity=0))
        with torch.no_grad():
            for param in whole.parameters():
                param.normal_(0.0, 0.3)
        split = copy.deepcopy(whole)
        per_rank = 4 // world
        for name, param in whole.experts.named_parameters():
            setattr(split.experts, name, nn.Parameter(param.detach()[rank * per_rank : (rank + 1) * per_rank].clone()))
        split.dispatcher = ExpertParallelDispatcher(4, dist.group.WORLD, tensor_size=1, tensor_rank=0)
        generator = torch.Generator().manual_seed(rank)
        x, probe = (torch.randn(2, 9, 16, generator=generator) for _ in range(2))
        with count_host_reads() as reads, no_value_sized_ops():
            (split(x) * probe).sum().backward()
        out = split(x).detach()
        (whole(x) * probe).sum().backward()
        for param in whole.experts.parameters():  # this rank's experts ran every rank's tokens
            dist.all_reduce(param.grad)
        errors = {"out": (out - whole(x)).abs().max().item()}
        errors["router"] = (split.gate.wg.weight.grad - whole.gate.wg.weight.grad).abs().max().item()
        for name, param in split.experts.named_parameters():
            want = getattr(whole.experts, name).grad[rank * per_rank : (rank + 1) * per_rank]
            errors[name] = (param.grad - want).abs().max().item()
        results[rank] = (reads, errors, int(whole.tokens_per_expert.max()))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # about 11 s: 2 processes; the fast suite checks the dispatch's results in the layout test
def test_expert_parallel_dispatch_reads_back_once_per_layer(tmp_path, init_method):
    """On a GPU each host read is a synchronization: an expert-parallel layer makes exactly one, forward and backward
    together (the all-to-all's split sizes), and no op sized by its input's values (torch.bincount, nonzero, ...)."""
    with RankResults() as results:
        mp.spawn(dispatch_worker, args=(2, init_method, results), nprocs=2, join=True)
        results = dict(results)
    for rank, (reads, errors, most_assigned) in results.items():
        assert reads == ["tolist"], (rank, reads)
        assert most_assigned > 9, (rank, most_assigned)  # over the capacity of 9: some assignments dropped
        assert max(errors.values()) < 1e-5, (rank, errors)


def _size(section) -> int:
    return section["size"] if isinstance(section, dict) else section


@pytest.mark.parametrize(
    "world, parallel, message",
    [
        (4, dict(expert=dict(size=3)), r"parallel.expert.size=3 must divide the data-parallel size 4"),
        (8, dict(expert=dict(size=4), tensor=2), r"num_experts=4 .* expert size 4 x tensor size 2"),
        (8, dict(expert=dict(size=2), expert_zero1=dict(size=3)), r"expert_zero1.size=3 must divide the 4 ranks"),
    ],
)
def test_layouts_that_cannot_split_the_experts_are_config_errors(world, parallel, message, tmp_path):
    cfg = config(parallel, MOE, {}, None, tmp_path, family=FAMILY)
    with pytest.raises(ConfigError, match=message):
        check_world_size(cfg, world)


RUN_CONFIG = """
JOB_NAME = "moe-ckpt"
model_type = "MIXTRALMOE"
model = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=256,
             multiple_of=32, mlp_ratio=1.0, num_experts=4, top_k=2, dtype="torch.float32")
data = dict(seq_len=32, micro_num={micro_num}, micro_bsz=2, total_steps=6, train_folder=None)
adam = dict(lr=1e-3)
parallel = dict(expert=dict(size={expert}), tensor=dict(size={tensor}), zero1=dict(size=-1))
monitor = dict(run_folder={runs!r}, tensorboard=dict(enable=False))
ckpt = dict(enable_save_ckpt=True, save_ckpt_folder={folder!r}, checkpoint_every=3)
"""


def run_job(root, name, folder, world, expert=1, tensor=1, extra=""):
    """`python -m pytrain.train` (under torchrun when world > 1) on one global batch of 4 micro-batches, its
    config RUN_CONFIG + `extra`; returns {step: loss} from its metrics.jsonl."""
    data = world // tensor
    path = root / f"{name}.py"
    runs = root / f"runs-{name}"
    path.write_text(
        RUN_CONFIG.format(micro_num=4 // data, expert=expert, tensor=tensor, runs=str(runs), folder=str(folder)) + extra
    )
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] if world > 1 else []
    done = subprocess.run(
        [sys.executable, *launcher, "-m", "pytrain.train", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (metrics,) = runs.glob("*/*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


@pytest.mark.slow
def test_an_expert_parallel_checkpoint_resumes_in_one_process_and_under_tensor_parallelism(tmp_path):
    """Saved under ep2 (each rank holds 2 of the 4 experts), the checkpoint holds whole expert weights by
    full name: one process, and tp2 (experts split over tensor ranks instead), continue with its losses."""
    straight = run_job(tmp_path, "ep2", tmp_path / "ckpt", world=2, expert=2)
    assert sorted(straight) == [1, 2, 3, 4, 5, 6]
    for name, world, tensor in (("one", 1, 1), ("tp2", 2, 2)):
        folder = tmp_path / f"ckpt-{name}"
        shutil.copytree(tmp_path / "ckpt" / "3", folder / "3")  # only the step-3 checkpoint: resume there
        resumed = run_job(tmp_path, name, folder, world=world, tensor=tensor)
        assert sorted(resumed) == [4, 5, 6], (name, resumed)
        torch.testing.assert_close(
            [resumed[s] for s in (4, 5, 6)], [straight[s] for s in (4, 5, 6)], rtol=1e-5, atol=0, msg=name
        )


@pytest.mark.slow
def test_an_internevo_moe_folder_starts_an_expert_parallel_run(tmp_path):
    """model_tp{t}_pp0.pt + model_moe_layer{L}_expert{e}_tp{t}.pt files as InternEvo writes them under tp2
    (tests/test_internlm_checkpoint.py's writer) start an ep2 run and a one-process run alike, from those
    weights, not from the initialisation."""
    from test_internlm_checkpoint import write_internevo_folder

    from pytrain.model.families import build_mixtral_moe

    torch.manual_seed(0)
    fields = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=256)
    model = build_mixtral_moe(**fields, multiple_of=32, mlp_ratio=1.0, num_experts=4, top_k=2, dtype="torch.float32")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    source = tmp_path / "internevo"
    source.mkdir()
    write_internevo_folder(source, model.state_dict(), "blocks", tp=2, pp=1)
    load = f'ckpt["load_ckpt_info"] = dict(path={str(source)!r}, content=("model",), ckpt_type="internlm")\n'
    ep2 = run_job(tmp_path, "ep2", tmp_path / "ckpt-ep2", world=2, expert=2, extra=load)
    one = run_job(tmp_path, "one", tmp_path / "ckpt-one", world=1, extra=load)
    fresh = run_job(tmp_path, "fresh", tmp_path / "ckpt-fresh", world=1)
    assert abs(ep2[1] - fresh[1]) > 0.01, (ep2, fresh)  # the run started from the folder's weights
    torch.testing.assert_close([ep2[s] for s in sorted(ep2)], [one[s] for s in sorted(one)], rtol=1e-5, atol=0)
