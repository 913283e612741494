"""Mixture-of-experts layer forward+backward: pytrain's permute + grouped GEMM + unpermute vs the plain loop.

A SwiGLU expert layer, y = sum_j w[t, j] * W2_e (silu(W1_e x) * W3_e x) over each token's k experts, forward and
backward (gradients of x, the routing weights and the three stacked expert weights), rows side by side:
  pytrain         moe_permute -> grouped_mm x3 (default implementation) -> moe_unpermute
  pytrain_<gemm>  the same with PYTRAIN_GROUPED_MM=<gemm>: loop (torch.mm per expert), triton (CUDA); grouped_mm's
                  default is chosen from these rows and the grouped_mm group
  moe_loop        eager PyTorch per expert: torch.where(ids == e) -> index_select -> three matmuls -> index_add_
  compile         torch.compile of that loop (graph breaks at the data-dependent torch.where, as a user gets it)
FLOPs: 3 GEMMs of 2 * N * H * F, times 3 for forward + backward (N routed rows); the peak is a square matmul
in the same dtype measured in the same run (bench/conftest.py). A second group times grouped_mm alone
(forward + backward) per implementation; a third the permutation alone, permute + unpermute forward + backward
(pytrain vs the plain-PyTorch reference, which builds (T, k, H), vs torch.compile of it), as achieved bandwidth
against copy bandwidth. On the CPU that group is dominated by first-touch page faults of its fresh outputs
(glibc maps allocations over 32 MB anew; see test_rms_norm_bench.py): THP_MEM_ALLOC_ENABLE=1 shrinks them.
CPU shapes stay small (2 shared cores); CUDA rows need a GPU (bench/gpu/run.sh runs them).
"""

import os
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from pytrain.kernels import grouped_mm, moe_permute, moe_unpermute, reference

from .conftest import NEEDS_CUDA

# (device, dtype, tokens, hidden, ffn, experts, top_k)
CASES = [
    pytest.param("cpu", torch.float32, 2048, 256, 512, 8, 2, id="cpu-fp32-T2048-H256-F512-E8-k2"),
    pytest.param("cpu", torch.bfloat16, 2048, 256, 512, 8, 2, id="cpu-bf16-T2048-H256-F512-E8-k2"),
    pytest.param(
        "cuda", torch.bfloat16, 8192, 2048, 1408, 16, 4, id="cuda-bf16-T8192-H2048-F1408-E16-k4", marks=NEEDS_CUDA
    ),
]
# Rows per device ("pytrain" is grouped_mm's default: torch._grouped_mm on the CPU and on sm90+ for bf16).
LAYER_IMPLS = {
    "cpu": ["pytrain", "pytrain_loop", "moe_loop", "compile"],
    "cuda": ["pytrain", "pytrain_triton", "moe_loop"],
}
GEMM_IMPLS = {"cpu": ["loop", "torch"], "cuda": ["torch", "triton", "loop"]}


def with_impls(cases, impls, name=lambda impl: impl):
    """Each case's parameters plus one of its device's implementations (so no combination is a skip)."""
    return [
        pytest.param(*case.values, impl, id=f"{case.id}-{name(impl)}", marks=case.marks)
        for case in cases
        for impl in impls[case.values[0]]
    ]


@contextmanager
def gemm_implementation(name):
    before = os.environ.get("PYTRAIN_GROUPED_MM")
    os.environ["PYTRAIN_GROUPED_MM"] = name
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTRAIN_GROUPED_MM")
        else:
            os.environ["PYTRAIN_GROUPED_MM"] = before


def make(device, dtype, tokens, hidden, ffn, experts, top_k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    logits = torch.randn(tokens, experts, generator=g)
    weights, ids = logits.softmax(-1).topk(top_k, dim=-1)
    scale = hidden**-0.5
    w1, w3 = ((torch.randn(experts, ffn, hidden, generator=g) * scale).to(device, dtype) for _ in range(2))
    w2 = (torch.randn(experts, hidden, ffn, generator=g) * ffn**-0.5).to(device, dtype)
    dy = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    return x, ids.to(device), weights.to(device), w1, w3, w2, dy


def pytrain_layer(x, ids, weights, w1, w3, w2, experts):
    permuted, row_of, counts = moe_permute(x, ids, experts)
    hidden = F.silu(grouped_mm(permuted, w1, counts)) * grouped_mm(permuted, w3, counts)
    return moe_unpermute(grouped_mm(hidden, w2, counts), row_of, weights)


def loop_layer(x, ids, weights, w1, w3, w2, experts):
    """The plain per-expert loop a model writes without fused kernels."""
    y = torch.zeros_like(x)
    for e in range(experts):
        token, slot = torch.where(ids == e)
        xe = x.index_select(0, token)
        h = F.silu(xe @ w1[e].t()) * (xe @ w3[e].t())
        y.index_add_(0, token, (h @ w2[e].t()) * weights[token, slot, None].to(x.dtype))
    return y


def train_step(impl, x, ids, weights, w1, w3, w2, dy, experts):
    leaves = [t.detach().requires_grad_() for t in (x, weights, w1, w3, w2)]
    if impl == "moe_loop":
        layer = loop_layer
    elif impl == "compile":
        torch._dynamo.reset()
        layer = torch.compile(loop_layer)
    else:
        layer = pytrain_layer
    gemm = impl.removeprefix("pytrain_") if impl.startswith("pytrain_") else None

    def step():
        a, w, p, q, r = leaves
        if gemm is None:
            y = layer(a, ids, w, p, q, r, experts)
            return torch.autograd.grad(y, leaves, dy)
        with gemm_implementation(gemm):
            y = layer(a, ids, w, p, q, r, experts)
            return torch.autograd.grad(y, leaves, dy)

    return step


@pytest.mark.parametrize(
    "device,dtype,tokens,hidden,ffn,experts,top_k,gemm", with_impls(CASES, GEMM_IMPLS, lambda g: f"pytrain_{g}")
)
def test_grouped_mm_forward_backward(benchmark, compute, device, dtype, tokens, hidden, ffn, experts, top_k, gemm):
    x, ids, _, w1, _, _, _ = make(device, dtype, tokens, hidden, ffn, experts, top_k)
    permuted, _, counts = moe_permute(x, ids, experts)
    a, w = permuted.detach().requires_grad_(), w1.detach().requires_grad_()
    dy = torch.randn(permuted.shape[0], ffn, device=device, dtype=dtype)

    def step():
        with gemm_implementation(gemm):
            return torch.autograd.grad(grouped_mm(a, w, counts), (a, w), dy)

    compute(
        benchmark,
        step,
        device=device,
        flops=6 * permuted.shape[0] * hidden * ffn,
        dtype=dtype,
        group=f"grouped_mm fwd+bwd {device} {str(dtype)[6:]} N{permuted.shape[0]} K{hidden} M{ffn} E{experts}",
        impl=f"pytrain_{gemm}",
        warmup=2,
    )


@pytest.mark.parametrize("device,dtype,tokens,hidden,ffn,experts,top_k,impl", with_impls(CASES, LAYER_IMPLS))
def test_moe_layer_forward_backward(benchmark, compute, device, dtype, tokens, hidden, ffn, experts, top_k, impl):
    x, ids, weights, w1, w3, w2, dy = make(device, dtype, tokens, hidden, ffn, experts, top_k)
    rows = ids.numel()
    compute(
        benchmark,
        train_step(impl, x, ids, weights, w1, w3, w2, dy, experts),
        device=device,
        flops=18 * rows * hidden * ffn,
        dtype=dtype,
        group=f"moe layer fwd+bwd {device} {str(dtype)[6:]} T{tokens} H{hidden} F{ffn} E{experts} k{top_k}",
        impl=impl,
        warmup=2,
    )


@pytest.mark.parametrize("device,dtype,tokens,hidden,ffn,experts,top_k", CASES)
def test_results_agree(device, dtype, tokens, hidden, ffn, experts, top_k):
    """Sanity: the rows above compute the same thing (loose: 16-bit rounding; this is not the test suite)."""
    x, ids, weights, w1, w3, w2, _ = make(device, dtype, tokens // 4, hidden, ffn, experts, top_k)
    want = loop_layer(*(t.float() if t.is_floating_point() else t for t in (x, ids, weights, w1, w3, w2)), experts)
    for gemm in GEMM_IMPLS[device]:
        with gemm_implementation(gemm):
            got = pytrain_layer(x, ids, weights, w1, w3, w2, experts)
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2, msg=lambda m: f"{gemm}: {m}")


# (device, dtype, tokens, hidden, experts, top_k)
PERMUTE_CASES = [
    pytest.param("cpu", torch.bfloat16, 4096, 2048, 8, 2, id="cpu-bf16-T4096-H2048-E8-k2"),
    pytest.param("cpu", torch.float32, 4096, 2048, 8, 2, id="cpu-fp32-T4096-H2048-E8-k2"),
    pytest.param("cuda", torch.bfloat16, 16384, 4096, 64, 8, id="cuda-bf16-T16384-H4096-E64-k8", marks=NEEDS_CUDA),
]
PERMUTE_IMPLS = {"pytrain": (moe_permute, moe_unpermute), "eager": (reference.moe_permute, reference.moe_unpermute)}
PERMUTE_ROWS = {"cpu": ["pytrain", "eager", "compile"], "cuda": ["pytrain"]}  # CUDA: run.sh's time budget


@pytest.mark.parametrize("device,dtype,tokens,hidden,experts,top_k,impl", with_impls(PERMUTE_CASES, PERMUTE_ROWS))
def test_permute_unpermute_forward_backward(benchmark, bandwidth, device, dtype, tokens, hidden, experts, top_k, impl):
    x, ids, weights, *_ = make(device, dtype, tokens, hidden, 16, experts, top_k)
    permute, unpermute = PERMUTE_IMPLS["eager" if impl == "compile" else impl]
    if impl == "compile":
        torch._dynamo.reset()
        permute, unpermute = torch.compile(permute), torch.compile(unpermute)
    leaves = [x.detach().requires_grad_(), weights.detach().requires_grad_()]
    dy = torch.randn_like(x)

    def step():
        permuted, row_of, _ = permute(leaves[0], ids, experts)
        return torch.autograd.grad(unpermute(permuted * 2, row_of, leaves[1]), leaves, dy)

    rows = ids.numel()
    bandwidth(
        benchmark,
        step,
        device=device,
        # permute: read T, write N rows; unpermute: read N, write T; backward: read T, read N twice (the expert rows
        # for the weights' gradient, the gradient), write N, then read N, write T. (The `* 2` between: 2N more.)
        bytes_moved=(4 * tokens + 7 * rows) * hidden * x.element_size(),
        copy_like=x,
        group=f"moe permute+unpermute fwd+bwd {device} {str(dtype)[6:]} T{tokens} H{hidden} E{experts} k{top_k}",
        impl=impl,
    )
