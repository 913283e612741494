"""Training FLOPs per token and the device's peak, for the TFLOPS and MFU columns of the step line.

FLOPs per token (Megatron's accounting, recompute included, as InternLM reports):
    (6 + 2f) * P_blocks + 6 * P_head + (12 + 4f) * L * a * s
P_blocks: weights of the matmuls inside the decoder layers; P_head: the LM head's; L layers whose
attention is a = heads x head_dim wide (the hidden size, but for families whose head_dim is not
hidden / heads: Gemma-7B 16 x 256 = 4096 on a hidden size of 3072), at sequence length s; f the fraction
of layers whose forward is recomputed (model.checkpoint). A matmul with P weights costs 2P FLOPs per token
forward and 4P backward; attention scores (q.k over a) and the weighted sum (of v, a wide) cost 4*a*s per
token per layer forward (causal masking not discounted) and twice that backward.
Embedding lookups and element-wise ops are not counted.
"""

import time
from collections.abc import Callable

import torch
from torch import nn

from pytrain.kernels.linear import mm

# Dense bf16/fp16 tensor-core peaks (TFLOPS) from the vendors' datasheets, without sparsity.
GPU_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "H800": 989.0,
    "A100": 312.0,
    "A800": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
    "V100": 125.0,
    "4090": 165.0,
}


def matmul_params(model: nn.Module) -> tuple[int, int]:
    """(P_blocks, P_head) of the matmul weights this rank holds and runs: those inside the decoder layers
    (in every pipeline chunk) and the LM head's (a tied head too: it is a matmul as well). A model that is
    not a pytrain decoder counts its nn.Linear weights, those under `layers`/`blocks` as P_blocks. A mixture
    of experts' stacked 3-D expert weights count as the top_k experts a token runs through."""
    block_params = head_params = 0
    for stage in getattr(model, "stages", [model]):
        if hasattr(stage, "tensor_parallel_plan"):  # pytrain.model.decoder.Decoder, whole or a stage
            block_params += sum(p.numel() for p in stage.decoder_layers.parameters() if p.dim() == 2)
            block_params += sum(m.active_expert_params() for m in stage.modules() if hasattr(m, "active_expert_params"))
            head_params += stage.lm_head.weight.numel() if stage.last else 0
            continue
        for name, module in stage.named_modules():
            if isinstance(module, nn.Linear):
                parts = name.split(".")
                if "blocks" in parts or "layers" in parts:
                    block_params += module.weight.numel()
                else:
                    head_params += module.weight.numel()
    return block_params, head_params


def attention_width(model_fields: dict) -> int:
    """heads x head_dim of a config's model section (head_dim unset: hidden_size // heads)."""
    heads = model_fields["num_attention_heads"]
    return heads * (model_fields.get("head_dim") or model_fields["hidden_size"] // heads)


def flops_per_token(
    block_params: int,
    head_params: int,
    num_layers: int,
    attention_width: int,
    seq_len: int,
    recompute_fraction: float = 0.0,
) -> float:
    """The module docstring's count; attention_width is a = heads x head_dim (attention_width(cfg.model))."""
    f = float(recompute_fraction)
    return (6 + 2 * f) * block_params + 6 * head_params + (12 + 4 * f) * num_layers * attention_width * seq_len


def peak_tflops(device: torch.device, dtype: torch.dtype, configured: float | None = None) -> tuple[float, str]:
    """(peak TFLOPS, where it came from): `configured` (monitor.peak_tflops) when given, else the datasheet for
    known GPUs, else a matmul measured now."""
    if configured is not None:
        return float(configured), "monitor.peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_TFLOPS.items():
            if key in name:
                return (peak if dtype in (torch.bfloat16, torch.float16) else peak / 2), f"datasheet ({name})"
    return measure_matmul_tflops(device, dtype), "measured matmul"


def measure_matmul_tflops(
    device: torch.device,
    dtype: torch.dtype,
    max_size: int = 1024,
    budget_s: float = 0.5,
    trials: int = 5,
    multiply: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = mm,
) -> float:
    """Throughput of a square matmul on this device with the current thread count: the machine's limit for the
    GEMMs pytrain's linears run (pytrain.kernels.linear.mm: on a CPU without 16-bit units, 16-bit operands are
    multiplied as fp32 copies); multiply=torch.mm measures PyTorch's own kernel instead.

    The size doubles from 128 up to max_size while a trial at the next size would take under a fifth of budget_s
    (a CPU without 16-bit matmul units multiplies bf16 at about 1 GFLOP/s, where one 1024-square product takes
    seconds); then the best of up to `trials` trials, stopping once budget_s has passed, so that a moment of
    contention does not lower the peak and the measurement stays short on any machine."""

    def trial_seconds(a, b) -> float:  # 4 products per trial: one synchronization per 4 on a GPU
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(4):
            multiply(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    size = 128
    while True:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        multiply(a, b)  # warm up
        seconds = trial_seconds(a, b)
        if size >= max_size or 8 * seconds > budget_s / 5:
            break
        size *= 2
    best, deadline = 4 * 2 * size**3 / seconds / 1e12, time.perf_counter() + budget_s
    for _ in range(trials - 1):
        if time.perf_counter() > deadline:
            break
        best = max(best, 4 * 2 * size**3 / trial_seconds(a, b) / 1e12)
    return best
