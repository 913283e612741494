"""Validation loaders: one per folder of .bin files, padded rows in file order, every sample exactly once."""

import numpy as np
import pytest
import torch
from internlm_corpus import IGNORE, random_samples, write_bin

from pytrain.data import build_valid_loaders

SEQ_LEN, MICRO_BSZ, VALID_MICRO_NUM = 8, 2, 3


@pytest.fixture(scope="module")
def valid_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    rng = np.random.default_rng(1)
    sets = {
        "code": {"code/x.bin": random_samples(rng, 9, 20, 50), "code/y.bin": random_samples(rng, 4, 5, 50)},
        "wiki": {"en/wiki/z.bin": random_samples(rng, 14, 12, 50)},
    }
    for files in sets.values():
        for name, samples in files.items():
            write_bin(root / name, samples)
    return root, sets


def loaders(root, dp=1, rank=0, min_length=0, workers=0):
    cfg = dict(
        seq_len=SEQ_LEN,
        micro_num=4,
        micro_bsz=MICRO_BSZ,
        valid_micro_num=VALID_MICRO_NUM,
        min_length=min_length,
        valid_folder=str(root),
    )
    return build_valid_loaders(cfg, vocab_size=50, data_parallel_size=dp, data_parallel_rank=rank, num_workers=workers)


def reference_rows(samples, type_id):
    rows = []
    for s in samples:
        cut = s[: SEQ_LEN + 1]
        tokens = [abs(t) for t in cut[:SEQ_LEN]] + [0] * (SEQ_LEN - min(len(cut), SEQ_LEN))
        labels = [t if t >= 0 else IGNORE for t in cut[1:]] + [IGNORE] * (SEQ_LEN + 1 - len(cut))
        types = [type_id] * min(len(cut), SEQ_LEN) + [0] * (SEQ_LEN - min(len(cut), SEQ_LEN))
        rows.append((tokens, labels, types))
    return rows


@pytest.mark.parametrize("min_length", [0, 4])
def test_rows_are_the_samples_in_order_then_padding(valid_folder, min_length):
    root, sets = valid_folder
    got = loaders(root, min_length=min_length)
    assert sorted(got) == ["code", "wiki"]
    types = {"code": 0, "wiki": 1}  # valid_folder's top-level folders: code/, en/
    for name, files in sets.items():
        loader = got[name]
        assert loader.dataset_types == ["code", "en"]
        samples = [s for f in sorted(files) for s in files[f] if len(s) >= max(min_length, 1)]
        want = reference_rows(samples, types[name])
        batches = list(loader)
        rows_per_step = VALID_MICRO_NUM * MICRO_BSZ
        assert len(batches) == len(loader) == -(-len(samples) // rows_per_step)
        flat = [
            (
                b["input_ids"].reshape(-1, SEQ_LEN)[i].tolist(),
                b["labels"].reshape(-1, SEQ_LEN)[i].tolist(),
                b["type_ids"].reshape(-1, SEQ_LEN)[i].tolist(),
            )
            for b in batches
            for i in range(rows_per_step)
        ]
        assert flat[: len(want)] == want
        assert all(labels == [IGNORE] * SEQ_LEN for _, labels, _ in flat[len(want) :])  # padding rows
        for b in batches:
            assert b["input_ids"].shape == (VALID_MICRO_NUM, MICRO_BSZ, SEQ_LEN) and b["input_ids"].dtype == torch.int64
            assert b["positions"][2, 1].tolist() == list(range(SEQ_LEN))
        assert torch.equal(next(iter(loader))["input_ids"], batches[0]["input_ids"])  # re-iterable


@pytest.mark.parametrize("workers", [0, 2])
def test_every_sample_once_whatever_the_data_parallel_size(valid_folder, workers):
    root, _ = valid_folder
    one = loaders(root)

    def rows(loader_list):
        out = []
        for batches in zip(*loader_list):
            for b in batches:
                for i in range(VALID_MICRO_NUM * MICRO_BSZ):
                    labels = b["labels"].reshape(-1, SEQ_LEN)[i]
                    if (labels != IGNORE).any():
                        out.append((b["input_ids"].reshape(-1, SEQ_LEN)[i].tolist(), labels.tolist()))
        return sorted(out)

    for name in one:
        ranks = [loaders(root, dp=3, rank=r, workers=workers)[name] for r in range(3)]
        assert len({len(r) for r in ranks}) == 1  # every rank runs the same number of steps
        assert rows(ranks) == rows([one[name]])
