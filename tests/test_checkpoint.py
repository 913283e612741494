"""Checkpoints (pytrain.checkpoint): sharded save under one layout, load into others, atomicity, checks.

The reference is always the full tensor: every loaded shard must be bitwise equal to ShardSpec.cut of it.
Multi-rank saves run in gloo processes (mp.spawn, or plain subprocesses where a rank must die).
"""

import hashlib
import json
import os
import signal
import subprocess
import threading

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, python
from rank_results import RankResults

from pytrain.checkpoint import (
    FORMAT_VERSION,
    TEST_DIE_STATUS,
    Checkpointer,
    CheckpointError,
    CheckpointReader,
    CheckpointVersionError,
    StopFile,
    StopSignal,
    check_writable,
    find_latest,
    list_checkpoints,
    resolve_folder,
    restore_rng,
    rng_state,
    storage,
)
from pytrain.parallel.shard_spec import ShardSpec

H = 128
# name: (full shape, dtype, split dim or None (replicated), segments along it)
PARAMS = {
    "embed.weight": ((4 * H, H), torch.float32, 0, None),  # vocab-split rows
    "wo.weight": ((H, 3 * H // 2), torch.float32, 1, None),  # row-parallel: split columns
    "wqkv.weight": ((2 * H, H), torch.float32, 0, [H, H // 2, H // 2]),  # fused q, k, v (GQA)
    "norm.weight": ((H,), torch.float32, None, None),  # replicated on every rank
    "head.weight": ((4 * H, H), torch.bfloat16, 0, None),
}
# (data-parallel, tensor-parallel) layouts a checkpoint is loaded into
LOAD_LAYOUTS = [(1, 1), (1, 2), (2, 2), (1, 4), (4, 1)]


def full_state() -> dict[str, torch.Tensor]:
    """Every key's full tensor: model weights, two Adam moments per weight, a 0-dim step count."""
    gen = torch.Generator().manual_seed(0)
    full = {"optim/step": torch.tensor(7, dtype=torch.int64)}
    for name, (shape, dtype, _, _) in PARAMS.items():
        for prefix in ("model", "optim/exp_avg", "optim/exp_avg_sq"):
            full[f"{prefix}/{name}"] = torch.randn(shape, generator=gen).to(dtype)
    return full


def param_of(key: str) -> str:
    return key.rsplit("/", 1)[1]


def spec_for(key: str, tp_rank: int, tp: int) -> ShardSpec:
    if key == "optim/step":
        return ShardSpec.whole(())
    shape, _, dim, segments = PARAMS[param_of(key)]
    return ShardSpec.whole(shape) if dim is None else ShardSpec.split(shape, dim, tp_rank, tp, segments)


def layout_state(full, rank: int, dp: int, tp: int) -> dict[str, tuple[torch.Tensor, ShardSpec]]:
    """Rank `rank`'s state under dp x tp: model shards replicated over data ranks, optimizer moments
    ZeRO-like (each weight's moments on one data rank only), the step count on every rank."""
    tp_rank, dp_rank = rank % tp, rank // tp
    owner = {name: i % dp for i, name in enumerate(PARAMS)}
    state = {}
    for key, tensor in full.items():
        if key.startswith("optim/exp_avg") and owner[param_of(key)] != dp_rank:
            continue
        spec = spec_for(key, tp_rank, tp)
        state[key] = (spec.cut(tensor).clone(), spec)
    return state


def wanted_specs(full, rank: int, tp: int) -> dict[str, ShardSpec]:
    return {key: spec_for(key, rank % tp, tp) for key in full}


def assert_loads_into_every_layout(folder) -> None:
    full = full_state()
    reader = CheckpointReader(folder)
    for dp, tp in LOAD_LAYOUTS:
        for rank in range(dp * tp):
            got = reader.read(wanted_specs(full, rank, tp))
            for key, spec in wanted_specs(full, rank, tp).items():
                want = spec.cut(full[key])
                assert got[key].dtype == want.dtype and torch.equal(got[key], want), (dp, tp, rank, key)


def state_bytes(full) -> int:
    return sum(t.numel() * t.element_size() for t in full.values())


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


# -- saving under dp2 x tp2 (4 gloo processes) -------------------------------------------------------------


def save_worker(rank, world, init_method, root, results):
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        state = layout_state(full_state(), rank, dp=2, tp=2)
        extras = dict(rank_state={"rank": rank, "rng": rng_state()}, global_state={"config": "model = dict()"})
        Checkpointer(root / "sync").save(1, state, **extras)
        background = Checkpointer(root / "async", async_save=True)
        background.save(1, state, **extras)
        background.close()
        # tensor rank 1 leaves out its half of wo: no rank holds it, every rank gets the same error
        partial = {k: v for k, v in state.items() if not (rank % 2 == 1 and k == "model/wo.weight")}
        try:
            Checkpointer(root / "sync").save(2, partial)
        except CheckpointError as err:
            results[rank] = str(err)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dp2_tp2(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp2_tp2")
    with RankResults() as results:
        mp.spawn(save_worker, args=(4, f"file://{root / 'rendezvous'}", root, results), nprocs=4, join=True)
        return root, dict(results)


def test_sharded_save_loads_into_other_layouts(dp2_tp2):
    root, _ = dp2_tp2
    assert_loads_into_every_layout(root / "sync" / "1")
    reader = CheckpointReader(root / "sync" / "1")
    assert reader.world_size == 4 and reader.complete
    assert reader.global_state() == {"config": "model = dict()"}
    assert [reader.rank_state(r)["rank"] for r in range(4)] == [0, 1, 2, 3]


def test_replicated_entries_are_written_once(dp2_tp2):
    root, _ = dp2_tp2
    folder = root / "sync" / "1"
    manifest = json.loads((folder / "manifest.json").read_text())
    # replicated over data ranks (and norm/step over all 4): one shard per distinct piece, lowest rank writes
    assert [s["file"] for s in manifest["tensors"]["model/norm.weight"]["shards"]] == ["model-r00000.safetensors"]
    assert [s["file"] for s in manifest["tensors"]["model/wo.weight"]["shards"]] == [
        "model-r00000.safetensors",
        "model-r00001.safetensors",
    ]
    assert len(manifest["tensors"]["optim/exp_avg/wqkv.weight"]["shards"]) == 2  # ZeRO owner dp rank 0 only
    ratio = folder_bytes(folder) / state_bytes(full_state())
    print(f"bytes on disk / state bytes = {ratio:.4f}")
    assert 1.0 <= ratio <= 1.05


def test_async_save_writes_the_same_files(dp2_tp2):
    root, _ = dp2_tp2
    sync, background = root / "sync" / "1", root / "async" / "1"
    names = sorted(p.name for p in sync.iterdir())
    assert names == sorted(p.name for p in background.iterdir())
    for name in names:
        # the manifest differs by saved_at (compared below), the marker by the manifest's hash
        if name != "manifest.json" and not name.endswith(".step"):
            assert (sync / name).read_bytes() == (background / name).read_bytes(), name
    manifests = [json.loads((f / "manifest.json").read_text()) for f in (sync, background)]
    for m in manifests:
        m.pop("saved_at")
    assert manifests[0] == manifests[1]


def test_shards_that_leave_a_hole_are_refused_on_every_rank(dp2_tp2):
    root, errors = dp2_tp2
    assert sorted(errors) == [0, 1, 2, 3] and len(set(errors.values())) == 1
    assert "model/wo.weight: the ranks' shards cover 12288 of its 24576 elements [128, 192]" in errors[0]
    assert not (root / "sync" / "2").exists() and not (root / "sync" / ".tmp-2").exists()


def test_write_plan_refuses_overlapping_layouts_and_dtype_disagreement():
    from pytrain.checkpoint.layout import Entry, plan_writes

    whole, half0, half1 = ShardSpec.whole((4, 6)), ShardSpec.split((4, 6), 1, 0, 2), ShardSpec.split((4, 6), 1, 1, 2)
    plan = plan_writes(
        [
            [Entry("model/w", "float32", half0)],
            [Entry("model/w", "float32", half1)],
            [Entry("model/w", "float32", half0)],
        ]
    )
    assert [(rank, e.spec) for rank, e in plan["model/w"]] == [(0, half0), (1, half1)]  # rank 2's replica: not written
    with pytest.raises(CheckpointError, match=r"model/w: shards of different layouts overlap \(rank 0: \{'dim': None"):
        plan_writes([[Entry("model/w", "float32", whole)], [Entry("model/w", "float32", half1)]])
    with pytest.raises(CheckpointError, match=r"model/w: rank 0 has float32\[4, 6\], rank 1 has bfloat16\[4, 6\]"):
        plan_writes([[Entry("model/w", "float32", half0)], [Entry("model/w", "bfloat16", half1)]])


# -- one process ---------------------------------------------------------------------------------------------


def save_full(folder, step: int, keep: int = 0, snapshot: bool = False):
    state = layout_state(full_state(), 0, 1, 1)
    return Checkpointer(folder, keep=keep).save(step, state, global_state={"step": step}, snapshot=snapshot)


def test_one_process_save_loads_into_tensor_splits_and_safetensors_reads_it(tmp_path):
    from safetensors.torch import load_file

    path = save_full(tmp_path, 3)
    assert_loads_into_every_layout(path)
    full = full_state()
    on_disk = load_file(path / "model-r00000.safetensors") | load_file(path / "optim-r00000.safetensors")
    assert on_disk.keys() == full.keys() and all(torch.equal(on_disk[k], full[k]) for k in full)


def test_load_into_copies_in_place_and_checks_shapes(tmp_path):
    path = save_full(tmp_path, 1)
    full = full_state()
    spec = spec_for("model/wqkv.weight", 1, 2)
    target = torch.zeros(spec.local_shape, dtype=torch.float64)
    CheckpointReader(path).load_into({"model/wqkv.weight": (target, spec)})
    assert torch.equal(target, spec.cut(full["model/wqkv.weight"]).double())
    with pytest.raises(CheckpointError, match=r"model/wqkv.weight: tensor \[3, 3\], spec's local shape \[128, 128\]"):
        CheckpointReader(path).load_into({"model/wqkv.weight": (torch.zeros(3, 3), spec)})


def test_missing_keys_and_shape_mismatch_are_listed(tmp_path):
    reader = CheckpointReader(save_full(tmp_path, 1))
    wanted = {
        "model/embed.weight": ShardSpec.whole((4 * H, 2 * H)),
        "model/layers.9.w1.weight": ShardSpec.whole((8, 8)),
        "model/norm.weight": ShardSpec.whole((H,)),
    }
    with pytest.raises(CheckpointError) as err:
        reader.check(wanted, strict_prefixes=("model/",))
    message = str(err.value)
    assert "missing from the checkpoint (1):\n    model/layers.9.w1.weight [8, 8]" in message
    assert "shape differs (1):\n    model/embed.weight: checkpoint [512, 128], wanted [512, 256]" in message
    assert "in the checkpoint but not in this model (3):" in message and "model/wo.weight [128, 192]" in message
    with pytest.raises(CheckpointError, match="missing from the checkpoint"):
        reader.read({"model/layers.9.w1.weight": ShardSpec.whole((8, 8))})


def flip_bit(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def test_corrupt_and_truncated_files_are_named_and_skipped(tmp_path):
    save_full(tmp_path, 1)
    newest = save_full(tmp_path, 2)
    shard = newest / "optim-r00000.safetensors"
    flip_bit(shard, shard.stat().st_size - 5)
    with pytest.raises(CheckpointError, match=f"checkpoint file {shard} is corrupt: its sha256 differs"):
        CheckpointReader(newest).read({"optim/step": ShardSpec.whole(())})
    with pytest.warns(UserWarning, match=f"skipping corrupt checkpoint {newest}: checkpoint file {shard} is corrupt"):
        assert find_latest(tmp_path).step == 1

    flip_bit(shard, shard.stat().st_size - 5)  # repaired
    assert find_latest(tmp_path).step == 2
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=f"checkpoint file {shard} is truncated or damaged"):
        CheckpointReader(newest).verify()

    (newest / "optim-r00000.safetensors").unlink()
    with pytest.raises(CheckpointError, match=f"checkpoint file {shard} is missing"):
        CheckpointReader(newest).verify()

    manifest = tmp_path / "1" / "manifest.json"
    flip_bit(manifest, 40)
    with pytest.raises(CheckpointError, match=f"{manifest} is corrupt: its sha256 differs from the one its marker"):
        CheckpointReader(tmp_path / "1")


def test_newer_format_version_is_an_error(tmp_path):
    path = save_full(tmp_path, 5)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    data = json.dumps(manifest).encode()
    (path / "manifest.json").write_bytes(data)
    (path / "5.step").write_text(json.dumps({"step": 5, "manifest_sha256": hashlib.sha256(data).hexdigest()}))
    message = (
        f"written in checkpoint format version {FORMAT_VERSION + 1}; this pytrain reads versions up to {FORMAT_VERSION}"
    )
    with pytest.raises(CheckpointVersionError, match=message):
        CheckpointReader(path)
    with pytest.raises(CheckpointVersionError, match=message):
        find_latest(tmp_path)


def test_bad_folders_are_clear_errors(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(CheckpointError, match=f"checkpoint folder '{blocker}/ckpt' cannot be written"):
        check_writable(str(blocker / "ckpt"))
    with pytest.raises(CheckpointError, match="cannot be written"):
        Checkpointer(f"local:{blocker}/ckpt")
    with pytest.raises(
        CheckpointError,
        match=r"checkpoint storage 'boto3' \(InternLM's remote storage\) in 'boto3:s3://b/x' is not available",
    ):
        check_writable("boto3:s3://b/x")
    assert resolve_folder(f"local:{tmp_path}") == tmp_path == resolve_folder(str(tmp_path))
    assert check_writable(f"local:{tmp_path}/new/deeper").is_dir()
    with pytest.raises(CheckpointError, match=f"checkpoint folder '{tmp_path}/nowhere' does not exist"):
        CheckpointReader(tmp_path / "nowhere")
    save_full(tmp_path / "run", 4)
    with pytest.raises(CheckpointError, match=r"no manifest.json \(it holds checkpoints 4: name one of them\)"):
        CheckpointReader(tmp_path / "run")
    with pytest.raises(
        CheckpointError, match=f"checkpoint {tmp_path}/run/4 already exists and is complete; nothing was overwritten"
    ):
        save_full(tmp_path / "run", 4)
    assert find_latest(tmp_path / "run").step == 4


def test_keep_n_deletes_older_complete_checkpoints_after_a_newer_one_is_complete(tmp_path):
    (tmp_path / ".tmp-0").mkdir()  # saves cut off by a crash: before and after the rename
    (tmp_path / "0").mkdir()
    for step in (1, 2, 3, 4, 5):
        save_full(tmp_path, step, keep=2)
        remaining = sorted(info.step for info in list_checkpoints(tmp_path))
        assert remaining == [s for s in (1, 2, 3, 4, 5) if step - 2 < s <= step], step
    assert find_latest(tmp_path).step == 5


def test_snapshot_slots_alternate_and_keep_the_good_one(tmp_path):
    save_full(tmp_path, 10)
    for step, slot in ((11, "0"), (12, "1"), (13, "0"), (14, "1")):
        assert save_full(tmp_path, step, snapshot=True) == tmp_path / "snapshot" / slot
    assert [(i.step, i.path.name, i.snapshot) for i in list_checkpoints(tmp_path)] == [
        (10, "10", False),
        (13, "0", True),
        (14, "1", True),
    ]
    assert find_latest(tmp_path).path == tmp_path / "snapshot" / "1"
    flip_bit(tmp_path / "snapshot" / "1" / "model-r00000.safetensors", 100)
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        assert find_latest(tmp_path).step == 13
    (tmp_path / "snapshot" / "1" / "14.step").unlink()  # as if a crash came before the marker
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint"):
        assert find_latest(tmp_path).step == 13
    assert save_full(tmp_path, 15, snapshot=True) == tmp_path / "snapshot" / "1"  # the good slot 0 stays
    assert [(i.step, i.path.name) for i in list_checkpoints(tmp_path) if i.snapshot] == [(13, "0"), (15, "1")]


# -- async ------------------------------------------------------------------------------------------------


def test_async_save_returns_before_writing_and_saves_the_values_at_the_call(tmp_path, monkeypatch):
    release, writing = threading.Event(), threading.Event()
    real_write = storage.write_safetensors

    def gated_write(*args):
        writing.set()
        assert release.wait(30)
        return real_write(*args)

    monkeypatch.setattr("pytrain.checkpoint.writer.write_safetensors", gated_write)
    ckpt = Checkpointer(tmp_path, async_save=True)
    weight = torch.arange(12.0).reshape(3, 4)
    path = ckpt.save(1, {"model/w": (weight, ShardSpec.whole((3, 4)))})
    assert writing.wait(30) and not path.exists()  # save() returned while the writer is still held
    weight.add_(100)  # the step loop goes on changing the parameters
    release.set()
    ckpt.close()
    assert torch.equal(
        CheckpointReader(path).read({"model/w": ShardSpec.whole((3, 4))})["model/w"], torch.arange(12.0).reshape(3, 4)
    )


def test_async_failure_is_raised_at_the_next_wait(tmp_path, monkeypatch):
    def failing_write(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pytrain.checkpoint.writer.write_safetensors", failing_write)
    ckpt = Checkpointer(tmp_path, async_save=True)
    path = ckpt.save(1, {"model/w": (torch.ones(2), ShardSpec.whole((2,)))})
    with pytest.raises(
        CheckpointError, match=r"saving checkpoint step 1 .* failed: \[Errno 28\] No space left on device"
    ):
        ckpt.wait()
    ckpt.wait()  # raised once
    assert not path.exists()
    with pytest.warns(UserWarning, match=r"skipping incomplete checkpoint .*\.tmp-1"):
        assert find_latest(tmp_path) is None


# -- crashes ----------------------------------------------------------------------------------------------

CRASH_SCRIPT = r"""
import os, sys
import torch, torch.distributed as dist
from pytrain.checkpoint import TEST_DIE_ENV, CheckpointError, Checkpointer
from pytrain.parallel.shard_spec import ShardSpec

root, rank, world, init_method, die_after = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
if world > 1:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
spec = ShardSpec.split((8, 8), 0, rank, world)
full = {"model/w": torch.arange(64.0).reshape(8, 8), "optim/m": torch.arange(64.0).reshape(8, 8) * 2}
ckpt = Checkpointer(root, finalize_timeout_s=3)
ckpt.save(1, {k: (spec.cut(v), spec) for k, v in full.items()})
if world > 1:
    dist.barrier()
if die_after != "0":
    os.environ[TEST_DIE_ENV] = die_after
try:
    ckpt.save(2, {k: (spec.cut(v) + 1, spec) for k, v in full.items()})
except CheckpointError as err:
    print("SAVE FAILED:", err, flush=True)
    sys.exit(3)
"""

# durable writes of one process's save: model and optim files, rank json, state.json, done file,
# manifest, the rename, the marker
WRITES_PER_SAVE = 8


def run_crash(root, rank, world, init_method, die_after, **kwargs):
    args = [python(), "-c", CRASH_SCRIPT, str(root), str(rank), str(world), init_method, str(die_after)]
    return subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


@pytest.mark.slow
def test_a_process_dying_at_any_point_of_a_save_leaves_the_previous_checkpoint(tmp_path):
    for die_after in range(1, WRITES_PER_SAVE + 1):
        root = tmp_path / str(die_after)
        proc = run_crash(root, 0, 1, "", die_after)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == TEST_DIE_STATUS, out
        complete = [info.step for info in list_checkpoints(root) if info.complete]
        if die_after < WRITES_PER_SAVE:
            assert complete == [1], die_after
            with pytest.warns(UserWarning, match="skipping incomplete checkpoint .*2"):
                reader = find_latest(root)
            assert reader.step == 1
        else:  # died right after the marker: step 2 is whole
            assert complete == [1, 2]
            assert torch.equal(
                find_latest(root).read({"model/w": ShardSpec.whole((8, 8))})["model/w"],
                torch.arange(64.0).reshape(8, 8) + 1,
            )


def test_a_rank_dying_mid_save_fails_the_save_and_the_previous_checkpoint_is_taken(tmp_path):
    init_method = f"file://{tmp_path / 'rendezvous'}"
    root = tmp_path / "ckpt"
    procs = [run_crash(root, 0, 2, init_method, 0), run_crash(root, 1, 2, init_method, 1)]
    outs = [proc.communicate(timeout=120)[0] for proc in procs]
    assert procs[1].returncode == TEST_DIE_STATUS, outs[1]
    assert procs[0].returncode == 3 and "rank 1 did not finish writing" in outs[0], outs[0]
    with pytest.warns(UserWarning, match=r"skipping incomplete checkpoint .*\.tmp-2"):
        reader = find_latest(root)
    assert reader.step == 1 and reader.world_size == 2
    assert torch.equal(
        reader.read({"optim/m": ShardSpec.whole((8, 8))})["optim/m"], torch.arange(64.0).reshape(8, 8) * 2
    )


# -- RNG, stop file, signals ------------------------------------------------------------------------------


def draws():
    import random

    return (
        torch.rand(3).tolist(),
        np.random.rand(3).tolist(),
        np.random.randn(1).tolist(),
        [random.random() for _ in range(3)],
    )


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    np.random.randn(1)  # leaves a cached gaussian in NumPy's state
    state = rng_state()
    expected = draws()
    Checkpointer(tmp_path).save(1, {}, rank_state={"rng": state})
    draws()
    restore_rng(find_latest(tmp_path).rank_state(0)["rng"])
    assert draws() == expected
    with pytest.raises(CheckpointError, match="not one rng_state\\(\\) wrote"):
        restore_rng({"torch": "AAAA"})


def test_stop_file(tmp_path):
    path = tmp_path / "stop"
    stop = StopFile(str(path), start_step=5)
    assert stop.requested_step() is None and not stop.should_stop(100)
    path.write_text("10\n")
    assert stop.requested_step() == 10 and not stop.should_stop(9) and stop.should_stop(10)
    path.write_text("3")
    with pytest.warns(UserWarning, match="asks to stop at step 3, not after this run's start \\(5\\)"):
        assert stop.requested_step() is None
    path.write_text("soon")
    with pytest.warns(UserWarning, match="holds 'soon', not a step number"):
        assert not stop.should_stop(20)
    assert StopFile(None).requested_step() is None


@pytest.mark.parametrize("sigint_at_start", ["default", "ignored"])
def test_signal_handler_records_and_restores_previous_handlers(sigint_at_start):
    """Set SIGINT's disposition explicitly: a shell's background job starts with it ignored, a terminal's
    foreground job with Python's KeyboardInterrupt handler, and the test must not depend on which ran pytest."""
    before = signal.SIG_IGN if sigint_at_start == "ignored" else signal.default_int_handler
    saved = signal.signal(signal.SIGINT, before)
    try:
        previous_term = signal.getsignal(signal.SIGTERM)
        with StopSignal() as stop:
            assert not stop.requested
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested and stop.signum == signal.SIGTERM
            if before is signal.SIG_IGN:  # ignored at start: stays ignored, neither recorded nor fatal
                os.kill(os.getpid(), signal.SIGINT)
                assert stop.signum == signal.SIGTERM
            else:
                os.kill(os.getpid(), signal.SIGINT)
                assert stop.signum == signal.SIGINT  # a different signal: recorded, not fatal
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGINT)  # the same one again: the previous handler (Ctrl-C twice)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == (previous_term, before)
    finally:
        signal.signal(signal.SIGINT, saved)


LOOP_SCRIPT = r"""
import sys, time
import torch
from pytrain.checkpoint import Checkpointer, StopSignal
from pytrain.parallel.shard_spec import ShardSpec

ckpt = Checkpointer(sys.argv[1], async_save=True)
weight, step = torch.zeros(4), 0
with StopSignal() as stop:
    while not stop.requested:  # the step loop: finishes the step it is in
        step += 1
        weight += 1
        time.sleep(0.01)
        if step == 1:
            print("ready", flush=True)
    ckpt.save(step, {"model/w": (weight, ShardSpec.whole((4,)))}, global_state={"step": step})
ckpt.close()
"""


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path):
    proc = subprocess.Popen(
        [python(), "-c", LOOP_SCRIPT, str(tmp_path)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "SIGTERM received: finishing this step, saving a checkpoint" in err
    reader = find_latest(tmp_path)
    step = reader.global_state()["step"]
    assert step == reader.step >= 1
    assert torch.equal(reader.read({"model/w": ShardSpec.whole((4,))})["model/w"], torch.full((4,), float(step)))
