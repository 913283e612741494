"""The installed package: compiled modules, the Triton package, and the kernels' independence."""

import importlib.util
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, python


def test_cpu_extension_is_built():
    import pytrain._C as ext

    assert hasattr(ext, "rms_norm_forward") and hasattr(ext, "rms_norm_backward")


def test_triton_kernels_package_is_installed_inside_pytrain():
    import pytrain.triton.flash_attn_triton

    assert Path(pytrain.triton.flash_attn_triton.__file__) == ROOT / "kernels" / "flash_attn_triton.py"
    assert not (ROOT / "kernels" / "__init__.py").exists()  # see pytrain/triton/__init__.py


# Python started in the repository root has the root first on sys.path, as pytest has it too.
FROM_ROOT = """
import importlib.util, sys
spec = importlib.util.find_spec("kernels")
print(None if spec is None else spec.origin)
import transformers.integrations.hub_kernels  # imports Hugging Face's `kernels` when installed
"""


def test_python_in_the_repository_root_does_not_see_kernels_as_a_top_level_package():
    pytest.importorskip("transformers")
    result = subprocess.run([python(), "-c", FROM_ROOT], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    origin = result.stdout.strip()
    assert origin == "None" or not Path(origin).is_relative_to(ROOT / "kernels"), origin  # Hugging Face's, or none


@pytest.mark.parametrize("name", ["flash_attn_triton", "moe_permute_triton", "grouped_mm_triton"])
def test_a_triton_source_loaded_as_a_top_level_kernels_module_refuses(name):
    """Without Hugging Face's kernels installed, `import kernels.<name>` from the repository root would find
    kernels/ as a namespace package: each source refuses to load under that name."""
    spec = importlib.util.spec_from_file_location(f"kernels.{name}", ROOT / "kernels" / f"{name}.py")
    with pytest.raises(ImportError, match=rf"kernels/ is the package pytrain.triton; import pytrain.triton.{name}"):
        spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_a_built_wheel_holds_every_package_and_the_triton_kernels_inside_pytrain(tmp_path):
    """setup.py's build_py (the Python half of a wheel): every package under pytrain/, kernels/ as pytrain.triton
    and no top-level kernels package."""
    subprocess.run(
        [python(), "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    packages = {p.parent.relative_to(ROOT) for p in (ROOT / "pytrain").rglob("__init__.py")}
    assert packages <= {p.parent.relative_to(tmp_path) for p in tmp_path.rglob("*.py")}
    kernels = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert kernels and kernels <= {p.name for p in (tmp_path / "pytrain" / "triton").glob("*.py")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pytrain"]


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
