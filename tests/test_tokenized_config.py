"""configs/tiny_tokenized.py end to end: text -> `python -m pytrain.data.tokenize` (byte) -> training on the
packed folder with validation per set, as the README's "Training on your data" shows."""

import json

from conftest import CONFIGS, ROOT

from pytrain.data import tokenize


def write_text(folder, name, lines):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(lines) + "\n")


def test_text_to_tokenized_folder_to_training_with_validation(tmp_path, fresh_context, capsys):
    from pytrain.train.__main__ import main

    readme = [line for line in (ROOT / "README.md").read_text().splitlines() if len(line) > 20]
    source = [line for line in (ROOT / "pytrain" / "config.py").read_text().splitlines() if len(line) > 20]
    write_text(tmp_path / "raw" / "train" / "en", "readme.txt", readme[40:])
    write_text(tmp_path / "raw" / "train" / "code", "config.txt", source[40:])
    write_text(tmp_path / "raw" / "valid" / "en", "readme.txt", readme[:40])
    write_text(tmp_path / "raw" / "valid" / "code", "config.txt", source[:40])
    for part in ("train", "valid"):
        argv = ["--text_input_path", str(tmp_path / "raw" / part), "--bin_output_path", str(tmp_path / part)]
        assert tokenize.main([*argv, "--tokenizer", "byte", "--workers", "1"]) == 0
    assert sorted(p.name for p in (tmp_path / "train").rglob("*.bin*")) == [
        "config.bin",
        "config.bin.meta",
        "readme.bin",
        "readme.bin.meta",
    ]

    overrides = [
        f"data.train_folder={tmp_path / 'train'}",
        f"data.valid_folder={tmp_path / 'valid'}",
        "data.total_steps=4",
        "data.valid_every=2",
        "data.micro_num=1",  # a validation step holds another number of micro-batches than a training step
        "data.valid_micro_num=3",
        "model.num_layers=2",
        "model.hidden_size=64",
        "model.num_attention_heads=4",
        "monitor.log_every=1",
        "monitor.tensorboard.enable=False",
        f"monitor.run_folder={tmp_path / 'runs'}",
    ]
    assert main(["--config", str(CONFIGS / "tiny_tokenized.py"), "--set", *overrides]) == 0
    out = capsys.readouterr().out
    assert "validation at step 2 | code_loss" in out and "validation at step 4 |" in out
    (metrics,) = (tmp_path / "runs").glob("*/*/metrics.jsonl")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r for r in rows if "grad_norm" in r]
    valid = [r for r in rows if "val/loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and [r["step"] for r in valid] == [2, 4]
    for row in valid:
        assert set(row) == {"step", "val/en_loss", "val/en_ppl", "val/code_loss", "val/code_ppl", "val/loss", "val/ppl"}
        assert 0 < row["val/loss"] < 6 and row["val/ppl"] > 1
    assert valid[1]["val/loss"] < valid[0]["val/loss"] + 0.5  # it trains (4 steps of byte-level text)
