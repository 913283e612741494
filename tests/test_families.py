"""The dense model families: published sizes, InternEvo's parameter names, and Hugging Face weights in and
out, with transformers' own classes as the oracle (fp32 logits within 1e-5, the same loss)."""

import pytest
import torch
import transformers  # the oracle (in the test extra): a missing install fails, never skips
from conftest import CONFIGS

from pytrain.checkpoint import CheckpointError
from pytrain.checkpoint.hf import HFReader, from_hf_state, hf_config, save_hf_folder, to_hf_state
from pytrain.model import Decoder
from pytrain.model.families import (
    build_baichuan2,
    build_gemma,
    build_internlm,
    build_internlm2,
    build_internlm3,
    build_llama2,
    build_qwen2,
    build_qwen3,
)
from pytrain.registry import MODEL_INITIALIZER

TINY = dict(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_kv_attention_heads=2,
    vocab_size=96,
    multiple_of=32,
    dtype="torch.float32",
    use_flash_attn=False,
)
# (builder, extra fields): every attention layout, bias placement and rotary convention the families have.
VARIANTS = {
    "internlm": (build_internlm, {}),  # fused Wqkv with biases
    "internlm-nobias-interleaved": (build_internlm, dict(no_bias=True, qk_interleaved=True)),
    "internlm2": (build_internlm2, {}),  # grouped wqkv with biases
    "internlm2-interleaved": (build_internlm2, dict(no_bias=True, adapt_hf=False)),
    "llama2": (build_llama2, {}),  # adapt_hf=False: interleaved rotary, biases on q, k, v, o
    "llama2-hf-order-tied": (build_llama2, dict(no_bias=True, adapt_hf=True, tie_word_embeddings=True)),
    "llama2-fused": (build_llama2, dict(enable_qkv_fusion=True)),
    "qwen2": (build_qwen2, {}),
    "qwen3": (build_qwen3, dict(head_dim=24)),  # q/k norms; head_dim independent of hidden / heads
    "qwen3-interleaved-biased": (build_qwen3, dict(head_dim=24, qk_interleaved=True, qkv_bias=True, o_bias=True)),
    # GeGLU, (1 + weight) norms, scaled embeddings, tied head; multi-query (Gemma-2B's one kv head)
    "internlm3": (build_internlm3, {}),  # InternLM2's grouped wqkv, no biases
    "gemma": (build_gemma, dict(head_dim=24, mlp_ratio=8.0, num_kv_attention_heads=1)),
}


def random_model(name: str, seed: int = 0) -> Decoder:
    builder, extra = VARIANTS[name]
    torch.manual_seed(seed)
    model = builder(**{**TINY, **extra})
    with torch.no_grad():  # norms and biases too, so that a mapping mistake anywhere shows
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def loss_of(logits, ids):
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize(
    "model_type, fields, published",
    [
        ("INTERNLM", dict(vocab_size=103168, mlp_ratio=8 / 3), 7_321_948_160),  # InternLM-7B (with its biases)
        ("INTERNLM2", dict(vocab_size=92544, num_kv_attention_heads=8, mlp_ratio=3.5, no_bias=True), 7_737_708_544),
        ("LLAMA2", dict(vocab_size=32000, mlp_ratio=2.6875, no_bias=True), 6_738_415_616),  # Llama-2-7B
        ("QWEN2", dict(mlp_ratio=37 / 7), 7_615_616_512),  # Qwen2-7B
        ("QWEN3", {}, 8_190_735_360),  # Qwen3-8B
        ("GEMMA", {}, 8_537_680_896),  # Gemma-7B
        ("INTERNLM3", {}, 8_804_241_408),  # InternLM3-8B
        ("BAICHUAN2", {}, 7_505_973_248),  # Baichuan2-7B
    ],
)
def test_7b_sizes_equal_the_published_ones(model_type, fields, published):
    with torch.device("meta"):
        model = MODEL_INITIALIZER.get_module(model_type)(**fields)
    assert sum(p.numel() for p in model.parameters()) == published


@pytest.mark.parametrize(
    "config, published",
    [
        ("qwen3_8B.py", "QWEN3 with 8,190,735,360 parameters (8.19B)"),  # Qwen3-8B's card: 8.2B
        # Qwen3-30B-A3B's card: 30.5B, 3.3B activated
        ("internlm3_8B.py", "INTERNLM3 with 8,804,241,408 parameters (8.80B)"),  # InternLM3-8B: 8.8B
        ("baichuan2_7B.py", "BAICHUAN2 with 7,505,973,248 parameters (7.51B)"),  # Baichuan2-7B: 7.51B
        ("gemma_7B.py", "GEMMA with 8,537,680,896 parameters (8.54B)"),  # Gemma-7B's card: 8.54B
        ("qwen3_30B_A3B.py", "QWEN3MOE with 30,532,122,624 parameters (30.53B), 3,353,032,704 active per token"),
    ],
)
def test_published_configs_dry_run_to_the_published_sizes(config, published, capsys):
    from pytrain.train.__main__ import main

    assert main(["--config", str(CONFIGS / config), "--dry_run"]) == 0
    assert published in capsys.readouterr().out


def test_parameter_names_follow_internevo():
    names = {key: set(random_model(key).state_dict()) for key in ("internlm", "internlm2", "llama2", "qwen2")}
    assert {
        "embedding.weight",
        "blocks.1.mixer.Wqkv.bias",
        "blocks.1.mixer.out_proj.weight",
        "blocks.0.mlp.w3.weight",
        "blocks.0.norm1.weight",
        "blocks.0.norm2.weight",
        "norm.weight",
        "head.weight",
    } <= names["internlm"]
    assert {
        "tok_embeddings.weight",
        "layers.1.attention.wqkv.weight",
        "layers.1.attention.wo.weight",
        "layers.0.feed_forward.w2.weight",
        "layers.0.attention_norm.weight",
        "layers.0.ffn_norm.weight",
        "output.weight",
    } <= names["internlm2"]
    assert {"layers.0.attention.wq.weight", "layers.0.attention.wk.bias", "layers.0.attention.wo.bias"} <= names[
        "llama2"
    ]
    assert {"embed_tokens.weight", "layers.0.attention.wv.bias", "layers.0.attention.wo.weight"} <= names["qwen2"]
    assert "layers.0.attention.wo.bias" not in names["qwen2"]


def test_qk_interleaved_defaults_follow_adapt_hf():
    rotary = lambda model: model.layers["0"].attention.rotary.interleaved
    assert rotary(build_llama2(**TINY)) is True  # LLAMA2's adapt_hf=False
    assert rotary(build_internlm2(**TINY)) is False  # INTERNLM2's adapt_hf=True
    assert rotary(build_llama2(**TINY, adapt_hf=True)) is False
    assert rotary(build_internlm2(**TINY, qk_interleaved=True)) is True  # an explicit value wins


@pytest.mark.parametrize("name", list(VARIANTS))
def test_exported_folder_loads_in_transformers_with_the_same_logits(name, tmp_path):
    model = random_model(name)
    save_hf_folder(model, model.state_dict(), tmp_path, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    # transformers reads model_type "internlm3" (the Hub's InternLM3ForCausalLM folders) into its Llama class
    loaded_as = {"InternLM3ForCausalLM": "LlamaForCausalLM"}
    architecture = hf_config(model)["architectures"][0]
    assert type(theirs).__name__ == loaded_as.get(architecture, architecture)
    ids = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours_logits, their_logits = model(ids), theirs(ids).logits
    assert (ours_logits - their_logits).abs().max() <= 1e-5
    torch.testing.assert_close(loss_of(ours_logits, ids), loss_of(their_logits, ids), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transformers_weights_import_with_the_same_logits_and_round_trip_bitwise(name, tmp_path):
    model = random_model(name)
    config_dict = hf_config(model, "float32")
    config = transformers.AutoConfig.for_model(config_dict.pop("model_type"), **config_dict)
    torch.manual_seed(5)
    theirs = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0.0, 0.2)
    theirs.save_pretrained(tmp_path)
    reader = HFReader(tmp_path)
    state = from_hf_state(model, {k: reader.get(k) for k in reader.weight_map})
    model.load_state_dict(state)
    ids = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max() <= 1e-5
    back = to_hf_state(model, model.state_dict())
    their_state = theirs.state_dict()
    for key, tensor in back.items():
        assert torch.equal(tensor, their_state[key]), key
    again = from_hf_state(model, back)
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


def test_what_hugging_face_cannot_express_is_refused():
    with pytest.raises(ValueError, match="apply_post_layer_norm=True has no Hugging Face"):
        hf_config(build_llama2(**TINY, apply_post_layer_norm=True))
    with pytest.raises(ValueError, match="norm_type='layernorm' has no Hugging Face"):
        hf_config(build_llama2(**TINY, norm_type="layernorm"))
    with pytest.raises(ValueError, match="Qwen2ForCausalLM has biases on q, k and v only"):
        hf_config(build_qwen2(**TINY, o_bias=True))


def test_missing_hugging_face_tensors_are_named(tmp_path):
    model = random_model("llama2")
    state = to_hf_state(model, model.state_dict())
    del state["model.layers.1.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match=r"lack 1 tensor\(s\) .* model.layers.1.self_attn.k_proj.weight"):
        from_hf_state(model, state)
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        HFReader(tmp_path)


def test_a_field_of_another_family_names_both():
    from pytrain.config import Config, ConfigError

    with pytest.raises(
        ConfigError, match=r"model.add_unit_offset = True: not a field of QWEN3 \(its fields: .*head_dim"
    ):
        Config.from_dict(dict(model_type="QWEN3", model=dict(add_unit_offset=True)))
    with pytest.raises(ConfigError, match=r"taken by GEMMA"):
        Config.from_dict(dict(model_type="LLAMA2", model=dict(use_swiglu=False)))
    with pytest.raises(TypeError, match=r"QWEN3 takes no field no_bias; its fields: .*qkv_bias, o_bias"):
        build_qwen3(no_bias=True)


def baichuan2_reference(hf: dict, ids: torch.Tensor, heads: int, eps: float = 1e-6) -> torch.Tensor:
    """Baichuan2-7B's forward as its remote code and InternEvo's BAICHUAN2 compute it, written out over the Hugging
    Face names (no transformers class: trust_remote_code): W_pack [q; k; v], rotate-half rotary (base 1e4), causal
    softmax attention, o_proj, SwiGLU, RMSNorms, and NormHead (the lm_head rows L2-normalised)."""

    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    x = hf["model.embed_tokens.weight"][ids]
    batch, seq, hidden = x.shape
    d = hidden // heads
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * 1e4 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).float()[:, None] for f in (torch.cos, torch.sin))
    causal = torch.ones(seq, seq, dtype=torch.bool).triu(1)
    layers = len({k.split(".")[2] for k in hf if k.startswith("model.layers.")})
    for i in range(layers):
        p = f"model.layers.{i}."
        h = rms(x, hf[p + "input_layernorm.weight"])
        q, k, v = (h @ hf[p + "self_attn.W_pack.weight"].T).view(batch, seq, 3, heads, d).unbind(2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / d**0.5
        attended = torch.einsum("bhqk,bkhd->bqhd", scores.masked_fill(causal, float("-inf")).softmax(-1), v)
        x = x + attended.reshape(batch, seq, hidden) @ hf[p + "self_attn.o_proj.weight"].T
        h = rms(x, hf[p + "post_attention_layernorm.weight"])
        gate, up = h @ hf[p + "mlp.gate_proj.weight"].T, h @ hf[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ hf[p + "mlp.down_proj.weight"].T
    head = torch.nn.functional.normalize(hf["lm_head.weight"], dim=-1)
    return rms(x, hf["model.norm.weight"]) @ head.T


def test_baichuan2_equals_its_reference_both_ways_and_round_trips_bitwise(tmp_path):
    fields = dict(TINY, num_kv_attention_heads=None)  # Baichuan2 is multi-head
    torch.manual_seed(0)
    model = build_baichuan2(**fields)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    ids = torch.randint(0, TINY["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(3))
    save_hf_folder(model, model.state_dict(), tmp_path, dtype=torch.float32)
    reader = HFReader(tmp_path)
    hf_state = {k: reader.get(k) for k in reader.weight_map}
    assert "model.layers.1.self_attn.W_pack.weight" in hf_state and hf_config(model)["architectures"] == [
        "BaichuanForCausalLM"
    ]
    with torch.no_grad():  # pytrain -> HF names: the reference's logits and loss
        ours, theirs = model(ids), baichuan2_reference(hf_state, ids, TINY["num_attention_heads"])
    assert (ours - theirs).abs().max() <= 1e-5
    torch.testing.assert_close(loss_of(ours, ids), loss_of(theirs, ids), rtol=1e-6, atol=1e-6)
    # HF names (random) -> pytrain: the same, and back bitwise
    generator = torch.Generator().manual_seed(5)
    random_hf = {k: torch.randn(v.shape, generator=generator) * 0.2 for k, v in hf_state.items()}
    model.load_state_dict(from_hf_state(model, random_hf))
    with torch.no_grad():
        assert (model(ids) - baichuan2_reference(random_hf, ids, TINY["num_attention_heads"])).abs().max() <= 1e-5
    back = to_hf_state(model, model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in random_hf.items())


def test_a_folder_of_another_class_says_which_model_type_reads_it(tmp_path):
    from pytrain.checkpoint.convert import load_hf_into
    from pytrain.parallel.model_part import ModelPart

    gemma = random_model("gemma")
    save_hf_folder(gemma, gemma.state_dict(), tmp_path, dtype=torch.float32)
    qwen3 = random_model("qwen3")
    with pytest.raises(
        CheckpointError, match=r"holds a GemmaForCausalLM \(model_type 'gemma'\), not the Qwen3ForCausalLM"
    ):
        load_hf_into(ModelPart([qwen3]), qwen3, tmp_path)
    with pytest.raises(CheckpointError, match=r"model_type GEMMA reads it"):
        load_hf_into(ModelPart([qwen3]), qwen3, tmp_path)


def test_a_baichuan2_13b_folder_is_refused_for_its_alibi_attention(tmp_path):
    from pytrain.checkpoint.hf import check_folder_class

    with torch.device("meta"):
        baichuan = build_baichuan2(**TINY)
    config = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan"}
    check_folder_class(baichuan, {**config, "hidden_size": 4096, "num_hidden_layers": 32})  # 7B: rotary
    with pytest.raises(CheckpointError, match=r"Baichuan2-13B, whose attention adds ALiBi .* ALiBi is not available"):
        check_folder_class(baichuan, {**config, "hidden_size": 5120, "num_hidden_layers": 40})
