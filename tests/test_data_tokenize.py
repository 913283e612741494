"""`python -m pytrain.data.tokenize`: InternLM's .bin/.meta written atomically, read back by the loader,
decode(encode(text)) == text for the byte tokenizer and a BPE tokenizer trained here with `tokenizers`."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pytrain.data import build_train_loader, tokenize
from pytrain.data.tokenize import json_line, json_lines, load_tokenizer, main
from pytrain.data.tokenized import SampleReader, open_folder

TEXTS = ["Hello, world!", "  ünïcödé — 漢字 🙂 tabs\tand spaces  ", "x", "def f(a):\n    return a * 2"]


def read_back(folder):
    """Every sample of a tokenized folder, by file, via the loader's own reader (checks the meta too)."""
    files, _ = open_folder(folder)
    reader = SampleReader(files, None)
    return {
        f.path.relative_to(folder): [reader.read(i, j).tolist() for j in range(len(f.lengths))]
        for i, f in enumerate(files)
    }


INT64 = st.integers(-(2**63), 2**63 - 1)


@settings(deadline=None)
@given(st.one_of(st.lists(INT64, max_size=50), st.lists(st.integers(0, 255), max_size=50)))
def test_json_line_is_exactly_jsons(ids):
    want = (json.dumps({"tokens": ids}) + "\n").encode()
    assert json_line(np.array(ids, dtype=np.int64)) == want
    if all(0 <= i < 256 for i in ids):
        assert json_line(bytes(ids)) == want  # the byte tokenizer's path


@settings(deadline=None, max_examples=50)
@given(st.lists(st.lists(INT64, max_size=8), max_size=6), st.booleans())
def test_json_lines_compiled_equals_python(samples, as_bytes):
    """Several samples at once (empty ones too): the compiled formatter and the Python fallback agree."""
    samples = [bytes(i % 256 for i in s) for s in samples] if as_bytes else [np.array(s, np.int64) for s in samples]
    compiled_text, compiled_lengths = json_lines(samples)
    saved, tokenize._C = tokenize._C, None
    try:
        text, lengths = json_lines(samples)
    finally:
        tokenize._C = saved
    assert saved is not None, "pytrain._C is not built"
    assert bytes(compiled_text) == bytes(text) and compiled_lengths.tolist() == lengths.tolist()
    assert len(text) == sum(lengths)


def test_byte_round_trip_for_every_input_format(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "a.txt").write_text(
        "\n".join(t.replace("\n", " ") for t in TEXTS) + "\n\n   \n", encoding="utf-8"
    )
    (tmp_path / "in" / "sub" / "b.jsonl").write_text(
        "\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(TEXTS)), encoding="utf-8"
    )
    (tmp_path / "in" / "sub" / "c.json").write_text(
        json.dumps([{"text": t} for t in TEXTS] + ["plain"]), encoding="utf-8"
    )
    (tmp_path / "in" / "ignored.md").write_text("not an input")
    out = tmp_path / "out"
    assert (
        main(
            [
                "--text_input_path",
                str(tmp_path / "in"),
                "--bin_output_path",
                str(out),
                "--tokenizer",
                "byte",
                "--workers",
                "2",
            ]
        )
        == 0
    )
    tokenizer = load_tokenizer("byte")
    samples = read_back(out)
    assert sorted(map(str, samples)) == ["a.bin", "sub/b.bin", "sub/c.bin"]
    assert [tokenizer.decode(s) for s in samples[next(p for p in samples if p.name == "a.bin")]] == [
        t.replace("\n", " ").strip() for t in TEXTS
    ]
    by_name = {p.name: s for p, s in samples.items()}
    assert [tokenizer.decode(s) for s in by_name["b.bin"]] == TEXTS
    assert [tokenizer.decode(s) for s in by_name["c.bin"]] == TEXTS + ["plain"]
    meta = np.load(out / "sub" / "b.bin.meta")
    assert meta.dtype == np.int32 and meta.shape == (4, 2) and meta[0].tolist() == [0, len(TEXTS[0].encode())]
    assert not list(out.rglob("*.partial"))  # the temporaries were renamed
    loader, types = build_train_loader(
        dict(seq_len=4, micro_num=1, micro_bsz=2, total_steps=3, train_folder=str(out), min_length=0), vocab_size=256
    )
    assert types == ["out", "sub"] and len(list(loader)) == 3


def bpe_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(TEXTS * 20, trainer=trainer)
    path = tmp_path / "bpe.json"
    tokenizer.save(str(path))
    return path, tokenizer


def test_bpe_round_trip_with_tokenizers_file_and_folder(tmp_path):
    pytest.importorskip("tokenizers")
    path, tokenizer = bpe_tokenizer_file(tmp_path)
    folder = tmp_path / "hf"  # a transformers tokenizer folder: tokenizer.json inside
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes(path.read_bytes())
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps({"content": t}) for t in TEXTS), encoding="utf-8")
    for spec in (path, folder):
        out = tmp_path / f"out-{spec.name}" / "en" / "x.bin"
        code = main(
            [
                "--text_input_path",
                str(source),
                "--bin_output_path",
                str(out),
                "--tokenizer",
                str(spec),
                "--text_key",
                "content",
            ]
        )
        assert code == 0
        (samples,) = read_back(out.parent.parent).values()
        assert samples == [tokenizer.encode(t).ids for t in TEXTS]
        assert max(map(len, samples)) < max(len(t.encode()) for t in TEXTS)  # merges happened: not bytes
        assert [load_tokenizer(str(spec)).decode(s) for s in samples] == TEXTS


def test_sentencepiece_model(tmp_path):
    model, processor = sentencepiece_model(tmp_path)
    source = tmp_path / "in.txt"
    source.write_text("\n".join(TEXTS[:2]), encoding="utf-8")
    out = tmp_path / "out" / "x.bin"
    assert main(["--text_input_path", str(source), "--bin_output_path", str(out), "--tokenizer", str(model)]) == 0
    assert next(iter(read_back(out.parent).values())) == [processor.encode(t.strip()) for t in TEXTS[:2]]


def sentencepiece_model(tmp_path):
    sentencepiece = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(TEXTS * 30), encoding="utf-8")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=38,
        hard_vocab_limit=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    return tmp_path / "sp.model", sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))


def test_add_bos_eos_gives_internlm_ids(tmp_path, capsys):
    """`--add_bos_eos both` with a sentencepiece model: BOS + ids + EOS per sample, what InternLM's tools/tokenizer.py
    writes, as sentencepiece itself adds them; bos / eos one side; the default adds nothing (and --help says so)."""
    model, processor = sentencepiece_model(tmp_path)
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(json.dumps({"text": t}) for t in TEXTS), encoding="utf-8")
    for add, bos, eos in (("both", True, True), ("bos", True, False), ("eos", False, True), ("none", False, False)):
        out = tmp_path / add / "x.bin"
        argv = ["--text_input_path", str(source), "--bin_output_path", str(out), "--tokenizer", str(model)]
        assert main([*argv, "--add_bos_eos", add]) == 0
        (samples,) = read_back(out.parent).values()
        assert samples == [processor.encode(t, add_bos=bos, add_eos=eos) for t in TEXTS]
    assert samples == [processor.encode(t) for t in TEXTS]  # "none" is the default's output
    assert processor.bos_id() == 1 and processor.eos_id() == 2
    with pytest.raises(SystemExit):
        main(["--help"])
    assert re.search(r"--add_bos_eos .*\(default\s+none", " ".join(capsys.readouterr().out.split()))


def test_bos_eos_of_a_transformers_folder(tmp_path, capsys):
    """A transformers tokenizer folder: BOS/EOS ids from its tokenizer_config.json; `tokenizer` applies the
    tokenizers JSON's own post-processor; explicit ids win; the byte tokenizer has none to add."""
    pytest.importorskip("tokenizers")
    from tokenizers import processors

    _, tokenizer = bpe_tokenizer_file(tmp_path)
    tokenizer.add_special_tokens(["<s>", "</s>"])
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    folder = tmp_path / "hf"
    folder.mkdir()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    source = tmp_path / "in.txt"
    source.write_text("\n".join(TEXTS[:2]), encoding="utf-8")
    plain = [tokenizer.encode(t.strip(), add_special_tokens=False).ids for t in TEXTS[:2]]
    for add, extra, want in (
        ("both", [], [[bos, *ids, eos] for ids in plain]),
        ("tokenizer", [], [[bos, *ids] for ids in plain]),
        ("eos", ["--eos_id", "7"], [[*ids, 7] for ids in plain]),
    ):
        out = tmp_path / add / "x.bin"
        argv = ["--text_input_path", str(source), "--bin_output_path", str(out), "--tokenizer", str(folder)]
        assert main([*argv, "--add_bos_eos", add, *extra]) == 0
        assert next(iter(read_back(out.parent).values())) == want
    argv = ["--text_input_path", str(source), "--bin_output_path", str(tmp_path / "b.bin"), "--add_bos_eos", "bos"]
    assert main(argv) == 2
    assert "'bos' needs a BOS id, and the tokenizer defines none" in capsys.readouterr().err


@pytest.mark.parametrize(
    "setup, args, message",
    [
        (None, ["--text_input_path", "missing.txt"], "missing.txt does not exist"),
        ("in.csv", [], "must be .txt, .json or .jsonl"),
        ("in.txt", ["--bin_output_path", "out.dat"], "must end in .bin"),
        ("in.txt", ["--tokenizer", "nope.json"], "'nope.json' does not exist"),
        ("in.txt", ["--tokenizer", "in.txt"], "unknown kind"),
        ("bad.jsonl", [], r"bad.jsonl line 2 is not JSON"),
        ("nokey.jsonl", [], r"nokey.jsonl line 1 has no string field 'text' \(it has: 'body'\): pass --text_key"),
        ("notlist.json", [], "must hold a list of records"),
        ("latin1.txt", [], "is not UTF-8 text"),
    ],
)
def test_bad_input_messages(tmp_path, capsys, monkeypatch, setup, args, message):
    monkeypatch.chdir(tmp_path)
    contents = {
        "in.csv": b"a,b",
        "in.txt": b"hello",
        "bad.jsonl": b'{"text": "ok"}\n{oops\n',
        "nokey.jsonl": b'{"body": "x"}\n',
        "notlist.json": b'{"text": "x"}',
        "latin1.txt": "caf\u00e9".encode("latin-1"),
    }
    if setup:
        (tmp_path / setup).write_bytes(contents[setup])
    argv = ["--text_input_path", setup or "x", "--bin_output_path", "out.bin", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob(".*partial"))  # nothing half-written


def test_command_line_entry_point(tmp_path):
    (tmp_path / "in.txt").write_text("abc\n", encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytrain.data.tokenize",
            "--text_input_path",
            str(tmp_path / "in.txt"),
            "--bin_output_path",
            str(tmp_path / "o.bin"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "1 file(s), 1 samples, 3 tokens" in done.stdout
    assert (tmp_path / "o.bin").read_bytes() == b'{"tokens": [97, 98, 99]}\n'
