"""pytrain's whole training step beside its peers' (bench/peers.py: transformers, torchtitan, litgpt,
megatron-core, each where it installs and runs) on the same model, one process, the same random tokens,
timed in one sitting with the steps alternating (issue 25's end-to-end rows).

The model is the step profile's Llama (bench/test_step_profile.py: 8 layers, hidden 512, 8 heads, vocabulary
32000), every peer built to pytrain's parameter count exactly; pytrain's step is the trainer's
(NonPipelineScheduler over LMLoss, HybridZeroOptimizer with clipping at 1.0). fp32: micro-batch 4 of 512
tokens. bf16: this CPU (AMD Zen 3, AVX2, without AVX512-BF16 or AMX) multiplies bf16 matrices at ~1 GFLOP/s
(fp32: 120-160), so the bf16 row is micro-batch 1 of 128 tokens, one warm-up step and one timed step each;
the steps are GEMM-bound, so tokens/s stays comparable. Keys carry the micro-batch x sequence they ran at.
A peer that is not installed (or cannot run here) is reported as skipped with the reason. `pytrain / peer`:
the peer's step time over pytrain's (above 1: pytrain is faster). `--benchmark-disable` runs the 2-layer,
64-wide smoke model two steps per installed peer, as a test of the builders.
"""

import contextlib
import math

import pytest
import torch

from pytrain.model import LMLoss
from pytrain.parallel.schedule import NonPipelineScheduler

from .peers import PEERS, LlamaShape, PeerStep, one_process_group
from .test_step_profile import FULL, SMOKE, alternating_medians, pytrain_step

BF16_FULL_BATCH = dict(micro_bsz=1, seq_len=128)  # the bf16 row's micro-batch (module docstring)


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_peer_step(benchmark, dtype):
    shape = FULL if benchmark.enabled else SMOKE
    batch = BF16_FULL_BATCH if benchmark.enabled and dtype == torch.bfloat16 else shape
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
        rounds = 3 if benchmark.enabled and dtype == torch.float32 else 1
        variants = {name: timed(name, peer) for name, peer in steps.items()}
        medians = benchmark.pedantic(alternating_medians, args=(variants, rounds), rounds=1, iterations=1)
    assert all(math.isfinite(loss) for spans in losses.values() for loss in spans), losses
    for name, seconds in medians.items():
        row[f"{name} tokens/s {at}"] = micro_bsz * seq_len / seconds
        if name != "pytrain":
            row[f"pytrain / {name} {at}"] = seconds / medians["pytrain"]
    benchmark.extra_info.update(row)
    print("\n" + "\n".join(f"{key:>36}: {value}" for key, value in row.items()))
