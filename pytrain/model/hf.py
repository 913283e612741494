"""Hugging Face transformers weights in and out, for every dense family.

| model_type | HF class | what changes |
|---|---|---|
| INTERNLM | LlamaForCausalLM (attention_bias = not no_bias) | Wqkv split into q/k/v_proj, out_proj -> o_proj |
| INTERNLM2 | LlamaForCausalLM | the grouped wqkv unpacked into q/k/v_proj |
| LLAMA2 | LlamaForCausalLM | names only |
| QWEN2 | Qwen2ForCausalLM | names only |

Every family: embedding -> model.embed_tokens, attention_norm -> input_layernorm, mlp_norm ->
post_attention_layernorm, w1/w3/w2 -> gate/up/down_proj, norm -> model.norm, head -> lm_head (absent
when tied). qk_interleaved models (GPT-J rotary pairs) get their q and k rows reordered into HF's
rotate-half order (transformers' convert_llama_weights_to_hf permutation) and back.

`hf_rules(model)` gives, per pytrain parameter, its HF tensors and the two conversions; everything else
(whole-state export/import, reading a rank's shard from a sharded safetensors folder) is built on them.
"""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .decoder import Decoder, FusedQKVAttention, GroupedQKVAttention, LayerNorm

HF_CLASSES = {
    "INTERNLM": "LlamaForCausalLM",
    "INTERNLM2": "LlamaForCausalLM",
    "LLAMA2": "LlamaForCausalLM",
    "QWEN2": "Qwen2ForCausalLM",
}
HF_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
SHARD_BYTES = 4 << 30  # safetensors file size when exporting (transformers' own default is 5 GB)


@dataclass(frozen=True)
class Rule:
    """pytrain parameter `name` <-> the HF tensors `hf_names`."""

    name: str
    hf_names: tuple[str, ...]
    to_hf: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    from_hf: Callable[..., torch.Tensor]

    @property
    def is_rename(self) -> bool:
        return self.to_hf is _same


def _same(t):
    return (t,)


def _one(t):
    return t


def _rename(name: str, hf_name: str) -> Rule:
    return Rule(name, (hf_name,), _same, _one)


def _interleaved_to_half(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Rows of each head from GPT-J pairs (2i, 2i+1) to rotate-half order (i, i + d/2)."""
    return t.reshape(-1, head_dim // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _half_to_interleaved(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    return t.reshape(-1, 2, head_dim // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def check_exportable(model: Decoder) -> None:
    """HF's decoders are pre-RMSNorm with SwiGLU: say which field cannot be expressed there."""
    layer = next(iter(model.decoder_layers.values()))
    if layer.post_norm:
        raise ValueError("model.apply_post_layer_norm=True has no Hugging Face Llama/Qwen2 equivalent")
    if isinstance(model.final_norm, LayerNorm):
        raise ValueError("model.norm_type='layernorm' has no Hugging Face Llama/Qwen2 equivalent: use 'rmsnorm'")
    if model.family not in HF_CLASSES:
        raise ValueError(f"model_type {model.family!r} has no Hugging Face mapping; known: {', '.join(HF_CLASSES)}")


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
        for part, hf_part in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            for kind in ("weight", "bias") if mlp.w1.bias is not None else ("weight",):
                rules.append(_rename(f"{ours}.{n.mlp}.{part}.{kind}", f"{theirs}.mlp.{hf_part}.{kind}"))
        rules += _attention_rules(layer.get_submodule(n.attention), f"{ours}.{n.attention}", f"{theirs}.self_attn")
    return rules


def _attention_rules(attention, ours: str, theirs: str) -> list[Rule]:
    shape, d = attention.shape, attention.head_dim
    interleaved = attention.rotary.interleaved
    q_hf, k_hf, v_hf, o_hf = (f"{theirs}.{p}_proj" for p in "qkvo")

    def rope_out(t):  # pytrain q/k rows -> HF's
        return _interleaved_to_half(t, d) if interleaved else t

    def rope_in(t):
        return _half_to_interleaved(t, d) if interleaved else t

    if isinstance(attention, (FusedQKVAttention, GroupedQKVAttention)):
        grouped = isinstance(attention, GroupedQKVAttention)
        fused = "wqkv" if grouped else "Wqkv"
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

        kinds = ("weight", "bias") if attention.get_submodule(fused).bias is not None else ("weight",)
        rules = [
            Rule(f"{ours}.{fused}.{kind}", tuple(f"{p}.{kind}" for p in (q_hf, k_hf, v_hf)), split, join)
            for kind in kinds
        ]
        rules += [_rename(f"{ours}.{out}.{kind}", f"{o_hf}.{kind}") for kind in kinds]
        return rules
    rules = []
    for proj, hf in (("wq", q_hf), ("wk", k_hf), ("wv", v_hf), ("wo", o_hf)):
        module = attention.get_submodule(proj)
        for kind in ("weight", "bias") if module.bias is not None else ("weight",):
            if proj in ("wq", "wk") and interleaved:
                rules.append(Rule(f"{ours}.{proj}.{kind}", (f"{hf}.{kind}",), lambda t: (rope_out(t),), rope_in))
            else:
                rules.append(_rename(f"{ours}.{proj}.{kind}", f"{hf}.{kind}"))
    return rules


def hf_config(model: Decoder, dtype: str = "bfloat16") -> dict:
    """config.json for the HF class of the model's family."""
    check_exportable(model)
    layer = next(iter(model.decoder_layers.values()))
    attention, mlp, n = layer.get_submodule(model.names.attention), layer.get_submodule(model.names.mlp), model.names
    shape = attention.shape
    cls = HF_CLASSES[model.family]
    config = {
        "architectures": [cls],
        "model_type": HF_MODEL_TYPES[cls],
        "vocab_size": model.vocab_size,
        "hidden_size": model.hidden_size,
        "intermediate_size": mlp.w1.weight.shape[0],
        "num_hidden_layers": model.num_layers,
        "num_attention_heads": shape.num_heads,
        "num_key_value_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": model.final_norm.eps,
        "rope_theta": attention.rotary.base,
        "rope_parameters": {"rope_type": "default", "rope_theta": attention.rotary.base},
        "max_position_embeddings": 32768,
        "tie_word_embeddings": model.tie_word_embeddings,
        "torch_dtype": dtype,
    }
    has_bias = [layer.get_submodule(f"{n.attention}.{p}").bias is not None for p in _projections(attention)]
    if cls == "LlamaForCausalLM":
        if len(set(has_bias)) > 1:
            raise ValueError(
                f"{model.family}: Llama has one attention_bias for q, k, v and o; this model has biases on some only"
            )
        config.update(attention_bias=has_bias[0], mlp_bias=mlp.w1.bias is not None)
    else:  # Qwen2: biases on q, k, v; none on o or the MLP
        if has_bias[-1] or mlp.w1.bias is not None or not all(has_bias[:-1]):
            raise ValueError(
                "Qwen2ForCausalLM has biases on q, k and v only: use qkv_bias=True, o_bias=False, mlp_bias=False"
            )
        config.update(use_sliding_window=False)
    return config


def _projections(attention) -> tuple[str, ...]:
    if isinstance(attention, FusedQKVAttention):
        return ("Wqkv", "out_proj")
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
    """Reads tensors (or slices of them) from a HF folder's safetensors files, opening each file once."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (self.folder / "model.safetensors").is_file():
            weight_map = None
        else:
            raise FileNotFoundError(
                f"{self.folder}: no model.safetensors or model.safetensors.index.json: not a "
                f"Hugging Face safetensors folder (pytorch_model.bin files are not read: "
                f"they are pickles)"
            )
        self._open = lambda file: safe_open(str(self.folder / file), framework="pt")
        self._files = {}
        if weight_map is None:
            handle = self._handle("model.safetensors")
            weight_map = dict.fromkeys(handle.keys(), "model.safetensors")
        self.weight_map = weight_map

    def _handle(self, file: str):
        if file not in self._files:
            self._files[file] = self._open(file)
        return self._files[file]

    def config(self) -> dict:
        path = self.folder / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; a Hugging Face folder holds config.json beside its weights")
        return json.loads(path.read_text())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise KeyError(f"{self.folder}: no tensor {name!r} in the Hugging Face weights")
        return self._handle(self.weight_map[name]).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, read from its file's header (no data)."""
        if name not in self.weight_map:
            raise KeyError(f"{self.folder}: no tensor {name!r} in the Hugging Face weights")
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())

    def get_rows_or_columns(self, name: str, dim: int, pieces) -> torch.Tensor:
        """The concatenation along dim (0 or 1) of the [start, start + length) slices: a shard's part."""
        view = self._handle(self.weight_map[name]).get_slice(name)
        parts = [
            view[start : start + length] if dim == 0 else view[:, start : start + length] for start, length in pieces
        ]
        return torch.cat(parts, dim=dim)
