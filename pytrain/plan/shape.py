"""What the planner needs to know about a model, read once from the model itself built on the meta device: per
decoder layer its parameters (by how tensor and expert parallelism split them) and what its forward keeps for the
backward, per token; the embedding and the head.

The kept activations are those of pytrain.model's layers as written (decoder.py, moe.py), counted per token in
elements of the model's dtype and fp32 elements (measured with saved-tensor hooks and checked against the
allocator in tests/test_plan.py):

- the two norms keep their input, the residual stream (under sequence parallelism a 1/tensor slice of the tokens),
  and an fp32 rstd per token;
- the column-parallel linears (q/k/v projections, the MLP's w1/w3) keep their input, the normed stream, whole;
- attention keeps what SDPA/flash-attention needs: the q and k after the rotary embedding, v, the output
  (the out projection's input) and an fp32 log-sum-exp per head; a fused [q; k; v] projection keeps its whole
  output alive because v is a view of it; Qwen3's q/k norms keep their inputs;
- a dense MLP keeps w1's and w3's outputs (the fused SwiGLU's inputs) and their product (w2's input): 3 x width;
- a mixture of experts keeps per routed row (top_k rows per token, spread over the tensor ranks) the permuted
  input and the combined output's rows (2 x hidden) and the experts' 4 x width; routing keeps about
  num_experts + 7 x top_k fp32-sized elements per token (probabilities, choices, weights, permutation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pytrain.model.decoder import (
    Colwise,
    EmbeddingSplit,
    FusedQKVAttention,
    Rowwise,
    VocabHead,
)
from pytrain.model.moe import MoE
from pytrain.parallel.tensor import plan_pattern
from pytrain.registry import MODEL_INITIALIZER

SPLIT_RULES = (Colwise, Rowwise, EmbeddingSplit, VocabHead)


@dataclass(frozen=True)
class Params:
    """Parameter elements by how they are split: over the tensor ranks, whole on every tensor rank, and expert
    weights (over expert x tensor ranks; their own ZeRO-1 domain)."""

    split: tuple[int, ...] = ()  # each parameter's full numel (ZeRO-1 owns whole parameters)
    whole: tuple[int, ...] = ()
    experts: tuple[int, ...] = ()

    def __add__(self, other: Params) -> Params:
        return Params(self.split + other.split, self.whole + other.whole, self.experts + other.experts)

    def dense_local(self, tensor: int) -> list[int]:
        return [n // tensor for n in self.split] + list(self.whole)

    def expert_local(self, tensor: int, expert: int) -> list[int]:
        return [n // (tensor * expert) for n in self.experts]


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer: parameters and kept activations per token (see the module docstring).

    residual: dtype elements per token kept in the residual stream (split by sequence parallelism);
    gathered: dtype elements per token kept whole under any tensor mode; sharded: dtype elements per token split
    over the tensor ranks; fp32_residual / fp32_sharded: fp32 elements, split likewise; routed: dtype elements per
    routed row (top_k rows per token over the tensor ranks); router_fp32: routing's fp32-sized elements per token.
    The `matmuls_*` fields are what selective checkpointing's 'matmuls' policy keeps instead (the matmul outputs
    and the layer's inputs that are not one)."""

    params: Params
    residual: int
    gathered: int
    sharded: int
    fp32_residual: int
    fp32_sharded: int
    routed: int
    router_fp32: int
    top_k: int
    matmuls_residual: int
    matmuls_gathered: int
    matmuls_sharded: int
    matmuls_fp32: int
    largest_transient_sharded: int  # the widest tensor a forward makes and drops, per token (split over tensor)
    matmul_params: int  # weights of the matmuls one token runs through (the top_k experts of a mixture)
    attention_width: int  # heads x head_dim
    kv_width: int  # kv heads x head_dim
    moe: bool


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    hidden: int
    vocab: int
    heads: int
    dtype_bytes: int
    layers: tuple[LayerShape, ...]
    embedding: Params
    final_norm: Params
    head: Params  # the LM head's weight: a tied one is the embedding's, held twice only on separate stages
    tied: bool
    needs_master: bool  # fp32 masters beside 16-bit parameters
    num_experts: int

    @classmethod
    def from_config(cls, cfg) -> ModelShape:
        """The model `cfg` describes, built on the meta device (no memory), read as above."""
        builder = MODEL_INITIALIZER.get_module(cfg.model_type)
        with torch.device("meta"):
            model = builder(**cfg.model)
        if not hasattr(model, "tensor_parallel_plan"):
            raise ValueError(
                f"model_type {cfg.model_type!r} builds a {type(model).__name__}, not a pytrain Decoder: the planner "
                f"reads layers, heads and the tensor-parallel plan from a Decoder"
            )
        plan = [(plan_pattern(key), how) for key, how in model.tensor_parallel_plan().items()]
        dtype_bytes = torch.finfo(model.dtype).bits // 8
        names = model.names
        layers = tuple(
            _layer_shape(layer, f"{names.layers}.{index}", plan) for index, layer in model.decoder_layers.items()
        )
        embedding = _params(model.token_embedding, names.embedding, plan)
        return cls(
            num_layers=model.num_layers,
            hidden=model.hidden_size,
            vocab=model.vocab_size,
            heads=cfg.model.num_attention_heads,
            dtype_bytes=dtype_bytes,
            layers=layers,
            embedding=embedding,
            final_norm=_params(model.final_norm, names.norm, plan),
            head=_params(model.lm_head, names.head, plan),
            tied=model.tie_word_embeddings,
            needs_master=model.dtype != torch.float32,
            num_experts=cfg.model.get("num_experts", 1),
        )


def _params(module: nn.Module, prefix: str, plan) -> Params:
    split, whole, experts = [], [], []
    for name, param in module.named_parameters():
        full = f"{prefix}.{name}"
        owner, _, leaf = full.rpartition(".")
        how = next((how for pattern, how in plan if pattern.match(owner)), None)
        if ".moe_layer.experts." in f".{full}.":
            experts.append(param.numel())
        elif ".residual_mlp." in full or (
            isinstance(how, SPLIT_RULES) and not (leaf == "bias" and isinstance(how, Rowwise))
        ):
            split.append(param.numel())  # a shared expert is split as the dense MLP (pytrain.parallel.expert)
        else:
            whole.append(param.numel())
    return Params(tuple(split), tuple(whole), tuple(experts))


def _layer_shape(layer: nn.Module, prefix: str, plan) -> LayerShape:
    n = layer.names
    attention, mlp = layer.get_submodule(n.attention), layer.get_submodule(n.mlp)
    shape = attention.shape
    q, kv, hidden = shape.q_width, shape.kv_width, shape.hidden_size
    # q' and k' (rotary outputs), v, the attention output; a fused projection's whole output stays alive (v)
    attention_kept = (q + 2 * kv if isinstance(attention, FusedQKVAttention) else kv) + q + kv + q
    if attention.qk_norm:
        attention_kept += q + kv
    projections = q + 2 * kv  # the q/k/v matmul outputs
    if isinstance(mlp, MoE):
        layer_moe = mlp.moe_layer
        width = layer_moe.experts.w1.shape[1]
        experts, top_k = layer_moe.routing.num_experts, layer_moe.routing.top_k
        shared = mlp.residual_mlp.w1.out_features if mlp.shared_kind else 0
        mlp_sharded, routed, router = 3 * shared, 2 * hidden + 4 * width, experts + 7 * top_k
        matmul_sharded = projections + 2 * shared
        matmul_gathered = hidden  # the out projection's output (partial sums, whole)
        matmul_residual = 2 * hidden  # the layer's inputs: neither is a matmul output
        matmul_fp32 = experts  # the router's logits
        widest = max(4 * width * top_k, q + 2 * kv)
    else:
        width = mlp.w1.out_features
        mlp_sharded, routed, router, top_k = 3 * width, 0, 0, 0
        matmul_sharded = projections + 2 * width
        matmul_gathered = 2 * hidden  # the out projection's and w2's outputs
        matmul_residual = hidden  # the residual input (the hidden input is the previous w2's output)
        matmul_fp32 = 0
        widest = max(3 * width, q + 2 * kv)
    return LayerShape(
        params=_params(layer, prefix, plan),
        residual=2 * hidden,
        gathered=2 * hidden,
        sharded=attention_kept + mlp_sharded,
        fp32_residual=2,
        fp32_sharded=shape.num_heads,
        routed=routed,
        router_fp32=router,
        top_k=top_k,
        matmuls_residual=matmul_residual,
        matmuls_gathered=matmul_gathered,
        matmuls_sharded=matmul_sharded,
        matmuls_fp32=matmul_fp32,
        largest_transient_sharded=widest,
        matmul_params=sum(p.numel() for p in layer.parameters() if p.dim() == 2)
        + (mlp.moe_layer.active_expert_params() if isinstance(mlp, MoE) else 0),
        attention_width=q,
        kv_width=kv,
        moe=isinstance(mlp, MoE),
    )
