"""One training step taken apart: where the time of pytrain's step goes (GEMMs, attention, norms / rotary /
activations, the loss, copies / casts / allocation, the optimizer, the rest), beside the matmul peak measured
in the same run (bench/test_peer_step.py puts the peers' steps beside pytrain's: transformers, torchtitan, litgpt).

The model is a Llama of 8 layers, hidden 512, 8 heads, MLP 1536, vocabulary 32000 (60,039,680 parameters), one
process, micro-batch 4 of 512 tokens, AdamW with gradient clipping at 1.0, the loss the Trainer's (LMLoss:
pytrain's fused cross-entropy), in a process that keeps freed memory as a CPU run does (launch.keep_freed_memory).
Times are the profiler's self CPU time per op, summed per category (an op is counted once, in the first category
whose pattern its name contains), and the optimizer step's wall time. The matmul peak is that of the GEMM
pytrain's linears run (pytrain.kernels.linear: 16-bit operands as fp32 copies on a CPU without 16-bit units),
PyTorch's own kernel beside it. The same step without the fused AdamW and SwiGLU (bench/unfused.py: eager
silu * up, torch's AdamW ops with a clip pass and a cast pass) is profiled and timed in the same run, alternating
step by step with the fused one: "fused / before". `--benchmark-disable` runs a 2-layer, 64-wide model once per
dtype, as a smoke test of the accounting. On a GPU, test_step_profile_1b_cuda takes configs/1B.py's step apart
the same way (kernel time per category; bench/gpu/run.sh runs it).
"""

import contextlib
import statistics
import time
from pathlib import Path

import pytest
import torch

from pytrain.config import Config
from pytrain.initialize.launch import keep_freed_memory
from pytrain.model.families import INTERNLM, LLAMA2
from pytrain.model.loss import LMLoss
from pytrain.monitor import flops_per_token, matmul_params, measure_matmul_tflops, peak_tflops
from pytrain.parallel.model_part import parallelize
from pytrain.solver import HybridZeroOptimizer

from .conftest import NEEDS_CUDA
from .unfused import unfused

FULL = dict(num_layers=8, hidden_size=512, num_attention_heads=8, vocab_size=32000, micro_bsz=4, seq_len=512)
SMOKE = dict(num_layers=2, hidden_size=64, num_attention_heads=4, vocab_size=256, micro_bsz=1, seq_len=64)
MLP_RATIO, MLP_MULTIPLE = 8 / 3, 256  # 512 x 8/3 -> 1536, as Llama's rule gives: 60,039,680 parameters
CATEGORIES = {  # first match wins: GEMMs before "aten::add" would catch addmm
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "grouped_mm"),
    "attention": ("scaled_dot_product", "flash_attn", "attention"),
    "loss": ("cross_entropy", "log_softmax", "nll_loss"),
    "norms, rotary, activations": (
        "rms_norm",
        "rotary",
        "swiglu",
        "silu",
        "gelu",
        "aten::mul",
        "aten::add",
        "aten::neg",
    ),
    "copies, casts, allocation": ("copy_", "_to_copy", "empty", "fill_", "zero_", "clone", "aten::cat"),
}


def category_of(op_name: str) -> str:
    return next((name for name, patterns in CATEGORIES.items() if any(p in op_name for p in patterns)), "other")


def next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """Each token's label is the next token; the last of a row has none (-100), as pytrain's loader gives them."""
    return torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)


def forward_backward(model, ids: torch.Tensor, backward) -> None:
    """pytrain's step as the Trainer runs it: the model's logits into LMLoss (pytrain's fused cross-entropy)."""
    backward(LMLoss()(model(input_ids=ids), next_token_labels(ids)))


def step_profile(model, zero_grad, backward, optimizer_step, ids: torch.Tensor) -> dict[str, float]:
    """Seconds per category of one step: the forward and backward under the profiler (on a GPU: the kernels' time,
    each counted under the op that launched it), the optimizer timed."""
    cuda = ids.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    zero_grad()
    with torch.profiler.profile(activities=activities) as profile:
        forward_backward(model, ids, backward)
        if cuda:
            torch.cuda.synchronize()
    seconds = dict.fromkeys([*CATEGORIES, "other"], 0.0)
    for event in profile.key_averages():
        seconds[category_of(event.key)] += (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1e6
    start = time.perf_counter()
    optimizer_step()
    if cuda:
        torch.cuda.synchronize()
    seconds["optimizer"] = time.perf_counter() - start
    return seconds


def alternating_medians(variants: dict, rounds: int) -> dict[str, float]:
    """The median wall time of each variant's step, {name: (context factory, zero_grad, step)}, the variants
    alternating step by step so that a drifting machine load weighs on all alike; one warm-up step each."""
    times = {name: [] for name in variants}
    for index in range(rounds + 1):
        for name, (context, zero_grad, step) in variants.items():
            with context():
                zero_grad()
                start = time.perf_counter()
                step()
                if index:
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(spans) for name, spans in times.items()}


def timed_fused_and_before(zero_grad, step, rounds: int, monkeypatch) -> tuple[float, float]:
    """The median wall time of pytrain's step and of the same step without the fused AdamW and SwiGLU
    (bench/unfused.py), alternating."""
    medians = alternating_medians(
        {
            "fused": (contextlib.nullcontext, zero_grad, step),
            "before": (lambda: unfused(monkeypatch), zero_grad, step),
        },
        rounds,
    )
    return medians["fused"], medians["before"]


def timed_steps(zero_grad, step, rounds: int) -> float:
    """The median wall time of `rounds` whole steps, after one warm-up step."""
    times = []
    for index in range(rounds + 1):
        zero_grad()
        start = time.perf_counter()
        step()
        if index:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def pytrain_step(
    shape: dict, dtype: str, device: str = "cpu", clip_grad_norm: float = 1.0, family=LLAMA2, no_bias: bool = True
):
    """pytrain's model and optimizer as a run builds them (clipping at 1.0: the config's default)."""
    with torch.device("meta"):
        whole = family.build(
            **{k: shape[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")},
            mlp_ratio=MLP_RATIO,
            multiple_of=MLP_MULTIPLE,
            no_bias=no_bias,
            dtype=dtype,
        )
    model = parallelize(whole, device=torch.device(device))
    optimizer = HybridZeroOptimizer(model, lr=1e-4, weight_decay=0.1, clip_grad_norm=clip_grad_norm)
    return model, optimizer


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_step_profile(benchmark, monkeypatch, dtype):
    shape = FULL if benchmark.enabled else SMOKE
    keep_freed_memory()  # as a CPU run's launch does
    torch_dtype = getattr(torch, dtype.removeprefix("torch."))
    ids = torch.randint(0, shape["vocab_size"], (shape["micro_bsz"], shape["seq_len"]))
    model, optimizer = pytrain_step(shape, dtype)
    # Warm-up steps: the profiles below compare steady steps, after the heap has grown to the step's high-water
    # mark (until then a step's large tensors still land on fresh pages: the loss took 0.7 s of a 5.5 s step
    # profiled after one warm-up step, 0.04 s after four).
    for _ in range(4 if benchmark.enabled else 1):
        optimizer.zero_grad()
        forward_backward(model, ids, optimizer.backward)
        optimizer.step()
    profile = step_profile(model, optimizer.zero_grad, optimizer.backward, optimizer.step, ids)
    assert profile["gemm"] > 0 and profile["optimizer"] > 0 and profile["loss"] > 0
    with unfused(monkeypatch):
        profile_before = step_profile(model, optimizer.zero_grad, optimizer.backward, optimizer.step, ids)

    def step():
        forward_backward(model, ids, optimizer.backward)
        optimizer.step()

    rounds = 3 if benchmark.enabled else 1
    seconds, seconds_before = benchmark.pedantic(
        timed_fused_and_before, args=(optimizer.zero_grad, step, rounds, monkeypatch), rounds=1, iterations=1
    )
    block_params, head_params = matmul_params(model)
    tokens = shape["micro_bsz"] * shape["seq_len"]
    per_token = flops_per_token(block_params, head_params, shape["num_layers"], shape["hidden_size"], shape["seq_len"])
    flops = tokens * per_token
    # The GEMM pytrain's linears run, best of many trials: one short probe came out 30% low in a quiet run.
    peak = measure_matmul_tflops(torch.device("cpu"), torch_dtype, budget_s=3.0, trials=30) * 1e12
    torch_peak = measure_matmul_tflops(torch.device("cpu"), torch_dtype, multiply=torch.mm) * 1e12
    row = {
        "dtype": dtype,
        "tokens/s": tokens / seconds,
        "fraction of the matmul peak": flops / seconds / peak,
        "matmul peak GFLOP/s": peak / 1e9,
        "PyTorch's own matmul GFLOP/s": torch_peak / 1e9,
        "profiled step s": sum(profile.values()),
        **{f"{name} share": value / sum(profile.values()) for name, value in profile.items()},
        "before the fused AdamW and SwiGLU: tokens/s": tokens / seconds_before,
        "fused / before": seconds_before / seconds,
        **{f"{name} s, fused / before": f"{profile[name]:.3f} / {value:.3f}" for name, value in profile_before.items()},
    }
    benchmark.extra_info.update(row)
    print("\n" + "\n".join(f"{key:>32}: {value}" for key, value in row.items()))


def test_attention_biases_cost(benchmark):
    """INTERNLM with InternLM v1's attention biases (no_bias=False, its default) against the same model without
    them, fp32, whole steps alternating (issue 25's goal: within 3%)."""
    shape = FULL if benchmark.enabled else SMOKE
    ids = torch.randint(0, shape["vocab_size"], (shape["micro_bsz"], shape["seq_len"]))
    variants = {}
    for name, no_bias in (("biased", False), ("unbiased", True)):
        model, optimizer = pytrain_step(shape, "torch.float32", family=INTERNLM, no_bias=no_bias)

        def step(model=model, optimizer=optimizer):
            forward_backward(model, ids, optimizer.backward)
            optimizer.step()

        variants[name] = (contextlib.nullcontext, optimizer.zero_grad, step)
    rounds = 10 if benchmark.enabled else 1
    medians = benchmark.pedantic(alternating_medians, args=(variants, rounds), rounds=1, iterations=1)
    tokens = shape["micro_bsz"] * shape["seq_len"]
    row = {f"{name} tokens/s": tokens / seconds for name, seconds in medians.items()}
    row["biased / unbiased step time"] = medians["biased"] / medians["unbiased"]
    benchmark.extra_info.update(row)
    print("\n" + "\n".join(f"{key:>28}: {value:.3f}" for key, value in row.items()))
    assert all(seconds > 0 for seconds in medians.values())


# configs/1B.py's model and micro-batch (test_one_b_shape_is_the_config checks it), for the GPU's step breakdown.
ONE_B = dict(num_layers=18, hidden_size=2048, num_attention_heads=16, vocab_size=32000, micro_bsz=2, seq_len=4096)


def test_one_b_shape_is_the_config():
    cfg = Config.from_file(Path(__file__).parents[1] / "configs" / "1B.py")
    assert cfg.model_type == "INTERNLM" and cfg.model.dtype == "torch.bfloat16" and not cfg.model.checkpoint
    assert {k: cfg.model[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")} == {
        k: ONE_B[k] for k in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size")
    }
    assert (cfg.data.micro_bsz, cfg.data.seq_len, cfg.model.multiple_of) == (ONE_B["micro_bsz"], ONE_B["seq_len"], 256)


@NEEDS_CUDA
def test_step_profile_1b_cuda(benchmark):
    """configs/1B.py's step on one GPU (bf16, fp32 masters, pytrain's kernels, one micro-batch): where the kernels'
    time goes, beside the GPU's datasheet peak (bench/gpu/run.sh runs it)."""
    device = torch.device("cuda")
    ids = torch.randint(0, ONE_B["vocab_size"], (ONE_B["micro_bsz"], ONE_B["seq_len"]), device=device)
    model, optimizer = pytrain_step(ONE_B, "torch.bfloat16", device="cuda", family=INTERNLM, no_bias=False)

    def step():
        forward_backward(model, ids, optimizer.backward)
        optimizer.step()
        torch.cuda.synchronize()

    optimizer.zero_grad()
    step()  # warm-up: autotuning and the allocator's first blocks
    profile = step_profile(model, optimizer.zero_grad, optimizer.backward, optimizer.step, ids)
    seconds = benchmark.pedantic(timed_steps, args=(optimizer.zero_grad, step, 3), rounds=1, iterations=1)
    block_params, head_params = matmul_params(model)
    tokens = ONE_B["micro_bsz"] * ONE_B["seq_len"]
    per_token = flops_per_token(block_params, head_params, ONE_B["num_layers"], ONE_B["hidden_size"], ONE_B["seq_len"])
    peak, source = peak_tflops(device, torch.bfloat16)
    row = {
        "device": torch.cuda.get_device_name(device),
        "tokens/s": tokens / seconds,
        "MFU": tokens * per_token / seconds / (peak * 1e12),
        "peak TFLOPS": f"{peak} ({source})",
        "step s": seconds,
        "profiled kernels + optimizer s": sum(profile.values()),
        **{f"{name} share": value / sum(profile.values()) for name, value in profile.items()},
        "peak memory GiB": torch.cuda.max_memory_allocated(device) / 2**30,
    }
    benchmark.extra_info.update(row)
    print("\n" + "\n".join(f"{key:>32}: {value}" for key, value in row.items()))
    assert profile["gemm"] > 0 and profile["attention"] > 0
