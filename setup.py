"""Build pytrain's compiled kernels with CMake.

Environment:
  PYTRAIN_CUDA        unset: build pytrain._C_cuda when nvcc is found (a failing CUDA compile is skipped
                      with a warning); 1: CUDA required (a failing compile fails the install); 0: CPU only.
  PYTRAIN_CUDA_ARCHS  CUDA architectures, default "80;90".
  PYTRAIN_BUILD_DIR   CMake build folder, default build/cmake-<python tag>; kept between builds so that
                      editing one source rebuilds only that file.

The build folder outlives the environment that configured it: pip's isolated builds run in a temporary
environment (its cmake, ninja and pybind11) that pip deletes afterwards. So every build names its own
tools to CMake again (generator, make program, pybind11) instead of trusting the cached paths, and a
cache made with another generator is dropped (CMake cannot switch generators in place).
"""

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, target: str, needs_cuda: bool = False):
        super().__init__(name, sources=[])
        self.target = target
        self.needs_cuda = needs_cuda


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").exists():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def find_ninja() -> str | None:
    """This environment's ninja: on PATH, else the binary of the `ninja` Python package."""
    found = shutil.which("ninja")
    if found:
        return found
    try:
        import ninja
    except ImportError:
        return None
    binary = Path(ninja.BIN_DIR) / "ninja"
    return str(binary) if binary.exists() else None


def cached_generator(cmake_dir: Path) -> str | None:
    cache = cmake_dir / "CMakeCache.txt"
    if not cache.exists():
        return None
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith("CMAKE_GENERATOR:INTERNAL="):
            return line.split("=", 1)[1]
    return None


def generator_args(cmake_dir: Path) -> list[str]:
    """-G and the make program of this environment; drops a cache made with another generator."""
    ninja = find_ninja()
    generator, make_program = ("Ninja", ninja) if ninja else ("Unix Makefiles", shutil.which("make"))
    if make_program is None:
        sys.exit("neither ninja nor make was found: `pip install ninja` or install make")
    cached = cached_generator(cmake_dir)
    if cached is not None and cached != generator:
        print(f"pytrain: the build folder was configured for {cached}, this build uses {generator}: reconfiguring")
        (cmake_dir / "CMakeCache.txt").unlink()
        shutil.rmtree(cmake_dir / "CMakeFiles", ignore_errors=True)
    return ["-G", generator, f"-DCMAKE_MAKE_PROGRAM:FILEPATH={make_program}"]


def cuda_mode() -> str:
    value = os.environ.get("PYTRAIN_CUDA", "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("1", "on", "true", "yes"):
        return "required"
    if value in ("0", "off", "false", "no"):
        return "off"
    sys.exit(f"PYTRAIN_CUDA={value!r} is not understood: use 1 (require CUDA), 0 (CPU only) or leave it unset")


class CMakeBuild(build_ext):
    def run(self):
        import pybind11

        mode = cuda_mode()
        nvcc = find_nvcc()
        want_cuda = mode == "required" or (mode == "auto" and nvcc is not None)
        if mode == "required" and nvcc is None:
            sys.exit("PYTRAIN_CUDA=1 but nvcc was not found: put it on PATH or set CUDA_HOME")

        self.cmake_dir = Path(
            os.environ.get("PYTRAIN_BUILD_DIR") or ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        )
        self.cmake_dir.mkdir(parents=True, exist_ok=True)
        self.cmake = shutil.which("cmake")
        if self.cmake is None:
            sys.exit("cmake was not found: `pip install cmake` or install it with your system's package manager")
        args = [
            self.cmake,
            "-S",
            str(ROOT),
            "-B",
            str(self.cmake_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DPYTRAIN_CUDA_ARCHS={os.environ.get('PYTRAIN_CUDA_ARCHS', '80;90')}",
        ]
        args += generator_args(self.cmake_dir)
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")

        built_cuda = False
        if want_cuda:
            try:
                subprocess.run(args + ["-DPYTRAIN_CUDA=ON"], check=True)
                built_cuda = True
            except subprocess.CalledProcessError:
                if mode == "required":
                    sys.exit("CMake could not configure the CUDA build (PYTRAIN_CUDA=1)")
                self.warn("configuring the CUDA build failed: building the CPU kernels only")
        if not built_cuda:
            subprocess.run(args + ["-DPYTRAIN_CUDA=OFF"], check=True)

        kept = []
        for ext in self.extensions:
            if ext.needs_cuda and not built_cuda:
                continue
            try:
                self.build_target(ext)
                kept.append(ext)
            except subprocess.CalledProcessError:
                if not ext.needs_cuda:
                    raise
                if mode == "required":
                    sys.exit(
                        f"building {ext.name} failed (see the compiler output above) and PYTRAIN_CUDA=1 "
                        f"requires it; PYTRAIN_CUDA=0 builds the CPU kernels only"
                    )
                self.warn(f"building {ext.name} failed: building the CPU kernels only")
        self.extensions = kept

    def build_target(self, ext: CMakeExtension):
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 1)
        subprocess.run([self.cmake, "--build", str(self.cmake_dir), "--target", ext.target, "-j", jobs], check=True)
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        built = self.cmake_dir / f"{ext.target}{suffix}"
        destination = Path(self.get_ext_fullpath(ext.name))
        destination.parent.mkdir(parents=True, exist_ok=True)
        # A new file renamed over the old one: processes that have the old module loaded keep their
        # mapping (overwriting it in place would crash them with SIGBUS).
        staging = destination.with_name(destination.name + ".tmp")
        shutil.copyfile(built, staging)
        os.replace(staging, destination)

    def get_outputs(self):
        return [self.get_ext_fullpath(ext.name) for ext in self.extensions]


setup(
    # Every package under pytrain/ (a list by hand once left pytrain.checkpoint out of built wheels).
    # pytrain.triton's files are the top-level kernels/ folder, which has no __init__.py so that it cannot be
    # imported as a top-level package named `kernels` (see pytrain/triton/__init__.py).
    packages=find_packages(include=["pytrain", "pytrain.*"]),
    package_dir={"pytrain.triton": "kernels"},
    ext_modules=[
        CMakeExtension("pytrain._C", target="_C"),
        CMakeExtension("pytrain._C_cuda", target="_C_cuda", needs_cuda=True),
    ],
    cmdclass={"build_ext": CMakeBuild},
)
