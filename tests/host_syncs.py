"""Host synchronizations a GPU would make, caught on the CPU (shared by the test files).

On a GPU the host waits for the device queue whenever it needs a value computed there: Tensor.tolist / .item, and
the ops that size their output by their input's values (torch.bincount reads its max, nonzero and boolean-mask
indexing count the True entries, repeat_interleave without output_size sums the repeats, unique counts the
distinct values). A step path meant to make none runs under `count_host_reads` (or conftest's forbid_host_reads)
and `no_value_sized_ops` on the CPU.
"""

import contextlib
import sys
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

VALUE_SIZED = {
    aten.bincount.default: "torch.bincount",
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique_consecutive",
}
INDEXING = (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default)


def _value_sized(func, args, kwargs) -> str | None:
    """What makes `func` size its output by its input's values (a host read-back on a GPU), or None."""
    if func in VALUE_SIZED:
        return VALUE_SIZED[func]
    if func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if func in INDEXING and any(i is not None and i.dtype == torch.bool for i in args[1]):
        return "boolean-mask indexing"
    return None


class _NoValueSizedOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        what = _value_sized(func, args, kwargs)
        if what is not None:
            raise AssertionError(f"{what}: on a GPU it reads a value back to the host (a synchronization)")
        return func(*args, **kwargs)


def no_value_sized_ops():
    """Inside, an op that sizes its output by its input's values raises (forward and backward)."""
    return _NoValueSizedOps()


@contextlib.contextmanager
def count_host_reads(callers: bool = False):
    """Yields a list that records every Tensor.tolist / .item call made inside (each still runs): "tolist", or with
    callers=True "tolist in <the calling function>"."""
    calls = []

    def counted(name):
        original = getattr(torch.Tensor, name)

        def call(self, *args, **kwargs):
            calls.append(f"{name} in {sys._getframe(1).f_code.co_name}" if callers else name)
            return original(self, *args, **kwargs)

        return call

    with (
        mock.patch.object(torch.Tensor, "tolist", counted("tolist")),
        mock.patch.object(torch.Tensor, "item", counted("item")),
    ):
        yield calls
