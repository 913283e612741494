"""Plain-PyTorch references for every op in pytrain.kernels: the test oracle and the fallback.

They compute in fp32 (or in the input's precision when it is float64, for tests) and return the
input's dtype, as the fused kernels do.
"""

import itertools

import torch
import torch.nn.functional as F

from .packed import PackedSequences
from .rope_scaling import NO_SCALING, RopeScaling


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.to(_compute_dtype(x.dtype))
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * weight.to(xf.dtype)).to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    dtype = _compute_dtype(gate.dtype)
    return (F.silu(gate.to(dtype)) * up.to(dtype)).to(gate.dtype)


def rotary_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    base: float = 10000.0,
    scaling: RopeScaling = NO_SCALING,
    seq_len: int | None = None,
):
    """cos and sin of positions * inv_freq_i, i < head_dim // 2: (*positions.shape, head_dim // 2); inv_freq_i is
    base ** (-2i / head_dim) under `scaling` (pytrain.kernels.rope_scaling). seq_len: the length a "dynamic"
    scaling reads (None: the largest position + 1).

    float64, so the angles of large positions keep their precision; callers round the result once.
    """
    if seq_len is None:  # only "dynamic" reads it; meta tensors (shapes only) have no positions to read
        reads = scaling.rope_type == "dynamic" and positions.numel() and positions.device.type != "meta"
        seq_len = int(positions.max()) + 1 if reads else 1
    inv_freq = scaling.inv_freq(head_dim, base, seq_len, device=positions.device)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = False) -> torch.Tensor:
    """Rotates x (..., heads, head_dim) by cos/sin (..., head_dim // 2), broadcast over heads.

    interleaved=False rotates the two halves of head_dim (LLaMA/NeoX); True rotates adjacent pairs (GPT-J).
    """
    xf = x.to(_compute_dtype(x.dtype))
    cos = cos.unsqueeze(-2).to(xf.dtype)
    sin = sin.unsqueeze(-2).to(xf.dtype)
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return out.to(x.dtype)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor | None = None,
    base: float = 10000.0,
    interleaved: bool = False,
    scaling: RopeScaling = NO_SCALING,
) -> tuple[torch.Tensor, torch.Tensor]:
    """pytrain.kernels.apply_rotary (out of place): q, k (batch, seq, heads, head_dim) with positions None
    (0..seq-1), (seq,) or (batch, seq); or packed (tokens, heads, head_dim) with positions (tokens,)."""
    if positions is None:
        positions = torch.arange(q.shape[1], device=q.device)
    cos, sin = rotary_cos_sin(positions, q.shape[-1], base, scaling)
    return rotate(q, cos, sin, interleaved), rotate(k, cos, sin, interleaved)


def cross_entropy(
    logits, labels, ignore_index: int = -100, label_smoothing: float = 0.0, reduction: str = "mean", z_loss: float = 0.0
):
    """F.cross_entropy over fp32 logits (..., vocab) and labels (...), plus z_loss * logsumexp^2 per token
    (PaLM's z-loss); an fp32 loss. `mean` divides by the non-ignored tokens (NaN when there are none)."""
    x = logits.to(_compute_dtype(logits.dtype)).reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    loss = F.cross_entropy(x, flat_labels, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none")
    valid = flat_labels != ignore_index
    if z_loss:
        loss = loss + z_loss * torch.where(valid, x.logsumexp(-1).square(), 0.0)
    if reduction == "none":
        return loss.reshape(labels.shape)
    return loss.sum() if reduction == "sum" else loss.sum() / valid.sum()


def cross_entropy_shard_statistics(logits, labels, vocab_start: int, ignore_index: int = -100):
    """Per row of a vocab shard (rows, shard_vocab): max, sum exp(x - max), the target logit (0 when the
    label is ignored or in another shard), sum of logits: (rows, 4), what the vocab-parallel kernel writes."""
    x = logits.to(_compute_dtype(logits.dtype))
    row_max = x.amax(-1)
    target = labels - vocab_start
    in_shard = (labels != ignore_index) & (target >= 0) & (target < x.shape[-1])
    target_logit = x.gather(-1, torch.where(in_shard, target, 0)[:, None])[:, 0]
    return torch.stack(
        (row_max, (x - row_max[:, None]).exp().sum(-1), torch.where(in_shard, target_logit, 0.0), x.sum(-1)), dim=-1
    )


def cross_entropy_shard_gradient(
    logits,
    labels,
    lse,
    grad_scale: float,
    vocab_start: int,
    total_vocab: int,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
):
    """d loss / d logits of a vocab shard given the row's logsumexp over all shards, times grad_scale:
    softmax * (1 + 2 z lse) - smoothing / V - (1 - smoothing) * onehot; zero rows where ignored."""
    x = logits.to(_compute_dtype(logits.dtype))
    lse = lse.to(x.dtype)[:, None]
    grad = (x - lse).exp() * (1 + 2 * z_loss * lse) - label_smoothing / total_vocab
    target = labels - vocab_start
    in_shard = (target >= 0) & (target < x.shape[-1])
    onehot = torch.zeros_like(grad).scatter_(-1, torch.where(in_shard, target, 0)[:, None], 1.0)
    grad = grad - (1 - label_smoothing) * onehot * in_shard[:, None]
    return (torch.where((labels != ignore_index)[:, None], grad, 0.0) * grad_scale).to(logits.dtype)


def linear_cross_entropy(
    hidden,
    weight,
    labels,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    z_loss: float = 0.0,
):
    """cross_entropy(hidden @ weight.T, labels): the LM head in the inputs' dtype, then the loss in fp32."""
    return cross_entropy(hidden @ weight.t(), labels, ignore_index, label_smoothing, reduction, z_loss)


def attention(q, k, v, causal: bool = False, scale: float | None = None, cu_seqlens=None, window_size=(-1, -1)):
    """softmax(q k^T * scale) v, computed in fp32 (float64 stays float64), per packed sequence.

    q (..., seq, heads, head_dim) with k/v (..., seq, kv_heads, head_dim), or packed (tokens, heads,
    head_dim) with cu_seqlens (a tensor, read back to the host, or a PackedSequences): tokens of one sequence see
    only each other. k/v heads are repeated for GQA. window_size (left, right), flash-attn's: query i sees keys
    i - left .. i + right of its sequence (-1: unbounded on that side).
    """
    if cu_seqlens is not None:
        bounds = cu_seqlens.bounds if isinstance(cu_seqlens, PackedSequences) else cu_seqlens.tolist()
        return torch.cat(
            [
                attention(q[None, a:b], k[None, a:b], v[None, a:b], causal, scale, window_size=window_size)[0]
                for a, b in itertools.pairwise(bounds)
                if b > a
            ]
            or [q[:0]]
        )
    dtype = _compute_dtype(q.dtype)
    group = q.shape[-2] // k.shape[-2]
    qs, ks, vs = (t.to(dtype).transpose(-3, -2) for t in (q, k, v))  # (..., heads, seq, head_dim)
    ks, vs = ks.repeat_interleave(group, dim=-3), vs.repeat_interleave(group, dim=-3)
    scores = (qs @ ks.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    n = q.shape[-3]
    offset = torch.arange(n, device=q.device)[None, :] - torch.arange(n, device=q.device)[:, None]  # key - query
    hidden = torch.zeros(n, n, dtype=torch.bool, device=q.device)
    left, right = window_size
    if causal:
        hidden |= offset > 0
    if left >= 0:
        hidden |= offset < -left
    if right >= 0:
        hidden |= offset > right
    scores = scores.masked_fill(hidden, float("-inf"))
    return (scores.softmax(-1) @ vs).transpose(-3, -2).to(q.dtype)


def moe_route(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing index of pytrain.kernels.moe_permute: (row_of (T, k) int64, tokens_per_expert (E,) int64).

    Assignment (t, j) to expert e >= 0 gets a row of the expert-grouped buffer: experts ascending, flat
    order t * k + j within an expert (a stable sort); an entry -1 (dropped) gets row -1.
    """
    flat = expert_ids.reshape(-1).long()
    kept = flat >= 0
    key = torch.where(kept, flat, num_experts)  # dropped assignments sort after every expert
    order = torch.sort(key, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    row_of = torch.where(kept, rank, -1).reshape(expert_ids.shape)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, key, torch.ones_like(key))
    return row_of, counts[:num_experts]


def moe_permute(x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int):
    """pytrain.kernels.moe_permute: (permuted (N, H), row_of (T, k), tokens_per_expert (E,)); permuted[row_of[t, j]]
    is x[t]. Differentiable (index_select's gradient sums a token's copies)."""
    row_of, counts = moe_route(expert_ids, num_experts)
    flat = row_of.reshape(-1)
    kept = (flat >= 0).nonzero().squeeze(1)
    source_token = torch.empty(int(counts.sum()), dtype=torch.int64, device=x.device)
    source_token[flat[kept]] = kept // expert_ids.shape[1]
    return x.index_select(0, source_token), row_of, counts


def moe_unpermute(expert_out: torch.Tensor, row_of: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """pytrain.kernels.moe_unpermute: y[t] = sum_j weights[t, j] * expert_out[row_of[t, j]] (rows -1 add 0),
    computed in fp32 (float64 stays float64), returned in expert_out's dtype."""
    dtype = _compute_dtype(expert_out.dtype)
    kept = row_of >= 0
    rows = expert_out.to(dtype)
    rows = torch.cat([rows, rows.new_zeros(1, rows.shape[1])])  # row N: zeros, read by dropped slots
    rows = rows[torch.where(kept, row_of, expert_out.shape[0])]  # (T, k, H)
    scale = torch.where(kept, weights.to(dtype), 0.0)
    return (rows * scale[..., None]).sum(1).to(expert_out.dtype)


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    """pytrain.kernels.grouped_mm: rows of group e (contiguous, in order) times weight[e].T, in fp32 (float64
    stays float64), returned in x's dtype."""
    dtype = _compute_dtype(x.dtype)
    groups = x.to(dtype).split(tokens_per_expert.tolist())
    out = [rows @ weight[e].to(dtype).t() for e, rows in enumerate(groups)]
    return torch.cat(out).to(x.dtype) if out else x.new_empty(0, weight.shape[1])


def adamw_step_(
    params, grads, exp_avgs, exp_avg_sqs, model_params, step, lr, beta1, beta2, eps, weight_decay, grad_scale
):
    """torch.optim.AdamW's single-tensor update, op for op (decoupled weight decay, bias correction), over
    lists of fp32 tensors in place; then each model copy (model_params: one per param, or none) set from its param."""
    bias_correction2_sqrt = (1 - beta2**step) ** 0.5
    step_size = lr / (1 - beta1**step)
    for index, param in enumerate(params):
        grad = grads[index] if grad_scale == 1 else grads[index] * grad_scale
        param.mul_(1 - lr * weight_decay)
        exp_avgs[index].lerp_(grad, 1 - beta1)
        exp_avg_sqs[index].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sqs[index].sqrt() / bias_correction2_sqrt).add_(eps)
        param.addcdiv_(exp_avgs[index], denom, value=-step_size)
        if model_params:
            model_params[index].copy_(param)
