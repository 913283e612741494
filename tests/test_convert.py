"""python -m pytrain.checkpoint.convert: a pytrain checkpoint to a Hugging Face folder and back, bitwise, for a family
whose HF layout is a rename (QWEN2) and one that is converted (INTERNLM's fused Wqkv, LLAMA2's
interleaved rotary rows); bad input names the problem."""

import pytest
import torch
from safetensors.torch import load_file

from pytrain.checkpoint import CheckpointReader
from pytrain.checkpoint.convert import main, whole_model
from pytrain.checkpoint.hf import save_hf_folder
from pytrain.config import Config
from pytrain.parallel.shard_spec import ShardSpec

MODEL = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, vocab_size=128)
MODEL.update(multiple_of=32)


def write_config(folder, family: str, dtype: str, name="cfg", **model) -> str:
    path = folder / f"{name}.py"
    path.write_text(f"model_type = {family!r}\nmodel = {dict(MODEL, **model, dtype=dtype)!r}\n")
    return str(path)


@pytest.mark.parametrize(
    "family, dtype, model",
    [
        ("INTERNLM", "torch.bfloat16", {}),
        ("QWEN2", "torch.float32", {}),
        ("LLAMA2", "torch.float32", dict(tie_word_embeddings=True)),
    ],
)
def test_hf_to_pytrain_to_hf_round_trips_bitwise(tmp_path, family, dtype, model):
    cfg_path = write_config(tmp_path, family, dtype, **model)
    cfg = Config.from_file(cfg_path)
    meta = whole_model(cfg)
    generator = torch.Generator().manual_seed(0)
    torch_dtype = getattr(torch, dtype.removeprefix("torch."))
    state = {n: torch.randn(p.shape, generator=generator).to(torch_dtype) for n, p in meta.named_parameters()}
    save_hf_folder(meta, state, tmp_path / "hf", dtype=torch_dtype)

    assert (
        main(["--from", "hf", "--config", cfg_path, "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt")]) == 0
    )
    reader = CheckpointReader(tmp_path / "ckpt" / "0")
    saved = reader.read({f"model/{n}": ShardSpec.whole(p.shape) for n, p in meta.named_parameters()})
    for name, tensor in state.items():
        assert saved[f"model/{name}"].dtype == torch_dtype and torch.equal(saved[f"model/{name}"], tensor), name

    assert (
        main(["--to", "hf", "--config", cfg_path, "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back")])
        == 0
    )
    original, back = (
        load_file(tmp_path / "hf" / "model.safetensors"),
        load_file(tmp_path / "back" / "model.safetensors"),
    )
    assert sorted(original) == sorted(back)
    for name in original:
        assert torch.equal(original[name], back[name]), name
    assert (tmp_path / "back" / "config.json").read_text() == (tmp_path / "hf" / "config.json").read_text()


def test_bad_input_is_named(tmp_path, capsys):
    cfg_path = write_config(tmp_path, "QWEN2", "torch.float32")
    assert (
        main(["--to", "hf", "--config", cfg_path, "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    )
    assert "neither a pytrain checkpoint nor a save folder" in capsys.readouterr().err
    assert main(["--from", "hf", "--config", cfg_path, "--hf", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a Hugging Face safetensors folder" in capsys.readouterr().err
    other = Config.from_file(write_config(tmp_path, "QWEN2", "torch.float32", name="small", hidden_size=32))
    meta = whole_model(other)
    save_hf_folder(meta, {n: torch.zeros(p.shape) for n, p in meta.named_parameters()}, tmp_path / "small")
    assert (
        main(["--from", "hf", "--config", cfg_path, "--hf", str(tmp_path / "small"), "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err
    assert "do not fit this model (27 tensor(s))" in err
    assert "embed_tokens.weight: [128, 32] from the folder, the model's is [128, 64]" in err
