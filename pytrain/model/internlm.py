"""The InternLM decoder, registered as model_type "INTERNLM".

Decoder-only: token embedding -> num_layers x [attention with rotary embeddings, SwiGLU MLP], each with
an RMSNorm (or LayerNorm) before it (pre-norm) or after the residual add (apply_post_layer_norm) ->
final norm -> LM head. Parameter names follow InternLM's checkpoints (embedding, blocks.N.mixer.Wqkv,
blocks.N.mixer.out_proj, blocks.N.mlp.w1/w2/w3, blocks.N.norm1/norm2, norm, head).

Norms, rotary embeddings, attention and the loss go through pytrain.kernels. Pre-norm layers hand the
residual stream to the next norm, which adds it in the same pass (rms_norm's fused residual). Packed
batches (documents back to back in a row) pass positions restarting per document and cu_seqlens over the
flattened tokens, so no document attends to another.

Parallel layouts (pytrain.parallel): the matmuls, the embedding and the head are tensor-parallel layers,
plain layers on one tensor rank. A pipeline stage is an InternLM holding a range of the layers, with the
embedding only on the first stage and the norm and head only on the last; between stages the residual
stream travels as one tensor (the pending residual add done before sending). Weights are initialised
from the parameter's full name and the seed, so every layout starts from the same model.
"""

import zlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint as recompute

from pytrain.config import mlp_width
from pytrain.kernels import RMSNorm, RotaryEmbedding, flash_attn_func, flash_attn_varlen_func, reference
from pytrain.parallel import gpc
from pytrain.parallel.tensor import (
    ColumnParallelLinear,
    ParallelEmbedding,
    RowParallelLinear,
    ShardedWeight,
    gather_last_dim,
    group_size,
)
from pytrain.registry import MODEL_INITIALIZER

DTYPES = {
    "torch.float16": torch.float16,
    "torch.half": torch.float16,
    "torch.bfloat16": torch.bfloat16,
    "torch.float32": torch.float32,
    "torch.tf32": torch.float32,
}


class LayerNorm(nn.LayerNorm):
    """LayerNorm whose parameters may be fp32 while activations are 16-bit (config use_fp32_norm)."""

    def forward(self, x, residual=None):
        """y, or with `residual` (y, x + residual), as RMSNorm."""
        if residual is not None:
            total = x + residual
            return self.forward(total), total
        return F.layer_norm(x.to(self.weight.dtype), self.normalized_shape, self.weight, self.bias, self.eps).to(
            x.dtype
        )


def build_norm(norm_type: str, hidden_size: int, eps: float, dtype: torch.dtype, sequence_parallel: bool) -> nn.Module:
    if norm_type == "rmsnorm":
        norm = RMSNorm(hidden_size, eps=eps, dtype=dtype)
    elif norm_type == "layernorm":
        norm = LayerNorm(hidden_size, eps=eps, dtype=dtype)
    else:
        raise ValueError(f"norm_type must be 'rmsnorm' or 'layernorm', got {norm_type!r}")
    for param in norm.parameters():  # sees only this rank's tokens: gradients summed over the tensor group
        param.sequence_parallel = sequence_parallel
    return norm


class Attention(nn.Module):
    def __init__(
        self,
        hidden_size,
        num_heads,
        num_kv_heads,
        use_flash_attn,
        dtype,
        rope_base=10000.0,
        group=None,
        sequence_parallel=False,
    ):
        super().__init__()
        tensor = group_size(group)
        self.num_heads, self.num_kv_heads = num_heads // tensor, num_kv_heads // tensor  # this rank's heads
        self.head_dim = hidden_size // num_heads
        self.rotary = RotaryEmbedding(self.head_dim, base=rope_base)
        self.use_flash_attn = use_flash_attn
        q, kv = num_heads * self.head_dim, num_kv_heads * self.head_dim
        self.Wqkv = ColumnParallelLinear(
            hidden_size, q + 2 * kv, group, sequence_parallel, segments=[q, kv, kv], dtype=dtype
        )
        self.out_proj = RowParallelLinear(q, hidden_size, group, sequence_parallel, dtype=dtype)

    def forward(self, x, positions=None, cu_seqlens=None, max_seqlen=None):
        qkv = self.Wqkv(x)  # (batch, whole sequence, this rank's heads) also under sequence parallelism
        batch, seq, _ = qkv.shape
        qkv = qkv.view(batch, seq, self.num_heads + 2 * self.num_kv_heads, self.head_dim)
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
    def __init__(self, hidden_size, width, dtype, group=None, sequence_parallel=False):
        super().__init__()
        self.w1 = ColumnParallelLinear(hidden_size, width, group, sequence_parallel, dtype=dtype)  # gate
        self.w3 = ColumnParallelLinear(hidden_size, width, group, sequence_parallel, dtype=dtype)  # up
        self.w2 = RowParallelLinear(width, hidden_size, group, sequence_parallel, dtype=dtype)  # down

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict, dtype, group=None, sequence_parallel=False):
        super().__init__()
        hidden = cfg["hidden_size"]
        self.post_norm = cfg["apply_post_layer_norm"]
        self.mixer = Attention(
            hidden,
            cfg["num_attention_heads"],
            cfg["num_kv_attention_heads"],
            cfg["use_flash_attn"],
            dtype,
            cfg["rope_base"],
            group,
            sequence_parallel,
        )
        self.mlp = SwiGLU(
            hidden, mlp_width(hidden, cfg["mlp_ratio"], cfg["multiple_of"]), dtype, group, sequence_parallel
        )
        self.norm1 = build_norm(cfg["norm_type"], hidden, cfg["layer_norm_epsilon"], dtype, sequence_parallel)
        self.norm2 = build_norm(cfg["norm_type"], hidden, cfg["layer_norm_epsilon"], dtype, sequence_parallel)

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


def partition_layers(num_layers: int, parts: int) -> list[range]:
    """Consecutive layer ranges, sizes differing by at most one (the earlier parts get the extra layers:
    the last holds the head as well)."""
    base, extra = divmod(num_layers, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + base + (part < extra))
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


class InternLM(nn.Module):
    """The decoder, or one pipeline stage of it: layers `layers` (default all), the embedding when
    `first`, the final norm and head when `last`. tensor_group: the ranks its matmuls are split over
    (None: not split); sequence_parallel: the residual stream split along the sequence over that group."""

    def __init__(
        self,
        *,
        num_layers,
        hidden_size,
        num_attention_heads,
        vocab_size,
        mlp_ratio=8 / 3,
        num_kv_attention_heads=None,
        multiple_of=256,
        checkpoint=False,
        embed_grad_scale=1.0,
        apply_post_layer_norm=False,
        dtype="torch.float32",
        norm_type="rmsnorm",
        layer_norm_epsilon=1e-5,
        use_flash_attn=True,
        rope_base=10000.0,
        embed_split_hidden=True,
        parallel_output=True,
        num_chunks=1,
        tie_word_embeddings=False,
        layers: range | None = None,
        first=True,
        last=True,
        tensor_group=None,
        sequence_parallel=False,
    ):
        super().__init__()
        param_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        layer_cfg = dict(
            hidden_size=hidden_size,
            num_attention_heads=num_attention_heads,
            num_kv_attention_heads=num_kv_attention_heads or num_attention_heads,
            mlp_ratio=mlp_ratio,
            multiple_of=multiple_of,
            apply_post_layer_norm=apply_post_layer_norm,
            norm_type=norm_type,
            layer_norm_epsilon=layer_norm_epsilon,
            use_flash_attn=use_flash_attn,
            rope_base=rope_base,
        )
        self.layers = layers if layers is not None else range(num_layers)
        self.num_layers, self.hidden_size = num_layers, hidden_size
        self.first, self.last = first, last
        self.embed_grad_scale = float(embed_grad_scale)
        self.tensor_group, self.sequence_parallel = tensor_group, sequence_parallel
        self.parallel_output, self.tie_word_embeddings = parallel_output, tie_word_embeddings
        # checkpoint: True/False, or the fraction of layers (the first ones of this stage) recomputed.
        self.recompute_layers = int(len(self.layers) * float(checkpoint))
        if first:
            self.embedding = ParallelEmbedding(
                vocab_size, hidden_size, tensor_group, embed_split_hidden, sequence_parallel, dtype=param_dtype
            )
        self.blocks = nn.ModuleList(
            DecoderLayer(layer_cfg, param_dtype, tensor_group, sequence_parallel) for _ in self.layers
        )
        if last:
            self.norm = build_norm(norm_type, hidden_size, layer_norm_epsilon, param_dtype, sequence_parallel)
            self.head = ColumnParallelLinear(
                hidden_size, vocab_size, tensor_group, sequence_parallel, dtype=param_dtype
            )
            if tie_word_embeddings and first:
                self.head.weight = self.embedding.weight
        if tie_word_embeddings and first != last:  # a copy on each end of the pipeline, kept equal by summing
            weight = self.embedding.weight if first else self.head.weight  # their gradients (the optimizer)
            weight.tied_across_stages = True
            weight.shared_copy = last  # counted once in the gradient norm
        self.reset_parameters()

    def global_name(self, name: str) -> str:
        """The name a parameter has in the whole model (blocks.N counts from this stage's first layer);
        a tied head's weight is the embedding's."""
        parts = name.split(".")
        if parts[0] == "blocks":
            parts[1] = str(self.layers[int(parts[1])])
        if self.tie_word_embeddings and name == "head.weight":
            return "embedding.weight"
        return ".".join(parts)

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02):
        """Normal(0, std) weights; residual output projections scaled by 1/sqrt(2 * num_layers) (GPT-2).
        Each weight is drawn whole from a generator seeded by torch's seed and its full name, then this
        rank's shard is kept, so every layout and every pipeline stage start from the same model."""
        if next(self.parameters()).is_meta:  # --dry_run: shapes only
            return
        shards = self._sharded_weights()
        for name, param in self.named_parameters():
            if param.dim() < 2:
                continue
            full_name = self.global_name(name)
            scale = (2 * self.num_layers) ** -0.5 if full_name.endswith(("out_proj.weight", "w2.weight")) else 1.0
            module = shards.get(id(param))
            shape = module.full_shape if module is not None else param.shape
            generator = torch.Generator(param.device).manual_seed(torch.initial_seed() + zlib.crc32(full_name.encode()))
            full = torch.empty(shape, dtype=torch.float32, device=param.device).normal_(
                0.0, std * scale, generator=generator
            )
            param.copy_(module.shard(full) if module is not None else full)

    def _sharded_weights(self) -> dict[int, ShardedWeight]:
        """id(weight) -> the tensor-parallel module that knows how to cut it from the full weight."""
        return {id(m.weight): m for m in self.modules() if isinstance(m, ShardedWeight)}

    def local_state(self, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This stage's parameters, by local name, cut out of the whole model's {full name: tensor}
        (e.g. a single-process state dict): what load_state_dict takes in this layout."""
        shards = self._sharded_weights()
        local = {}
        for name, param in self.named_parameters():
            full = full_state[self.global_name(name)]
            module = shards.get(id(param))
            local[name] = module.shard(full) if module is not None else full
        return local

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        hidden_states: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (batch, seq) -> logits (batch, seq, vocab) in the model's dtype; vocab is this rank's
        shard with tensor parallelism and parallel_output. A stage without the embedding takes the
        previous stage's output as hidden_states; one without the head returns its residual stream.

        Packed documents: positions (batch, seq) restarting at 0 per document, cu_seqlens (documents + 1,)
        int32 over the batch * seq flattened tokens and max_seqlen the longest document. None: each row
        is one sequence, positions 0..seq-1.
        """
        if self.first:
            hidden = self.embedding(input_ids)
            if self.embed_grad_scale != 1.0:  # forward unchanged, gradient to the embedding scaled
                hidden = self.embed_grad_scale * hidden + (1 - self.embed_grad_scale) * hidden.detach()
        else:
            hidden = hidden_states
        residual = None
        for index, block in enumerate(self.blocks):
            args = (hidden, residual, positions, cu_seqlens, max_seqlen)
            if index < self.recompute_layers and torch.is_grad_enabled():
                hidden, residual = recompute(block, *args, use_reentrant=False)
            else:
                hidden, residual = block(*args)
        if not self.last:
            return hidden if residual is None else hidden + residual
        logits = self.head(add_and_norm(self.norm, hidden, residual)[0])
        return logits if self.parallel_output else gather_last_dim(logits, self.tensor_group)


def build_model_with_cfg(**model_cfg) -> nn.Module:
    """The launched run's part of the model: its pipeline stage (an nn.ModuleList of num_chunks stages for
    the interleaved schedule), split over its tensor group."""
    tensor, pipeline = gpc.tensor_parallel_size, gpc.pipeline_parallel_size
    chunks = model_cfg.get("num_chunks", 1)
    parts = partition_layers(model_cfg["num_layers"], pipeline * chunks)
    group = gpc.tensor_parallel_group if tensor > 1 else None
    sequence_parallel = tensor > 1 and gpc.config is not None and gpc.config.parallel.tensor.mode == "msp"
    stages = []
    for chunk in range(chunks):  # chunk c of stage r holds part c * pipeline + r
        part = chunk * pipeline + gpc.pipeline_parallel_rank
        stages.append(
            InternLM(
                **model_cfg,
                layers=parts[part],
                first=part == 0,
                last=part == len(parts) - 1,
                tensor_group=group,
                sequence_parallel=sequence_parallel,
            )
        )
    return stages[0] if chunks == 1 else nn.ModuleList(stages)


MODEL_INITIALIZER.register_module(module_name="INTERNLM")(build_model_with_cfg)
