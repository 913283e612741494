"""Mixture-of-experts row moves in Triton: between token order (T, H) and expert order (N, H).

row_of (T, k) int64 maps assignment (t, j) to its row of the expert-grouped buffer (-1: dropped); every row
0..N-1 is named once (the caller checks). One program per token walks H in BLOCK_H chunks and handles the
token's k slots as one [K_POW2, BLOCK_H] tile, in fp32, one rounding to the output dtype (N >= 1: the caller
handles an empty expert-order buffer without a launch):

  scatter: rows_out[row_of[t, j]] = w[t, j] * tokens_in[t]; with DOTS also
           grad_weights[t, j] = dot(tokens_in[t], rows_in[row_of[t, j]])   (permute fwd; unpermute bwd)
  gather:  tokens_out[t] = sum_j w[t, j] * rows_in[row_of[t, j]]            (unpermute fwd; permute bwd)

Row addresses are computed in int64 (N * H passes 2**31 for a large batch). Weights are fp32 (T, k); a null
weight pointer is not expressible in Triton, so HAS_WEIGHTS selects the unit-weight variant.
"""

# kernels/ imported as a top-level package (Python started in the repository root): see pytrain/triton/__init__.py
if not __name__.startswith("pytrain.triton."):
    raise ImportError(f"{__name__}: kernels/ is the package pytrain.triton; import pytrain.triton{__name__[7:]}")

import triton
import triton.language as tl


def _block_h(hidden: int, top_k: int) -> int:
    # A [K_POW2, BLOCK_H] tile of at most 4096 elements: about 16 KB of fp32 registers per program.
    return max(16, min(triton.next_power_of_2(hidden), 4096 // triton.next_power_of_2(top_k), 1024))


@triton.jit
def _slots(RowOf, Weights, token, top_k, K_POW2: tl.constexpr, HAS_WEIGHTS: tl.constexpr):
    """This token's rows (int64; -1 for dropped and padding slots) and fp32 weights (0 where no row)."""
    slots = tl.arange(0, K_POW2)
    in_k = slots < top_k
    rows = tl.load(RowOf + token * top_k + slots, mask=in_k, other=-1)
    kept = rows >= 0
    if HAS_WEIGHTS:
        w = tl.load(Weights + token * top_k + slots, mask=in_k & kept, other=0.0)
    else:
        w = tl.where(kept, 1.0, 0.0)
    return slots, in_k, rows, kept, w


@triton.jit
def _scatter_kernel(
    TokensIn,
    RowsIn,
    RowsOut,
    RowOf,
    Weights,
    GradWeights,
    top_k,
    hidden,
    K_POW2: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    DOTS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slots, in_k, rows, kept, w = _slots(RowOf, Weights, token, top_k, K_POW2, HAS_WEIGHTS)
    dot = tl.zeros([K_POW2], dtype=tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        dims = h0 + tl.arange(0, BLOCK_H)
        in_h = dims < hidden
        src = tl.load(TokensIn + token * hidden + dims, mask=in_h, other=0.0).to(tl.float32)
        mask = kept[:, None] & in_h[None, :]
        offsets = rows[:, None] * hidden + dims[None, :]
        tl.store(RowsOut + offsets, (w[:, None] * src[None, :]).to(RowsOut.dtype.element_ty), mask=mask)
        if DOTS:
            other = tl.load(RowsIn + offsets, mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(other * src[None, :], 1)
    if DOTS:
        tl.store(GradWeights + token * top_k + slots, dot, mask=in_k)


@triton.jit
def _gather_kernel(
    RowsIn,
    TokensOut,
    RowOf,
    Weights,
    top_k,
    hidden,
    K_POW2: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    _, _, rows, kept, w = _slots(RowOf, Weights, token, top_k, K_POW2, HAS_WEIGHTS)
    for h0 in range(0, hidden, BLOCK_H):
        dims = h0 + tl.arange(0, BLOCK_H)
        in_h = dims < hidden
        src = tl.load(RowsIn + rows[:, None] * hidden + dims[None, :], mask=kept[:, None] & in_h[None, :], other=0.0)
        y = tl.sum(w[:, None] * src.to(tl.float32), 0)
        tl.store(TokensOut + token * hidden + dims, y.to(TokensOut.dtype.element_ty), mask=in_h)


def scatter(tokens_in, row_of, weights, rows_out, rows_in=None, grad_weights=None) -> None:
    """rows_out[row_of[t, j]] = weights[t, j] * tokens_in[t] (weights None: 1); with rows_in and grad_weights
    (fp32 (T, k)), also grad_weights[t, j] = dot(tokens_in[t], rows_in[row_of[t, j]]), 0 for dropped slots.
    Every tensor contiguous, validated by the caller."""
    tokens, hidden = tokens_in.shape
    top_k = row_of.shape[1]
    if tokens == 0:
        return
    dots = grad_weights is not None
    _scatter_kernel[(tokens,)](
        tokens_in,
        rows_in if dots else rows_out,
        rows_out,
        row_of,
        weights if weights is not None else row_of,
        grad_weights if dots else row_of,
        top_k,
        hidden,
        K_POW2=triton.next_power_of_2(top_k),
        BLOCK_H=_block_h(hidden, top_k),
        HAS_WEIGHTS=weights is not None,
        DOTS=dots,
    )


def gather(rows_in, row_of, weights, tokens_out) -> None:
    """tokens_out[t] = sum_j weights[t, j] * rows_in[row_of[t, j]] (weights None: 1; dropped slots add 0)."""
    tokens, hidden = tokens_out.shape
    top_k = row_of.shape[1]
    if tokens == 0:
        return
    _gather_kernel[(tokens,)](
        rows_in,
        tokens_out,
        row_of,
        weights if weights is not None else row_of,
        top_k,
        hidden,
        K_POW2=triton.next_power_of_2(top_k),
        BLOCK_H=_block_h(hidden, top_k),
        HAS_WEIGHTS=weights is not None,
    )
