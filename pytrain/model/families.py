"""The model families, one `Family` spec each: what sets a family apart on the shared decoder.

A spec holds the family's parameter names (`Names`: its InternEvo checkpoints' keys), how it projects q, k
and v (an `AttentionKind`, whose attention module's plan() also says how those projections split over
tensor ranks), the fields it takes besides COMMON_FIELDS, InternEvo's defaults for it where they differ
from DecoderArgs' (pytrain.model_args), and for a mixture of experts how its shared MLP mixes in.
`Family.build(**fields)` is its builder: the fields it takes as keyword arguments, each missing one at the
family's default, into the whole plain model. Parallelism is applied to that model afterwards
(pytrain.parallel); the spec pytrain.specs registers in MODEL_INITIALIZER bundles a Family with its
checkpoint adapters, which this package must not know.

model_type (what it is): how q, k and v are projected; the parameter names.
- INTERNLM (InternLM v1, 7B/20B): one Wqkv [q, k, v], biases unless no_bias; embedding, blocks.N.mixer /
  mlp / norm1 / norm2, norm, head.
- INTERNLM2, INTERNLM2_PUBLIC (InternLM2): the grouped wqkv (per kv head: its q heads, then k, then v);
  tok_embeddings, layers.N.attention / feed_forward / attention_norm / ffn_norm, norm, output.
- INTERNLM3 (InternLM3): INTERNLM2's layers and names, without biases by default.
- LLAMA2, LLAMA (LLaMA 2/3): wq, wk, wv (the grouped wqkv with enable_qkv_fusion); names as INTERNLM2.
- QWEN2 (Qwen2 / Qwen2.5): wq, wk, wv with qkv_bias, wo with o_bias; embed_tokens, then as INTERNLM2.
- GEMMA (Gemma): wq, wk, wv, wo (no_bias) under QWEN2's names; GeGLU MLP (use_swiglu=False), RMSNorm by
  (1 + weight) (add_unit_offset), embeddings times sqrt(hidden_size), head tied to the embedding.
- BAICHUAN2 (Baichuan2-7B): one wqkv [q; k; v] and out_proj (never biased) under INTERNLM2's names; the
  LM head's rows L2-normalised at use (norm_head).
- QWEN3 (Qwen3 dense): QWEN2's names and projections without biases, and an RMSNorm over each head's q
  and k before the rotary embedding (layers.N.attention.q_norm / k_norm, head_dim wide).

Mixtures of experts (pytrain.model.moe; num_experts <= 1 builds the dense model, as InternEvo): each
layer's MLP is an MoE (`<mlp>.moe_layer.gate.wg`, `<mlp>.moe_layer.experts.w1|w3|w2`) of experts as wide
as the dense MLP would be (mlp_ratio, multiple_of), routed per moe_type / top_k / moe_layer_kwargs.
- INTERNLM_MoE (InternLM v1 + MoE): INTERNLM's layers and names; moe_use_residual (or num_shared_experts
  = n) adds InternLM's residual MLP (n times as wide) mixed in by a softmax `coefficient` [2, H].
- MIXTRALMOE (Mixtral): wq, wk, wv, wo (qkv_bias, o_bias), InternEvo's v1-style names (embedding,
  blocks.N.mixer / mlp / norm1 / norm2, norm, head); num_shared_experts as INTERNLM_MoE's residual MLP.
- QWEN2MOE (Qwen1.5-MoE / Qwen2-MoE): QWEN2's layers and names; num_shared_experts = n adds the shared
  expert (n times as wide) gated by sigmoid(`coefficient` [1, H]).
- QWEN3MOE (Qwen3-MoE): QWEN3's layers and names (q/k norms, no biases); Dropless top-k renormalised
  (norm_topk_prob), no shared expert unless num_shared_experts is set (then as QWEN2MOE's).
"""

import inspect
from collections.abc import Callable
from dataclasses import astuple, dataclass, field, replace

from pytrain.model_args import COMMON_FIELDS, DEFAULTS, MOE_FIELDS, DecoderArgs

from .decoder import (
    Attention,
    Decoder,
    FusedQKVAttention,
    GroupedQKVAttention,
    Names,
    SeparateQKVAttention,
    decoder_layers,
)
from .moe import moe_mlp


@dataclass(frozen=True)
class AttentionKind:
    """How a family projects q, k and v: `projections(args)` -> (the Attention class, its arguments), chosen
    by the fields the kind adds to the family's (qk_interleaved, the rotary convention, in each)."""

    fields: tuple[str, ...]
    projections: Callable[[DecoderArgs], tuple[type[Attention], dict]]


def _internlm2_projections(args: DecoderArgs) -> tuple[type[Attention], dict]:
    if args.enable_qkv_fusion:
        return GroupedQKVAttention, dict(bias=not args.no_bias)
    return SeparateQKVAttention, dict(qkv_bias=not args.no_bias, o_bias=not args.no_bias)


# InternLM v1's one Wqkv [q; k; v] and out_proj, biased unless no_bias
FUSED_QKV = AttentionKind(("no_bias", "qk_interleaved"), lambda args: (FusedQKVAttention, dict(bias=not args.no_bias)))
# Baichuan2's wqkv [q; k; v] (InternEvo's MHA, HF's W_pack), biased unless no_bias, and out_proj, never biased
BAICHUAN2_QKV = AttentionKind(
    ("no_bias", "qk_interleaved"),
    lambda args: (FusedQKVAttention, dict(bias=not args.no_bias, qkv_name="wqkv", out_bias=False)),
)
# InternLM2's grouped wqkv (or wq, wk, wv without enable_qkv_fusion) and wo, biased unless no_bias
INTERNLM2_QKV = AttentionKind(("no_bias", "enable_qkv_fusion", "qk_interleaved"), _internlm2_projections)
# wq, wk, wv (qkv_bias) and wo (o_bias)
SEPARATE_QKV = AttentionKind(
    ("qkv_bias", "o_bias", "qk_interleaved"),
    lambda args: (SeparateQKVAttention, dict(qkv_bias=args.qkv_bias, o_bias=args.o_bias)),
)


@dataclass(frozen=True)
class Family:
    """A model family on the shared decoder (the module docstring). `defaults`: InternEvo's defaults for
    this family where they differ from DecoderArgs'; `fields`: what it takes besides COMMON_FIELDS and its
    attention's fields (MOE_FIELDS come with `experts`); `experts`: a mixture of experts whose shared MLP is
    InternLM's softmax-mixed "residual" one or Qwen2-MoE's sigmoid-gated "shared" expert; `qk_norm`: the
    attention normalizes each head's q and k (no field: InternEvo's Qwen3 always does); `scale_embeddings`:
    the embeddings are multiplied by sqrt(hidden_size) (no field: InternEvo's Gemma always does)."""

    name: str
    names: Names
    attention: AttentionKind
    defaults: dict = field(default_factory=dict)
    fields: tuple[str, ...] = ()
    experts: str | None = None
    qk_norm: bool = False  # RMSNorm over each head's q and k before the rotary embedding (Qwen3)
    scale_embeddings: bool = False  # the embeddings times sqrt(hidden_size) (Gemma)

    def __post_init__(self):
        unknown = self._taken() - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{self.name}: {sorted(unknown)} are not model fields (pytrain.model_args.DecoderArgs)")
        not_taken = set(self.defaults) - self._taken()
        if not_taken:
            raise ValueError(f"{self.name}: defaults for {sorted(not_taken)}, which the family does not take")
        clash = [name for name in astuple(self.names) if hasattr(Decoder, name)]
        if clash:
            raise ValueError(f"{self.name}: the names {clash} are taken by Decoder's attributes; pick others")
        if self.experts not in (None, "residual", "shared"):
            raise ValueError(f"{self.name}: experts={self.experts!r}: 'residual', 'shared' or None (dense)")

    def _taken(self) -> set[str]:
        return {*COMMON_FIELDS, *self.attention.fields, *self.fields, *(MOE_FIELDS if self.experts else ())}

    @property
    def parameters(self) -> dict:
        """The fields this family takes, each with its default, in DecoderArgs' order."""
        taken = self._taken()
        return {name: self.defaults.get(name, default) for name, default in DEFAULTS.items() if name in taken}

    @property
    def signature(self) -> inspect.Signature:
        """build's signature as a function of exactly the family's fields would have it (what the config reads)."""
        keyword = inspect.Parameter.KEYWORD_ONLY
        return inspect.Signature(
            [inspect.Parameter(name, keyword, default=default) for name, default in self.parameters.items()],
            return_annotation=Decoder,
        )

    def args(self, **fields) -> DecoderArgs:
        """The decoder's arguments: the given fields over the family's defaults."""
        unknown = set(fields) - set(self.parameters)
        if unknown:
            raise TypeError(
                f"{self.name} takes no field {', '.join(sorted(unknown))}; its fields: {', '.join(self.parameters)}"
            )
        return DecoderArgs(**{**self.defaults, **fields})

    def build(self, **fields) -> Decoder:
        args = self.args(**fields)
        attention, attention_args = self.attention.projections(args)
        if self.qk_norm:
            attention_args["qk_norm_eps"] = args.layer_norm_epsilon
        mlp = moe_mlp(args, self.experts) if self.experts else None
        layers = decoder_layers(self.names, attention, attention_args, args, mlp)
        return Decoder(self.name, self.names, layers, args, scale_embeddings=self.scale_embeddings)


INTERNLM_NAMES = Names("embedding", "blocks", "mixer", "mlp", "norm1", "norm2", "norm", "head")
INTERNLM2_NAMES = Names(
    "tok_embeddings", "layers", "attention", "feed_forward", "attention_norm", "ffn_norm", "norm", "output"
)
QWEN2_NAMES = replace(INTERNLM2_NAMES, embedding="embed_tokens")

# Qwen2-7B's and Qwen2-57B-A14B's
QWEN2_SIZE = dict(num_layers=28, hidden_size=3584, num_attention_heads=28, num_kv_attention_heads=4)

# InternLM v1 (InternLM-7B: bias on Wqkv and out_proj, no MLP bias)
INTERNLM = Family("INTERNLM", INTERNLM_NAMES, FUSED_QKV, dict(qk_interleaved=False))
# InternLM2 / InternLM2.5 (GQA, the grouped wqkv; InternLM2-7B: no_bias=True, 8 kv heads)
INTERNLM2 = Family("INTERNLM2", INTERNLM2_NAMES, INTERNLM2_QKV, dict(vocab_size=92544, mlp_ratio=4.0), ("adapt_hf",))
# LLaMA 2 / 3 (Llama-2-7B: no_bias=True, mlp_ratio 2.6875 with multiple_of 256 -> 11008)
LLAMA2 = Family(
    "LLAMA2",
    INTERNLM2_NAMES,
    INTERNLM2_QKV,
    dict(vocab_size=32000, mlp_ratio=4.0, enable_qkv_fusion=False, adapt_hf=False),
    ("head_dim", "adapt_hf"),
)
# Qwen2 / Qwen2.5 (bias on wq, wk, wv; Qwen2-7B: 28 heads, 4 kv heads, MLP 18944 = mlp_ratio 37/7)
QWEN2 = Family(
    "QWEN2",
    QWEN2_NAMES,
    SEPARATE_QKV,
    dict(QWEN2_SIZE, vocab_size=152064, mlp_ratio=4.0, layer_norm_epsilon=1e-6, rope_base=1e6, qk_interleaved=False),
    ("mlp_bias", "head_dim"),
)
# InternLM v1 with MoE MLPs (InternLM's 7B_MoE4_sft: 4 experts, top-2; moe_use_residual = InternEvo's later
# num_shared_experts=1)
INTERNLM_MOE = Family(
    "INTERNLM_MoE", INTERNLM_NAMES, FUSED_QKV, dict(qk_interleaved=False), ("moe_use_residual",), experts="residual"
)
# Mixtral (Mixtral-8x7B: num_experts=8, top_k=2, qkv_bias=False, 14336-wide experts = mlp_ratio 3.5;
# InternEvo's class default qkv_bias=True is kept)
MIXTRAL_MOE = Family(
    "MIXTRALMOE",
    INTERNLM_NAMES,
    SEPARATE_QKV,
    dict(vocab_size=32000, num_kv_attention_heads=8, mlp_ratio=3.5, rope_base=1e6, qk_interleaved=False),
    ("head_dim",),
    experts="residual",
)
# Qwen2-MoE (Qwen2-57B-A14B: 64 experts 2560 wide = mlp_ratio 5/7, top_k=8, num_shared_experts=8; for HF's
# routing use moe_type="Dropless" with moe_layer_kwargs=dict(normalize_expert_weights=norm_topk_prob))
QWEN2_MOE = Family(
    "QWEN2MOE",
    QWEN2_NAMES,
    SEPARATE_QKV,
    dict(QWEN2_SIZE, vocab_size=151936, mlp_ratio=5 / 7, layer_norm_epsilon=1e-6, rope_base=1e6, qk_interleaved=False),
    ("head_dim",),
    experts="shared",
)

# What Qwen3 dense and MoE share: the vocabulary, norms' epsilon, rotary base and convention, no attention biases
QWEN3_COMMON = dict(vocab_size=151936, layer_norm_epsilon=1e-6, rope_base=1e6, qkv_bias=False, qk_interleaved=False)
# Qwen3 (Qwen3-8B: 36 layers, 32 heads of 128, 8 kv heads, MLP 12288 = mlp_ratio 3)
QWEN3_8B = dict(num_layers=36, hidden_size=4096, num_attention_heads=32, num_kv_attention_heads=8, head_dim=128)
QWEN3 = Family(
    "QWEN3", QWEN2_NAMES, SEPARATE_QKV, dict(QWEN3_COMMON, **QWEN3_8B, mlp_ratio=3.0), ("head_dim",), qk_norm=True
)

# Qwen3-MoE (Qwen3-30B-A3B: 48 layers, 32 heads of 128, 4 kv heads, 128 experts 768 wide = mlp_ratio 0.375, top-8,
# renormalised (norm_topk_prob), no shared expert; InternEvo's QWEN3MOE runs Dropless routing only)
QWEN3_MOE = Family(
    "QWEN3MOE",
    QWEN2_NAMES,
    SEPARATE_QKV,
    dict(
        QWEN3_COMMON,
        num_layers=48,
        hidden_size=2048,
        num_attention_heads=32,
        num_kv_attention_heads=4,
        head_dim=128,
        mlp_ratio=0.375,
        num_experts=128,
        top_k=8,
        moe_type="Dropless",
    ),
    ("head_dim",),
    experts="shared",
    qk_norm=True,
)

# Gemma (Gemma-7B: 28 layers, 16 heads of 256 (head_dim is not hidden / heads), MLP 24576 = mlp_ratio 8, GeGLU,
# RMSNorm by (1 + weight), tied head; Gemma-2B: num_kv_attention_heads=1). InternEvo's Gemma class unties the head
# and defaults to add_unit_offset=False and attention biases; its 7B_gemma.py sets what Gemma is, as these do.
GEMMA = Family(
    "GEMMA",
    QWEN2_NAMES,
    INTERNLM2_QKV,
    dict(
        num_layers=28,
        hidden_size=3072,
        num_attention_heads=16,
        num_kv_attention_heads=16,
        head_dim=256,
        vocab_size=256000,
        mlp_ratio=8.0,
        layer_norm_epsilon=1e-6,
        no_bias=True,
        enable_qkv_fusion=False,
        qk_interleaved=False,
        use_swiglu=False,
        add_unit_offset=True,
        tie_word_embeddings=True,
    ),
    ("head_dim", "use_swiglu", "add_unit_offset"),
    scale_embeddings=True,
)

# InternLM3 (InternLM3-8B: 48 layers, 32 heads, 2 kv heads, MLP 10240 = mlp_ratio 2.5, no biases, rope base 5e7;
# InternEvo registers INTERNLM3 as its InternLM2 class: the grouped wqkv and InternLM2's names). Its published
# dynamic-NTK rope scaling (factor 6, beyond 32k positions) is a config's (configs/internlm3_8B.py), as in InternEvo.
INTERNLM3 = Family(
    "INTERNLM3",
    INTERNLM2_NAMES,
    INTERNLM2_QKV,
    dict(
        num_layers=48,
        num_kv_attention_heads=2,
        vocab_size=128512,
        mlp_ratio=2.5,
        no_bias=True,
        rope_base=5e7,
    ),
    ("adapt_hf",),
)

# Baichuan2 (Baichuan2-7B: 32 layers of 32 heads, MLP 11008, vocab 125696, rotary, no biases, the normalised
# head). Baichuan2-13B's ALiBi attention is not available: InternEvo's BAICHUAN2 always uses rotary embeddings,
# it has no field for ALiBi, so no InternEvo config trains it.
BAICHUAN2 = Family(
    "BAICHUAN2",
    INTERNLM2_NAMES,
    BAICHUAN2_QKV,
    dict(vocab_size=125696, layer_norm_epsilon=1e-6, no_bias=True, qk_interleaved=False, norm_head=True),
    ("norm_head",),
)

# The builders by InternEvo's function names
build_internlm = INTERNLM.build
build_internlm2 = INTERNLM2.build
build_llama2 = LLAMA2.build
build_qwen2 = QWEN2.build
build_internlm_moe = INTERNLM_MOE.build
build_mixtral_moe = MIXTRAL_MOE.build
build_qwen2_moe = QWEN2_MOE.build
build_qwen3 = QWEN3.build
build_qwen3_moe = QWEN3_MOE.build
build_gemma = GEMMA.build
build_internlm3 = INTERNLM3.build
build_baichuan2 = BAICHUAN2.build
