#!/usr/bin/env bash
# What tracing costs: three release hosts side by side — tracing off, on at
# 100 % sampling, on at 1 % — measured interleaved with wrk (echo backend,
# plain requests): requests/s and host CPU per request at 64 connections,
# p50 latency at 1 connection. The traced hosts export to a local OTLP/HTTP
# sink (a Python server that answers 200 and discards the body), so export
# itself is paid for, not skipped.
#
#   bash benches/trace-cost.sh              # ROUNDS=3, DURATION=5 seconds
#   BIN=path/to/orchestrator bash benches/trace-cost.sh
#   BASE=path/to/older/orchestrator bash benches/trace-cost.sh
#       adds that binary, untraced, as a fourth host ("base"): is "off" a
#       regression?
#
# Needs wrk and python3. wrk, the hosts and the sink share the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
command -v wrk >/dev/null || { echo "wrk is required: apt-get install wrk" >&2; exit 1; }
if [ -z "${BIN:-}" ]; then
    cargo build --release -q -p orchestrator
    BIN=target/release/orchestrator
fi
WORK=$(mktemp -d)
. benches/lib.sh
trap stop_all EXIT

# The OTLP sink.
cat >"$WORK/sink.py" <<'PY'
import http.server, sys
class Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
print(server.server_address[1], flush=True)
server.serve_forever()
PY
spawn "$WORK/sink.port" python3 "$WORK/sink.py"
wait_for 30 "$LAST_PID" test -s "$WORK/sink.port"
SINK="http://127.0.0.1:$(cat "$WORK/sink.port")/v1/traces"

start() { # name, config text[, binary]
    printf '%s\n' "$2" >"$WORK/$1.toml"
    start_host "$1" "${3:-$BIN}" "$WORK/$1.toml"
}
HOSTS="off on100 on1"
if [ -n "${BASE:-}" ]; then
    start base "" "$BASE"
    HOSTS="base $HOSTS"
fi
start off ""
start on100 "[tracing]
enabled = true
endpoint = \"$SINK\"
sampling_ratio = 1.0"
start on1 "[tracing]
enabled = true
endpoint = \"$SINK\"
sampling_ratio = 0.01"

for name in $HOSTS; do : >"$WORK/$name.rows"; done
for round in $(seq "$ROUNDS"); do
    for name in $HOSTS; do
        url="${API[$name]}/v1/chat/completions"
        before=$(tree_ticks "${PID[$name]}")
        out=$(wrk -t2 -c64 -d"${DURATION}s" -s benches/wrk-chat.lua "$url")
        after=$(tree_ticks "${PID[$name]}")
        requests=$(echo "$out" | awk '/requests in/ {print $1}')
        rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
        cpu_us=$(awk -v t=$((after - before)) -v n="$requests" -v hz="$TICK" 'BEGIN {printf "%.1f", t / hz / n * 1e6}')
        p50=$(wrk -t1 -c1 -d"${DURATION}s" --latency -s benches/wrk-chat.lua "$url" |
            awk '/^ +50%/ { v = $2
                if (v ~ /us$/) { sub(/us$/, "", v) }
                else if (v ~ /ms$/) { sub(/ms$/, "", v); v *= 1000 }
                else if (v ~ /s$/) { sub(/s$/, "", v); v *= 1000000 }
                printf "%.0f", v }')
        echo "$rps $cpu_us $p50" >>"$WORK/$name.rows"
        echo "round $round $name: $rps req/s, ${cpu_us} µs CPU/request, p50 at 1 connection ${p50} µs" >&2
    done
done
dropped=$(curl -s "${METRICS[on100]}/metrics" |
    awk '/^orchestrator_trace_spans_dropped_total/ {print $1, $2}' | tr '\n' ' ')
echo
echo "medians (ranges) over $ROUNDS interleaved rounds of ${DURATION}s:"
python3 - "$WORK" $HOSTS <<'PY'
import statistics, sys
for name in sys.argv[2:]:
    rows = [list(map(float, l.split())) for l in open(f"{sys.argv[1]}/{name}.rows")]
    cols = list(zip(*rows))
    def show(i, unit):
        c = cols[i]
        return f"{statistics.median(c):.0f}{unit} ({min(c):.0f}-{max(c):.0f})" if i != 1 else f"{statistics.median(c):.1f}{unit} ({min(c):.1f}-{max(c):.1f})"
    print(f"{name:6} {show(0, ' req/s')}, CPU/request {show(1, ' µs')}, p50 at 1 connection {show(2, ' µs')}")
PY
echo "dropped spans (100 % host): $dropped"
