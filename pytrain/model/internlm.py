"""The InternLM decoder, registered as model_type "INTERNLM".

Decoder-only: token embedding -> num_layers x [attention with rotary embeddings, SwiGLU MLP], each with
an RMSNorm (or LayerNorm) before it (pre-norm) or after the residual add (apply_post_layer_norm) ->
final norm -> LM head. Parameter names follow InternLM's checkpoints (embedding, blocks.N.mixer.Wqkv,
blocks.N.mixer.out_proj, blocks.N.mlp.w1/w2/w3, blocks.N.norm1/norm2, norm, head).

Norms, rotary embeddings, attention and the loss go through pytrain.kernels. Pre-norm layers hand the
residual stream to the next norm, which adds it in the same pass (rms_norm's fused residual). Packed
batches (documents back to back in a row) pass positions restarting per document and cu_seqlens over the
flattened tokens, so no document attends to another. Tensor parallelism (embed_split_hidden,
parallel_output) arrives with the parallel issue; with one tensor rank both fields change nothing.
"""
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute

from pytrain.kernels import RMSNorm, RotaryEmbedding, flash_attn_func, flash_attn_varlen_func, reference
from pytrain.registry import MODEL_INITIALIZER

DTYPES = {"torch.float16": torch.float16, "torch.half": torch.float16, "torch.bfloat16": torch.bfloat16,
          "torch.float32": torch.float32, "torch.tf32": torch.float32}


def mlp_width(hidden_size: int, mlp_ratio: float, multiple_of: int = 256) -> int:
    """InternLM's SwiGLU width: int(hidden * ratio) rounded up to a multiple (4096 * 8/3 -> 11008)."""
    width = int(hidden_size * mlp_ratio)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose parameters may be fp32 while activations are 16-bit (config use_fp32_norm)."""

    def forward(self, x, residual=None):
        """y, or with `residual` (y, x + residual), as RMSNorm."""
        if residual is not None:
            total = x + residual
            return self.forward(total), total
        return F.layer_norm(x.to(self.weight.dtype), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def build_norm(norm_type: str, hidden_size: int, eps: float, dtype: torch.dtype) -> nn.Module:
    if norm_type == "rmsnorm":
        return RMSNorm(hidden_size, eps=eps, dtype=dtype)
    if norm_type == "layernorm":
        return LayerNorm(hidden_size, eps=eps, dtype=dtype)
    raise ValueError(f"norm_type must be 'rmsnorm' or 'layernorm', got {norm_type!r}")


class Attention(nn.Module):
    def __init__(self, hidden_size, num_heads, num_kv_heads, use_flash_attn, dtype, rope_base=10000.0):
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim = hidden_size // num_heads
        self.rotary = RotaryEmbedding(self.head_dim, base=rope_base)
        self.use_flash_attn = use_flash_attn
        self.Wqkv = nn.Linear(hidden_size, (num_heads + 2 * num_kv_heads) * self.head_dim, bias=False, dtype=dtype)
        self.out_proj = nn.Linear(num_heads * self.head_dim, hidden_size, bias=False, dtype=dtype)

    def forward(self, x, positions=None, cu_seqlens=None, max_seqlen=None):
        batch, seq, _ = x.shape
        qkv = self.Wqkv(x).view(batch, seq, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q, k = self.rotary(q, k, positions)  # one fused call; reads the qkv views without a copy
        if cu_seqlens is not None:  # packed: attention within each document of the flattened tokens
            q, k, v = (t.reshape(batch * seq, *t.shape[2:]) for t in (q, k, v))
            if self.use_flash_attn:
                out = flash_attn_varlen_func(q, k, v, cu_seqlens, max_seqlen, causal=True)
            else:
                out = reference.attention(q, k, v, causal=True, cu_seqlens=cu_seqlens)
        elif self.use_flash_attn:
            out = flash_attn_func(q, k, v, causal=True)
        else:
            out = reference.attention(q, k, v, causal=True)
        return self.out_proj(out.reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size, width, dtype):
        super().__init__()
        self.w1 = nn.Linear(hidden_size, width, bias=False, dtype=dtype)  # gate
        self.w3 = nn.Linear(hidden_size, width, bias=False, dtype=dtype)  # up
        self.w2 = nn.Linear(width, hidden_size, bias=False, dtype=dtype)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, dtype):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.post_norm = cfg["apply_post_layer_norm"]
        self.mixer = Attention(hidden, cfg["num_attention_heads"], cfg["num_kv_attention_heads"],
                               cfg["use_flash_attn"], dtype, cfg["rope_base"])
        self.mlp = SwiGLU(hidden, mlp_width(hidden, cfg["mlp_ratio"], cfg["multiple_of"]), dtype)
        self.norm1 = build_norm(cfg["norm_type"], hidden, cfg["layer_norm_epsilon"], dtype)
        self.norm2 = build_norm(cfg["norm_type"], hidden, cfg["layer_norm_epsilon"], dtype)

    def forward(self, hidden, residual=None, positions=None, cu_seqlens=None, max_seqlen=None):
        """Pre-norm: returns (this layer's MLP output, the residual stream before it); the add happens in
        the next norm. Post-norm: returns (the normalized stream, None)."""
        if self.post_norm:
            hidden = self.norm1(hidden + self.mixer(hidden, positions, cu_seqlens, max_seqlen))
            return self.norm2(hidden + self.mlp(hidden)), None
        normed, residual = add_and_norm(self.norm1, hidden, residual)
        hidden = self.mixer(normed, positions, cu_seqlens, max_seqlen)
        normed, residual = add_and_norm(self.norm2, hidden, residual)
        return self.mlp(normed), residual


def add_and_norm(norm, hidden, residual):
    """(norm(hidden + residual), hidden + residual); the first layer has no residual yet."""
    return (norm(hidden), hidden) if residual is None else norm(hidden, residual)


class InternLM(nn.Module):
    def __init__(self, *, num_layers, hidden_size, num_attention_heads, vocab_size, mlp_ratio=8 / 3,
                 num_kv_attention_heads=None, multiple_of=256, checkpoint=False, embed_grad_scale=1.0,
                 apply_post_layer_norm=False, dtype="torch.float32", norm_type="rmsnorm", layer_norm_epsilon=1e-5,
                 use_flash_attn=True, rope_base=10000.0, embed_split_hidden=True,
                 parallel_output=True, num_chunks=1):
        super().__init__()
        param_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        layer_cfg = dict(hidden_size=hidden_size, num_attention_heads=num_attention_heads,
                         num_kv_attention_heads=num_kv_attention_heads or num_attention_heads, mlp_ratio=mlp_ratio,
                         multiple_of=multiple_of, apply_post_layer_norm=apply_post_layer_norm, norm_type=norm_type,
                         layer_norm_epsilon=layer_norm_epsilon, use_flash_attn=use_flash_attn, rope_base=rope_base)
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.embed_grad_scale = float(embed_grad_scale)
        # checkpoint: True/False, or the fraction of layers (the first ones) whose activations are recomputed.
        self.recompute_layers = int(num_layers * float(checkpoint))
        self.embedding = nn.Embedding(vocab_size, hidden_size, dtype=param_dtype)
        self.blocks = nn.ModuleList(DecoderLayer(layer_cfg, param_dtype) for _ in range(num_layers))
        self.norm = build_norm(norm_type, hidden_size, layer_norm_epsilon, param_dtype)
        self.head = nn.Linear(hidden_size, vocab_size, bias=False, dtype=param_dtype)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02):
        """Normal(0, std) weights; residual output projections scaled by 1/sqrt(2 * num_layers) (GPT-2)."""
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            scale = (2 * self.num_layers) ** -0.5 if name.endswith(("out_proj.weight", "w2.weight")) else 1.0
            p.normal_(0.0, std * scale)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        """input_ids (batch, seq) -> logits (batch, seq, vocab) in the model's dtype.

        Packed documents: positions (batch, seq) restarting at 0 per document, cu_seqlens (documents + 1,)
        int32 over the batch * seq flattened tokens and max_seqlen the longest document. None: each row
        is one sequence, positions 0..seq-1.
        """
        hidden = self.embedding(input_ids)
        if self.embed_grad_scale != 1.0:  # forward unchanged, gradient to the embedding scaled
            hidden = self.embed_grad_scale * hidden + (1 - self.embed_grad_scale) * hidden.detach()
        residual = None
        for index, block in enumerate(self.blocks):
            args = (hidden, residual, positions, cu_seqlens, max_seqlen)
            if index < self.recompute_layers and torch.is_grad_enabled():
                hidden, residual = recompute(block, *args, use_reentrant=False)
            else:
                hidden, residual = block(*args)
        return self.head(add_and_norm(self.norm, hidden, residual)[0])


@MODEL_INITIALIZER.register_module(module_name="INTERNLM")
def build_model_with_cfg(**model_cfg) -> InternLM:
    return InternLM(**model_cfg)
