"""The training loader over InternLM tokenized folders against the slow reference packer in internlm_corpus.py:
rows element for element, data-parallel slices, epochs, rampup, skip_batches and exact resume."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from internlm_corpus import (
    assert_batch_equals,
    reference_batches,
    reference_packs,
    stream_of,
    write_bin,
    write_corpus,
)

from pytrain.data import DummyDataset, build_train_loader
from pytrain.data.loader import TrainLoader, parse_rampup, parse_skip_batches
from pytrain.data.packing import PackSource, dummy_packs

SEQ_LEN, MICRO_BSZ, SEED = 16, 2, 7


def data_cfg(folder, **overrides):
    cfg = dict(
        seq_len=SEQ_LEN,
        micro_num=3,
        micro_bsz=MICRO_BSZ,
        total_steps=12,
        train_folder=str(folder),
        pack_sample_into_one=False,
        min_length=0,
        skip_batches="",
        rampup_batch_size="",
        cache_folder="unused",
    )
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    files = write_corpus(root, np.random.default_rng(0), seq_len=SEQ_LEN)
    return root, files


def loader_for(root, dp=1, rank=0, workers=0, **overrides):
    return build_train_loader(
        data_cfg(root, **overrides),
        vocab_size=500,
        data_parallel_size=dp,
        data_parallel_rank=rank,
        seed=SEED,
        device_type="cpu",
        num_workers=workers,
    )


@pytest.mark.parametrize("into_one", [False, True], ids=["cut", "into-one"])
@pytest.mark.parametrize("min_length", [0, 10])
@pytest.mark.parametrize("dp, rank", [(1, 0), (2, 1)])
def test_rows_equal_the_reference_packer(corpus, into_one, min_length, dp, rank):
    root, files = corpus
    cfg = dict(pack_sample_into_one=into_one, min_length=min_length, micro_num=2, total_steps=15)
    loader, types = loader_for(root, dp, rank, **cfg)
    assert types == ["code", "en"]
    packs = reference_packs(stream_of(files, min_length, SEED), SEQ_LEN, MICRO_BSZ, into_one)
    expected = reference_batches(packs, micro_num=2, dp=dp, rank=rank, total_steps=15, seed=SEED)
    assert 15 * 2 * dp > len(packs)  # the run crosses at least one epoch boundary
    got = list(loader)
    assert len(got) == len(expected) == 15
    for batch, (_, ref) in zip(got, expected):
        assert_batch_equals(batch, ref, SEQ_LEN)
    assert {k for b in got for k in b} >= {"input_ids", "labels", "positions", "type_ids"}


def test_internlm_documented_example(tmp_path):
    """The reference's worked example (L=4, micro_bsz=2; stream A, C, B) element for element."""
    A, B, C = [11, 12, 13], [21, 22], list(range(31, 42))
    perm = np.random.default_rng(SEED).permutation(3)  # stream[i] = file line perm[i]
    lines = [None] * 3
    for sample, line in zip((A, C, B), perm):
        lines[line] = sample
    write_bin(tmp_path / "en" / "x.bin", lines)
    cfg = dict(seq_len=4, micro_bsz=2, micro_num=1, total_steps=2, min_length=0, train_folder=str(tmp_path))
    loader, _ = build_train_loader(cfg, vocab_size=100, seed=SEED)
    order = np.random.default_rng((SEED, 0)).permutation(2)
    batches = dict(zip(order.tolist(), loader))
    pack0, pack1 = batches[0], batches[1]
    assert pack0["input_ids"].flatten().tolist() == [11, 12, 13, 31, 32, 33, 34, 35]
    assert pack0["cu_seqlens"].tolist() == [[0, 3, 7, 8]] and pack0["max_seqlen"].tolist() == [4]
    assert pack0["positions"].flatten().tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert pack0["labels"].flatten().tolist() == [12, 13, -100, 32, 33, 34, 35, 36]
    assert pack1["input_ids"].flatten().tolist() == [36, 37, 38, 39, 40, 41, 21, 22]
    assert pack1["cu_seqlens"].tolist() == [[0, 4, 6, 8]]
    assert pack1["positions"].flatten().tolist() == [0, 1, 2, 3, 0, 1, 0, 1]
    assert pack1["labels"].flatten().tolist() == [37, 38, 39, 40, 41, -100, 22, -100]
    loader, _ = build_train_loader(dict(cfg, pack_sample_into_one=True), vocab_size=100, seed=SEED)
    batches = dict(zip(order.tolist(), loader))
    assert batches[0]["labels"].flatten().tolist() == [12, 13, -100, 32, 33, 34, 35, -100]
    assert batches[0]["positions"].flatten().tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    assert "cu_seqlens" not in batches[0]


def test_negative_ids_are_inputs_without_loss(tmp_path):
    write_bin(tmp_path / "a.bin", [[5, -6, -7, 8]])
    cfg = dict(seq_len=4, micro_bsz=1, micro_num=1, total_steps=1, train_folder=str(tmp_path))
    (batch,) = build_train_loader(cfg, vocab_size=10, seed=0)[0]
    assert batch["input_ids"].flatten().tolist() == [5, 6, 7, 8]
    assert batch["labels"].flatten().tolist() == [-100, -100, 8, -100]


@pytest.mark.parametrize("dp", [2, 3])
def test_union_over_ranks_equals_one_rank(corpus, dp):
    root, _ = corpus
    one = list(loader_for(root, 1, 0, micro_num=2 * dp, total_steps=9)[0])
    ranks = [list(loader_for(root, dp, r, micro_num=2, total_steps=9)[0]) for r in range(dp)]
    for step, whole in enumerate(one):
        for key in whole:
            if key == "cu_seqlens":  # padded per rank to its own widest pack
                continue
            torch.testing.assert_close(torch.cat([r[step][key] for r in ranks]), whole[key], rtol=0, atol=0)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("k", [1, 4, 7])  # 7: the resumed run starts right at an epoch boundary
def test_resume_continues_the_stream_exactly(corpus, workers, k):
    root, _ = corpus
    full = list(loader_for(root, micro_num=3, total_steps=14)[0])
    first, _ = loader_for(root, micro_num=3, total_steps=14, workers=workers)
    state = None
    for step, _batch in enumerate(first, start=1):
        if step == k:
            state = first.state_dict()  # workers have prefetched ahead by now; the state must not move
        if step == k + 3:
            break
    assert state["step"] == k and first.state_dict()["step"] == k + 3
    again, _ = loader_for(root, micro_num=3, total_steps=14, workers=workers)
    again.load_state_dict(state)
    assert len(again) == 14 - k
    rest = list(again)
    assert len(rest) == 14 - k
    for got, want in zip(rest, full[k:]):
        for key in want:
            assert torch.equal(got[key], want[key]), key
    assert again.state_dict()["step"] == 14 and again.state_dict()["epoch"] >= 1


def test_epochs_reshuffle_and_state_counts(corpus):
    root, files = corpus
    loader, _ = loader_for(root, micro_num=2, total_steps=40)
    packs = reference_packs(stream_of(files, 0, SEED), SEQ_LEN, MICRO_BSZ, False)
    per_epoch = len(packs) // 2
    batches = list(loader)
    first = [b["input_ids"] for b in batches[:per_epoch]]
    second = [b["input_ids"] for b in batches[per_epoch : 2 * per_epoch]]
    assert any(not torch.equal(a, b) for a, b in zip(first, second))
    state = loader.state_dict()
    assert state["epoch"] == 40 // per_epoch - (40 % per_epoch == 0)
    assert state["consumed_samples"] == 80 and state["consumed_tokens"] == 80 * SEQ_LEN * MICRO_BSZ


def test_resume_under_another_data_parallel_size(corpus):
    root, _ = corpus
    whole = list(loader_for(root, 1, 0, micro_num=4, total_steps=10)[0])
    ranks = [loader_for(root, 2, r, micro_num=2, total_steps=10)[0] for r in range(2)]
    iterators = [iter(r) for r in ranks]
    for _ in range(6):
        for it in iterators:
            next(it)
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()  # every rank's state is the same: any rank may save it
    resumed, _ = loader_for(root, 1, 0, micro_num=4, total_steps=10)
    resumed.load_state_dict(state)
    for got, want in zip(resumed, whole[6:]):
        assert torch.equal(got["input_ids"], want["input_ids"])


def test_rampup_grows_micro_num(corpus):
    root, files = corpus
    loader, _ = loader_for(root, 2, 1, micro_num=3, total_steps=8, rampup_batch_size="1 1 2")
    schedule = [1, 1, 2, 2, 3, 3, 3, 3]
    packs = reference_packs(stream_of(files, 0, SEED), SEQ_LEN, MICRO_BSZ, False)
    expected = reference_batches(
        packs, micro_num=3, dp=2, rank=1, total_steps=8, seed=SEED, micro_num_at=lambda b: schedule[b]
    )
    got = list(loader)
    assert [b["input_ids"].shape[0] for b in got] == schedule
    for batch, (_, ref) in zip(got, expected):
        assert_batch_equals(batch, ref, SEQ_LEN)
    assert [loader.micro_num_at(b) for b in range(8)] == schedule


def test_skip_batches_are_consumed_not_yielded(corpus):
    root, files = corpus
    loader, _ = loader_for(root, micro_num=2, total_steps=12, skip_batches="2-4,7,11-20")
    assert loader.skipped_batches == (2, 3, 4, 7, 11) and len(loader) == 7
    packs = reference_packs(stream_of(files, 0, SEED), SEQ_LEN, MICRO_BSZ, False)
    expected = reference_batches(packs, micro_num=2, dp=1, rank=0, total_steps=12, seed=SEED, skip={2, 3, 4, 7, 11})
    indices = []
    for batch, (index, ref) in zip(loader, expected):
        assert loader.batch_index == index
        indices.append(index)
        assert_batch_equals(batch, ref, SEQ_LEN)
    assert indices == [0, 1, 5, 6, 8, 9, 10]
    state = loader.state_dict()
    assert state["step"] == 12 and state["consumed_samples"] == 24
    assert state["consumed_tokens"] == 7 * 2 * SEQ_LEN * MICRO_BSZ


def test_schedule_strings():
    assert parse_skip_batches("") == [] and parse_skip_batches("1-3, 5") == [(1, 3), (5, 5)]
    assert parse_rampup("", 4) is None and parse_rampup("1 1 2", 4) == (1, 1, 2)
    for bad in ("3-1", "a", "1-3,2", "-4"):
        with pytest.raises(ValueError, match="is not a batch range"):
            parse_skip_batches(bad)
    for bad in ("1 1", "0 1 2", "5 1 1", "x y z"):
        with pytest.raises(ValueError, match="must be 'start increment every'"):
            parse_rampup(bad, 4)


def test_dummy_and_builtin_sources(tmp_path):
    cfg = dict(seq_len=8, micro_num=2, micro_bsz=3, total_steps=3, train_folder=None)
    loader, types = build_train_loader(cfg, vocab_size=50, data_parallel_size=2, data_parallel_rank=1, seed=3)
    assert types == ["dummy"]
    batches = list(loader)
    rows = DummyDataset(1000, 8, 50, seed=3)
    # batch b of rank 1 holds packs 4b+2, 4b+3: rows 3 * pack ..
    for b, batch in enumerate(batches):
        assert batch["input_ids"].shape == (2, 3, 8) and "cu_seqlens" not in batch
        want = torch.stack([rows[3 * (4 * b + 2) + i]["input_ids"] for i in range(6)]).view(2, 3, 8)
        assert torch.equal(batch["input_ids"], want)
        assert batch["positions"][1, 2].tolist() == list(range(8)) and not batch["type_ids"].any()
    stdlib = dict(cfg, train_folder="builtin:stdlib", cache_folder=str(tmp_path))
    loader, types = build_train_loader(stdlib, vocab_size=256, seed=3)
    assert types == ["stdlib"]
    (batch, *_) = list(loader)
    assert torch.equal(batch["input_ids"][:, :, 1:], batch["labels"][:, :, :-1])
    with pytest.raises(ValueError, match="byte-level"):
        build_train_loader(stdlib, vocab_size=100, seed=3)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    seq_len=st.integers(1, 9),
    micro_bsz=st.integers(1, 3),
    into_one=st.booleans(),
    min_length=st.integers(0, 5),
)
def test_packing_property(tmp_path_factory, lengths, seq_len, micro_bsz, into_one, min_length):
    """Any corpus: every pack equals the reference; with cutting, segments never exceed seq_len and every
    non-ignored label is the next token of the same sample."""
    rng = np.random.default_rng(len(lengths))
    samples = [rng.integers(-20, 20, n).tolist() for n in lengths]
    root = tmp_path_factory.mktemp("prop")
    write_bin(root / "t" / "x.bin", samples)
    files = {"t/x.bin": samples}
    packs = reference_packs(stream_of(files, min_length, SEED), seq_len, micro_bsz, into_one)
    cfg = dict(
        seq_len=seq_len,
        micro_bsz=micro_bsz,
        micro_num=1,
        total_steps=max(len(packs), 1),
        train_folder=str(root),
        min_length=min_length,
        pack_sample_into_one=into_one,
    )
    if not packs:
        with pytest.raises(ValueError, match="fewer than one global batch"):
            build_train_loader(cfg, vocab_size=21, seed=SEED)
        return
    loader, _ = build_train_loader(cfg, vocab_size=21, seed=SEED)
    order = np.random.default_rng((SEED, 0)).permutation(len(packs))
    for batch, k in zip(loader, order):
        assert_batch_equals(batch, [packs[k]], seq_len)
        if not into_one:
            assert int(batch["max_seqlen"][0]) <= seq_len


class CountingPacks:
    """A toy source written against the PackSource protocol only: pack k holds the tokens k*P .. k*P+P-1 as one
    document per row, each row's last label ignored."""

    shuffle = False
    description = "counting tokens"

    def __init__(self, num_packs: int, micro_bsz: int, seq_len: int):
        self.num_packs, self.seq_len, self.pack_tokens = num_packs, seq_len, micro_bsz * seq_len
        self.fingerprint = dict(kind="counting", num_packs=num_packs, pack_tokens=self.pack_tokens)

    def build_packs(self, pack_ids) -> dict:
        tokens = np.asarray(pack_ids, dtype=np.int64)[:, None] * self.pack_tokens + np.arange(self.pack_tokens)
        rows = tokens.reshape(len(pack_ids), -1, self.seq_len)
        labels = np.concatenate([rows[:, :, 1:], np.full((*rows.shape[:2], 1), -100)], axis=2)
        positions = np.broadcast_to(np.arange(self.seq_len), rows.shape)
        shape = tokens.shape
        return dict(
            input_ids=tokens,
            labels=labels.reshape(shape),
            positions=positions.reshape(shape),
            type_ids=np.zeros_like(tokens),
        )


def test_a_source_satisfying_the_pack_protocol_is_read_by_the_loader():
    """A new data format is a PackSource: the loader splits its packs over data-parallel ranks and resumes its
    stream by its fingerprint, as for the built-in sources (which satisfy the protocol too)."""
    source = CountingPacks(num_packs=8, micro_bsz=2, seq_len=4)
    assert isinstance(source, PackSource)
    assert isinstance(dummy_packs(micro_bsz=2, seq_len=4, vocab_size=10, seed=0), PackSource)

    def loader(source):
        return TrainLoader(source, micro_num=2, total_steps=3, data_parallel_size=2, data_parallel_rank=1, seed=0)

    stream = loader(source)
    batches = iter(stream)
    first = next(batches)
    after_first = stream.state_dict()
    second, third = batches
    # batch b of rank 1 holds packs 4b+2, 4b+3 of the (unshuffled) epoch; the third batch starts epoch 2
    assert first["input_ids"].flatten().tolist() == list(range(16, 32))
    assert second["input_ids"].flatten().tolist() == list(range(48, 64))
    assert torch.equal(third["input_ids"], first["input_ids"])
    assert first["labels"][0, 0].tolist() == [17, 18, 19, -100]
    resumed = loader(source)
    resumed.load_state_dict(after_first)
    assert [torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(resumed, [second, third])] == [True, True]
    with pytest.raises(ValueError, match=r"num_packs: 8 -> 10"):
        loader(CountingPacks(num_packs=10, micro_bsz=2, seq_len=4)).load_state_dict(after_first)
