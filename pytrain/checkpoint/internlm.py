"""Model weights from a checkpoint folder written by InternLM / InternEvo, as the whole model's state dict.

Such a folder holds one `model_tp{t}_pp{p}.pt` per tensor rank t and pipeline stage p: that rank's
`state_dict()`, keys prefixed `model.` (the AMP wrapper), layer indices local to the stage. pytrain's
parameter names already are InternEvo's for each family (pytrain.model.families), but for what the
family's `InternEvoAdapter` (its spec's `internevo`, pytrain.specs) renames, so loading means:

- reading every file with torch.load(weights_only=True): tensors only, never arbitrary unpickling;
- shifting each stage's layer indices by the layers of the stages before it (InternEvo's
  `partition_uniform`: num_layers // P per stage, the last num_layers % P stages one more; the counts
  are read from each file's keys and checked against that rule);
- merging the tensor-parallel shards as the model's own tensor_parallel_plan() splits them, which is
  InternEvo's layout: column-parallel weights (wqkv/Wqkv, wq, wk, wv, w1, w3, head/output) and their
  biases along dim 0, where v1's fused Wqkv and Baichuan2's wqkv shard is [its q heads; its k heads; its v
  heads] (InternEvo's MHA reads it so; each part is merged on its own) and InternLM2's grouped wqkv shard
  is whole kv groups (a plain concatenation); row-parallel weights (wo/out_proj, w2) along dim 1, their
  bias taken from tensor rank 0, the only one that holds it; the embedding along hidden or along the
  vocabulary (as the shards' shape says: InternLM saved `embedding.word_embeddings.weight` [V/t, H]
  without embed_split_hidden);
  norms whole on every rank (rank 0's), Qwen3's per-head q_norm/k_norm (`<attention>.q_norm.weight`) too.

A tied model (tie_word_embeddings) refuses a folder whose head differs from its embedding: InternEvo's Gemma
class always saves an untied `output.weight`.

InternLM v1's w2/w3: the code of 2023-07 to 2024-01 computed w3(silu(w1 x) * w2 x); InternEvo since
2024-02 (and pytrain) computes w2(silu(w1 x) * w3 x): w1 gate, w3 up, w2 down. The weights are loaded
under their names with the current meaning; a checkpoint of the older code is not told apart (its
down projection w3 then has w2's shape and fails the shape check unless the MLP is square).

Mixtures of experts: InternEvo keeps the experts out of the model files and writes one
`model_moe_layer{L}_expert{e}_tp{t}.pt` per layer, global expert e and tensor rank t, holding
`<layers>.<i>.<mlp>.moe_layer.experts.wrapped_experts.<e>.w1|w2|w3.weight` (i local to the stage), with
L = pipeline rank x (num_layers // pipeline size) + i. Each expert's w1 and w3 are split over the tensor ranks
along dim 0 and its w2 along dim 1, like the dense MLP (or whole in `_tp0` only, with parallel.expert.no_tp);
they are merged and stacked into pytrain's `<mlp>.moe_layer.experts.w1|w3|w2` (E, ., .). The router and
the mixing coefficient sit whole in the model files, the residual/shared MLP split like the dense MLP.
With a pipeline size that does not divide num_layers InternEvo's L of two layers coincide; such a folder
is refused.

Not supported, refused by name: ISP (weight-parallel) files, FSDP (`_dp{d}`) files. A file that is a symlink
leading out of the folder is refused.
"""

import pickle
import re
from pathlib import Path

import torch

from pytrain.model.decoder import Colwise, Decoder, EmbeddingSplit, Names, Rowwise, VocabHead
from pytrain.parallel.shard_spec import ShardSpec
from pytrain.parallel.tensor import plan_pattern
from pytrain.registry import MODEL_INITIALIZER

from .storage import CheckpointError, inside, resolve_folder

MODEL_FILE = re.compile(r"^model_tp(\d+)_pp(\d+)\.pt$")
EXPERT_FILE = re.compile(r"^model_moe_layer(\d+)_expert(\d+)_tp(\d+)\.pt$")
EXPERT_WEIGHTS = {"w1": 0, "w3": 0, "w2": 1}  # each expert's tensor-parallel split dim (InternEvo's MLP)
UNSUPPORTED_FILES = (
    (
        re.compile(r"^model_(tp\d+_)?wp\d+_pp\d+\.pt$"),
        "ISP (parallel.tensor.mode='isp', weight-parallel) model files are not supported",
    ),
    (
        re.compile(r"^model_moe_layer\d+_expert\d+_wp\d+\.pt$"),
        "ISP (expert weight-parallel) MoE expert files are not supported",
    ),
    (re.compile(r"^model_tp\d+_pp\d+_dp\d+\.pt$"), "FSDP (per data-parallel rank) model files are not supported"),
)
AMP_PREFIX = "model."
LISTED = 12  # names shown per kind of problem


class InternEvoAdapter:
    """How a family's InternEvo model files name its parameters. The built-in families' keys are their
    model's names but for InternLM's vocab-parallel embedding; a family whose checkpoints name more
    otherwise overrides `model_name` (and its spec, pytrain.specs, names the subclass)."""

    def model_name(self, key: str, names: Names) -> str:
        """The model's name for a key of a model file (the AMP wrapper's prefix removed, layer indices global):
        `<embedding>.word_embeddings.weight` (saved split over the vocabulary) is the embedding's weight."""
        return f"{names.embedding}.weight" if key == f"{names.embedding}.word_embeddings.weight" else key


INTERNEVO = InternEvoAdapter()


def internevo_adapter(model: Decoder) -> InternEvoAdapter:
    """The adapter of the spec registered under the model's family; INTERNEVO where it names none."""
    family = model.family
    spec = MODEL_INITIALIZER.get_module(family) if family in MODEL_INITIALIZER else None
    return getattr(spec, "internevo", INTERNEVO)


def load_internlm_folder(folder: str | Path, model: Decoder) -> dict[str, torch.Tensor]:
    """The whole model's state dict, in `model`'s names and order, from an InternLM/InternEvo folder of
    `model_tp{t}_pp{p}.pt` files (see the module doc). `model` is the whole model built from the same
    config (the meta device will do): its family's names, tensor_parallel_plan() and state_dict() shapes
    say how the shards merge and what must come out. Tensors keep the checkpoint's dtype.

    Raises CheckpointError naming the file or the parameters: an unsupported or incomplete set of files,
    a file that is not a dict of tensors, a layer count other than the config's, or any missing,
    unexpected or misshapen parameter."""
    if not (model.first and model.last):
        raise CheckpointError("load_internlm_folder needs the whole model (with embedding and head), not a stage")
    files = _model_files(resolve_folder(str(folder)))
    tp_size = 1 + max(t for t, _ in files)
    pp_size = 1 + max(p for _, p in files)
    full_shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    merger = _ShardMerger(model, full_shapes, tp_size, internevo_adapter(model))
    layer_counts, merged = [], {}
    for stage in range(pp_size):
        paths = [files[(rank, stage)] for rank in range(tp_size)]
        shards = [_read_state(path) for path in paths]  # this stage's only: one stage in memory at a time
        local_layers, shards = _globalize_layers(shards, paths, model.names.layers, offset=sum(layer_counts))
        layer_counts.append(local_layers)
        for name, tensor in merger.merge(shards, paths).items():
            if name in merged and not torch.equal(merged[name], tensor):
                merger.problems.append(f"{name} differs between pipeline stages ({paths[0].name} and an earlier one)")
            merged.setdefault(name, tensor)
    root = files[(0, 0)].parent
    _check_layer_split(layer_counts, model.num_layers, root)
    merged.update(_merge_experts(root, model, full_shapes, layer_counts, tp_size, merger.problems))
    problems = merger.problems
    if model.tie_word_embeddings:
        _check_tied_head(merged, model.names, problems)
    missing = [name for name in full_shapes if name not in merged]
    unexpected = sorted(name for name in merged if name not in full_shapes)
    if missing:
        problems.append(f"missing from the checkpoint: {_listing(missing)}")
    if unexpected:
        problems.append(f"in the checkpoint but not in this {model.family} model: {_listing(unexpected)}")
    if problems:
        raise CheckpointError(
            f"the InternLM checkpoint {root} does not fit this {model.family} model "
            f"(model_type and model fields of the config):\n  " + "\n  ".join(problems)
        )
    return {name: merged[name] for name in full_shapes}


def _check_tied_head(merged: dict[str, torch.Tensor], names: Names, problems: list[str]) -> None:
    """A tied model holds one matrix under both names, so a checkpoint whose head differs from its embedding
    (trained untied, as InternEvo's GEMMA always is: its Gemma class saves its own `output.weight`) would lose
    one of them when loaded."""
    embedding, head = merged.get(f"{names.embedding}.weight"), merged.get(f"{names.head}.weight")
    if embedding is not None and head is not None and not torch.equal(embedding, head):
        problems.append(
            f"{names.head}.weight differs from {names.embedding}.weight: the checkpoint's LM head is untied "
            f"(InternEvo's GEMMA saves one), this model ties it; set model.tie_word_embeddings=False"
        )


def _model_files(folder: Path) -> dict[tuple[int, int], Path]:
    """{(tp rank, pp stage): path}, every one of the grid present."""
    if not folder.is_dir():
        raise CheckpointError(f"InternLM checkpoint folder {folder} does not exist or is not a folder")
    names = sorted(p.name for p in folder.iterdir())
    for pattern, why in UNSUPPORTED_FILES:
        found = [name for name in names if pattern.match(name)]
        if found:
            raise CheckpointError(
                f"{folder}: {why} ({_listing(found)}). Load a checkpoint saved with plain tensor/pipeline "
                f"parallelism (model_tp{{t}}_pp{{p}}.pt), or a Hugging Face folder exported by InternEvo "
                f"(ckpt_type='hf')"
            )
    files = {}
    for name in names:
        match = MODEL_FILE.match(name)
        if match:
            files[(int(match[1]), int(match[2]))] = folder / name
    if not files:
        raise CheckpointError(
            f"{folder} holds no InternLM model files (model_tp{{t}}_pp{{p}}.pt): point load_ckpt_info.path at "
            f"one saved step's folder (save_ckpt_folder/<step>)"
        )
    tp_size, pp_size = 1 + max(t for t, _ in files), 1 + max(p for _, p in files)
    absent = [f"model_tp{t}_pp{p}.pt" for p in range(pp_size) for t in range(tp_size) if (t, p) not in files]
    if absent:
        raise CheckpointError(
            f"{folder} is incomplete for its layout of {tp_size} tensor x {pp_size} pipeline ranks: "
            f"{_listing(absent)} missing (a save that did not finish, or files copied partly)"
        )
    return files


def _merge_experts(
    folder: Path, model: Decoder, full_shapes: dict, layer_counts: list[int], tp_size: int, problems: list[str]
) -> dict[str, torch.Tensor]:
    """The stacked expert weights of every MoE layer from the folder's expert files (module docstring)."""
    files = {}
    for path in folder.iterdir():
        match = EXPERT_FILE.match(path.name)
        if match:
            files[tuple(int(g) for g in match.groups())] = path  # (L, expert, tensor rank)
    n = model.names
    if not any(".moe_layer.experts." in name for name in full_shapes):
        if files:
            problems.append(
                f"MoE expert files ({_listing(sorted(p.name for p in files.values()))}) but this model "
                f"has no experts: set model.num_experts as the run that saved them"
            )
        return {}
    merged = {}
    for layer, (file_layer, local) in enumerate(_expert_file_layers(model.num_layers, layer_counts, problems)):
        prefix = f"{n.layers}.{layer}.{n.mlp}.moe_layer.experts"
        if f"{prefix}.w1" not in full_shapes:  # a dense layer
            continue
        shapes = {w: full_shapes[f"{prefix}.{w}"][1:] for w in EXPERT_WEIGHTS}
        experts = [
            _read_expert(
                [files.get((file_layer, expert, t)) for t in range(tp_size)],
                f"model_moe_layer{file_layer}_expert{expert}_tp0.pt",
                f"{n.layers}.{local}.{n.mlp}.moe_layer.experts.wrapped_experts.{expert}",
                shapes,
                problems,
            )
            for expert in range(full_shapes[f"{prefix}.w1"][0])
        ]
        if all(e is not None for e in experts):
            merged.update({f"{prefix}.{w}": torch.stack([e[w] for e in experts]) for w in EXPERT_WEIGHTS})
    return merged


def _expert_file_layers(num_layers: int, layer_counts: list[int], problems: list[str]) -> list[tuple[int, int]]:
    """Per global layer: (InternEvo's L in its expert files' names, its stage-local index); [] when two
    layers share an L."""
    base = num_layers // len(layer_counts)
    pairs = [(stage * base + i, i) for stage, count in enumerate(layer_counts) for i in range(count)]
    if len({file_layer for file_layer, _ in pairs}) < len(pairs):
        problems.append(
            f"InternEvo numbers expert files by pipeline rank x (num_layers // pipeline size) + layer, so with "
            f"{num_layers} layers over {len(layer_counts)} stages ({' + '.join(map(str, layer_counts))}) two "
            f"layers' expert files share a name: this folder cannot be read unambiguously"
        )
        return []
    return pairs


def _read_expert(
    paths: list, first: str, key: str, shapes: dict, problems: list[str]
) -> dict[str, torch.Tensor] | None:
    """One expert's whole w1, w3, w2 from its tensor ranks' files (`paths`, None where absent; `first` the name
    of tensor rank 0's), under `key`; None (with the problems noted) when they do not make the expert."""
    if paths[0] is None:
        problems.append(f"expert file {first} is missing")
        return None
    present = [path for path in paths if path is not None]
    if len(present) not in (1, len(paths)):
        problems.append(f"{present[0].name}: {len(present)} of {len(paths)} tensor ranks' files of {key}")
        return None
    states = [_read_state(path) for path in present]
    expected = {f"{key}.{w}.weight" for w in EXPERT_WEIGHTS}
    for state, path in zip(states, present, strict=True):
        if set(state) != expected:
            problems.append(f"{path.name}: holds {_listing(sorted(state))}, expected {key}.w1|w2|w3.weight")
            return None
    expert = {}
    for weight, dim in EXPERT_WEIGHTS.items():
        parts = [state[f"{key}.{weight}.weight"] for state in states]
        whole = len(parts) == 1 or tuple(parts[0].shape) == shapes[weight]  # parallel.expert.no_tp: rank 0's
        same = all(part.shape == parts[0].shape for part in parts)
        tensor = parts[0] if whole or not same else torch.cat(parts, dim)
        if tuple(tensor.shape) != shapes[weight]:
            problems.append(
                f"{present[0].name}: {key}.{weight}.weight has shape {tuple(parts[0].shape)}, the model's expert "
                f"{shapes[weight]} (or a 1/{len(paths)} shard of it along dim {dim})"
            )
            return None
        expert[weight] = tensor
    return expert


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """One rank's tensors, the AMP wrapper's `model.` prefix removed. The file must lie inside its folder (a
    symlink leading out of it is refused)."""
    inside(path.parent, path.name, f"InternLM checkpoint {path.parent}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(
            f"{path} cannot be read as tensors only (torch.load weights_only=True; pytrain never unpickles "
            f"arbitrary objects): {err}"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a model state dict (name -> tensor)")
    bad = [f"{key!r} ({type(value).__name__})" for key, value in state.items() if not isinstance(value, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path} is not a model state dict: non-tensor values under {_listing(bad)}")
    return {key.removeprefix(AMP_PREFIX): value for key, value in state.items()}


def _globalize_layers(shards: list[dict], paths: list[Path], layers: str, offset: int) -> tuple[int, list[dict]]:
    """(this stage's layer count, its shards with layer indices shifted by `offset`)."""
    layer_key = re.compile(rf"^{re.escape(layers)}\.(\d+)\.(.+)$")
    counts, shifted = [], []
    for state, path in zip(shards, paths, strict=True):
        indices, renamed = set(), {}
        for key, value in state.items():
            match = layer_key.match(key)
            if match:
                indices.add(int(match[1]))
                key = f"{layers}.{int(match[1]) + offset}.{match[2]}"
            renamed[key] = value
        if indices != set(range(len(indices))):
            raise CheckpointError(
                f"{path}: the layer indices {sorted(indices)} are not 0..n-1 (InternEvo numbers a stage's layers "
                f"from 0); this is not a model file of a plain pipeline layout"
            )
        counts.append(len(indices))
        shifted.append(renamed)
    if len(set(counts)) > 1:
        raise CheckpointError(
            "the tensor ranks of one pipeline stage hold different layer counts: "
            + ", ".join(f"{p.name} {n}" for p, n in zip(paths, counts, strict=True))
        )
    return counts[0], shifted


def partition_uniform(num_layers: int, num_stages: int) -> list[int]:
    """Layers per pipeline stage as InternEvo splits them: num_layers // num_stages each, the last
    num_layers % num_stages stages one more."""
    base, extra = divmod(num_layers, num_stages)
    return [base + (stage >= num_stages - extra) for stage in range(num_stages)]


def _check_layer_split(counts: list[int], num_layers: int, folder: Path) -> None:
    total = sum(counts)
    split = " + ".join(map(str, counts))
    if total != num_layers:
        raise CheckpointError(
            f"the checkpoint has {total} layers ({split} over {len(counts)} pipeline stages), the config "
            f"{num_layers}: set model.num_layers = {total} or load a checkpoint of this model ({folder})"
        )
    expected = partition_uniform(total, len(counts))
    if counts != expected:
        raise CheckpointError(
            f"{folder}: the stages hold {split} layers, but InternEvo's partition_uniform splits {total} layers "
            f"over {len(counts)} stages as {' + '.join(map(str, expected))}; with another split (num_chunks > 1, "
            f"or files from another trainer) the layers' global order is not known"
        )


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:LISTED])
    return shown if len(names) <= LISTED else f"{shown} and {len(names) - LISTED} more"


class _ShardMerger:
    """Merges the tensor ranks' pieces of each parameter of one stage into the whole parameter."""

    def __init__(
        self, model: Decoder, full_shapes: dict[str, tuple[int, ...]], tp_size: int, adapter: InternEvoAdapter
    ):
        plan = model.tensor_parallel_plan()
        n = model.names
        for layer in model.decoder_layers.values():  # InternEvo splits an MoE block's residual MLP as a dense one
            residual = getattr(layer.get_submodule(n.mlp), "residual_mlp", None)
            if residual is not None:
                plan.update({f"{n.layers}.*.{n.mlp}.residual_mlp.{k}": how for k, how in residual.plan().items()})
        self.plan = [(plan_pattern(key), how) for key, how in plan.items()]
        self.full_shapes, self.tp_size = full_shapes, tp_size
        self.names, self.adapter = model.names, adapter
        self.problems: list[str] = []

    def merge(self, shards: list[dict], paths: list[Path]) -> dict[str, torch.Tensor]:
        shards = [{self.adapter.model_name(k, self.names): v for k, v in s.items()} for s in shards]
        names = list(dict.fromkeys(name for state in shards for name in state))
        return {name: self._merge_one(name, [s.get(name) for s in shards], paths) for name in names}

    def _merge_one(self, name: str, pieces: list, paths: list[Path]) -> torch.Tensor:
        full_shape = self.full_shapes.get(name)
        if pieces[0] is None:
            holders = ", ".join(path.name for path, piece in zip(paths, pieces, strict=True) if piece is not None)
            self.problems.append(f"{name}: not in {paths[0].name} (tensor rank 0), only in {holders}")
            return next(t for t in pieces if t is not None)
        if full_shape is None:  # not this model's: reported as unexpected
            return pieces[0]
        dim, segments = self._split(name, full_shape, tuple(pieces[0].shape))
        if dim is None:  # whole on rank 0 (norms, a row-parallel bias, everything when there is one rank)
            if tuple(pieces[0].shape) != full_shape:
                self.problems.append(
                    f"{name}: shape {tuple(pieces[0].shape)} in {paths[0].name}, the model's {full_shape}"
                )
            return pieces[0]
        full = torch.empty(full_shape, dtype=pieces[0].dtype)
        for rank, (piece, path) in enumerate(zip(pieces, paths, strict=True)):
            if piece is None:
                self.problems.append(f"{name}: missing from {path.name} (tensor rank {rank} of {self.tp_size})")
                continue
            try:
                spec = ShardSpec.split(full_shape, dim, rank, self.tp_size, segments)
            except ValueError as err:
                self.problems.append(f"{name}: the model's {full_shape} cannot be {self.tp_size} shards: {err}")
                return pieces[0]
            if tuple(piece.shape) != spec.local_shape or piece.dtype != full.dtype:
                self.problems.append(
                    f"{name}: {tuple(piece.shape)} {piece.dtype} in {path.name}, expected a 1/{self.tp_size} shard "
                    f"{spec.local_shape} {full.dtype} of the model's {full_shape}"
                )
                continue
            spec.place(piece, full)
        return full

    def _split(self, name: str, full_shape: tuple, rank0_shape: tuple) -> tuple[int | None, tuple | None]:
        """(the dim InternEvo split this parameter along, the parts split each on its own); dim None: whole."""
        if self.tp_size == 1:
            return None, None
        module, leaf = name.rsplit(".", 1)
        how = next((how for pattern, how in self.plan if pattern.match(module)), None)
        if isinstance(how, Rowwise):
            return (1, None) if leaf == "weight" else (None, None)
        if isinstance(how, EmbeddingSplit):  # saved split either way, whatever this config's embed_split_hidden
            vocab, hidden = full_shape
            if rank0_shape == (vocab // self.tp_size, hidden) and vocab % self.tp_size == 0:
                return 0, None
            return 1, None
        if isinstance(how, Colwise):
            return 0, how.segments
        if isinstance(how, VocabHead):
            return 0, None
        return None, None  # Replicated or not in the plan
