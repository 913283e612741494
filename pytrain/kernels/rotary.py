"""Fused rotary position embeddings: q and k rotated in one call.

    q_out, k_out = apply_rotary(q, k, positions=None, base=10000.0, interleaved=False, inplace=False, scaling=None)

The rotation runs in pytrain._C (CPU) or pytrain._C_cuda (CUDA) as the torch.library custom op
pytrain::rotary (pytrain::rotary_ in place), so autograd and torch.compile (fullgraph) see one op.
The backward is the same kernel rotating by -angle: it needs only the positions, never q or k.

cos/sin come from an fp32 table per (device, head_dim, base, scaling), computed once with float64 angles (so
large positions keep their precision) and grown by powers of two as larger positions arrive; the kernel
gathers one row per token and applies it to every q and k head. CPU sin/cos per element would cost more
than the rotation itself. A long-context scaling (pytrain.kernels.rope_scaling: linear, dynamic NTK, Llama 3.1's)
changes only the frequencies the table is built from, never the kernel. Dynamic NTK's frequencies depend on the
call's longest sequence once it passes max_position_embeddings: such tables are kept per length, the
_LENGTH_TABLES most recent ones (a pipeline's micro-batches in flight may differ in length).

The table must cover the largest position, so a positions tensor is range-checked by each call (its min and max
read back to the host: on a GPU a synchronization, forward and backward, in every layer). A model checks its
positions once per micro-batch instead: CheckedPositions (unpacked rows) or PackedSequences (packed documents)
carry the table size to every layer's call, which then reads nothing back.
"""

import math

import torch

from . import reference
from ._backend import DTYPE_CODES, extension, launch_args, parallelism
from ._checks import check_same_device, check_tensor
from .packed import PackedSequences
from .rope_scaling import NO_SCALING, RopeScaling

MAX_HEAD_DIM = 8192  # the CPU kernel's stack buffer for -sin holds head_dim / 2 floats
MAX_POSITION = 1 << 21  # the table for positions below this is at most 2M x head_dim fp32
_TABLE_MIN_ROWS = 4096
_LENGTH_TABLES = 8  # dynamic NTK: the tables of this many recent lengths are kept (per device, head_dim, base)
_tables: dict[tuple, torch.Tensor] = {}


def cos_sin_table(
    device: torch.device, head_dim: int, base: float, rows: int, scaling: RopeScaling = NO_SCALING
) -> torch.Tensor:
    """The cached fp32 (>= rows, head_dim) table: row p is [cos(p f_i) for i < head_dim / 2, sin(p f_i) ...], f the
    frequencies of `scaling` for a call whose positions lie below `rows`."""
    length = scaling.length_key(rows)
    key = (device, head_dim, base, scaling, length)
    table = _tables.get(key)
    if table is None or table.shape[0] < rows:
        size = max(_TABLE_MIN_ROWS, 1 << (rows - 1).bit_length())
        with torch.no_grad():
            positions = torch.arange(size, device=device)
            cos, sin = reference.rotary_cos_sin(positions, head_dim, base, scaling, seq_len=rows)
            table = torch.cat((cos, sin), dim=-1).to(torch.float32).contiguous()
        if length is not None:
            _forget_old_lengths(key)
        _tables[key] = table
    return table


def _forget_old_lengths(key: tuple) -> None:
    """Drops the oldest length-dependent tables of key's (device, head_dim, base, scaling) beyond _LENGTH_TABLES - 1."""
    same = [other for other in _tables if other[:4] == key[:4] and other[4] is not None]
    for old in same[: max(0, len(same) - _LENGTH_TABLES + 1)]:
        del _tables[old]


def _token_strides(t: torch.Tensor) -> tuple[int, int]:
    """(batch, seq) strides in elements; the packed layout (tokens, heads, head_dim) is batch 1."""
    return (0, t.stride(0)) if t.dim() == 3 else (t.stride(0), t.stride(1))


def _heads_are_dense(t: torch.Tensor) -> bool:
    """Within a token, (heads, head_dim) must be one contiguous block; tokens may be strided."""
    heads, head_dim = t.shape[-2:]
    return (head_dim <= 1 or t.stride(-1) == 1) and (heads <= 1 or t.stride(-2) == head_dim)


def _table_rows(positions: torch.Tensor) -> int:
    """The table rows `positions` need (their max + 1, at least 1), range-checked: reads their min and max back."""
    if not positions.numel():
        return 1
    low, high = torch.stack(torch.aminmax(positions)).tolist()
    if low < 0 or high >= MAX_POSITION:
        raise ValueError(f"positions must lie in [0, {MAX_POSITION}), got values in [{low}, {high}]")
    return high + 1


class CheckedPositions:
    """Each token's position for unpacked rows, range-checked once and passed to every layer's apply_rotary.

        positions = CheckedPositions(batch_positions, device="cuda")   # once per micro-batch
        q, k = apply_rotary(q, k, positions)                           # each layer, forward and backward: no read

    positions: int32/int64 (seq,) or (batch, seq) in [0, 2**21). A CPU tensor is checked on the host and moved to
    `device` with one pinned copy: no synchronization at all. A tensor already on the GPU is read back here, once
    (its min and max). Attributes: positions (int64, contiguous, on `device`), rows (the cos/sin table rows they
    need: their max + 1), device. rows: at least this many (a slice of a longer call's positions, e.g. one rank's
    part of a sequence-parallel sequence, whose dynamic NTK scaling must read the whole call's longest sequence).
    """

    def __init__(self, positions: torch.Tensor, device=None, rows: int = 0):
        if not isinstance(positions, torch.Tensor):
            raise TypeError(f"positions must be a torch.Tensor, got {type(positions).__name__}")
        if positions.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"positions has dtype {positions.dtype}; supported: torch.int32, torch.int64")
        if positions.dim() not in (1, 2):
            raise ValueError(f"positions must be (seq,) or (batch, seq), got shape {tuple(positions.shape)}")
        self.rows = max(_table_rows(positions), rows)
        device = positions.device if device is None else torch.device(device)
        positions = positions.to(torch.int64)
        if device.type == "cuda" and positions.device.type == "cpu":
            positions = positions.pin_memory().to(device, non_blocking=True)
        self.positions = positions.to(device).contiguous()
        self.device = self.positions.device  # "cuda" resolved to its index, as tensors report it

    def __repr__(self) -> str:
        return f"CheckedPositions(shape={tuple(self.positions.shape)}, rows={self.rows}, device={self.device})"


def _launch(q, k, q_out, k_out, positions, base: float, interleaved: bool, inverse: bool, rows: int, scaling) -> None:
    """rows > 0: every position is known to lie below it (checked once per micro-batch: CheckedPositions,
    PackedSequences); 0: check them here."""
    batch, seq = (1, q.shape[0]) if q.dim() == 3 else q.shape[:2]
    head_dim = q.shape[-1]
    positions_address, positions_stride = 0, 0
    if positions is None:
        rows = seq
    else:
        positions_address = positions.data_ptr()
        positions_stride = seq if positions.dim() == 2 else 0
        if rows == 0:
            # The only data-dependent check; it lives inside the op, so torch.compile traces no .item().
            rows = _table_rows(positions)
    table = cos_sin_table(q.device, head_dim, base, max(rows, 1), scaling)
    extension(q.device).rotary(
        q.data_ptr(),
        q_out.data_ptr(),
        k.data_ptr(),
        k_out.data_ptr(),
        *_token_strides(q),
        *_token_strides(q_out),
        *_token_strides(k),
        *_token_strides(k_out),
        positions_address,
        positions_stride,
        table.data_ptr(),
        batch,
        seq,
        q.shape[-2],
        k.shape[-2],
        head_dim,
        interleaved,
        inverse,
        DTYPE_CODES[q.dtype],
        parallelism(q, batch * seq),
        **launch_args(q),
    )


@torch.library.custom_op("pytrain::rotary", mutates_args=())
def _rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor | None,
    base: float,
    interleaved: bool,
    inverse: bool,
    rows: int,
    rope_type: str,
    scaling_numbers: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    q_out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    scaling = RopeScaling.from_op_args(rope_type, scaling_numbers)
    _launch(q, k, q_out, k_out, positions, base, interleaved, inverse, rows, scaling)
    return q_out, k_out


@_rotary.register_fake
def _(q, k, positions, base, interleaved, inverse, rows, rope_type, scaling_numbers):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("pytrain::rotary_", mutates_args=("q", "k"))
def _rotary_inplace(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor | None,
    base: float,
    interleaved: bool,
    inverse: bool,
    rows: int,
    rope_type: str,
    scaling_numbers: list[float],
) -> None:
    scaling = RopeScaling.from_op_args(rope_type, scaling_numbers)
    _launch(q, k, q, k, positions, base, interleaved, inverse, rows, scaling)


@_rotary_inplace.register_fake
def _(q, k, positions, base, interleaved, inverse, rows, rope_type, scaling_numbers):
    return None


def _setup_context(ctx, inputs, output):
    _, _, positions, ctx.base, ctx.interleaved, ctx.inverse, ctx.rows, ctx.rope_type, ctx.scaling_numbers = inputs
    ctx.save_for_backward(positions)


def _autograd_backward(ctx, dq_out, dk_out):
    (positions,) = ctx.saved_tensors
    dq_out = dq_out if _heads_are_dense(dq_out) else dq_out.contiguous()
    dk_out = dk_out if _heads_are_dense(dk_out) else dk_out.contiguous()
    scaling = (ctx.rope_type, ctx.scaling_numbers)
    dq, dk = _rotary(dq_out, dk_out, positions, ctx.base, ctx.interleaved, not ctx.inverse, ctx.rows, *scaling)
    return dq, dk, None, None, None, None, None, None, None


_rotary.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check_layout(name: str, t: torch.Tensor):
    check_tensor(name, t, contiguous=False)
    if t.dim() not in (3, 4):
        raise ValueError(
            f"{name} must be (batch, seq, heads, head_dim) or packed (tokens, heads, head_dim), "
            f"got shape {tuple(t.shape)}"
        )


def _check_dense_heads(name: str, t: torch.Tensor):
    if not _heads_are_dense(t):
        raise ValueError(
            f"{name} must be contiguous over (heads, head_dim) within each token (stride(-1) == 1, "
            f"stride(-2) == head_dim; tokens may be strided): call .contiguous() on it first"
        )


def _check_positions_shape(positions: torch.Tensor, q: torch.Tensor) -> None:
    packed = q.dim() == 3
    allowed = [(q.shape[0],)] if packed else [(q.shape[1],), tuple(q.shape[:2])]
    if tuple(positions.shape) not in allowed:
        names = "(tokens,)" if packed else "(seq,) or (batch, seq)"
        raise ValueError(
            f"positions must have shape {names} = {' or '.join(map(str, allowed))}, got {tuple(positions.shape)}"
        )


def _check_positions(positions, q: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """(positions as contiguous int64 of shape (seq,) or (batch, seq) for 4-D q, (tokens,) for packed q; the table
    rows they need when known on the host, else 0)."""
    if isinstance(positions, PackedSequences):
        positions.check_tokens("q", q, q.shape[:-2].numel())
        if positions.max_seqlen > MAX_POSITION:
            raise ValueError(f"positions must lie in [0, {MAX_POSITION}), got sequences of {positions.max_seqlen}")
        return positions.positions.view(q.shape[:-2]), max(positions.max_seqlen, 1)
    if isinstance(positions, CheckedPositions):
        _check_positions_shape(positions.positions, q)
        check_same_device(q=q, positions=positions.positions)
        return positions.positions, positions.rows
    packed = q.dim() == 3
    if positions is None:
        if packed:
            raise ValueError(
                "positions is required for the packed layout (tokens, heads, head_dim): pass the "
                "position of each token, shape (tokens,), or a PackedSequences"
            )
        return None, 0
    if not isinstance(positions, torch.Tensor):
        raise TypeError(f"positions must be a torch.Tensor, a PackedSequences or None, got {type(positions).__name__}")
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"positions has dtype {positions.dtype}; supported: torch.int32, torch.int64")
    _check_positions_shape(positions, q)
    check_same_device(q=q, positions=positions)
    return positions.to(torch.int64).contiguous(), 0


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: "torch.Tensor | CheckedPositions | PackedSequences | None" = None,
    base: float = 10000.0,
    interleaved: bool = False,
    inplace: bool = False,
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q and k by the rotary position embedding of each token, in one call.

    q: (batch, seq, q_heads, head_dim) and k: (batch, seq, k_heads, head_dim), or the packed layout
    (tokens, heads, head_dim). q and k share dtype (fp32/bf16/fp16; math in fp32), device and tokens;
    their head counts may differ (GQA). head_dim must be even. Tokens may be strided (e.g. q and k as
    views of one fused qkv projection) as long as (heads, head_dim) is contiguous within each token.
    positions: int tensor of each token's position, in [0, 2**21). None means 0..seq-1 (4-D only);
    4-D accepts (seq,) or (batch, seq); packed needs (tokens,) (positions restart at 0 per document). A tensor is
    range-checked by each call, which reads its min/max back to the host (forward and backward). Built once per
    micro-batch, a CheckedPositions (the same tensor, checked once) or a PackedSequences (each token's position in
    its sequence; q's (batch, seq) or (tokens,) must hold its total_tokens) has nothing to read back.
    base: the rotary base (angle of pair i = position * base ** (-2i / head_dim)).
    interleaved: False rotates (x[i], x[i + head_dim/2]) (LLaMA/NeoX); True rotates (x[2i], x[2i+1]) (GPT-J).
    inplace: rotate q and k in their own memory and return them. Refused while autograd would record the
    op (grad mode on and q or k requires grad): use it for inference or on detached tensors.
    scaling: a long-context RopeScaling (linear, dynamic NTK, llama3; pytrain.kernels.rope_scaling); None: none.
    Dynamic NTK reads the call's longest sequence: its largest position + 1 (a PackedSequences' longest document).
    Returns (q_out, k_out); out of place they are new contiguous tensors.
    """
    _check_layout("q", q)
    _check_layout("k", k)
    check_same_device(q=q, k=k)
    if k.dtype != q.dtype:
        raise TypeError(f"k has dtype {k.dtype}; it must match q's dtype ({q.dtype})")
    if k.dim() != q.dim():
        raise ValueError(f"q and k must use the same layout, got shapes {tuple(q.shape)} and {tuple(k.shape)}")
    tokens = q.shape[:-2]
    if k.shape[:-2] != tokens:
        names = "(tokens,)" if q.dim() == 3 else "(batch, seq)"
        raise ValueError(f"k's {names} {tuple(k.shape[:-2])} must match q's {tuple(tokens)}")
    head_dim = q.shape[-1]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k's head_dim {k.shape[-1]} must match q's head_dim {head_dim}")
    if head_dim % 2 or not 0 < head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim (q.shape[-1]) must be even and in [2, {MAX_HEAD_DIM}], got {head_dim}")
    if (q.shape[-2] + k.shape[-2]) * head_dim >= 2**31:
        raise ValueError(
            f"q and k together hold {(q.shape[-2] + k.shape[-2]) * head_dim} elements per token; "
            "the kernels index a token with 32-bit ints (below 2**31)"
        )
    _check_dense_heads("q", q)
    _check_dense_heads("k", k)
    if isinstance(base, bool) or not isinstance(base, (int, float)) or not 0 < base < math.inf:
        raise ValueError(f"base must be a positive finite number, got {base!r}")
    if scaling is None:
        scaling = NO_SCALING
    if not isinstance(scaling, RopeScaling):
        raise TypeError(f"scaling must be a RopeScaling or None, got {type(scaling).__name__}")
    positions, rows = _check_positions(positions, q)
    if inplace:
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            raise ValueError(
                "inplace=True is refused while q or k requires grad (autograd cannot record it): "
                "use inplace=False, or torch.no_grad() / detached tensors"
            )
        if q is k:
            raise ValueError("inplace=True needs q and k in separate memory, got the same tensor twice")
    if extension(q.device) is None:
        q_out, k_out = reference.apply_rotary(q, k, positions, float(base), bool(interleaved), scaling)
        return (q.copy_(q_out), k.copy_(k_out)) if inplace else (q_out, k_out)
    if inplace:
        _rotary_inplace(q, k, positions, float(base), bool(interleaved), False, rows, *scaling.op_args())
        return q, k
    return _rotary(q, k, positions, float(base), bool(interleaved), False, rows, *scaling.op_args())
