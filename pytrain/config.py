"""Python config files, as InternLM's: a file is executed and its module globals become the config.

    cfg = Config.from_file("configs/tiny.py", overrides=["model.num_layers=2"])
    cfg.model.hidden_size == cfg["model"]["hidden_size"]

Every section and field is checked against SCHEMA below: an unknown name (with the closest valid one),
a wrong type or an impossible value is a ConfigError naming the file and the field. Missing fields get
InternLM's defaults. Upper-case globals (SEQ_LEN, HIDDEN_SIZE, JOB_NAME, ...) are the file's own helpers
and pass through unchecked. `Config.dump()` writes the effective config back as a loadable file.

Every name InternLM's and InternEvo's configs use is known, with one of these kinds:
  acts          as in InternLM;
  ignored here  accepted, no effect in pytrain; the ones a file sets are in `cfg.ignored_here`, which the
                run prints once in its start line (tables in pytrain/config_vocabulary.py);
  not available a feature pytrain lacks: accepted at the value that changes nothing, else a ConfigError;
  pending       implemented by the data-loader or checkpoint work: refused where a value would need it
                (only(...) checks), listed as ignored here when set to another value than the default;
  renamed       InternEvo's older name of a field pytrain has, or InternLM's older spelling of one (README's "Older
                InternLM spellings"); the value moves there.

The model section is the union of every family's fields (pytrain.model_args.DecoderArgs, whose defaults
are the section's); which act is up to the builder registered for model_type (MODEL_INITIALIZER). A builder
with explicit keyword parameters gets exactly those: the file's value where given, else the builder's own
default; given fields it does not take are "ignored here". A built-in family's spec (pytrain.specs) is such a
builder: its signature is the family's fields at the family's defaults. A builder taking **kwargs (a user's)
gets every given field over the generic defaults of the acting ones.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import math
import os
import pprint
import runpy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

from pytrain import config_vocabulary
from pytrain.model_args import DEFAULTS as MODEL_DEFAULTS
from pytrain.model_args import (
    FAMILY_FIELDS,
    MOE_LAYER_KWARGS,
    NONE,
    ROPE_FIELDS,
    ROPE_TYPES,
    layer_windows,
    mlp_width,
    rope_scaling_from_fields,
    routing_from_fields,
)

DTYPES = ("torch.float16", "torch.half", "torch.bfloat16", "torch.float32", "torch.tf32")
BUILTIN_CORPUS = "builtin:stdlib"

# InternLM's sp values, each the mode InternEvo later named (InternEvo d30aecd renamed them in this order)
OLD_SP = {"none": "mtp", "megatron": "msp", "flash-attn": "fsp", "intern": "isp"}
# The tensor-parallel modes pytrain does not run, by their feature
UNAVAILABLE_MODES = {
    "fsp": "flash-attn's sequence parallel; msp computes the same, keeping the gathered activations for the backward",
}


class ConfigError(ValueError):
    """A config file or override that cannot run; the message names the file, the field and the fix."""


ACTS, IGNORED, UNAVAILABLE, PENDING, RENAMED = "acts", "ignored here", "not available", "pending", "renamed"


@dataclass(frozen=True)
class Field:
    default: Any
    types: tuple
    doc: str
    check: Callable[[Any], str | None] | None = None  # returns what is wrong, or None
    kind: str = ACTS
    allowed: tuple = ()  # UNAVAILABLE: the values that change nothing (the first is the default)
    note: str = ""  # PENDING: the work that implements it; RENAMED (or an ACTS field that only
    # supplies another's default): the field the value moves to

    def type_names(self) -> str:
        return " | ".join("None" if t is type(None) else t.__name__ for t in self.types)

    def kind_name(self) -> str:
        if self.kind == PENDING:
            return f"pending ({self.note})"
        return f"renamed: `{self.note}`" if self.kind == RENAMED else self.kind


def _field(default, types, doc, check=None, kind=ACTS, allowed=(), note="") -> Field:
    return Field(default, types if isinstance(types, tuple) else (types,), doc, check, kind, allowed, note)


def _pending(default, types, doc, work, check=None) -> Field:
    return _field(default, types, doc, check, PENDING, note=work)


def positive(v):
    return None if v > 0 else "must be > 0"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def unit_interval(v):
    return None if 0 <= v <= 1 else "must be within [0, 1]"


def open_unit_interval(v):
    return None if 0 <= v < 1 else "must be within [0, 1)"


def one_of(*choices):
    return lambda v: None if v in choices else f"must be one of {', '.join(map(repr, choices))}"


def _check_weights(weights):
    if weights is None:
        return None
    if not weights:
        return "must name at least one dataset type"
    for name, weight in weights.items():
        if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(weight, int | float) or weight < 0:
            return f"must map dataset type names to weights >= 0; {name!r}: {weight!r} is not"
    if not sum(weights.values()) > 0:
        return "needs a weight > 0"
    return None


def only(value, why):
    """A field InternLM has whose other values pytrain does not run yet: say so rather than ignore it."""
    return lambda v: None if v == value else f"{why}; leave it at {value!r}"


def _model_section(fields: dict[str, tuple]) -> dict[str, Field]:
    """{name: (types, doc[, check])} -> the model section's Fields, each at DecoderArgs' default."""
    return {name: _field(MODEL_DEFAULTS[name], *how) for name, how in fields.items()}


def _checkpoint(v):
    if isinstance(v, bool):
        return None
    return unit_interval(v)


SCHEMA: dict[str, Any] = {
    "model_type": _field("INTERNLM", str, "registered model builder to use (MODEL_INITIALIZER)"),
    "use_fp32_norm": _field(False, bool, "keep norm weights in fp32 when model.dtype is 16-bit"),
    "cudnn_deterministic": _field(False, bool, "torch.backends.cudnn.deterministic"),
    "cudnn_benchmark": _field(False, bool, "torch.backends.cudnn.benchmark"),
    "selective_checkpoint": _field(
        False,
        bool,
        "selective activation checkpointing of the layers model.checkpoint leaves whole (InternEvo's: the "
        "attention core is recomputed in the backward, the linears' outputs kept); see selective_checkpoint_policy",
    ),
    "selective_checkpoint_policy": _field(
        "attention",
        str,
        "what selective_checkpoint keeps: 'attention' (all but the attention core, InternEvo's) or 'matmuls' "
        "(only the matmul outputs; norms, rotary, activations and attention recomputed)",
        one_of("attention", "matmuls"),
    ),
    "selective_checkpoint_offload": _field(
        False,
        bool,
        "move what selective_checkpoint keeps to pinned host memory until the backward (a no-op on the CPU)",
    ),
    # each field's default is DecoderArgs' (the one place; a family's own are in its spec, pytrain.model.families)
    "model": _model_section(
        {
            "checkpoint": (
                (bool, float, int),
                "activation recompute: True/False or the fraction of layers",
                _checkpoint,
            ),
            "num_attention_heads": (int, "query heads", positive),
            "num_kv_attention_heads": (
                (int, NONE),
                "key/value heads for GQA/MQA (None: = query heads)",
                lambda v: None if v is None or v > 0 else "must be > 0",
            ),
            "embed_split_hidden": (bool, "tensor parallel: split the embedding along hidden (else vocab)"),
            "vocab_size": (int, "vocabulary size", positive),
            "embed_grad_scale": (
                (float, int),
                "scale of the gradient reaching the embedding",
                lambda v: None if 0 < v <= 1 else "must be within (0, 1]",
            ),
            "parallel_output": (bool, "tensor parallel: keep the logits sharded over vocab"),
            "hidden_size": (int, "model width", positive),
            "num_layers": (int, "decoder layers", positive),
            "mlp_ratio": ((float, int), "SwiGLU width / hidden (rounded up to multiple_of)", positive),
            "multiple_of": (int, "SwiGLU width is rounded up to a multiple of this", positive),
            "apply_post_layer_norm": (bool, "norm after the residual add (post-LN) instead of before"),
            "dtype": (str, "parameter/activation dtype: " + ", ".join(DTYPES), one_of(*DTYPES)),
            "norm_type": (str, "rmsnorm or layernorm", one_of("rmsnorm", "layernorm")),
            "layer_norm_epsilon": ((float, int), "norm epsilon", positive),
            "use_flash_attn": (
                bool,
                "fused attention: pytrain's Triton flash-attention on GPUs, PyTorch SDPA on CPU (False: plain "
                "reference)",
            ),
            "num_chunks": (int, "model chunks per pipeline rank (> 1: interleaved schedule)", positive),
            "rope_base": ((float, int), "rotary embedding base", positive),
            "rope_type": (
                str,
                "rotary scaling for long context (transformers' rope_parameters): 'normal', 'linear' (positions / "
                "rope_scaling_factor), 'dynamic' (NTK: the base grows past max_position_embeddings) or 'llama3' "
                "(Llama 3.1's)",
                one_of(*ROPE_TYPES),
            ),
            "rope_scaling_factor": ((float, int), "the factor of rope_type 'linear', 'dynamic' and 'llama3'", positive),
            "use_dynamic_ntk_rope": (bool, "InternEvo's switch for rope_type='dynamic'"),
            "max_position_embeddings": (
                int,
                "rope_type 'dynamic': the longest sequence with unscaled rotary frequencies ('llama3': the default of "
                "original_max_position_embeddings)",
                positive,
            ),
            "low_freq_factor": (
                (float, int),
                "rope_type 'llama3': wavelengths beyond original_max_position_embeddings / low_freq_factor are scaled",
                positive,
            ),
            "high_freq_factor": (
                (float, int),
                "rope_type 'llama3': wavelengths below original_max_position_embeddings / high_freq_factor are kept",
                positive,
            ),
            "original_max_position_embeddings": (
                (int, NONE),
                "rope_type 'llama3': the pre-training context (None: max_position_embeddings)",
                positive,
            ),
            "use_sliding_window": (
                bool,
                "sliding-window attention (Qwen2's): layers max_window_layers and above see only the last "
                "sliding_window tokens",
            ),
            "sliding_window": (
                (int, NONE),
                "use_sliding_window: the tokens each query sees, itself included",
                positive,
            ),
            "max_window_layers": (
                int,
                "use_sliding_window: the first layers, which see their whole context",
                non_negative,
            ),
            "tie_word_embeddings": (bool, "the LM head shares the embedding's weight"),
            "no_bias": (bool, "no biases in attention (INTERNLM, INTERNLM2, LLAMA2)"),
            "qkv_bias": (bool, "biases on the q/k/v projections (QWEN2)"),
            "o_bias": (bool, "a bias on the attention output projection (QWEN2)"),
            "mlp_bias": (bool, "biases in the MLP (QWEN2)"),
            "head_dim": ((int, NONE), "per-head width (None: hidden_size / num_attention_heads)", positive),
            "qk_interleaved": (
                (bool, NONE),
                "rotary pairs adjacent (2i, 2i+1) rather than halves (None: not adapt_hf)",
            ),
            "adapt_hf": (bool, "InternEvo's older switch: True = rotary on halves (qk_interleaved=False)"),
            "enable_qkv_fusion": (bool, "one fused wqkv projection (InternLM2's grouped layout)"),
            "top_k": (int, "experts per token (INTERNLM_MoE, MIXTRALMOE, QWEN2MOE; num_experts > 1)", positive),
            "moe_type": (
                (str, NONE),
                "routing: 'GShard' (top-k with capacity, InternEvo's default) or 'Dropless' (no capacity); MegaBlock "
                "variants are not available",
            ),
            "num_shared_experts": (
                int,
                "a dense MLP n experts wide beside the experts (INTERNLM_MoE, MIXTRALMOE: softmax-mixed; QWEN2MOE: "
                "sigmoid-gated shared expert)",
                non_negative,
            ),
            "moe_use_residual": (bool, "INTERNLM_MoE's residual MoE (= num_shared_experts=1)"),
            "moe_layer_kwargs": (
                (dict, NONE),
                "routing settings per moe_type (capacity_factor, eval_capacity_factor, min_capacity, drop_tokens, "
                "normalize_expert_weights, ...; the model.moe_layer_kwargs.* rows)",
            ),
        }
    ),
    "data": {
        "seq_len": _field(2048, int, "tokens per sample", positive),
        "micro_num": _field(4, int, "micro-batches per optimizer step (gradient accumulation)", positive),
        "micro_bsz": _field(2, int, "samples per micro-batch", positive),
        "valid_micro_num": _field(4, int, "micro-batches per validation step", positive),
        "unit_schedule_size": _field(
            None,
            (int, NONE),
            "ZeroPP (parallel.pipeline.use_zeropp): micro-batches per scheduling unit, each unit run through the "
            "chunks chunk by chunk (interleaved GPipe); any size dividing micro_num (below parallel.pipeline.size "
            "the stages idle more within a unit; None: interleaved 1F1B over the whole step)",
            positive,
        ),
        "valid_every": _field(50, int, "validate every N steps (0: off; needs valid_folder)", non_negative),
        "pack_sample_into_one": _field(False, bool, "pack with boundaries only every seq_len"),
        "total_steps": _field(50000, int, "optimizer steps to train", positive),
        "skip_batches": _field("", str, "batches consumed but not trained: 'a-b,c' (0-based batch indices)"),
        "rampup_batch_size": _field(
            "",
            (str, NONE),
            "batch-size ramp-up 'start incr every': micro-batches per step min(start + b // every * incr, micro_num) "
            "('' or None: none)",
        ),
        "min_length": _field(50, int, "drop samples shorter than this", non_negative),
        "train_folder": _field(
            None,
            (str, NONE),
            f"None: random dummy tokens (benchmarking); '{BUILTIN_CORPUS}': the bundled byte-level corpus; else "
            f"a folder of InternLM's tokenized .bin/.bin.meta files (python -m pytrain.data.tokenize)",
            None,
        ),
        "valid_folder": _field(
            None, (str, NONE), "a folder of data.type's format: each sub-folder holding data files is a validation set"
        ),
        "type": _field(
            "tokenized",
            str,
            "the format of train_folder / valid_folder: 'tokenized' (InternLM's .bin/.bin.meta), 'megatron' "
            "(Megatron-LM's .bin/.idx), 'streaming' or 'hf' (text in a Hugging Face datasets layout, tokenized on "
            "the fly with tokenizer_path)",
            one_of("tokenized", "megatron", "streaming", "hf"),
        ),
        "tokenizer_path": _field(
            None,
            (str, NONE),
            "streaming: 'byte', a tokenizers .json, a transformers tokenizer folder or a sentencepiece .model",
        ),
        "text_key": _field("text", str, "streaming: the field holding each record's text"),
        "subset_name": _field(None, (str, NONE), "streaming: a subfolder of train_folder to read (InternEvo's)"),
        "split": _field("train", str, "streaming: the split of a saved DatasetDict or a hub dataset"),
        "add_bos_eos": _field(
            "tokenizer",
            str,
            "streaming: ids around each sample: 'tokenizer' (what its own settings add), 'none', 'bos', 'eos', 'both'",
            one_of("tokenizer", "none", "bos", "eos", "both"),
        ),
        "bos_id": _field(None, (int, NONE), "streaming: the BOS id (None: the tokenizer's)"),
        "eos_id": _field(None, (int, NONE), "streaming: the EOS id (None: the tokenizer's)"),
        "stream_shards": _field(
            8,
            int,
            "streaming: reader shards of the text; a multiple of every data-parallel size the run is resumed with",
            positive,
        ),
        "shuffle_buffer": _field(
            8192, int, "streaming: samples shuffled together, over all shards (1: read order)", positive
        ),
        "dataset_weights": _field(
            None,
            (dict, NONE),
            "a weighted mixture: {dataset type: weight} over train_folder's top-level subfolders (e.g. "
            "{'en': 0.6, 'code': 0.4}); None: every sample once per pass",
            _check_weights,
        ),
        "sources": _field(
            None,
            (dict, NONE),
            "named sources instead of train_folder, each a dataset in its own format and place: {name: dict(type=..., "
            "train_folder=..., tokenizer_path=..., ...)} (a source's fields: data's of those names, which they "
            "override); each source is one dataset type, mixed by dataset_weights over the names",
        ),
        "cache_folder": _field("~/.cache/pytrain", str, "where the bundled corpus is tokenized and cached"),
    },
    "parallel": {
        "zero1": {
            "size": _field(-1, int, "ZeRO-1 group size (<= 0: the whole data-parallel group; 1: off)"),
            "fsdp": _field(
                False,
                bool,
                "FSDP instead of ZeRO-1: parameters, gradients and optimizer state sharded over the zero1 group with "
                "torch's fully_shard, one unit per decoder layer, the embedding and the final norm + head",
            ),
            "reshard_after_forward": _field(
                True,
                bool,
                "with fsdp: free each unit's gathered parameters after its forward and gather them again for the "
                "backward (less memory); False keeps them from forward to backward (one gather less per step)",
            ),
        },
        "tensor": {
            "size": _field(1, int, "tensor-parallel size", positive),
            "mode": _field(
                "mtp",
                str,
                "mtp (Megatron tensor parallel), msp (+ sequence parallel), isp (InternEvo's intern sequence "
                "parallel: the whole layer on a slice of the sequence, all-to-all around attention; with "
                "parallel.weight); fsp is not available; InternLM's older 'origin_tp' is mtp (fsp with "
                "parallel.sequence_parallel=True), its 'fstp' is isp",
                one_of("mtp", "msp", "fsp", "isp"),
            ),
            # moved into mode by _move_old_tensor_spellings
            "sp": _field(
                "none",
                str,
                "InternLM's older spelling of mode: 'none' = mtp, 'megatron' = msp, 'flash-attn' = fsp, 'intern' = isp",
                one_of(*OLD_SP),
                kind=RENAMED,
                note="parallel.tensor.mode",
            ),
        },
        "weight": {
            "size": _field(
                1,
                int,
                "weight-parallel size (with tensor.mode='isp'): every weight sharded over runs of this many "
                "consecutive (data, tensor) ranks, gathered just before use in forward and backward, its gradient "
                "reduce-scattered; the optimizer state is sharded with it (it must divide data x tensor size)",
                positive,
            ),
            "overlap": _field(
                False, bool, "start the next layer's weight gather while this one computes (forward and backward)"
            ),
            "forward_overlap_per": _field(
                "layer",
                str,
                "what is gathered at a time: 'layer' (a decoder layer's weights) or 'module' (one linear's)",
                one_of("layer", "module"),
            ),
        },
        "expert_weight": {
            "size": _field(
                1,
                int,
                "expert weight parallelism (with parallel.weight.size > 1): the experts' weights sharded over runs of "
                "this many of the ranks holding the same experts (data / expert x tensor ranks; 1: replicated there)",
                positive,
            ),
        },
        "sequence_2D": {
            "enable": _field(
                False,
                bool,
                "2D sequence parallelism (with tensor.mode='isp'): the tensor ranks as head_size x context_size, the "
                "all-to-all around attention over the head ranks, ring attention over the context ranks",
            ),
            "head_size": _field(
                1, int, "ranks the heads are split over (head_size x context_size = tensor size)", positive
            ),
            "context_size": _field(1, int, "ranks of the attention ring (zigzag: causal work balanced)", positive),
            "window_size": _field(
                1,
                int,
                "context ranks of one inner ring (InternEvo's double ring: most hops inside a window); it must "
                "divide context_size",
                positive,
            ),
            "device_placement_strategy": _field(
                None,
                (dict, type(None)),
                "dict(head_first=True: a head group's ranks are neighbours, False: a context group's; "
                "interleaved: InternEvo's NIC interleaving of a window's ranks, accepted with head_first=False "
                "and window_size > 1 and without effect: a window's ranks stay neighbours)",
            ),
        },
        "pipeline": {
            "size": _field(1, int, "pipeline-parallel size", positive),
            "interleaved_overlap": _field(True, bool, "overlap communication in the interleaved schedule"),
            "use_zeropp": _field(
                False,
                bool,
                "ZeroPP's schedule (arXiv 2402.03791; pytrain.parallel.zeropp): model.num_chunks stages per rank run "
                "in units of data.unit_schedule_size micro-batches, each chunk's parameters gathered once per run "
                "of work on it when FSDP or weight parallelism shards them",
            ),
            "decouple_grad": _field(
                False,
                bool,
                "ZeroPP with its stages sharded (parallel.weight.size > 1 or parallel.zero1.fsdp), InternEvo's "
                "zero-bubble split: each backward computes only its input gradient (sent at once), the weight "
                "gradients are computed later from the same graph, in the rounds where the rank waits and before "
                "work leaves the chunk (pytrain.parallel.zeropp); each chunk's gradients stay unsharded over a run "
                "of data.unit_schedule_size backwards of it (pipeline.size without units) and are reduce-scattered "
                "once (fewer reduce-scatters, one chunk's fp32 gradients held unsharded); the gradients are "
                "unchanged",
            ),
        },
        "expert": {
            "size": _field(
                -1,
                int,
                "expert-parallel size (<= 0: the data-parallel size, or num_experts if fewer; 1: off); it must divide "
                "the data-parallel size and num_experts",
            ),
        },
        "expert_zero1": {
            "size": _field(
                -1,
                int,
                "ZeRO-1 group size of the expert weights, within the ranks holding the same experts (<= 0: all of "
                "them while zero1 is on; 1: off); it must divide data-parallel size / expert size",
            ),
        },
        "process_group_timeout_s": _field(
            1800,
            (int, float),
            "seconds a rank waits on the others (rendezvous, each process group's collectives) before failing "
            "instead of hanging (1800: InternEvo's LLM_NCCL_TIMEOUT, which no InternEvo config field sets)",
            positive,
        ),
    },
    "hybrid_zero_optimizer": {
        "overlap_sync_grad": _field(True, bool, "reduce gradients in buckets during the backward"),
        "overlap_sync_param": _field(False, bool, "gather updated parameters asynchronously"),
        "reduce_bucket_size": _field(512 * 1024 * 1024, int, "gradient reduce bucket size (elements)", positive),
        "clip_grad_norm": _field(1.0, (float, int), "clip the global gradient norm to this (0: off)", non_negative),
    },
    "grad_scaler": {
        "fp16": {
            "initial_scale": _field(2**16, (float, int), "fp16 loss scale at the start", positive),
            "min_scale": _field(1, (float, int), "lowest loss scale", positive),
            "growth_interval": _field(1000, int, "clean steps before the scale grows", positive),
        },
        "growth_factor": _field(
            2,
            (float, int),
            "scale *= this after growth_interval clean steps",
            lambda v: None if v > 1 else "must be > 1",
        ),
        "backoff_factor": _field(
            0.5, (float, int), "scale *= this on overflow", lambda v: None if 0 < v < 1 else "must be within (0, 1)"
        ),
        "max_scale": _field(2**24, (float, int), "highest loss scale", positive),
        "hysteresis": _field(2, int, "overflows tolerated before backing off", positive),
    },
    "loss": {
        "label_smoothing": _field(0, (float, int), "cross-entropy label smoothing", open_unit_interval),
        "moe_loss_coeff": _field(
            1.0, (float, int), "weight of the MoE load-balancing loss (summed over layers)", non_negative
        ),
    },
    # InternEvo's older place of the routing settings: moved into the model section (_move_moe_section)
    "moe": {
        "top_k": _field(1, int, "InternEvo's older place of model.top_k", kind=RENAMED, note="model.top_k"),
        **{
            key: _field(
                default,
                types,
                f"InternEvo's older place of model.moe_layer_kwargs[{key!r}]",
                kind=RENAMED,
                note="model.moe_layer_kwargs",
            )
            for key, default, types in (
                ("capacity_factor", 1.0, (float, int)),
                ("eval_capacity_factor", 1.0, (float, int)),
                ("min_capacity", 4, int),
                ("noisy_gate_policy", None, (str, NONE)),
                ("drop_tokens", True, bool),
                ("use_rts", True, bool),
                ("use_fused_gating", True, bool),
                ("parallel_mode", "tensor", str),  # MegaBlock-D's (refused with it)
            )
        },
    },
    "adam": {
        "lr": _field(1e-4, (float, int), "peak learning rate", positive),
        "adam_beta1": _field(0.9, (float, int), "beta1", open_unit_interval),
        "adam_beta2": _field(0.95, (float, int), "beta2 (initial, see beta2_scheduler)", open_unit_interval),
        "adam_beta2_c": _field(0, (float, int), "beta2 schedule exponent c (<= 0: constant)", note="beta2_scheduler.c"),
        "adam_eps": _field(1e-8, (float, int), "epsilon", positive),
        "weight_decay": _field(0.01, (float, int), "decoupled weight decay (not on norms and biases)", non_negative),
    },
    "lr_scheduler": {
        "total_steps": _field(
            None,
            (int, NONE),
            "schedule length (None: data.total_steps)",
            lambda v: None if v is None or v > 0 else "must be > 0",
        ),
        "init_steps": _field(
            0, int, "steps at lr 0 before the warmup starts (InternLM's optimizer_warmup_step)", non_negative
        ),
        "warmup_ratio": _field(0.01, (float, int), "fraction of total_steps warming up linearly", unit_interval),
        "eta_min": _field(1e-5, (float, int), "lr at the end of the cosine decay", non_negative),
        "last_epoch": _field(-1, int, "scheduler position to resume from (-1: start)"),
    },
    "beta2_scheduler": {
        "init_beta2": _field(None, (float, int, NONE), "beta2 at the start (None: adam.adam_beta2)"),
        "c": _field(None, (float, int, NONE), "beta2 = max(init_beta2, 1 - step**-c) (None: adam.adam_beta2_c)"),
        "cur_iter": _field(-1, int, "scheduler position to resume from (-1: start)"),
    },
    "ckpt": {
        "enable_save_ckpt": _field(False, bool, "save checkpoints into save_ckpt_folder"),
        "save_ckpt_folder": _field(
            None, (str, NONE), "where checkpoints go: 'local:/path' or '/path' (remote storage is not available)"
        ),
        "load_ckpt_folder": _field(
            None, (str, NONE), "older configs: a pytrain checkpoint to load everything from (see load_ckpt_info)"
        ),
        "load_ckpt_info": _field(
            None,
            (dict, NONE),
            "dict(path, content=('model', 'sampler', 'optimizer', 'scheduler') | ('all',), ckpt_type='internlm' "
            "(pytrain's checkpoints) | 'hf' (a Hugging Face folder, model only))",
        ),
        "auto_resume": _field(True, bool, "resume from the newest complete checkpoint in save_ckpt_folder, if any"),
        # InternLM v0.1/v0.2's loading switches, moved into load_ckpt_info / auto_resume by _move_old_ckpt_loads
        "load_model_only_folder": _field(
            None,
            (str, NONE),
            "InternLM's older model-only start: load_ckpt_info=dict(path=..., content=('model',))",
            kind=RENAMED,
            note="ckpt.load_ckpt_info",
        ),
        "load_optimizer": _field(
            True,
            bool,
            "InternLM's older switch for resuming load_ckpt_folder: False is "
            "load_ckpt_info=dict(path=load_ckpt_folder, content=('model', 'sampler', 'scheduler'))",
            kind=RENAMED,
            note="ckpt.load_ckpt_info",
        ),
        "load_given_ckpt": _field(
            False,
            bool,
            "InternLM v0.2.0's: True loads load_ckpt_folder rather than the newest checkpoint (auto_resume=False)",
            kind=RENAMED,
            note="ckpt.auto_resume",
        ),
        "checkpoint_every": _field(50, int, "save every N steps (and at the last step)", positive),
        "keep_last": _field(
            0, int, "complete checkpoints to keep (0: all); older ones go after a newer one is complete", non_negative
        ),
        "async_upload": _field(False, bool, "save in the background: the step loop waits only for the host copy"),
        "async_upload_tmp_folder": _field(
            None,
            (str, NONE),
            "InternLM's staging folder for async uploads (pytrain stages in host memory)",
            kind=IGNORED,
        ),
        "oss_snapshot_freq": _field(
            0, int, "a rolling snapshot every N steps (snapshot/0|1, only the last kept; 0: off)", non_negative
        ),
        "stop_file_path": _field(None, (str, NONE), "a file holding a step number: save at that step and stop"),
        "enable_internevo2hf_ckpt": _field(
            False,
            bool,
            "also save checkpoints in Hugging Face format (use python -m pytrain.checkpoint.convert --to hf)",
            kind=UNAVAILABLE,
            allowed=(False,),
        ),
    },
    "monitor": {
        "alert": {
            "alert_file_path": _field(
                None,
                (str, NONE),
                "append one JSON line per alert: a skipped (inf/NaN) step, a loss spike, the run finished or failed",
            ),
            "loss_spike_limit": _field(
                1.5,
                (float, int),
                "alert when a step's loss exceeds this times the previous step's (InternLM's fixed 1.5)",
                lambda v: None if v > 1 else "must be > 1",
            ),
        },
        "tensorboard": {
            "enable": _field(True, bool, "write TensorBoard event files into the run folder"),
            "queue_max_length": _field(10, int, "events the TensorBoard writer queues before writing", positive),
        },
        "run_folder": _field("runs", str, "runs go to <run_folder>/<JOB_NAME>"),
        "log_every": _field(1, int, "print the step line every N steps", positive),
        "peak_tflops": _field(
            None,
            (float, int, NONE),
            "device peak for MFU (None: known GPU table or a matmul measured at start on CPU)",
            lambda v: None if v is None or v > 0 else "must be > 0",
        ),
    },
}


def _add_vocabulary(schema: dict) -> None:
    """InternEvo's names that do not act here (pytrain/config_vocabulary.py), as SCHEMA fields."""

    def put(path: str, field: Field) -> None:
        *sections, leaf = path.split(".")
        node = schema
        for part in sections:
            node = node.setdefault(part, {})
        if leaf in node:
            raise RuntimeError(f"config_vocabulary: {path} is already a SCHEMA field")
        node[leaf] = field

    for path, (default, types, why) in config_vocabulary.IGNORED.items():
        put(path, _field(default, types, why, kind=IGNORED))
    for path, (allowed, types, feature) in config_vocabulary.UNAVAILABLE.items():
        put(path, _field(allowed[0], types, feature, kind=UNAVAILABLE, allowed=allowed))
    for path, target in config_vocabulary.RENAMED.items():
        moved_to = _schema_field(schema, target)
        put(
            path,
            _field(moved_to.default, moved_to.types, f"InternEvo's older name of {target}", kind=RENAMED, note=target),
        )


def _schema_field(schema: dict, path: str) -> Field:
    node = schema
    for part in path.split("."):
        node = node[part]
    return node


_add_vocabulary(SCHEMA)

# Fields InternLM configs may give as a bare number instead of a dict: parallel.tensor=2 == dict(size=2).
SIZE_SHORTHAND = {
    ("parallel", "zero1"),
    ("parallel", "tensor"),
    ("parallel", "pipeline"),
    ("parallel", "weight"),
    ("parallel", "expert_weight"),
}
NO_DEFAULT = inspect.Parameter.empty


class Config(dict):
    """A dict with attribute access (cfg.model.hidden_size), nested dicts included."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no field {name!r}") from None

    def __setattr__(self, name, value):
        self[name] = value

    def __setitem__(self, name, value):
        super().__setitem__(name, Config(value) if isinstance(value, dict) and not isinstance(value, Config) else value)

    def __init__(self, *args, **kwargs):
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    @property
    def ignored_here(self) -> tuple[str, ...]:
        """The fields the file set that have no effect in pytrain, each once (e.g. "data.diag_outlier_ratio",
        "model.qkv_bias (not a field of LLAMA2)"): the run's start line lists them."""
        return self.__dict__.get("_ignored_here", ())

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Config:
        """Executes the file, applies `key.sub=value` overrides, fills defaults and validates."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            namespace = runpy.run_path(str(path))
        except Exception as err:
            raise ConfigError(f"{path}: executing the config file failed: {type(err).__name__}: {err}") from err
        raw = {
            k: v
            for k, v in namespace.items()
            if not k.startswith("__") and not isinstance(v, (ModuleType, FunctionType, type))
        }
        return cls.from_dict(raw, source=str(path), overrides=overrides)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>", overrides=()) -> Config:
        raw = _deep_copy(raw)
        for item in overrides:
            _apply_override(raw, item, source)
        ignored: list[str] = []
        cfg = cls(_validate(raw, source, ignored))
        object.__setattr__(cfg, "_ignored_here", tuple(dict.fromkeys(ignored)))
        return cfg

    def dump(self) -> str:
        """The effective config as a Python file that Config.from_file loads back to an equal Config."""
        lines = ["# Effective pytrain config (defaults filled in).", ""]
        for key, value in self.items():
            lines.append(f"{key} = {pprint.pformat(_plain(value), sort_dicts=False, width=110)}")
        return "\n".join(lines) + "\n"


def _plain(value):
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, dict) else value


def _deep_copy(raw: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in raw.items()}


def _closest(name: str, valid) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean {match[0]!r}?" if match else f"; valid names: {', '.join(sorted(valid))}"


def _apply_override(raw: dict, item: str, source: str) -> None:
    """`model.num_layers=2` -> raw["model"]["num_layers"] = 2; values are Python literals or plain strings."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.field=value, e.g. model.num_layers=2")
    key, text = item.split("=", 1)
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    *parents, leaf = key.strip().split(".")
    node, schema, where = raw, SCHEMA, []
    for part in parents:
        where.append(part)
        if not isinstance(schema, dict) or part not in schema or not isinstance(schema[part], dict):
            valid = [k for k, v in (schema.items() if isinstance(schema, dict) else ()) if isinstance(v, dict)]
            raise ConfigError(f"--set {item!r}: {'.'.join(where)} is not a config section" + _closest(part, valid))
        schema = schema[part]
        if not isinstance(node.get(part), dict):
            node[part] = {"size": node[part]} if isinstance(node.get(part), int) else {}
        node = node[part]
    node[leaf] = value


def _move_renamed(raw: dict, source: str) -> None:
    """InternEvo's older names: the value moves to the field pytrain has (both given and different: an error)."""
    for old, new in config_vocabulary.RENAMED.items():
        *old_parents, old_leaf = old.split(".")
        node = raw
        for part in old_parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_leaf not in node:
            continue
        value = node.pop(old_leaf)
        *new_parents, new_leaf = new.split(".")
        target = raw
        for part in new_parents:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                return  # a malformed section: its own validation names it
        if new_leaf in target and target[new_leaf] != value:
            raise ConfigError(
                f"{source}: {old} = {value!r} and {new} = {target[new_leaf]!r}: {old} is InternEvo's older name "
                f"of {new}; give only {new}"
            )
        target[new_leaf] = value


def _move_moe_section(raw: dict, source: str) -> None:
    """InternEvo's older top-level `moe = dict(top_k=2, capacity_factor=...)`: top_k moves to model.top_k, the
    rest into model.moe_layer_kwargs (a value given in both places and different: an error)."""
    if "moe" not in raw:
        return
    moe = raw.pop("moe")
    if moe is None:
        return
    if not isinstance(moe, dict):
        raise ConfigError(f"{source}: moe: must be a dict(...), got {type(moe).__name__}")
    model = raw.setdefault("model", {})
    if not isinstance(model, dict):
        return  # a malformed section: its own validation names it
    known = SCHEMA["moe"]
    for key, value in moe.items():
        if key not in known:
            raise ConfigError(f"{source}: moe.{key}: unknown field" + _closest(key, known))
        spec = known[key]
        _validate_field(value, _field(spec.default, spec.types, spec.doc), f"moe.{key}", source)
        if key == "top_k":
            target, where = model, "model.top_k"
        else:
            kwargs = model.get("moe_layer_kwargs")
            if kwargs is None:
                kwargs = model["moe_layer_kwargs"] = {}
            if not isinstance(kwargs, dict):
                return  # model.moe_layer_kwargs' own validation names it
            target, where = kwargs, f"model.moe_layer_kwargs[{key!r}]"
        if key in target and target[key] != value:
            raise ConfigError(
                f"{source}: moe.{key} = {value!r} and {where} = {target[key]!r}: the moe section is InternEvo's older "
                f"place of {where}; give only one"
            )
        target[key] = value


def _move_old_tensor_spellings(raw: dict, source: str) -> None:
    """InternLM's older tensor-parallel modes, read as the mode InternEvo later named: sp='none' | 'megatron' |
    'flash-attn' | 'intern' (InternLM d91a5d9) and mode='origin_tp' | 'fstp' (InternLM 189a313; d91a5d9 renamed
    fstp to sp='intern'). A mode pytrain does not run is refused in the spelling the file used."""
    parallel = raw.get("parallel")
    tensor = parallel.get("tensor") if isinstance(parallel, dict) else None
    if not isinstance(tensor, dict):
        return  # absent, a bare size, or malformed (its own validation names it)
    if "sp" in tensor:
        sp = tensor.pop("sp")
        _validate_field(sp, SCHEMA["parallel"]["tensor"]["sp"], "parallel.tensor.sp", source)
        mode, spelling = OLD_SP[sp], f"parallel.tensor.sp = {sp!r}"
        if tensor.get("mode", mode) != mode:
            raise ConfigError(
                f"{source}: {spelling} and parallel.tensor.mode = {tensor['mode']!r}: sp is InternLM's older spelling "
                f"of mode ({sp!r} is {mode!r}); give only mode"
            )
    elif tensor.get("mode") in ("origin_tp", "fstp"):
        old = tensor["mode"]
        # origin_tp's sequence parallelism was flash-attn's linear layers', which sp='flash-attn' kept
        if old == "fstp":
            mode = "isp"
        else:
            mode = "fsp" if parallel.get("sequence_parallel") else "mtp"
        with_sequence = " with parallel.sequence_parallel=True" if mode == "fsp" else ""
        spelling = f"parallel.tensor.mode = {old!r}{with_sequence}"
    else:
        return
    if mode in UNAVAILABLE_MODES:
        raise ConfigError(
            f"{source}: {spelling}: InternLM's older spelling of mode={mode!r} ({UNAVAILABLE_MODES[mode]}), which is "
            f"not available in pytrain; use mode='mtp' or 'msp'"
        )
    tensor["mode"] = mode


def _move_old_ckpt_loads(raw: dict, source: str, ignored: list[str]) -> None:
    """InternLM v0.1/v0.2's loading switches, moved where InternLM's own legacy shim put them (InternLM f6e007f,
    internlm/initialize/legacy/launch.py): load_model_only_folder=P is load_ckpt_info=dict(path=P,
    content=('model',)), load_given_ckpt=B is auto_resume=not B, and load_optimizer=False resumes load_ckpt_folder
    without the optimizer state (the shim left out the scheduler too, which v0.1 and v0.2 resumed: here it is
    resumed). As in InternLM, load_optimizer applies to load_ckpt_folder only; elsewhere it is ignored here."""
    ckpt = raw.get("ckpt")
    if not isinstance(ckpt, dict):
        return  # a malformed section: its own validation names it
    old = {key: ckpt.pop(key) for key in ("load_model_only_folder", "load_optimizer", "load_given_ckpt") if key in ckpt}
    for key, value in old.items():
        _validate_field(value, SCHEMA["ckpt"][key], f"ckpt.{key}", source)

    def move(key: str, field: str, value) -> None:
        if ckpt.get(field) not in (None, value):
            raise ConfigError(
                f"{source}: ckpt.{key} = {old[key]!r} and ckpt.{field} = {ckpt[field]!r}: {key} is InternLM's older "
                f"spelling of {field}={value!r}; give only {field}"
            )
        ckpt[field] = value

    if "load_given_ckpt" in old:
        move("load_given_ckpt", "auto_resume", not old["load_given_ckpt"])
    folder, model_only = ckpt.get("load_ckpt_folder"), old.get("load_model_only_folder")
    if model_only is not None:
        if folder is not None:
            raise ConfigError(
                f"{source}: ckpt.load_model_only_folder and ckpt.load_ckpt_folder are both set: InternLM refuses that "
                f"too; give the folder to start from as load_ckpt_info=dict(path=..., content=...)"
            )
        move(
            "load_model_only_folder", "load_ckpt_info", dict(path=model_only, content=("model",), ckpt_type="internlm")
        )
    if "load_optimizer" in old:
        if folder is None or ckpt.get("load_ckpt_info") is not None:
            ignored.append("ckpt.load_optimizer (applies to load_ckpt_folder only)")
        elif not old["load_optimizer"]:
            ckpt["load_ckpt_info"] = dict(path=folder, content=("model", "sampler", "scheduler"), ckpt_type="internlm")


def _validate(raw: dict, source: str, ignored: list[str]) -> dict:
    _move_renamed(raw, source)
    _move_moe_section(raw, source)
    _move_old_tensor_spellings(raw, source)
    _move_old_ckpt_loads(raw, source, ignored)
    out = {key: value for key, value in raw.items() if key.isupper()}  # the file's own helper constants
    out.update(_validate_section(raw, SCHEMA, source, "", ignored))
    _check_cross_fields(out, source)
    _check_moe(out["model"], source, ignored)
    return out


def _check_moe(model: dict, source: str, ignored: list[str]) -> None:
    """A mixture-of-experts model's routing settings, as its builder will read them (pytrain.model_args)."""
    if model.get("num_experts", 1) <= 1 or "moe_type" not in model:
        return
    try:
        _, no_effect = routing_from_fields(
            model["moe_type"], model["num_experts"], model.get("top_k", 1), model.get("moe_layer_kwargs")
        )
    except ValueError as err:
        raise ConfigError(f"{source}: model: {err}") from None
    ignored.extend(f"model.moe_layer_kwargs.{key}" for key in no_effect)


def _validate_section(raw, schema: dict, source: str, prefix: str, ignored: list[str]) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.')}: must be a dict(...), got {type(raw).__name__}")
    for key in raw:
        if key not in schema and not (prefix == "" and key.isupper()):
            what = "unknown config section or field" if prefix == "" else "unknown field"
            raise ConfigError(f"{source}: {prefix}{key}: {what}" + _closest(key, schema))
    out = {}
    for key, spec in schema.items():
        name = prefix + key
        if name == "model":
            out[key] = _validate_model(raw.get(key, {}), out["model_type"], source, ignored)
        elif isinstance(spec, dict):
            value = raw.get(key, {})
            if (tuple(name.split(".")) in SIZE_SHORTHAND) and isinstance(value, int) and not isinstance(value, bool):
                value = {"size": value}
            section = _validate_section(value, spec, source, name + ".", ignored)
            if section or key in raw:  # a section of only non-acting fields appears when the file has it
                out[key] = section
        elif key in raw:
            out[key] = _validate_field(raw[key], spec, name, source)
            if spec.kind == IGNORED or (spec.kind == PENDING and raw[key] != spec.default):
                ignored.append(name)
        elif spec.kind in (ACTS, PENDING):
            out[key] = spec.default
    return out


def _validate_field(value, spec: Field, name: str, source: str):
    if not isinstance(value, spec.types) or (isinstance(value, bool) and bool not in spec.types):
        raise ConfigError(f"{source}: {name}: expected {spec.type_names()}, got {value!r} ({type(value).__name__})")
    problem = spec.check(value) if spec.check and value is not None else None
    if problem:
        raise ConfigError(f"{source}: {name} = {value!r}: {problem}")
    if spec.kind == UNAVAILABLE and value not in spec.allowed:
        raise ConfigError(
            f"{source}: {name} = {value!r}: {spec.doc} is not available in pytrain; leave it at {spec.allowed[0]!r}"
        )
    return value


def _check_model_type(model_type: str, source: str) -> None:
    from pytrain.registry import MODEL_INITIALIZER

    if model_type not in MODEL_INITIALIZER:
        registered = MODEL_INITIALIZER.names()
        match = difflib.get_close_matches(model_type, registered, n=1, cutoff=0.5)
        raise ConfigError(
            f"{source}: model_type = {model_type!r}: no model is registered under that name"
            + (f" (did you mean {match[0]!r}?)" if match else "")
            + f"; registered: {', '.join(registered)}"
        )


def builder_parameters(builder: Callable) -> dict[str, Any] | None:
    """A model builder's keyword parameters and their defaults (NO_DEFAULT where it has none); None when it
    takes **kwargs."""
    parameters = inspect.signature(builder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    keyword = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return {p.name: p.default for p in parameters if p.kind in keyword}


def _validate_model(raw, model_type: str, source: str, ignored: list[str]) -> dict:
    """The effective model section for model_type's builder (the contract in this module's docstring)."""
    from pytrain.registry import MODEL_INITIALIZER

    _check_model_type(model_type, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: model: must be a dict(...), got {type(raw).__name__}")
    schema = SCHEMA["model"]
    takes = builder_parameters(MODEL_INITIALIZER.get_module(model_type))
    known = set(schema) | set(takes or ())
    given = {}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{source}: model.{key}: unknown field" + _closest(key, known))
        spec = schema.get(key)
        if spec is None:  # a parameter of this builder only: the builder checks it
            given[key] = value
            continue
        if spec.kind == UNAVAILABLE and takes is not None and key in takes:
            spec = _field(spec.default, spec.types, spec.doc)  # this builder implements it
        elif spec.kind == UNAVAILABLE and takes is not None and value not in spec.allowed:
            _refuse_other_familys_field(key, value, model_type, takes, source)
        given[key] = _validate_field(value, spec, f"model.{key}", source)
    if takes is None:  # **kwargs: every given field, over the generic defaults of the fields every run reads
        generic = {key: spec.default for key, spec in schema.items() if spec.kind == ACTS and key not in FAMILY_FIELDS}
        return generic | given
    model = {}
    for name, default in takes.items():
        if name not in given and default is NO_DEFAULT:
            raise ConfigError(f"{source}: model.{name}: required by {model_type} (its builder has no default)")
        model[name] = given.get(name, default)
    for key in given:
        if (
            key not in takes and schema[key].kind != UNAVAILABLE
        ):  # (an unavailable one is at a value that changes nothing)
            plain = schema[key].kind == IGNORED
            ignored.append(f"model.{key}" if plain else f"model.{key} (not a field of {model_type})")
    return model


def _refuse_other_familys_field(key: str, value, model_type: str, takes: dict, source: str) -> None:
    """A field another registered family implements, set for one that does not take it: name both."""
    from pytrain.registry import MODEL_INITIALIZER

    families = [
        name
        for name in MODEL_INITIALIZER.names()
        if key in (builder_parameters(MODEL_INITIALIZER.get_module(name)) or ())
    ]
    if families:
        raise ConfigError(
            f"{source}: model.{key} = {value!r}: not a field of {model_type} (its fields: {', '.join(takes)}); "
            f"taken by {', '.join(families)}"
        )


def _check_cross_fields(cfg: dict, source: str) -> None:
    def fail(field, message):
        raise ConfigError(f"{source}: {field}: {message}")

    model, data, parallel = cfg["model"], cfg["data"], cfg["parallel"]
    if cfg["selective_checkpoint_offload"] and not cfg["selective_checkpoint"]:
        fail("selective_checkpoint_offload", "offloads what selective_checkpoint keeps: set selective_checkpoint=True")
    if cfg["selective_checkpoint_offload"] and cfg["selective_checkpoint_policy"] != "attention":
        fail(
            "selective_checkpoint_offload",
            "works with selective_checkpoint_policy='attention' (the matmul outputs 'matmuls' keeps stay on the "
            "device)",
        )
    heads = model.get("num_attention_heads")
    hidden = model.get("hidden_size")
    if heads and hidden:
        kv_heads = model.get("num_kv_attention_heads") or heads
        if model.get("head_dim") is None and hidden % heads:
            fail("model.hidden_size", f"{hidden} is not divisible by model.num_attention_heads={heads}")
        if heads % kv_heads:
            fail("model.num_kv_attention_heads", f"num_attention_heads={heads} is not a multiple of {kv_heads}")
        head_dim = model.get("head_dim") or hidden // heads
        if head_dim % 2:
            what = "model.head_dim" if model.get("head_dim") else "model.hidden_size"
            fail(what, f"head dim {head_dim} must be even for rotary embeddings")
    _check_long_context(model, fail)
    if model.get("num_chunks", 1) > 1 and parallel["pipeline"]["size"] == 1:
        fail(
            "model.num_chunks",
            "num_chunks > 1 selects the interleaved pipeline schedule and needs parallel.pipeline.size > 1",
        )
    mode = parallel["tensor"]["mode"]
    if mode in UNAVAILABLE_MODES:
        fail("parallel.tensor.mode", f"{mode!r} ({UNAVAILABLE_MODES[mode]}) is not available; use 'mtp' or 'msp'")
    if parallel.get("sequence_parallel") and mode == "mtp":
        fail(
            "parallel.sequence_parallel",
            "True is InternEvo's older spelling of sequence parallelism: set parallel.tensor.mode='msp' instead",
        )
    if data.get("gradient_accumulation") not in (None, data["micro_num"]):
        fail(
            "data.gradient_accumulation",
            f"{data['gradient_accumulation']}: pytrain accumulates data.micro_num={data['micro_num']} micro-batches "
            "per step; leave it out or make it equal",
        )
    if data["rampup_batch_size"] is None:  # InternLM v0.2's spelling of no ramp-up
        data["rampup_batch_size"] = ""
    if data["type"] in ("streaming", "hf") and data["tokenizer_path"] is None:
        fail(
            "data.tokenizer_path",
            f"data.type={data['type']!r} tokenizes text on the fly: set it to 'byte', a tokenizers .json, a "
            "transformers tokenizer folder or a sentencepiece .model",
        )
    if data["sources"] is not None:
        _check_sources(data, source, fail)
    _check_snapshot_folder(cfg["ckpt"], fail)
    _check_model_split(model, data, parallel, fail)
    folder = data["train_folder"]
    if folder == BUILTIN_CORPUS and model.get("vocab_size", 256) < 256:
        fail("model.vocab_size", f"{model['vocab_size']} is too small for the byte-level corpus: use >= 256")
    if cfg["lr_scheduler"]["total_steps"] is None:
        cfg["lr_scheduler"]["total_steps"] = data["total_steps"]
    if cfg["beta2_scheduler"]["init_beta2"] is None:
        cfg["beta2_scheduler"]["init_beta2"] = cfg["adam"]["adam_beta2"]
    if cfg["beta2_scheduler"]["c"] is None:
        cfg["beta2_scheduler"]["c"] = cfg["adam"]["adam_beta2_c"]


# A named source's fields (data.sources): the data section's fields that say what a dataset is and how to read it
SOURCE_FIELDS = (
    "type",
    "train_folder",
    "tokenizer_path",
    "text_key",
    "subset_name",
    "split",
    "add_bos_eos",
    "bos_id",
    "eos_id",
)


def _check_sources(data: dict, source: str, fail) -> None:
    """data.sources: every source's fields as the data section's, a folder each, a tokenizer for streamed ones,
    and data.dataset_weights over exactly the names (checked here so a bad mixture stops before any process)."""
    sources = data["sources"]
    example = "dict(en=dict(type='tokenized', train_folder='/data/en'), code=dict(type='megatron', ...))"
    if not sources:
        fail("data.sources", f"names no source: give at least one, e.g. {example}")
    if data["train_folder"] is not None:
        fail(
            "data.train_folder",
            f"{data['train_folder']!r} and data.sources both name the training data: give it as one more source "
            f"(e.g. main=dict(type={data['type']!r}, train_folder={data['train_folder']!r})) and set "
            "train_folder=None",
        )
    for name, spec in sources.items():
        where = f"data.sources[{name!r}]"
        if not isinstance(name, str) or not name:
            fail(where, "a source's name is a non-empty string (its dataset type in the metrics)")
        if not isinstance(spec, dict):
            fail(where, f"expected dict(type=..., train_folder=...), got {spec!r}")
        for key, value in spec.items():
            if key not in SOURCE_FIELDS:
                fail(f"{where}.{key}", "not a source's field" + _closest(key, SOURCE_FIELDS))
            _validate_field(value, SCHEMA["data"][key], f"{where}.{key}", source)
        if spec.get("train_folder") is None:
            fail(
                f"{where}.train_folder",
                "missing: set it to the source's folder (a Megatron path prefix, or a hub name for streaming)",
            )
        kind = spec.get("type", data["type"])
        if kind in ("streaming", "hf") and spec.get("tokenizer_path", data["tokenizer_path"]) is None:
            fail(
                f"{where}.tokenizer_path",
                f"the source is type {kind!r}, tokenized on the fly: set it (or data.tokenizer_path) to 'byte', a "
                "tokenizers .json, a transformers tokenizer folder or a sentencepiece .model",
            )
    weights, names = data["dataset_weights"], ", ".join(map(repr, sources))
    if weights is None:
        fail(
            "data.dataset_weights",
            f"data.sources mixes by weight: give every source one, e.g. {dict.fromkeys(sources, 1.0)}",
        )
    unknown, missing = [n for n in weights if n not in sources], [n for n in sources if n not in weights]
    if unknown or missing:
        fail(
            "data.dataset_weights",
            (f"names {', '.join(map(repr, unknown))}, not a source; " if unknown else "")
            + (f"has no weight for {', '.join(map(repr, missing))}; " if missing else "")
            + f"the sources are {names}: give each a weight (0: left out)",
        )


def _check_long_context(model: dict, fail) -> None:
    """The rotary scaling and the sliding window as the model's builder will read them (pytrain.model_args)."""

    def field(name):
        return model.get(name, MODEL_DEFAULTS[name])

    try:
        rope_scaling_from_fields(**{name: field(name) for name in ROPE_FIELDS})
        layer_windows(field("use_sliding_window"), field("sliding_window"), field("max_window_layers"), 0)
    except ValueError as err:
        fail("model", str(err))


def _check_snapshot_folder(ckpt: dict, fail) -> None:
    """InternLM v0.2.0's snapshot_ckpt_folder: pytrain's snapshots go where InternLM's went by default."""
    given = ckpt.get("snapshot_ckpt_folder")
    if given is None or not (ckpt["enable_save_ckpt"] and ckpt["save_ckpt_folder"] and ckpt["oss_snapshot_freq"]):
        return

    def local(folder: str) -> str:
        return os.path.normpath(folder.removeprefix("local:"))

    expected = os.path.join(local(ckpt["save_ckpt_folder"]), "snapshot")
    if local(given) != expected:
        fail(
            "ckpt.snapshot_ckpt_folder",
            f"{given!r}: snapshots go to <save_ckpt_folder>/snapshot ({expected}) in pytrain; another folder is not "
            "available: leave the field out",
        )


def _check_model_split(model: dict, data: dict, parallel: dict, fail) -> None:
    """Can the model be cut into tensor shards and pipeline x num_chunks stages? (Fields the model_type's
    builder does not take are not checked.)"""
    pipeline = parallel["pipeline"]["size"]
    if parallel["expert_weight"]["size"] > 1 and parallel["weight"]["size"] == 1:
        fail(
            "parallel.expert_weight.size",
            f"{parallel['expert_weight']['size']}: expert weight parallelism comes with isp's weight parallelism: "
            "set parallel.tensor.mode='isp' and parallel.weight.size > 1, or expert_weight.size=1",
        )
    if parallel["tensor"]["mode"] == "isp":
        _check_sequence_split(model, data, parallel, fail)
        _check_sequence_2d(model, data, parallel, fail)
    else:
        if parallel["sequence_2D"]["enable"]:
            fail(
                "parallel.sequence_2D.enable",
                "2D sequence parallelism splits isp's sequence: set parallel.tensor.mode='isp'",
            )
        if parallel["weight"]["size"] > 1:
            fail(
                "parallel.weight.size",
                f"{parallel['weight']['size']}: weight parallelism shards the weights of isp's sequence-split "
                "layers: set parallel.tensor.mode='isp', or weight.size=1",
            )
        _check_tensor_split(model, data, parallel, fail)
    chunks = model.get("num_chunks", 1)
    stages = pipeline * chunks
    if model.get("num_layers") is not None and model["num_layers"] < stages:
        fail(
            "model.num_layers",
            f"{model['num_layers']} layers cannot fill parallel.pipeline.size={pipeline} x "
            f"model.num_chunks={chunks} = {stages} pipeline stages",
        )
    _check_zeropp(data, parallel, fail)
    interleaved = chunks > 1 or parallel["pipeline"]["use_zeropp"]
    # a step runs whole groups of the pipeline size, and whole ZeroPP units
    unit = data["unit_schedule_size"] or 1
    multiple = math.lcm(pipeline, unit)
    of = f"parallel.pipeline.size={pipeline}" + (f" and data.unit_schedule_size={unit}" if unit > 1 else "")
    if interleaved and data["micro_num"] % multiple:
        fail(
            "data.micro_num",
            f"the interleaved schedule needs micro_num ({data['micro_num']}) to be a multiple of {of}: use a "
            f"multiple of {multiple}",
        )
    ramp = data.get("rampup_batch_size", "").split()  # "start increment every"; its form is the loader's check
    if interleaved and len(ramp) == 3 and all(x.isdigit() for x in ramp) and any(int(x) % multiple for x in ramp[:2]):
        fail(
            "data.rampup_batch_size",
            f"{' '.join(ramp)!r}: the interleaved schedule needs every step's micro-batch count to be a multiple "
            f"of {of}: use a start and an increment divisible by {multiple}",
        )


def _check_zeropp(data: dict, parallel: dict, fail) -> None:
    """ZeroPP (pytrain.parallel.zeropp): a pipeline schedule, in units of any number of micro-batches (that the
    step's count is a multiple of is _check_model_split's), its weight gradients deferred by decouple_grad when
    FSDP shards the stages."""
    pipeline, zeropp = parallel["pipeline"]["size"], parallel["pipeline"]["use_zeropp"]
    if zeropp and pipeline == 1:
        fail(
            "parallel.pipeline.use_zeropp",
            "ZeroPP schedules pipeline stages: set parallel.pipeline.size > 1, or use_zeropp=False (FSDP without a "
            "pipeline is parallel.zero1.fsdp=True)",
        )
    if parallel["pipeline"]["decouple_grad"] and not zeropp:
        fail(
            "parallel.pipeline.decouple_grad",
            "True: ZeroPP's deferred weight gradients: set parallel.pipeline.use_zeropp=True, or decouple_grad=False",
        )
    if parallel["pipeline"]["decouple_grad"] and parallel["weight"]["size"] == 1 and not parallel["zero1"]["fsdp"]:
        fail(
            "parallel.pipeline.decouple_grad",
            "True: its deferred weight gradients are accumulated and reduce-scattered by the stages' FSDP, but "
            "nothing shards them (ZeRO-1's gradient reduction does not wait for them): set parallel.weight.size > 1 "
            "(isp) or parallel.zero1.fsdp=True, or decouple_grad=False",
        )
    if data["unit_schedule_size"] is not None and not zeropp:
        fail(
            "data.unit_schedule_size",
            f"{data['unit_schedule_size']}: scheduling units are ZeroPP's: set parallel.pipeline.use_zeropp=True, "
            "or leave the field out",
        )


def _check_sequence_split(model: dict, data: dict, parallel: dict, fail) -> None:
    """isp: the sequence over the tensor ranks, the heads over them around attention (pytrain.parallel.sequence);
    weight parallelism over (data, tensor) ranks."""
    tensor, pipeline = parallel["tensor"]["size"], parallel["pipeline"]["size"]
    heads = model.get("num_attention_heads")
    kv_heads = model.get("num_kv_attention_heads") or heads
    if data["seq_len"] % tensor:
        fail(
            "data.seq_len",
            f"{data['seq_len']} cannot be split over parallel.tensor.size={tensor} (isp): use a multiple of {tensor}",
        )
    if parallel["sequence_2D"]["enable"]:  # the heads over its head group: _check_sequence_2d
        heads = kv_heads = None
    if heads is not None and heads % tensor:
        fail(
            "model.num_attention_heads",
            f"{heads} heads cannot be split over parallel.tensor.size={tensor} around attention (isp): use a tensor "
            "size that divides it",
        )
    if kv_heads is not None and kv_heads % tensor and tensor % kv_heads:
        fail(
            "model.num_kv_attention_heads",
            f"{kv_heads} kv heads over parallel.tensor.size={tensor} (isp): the tensor size must divide it or be a "
            "multiple of it (each kv head is then repeated)",
        )
    if model.get("tie_word_embeddings") and pipeline > 1:
        fail(
            "model.tie_word_embeddings",
            "isp with a tied embedding on two pipeline stages is not supported: untie it or use pipeline.size=1",
        )
    weight = parallel["weight"]["size"]
    if weight > 1 and parallel["zero1"]["fsdp"]:
        fail(
            "parallel.zero1.fsdp",
            "weight parallelism (parallel.weight.size > 1) already shards the weights, gradients and optimizer state "
            "with torch's fully_shard: set fsdp=False",
        )


def _check_sequence_2d(model: dict, data: dict, parallel: dict, fail) -> None:
    two, tensor = parallel["sequence_2D"], parallel["tensor"]["size"]
    if not two["enable"]:
        return
    head, context, window = two["head_size"], two["context_size"], two["window_size"]
    if parallel["tensor"]["mode"] != "isp":
        fail(
            "parallel.sequence_2D.enable",
            "2D sequence parallelism splits isp's sequence: set parallel.tensor.mode='isp'",
        )
    if head * context != tensor:
        fail(
            "parallel.sequence_2D",
            f"head_size {head} x context_size {context} = {head * context} must equal parallel.tensor.size={tensor}",
        )
    if context % window:
        valid = [w for w in range(1, context + 1) if context % w == 0]
        fail("parallel.sequence_2D.window_size", f"{window} does not divide context_size {context}: use one of {valid}")
    if context > 1 and data["seq_len"] % (2 * tensor):
        fail(
            "data.seq_len",
            f"{data['seq_len']} cannot be cut into 2 x context_size zigzag chunks, each split over head_size: use a "
            f"multiple of {2 * tensor}",
        )
    heads = model.get("num_attention_heads")
    kv_heads = model.get("num_kv_attention_heads") or heads
    if heads is not None and (heads % head or (kv_heads % head and head % kv_heads)):
        fail(
            "parallel.sequence_2D.head_size",
            f"{head}: num_attention_heads ({heads}) must be divisible by it and num_kv_attention_heads ({kv_heads}) "
            "a multiple or a divisor of it",
        )
    placement = two["device_placement_strategy"] or {}
    unknown = set(placement) - {"head_first", "interleaved"}
    if unknown:
        fail(
            "parallel.sequence_2D.device_placement_strategy", f"unknown keys {sorted(unknown)}: head_first, interleaved"
        )
    if placement.get("interleaved") and (placement.get("head_first", True) or window <= 1):
        fail(
            "parallel.sequence_2D.device_placement_strategy",
            "interleaved=True needs head_first=False and window_size > 1 (InternEvo's rule)",
        )


def _check_tensor_split(model: dict, data: dict, parallel: dict, fail) -> None:
    """mtp / msp: heads, kv heads, vocabulary, hidden and MLP width over the tensor ranks."""
    tensor = parallel["tensor"]["size"]
    heads = model.get("num_attention_heads")
    shard = "split over parallel.tensor.size"
    sizes = {
        "num_attention_heads": heads,
        "num_kv_attention_heads": model.get("num_kv_attention_heads") or heads,
        "vocab_size": model.get("vocab_size"),
        "hidden_size": model.get("hidden_size"),
    }
    for field, value in sizes.items():
        if value is not None and value % tensor:
            fail(f"model.{field}", f"{value} cannot be {shard}={tensor}: use a tensor size that divides it")
    if model.get("hidden_size") and "mlp_ratio" in model:
        width = mlp_width(model["hidden_size"], model["mlp_ratio"], model.get("multiple_of", 256))
        if width % tensor:
            fail(
                "model.multiple_of",
                f"the MLP width {width} cannot be {shard}={tensor}: use a multiple_of divisible by {tensor}",
            )
    if parallel["tensor"]["mode"] == "msp" and data["seq_len"] % tensor:
        fail("data.seq_len", f"{data['seq_len']} cannot be {shard}={tensor} (sequence parallelism, mode 'msp')")
    if model.get("tie_word_embeddings") and tensor > 1 and model.get("embed_split_hidden", True):
        fail(
            "model.tie_word_embeddings",
            "a tied head is split over the vocabulary, so the embedding must be too: set embed_split_hidden=False",
        )


def check_world_size(cfg: Config, world_size: int, source: str = "config") -> int:
    """Checks the parallel layout against the world size; returns the data-parallel size."""
    tensor, pipeline = cfg.parallel.tensor.size, cfg.parallel.pipeline.size
    if world_size % (tensor * pipeline):
        raise ConfigError(
            f"{source}: parallel: tensor.size={tensor} x pipeline.size={pipeline} does not divide "
            f"the world size {world_size}"
        )
    data_parallel = world_size // (tensor * pipeline)
    expert_zero1_size(cfg, data_parallel, expert_parallel_size(cfg, data_parallel, source), source)
    zero1 = cfg.parallel.zero1.size
    if zero1 > 0 and data_parallel % zero1:
        raise ConfigError(
            f"{source}: parallel.zero1.size={zero1} does not divide the data-parallel size "
            f"{data_parallel} (world {world_size} / tensor {tensor} / pipeline {pipeline})"
        )
    weight, expert_weight = cfg.parallel.weight.size, cfg.parallel.expert_weight.size
    expert_data = data_parallel // expert_parallel_size(cfg, data_parallel, source)
    if (expert_data * tensor) % expert_weight:
        raise ConfigError(
            f"{source}: parallel.expert_weight.size={expert_weight} must divide the {expert_data * tensor} ranks "
            f"holding the same experts (data-parallel size {data_parallel} / expert size x tensor size {tensor})"
        )
    if (data_parallel * tensor) % weight:
        raise ConfigError(
            f"{source}: parallel.weight.size={weight} must divide data-parallel size {data_parallel} x tensor size "
            f"{tensor} = {data_parallel * tensor} (world {world_size} / pipeline {pipeline}): weights are sharded over "
            f"runs of {weight} of those ranks"
        )
    if cfg.parallel.zero1.fsdp and zero1 == 1 and data_parallel > 1:
        raise ConfigError(
            f"{source}: parallel.zero1.fsdp=True shards over the zero1 group, which zero1.size=1 turns off; use "
            f"zero1.size=-1 (all {data_parallel} data-parallel ranks) or another divisor of {data_parallel}"
        )
    return data_parallel


def expert_parallel_size(cfg: Config, data_parallel: int, source: str = "config") -> int:
    """parallel.expert.size resolved for this data-parallel size (InternEvo's rule: <= 0 is the data-parallel
    size, or num_experts if fewer), checked to divide the data-parallel size and num_experts, and the
    experts to split over expert x tensor ranks; a dense model's is 1."""
    experts = cfg.model.get("num_experts", 1)
    if experts <= 1:
        return 1
    size = cfg.parallel.expert.size
    if size <= 0:
        size = min(data_parallel, experts)
    if data_parallel % size or experts % size:
        raise ConfigError(
            f"{source}: parallel.expert.size={size} must divide the data-parallel size {data_parallel} and "
            f"model.num_experts={experts}"
        )
    tensor = 1 if cfg.parallel.tensor.mode == "isp" else cfg.parallel.tensor.size  # isp: experts whole per tensor rank
    if experts % (size * tensor):
        # the experts are split by index over the expert x tensor ranks (pytrain.parallel.expert)
        raise ConfigError(
            f"{source}: model.num_experts={experts} cannot be split over expert size {size} x tensor size "
            f"{tensor}: make num_experts a multiple of {size * tensor}, or lower parallel.expert.size"
        )
    return size


def expert_zero1_size(cfg: Config, data_parallel: int, expert: int, source: str = "config") -> int:
    """parallel.expert_zero1.size resolved: the ZeRO-1 group of the expert weights, a run of that many ranks of
    an expert-data group (data_parallel / expert ranks hold the same experts). <= 0: the whole expert-data
    group when ZeRO-1 is on (parallel.zero1.size != 1), else 1."""
    size, expert_data = cfg.parallel.expert_zero1.size, data_parallel // expert
    if cfg.model.get("num_experts", 1) <= 1:
        return 1
    if size <= 0:
        return expert_data if cfg.parallel.zero1.size != 1 else 1
    if expert_data % size:
        raise ConfigError(
            f"{source}: parallel.expert_zero1.size={size} must divide the {expert_data} ranks holding the same experts "
            f"(data-parallel size {data_parallel} / expert size {expert})"
        )
    return size


def reference_table() -> str:
    """The Markdown table of every section and field (README's config reference is generated from this)."""
    rows = ["| field | type | default | kind | meaning |", "|---|---|---|---|---|"]

    def walk(schema, prefix):
        for key, spec in schema.items():
            if isinstance(spec, dict):
                walk(spec, f"{prefix}{key}.")
            else:
                default = "8/3" if spec.default == 8 / 3 else repr(spec.default)
                rows.append(
                    f"| `{prefix}{key}` | {spec.type_names()} | `{default}` | {spec.kind_name()} | {spec.doc} |"
                )

    walk(SCHEMA, "")
    kinds = {"acts": ACTS, "ignored": IGNORED, "unavailable": UNAVAILABLE}
    for moe_type, table in MOE_LAYER_KWARGS.items():
        for key, (default, types, kind, _) in table.items():
            types = types if isinstance(types, tuple) else (types,)
            names = " | ".join("None" if t is NONE else t.__name__ for t in types)
            rows.append(
                f"| `model.moe_layer_kwargs.{key}` | {names} | `{default!r}` | {kinds[kind]} | moe_type={moe_type!r} |"
            )
    return "\n".join(rows)
