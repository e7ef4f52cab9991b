#!/usr/bin/env bash
# Quick load run: digit-server configurations x digit-client bench loads, one JSON line each.
# Usage: scripts/quick_bench.sh [MODEL] [SECONDS]   (server and client share this machine)
set -euo pipefail
MODEL=${1:-models/model.onnx}
SECONDS_PER_RUN=${2:-5}
BIN=${BIN:-.venv/bin}
PORT=${PORT:-50151}

run_config() {
  local name=$1; shift
  "$BIN/digit-server" --model "$MODEL" --host 127.0.0.1 --port "$PORT" --no-metrics --plaintext \
      --log-level WARNING "$@" &
  local pid=$!
  for _ in $(seq 100); do
    "$BIN/digit-client" health --target "127.0.0.1:$PORT" --timeout 1 >/dev/null 2>&1 && break
    sleep 0.2
  done
  for load in "1 1 u8" "64 1 u8" "4 256 f32" "1 1 packed"; do
    read -r concurrency batch encoding <<<"$load"
    result=$("$BIN/digit-client" bench --target "127.0.0.1:$PORT" --json \
        --concurrency "$concurrency" --batch-size "$batch" --encoding "$encoding" \
        --duration "$SECONDS_PER_RUN")
    echo "{\"server\": \"$name\", \"result\": $result}"
  done
  kill -TERM "$pid"
  wait "$pid"
}

run_config "default (workers 1, max batch 256)"
run_config "batching off (max batch 1)" --max-batch-size 1
run_config "workers 2" --workers 2
run_config "spin-wait on" --spin-wait
