import functools
import operator

import numpy as np
import pytest
import torch

from pytrain.data import DummyDataset, StepBatchSampler, TokenWindowDataset, collate_micro_batches, load_stdlib_corpus
from pytrain.data.stdlib_corpus import stdlib_sources


def test_dummy_dataset_is_deterministic_and_in_vocab():
    a, b = DummyDataset(10, 16, 50, seed=3), DummyDataset(10, 16, 50, seed=3)
    assert torch.equal(a[4]["input_ids"], b[4]["input_ids"])
    assert not torch.equal(a[4]["input_ids"], a[5]["input_ids"])
    assert torch.equal(a[4]["input_ids"][1:], a[4]["labels"][:-1])
    assert a[4]["input_ids"].max() < 50 and len(a) == 10


def test_token_windows_shift_labels():
    ds = TokenWindowDataset(np.arange(25, dtype=np.uint8), seq_len=8)
    assert len(ds) == 3
    assert ds[1]["input_ids"].tolist() == list(range(8, 16)) and ds[1]["labels"].tolist() == list(range(9, 17))
    with pytest.raises(ValueError, match="fewer than one sample"):
        TokenWindowDataset(np.arange(5, dtype=np.uint8), seq_len=8)


@pytest.mark.parametrize("data_parallel_size", [1, 2, 4])
def test_sampler_union_over_ranks_is_independent_of_data_parallel_size(data_parallel_size):
    def global_batches(dp):
        per_rank = 8 // dp
        samplers = [iter(StepBatchSampler(50, per_rank, dp, r, total_steps=12, seed=5)) for r in range(dp)]
        return [functools.reduce(operator.iadd, (next(s) for s in samplers), []) for _ in range(12)]

    assert global_batches(data_parallel_size) == global_batches(1)


def test_sampler_epochs_reshuffle_and_cover():
    sampler = StepBatchSampler(20, 5, 2, 0, total_steps=4, seed=0)
    other = StepBatchSampler(20, 5, 2, 1, total_steps=4, seed=0)
    steps = list(zip(sampler, other))
    assert len(steps) == 4 and len(sampler) == 0
    epoch0 = sorted(steps[0][0] + steps[0][1] + steps[1][0] + steps[1][1])
    assert epoch0 == list(range(20))
    assert steps[0] != steps[2]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepBatchSampler(9, 5, 2, 0, total_steps=1)


def test_collate_shapes():
    samples = [{"input_ids": torch.arange(4), "labels": torch.arange(4)} for _ in range(6)]
    batch = collate_micro_batches(samples, micro_num=3)
    assert batch["input_ids"].shape == (3, 2, 4) and batch["labels"].shape == (3, 2, 4)


def test_stdlib_corpus_is_built_once_and_cached(tmp_path):
    tokens = load_stdlib_corpus(tmp_path, show_progress=False)
    files = list(tmp_path.glob("stdlib-corpus-*.npy"))
    assert len(files) == 1 and not list(tmp_path.glob("*.partial*"))
    sources = stdlib_sources()
    assert len(tokens) == sum(p.stat().st_size for p in sources) + len(sources)
    assert tokens.dtype == np.uint8
    first = sources[0].read_bytes()
    assert bytes(tokens[: len(first)]) == first
    mtime = files[0].stat().st_mtime_ns
    again = load_stdlib_corpus(tmp_path, show_progress=False)
    assert files[0].stat().st_mtime_ns == mtime and np.array_equal(again[:1000], tokens[:1000])


def test_stdlib_corpus_built_once_by_concurrent_ranks(tmp_path):
    """Two processes starting together (ranks on one machine): one builds under the lock, the other waits."""
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        sizes = list(pool.map(_corpus_size, [tmp_path, tmp_path]))
    assert sizes[0] == sizes[1] > 0
    assert len(list(tmp_path.glob("stdlib-corpus-*.npy"))) == 1 and not list(tmp_path.glob("*.partial*"))


def _corpus_size(folder):
    return len(load_stdlib_corpus(folder, show_progress=False))
