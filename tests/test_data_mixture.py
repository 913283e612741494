"""Weighted mixtures (data.dataset_weights) over tokenized, Megatron and streamed types: each type's share of the
tokens within the stated tolerance over any window, types that run out start their next pass alone, exact
resume, clear errors; and the per-type token counts and losses of the step metrics."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS
from hypothesis import given, settings
from hypothesis import strategies as st
from internlm_corpus import write_corpus
from test_data_megatron import write_megatron
from test_data_streaming import assert_same, interleave, run_until, texts, write_jsonl

from pytrain.data import DataError, build_train_loader
from pytrain.data.mixture import PlannedPacks
from pytrain.model import LMLoss, TypeLosses

SEQ_LEN, MICRO_BSZ = 8, 2


class Counted:
    """A component that only has a size: the plan never builds its packs."""

    stateful = False
    pack_tokens, seq_len, into_one, fingerprint, description = 16, 8, False, {}, "counted"


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.floats(0.001, 1.0), min_size=1, max_size=5),
    block=st.sampled_from([1, 2, 8]),
    start=st.integers(0, 500),
)
def test_every_window_holds_each_type_at_its_weight_within_two_blocks(weights, block, start):
    """Over any window of n consecutive packs (so of any N batches), type t has w_t n packs within 2 B
    (B: data.stream_shards for streamed types, else 1); the plan resumed from any block is the same plan."""
    plan = PlannedPacks([Counted() for _ in weights], weights, [str(i) for i in range(len(weights))])
    plan.block = block
    n = 1500
    lanes = list(plan.lanes(range(n), plan.start()))
    assert_shares_within_two_blocks(np.array([t for t, _ in lanes]), weights, block)
    for t in range(len(weights)):
        mine = [j for u, j in lanes if u == t]
        assert sorted(mine) == list(range(len(mine)))  # a type's packs are used in order, none twice
    g = start - start % block
    anchor = plan.anchor_at(g, plan.start())
    assert list(plan.lanes(range(g, n), anchor)) == lanes[g:]


def assert_shares_within_two_blocks(types: np.ndarray, weights, block: int) -> None:
    """types: the type of each pack in order. Over any window of n consecutive packs, type t has
    w_t n packs (w normalized) within 2 blocks."""
    shares = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    steps = np.arange(len(types) + 1)
    for t, w in enumerate(shares):
        excess = np.concatenate([[0], np.cumsum(types == t)]) - w * steps
        assert excess.max() - excess.min() < 2 * block  # bounds every window's excess or shortfall


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    write_corpus(root, np.random.default_rng(0), seq_len=SEQ_LEN, vocab=200)  # code/: 23 samples, en/: 28
    return root


def cfg(folder, **overrides):
    base = dict(
        seq_len=SEQ_LEN,
        micro_bsz=MICRO_BSZ,
        micro_num=2,
        total_steps=30,
        train_folder=str(folder),
        min_length=0,
        dataset_weights={"code": 0.75, "en": 0.25},
    )
    return {**base, **overrides}


def loader(folder, dp=1, rank=0, workers=0, **overrides):
    return build_train_loader(
        cfg(folder, **overrides),
        vocab_size=256,
        data_parallel_size=dp,
        data_parallel_rank=rank,
        seed=9,
        num_workers=workers,
    )


def type_tokens(batches, names):
    ids = torch.cat([b["type_ids"].flatten() for b in batches])
    return {name: int((ids == t).sum()) for t, name in enumerate(names)}


def test_a_tokenized_mixture_keeps_its_weights_and_reshuffles_a_type_that_runs_out(tokenized):
    stream, names = loader(tokenized, total_steps=60)
    batches = list(stream)
    counts = type_tokens(batches, names)
    total = sum(counts.values())
    assert total == 60 * 2 * SEQ_LEN * MICRO_BSZ
    assert abs(counts["code"] - 0.75 * total) <= 2 * SEQ_LEN * MICRO_BSZ  # 2 blocks of one pack
    en = stream.source.components[names.index("en")].packs.num_packs
    packs = [
        (tuple(p.tolist()), int(t[0]))
        for b in batches
        for p, t in zip(b["input_ids"].flatten(1), b["type_ids"].flatten(1))
    ]
    en_packs = [p for p, t in packs if t == names.index("en")]
    assert len(en_packs) >= 2 * en  # en runs out and starts its next pass while code goes on
    first, second = en_packs[:en], en_packs[en : 2 * en]
    assert len(set(first)) == en and set(first) == set(second) and first != second  # each pass: all, reshuffled
    unweighted, _ = loader(tokenized, dataset_weights=None, total_steps=3)
    assert unweighted.source.fingerprint["kind"] == "tokenized"  # no weights: the indexed path as before


@pytest.mark.parametrize("workers", [0, 2])
def test_mixture_resume_is_exact_also_under_another_data_parallel_size(tokenized, workers):
    whole = list(loader(tokenized, micro_num=4)[0])
    first, _ = loader(tokenized, micro_num=4, workers=workers)
    _, state = run_until(first, 11)
    again, _ = loader(tokenized, micro_num=4, workers=workers)
    again.load_state_dict(json.loads(json.dumps(state)))
    assert_same(list(again), whole[11:])
    ranks = []
    for r in range(2):
        rank, _ = loader(tokenized, dp=2, rank=r, micro_num=2)
        rank.load_state_dict(state)
        ranks.append(list(rank))
    keys = ("input_ids", "labels", "positions", "type_ids")
    assert_same(interleave(ranks), [{k: b[k] for k in keys} for b in whole[11:]])


def test_megatron_and_streamed_mixtures(tmp_path):
    rng = np.random.default_rng(3)
    for name, count in (("web", 20), ("books", 6)):
        docs = [[rng.integers(0, 200, int(rng.integers(1, 20))).tolist()] for _ in range(count)]
        write_megatron(tmp_path / "megatron" / name / "part", docs)
        write_jsonl(tmp_path / "text" / name / "part.jsonl", [{"text": t} for t in texts(rng, 4 * count, longest=12)])
    weights = {"web": 0.5, "books": 0.5}
    megatron, names = loader(tmp_path / "megatron", type="megatron", dataset_weights=weights, total_steps=20)
    counts = type_tokens(list(megatron), names)
    assert names == ["books", "web"] and counts["books"] == counts["web"]
    streamed_cfg = dict(type="streaming", tokenizer_path="byte", stream_shards=2, shuffle_buffer=4)
    whole = list(loader(tmp_path / "text", **streamed_cfg, dataset_weights=weights, total_steps=20)[0])
    counts = type_tokens(whole, names)
    assert abs(counts["books"] - counts["web"]) <= 2 * 2 * SEQ_LEN * MICRO_BSZ  # within 2 blocks of 2 packs
    first, _ = loader(tmp_path / "text", **streamed_cfg, dataset_weights=weights, total_steps=20, workers=2)
    _, state = run_until(first, 7)
    assert {key.split("/")[0] for key in state["plan"]["shards"]} == {"0", "1"}  # both types' shards
    again, _ = loader(tmp_path / "text", **streamed_cfg, dataset_weights=weights, total_steps=20)
    again.load_state_dict(state)
    assert_same(list(again), whole[7:])


def test_weights_must_name_the_types(tokenized):
    with pytest.raises(DataError, match=r"names 'math', not a dataset type of the data; .*are 'code', 'en'"):
        loader(tokenized, dataset_weights={"code": 0.5, "en": 0.4, "math": 0.1})
    with pytest.raises(DataError, match=r"has no weight for 'en'; .*give each a weight \(0: left out\)"):
        loader(tokenized, dataset_weights={"code": 1.0})
    only_code, names = loader(tokenized, dataset_weights={"code": 1.0, "en": 0}, total_steps=4)
    assert type_tokens(list(only_code), names)["en"] == 0


def test_per_type_loss_sums_equal_cross_entropy_grouped_by_type():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 12, 30, generator=generator)
    labels = torch.randint(0, 30, (2, 12), generator=generator)
    labels[0, 3] = labels[1, 7] = -100
    type_ids = torch.randint(0, 3, (2, 12), generator=generator)
    type_ids[:, :2] = 2
    criterion = LMLoss()
    sums = TypeLosses(3, "cpu")
    mean = criterion(logits, labels, type_ids=type_ids, type_losses=sums)
    assert torch.equal(mean, criterion(logits, labels))  # the step's loss is unchanged, bit for bit
    per_token = F.cross_entropy(logits.reshape(-1, 30), labels.reshape(-1), reduction="none")
    for t in range(3):
        mine = (type_ids.reshape(-1) == t) & (labels.reshape(-1) != -100)
        torch.testing.assert_close(sums.sums[t], per_token[mine].sum(), rtol=1e-5, atol=1e-5)
        assert sums.counts[t] == mine.sum()


def test_the_step_metrics_hold_tokens_and_loss_per_type(tokenized, tmp_path, fresh_context):
    from pytrain.train.__main__ import main

    overrides = [
        f"data.train_folder={tokenized}",
        "data.dataset_weights={'code': 0.75, 'en': 0.25}",
        f"data.seq_len={SEQ_LEN}",
        f"data.micro_bsz={MICRO_BSZ}",
        "data.micro_num=2",
        "data.total_steps=3",
        "data.valid_folder=None",
        "model.num_layers=1",
        "model.hidden_size=32",
        "model.num_attention_heads=2",
        "monitor.tensorboard.enable=False",
        f"monitor.run_folder={tmp_path}",
    ]
    assert main(["--config", str(CONFIGS / "tiny_tokenized.py"), "--set", *overrides]) == 0
    (metrics,) = tmp_path.glob("*/*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert len(rows) == 3
    for row in rows:
        assert row["tokens/code"] + row["tokens/en"] == 2 * SEQ_LEN * MICRO_BSZ  # micro_num x micro_bsz x seq_len
        assert {"loss/code", "loss/en"} & set(row)
    code = sum(r["tokens/code"] for r in rows) / sum(r["tokens/code"] + r["tokens/en"] for r in rows)
    assert abs(code - 0.75) <= 2 / 6  # 6 packs: within 2 of 4.5
    pure = [row for row in rows if row["tokens/en"] == 0]  # the plan's steps: code+code, en+code, code+code
    assert len(pure) == 2 and "loss/en" not in pure[0]
    for row in pure:  # a step of one type: its loss is the step's loss
        assert row["loss/code"] == pytest.approx(row["loss"], rel=1e-5)
    assert rows[1]["tokens/en"] == SEQ_LEN * MICRO_BSZ and 0 < rows[1]["loss/en"] < 10


RUN_CONFIG = """
model_type = "INTERNLM"
model = dict(num_layers=2, hidden_size=32, num_attention_heads=2, vocab_size=256, multiple_of=32, dtype="torch.float32")
data = dict({data}, seq_len=16, micro_num={micro_num}, micro_bsz=2, total_steps=6, min_length=0, stream_shards=4,
            shuffle_buffer=16)
adam = dict(lr=1e-3)
parallel = dict(pipeline=dict(size={pipeline}), zero1=dict(size=-1))
monitor = dict(run_folder={runs!r}, tensorboard=dict(enable=False))
ckpt = dict(enable_save_ckpt=True, save_ckpt_folder={folder!r}, checkpoint_every=3)
"""


def run_job(root, name, data, folder, world, pipeline=1):
    """`python -m pytrain.train` (under torchrun when world > 1) on 4 micro-batches a step, with `data` (the data
    section's fields that say what to read); its metrics rows."""
    import subprocess
    import sys

    from conftest import ROOT

    path, runs = root / f"{name}.py", root / f"runs-{name}"
    data_parallel = world // pipeline
    config = RUN_CONFIG.format(
        data=data, micro_num=4 // data_parallel, pipeline=pipeline, runs=str(runs), folder=str(folder)
    )
    path.write_text(config)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"] if world > 1 else []
    done = subprocess.run(
        [sys.executable, *launcher, "-m", "pytrain.train", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (metrics,) = runs.glob("*/*/metrics.jsonl")
    return {row["step"]: row for row in map(json.loads, metrics.read_text().splitlines())}


def check_layouts_train_alike_and_dp2_resumes_in_one_process(root, data, layouts):
    """Six steps in one process, then under each (name, world, pipeline) layout, of which "dp2" must be one: the
    per-type metrics and losses equal one process's, and dp2's checkpoint at step 3 (both ranks' shard states)
    continues in one process with the straight run's losses."""
    import shutil

    one = run_job(root, "one", data, root / "ckpt-one", world=1)
    assert sorted(one) == [1, 2, 3, 4, 5, 6]
    for name, world, pipeline in layouts:
        rows = run_job(root, name, data, root / f"ckpt-{name}", world=world, pipeline=pipeline)
        for step, row in one.items():
            keys = [k for k in row if k.startswith(("tokens/", "loss/")) or k == "loss"]
            assert keys and set(keys) <= set(rows[step]), (name, step)
            for key in keys:
                assert rows[step][key] == pytest.approx(row[key], rel=1e-5), (name, step, key)
    folder = root / "ckpt-resumed"
    shutil.copytree(root / "ckpt-dp2" / "3", folder / "3")
    resumed = run_job(root, "resumed", data, folder, world=1)
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == pytest.approx(one[step]["loss"], rel=1e-5)


@pytest.mark.slow  # four training runs, three under torchrun (~80 s on 2 cores)
def test_streamed_mixture_trains_the_same_under_dp2_and_pp2_and_resumes_dp2_to_one_process(tmp_path):
    """A streamed, weighted run: the per-type metrics and losses of dp2 and pp2 equal one process's, and the
    dp2 checkpoint (both ranks' shard states) continues in one process with the straight run's losses."""
    rng = np.random.default_rng(4)
    for name in ("books", "web"):
        write_jsonl(tmp_path / "text" / name / "part.jsonl", [{"text": t} for t in texts(rng, 60, longest=12)])
    data = (
        f'type="streaming", tokenizer_path="byte", add_bos_eos="none", train_folder={str(tmp_path / "text")!r}, '
        "dataset_weights=dict(books=0.5, web=0.5)"
    )
    check_layouts_train_alike_and_dp2_resumes_in_one_process(tmp_path, data, [("dp2", 2, 1), ("pp2", 2, 2)])
