import numpy as np
import pytest
import torch

from pytrain.data import DummyDataset, TokenWindowDataset, load_stdlib_corpus
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


def test_stdlib_sources_are_every_py_file_outside_site_packages_in_order():
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    want = sorted(p for p in root.rglob("*.py") if not {"site-packages", "dist-packages"} & set(p.parts))
    assert stdlib_sources() == want


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
