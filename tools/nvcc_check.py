"""Compile-only check of every CUDA source (``csrc/**/*.cu``) for Hopper (``sm_90``).

GPU code must not rot on machines without a GPU: this compiles each ``.cu`` file with ``nvcc -c``
(no linking, nothing run) and exits non-zero when any fails.  The kernels include only CUDA and
project headers (their torch bindings are separate ``.cpp`` files), so the check works with a CPU
build of torch; torch's include directories are passed anyway when torch is importable.  Where
``nvcc`` is missing the check is skipped with a message and exit status 0.

Usage: ``python tools/nvcc_check.py [--arch sm_90]`` (``make nvcc-check``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"


def find_nvcc() -> str | None:
    """``nvcc`` from PATH, else from ``$CUDA_HOME/bin``."""
    found = shutil.which("nvcc")
    if found:
        return found
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    return str(candidate) if candidate and candidate.is_file() else None


def torch_include_flags() -> list[str]:
    """``-I`` flags for torch's headers, or none when torch is not importable."""
    try:
        from torch.utils.cpp_extension import include_paths
    except ImportError:
        return []
    return [f"-I{path}" for path in include_paths()]


def compile_one(nvcc: str, source: Path, arch: str, flags: list[str], out_dir: Path) -> str | None:
    """Compile ``source``; return ``None`` on success, else nvcc's output."""
    obj = out_dir / (source.relative_to(CSRC).as_posix().replace("/", "_") + ".o")
    cmd = [nvcc, f"-arch={arch}", "-std=c++17", "-O3", "-c", str(source), "-o", str(obj)]
    result = subprocess.run([*cmd, f"-I{CSRC}", *flags], capture_output=True, text=True)
    return None if result.returncode == 0 else (result.stdout + result.stderr)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="sm_90", help="GPU architecture to compile for")
    args = parser.parse_args()
    nvcc = find_nvcc()
    if nvcc is None:
        print("nvcc-check: SKIPPED, nvcc not found (install the CUDA toolkit or set CUDA_HOME)")
        return 0
    sources = sorted(CSRC.rglob("*.cu"))
    if not sources:
        print("nvcc-check: no CUDA sources under csrc/")
        return 0
    flags = torch_include_flags()
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor() as pool:
        errors = list(
            pool.map(lambda s: compile_one(nvcc, s, args.arch, flags, Path(tmp)), sources)
        )
    failed = 0
    for source, error in zip(sources, errors, strict=True):
        name = source.relative_to(ROOT)
        if error is None:
            print(f"nvcc-check: ok      {name} ({args.arch})")
        else:
            failed += 1
            print(f"nvcc-check: FAILED  {name} ({args.arch})\n{error}", file=sys.stderr)
    print(f"nvcc-check: {len(sources) - failed}/{len(sources)} CUDA sources compile")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
