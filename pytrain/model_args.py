"""The model section's fields as the model reads them, shared by pytrain.config (which validates a file
against them) and pytrain.model (which builds from them), so that neither imports the other.

- `DecoderArgs`: every field a model family may take, with the one set of defaults (InternLM-7B's, the
  seed's model block). A family takes COMMON_FIELDS and some of the others, and overrides some defaults
  with InternEvo's for that family (its spec, pytrain.model.families).
- `mlp_width`: InternLM's SwiGLU width rule, which the config checks against the tensor-parallel size.
- Long context: `rope_scaling_from_fields` turns the rotary-scaling fields into pytrain.kernels.RopeScaling's
  arguments and `layer_windows` the sliding-window fields into each layer's window, or say which field is wrong.
- The mixture-of-experts routing settings (`moe_type`, `moe_layer_kwargs`): `routing_from_fields` turns
  them into a `Routing`, or says which one pytrain cannot run; the config runs it to validate a file.
"""

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class DecoderArgs:
    """The model fields of every family (InternEvo's names) with their defaults; see README's config
    reference for what each means."""

    num_layers: int = 32
    hidden_size: int = 4096
    num_attention_heads: int = 32
    vocab_size: int = 103168
    num_kv_attention_heads: int | None = None  # None: = num_attention_heads
    mlp_ratio: float = 8 / 3
    multiple_of: int = 256
    # attention biases: InternLM's one switch, or Qwen2's two
    no_bias: bool = False
    qkv_bias: bool = True
    o_bias: bool = False
    mlp_bias: bool = False
    enable_qkv_fusion: bool = True  # InternLM2's grouped wqkv rather than wq, wk, wv
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    norm_type: str = "rmsnorm"
    layer_norm_epsilon: float = 1e-5
    apply_post_layer_norm: bool = False
    rope_base: float = 10000.0
    # rotary scaling for long context (pytrain.kernels.rope_scaling; transformers' rope_parameters)
    rope_type: str = "normal"  # "normal", "linear", "dynamic" (NTK), "llama3"
    rope_scaling_factor: float = 1.0
    use_dynamic_ntk_rope: bool = False  # InternEvo's switch for rope_type "dynamic"
    max_position_embeddings: int = 2048  # "dynamic": the length past which the base grows
    low_freq_factor: float = 1.0  # "llama3"
    high_freq_factor: float = 4.0  # "llama3"
    original_max_position_embeddings: int | None = None  # "llama3" (None: max_position_embeddings)
    # sliding-window attention (Qwen2's): layers max_window_layers and above see the last sliding_window tokens
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 0
    qk_interleaved: bool | None = None  # None: not adapt_hf (InternEvo's rule)
    adapt_hf: bool = True
    use_flash_attn: bool = True
    tie_word_embeddings: bool = False
    use_swiglu: bool = True  # False: GeGLU, w2(gelu_tanh(w1 x) * w3 x) (GEMMA)
    add_unit_offset: bool = False  # RMSNorm scales by (1 + weight) (GEMMA)
    norm_head: bool = False  # the LM head's rows L2-normalised at use (BAICHUAN2)
    embed_grad_scale: float = 1.0
    checkpoint: bool | float = False
    dtype: str = "torch.bfloat16"
    embed_split_hidden: bool = True
    parallel_output: bool = True
    num_chunks: int = 1
    # mixtures of experts (num_experts <= 1: the dense model)
    num_experts: int = 1
    top_k: int = 1
    moe_type: str | None = "GShard"
    moe_use_residual: bool = False
    num_shared_experts: int = 0
    moe_layer_kwargs: dict | None = None


DEFAULTS = {f.name: f.default for f in fields(DecoderArgs)}
# The fields every family takes; each of the others only the families whose spec names it (a builder taking
# **kwargs gets one of those only when the file gives it, pytrain.config).
COMMON_FIELDS = (
    "num_layers",
    "hidden_size",
    "num_attention_heads",
    "vocab_size",
    "num_kv_attention_heads",
    "mlp_ratio",
    "multiple_of",
    "norm_type",
    "layer_norm_epsilon",
    "apply_post_layer_norm",
    "rope_base",
    "rope_type",
    "rope_scaling_factor",
    "use_dynamic_ntk_rope",
    "max_position_embeddings",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
    "use_flash_attn",
    "tie_word_embeddings",
    "embed_grad_scale",
    "checkpoint",
    "dtype",
    "embed_split_hidden",
    "parallel_output",
    "num_chunks",
)
FAMILY_FIELDS = frozenset(DEFAULTS) - set(COMMON_FIELDS)
# What a mixture-of-experts family takes besides a dense one's (INTERNLM_MoE also moe_use_residual)
MOE_FIELDS = ("num_experts", "top_k", "moe_type", "num_shared_experts", "moe_layer_kwargs")


def mlp_width(hidden_size: int, mlp_ratio: float, multiple_of: int = 256) -> int:
    """InternLM's SwiGLU width: int(hidden * ratio) rounded up to a multiple (4096 * 8/3 -> 11008)."""
    width = int(hidden_size * mlp_ratio)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


# The rotary scaling types (pytrain.kernels.rope_scaling.ROPE_TYPES; "normal" is transformers' "default")
ROPE_TYPES = ("normal", "linear", "dynamic", "llama3")
# The fields rope_scaling_from_fields reads
ROPE_FIELDS = (
    "rope_type",
    "rope_scaling_factor",
    "use_dynamic_ntk_rope",
    "max_position_embeddings",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
)


def rope_scaling_from_fields(
    *,
    rope_type: str,
    rope_scaling_factor: float,
    use_dynamic_ntk_rope: bool,
    max_position_embeddings: int,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int | None,
) -> dict:
    """pytrain.kernels.RopeScaling's arguments for the model's rotary-scaling fields, only those its type reads (so
    fields that compute the same frequencies give equal scalings); a ValueError names the field to change."""
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_type={rope_type!r}: must be one of {', '.join(map(repr, ROPE_TYPES))} ('normal' is transformers' "
            "'default')"
        )
    if use_dynamic_ntk_rope:  # InternEvo's switch: dynamic NTK with rope_scaling_factor and max_position_embeddings
        if rope_type not in ("normal", "dynamic"):
            raise ValueError(
                f"use_dynamic_ntk_rope=True means rope_type='dynamic' (InternEvo's switch), but "
                f"rope_type={rope_type!r}: set only one of them"
            )
        rope_type = "dynamic"
    if rope_type == "normal":
        return {}
    scaling = dict(rope_type=rope_type, factor=rope_scaling_factor)
    if rope_type == "dynamic":
        scaling.update(max_position_embeddings=max_position_embeddings)
    if rope_type == "llama3":
        if high_freq_factor <= low_freq_factor:
            raise ValueError(
                f"high_freq_factor={high_freq_factor} must be greater than low_freq_factor={low_freq_factor} "
                "(Llama 3.1: 4.0 and 1.0)"
            )
        scaling.update(
            low_freq_factor=low_freq_factor,
            high_freq_factor=high_freq_factor,
            original_max_position_embeddings=original_max_position_embeddings or max_position_embeddings,
        )
    return scaling


def layer_windows(
    use_sliding_window: bool, sliding_window: int | None, max_window_layers: int, num_layers: int
) -> list[int | None]:
    """Each layer's attention window (the tokens a query sees, itself included; None: its whole causal context), as
    transformers' Qwen2 lays out its layers: with use_sliding_window, layers max_window_layers and above have one."""
    if not use_sliding_window:
        return [None] * num_layers
    if sliding_window is None or sliding_window <= 0:
        raise ValueError(
            f"sliding_window={sliding_window!r}: use_sliding_window=True needs a window, a positive int (e.g. 4096)"
        )
    return [sliding_window if index >= max_window_layers else None for index in range(num_layers)]


MOE_TYPES = ("GShard", "Dropless")
UNAVAILABLE_MOE_TYPES = ("MegaBlock", "MegaBlock-D", "MegaBlock-Dropless")

# moe_layer_kwargs per moe_type: name -> (default, types, kind, allowed values or None); kind "acts",
# "ignored" (an implementation choice of InternEvo's, same math) or "unavailable" (only `allowed`).
NUMBER = (int, float)
NONE = type(None)
MOE_LAYER_KWARGS = {
    "GShard": {
        "capacity_factor": (1.0, NUMBER, "acts", None),
        "eval_capacity_factor": (1.0, NUMBER, "acts", None),
        "min_capacity": (4, int, "acts", None),
        "drop_tokens": (True, bool, "acts", None),
        "use_fused_gating": (True, bool, "acts", None),
        "use_rts": (True, bool, "acts", None),
        "noisy_gate_policy": (None, (str, NONE), "unavailable", (None, "None")),
        "use_grouped_mlp": (True, bool, "ignored", None),
    },
    "Dropless": {
        "normalize_expert_weights": (True, bool, "acts", None),
        "capacity_factor": (None, (*NUMBER, NONE), "unavailable", (None,)),
        "drop_and_pad": (False, bool, "unavailable", (False,)),
        "noisy_gate_policy": (None, (str, NONE), "unavailable", (None, "None")),
        "drop_policy": ("probs", str, "ignored", None),
        "enable_fused_permute": (True, bool, "ignored", None),
        "token_dispatch_policy": ("alltoall", str, "ignored", None),
        "use_grouped_mlp": (True, bool, "ignored", None),
        "deterministic_mode": (False, bool, "ignored", None),
    },
}


@dataclass(frozen=True)
class Routing:
    """How a layer routes tokens (see the module docstring)."""

    kind: str  # "GShard" or "Dropless"
    num_experts: int
    top_k: int
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True  # GShard: False = no capacity
    normalize: bool = True  # renormalise the kept choices' weights to sum to 1

    def capacity(self, tokens: int, training: bool) -> int | None:
        """Assignments each expert takes (None: unlimited)."""
        if self.kind != "GShard" or not self.drop_tokens:
            return None
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return max(math.ceil(self.top_k * tokens / self.num_experts * factor), self.min_capacity)


def routing_from_fields(
    moe_type: str | None, num_experts: int, top_k: int, moe_layer_kwargs: dict | None
) -> tuple[Routing, tuple[str, ...]]:
    """(Routing, the moe_layer_kwargs given that have no effect here); a ValueError names a field pytrain
    cannot run (random gating, capacity in Dropless, MegaBlock)."""
    moe_type = moe_type or "GShard"  # InternEvo's launch fills in "GShard"
    if moe_type in UNAVAILABLE_MOE_TYPES:
        raise ValueError(f"moe_type={moe_type!r} (MegaBlocks) is not available in pytrain; use 'GShard' or 'Dropless'")
    if moe_type not in MOE_TYPES:
        raise ValueError(f"moe_type={moe_type!r}: must be one of {', '.join(map(repr, MOE_TYPES))}")
    if num_experts < 2:
        raise ValueError(f"num_experts={num_experts}: a mixture of experts needs at least 2")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be within [1, num_experts={num_experts}]")
    table = MOE_LAYER_KWARGS[moe_type]
    given = dict(moe_layer_kwargs or {})
    ignored = []
    for key, value in given.items():
        if key not in table:
            known = ", ".join(table)
            raise ValueError(f"moe_layer_kwargs[{key!r}]: not a setting of moe_type {moe_type!r}; known: {known}")
        _, types, kind, allowed = table[key]
        types = types if isinstance(types, tuple) else (types,)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            names = " | ".join("None" if t is NONE else t.__name__ for t in types)
            raise ValueError(f"moe_layer_kwargs[{key!r}] = {value!r}: expected {names}")
        if kind == "unavailable" and value not in allowed:
            raise ValueError(
                f"moe_layer_kwargs[{key!r}] = {value!r} is not available in pytrain ({_WHY[key]}); "
                f"leave it at {allowed[0]!r}"
            )
        if kind == "ignored":
            ignored.append(key)
    settings = {key: spec[0] for key, spec in table.items()} | given
    if moe_type == "Dropless":
        return Routing("Dropless", num_experts, top_k, normalize=settings["normalize_expert_weights"]), tuple(ignored)
    for key in ("capacity_factor", "eval_capacity_factor"):
        if settings[key] <= 0:
            raise ValueError(f"moe_layer_kwargs[{key!r}] = {settings[key]!r}: must be > 0")
    if settings["min_capacity"] < 0:
        raise ValueError(f"moe_layer_kwargs['min_capacity'] = {settings['min_capacity']}: must be >= 0")
    fused = settings["use_fused_gating"] or top_k > 2  # InternEvo: top_k > 2 always takes the fused gating
    if not fused:
        if top_k == 2:
            raise ValueError(
                "moe_layer_kwargs['use_fused_gating'] = False with top_k=2 is DeepSpeed's top-2 gating, which draws "
                "the second expert with Gumbel noise: not available in pytrain; leave use_fused_gating at True"
            )
        if settings["use_rts"] and settings["drop_tokens"]:
            raise ValueError(
                "moe_layer_kwargs['use_rts'] = True with use_fused_gating=False: random token selection (which "
                "tokens an over-full expert keeps, drawn at random) is not available in pytrain; set use_rts=False "
                "(tokens are kept in order)"
            )
    routing = Routing(
        "GShard",
        num_experts,
        top_k,
        capacity_factor=float(settings["capacity_factor"]),
        eval_capacity_factor=float(settings["eval_capacity_factor"]),
        min_capacity=settings["min_capacity"],
        drop_tokens=settings["drop_tokens"],
        normalize=fused,
    )
    return routing, tuple(ignored)


_WHY = {
    "noisy_gate_policy": "Jitter and RSample add random noise to the router",
    "capacity_factor": "Dropless with a capacity",
    "drop_and_pad": "Dropless with a capacity",
}
