"""Build vitkern.

* ``vitkern._C``: the CUDA C++ kernels of ``csrc/``, built with nvcc when a CUDA toolkit (``CUDA_HOME``) and a CUDA
  build of torch are present, for the architectures in ``VITKERN_CUDA_ARCHS`` (default ``8.0;9.0``; PTX is embedded
  for the newest). ``VITKERN_SKIP_CUDA_BUILD=1`` skips it.
* ``vitkern._emulation``: with ``VITKERN_BUILD_EMULATION=1``, the same kernel sources compiled by the host C++
  compiler against ``csrc/emulation/cuda_emulation.h``, so the CUDA C++ kernels run on CPU tensors.
* The Python package and the Triton kernels (``kernels/`` installed as ``vitkern.kernels``) are installed either way.

Build against the installed torch: ``pip install --no-build-isolation .`` (or ``pip wheel --no-build-isolation .``).
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
CSRC = "csrc"
KERNEL_SOURCES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC).glob("*.cu"))
REGISTRATION = f"{CSRC}/ops.cpp"
# csrc/emulation/*_main.cpp are standalone test drivers (tests/test_cuda_emulation.py), not part of the module.
EMULATION_SOURCES = sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / CSRC / "emulation").glob("*.cpp") if not p.name.endswith("_main.cpp")
)


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _cuda_arch_flags() -> list[str]:
    archs = [a.strip() for a in os.environ.get("VITKERN_CUDA_ARCHS", "8.0;9.0").split(";") if a.strip()]
    flags = []
    for arch in archs:
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    newest = max(archs, key=float).replace(".", "")
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def _extensions() -> tuple[list, dict]:
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        return [], {}
    extensions = []
    cxx_flags = ["-O3", "-std=c++20"]
    if not _flag("VITKERN_SKIP_CUDA_BUILD") and torch.version.cuda is not None and cpp_extension.CUDA_HOME:
        extensions.append(
            cpp_extension.CUDAExtension(
                name="vitkern._C",
                sources=[REGISTRATION, *KERNEL_SOURCES],
                include_dirs=[str(ROOT / CSRC)],
                define_macros=[("VITKERN_OP_NAMESPACE", "vitkern_cuda")],
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", *_cuda_arch_flags()],
                },
            )
        )
    if _flag("VITKERN_BUILD_EMULATION"):
        extensions.append(
            cpp_extension.CppExtension(
                name="vitkern._emulation",
                sources=[REGISTRATION, *EMULATION_SOURCES],
                include_dirs=[str(ROOT / CSRC), str(ROOT / CSRC / "emulation")],
                define_macros=[("VITKERN_OP_NAMESPACE", "vitkern_emu"), ("VITKERN_EMULATION", "1")],
                extra_compile_args={"cxx": [*cxx_flags, "-pthread"]},
                extra_link_args=["-pthread"],
            )
        )
    if not extensions:
        return [], {}
    return extensions, {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="vitkern",
    version="0.1.0",
    description="Fused Triton and CUDA C++ kernels for vision-transformer-family models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8") if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["vitkern", "vitkern.*"]), "vitkern.kernels"],
    package_dir={"vitkern.kernels": "kernels"},
    install_requires=["torch>=2.6", "triton>=3.2"],
    extras_require={"test": ["pytest>=8", "pytest-benchmark>=4", "numpy", "timm>=1.0"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
