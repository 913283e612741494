"""Every bad input to the data loaders gives its own message naming the file (and line) and the fix."""

import json

import numpy as np
import pytest
from internlm_corpus import write_bin

from pytrain.data import DataError, build_train_loader, build_valid_loaders


def cfg(folder, **overrides):
    base = dict(seq_len=4, micro_num=1, micro_bsz=1, total_steps=4, train_folder=str(folder), min_length=0)
    return {**base, **overrides}


def read_all(folder, workers=0, vocab_size=100, **overrides):
    loader, _ = build_train_loader(cfg(folder, **overrides), vocab_size=vocab_size, num_workers=workers)
    return list(loader)


def test_missing_folder_and_not_a_folder(tmp_path):
    with pytest.raises(DataError, match=r"data.train_folder='.*nope' does not exist"):
        read_all(tmp_path / "nope")
    (tmp_path / "file.bin").write_text("x")
    with pytest.raises(DataError, match="is not a folder"):
        read_all(tmp_path / "file.bin")


def test_folder_without_bin_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"has no \.bin files .*python -m pytrain\.data\.tokenize"):
        read_all(tmp_path)


def test_bin_without_meta(tmp_path):
    write_bin(tmp_path / "a.bin", [[1, 2, 3]])
    (tmp_path / "a.bin.meta").unlink()
    with pytest.raises(DataError, match=r"a\.bin has no a\.bin\.meta beside it"):
        read_all(tmp_path)


def test_meta_that_is_not_numpy(tmp_path):
    write_bin(tmp_path / "a.bin", [[1, 2, 3]])
    (tmp_path / "a.bin.meta").write_text("0 3\n")
    with pytest.raises(DataError, match=r"a\.bin\.meta is not a numpy \.npy array"):
        read_all(tmp_path)
    np.save(tmp_path / "a.bin.meta.npy", np.zeros((1, 5), dtype=np.int32))
    (tmp_path / "a.bin.meta.npy").rename(tmp_path / "a.bin.meta")
    with pytest.raises(DataError, match=r"has shape \(1, 5\)"):
        read_all(tmp_path)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate", "line 3: offset .* is past the end"),
        ("cut-inside-last-line", "line 3: the line at byte .* does not end where the next begins"),
        ("edit-line", "line 1: the line at byte 0 does not end where the next begins"),
        ("shuffle-meta", "line 3: offsets do not increase"),
    ],
)
def test_meta_disagreeing_with_bin_is_found_before_training(tmp_path, damage, message):
    write_bin(tmp_path / "a.bin", [[1, 2, 3], [4, 5, 6, 7], [8, 9]])
    path = tmp_path / "a.bin"
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    if damage == "truncate":
        path.write_bytes(b"".join(lines[:2]))
    elif damage == "cut-inside-last-line":
        path.write_bytes(data[:-3])
    elif damage == "edit-line":
        path.write_bytes(lines[0].replace(b"1, 2", b"10, 2") + b"".join(lines[1:]))
    else:
        meta = np.load(str(path) + ".meta")
        meta[[1, 2]] = meta[[2, 1]]
        with open(str(path) + ".meta", "wb") as f:
            np.save(f, meta)
    with pytest.raises(DataError, match=r"a\.bin\.meta disagrees with a\.bin at " + message + ".*re-tokenize"):
        build_train_loader(cfg(tmp_path), vocab_size=100)  # raised when the loader is built


def write_lines(path, lines, lengths):
    """A .bin of raw lines with a consistent meta (offsets right) but the given token counts."""
    data = b"".join(line + b"\n" for line in lines)
    path.write_bytes(data)
    offsets = np.cumsum([0] + [len(line) + 1 for line in lines[:-1]])
    with open(str(path) + ".meta", "wb") as f:
        np.save(f, np.stack([offsets, lengths], axis=1).astype(np.int32))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    "line, length, message",
    [
        (b'{"tokens": [1, 2, x]}', 3, r"line 2 is not JSON"),
        (b'{"ids": [1, 2, 3]}', 3, r'line 2 has no "tokens" list'),
        (b'{"tokens": [1, 2.5, 3]}', 3, r'line 2 has "tokens" that are not a list of integers'),
        (b'{"tokens": [1, 2, 3]}', 4, r"line 2 has 3 tokens but the \.meta says 4"),
        (b'{"tokens": [1, 200, 3]}', 3, r"line 2 has token id 200, not below model\.vocab_size=100"),
        (b'{"tokens": [1, -300, 3]}', 3, r"line 2 has token id 300, not below model\.vocab_size=100"),
    ],
)
def test_bad_lines_are_reported_lazily_with_file_and_line(tmp_path, workers, line, length, message):
    write_lines(tmp_path / "a.bin", [json.dumps({"tokens": [1, 2, 3, 4]}).encode(), line], [4, length])
    loader, _ = build_train_loader(cfg(tmp_path, micro_num=1), vocab_size=100, num_workers=workers)
    with pytest.raises(DataError, match=r"a\.bin " + message) as error:
        list(loader)
    assert "Traceback" not in str(error.value)  # a worker's error arrives as the message alone


def test_dataset_smaller_than_one_global_batch(tmp_path):
    write_bin(tmp_path / "a.bin", [[1] * 9, [2] * 3])
    with pytest.raises(DataError, match=r"holds 3 packs .* fewer than one global batch of 4 .*data-parallel size 2"):
        build_train_loader(cfg(tmp_path, micro_num=2), vocab_size=100, data_parallel_size=2)
    with pytest.raises(DataError, match=r"0 samples of at least 50 tokens"):
        build_train_loader(cfg(tmp_path, min_length=50), vocab_size=100)


def test_all_empty_files(tmp_path):
    write_bin(tmp_path / "a.bin", [])
    with pytest.raises(DataError, match=r"every \.bin file is empty"):
        read_all(tmp_path)


def test_resume_into_different_data_or_seed(tmp_path):
    write_bin(tmp_path / "a.bin", [[1] * 40])
    loader, _ = build_train_loader(cfg(tmp_path), vocab_size=100, seed=1)
    next(iter(loader))
    state = loader.state_dict()
    other, _ = build_train_loader(cfg(tmp_path), vocab_size=100, seed=2)
    with pytest.raises(DataError, match="shuffled with seed 1, this run's seed is 2"):
        other.load_state_dict(state)
    other, _ = build_train_loader(cfg(tmp_path, seq_len=8), vocab_size=100, seed=1)
    with pytest.raises(DataError, match=r"differs from the checkpoint's \(pack_tokens: 4 -> 8\)"):
        other.load_state_dict(state)


def test_valid_folder_errors(tmp_path):
    base = dict(seq_len=4, micro_num=1, micro_bsz=1, valid_micro_num=1, min_length=0)
    with pytest.raises(DataError, match=r"data.valid_folder='.*missing' does not exist"):
        build_valid_loaders(dict(base, valid_folder=str(tmp_path / "missing")), vocab_size=10)
    write_bin(tmp_path / "v" / "a" / "set" / "x.bin", [[1, 2]])
    write_bin(tmp_path / "v" / "b" / "set" / "y.bin", [[1, 2]])
    with pytest.raises(DataError, match="both validation sets named 'set'"):
        build_valid_loaders(dict(base, valid_folder=str(tmp_path / "v")), vocab_size=10)
