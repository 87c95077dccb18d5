"""Build script: compiles the ``vllm_twotower._C`` extension from ``csrc/`` when torch is present.

The extension is optional.  Without torch in the build environment (an isolated ``pip install .``)
or without a working compiler, the package installs without it and every op falls back to its
pure-PyTorch implementation (``vllm_twotower.ops``).  ``make install`` builds it with
``--no-build-isolation`` against the installed torch.  CUDA sources (``csrc/**/*.cu``) are added
when torch was built with CUDA and ``nvcc`` is available.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).parent
CSRC = ROOT / "csrc"


def _relative(paths: list[Path]) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in paths)


def _extensions() -> tuple[list, dict]:
    if os.environ.get("TWOTOWER_SKIP_EXTENSION") == "1":
        print("vllm-twotower: TWOTOWER_SKIP_EXTENSION=1, building without compiled ops")
        return [], {}
    cpp_sources = list(CSRC.rglob("*.cpp"))
    if not cpp_sources:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "vllm-twotower: torch is not importable in the build environment, so the compiled "
            "ops are skipped and the pure-PyTorch fallbacks will be used. Install torch first "
            "and build with `pip install --no-build-isolation .` (or `make install`).",
            file=sys.stderr,
        )
        return [], {}

    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"]
    link_flags = ["-fopenmp"]
    cuda_sources = list(CSRC.rglob("*.cu"))
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME
    if use_cuda:
        ext_cls = cpp_extension.CUDAExtension
        sources = _relative(cpp_sources + cuda_sources)
        # Ampere and Hopper explicitly; naming arches also stops torch from adding its own.
        arches = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        extra = {
            "cxx": [*cxx_flags, "-DTWOTOWER_WITH_CUDA"],
            "nvcc": ["-O3", "-std=c++17", *arches],
        }
    else:
        ext_cls = cpp_extension.CppExtension
        sources = _relative(cpp_sources)
        extra = {"cxx": cxx_flags}
    ext = ext_cls(
        name="vllm_twotower._C",
        sources=sources,
        extra_compile_args=extra,
        extra_link_args=link_flags,
    )
    return [ext], {"build_ext": _optional_build_ext(cpp_extension)}


def _optional_build_ext(cpp_extension: object) -> type:
    """torch's ``BuildExtension``, but a failed compile warns instead of failing the install.

    Sources compile one by one unless ``TWOTOWER_USE_NINJA=1`` (parallel, ``MAX_JOBS``), which
    the GPU check uses: the CUDA build is minutes long when serial.
    """
    base = cpp_extension.BuildExtension.with_options(
        use_ninja=os.environ.get("TWOTOWER_USE_NINJA") == "1"
    )

    class OptionalBuildExtension(base):
        def build_extension(self, ext: object) -> None:
            try:
                super().build_extension(ext)
            except Exception as exc:  # a missing or broken compiler must not block installs
                if os.environ.get("TWOTOWER_REQUIRE_EXTENSION") == "1":
                    raise
                print(
                    f"vllm-twotower: building the compiled ops failed ({exc}); installing "
                    "without them, the pure-PyTorch fallbacks will be used. Set "
                    "TWOTOWER_REQUIRE_EXTENSION=1 to make this an error.",
                    file=sys.stderr,
                )

    return OptionalBuildExtension


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
