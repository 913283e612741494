"""The installed package: compiled modules, the Triton package, and the kernels' independence."""

import subprocess

import pytest
from conftest import python


def test_cpu_extension_is_built():
    import pytrain._C as ext

    assert hasattr(ext, "rms_norm_forward") and hasattr(ext, "rms_norm_backward")


def test_triton_kernels_package_is_installed_inside_pytrain():
    import pytrain.triton

    assert pytrain.triton.__file__.replace("\\", "/").endswith("kernels/__init__.py")


def test_import_kernels_pulls_in_nothing_of_the_trainer():
    code = (
        "import sys, pytrain.kernels; "
        "print(sorted(m for m in sys.modules if m.startswith('pytrain.') "
        "and m.split('.')[1] not in ('kernels', '_C', '_C_cuda')))"
    )
    out = subprocess.run([python(), "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_cuda_extension_imports_without_a_gpu_when_built():
    ext = pytest.importorskip("pytrain._C_cuda", reason="pytrain._C_cuda not built (no nvcc at install time)")
    assert ext.device_count() >= 0 and hasattr(ext, "rms_norm_forward")
