"""pytrain's whole training step beside its peers' (bench/peers.py: transformers, torchtitan, litgpt,
megatron-core, each where it installs and runs) on the same model, one process, the same random tokens,
timed in one sitting with the steps alternating (issue 25's end-to-end rows).

The model is the step profile's Llama (bench/test_step_profile.py: 8 layers, hidden 512, 8 heads, vocabulary
32000), every peer built to pytrain's parameter count exactly; pytrain's step is the trainer's
(NonPipelineScheduler over LMLoss, HybridZeroOptimizer with clipping at 1.0). fp32: micro-batch 4 of 512
tokens, and bf16 too on a CPU with bf16 units (AVX512-BF16 or AMX). Without them (AMD Zen 3, AVX2) PyTorch
multiplies bf16 matrices at ~1 GFLOP/s (fp32: 120-160), so there the bf16 row is micro-batch 1 of 128 tokens,
one warm-up step and one timed step each; the steps are GEMM-bound, so tokens/s stays comparable. Keys carry
the micro-batch x sequence they ran at. A peer that is not installed (or cannot run here) is reported as skipped
with the reason. `pytrain / peer`: the peer's step time over pytrain's (above 1: pytrain is faster). The process
keeps freed memory as a pytrain CPU run does (launch.keep_freed_memory); that is process-wide, so the peers in it
get the same allocator. `--benchmark-disable` runs the 2-layer, 64-wide smoke model two steps per installed
peer, as a test of the builders.
"""

import contextlib
import gc
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pytrain.initialize.launch import keep_freed_memory
from pytrain.kernels.linear import multiplies_in_fp32
from pytrain.model import LMLoss
from pytrain.parallel.schedule import NonPipelineScheduler

from .peers import PEERS, LlamaShape, PeerStep, one_process_group
from .test_cross_entropy_bench import peak_memory_growth
from .test_step_profile import FULL, SMOKE, alternating_medians, pytrain_step

ROOT = Path(__file__).parents[1]

BF16_CRAWLING_BATCH = dict(micro_bsz=1, seq_len=128)  # the bf16 row's micro-batch without bf16 units


def pytrain_peer_step(shape: dict, dtype: torch.dtype) -> PeerStep:
    """pytrain's model and optimizer as a run builds them, stepped as the Trainer steps them."""
    model, optimizer = pytrain_step(shape, str(dtype))
    criterion = LMLoss(labels_checked=True)  # the Trainer checks the labels on the host
    schedule = NonPipelineScheduler()

    def forward_backward(inputs, labels):
        batch = {"input_ids": inputs[None], "labels": labels[None]}  # one micro-batch of micro_bsz rows
        _, loss = schedule.forward_backward_step(model, batch, criterion, optimizer)
        return loss

    return PeerStep(model, forward_backward, optimizer.step, optimizer.zero_grad, "pytrain")


def build_step(name: str, shape: dict, dtype: torch.dtype, seq_len: int) -> PeerStep:
    """pytrain's step, or the peer's on pytrain's model (its MLP width read off pytrain's built model)."""
    pytrain = pytrain_peer_step(shape, dtype)
    if name == "pytrain":
        return pytrain
    llama = LlamaShape.of(shape, pytrain.model, seq_len)
    del pytrain
    gc.collect()
    return PEERS[name](llama, dtype)


def print_peak_growth(name: str, dtype_name: str, full: bool, micro_bsz: int, seq_len: int) -> None:
    """In a fresh process (peak_growth_in_a_fresh_process): the smoke model stepped once first (imports and
    first-use caches), then the bytes the resident set grew by at its peak while building `name`'s model and
    optimizer and taking two steps."""
    dtype = getattr(torch, dtype_name.removeprefix("torch."))
    shape = FULL if full else SMOKE
    tokens = torch.randint(0, shape["vocab_size"], (micro_bsz, seq_len + 1))
    keep_freed_memory()
    with one_process_group():
        warm_tokens = tokens[:1, : SMOKE["seq_len"] + 1] % SMOKE["vocab_size"]
        build_step(name, SMOKE, dtype, SMOKE["seq_len"]).step(warm_tokens[:, :-1], warm_tokens[:, 1:])
        gc.collect()

        def two_steps():
            peer = build_step(name, shape, dtype, seq_len)
            for _ in range(2):
                peer.zero_grad()
                peer.step(tokens[:, :-1], tokens[:, 1:])

        print(peak_memory_growth(two_steps, "cpu"))


def peak_growth_in_a_fresh_process(name: str, dtype: torch.dtype, full: bool, micro_bsz: int, seq_len: int) -> int:
    """print_peak_growth run by this interpreter in a process of its own (one process holds one peer's memory)."""
    call = f"print_peak_growth({name!r}, {str(dtype)!r}, {full}, {micro_bsz}, {seq_len})"
    done = subprocess.run(
        [sys.executable, "-c", f"from bench.test_peer_step import print_peak_growth; {call}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1])


@pytest.mark.slow  # a process of its own (5 s); the benchmark run uses the probe for every row
def test_peak_growth_in_a_fresh_process():
    """The memory rows' probe runs and reports (the smoke model is small enough to fit in memory the warm-up
    freed, so only the full rows can check the size: at least weights, gradients and AdamW's two moments)."""
    assert peak_growth_in_a_fresh_process("pytrain", torch.float32, False, 1, SMOKE["seq_len"]) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_peer_step(benchmark, dtype):
    shape = FULL if benchmark.enabled else SMOKE
    keep_freed_memory()  # as a pytrain CPU run's launch does; process-wide, so the peers get it too
    crawls = dtype == torch.bfloat16 and multiplies_in_fp32(torch.empty(0, dtype=dtype))  # PyTorch's own bf16 GEMM
    batch = BF16_CRAWLING_BATCH if benchmark.enabled and crawls else shape
    micro_bsz, seq_len = batch["micro_bsz"], batch["seq_len"]
    tokens = torch.randint(0, shape["vocab_size"], (micro_bsz, seq_len + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    steps = {"pytrain": pytrain_peer_step(shape, dtype)}  # built before the process group: one process, no group
    parameters = steps["pytrain"].num_parameters()
    llama = LlamaShape.of(shape, steps["pytrain"].model, seq_len)
    at = f"({micro_bsz}x{seq_len})"
    row = {"dtype": str(dtype), "parameters": parameters, "MLP width": llama.intermediate_size}
    losses = {}

    def timed(name, peer):
        def step():
            losses.setdefault(name, []).append(peer.step(inputs, labels).item())

        return contextlib.nullcontext, peer.zero_grad, step

    with one_process_group():
        for name, build in PEERS.items():
            try:
                steps[name] = build(llama, dtype)
            except pytest.skip.Exception as skipped:
                row[f"{name} skipped"] = skipped.msg
                continue
            assert steps[name].num_parameters() == parameters, (name, steps[name].num_parameters(), parameters)
            row[f"{name} recipe"] = steps[name].recipe
        rounds = 3 if benchmark.enabled and not crawls else 1
        variants = {name: timed(name, peer) for name, peer in steps.items()}
        medians = benchmark.pedantic(alternating_medians, args=(variants, rounds), rounds=1, iterations=1)
    assert all(math.isfinite(loss) for spans in losses.values() for loss in spans), losses
    for name, seconds in medians.items():
        row[f"{name} tokens/s {at}"] = micro_bsz * seq_len / seconds
        if name != "pytrain":
            row[f"pytrain / {name} {at}"] = seconds / medians["pytrain"]
    if benchmark.enabled:  # each in a process of its own, after the timing
        growth = {name: peak_growth_in_a_fresh_process(name, dtype, True, micro_bsz, seq_len) for name in medians}
        assert all(peak >= 8 * parameters for peak in growth.values()), growth  # 16-bit weights, grads, moments
        for name, peak in growth.items():
            row[f"{name} peak memory growth MiB {at}"] = peak / 2**20
        if "transformers" in growth:
            row["pytrain / transformers peak memory"] = growth["pytrain"] / growth["transformers"]
    benchmark.extra_info.update(row)
    print("\n" + "\n".join(f"{key:>36}: {value}" for key, value in row.items()))
