"""Start torch.distributed from torchrun's or Slurm's environment and fill the global context `gpc`.

One process started with plain `python` (no torchrun variables) runs as a world of one.
"""

import ctypes
import datetime
import os
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from pytrain.config import Config
from pytrain.parallel import ParallelDims, ParallelMesh, gpc


def launch_from_torch(config, backend: str | None = None, seed: int = 1024, overrides=()):
    """Launch inside torchrun: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT come from it."""
    env = os.environ
    if "RANK" not in env:
        return launch(
            config,
            rank=0,
            world_size=1,
            local_rank=0,
            init_method=None,
            backend=backend,
            seed=seed,
            overrides=overrides,
        )
    missing = [k for k in ("WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise RuntimeError(f"RANK is set but {', '.join(missing)} is not set: start the run with torchrun")
    # env://: under torchrun the ranks share the agent's store, which outlives them; a store served by rank 0
    # could go away while the other ranks still tear down.
    return launch(
        config,
        rank=int(env["RANK"]),
        world_size=int(env["WORLD_SIZE"]),
        local_rank=int(env.get("LOCAL_RANK", 0)),
        init_method="env://",
        backend=backend,
        seed=seed,
        overrides=overrides,
    )


def launch_from_slurm(
    config, host: str | None = None, port: int = 8888, backend: str | None = None, seed: int = 1024, overrides=()
):
    """Launch inside srun: SLURM_PROCID, SLURM_NPROCS, SLURM_LOCALID; master = host or the first node."""
    env = os.environ
    try:
        rank, world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NPROCS"])
    except KeyError as err:
        raise RuntimeError(
            f"launcher 'slurm' needs {err.args[0]} in the environment: start the run with srun"
        ) from None
    host = host or first_slurm_host(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_NODELIST", ""))
    return launch(
        config,
        rank=rank,
        world_size=world_size,
        local_rank=int(env.get("SLURM_LOCALID", 0)),
        init_method=f"tcp://{host}:{port}",
        backend=backend,
        seed=seed,
        overrides=overrides,
    )


def first_slurm_host(nodelist: str) -> str:
    """'gpu[07-09,12],cpu1' -> 'gpu07' (the master is the first node of the allocation)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise RuntimeError("cannot find the master host: pass --host or run under srun (SLURM_NODELIST)")
    prefix, ranges = match.groups()
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def initialize_distributed_env(
    config,
    launcher: str = "torch",
    master_port: int = 8888,
    seed: int = 1024,
    backend: str | None = None,
    host: str | None = None,
    overrides=(),
):
    """InternLM's entry point: launch with the given launcher, then the run is ready for initialize_model()."""
    if launcher == "torch":
        return launch_from_torch(config, backend=backend, seed=seed, overrides=overrides)
    if launcher == "slurm":
        return launch_from_slurm(config, host=host, port=master_port, backend=backend, seed=seed, overrides=overrides)
    raise ValueError(f"launcher must be 'torch' or 'slurm', got {launcher!r}")


def launch(
    config,
    rank: int,
    world_size: int,
    local_rank: int,
    init_method: str | None,
    backend: str | None,
    seed: int,
    overrides=(),
):
    """Loads and checks the config, joins the process group (through init_method; a world of one needs
    none), seeds every RNG, creates the run folder."""
    cfg = (
        config
        if isinstance(config, Config)
        else (
            Config.from_dict(config, overrides=overrides)
            if isinstance(config, dict)
            else Config.from_file(config, overrides=overrides)
        )
    )
    source = str(config) if isinstance(config, (str, Path)) else "config"
    dims = ParallelDims.from_config(cfg, world_size, source)  # checked before any process waits on another

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Not where fully_shard shards the parameters: its units, gathered and freed whole in changing order,
        # fragment a heap that never returns memory (the 1B shape's FSDP run, bench/test_memory_levers.py, held
        # 11 GiB resident per rank for 3.4 GiB of live tensors), and such a run is there to save memory.
        if not dims.shards_parameters:
            keep_freed_memory()
    # every wait on another rank ends after this, with an error naming the collective, rather than hanging
    timeout = datetime.timedelta(seconds=cfg.parallel.process_group_timeout_s)
    if not dist.is_initialized():
        if world_size == 1:  # no rendezvous needed: a store in this process
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        else:
            store = _attempt_store(init_method, rank, world_size, timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)

    gpc.config = cfg
    gpc.rank, gpc.local_rank, gpc.device = rank, local_rank, device
    gpc.mesh = ParallelMesh(dims, device.type, timeout)
    gpc.run_folder = _make_run_folder(cfg)
    gpc.seed = seed
    torch.backends.cudnn.deterministic = cfg.cudnn_deterministic
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    set_seed(seed)
    return gpc


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BELOW = 2**31 - 1  # mallopt takes an int: blocks up to 2 GiB come from the heap and stay there


def keep_freed_memory() -> bool:
    """Makes glibc keep large freed blocks for reuse instead of returning them to the OS; True if it did.

    glibc gives every allocation above 32 MiB a mapping of its own and unmaps it on free. A CPU training step
    allocates and frees the same large tensors every step (logits and their gradient, activations), so each
    step paid first-touch page faults again, the OS zeroing every 4 KiB page before the kernel writes it:
    on this project's machine an allocating RMSNorm over 4096 x 4096 took 66 ms that way and 7.4 ms with the
    memory kept, cross-entropy forward+backward over 4096 x 32000 654 ms and 131 ms (same run). The resident
    memory stays at the step's peak, which the next step needs anyway. Process-wide, so only for CPU runs;
    left alone where the user set MALLOC_MMAP_THRESHOLD_ or the C library is not glibc."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BELOW) and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BELOW))
    except (OSError, AttributeError):  # not glibc: its allocator has its own policy
        return False


def _attempt_store(init_method: str, rank: int, world_size: int, timeout: datetime.timedelta):
    """The rendezvous store of `init_method`; under torchrun, with a key prefix of its own per restart.
    torchrun serves one store for every restart of a job, so the keys the killed attempt's ranks wrote
    (gloo's and NCCL's addresses of processes now dead) are still there: a restarted rank reading one
    before its peer overwrites it connects to the dead process and waits forever. The store waits for a
    missing peer `timeout` long, as init_process_group's own rendezvous would."""
    store, _, _ = next(dist.rendezvous(init_method, rank=rank, world_size=world_size, timeout=timeout))
    store.set_timeout(timeout)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    return store if attempt is None else dist.PrefixStore(f"pytrain/attempt_{attempt}/", store)


def set_seed(seed: int) -> None:
    """The same seed on every data-parallel rank: replicas start from identical weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _make_run_folder(cfg: Config) -> Path:
    """<monitor.run_folder>/<JOB_NAME>/<start time>[-N], named by rank 0, holding the effective config.
    Each name is tried by creating it (mkdir fails on an existing folder), so two runs started in the same
    second never share one."""
    base = Path(cfg.monitor.run_folder).expanduser() / str(cfg.get("JOB_NAME", "pytrain"))
    name = [None]
    if dist.get_rank() == 0:
        base.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for candidate in (stamp if i == 0 else f"{stamp}-{i}" for i in range(1000)):
            try:
                (base / candidate).mkdir()
            except FileExistsError:
                continue
            name[0] = candidate
            break
        else:
            raise RuntimeError(f"{base} already holds run folders {stamp} to {stamp}-999: clean it up")
        (base / name[0] / "config.py").write_text(cfg.dump())
    dist.broadcast_object_list(name, src=0)
    return base / name[0]
