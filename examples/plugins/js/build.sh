#!/usr/bin/env bash
# Build the JavaScript word-mask `post` stage: app.js -> word_mask.wasm (or $OUT).
#
# Needs node >= 18 and npm (`npm ci` installs the pinned componentize-js
# 0.23.0 and jco from package-lock.json). Not `jco componentize`: its CLI
# fails on Node 20; componentize-js's own CLI does the same job.
set -euo pipefail
cd "$(dirname "$0")"
[ -x node_modules/.bin/componentize-js ] || npm ci --no-fund --no-audit --loglevel=error
# `-d`: drop the WASI features ComponentizeJS would otherwise import. Without
# `-d http` the component imports wasi:http, which the host does not link.
# Without the others console.* goes nowhere and Math.random() is seeded at
# build time; this stage uses neither. What is left to import:
# orchestrator:pipeline/{log,types,inference,request,streaming} (inference is
# linked for every stage and fails unless granted), 3 core instances, ~12 MB.
npx componentize-js app.js --wit ../../../wit -n streaming-request-stage \
    -d stdio random clocks http fetch-event -o "${OUT:-word_mask.wasm}"
