#!/usr/bin/env bash
# Instructions per request through the in-process pipeline (the five
# default stages), counted by valgrind's callgrind: the same figure on a
# busy machine as on an idle one, so a change's cost shows as a number.
#
#   bash benches/instructions.sh            # figures: N=20 and N=120 per scenario
#   SMOKE=1 bash benches/instructions.sh    # CI: N=1 and N=6, the debug build
#
# Scenarios: `echo` and the bench upstream (benches/bench_upstream.rs, its
# own process: not counted), a plain and a streaming client, and a plain
# client served from a streamed upstream request (`always_stream`), and a
# plain client through the policy stages (`policies`: auth, ratelimit and
# cache on memory stores, every request a cache miss that stores), and the
# same with one prompt over and over (`cache-hits`: each a hit). Each is
# run twice under callgrind, for SMALL and LARGE requests, and the difference
# in the process's instructions divided by the difference in requests is the
# figure: the start-up, the same in both runs, cancels out. (Collecting only
# inside the requests with `--toggle-collect` undercounts: a plugin call runs
# on a fiber stack of wasmtime's, and callgrind loses the call chain there.) The host
# runs its plugins with on-demand instances (ORCHESTRATOR_INSTANCE_ALLOCATION:
# the pooling allocator's address-space reservation does not run under
# valgrind), so its figures are for that allocator; a first native run fills
# the compiled-plugin cache (~/.cache/orchestrator), so valgrind never runs
# Cranelift. The figures are from the `bench` profile (release); the smoke
# test uses the debug build the tests made. Needs valgrind (and, for the
# floors, the wasm32-wasip2 target).
set -euo pipefail
cd "$(dirname "$0")/.."
. benches/lib.sh
WORK=$(mktemp -d)
trap stop_all EXIT
command -v valgrind >/dev/null || { log "valgrind is needed (Debian's valgrind)"; exit 1; }

if [ -n "${SMOKE:-}" ]; then SMALL=1 LARGE=6; else SMALL=${SMALL:-20} LARGE=${LARGE:-120}; fi
export ORCHESTRATOR_INSTANCE_ALLOCATION=on-demand

# The bench's executable, from cargo's JSON messages.
executable() { python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "instructions" and m.get("executable"):
        print(m["executable"])'; }
TARGET=${CARGO_TARGET_DIR:-target}
if [ -n "${SMOKE:-}" ]; then
    # The debug build `cargo test --benches` made: nothing to compile in CI.
    log "building the bench and the bench upstream (debug)"
    cargo build -q -p orchestrator --example bench_upstream
    BENCH=$(cargo test -q -p orchestrator --bench instructions --no-run --message-format=json | executable)
    UPSTREAM_BIN=$TARGET/debug/examples/bench_upstream
else
    log "building the bench and the bench upstream (release)"
    cargo build -q --release -p orchestrator --example bench_upstream
    BENCH=$(cargo bench -q -p orchestrator --bench instructions --no-run --message-format=json | executable)
    UPSTREAM_BIN=$TARGET/release/examples/bench_upstream
fi
[ -x "$BENCH" ] || { log "the bench was not built"; exit 1; }

spawn "$WORK/upstream.out" "$UPSTREAM_BIN" 127.0.0.1:0
wait_for 30 "$LAST_PID" grep -q '^listening on' "$WORK/upstream.out" ||
    { log "bench_upstream did not start:"; cat "$WORK/upstream.out" >&2; exit 1; }
export ORCHESTRATOR_BENCH_UPSTREAM="$(sed -n 's|^listening on ||p' "$WORK/upstream.out")/v1"

log "filling the compiled-plugin cache (natively)"
# Every plugin a scenario runs: the host compiles only the stages in use.
"$BENCH" echo plain --requests 1 >/dev/null
"$BENCH" echo policies --requests 1 >/dev/null

# Instructions a run executed, all threads.
collected() { # backend, client, requests
    local out=$WORK/callgrind.$1.$2.$3
    valgrind --tool=callgrind --callgrind-out-file="$out" \
        "$BENCH" "$1" "$2" --requests "$3" >"$out.log" 2>&1 ||
        { log "callgrind run failed:"; tail -30 "$out.log" >&2; return 1; }
    local n
    n=$(sed -n 's/^summary: //p' "$out" | awk '{print $1}')
    [ -n "$n" ] && [ "$n" -gt 0 ] || { log "no instructions collected ($out)"; tail -30 "$out.log" >&2; return 1; }
    echo "$n"
}

printf '%-9s %-17s %20s\n' backend client instructions/request
for scenario in "echo plain" "echo streamed" "upstream plain" "upstream streamed" "upstream plain-via-stream" \
    "echo policies" "upstream policies" "echo cache-hits"; do
    read -r backend client <<<"$scenario"
    small=$(collected "$backend" "$client" "$SMALL")
    large=$(collected "$backend" "$client" "$LARGE")
    printf '%-9s %-17s %20d\n' "$backend" "$client" $(((large - small) / (LARGE - SMALL)))
done

# Floors under the three policy stages (figures only, not in the smoke
# test): the policy scenario's requests through the five default stages
# alone (`none`), and with the three replaced by the test plugin `gate`
# (built with the SDK, exporting `finish`), doing nothing (`empty`) or the
# simplest form of each policy (`simple`: a bearer token compared, one
# windowed counter per principal, a lookup by the last user message; no
# hashing, no reservation to settle, nothing stored after the answer).
[ -n "${SMOKE:-}" ] && exit 0
log "building the test plugin gate"
GATE=$(build_gate "$TARGET")
KEY_SECRET=$(sed -n 's/^const KEY: &str = "\(.*\)";/\1/p' benches/instructions.rs)
floor() { # label, mode of each of the three stages
    local label=$1
    shift
    export ORCHESTRATOR_BENCH_STAGES=g1,rag,assemble,g2,g3,inference,post,stream
    [ $# -eq 0 ] && ORCHESTRATOR_BENCH_STAGES=rag,assemble,inference,post,stream
    export ORCHESTRATOR_BENCH_EXTRA=$'\n'"$(gate_stages "$GATE" "$KEY_SECRET" "$@")"$'\n'
    "$BENCH" echo policies --requests 1 >/dev/null
    small=$(collected echo policies "$SMALL")
    large=$(collected echo policies "$LARGE")
    printf '%-9s %-17s %20d\n' echo "floor: $label" $(((large - small) / (LARGE - SMALL)))
    unset ORCHESTRATOR_BENCH_STAGES ORCHESTRATOR_BENCH_EXTRA
}
floor none
floor empty noop noop noop
floor simple auth limit cache
