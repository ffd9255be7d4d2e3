"""Build vitkern.

* ``vitkern._C``: the CUDA C++ kernels of ``csrc/``, built with nvcc when a CUDA toolkit (``CUDA_HOME``) and a CUDA
  build of torch are present, for the architectures in ``VITKERN_CUDA_ARCHS`` (default ``8.0;9.0``; PTX is embedded
  for the newest). ``VITKERN_SKIP_CUDA_BUILD=1`` skips it.
* ``vitkern._emulation``: with ``VITKERN_BUILD_EMULATION=1``, the same kernel sources compiled by the host C++
  compiler against ``csrc/emulation/cuda_emulation.h``, so the CUDA C++ kernels run on CPU tensors.
* The Python package and the Triton kernels (``kernels/`` installed as ``vitkern.kernels``) are installed either way.

Build against the installed torch: ``pip install --no-build-isolation .`` (or ``pip wheel --no-build-isolation .``);
``pyproject.toml`` names the build tools (setuptools, wheel), torch is the environment's own. A build asked for an
extension (``VITKERN_BUILD_EMULATION=1``, or a CUDA toolkit with a CUDA build of torch and no
``VITKERN_SKIP_CUDA_BUILD``) fails when torch cannot be imported or when the extension's file is missing afterwards,
so an isolated build (which has no torch) never passes for a build with extensions.

Each build that compiles extensions writes ``vitkern/_build_info.json`` beside them (in the source tree for an
editable install, in the wheel otherwise), a JSON object::

    {"torch": "2.14.1+cu130",           # torch.__version__ the extensions were compiled against
     "cuda": "13.0",                    # torch.version.cuda of that torch (null for a CPU-only torch)
     "extensions": ["vitkern._C", "vitkern._emulation"]}   # the modules this build produced

so that an extension which later fails to import can be reported with the torch it was built for.
"""

from __future__ import annotations

import json
import os
import sys
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


def _cuda_archs() -> list[str]:
    """The architectures of ``VITKERN_CUDA_ARCHS`` (default ``8.0;9.0``), as "8.0", "9.0"."""
    return [a.strip() for a in os.environ.get("VITKERN_CUDA_ARCHS", "8.0;9.0").split(";") if a.strip()]


def _cuda_arch_flags() -> list[str]:
    archs = _cuda_archs()
    flags = []
    for arch in archs:
        num = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    newest = max(archs, key=float).replace(".", "")
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


BUILD_INFO = "_build_info.json"


def _build_ext_class(base):
    """``base`` (torch's BuildExtension) checking that every extension it was given exists once it has run, and
    recording the torch they were built against in ``vitkern/_build_info.json``."""
    import torch

    class BuildExtension(base):
        def run(self) -> None:
            super().run()
            paths = {ext.name: Path(self.get_ext_fullpath(ext.name)) for ext in self.extensions}
            missing = [f"{name} ({path})" for name, path in paths.items() if not path.is_file()]
            if missing:
                sys.exit(f"vitkern: the build was asked for {', '.join(missing)} and did not produce it")
            info = {"torch": torch.__version__, "cuda": torch.version.cuda, "extensions": sorted(paths)}
            if "vitkern._C" in paths:
                info["cuda_archs"] = _cuda_archs()
            target = next(iter(paths.values())).parent / BUILD_INFO
            target.write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")

    return BuildExtension


def _extensions() -> tuple[list, dict]:
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as error:
        if _flag("VITKERN_BUILD_EMULATION"):
            sys.exit(
                f"vitkern: VITKERN_BUILD_EMULATION=1 needs torch in the build environment, and importing it failed "
                f"({error}); install torch first and build with pip's --no-build-isolation"
            )
        print("vitkern: torch cannot be imported here; building without extensions", file=sys.stderr)
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
    return extensions, {"build_ext": _build_ext_class(cpp_extension.BuildExtension).with_options(use_ninja=True)}


def main() -> None:
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
        install_requires=["torch>=2.11", "triton>=3.6", "einops>=0.7", "numpy"],
        extras_require={
            "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "timm>=1.0"],
            "charts": ["matplotlib"],
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
        zip_safe=False,
    )


# setuptools runs this file as __main__; tests import it for its helpers.
if __name__ == "__main__":
    main()
