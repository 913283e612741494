"""Gradient reduction overlapped with the backward (hybrid_zero_optimizer.overlap_sync_grad).

The flat fp32 gradient buffer is cut into buckets of about reduce_bucket_size elements. The optimizer's own
hooks accumulate each parameter's gradient into its slice of the buffer the moment autograd has made it; during
the last micro-batch's backward (per pipeline chunk under the interleaved schedule: arm(that chunk's
parameters)), a hook here then counts the parameter as final, and when every parameter of a bucket is, the
bucket's all-reduce starts asynchronously while the backward goes on with earlier layers. finish() waits for
them, and completes (the optimizer's `settle`) and reduces synchronously any bucket a parameter's hook never
reached (unused in the forward, or given its gradient by assignment).
"""

from collections.abc import Callable

import torch
import torch.distributed as dist


class OverlappedGradReducer:
    def __init__(self, params: list[torch.Tensor], flat: torch.Tensor, bucket_size: int, group, settle: Callable):
        """flat: the params' gradients, consecutive, in order; settle(param) completes a parameter's slice whose
        gradient never reached it through the hooks (before its bucket is reduced)."""
        self.params, self.flat, self.group, self.settle = params, flat, group, settle
        self.buckets, self.bounds = [[]], [[0, 0]]  # parameter indices; [start, end) of each bucket in flat
        for index, param in enumerate(params):
            end = self.bounds[-1][1]
            if self.buckets[-1] and end + param.numel() - self.bounds[-1][0] > bucket_size:
                self.buckets.append([])
                self.bounds.append([end, end])
            self.buckets[-1].append(index)
            self.bounds[-1][1] = end + param.numel()
        self.bucket_of = {i: b for b, bucket in enumerate(self.buckets) for i in bucket}
        self.index_of = {id(p): i for i, p in enumerate(params)}
        self._reset()
        for index, param in enumerate(params):
            param.register_post_accumulate_grad_hook(lambda p, i=index: self._grad_ready(i))

    def _reset(self) -> None:
        self.armed: set[int] = set()  # parameters whose next gradient is final for this step
        self.ready = [set() for _ in self.buckets]
        self.handles: dict[int, object] = {}

    def arm(self, params=None) -> None:
        """The coming backward is the step's last for `params` (default: all): reduce their gradients as
        they become ready."""
        self.armed.update(range(len(self.params)) if params is None else (self.index_of[id(p)] for p in params))

    def _bucket(self, bucket: int) -> torch.Tensor:
        start, end = self.bounds[bucket]
        return self.flat[start:end]

    def _grad_ready(self, index: int) -> None:
        if index not in self.armed:
            return
        bucket = self.bucket_of[index]
        self.ready[bucket].add(index)
        if len(self.ready[bucket]) == len(self.buckets[bucket]):
            self.handles[bucket] = dist.all_reduce(self._bucket(bucket), group=self.group, async_op=True)

    def finish(self) -> None:
        """Waits for every bucket; fills and reduces the ones that never completed (unused parameters)."""
        for bucket, members in enumerate(self.buckets):
            if bucket in self.handles:
                self.handles[bucket].wait()
                continue
            for index in set(members) - self.ready[bucket]:
                self.settle(self.params[index])
            dist.all_reduce(self._bucket(bucket), group=self.group)
        self._reset()
