"""Mixture-of-experts token permutation: tokens to expert-grouped rows and back, with the routing weights.

    permuted, row_of, tokens_per_expert = moe_permute(x, expert_ids, num_experts, num_kept=None)
    y = moe_unpermute(expert_out, row_of, weights)

x (T, H) float32/bfloat16/float16, contiguous; expert_ids (T, k) int32/int64: assignment (t, j) sends token t
to expert expert_ids[t, j] in [0, num_experts), or nowhere when it is -1 (dropped, e.g. over capacity).
moe_permute returns
  permuted (N, H), x's dtype: one row per kept assignment (N of them), grouped by expert ascending and, within
      an expert, in token order then slot order (a stable sort of the flat index t * k + j);
  row_of (T, k) int64: the row of `permuted` that holds assignment (t, j), -1 where it was dropped;
  tokens_per_expert (E,) int64 on x's device: rows per expert (sums to N), what grouped_mm takes.
Its gradient reaches x: grad_x[t] = sum over t's kept slots of grad_permuted[row_of[t, j]].

moe_unpermute(expert_out (N, H), row_of (T, k) int64, weights (T, k) any float dtype) returns y (T, H) in
expert_out's dtype: y[t] = sum_j weights[t, j] * expert_out[row_of[t, j]], dropped slots adding nothing,
computed in fp32 without materializing (T, k, H). Its gradients reach expert_out
(grad_expert_out[row_of[t, j]] = weights[t, j] * grad_y[t]) and weights
(grad_weights[t, j] = dot(grad_y[t], expert_out[row_of[t, j]]), 0 for a dropped slot). row_of must name
each row 0..N-1 of expert_out exactly once (as moe_permute's does).

Backends: CPU tensors run pytrain._C (a threaded counting sort for the index; row moves threaded over
tokens); CUDA tensors run the Triton kernels of kernels/moe_permute_triton.py, with the index made by a stable sort
in torch. moe_permute on a GPU reads three numbers back to the host (one synchronization): N, which sizes
`permuted`, and the range of expert_ids, checked from the same read; unless the caller knows N and passes it as
num_kept (expert_ids.numel() when it drops nothing, or the sum of counts it has read back already): then it reads
nothing, and checks N and the range with a device-side assertion. moe_unpermute never synchronizes: on a GPU
its check of row_of is a device-side assertion (a bad row_of fails the next synchronizing call with a CUDA
device-side assert); on the CPU every bad value is a ValueError at the call. Both are torch.library custom ops
(autograd and torch.compile(fullgraph=True) see one op each way; `permuted` has a data-dependent row count).
Without pytrain._C the plain-PyTorch references in `reference` run on the CPU. PYTRAIN_TRITON_CPU=1 runs the
Triton kernels on CPU tensors through Triton's interpreter (tests only; _backend.runs_triton).
"""

import enum
import warnings

import torch

from . import reference
from ._backend import DTYPE_CODES, extension, parallelism, runs_triton
from ._checks import check_same_device, check_tensor

INDEX_DTYPES = (torch.int32, torch.int64)
WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _load_cpu_extension():
    """pytrain._C if it has these kernels. Looked up once, at import: torch.compile cannot trace the lazy import
    inside extension() (fullgraph fails there)."""
    ext = extension(torch.device("cpu"))
    if ext is not None and not hasattr(ext, "moe_route"):
        warnings.warn(
            "pytrain._C predates the MoE kernels: moe_permute/moe_unpermute fall back to plain PyTorch on the CPU. "
            "Rebuild with `pip install -e .`",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return ext


_cpu_extension = _load_cpu_extension()


class _KernelPath(enum.Enum):
    """Which kernels run the permutation on a device."""

    TRITON = "triton"  # CUDA, or Triton's interpreter on request
    CPP = "cpp"  # pytrain._C on the CPU
    REFERENCE = "reference"  # plain PyTorch: pytrain._C is not built


def _kernel_path(device: torch.device) -> _KernelPath:
    if runs_triton(device):
        return _KernelPath.TRITON
    return _KernelPath.CPP if device.type == "cpu" and _cpu_extension is not None else _KernelPath.REFERENCE


def require(ok: torch.Tensor, message: str) -> None:
    """A check on tensor values: a ValueError now for host tensors; on a GPU a device-side assertion, which
    costs no host synchronization and fails the next synchronizing call."""
    if ok.device.type == "cpu":
        if not bool(ok):
            raise ValueError(message)
    else:
        torch._assert_async(ok, message)


def _check_expert_ids(num_experts: int, low: int, high: int) -> None:
    if low < -1 or high >= num_experts:
        raise ValueError(
            f"expert_ids must be in [-1, {num_experts}) (num_experts = {num_experts}; -1 drops an assignment), "
            f"got values from {low} to {high}"
        )


def _check_row_of(row_of: torch.Tensor, rows: int) -> None:
    """row_of names each of the `rows` rows exactly once; its other entries are -1."""
    flat = row_of.reshape(-1)
    if flat.numel() == 0:
        if rows:
            raise ValueError(f"row_of is empty but expert_out has {rows} rows")
        return
    low, high = flat.aminmax()
    message = f"row_of must hold -1 or row numbers of expert_out in [0, {rows})"
    require((low >= -1) & (high < rows), message)
    # Clamped so that on a GPU, where the assertion above is asynchronous, this scatter stays in bounds.
    seen = torch.zeros(rows + 1, dtype=torch.int64, device=flat.device)
    seen.scatter_add_(0, flat.clamp(-1, rows - 1) + 1, torch.ones_like(flat))
    require((seen[1:] == 1).all(), f"row_of must name each row of expert_out (0..{rows - 1}) exactly once")


def _check_num_kept(num_kept: int, kept: int) -> None:
    """num_kept < 0: not given."""
    if num_kept >= 0 and kept != num_kept:
        raise ValueError(f"num_kept={num_kept}, but expert_ids holds {kept} entries >= 0")


def _route(expert_ids: torch.Tensor, num_experts: int, num_kept: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(row_of, tokens_per_expert, N), expert_ids checked; see reference.moe_route for the order. num_kept >= 0: N
    as the caller knows it (nothing read back on a GPU); -1: unknown."""
    flat = expert_ids.reshape(-1)
    if flat.numel() == 0:
        return (
            expert_ids.new_empty(expert_ids.shape, dtype=torch.int64),
            torch.zeros(num_experts, dtype=torch.int64, device=expert_ids.device),
            0,
        )
    if _kernel_path(expert_ids.device) is _KernelPath.CPP:
        low, high = (int(v) for v in flat.aminmax())
        _check_expert_ids(num_experts, low, high)
        workers = parallelism(flat, flat.numel())
        row_of = torch.empty(expert_ids.shape, dtype=torch.int64)
        counts = torch.empty(num_experts, dtype=torch.int64)
        workspace = torch.empty(workers, num_experts, dtype=torch.int64)
        _cpu_extension.moe_route(
            flat.data_ptr(),
            flat.element_size(),
            flat.numel(),
            num_experts,
            row_of.data_ptr(),
            counts.data_ptr(),
            workspace.data_ptr(),
            workers,
        )
        kept = int(counts.sum())
        _check_num_kept(num_kept, kept)
        return row_of, counts, kept
    if num_kept < 0:
        low, high, kept = torch.stack([flat.min(), flat.max(), (flat >= 0).sum()]).tolist()  # the one host read
        _check_expert_ids(num_experts, low, high)
    else:
        kept = num_kept
        require(
            ((flat >= -1) & (flat < num_experts)).all() & ((flat >= 0).sum() == num_kept),
            f"expert_ids must be in [-1, {num_experts}) with num_kept={num_kept} entries >= 0",
        )
    row_of, counts = reference.moe_route(expert_ids, num_experts)
    return row_of, counts, kept


def _scatter(tokens_in, row_of, weights, rows_out, rows_in=None, grad_weights=None) -> None:
    """rows_out[row_of[t, j]] = w * tokens_in[t]; with grad_weights also its dot with rows_in[row]
    (see csrc/moe_permute.h)."""
    if _kernel_path(tokens_in.device) is _KernelPath.TRITON:
        from pytrain.triton.moe_permute_triton import scatter

        return scatter(tokens_in, row_of, weights, rows_out, rows_in, grad_weights)
    tokens, hidden = tokens_in.shape
    _cpu_extension.moe_scatter(
        tokens_in.data_ptr(),
        rows_in.data_ptr() if rows_in is not None else 0,
        0,
        rows_out.data_ptr(),
        row_of.data_ptr(),
        weights.data_ptr() if weights is not None else 0,
        grad_weights.data_ptr() if grad_weights is not None else 0,
        tokens,
        row_of.shape[1],
        hidden,
        DTYPE_CODES[tokens_in.dtype],
        parallelism(tokens_in, tokens),
    )


def _gather(rows_in, row_of, weights, tokens_out) -> None:
    """tokens_out[t] = sum_j w * rows_in[row_of[t, j]]."""
    if _kernel_path(rows_in.device) is _KernelPath.TRITON:
        from pytrain.triton.moe_permute_triton import gather

        return gather(rows_in, row_of, weights, tokens_out)
    tokens, hidden = tokens_out.shape
    _cpu_extension.moe_gather(
        0,
        rows_in.data_ptr(),
        tokens_out.data_ptr(),
        0,
        row_of.data_ptr(),
        weights.data_ptr() if weights is not None else 0,
        0,
        tokens,
        row_of.shape[1],
        hidden,
        DTYPE_CODES[rows_in.dtype],
        parallelism(rows_in, tokens),
    )


@torch.library.custom_op("pytrain::moe_permute", mutates_args=())
def _permute(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, num_kept: int = -1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    row_of, counts, rows = _route(expert_ids, num_experts, num_kept)
    permuted = x.new_empty(rows, x.shape[1])
    if rows and x.shape[1]:
        _scatter(x, row_of, None, permuted)
    return permuted, row_of, counts


@_permute.register_fake
def _(x, expert_ids, num_experts, num_kept=-1):
    # N: the kept assignments, known only at run time unless the caller gave it
    rows = num_kept if num_kept >= 0 else torch.library.get_ctx().new_dynamic_size()
    return (
        x.new_empty(rows, x.shape[1]),
        expert_ids.new_empty(expert_ids.shape, dtype=torch.int64),
        x.new_empty(num_experts, dtype=torch.int64),
    )


@torch.library.custom_op("pytrain::moe_unpermute", mutates_args=())
def _unpermute(
    expert_out: torch.Tensor, row_of: torch.Tensor, weights: torch.Tensor | None, check_rows: bool
) -> torch.Tensor:
    """weights: fp32 (T, k), or None for unit weights (permute's backward, whose row_of needs no check)."""
    if check_rows:
        _check_row_of(row_of, expert_out.shape[0])
    tokens, hidden = row_of.shape[0], expert_out.shape[1]
    if expert_out.shape[0] == 0 or hidden == 0:
        return expert_out.new_zeros(tokens, hidden)
    y = expert_out.new_empty(tokens, hidden)
    _gather(expert_out, row_of, weights, y)
    return y


@_unpermute.register_fake
def _(expert_out, row_of, weights, check_rows):
    return expert_out.new_empty(row_of.shape[0], expert_out.shape[1])


@torch.library.custom_op("pytrain::moe_unpermute_backward", mutates_args=())
def _unpermute_backward(
    grad_y: torch.Tensor,
    expert_out: torch.Tensor,
    row_of: torch.Tensor,
    weights: torch.Tensor | None,
    need_weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_expert_out, grad_weights fp32 (T, k); (0,) when not needed)."""
    grad_out = torch.empty_like(expert_out)
    grad_weights = (
        torch.zeros(row_of.shape, dtype=torch.float32, device=row_of.device)
        if need_weight_grad
        else torch.empty(0, dtype=torch.float32, device=row_of.device)
    )
    if expert_out.shape[0] and expert_out.shape[1]:
        dots = need_weight_grad
        _scatter(grad_y, row_of, weights, grad_out, expert_out if dots else None, grad_weights if dots else None)
    return grad_out, grad_weights


@_unpermute_backward.register_fake
def _(grad_y, expert_out, row_of, weights, need_weight_grad):
    shape = row_of.shape if need_weight_grad else (0,)
    return torch.empty_like(expert_out), row_of.new_empty(shape, dtype=torch.float32)


def _permute_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _permute_autograd_backward(ctx, grad_permuted, _grad_row_of, _grad_counts):
    (row_of,) = ctx.saved_tensors
    return _unpermute(grad_permuted.contiguous(), row_of, None, False), None, None, None


_permute.register_autograd(_permute_autograd_backward, setup_context=_permute_setup_context)


def _unpermute_setup_context(ctx, inputs, output):
    expert_out, row_of, weights, _ = inputs
    ctx.save_for_backward(expert_out, row_of, weights)


def _unpermute_autograd_backward(ctx, grad_y):
    expert_out, row_of, weights = ctx.saved_tensors
    need_weight_grad = weights is not None and ctx.needs_input_grad[2]
    grad_out, grad_weights = _unpermute_backward(grad_y.contiguous(), expert_out, row_of, weights, need_weight_grad)
    return grad_out, None, grad_weights if need_weight_grad else None, None


_unpermute.register_autograd(_unpermute_autograd_backward, setup_context=_unpermute_setup_context)


def _check_tokens(name: str, tokens: torch.Tensor, x_name: str, x: torch.Tensor):
    if tokens.dim() != 2 or tokens.shape[0] != x.shape[0] or tokens.shape[1] == 0:
        raise ValueError(
            f"{name} must have shape ({x.shape[0]}, k) with k >= 1 ({x_name} has {x.shape[0]} tokens), "
            f"got {tuple(tokens.shape)}"
        )


def moe_permute(
    x: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, num_kept: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens to expert-grouped rows: (permuted (N, H), row_of (T, k) int64, tokens_per_expert (E,) int64).

    num_kept: N, the entries of expert_ids >= 0, when the caller knows it: nothing is then read back to the host.
    See the module docstring for the exact order and semantics."""
    check_tensor("x", x)
    if x.dim() != 2:
        raise ValueError(f"x must be (tokens, hidden), got shape {tuple(x.shape)}")
    check_tensor("expert_ids", expert_ids, dtypes=INDEX_DTYPES)
    check_same_device(x=x, expert_ids=expert_ids)
    _check_tokens("expert_ids", expert_ids, "x", x)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
    if num_kept is not None and (
        isinstance(num_kept, bool) or not isinstance(num_kept, int) or not 0 <= num_kept <= expert_ids.numel()
    ):
        raise ValueError(f"num_kept must be None or an int in [0, {expert_ids.numel()}] (expert_ids' entries)")
    num_kept = -1 if num_kept is None else num_kept
    if _kernel_path(x.device) is _KernelPath.REFERENCE:
        flat = expert_ids.reshape(-1)
        if flat.numel():
            _check_expert_ids(num_experts, int(flat.min()), int(flat.max()))
        _check_num_kept(num_kept, int((flat >= 0).sum()))
        return reference.moe_permute(x, expert_ids, num_experts)
    return _permute(x, expert_ids, num_experts, num_kept)


def moe_unpermute(expert_out: torch.Tensor, row_of: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Expert rows back to tokens, weighted: y[t] = sum_j weights[t, j] * expert_out[row_of[t, j]].

    y has expert_out's dtype; the sum runs in fp32. See the module docstring for the gradients."""
    check_tensor("expert_out", expert_out)
    if expert_out.dim() != 2:
        raise ValueError(f"expert_out must be (rows, hidden), got shape {tuple(expert_out.shape)}")
    check_tensor("row_of", row_of, dtypes=(torch.int64,))
    check_tensor("weights", weights, dtypes=WEIGHT_DTYPES, contiguous=False)
    check_same_device(expert_out=expert_out, row_of=row_of, weights=weights)
    if row_of.dim() != 2 or row_of.shape[1] == 0:
        raise ValueError(f"row_of must be (tokens, k) with k >= 1, got shape {tuple(row_of.shape)}")
    if weights.shape != row_of.shape:
        raise ValueError(f"weights must have row_of's shape {tuple(row_of.shape)}, got {tuple(weights.shape)}")
    if _kernel_path(expert_out.device) is _KernelPath.REFERENCE:
        _check_row_of(row_of, expert_out.shape[0])
        return reference.moe_unpermute(expert_out, row_of, weights)
    return _unpermute(expert_out, row_of, weights.to(torch.float32).contiguous(), True)
