#!/usr/bin/env bash
# Cold load, cached load, first call, warm calls and memory of the same
# word-mask stage in Rust, Python and JavaScript, with the release host (the
# "Plugin languages" table of benches/README.md). From the repository root, after
# `cargo build --release` and the examples' build.sh:
#   RUST_WASM=/path/to/word-mask/target/wasm32-wasip2/release/word_mask.wasm \
#     benches/plugin-languages.sh
# Each round uses a fresh cache directory (XDG_CACHE_HOME) for the cold load.
set -euo pipefail
BIN=${BIN:-target/release/orchestrator}
# A 1.4 KB completion with 20 words to mask.
ENVELOPE=$(mktemp)
python3 -c 'import json; print(json.dumps({"completion": " ".join(("the pipeline streams tokens to a client quickly and darn it works well " * 20).split())}))' > "$ENVELOPE"
declare -A WASM=(
  [rust]=${RUST_WASM:?build one with orchestrator plugin new word-mask --stage post --streaming, then set RUST_WASM}
  [python]=examples/plugins/python/word_mask.wasm
  [js]=examples/plugins/js/word_mask.wasm
)
for round in 1 2 3; do
  for lang in rust python js; do
    export XDG_CACHE_HOME=$(mktemp -d)
    cold=$($BIN plugin check "${WASM[$lang]}" --stage post 2>/dev/null | sed -n 's/.*load: *\([0-9.]*\) ms.*/\1/p')
    cached=$($BIN plugin check "${WASM[$lang]}" --stage post 2>/dev/null | sed -n 's/.*load: *\([0-9.]*\) ms.*/\1/p')
    run=$($BIN plugin run "${WASM[$lang]}" --stage post --input "$ENVELOPE" --repeat 2001 2>/dev/null)
    first=$(echo "$run" | python3 -c 'import json,sys; r=json.load(sys.stdin); print(round(r["duration_us"],1), round(r["warm"]["median_us"],1), round(r["warm"]["min_us"],1), r["memory_bytes"]//1024, r["fuel_used"])')
    size=$(stat -c %s "${WASM[$lang]}")
    echo "$round $lang size=$size cold_ms=$cold cached_ms=$cached first_us/warm_median_us/warm_min_us/mem_KiB/fuel=$first"
    rm -rf "$XDG_CACHE_HOME"
  done
done
