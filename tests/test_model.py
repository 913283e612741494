import pytest
import torch
from conftest import CONFIGS

from pytrain.config import Config
from pytrain.kernels import RMSNorm, reference
from pytrain.model import LayerNorm, mlp_width
from pytrain.model.families import build_internlm

BASE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=128, dtype="torch.float32")


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_internlm(**{**BASE, **overrides})


def tokens(batch=2, seq=12, vocab=128, seed=1):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def forward_backward(model, ids):
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.roll(-1, 1).flatten())
    loss.backward()
    return logits, loss


def test_mlp_width_rounds_as_internlm():
    assert mlp_width(4096, 8 / 3) == 11008
    assert mlp_width(256, 8 / 3) == 768
    assert mlp_width(64, 4, multiple_of=32) == 256


@pytest.mark.parametrize(
    "dtype, expected",
    [
        ("torch.float32", torch.float32),
        ("torch.tf32", torch.float32),
        ("torch.bfloat16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("torch.half", torch.float16),
    ],
)
def test_dtypes_forward_backward(dtype, expected):
    model = build(dtype=dtype)
    assert all(p.dtype == expected for p in model.parameters())
    logits, loss = forward_backward(model, tokens())
    assert logits.dtype == expected and logits.shape == (2, 12, 128)
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("norm_type, cls", [("rmsnorm", RMSNorm), ("layernorm", LayerNorm)])
@pytest.mark.parametrize("post_norm", [False, True])
def test_norm_types_and_post_layer_norm(norm_type, cls, post_norm):
    model = build(norm_type=norm_type, apply_post_layer_norm=post_norm, layer_norm_epsilon=1e-6)
    assert isinstance(model.norm, cls) and isinstance(model.blocks["0"].norm1, cls)
    assert model.blocks["0"].norm1.eps == 1e-6
    _, loss = forward_backward(model, tokens())
    assert torch.isfinite(loss)


def test_post_layer_norm_changes_the_function():
    ids = tokens()
    assert not torch.allclose(build(apply_post_layer_norm=False)(ids), build(apply_post_layer_norm=True)(ids))


@pytest.mark.parametrize("checkpoint, recomputed", [(False, 0), (True, 4), (0.5, 2), (0.25, 1), (0, 0)])
def test_activation_checkpoint_fraction_keeps_gradients(checkpoint, recomputed):
    ids = tokens()
    reference = build(num_layers=4)
    forward_backward(reference, ids)
    model = build(num_layers=4, checkpoint=checkpoint)
    assert model.recompute_layers == recomputed
    forward_backward(model, ids)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_embed_grad_scale_scales_only_the_embedding_gradient():
    ids = tokens()
    full, scaled = build(), build(embed_grad_scale=0.25)
    full_logits, _ = forward_backward(full, ids)
    scaled_logits, _ = forward_backward(scaled, ids)
    torch.testing.assert_close(full_logits, scaled_logits)
    torch.testing.assert_close(scaled.embedding.weight.grad, 0.25 * full.embedding.weight.grad)
    torch.testing.assert_close(scaled.head.weight.grad, full.head.weight.grad)


@pytest.mark.parametrize("field", ["embed_split_hidden", "parallel_output"])
def test_tensor_parallel_fields_change_nothing_on_one_rank(field):
    ids = tokens()
    torch.testing.assert_close(build(**{field: True})(ids), build(**{field: False})(ids))


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_flash_attention_path_equals_reference_path(kv_heads):
    ids = tokens(seq=17)
    fast = build(use_flash_attn=True, num_kv_attention_heads=kv_heads)
    slow = build(use_flash_attn=False, num_kv_attention_heads=kv_heads)
    fast_logits, _ = forward_backward(fast, ids)
    slow_logits, _ = forward_backward(slow, ids)
    torch.testing.assert_close(fast_logits, slow_logits, rtol=1e-4, atol=1e-5)
    for p, q in zip(fast.parameters(), slow.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


def test_gqa_shrinks_the_kv_projection():
    assert build(num_kv_attention_heads=1).blocks["0"].mixer.Wqkv.out_features == (4 + 2) * 16


def test_causality():
    model = build()
    ids = tokens(seq=10)
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 128
    torch.testing.assert_close(model(ids)[:, :6], model(changed)[:, :6])


def test_7b_builds_on_meta_device_with_its_parameter_count():
    cfg = Config.from_file(CONFIGS / "7B.py")
    with torch.device("meta"):
        model = build_internlm(**cfg.model)
    count = sum(p.numel() for p in model.parameters())
    # 2 * 103168 * 4096 (embedding, head) + 32 * (4 * 4096^2 + 4 * 4096 (Wqkv, out_proj biases)
    # + 3 * 4096 * 11008 + 2 * 4096) + 4096
    layer = 4 * 4096**2 + 4 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert count == 2 * 103168 * 4096 + 32 * layer + 4096 == 7_321_948_160
    assert all(p.device.type == "meta" and p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm"])
def test_fused_residual_stream_equals_the_textbook_pre_norm_decoder(norm_type):
    """x = x + attn(norm1(x)); x = x + mlp(norm2(x)); logits = head(norm(x)) with unfused ops."""
    model = build(norm_type=norm_type, num_layers=3)
    ids = tokens()

    def norm(module, x):
        if norm_type == "rmsnorm":
            return reference.rms_norm(x, module.weight, module.eps)
        return torch.nn.functional.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)

    x = model.embedding(ids)
    for block in model.blocks.values():
        x = x + block.mixer(norm(block.norm1, x))
        x = x + block.mlp(norm(block.norm2, x))
    torch.testing.assert_close(model(ids), model.head(norm(model.norm, x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_flash_attn", [True, False])
def test_packed_documents_equal_separate_rows(use_flash_attn):
    """Three documents packed in one row (positions restart, cu_seqlens) give each document's own logits."""
    model = build(use_flash_attn=use_flash_attn, num_kv_attention_heads=2)
    lengths = [5, 1, 10]
    docs = [tokens(batch=1, seq=n, seed=n) for n in lengths]
    packed = torch.cat(docs, dim=1)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    cu_seqlens = torch.tensor([0, 5, 6, 16], dtype=torch.int32)
    logits = model(packed, positions=positions, cu_seqlens=cu_seqlens, max_seqlen=10)
    for doc, (start, end) in zip(docs, [(0, 5), (5, 6), (6, 16)]):
        torch.testing.assert_close(logits[:, start:end], model(doc), rtol=1e-4, atol=1e-5)
    logits.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_lm_loss_is_the_token_mean_and_zero_when_every_label_is_ignored():
    from pytrain.model import LMLoss

    logits = torch.randn(2, 6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, :3] = -100
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(LMLoss()(logits, labels).double(), want)
    ignored = LMLoss()(logits, torch.full_like(labels, -100))
    ignored.backward()
    assert ignored.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))
