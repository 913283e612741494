"""Hugging Face transformers weights in and out, for every family whose spec (pytrain.specs) names its HF class
(an `HFClass` below: LLAMA, QWEN2, MIXTRAL, QWEN2_MOE).

| model_type | HF class | what changes |
|---|---|---|
| INTERNLM | LlamaForCausalLM (attention_bias = not no_bias) | Wqkv split into q/k/v_proj, out_proj -> o_proj |
| INTERNLM2 | LlamaForCausalLM | the grouped wqkv unpacked into q/k/v_proj |
| LLAMA2 | LlamaForCausalLM | names only |
| QWEN2 | Qwen2ForCausalLM | names only |
| MIXTRALMOE | MixtralForCausalLM (no attention biases, no shared MLP) | the stacked experts split per expert |
| INTERNLM_MoE | MixtralForCausalLM only with no_bias=True and no residual MLP | Wqkv split, experts split |
| QWEN2MOE | Qwen2MoeForCausalLM (needs its shared expert: num_shared_experts >= 1) | experts split |

INTERNLM_MoE as InternLM trains it (biases on Wqkv and out_proj, or a residual MLP) has no Hugging Face
class: Mixtral's attention has no biases and no residual MLP, Qwen2-MoE's has no out_proj bias.

Mixtures of experts (pytrain.model.moe): `<mlp>.moe_layer.gate.wg` -> `block_sparse_moe.gate` (Mixtral) or
`mlp.gate` (Qwen2-MoE); the stacked experts `<mlp>.moe_layer.experts.w1|w3|w2` (E, ., .) <-> E tensors
each, `block_sparse_moe.experts.{e}.w1|w3|w2.weight` (Mixtral) or `mlp.experts.{e}.gate_proj|up_proj|
down_proj.weight` (Qwen2-MoE): the per-expert names Hub checkpoints use and transformers 5 still writes.
Qwen2-MoE's shared expert: `<mlp>.residual_mlp.*` <-> `mlp.shared_expert.*_proj`, `<mlp>.coefficient` <->
`mlp.shared_expert_gate`. HF routes without capacity (softmax, top-k, renormalised always for Mixtral,
iff norm_topk_prob for Qwen2-MoE): a model trained with GShard's capacity exports its weights, and HF runs
them as pytrain does with unlimited capacity. Reading, HFReader also accepts transformers 5's in-memory
layout saved as is (`mlp.experts.gate_up_proj` (E, 2I, H), `mlp.experts.down_proj` (E, H, I), `mlp.gate`
for Mixtral too): it presents those as the per-expert names.

Every family: embedding -> model.embed_tokens, attention_norm -> input_layernorm, mlp_norm ->
post_attention_layernorm, w1/w3/w2 -> gate/up/down_proj, norm -> model.norm, head -> lm_head (absent
when tied). qk_interleaved models (GPT-J rotary pairs) get their q and k rows reordered into HF's
rotate-half order (transformers' convert_llama_weights_to_hf permutation) and back.

Positions: the rotary base and scaling go out as transformers 5's `rope_parameters` (and transformers 4's
`rope_theta` / `rope_scaling`), "normal" as "default", with `max_position_embeddings`; a sliding window as Qwen2's
and Qwen3's use_sliding_window / sliding_window / max_window_layers, or Mixtral's sliding_window (every layer).
`position_fields(config)` reads them back as the model fields (a Llama 3.1 folder's rope_scaling: rope_type
'llama3', rope_scaling_factor, low/high_freq_factor, original_max_position_embeddings), and loading a folder
(`check_folder_positions`) refuses a model whose rotary embedding or windows differ from the folder's, naming the
fields to set.

`hf_rules(model)` gives, per pytrain parameter, its HF tensors and the two conversions; everything else
(whole-state export/import, reading a rank's shard from a sharded safetensors folder) is built on them.
A rule with `stacked=True` maps dim 0 of the pytrain tensor to its HF tensors one each (experts): a rank
holding experts [a, b) reads only hf_names[a:b] (`read_stacked_rows`; convert.load_hf_into does so).
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pytrain.kernels import RopeScaling
from pytrain.model.decoder import Decoder, FusedQKVAttention, GeGLU, GroupedQKVAttention, LayerNorm, NormHead
from pytrain.model.moe import MoE
from pytrain.model_args import DEFAULTS, ROPE_FIELDS, layer_windows, rope_scaling_from_fields
from pytrain.registry import MODEL_INITIALIZER

from . import schema
from .storage import CheckpointError, inside


@dataclass(frozen=True)
class HFClass:
    """The transformers class a family's weights map to (a family's spec names it: pytrain.specs), and what
    its architecture has, which a model must match to be exported."""

    architecture: str  # config.json's "architectures"
    model_type: str  # config.json's "model_type"
    # mixtures of experts: where HF keeps the router and the experts in a layer, and its names of w1, w3, w2
    experts: tuple[str, tuple[str, str, str]] | None = None
    # attention biases: "uniform" (one attention_bias for q, k, v and o), "qkv" (on q, k and v only), "none"
    biases: str = "uniform"
    shared_expert: bool = False  # Qwen2-MoE's sigmoid-gated shared expert, always there
    qk_norm: bool = False  # Qwen3's per-head q/k RMSNorm (q_norm, k_norm), always there
    gemma: bool = False  # Gemma's RMSNorm by (1 + weight) and embeddings times sqrt(hidden), always there
    packed_qkv: bool = False  # one W_pack [q; k; v] tensor (Baichuan) rather than q_proj, k_proj, v_proj
    norm_head: bool = False  # the LM head's rows normalised at use (Baichuan2's NormHead), always
    rope_scaling: bool = True  # reads rope_parameters' scaling (Baichuan's remote code does not)
    # its config's sliding window: "layers" (Qwen2's use_sliding_window, sliding_window, max_window_layers), "every"
    # (Mixtral's sliding_window, on every layer); None: none
    sliding_window: str | None = None


QWEN_EXPERTS = ("mlp", ("gate_proj", "up_proj", "down_proj"))
LLAMA = HFClass("LlamaForCausalLM", "llama")
QWEN2 = HFClass("Qwen2ForCausalLM", "qwen2", biases="qkv", sliding_window="layers")
MIXTRAL = HFClass(
    "MixtralForCausalLM", "mixtral", ("block_sparse_moe", ("w1", "w3", "w2")), biases="none", sliding_window="every"
)
QWEN2_MOE = HFClass("Qwen2MoeForCausalLM", "qwen2_moe", QWEN_EXPERTS, biases="qkv", shared_expert=True)
QWEN3 = HFClass("Qwen3ForCausalLM", "qwen3", qk_norm=True, sliding_window="layers")
QWEN3_MOE = HFClass("Qwen3MoeForCausalLM", "qwen3_moe", QWEN_EXPERTS, qk_norm=True)
GEMMA = HFClass("GemmaForCausalLM", "gemma", gemma=True)
# transformers reads model_type "internlm3" into its Llama class; its config has one switch for attention and MLP
# biases together, which InternEvo's InternLM3 (no MLP biases) cannot set: no biases
INTERNLM3 = HFClass("InternLM3ForCausalLM", "internlm3", biases="none")
# Baichuan2-7B's remote-code class (no transformers class: trust_remote_code); lm_head stored as trained
BAICHUAN2 = HFClass(
    "BaichuanForCausalLM", "baichuan", biases="none", packed_qkv=True, norm_head=True, rope_scaling=False
)
SHARD_BYTES = 4 << 30  # safetensors file size when exporting (transformers' own default is 5 GB)


@dataclass(frozen=True)
class Rule:
    """pytrain parameter `name` <-> the HF tensors `hf_names`."""

    name: str
    hf_names: tuple[str, ...]
    to_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    from_hf: Callable[..., torch.Tensor]
    stacked: bool = False  # hf_names[i] is row i of dim 0 (one expert each)

    @property
    def is_rename(self) -> bool:
        return self.to_hf is _same


def _same(t):
    return (t,)


def _one(t):
    return t


def _rename(name: str, hf_name: str) -> Rule:
    return Rule(name, (hf_name,), _same, _one)


def _unstack(t):
    return tuple(t.unbind(0))


def _stack(*tensors):
    return torch.stack(tensors)


def _stacked(name: str, hf_names: list[str]) -> Rule:
    return Rule(name, tuple(hf_names), _unstack, _stack, stacked=True)


def read_stacked_rows(reader: "HFReader", rule: Rule, pieces) -> torch.Tensor:
    """Rows [start, start + length) of each piece of a stacked rule's tensor (a rank's experts), reading only
    those experts' HF tensors."""
    return torch.stack([reader.get(rule.hf_names[i]) for start, length in pieces for i in range(start, start + length)])


def _interleaved_to_half(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head from GPT-J pairs (2i, 2i+1) to rotate-half order (i, i + d/2)."""
    return t.reshape(-1, head_dim // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _half_to_interleaved(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    return t.reshape(-1, 2, head_dim // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def hf_class(model: Decoder) -> HFClass:
    """The Hugging Face class of the model's family: the `hf` of the spec registered under its name."""
    family = model.family
    hf = getattr(MODEL_INITIALIZER.get_module(family), "hf", None) if family in MODEL_INITIALIZER else None
    if hf is None:
        known = [name for name in MODEL_INITIALIZER.names() if getattr(MODEL_INITIALIZER.get_module(name), "hf", None)]
        raise ValueError(f"model_type {family!r} has no Hugging Face mapping; known: {', '.join(known)}")
    return hf


# Baichuan2-13B has 7B's class and model_type but ALiBi attention: only its shape tells the two apart
BAICHUAN2_13B_SHAPE = {"hidden_size": 5120, "num_hidden_layers": 40}


def check_folder_class(model: Decoder, folder_config: dict) -> None:
    """A Hugging Face folder (its config.json) of another class than the model's family maps to says which it
    holds and which model_type reads it."""
    hf = hf_class(model)
    theirs = folder_config.get("model_type")
    if hf is BAICHUAN2 and all(folder_config.get(key) == size for key, size in BAICHUAN2_13B_SHAPE.items()):
        raise CheckpointError(
            "the Hugging Face folder holds Baichuan2-13B, whose attention adds ALiBi biases instead of rotary "
            "embeddings; BAICHUAN2 here (as InternEvo's) trains rotary attention only: ALiBi is not available"
        )
    if theirs is None or theirs == hf.model_type:
        return
    readers = [
        name
        for name in MODEL_INITIALIZER.names()
        if getattr(getattr(MODEL_INITIALIZER.get_module(name), "hf", None), "model_type", None) == theirs
    ]
    holds = ", ".join(folder_config.get("architectures") or []) or "?"
    raise CheckpointError(
        f"the Hugging Face folder holds a {holds} (model_type {theirs!r}), not the {hf.architecture} that "
        f"{model.family} reads: "
        + (f"model_type {' or '.join(readers)} reads it" if readers else "no pytrain model_type reads it")
    )


def check_exportable(model: Decoder) -> None:
    """What the model's HF class cannot express is refused, with the field that differs named."""
    layer = next(iter(model.decoder_layers.values()))
    if layer.post_norm:
        raise ValueError("model.apply_post_layer_norm=True has no Hugging Face Llama/Qwen2 equivalent")
    if isinstance(model.final_norm, LayerNorm):
        raise ValueError("model.norm_type='layernorm' has no Hugging Face Llama/Qwen2 equivalent: use 'rmsnorm'")
    hf = hf_class(model)
    cls = hf.architecture
    attention = layer.get_submodule(model.names.attention)
    mlp = layer.get_submodule(model.names.mlp)
    if attention.qk_norm != hf.qk_norm:
        raise ValueError(f"{model.family}: {cls} {'always has' if hf.qk_norm else 'has no'} q/k norms")
    if model.final_norm.unit_offset != hf.gemma:
        raise ValueError(f"{model.family}: {cls} needs add_unit_offset={hf.gemma} (its RMSNorm)")
    if isinstance(model.lm_head, NormHead) != hf.norm_head:
        raise ValueError(f"{model.family}: {cls} needs norm_head={hf.norm_head} (its LM head)")
    if model.scale_embeddings != hf.gemma:
        raise ValueError(f"{model.family}: {cls} {'always scales' if hf.gemma else 'does not scale'} the embeddings")
    biases = [attention.get_submodule(p).bias is not None for p in _projections(attention)]
    if hf.biases == "none" and any(biases):
        fields = "qkv_bias=False and o_bias=False" if len(biases) == 4 else "no_bias=True"
        raise ValueError(
            f"{model.family} with attention biases has no Hugging Face class ({cls}'s attention has none): "
            f"only {fields} exports, as {cls}"
        )
    if hf.biases == "qkv" and (biases != [True] * (len(biases) - 1) + [False] or mlp_has_bias(mlp)):
        raise ValueError(f"{cls} has biases on q, k and v only: use qkv_bias=True, o_bias=False, mlp_bias=False")
    if hf.biases == "uniform" and len(set(biases)) > 1:
        raise ValueError(
            f"{model.family}: {cls} has one attention_bias for q, k, v and o; this model has biases on some only"
        )
    if mlp_has_bias(mlp) and hf != LLAMA:
        raise ValueError(f"{model.family}: {cls} has no MLP biases: use mlp_bias=False")
    if attention.rotary.scaling.rope_type != "normal" and not hf.rope_scaling:
        raise ValueError(f"{model.family}: {cls} has no rotary scaling: use rope_type='normal'")
    windows = layer_windows_of(model)
    if any(windows) and hf.sliding_window is None:
        raise ValueError(f"{model.family}: {cls} has no sliding window: use use_sliding_window=False")
    if any(windows) and hf.sliding_window == "every" and not all(windows):
        raise ValueError(f"{cls} windows every layer: use max_window_layers=0")
    if hf.experts is not None and not isinstance(mlp, MoE):
        raise ValueError(f"{model.family} with num_experts <= 1 is dense: {cls} needs experts")
    if not isinstance(mlp, MoE):
        return
    if hf.shared_expert and mlp.shared_kind != "shared":
        raise ValueError(f"{cls} always has its shared expert: use num_shared_experts >= 1")
    if not hf.shared_expert and mlp.shared_kind is not None:
        raise ValueError(
            f"{model.family} with a residual MLP (num_shared_experts / moe_use_residual) has no Hugging Face "
            f"class: {cls} has no shared MLP"
        )
    if cls == "MixtralForCausalLM" and not mlp.moe_layer.routing.normalize:
        raise ValueError("Mixtral renormalises the top-k weights: DeepSpeed's top-1 (use_fused_gating=False) is not")


def layer_windows_of(model: Decoder) -> list[int | None]:
    """Each layer's sliding window (None: none)."""
    return [
        layer.get_submodule(model.names.attention).inner_attention.sliding_window
        for layer in model.decoder_layers.values()
    ]


def mlp_has_bias(mlp) -> bool:
    return not isinstance(mlp, MoE) and mlp.w1.bias is not None


def hf_rules(model: Decoder) -> list[Rule]:
    """The conversion rules of every parameter of the whole model (built on the meta device is enough)."""
    check_exportable(model)
    n = model.names
    rules = [
        _rename(f"{n.embedding}.weight", "model.embed_tokens.weight"),
        _rename(f"{n.norm}.weight", "model.norm.weight"),
    ]
    if not model.tie_word_embeddings:
        rules.append(_rename(f"{n.head}.weight", "lm_head.weight"))
    for index, layer in model.decoder_layers.items():
        ours, theirs = f"{n.layers}.{index}", f"model.layers.{index}"
        rules += [
            _rename(f"{ours}.{n.attention_norm}.weight", f"{theirs}.input_layernorm.weight"),
            _rename(f"{ours}.{n.mlp_norm}.weight", f"{theirs}.post_attention_layernorm.weight"),
        ]
        mlp = layer.get_submodule(n.mlp)
        if isinstance(mlp, MoE):
            rules += _moe_rules(mlp, f"{ours}.{n.mlp}", theirs, hf_class(model))
        else:
            rules += _swiglu_rules(mlp, f"{ours}.{n.mlp}", f"{theirs}.mlp")
        attention = layer.get_submodule(n.attention)
        rules += _attention_rules(attention, f"{ours}.{n.attention}", f"{theirs}.self_attn", hf_class(model).packed_qkv)
    return rules


def _swiglu_rules(mlp, ours: str, theirs: str) -> list[Rule]:
    rules = []
    for part, hf_part in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
        for kind in ("weight", "bias") if mlp.w1.bias is not None else ("weight",):
            rules.append(_rename(f"{ours}.{part}.{kind}", f"{theirs}.{hf_part}.{kind}"))
    return rules


def _moe_rules(mlp: MoE, ours: str, theirs: str, hf: HFClass) -> list[Rule]:
    where, parts = hf.experts
    experts = mlp.moe_layer.routing.num_experts
    rules = [_rename(f"{ours}.moe_layer.gate.wg.weight", f"{theirs}.{where}.gate.weight")]
    for part, hf_part in zip(("w1", "w3", "w2"), parts):
        hf_names = [f"{theirs}.{where}.experts.{e}.{hf_part}.weight" for e in range(experts)]
        rules.append(_stacked(f"{ours}.moe_layer.experts.{part}", hf_names))
    if mlp.shared_kind == "shared":  # Qwen2-MoE (check_exportable refuses the others)
        rules += _swiglu_rules(mlp.residual_mlp, f"{ours}.residual_mlp", f"{theirs}.mlp.shared_expert")
        rules.append(_rename(f"{ours}.coefficient.weight", f"{theirs}.mlp.shared_expert_gate.weight"))
    return rules


def _attention_rules(attention, ours: str, theirs: str, packed_qkv: bool) -> list[Rule]:
    shape, d = attention.shape, attention.head_dim
    interleaved = attention.rotary.interleaved
    q_hf, k_hf, v_hf, o_hf = (f"{theirs}.{p}_proj" for p in "qkvo")

    def rope_out(t):  # pytrain q/k rows -> HF's
        return _interleaved_to_half(t, d) if interleaved else t

    def rope_in(t):
        return _half_to_interleaved(t, d) if interleaved else t

    if isinstance(attention, (FusedQKVAttention, GroupedQKVAttention)):
        grouped = isinstance(attention, GroupedQKVAttention)
        fused = "wqkv" if grouped else attention.qkv_name
        out = "wo" if grouped else "out_proj"
        g = shape.num_heads // shape.num_kv_heads

        def split(t):
            if grouped:  # (kv groups, g q heads + k + v, d, ...)
                groups = t.reshape(shape.num_kv_heads, g + 2, d, *t.shape[1:])
                q = groups[:, :g].reshape(shape.q_width, *t.shape[1:])
                k, v = (groups[:, i].reshape(shape.kv_width, *t.shape[1:]) for i in (g, g + 1))
            else:
                q, k, v = t.split([shape.q_width, shape.kv_width, shape.kv_width])
            return rope_out(q), rope_out(k), v.contiguous()

        def join(q, k, v):
            q, k = rope_in(q), rope_in(k)
            if not grouped:
                return torch.cat([q, k, v])
            rest = q.shape[1:]
            q = q.reshape(shape.num_kv_heads, g, d, *rest)
            k, v = (t.reshape(shape.num_kv_heads, 1, d, *rest) for t in (k, v))
            return torch.cat([q, k, v], dim=1).reshape(-1, *rest)

        def pack(t):
            return (torch.cat(split(t)),)

        def unpack(packed):
            return join(*packed.split([shape.q_width, shape.kv_width, shape.kv_width]))

        fused_kinds = ("weight", "bias") if attention.get_submodule(fused).bias is not None else ("weight",)
        out_kinds = ("weight", "bias") if attention.get_submodule(out).bias is not None else ("weight",)
        if packed_qkv:
            rules = [Rule(f"{ours}.{fused}.{k}", (f"{theirs}.W_pack.{k}",), pack, unpack) for k in fused_kinds]
        else:
            rules = [
                Rule(f"{ours}.{fused}.{kind}", tuple(f"{p}.{kind}" for p in (q_hf, k_hf, v_hf)), split, join)
                for kind in fused_kinds
            ]
        rules += [_rename(f"{ours}.{out}.{kind}", f"{o_hf}.{kind}") for kind in out_kinds]
        return rules
    rules = []
    norms = (("q_norm", f"{theirs}.q_norm"), ("k_norm", f"{theirs}.k_norm")) if attention.qk_norm else ()
    for proj, hf in (("wq", q_hf), ("wk", k_hf), ("wv", v_hf), ("wo", o_hf), *norms):
        module = attention.get_submodule(proj)
        for kind in ("weight", "bias") if getattr(module, "bias", None) is not None else ("weight",):
            if proj in ("wq", "wk", "q_norm", "k_norm") and interleaved:  # a q/k norm's weight is per q/k row
                rules.append(Rule(f"{ours}.{proj}.{kind}", (f"{hf}.{kind}",), lambda t: (rope_out(t),), rope_in))
            else:
                rules.append(_rename(f"{ours}.{proj}.{kind}", f"{hf}.{kind}"))
    return rules


def hf_config(model: Decoder, dtype: str = "bfloat16") -> dict:
    """config.json for the HF class of the model's family."""
    check_exportable(model)
    layer = next(iter(model.decoder_layers.values()))
    attention, mlp = layer.get_submodule(model.names.attention), layer.get_submodule(model.names.mlp)
    shape = attention.shape
    hf = hf_class(model)
    cls = hf.architecture
    config = {
        "architectures": [cls],
        "model_type": hf.model_type,
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": mlp.w1.weight.shape[0] if not isinstance(mlp, MoE) else None,
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "gelu_pytorch_tanh" if isinstance(mlp, GeGLU) else "silu",
        "rms_norm_eps": model.final_norm.eps,
        **_rope_config(attention.rotary.base, attention.rotary.scaling),
        "max_position_embeddings": model.max_position_embeddings,
        "tie_word_embeddings": model.tie_word_embeddings,
        "torch_dtype": dtype,
    }
    has_bias = [attention.get_submodule(p).bias is not None for p in _projections(attention)]
    if hf.biases == "uniform":  # check_exportable has checked the biases, the MLP and the shared MLP
        config.update(attention_bias=has_bias[0])
    if hf == LLAMA:
        config.update(mlp_bias=mlp.w1.bias is not None)
    if hf.model_type.startswith("qwen"):
        config.update(use_sliding_window=False)
    windows = layer_windows_of(model)
    if any(windows) and hf.sliding_window == "layers":
        full = next(index for index, window in enumerate(windows) if window)  # the leading layers without one
        config.update(use_sliding_window=True, sliding_window=windows[full], max_window_layers=full)
    if isinstance(mlp, MoE):
        routing, width = mlp.moe_layer.routing, mlp.moe_layer.experts.w1.shape[1]
        config.update(intermediate_size=width, num_experts_per_tok=routing.top_k, output_router_logits=False)
        if cls == "MixtralForCausalLM":
            config.update(num_local_experts=routing.num_experts, router_jitter_noise=0.0, sliding_window=windows[0])
        else:
            config.update(
                num_experts=routing.num_experts,
                moe_intermediate_size=width,
                norm_topk_prob=routing.normalize,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            )
        if hf.shared_expert:
            config.update(shared_expert_intermediate_size=mlp.residual_mlp.w1.weight.shape[0], qkv_bias=True)
    return config


# transformers' rope_type of each of pytrain's ("normal" is its "default"), and the rope_parameters each reads
HF_ROPE_TYPES = {"normal": "default", "linear": "linear", "dynamic": "dynamic", "llama3": "llama3"}
HF_ROPE_PARAMETERS = {
    "linear": ("factor",),
    "dynamic": ("factor",),  # with the config's max_position_embeddings
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _rope_config(base: float, scaling: RopeScaling) -> dict:
    """config.json's rotary entries: transformers 5's rope_parameters, transformers 4's rope_theta and rope_scaling."""
    parameters = {name: getattr(scaling, name) for name in HF_ROPE_PARAMETERS.get(scaling.rope_type, ())}
    rope_type = HF_ROPE_TYPES[scaling.rope_type]
    return {
        "rope_theta": base,
        "rope_parameters": {"rope_type": rope_type, "rope_theta": base, **parameters},
        "rope_scaling": {"rope_type": rope_type, **parameters} if parameters else None,
    }


def position_fields(config: dict) -> dict:
    """The model fields (pytrain.model_args) a Hugging Face config.json sets for positions: rope_base, the rotary
    scaling (transformers 5's rope_parameters, or 4's rope_theta and rope_scaling) with max_position_embeddings, and the
    sliding window (layer_types, Qwen2's use_sliding_window / sliding_window / max_window_layers, or Mistral's and
    Mixtral's sliding_window on every layer). What pytrain has no form of is a CheckpointError naming it."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    hf_type = rope.get("rope_type", rope.get("type", "default"))
    ours = {theirs: mine for mine, theirs in HF_ROPE_TYPES.items()}
    if hf_type not in ours:
        raise CheckpointError(
            f"config.json's rope_type {hf_type!r} is not available in pytrain; it runs "
            f"{', '.join(map(repr, ours))} (pytrain's rope_type {', '.join(map(repr, HF_ROPE_TYPES))})"
        )
    if rope.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError("config.json's partial_rotary_factor: pytrain rotates the whole head (1.0) only")
    max_positions = config.get("max_position_embeddings", DEFAULTS["max_position_embeddings"])
    fields = {
        "rope_base": float(rope.get("rope_theta", config.get("rope_theta", DEFAULTS["rope_base"]))),
        "rope_type": ours[hf_type],
        "max_position_embeddings": max_positions,
    }
    for name in HF_ROPE_PARAMETERS.get(ours[hf_type], ()):
        if name not in rope and name != "original_max_position_embeddings":
            raise CheckpointError(f"config.json's rope_parameters of rope_type {hf_type!r} lack {name!r}")
        field = "rope_scaling_factor" if name == "factor" else name
        fields[field] = rope.get(name, max_positions)  # transformers' default of original_max_position_embeddings
    return fields | _window_fields(config)


def _window_fields(config: dict) -> dict:
    layer_types = config.get("layer_types")
    if layer_types is not None and "sliding_attention" in layer_types:
        full = layer_types.index("sliding_attention")
        if layer_types != ["full_attention"] * full + ["sliding_attention"] * (len(layer_types) - full):
            raise CheckpointError(
                f"config.json's layer_types {layer_types}: pytrain windows the layers from max_window_layers on, "
                "not another pattern"
            )
        return dict(use_sliding_window=True, sliding_window=config["sliding_window"], max_window_layers=full)
    if layer_types is not None or not (config.get("use_sliding_window", True) and config.get("sliding_window")):
        return dict(use_sliding_window=False)
    if config.get("model_type") == "qwen2_moe":
        raise CheckpointError("Qwen2-MoE's sliding window (every other layer) is not available in pytrain")
    # Qwen2's use_sliding_window (its own default for max_window_layers), or Mistral's / Mixtral's on every layer
    every = "use_sliding_window" not in config
    max_window_layers = 0 if every else config.get("max_window_layers", 28)
    return dict(use_sliding_window=True, sliding_window=config["sliding_window"], max_window_layers=max_window_layers)


def check_folder_positions(model: Decoder, folder_config: dict) -> None:
    """A folder whose config.json rotates q and k, or windows the attention, otherwise than the model is refused,
    naming the model fields that give the folder's."""
    folder = position_fields(folder_config)
    fields = {name: DEFAULTS[name] for name in ROPE_FIELDS} | folder
    scaling = RopeScaling(**rope_scaling_from_fields(**{name: fields[name] for name in ROPE_FIELDS}))
    indices = [int(index) for index in model.decoder_layers]  # global: a pipeline stage holds some
    windows = layer_windows(
        fields["use_sliding_window"], fields.get("sliding_window"), fields.get("max_window_layers", 0), max(indices) + 1
    )
    rotary = next(iter(model.decoder_layers.values())).get_submodule(model.names.attention).rotary
    differ = []
    if (rotary.base, rotary.scaling) != (fields["rope_base"], scaling):
        differ += ["rope_base", *ROPE_FIELDS]
    if layer_windows_of(model) != [windows[index] for index in indices]:
        differ += ["use_sliding_window", "sliding_window", "max_window_layers"]
    if differ:
        wanted = ", ".join(f"model.{name}={folder[name]!r}" for name in differ if name in folder)
        raise CheckpointError(
            f"the Hugging Face folder's config.json positions tokens otherwise than this model: set {wanted}"
        )


def _projections(attention) -> tuple[str, ...]:
    if isinstance(attention, FusedQKVAttention):
        return (attention.qkv_name, "out_proj")
    if isinstance(attention, GroupedQKVAttention):
        return ("wqkv", "wo")
    return ("wq", "wk", "wv", "wo")


def to_hf_state(model: Decoder, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{pytrain full name: tensor} of the whole model -> {HF name: tensor}."""
    out = {}
    for rule in hf_rules(model):
        out.update(zip(rule.hf_names, rule.to_hf(state[rule.name])))
    return out


def from_hf_state(model: Decoder, hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{HF name: tensor} -> {pytrain full name: tensor} of the whole model."""
    rules = hf_rules(model)
    missing = sorted({h for r in rules for h in r.hf_names} - set(hf_state))
    if missing:
        raise ValueError(
            f"the Hugging Face weights lack {len(missing)} tensor(s) this {model.family} model needs, "
            f"e.g. {', '.join(missing[:5])}"
        )
    state = {rule.name: rule.from_hf(*(hf_state[h] for h in rule.hf_names)) for rule in rules}
    if model.tie_word_embeddings:  # a tied head is the embedding (state_dict() lists both names)
        state[f"{model.names.head}.weight"] = state[f"{model.names.embedding}.weight"]
    return state


def save_hf_folder(
    model: Decoder, state: dict[str, torch.Tensor], folder: str | os.PathLike, dtype: torch.dtype = torch.bfloat16
) -> Path:
    """Writes config.json and safetensors shards (with model.safetensors.index.json when more than one)
    of the whole model's {full name: tensor} as the family's HF class loads them."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in to_hf_state(model, state).items()}
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {k: name for name, shard in zip(names, shards) for k in shard},
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = hf_config(model, str(dtype).removeprefix("torch."))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


class HFReader:
    """Reads tensors (or slices of them) from a HF folder's safetensors files, opening each file once.

    What the folder holds is checked before it is used, each problem a CheckpointError naming the file:
    the index against its schema, every file it names inside the folder (no absolute path, no `..`, no
    symlink leading out), each file's safetensors header against the file (pytrain.checkpoint.schema), each
    tensor in the file the index puts it in, and stored as floating point (weights: integers are refused,
    not converted).

    Experts saved in transformers 5's stacked layout (`<p>.mlp.experts.gate_up_proj` (E, 2I, H) = each
    expert's [gate; up], `<p>.mlp.experts.down_proj` (E, H, I)) are also readable under the per-expert names
    (`<p>.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight`, and for Mixtral `<p>.block_sparse_moe.
    experts.{e}.w1|w3|w2.weight` and `<p>.block_sparse_moe.gate.weight`): `aliases` maps such a name to
    (stored name, expert, first row, rows), read as that slice."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        self._files = {}
        if index.is_file():
            data = inside(self.folder, index.name, str(self.folder)).read_bytes()
            weight_map = schema.load_json(data, str(index), schema.HF_INDEX)["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            _, headers = self._file("model.safetensors")
            weight_map = dict.fromkeys(headers, "model.safetensors")
        else:
            raise CheckpointError(
                f"{self.folder}: no model.safetensors or model.safetensors.index.json: not a "
                f"Hugging Face safetensors folder (pytorch_model.bin files are not read: "
                f"they are pickles)"
            )
        self.weight_map = weight_map
        self.aliases = {}
        self.aliases = self._stacked_expert_aliases()
        for alias, (stored, *_) in self.aliases.items():
            self.weight_map.setdefault(alias, weight_map[stored])

    def _stacked_expert_aliases(self) -> dict:
        aliases = {}
        for name in list(self.weight_map):
            if name.endswith(".mlp.experts.gate_up_proj"):
                prefix = name.removesuffix(".mlp.experts.gate_up_proj")
                experts, rows = self._stacked_shape(name)
                for e in range(experts):
                    for index, (qwen, mixtral) in enumerate((("gate_proj", "w1"), ("up_proj", "w3"))):
                        where = (name, e, index * rows // 2, rows // 2)
                        aliases[f"{prefix}.mlp.experts.{e}.{qwen}.weight"] = where
                        aliases[f"{prefix}.block_sparse_moe.experts.{e}.{mixtral}.weight"] = where
                if f"{prefix}.mlp.gate.weight" in self.weight_map:
                    rows = self.shape(f"{prefix}.mlp.gate.weight")[0]
                    aliases[f"{prefix}.block_sparse_moe.gate.weight"] = (f"{prefix}.mlp.gate.weight", None, 0, rows)
            elif name.endswith(".mlp.experts.down_proj"):
                prefix = name.removesuffix(".mlp.experts.down_proj")
                experts, rows = self._stacked_shape(name)
                for e in range(experts):
                    aliases[f"{prefix}.mlp.experts.{e}.down_proj.weight"] = (name, e, 0, rows)
                    aliases[f"{prefix}.block_sparse_moe.experts.{e}.w2.weight"] = (name, e, 0, rows)
        return {alias: where for alias, where in aliases.items() if alias not in self.weight_map}

    def _stacked_shape(self, name: str) -> tuple[int, int]:
        """(experts, rows) of a stacked experts tensor, which must be 3-D."""
        shape = self.shape(name)
        if len(shape) != 3:
            raise CheckpointError(
                f"{self.folder}: {name} is {list(shape)}; stacked experts are (experts, rows, columns)"
            )
        return shape[0], shape[1]

    def _file(self, file: str) -> tuple[object, dict[str, schema.TensorHeader]]:
        """(safetensors' handle, checked header) of a file of the folder, opened once."""
        if file not in self._files:
            path = inside(self.folder, file, f"{self.folder}/model.safetensors.index.json (weight_map)")
            self._files[file] = schema.open_safetensors(path)
        return self._files[file]

    def _stored(self, name: str):
        """The open file holding the stored tensor `name`, checked to be there and floating point."""
        if name not in self.weight_map:
            raise CheckpointError(f"{self.folder}: no tensor {name!r} in the Hugging Face weights")
        file = self.weight_map[name]
        handle, headers = self._file(file)
        header = headers.get(name)
        if header is None:
            raise CheckpointError(f"{self.folder}: the index puts {name} in {file}, which does not hold it")
        if not header.dtype.is_floating_point:
            raise CheckpointError(
                f"{self.folder / file}: {name} is stored as {str(header.dtype).removeprefix('torch.')}; model "
                f"weights are floating point, so these are not a model's weights (refused, not converted)"
            )
        return handle

    def config(self) -> dict:
        path = self.folder / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; a Hugging Face folder holds config.json beside its weights")
        return schema.load_json(inside(self.folder, path.name, str(self.folder)).read_bytes(), str(path))

    def get(self, name: str) -> torch.Tensor:
        if name in self.aliases:
            stored, expert, first, rows = self.aliases[name]
            view = self._stored(stored).get_slice(stored)
            return view[first : first + rows] if expert is None else view[expert, first : first + rows]
        return self._stored(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, read from its file's header (no data)."""
        if name in self.aliases:
            stored, expert, _, rows = self.aliases[name]
            shape = self.shape(stored)
            return (rows, *shape[1:]) if expert is None else (rows, *shape[2:])
        return tuple(self._stored(name).get_slice(name).get_shape())

    def get_rows_or_columns(self, name: str, dim: int, pieces) -> torch.Tensor:
        """The concatenation along dim (0 or 1) of the [start, start + length) slices: a shard's part."""
        if name in self.aliases:  # a slice of a stacked tensor: small, read whole
            whole = self.get(name)
            return torch.cat([whole.narrow(dim, start, length) for start, length in pieces], dim=dim)
        view = self._stored(name).get_slice(name)
        parts = [
            view[start : start + length] if dim == 0 else view[:, start : start + length] for start, length in pieces
        ]
        return torch.cat(parts, dim=dim)
