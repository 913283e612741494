"""bench/gpu/run.sh, checked on the CPU: its syntax, its time budget (at most 480 s over every timeout), that it
stops at once with "no GPU" here, that a slow torch probe on a GPU machine is not taken for a missing GPU, and its
summary over a run's files."""

import json
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu" / "run.sh"
BUDGET_S = 480


def test_script_parses():
    done = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_timeouts_add_up_to_the_budget():
    text = SCRIPT.read_text()
    budget = {name: int(value) for name, value in re.findall(r"^(T_[A-Z]+|GRACE)=(\d+)$", text, re.M)}
    calls = re.findall(r"\btimeout\b([^\n]*)", text)
    calls = [c for c in calls if not c.lstrip().startswith(("(", "with", "for"))]  # the word in comments
    total, beside_the_build = 0, []
    for args in calls:
        m = re.match(r'\s+(?:-s INT -k "\$GRACE" )?"\$(T_[A-Z]+)"', args)
        assert m, f"every timeout takes its limit from the T_* budget: timeout{args}"
        if args.rstrip().endswith("&"):  # in the background: awaited after the build, within its time
            beside_the_build.append(m[1])
            continue
        total += budget[m[1]] + (budget["GRACE"] if "-k" in args else 0)
    assert len(calls) >= 7 and total <= BUDGET_S, (calls, total)
    assert beside_the_build == ["T_PROBE"] and budget["T_PROBE"] <= budget["T_BUILD"]
    build, wait, tests = (text.index(s) for s in ("pip install", 'wait "$probe"', "-m pytest tests"))
    assert build < wait < tests


def run_with_stubs(tmp_path, probe_exit: int):
    """The script on a stand-in GPU machine: an nvidia-smi that lists a GPU, a python3 whose torch probe exits with
    `probe_exit` (124: `timeout` stopped it) and whose every other command succeeds at once."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)'\n")
    (stubs / "python3").write_text(f'#!/bin/sh\nif [ "$1" = - ]; then cat >/dev/null; exit {probe_exit}; fi\nexit 0\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {"PATH": f"{stubs}:/usr/bin:/bin", "OUT": str(tmp_path / "out"), "RUN_DIR": str(tmp_path / "run")}
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    return done, (tmp_path / "out" / "env.txt").read_text()


def test_a_slow_torch_probe_is_not_a_missing_gpu(tmp_path):
    """A cold `import torch, triton` and CUDA's start may outlast the probe's limit on a fresh machine: the run goes
    on (noted in env.txt) rather than giving the lent GPU up as "no GPU"."""
    done, env_txt = run_with_stubs(tmp_path, probe_exit=124)
    assert "no GPU" not in done.stderr + env_txt, done.stderr
    assert "did not finish in 90 s: a slow start, not a missing GPU; going on" in env_txt
    assert "NVIDIA H100" in env_txt and done.returncode == 0, done.stdout + done.stderr


def test_torch_seeing_no_cuda_device_stops_the_run(tmp_path):
    done, _ = run_with_stubs(tmp_path, probe_exit=1)
    assert done.returncode == 3 and "no GPU: torch sees no CUDA device (probe exit 1)" in done.stderr
    assert not (tmp_path / "out" / "tests.txt").exists()  # stopped before the tests


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the script would run for real")
def test_without_a_gpu_it_stops_at_once_saying_so(tmp_path):
    start = time.perf_counter()
    env = {"PATH": "/usr/bin:/bin:" + str(ROOT), "OUT": str(tmp_path / "out"), "RUN_DIR": str(tmp_path / "run")}
    env["PATH"] = f"{sys.executable.rsplit('/', 1)[0]}:{env['PATH']}"
    done = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "no GPU" in done.stderr
    assert "no GPU" in (tmp_path / "out" / "env.txt").read_text()
    assert time.perf_counter() - start < 30


def test_summary_reads_a_runs_files(tmp_path):
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_flash_attn" name="a"/>'
        '<testcase classname="tests.test_flash_attn" name="b"><failure message="x"/></testcase>'
        '<testcase classname="tests.test_rms_norm" name="c"><skipped message="y"/></testcase>'
        "</testsuite></testsuites>"
    )
    rows = [
        dict(group="rms_norm fwd cuda 16384x4096 bf16", extra_info=dict(impl="pytrain", device="cuda", gbps=2600.0,
             copy_gbps=3200.0, fraction_of_copy=0.8125)),
        dict(group="attention fwd causal cuda bfloat16 seq 4096 d 128", extra_info=dict(impl="pytrain", device="cuda",
             ms=2.0, tflops=400.0)),
        dict(group="attention fwd causal cuda bfloat16 seq 4096 d 128", extra_info=dict(impl="sdpa_flash",
             device="cuda", ms=1.0, tflops=800.0)),
    ]  # fmt: skip
    (tmp_path / "bench.json").write_text(json.dumps({"benchmarks": rows}))
    (tmp_path / "train.txt").write_text(
        "".join(
            f"step {i}/12 | loss 9.0 | lr 1e-4 | grad_norm 1.0 | tgs {1000 * i:,} | tflops 1.0 | mfu {i}.0% | x\n"
            for i in range(1, 13)
        )
    )
    (tmp_path / "env.txt").write_text("GPU 0: NVIDIA H200 (UUID: x)\n")
    args = ["--junit", "tests.xml", "--bench", "bench.json", "--train", "train.txt", "--env", "env.txt"]
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu" / "summary.py"), *args],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "GPU 0: NVIDIA H200" in out
    assert re.search(r"tests/test_flash_attn.py\s+1 passed\s+1 failed\s+0 skipped", out)
    assert re.search(r"rms_norm fwd cuda 16384x4096 bf16\s+0.81 of copy \(2600 of 3200 GB/s\)", out)
    assert "sdpa_flash    1.000 ms | 0.50x" in out
    assert "12 steps; median over steps 3..12: 7,500 tokens/s per GPU, MFU 7.5%" in out
    missing = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu" / "summary.py"), *[a.replace(".", "-gone.") for a in args]],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "no JUnit file" in missing and "no step lines" in missing
