#!/usr/bin/env bash
# Opt-in Docker smoke test (`make docker-test`): a real engine on this machine, no registry.
#
# Starts its own dockerd (vfs storage, no iptables, no default bridge), builds a bookworm base
# image with debootstrap, builds both images offline from wheels downloaded on the host, and
# checks: `docker compose up --wait` trains then serves; real MNIST PNGs classify through the
# published port; a second `up` reuses the model; `stop` drains and exits 0; `--scale server=2`
# serves from both replicas, and restarting one of them under load fails no call; a corrupt
# model makes `up --wait` fail. Then it tears everything
# down and stops the daemon it started, by PID. Needs root (dockerd, debootstrap, apt-get).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${DOCKER_SMOKE_DIR:-/tmp/digits-docker-smoke}
MNIST=${MNIST_DATA_DIR:-$ROOT/../shared/mnist}
MNIST=$(cd "$MNIST" && pwd)
BIN=${BIN:-$ROOT/.venv/bin}
PORT=${SMOKE_PORT:-50251}
PROJECT=digits-smoke
SUMMARY=$WORK/summary.txt
mkdir -p "$WORK"
: >"$SUMMARY"

say() { echo "== $*" | tee -a "$SUMMARY"; }
started_at=$(date +%s)
phase_start=$started_at
phase() {
  local now
  now=$(date +%s)
  say "$1 ($((now - phase_start)) s)"
  phase_start=$now
}

# --- tools ---------------------------------------------------------------------------------
if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap
fi
export DOCKER_CONFIG=$WORK/config DOCKER_HOST=unix://$WORK/docker.sock
mkdir -p "$DOCKER_CONFIG/cli-plugins"
COMPOSE_BIN=$("$BIN/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')
install -m 755 "$COMPOSE_BIN" "$DOCKER_CONFIG/cli-plugins/.docker-compose.new"
mv -f "$DOCKER_CONFIG/cli-plugins/.docker-compose.new" "$DOCKER_CONFIG/cli-plugins/docker-compose"

# --- daemon --------------------------------------------------------------------------------
dockerd --storage-driver=vfs --iptables=false --ip6tables=false --ip-forward=false \
  --bridge=none --data-root="$WORK/data" --exec-root="$WORK/exec" \
  --pidfile="$WORK/dockerd.pid" -H "$DOCKER_HOST" >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!

compose() {
  docker compose -p "$PROJECT" -f "$ROOT/docker-compose.yml" -f "$WORK/smoke.yml" "$@"
}

cleanup() {
  set +e
  compose down -v --remove-orphans >/dev/null 2>&1
  docker builder prune -af >/dev/null 2>&1
  kill "$DOCKERD_PID" 2>/dev/null && wait "$DOCKERD_PID" 2>/dev/null
  if mountpoint -q "$WORK/exec/netns/default" 2>/dev/null; then umount "$WORK/exec/netns/default"; fi
  rm -rf "$WORK/data" "$WORK/exec" "$ROOT/.wheels"  # the wheels are a build input only
  echo "== cleaned up (dockerd $DOCKERD_PID stopped; summary in $SUMMARY)"
}
trap cleanup EXIT

for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
docker info >/dev/null
phase "dockerd $(docker version --format '{{.Server.Version}}') up, pid $DOCKERD_PID"

# --- base image and wheels -----------------------------------------------------------------
if [ ! -f "$WORK/rootfs.tar" ]; then
  rm -rf "$WORK/rootfs"
  debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,passwd \
    bookworm "$WORK/rootfs" >"$WORK/debootstrap.log" 2>&1
  tar -C "$WORK/rootfs" -cf "$WORK/rootfs.tar" .
  rm -rf "$WORK/rootfs"
fi
docker import "$WORK/rootfs.tar" digits-base:bookworm >/dev/null
phase "base image digits-base:bookworm imported"

rm -rf "$ROOT/.wheels"
mkdir -p "$ROOT/.wheels"
platforms=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64)
for minor in $(seq 5 36); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
"$BIN/python" - >"$WORK/requirements.txt" <<'EOF'
import tomllib
spec = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = spec["optional-dependencies"]
print("\n".join(spec["dependencies"] + extras["server"] + extras["train"]
                + ["setuptools>=69", "wheel"]))
EOF
(cd "$ROOT" && "$BIN/pip" download --quiet --only-binary=:all: "${platforms[@]}" \
  --platform any --python-version 3.11 --implementation cp -d .wheels \
  -r "$WORK/requirements.txt" >"$WORK/wheels.log" 2>&1) || { tail -5 "$WORK/wheels.log"; exit 1; }
phase "wheels downloaded: $(du -sh "$ROOT/.wheels" | cut -f1)"

cat >"$WORK/smoke.yml" <<EOF
x-offline: &offline
  network: none
  args:
    BASE_IMAGE: digits-base:bookworm
    PIP_ARGS: --no-index --find-links /tmp/wheels
services:
  trainer:
    build: *offline
    pull_policy: never
  server:
    build: *offline
    pull_policy: never
EOF

# --- build ---------------------------------------------------------------------------------
compose build >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
phase "images built"
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep digit-recognizer | tee -a "$SUMMARY"

# --- up: train, then serve -----------------------------------------------------------------
export MNIST_DATA_DIR=$MNIST SERVER_PORT=$PORT METRICS_PORT= HTTP_PORT=$((PORT + 1))
compose up -d --wait --wait-timeout 600
phase "compose up --wait: trained and healthy"
compose logs trainer | grep -E "test accuracy|parity|not retraining" | tail -3 | tee -a "$SUMMARY"

mkdir -p "$WORK/pngs"
"$BIN/python" - "$MNIST" "$WORK/pngs" <<'EOF'
import gzip, sys
from pathlib import Path
import numpy as np
from PIL import Image
mnist, out = Path(sys.argv[1]), Path(sys.argv[2])
x = np.frombuffer(gzip.decompress((mnist / "t10k-images-idx3-ubyte.gz").read_bytes()), np.uint8, offset=16).reshape(-1, 28, 28)
y = np.frombuffer(gzip.decompress((mnist / "t10k-labels-idx1-ubyte.gz").read_bytes()), np.uint8, offset=8)
for i in range(20):
    Image.fromarray(x[i]).save(out / f"test{i:02d}-label{y[i]}.png")
EOF
"$BIN/digit-client" classify --target "127.0.0.1:$PORT" "$WORK/pngs" "$ROOT"/examples/photo-* \
  | tee "$WORK/classify.txt" | tee -a "$SUMMARY"
correct=$(grep -cE 'label([0-9])[^:]*: \1 ' "$WORK/classify.txt" || true)
total=$(wc -l <"$WORK/classify.txt")
say "classified through the published port: $correct of $total correct"
[ "$correct" -ge $((total - 1)) ]
http_answer=$(curl -sf -F "file=@$ROOT/examples/photo-4-label4-jpeg.jpg" \
  "http://127.0.0.1:$HTTP_PORT/v1/classify" | "$BIN/python" -c 'import json,sys; print(json.load(sys.stdin)["digit"])')
# (files, not pipes, before grep -q: an early-exiting grep would fail the pipe under pipefail)
curl -sf "http://127.0.0.1:$HTTP_PORT/" -o "$WORK/page.html"
grep -q "<canvas" "$WORK/page.html"
say "HTTP front: page served, photo-4 uploaded -> $http_answer"
[ "$http_answer" = 4 ]

# --- a second up reuses the model ----------------------------------------------------------
compose up -d --wait --wait-timeout 120
compose logs trainer >"$WORK/trainer.log" 2>&1
grep -q "not retraining" "$WORK/trainer.log"
phase "second up reused the model"

# --- stop drains and exits 0 ---------------------------------------------------------------
compose stop server
container=$(compose ps -a -q server)
code=$(docker inspect -f '{{.State.ExitCode}}' "$container")
compose logs --no-log-prefix server | grep -E '"message": "(draining|stopped)"' | tee -a "$SUMMARY"
compose logs server >"$WORK/server.log" 2>&1
grep -q '"message": "stopped"' "$WORK/server.log"
phase "compose stop: server exit code $code after draining"
[ "$code" = 0 ]

# --- scale to two replicas ------------------------------------------------------------------
SERVER_PORT= HTTP_PORT= compose up -d --wait --wait-timeout 120 --scale server=2
for index in 1 2; do
  replica_port=$(compose port --index "$index" server 50051 | cut -d: -f2)
  "$BIN/digit-client" classify --target "127.0.0.1:$replica_port" "$ROOT/examples/mnist-0-label7.png" \
    | sed "s/^/replica $index: /" | tee -a "$SUMMARY"
done
phase "--scale server=2: both replicas answered"

# --- restart one replica under load: no call may fail ---------------------------------------
targets=()
for index in 1 2; do targets+=("127.0.0.1:$(compose port --index "$index" server 50051 | cut -d: -f2)"); done
first=$(compose ps -q server | head -1)
"$BIN/python" "$ROOT/scripts/restart_under_load.py" --seconds 10 --restart-after 2 \
  --command "docker restart -t 30 $first" "${targets[@]}" | tee "$WORK/restart.json" | tee -a "$SUMMARY"
"$BIN/python" - "$WORK/restart.json" <<'EOF'
import json, sys
result = json.load(open(sys.argv[1]))
failed = {client: {k: v for k, v in counts.items() if k != "OK"} for client, counts in result.items()
          if isinstance(counts, dict)}
assert not any(failed.values()), f"calls failed during the restart: {failed}"
EOF
phase "one of two replicas restarted under load: 0 failed calls"
compose down >/dev/null 2>&1

# --- a corrupt model never becomes healthy --------------------------------------------------
compose run --rm --no-deps --entrypoint sh trainer -c 'head -c 4096 /dev/urandom > /models/corrupt.onnx'
if SERVER_MODEL=/models/corrupt.onnx compose up -d --wait --wait-timeout 60 >"$WORK/corrupt.log" 2>&1; then
  say "FAILED: a corrupt model came up healthy"
  exit 1
fi
compose logs server >"$WORK/corrupt-server.log" 2>&1
grep -m1 "not starting" "$WORK/corrupt-server.log" | tee -a "$SUMMARY"
phase "corrupt model: up --wait failed as it must"

say "docker smoke test passed in $(($(date +%s) - started_at)) s"
