#!/usr/bin/env bash
# The device check: build the CUDA extension on a GPU machine, run the kernel tests there (the
# CUDA ones skip everywhere else) and time the CUDA kernels and the reference implementation.
#
#   bash tools/gpu_check.sh        # on a machine with a GPU, torch (CUDA) and nvcc; no vLLM needed
#
# Prints everything; the results are recorded in docs/kernels.md and docs/performance.md by hand.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TWOTOWER_REQUIRE_EXTENSION=1 TWOTOWER_USE_NINJA=1 MAX_JOBS=16
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'

start=$SECONDS
if ! python3 setup.py build_ext --inplace >/tmp/twotower-build.log 2>&1; then
    tail -60 /tmp/twotower-build.log
    exit 1
fi
echo "== build: $((SECONDS - start)) s"
python3 -c 'from vllm_twotower.ops import extension_status; print(extension_status())'

echo "== kernel tests (CPU and CUDA)"
python3 -m pytest -q -p no:cacheprovider tests/test_ops_commit.py tests/test_ops_moe.py \
    tests/test_ops_paged_attention.py \
    tests/test_commit_rule.py
tests=$?

echo "== kernels on the GPU"
python3 benchmarks/kernels.py --device cuda --no-write
echo "== reference implementation on the GPU, batch 1"
python3 benchmarks/throughput.py --reference-only --device cuda --num-prompts 16
exit $tests
