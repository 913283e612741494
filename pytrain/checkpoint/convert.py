"""Hugging Face weights in and out of pytrain.

    python -m pytrain.checkpoint.convert --to hf --config CFG --ckpt CKPT --out HF_DIR [--dtype bfloat16]
    python -m pytrain.checkpoint.convert --from hf --config CFG --hf HF_DIR --out SAVE_FOLDER

--to hf: a pytrain checkpoint (a `<step>/` folder, or a save folder: its newest complete checkpoint) of the
config's model written as a transformers folder (config.json, safetensors shards; the class per family is
in pytrain.checkpoint.hf). --from hf: a transformers folder written as a pytrain checkpoint `SAVE_FOLDER/0/`
(model only), which a run loads with load_ckpt_info=dict(path=..., content=("model",)). Both keep the
dtype unless --dtype says otherwise, so a round trip is bitwise.

A run can also start from a transformers folder directly: load_ckpt_info=dict(path=HF_DIR,
content=("model",), ckpt_type="hf") (load_hf_into: each rank reads only its shards' slices).
"""

import argparse
import sys
from pathlib import Path

import torch

from pytrain.config import Config, ConfigError
from pytrain.parallel.fsdp import local_tensor
from pytrain.parallel.shard_spec import ShardSpec

from .catalog import find_latest
from .hf import (
    HFReader,
    check_folder_class,
    check_folder_positions,
    from_hf_state,
    hf_rules,
    read_stacked_rows,
    save_hf_folder,
)
from .reader import CheckpointReader
from .storage import CheckpointError, resolve_folder
from .writer import Checkpointer

MODEL = "model/"


def whole_model(cfg: Config):
    """The config's whole model on the meta device (shapes and names, no memory)."""
    from pytrain.registry import MODEL_INITIALIZER

    with torch.device("meta"):
        return MODEL_INITIALIZER.get_module(cfg.model_type)(**cfg.model)


def _shape_error(folder, problems: list[str]) -> CheckpointError:
    return CheckpointError(
        f"the Hugging Face weights in {folder} do not fit this model ({len(problems)} tensor(s)):\n  "
        + "\n  ".join(problems[:20])
        + "\ncheck the config's model section (hidden_size, num_layers, heads, vocab_size, ...) against config.json"
    )


def _check_folder(reader: HFReader, model) -> None:
    """A folder with a config.json of another class is refused, naming the model_type that reads it; one whose
    rotary embedding or sliding window differs from the model's, naming the fields that give the folder's."""
    if (reader.folder / "config.json").is_file():
        config = reader.config()
        check_folder_class(model, config)
        check_folder_positions(model, config)


@torch.no_grad()
def load_hf_into(part, model, folder) -> None:
    """Fills a ModelPart (this rank's shards) from a transformers folder. A parameter whose rule is a
    rename is read as its shard's rows or columns only; stacked experts as this rank's experts' tensors
    only; a converted one (fused qkv, reordered rotary rows) needs its whole HF tensors, read and cut here.
    model: the whole model (meta is enough)."""
    try:
        rules = {rule.name: rule for rule in hf_rules(model)}
    except ValueError as err:  # the config's model has no Hugging Face form
        raise ConfigError(f"ckpt.load_ckpt_info ckpt_type='hf': {err}") from None
    reader = HFReader(resolve_folder(str(folder)))
    _check_folder(reader, model)
    wanted = {h for p, info in part.infos() for h in rules[info.name].hf_names}
    missing = sorted(wanted - set(reader.weight_map))
    if missing:
        raise _shape_error(folder, [f"{name}: missing" for name in missing])
    problems = []
    for param, info in part.infos():
        rule, spec = rules[info.name], info.spec
        if rule.is_rename:
            (hf_name,) = rule.hf_names
            shape = reader.shape(hf_name)
            if shape != spec.full_shape:
                problems.append(
                    f"{hf_name}: {list(shape)} in the folder, this model's {info.name} is {list(spec.full_shape)}"
                )
                continue
            value = reader.get(hf_name) if spec.is_whole else reader.get_rows_or_columns(hf_name, spec.dim, spec.pieces)
            if spec.rows is not None:  # FSDP's block of the row-parallel columns
                value = value.narrow(0, *spec.rows)
        elif rule.stacked and spec.dim in (None, 0):
            shapes = {reader.shape(h) for h in rule.hf_names}
            if len(rule.hf_names) != spec.full_shape[0] or shapes != {tuple(spec.full_shape[1:])}:
                problems.append(
                    f"{rule.hf_names[0]} ... ({len(rule.hf_names)} tensors): {sorted(shapes)} in the folder, this "
                    f"model's {info.name} is {list(spec.full_shape)}"
                )
                continue
            value = read_stacked_rows(reader, rule, [(0, spec.full_shape[0])] if spec.dim is None else spec.pieces)
        else:
            full = rule.from_hf(*(reader.get(h) for h in rule.hf_names))
            if tuple(full.shape) != spec.full_shape:
                problems.append(
                    f"{', '.join(rule.hf_names)}: make {list(full.shape)}, this model's {info.name} is "
                    f"{list(spec.full_shape)}"
                )
                continue
            value = spec.cut(full)
        local_tensor(param).copy_(value)
    if problems:
        raise _shape_error(folder, problems)


def _checkpoint(path: str) -> CheckpointReader:
    folder = resolve_folder(path)
    if (folder / "manifest.json").is_file():
        return CheckpointReader(folder)
    reader = find_latest(folder) if folder.is_dir() else None
    if reader is None:
        raise CheckpointError(f"{path}: neither a pytrain checkpoint nor a save folder holding a complete one")
    return reader


def to_hf(cfg: Config, ckpt: str, out: str, dtype: str | None) -> Path:
    model = whole_model(cfg)
    reader = _checkpoint(ckpt)
    params = dict(model.named_parameters())  # a tied head is listed once, under the embedding's name
    wanted = {MODEL + name: ShardSpec.whole(p.shape) for name, p in params.items()}
    reader.check(wanted, strict_prefixes=(MODEL,))
    tensors = reader.read(wanted)
    state = {key.removeprefix(MODEL): t for key, t in tensors.items()}
    if model.tie_word_embeddings:
        state.setdefault(f"{model.names.head}.weight", state[f"{model.names.embedding}.weight"])
    saved_dtype = next(iter(tensors.values())).dtype
    return save_hf_folder(model, state, resolve_folder(out), getattr(torch, dtype) if dtype else saved_dtype)


def from_hf(cfg: Config, hf: str, out: str, dtype: str | None) -> Path:
    model = whole_model(cfg)
    reader = HFReader(resolve_folder(hf))
    _check_folder(reader, model)
    names = {h for rule in hf_rules(model) for h in rule.hf_names}
    state = from_hf_state(model, {name: reader.get(name) for name in names if name in reader.weight_map})
    params = dict(model.named_parameters())
    wrong = [
        f"{name}: {list(state[name].shape)} from the folder, the model's is {list(p.shape)}"
        for name, p in params.items()
        if tuple(state[name].shape) != tuple(p.shape)
    ]
    if wrong:
        raise _shape_error(hf, wrong)
    cast = getattr(torch, dtype) if dtype else None
    tensors = {
        MODEL + name: ((state[name] if cast is None else state[name].to(cast)).contiguous(), ShardSpec.whole(p.shape))
        for name, p in params.items()
    }
    saver = Checkpointer(out)
    try:
        return saver.save(0, tensors, global_state={"step": 0, "config": cfg.dump(), "source": str(hf)})
    finally:
        saver.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytrain.checkpoint.convert", description=__doc__.split("\n\n")[0])
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", choices=["hf"], help="write a pytrain checkpoint as a Hugging Face folder")
    way.add_argument(
        "--from", dest="source", choices=["hf"], help="write a Hugging Face folder as a pytrain checkpoint"
    )
    parser.add_argument("--config", required=True, help="the run's config file (its model section and model_type)")
    parser.add_argument("--ckpt", help="--to hf: a checkpoint folder, or a save folder (its newest checkpoint)")
    parser.add_argument("--hf", help="--from hf: the Hugging Face folder")
    parser.add_argument("--out", required=True, help="the folder to write")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast (default: keep)")
    args = parser.parse_args(argv)
    if args.to and not args.ckpt:
        parser.error("--to hf needs --ckpt (a pytrain checkpoint or save folder)")
    if args.source and not args.hf:
        parser.error("--from hf needs --hf (the Hugging Face folder)")
    try:
        cfg = Config.from_file(args.config)
        if args.to:
            path = to_hf(cfg, args.ckpt, args.out, args.dtype)
        else:
            path = from_hf(cfg, args.hf, args.out, args.dtype)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"pytrain.checkpoint.convert: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"pytrain.checkpoint.convert: wrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
