"""HybridZeroOptimizer: data-parallel AdamW with ZeRO-1 sharding, fp32 master weights, gradient clipping,
inf/NaN step skipping and fp16 loss scaling.

A step: the model's gradients accumulate in one flat fp32 buffer as the backward makes them (a hook on each
parameter adds its new .grad to its slice and frees it, so no parameter keeps a .grad of its own; with a 16-bit
model, micro-batches also sum in fp32), are averaged over the data-parallel group in buckets of
reduce_bucket_size elements (during the backward with overlap_sync_grad) and unscaled; the global gradient
norm is taken after the reduce, so every rank agrees on it, and a step whose norm is inf or NaN is skipped on
every rank.
Otherwise the gradients are clipped and each rank runs AdamW on the parameters it owns only: within a
zero1 group, parameters are assigned largest first to the least-loaded rank (InternLM's rule), and only
the owner keeps their fp32 master copy and Adam state. The owners then broadcast the updated parameters
to the rest of their zero1 group. zero1 size 1 means every rank owns everything (plain data parallel).
For an fp32 model the master weights are the model's parameters themselves (no copy).

The update is pytrain.kernels.adamw_step_ (torch.optim.AdamW's arithmetic): one pass over the owned
elements that applies the clipping factor to the gradient as it reads it, updates the master and both
moments, and writes a 16-bit model's parameter from its updated master (no clip pass, no cast pass).
The masters (where separate from the model's parameters) and each moment are one flat fp32 buffer,
a view per owned parameter.

Under tensor and pipeline parallelism each rank holds part of the model: the gradient norm sums the squares
of every shard once (weights replicated over the tensor group, e.g. norms, count on its first rank only;
the second copy of a tied embedding not at all) over the model-parallel group. Gradients a rank holds only
part of are summed first: a tied embedding's over the first and last pipeline stage, sequence-parallel
norms' over the tensor group. With overlap_sync_param the owners' broadcasts run in the background and
each layer waits for its own parameters just before its next forward.

Mixture-of-experts' expert weights (ParamInfo.replicas EXPERT_DATA) form a second domain: their
gradients are summed over the expert-data group (the ranks holding the same experts; each expert already
saw the tokens of its whole expert group; the data group without expert parallelism), their ZeRO-1 owners
are chosen within the expert zero group (parallel.expert_zero1), and under expert parallelism their share
of the gradient norm is summed over the expert group, whose ranks hold different experts. The divisor
stays the data-parallel size: every rank's loss is weighted for the whole data group.

Under FSDP (pytrain.parallel.fsdp) torch's fully_shard has already done the ZeRO part: each parameter is an
fp32 DTensor whose local shard is this rank's master, its gradient arrives reduce-scattered (summed) over the
zero1 group, and nothing is broadcast after the update. What stays here is the same as ZeRO-1's: the
division by the data-parallel size and the loss scale, the partial sums, the global norm (each shard's
squares, summed over the shard groups as well), clipping, inf/NaN skipping and AdamW over the local shards.
isp's weight parallelism is the same with the shards over runs of (data, tensor) ranks (pytrain.parallel.mesh):
its reduction sums over the tensor ranks too, so no gradient is partial there, and every run's shards are
counted in the norm once per pipeline stage (the mesh's gradient_tensor_group and norm_group).
"""

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor

from pytrain.kernels import adamw_step_
from pytrain.parallel import ParallelMesh
from pytrain.parallel.fsdp import local_tensor
from pytrain.parallel.model_part import ModelPart, Replicas, SumOver
from pytrain.parallel.shard_spec import ShardSpec

from .grad_buckets import OverlappedGradReducer
from .grad_scaler import DynamicGradScaler


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms and biases (1-D parameters) are not decayed."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def assign_owners(sizes: list[int], ranks: int) -> list[int]:
    """Owner rank of each parameter: largest first, each to the rank with the fewest elements so far."""
    load = [0] * ranks
    owners = [0] * len(sizes)
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        owner = min(range(ranks), key=lambda r: load[r])
        owners[index] = owner
        load[owner] += sizes[index]
    return owners


def _world(group) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


# the groups of a run without a mesh: every collective on the default group, nothing sharded or split
_UNSPLIT = SimpleNamespace(
    data_group=None,
    zero1_group=None,
    gradient_tensor_group=None,
    norm_group=None,
    embedding_group=None,
    expert_group=None,
    expert_data_group=None,
    expert_zero1_group=None,
)


@dataclass
class _Domain:
    """Parameters whose gradients are reduced over one group and whose ZeRO-1 owners are one zero group's
    ranks: the dense weights (data group), or the expert weights (expert-data group)."""

    params: list[nn.Parameter]
    reduce_group: object
    zero_group: object


@dataclass
class _GradSlice:
    """A domain's contiguous slice of the flat gradient buffer and how it is reduced."""

    params: list[nn.Parameter]
    flat: torch.Tensor
    group: object  # reduced over (summed, then divided by the data-parallel size)
    reducer: OverlappedGradReducer | None  # reduces during the backward (overlap_sync_grad)


class HybridZeroOptimizer:
    def __init__(
        self,
        model: nn.Module,
        lr: float,
        betas=(0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        clip_grad_norm: float = 0.0,
        grad_scaler: DynamicGradScaler | None = None,
        mesh: ParallelMesh | None = None,
        reduce_bucket_size: int = 512 * 1024 * 1024,
        overlap_sync_grad: bool = False,
        overlap_sync_param: bool = False,
    ):
        """mesh: the run's layout (pytrain.parallel.ParallelMesh); gradients are averaged over its data group and
        the optimizer state sharded over its zero1 group; its tensor, model (tensor x pipeline) and embedding
        (first + last stage) groups take the norm and the partial gradients; its expert groups the expert
        weights' (module docstring). None: one process, or every rank of the default group, unsharded.
        overlap_sync_grad: reduce gradient buckets during the last micro-batch's backward (see
        grad_buckets.py) instead of after it; only with more than one data-parallel rank.
        overlap_sync_param: the updated parameters' broadcast overlaps the next forward."""
        layout = mesh or _UNSPLIT
        self.clip_grad_norm = clip_grad_norm
        self.grad_scaler = grad_scaler
        self.group, self.zero_group = layout.data_group, layout.zero1_group
        self.model_parallel_group = layout.norm_group  # the model group, or the pipeline group (weight parallel)
        self.reduce_bucket_size = reduce_bucket_size
        self.overlap_sync_param = overlap_sync_param
        self.successful_steps = 0  # Adam's step count (a skipped step does not count)
        groups = param_groups(model, weight_decay)
        part = model if isinstance(model, ModelPart) else ModelPart([model])
        self.infos = {id(p): info for p, info in part.infos()}  # id(model parameter) -> ParamInfo: for checkpoints

        params = [p for g in groups for p in g["params"]]
        dense = [p for p in params if self.infos[id(p)].replicas is Replicas.DATA]
        experts = [p for p in params if self.infos[id(p)].replicas is Replicas.EXPERT_DATA]
        # the expert weights last: each domain's gradients are one contiguous slice of the flat buffer
        domains = [
            _Domain(dense, layout.data_group, layout.zero1_group),
            _Domain(experts, layout.expert_data_group, layout.expert_zero1_group),
        ]
        domains = [d for d in domains if d.params]
        self.model_params = [p for d in domains for p in d.params]
        self.expert_group = layout.expert_group if experts and _world(layout.expert_group) > 1 else None
        self.fsdp = isinstance(self.model_params[0], DTensor)
        # the groups over which each domain's gradient is split into shards (FSDP): its squares are summed there
        self.shard_groups = (layout.zero1_group, layout.expert_zero1_group) if self.fsdp else (None, None)

        if self.fsdp:  # fully_shard reduces and shards; every rank updates its own shards
            self.flat_grad, self.grad_slices, self.grad_reducers, self.broadcasts = None, [], [], []
            owned = {id(p) for p in self.model_params}
        else:
            self._make_flat_grad(domains, overlap_sync_grad)
            owned = self._assign_owners(domains)
        self._plan_norm_and_partial_sums(layout.gradient_tensor_group, layout.embedding_group)
        self._make_fp32_masters(groups, owned, lr, betas, eps, weight_decay)
        self._hook_param_waits(model)

    def _make_flat_grad(self, domains: list[_Domain], overlap_sync_grad: bool) -> None:
        """One fp32 buffer for every gradient (grad_views: each parameter's view of it, in model_params order),
        the hooks that accumulate into it, and each domain's slice of it with its reduce group."""
        numel = sum(p.numel() for p in self.model_params)
        self.flat_grad = torch.zeros(numel, dtype=torch.float32, device=self.model_params[0].device)
        self.grad_views = _views(self.flat_grad, self.model_params)
        self._index_of = {id(p): i for i, p in enumerate(self.model_params)}
        self._expect_new_grads()
        # registered before any reducer's hook: a parameter's view is complete when the reducer hears of it
        for index, param in enumerate(self.model_params):
            param.register_post_accumulate_grad_hook(lambda _, i=index: self._take_grad(i))
        self.grad_slices, self.grad_reducers = [], []
        start = 0
        for domain in domains:
            size = sum(p.numel() for p in domain.params)
            flat, start = self.flat_grad[start : start + size], start + size
            reducer = None
            if overlap_sync_grad and _world(domain.reduce_group) > 1:
                reducer = OverlappedGradReducer(
                    domain.params, flat, self.reduce_bucket_size, domain.reduce_group, self._settle_grad
                )
                self.grad_reducers.append(reducer)
            self.grad_slices.append(_GradSlice(domain.params, flat, domain.reduce_group, reducer))

    def _assign_owners(self, domains: list[_Domain]) -> set[int]:
        """The ids of the parameters this rank owns (ZeRO-1 owners within each domain's zero group), and
        what each owner broadcasts after the update: (source global rank, its parameters of one dtype, the
        group); fp32 norms may sit in a bf16 model, and one flat buffer holds one dtype."""
        owned, self.broadcasts = set(), []
        for domain in domains:
            zero = domain.zero_group
            zero_size = _world(zero) if zero is not None else 1
            zero_rank = dist.get_rank(zero) if zero is not None else 0
            owners = assign_owners([p.numel() for p in domain.params], zero_size)
            owned.update(id(p) for p, owner in zip(domain.params, owners) if owner == zero_rank)
            for rank in range(zero_size if zero_size > 1 else 0):
                for dtype in sorted({p.dtype for p in domain.params}, key=str):
                    mine = [p for p, owner in zip(domain.params, owners) if owner == rank and p.dtype == dtype]
                    if mine:
                        self.broadcasts.append((dist.get_global_rank(zero, rank), mine, zero))
        return owned

    def _plan_norm_and_partial_sums(self, tensor_group, embedding_group) -> None:
        """Which gradients (indices into model_params) the global norm counts on this rank, and which
        gradients this rank holds only part of, summed over the ranks holding the rest: partial_sums =
        [(group, indices)]."""
        tensor_rank = dist.get_rank(tensor_group) if tensor_group is not None else 0
        infos = [self.infos[id(p)] for p in self.model_params]
        # each weight once, model-wide; the expert weights' apart when their ranks differ over the expert group
        # or (FSDP) their shards over the expert weights' own group
        counted = [(i, info) for i, info in enumerate(infos) if info.counted_here(tensor_rank)]
        split = self.expert_group is not None or self.fsdp
        self.norm_index = [i for i, info in counted if not split or info.replicas is Replicas.DATA]
        self.expert_norm_index = [i for i, info in counted if split and info.replicas is Replicas.EXPERT_DATA]
        self.partial_sums = []
        for kind, group in ((SumOver.EMBEDDING, embedding_group), (SumOver.TENSOR, tensor_group)):
            index = [i for i, info in enumerate(infos) if info.sum_over is kind]
            if index and group is not None and _world(group) > 1:
                self.partial_sums.append((group, index))

    def _make_fp32_masters(self, groups: list[dict], owned: set[int], lr, betas, eps, weight_decay) -> None:
        """owned = [(model parameter, its fp32 master, its index in model_params)] for the parameters this
        rank updates (the master is the parameter itself where that is fp32 — under FSDP its fp32 local
        shard — else a view of one flat buffer), AdamW's moments (exp_avgs, exp_avg_sqs: views of one flat
        buffer each, keyed by id(master)), and param_groups: the lr, betas, eps and weight decay of each group
        of owned masters, which the schedulers write into."""
        self.needs_master = any(p.dtype != torch.float32 for p in self.model_params)
        mine = [(i, p) for i, p in enumerate(self.model_params) if id(p) in owned]
        device = self.model_params[0].device
        separate = [p for _, p in mine if p.dtype != torch.float32]
        master_views = iter(_views(torch.empty(sum(p.numel() for p in separate), device=device), separate))
        self.owned = [(p, next(master_views) if p.dtype != torch.float32 else local_tensor(p), i) for i, p in mine]
        self.masters_from_model()
        masters = [master for _, master, _ in self.owned]
        numel = sum(m.numel() for m in masters)
        self.exp_avgs = dict(zip(map(id, masters), _views(torch.zeros(numel, device=device), masters)))
        self.exp_avg_sqs = dict(zip(map(id, masters), _views(torch.zeros(numel, device=device), masters)))
        master_of = {id(p): master for p, master, _ in self.owned}
        hyper = {"lr": lr, "betas": betas, "eps": eps}
        owned_groups = [
            {
                **hyper,
                "weight_decay": g["weight_decay"],
                "params": [master_of[id(p)] for p in g["params"] if id(p) in master_of],
            }
            for g in groups
        ]
        # A rank that owns nothing still keeps a param group the schedulers write lr and betas into.
        self._param_groups = [g for g in owned_groups if g["params"]] or [
            {**hyper, "weight_decay": weight_decay, "params": []}
        ]
        self._plan_updates()

    def _plan_updates(self) -> None:
        """The kernel's calls of a step: per param group (its lr, betas, eps, weight decay), the lists of the
        masters that have a 16-bit model copy to write, and of those that have none (fp32 parameters)."""
        model_of = {id(master): p for p, master, _ in self.owned if p.dtype != torch.float32}
        index_of = {id(master): index for _, master, index in self.owned}
        self._update_lists = []
        for group in self._param_groups:
            for with_copy in (True, False):
                chosen = [m for m in group["params"] if (id(m) in model_of) == with_copy]
                if chosen:
                    lists = [chosen, [index_of[id(m)] for m in chosen]]
                    lists += [[self.exp_avgs[id(m)] for m in chosen], [self.exp_avg_sqs[id(m)] for m in chosen]]
                    lists.append([model_of[id(m)] for m in chosen] if with_copy else None)
                    self._update_lists.append((group, lists))

    def _hook_param_waits(self, model: nn.Module) -> None:
        """With overlap_sync_param, each module waits for its own parameters' broadcast before its forward."""
        self.pending_params = {}  # id(param) -> its in-flight broadcast
        if self.overlap_sync_param and self.broadcasts:
            for module in model.modules():
                if any(True for _ in module.parameters(recurse=False)):
                    module.register_forward_pre_hook(self._wait_for_params)

    @property
    def param_groups(self):
        return self._param_groups

    @property
    def loss_scale(self) -> float:
        return self.grad_scaler.scale if self.grad_scaler else 1.0

    def optimizer_state_bytes(self) -> int:
        """Bytes of fp32 master weights (when separate from the model's) and Adam state on this rank."""
        masters = sum(m.numel() * 4 for p, m, _ in self.owned if p.dtype != torch.float32)
        return masters + sum(m.numel() * 8 for _, m, _ in self.owned)  # exp_avg + exp_avg_sq in fp32

    def state_targets(self) -> list[tuple[str, torch.Tensor, ShardSpec, bool]]:
        """This rank's optimizer tensors as (key, tensor, its parameter's ShardSpec, duplicate) for the
        parameters it owns, keyed by full-model name: "master/<name>" (fp32 masters, when separate from the
        model's parameters), "exp_avg/<name>", "exp_avg_sq/<name>". duplicate: the last stage's copy of a
        tied embedding (the same key and values as the first stage's; loaded, not saved)."""
        out = []
        for param, master, _ in self.owned:
            info = self.infos[id(param)]
            if self.needs_master:
                out.append((f"master/{info.name}", master.detach(), info.spec, info.duplicate))
            out.append((f"exp_avg/{info.name}", self.exp_avgs[id(master)], info.spec, info.duplicate))
            out.append((f"exp_avg_sq/{info.name}", self.exp_avg_sqs[id(master)], info.spec, info.duplicate))
        return out

    def state_dict(self) -> dict:
        """The optimizer's JSON state (its tensors: state_targets())."""
        return {"successful_steps": self.successful_steps}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Sets Adam's step count; call after the tensors of state_targets() are loaded."""
        self.successful_steps = int(state["successful_steps"])

    @torch.no_grad()
    def masters_from_model(self) -> None:
        """The fp32 masters copied from the model's parameters (after loading weights into the model)."""
        for param, master, _ in self.owned:
            if param.dtype != torch.float32:  # else the master is the parameter (or its FSDP shard)
                master.copy_(param)

    def zero_grad(self) -> None:
        for param in self.model_params:
            param.grad = None
        if not self.fsdp:
            self._expect_new_grads()

    def _expect_new_grads(self) -> None:
        """The next gradient each parameter's hook takes is the step's first: it overwrites the view."""
        self._unwritten = set(range(len(self.model_params)))  # views this step's gradients have not reached yet

    def _take_grad(self, index: int) -> None:
        """Moves model_params[index]'s .grad into its fp32 view (the step's first gradient is copied, later
        ones added) and frees it."""
        param, view = self.model_params[index], self.grad_views[index]
        if index in self._unwritten:
            view.copy_(param.grad)
            self._unwritten.discard(index)
        else:
            view.add_(param.grad)
        param.grad = None

    def _settle_grad(self, param: nn.Parameter) -> None:
        """Completes a parameter's view before its reduce: a .grad that reached the parameter without its hook
        (code that assigns .grad, such as the zero-bubble weight pass) is folded in; a parameter no backward
        reached (unused in this step's forward) gets zeros."""
        index = self._index_of[id(param)]
        if param.grad is not None:
            self._take_grad(index)
        elif index in self._unwritten:
            self.grad_views[index].zero_()
            self._unwritten.discard(index)

    def backward(self, loss: torch.Tensor, last: bool = True, params=None) -> None:
        """last: this is the step's final micro-batch for `params` (default: the whole model): its backward
        completes their gradients."""
        if last:
            self._arm(params)
        (loss * self.loss_scale).backward()

    def backward_by_grad(self, tensor: torch.Tensor, grad: torch.Tensor, last: bool = True, params=None) -> None:
        """Backward from a pipeline stage's output and the gradient the next stage sent (already scaled)."""
        if last:
            self._arm(params)
        torch.autograd.backward(tensor, grad)

    def _arm(self, params) -> None:
        for reducer in self.grad_reducers:
            reducer.arm(None if params is None else [p for p in params if id(p) in reducer.index_of])

    @torch.no_grad()
    def step(self) -> tuple[bool, float]:
        """Reduce, unscale, check, clip, update, share. Returns (success, global gradient norm before clipping)."""
        self.sync_params()
        grads = self._fsdp_grads() if self.fsdp else self._gather_and_reduce_grads()
        norm = self._global_norm(grads)
        if not math.isfinite(norm):
            if self.grad_scaler:
                self.grad_scaler.update(overflow=True)
            return False, norm
        if self.grad_scaler:
            self.grad_scaler.update(overflow=False)
        clip = self.clip_grad_norm / (norm + 1e-6) if 0 < self.clip_grad_norm < norm else 1.0
        self.successful_steps += 1
        for group, (masters, index, exp_avgs, exp_avg_sqs, models) in self._update_lists:
            adamw_step_(
                masters,
                [grads[i] for i in index],
                exp_avgs,
                exp_avg_sqs,
                step=self.successful_steps,
                lr=group["lr"],
                betas=group["betas"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                grad_scale=clip,
                model_params=models,
            )
        self._broadcast_updated_params()
        return True, norm

    def _gather_and_reduce_grads(self) -> list[torch.Tensor]:
        """ZeRO-1: every gradient copied into the flat buffer and averaged there; returns the views."""
        for grads in self.grad_slices:
            if grads.reducer is not None:
                grads.reducer.finish()
                continue
            for param in grads.params:
                self._settle_grad(param)
            if _world(grads.group) > 1:
                for start in range(0, grads.flat.numel(), self.reduce_bucket_size):
                    dist.all_reduce(grads.flat[start : start + self.reduce_bucket_size], group=grads.group)
        self._sum_partial_grads(self.grad_views)
        scale = _world(self.group) * self.loss_scale
        if scale != 1:
            self.flat_grad.div_(scale)
        self._expect_new_grads()  # this step has them: the next backward starts anew
        return self.grad_views

    def _fsdp_grads(self) -> list[torch.Tensor]:
        """FSDP: each parameter's local gradient shard (already summed over the zero1 group), averaged."""
        grads = [
            local_tensor(p.grad) if p.grad is not None else torch.zeros_like(local_tensor(p))  # unused in this step
            for p in self.model_params
        ]
        self._sum_partial_grads(grads)
        scale = _world(self.group) * self.loss_scale
        if scale != 1:
            torch._foreach_div_(grads, scale)
        return grads

    def _sum_partial_grads(self, grads: list[torch.Tensor]) -> None:
        for group, index in self.partial_sums:
            views = [grads[i] for i in index]
            flat = _flatten_dense_tensors(views)
            dist.all_reduce(flat, group=group)
            for view, value in zip(views, _unflatten_dense_tensors(flat, views)):
                view.copy_(value)

    def _global_norm(self, grads: list[torch.Tensor]) -> float:
        """The L2 norm of the whole model's gradient, every shard counted once; the same on every rank."""
        dense_shards, expert_shards = self.shard_groups
        if len(self.norm_index) == len(self.model_params) and not self.fsdp:
            squares = torch.linalg.vector_norm(self.flat_grad).square()
        else:
            squares = _squares([grads[i] for i in self.norm_index], grads[0])
        if dense_shards is not None:
            dist.all_reduce(squares, group=dense_shards)
        if self.expert_norm_index:
            experts = _squares([grads[i] for i in self.expert_norm_index], grads[0])
            for group in (expert_shards, self.expert_group):
                if group is not None:
                    dist.all_reduce(experts, group=group)
            squares = squares + experts
        if self.model_parallel_group is not None and _world(self.model_parallel_group) > 1:
            dist.all_reduce(squares, group=self.model_parallel_group)
        return squares.sqrt().item()

    def _broadcast_updated_params(self) -> None:
        """Each owner sends its updated parameters to the rest of its zero1 group, one flat buffer per dtype."""
        for source, params, group in self.broadcasts:
            flat = _flatten_dense_tensors([p.detach() for p in params])
            work = dist.broadcast(flat, src=source, group=group, async_op=self.overlap_sync_param)
            if self.overlap_sync_param:
                pending = (work, flat, params)
                self.pending_params.update((id(p), pending) for p in params)
            else:
                _unpack(flat, params)
            del flat  # else the next owner's buffer is made while this one is alive: two shares at the peak

    @torch.no_grad()
    def _wait_for_params(self, module, _inputs) -> None:
        for param in module.parameters(recurse=False):
            if id(param) in self.pending_params:
                self._complete(self.pending_params[id(param)])

    @torch.no_grad()
    def sync_params(self) -> None:
        """Completes every in-flight parameter broadcast (overlap_sync_param), e.g. before saving."""
        while self.pending_params:
            self._complete(next(iter(self.pending_params.values())))

    def _complete(self, pending) -> None:
        work, flat, params = pending
        work.wait()
        _unpack(flat, params)
        for param in params:
            del self.pending_params[id(param)]


def _squares(views: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return torch.stack(torch._foreach_norm(views)).square().sum() if views else like.new_zeros(())


def _views(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive views of `flat` shaped like each tensor of `like`."""
    views, offset = [], 0
    for tensor in like:
        views.append(flat[offset : offset + tensor.numel()].view_as(tensor))
        offset += tensor.numel()
    return views


def _unpack(flat: torch.Tensor, params: list[torch.Tensor]) -> None:
    for param, value in zip(params, _unflatten_dense_tensors(flat, params)):
        param.copy_(value)
