"""The mixture-of-experts layer (pytrain.model.moe) against a plain per-token loop written here: outputs,
gradients of the router, the experts and the input, and the aux loss, for every routing kind.

fp32 tolerances rtol 1e-5 / atol 1e-6: the layer and the loop do the same matmuls on the same rows, only
grouped differently (a token's k contributions are summed in another order), so they differ by a few ulps.
The router's gradient gets atol 1e-5: it is a sum over tokens of O(10) terms through the softmax Jacobian
that largely cancel (for renormalised top-1 weights p / p exactly: 0 analytically, ~1e-6 in fp32), i.e.
~1e-7 relative to the terms.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from host_syncs import no_value_sized_ops
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.checkpoint import checkpoint

from pytrain.model.moe import MoE, MoELayer, Routing, route, routing_from_fields

H, WIDTH = 16, 24
FP32 = dict(rtol=1e-5, atol=1e-6)
ROUTER = dict(rtol=1e-5, atol=1e-5)


def make_layer(routing: Routing, seed=0, shared=None, dtype=torch.float32) -> MoE:
    torch.manual_seed(seed)
    layer = MoE(H, WIDTH, routing, shared)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.3)
    return layer.to(dtype)


def reference_routing(probs: torch.Tensor, routing: Routing, training=True):
    """Per token: its k most probable experts; an expert takes assignments first choices first, each in token
    order, up to its capacity; returns [(token, expert, weight)], the aux loss."""
    tokens, experts = probs.shape
    choices = [torch.argsort(probs[t], descending=True)[: routing.top_k].tolist() for t in range(tokens)]
    capacity = math.inf
    if routing.kind == "GShard" and routing.drop_tokens:
        factor = routing.capacity_factor if training else routing.eval_capacity_factor
        capacity = max(math.ceil(routing.top_k * tokens / experts * factor), routing.min_capacity)
    taken = [0] * experts
    kept = [[] for _ in range(tokens)]
    for c in range(routing.top_k):
        for t in range(tokens):
            e = choices[t][c]
            if taken[e] < capacity:
                taken[e] += 1
                kept[t].append(e)
    assignments = []
    for t in range(tokens):
        total = sum(probs[t, e] for e in kept[t]) if kept[t] else None
        for e in kept[t]:
            weight = probs[t, e] / total.clamp_min(torch.finfo(torch.float32).eps) if routing.normalize else probs[t, e]
            assignments.append((t, e, weight))
    mean_p = probs.mean(0)
    if routing.kind == "GShard":
        fraction = [sum(choices[t][0] == e for t in range(tokens)) / tokens for e in range(experts)]
    else:
        fraction = [sum(e in choices[t] for t in range(tokens)) / (tokens * routing.top_k) for e in range(experts)]
    aux = experts * sum(fraction[e] * mean_p[e] for e in range(experts))
    return assignments, aux


def reference_forward(layer: MoE, x: torch.Tensor, training=True):
    """The layer's output and aux loss, token by token, from the same parameters."""
    moe = layer.moe_layer
    tokens = x.reshape(-1, H)
    probs = torch.softmax(tokens.float() @ moe.gate.wg.weight.float().t(), dim=-1)
    assignments, aux = reference_routing(probs, moe.routing, training)
    w1, w3, w2 = moe.experts.w1, moe.experts.w3, moe.experts.w2
    rows = [torch.zeros(H, dtype=torch.float32) for _ in range(tokens.shape[0])]
    for t, e, weight in assignments:
        xt = tokens[t]
        y = w2[e] @ (F.silu(w1[e] @ xt) * (w3[e] @ xt))
        rows[t] = rows[t] + weight * y.float()
    out = torch.stack(rows).to(x.dtype)
    if layer.shared_kind == "residual":
        mix = torch.softmax(tokens @ layer.coefficient.weight.t() + layer.coefficient.bias, dim=-1)
        out = out * mix[:, :1] + layer.residual_mlp(tokens) * mix[:, 1:]
    elif layer.shared_kind == "shared":
        out = out + torch.sigmoid(tokens @ layer.coefficient.weight.t()) * layer.residual_mlp(tokens)
    return out.view(x.shape), aux


ROUTINGS = {
    "gshard-top1-drops": Routing("GShard", 4, 1, capacity_factor=0.5, min_capacity=0),
    "gshard-top2-drops": Routing("GShard", 4, 2, capacity_factor=0.6, min_capacity=1),
    "gshard-top2-min-capacity": Routing("GShard", 4, 2, capacity_factor=0.1, min_capacity=3),
    "gshard-top2-no-drops": Routing("GShard", 4, 2, drop_tokens=False),
    "gshard-top3": Routing("GShard", 6, 3, capacity_factor=1.0),
    "deepspeed-top1": Routing("GShard", 4, 1, capacity_factor=1.0, min_capacity=0, normalize=False),
    "mixtral": Routing("Dropless", 4, 2, normalize=True),
    "qwen2-moe": Routing("Dropless", 5, 3, normalize=False),
}


def check_against_reference(layer: MoE, x: torch.Tensor, aux_weight=0.37):
    layer.moe_layer.aux_loss_weight = aux_weight
    x1 = x.clone().requires_grad_()
    out = layer(x1)
    probe = torch.randn_like(out)
    (out * probe).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    got_x = x1.grad.clone()
    layer.zero_grad()
    x2 = x.clone().requires_grad_()
    want_out, want_aux = reference_forward(layer, x2)
    ((want_out * probe).sum() + aux_weight * want_aux).backward()
    torch.testing.assert_close(out, want_out, **FP32)
    torch.testing.assert_close(layer.moe_layer.aux_loss, want_aux.detach(), **FP32)
    for name, param in layer.named_parameters():
        want = param.grad if param.grad is not None else torch.zeros_like(param)
        tolerance = ROUTER if name == "moe_layer.gate.wg.weight" else FP32
        torch.testing.assert_close(got[name], want, **tolerance, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(got_x, x2.grad, **FP32)
    return got


@pytest.mark.parametrize("name", sorted(ROUTINGS))
def test_layer_equals_the_per_token_loop(name):
    layer = make_layer(ROUTINGS[name])
    x = torch.randn(3, 7, H)
    grads = check_against_reference(layer, x)
    assert grads["moe_layer.gate.wg.weight"].abs().sum() > 0  # the router is trained (aux loss at least)


def test_capacity_really_drops_and_unlimited_does_not():
    x = torch.randn(40, H)
    logits = x @ torch.randn(H, 4)
    drops = Routing("GShard", 4, 2, capacity_factor=0.5, min_capacity=0)
    ids, weights, _, counts = route(logits, drops, training=True)
    kept = torch.bincount(ids[ids >= 0], minlength=4)
    assert (ids < 0).any() and (kept <= math.ceil(2 * 40 / 4 * 0.5)).all() and counts.sum() == 80
    assert (weights[ids < 0] == 0).all()
    ids, _, _, _ = route(logits, Routing("GShard", 4, 2, drop_tokens=False), training=True)
    assert (ids >= 0).all()
    # eval uses eval_capacity_factor
    lenient = Routing("GShard", 4, 2, capacity_factor=0.5, eval_capacity_factor=4.0, min_capacity=0)
    assert (route(logits, lenient, training=False)[0] >= 0).all() and (
        route(logits, lenient, training=True)[0] < 0
    ).any()


def test_an_expert_without_tokens_gets_zero_gradients():
    layer = make_layer(Routing("Dropless", 4, 2))
    x = torch.rand(2, 5, H) + 0.5  # positive inputs, and expert 3's router row strongly negative
    with torch.no_grad():
        layer.moe_layer.gate.wg.weight[3] = -5.0
    grads = check_against_reference(layer, x)
    assert int(layer.moe_layer.tokens_per_expert[3]) == 0
    for part in ("w1", "w3", "w2"):
        assert grads[f"moe_layer.experts.{part}"][3].abs().max() == 0
        assert grads[f"moe_layer.experts.{part}"][:3].abs().max() > 0


@pytest.mark.parametrize("shared", [("residual", 32), ("shared", 40)])
def test_residual_moe_and_shared_expert(shared):
    layer = make_layer(Routing("GShard", 4, 2, capacity_factor=0.75, min_capacity=0), shared=shared)
    if shared[0] == "residual":
        assert layer.coefficient.weight.shape == (2, H) and layer.coefficient.bias is not None
    else:
        assert layer.coefficient.weight.shape == (1, H) and layer.coefficient.bias is None
    check_against_reference(layer, torch.randn(2, 6, H))


def test_aux_loss_gradient_is_the_weight_set_on_the_layer():
    """d/d(router) of (out . 0) is the aux loss's gradient times aux_loss_weight exactly."""
    layer = make_layer(Routing("Dropless", 4, 2))
    x = torch.randn(10, H)
    grads = []
    for weight in (1.0, 3.0):
        layer.zero_grad()
        layer.moe_layer.aux_loss_weight = weight
        (layer(x) * 0).sum().backward()
        grads.append(layer.moe_layer.gate.wg.weight.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], 3 * grads[0], **FP32)
    layer.zero_grad()
    probs = torch.softmax(x @ layer.moe_layer.gate.wg.weight.t(), -1)
    _, aux = reference_routing(probs, layer.moe_layer.routing)
    aux.backward()
    torch.testing.assert_close(grads[0], layer.moe_layer.gate.wg.weight.grad, **FP32)


def test_recompute_gives_the_same_gradients_and_counts_the_aux_loss_once():
    layer = make_layer(Routing("GShard", 4, 2, capacity_factor=0.75, min_capacity=0))
    layer.moe_layer.aux_loss_weight = 0.5
    x = torch.randn(2, 6, H)
    grads = []
    for recompute in (False, True):
        layer.zero_grad()
        layer.moe_layer.reset_aux_losses()
        out = checkpoint(layer, x, use_reentrant=False) if recompute else layer(x)
        out.square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in layer.named_parameters()})
        assert layer.moe_layer.aux_loss_count == 1
        torch.testing.assert_close(layer.moe_layer.aux_loss_sum, layer.moe_layer.aux_loss)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], **FP32)


def test_bf16_smoke():
    """bf16 weights and activations (router in fp32): within 3e-2 of the fp32 layer on the same weights,
    routing decisions taken from the same fp32 logits where the rounded inputs agree."""
    routing = Routing("Dropless", 4, 2)
    layer32 = make_layer(routing)
    layer16 = make_layer(routing, dtype=torch.bfloat16)
    x = torch.randn(4, 8, H)
    out16 = layer16(x.bfloat16().requires_grad_())
    out16.float().sum().backward()
    assert out16.dtype == torch.bfloat16 and torch.isfinite(out16.float()).all()
    with torch.no_grad():
        for p32, p16 in zip(layer32.parameters(), layer16.parameters()):
            p32.copy_(p16.float())
        out32 = layer32(x.bfloat16().float())
    torch.testing.assert_close(out16.float(), out32, rtol=3e-2, atol=3e-2)
    assert all(torch.isfinite(p.grad.float()).all() for p in layer16.parameters())


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 40),
    experts=st.integers(2, 8),
    data=st.data(),
)
def test_routing_matches_the_queue_simulation(tokens, experts, data):
    k = data.draw(st.integers(1, experts))
    kind = data.draw(st.sampled_from(["GShard", "Dropless"]))
    routing = Routing(
        kind,
        experts,
        k,
        capacity_factor=data.draw(st.floats(0.05, 2.0)),
        min_capacity=data.draw(st.integers(0, 5)),
        drop_tokens=data.draw(st.booleans()),
        normalize=data.draw(st.booleans()),
    )
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    logits = torch.randn(tokens, experts, generator=generator)
    ids, weights, aux, _ = route(logits, routing, training=True)
    assignments, want_aux = reference_routing(torch.softmax(logits, -1), routing)
    got = {(t, int(e)): weights[t, c] for t in range(tokens) for c, e in enumerate(ids[t]) if e >= 0}
    want = {(t, e): w for t, e, w in assignments}
    assert sorted(got) == sorted(want)
    torch.testing.assert_close(
        torch.stack([got[a] for a in sorted(want)]), torch.stack([want[a] for a in sorted(want)])
    )
    assert (weights[ids < 0] == 0).all()
    torch.testing.assert_close(aux, torch.as_tensor(want_aux, dtype=torch.float32), **FP32)
    capacity = routing.capacity(tokens, True)
    if capacity is not None:
        assert (torch.bincount(ids[ids >= 0], minlength=experts) <= capacity).all()


def test_fields_that_would_be_random_or_are_missing_are_refused():
    with pytest.raises(ValueError, match=r"Gumbel noise: not available"):
        routing_from_fields("GShard", 4, 2, dict(use_fused_gating=False))
    with pytest.raises(ValueError, match=r"random token selection .* not available"):
        routing_from_fields("GShard", 4, 1, dict(use_fused_gating=False))
    with pytest.raises(ValueError, match=r"noisy_gate_policy'\] = 'Jitter' is not available"):
        routing_from_fields("GShard", 4, 2, dict(noisy_gate_policy="Jitter"))
    with pytest.raises(ValueError, match=r"capacity_factor'\] = 1.0 is not available in pytrain \(Dropless with a"):
        routing_from_fields("Dropless", 4, 2, dict(capacity_factor=1.0))
    with pytest.raises(ValueError, match=r"MegaBlocks\) is not available"):
        routing_from_fields("MegaBlock", 4, 2, None)
    with pytest.raises(ValueError, match=r"not a setting of moe_type 'Dropless'"):
        routing_from_fields("Dropless", 4, 2, dict(min_capacity=4))
    top1, ignored = routing_from_fields(
        "GShard", 4, 1, dict(use_fused_gating=False, use_rts=False, use_grouped_mlp=False)
    )
    assert not top1.normalize and ignored == ("use_grouped_mlp",)
    fused, _ = routing_from_fields(None, 4, 2, None)
    assert fused == Routing("GShard", 4, 2, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4)


def test_dispatcher_contract():
    """dispatch groups rows by expert in token order; combine is the weighted sum, dropped rows are 0."""
    layer = MoELayer(H, WIDTH, Routing("Dropless", 3, 2))
    x = torch.randn(4, H)
    ids = torch.tensor([[2, 0], [0, -1], [1, 2], [-1, -1]])
    x_sorted, per_expert, state = layer.dispatcher.dispatch(x, ids)
    assert per_expert.tolist() == [2, 1, 2] and per_expert.dtype == torch.int64
    torch.testing.assert_close(x_sorted, x[[0, 1, 2, 0, 2]])
    weights = torch.rand(4, 2, requires_grad=True)
    y = torch.randn(5, H)
    out = layer.dispatcher.combine(y, weights, state)
    want = torch.stack(
        [
            weights[0, 0] * y[3] + weights[0, 1] * y[0],
            weights[1, 0] * y[1],
            weights[2, 0] * y[2] + weights[2, 1] * y[4],
            torch.zeros(H),
        ]
    )
    torch.testing.assert_close(out, want, **FP32)
    out.sum().backward()
    assert weights.grad[1, 1] == 0 and weights.grad[3].abs().sum() == 0 and weights.grad[0].abs().sum() > 0


@pytest.mark.parametrize("name", ["gshard-top2-drops", "mixtral"])
def test_layer_reads_nothing_back_on_the_gpu_path(name, triton_device, forbid_host_reads):
    """The layer's forward and backward through the GPU's kernels: no Tensor.tolist / .item and no op sized by its
    input's values (torch.bincount, nonzero, ...), which a GPU would wait for; GShard's dropped assignments run as
    zero-weight rows (the per-token loop drops them), the gradients are the same."""
    layer = make_layer(ROUTINGS[name]).to(triton_device)
    layer.moe_layer.aux_loss_weight = 0.37
    x = torch.randn(3, 7, H, device=triton_device)
    probe = torch.randn(3, 7, H, device=triton_device)
    x1 = x.clone().requires_grad_()
    with forbid_host_reads(), no_value_sized_ops():
        out = layer(x1)
        (out * probe).sum().backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad()
    x2 = x.clone().requires_grad_()
    want_out, want_aux = reference_forward(layer, x2)
    ((want_out * probe).sum() + 0.37 * want_aux).backward()
    if ROUTINGS[name].kind == "GShard":
        assert layer.moe_layer.tokens_per_expert.max() > ROUTINGS[name].capacity(21, True)  # some really dropped
    tolerance = dict(rtol=1e-4, atol=1e-5)  # the interpreter's dots sum in another order than torch's matmuls
    torch.testing.assert_close(out, want_out, **tolerance)
    for n, param in layer.named_parameters():
        torch.testing.assert_close(got[n], param.grad, **tolerance, msg=lambda m: f"{n}: {m}")
    torch.testing.assert_close(x1.grad, x2.grad, **tolerance)
