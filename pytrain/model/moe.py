"""Mixture of experts, written plain: a router, experts stacked in 3-D weights, no parallelism inside.

    MoE (a decoder layer's MLP; InternEvo's names)
      moe_layer: MoELayer
        gate.wg            nn.Linear(H, E, bias=False): the router; logits and softmax in fp32
        experts            GroupedExperts: w1 (E, I, H) gate, w3 (E, I, H) up, w2 (E, H, I) down, SwiGLU each
        dispatcher         LocalDispatcher (a plain attribute, not a module)
      residual_mlp         optional dense SwiGLU (shared experts) and
      coefficient          how it is mixed in: InternLM's residual MoE, nn.Linear(H, 2) with bias,
                           out = moe * softmax(c)[..., 0] + mlp * softmax(c)[..., 1]; or Qwen2-MoE's shared
                           expert gate, nn.Linear(H, 1, bias=False), out = moe + sigmoid(c) * mlp

So a layer's parameters are `<mlp>.moe_layer.gate.wg.weight`, `<mlp>.moe_layer.experts.w1|w3|w2`,
`<mlp>.residual_mlp.w1|w3|w2.weight`, `<mlp>.coefficient.weight` (+ `.bias` for InternLM's). InternEvo
stores experts one module each (`experts.wrapped_experts.{e}.w1.weight`); here they are stacked along
dim 0, the dimension expert parallelism shards; pytrain.checkpoint.hf splits them per expert for Hugging Face
(Mixtral's `block_sparse_moe.experts.{e}.w1`, Qwen2-MoE's `mlp.experts.{e}.gate_proj`, `mlp.shared_expert.*`,
`mlp.shared_expert_gate`).

The two seams where kernels and expert parallelism plug in without touching the layer:

- `GroupedExperts.forward(x_sorted (N, H), tokens_per_expert (E_local,) int64) -> (N, H)`: the rows come
  grouped by expert, expert 0's first; each contiguous group goes through its expert's SwiGLU: three
  grouped GEMMs (pytrain.kernels.grouped_mm) over all the groups at once.
- `MoELayer.dispatcher`, an object with
    `dispatch(x (T, H), expert_ids (T, k) int64, -1 = dropped) -> (x_sorted, tokens_per_expert, state)`
    `combine(y_sorted (N, H), weights (T, k) fp32, state) -> (T, H)`: per token the weighted sum of its
    experts' rows; a dropped assignment contributes 0; gradients reach `weights` (the router learns).
  LocalDispatcher does this in one process with the fused pytrain.kernels.moe_permute / moe_unpermute
  (a counting sort and row gather; the weighted sum back in fp32, gradients to x and weights); an expert-parallel
  one exchanges the rows with all-to-all and returns only this rank's experts' groups (E_local of them).
  `dispatch(..., num_kept)`: the entries of expert_ids >= 0 when the caller knows them, so that nothing is read
  back to the host (on a GPU a synchronization); `runs_dropped(device)`: whether the dispatcher would rather be
  given dropped assignments with their expert id (and weight 0) than as -1 (LocalDispatcher on a GPU).

Routing (`Routing`, from model.moe_type and model.moe_layer_kwargs: pytrain.model_args.routing_from_fields,
which the config also runs to validate a file):
- "GShard" (InternEvo's default; its fused top-k gating): softmax, top-k; capacity per expert
  ceil(k * T / E * capacity_factor) (eval_capacity_factor in eval mode), at least min_capacity;
  assignments fill it first choices first, each in token order, the rest are dropped; the weights are
  the kept choices' probabilities renormalised over the kept ones (DeepSpeed/GShard top-2). drop_tokens=
  False: no capacity. use_fused_gating=False with top_k=1 is DeepSpeed's top-1: the weight is the raw
  probability (not renormalised) and use_rts must be False (random token selection is random). Aux loss
  E * sum_e mean_t(first choice == e) * mean_t(p_e).
- "Dropless": softmax, top-k, renormalised iff normalize_expert_weights (Mixtral: always; Qwen2-MoE:
  norm_topk_prob), no capacity. Aux loss E * sum_e (assignments to e / (T * k)) * mean_t(p_e).

On a GPU nothing in a layer's forward or backward reads a value back to the host, which would wait for the
device (tokens are counted per expert on the device, never with torch.bincount, which reads its input's max
back), except the one read of an expert-parallel dispatcher: the all-to-all's split sizes (pytrain.parallel.expert).

The aux (load-balancing) loss reaches the gradient under any schedule (micro-batches, pipelines,
activation recompute) without being returned: the layer's output passes through AuxLossScaler, the
identity forward, whose backward also hands the aux loss the gradient `aux_loss_weight`. The trainer
sets `aux_loss_weight` on every MoELayer before each step (pytrain.train.trainer): moe_loss_coeff x
the loss scale / micro-batches, so the gradient is moe_loss_coeff x the mean over micro-batches (and
data-parallel ranks, which the optimizer averages) of the per-micro-batch sum of the layers' aux losses.
Each forward also adds its aux loss (detached, not again when recomputed in the backward) to a per-step
sum the trainer reads for the `moe_loss` metric.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pytrain.kernels import Linear, grouped_mm, moe_permute, moe_unpermute
from pytrain.kernels._backend import runs_triton
from pytrain.model_args import DecoderArgs, Routing, mlp_width, routing_from_fields

from .decoder import SwiGLU


def count_per_expert(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(num_experts,) int64: how many entries of expert_ids (any shape; -1 names no expert) name each expert,
    counted on the device (torch.bincount reads its input's max back to the host: on a GPU a synchronization)."""
    bins = expert_ids.reshape(-1) + 1  # -1 into bin 0, left out below
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=expert_ids.device)
    return counts.scatter_add_(0, bins, torch.ones_like(bins))[1:]


def route(logits: torch.Tensor, routing: Routing, training: bool, mark_dropped: bool = True, average=None):
    """logits (T, E) -> (expert_ids (T, k) int64 with -1 for a dropped assignment, weights (T, k) fp32,
    aux loss (scalar fp32), tokens per expert before any drop (E,) int64). mark_dropped=False: a dropped
    assignment keeps its expert id in expert_ids (its weight is 0 all the same). average: where these T tokens
    are only part of the micro-batch (a sequence-parallel rank's), averages a statistic over the parts
    (differentiably), so the aux loss is the whole micro-batch's; None: they are all of it."""
    tokens, experts = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)
    top_p, top_i = probs.topk(routing.top_k, dim=-1)
    counts = count_per_expert(top_i, experts)
    if routing.kind == "GShard":  # fraction of tokens whose first choice is e
        fraction = count_per_expert(top_i[:, 0], experts).float() / tokens
    else:  # fraction of all k * T assignments going to e
        fraction = counts.float() / (tokens * routing.top_k)
    mean_probs = probs.mean(dim=0)
    if average is not None:
        fraction, mean_probs = average(fraction), average(mean_probs)
    aux = experts * torch.sum(fraction * mean_probs)
    keep = torch.ones_like(top_i, dtype=torch.bool)
    capacity = routing.capacity(tokens, training)
    if capacity is not None:
        # an assignment's place in its expert's queue: first choices of all tokens, then second choices, ...
        by_choice = top_i.t().reshape(-1)
        place = (F.one_hot(by_choice, experts).cumsum(0) - 1).gather(1, by_choice[:, None]).squeeze(1)
        keep = (place < capacity).view(routing.top_k, tokens).t()
    weights = top_p * keep
    if routing.normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).eps)
    return (top_i.masked_fill(~keep, -1) if mark_dropped else top_i), weights, aux, counts


class LocalDispatcher:
    """Groups the tokens' assignments by expert in this process (see the module docstring), through the fused
    kernels: moe_permute's rows are each expert's assignments in token order, moe_unpermute sums them back
    weighted, in fp32."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def runs_dropped(self, device: torch.device) -> bool:
        """Where moe_permute runs on the GPU (its Triton kernels), dropped assignments come with their expert id
        and weight 0: each runs as a row that adds nothing to the output or to any gradient, and the rows are T * k,
        known without reading the kept count back (a synchronization per layer), so every shape is static. The
        price: the experts' compute for the dropped rows (GShard's capacity only; DeepSpeed and InternEvo compute a
        capacity-padded buffer of about as many rows). On the CPU the count is free and the rows are not."""
        return runs_triton(device)

    def dispatch(self, x: torch.Tensor, expert_ids: torch.Tensor, num_kept: int | None = None):
        x_sorted, row_of, tokens_per_expert = moe_permute(x, expert_ids, self.num_experts, num_kept)
        return x_sorted, tokens_per_expert, row_of

    def combine(self, y_sorted: torch.Tensor, weights: torch.Tensor, row_of) -> torch.Tensor:
        return moe_unpermute(y_sorted, row_of, weights)


class GroupedExperts(nn.Module):
    """E_local experts' SwiGLU weights stacked along dim 0: w1 (E, I, H) gate, w3 (E, I, H) up, w2 (E, H, I);
    each runs as one grouped GEMM over all experts' rows."""

    def __init__(self, num_experts: int, hidden_size: int, width: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, width, hidden_size))
        self.w3 = nn.Parameter(torch.empty(num_experts, width, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, width))

    def forward(self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        gate = grouped_mm(x_sorted, self.w1, tokens_per_expert)
        up = grouped_mm(x_sorted, self.w3, tokens_per_expert)
        return grouped_mm(F.silu(gate) * up, self.w2, tokens_per_expert)


class Gate(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int):
        super().__init__()
        self.wg = nn.Linear(hidden_size, num_experts, bias=False)


class AuxLossScaler(torch.autograd.Function):
    """Identity on `output`; its backward also gives `aux_loss` the gradient `weight` (Megatron-LM's
    MoEAuxLossAutoScaler), so the aux loss is trained by whatever backward reaches the layer's output."""

    @staticmethod
    def forward(ctx, output, aux_loss, weight: float):
        ctx.weight = weight
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.weight), None


class MoELayer(nn.Module):
    """Router, dispatcher and experts (InternEvo's `moe_layer`); forward (..., H) -> (..., H)."""

    def __init__(self, hidden_size: int, width: int, routing: Routing):
        super().__init__()
        self.routing = routing
        self.gate = Gate(hidden_size, routing.num_experts)
        self.experts = GroupedExperts(routing.num_experts, hidden_size, width)
        self.dispatcher = LocalDispatcher(routing.num_experts)
        self.aux_loss_weight = 0.0  # set by the trainer before each step (module docstring)
        # this copy's share of the aux loss: 1/tensor size where every tensor rank routes the same tokens
        # and the router's gradient is summed over them (pytrain.parallel.expert)
        self.aux_loss_share = 1.0
        # set from outside where the micro-batch's tokens are spread over ranks (pytrain.parallel.sequence): route's
        # `average`, so that every rank's aux loss is the whole micro-batch's
        self.average_over_tokens = None
        self.aux_loss = None  # the last forward's aux loss (detached)
        self.tokens_per_expert = None  # the last forward's assignments per expert, before drops
        self.reset_aux_losses()

    def reset_aux_losses(self) -> None:
        self.aux_loss_sum, self.aux_loss_count = None, 0

    def active_expert_params(self) -> int:
        """Expert weights one token runs through (top_k of the num_experts), this rank's share of them: a
        dispatcher that spreads the experts over tensor ranks (`tensor_size`, pytrain.parallel.expert) has
        each tensor rank run 1/tensor_size of a token's expert work (the TFLOPS column sums the ranks)."""
        local = self.experts.w1.shape[0]
        per_expert = sum(p.numel() for p in self.experts.parameters()) // local
        return per_expert * self.routing.top_k // getattr(self.dispatcher, "tensor_size", 1)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        logits = F.linear(x.float(), self.gate.wg.weight.float())  # fp32 router, whatever the model's dtype
        runs_dropped = self.dispatcher.runs_dropped(x.device)
        expert_ids, weights, aux, self.tokens_per_expert = route(
            logits, self.routing, self.training, mark_dropped=not runs_dropped, average=self.average_over_tokens
        )
        # every id names an expert (none dropped, or the dropped ones unmarked): the row count T * k is known here
        every_id_kept = runs_dropped or self.routing.capacity(x.shape[0], self.training) is None
        num_kept = expert_ids.numel() if every_id_kept else None
        x_sorted, tokens_per_expert, state = self.dispatcher.dispatch(x, expert_ids, num_kept)
        out = self.dispatcher.combine(self.experts(x_sorted, tokens_per_expert), weights, state).view(shape)
        self.aux_loss = aux.detach()
        if torch._C._current_graph_task_id() == -1:  # not the recompute of activation checkpointing
            self.aux_loss_sum = self.aux_loss if self.aux_loss_sum is None else self.aux_loss_sum + self.aux_loss
            self.aux_loss_count += 1
        if torch.is_grad_enabled() and aux.requires_grad:
            out = AuxLossScaler.apply(out, aux, float(self.aux_loss_weight) * self.aux_loss_share)
        return out


class MoE(nn.Module):
    """A decoder layer's MLP made of experts, optionally with a dense shared/residual MLP (module docstring).

    shared: None, ("residual", width) for InternLM's residual MoE (softmax-mixed) or ("shared", width) for
    Qwen2-MoE's sigmoid-gated shared expert."""

    def __init__(self, hidden_size: int, width: int, routing: Routing, shared: tuple[str, int] | None = None):
        super().__init__()
        self.moe_layer = MoELayer(hidden_size, width, routing)
        self.shared_kind = shared[0] if shared else None
        if shared:
            kind, shared_width = shared
            if kind not in ("residual", "shared"):
                raise ValueError(f"shared MLP kind {kind!r}: 'residual' or 'shared'")
            self.residual_mlp = SwiGLU(hidden_size, shared_width)
            # InternLM's residual MoE: two mixing logits with bias; Qwen2-MoE's shared expert: one gate, no bias
            residual = kind == "residual"
            self.coefficient = Linear(hidden_size, 2 if residual else 1, bias=residual)

    def forward(self, x):
        out = self.moe_layer(x)
        if self.shared_kind == "residual":
            mix = torch.softmax(self.coefficient(x), dim=-1)
            return out * mix[..., 0:1] + self.residual_mlp(x) * mix[..., 1:]
        if self.shared_kind == "shared":
            return out + torch.sigmoid(self.coefficient(x)) * self.residual_mlp(x)
        return out

    def plan(self) -> dict:
        """Nothing is split over tensor ranks here: the MoE internals are left to pytrain.parallel."""
        return {}

    def residual_outputs(self) -> tuple[str, ...]:
        """Parameters writing into the residual stream (Decoder.residual_outputs): the experts' down
        projections and the dense residual MLP's."""
        return ("moe_layer.experts.w2", "residual_mlp.w2.weight") if self.shared_kind else ("moe_layer.experts.w2",)


def moe_mlp(args: DecoderArgs, shared_kind: str) -> Callable[[int, int], MoE] | None:
    """The MLP factory (layer index, width) of a mixture-of-experts family whose shared MLP is of shared_kind
    ("residual" or "shared"); None: the dense SwiGLU (num_experts <= 1, as InternEvo)."""
    if args.num_experts <= 1:
        return None
    shared_experts = args.num_shared_experts or int(args.moe_use_residual)  # InternLM's residual MoE: one
    if shared_experts < 0:
        raise ValueError(f"num_shared_experts={shared_experts} must be >= 0")
    routing, _ = routing_from_fields(args.moe_type, args.num_experts, args.top_k, args.moe_layer_kwargs)
    hidden = args.hidden_size
    shared = None
    if shared_experts:  # InternEvo: int(int(hidden * mlp_ratio) * n), rounded up to multiple_of
        shared = (shared_kind, mlp_width(int(hidden * args.mlp_ratio) * shared_experts, 1.0, args.multiple_of))
    return lambda index, width: MoE(hidden, width, routing, shared)


def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def active_parameters(model: nn.Module) -> int:
    """Parameters one token runs through: all but the experts each token skips."""
    total = sum(p.numel() for p in model.parameters())
    for layer in moe_layers(model):
        total -= sum(p.numel() for p in layer.experts.parameters()) - layer.active_expert_params()
    return total
