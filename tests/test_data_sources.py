"""Named sources (data.sources): a tokenized folder, Megatron .bin/.idx pairs and streamed jsonl, each in its own
place, mixed in one weighted run. Each source's share of the packs is within the mixture's tolerance over every
window, each source's packs are exactly those it gives alone (in order, across its passes), resume is exact
mid-pass and under another data-parallel size, a short training run reports per-source metrics, and bad
sources are ConfigErrors naming the field. Also: a hub name fails at once offline, and with a bounded wait
where the network does not answer."""

import json
import re
import socket
import time

import numpy as np
import pytest
import torch
from conftest import CONFIGS
from internlm_corpus import random_samples, write_bin
from test_data_megatron import random_documents, write_megatron
from test_data_mixture import assert_shares_within_two_blocks, check_layouts_train_alike_and_dp2_resumes_in_one_process
from test_data_streaming import assert_same, interleave, run_until, texts, write_jsonl

from pytrain.config import Config, ConfigError
from pytrain.data import DataError, build_train_loader, streaming

SEQ_LEN, MICRO_BSZ, SHARDS = 8, 2, 2
WEIGHTS = {"en": 0.5, "code": 0.3, "math": 0.2}


def write_sources(root, scale=1):
    """A tokenized folder, Megatron pairs and a jsonl folder; at scale 1 each runs out (and starts its next pass)
    within 40 steps of the mixture."""
    rng = np.random.default_rng(0)
    write_bin(root / "en" / "a.bin", random_samples(rng, 12 * scale, 2 * SEQ_LEN, 200))
    write_bin(root / "en" / "web" / "b.bin", random_samples(rng, 8 * scale, SEQ_LEN, 200))  # a subfolder: still 'en'
    write_megatron(root / "code" / "part", random_documents(rng, 10 * scale, 12, 200))
    write_jsonl(root / "math" / "a.jsonl", [{"text": t} for t in texts(rng, 16 * scale, longest=6)])
    return dict(
        en=dict(type="tokenized", train_folder=str(root / "en")),
        code=dict(type="megatron", train_folder=str(root / "code")),
        math=dict(type="streaming", train_folder=str(root / "math"), tokenizer_path="byte", add_bos_eos="none"),
    )


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_sources(tmp_path_factory.mktemp("sources"))


def cfg(sources, **overrides):
    base = dict(
        seq_len=SEQ_LEN,
        micro_bsz=MICRO_BSZ,
        micro_num=2,
        total_steps=40,
        min_length=0,
        stream_shards=SHARDS,
        shuffle_buffer=4,
        sources=sources,
        dataset_weights=WEIGHTS,
    )
    return {**base, **overrides}


def loader(sources, dp=1, rank=0, workers=0, **overrides):
    return build_train_loader(
        cfg(sources, **overrides),
        vocab_size=256,
        data_parallel_size=dp,
        data_parallel_rank=rank,
        seed=3,
        num_workers=workers,
    )


def packs_of(batches):
    """Every micro-batch (pack) of the batches in order: (its source's type id, what the model gets of it)."""
    packs = []
    for batch in batches:
        for i, types in enumerate(batch["type_ids"]):
            assert (types == types.flatten()[0]).all()  # a pack holds one source
            content = [batch[key][i] for key in ("input_ids", "labels", "positions")]
            packs.append((int(types.flatten()[0]), [*content, torch.unique_consecutive(batch["cu_seqlens"][i])]))
    return packs


def test_each_source_keeps_its_weight_and_gives_the_packs_it_gives_alone(sources):
    stream, names = loader(sources)
    batches = list(stream)
    assert names == ["code", "en", "math"]  # the sorted names are the dataset types
    packs = packs_of(batches)
    assert len(packs) == 40 * 2
    types = np.array([t for t, _ in packs])
    assert_shares_within_two_blocks(types, [WEIGHTS[n] for n in names], block=SHARDS)
    for t, name in enumerate(names):
        mine = [content for u, content in packs if u == t]
        alone, alone_names = loader({name: sources[name]}, dataset_weights={name: 1.0}, total_steps=len(mine) // 2)
        assert alone_names == [name]
        expected = packs_of(list(alone))
        assert len(expected) == len(mine)
        for got, (_, want) in zip(mine, expected):
            for a, b in zip(got, want):
                assert torch.equal(a, b), name
    by_name = dict(zip(stream.source.names, stream.source.components))
    for name in ("en", "code"):  # both ran out and started their next pass while the others went on
        assert (types == names.index(name)).sum() > by_name[name].packs.num_packs
    shards = stream.state_dict()["plan"]["shards"]
    assert max(state["pass_"] for state in shards.values()) >= 1  # so did a shard of the streamed source


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_exact_mid_pass_and_under_two_data_parallel_ranks(sources, workers):
    whole = list(loader(sources, total_steps=24)[0])
    first, _ = loader(sources, total_steps=24, workers=workers)
    _, state = run_until(first, 11)
    again, _ = loader(sources, total_steps=24, workers=workers)
    again.load_state_dict(json.loads(json.dumps(state)))  # what a checkpoint keeps: JSON values
    assert_same(list(again), whole[11:])
    ranks = []
    for r in range(2):
        rank, _ = loader(sources, dp=2, rank=r, micro_num=1, total_steps=24)
        rank.load_state_dict(state)
        ranks.append(list(rank))
    keys = ("input_ids", "labels", "positions", "type_ids")
    assert_same(interleave(ranks), [{k: b[k] for k in keys} for b in whole[11:]])


def test_resume_refuses_a_renamed_or_reordered_source(sources):
    first, _ = loader(sources)
    _, state = run_until(first, 3)
    renamed = {"maths" if name == "math" else name: spec for name, spec in sources.items()}
    weights = {"maths" if name == "math" else name: w for name, w in WEIGHTS.items()}
    for changed in (
        dict(sources=renamed, dataset_weights=weights),
        dict(dataset_weights=dict(reversed(WEIGHTS.items()))),
    ):
        again, _ = loader(**{"sources": sources, **changed})
        with pytest.raises(DataError, match=r"the training data differs from the checkpoint's \((components|weights)"):
            again.load_state_dict(state)


@pytest.mark.slow  # three training runs, one under torchrun (~60 s on 2 cores)
def test_named_sources_train_the_same_under_dp2_and_dp2_resumes_in_one_process(tmp_path):
    """`python -m pytrain.train` with the three sources: dp2's per-source tokens and losses equal one process's,
    and its checkpoint (the shards of the streamed source from both ranks) continues in one process exactly."""
    data = f"sources={write_sources(tmp_path, scale=4)!r}, dataset_weights={WEIGHTS!r}"
    check_layouts_train_alike_and_dp2_resumes_in_one_process(tmp_path, data, [("dp2", 2, 1)])


def test_a_source_folder_that_does_not_exist_names_the_source(sources, tmp_path):
    moved = {**sources, "code": {**sources["code"], "train_folder": str(tmp_path / "nowhere")}}
    with pytest.raises(DataError, match=r"data.sources\['code'\].train_folder='.*nowhere' does not exist"):
        loader(moved)


def test_training_on_named_sources_reports_each_source(sources, tmp_path, fresh_context):
    from pytrain.train.__main__ import main

    overrides = [
        "data.train_folder=None",
        "data.valid_folder=None",
        f"data.sources={sources!r}",
        f"data.dataset_weights={WEIGHTS!r}",
        f"data.seq_len={SEQ_LEN}",
        f"data.micro_bsz={MICRO_BSZ}",
        "data.micro_num=2",
        "data.total_steps=3",
        "data.min_length=0",
        f"data.stream_shards={SHARDS}",
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
        assert sum(row[f"tokens/{name}"] for name in WEIGHTS) == 2 * SEQ_LEN * MICRO_BSZ
    assert {name for row in rows for name in WEIGHTS if row[f"tokens/{name}"]} == set(WEIGHTS)  # all three train


@pytest.mark.parametrize(
    "edit, field, message",
    [
        (
            lambda d: d.update(dataset_weights={**WEIGHTS, "web": 0.1}),
            "data.dataset_weights",
            r"names 'web', not a source",
        ),
        (lambda d: d.update(dataset_weights={"en": 1.0}), "data.dataset_weights", r"has no weight for 'code', 'math'"),
        (lambda d: d.update(dataset_weights=None), "data.dataset_weights", r"give every source one, e.g. \{'en': 1.0"),
        (lambda d: d["sources"]["code"].update(type="parquet"), "data.sources['code'].type", r"must be one of 'tok"),
        (lambda d: d["sources"]["code"].pop("train_folder"), "data.sources['code'].train_folder", r"missing: set it"),
        (lambda d: d["sources"]["code"].update(folder="/x"), "data.sources['code'].folder", r"did you mean 'train_f"),
        (lambda d: d["sources"]["math"].pop("tokenizer_path"), "data.sources['math'].tokenizer_path", r"on the fly"),
        (lambda d: d.update(train_folder="/data"), "data.train_folder", r"'/data' and data.sources both name"),
    ],
    ids=[
        "weight-names-no-source",
        "source-without-weight",
        "no-weights",
        "unknown-type",
        "no-folder",
        "misspelt",
        "streamed-without-tokenizer",
        "with-train-folder",
    ],
)
def test_bad_sources_are_config_errors_naming_the_field(edit, field, message):
    data = dict(
        sources=dict(
            en=dict(type="tokenized", train_folder="/data/en"),
            code=dict(type="megatron", train_folder="/data/code"),
            math=dict(type="streaming", train_folder="/data/math", tokenizer_path="byte"),
        ),
        dataset_weights=WEIGHTS,
    )
    Config.from_dict({"data": data})  # valid as it is
    edit(data)
    with pytest.raises(ConfigError, match=f"^run\\.py: {re.escape(field)}[: ].*{message}"):
        Config.from_dict({"data": data}, source="run.py")


# -- hub names ---------------------------------------------------------------------------------------------------
def refuse_connections(monkeypatch):
    """The network layer: every connection attempt is recorded with its timeout and times out at once."""
    attempts = []

    def create_connection(address, timeout=None, *args, **kwargs):
        attempts.append((address, timeout))
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", create_connection)
    return attempts


def test_a_hub_name_offline_fails_at_once_saying_to_download_it(monkeypatch):
    attempts = refuse_connections(monkeypatch)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    data = cfg({"web": dict(type="streaming", train_folder="someone/some_corpus", tokenizer_path="byte")})
    with pytest.raises(DataError) as error:
        build_train_loader({**data, "dataset_weights": {"web": 1.0}}, vocab_size=256)
    assert attempts == []
    assert "data.sources['web'].train_folder='someone/some_corpus' is not a local folder" in str(error.value)
    assert "(HF_DATASETS_OFFLINE=1: offline): download it where the hub is reachable (hf download someone/" in str(
        error.value
    )


def test_a_hub_name_without_an_answering_network_fails_within_the_timeout(monkeypatch):
    """Offline settings unset: the hub is tried, every connection with a finite timeout, and the failure is an
    error naming the dataset and what to do (huggingface_hub's own requests have no timeout: they would hang)."""
    constants = pytest.importorskip("huggingface_hub.constants")  # from pytrain[data]

    for variable in streaming.OFFLINE_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # as read when it was imported
    attempts = refuse_connections(monkeypatch)
    start = time.perf_counter()
    with pytest.raises(DataError) as error:
        build_train_loader(
            {**cfg(None), "sources": None, "type": "streaming", "tokenizer_path": "byte", "train_folder": "someone/x"},
            vocab_size=256,
        )
    assert time.perf_counter() - start < 5
    assert attempts and all(timeout is not None and timeout <= streaming.HUB_TIMEOUT_S for _, timeout in attempts)
    message = str(error.value)
    assert "data.train_folder='someone/x' is not a local folder" in message and "Timeout" in message
    assert "hf download someone/x --repo-type dataset --local-dir DIR" in message
    assert "HF_DATASETS_OFFLINE=1 makes this error immediate" in message
