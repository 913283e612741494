"""This rank's part of a model under a parallel layout, and what every one of its parameters is.

`parallelize(model, ...)` takes the whole plain model (built on the meta device: shapes, no memory) and
returns a ModelPart: the pipeline stage(s) this rank runs, cut out of the whole model (a stage keeps its
layers under their global index, the embedding on the first stage, the norm and head on the last),
tensor-parallel per the model's plan, materialized on the run's device in the run's dtype holding only
this rank's shards, and initialised as the single-process model would be.

Per-parameter facts the optimizer and checkpoints need travel in one explicit map, `ModelPart.infos()`:
the parameter's full-model name, where its shard sits in the full parameter (ShardSpec), and which
group its gradient must be summed over when this rank holds only part of it.
"""

import copy
import dataclasses
import enum
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from pytrain.kernels import RMSNorm

from .expert import apply_expert_parallel
from .fsdp import FSDPSettings, apply_fsdp, local_tensor
from .mesh import ParallelMesh
from .recompute import SelectiveCheckpoint, apply_selective_checkpoint
from .sequence import SequenceSplit, apply_sequence_parallel
from .shard_spec import ShardSpec
from .tensor import apply_tensor_parallel, plan_pattern


class SumOver(enum.Enum):
    """The group over which the gradient of a parameter this rank holds only part of is summed."""

    TENSOR = "tensor"  # a sequence-parallel norm: each tensor rank saw part of the sequence
    EMBEDDING = "embedding"  # a tied embedding: one copy on the first pipeline stage, one on the last


class Replicas(enum.Enum):
    """The group holding copies of a parameter's shard: its gradient is averaged, its optimizer state
    sharded over it."""

    DATA = "data"
    EXPERT_DATA = "expert_data"  # expert weights: the ranks holding the same experts


@dataclass(frozen=True)
class ParamInfo:
    name: str  # in the whole model; the last stage's copy of a tied embedding carries the embedding's name
    spec: ShardSpec  # where this rank's tensor sits in the full parameter
    sum_over: SumOver | None = None  # None: this rank holds the whole gradient of its shard
    duplicate: bool = False  # a copy whose twin elsewhere is the one counted (the last stage's tied embedding)
    replicas: Replicas = Replicas.DATA
    tensor_spec: ShardSpec | None = None  # under FSDP: the shard before FSDP's cut of it (spec is after)
    split_over_tensor: bool = True  # False under isp: every tensor rank holds the same shard (of the sequence's)

    def counted_here(self, tensor_rank: int) -> bool:
        """Whether this rank counts the parameter in a model-wide sum over the tensor x pipeline ranks
        (parameter count, gradient norm): shards everywhere, a parameter whole on each tensor rank (or, under
        isp, any) on tensor rank 0 only."""
        split = self.split_over_tensor and not (self.tensor_spec or self.spec).is_whole
        return not self.duplicate and (tensor_rank == 0 or split)


class ModelPart(nn.Module):
    """The stages one rank runs (one, or num_chunks for the interleaved schedule) and their ParamInfo.
    Called directly, it runs its only stage: model(input_ids, ...) -> logits without a pipeline."""

    def __init__(self, stages: list[nn.Module], infos: dict[str, ParamInfo] | None = None):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        if infos is None:  # a model run whole: every parameter complete, named as in the model
            infos = {name: ParamInfo(_full_name(name), ShardSpec.whole(p.shape)) for name, p in self.named_parameters()}
        missing = {name for name, _ in self.named_parameters()} ^ set(infos)
        if missing:
            raise ValueError(f"ParamInfo does not match the parameters: {sorted(missing)}")
        self._infos = infos

    def forward(self, *args, **kwargs):
        if len(self.stages) != 1:
            raise RuntimeError(f"this model part holds {len(self.stages)} pipeline chunks: run it with a schedule")
        return self.stages[0](*args, **kwargs)

    def infos(self) -> list[tuple[nn.Parameter, ParamInfo]]:
        """(parameter, what it is) for every parameter this rank holds, tied ones once. Under FSDP the
        parameter is a DTensor; its values here are local_tensor(parameter), which info.spec describes."""
        return [(param, self._infos[name]) for name, param in self.named_parameters()]

    def full_state_names(self) -> dict[str, torch.Tensor]:
        """{full-model name: this rank's tensor of the parameter (its FSDP shard under FSDP)}."""
        return {info.name: local_tensor(param) for param, info in self.infos()}

    def local_state(self, full_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{full name: this rank's shard} cut out of the whole model's {full name: tensor}."""
        return {info.name: info.spec.cut(full_state[info.name]) for _, info in self.infos()}

    @torch.no_grad()
    def load_full_state(self, full_state: dict[str, torch.Tensor]) -> None:
        """Loads this rank's shards of a whole model's {full name: tensor} (e.g. a single-process model's)."""
        for param, info in self.infos():
            local_tensor(param).copy_(info.spec.cut(full_state[info.name]))


def _full_name(name: str) -> str:
    """'stages.0.layers.3.attention.wo.weight' -> 'layers.3.attention.wo.weight'."""
    return name.split(".", 2)[2]


def partition_layers(num_layers: int, parts: int) -> list[range]:
    """Consecutive layer ranges, sizes differing by at most one (the earlier parts get the extra layers:
    the last holds the head as well)."""
    base, extra = divmod(num_layers, parts)
    bounds = [0]
    for part in range(parts):
        bounds.append(bounds[-1] + base + (part < extra))
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


def cut_stage(model: nn.Module, layers: range) -> nn.Module:
    """The pipeline stage holding `layers` (global indices): a copy of the whole (meta) model without the
    other layers, with the embedding only if it holds layer 0 and the norm and head only if it holds the
    last layer. Names are unchanged."""
    stage = copy.deepcopy(model)
    names = stage.names
    kept = {str(i) for i in layers}
    for key in [k for k in stage.decoder_layers if k not in kept]:
        del stage.decoder_layers[key]
    if layers.start != 0:
        del stage._modules[names.embedding]
    if layers.stop != model.num_layers:
        del stage._modules[names.norm], stage._modules[names.head]
    stage.recompute_layers = int(len(layers) * stage.checkpoint_fraction)  # InternLM's rule, per stage
    return stage


def parallelize(
    model: nn.Module,
    mesh: ParallelMesh | None = None,
    *,
    device: torch.device,
    sequence_parallel: bool = False,
    num_chunks: int = 1,
    fp32_norms: bool = False,
    seed: int = 1024,
    selective: SelectiveCheckpoint | None = None,
    fsdp: FSDPSettings | None = None,
) -> ModelPart:
    """This rank's ModelPart of a whole plain model built on the meta device (see the module docstring), under
    the run's layout `mesh` (its pipeline stage, tensor group and expert group; None: one process). Chunk c of
    pipeline rank r is stage c * pipeline_size + r of pipeline_size * num_chunks. selective: each stage's
    selective activation checkpointing (pytrain.parallel.recompute); None: none. fsdp: shard the parameters over
    the mesh's fsdp mesh (its zero1 runs, or isp's weight runs) with torch's fully_shard (pytrain.parallel.fsdp);
    None: ZeRO-1 or plain replicas. Under isp (the mesh's dims.isp) the tensor group splits the sequence
    (pytrain.parallel.sequence) instead of the weights."""
    pipeline_rank, pipeline_size = (mesh.pipeline_rank, mesh.dims.pipeline) if mesh else (0, 1)
    tensor_group = mesh.tensor_group if mesh and mesh.dims.tensor > 1 else None
    expert_group = mesh.expert_group if mesh else None
    parts = partition_layers(model.num_layers, pipeline_size * num_chunks)
    stages, facts, experts = [], {}, set()
    for chunk in range(num_chunks):
        stage = cut_stage(model, parts[chunk * pipeline_size + pipeline_rank])
        if mesh is not None and mesh.dims.isp:
            stage_facts, expert_names = _split_sequence(stage, mesh, tensor_group, expert_group)
        else:
            tp_facts = apply_tensor_parallel(stage, tensor_group, sequence_parallel) if tensor_group else {}
            ep_facts, expert_names = apply_expert_parallel(stage, tensor_group, expert_group, sequence_parallel)
            stage_facts = tp_facts | ep_facts
        facts.update({f"stages.{chunk}.{name}": fact for name, fact in stage_facts.items()})
        experts.update(f"stages.{chunk}.{name}" for name in expert_names)
        _materialize(stage, device, model.dtype, fp32_norms)
        if selective is not None:
            apply_selective_checkpoint(stage, selective, device)
        stages.append(stage)
    part = ModelPart(stages, _describe(stages, facts, experts, model, split_over_tensor=not (mesh and mesh.dims.isp)))
    _initialize(part, model, seed)
    if fsdp is not None:
        apply_fsdp(stages, mesh, model.dtype, fp32_norms, fsdp)
        part = ModelPart(stages, _narrow_to_fsdp_shards(part._infos, mesh))
    return part


def _split_sequence(stage: nn.Module, mesh: ParallelMesh, tensor_group, expert_group) -> tuple[dict, set]:
    """isp: the experts split over the expert group only, then the sequence over the tensor group; every
    gradient is partial over the tensor group (each rank saw its slice of the sequence)."""
    ep_facts, expert_names = apply_expert_parallel(stage, None, expert_group, False)
    if tensor_group is None:
        return ep_facts, expert_names
    sp_facts = apply_sequence_parallel(stage, SequenceSplit.of_mesh(mesh), mesh.dims.ring_window)
    return {name: (ep_facts.get(name, fact)[0], True) for name, fact in sp_facts.items()}, expert_names


def _narrow_to_fsdp_shards(infos: dict[str, ParamInfo], mesh: ParallelMesh) -> dict[str, ParamInfo]:
    """Each spec narrowed to the rows of this rank's FSDP shard (torch.chunk along dim 0 over the shard axis:
    the expert weights' own, the zero1 runs (or isp's weight runs) for the rest). Weight parallelism's reduction
    covers the tensor ranks: no gradient stays partial there."""
    out = {}
    for key, info in infos.items():
        axis = mesh.expert_fsdp if info.replicas is Replicas.EXPERT_DATA else mesh.fsdp
        spec = info.spec.chunk_rows(axis.get_local_rank(axis.ndim - 1), axis.size(axis.ndim - 1))
        sum_over = None if mesh.dims.weight > 1 and info.sum_over is SumOver.TENSOR else info.sum_over
        out[key] = dataclasses.replace(info, spec=spec, tensor_spec=info.spec, sum_over=sum_over)
    return out


def _describe(stages, facts: dict, experts: set, model, split_over_tensor: bool) -> dict[str, ParamInfo]:
    part = nn.ModuleList(stages)
    embedding_name = f"{model.names.embedding}.weight"
    head_name = f"{model.names.head}.weight"
    infos = {}
    for name, param in part.named_parameters():
        key = f"stages.{name}"
        spec, partial = facts.get(key, (ShardSpec.whole(param.shape), False))
        full = _full_name(key)
        stage = stages[int(name.split(".", 1)[0])]
        if model.tie_word_embeddings and not (stage.first and stage.last) and full in (embedding_name, head_name):
            infos[key] = ParamInfo(embedding_name, spec, SumOver.EMBEDDING, duplicate=full == head_name)
        else:
            sum_over = SumOver.TENSOR if partial else None
            replicas = Replicas.EXPERT_DATA if key in experts else Replicas.DATA
            infos[key] = ParamInfo(full, spec, sum_over, replicas=replicas, split_over_tensor=split_over_tensor)
    return infos


def _materialize(stage: nn.Module, device: torch.device, dtype: torch.dtype, fp32_norms: bool) -> None:
    """Replaces every meta parameter with an uninitialised one of its local shape on `device` (fp32 norms
    with fp32_norms), keeping tied parameters tied."""
    made = {}
    for module in stage.modules():
        wanted = torch.float32 if fp32_norms and isinstance(module, (RMSNorm, nn.LayerNorm)) else dtype
        for key, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                made[id(param)] = nn.Parameter(
                    torch.empty(param.shape, dtype=wanted, device=device), requires_grad=param.requires_grad
                )
            module._parameters[key] = made[id(param)]


ROWS_PER_DRAW = 1 << 22  # elements drawn per generator seed: bounds the memory of initialising a shard


@torch.no_grad()
def _initialize(part: ModelPart, model: nn.Module, seed: int, std: float = 0.02) -> None:
    """Weights (2-D) Normal(0, std), those writing into the residual stream scaled by 1/sqrt(2 * layers)
    (GPT-2); norm weights 1 (0 where the norm scales by 1 + weight); biases 0. Each weight is drawn from
    generators seeded by `seed` and its full name, in blocks of rows, and only the rows of this rank's shard
    are drawn: every layout and stage starts from the same model without ever holding a full weight it does
    not keep."""
    residual = [plan_pattern(key) for key in model.residual_outputs()]
    norms = (RMSNorm, nn.LayerNorm)
    norm_weights = {
        _strip_layer(f"{name}.weight"): 0.0 if getattr(m, "unit_offset", False) else 1.0
        for name, m in model.named_modules()
        if isinstance(m, norms)
    }
    for param, info in part.infos():
        if param.dim() < 2:
            param.fill_(norm_weights.get(_strip_layer(info.name), 0.0))
            continue
        scale = (2 * model.num_layers) ** -0.5 if any(p.match(info.name) for p in residual) else 1.0
        _draw_shard(param, info, std * scale, seed)


def _draw_shard(param: torch.Tensor, info: ParamInfo, std: float, seed: int) -> None:
    full_shape, spec = info.spec.full_shape, info.spec
    row_numel = max(1, int(torch.Size(full_shape[1:]).numel()))
    block = max(1, ROWS_PER_DRAW // row_numel)
    name_seed = seed * 1_000_003 + zlib.crc32(info.name.encode())
    rows = [(0, full_shape[0])] if spec.dim != 0 else list(spec.pieces)  # full rows this rank keeps
    local_row = 0
    for start, length in rows:
        for first in range(start - start % block, start + length, block):  # the blocks these rows fall in
            generator = torch.Generator("cpu").manual_seed(name_seed + first // block)
            drawn = torch.empty((min(block, full_shape[0] - first), *full_shape[1:]), device="cpu")
            drawn.normal_(0.0, std, generator=generator)
            lo, hi = max(first, start), min(first + block, start + length)
            values = drawn[lo - first : hi - first]
            if spec.dim is not None and spec.dim != 0:
                values = torch.cat([values.narrow(spec.dim, s, n) for s, n in spec.pieces], dim=spec.dim)
            param[local_row : local_row + hi - lo].copy_(values)
            local_row += hi - lo


def _strip_layer(name: str) -> str:
    """'layers.3.ffn_norm.weight' -> 'layers.*.ffn_norm.weight' (norms are alike in every layer)."""
    parts = name.split(".")
    return ".".join("*" if p.isdigit() else p for p in parts)
