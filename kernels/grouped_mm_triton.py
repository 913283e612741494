"""Grouped GEMM over experts in Triton: out[rows of group e] = a[rows of group e] @ B_e, fp32 accumulation.

Groups are contiguous row ranges given by `offsets` (E,) int32 on the device, the cumulative row counts
(offsets[e] = end of group e; the last equals the row count): nothing is read back to the host.

  forward  out (N, M) = x (N, K) @ weight[e].T      weight (E, M, K)   (_rows_kernel, B[k, n] = weight[e, n, k])
  dx       dx (N, K)  = dy (N, M) @ weight[e]                          (_rows_kernel, B[k, n] = weight[e, k, n])
  dweight  dw[e] (M, K) = dy[group e].T @ x[group e]                   (_weight_grad_kernel; 0 for an empty group)

Row tiles: group e owns cdiv(rows_e, BLOCK_M) tiles; program (pid_m, pid_n) finds its group by counting the
groups whose cumulative tile count is <= pid_m (one vector load of E_POW2 offsets), so the grid is the static
bound cdiv(N, BLOCK_M) + E on axis 0 and programs past the last tile return at once. Addresses are int64.
fp32 inputs use exact ("ieee") dots, as torch's default fp32 matmul; 16-bit inputs use tensor cores.
"""

# kernels/ imported as a top-level package (Python started in the repository root): see pytrain/triton/__init__.py
if not __name__.startswith("pytrain.triton."):
    raise ImportError(f"{__name__}: kernels/ is the package pytrain.triton; import pytrain.triton{__name__[7:]}")

import os

import torch
import triton
import triton.language as tl


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); the autotuner keeps the fastest per (K, M, E, bucket of N,
# dtype): the routed row count N changes every step, its power-of-two bucket seldom (rows_bucket_of). Three
# candidates only: each costs a compile per dtype, and bench/gpu/run.sh's test step has a fixed budget. Not yet
# tuned on a GPU (bench/test_moe_kernels_bench.py).
_CONFIGS = [
    (128, 128, 64, 8, 3),
    (64, 128, 64, 4, 3),
    (64, 64, 32, 4, 4),
]
_CONFIG_INTERPRETER = (16, 16, 16, 1, 1)


def rows_bucket_of(rows: int) -> int:
    """The autotuner's row-count key: the tiles that win for a small batch (a test step's) need not win for a large
    one, so each power of two tunes apart; 256 rows and fewer share one, as do 65536 and more."""
    return min(max(triton.next_power_of_2(rows), 256), 65536)


def _autotuned(key):
    candidates = [_CONFIG_INTERPRETER] if _interpreting() else _CONFIGS

    def prune(configs, named_args, **kwargs):
        # PYTRAIN_MOE_AUTOTUNE=0: the first candidate only, no timing (small-shape GPU tests: each candidate costs a
        # compile, and bench/gpu/run.sh's test step has a fixed budget).
        return configs[:1] if os.environ.get("PYTRAIN_MOE_AUTOTUNE", "1") == "0" else configs

    return triton.autotune(
        configs=[
            triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in candidates
        ],
        key=key,
        prune_configs_by={"early_config_prune": prune},
        cache_results=True,
    )


@_autotuned(["out_cols", "inner", "num_groups", "rows_bucket"])
@triton.jit
def _rows_kernel(
    A,
    B,
    C,
    Offsets,
    num_groups,
    inner,
    out_cols,
    rows_bucket,  # read by the autotuner only (its key)
    stride_be,
    stride_bk,
    stride_bn,
    E_POW2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """C[r, n] = sum_k A[r, k] * B[group(r), k, n]: A (rows, inner) and C (rows, out_cols) contiguous."""
    pid_m = tl.program_id(0)
    groups = tl.arange(0, E_POW2)
    ends = tl.load(Offsets + groups, mask=groups < num_groups, other=0)
    starts = tl.load(Offsets + groups - 1, mask=(groups > 0) & (groups < num_groups), other=0)
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    tile_ends = tl.cumsum(tiles, 0)
    group = tl.sum((tile_ends <= pid_m).to(tl.int32), 0)  # groups whose tiles all come before this one
    if group < num_groups:
        first_tile = tl.sum(tl.where(groups < group, tiles, 0), 0)
        row_start = tl.sum(tl.where(groups == group, starts, 0), 0)
        row_end = tl.sum(tl.where(groups == group, ends, 0), 0)
        rows = (row_start + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < row_end
        col_ok = cols < out_cols
        b_base = B + tl.cast(group, tl.int64) * stride_be
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, inner, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < inner
            a = tl.load(A + rows[:, None] * inner + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(
                b_base + ks[:, None].to(tl.int64) * stride_bk + cols[None, :].to(tl.int64) * stride_bn,
                mask=k_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        tl.store(
            C + rows[:, None] * out_cols + cols[None, :],
            acc.to(C.dtype.element_ty),
            mask=row_ok[:, None] & col_ok[None, :],
        )


@_autotuned(["out_rows", "out_cols", "num_groups", "rows_bucket"])
@triton.jit
def _weight_grad_kernel(
    DY,
    X,
    DW,
    Offsets,
    num_groups,
    out_rows,
    out_cols,
    rows_bucket,  # read by the autotuner only (its key)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """DW[e, m, n] = sum over rows r of group e of DY[r, m] * X[r, n]: DY (rows, out_rows), X (rows, out_cols)."""
    group = tl.program_id(0)
    row_start = tl.load(Offsets + group - 1, mask=group > 0, other=0).to(tl.int64)
    row_end = tl.load(Offsets + group).to(tl.int64)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < out_rows
    n_ok = ns < out_cols
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_K):
        rows = r0 + tl.arange(0, BLOCK_K)
        r_ok = rows < row_end
        dy_t = tl.load(DY + rows[None, :] * out_rows + ms[:, None], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        x = tl.load(X + rows[:, None] * out_cols + ns[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(dy_t, x, acc, input_precision=PRECISION)
    out = DW + tl.cast(group, tl.int64) * out_rows * out_cols + ms[:, None].to(tl.int64) * out_cols + ns[None, :]
    tl.store(out, acc.to(DW.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _rows_matmul(a, b, offsets, out_cols: int, stride_bk: int, stride_bn: int) -> torch.Tensor:
    rows, inner = a.shape
    groups = b.shape[0]
    out = torch.empty(rows, out_cols, device=a.device, dtype=a.dtype)
    _rows_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) + groups, triton.cdiv(out_cols, meta["BLOCK_N"]))](
        a,
        b,
        out,
        offsets,
        groups,
        inner,
        out_cols,
        rows_bucket_of(rows),
        b.stride(0),
        stride_bk,
        stride_bn,
        E_POW2=triton.next_power_of_2(groups),
        PRECISION=_precision(a.dtype),
    )
    return out


def grouped_mm_forward(x, weight, offsets) -> torch.Tensor:
    """x (N, K) @ weight[e].T per group -> (N, M); x and weight contiguous, N, K, M >= 1 (checked by the caller)."""
    _, out_cols, inner = weight.shape
    return _rows_matmul(x, weight, offsets, out_cols, stride_bk=1, stride_bn=inner)


def grouped_mm_dx(dy, weight, offsets) -> torch.Tensor:
    """dy (N, M) @ weight[e] per group -> (N, K)."""
    out_cols = weight.shape[2]
    return _rows_matmul(dy, weight, offsets, out_cols, stride_bk=out_cols, stride_bn=1)


def grouped_mm_dweight(dy, x, offsets, groups: int) -> torch.Tensor:
    """dy[group e].T @ x[group e] -> (E, M, K); zeros for a group without rows."""
    out_rows, out_cols = dy.shape[1], x.shape[1]
    dw = torch.empty(groups, out_rows, out_cols, device=x.device, dtype=x.dtype)
    _weight_grad_kernel[
        lambda meta: (groups, triton.cdiv(out_rows, meta["BLOCK_M"]), triton.cdiv(out_cols, meta["BLOCK_N"]))
    ](dy, x, dw, offsets, groups, out_rows, out_cols, rows_bucket_of(x.shape[0]), PRECISION=_precision(x.dtype))
    return dw
