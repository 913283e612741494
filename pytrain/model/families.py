"""The dense model families, registered in MODEL_INITIALIZER under InternEvo's model_type names.

Each builder's keyword parameters are exactly the `model` fields that family takes, with the family's
own defaults (InternEvo's builders'); the config fills a field the file does not set from here, and
lists one the family does not take as ignored. A builder returns the whole plain model (pytrain.model.
decoder); parallelism is applied to it afterwards (pytrain.parallel).

model_type (what it is): how q, k and v are projected; the parameter names.
- INTERNLM (InternLM v1, 7B/20B): one Wqkv [q, k, v], biases unless no_bias; embedding, blocks.N.mixer /
  mlp / norm1 / norm2, norm, head.
- INTERNLM2, INTERNLM2_PUBLIC (InternLM2): the grouped wqkv (per kv head: its q heads, then k, then v);
  tok_embeddings, layers.N.attention / feed_forward / attention_norm / ffn_norm, norm, output.
- LLAMA2, LLAMA (LLaMA 2/3): wq, wk, wv (the grouped wqkv with enable_qkv_fusion); names as INTERNLM2.
- QWEN2 (Qwen2 / Qwen2.5): wq, wk, wv with qkv_bias, wo with o_bias; embed_tokens, then as INTERNLM2.

Mixtures of experts (pytrain.model.moe; num_experts <= 1 builds the dense model, as InternEvo): each
layer's MLP is an MoE (`<mlp>.moe_layer.gate.wg`, `<mlp>.moe_layer.experts.w1|w3|w2`) of experts as wide
as the dense MLP would be (mlp_ratio, multiple_of), routed per moe_type / top_k / moe_layer_kwargs.
- INTERNLM_MoE (InternLM v1 + MoE): INTERNLM's layers and names; moe_use_residual (or num_shared_experts
  = n) adds InternLM's residual MLP (n times as wide) mixed in by a softmax `coefficient` [2, H].
- MIXTRALMOE (Mixtral): wq, wk, wv, wo (qkv_bias, o_bias), InternEvo's v1-style names (embedding,
  blocks.N.mixer / mlp / norm1 / norm2, norm, head); num_shared_experts as INTERNLM_MoE's residual MLP.
- QWEN2MOE (Qwen1.5-MoE / Qwen2-MoE): QWEN2's layers and names; num_shared_experts = n adds the shared
  expert (n times as wide) gated by sigmoid(`coefficient` [1, H]).
"""

from pytrain.config import mlp_width
from pytrain.registry import MODEL_INITIALIZER

from .decoder import (
    Decoder,
    FusedQKVAttention,
    GroupedQKVAttention,
    Names,
    SeparateQKVAttention,
    decoder_layers,
)
from .moe import MoE, routing_from_fields

INTERNLM_NAMES = Names("embedding", "blocks", "mixer", "mlp", "norm1", "norm2", "norm", "head")
INTERNLM2_NAMES = Names(
    "tok_embeddings", "layers", "attention", "feed_forward", "attention_norm", "ffn_norm", "norm", "output"
)
QWEN2_NAMES = Names(
    "embed_tokens", "layers", "attention", "feed_forward", "attention_norm", "ffn_norm", "norm", "output"
)


def _decoder(
    family,
    names,
    attention,
    attention_args,
    *,
    vocab_size,
    tie_word_embeddings,
    embed_grad_scale,
    checkpoint,
    dtype,
    embed_split_hidden,
    parallel_output,
    num_chunks,
    **layer_fields,
) -> Decoder:
    del num_chunks  # pipeline chunks per rank: read by initialize_model when it cuts the stages
    moe = {key: layer_fields.pop(key) for key in MOE_FIELDS if key in layer_fields}
    if moe:
        layer_fields["mlp"] = _moe_mlp(layer_fields, **moe)
    return Decoder(
        family=family,
        names=names,
        layers=decoder_layers(names, attention, attention_args, **layer_fields),
        vocab_size=vocab_size,
        hidden_size=layer_fields["hidden_size"],
        norm_type=layer_fields["norm_type"],
        layer_norm_epsilon=layer_fields["layer_norm_epsilon"],
        tie_word_embeddings=tie_word_embeddings,
        embed_grad_scale=embed_grad_scale,
        checkpoint=checkpoint,
        dtype=dtype,
        embed_split_hidden=embed_split_hidden,
        parallel_output=parallel_output,
    )


MOE_FIELDS = ("num_experts", "top_k", "moe_type", "moe_layer_kwargs", "num_shared_experts", "shared_kind")


def _moe_mlp(layer_fields, *, num_experts, top_k, moe_type, moe_layer_kwargs, num_shared_experts, shared_kind):
    """The MLP factory of a mixture-of-experts family (None: dense, num_experts <= 1)."""
    if num_experts <= 1:
        return None
    if num_shared_experts < 0:
        raise ValueError(f"num_shared_experts={num_shared_experts} must be >= 0")
    routing, _ = routing_from_fields(moe_type, num_experts, top_k, moe_layer_kwargs)
    hidden, ratio, multiple_of = layer_fields["hidden_size"], layer_fields["mlp_ratio"], layer_fields["multiple_of"]
    shared = None
    if num_shared_experts:  # InternEvo: int(int(hidden * mlp_ratio) * n), rounded up to multiple_of
        shared = (shared_kind, mlp_width(int(hidden * ratio) * num_shared_experts, 1.0, multiple_of))
    return lambda index, width: MoE(hidden, width, routing, shared)


def _qk_interleaved(qk_interleaved: bool | None, adapt_hf: bool) -> bool:
    """InternEvo: an unset qk_interleaved is `not adapt_hf` (adapt_hf=True: HF's rotate-half pairs)."""
    return (not adapt_hf) if qk_interleaved is None else qk_interleaved


@MODEL_INITIALIZER.register_module(module_name="INTERNLM")
def build_internlm(
    *,
    num_layers: int = 32,
    hidden_size: int = 4096,
    num_attention_heads: int = 32,
    vocab_size: int = 103168,
    num_kv_attention_heads: int | None = None,
    mlp_ratio: float = 8 / 3,
    multiple_of: int = 256,
    no_bias: bool = False,
    norm_type: str = "rmsnorm",
    layer_norm_epsilon: float = 1e-5,
    apply_post_layer_norm: bool = False,
    rope_base: float = 10000.0,
    qk_interleaved: bool = False,
    use_flash_attn: bool = True,
    tie_word_embeddings: bool = False,
    embed_grad_scale: float = 1.0,
    checkpoint: bool | float = False,
    dtype: str = "torch.bfloat16",
    embed_split_hidden: bool = True,
    parallel_output: bool = True,
    num_chunks: int = 1,
) -> Decoder:
    """InternLM v1 (InternLM-7B: bias on Wqkv and out_proj, no MLP bias)."""
    fields = locals()
    bias = not fields.pop("no_bias")
    return _decoder("INTERNLM", INTERNLM_NAMES, FusedQKVAttention, dict(bias=bias), mlp_bias=False, **fields)


def _build_internlm2_or_llama(family, names, *, enable_qkv_fusion, no_bias, qk_interleaved, adapt_hf, **fields):
    if enable_qkv_fusion:
        attention, args = GroupedQKVAttention, dict(bias=not no_bias)
    else:
        attention, args = SeparateQKVAttention, dict(qkv_bias=not no_bias, o_bias=not no_bias)
    return _decoder(
        family,
        names,
        attention,
        args,
        mlp_bias=False,
        qk_interleaved=_qk_interleaved(qk_interleaved, adapt_hf),
        **fields,
    )


@MODEL_INITIALIZER.register_module(module_name="INTERNLM2")
def build_internlm2(
    *,
    num_layers: int = 32,
    hidden_size: int = 4096,
    num_attention_heads: int = 32,
    vocab_size: int = 92544,
    num_kv_attention_heads: int | None = None,
    mlp_ratio: float = 4.0,
    multiple_of: int = 256,
    no_bias: bool = False,
    enable_qkv_fusion: bool = True,
    norm_type: str = "rmsnorm",
    layer_norm_epsilon: float = 1e-5,
    apply_post_layer_norm: bool = False,
    rope_base: float = 10000.0,
    qk_interleaved: bool | None = None,
    adapt_hf: bool = True,
    use_flash_attn: bool = True,
    tie_word_embeddings: bool = False,
    embed_grad_scale: float = 1.0,
    checkpoint: bool | float = False,
    dtype: str = "torch.bfloat16",
    embed_split_hidden: bool = True,
    parallel_output: bool = True,
    num_chunks: int = 1,
) -> Decoder:
    """InternLM2 / InternLM2.5 (GQA, the grouped wqkv; InternLM2-7B: no_bias=True, 8 kv heads)."""
    return _build_internlm2_or_llama("INTERNLM2", INTERNLM2_NAMES, **locals())


@MODEL_INITIALIZER.register_module(module_name="LLAMA2")
def build_llama2(
    *,
    num_layers: int = 32,
    hidden_size: int = 4096,
    num_attention_heads: int = 32,
    vocab_size: int = 32000,
    num_kv_attention_heads: int | None = None,
    mlp_ratio: float = 4.0,
    multiple_of: int = 256,
    no_bias: bool = False,
    enable_qkv_fusion: bool = False,
    head_dim: int | None = None,
    norm_type: str = "rmsnorm",
    layer_norm_epsilon: float = 1e-5,
    apply_post_layer_norm: bool = False,
    rope_base: float = 10000.0,
    qk_interleaved: bool | None = None,
    adapt_hf: bool = False,
    use_flash_attn: bool = True,
    tie_word_embeddings: bool = False,
    embed_grad_scale: float = 1.0,
    checkpoint: bool | float = False,
    dtype: str = "torch.bfloat16",
    embed_split_hidden: bool = True,
    parallel_output: bool = True,
    num_chunks: int = 1,
) -> Decoder:
    """LLaMA 2 / 3 (Llama-2-7B: no_bias=True, mlp_ratio 2.6875 with multiple_of 256 -> 11008)."""
    return _build_internlm2_or_llama("LLAMA2", INTERNLM2_NAMES, **locals())


@MODEL_INITIALIZER.register_module(module_name="QWEN2")
def build_qwen2(
    *,
    num_layers: int = 28,
    hidden_size: int = 3584,
    num_attention_heads: int = 28,
    vocab_size: int = 152064,
    num_kv_attention_heads: int | None = 4,
    mlp_ratio: float = 4.0,
    multiple_of: int = 256,
    qkv_bias: bool = True,
    o_bias: bool = False,
    mlp_bias: bool = False,
    head_dim: int | None = None,
    norm_type: str = "rmsnorm",
    layer_norm_epsilon: float = 1e-6,
    apply_post_layer_norm: bool = False,
    rope_base: float = 1000000.0,
    qk_interleaved: bool = False,
    use_flash_attn: bool = True,
    tie_word_embeddings: bool = False,
    embed_grad_scale: float = 1.0,
    checkpoint: bool | float = False,
    dtype: str = "torch.bfloat16",
    embed_split_hidden: bool = True,
    parallel_output: bool = True,
    num_chunks: int = 1,
) -> Decoder:
    """Qwen2 / Qwen2.5 (bias on wq, wk, wv; Qwen2-7B: 28 heads, 4 kv heads, MLP 18944 = mlp_ratio 37/7)."""
    fields = locals()
    biases = dict(qkv_bias=fields.pop("qkv_bias"), o_bias=fields.pop("o_bias"))
    return _decoder("QWEN2", QWEN2_NAMES, SeparateQKVAttention, biases, **fields)


@MODEL_INITIALIZER.register_module(module_name="INTERNLM_MoE")
def build_internlm_moe(
    *,
    num_layers: int = 32,
    hidden_size: int = 4096,
    num_attention_heads: int = 32,
    vocab_size: int = 103168,
    num_kv_attention_heads: int | None = None,
    mlp_ratio: float = 8 / 3,
    multiple_of: int = 256,
    no_bias: bool = False,
    norm_type: str = "rmsnorm",
    layer_norm_epsilon: float = 1e-5,
    apply_post_layer_norm: bool = False,
    rope_base: float = 10000.0,
    qk_interleaved: bool = False,
    use_flash_attn: bool = True,
    tie_word_embeddings: bool = False,
    embed_grad_scale: float = 1.0,
    checkpoint: bool | float = False,
    dtype: str = "torch.bfloat16",
    embed_split_hidden: bool = True,
    parallel_output: bool = True,
    num_chunks: int = 1,
    num_experts: int = 1,
    top_k: int = 1,
    moe_type: str | None = "GShard",
    moe_use_residual: bool = False,
    num_shared_experts: int = 0,
    moe_layer_kwargs: dict | None = None,
) -> Decoder:
    """InternLM v1 with MoE MLPs (InternLM's 7B_MoE4_sft: 4 experts, top-2; moe_use_residual = InternEvo's
    later num_shared_experts=1)."""
    fields = locals()
    bias = not fields.pop("no_bias")
    if fields.pop("moe_use_residual") and not fields["num_shared_experts"]:
        fields["num_shared_experts"] = 1
    return _decoder(
        "INTERNLM_MoE",
        INTERNLM_NAMES,
        FusedQKVAttention,
        dict(bias=bias),
        mlp_bias=False,
        shared_kind="residual",
        **fields,
    )


@MODEL_INITIALIZER.register_module(module_name="MIXTRALMOE")
def build_mixtral_moe(
    *,
    num_layers: int = 32,
    hidden_size: int = 4096,
    num_attention_heads: int = 32,
    vocab_size: int = 32000,
    num_kv_attention_heads: int | None = 8,
    mlp_ratio: float = 3.5,
    multiple_of: int = 256,
    qkv_bias: bool = True,
    o_bias: bool = False,
    head_dim: int | None = None,
    norm_type: str = "rmsnorm",
    layer_norm_epsilon: float = 1e-5,
    apply_post_layer_norm: bool = False,
    rope_base: float = 1000000.0,
    qk_interleaved: bool = False,
    use_flash_attn: bool = True,
    tie_word_embeddings: bool = False,
    embed_grad_scale: float = 1.0,
    checkpoint: bool | float = False,
    dtype: str = "torch.bfloat16",
    embed_split_hidden: bool = True,
    parallel_output: bool = True,
    num_chunks: int = 1,
    num_experts: int = 1,
    top_k: int = 1,
    moe_type: str | None = "GShard",
    num_shared_experts: int = 0,
    moe_layer_kwargs: dict | None = None,
) -> Decoder:
    """Mixtral (Mixtral-8x7B: num_experts=8, top_k=2, qkv_bias=False, 14336-wide experts = mlp_ratio 3.5;
    InternEvo's class default qkv_bias=True is kept)."""
    fields = locals()
    biases = dict(qkv_bias=fields.pop("qkv_bias"), o_bias=fields.pop("o_bias"))
    return _decoder(
        "MIXTRALMOE",
        INTERNLM_NAMES,
        SeparateQKVAttention,
        biases,
        mlp_bias=False,
        shared_kind="residual",
        **fields,
    )


@MODEL_INITIALIZER.register_module(module_name="QWEN2MOE")
def build_qwen2_moe(
    *,
    num_layers: int = 28,
    hidden_size: int = 3584,
    num_attention_heads: int = 28,
    vocab_size: int = 151936,
    num_kv_attention_heads: int | None = 4,
    mlp_ratio: float = 5 / 7,
    multiple_of: int = 256,
    qkv_bias: bool = True,
    o_bias: bool = False,
    head_dim: int | None = None,
    norm_type: str = "rmsnorm",
    layer_norm_epsilon: float = 1e-6,
    apply_post_layer_norm: bool = False,
    rope_base: float = 1000000.0,
    qk_interleaved: bool = False,
    use_flash_attn: bool = True,
    tie_word_embeddings: bool = False,
    embed_grad_scale: float = 1.0,
    checkpoint: bool | float = False,
    dtype: str = "torch.bfloat16",
    embed_split_hidden: bool = True,
    parallel_output: bool = True,
    num_chunks: int = 1,
    num_experts: int = 1,
    top_k: int = 1,
    moe_type: str | None = "GShard",
    num_shared_experts: int = 0,
    moe_layer_kwargs: dict | None = None,
) -> Decoder:
    """Qwen2-MoE (Qwen2-57B-A14B: 64 experts 2560 wide = mlp_ratio 5/7, top_k=8, num_shared_experts=8; for
    HF's routing use moe_type="Dropless" with moe_layer_kwargs=dict(normalize_expert_weights=norm_topk_prob))."""
    fields = locals()
    biases = dict(qkv_bias=fields.pop("qkv_bias"), o_bias=fields.pop("o_bias"))
    return _decoder(
        "QWEN2MOE", QWEN2_NAMES, SeparateQKVAttention, biases, mlp_bias=False, shared_kind="shared", **fields
    )


# InternEvo's other names for the same families.
MODEL_INITIALIZER.register_module(module_name="INTERNLM2_PUBLIC", module=build_internlm2)
MODEL_INITIALIZER.register_module(module_name="LLAMA", module=build_llama2)
