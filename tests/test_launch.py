import os
import subprocess
import sys

import pytest

from pytrain.initialize.launch import first_slurm_host, initialize_distributed_env, launch_from_slurm, launch_from_torch


@pytest.mark.parametrize(
    "nodelist, host",
    [("gpu07", "gpu07"), ("gpu[07-09,12]", "gpu07"), ("a1,b2", "a1"), ("node[3]", "node3"), ("x-[010-011],y", "x-010")],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_slurm_launcher_needs_slurm_environment(monkeypatch):
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    with pytest.raises(RuntimeError, match=r"needs SLURM_PROCID .* start the run with srun"):
        launch_from_slurm("configs/tiny.py")


def test_torch_launcher_with_partial_environment(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("MASTER_PORT", "1234")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="RANK is set but MASTER_ADDR is not set: start the run with torchrun"):
        launch_from_torch("configs/tiny.py")


def test_unknown_launcher():
    with pytest.raises(ValueError, match="launcher must be 'torch' or 'slurm'"):
        initialize_distributed_env("configs/tiny.py", launcher="mpi")


def test_single_process_launch_fills_the_context(fresh_context, tmp_path):
    from conftest import CONFIGS

    ctx = launch_from_torch(str(CONFIGS / "tiny.py"), seed=5, overrides=[f"monitor.run_folder={tmp_path}"])
    assert ctx.world_size == 1 and ctx.rank == 0 and ctx.data_parallel_size == 1 and ctx.seed == 5
    assert ctx.run_folder.parent == tmp_path / "tiny"
    assert (ctx.run_folder / "config.py").read_text().startswith("# Effective pytrain config")
    assert ctx.is_initialized and ctx.is_main_rank


def test_slurm_launch_of_one_task(fresh_context, tmp_path, monkeypatch):
    from conftest import CONFIGS

    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NPROCS", "1")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    monkeypatch.setenv("SLURM_NODELIST", "node[04-07]")
    ctx = initialize_distributed_env(
        str(CONFIGS / "tiny.py"), launcher="slurm", master_port=29555, overrides=[f"monitor.run_folder={tmp_path}"]
    )
    assert ctx.world_size == 1 and ctx.rank == 0 and ctx.local_rank == 0 and ctx.is_initialized


def test_local_rank_argument_reaches_the_launcher(fresh_context, tmp_path, monkeypatch):
    """--local_rank given on the command line wins over the launcher's environment (here SLURM_LOCALID)."""
    from conftest import CONFIGS

    from pytrain.initialize import get_default_parser

    for name, value in (("SLURM_PROCID", "0"), ("SLURM_NPROCS", "1"), ("SLURM_LOCALID", "3"), ("SLURM_NODELIST", "n1")):
        monkeypatch.setenv(name, value)
    args = get_default_parser().parse_args(["--launcher", "slurm", "--local_rank", "0", "--port", "29556"])
    ctx = initialize_distributed_env(
        str(CONFIGS / "tiny.py"),
        launcher=args.launcher,
        master_port=args.port,
        overrides=[f"monitor.run_folder={tmp_path}"],
    )
    assert ctx.local_rank == 0


def test_process_groups_get_the_configured_timeout(fresh_context, tmp_path, monkeypatch):
    """parallel.process_group_timeout_s (default 1800 s) reaches init_process_group and the mesh, which gives it
    to every group it creates (tests/test_mesh.py)."""
    import datetime
    import importlib

    import torch.distributed as dist
    from conftest import CONFIGS

    launch = importlib.import_module("pytrain.initialize.launch")  # the module (the package exports its launch())
    given = []  # the timeouts init_process_group and the mesh were given, both then run as they are
    real_init, real_mesh = dist.init_process_group, launch.ParallelMesh

    def init_process_group(*args, timeout, **kwargs):
        given.append(("init_process_group", timeout))
        return real_init(*args, timeout=timeout, **kwargs)

    def parallel_mesh(dims, device_type, timeout):
        given.append(("ParallelMesh", timeout))
        return real_mesh(dims, device_type, timeout)

    monkeypatch.setattr(launch.dist, "init_process_group", init_process_group)
    monkeypatch.setattr(launch, "ParallelMesh", parallel_mesh)
    run_folder = f"monitor.run_folder={tmp_path}"
    launch_from_torch(str(CONFIGS / "tiny.py"), overrides=[run_folder])
    dist.destroy_process_group()
    launch_from_torch(str(CONFIGS / "tiny.py"), overrides=[run_folder, "parallel.process_group_timeout_s=77"])
    default, configured = datetime.timedelta(seconds=1800), datetime.timedelta(seconds=77)
    calls = ("init_process_group", "ParallelMesh")
    assert given == [(call, default) for call in calls] + [(call, configured) for call in calls]


def test_the_rendezvous_store_waits_the_configured_timeout(tmp_path):
    import datetime

    from pytrain.initialize.launch import _attempt_store

    store = _attempt_store(f"file://{tmp_path / 'rendezvous'}", 0, 1, datetime.timedelta(seconds=42))
    assert store.timeout == datetime.timedelta(seconds=42)


KEEPS_MEMORY = """
import resource, sys, torch
from pytrain.initialize.launch import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
def faults_of_a_fresh_64_mib_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)  # allocated, written, freed
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
for warm_up in range(4):  # the heap grows to its high-water mark (an aligned request may not fit a freed block)
    faults_of_a_fresh_64_mib_tensor()
print(kept, sum(faults_of_a_fresh_64_mib_tensor() for step in range(4)))
"""


@pytest.mark.parametrize("mode", ["keep", pytest.param("default", marks=pytest.mark.slow)])  # default: the control
def test_cpu_runs_keep_freed_memory_for_the_next_step(mode):
    """With keep_freed_memory (launch calls it for CPU runs), a large tensor allocated again after a free is
    served from memory already touched: no page faults once the heap has grown to the loop's high-water mark.
    glibc's default unmaps it: 16384 faults each time."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    done = subprocess.run([sys.executable, "-c", KEEPS_MEMORY, mode], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    kept, faults = done.stdout.split()
    if mode == "keep":
        assert kept == "True" and int(faults) < 100
    else:
        assert int(faults) > 4 * 4000  # 64 MiB of 4 KiB pages each time, or fewer with transparent huge pages


@pytest.mark.parametrize("fsdp", [False, True])
def test_cpu_runs_keep_freed_memory_unless_they_shard_parameters(fresh_context, tmp_path, monkeypatch, fsdp):
    """launch asks glibc to keep freed memory for a CPU run, but not for one whose parameters fully_shard shards:
    its gathered units fragment the heap (the 1B shape's FSDP run held 11 GiB per rank for 3.4 GiB of tensors)."""
    import importlib

    import torch.distributed as dist
    from conftest import CONFIGS

    launch = importlib.import_module("pytrain.initialize.launch")
    calls = []
    monkeypatch.setattr(launch, "keep_freed_memory", lambda: calls.append(True))
    overrides = [f"monitor.run_folder={tmp_path}"] + (
        ["parallel.zero1.size=-1", "parallel.zero1.fsdp=True"] if fsdp else []
    )
    launch_from_torch(str(CONFIGS / "tiny.py"), overrides=overrides)
    dist.destroy_process_group()
    assert calls == ([] if fsdp else [True])
