"""Streamed text (data.type="streaming"): tokenized on the fly, packed exactly as the pre-tokenized path packs,
read from jsonl / parquet / arrow / save_to_disk alike, resumed exactly (mid-pass, across passes, with 0 and 2
workers, and under another data-parallel size), and every bad record an error naming its file and line."""

import json

import numpy as np
import pytest
import torch

from pytrain.data import DataError, build_train_loader, build_valid_loaders, streaming
from pytrain.data.loader import folder_source
from pytrain.data.tokenize import main as tokenize_main

WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "漢字",
    "🙂",
]


def texts(rng, count, longest=40):
    return [" ".join(rng.choice(WORDS, int(rng.integers(1, longest)))) for _ in range(count)]


def write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two dataset types, four files, samples from 1 word to longer than a pack."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(0)
    for name in ("code/a.jsonl", "code/b.jsonl", "en/c.jsonl", "en/deep/d.jsonl"):
        write_jsonl(root / name, [{"text": t, "id": i} for i, t in enumerate(texts(rng, 12, longest=20))])
    return root


def cfg(folder, **overrides):
    base = dict(
        seq_len=16,
        micro_num=2,
        micro_bsz=2,
        total_steps=10,
        train_folder=str(folder),
        type="streaming",
        tokenizer_path="byte",
        add_bos_eos="none",
        min_length=0,
        stream_shards=4,
        shuffle_buffer=16,
    )
    return {**base, **overrides}


def loader(folder, dp=1, rank=0, workers=0, **overrides):
    return build_train_loader(
        cfg(folder, **overrides),
        vocab_size=256,
        data_parallel_size=dp,
        data_parallel_rank=rank,
        seed=5,
        num_workers=workers,
    )[0]


def assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in b:
            assert torch.equal(a[key], b[key]), key


def interleave(rank_batches):
    """The global batch of strided ranks: position i*dp + r is rank r's micro-batch i."""
    dp = len(rank_batches)
    out = []
    for batches in zip(*rank_batches):
        merged = {}
        for key in ("input_ids", "labels", "positions", "type_ids"):
            stacked = torch.stack([b[key] for b in batches], dim=1)  # (micro, dp, rows, seq)
            merged[key] = stacked.flatten(0, 1)
        out.append(merged)
    assert dp > 1
    return out


@pytest.mark.parametrize("into_one", [False, True], ids=["cut", "into-one"])
@pytest.mark.parametrize("tokenizer", ["byte", "sentencepiece"])
def test_streamed_packs_equal_the_pretokenized_path(tmp_path, monkeypatch, into_one, tokenizer):
    """The same texts and tokenizer, read in the same order: the streamed batches are the tokenized folder's
    packs in stream order, element for element (one shard, one chunk, blocks of one record: no shuffling)."""
    rng = np.random.default_rng(1)
    write_jsonl(tmp_path / "text" / "en" / "x.jsonl", [{"text": t} for t in texts(rng, 60)])
    spec, add = "byte", "none"
    if tokenizer == "sentencepiece":
        sentencepiece = pytest.importorskip("sentencepiece")
        (tmp_path / "train.txt").write_text("\n".join(texts(rng, 200)), encoding="utf-8")
        sentencepiece.SentencePieceTrainer.train(
            input=str(tmp_path / "train.txt"),
            model_prefix=str(tmp_path / "sp"),
            vocab_size=60,
            minloglevel=2,
            hard_vocab_limit=False,
            character_coverage=1.0,
        )
        spec, add = str(tmp_path / "sp.model"), "both"
    argv = ["--text_input_path", str(tmp_path / "text"), "--bin_output_path", str(tmp_path / "bin"), "--workers", "1"]
    assert tokenize_main([*argv, "--tokenizer", spec, "--add_bos_eos", add]) == 0
    settings = dict(seq_len=8, micro_bsz=2, micro_num=2, min_length=3, pack_sample_into_one=into_one, type="tokenized")
    packs, _ = folder_source(cfg(tmp_path / "bin", **settings), str(tmp_path / "bin"), vocab_size=256, seed=5)
    lines = (tmp_path / "text" / "en" / "x.jsonl").read_text(encoding="utf-8").splitlines()
    write_jsonl(tmp_path / "ordered" / "en" / "x.jsonl", [json.loads(lines[i]) for i in packs.line_of])
    monkeypatch.setattr(streaming, "CHUNKS_PER_SHARD", 1)
    steps = packs.num_packs // 2
    streamed = loader(
        tmp_path / "ordered",
        **{**settings, "type": "streaming"},
        tokenizer_path=spec,
        add_bos_eos=add,
        stream_shards=1,
        shuffle_buffer=1,
        total_steps=steps,
    )
    batches = list(streamed)
    assert len(batches) == steps >= 5
    for b, batch in enumerate(batches):
        want = packs.build_packs(range(2 * b, 2 * b + 2))
        for key in ("input_ids", "labels", "positions", "type_ids"):
            assert batch[key].flatten(1).tolist() == want[key].tolist(), key
        if not into_one:
            assert [c[c <= 16].unique().tolist() for c in batch["cu_seqlens"]] == [
                c.tolist() for c in want["cu_seqlens"]
            ]


def test_formats_read_the_same_records(tmp_path, monkeypatch):
    """jsonl, parquet and arrow files of the same records give the same batches."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.ipc
    import pyarrow.parquet

    records = [{"text": t, "n": i} for i, t in enumerate(texts(np.random.default_rng(2), 50))]
    write_jsonl(tmp_path / "jsonl" / "x.jsonl", records)
    table = pa.Table.from_pylist(records)
    (tmp_path / "parquet").mkdir()
    pyarrow.parquet.write_table(table, tmp_path / "parquet" / "x.parquet")
    (tmp_path / "arrow").mkdir()
    with pyarrow.ipc.new_stream(str(tmp_path / "arrow" / "x.arrow"), table.schema) as out:  # as `datasets` writes
        out.write_table(table, max_chunksize=7)
    monkeypatch.setattr(streaming, "CHUNKS_PER_SHARD", 1)
    settings = dict(stream_shards=1, shuffle_buffer=1, total_steps=6)
    want = list(loader(tmp_path / "jsonl", **settings))
    for folder in ("parquet", "arrow"):
        assert_same(list(loader(tmp_path / folder, **settings)), want)


@pytest.mark.slow  # importing `datasets` takes seconds; its .arrow files are read by the test above
def test_save_to_disk_folders_read_as_their_records(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    records = [{"text": t, "n": i} for i, t in enumerate(texts(np.random.default_rng(2), 50))]
    write_jsonl(tmp_path / "jsonl" / "x.jsonl", records)
    dataset = datasets.Dataset.from_list(records)
    dataset.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    monkeypatch.setattr(streaming, "CHUNKS_PER_SHARD", 1)
    settings = dict(stream_shards=1, shuffle_buffer=1, total_steps=6)
    want = list(loader(tmp_path / "jsonl", **settings))
    for folder in ("saved", "dict"):
        assert_same(list(loader(tmp_path / folder, **settings)), want)
    with pytest.raises(DataError, match=r"saved DatasetDict without split 'validation': set data.split"):
        loader(tmp_path / "dict", split="validation")


def run_until(stream, steps):
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == steps:
            return batches, stream.state_dict()
    raise AssertionError("the loader ended early")


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_mid_pass_and_across_passes(corpus, workers):
    full = list(loader(corpus, total_steps=40))
    passes = {s["pass_"] for s in loader_state_after(corpus, 40)["plan"]["shards"].values()}
    assert max(passes) >= 1  # the run crosses pass boundaries
    for k in (3, 23):
        first = loader(corpus, total_steps=40, workers=workers)
        _, state = run_until(first, k)
        again = loader(corpus, total_steps=40, workers=workers)
        again.load_state_dict(json.loads(json.dumps(state)))  # what a checkpoint keeps: JSON values
        assert_same(list(again), full[k:])


def loader_state_after(folder, steps):
    stream = loader(folder, total_steps=steps)
    list(stream)
    return stream.state_dict()


def test_data_parallel_size_changes_on_resume(corpus):
    """The global batch is the same whatever the data-parallel size (ranks take strided positions), and a dp1
    state resumes on two ranks, a two-rank state (both ranks' shards) on one."""
    whole = list(loader(corpus, micro_num=4, total_steps=12))
    ranks = [loader(corpus, dp=2, rank=r, micro_num=2, total_steps=12) for r in range(2)]
    assert_same(
        interleave([list(r) for r in ranks]),
        [{k: b[k] for k in ("input_ids", "labels", "positions", "type_ids")} for b in whole],
    )
    one = loader(corpus, micro_num=4, total_steps=12)
    _, state = run_until(one, 5)
    two = []
    for r in range(2):
        rank = loader(corpus, dp=2, rank=r, micro_num=2, total_steps=12)
        rank.load_state_dict(state)
        two.append(list(rank))
    rest = [{k: b[k] for k in ("input_ids", "labels", "positions", "type_ids")} for b in whole[5:]]
    assert_same(interleave(two), rest)
    ranks = [loader(corpus, dp=2, rank=r, micro_num=2, total_steps=12) for r in range(2)]
    states = [run_until(r, 7)[1] for r in ranks]
    assert set(states[0]["plan"]["shards"]).isdisjoint(states[1]["plan"]["shards"])  # each shard on one rank
    merged = {
        **states[0],
        "plan": {**states[0]["plan"], "shards": {**states[0]["plan"]["shards"], **states[1]["plan"]["shards"]}},
    }
    back = loader(corpus, micro_num=4, total_steps=12)
    back.load_state_dict(merged)
    assert_same(list(back), whole[7:])
    with pytest.raises(DataError, match=r"data.stream_shards=4 is not a multiple of the data-parallel size 3"):
        loader(corpus, dp=3, rank=0)


def test_validation_sets_stream_too(tmp_path):
    write_jsonl(tmp_path / "valid" / "en" / "a.jsonl", [{"text": "abc"}, {"text": "de"}])
    write_jsonl(tmp_path / "valid" / "code" / "b.jsonl", [{"text": "xyz!"}])
    data = dict(seq_len=4, micro_bsz=1, micro_num=1, valid_micro_num=1, valid_folder=str(tmp_path / "valid"))
    loaders = build_valid_loaders({**cfg(None), **data}, vocab_size=256)
    assert sorted(loaders) == ["code", "en"]
    assert [b["input_ids"].flatten().tolist() for b in loaders["en"]] == [[97, 98, 99, 0], [100, 101, 0, 0]]
    assert [b["input_ids"].flatten().tolist() for b in loaders["code"]] == [[120, 121, 122, 33]]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "ok"}\n{"text": "fine"}\n{oops\n', r"x\.jsonl line 3 is not JSON"),
        (
            '{"text": "ok"}\n{"body": "no text"}\n',
            r"x\.jsonl line 2 has no string field 'text' \(it has: 'body'\): set data\.text_key",
        ),
        ("", r"x\.jsonl is empty"),
        ('[{"text": "a"}]\n', r"x\.jsonl holds one JSON array: streaming reads JSON Lines"),
    ],
    ids=["malformed", "no-text-key", "empty", "json-array"],
)
def test_bad_records_name_file_and_line(tmp_path, workers, content, message):
    (tmp_path / "en").mkdir()
    (tmp_path / "en" / "x.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        list(loader(tmp_path, workers=workers, stream_shards=1, seq_len=2, micro_bsz=1, micro_num=1, total_steps=4))


def test_setup_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        DataError,
        match=r"'someone/some_corpus' is not a local folder, and as a Hugging Face Hub dataset it cannot be read",
    ):
        loader("someone/some_corpus")
    write_jsonl(tmp_path / "en" / "x.jsonl", [{"text": "abc"}])
    with pytest.raises(DataError, match=r"fewer chunks than data.stream_shards=64"):
        loader(tmp_path, stream_shards=64)
    with pytest.raises(DataError, match=r"stream shard 0 of 1 .* holds less than one pack of 4 tokens"):
        list(loader(tmp_path, stream_shards=1, seq_len=4, micro_bsz=1, micro_num=1))
    with pytest.raises(DataError, match=r"data.add_bos_eos='both' needs a BOS id, and the tokenizer defines none"):
        loader(tmp_path, add_bos_eos="both")
    with pytest.raises(DataError, match=r"data.tokenizer_path 'nope.model' does not exist"):
        loader(tmp_path, tokenizer_path="nope.model")
    with pytest.raises(DataError, match=r"has 256 tokens, more than model.vocab_size=100"):
        build_train_loader(cfg(tmp_path), vocab_size=100)


def gather_worker(rank, world, init_method, corpus, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        stream = loader(corpus, dp=2, rank=rank, micro_num=2, total_steps=12)
        run_until(stream, 6)
        state = stream.state_dict()  # collective: every rank gets every rank's shards
        (out / f"state{rank}.json").write_text(json.dumps(state))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes under gloo (~10 s); the resume rule itself is checked in one process above
def test_state_dict_gathers_every_ranks_shards_under_torch_distributed(corpus, tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(gather_worker, args=(2, f"file://{tmp_path}/rendezvous", corpus, tmp_path), nprocs=2, join=True)
    states = [json.loads((tmp_path / f"state{r}.json").read_text()) for r in range(2)]
    assert states[0] == states[1] and len(states[0]["plan"]["shards"]) == 4
    whole = list(loader(corpus, micro_num=4, total_steps=12))
    resumed = loader(corpus, micro_num=4, total_steps=12)
    resumed.load_state_dict(states[0])
    assert_same(list(resumed), whole[6:])
