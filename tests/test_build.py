"""setup.py: the CUDA switch (PYTRAIN_CUDA=1 with a failing CUDA compile fails; unset, it falls back to CPU) and a
build folder that outlives the tools that configured it (pip deletes each isolated build's environment)."""

import os
import shutil
import subprocess

import pytest
from conftest import ROOT, python

needs_toolchain = pytest.mark.skipif(
    shutil.which("nvcc") is None or shutil.which("cmake") is None, reason="needs nvcc and cmake"
)


needs_cmake = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")

# setup.py run as pip runs it, but with the `ninja` Python package hidden: a build environment without ninja.
WITHOUT_NINJA_PACKAGE = (
    "import runpy, sys; sys.modules['ninja'] = None; sys.argv = ['setup.py', *sys.argv[1:]]; "
    "runpy.run_path('setup.py', run_name='__main__')"
)


def build(tmp_path, setup=("setup.py",), **env):
    # An impossible architecture makes nvcc fail; the build goes to a scratch folder.
    env = {**os.environ, "PYTRAIN_BUILD_DIR": str(tmp_path / "build"), "PYTRAIN_CUDA_ARCHS": "1", **env}
    return subprocess.run(
        [python(), *setup, "build_ext", "--build-lib", str(tmp_path / "lib")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
@needs_toolchain
def test_required_cuda_build_failure_fails(tmp_path):
    result = build(tmp_path, PYTRAIN_CUDA="1")
    assert result.returncode != 0
    assert "PYTRAIN_CUDA=1" in result.stdout + result.stderr


@pytest.mark.slow
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


def real_cmake(tmp_path) -> str:
    """The cmake binary itself (PATH may hold a wrapper script, e.g. pyenv's shim)."""
    script = tmp_path / "print_cmake_command.cmake"
    script.write_text('message("${CMAKE_COMMAND}")\n')
    return subprocess.run([shutil.which("cmake"), "-P", str(script)], capture_output=True, text=True).stderr.strip()


def tools_folder(folder, **tools):
    """A folder of links to real programs: a stand-in for pip's temporary build environment, or (as the whole
    PATH) for an environment that lacks what it does not link."""
    folder.mkdir(parents=True)
    for name, real in tools.items():
        (folder / name).symlink_to(real)
    return folder


@pytest.mark.slow
@needs_cmake
@pytest.mark.skipif(shutil.which("ninja") is None or shutil.which("make") is None, reason="needs ninja and make")
def test_build_folder_outlives_the_tools_that_configured_it(tmp_path):
    """pip configures each isolated build with the ninja of a temporary environment and then deletes it: the next
    build (isolated or not, with or without ninja) must configure with its own tools, not the cached paths."""
    built = tmp_path / "lib" / "pytrain"
    first_env = tools_folder(tmp_path / "first-env", ninja=shutil.which("ninja"))
    first = build(tmp_path, PYTRAIN_CUDA="0", PATH=f"{first_env}:{os.environ['PATH']}")
    assert first.returncode == 0, first.stdout + first.stderr
    assert f"CMAKE_MAKE_PROGRAM:FILEPATH={first_env}/ninja" in (tmp_path / "build" / "CMakeCache.txt").read_text()
    shutil.rmtree(first_env)  # as pip does

    # Another environment without any ninja: Unix Makefiles, so the Ninja cache cannot be reused.
    compilers = {name: shutil.which(name) for name in ("make", "c++", "cc", "as", "ld") if shutil.which(name)}
    no_ninja = tools_folder(tmp_path / "no-ninja", cmake=real_cmake(tmp_path), **compilers)
    second = build(tmp_path, setup=("-c", WITHOUT_NINJA_PACKAGE), PYTRAIN_CUDA="0", PATH=str(no_ninja))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "configured for Ninja, this build uses Unix Makefiles: reconfiguring" in second.stdout

    for name in built.iterdir():
        name.unlink()
    third = build(tmp_path, PYTRAIN_CUDA="0")  # back to this environment's ninja
    assert third.returncode == 0, third.stdout + third.stderr
    assert any(p.name.startswith("_C.") for p in built.iterdir())


SHARED_POOL_PROBE = """
import os, torch
import pytrain._C
from pytrain.kernels import rms_norm
torch.set_num_threads(2)
torch.randn(1 << 22).add_(1)  # starts torch's OpenMP pool
before = len(os.listdir('/proc/self/task'))
rms_norm(torch.randn(4096, 512), torch.ones(512))  # 2 threads' worth of rows
after = len(os.listdir('/proc/self/task'))
runtimes = {line.split()[-1] for line in open('/proc/self/maps') if 'libgomp' in line or 'libiomp' in line}
print(before, after, len(runtimes))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc (Linux)")
def test_cpu_kernels_run_on_torchs_openmp_pool():
    """pytrain._C links OpenMP by its soname, so its parallel loops run on torch's own intra-op pool: one OpenMP
    runtime in the process, and a kernel starts no thread (cpu_types.h's parallel_for says why it matters)."""
    import pytrain._C

    linked = subprocess.run(["ldd", pytrain._C.__file__], capture_output=True, text=True, check=True).stdout
    assert "libgomp" in linked, linked
    probe = subprocess.run([python(), "-c", SHARED_POOL_PROBE], capture_output=True, text=True, check=True, cwd=ROOT)
    before, after, runtimes = map(int, probe.stdout.split())
    assert (after, runtimes) == (before, 1), probe.stdout
