"""Long context: rotary scaling (rope_type linear / dynamic NTK / llama3, InternEvo's use_dynamic_ntk_rope) and
sliding-window attention (Qwen2's use_sliding_window / sliding_window / max_window_layers), with transformers as the
oracle: its ROPE_INIT_FUNCTIONS for the frequencies, its rotary embedding for the rotated q and k, its
LlamaForCausalLM / Qwen2ForCausalLM for whole models' logits (exported and imported through pytrain.checkpoint.hf).
The attention kernels' windows (CPU SDPA by blocks, the Triton kernels under the interpreter) are checked against
plain float64 attention with the window as a mask.

Tolerances (fp32): frequencies rtol 4e-6 (transformers computes them in fp32, pytrain in float64: the fp32 exponent
i / head_dim alone is off by 6e-8 relative, times ln(base) <= 16); rotated q, k within 2e-5 (positions < 64, fp32
angles); logits within 1e-5 as tests/test_families.py; attention outputs and gradients within 2x PyTorch's own fp32
error plus 2e-5 (tests/test_flash_attn.py's rule).
"""

import itertools
import json

import pytest
import torch
import transformers  # the oracle (in the test extra)
from conftest import CONFIGS
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from pytrain import model_args
from pytrain.checkpoint import CheckpointError
from pytrain.checkpoint.hf import (
    HFReader,
    check_folder_positions,
    from_hf_state,
    hf_config,
    position_fields,
    save_hf_folder,
)
from pytrain.config import Config, ConfigError
from pytrain.kernels import (
    CheckedPositions,
    PackedSequences,
    RopeScaling,
    apply_rotary,
    flash_attn_func,
    flash_attn_varlen_func,
    reference,
)
from pytrain.kernels import rope_scaling as rope_scaling_module
from pytrain.kernels import rotary as rotary_module
from pytrain.model.families import build_internlm2, build_llama2, build_qwen2

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
SEQ = 40  # past every scaled variant's max_position_embeddings / original context below


def hf_rope_parameters(scaling: RopeScaling, base: float) -> dict:
    parameters = {"rope_type": "default" if scaling.rope_type == "normal" else scaling.rope_type, "rope_theta": base}
    if scaling.rope_type != "normal":
        parameters["factor"] = scaling.factor
    if scaling.rope_type == "llama3":
        for name in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            parameters[name] = getattr(scaling, name)
    return parameters


def llama_config(scaling: RopeScaling, base: float, head_dim: int) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=2 * head_dim,
        num_attention_heads=2,
        head_dim=head_dim,
        max_position_embeddings=scaling.max_position_embeddings,
        rope_parameters=hf_rope_parameters(scaling, base),
    )


@st.composite
def scalings(draw):
    rope_type = draw(st.sampled_from(["linear", "dynamic", "llama3"]))
    low = draw(st.floats(0.5, 2.0))
    return RopeScaling(
        rope_type,
        factor=draw(st.floats(1.0, 32.0)),
        max_position_embeddings=draw(st.integers(8, 8192)),
        low_freq_factor=low,
        high_freq_factor=low + draw(st.floats(0.5, 8.0)),
        original_max_position_embeddings=draw(st.integers(16, 16384)),
    )


@settings(max_examples=60, deadline=None)
@given(
    scaling=scalings(),
    head_dim=st.integers(2, 128).map(lambda half: 2 * half),
    base=st.floats(100.0, 1e7),
    length_ratio=st.floats(0.01, 4.0),
)
def test_frequencies_equal_transformers(scaling, head_dim, base, length_ratio):
    """Each type's inv_freq equals ROPE_INIT_FUNCTIONS' for the same config, dynamic below and past its length."""
    seq_len = max(1, int(length_ratio * scaling.max_position_embeddings))
    theirs, attention_factor = ROPE_INIT_FUNCTIONS[scaling.rope_type](
        llama_config(scaling, base, head_dim), "cpu", seq_len=seq_len
    )
    assert attention_factor == 1.0  # none of these types rescales cos and sin
    ours = scaling.inv_freq(head_dim, base, seq_len)
    torch.testing.assert_close(ours, theirs.double(), rtol=4e-6, atol=0)


def test_rope_types_agree_between_the_config_and_the_kernels():
    assert model_args.ROPE_TYPES == rope_scaling_module.ROPE_TYPES


SCALINGS = {
    "linear": RopeScaling("linear", factor=4.0),
    "dynamic": RopeScaling("dynamic", factor=2.0, max_position_embeddings=16),
    "llama3": RopeScaling(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    ),
}


def hf_rotated(q, k, positions, scaling, base):
    """transformers' LlamaRotaryEmbedding + apply_rotary_pos_emb on (batch, seq, heads, head_dim) q and k."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    rotary = LlamaRotaryEmbedding(llama_config(scaling, base, q.shape[-1]))
    cos, sin = rotary(q, positions)
    q_out, k_out = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q_out.transpose(1, 2), k_out.transpose(1, 2)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_rotary_kernel_equals_transformers_rotary_embedding(name):
    """The fused kernel (its cos/sin table built from the scaled frequencies) against transformers' rotation, for
    positions given as a tensor, checked once (CheckedPositions), and packed (the longest document sets dynamic's
    length, as transformers' max(position_ids) + 1 does)."""
    scaling, base = SCALINGS[name], 5e5
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, SEQ, 4, 32, generator=g), torch.randn(2, SEQ, 2, 32, generator=g)
    positions = torch.stack([torch.arange(SEQ), torch.arange(SEQ) + 7])
    want = hf_rotated(q, k, positions, scaling, base)
    for given_positions in (positions, CheckedPositions(positions)):
        got = apply_rotary(q, k, given_positions, base=base, scaling=scaling)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    unscaled = apply_rotary(q, k, positions, base=base)
    assert (unscaled[0] - want[0]).abs().max() > 1e-2  # the scaling changes the rotation at these positions
    lengths = [9, SEQ, 23]  # packed documents, positions restarting at 0 in each
    packed = PackedSequences(torch.tensor([0, *itertools.accumulate(lengths)]))
    q_packed, k_packed = torch.randn(sum(lengths), 4, 32, generator=g), torch.randn(sum(lengths), 2, 32, generator=g)
    got = apply_rotary(q_packed, k_packed, packed, base=base, scaling=scaling)
    want = hf_rotated(q_packed[None], k_packed[None], packed.positions[None], scaling, base)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b[0], rtol=1e-5, atol=2e-5)


def test_dynamic_tables_are_kept_per_length_and_the_oldest_dropped():
    """Dynamic NTK's frequencies depend on each call's length past max_position_embeddings: a table per length,
    the most recent _LENGTH_TABLES kept."""
    scaling = RopeScaling("dynamic", factor=3.0, max_position_embeddings=8)
    g = torch.Generator().manual_seed(2)
    for seq in range(9, 9 + rotary_module._LENGTH_TABLES + 3):
        q, k = torch.randn(1, seq, 2, 16, generator=g), torch.randn(1, seq, 1, 16, generator=g)
        got = apply_rotary(q, k, base=1e4, scaling=scaling)
        want = reference.apply_rotary(q, k, base=1e4, scaling=scaling)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    lengths = [key[4] for key in rotary_module._tables if key[3] == scaling and key[4] is not None]
    assert lengths == list(range(seq - rotary_module._LENGTH_TABLES + 1, seq + 1))


# (builder, fields): each scaling type and the window through a family, against transformers' class
MODELS = {
    "llama3": (
        build_llama2,
        dict(
            rope_type="llama3",
            rope_scaling_factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
            max_position_embeddings=64,
        ),
    ),
    "linear": (build_llama2, dict(rope_type="linear", rope_scaling_factor=4.0, no_bias=True, adapt_hf=True)),
    # InternEvo's switch: dynamic NTK with rope_scaling_factor past max_position_embeddings
    "internevo-dynamic": (
        build_internlm2,
        dict(use_dynamic_ntk_rope=True, rope_scaling_factor=2.0, max_position_embeddings=16, rope_base=1e6),
    ),
    # Qwen2's window on its upper layer; then on every layer (Mistral's), through the CPU SDPA path
    "qwen2-window": (build_qwen2, dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    "qwen2-window-every-layer-sdpa": (
        build_qwen2,
        dict(use_sliding_window=True, sliding_window=5, max_window_layers=0, use_flash_attn=True),
    ),
}


def random_model(name: str, **changes):
    builder, fields = MODELS[name]
    torch.manual_seed(0)
    model = builder(**{**TINY, **fields, **changes})
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    return model


def unscaled_copy(name: str):
    """The same weights without the scaling or the window."""
    plain = {key: value for key, value in MODELS[name][1].items() if key.startswith(("no_bias", "adapt_hf"))}
    builder = MODELS[name][0]
    model = builder(**{**TINY, **plain})
    model.load_state_dict(random_model(name).state_dict())
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_exported_model_has_transformers_logits(name, tmp_path):
    """config.json carries the scaling (rope_parameters, rope_scaling) or the window; transformers' model built
    from it gives the same logits, which differ from the unscaled model's."""
    model = random_model(name)
    save_hf_folder(model, model.state_dict(), tmp_path, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, TINY["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(ids)
        assert (ours - theirs(ids).logits).abs().max() <= 1e-5
        assert (ours - unscaled_copy(name)(ids)).abs().max() > 1e-3
    config = json.loads((tmp_path / "config.json").read_text())
    fields = position_fields(config)
    assert {key: fields[key] for key in MODELS[name][1] if key in fields} == {
        key: value for key, value in MODELS[name][1].items() if key in fields
    }
    check_folder_positions(model, config)


def test_packed_rows_with_a_window_equal_transformers_per_document(tmp_path):
    """Packed documents (cu_seqlens): each is windowed within itself, positions restarting, as transformers runs
    each document alone; through the CPU SDPA path and the reference."""
    model = random_model("qwen2-window-every-layer-sdpa")
    save_hf_folder(model, model.state_dict(), tmp_path, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    lengths = [7, 20, 13]
    ids = torch.randint(0, TINY["vocab_size"], (1, sum(lengths)), generator=torch.Generator().manual_seed(5))
    cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)])
    for use_flash_attn in (True, False):
        for layer in model.decoder_layers.values():
            layer.attention.inner_attention.use_flash_attn = use_flash_attn
        with torch.no_grad():
            packed = model(ids, cu_seqlens=cu_seqlens)[0]
            for start, end in itertools.pairwise(cu_seqlens.tolist()):
                alone = theirs(ids[:, start:end]).logits[0]
                assert (packed[start:end] - alone).abs().max() <= 1e-5


def test_llama31_style_folder_imports_with_transformers_logits_and_exports_back(tmp_path):
    """A transformers LlamaForCausalLM with Llama 3.1's rope_scaling (its context scaled down: 16 pre-trained
    positions, 128 in all): position_fields reads the model fields, the imported weights give transformers' logits,
    and the export writes the same rotary entries back."""
    rope_scaling = dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    )
    config = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=5e5,
        rope_scaling=dict(rope_scaling),  # transformers adds rope_theta to the dict it is given
    )
    torch.manual_seed(4)
    theirs = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for param in theirs.parameters():
            param.normal_(0.0, 0.2)
    theirs.save_pretrained(tmp_path)
    reader = HFReader(tmp_path)
    fields = position_fields(reader.config())
    assert fields == dict(
        rope_base=5e5,
        rope_type="llama3",
        max_position_embeddings=128,
        rope_scaling_factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
        use_sliding_window=False,
    )
    shape = dict(TINY, mlp_ratio=1.5, multiple_of=32, no_bias=True, adapt_hf=True)
    model = build_llama2(**shape, **fields)
    check_folder_positions(model, reader.config())
    model.load_state_dict(from_hf_state(model, {name: reader.get(name) for name in reader.weight_map}))
    ids = torch.randint(0, 96, (2, SEQ), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert (model(ids) - theirs(ids).logits).abs().max() <= 1e-5
    exported = hf_config(model)
    assert exported["rope_parameters"] == {"rope_theta": 5e5, **rope_scaling}
    assert exported["rope_scaling"] == rope_scaling and exported["max_position_embeddings"] == 128
    with pytest.raises(CheckpointError, match=r"set model.rope_base=500000.0, model.rope_type='llama3', .*factor=8.0"):
        check_folder_positions(build_llama2(**shape), reader.config())


def test_transformers4_config_and_layer_types_read():
    """transformers 4's rope_theta + rope_scaling ("type"), transformers 5's layer_types, and what pytrain lacks."""
    old = {"rope_theta": 1e6, "rope_scaling": {"type": "dynamic", "factor": 6.0}, "max_position_embeddings": 32768}
    assert position_fields(old) == dict(
        rope_base=1e6,
        rope_type="dynamic",
        max_position_embeddings=32768,
        rope_scaling_factor=6.0,
        use_sliding_window=False,
    )
    qwen = {"sliding_window": 8, "layer_types": ["full_attention"] * 3 + ["sliding_attention"]}
    window = {key: position_fields(qwen)[key] for key in ("use_sliding_window", "sliding_window", "max_window_layers")}
    assert window == dict(use_sliding_window=True, sliding_window=8, max_window_layers=3)
    mistral = {"model_type": "mistral", "sliding_window": 4096}
    assert position_fields(mistral)["max_window_layers"] == 0
    with pytest.raises(CheckpointError, match=r"rope_type 'yarn' is not available in pytrain"):
        position_fields({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(CheckpointError, match=r"layer_types .* not another pattern"):
        position_fields({"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]})


def test_what_transformers_cannot_express_is_refused():
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has no sliding window: use use_sliding_window=False"):
        hf_config(build_llama2(**TINY, use_sliding_window=True, sliding_window=4))


# ---------------------------------------------------------------------------------------------------
# The attention kernels' windows.


def windowed_oracle(q, k, v, bounds, window, scale):
    """float64 attention per document, causal, each query seeing itself and the `window` keys before it."""
    outs = []
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = (t[start:end].double().transpose(0, 1) for t in (q, k, v))
        group = qs.shape[0] // ks.shape[0]
        ks, vs = ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0)
        offset = torch.arange(end - start)[None, :] - torch.arange(end - start)[:, None]  # key - query
        scores = ((qs @ ks.transpose(-1, -2)) * scale).masked_fill((offset > 0) | (offset < -window), float("-inf"))
        outs.append((scores.softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


def assert_window_matches(fn, lengths, window, q_heads=4, kv_heads=2, head_dim=32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    total, bounds = sum(lengths), [0, *itertools.accumulate(lengths)]
    q, k, v, dout = (torch.randn(total, h, head_dim, generator=g) for h in (q_heads, kv_heads, kv_heads, q_heads))

    def run(f, *tensors):
        inputs = [t.detach().clone().requires_grad_() for t in tensors]
        out = f(*inputs)
        return (out.detach(), *torch.autograd.grad(out, inputs, dout.to(out.dtype)))

    scale = head_dim**-0.5
    got = run(lambda a, b, c: fn(a, b, c, bounds, window), *(t.to(device) for t in (q, k, v)))
    want = run(lambda a, b, c: windowed_oracle(a, b, c, bounds, window, scale), q.double(), k.double(), v.double())
    same_dtype = run(lambda a, b, c: windowed_oracle(a, b, c, bounds, window, scale).float(), q, k, v)
    for name, g_, w, p in zip(("out", "dq", "dk", "dv"), got, want, same_dtype):
        error = (g_.cpu().double() - w).abs().max().item()
        torch_error = (p.double() - w).abs().max().item()
        assert error <= 2 * torch_error + 2e-5, f"{name}: error {error:.3g} vs PyTorch's {torch_error:.3g}"


def cpu_varlen(q, k, v, bounds, window):
    cu_seqlens = torch.tensor(bounds, dtype=torch.int32, device=q.device)
    return flash_attn_varlen_func(q, k, v, cu_seqlens, causal=True, window_size=(window, 0))


@settings(max_examples=15, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=3),
    window=st.integers(0, 35),
    ratio=st.sampled_from([1, 2, 4]),
)
def test_cpu_windowed_attention_property(lengths, window, ratio):
    """SDPA per document with the window (blocks of queries where the window is short) equals the oracle."""
    assert_window_matches(cpu_varlen, lengths, window, q_heads=4, kv_heads=4 // ratio, head_dim=8)


def test_cpu_windowed_attention_spans_several_query_blocks():
    """A sequence longer than the SDPA query block: blocks meet at the window's edge; the batched layout too."""
    assert_window_matches(cpu_varlen, [530, 40], 100, q_heads=2, kv_heads=1, head_dim=8)
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 300, 2, 8, generator=g) for _ in range(3))
    got = flash_attn_func(q, k, v, causal=True, window_size=(90, 0))
    want = reference.attention(q, k, v, causal=True, window_size=(90, 0))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    "lengths, window",
    [([1, 17, 5, 33, 2], 4), ([9, 20], 0), pytest.param([12, 30], 40, marks=pytest.mark.slow)],
)
def test_triton_windowed_attention(triton_device, lengths, window):
    """The Triton kernels with a window: uneven packed documents, GQA, forward and backward (window 0: each query
    sees itself only; 40: past every document, the whole causal context)."""
    assert_window_matches(cpu_varlen, lengths, window, q_heads=4, kv_heads=2, head_dim=32, device=triton_device)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(causal=False, window_size=(3, 0)), r"window_size=\(3, 0\) needs causal=True"),
        (dict(causal=True, window_size=(3, 2)), r"window_size's right must be -1, or 0 with causal=True"),
        (dict(causal=False, window_size=(-1, 4)), r"window_size's right must be -1, or 0 with causal=True"),
        (dict(causal=True, window_size=(-2, 0)), r"window_size's left must be an int >= -1"),
        (dict(causal=True, window_size=3), r"window_size must be a pair \(left, right\)"),
    ],
)
def test_bad_windows(kwargs, message):
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match=message):
        flash_attn_func(q, q, q, **kwargs)


def test_bad_scalings():
    with pytest.raises(ValueError, match=r"rope_type must be one of 'normal', 'linear', 'dynamic', 'llama3'"):
        RopeScaling("yarn")
    with pytest.raises(ValueError, match=r"high_freq_factor \(1.0\) must be greater than low_freq_factor \(2.0\)"):
        RopeScaling("llama3", low_freq_factor=2.0, high_freq_factor=1.0)
    with pytest.raises(ValueError, match=r"factor must be a positive finite number, got 0"):
        RopeScaling("linear", factor=0)
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(TypeError, match=r"scaling must be a RopeScaling or None, got str"):
        apply_rotary(q, q, scaling="linear")


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.rope_type='yarn'", r"model.rope_type = 'yarn': must be one of 'normal', 'linear', 'dynamic', 'llama3'"),
        ("model.rope_scaling_factor=0", r"model.rope_scaling_factor = 0: must be > 0"),
        ("model.sliding_window=0", r"model.sliding_window = 0: must be > 0"),
        ("model.max_window_layers=-1", r"model.max_window_layers = -1: must be >= 0"),
        (
            "model.use_sliding_window=True",
            r"model: sliding_window=None: use_sliding_window=True needs a window, a positive int \(e.g. 4096\)",
        ),
    ],
)
def test_config_errors_name_the_field(override, message):
    with pytest.raises(ConfigError, match=message):
        Config.from_file(CONFIGS / "tiny.py", overrides=[override])


def test_config_cross_field_errors_name_the_fields():
    with pytest.raises(ConfigError, match=r"use_dynamic_ntk_rope=True means rope_type='dynamic' .* set only one"):
        Config.from_file(CONFIGS / "tiny.py", overrides=["model.use_dynamic_ntk_rope=True", "model.rope_type='linear'"])
    with pytest.raises(ConfigError, match=r"high_freq_factor=1.0 must be greater than low_freq_factor=2"):
        Config.from_file(
            CONFIGS / "tiny.py",
            overrides=["model.rope_type='llama3'", "model.low_freq_factor=2", "model.high_freq_factor=1.0"],
        )
    cfg = Config.from_file(CONFIGS / "tiny.py", overrides=["model.use_dynamic_ntk_rope=True"])  # InternEvo's switch
    assert cfg.model.use_dynamic_ntk_rope and "model.use_dynamic_ntk_rope" not in cfg.ignored_here
