"""The decoder every dense family shares, written plain: linears, nn.Embedding, norms, no parallelism.

token embedding (Gemma: times sqrt(hidden)) -> layers (attention with rotary embeddings, SwiGLU MLP or
Gemma's GeGLU; a norm before each, or after the residual add with post_norm) -> final norm -> LM head.
The families (families.py) differ in how q, k and v are projected (one fused [q | k | v] weight,
InternLM2's grouped wqkv, or three weights), in biases, and in parameter names, which follow each
family's InternEvo checkpoints (`Names`). Layers live in a ModuleDict keyed by their global index, so a
pipeline stage is the same model with the other layers (and the embedding or the head) removed and every
name unchanged.

Tensor parallelism is applied from outside (pytrain.parallel.tensor): `tensor_parallel_plan()` says
which module is split how, and the swapped-in modules keep the plain modules' names and forward. The
attention therefore reads its head counts from the projections' output sizes, never from a constant.

Attention itself (softmax(q k^T) v over the heads, within each document) is a module of its own without
weights, `InnerAttention`, so that a sequence- or context-parallel layout can replace or wrap it from
outside as tensor parallelism swaps the linears.

Norms, rotary embeddings and attention go through pytrain.kernels. Pre-norm layers hand the residual
stream to the next norm, which adds it in the same pass (rms_norm's fused residual). Packed rows
(documents back to back) carry positions restarting per document and cu_seqlens over the flattened
tokens, so no document attends to another. For long context, the rotary frequencies may be scaled
(rope_type: linear, dynamic NTK, Llama 3.1's; pytrain.kernels.rope_scaling) and layers may attend through a
sliding window (Qwen2's use_sliding_window / sliding_window / max_window_layers).

A family may give its layers another MLP (decoder_layers' `mlp`): the mixtures of experts (moe.py) are
these layers with an MoE in the MLP's place; its plan() is empty, so tensor parallelism leaves it whole.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute

from pytrain.kernels import (
    CheckedPositions,
    Linear,
    PackedSequences,
    RMSNorm,
    RopeScaling,
    RotaryEmbedding,
    flash_attn_func,
    flash_attn_varlen_func,
    linear,
    reference,
    swiglu,
)
from pytrain.model_args import ROPE_FIELDS, DecoderArgs, layer_windows, mlp_width, rope_scaling_from_fields

DTYPES = {
    "torch.float16": torch.float16,
    "torch.half": torch.float16,
    "torch.bfloat16": torch.bfloat16,
    "torch.float32": torch.float32,
    "torch.tf32": torch.float32,
}


# How a module is split over the tensor-parallel group (see pytrain.parallel.tensor).
@dataclass(frozen=True)
class Colwise:
    """Output features split; `segments`: the parts a fused weight is made of, each split evenly."""

    segments: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Rowwise:
    """Input features split; the partial outputs are summed (a residual-stream output projection)."""


@dataclass(frozen=True)
class VocabHead:
    """The LM head: split over the vocabulary; gather_output: all logits on every rank; normalized: each row
    (a rank's rows whole) L2-normalised at use (Baichuan2's NormHead)."""

    gather_output: bool
    normalized: bool = False


@dataclass(frozen=True)
class EmbeddingSplit:
    """The token embedding split along hidden (split_hidden) or the vocabulary."""

    split_hidden: bool


@dataclass(frozen=True)
class Replicated:
    """Whole on every tensor rank (norms); under sequence parallelism it sees only this rank's tokens.
    over_heads: it acts on each of this rank's attention heads (Qwen3's q/k norms), so a rank's gradient
    covers its heads only, and the ranks' gradients are summed in every tensor mode."""

    over_heads: bool = False


@dataclass(frozen=True)
class Names:
    """What a family calls each part (its InternEvo checkpoint keys)."""

    embedding: str
    layers: str
    attention: str
    mlp: str
    attention_norm: str
    mlp_norm: str
    norm: str = "norm"
    head: str = "head"


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose parameters may be fp32 while activations are 16-bit (config use_fp32_norm)."""

    def forward(self, x, residual=None):
        """y, or with `residual` (y, x + residual), as RMSNorm."""
        if residual is not None:
            total = x + residual
            return self.forward(total), total
        weight = self.weight
        return F.layer_norm(x.to(weight.dtype), self.normalized_shape, weight, self.bias, self.eps).to(x.dtype)


def build_norm(norm_type: str, hidden_size: int, eps: float, unit_offset: bool = False) -> nn.Module:
    if norm_type == "rmsnorm":
        return RMSNorm(hidden_size, eps=eps, unit_offset=unit_offset)
    if unit_offset:
        raise ValueError("add_unit_offset=True scales an RMSNorm: it needs norm_type='rmsnorm'")
    if norm_type == "layernorm":
        return LayerNorm(hidden_size, eps=eps)
    raise ValueError(f"norm_type must be 'rmsnorm' or 'layernorm', got {norm_type!r}")


def add_and_norm(norm, hidden, residual):
    """(norm(hidden + residual), hidden + residual); the first layer has no residual yet."""
    return (norm(hidden), hidden) if residual is None else norm(hidden, residual)


@dataclass(frozen=True)
class AttentionShape:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def q_width(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_kv_heads * self.head_dim


class InnerAttention(nn.Module):
    """softmax(q k^T * softmax_scale) v per head, causal, each packed document attending only to itself: the
    attention call alone, holding no weights (the seam a sequence- or context-parallel layout replaces or
    wraps). q (batch, seq, heads, head_dim), k and v (batch, seq, kv_heads, head_dim) -> like q.
    sliding_window: each query sees only the last sliding_window tokens of its document, itself included
    (transformers' meaning; flash-attn's window_size=(sliding_window - 1, 0)); None: all earlier ones."""

    def __init__(
        self,
        use_flash_attn: bool,
        causal: bool = True,
        softmax_scale: float | None = None,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.use_flash_attn, self.causal, self.softmax_scale = use_flash_attn, causal, softmax_scale
        self.sliding_window = sliding_window
        self.window_size = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)

    def forward(self, q, k, v, packed: PackedSequences | None = None):
        options = dict(causal=self.causal, softmax_scale=self.softmax_scale, window_size=self.window_size)
        if packed is None:
            if self.use_flash_attn:
                return flash_attn_func(q, k, v, **options)
            return reference.attention(q, k, v, self.causal, self.softmax_scale, window_size=self.window_size)
        batch, seq = q.shape[:2]  # the packed documents run over the flattened tokens
        q, k, v = (t.reshape(batch * seq, *t.shape[2:]) for t in (q, k, v))
        if self.use_flash_attn:
            out = flash_attn_varlen_func(q, k, v, packed, **options)
        else:
            out = reference.attention(q, k, v, self.causal, self.softmax_scale, packed, window_size=self.window_size)
        return out.reshape(batch, seq, *out.shape[1:])

    def extra_repr(self) -> str:
        return "" if self.sliding_window is None else f"sliding_window={self.sliding_window}"


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings (GQA/MQA when there are fewer kv heads). Subclasses
    project x (batch, seq, hidden) to q (batch, seq, heads, head_dim), k and v (batch, seq, kv_heads,
    head_dim) in `project`, and say how their weights split over tensor ranks in `projection_plan`.
    rope_scaling: a long-context rotary scaling (None: none); sliding_window: InnerAttention's."""

    def __init__(
        self,
        shape: AttentionShape,
        rope_base: float,
        qk_interleaved: bool,
        use_flash_attn: bool,
        qk_norm_eps: float | None = None,
        rope_scaling: RopeScaling | None = None,
        sliding_window: int | None = None,
    ):
        super().__init__()
        self.shape, self.head_dim = shape, shape.head_dim  # the whole model's (a tensor rank holds some heads)
        self.rotary = RotaryEmbedding(shape.head_dim, base=rope_base, interleaved=qk_interleaved, scaling=rope_scaling)
        self.inner_attention = InnerAttention(use_flash_attn, sliding_window=sliding_window)
        if qk_norm_eps is not None:  # Qwen3: RMSNorm over each head's q and k, before the rotary embedding
            self.q_norm = RMSNorm(shape.head_dim, eps=qk_norm_eps)
            self.k_norm = RMSNorm(shape.head_dim, eps=qk_norm_eps)
        self.qk_norm = qk_norm_eps is not None

    def output(self, attended: torch.Tensor) -> torch.Tensor:
        return self.wo(attended)

    def plan(self) -> dict:
        """How the projections (a subclass's `projection_plan`) and the q/k norms split over tensor ranks."""
        norms = {"q_norm": Replicated(over_heads=True), "k_norm": Replicated(over_heads=True)} if self.qk_norm else {}
        return self.projection_plan() | norms

    def forward(self, x, positions=None, packed: PackedSequences | None = None):
        q, k, v = self.project(x)  # this rank's heads of the whole sequence, also under sequence parallelism
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # positions, when given, are each token's (a sequence-parallel rank's part of packed documents); else the
        # packed documents' restart at 0 per document
        q, k = self.rotary(q, k, packed if positions is None else positions)
        attended = self.inner_attention(q, k, v, packed)
        return self.output(attended.flatten(2))


def _heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    return t.view(*t.shape[:2], -1, head_dim)


class FusedQKVAttention(Attention):
    """One fused weight: all q heads, then all k heads, then all v heads (InternLM v1's Wqkv, Baichuan2's wqkv,
    named `qkv_name`); out_proj, biased as the fused weight unless out_bias says otherwise."""

    def __init__(
        self, shape: AttentionShape, bias: bool, qkv_name: str = "Wqkv", out_bias: bool | None = None, **kwargs
    ):
        super().__init__(shape, **kwargs)
        self.kv_share = shape.num_heads // shape.num_kv_heads  # q heads per kv head, the same on every rank
        self.qkv_name = qkv_name
        self.add_module(qkv_name, Linear(shape.hidden_size, shape.q_width + 2 * shape.kv_width, bias=bias))
        self.out_proj = Linear(shape.q_width, shape.hidden_size, bias=bias if out_bias is None else out_bias)
        self.segments = (shape.q_width, shape.kv_width, shape.kv_width)

    def project(self, x):
        qkv = _heads(self._modules[self.qkv_name](x), self.head_dim)
        kv_heads = qkv.shape[2] // (self.kv_share + 2)
        return qkv.split([kv_heads * self.kv_share, kv_heads, kv_heads], dim=2)

    def output(self, attended):
        return self.out_proj(attended)

    def projection_plan(self) -> dict:
        return {self.qkv_name: Colwise(self.segments), "out_proj": Rowwise()}


class GroupedQKVAttention(Attention):
    """One wqkv weight in kv-head groups: each group's query heads, then its k head, then its v head
    (InternLM2's layout), so a tensor rank's shard is whole groups; wo."""

    def __init__(self, shape: AttentionShape, bias: bool, **kwargs):
        super().__init__(shape, **kwargs)
        self.kv_share = shape.num_heads // shape.num_kv_heads
        self.wqkv = Linear(shape.hidden_size, shape.q_width + 2 * shape.kv_width, bias=bias)
        self.wo = Linear(shape.q_width, shape.hidden_size, bias=bias)

    def project(self, x):
        qkv = self.wqkv(x)  # the whole sequence, also when x is this rank's part of it (sequence parallel)
        groups = qkv.view(*qkv.shape[:2], -1, self.kv_share + 2, self.head_dim)
        q = groups[:, :, :, : self.kv_share].flatten(2, 3)  # a copy: a group's heads are not evenly strided
        return q, groups[:, :, :, self.kv_share].contiguous(), groups[:, :, :, self.kv_share + 1].contiguous()

    def projection_plan(self) -> dict:
        return {"wqkv": Colwise(), "wo": Rowwise()}


class SeparateQKVAttention(Attention):
    """wq, wk, wv and wo (LLaMA, Qwen2); qkv_bias on the three projections, o_bias on wo."""

    def __init__(self, shape: AttentionShape, qkv_bias: bool, o_bias: bool, **kwargs):
        super().__init__(shape, **kwargs)
        self.wq = Linear(shape.hidden_size, shape.q_width, bias=qkv_bias)
        self.wk = Linear(shape.hidden_size, shape.kv_width, bias=qkv_bias)
        self.wv = Linear(shape.hidden_size, shape.kv_width, bias=qkv_bias)
        self.wo = Linear(shape.q_width, shape.hidden_size, bias=o_bias)

    def project(self, x):
        return tuple(_heads(proj(x), self.head_dim) for proj in (self.wq, self.wk, self.wv))

    def projection_plan(self) -> dict:
        return {"wq": Colwise(), "wk": Colwise(), "wv": Colwise(), "wo": Rowwise()}


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): w1 the gate, w3 up, w2 down (InternEvo's current meaning in every family)."""

    def __init__(self, hidden_size: int, width: int, bias: bool = False):
        super().__init__()
        self.w1 = Linear(hidden_size, width, bias=bias)
        self.w3 = Linear(hidden_size, width, bias=bias)
        self.w2 = Linear(width, hidden_size, bias=bias)

    def forward(self, x):
        # through the modules, not their weights: tensor parallelism swaps them for ones with collectives;
        # silu(gate) * up fused: one pass each way, and no silu-sized tensor kept for the backward
        return self.w2(swiglu(self.w1(x), self.w3(x)))

    def plan(self) -> dict:
        return {"w1": Colwise(), "w3": Colwise(), "w2": Rowwise()}


class NormHead(Linear):
    """The LM head with each vocabulary row L2-normalised at use (Baichuan2's NormHead, InternEvo's norm_head):
    the weight is stored as trained, the logits are x . w_v / |w_v|."""

    def __init__(self, hidden_size: int, vocab_size: int):
        super().__init__(hidden_size, vocab_size, bias=False)

    def forward(self, x):
        return linear(x, F.normalize(self.weight, dim=-1))


class GeGLU(SwiGLU):
    """w2(gelu(w1 x) * w3 x) with the tanh-approximate GELU (Gemma's MLP); SwiGLU's weights and plan."""

    def forward(self, x):
        return self.w2(F.gelu(self.w1(x), approximate="tanh") * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, names: Names, attention: Attention, mlp: SwiGLU, norms: tuple, post_norm: bool):
        super().__init__()
        self.names, self.post_norm = names, post_norm
        self.add_module(names.attention, attention)
        self.add_module(names.mlp, mlp)
        self.add_module(names.attention_norm, norms[0])
        self.add_module(names.mlp_norm, norms[1])

    def forward(self, hidden, residual=None, positions=None, packed=None):
        """Pre-norm: returns (this layer's MLP output, the residual stream before it); the add happens in
        the next norm. Post-norm: returns (the normalized stream, None)."""
        n = self._modules
        attention, mlp = n[self.names.attention], n[self.names.mlp]
        norm1, norm2 = n[self.names.attention_norm], n[self.names.mlp_norm]
        if self.post_norm:
            hidden = norm1(hidden + attention(hidden, positions, packed))
            return norm2(hidden + mlp(hidden)), None
        normed, residual = add_and_norm(norm1, hidden, residual)
        hidden = attention(normed, positions, packed)
        normed, residual = add_and_norm(norm2, hidden, residual)
        return mlp(normed), residual


class Decoder(nn.Module):
    """A decoder-only language model, or a pipeline stage of one (see the module docstring).

    forward(input_ids) -> logits (batch, seq, vocab); a stage without the embedding takes the previous
    stage's residual stream as hidden_states, one without the head returns its residual stream.
    """

    def __init__(
        self, family: str, names: Names, layers: list[DecoderLayer], args: DecoderArgs, scale_embeddings: bool = False
    ):
        super().__init__()
        self.family, self.names = family, names
        hidden_size, vocab_size = args.hidden_size, args.vocab_size
        self.num_layers, self.hidden_size, self.vocab_size = len(layers), hidden_size, vocab_size
        self.embed_grad_scale = float(args.embed_grad_scale)
        self.scale_embeddings = scale_embeddings  # Gemma: the embeddings times sqrt(hidden_size)
        self.tie_word_embeddings = args.tie_word_embeddings
        # How the model is trained, kept for whoever parallelizes and materializes it (pytrain.parallel):
        self.dtype = DTYPES[args.dtype] if isinstance(args.dtype, str) else args.dtype
        self.checkpoint_fraction = float(args.checkpoint)
        self.embed_split_hidden, self.parallel_output = args.embed_split_hidden, args.parallel_output
        self.recompute_layers = int(len(layers) * self.checkpoint_fraction)  # the first ones (per stage)
        self.max_position_embeddings = args.max_position_embeddings  # what the exported HF config says
        self.add_module(names.embedding, nn.Embedding(vocab_size, hidden_size))
        self.add_module(names.layers, nn.ModuleDict({str(i): layer for i, layer in enumerate(layers)}))
        self.add_module(
            names.norm, build_norm(args.norm_type, hidden_size, args.layer_norm_epsilon, args.add_unit_offset)
        )
        head = NormHead(hidden_size, vocab_size) if args.norm_head else Linear(hidden_size, vocab_size, bias=False)
        self.add_module(names.head, head)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.to(self.dtype)  # on the meta device (initialize_model) this only records the dtype

    # The parts by role (a pipeline stage holds None for those it does not have).
    token_embedding = property(lambda self: self._modules.get(self.names.embedding))
    decoder_layers = property(lambda self: self._modules[self.names.layers])
    final_norm = property(lambda self: self._modules.get(self.names.norm))
    lm_head = property(lambda self: self._modules.get(self.names.head))
    first = property(lambda self: self.token_embedding is not None)
    last = property(lambda self: self.lm_head is not None)

    def tensor_parallel_plan(self) -> dict:
        """{module name pattern ('*' = any layer index): how it is split over the tensor group}."""
        n = self.names
        plan = {
            n.embedding: EmbeddingSplit(self.embed_split_hidden),
            n.norm: Replicated(),
            n.head: VocabHead(gather_output=not self.parallel_output, normalized=isinstance(self.lm_head, NormHead)),
        }
        for layer in self.decoder_layers.values():  # every layer: a family may mix dense and MoE MLPs
            for part in (n.attention, n.mlp):
                part_plan = layer.get_submodule(part).plan()
                plan.update({f"{n.layers}.*.{part}.{name}": how for name, how in part_plan.items()})
        plan.update({f"{n.layers}.*.{norm}": Replicated() for norm in (n.attention_norm, n.mlp_norm)})
        return plan

    def residual_outputs(self) -> tuple[str, ...]:
        """Name patterns of the parameters writing into the residual stream (initialised smaller, GPT-2): the
        row-parallel projections' weights, and what an MoE MLP names (its experts' and residual MLP's down
        projections, moe.py)."""
        n = self.names
        rowwise = [f"{k}.weight" for k, v in self.tensor_parallel_plan().items() if isinstance(v, Rowwise)]
        extra = {
            f"{n.layers}.*.{n.mlp}.{name}"
            for layer in self.decoder_layers.values()
            for name in getattr(layer.get_submodule(n.mlp), "residual_outputs", tuple)()
        }
        return (*rowwise, *sorted(extra))

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        positions: "torch.Tensor | CheckedPositions | None" = None,
        cu_seqlens: "torch.Tensor | PackedSequences | None" = None,
        max_seqlen: int | None = None,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Packed documents: cu_seqlens (documents + 1,) over the batch * seq flattened tokens, best as a
        PackedSequences built once per micro-batch from the host's boundaries (a tensor is checked here,
        once, which reads it back to the host); positions then restart at 0 per document, unless given (each
        token's own: a sequence-parallel rank's part of the documents). Without
        cu_seqlens each row is one sequence, at `positions` (batch, seq) or 0..seq-1: best a CheckedPositions
        built from the host's tensor (a tensor is range-checked here, once, which reads it back to the host, rather
        than by every layer's rotary embedding, forward and backward). max_seqlen: accepted for flash-attn's
        signature; the boundaries determine it."""
        del max_seqlen
        packed = cu_seqlens
        if cu_seqlens is not None and not isinstance(cu_seqlens, PackedSequences):
            packed = PackedSequences(cu_seqlens)
        if isinstance(positions, torch.Tensor):
            positions = CheckedPositions(positions)
        if self.first:
            hidden = self.token_embedding(input_ids)
            if self.embed_grad_scale != 1.0:  # forward unchanged, gradient to the embedding scaled
                hidden = self.embed_grad_scale * hidden + (1 - self.embed_grad_scale) * hidden.detach()
            if self.scale_embeddings:  # the factor rounded to the activations' dtype first, as Hugging Face's Gemma
                hidden = hidden * torch.tensor(self.hidden_size**0.5, dtype=hidden.dtype)
        else:
            hidden = hidden_states
        residual = None
        for index, layer in enumerate(self.decoder_layers.values()):
            args = (hidden, residual, positions, packed)
            if index < self.recompute_layers and torch.is_grad_enabled():
                hidden, residual = recompute(layer, *args, use_reentrant=False)
            else:
                hidden, residual = layer(*args)
        if not self.last:
            return hidden if residual is None else hidden + residual
        return self.lm_head(add_and_norm(self.final_norm, hidden, residual)[0])


def decoder_layers(
    names: Names,
    attention: type[Attention],
    attention_args: dict,
    args: DecoderArgs,
    mlp: Callable[[int, int], nn.Module] | None = None,
) -> list[DecoderLayer]:
    """args.num_layers identical layers of a family: its attention class and arguments, the shared MLP and
    norms. mlp(layer index, SwiGLU width): a family's own MLP (a mixture of experts, pytrain.model.moe)."""
    heads = args.num_attention_heads
    kv_heads = args.num_kv_attention_heads or heads
    if heads % kv_heads:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of num_kv_attention_heads={kv_heads}")
    hidden = args.hidden_size
    shape = AttentionShape(hidden, heads, kv_heads, args.head_dim or hidden // heads)
    # InternEvo: an unset qk_interleaved is `not adapt_hf` (adapt_hf=True: HF's rotate-half pairs)
    interleaved = (not args.adapt_hf) if args.qk_interleaved is None else args.qk_interleaved
    width = mlp_width(hidden, args.mlp_ratio, args.multiple_of)
    rope_scaling = RopeScaling(**rope_scaling_from_fields(**{name: getattr(args, name) for name in ROPE_FIELDS}))
    windows = layer_windows(args.use_sliding_window, args.sliding_window, args.max_window_layers, args.num_layers)

    def norm():
        return build_norm(args.norm_type, hidden, args.layer_norm_epsilon, args.add_unit_offset)

    dense_mlp = SwiGLU if args.use_swiglu else GeGLU

    return [
        DecoderLayer(
            names,
            attention(
                shape,
                rope_base=args.rope_base,
                qk_interleaved=interleaved,
                use_flash_attn=args.use_flash_attn,
                rope_scaling=rope_scaling,
                sliding_window=windows[index],
                **attention_args,
            ),
            dense_mlp(hidden, width, bias=args.mlp_bias) if mlp is None else mlp(index, width),
            (norm(), norm()),
            args.apply_post_layer_norm,
        )
        for index in range(args.num_layers)
    ]
