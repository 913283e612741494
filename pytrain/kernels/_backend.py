"""Finds the compiled kernel modules and describes tensors to them (dtype codes, streams, threads)."""

import functools
import importlib
import os
import warnings
from pathlib import Path

import torch

# Must match csrc/dtype.h.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
SUPPORTED_DTYPES = tuple(DTYPE_CODES)

_MODULE_FOR_DEVICE = {"cpu": "pytrain._C", "cuda": "pytrain._C_cuda"}
_loaded: dict[str, object] = {}


def extension(device: torch.device):
    """The compiled module for `device`, or None (with one warning) when it was not built."""
    name = _MODULE_FOR_DEVICE.get(device.type)
    if name is None:
        return None
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(name)
        except ImportError as err:
            _loaded[name] = None
            warnings.warn(
                f"{name} is not built ({err}); pytrain.kernels falls back to plain-PyTorch references on "
                f"{device.type}, which are slower. Reinstall with `pip install -e .` to build it.",
                RuntimeWarning,
                stacklevel=3,
            )
    return _loaded[name]


# glibc serves allocations of at least 32 MiB (its largest dynamic mmap threshold) with their own mmap.
_HUGE_PAGE_MIN_BYTES = 32 << 20
_VIRTIO_DEVICES = Path("/sys/bus/virtio/devices")
_VIRTIO_BALLOON, _BALLOON_FREE_PAGE_REPORTING = "0x0005", 5  # device id; feature bit


@functools.cache
def host_reclaims_free_pages(devices: Path = _VIRTIO_DEVICES) -> bool:
    """Whether this is a virtual machine whose balloon reports free memory to the host (virtio's
    VIRTIO_BALLOON_F_REPORTING, negotiated: `features` lists the bits, bit 0 first). The guest then hands every
    free 2 MiB block back, the host drops its backing, and a transparent huge page made of such a block faults in
    from the host on its first write, 4 KiB at a time: on this project's Firecracker VMs, with calls seconds apart,
    a 64 MiB output advised huge pages took 80-330 ms where ordinary pages (reused low-order ones) took 22-36."""
    for device in devices.glob("*"):
        try:
            kind, features = (device / "device").read_text().strip(), (device / "features").read_text().strip()
        except OSError:
            continue
        if kind == _VIRTIO_BALLOON and features[_BALLOON_FREE_PAGE_REPORTING : _BALLOON_FREE_PAGE_REPORTING + 1] == "1":
            return True
    return False


def empty_output_like(tensor: torch.Tensor) -> torch.Tensor:
    """torch.empty_like for a kernel's output. A large CPU one is asked for transparent huge pages before
    the kernel first writes it: its first-touch page faults (one per 4 KiB page, each zeroed by the OS)
    cost more than the kernel itself. Only the 2 MiB pages wholly inside it are advised, so no other
    allocation is touched. Not where the host takes free memory back (host_reclaims_free_pages): there a
    huge page costs more than the faults it saves. (A training run keeps freed memory for reuse instead:
    launch.keep_freed_memory.)"""
    out = torch.empty_like(tensor)
    if out.device.type == "cpu" and out.nbytes >= _HUGE_PAGE_MIN_BYTES and not host_reclaims_free_pages():
        module = extension(out.device)
        if module is not None:
            module.advise_huge_pages(out.data_ptr(), out.nbytes)
    return out


def launch_args(tensor: torch.Tensor) -> dict:
    """Stream and device for a CUDA launch; zeros on the CPU."""
    if tensor.device.type == "cuda":
        return {"stream": torch.cuda.current_stream(tensor.device).cuda_stream, "device": tensor.device.index}
    return {"stream": 0, "device": 0}


def parallelism(tensor: torch.Tensor, rows: int) -> int:
    """CPU: torch's intra-op thread count; CUDA: enough blocks to fill the SMs twice. Never above rows."""
    if tensor.device.type == "cuda":
        workers = 2 * torch.cuda.get_device_properties(tensor.device).multi_processor_count
    else:
        workers = torch.get_num_threads()
    return max(1, min(workers, rows))


def runs_triton(device: torch.device) -> bool:
    """Whether the Triton kernels serve `device`: CUDA, or the CPU through Triton's interpreter on request
    (PYTRAIN_TRITON_CPU=1 with TRITON_INTERPRET=1; tests only)."""
    if device.type == "cuda":
        return True
    if os.environ.get("PYTRAIN_TRITON_CPU", "0") != "1":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError(
            "PYTRAIN_TRITON_CPU=1 runs Triton on the CPU through its interpreter: set "
            "TRITON_INTERPRET=1 too, before triton is first imported"
        )
    return True
