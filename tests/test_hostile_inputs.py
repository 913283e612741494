"""Hostile and broken inputs: a damaged or tampered checkpoint, Hugging Face folder, InternEvo folder or
tokenized folder gives the project's clear errors (CheckpointError, DataError) naming what is wrong, never
another traceback, a read outside the folder, or a silent conversion; two runs never share a save folder or
a run folder; SIGTERM stops a run in start-up; MFU stays at most 100%.

Checkpoint cases start from a real checkpoint (test_checkpoint.save_full) tampered the way a damaged folder
would be, with the checksums recomputed where the case needs them to pass (as a writer with access to the
folder would): the checksums protect against corruption, the checks here against what is left.
"""

import contextlib
import hashlib
import io
import json
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, python
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from internlm_corpus import write_bin, write_corpus
from safetensors.torch import load_file, save_file
from test_checkpoint import save_full
from test_checkpoint_training import (
    SEQ_LEN,
    VOCAB,
    config,
    rewrite_manifest,
    run_alone,
    train_process,
    write_hf_folder,
    write_run_config,
)
from test_internlm_checkpoint import meta_model

from pytrain.checkpoint import CheckpointError, CheckpointReader, SaveFolderLock, find_latest
from pytrain.checkpoint.hf import HFReader
from pytrain.checkpoint.internlm import load_internlm_folder
from pytrain.data import DataError
from pytrain.data.tokenized import SampleReader, open_folder
from pytrain.monitor import StepMonitor
from pytrain.parallel.shard_spec import ShardSpec
from pytrain.train.checkpointing import CONTENTS, state_schema

SHARD = "model-r00000.safetensors"


def load_everything(folder: Path) -> None:
    """What a resume reads: every file checked, both JSON states, every tensor."""
    reader = CheckpointReader(folder)
    reader.verify()
    reader.global_state()
    reader.rank_state(0)
    reader.read({key: ShardSpec.whole(shape) for key, (shape, _) in reader.shapes().items()})


def resign(folder: Path, name: str) -> None:
    """Records file `name`'s new size and sha256 in the manifest (and the manifest's in the marker)."""
    data = (folder / name).read_bytes()
    entry = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    rewrite_manifest(folder, lambda manifest: manifest["files"].update({name: entry}))


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def write_safetensors(path: Path, header_text: bytes, data: bytes) -> None:
    header_text += b" " * (-len(header_text) % 8)
    path.write_bytes(len(header_text).to_bytes(8, "little") + header_text + data)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return save_full(tmp_path / "run", 1)


# -- files outside the folder ----------------------------------------------------------------------------------
def test_files_a_manifest_names_outside_the_checkpoint_are_refused(checkpoint, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copy(checkpoint / SHARD, elsewhere / "x.safetensors")  # the same bytes: its checksum would pass

    def renamed(to):
        def change(manifest):
            manifest["files"][to] = manifest["files"].pop(SHARD)
            for tensor in manifest["tensors"].values():
                for shard in tensor["shards"]:
                    shard["file"] = to if shard["file"] == SHARD else shard["file"]

        return change

    for name in ("../../elsewhere/x.safetensors", str(elsewhere / "x.safetensors")):
        folder = tmp_path / "case" / "1"
        shutil.rmtree(folder.parent, ignore_errors=True)
        shutil.copytree(checkpoint, folder)
        rewrite_manifest(folder, renamed(name))
        with pytest.raises(CheckpointError, match=rf"names '{name}': only files inside {folder} are read"):
            load_everything(folder)

    (checkpoint / SHARD).unlink()
    (checkpoint / SHARD).symlink_to(elsewhere / "x.safetensors")
    with pytest.raises(CheckpointError, match=rf"names '{SHARD}', a link to {elsewhere}/x.safetensors outside"):
        load_everything(checkpoint)


def test_a_state_json_linked_out_of_the_folder_is_neither_hashed_nor_read(checkpoint, monkeypatch):
    import pytrain.checkpoint.reader as reader_module

    (checkpoint / "state.json").unlink()
    (checkpoint / "state.json").symlink_to("/etc/passwd")
    hashed = []
    monkeypatch.setattr(reader_module, "file_sha256", lambda path: hashed.append(path) or "0" * 64)
    with pytest.raises(CheckpointError, match=r"names 'state.json', a link to /etc/passwd outside"):
        CheckpointReader(checkpoint).global_state()
    assert hashed == []


# -- manifests and states of the wrong schema --------------------------------------------------------------------
def shard_list(manifest) -> list:
    return manifest["tensors"]["model/norm.weight"]["shards"]


MANIFEST_DAMAGE = {
    "step missing": (lambda m: m.pop("step"), r"the whole file lacks 'step'"),
    "tensors a list": (lambda m: m.update(tensors=[]), r"tensors must be an object, not \[\]"),
    "format_version true": (
        lambda m: m.update(format_version=True),
        r"format_version must be an integer >= 0, not true",
    ),
    "bytes a string": (
        lambda m: m["files"]["state.json"].update(bytes="9"),
        r"files\['state.json'\].bytes must be an integer >= 0, not \"9\"",
    ),
    "unknown dtype": (
        lambda m: m["tensors"]["model/norm.weight"].update(dtype="float128"),
        r"tensors\['model/norm.weight'\].dtype must be one of \"float64\", \"float32\"",
    ),
    "unlisted file": (
        lambda m: shard_list(m)[0].update(file="other.safetensors"),
        r"a shard of model/norm.weight is in 'other.safetensors', not listed",
    ),
    "piece outside": (
        lambda m: shard_list(m)[0].update(dim=0, pieces=[[0, 10**9]]),
        r"model/norm.weight: piece \(0, 1000000000\) lies outside dim 0 of \(128,\)",
    ),
}


@pytest.mark.parametrize("case", sorted(MANIFEST_DAMAGE))
def test_a_manifest_of_the_wrong_schema_is_a_clear_error_and_auto_resume_skips_it(tmp_path, case):
    change, message = MANIFEST_DAMAGE[case]
    save_full(tmp_path, 1)
    newer = save_full(tmp_path, 2)
    rewrite_manifest(newer, change)
    with pytest.raises(CheckpointError, match=rf"{newer}/manifest.json is not valid: {message}"):
        load_everything(newer)
    with pytest.warns(UserWarning, match=rf"skipping corrupt checkpoint {newer}: .*is not valid"):
        assert find_latest(tmp_path).step == 1


def test_a_state_json_without_what_the_resume_reads_is_skipped_by_auto_resume(tmp_path):
    save_full(tmp_path, 1)
    newer = save_full(tmp_path, 2)
    resume_reads = state_schema(frozenset(CONTENTS))
    for folder in (tmp_path / "1", newer):  # as a training run saves it
        state = {"step": 1, "trainer_steps": 1, "optimizer": {}, "data": {}, "world_size": 1}
        (folder / "state.json").write_text(json.dumps(state))
        resign(folder, "state.json")
    (newer / "state.json").write_text(json.dumps({"step": 2, "trainer_steps": 2, "data": {}}))
    resign(newer, "state.json")
    with pytest.raises(CheckpointError, match=rf"{newer}/state.json is not valid: the whole file lacks 'optimizer'"):
        CheckpointReader(newer).global_state(resume_reads)
    with pytest.warns(UserWarning, match=rf"skipping corrupt checkpoint {newer}: .*lacks 'optimizer'"):
        assert find_latest(tmp_path, check=lambda reader: reader.global_state(resume_reads)).step == 1


# -- safetensors files that safetensors itself would reject --------------------------------------------------------
def test_broken_safetensors_files_are_clear_errors_in_checkpoints(checkpoint, tmp_path):
    shard = checkpoint / SHARD
    pristine = shard.read_bytes()
    header, data = split_safetensors(shard)
    norm = json.dumps(header["model/norm.weight"])
    huge = dict(header, **{"model/norm.weight": dict(header["model/norm.weight"], shape=[2**40, 2**20])})
    cases = {
        "zero bytes": (b"", r"not a valid safetensors file: 0 bytes holding no 8-byte header size"),
        "huge tensor": (
            None,
            r"'model/norm.weight' \(F32 \[1099511627776, 1048576\], 4611686018427387904 bytes\) has data offsets",
        ),
        "duplicate key": (None, r"not valid JSON \(the key 'model/norm.weight' appears twice\)"),
    }
    for case, (content, message) in cases.items():
        if case == "huge tensor":
            write_safetensors(shard, json.dumps(huge).encode(), data)
        elif case == "duplicate key":
            text = json.dumps(header)
            write_safetensors(shard, (text[:-1] + f', "model/norm.weight": {norm}}}').encode(), data)
        else:
            shard.write_bytes(content)
        resign(checkpoint, SHARD)
        with pytest.raises(CheckpointError, match=message):
            load_everything(checkpoint)
    shard.write_bytes(pristine)


def test_a_shard_of_another_dtype_than_its_manifest_says_is_refused_not_converted(checkpoint):
    tensors = load_file(checkpoint / SHARD)
    tensors["model/embed.weight"] = tensors["model/embed.weight"].half()
    save_file(tensors, checkpoint / SHARD)
    resign(checkpoint, SHARD)
    with pytest.raises(
        CheckpointError,
        match=rf"{SHARD} does not hold model/embed.weight as its manifest says: float32 \[512, 128\] listed, "
        r"float16 \[512, 128\] in the file",
    ):
        load_everything(checkpoint)


# -- Hugging Face folders --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hf") / "model"
    write_hf_folder(folder)
    return folder


def read_all(folder: Path) -> None:
    reader = HFReader(folder)
    for name in reader.weight_map:
        reader.get(name)


def test_hugging_face_folders_stay_inside_and_hold_float_weights(hf_folder, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    names = list(load_file(folder / "model.safetensors"))
    weight_map = dict.fromkeys(names, "model.safetensors")
    weight_map[names[0]] = "../../elsewhere/model.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"weight_map\) names '../../elsewhere/model.safetensors': only files"):
        read_all(folder)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": names}))
    with pytest.raises(CheckpointError, match=r"index.json is not valid: weight_map must be an object"):
        read_all(folder)
    (folder / "model.safetensors.index.json").unlink()

    tensors = load_file(folder / "model.safetensors")
    save_file({name: (t * 1000).to(torch.int64) for name, t in tensors.items()}, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.safetensors: .* is stored as int64; model weights are floating"):
        read_all(folder)
    header, data = split_safetensors(hf_folder / "model.safetensors")
    text = json.dumps(header)
    first = next(name for name in header if name != "__metadata__")
    write_safetensors(
        folder / "model.safetensors", (text[:-1] + f', "{first}": {json.dumps(header[first])}}}').encode(), data
    )
    with pytest.raises(CheckpointError, match=r"appears twice"):
        read_all(folder)
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"0 bytes holding no 8-byte header size"):
        read_all(folder)


def test_a_hugging_face_folder_that_does_not_fit_is_a_checkpoint_error_of_the_run(hf_folder, tmp_path, fresh_context):
    """What the entry point reports as `pytrain: checkpoint error: ...` (exit 2), not a traceback."""
    corpus = tmp_path / "corpus"
    write_corpus(corpus, np.random.default_rng(0), seq_len=SEQ_LEN, vocab=VOCAB)
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.self_attn.k_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(3)
    save_file(tensors, folder / "model.safetensors")
    load = dict(load_ckpt_info=dict(path=str(folder), content=("model",), ckpt_type="hf"))
    with pytest.raises(CheckpointError, match=r"model.layers.0.self_attn.k_proj.weight: missing"):
        run_alone(config("one", "torch.float32", corpus, tmp_path, load, total_steps=1), corpus)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model.norm.weight: \[3\] in the folder, this model's norm.weight is"):
        run_alone(config("one", "torch.float32", corpus, tmp_path, load, total_steps=1), corpus)


# -- InternEvo folders and tokenized data -----------------------------------------------------------------------------
def test_an_internevo_file_linked_out_of_its_folder_is_refused(tmp_path):
    elsewhere, folder = tmp_path / "elsewhere.pt", tmp_path / "internevo"
    torch.save({"model.norm.weight": torch.ones(4)}, elsewhere)
    folder.mkdir()
    (folder / "model_tp0_pp0.pt").symlink_to(elsewhere)
    with pytest.raises(CheckpointError, match=rf"names 'model_tp0_pp0.pt', a link to {elsewhere} outside"):
        load_internlm_folder(folder, meta_model("internlm2"))


def write_meta(bin_path: Path, meta: np.ndarray) -> None:
    with open(str(bin_path) + ".meta", "wb") as f:  # np.save given a name would append ".npy"
        np.save(f, meta)


def test_a_meta_row_claiming_more_tokens_than_its_line_holds_is_refused_at_open(tmp_path):
    path = tmp_path / "a.bin"
    write_bin(path, [[1, 2, 3], [4, 5], [6]], meta_layout="int64x3")
    meta = np.load(str(path) + ".meta")
    meta[1, 1] = 2**62
    write_meta(path, meta)
    with pytest.raises(DataError, match=rf"a.bin.meta disagrees with a.bin at line 2: it claims {2**62} tokens, but"):
        open_folder(tmp_path)


# -- the property: mutated files give only the project's clear errors ---------------------------------------------
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def containers(value, found=None) -> list:
    """Every (container, key or index) of a JSON value."""
    found = [] if found is None else found
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        found.append((value, key))
        containers(inner, found)
    return found


def mutate(value, data) -> None:
    """Replaces, or deletes, one element anywhere in a JSON value (in place)."""
    container, key = data.draw(st.sampled_from(containers(value)))
    if isinstance(container, dict) and data.draw(st.booleans()):
        del container[key]
    else:
        container[key] = data.draw(JSON_VALUES)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return save_full(tmp_path_factory.mktemp("pristine"), 1)


PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@PROPERTY
@given(data=st.data())
def test_mutated_manifests_and_headers_give_only_checkpoint_errors(pristine, data):
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "1"
        shutil.copytree(pristine, folder)
        if data.draw(st.booleans()):
            rewrite_manifest(folder, lambda manifest: mutate(manifest, data))
        else:
            name = data.draw(st.sampled_from([SHARD, "optim-r00000.safetensors"]))
            header, tensors = split_safetensors(folder / name)
            mutate(header, data)
            write_safetensors(folder / name, json.dumps(header).encode(), tensors)
            resign(folder, name)
        with contextlib.suppress(CheckpointError):
            load_everything(folder)


@PROPERTY
@given(data=st.data())
def test_mutated_hugging_face_headers_give_only_checkpoint_errors(hf_folder, data):
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        shutil.copy(hf_folder / "config.json", folder)
        header, tensors = split_safetensors(hf_folder / "model.safetensors")
        mutate(header, data)
        write_safetensors(folder / "model.safetensors", json.dumps(header).encode(), tensors)
        with contextlib.suppress(CheckpointError):
            read_all(folder)


META_ROWS = st.lists(st.tuples(st.integers(-(2**40), 2**63 - 1), st.integers(-(2**40), 2**63 - 1)), max_size=4)


@PROPERTY
@given(rows=META_ROWS, raw=st.none() | st.binary(max_size=64))
def test_mutated_meta_files_give_only_data_errors(rows, raw):
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "a.bin"
        write_bin(path, [[1, 2, 3], [40, 50], [600]], meta_layout="int64x3")
        if raw is not None:
            Path(str(path) + ".meta").write_bytes(raw)
        else:
            write_meta(path, np.array(rows, dtype=np.int64).reshape(-1, 2))
        with contextlib.suppress(DataError):
            files, _ = open_folder(scratch)
            reader = SampleReader(files, vocab_size=1000)
            for line in range(len(files[0].offsets)):
                reader.read(0, line)


# -- two runs, one save folder; run folders; SIGTERM in start-up ---------------------------------------------------
HOLD_LOCK = r"""
import sys, time
from pathlib import Path
from pytrain.checkpoint import SaveFolderLock
lock = SaveFolderLock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(600)
"""


@pytest.mark.slow  # a helper process and a whole run: about 12 s on 2 cores
def test_a_second_run_on_a_locked_save_folder_stops_before_step_1_and_a_dead_runs_lock_does_not_block(tmp_path):
    cfg, folder = write_run_config(tmp_path, steps=1, every=1)
    folder.mkdir()
    holder = subprocess.Popen([python(), "-c", HOLD_LOCK, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = train_process(cfg)
        assert second.returncode == 2, second.stdout + second.stderr
        assert (
            f"pytrain: checkpoint error: save folder {folder} is in use by another run (pid {holder.pid} on"
            in second.stdout
        )
        assert "Traceback" not in second.stderr
        assert [p.name for p in folder.iterdir()] == [".pytrain.lock"]  # nothing read or written
        with pytest.raises(CheckpointError, match="is in use by another run"):
            SaveFolderLock(folder)
    finally:
        holder.kill()  # dies holding the lock: the kernel drops it
        holder.wait()
    SaveFolderLock(folder).release()


def test_run_folders_are_created_exclusively(tmp_path, monkeypatch, fresh_context):
    """Two runs starting in the same second: each name is taken by creating it, never by looking first."""
    from pytrain.initialize.launch import _make_run_folder, launch

    cfg = config("one", "torch.float32", tmp_path, tmp_path, {})
    launch(cfg, rank=0, world_size=1, local_rank=0, init_method=None, backend="gloo", seed=1)
    monkeypatch.setattr("time.strftime", lambda _: "20250101-000000")
    monkeypatch.setattr(Path, "exists", lambda self: False)  # both runs looked before either created
    names = {_make_run_folder(cfg).name for _ in range(3)}
    assert names == {"20250101-000000", "20250101-000000-1", "20250101-000000-2"}


HANG_IN_RESUME = r"""
import sys, time
import pytrain.train.checkpointing as checkpointing

def hashing_a_huge_checkpoint(folder, check=None):
    print("resuming", flush=True)
    time.sleep(600)

checkpointing.find_latest = hashing_a_huge_checkpoint
from pytrain.train.__main__ import main
sys.exit(main(["--config", sys.argv[1]]))
"""


def test_sigterm_during_start_up_stops_the_run_at_once(tmp_path):
    cfg, folder = write_run_config(tmp_path, steps=2, every=1)
    folder.mkdir()  # auto_resume looks into it
    run = subprocess.Popen(
        [python(), "-c", HANG_IN_RESUME, str(cfg)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert run.stdout.readline().strip() == "resuming"
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=30)
    finally:
        run.kill()
    assert run.returncode == -signal.SIGTERM, err
    assert "Traceback" not in err and "finishing this step" not in err
    assert [p.name for p in folder.iterdir()] == [".pytrain.lock"]  # no step, no checkpoint
    SaveFolderLock(folder).release()  # the dead run's lock is gone


def test_mfu_stays_at_most_100_percent_and_a_low_peak_is_said_once(tmp_path):
    out = io.StringIO()
    monitor = StepMonitor(
        tmp_path, 3, 1000, 1e9, 1e-9, torch.device("cpu"), tensorboard=False, stream=out, peak_source="measured matmul"
    )
    metrics = [monitor.end_step(step, torch.tensor(1.0), 0.0, 1e-3, True) for step in (1, 2, 3)]
    monitor.close()
    assert all(0 < m["mfu"] <= 1.0 for m in metrics)
    assert out.getvalue().count("above the peak of 0.000 (measured matmul; a measurement taken while") == 1
