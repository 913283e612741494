"""A new dense model family added through the public seams only, as README's "Adding a family" shows: ONE spec,
registered, is all it takes to build the model, select it from a config, train it, checkpoint it and carry its
weights to Hugging Face transformers and back. And the seam a sequence/context-parallel layout uses: the
attention call is a module that can be wrapped from outside."""

import json

import pytest
import torch
import transformers  # the oracle (in the test extra): a missing install fails, never skips
from conftest import CONFIGS, SMALL

from pytrain.checkpoint import CheckpointReader, convert, hf
from pytrain.config import Config
from pytrain.model.decoder import InnerAttention, Names
from pytrain.model.families import SEPARATE_QKV, Family
from pytrain.parallel.shard_spec import ShardSpec
from pytrain.registry import MODEL_INITIALIZER
from pytrain.specs import ModelSpec, register

TOY = "TOY_LLAMA"
TOY_FIELDS = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_kv_attention_heads=2, multiple_of=32)


@pytest.fixture
def toy_family():
    """The whole of the new family: names of its own, LLaMA's q, k, v, its own defaults, HF's Llama class."""
    spec = register(
        ModelSpec(
            Family(
                TOY,
                Names("wte", "h", "attn", "ffn", "ln_1", "ln_2", "ln_f", "out"),
                SEPARATE_QKV,
                dict(vocab_size=256, qkv_bias=False, rope_base=5e5, layer_norm_epsilon=1e-6, qk_interleaved=False),
            ),
            hf=hf.LLAMA,
        )
    )
    yield spec
    MODEL_INITIALIZER.unregister(TOY)


def test_the_spec_builds_the_family_with_its_names_defaults_and_plan(toy_family):
    model = MODEL_INITIALIZER.get_module(TOY)(**TOY_FIELDS, dtype="torch.float32")
    names = set(model.state_dict())
    assert {"wte.weight", "h.1.attn.wq.weight", "h.0.ffn.w2.weight", "ln_f.weight", "out.weight"} <= names
    assert "h.0.attn.wq.bias" not in names  # its qkv_bias=False
    attention = model.h["0"].attn
    assert attention.rotary.base == 5e5 and model.final_norm.eps == 1e-6
    plan = model.tensor_parallel_plan()  # what pytrain.parallel splits, under the family's names
    assert {"h.*.attn.wq", "h.*.attn.wo", "h.*.ffn.w1", "wte", "out"} <= set(plan)


def test_a_config_selects_the_family_and_reads_its_defaults(toy_family, tmp_path):
    cfg = Config.from_dict(dict(model_type=TOY, model=dict(TOY_FIELDS, rope_base=1e4, no_bias=True)))
    assert cfg.model.rope_base == 1e4 and cfg.model.vocab_size == 256 and cfg.model.qkv_bias is False
    assert cfg.ignored_here == (f"model.no_bias (not a field of {TOY})",)  # INTERNLM2's switch, not this family's


def test_the_family_trains_checkpoints_and_round_trips_through_hugging_face(toy_family, fresh_context, tmp_path):
    from pytrain.train.__main__ import main

    run = [
        *("--config", str(CONFIGS / "tiny.py"), "--set", *SMALL),
        *(f"model_type={TOY}", "model.num_kv_attention_heads=2", "model.multiple_of=32", "data.total_steps=2"),
        *("data.train_folder=None", f"monitor.run_folder={tmp_path}", "monitor.tensorboard.enable=False"),
        *("ckpt.enable_save_ckpt=True", f"ckpt.save_ckpt_folder=local:{tmp_path / 'ckpt'}", "ckpt.checkpoint_every=2"),
    ]
    assert main(run) == 0
    config = str(fresh_context.run_folder / "config.py")  # the run's effective config
    assert (
        convert.main(
            ["--to", "hf", "--config", config, "--ckpt", str(tmp_path / "ckpt"), "--out", str(tmp_path / "hf")]
        )
        == 0
    )
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]

    # transformers' Llama runs the trained weights as the family does
    cfg = Config.from_file(config)
    model = convert.whole_model(cfg)
    trained = CheckpointReader(tmp_path / "ckpt" / "2")
    state = trained.read({f"model/{n}": ShardSpec.whole(p.shape) for n, p in model.named_parameters()})
    ours = MODEL_INITIALIZER.get_module(TOY)(**cfg.model)
    ours.load_state_dict({name.removeprefix("model/"): tensor for name, tensor in state.items()})
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - theirs(ids).logits).abs().max() <= 1e-5

    # and back: the Hugging Face folder as a pytrain checkpoint holds the trained tensors bitwise
    assert (
        convert.main(
            ["--from", "hf", "--config", config, "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]
        )
        == 0
    )
    back = CheckpointReader(tmp_path / "back" / "0").read({key: ShardSpec.whole(t.shape) for key, t in state.items()})
    assert all(torch.equal(back[key], tensor) for key, tensor in state.items())


class CountingAttention(torch.nn.Module):
    """What a sequence-parallel layout does at this seam: wrap the attention call (here, only count it)."""

    def __init__(self, inner: InnerAttention):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, q, k, v, packed=None):
        self.calls += 1
        return self.inner(q, k, v, packed)


def test_the_attention_call_is_a_module_a_layout_can_wrap(toy_family):
    model = MODEL_INITIALIZER.get_module(TOY)(**TOY_FIELDS, dtype="torch.float32", use_flash_attn=False)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids)
        wrappers = []
        for name, module in list(model.named_modules()):
            if isinstance(module, InnerAttention):
                wrappers.append(CountingAttention(module))
                model.set_submodule(name, wrappers[-1])
        assert len(wrappers) == 2 and torch.equal(model(ids), before)
    assert [w.calls for w in wrappers] == [1, 1]
