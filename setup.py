"""Build script: the Python packages (configured in pyproject.toml), plus the CUDA extension ``lego_kernels._C``.

The extension is built by CMake + ninja (CMakeLists.txt, csrc/) when nvcc is found: ``$CUDA_HOME/bin/nvcc``, then
``nvcc`` on PATH, then ``/usr/local/cuda/bin/nvcc``. It needs no CUDA build of PyTorch. Without nvcc, or with
``LEGO_SKIP_CUDA_BUILD=1``, it is skipped with one printed line and the package works without it (Triton and PyTorch
backends). ``LEGO_CUDA_ARCHS`` (default "80;90") sets the GPU architectures. Works for ``pip install .``,
``pip install -e .`` (the module lands in lego_kernels/) and ``python setup.py build_ext --inplace``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    """An extension whose sources CMake compiles (CMakeLists.txt at the repository root)."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


def find_nvcc() -> str | None:
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(Path(on_path))
    candidates.append(Path("/usr/local/cuda/bin/nvcc"))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c.resolve())
    return None


def find_tool(name: str) -> str:
    """cmake / ninja: on PATH (pip's isolated build env puts its scripts there), else from the PyPI package."""
    found = shutil.which(name)
    if found:
        return found
    try:
        module = __import__(name)
        bin_dir = getattr(module, "CMAKE_BIN_DIR", None) or module.BIN_DIR
        return str(Path(bin_dir) / name)
    except (ImportError, AttributeError) as e:
        raise RuntimeError(f"building lego_kernels._C needs {name}: pip install {name}") from e


def skip_reason() -> str | None:
    if os.environ.get("LEGO_SKIP_CUDA_BUILD", "0") not in ("", "0"):
        return "LEGO_SKIP_CUDA_BUILD is set"
    if find_nvcc() is None:
        return "nvcc not found (CUDA_HOME, PATH, /usr/local/cuda/bin)"
    if not (ROOT / "CMakeLists.txt").is_file() or not (ROOT / "csrc").is_dir():
        return "CMakeLists.txt or csrc/ is missing from this source tree"
    return None


class CMakeBuild(build_ext):
    def finalize_options(self):
        super().finalize_options()
        self._skip = skip_reason()
        if self._skip is not None:
            self._skipped = [e for e in self.extensions if isinstance(e, CMakeExtension)]
            self.extensions = [e for e in self.extensions if not isinstance(e, CMakeExtension)]

    def run(self):
        if self._skip is not None:
            print(f"lego: skipping the CUDA extension lego_kernels._C: {self._skip}", file=sys.stderr, flush=True)
            for ext in self._skipped:  # a module left in build/ by an earlier build must not slip into this wheel
                Path(self.build_lib, self.get_ext_filename(ext.name)).unlink(missing_ok=True)
        super().run()

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        import pybind11

        nvcc = find_nvcc()
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("LEGO_CUDA_ARCHS") or "80;90"
        configure = [
            find_tool("cmake"),
            "-S", str(ROOT),
            "-B", str(build_dir),
            "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={find_tool('ninja')}",
            f"-DCMAKE_CUDA_COMPILER={nvcc}",
            f"-DLEGO_CUDA_ARCHS={archs}",
            f"-DLEGO_EXT_DIR={out_dir}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DPython_EXECUTABLE={sys.executable}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(configure, check=True)
        subprocess.run([find_tool("cmake"), "--build", str(build_dir)], check=True)
        built = Path(self.get_ext_fullpath(ext.name))
        if not built.exists():
            raise RuntimeError(f"CMake finished but {built} is missing")
        print(f"lego: built {built.name} for CUDA archs {archs} in {time.perf_counter() - start:.0f} s", flush=True)


setup(ext_modules=[CMakeExtension("lego_kernels._C")], cmdclass={"build_ext": CMakeBuild})
