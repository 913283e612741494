"""Python config files, as InternLM's: a file is executed and its module globals become the config.

    cfg = Config.from_file("configs/tiny.py", overrides=["model.num_layers=2"])
    cfg.model.hidden_size == cfg["model"]["hidden_size"]

Every section and field is checked against SCHEMA below: an unknown name (with the closest valid one),
a wrong type or an impossible value is a ConfigError naming the file and the field. Missing fields get
InternLM's defaults. Upper-case globals (SEQ_LEN, HIDDEN_SIZE, JOB_NAME, ...) are the file's own helpers
and pass through unchecked. `Config.dump()` writes the effective config back as a loadable file.
"""

from __future__ import annotations

import ast
import difflib
import pprint
import runpy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FunctionType, ModuleType
from typing import Any

REQUIRED = object()
DTYPES = ("torch.float16", "torch.half", "torch.bfloat16", "torch.float32", "torch.tf32")
BUILTIN_CORPUS = "builtin:stdlib"


class ConfigError(ValueError):
    """A config file or override that cannot run; the message names the file, the field and the fix."""


@dataclass(frozen=True)
class Field:
    default: Any
    types: tuple
    doc: str
    check: Callable[[Any], str | None] | None = None  # returns what is wrong, or None

    def type_names(self) -> str:
        return " | ".join("None" if t is type(None) else t.__name__ for t in self.types)


def _field(default, types, doc, check=None) -> Field:
    return Field(default, types if isinstance(types, tuple) else (types,), doc, check)


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


def only(value, why):
    """A field InternLM has whose other values pytrain does not run yet: say so rather than ignore it."""
    return lambda v: None if v == value else f"{why}; leave it at {value!r}"


def _checkpoint(v):
    if isinstance(v, bool):
        return None
    return unit_interval(v)


NONE = type(None)
SCHEMA: dict[str, Any] = {
    "model_type": _field("INTERNLM", str, "registered model builder to use (MODEL_INITIALIZER)"),
    "use_fp32_norm": _field(False, bool, "keep norm weights in fp32 when model.dtype is 16-bit"),
    "cudnn_deterministic": _field(False, bool, "torch.backends.cudnn.deterministic"),
    "cudnn_benchmark": _field(False, bool, "torch.backends.cudnn.benchmark"),
    "model": {
        "checkpoint": _field(
            False, (bool, float, int), "activation recompute: True/False or the fraction of layers", _checkpoint
        ),
        "num_attention_heads": _field(32, int, "query heads", positive),
        "num_kv_attention_heads": _field(
            None,
            (int, NONE),
            "key/value heads for GQA/MQA (None: = query heads)",
            lambda v: None if v is None or v > 0 else "must be > 0",
        ),
        "embed_split_hidden": _field(True, bool, "tensor parallel: split the embedding along hidden (else vocab)"),
        "vocab_size": _field(103168, int, "vocabulary size", positive),
        "embed_grad_scale": _field(
            1,
            (float, int),
            "scale of the gradient reaching the embedding",
            lambda v: None if 0 < v <= 1 else "must be within (0, 1]",
        ),
        "parallel_output": _field(True, bool, "tensor parallel: keep the logits sharded over vocab"),
        "hidden_size": _field(4096, int, "model width", positive),
        "num_layers": _field(32, int, "decoder layers", positive),
        "mlp_ratio": _field(8 / 3, (float, int), "SwiGLU width / hidden (rounded up to multiple_of)", positive),
        "multiple_of": _field(256, int, "SwiGLU width is rounded up to a multiple of this", positive),
        "apply_post_layer_norm": _field(False, bool, "norm after the residual add (post-LN) instead of before"),
        "dtype": _field("torch.bfloat16", str, "parameter/activation dtype: " + ", ".join(DTYPES), one_of(*DTYPES)),
        "norm_type": _field("rmsnorm", str, "rmsnorm or layernorm", one_of("rmsnorm", "layernorm")),
        "layer_norm_epsilon": _field(1e-5, (float, int), "norm epsilon", positive),
        "use_flash_attn": _field(
            True,
            bool,
            "fused attention: pytrain's Triton flash-attention on GPUs, PyTorch SDPA on CPU (False: plain reference)",
        ),
        "num_chunks": _field(1, int, "model chunks per pipeline rank (> 1: interleaved schedule)", positive),
        "rope_base": _field(10000.0, (float, int), "rotary embedding base", positive),
        "tie_word_embeddings": _field(False, bool, "the LM head shares the embedding's weight"),
    },
    "data": {
        "seq_len": _field(2048, int, "tokens per sample", positive),
        "micro_num": _field(4, int, "micro-batches per optimizer step (gradient accumulation)", positive),
        "micro_bsz": _field(2, int, "samples per micro-batch", positive),
        "valid_micro_num": _field(4, int, "micro-batches per validation step", positive),
        "valid_every": _field(50, int, "validate every N steps (0: off; needs valid_folder)", non_negative),
        "pack_sample_into_one": _field(False, bool, "pack with boundaries only every seq_len"),
        "total_steps": _field(50000, int, "optimizer steps to train", positive),
        "skip_batches": _field("", str, "batches to skip", only("", "skipping batches is not available yet")),
        "rampup_batch_size": _field(
            "", str, "batch-size ramp-up 'start incr every'", only("", "batch-size ramp-up is not available yet")
        ),
        "min_length": _field(50, int, "drop samples shorter than this", non_negative),
        "train_folder": _field(
            None,
            (str, NONE),
            f"None: random dummy tokens (benchmarking); '{BUILTIN_CORPUS}': the bundled byte-level corpus",
            None,
        ),
        "valid_folder": _field(
            None, (str, NONE), "validation data", only(None, "validation data is not available yet")
        ),
        "cache_folder": _field("~/.cache/pytrain", str, "where the bundled corpus is tokenized and cached"),
    },
    "parallel": {
        "zero1": {
            "size": _field(-1, int, "ZeRO-1 group size (<= 0: the whole data-parallel group; 1: off)"),
            "fsdp": _field(False, bool, "FSDP instead of ZeRO-1", only(False, "FSDP is not available")),
        },
        "tensor": {
            "size": _field(1, int, "tensor-parallel size", positive),
            "mode": _field(
                "mtp",
                str,
                "mtp (Megatron tensor parallel), msp (+ sequence parallel); fsp, isp are not available",
                one_of("mtp", "msp", "fsp", "isp"),
            ),
        },
        "pipeline": {
            "size": _field(1, int, "pipeline-parallel size", positive),
            "interleaved_overlap": _field(True, bool, "overlap communication in the interleaved schedule"),
        },
        "weight": {
            "size": _field(1, int, "weight-parallel size (isp only)", positive),
            "overlap": _field(True, bool, "overlap weight communication (isp only)"),
            "memory_pool": _field(True, bool, "weight memory pool (isp only)"),
        },
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
    "loss": {"label_smoothing": _field(0, (float, int), "cross-entropy label smoothing", open_unit_interval)},
    "adam": {
        "lr": _field(1e-4, (float, int), "peak learning rate", positive),
        "adam_beta1": _field(0.9, (float, int), "beta1", open_unit_interval),
        "adam_beta2": _field(0.95, (float, int), "beta2 (initial, see beta2_scheduler)", open_unit_interval),
        "adam_beta2_c": _field(0, (float, int), "beta2 schedule exponent c (<= 0: constant)"),
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
        "init_steps": _field(0, int, "steps before warmup starts (lr 0)", non_negative),
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
        "enable_save_ckpt": _field(
            False, bool, "save checkpoints", only(False, "checkpoint saving is not available yet")
        ),
        "save_ckpt_folder": _field(None, (str, NONE), "where checkpoints go"),
        "load_ckpt_folder": _field(
            None, (str, NONE), "checkpoint to load", only(None, "checkpoint loading is not available yet")
        ),
        "load_ckpt_info": _field(
            None, (dict, NONE), "dict(path, content, ckpt_type)", only(None, "checkpoint loading is not available yet")
        ),
        "auto_resume": _field(True, bool, "resume from the newest complete checkpoint"),
        "checkpoint_every": _field(50, int, "save every N steps", positive),
        "async_upload": _field(False, bool, "upload checkpoints in the background"),
        "async_upload_tmp_folder": _field(None, (str, NONE), "staging folder for async uploads"),
        "oss_snapshot_freq": _field(0, int, "snapshot every N steps to object storage", non_negative),
        "stop_file_path": _field(None, (str, NONE), "a file whose content (a step) stops the run"),
    },
    "monitor": {
        "alert": {
            "enable_feishu_alert": _field(False, bool, "Feishu alerts", only(False, "Feishu alerts are not available")),
            "feishu_alert_address": _field(None, (str, NONE), "Feishu webhook"),
            "light_monitor_address": _field(None, (str, NONE), "light monitor address"),
            "alert_file_path": _field(None, (str, NONE), "file alerts are appended to"),
        },
        "tensorboard": {
            "enable": _field(True, bool, "write TensorBoard event files into the run folder"),
            "queue_max_length": _field(10, int, "TensorBoard writer queue", positive),
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

# Fields InternLM configs may give as a bare number instead of a dict: parallel.tensor=2 == dict(size=2).
SIZE_SHORTHAND = {("parallel", "zero1"), ("parallel", "tensor"), ("parallel", "pipeline"), ("parallel", "weight")}


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
        return cls(_validate(raw, source))

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


def _validate(raw: dict, source: str) -> dict:
    out = {key: value for key, value in raw.items() if key.isupper()}  # the file's own helper constants
    out.update(_validate_section(raw, SCHEMA, source, ""))
    _check_cross_fields(out, source)
    return out


def _validate_section(raw, schema: dict, source: str, prefix: str) -> dict:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.')}: must be a dict(...), got {type(raw).__name__}")
    for key in raw:
        if key not in schema and not (prefix == "" and key.isupper()):
            what = "unknown config section or field" if prefix == "" else "unknown field"
            raise ConfigError(f"{source}: {prefix}{key}: {what}" + _closest(key, schema))
    out = {}
    for key, spec in schema.items():
        name = prefix + key
        if isinstance(spec, dict):
            value = raw.get(key, {})
            if (tuple(name.split(".")) in SIZE_SHORTHAND) and isinstance(value, int) and not isinstance(value, bool):
                value = {"size": value}
            out[key] = _validate_section(value, spec, source, name + ".")
            continue
        value = raw.get(key, spec.default)
        if value is REQUIRED:
            raise ConfigError(f"{source}: {name}: required field is missing")
        if not isinstance(value, spec.types) or (isinstance(value, bool) and bool not in spec.types):
            raise ConfigError(f"{source}: {name}: expected {spec.type_names()}, got {value!r} ({type(value).__name__})")
        problem = spec.check(value) if spec.check and value is not None else None
        if problem:
            raise ConfigError(f"{source}: {name} = {value!r}: {problem}")
        out[key] = value
    return out


def _check_cross_fields(cfg: dict, source: str) -> None:
    def fail(field, message):
        raise ConfigError(f"{source}: {field}: {message}")

    model, data, parallel = cfg["model"], cfg["data"], cfg["parallel"]
    heads, kv_heads = model["num_attention_heads"], model["num_kv_attention_heads"] or model["num_attention_heads"]
    if model["hidden_size"] % heads:
        fail("model.hidden_size", f"{model['hidden_size']} is not divisible by model.num_attention_heads={heads}")
    if heads % kv_heads:
        fail("model.num_kv_attention_heads", f"num_attention_heads={heads} is not a multiple of {kv_heads}")
    if (model["hidden_size"] // heads) % 2:
        fail("model.hidden_size", f"head dim {model['hidden_size'] // heads} must be even for rotary embeddings")
    if model["num_chunks"] > 1 and parallel["pipeline"]["size"] == 1:
        fail(
            "model.num_chunks",
            "num_chunks > 1 selects the interleaved pipeline schedule and needs parallel.pipeline.size > 1",
        )
    if parallel["weight"]["size"] > 1:
        fail("parallel.weight.size", "weight parallelism (isp) is not available; use 1")
    if parallel["tensor"]["mode"] not in ("mtp", "msp"):
        fail("parallel.tensor.mode", f"{parallel['tensor']['mode']!r} is not available; use 'mtp' or 'msp'")
    _check_model_split(model, data, parallel, fail)
    folder = data["train_folder"]
    if folder is not None and folder != BUILTIN_CORPUS:
        fail(
            "data.train_folder",
            f"{folder!r}: reading tokenized folders is not available yet; use None "
            f"(dummy data) or {BUILTIN_CORPUS!r} (the bundled corpus)",
        )
    if folder == BUILTIN_CORPUS and model["vocab_size"] < 256:
        fail("model.vocab_size", f"{model['vocab_size']} is too small for the byte-level corpus: use >= 256")
    if cfg["lr_scheduler"]["total_steps"] is None:
        cfg["lr_scheduler"]["total_steps"] = data["total_steps"]
    if cfg["beta2_scheduler"]["init_beta2"] is None:
        cfg["beta2_scheduler"]["init_beta2"] = cfg["adam"]["adam_beta2"]
    if cfg["beta2_scheduler"]["c"] is None:
        cfg["beta2_scheduler"]["c"] = cfg["adam"]["adam_beta2_c"]


def mlp_width(hidden_size: int, mlp_ratio: float, multiple_of: int = 256) -> int:
    """InternLM's SwiGLU width: int(hidden * ratio) rounded up to a multiple (4096 * 8/3 -> 11008)."""
    width = int(hidden_size * mlp_ratio)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


def _check_model_split(model: dict, data: dict, parallel: dict, fail) -> None:
    """Can the model be cut into tensor shards and pipeline x num_chunks stages?"""
    tensor, pipeline = parallel["tensor"]["size"], parallel["pipeline"]["size"]
    heads, kv_heads = model["num_attention_heads"], model["num_kv_attention_heads"] or model["num_attention_heads"]
    width = mlp_width(model["hidden_size"], model["mlp_ratio"], model["multiple_of"])
    shard = "split over parallel.tensor.size"
    for field, value in (
        ("num_attention_heads", heads),
        ("num_kv_attention_heads", kv_heads),
        ("vocab_size", model["vocab_size"]),
        ("hidden_size", model["hidden_size"]),
    ):
        if value % tensor:
            fail(f"model.{field}", f"{value} cannot be {shard}={tensor}: use a tensor size that divides it")
    if width % tensor:
        fail(
            "model.multiple_of",
            f"the MLP width {width} cannot be {shard}={tensor}: use a multiple_of divisible by {tensor}",
        )
    if parallel["tensor"]["mode"] == "msp" and data["seq_len"] % tensor:
        fail("data.seq_len", f"{data['seq_len']} cannot be {shard}={tensor} (sequence parallelism, mode 'msp')")
    if model["tie_word_embeddings"] and tensor > 1 and model["embed_split_hidden"]:
        fail(
            "model.tie_word_embeddings",
            "a tied head is split over the vocabulary, so the embedding must be too: set embed_split_hidden=False",
        )
    stages = pipeline * model["num_chunks"]
    if model["num_layers"] < stages:
        fail(
            "model.num_layers",
            f"{model['num_layers']} layers cannot fill parallel.pipeline.size={pipeline} x "
            f"model.num_chunks={model['num_chunks']} = {stages} pipeline stages",
        )
    if model["num_chunks"] > 1 and data["micro_num"] % pipeline:
        fail(
            "data.micro_num",
            f"the interleaved schedule needs micro_num ({data['micro_num']}) to be a multiple of "
            f"parallel.pipeline.size={pipeline}",
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
    zero1 = cfg.parallel.zero1.size
    if zero1 > 0 and data_parallel % zero1:
        raise ConfigError(
            f"{source}: parallel.zero1.size={zero1} does not divide the data-parallel size "
            f"{data_parallel} (world {world_size} / tensor {tensor} / pipeline {pipeline})"
        )
    return data_parallel


def reference_table() -> str:
    """The Markdown table of every section and field (README's config reference is generated from this)."""
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]

    def walk(schema, prefix):
        for key, spec in schema.items():
            if isinstance(spec, dict):
                walk(spec, f"{prefix}{key}.")
            else:
                default = "8/3" if spec.default == 8 / 3 else repr(spec.default)
                rows.append(f"| `{prefix}{key}` | {spec.type_names()} | `{default}` | {spec.doc} |")

    walk(SCHEMA, "")
    return "\n".join(rows)
