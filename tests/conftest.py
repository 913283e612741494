import gc
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

# Without a GPU, the Triton kernels are tested through Triton's interpreter, which triton only enables
# when this is set before it is first imported (torch.compile may import it). It changes nothing else:
# pytrain runs Triton on CPU tensors only where a test sets PYTRAIN_TRITON_CPU=1.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one); bench/gpu/run.sh selects these")
    config.addinivalue_line(
        "markers", "triton: runs pytrain's Triton kernels (the GPU, or Triton's interpreter on the CPU); run.sh too"
    )


def pytest_collection_modifyitems(config, items):
    """The device markers, in one place: a test taking `triton_device` is a Triton test, and a `cuda` test is
    skipped on a machine without a GPU."""
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "triton_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.triton)
        if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
            item.add_marker(skip)


CONFIGS = ROOT / "configs"

# A model small enough for a training step in milliseconds; used with configs/tiny.py.
SMALL = [
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_attention_heads=4",
    "data.seq_len=32",
    "data.micro_bsz=2",
    "monitor.log_every=1",
    "monitor.tensorboard.enable=False",
]


@pytest.fixture
def fresh_context(monkeypatch):
    """A clean global context (and no process group) around a test that launches a run in-process."""
    from pytrain.parallel import context

    monkeypatch.setattr(context.gpc, "config", None)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    yield context.gpc
    context.gpc.mesh = None
    if dist.is_initialized():
        dist.destroy_process_group()
    # the launched run's DeviceMesh holds reference cycles: free its groups now, not in a process forked later
    # (a multiprocessing Manager) whose garbage collector would finalize them there
    gc.collect()


@pytest.fixture
def init_method(tmp_path) -> str:
    """A file:// rendezvous for one test's gloo processes: no TCP port to race other tests for."""
    return f"file://{tmp_path / 'rendezvous'}"


def python() -> str:
    return sys.executable


@pytest.fixture
def num_threads():
    """Lets a test change torch's intra-op thread count (the CPU kernel's parallelism) and restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture(params=["avx2", "generic"])
def cpu_loops(request):
    """Runs a test on the CPU kernels' AVX2 loops (where the CPU has AVX2; else the generic ones again)
    and on their generic loops, those of CPUs without AVX2 (pytrain._C.use_avx2)."""
    from pytrain.kernels import _backend

    ext = _backend.extension(torch.device("cpu"))
    before = ext.use_avx2(request.param == "avx2")
    yield request.param
    ext.use_avx2(before)


@pytest.fixture
def extension_missing(monkeypatch):
    """As if pytrain._C had not been built: the import fails, extension() warns once and returns None."""
    from pytrain.kernels import _backend

    monkeypatch.setattr(_backend, "_loaded", {})
    monkeypatch.setitem(_backend._MODULE_FOR_DEVICE, "cpu", "pytrain._C_not_built")
    with pytest.warns(RuntimeWarning, match=r"pytrain\._C_not_built is not built"):
        assert _backend.extension(torch.device("cpu")) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once, not on every call
        assert _backend.extension(torch.device("cpu")) is None
    yield


@pytest.fixture
def triton_device(monkeypatch):
    """Where the Triton kernels run: the GPU, or the CPU through Triton's interpreter (the GPU's code path)."""
    if torch.cuda.is_available():
        return "cuda"
    assert os.environ.get("TRITON_INTERPRET") == "1", "set above, before triton is imported"
    monkeypatch.setenv("PYTRAIN_TRITON_CPU", "1")
    return "cpu"


@pytest.fixture
def forbid_host_reads(monkeypatch):
    """Inside `with forbid_host_reads():`, Tensor.tolist() and .item() raise: on a GPU each is a synchronization
    (the host waits for the device queue), so a per-layer call that reads a tensor back fails the test on the CPU."""
    import contextlib

    @contextlib.contextmanager
    def forbidden():
        def refuse(self, *args, **kwargs):
            raise AssertionError("a host read-back (Tensor.tolist / .item) on a path meant to make none")

        with monkeypatch.context() as patch:
            patch.setattr(torch.Tensor, "tolist", refuse)
            patch.setattr(torch.Tensor, "item", refuse)
            yield

    return forbidden
