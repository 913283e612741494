"""Selective activation checkpointing (pytrain.parallel.recompute): the gradients equal those without any
checkpointing (fp32, bitwise), with packed rows and combined with model.checkpoint's whole-layer recompute;
the attention core runs again in the backward; the activations a layer keeps shrink; the config's fields."""

import pytest
import torch
from conftest import CONFIGS

from pytrain.config import Config, ConfigError
from pytrain.model.families import LLAMA2
from pytrain.parallel.model_part import parallelize
from pytrain.parallel.recompute import SelectiveCheckpoint, SelectivePolicy

TINY = dict(
    num_layers=4,
    hidden_size=64,
    num_attention_heads=4,
    num_kv_attention_heads=2,
    vocab_size=97,
    multiple_of=16,
    dtype="torch.float32",
    use_flash_attn=False,
)
POLICIES = [SelectiveCheckpoint(SelectivePolicy.ATTENTION), SelectiveCheckpoint(SelectivePolicy.MATMULS)]


def model_part(selective=None, checkpoint=False):
    with torch.device("meta"):
        whole = LLAMA2.build(**TINY, checkpoint=checkpoint)
    return parallelize(whole, device=torch.device("cpu"), selective=selective)


def packed_batch():
    """Two rows of 24 tokens, each holding documents of several lengths back to back."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 97, (2, 24), generator=generator)
    lengths = [5, 11, 8, 3, 17, 4]
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lengths]).view(2, 24)
    return input_ids, positions, cu_seqlens


def saved_bytes_and_grads(part):
    """(bytes autograd saved outside checkpointed regions during the forward, every parameter's gradient)."""
    input_ids, positions, cu_seqlens = packed_batch()
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = part(input_ids=input_ids, positions=positions, cu_seqlens=cu_seqlens)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1)[:-1], input_ids.flatten()[1:]).backward()
    return sum(saved), {name: p.grad for name, p in part.named_parameters()}


@pytest.fixture(scope="module")
def unchecked():
    """(names, saved bytes, gradients) of the model without any checkpointing."""
    part = model_part()
    return [name for name, _ in part.named_parameters()], *saved_bytes_and_grads(part)


@pytest.mark.parametrize(
    "selective, checkpoint",
    [(POLICIES[0], False), (POLICIES[1], 0.5)],
    ids=["attention", "matmuls-with-half-recomputed-whole"],
)
def test_gradients_equal_no_checkpointing_and_fewer_activations_are_kept(selective, checkpoint, unchecked):
    names, plain_bytes, plain = unchecked
    part = model_part(selective, checkpoint)
    assert [name for name, _ in part.named_parameters()] == names  # hooks, not wrappers: names unchanged
    kept_bytes, grads = saved_bytes_and_grads(part)
    for name, grad in plain.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
    assert kept_bytes < plain_bytes


def test_the_attention_policy_recomputes_the_attention_core_of_the_layers_kept_whole(monkeypatch):
    from pytrain.model import decoder

    calls = []
    attention = decoder.reference.attention
    monkeypatch.setattr(decoder.reference, "attention", lambda *a, **k: calls.append(1) or attention(*a, **k))
    saved_bytes_and_grads(model_part())
    plain = len(calls)
    calls.clear()
    saved_bytes_and_grads(model_part(SelectiveCheckpoint(SelectivePolicy.ATTENTION), checkpoint=0.5))
    # 4 layers: the first 2 recomputed whole (their core runs in the forward and again in the recompute), the
    # other 2 selectively (the core alone again in the backward): every core twice
    assert len(calls) == 2 * plain > 0


def test_config_fields():
    base = CONFIGS / "tiny.py"
    cfg = Config.from_file(base, overrides=["selective_checkpoint=True", "selective_checkpoint_policy='matmuls'"])
    assert cfg.selective_checkpoint and cfg.selective_checkpoint_policy == "matmuls"
    with pytest.raises(ConfigError, match=r"selective_checkpoint_policy.*must be one of 'attention', 'matmuls'"):
        Config.from_file(base, overrides=["selective_checkpoint_policy='layers'"])
    with pytest.raises(ConfigError, match="selective_checkpoint_offload: offloads what selective_checkpoint keeps"):
        Config.from_file(base, overrides=["selective_checkpoint_offload=True"])
    with pytest.raises(ConfigError, match="works with selective_checkpoint_policy='attention'"):
        Config.from_file(
            base,
            overrides=[
                "selective_checkpoint=True",
                "selective_checkpoint_policy='matmuls'",
                "selective_checkpoint_offload=True",
            ],
        )
