#!/usr/bin/env bash
# One device call: a stage-2 / stage-1 training sweep on the GPU (runs in parallel), then the
# kernel check.  Writes $OUT/sweep.tar.gz (all loss logs) and $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD" OMP_NUM_THREADS=1
mkdir -p /tmp/sweep
nvidia-smi --query-gpu=name --format=csv,noheader
(TWOTOWER_REQUIRE_EXTENSION=1 TWOTOWER_USE_NINJA=1 MAX_JOBS=4 python3 setup.py build_ext --inplace \
    >/tmp/build.log 2>&1; echo "build rc $?" >>/tmp/build.log) &
CK=vllm_twotower/checkpoints/twotower-tasks
run() {  # name, args...
    local name=$1; shift
    timeout "${DEADLINE:-400}" python3 -m vllm_twotower.train --device cuda --threads 1 \
        --out /tmp/sweep/$name --log /tmp/sweep/$name.jsonl "$@" >/tmp/sweep/$name.out 2>&1 &
}
D="--init-from $CK --stages diffusion"
run d1 $D
run d2 $D --diffusion-steps 3600
run d3 $D --diffusion-lr 2e-3
run d4 $D --diffusion-t-power 0.5
run d5 $D --diffusion-span-fraction 0.5
run d6 $D --diffusion-span-fraction 0.5 --diffusion-t-power 0.5 --diffusion-lr 2e-3
run a1 --stages ar --ar-lr 3e-3 --eval-every 500
run a2 --stages ar --ar-steps 6000 --eval-every 500
sleep 20; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
wait_train() { while pgrep -f "vllm_twotower.train" >/dev/null; do sleep 5; done; }
wait_train
for f in /tmp/sweep/*.out; do echo "== $f"; tr '\r' '\n' <"$f" | grep -v "it/s\]$\|s/it\]$" | tail -4; done
tar czf "$OUT/sweep.tar.gz" -C /tmp/sweep $(cd /tmp/sweep && ls *.jsonl *.out)
wait
tail -3 /tmp/build.log
timeout 150 bash tools/gpu_check.sh >"$OUT/gpu_check.log" 2>&1
echo "gpu_check rc $?"
tail -40 "$OUT/gpu_check.log"
