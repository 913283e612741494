"""What the planner's CPU predictions are checked against: the peak of the bytes torch's CPU allocator holds.

torch's CPU allocator keeps no peak counter (torch.cuda.max_memory_allocated has no CPU twin), but c10's
ProfiledCPUMemoryReporter keeps a running total of the bytes allocated and not yet freed, and with torch.profiler's
memory profiling on it reports that total with every allocation and free of the profiled thread. The reporter
counts frees made on other threads (gloo's workers drop the last reference to a collective's tensors) only while
its flag FLAGS_caffe2_report_cpu_memory_usage is set, which c10 does not expose to Python: it is set here through
ctypes for the measurement and restored after. The peak of that total is the CPU analogue of
torch.cuda.max_memory_allocated: every tensor (parameters, gradients, optimizer state, saved activations,
temporaries, the communication buffers torch allocates), nothing else (not Python objects, not gloo's own buffers,
not the allocator's slack). Storage allocated before the measurement started is not in it, so start it before the
model is built.

    with AllocatorPeak() as peak:
        ...build, train a few steps...
    peak.bytes
"""

import ctypes
import os

import torch
from torch._C._profiler import _EventType


def _report_flag() -> ctypes.c_bool:
    library = os.path.join(os.path.dirname(torch.__file__), "lib", "libc10.so")
    try:
        return ctypes.c_bool.in_dll(ctypes.CDLL(library), "FLAGS_caffe2_report_cpu_memory_usage")
    except (OSError, ValueError) as err:
        raise RuntimeError(
            f"AllocatorPeak needs c10's FLAGS_caffe2_report_cpu_memory_usage in {library} to count frees made on "
            f"other threads: {err}"
        ) from None


class AllocatorPeak:
    """A context manager whose `bytes` is, after it exits, the most bytes of CPU tensor storage alive at once
    inside it, counting only storage allocated inside it."""

    def __init__(self):
        self.bytes = None
        self._flag = _report_flag()
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)

    def __enter__(self) -> "AllocatorPeak":
        self._flag_before = self._flag.value
        self._flag.value = True
        self._profile.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._profile.__exit__(*exc)
        finally:
            self._flag.value = self._flag_before
        events = sorted(
            (
                event
                for event in _walk(self._profile.profiler.kineto_results.experimental_event_tree())
                if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu"
            ),
            key=lambda event: event.start_time_ns,
        )
        if not events:
            self.bytes = 0
            return
        # the reporter's total runs on from before (what was allocated earlier and is still alive): the
        # measurement starts at its first event's total before that event
        first = events[0].extra_fields
        start = first.total_allocated - first.alloc_size
        self.bytes = max(event.extra_fields.total_allocated for event in events) - start


def _walk(events):
    stack = list(events)
    while stack:
        event = stack.pop()
        yield event
        stack.extend(event.children)


def measure_layout(cfg, rank: int, world: int, steps: int = 3, timed_steps: int = 0, seed: int = 3):
    """Builds the run's model, optimizer and trainer for `cfg` on this rank (the run's construction path; the
    process group of `world` ranks already joined) and trains on random tokens: `steps` steps inside an
    AllocatorPeak (from before the model is built: the first step creates Adam's state), then `timed_steps`
    more outside it. Returns (peak bytes, median seconds of the timed steps or None)."""
    import statistics
    import time

    from pytrain.initialize import initialize_trainer
    from pytrain.initialize.launch import launch
    from pytrain.parallel import gpc
    from pytrain.train import initialize_model, initialize_optimizer

    launch(cfg, rank=rank, world_size=world, local_rank=0, init_method=None, backend="gloo", seed=seed)
    data = cfg.data
    generator = torch.Generator().manual_seed(gpc.data_parallel_rank)
    shape = (data.micro_num, data.micro_bsz, data.seq_len)

    vocab = cfg.model.vocab_size
    batches = [
        {name: torch.randint(0, vocab, shape, generator=generator) for name in ("input_ids", "labels")}
        for _ in range(steps + timed_steps)
    ]  # made before the measurement: the data is not the model's memory
    with AllocatorPeak() as peak:
        model = initialize_model()
        optimizer, beta2_scheduler, lr_scheduler = initialize_optimizer(model)
        trainer, *_ = initialize_trainer(model, optimizer, lr_scheduler=lr_scheduler, beta2_scheduler=beta2_scheduler)
        for batch in batches[:steps]:
            trainer.zero_grad()
            trainer.execute_schedule(batch)
            trainer.step()
    times = []
    for batch in batches[steps:]:
        torch.distributed.barrier()
        start = time.perf_counter()
        trainer.zero_grad()
        trainer.execute_schedule(batch)
        trainer.step()
        times.append(time.perf_counter() - start)
    return peak.bytes, statistics.median(times) if times else None
