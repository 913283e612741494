"""Megatron-LM's indexed datasets (data.type="megatron"): files written here from the format's description and
by megatron-core's own IndexedDatasetBuilder read back document for document; the same corpus through .bin/.idx
and through InternLM's tokenized format gives the same batches; every broken file is an error naming it."""

import struct

import numpy as np
import pytest
import torch
from internlm_corpus import write_bin

from pytrain.data import DataError, build_train_loader, build_valid_loaders
from pytrain.data.megatron import MegatronReader, open_megatron

CODES = {np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5, np.uint16: 8}


def write_megatron(prefix, documents, dtype=np.uint16, code=None, version=1):
    """A .bin/.idx pair as megatron.core's _IndexWriter lays it out; documents: lists of sequences (token lists)."""
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sequences = [np.asarray(s, dtype=dtype) for doc in documents for s in doc]
    with open(f"{prefix}.bin", "wb") as out:
        for s in sequences:
            out.write(s.tobytes())
    lengths = np.array([len(s) for s in sequences], dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths.astype(np.int64) * np.dtype(dtype).itemsize)[:-1]])
    bounds = np.concatenate([[0], np.cumsum([len(doc) for doc in documents])]).astype(np.int64)
    with open(f"{prefix}.idx", "wb") as out:
        out.write(b"MMIDIDX\x00\x00" + struct.pack("<Q", version) + struct.pack("<B", code or CODES[dtype]))
        out.write(struct.pack("<Q", len(sequences)) + struct.pack("<Q", len(bounds)))
        out.write(lengths.tobytes() + pointers.astype(np.int64).tobytes() + bounds.tobytes())


def flat(document):
    """A document's tokens: its sequences one after another."""
    return [t for sequence in document for t in sequence]


def random_documents(rng, count, max_len, vocab):
    """Documents of 1-3 sequences (Megatron's split sentences), a few empty."""
    docs = []
    for _ in range(count):
        docs.append([rng.integers(0, vocab, int(rng.integers(0, max_len))).tolist() for _ in range(rng.integers(1, 4))])
    return docs


def cfg(folder, kind, **overrides):
    base = dict(seq_len=8, micro_num=2, micro_bsz=2, total_steps=9, train_folder=str(folder), min_length=0, type=kind)
    return {**base, **overrides}


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_same_corpus_as_internlm_folder_gives_the_same_batches(tmp_path, dtype):
    rng = np.random.default_rng(0)
    corpus = {"code/a": random_documents(rng, 15, 12, 300), "en/b": random_documents(rng, 9, 20, 300)}
    for name, docs in corpus.items():
        write_megatron(tmp_path / "megatron" / name, docs, dtype)
        write_bin(tmp_path / "internlm" / f"{name}.bin", [flat(doc) for doc in docs])
    for into_one in (False, True):
        megatron, types = build_train_loader(
            cfg(tmp_path / "megatron", "megatron", pack_sample_into_one=into_one), vocab_size=300, seed=3
        )
        internlm, internlm_types = build_train_loader(
            cfg(tmp_path / "internlm", "tokenized", pack_sample_into_one=into_one), vocab_size=300, seed=3
        )
        assert types == internlm_types == ["code", "en"]
        pairs = list(zip(megatron, internlm, strict=True))
        assert len(pairs) == 9
        for got, want in pairs:
            assert got.keys() == want.keys()
            for key in want:
                assert torch.equal(got[key], want[key]), key
        assert megatron.state_dict()["stream"]["kind"] == "megatron"


@pytest.mark.slow  # importing megatron.core takes ~8 s; the format itself is checked by the tests above
def test_megatron_core_builder_files_read_back(tmp_path):
    indexed = pytest.importorskip("megatron.core.datasets.indexed_dataset", reason="megatron-core does not import")
    rng = np.random.default_rng(1)
    docs = random_documents(rng, 12, 30, 60000)
    for dtype in (np.uint16, np.int32):
        prefix = tmp_path / dtype.__name__ / "corpus_text_document"
        prefix.parent.mkdir()
        builder = indexed.IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
        for doc in docs:
            builder.add_document(torch.tensor(flat(doc), dtype=torch.int64), [len(s) for s in doc])
        builder.finalize(f"{prefix}.idx")
        theirs = indexed.IndexedDataset(str(prefix))
        files, names = open_megatron(prefix)  # a path prefix, as Megatron's data_path
        assert names == ["corpus_text_document"]
        reader = MegatronReader(files, vocab_size=60000)
        bounds = theirs.document_indices
        nonempty = [d for d in range(len(docs)) if sum(map(len, docs[d]))]
        assert files[0].lengths.tolist() == [sum(map(len, doc)) for doc in docs]
        for d in nonempty:
            want = np.concatenate([theirs[i] for i in range(bounds[d], bounds[d + 1])])
            assert reader.read(0, d).tolist() == want.tolist() == flat(docs[d])


def test_validation_sets_in_megatron_format(tmp_path):
    docs = [[[1, 2, 3]], [[4, 5], [6]], [[7]]]
    write_megatron(tmp_path / "valid" / "en" / "x", docs)
    loaders = build_valid_loaders(
        dict(
            seq_len=4,
            micro_bsz=1,
            micro_num=1,
            valid_micro_num=1,
            valid_folder=str(tmp_path / "valid"),
            type="megatron",
        ),
        vocab_size=10,
    )
    rows = [b["input_ids"].flatten().tolist() for b in loaders["en"]]
    assert rows == [[1, 2, 3, 0], [4, 5, 6, 0], [7, 0, 0, 0]]


def damage(tmp_path, how):
    prefix = tmp_path / "en" / "x"
    if how == "float dtype":
        write_megatron(prefix, [[[1, 2]]], np.uint16, code=6)
    elif how == "unknown dtype":
        write_megatron(prefix, [[[1, 2]]], np.uint16, code=9)
    elif how == "version":
        write_megatron(prefix, [[[1, 2]]], version=2)
    else:
        write_megatron(prefix, [[[1, 2, 3]], [[4, 5]]])
    idx, bin_ = prefix.with_suffix(".idx"), prefix.with_suffix(".bin")
    if how == "magic":
        idx.write_bytes(b"MMIDIDY" + idx.read_bytes()[7:])
    elif how == "truncated bin":
        bin_.write_bytes(bin_.read_bytes()[:-2])
    elif how == "cut idx":
        idx.write_bytes(idx.read_bytes()[:-5])
    elif how == "missing bin":
        bin_.unlink()
    elif how == "pointers":
        data = bytearray(idx.read_bytes())
        data[34 + 4 * 2 + 8] += 2  # the second sequence's pointer
        idx.write_bytes(bytes(data))
    return idx, bin_


@pytest.mark.parametrize(
    "how, message",
    [
        ("magic", r"x\.idx: not a Megatron index"),
        ("version", r"x\.idx: index version 2"),
        ("float dtype", r"x\.idx: dtype code 6 \(float64\) holds no token ids"),
        ("unknown dtype", r"x\.idx: unknown dtype code 9"),
        ("truncated bin", r"x\.bin has 8 bytes, but x\.idx describes 10 .*truncated"),
        ("cut idx", r"x\.idx: it has \d+ bytes, but its header .* needs"),
        ("missing bin", r"x\.idx has no x\.bin beside it"),
        ("pointers", r"x\.idx: sequence 1's pointer does not follow"),
    ],
)
def test_broken_files_are_errors_naming_the_file(tmp_path, how, message):
    damage(tmp_path, how)
    with pytest.raises(DataError, match=message):
        build_train_loader(cfg(tmp_path, "megatron", seq_len=2, micro_bsz=1, micro_num=1), vocab_size=10)


def test_ids_outside_the_vocabulary_name_the_document(tmp_path):
    write_megatron(tmp_path / "en" / "x", [[[1, 2]], [[3, 40]]])
    loader, _ = build_train_loader(cfg(tmp_path, "megatron", seq_len=2, micro_bsz=1, micro_num=1), vocab_size=10)
    with pytest.raises(DataError, match=r"x\.bin document 1 has token id 40, outside 0..model.vocab_size-1=9"):
        list(loader)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"has no \.idx files"):
        build_train_loader(cfg(tmp_path / "empty", "megatron"), vocab_size=10)
