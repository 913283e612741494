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
