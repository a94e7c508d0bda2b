#!/usr/bin/env bash
# End-to-end load test over HTTP on loopback, and startup time.
#
#   bash benches/load.sh            # DURATION=10 seconds per run by default
#   BIN=path/to/orchestrator bash benches/load.sh   # measure that binary (no build)
#
# Builds the release host, starts it with the bundled plugins and a fresh
# artifact cache, then:
#   1. time to first request served: cold cache (compiles 5 plugins), then warm;
#   2. wrk at 1, 16 and 64 connections, non-streaming and streaming:
#      requests/s, p50 and p99 latency, non-2xx responses;
#   3. the host's RSS at idle and its peak under load.
# Needs wrk (Debian: apt-get install wrk). wrk and the host share the
# machine's cores, so on 2 cores the figures are a floor.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${DURATION:-10}
command -v wrk >/dev/null || { echo "wrk is required: apt-get install wrk" >&2; exit 1; }
if [ -z "${BIN:-}" ]; then
    cargo build --release -q -p orchestrator
    BIN=target/release/orchestrator
fi
WORK=$(mktemp -d)
OUT=$WORK/rss
. benches/lib.sh
trap stop_all EXIT

now_ms() { date +%s%3N; }

# Start the host (its artifact cache kept from one start to the next); set
# HOST_PID, API_URL, METRICS_URL and STARTUP_MS (ms from exec to the first answered
# request).
start_timed() {
    local t0; t0=$(now_ms)
    start_host host "$BIN"
    HOST_PID=${PID[host]}
    API_URL=${API[host]}
    METRICS_URL=${METRICS[host]}
    until curl -sf "$API_URL/v1/chat/completions" -H 'content-type: application/json' \
        -d '{"model":"echo","messages":[{"role":"user","content":"ready?"}]}' >/dev/null; do sleep 0.005; done
    STARTUP_MS=$(( $(now_ms) - t0 ))
}

rss_mib() { awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$1/status"; }

start_timed; cold=$STARTUP_MS
kill -TERM -- "-$HOST_PID"; wait_for 30 "$HOST_PID" false || true
start_timed; warm=$STARTUP_MS
echo "startup to first answered request: cold cache ${cold} ms, warm cache ${warm} ms"
sleep 1
echo "idle RSS: $(rss_mib "$HOST_PID") MiB"

peak=0
printf '\n| mode | connections | requests/s | p50 | p99 | non-2xx |\n|---|---|---|---|---|---|\n'
for mode in plain stream; do
    for c in 1 16 64; do
        ( while kill -0 "$HOST_PID" 2>/dev/null; do rss_mib "$HOST_PID"; echo; sleep 0.25; done ) >"$OUT.rss" &
        sampler=$!
        result=$(STREAM=$([ $mode = stream ] && echo 1 || echo 0) \
            wrk -t$(( c < 2 ? 1 : 2 )) -c$c -d${DURATION}s --latency -s benches/wrk-chat.lua "$API_URL/v1/chat/completions")
        kill $sampler 2>/dev/null || true
        run_peak=$(sort -n "$OUT.rss" | tail -1)
        peak=$(echo "$peak $run_peak" | awk '{print ($2 > $1) ? $2 : $1}')
        rps=$(echo "$result" | awk '/Requests\/sec/ {print $2}')
        p50=$(echo "$result" | awk '$1 == "50%" {print $2}')
        p99=$(echo "$result" | awk '$1 == "99%" {print $2}')
        errors=$(echo "$result" | awk '/Non-2xx/ {print $NF}')
        printf '| %s | %s | %s | %s | %s | %s |\n' "$mode" "$c" "$rps" "$p50" "$p99" "${errors:-0}"
    done
done
rm -f "$OUT.rss"
echo
echo "peak RSS under load: ${peak} MiB"
curl -s "$METRICS_URL/metrics" | grep -E '^orchestrator_request_duration_seconds_count'
