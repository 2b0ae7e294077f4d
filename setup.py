"""Install vaegan_fast.

The Triton source lives in the top-level ``kernels/triton/`` folder (device code, kept apart from the library
as the design asks), but it is installed *inside* the package as ``vaegan_fast.kernels`` through
``package_dir``. That keeps a generic top-level module called ``kernels`` (a published PyPI package
already has that name) out of site-packages. Editable installs map it the same way.

torch is declared as ``torch>=2.4`` and not pinned: a GPU user keeps the torch they have. On a CPU-only
machine install the CPU build first (``pip install torch==2.13.0``), as the README's set-up command does,
so that pip sees the requirement satisfied and never pulls a multi-GB CUDA build.

The native CPU backend (``kernels/cpu/*.cpp``) is a set of shared libraries of torch ops, one per ISA, built by
the top-level ``CMakeLists.txt``; the ``build_ext`` step below runs CMake once and puts the libraries inside the
package, at ``vaegan_fast/_native/libvaegan_fast_native_{generic,avx2,avx512}.so`` (in the source tree for an
editable install; non-x86 machines build the generic one only). vaegan_fast/ops/_native_lib.py loads one of
them at import, by the CPU. It compiles
against the installed torch, so torch must be importable at build time: install torch first and use
``pip install --no-build-isolation -e .`` (or ``pip install --no-build-isolation .``).

- Where CMake and a C++ compiler are found, a failing native build fails the install, loudly.
- Where either is missing, the package installs without the native backend and says so (then
  ``backend="native"`` raises an error that says how to build it, and ``backend="auto"`` uses the reference).
- ``VAEGAN_FAST_SKIP_NATIVE=1`` skips the native build on purpose.
- ``VAEGAN_FAST_ISAS=generic,avx2,avx512`` (the default on x86-64; ``generic`` elsewhere) the ISAs to build, a
  subset for a quicker development build (see CMakeLists.txt); ``VAEGAN_FAST_BUILD_JOBS`` the parallel compile
  jobs (default 2). Building all three takes about 3 minutes on 2 cores (one takes about 1). The CMake build folder is
  ``build/native``, kept between installs so a rebuild only recompiles what changed.
"""
import os
import platform
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
NATIVE_PREFIX = "vaegan_fast._native.libvaegan_fast_native_"
X86 = platform.machine().lower() in ("x86_64", "amd64", "x64")
ALL_ISAS = ("generic", "avx2", "avx512") if X86 else ("generic",)


def native_isas() -> list:
    wanted = [i.strip() for i in os.environ.get("VAEGAN_FAST_ISAS", ",".join(ALL_ISAS)).split(",") if i.strip()]
    bad = [i for i in wanted if i not in ALL_ISAS]
    if bad:
        raise SystemExit(f"VAEGAN_FAST_ISAS: {bad} cannot be built here; choose from {ALL_ISAS}")
    return wanted


class CMakeExtension(Extension):
    """An extension built by CMakeLists.txt, not by setuptools' compiler."""

    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def get_ext_filename(self, fullname):
        # A plain shared library loaded with torch.ops.load_library, not a Python module: no ABI suffix.
        # (distutils asks with the full dotted name or with its last part only.)
        if fullname.startswith(NATIVE_PREFIX) or fullname.startswith(NATIVE_PREFIX.rsplit(".", 1)[1]):
            return os.path.join(*fullname.split(".")) + ".so"
        return super().get_ext_filename(fullname)

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        try:
            import torch
        except ImportError as exc:
            raise RuntimeError(
                "vaegan_fast's native backend compiles against torch, which is not importable in the build "
                f"environment ({exc}). Install torch first, then `pip install --no-build-isolation -e .`; or "
                "set VAEGAN_FAST_SKIP_NATIVE=1 to install without the native backend.") from exc
        build_dir = os.path.join(ROOT, "build", "native")
        os.makedirs(build_dir, exist_ok=True)
        if not getattr(self, "_native_built", False):  # one CMake build makes every ISA's library
            self._cmake(torch, build_dir)
            self._native_built = True
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        # An editable install then copies the library into the source tree, whose vaegan_fast/_native/ holds
        # nothing tracked (the library is a build output) and so is missing from a fresh clone.
        source_dir = os.path.join(ROOT, *ext.name.split(".")[:-1])
        os.makedirs(source_dir, exist_ok=True)
        # The single-ISA library of earlier versions: stale, and no longer loaded (unlinking leaves running
        # processes their mapping).
        legacy = os.path.join(source_dir, "libvaegan_fast_native.so")
        if os.path.exists(legacy):
            os.remove(legacy)
        name = ext.name.rsplit(".", 1)[1] + ".so"
        # copy under a temporary name, then rename: a running process that maps the library keeps its copy
        tmp = target + ".tmp"
        shutil.copyfile(os.path.join(build_dir, name), tmp)
        os.replace(tmp, target)

    def copy_file(self, infile, outfile, *args, **kwargs):
        # The editable install's copy into the source tree: under a temporary name, then renamed over the old
        # library, never written in place (a running process maps it; rewriting it would crash that process).
        if str(outfile).endswith(".so") and os.path.basename(str(outfile)).startswith("libvaegan_fast_native"):
            tmp = str(outfile) + ".tmp"
            shutil.copyfile(infile, tmp)
            os.replace(tmp, outfile)
            return outfile, 1
        return super().copy_file(infile, outfile, *args, **kwargs)

    def _cmake(self, torch, build_dir):
        configure = ["cmake", "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release",
                     f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                     f"-DVAEGAN_FAST_ISAS={';'.join(native_isas())}"]
        if shutil.which("ninja") and not os.path.exists(os.path.join(build_dir, "Makefile")):
            configure += ["-G", "Ninja"]
        jobs = os.environ.get("VAEGAN_FAST_BUILD_JOBS", "2")
        for cmd in (configure, ["cmake", "--build", build_dir, "--parallel", jobs]):
            print("vaegan_fast native build:", " ".join(cmd), flush=True)
            try:
                subprocess.run(cmd, check=True)
            except subprocess.CalledProcessError as exc:
                raise RuntimeError(
                    f"vaegan_fast: the native CPU backend failed to build ({' '.join(cmd)} exited with "
                    f"{exc.returncode}; its output is above). Fix the build, or set VAEGAN_FAST_SKIP_NATIVE=1 "
                    "to install without the native backend on purpose.") from exc


def native_extensions() -> list:
    if os.environ.get("VAEGAN_FAST_SKIP_NATIVE", "") not in ("", "0"):
        print("vaegan_fast: VAEGAN_FAST_SKIP_NATIVE is set: installing without the native CPU backend",
              file=sys.stderr)
        return []
    compiler = os.environ.get("CXX") or "c++"
    missing = [tool for tool, found in (("cmake", shutil.which("cmake")),
                                        (compiler, shutil.which(compiler) or shutil.which("g++")
                                         or shutil.which("clang++"))) if not found]
    if missing:
        print(f"WARNING: vaegan_fast: {' and '.join(missing)} not found: installing WITHOUT the native CPU "
              "backend (backend='auto' will use the slower reference ops on the CPU)", file=sys.stderr)
        return []
    return [CMakeExtension(NATIVE_PREFIX + isa) for isa in native_isas()]


setup(
    name="vaegan_fast",
    version="0.1.0",
    description="A performance engine for training VAE-GANs in PyTorch, with fused Triton kernels",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vaegan_fast", "vaegan_fast.*"]) + ["vaegan_fast.kernels"],
    package_data={"vaegan_fast": ["assets/*.pt"]},
    package_dir={"vaegan_fast.kernels": "kernels/triton"},
    ext_modules=native_extensions(),
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        "torch>=2.4",
        "triton>=3.6",
        "numpy",
        "nvidia-ml-py",
        "pillow",  # PNG sample grids and image-folder datasets
        "tqdm",  # the training CLI's progress bar
    ],
    extras_require={"test": ["pytest", "pytest-benchmark", "matplotlib", "scipy"], "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["vaegan-fast=vaegan_fast.__main__:main"]},
)
