#!/usr/bin/env bash
# Build the Python word-mask `post` stage: app.py -> word_mask.wasm (or $OUT).
#
# Needs componentize-py 0.25.1 on PATH (or $COMPONENTIZE_PY):
#     python3 -m pip install componentize-py==0.25.1
# The component runs CPython inside it: ~18 MB, 14 core instances; it imports
# WASI 0.2 including wasi:sockets (the host links them and denies every socket
# call) and orchestrator:pipeline/inference (linked; fails unless granted).
set -euo pipefail
cd "$(dirname "$0")"
COMPONENTIZE_PY=${COMPONENTIZE_PY:-componentize-py}
if ! command -v "$COMPONENTIZE_PY" >/dev/null; then
    echo "componentize-py not found: python3 -m pip install componentize-py==0.25.1" >&2
    exit 1
fi
# The repository's WIT package, unchanged; the stock by-handle streaming world.
"$COMPONENTIZE_PY" -d ../../../wit -w streaming-request-stage componentize \
    -p . app -o "${OUT:-word_mask.wasm}"
