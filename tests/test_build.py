"""setup.py's CUDA switch: PYTRAIN_CUDA=1 with a failing CUDA compile fails; unset, it falls back to CPU."""

import os
import shutil
import subprocess

import pytest
from conftest import ROOT, python

needs_toolchain = pytest.mark.skipif(
    shutil.which("nvcc") is None or shutil.which("cmake") is None, reason="needs nvcc and cmake"
)


def build(tmp_path, **env):
    # An impossible architecture makes nvcc fail; the build goes to a scratch folder.
    env = {**os.environ, "PYTRAIN_BUILD_DIR": str(tmp_path / "build"), "PYTRAIN_CUDA_ARCHS": "1", **env}
    return subprocess.run(
        [python(), "setup.py", "build_ext", "--build-lib", str(tmp_path / "lib")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@needs_toolchain
def test_required_cuda_build_failure_fails(tmp_path):
    result = build(tmp_path, PYTRAIN_CUDA="1")
    assert result.returncode != 0
    assert "PYTRAIN_CUDA=1" in result.stdout + result.stderr


@needs_toolchain
def test_automatic_cuda_build_failure_falls_back_to_cpu(tmp_path):
    result = build(tmp_path, PYTRAIN_CUDA="")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "building the CPU kernels only" in result.stdout + result.stderr
    built = [p.name for p in (tmp_path / "lib" / "pytrain").iterdir()]
    assert any(name.startswith("_C.") for name in built) and not any(name.startswith("_C_cuda") for name in built)


def test_bad_cuda_switch_is_explained(tmp_path):
    result = build(tmp_path, PYTRAIN_CUDA="maybe")
    assert result.returncode != 0 and "PYTRAIN_CUDA='maybe' is not understood" in result.stderr
