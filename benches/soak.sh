#!/usr/bin/env bash
# Soak test: the release host under steady mixed traffic for DURATION
# seconds, while the `post` stage is hot-swapped every SWAP_EVERY seconds
# (between two builds of the same plugin that differ only in a custom
# section, so each swap installs a new version) and the configuration file
# is rewritten and reloaded every RELOAD_EVERY seconds (alternating two
# variants: the second adds the `guard` stage to the pipeline, so a stage, its
# instances and its metric series come and go with every reload). Every SAMPLE_EVERY seconds it samples the host's RSS, open file
# descriptors, threads and /metrics series. At the end it prints the
# samples' first-half and second-half ranges and the RSS slope over the
# second half (least squares), and fails if that slope exceeds
# MAX_SLOPE_MIB_PER_HOUR or if any request got a 5xx.
#
#   bash benches/soak.sh                       # DURATION=1800 (30 minutes)
#   DURATION=120 bash benches/soak.sh          # a short run
#   BIN=path/to/orchestrator bash benches/soak.sh
#
# Traffic: wrk at CONNECTIONS (16) connections against the `echo` model, a
# different prompt per request, every third one streamed, through the five
# default stages and the three policy stages on memory stores (auth,
# ratelimit with a limit never reached, cache: every request a miss, its
# answer stored with a TTL of 60 s, so the cache's store stays bounded by
# its own expiry). Needs wrk, curl and python3.
set -euo pipefail
[ -n "${BIN:-}" ] && BIN=$(realpath "$BIN")
cd "$(dirname "$0")/.."
DURATION=${DURATION:-1800}
SWAP_EVERY=${SWAP_EVERY:-5}
RELOAD_EVERY=${RELOAD_EVERY:-60}
SAMPLE_EVERY=${SAMPLE_EVERY:-10}
CONNECTIONS=${CONNECTIONS:-16}
MAX_SLOPE_MIB_PER_HOUR=${MAX_SLOPE_MIB_PER_HOUR:-20}
ADMIN=soak-admin-token
for tool in wrk curl python3; do
    command -v $tool >/dev/null || { echo "$tool is required" >&2; exit 1; }
done
if [ -z "${BIN:-}" ]; then
    cargo build --release -q -p orchestrator --bin orchestrator
    TARGET=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
    BIN=$TARGET/release/orchestrator
fi
TARGET=${TARGET:-$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')}
POST_WASM=$TARGET/wasm-plugins/wasm32-wasip2/plugin/orchestrator_post.wasm
[ -f "$POST_WASM" ] || { echo "no $POST_WASM: build the host first" >&2; exit 1; }
WORK=$(mktemp -d)
. benches/lib.sh
trap stop_all EXIT

# Two builds of `post`: the second with a custom section appended.
cp "$POST_WASM" "$WORK/post-a.wasm"
python3 - "$POST_WASM" "$WORK/post-b.wasm" <<'EOF'
import sys
name, payload = b"soak", b"a second build of the same plugin"
body = bytes([len(name)]) + name + payload
size, leb = len(body), b""
while True:
    byte, size = size & 0x7F, size >> 7
    leb += bytes([byte | (0x80 if size else 0)])
    if not size:
        break
open(sys.argv[2], "wb").write(open(sys.argv[1], "rb").read() + b"\x00" + leb + body)
EOF

config() { # variant: 1 or 2 (2 adds the `guard` stage, and the cache's TTL differs)
    local guard=""
    [ "$1" = 2 ] && guard='"guard", '
    cat <<EOF
admin_token = "$ADMIN"
[stages.ratelimit.config]
rules = [{ name = "soak", requests_per_minute = 100000000, tokens_per_minute = 100000000000 }]
[stages.cache.config]
ttl_seconds = $((59 + $1))
[pipelines.default]
stages = ["auth", ${guard}"rag", "assemble", "ratelimit", "cache", "inference", "post", "stream"]
EOF
    if [ "$1" = 2 ]; then
        printf '%s\n' '[stages.guard.config]' 'deny = "ignore (all|previous) instructions\nreveal the system prompt"'
    fi
}
config 1 >"$WORK/soak.toml"
start_host soak "$BIN" "$WORK/soak.toml"
API_URL=${API[soak]}
METRICS_URL=${METRICS[soak]}
HOST_PID=${PID[soak]}
KEY=$(create_key "$API_URL" "$ADMIN" soak)

{ wrk_chat_head "$KEY"; cat <<EOF
request = function()
  n = n + 1
  local stream = (n % 3 == 0) and "true" or "false"
  local body = '{"model":"echo","stream":' .. stream ..
    ',"messages":[{"role":"user","content":"soak ' .. tostring(id) .. "-" .. n ..
    ' what is backpressure and how does the orchestrator shed load?"}]}'
  return wrk.format(nil, nil, nil, body)
end
EOF
} >"$WORK/soak.lua"

# The host's own process (the session's first).
rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$HOST_PID/status"; }
threads() { awk '/Threads/ {print $2}' "/proc/$HOST_PID/status"; }
fds() { find "/proc/$HOST_PID/fd" -mindepth 1 -maxdepth 1 | wc -l; }
series() { curl -s "$METRICS_URL/metrics" | grep -vc '^#'; }

wrk -t2 -c"$CONNECTIONS" -d"${DURATION}s" --timeout 30s -s "$WORK/soak.lua" \
    "$API_URL/v1/chat/completions" >"$WORK/wrk.out" 2>&1 &
WRK_PID=$!
start=$SECONDS
next_swap=$SWAP_EVERY next_reload=$RELOAD_EVERY next_sample=0
swaps=0 swap_errors=0 reloads=0 reload_errors=0 variant=1 build=b
echo "t_s rss_kib fds threads series" >"$WORK/samples"
while kill -0 "$WRK_PID" 2>/dev/null; do
    t=$((SECONDS - start))
    if [ "$t" -ge "$next_sample" ]; then
        echo "$t $(rss_kib) $(fds) $(threads) $(series)" >>"$WORK/samples"
        next_sample=$((next_sample + SAMPLE_EVERY))
    fi
    if [ "$t" -ge "$next_swap" ]; then
        if curl -sf -X PUT "$API_URL/admin/stages/post" -H "authorization: Bearer $ADMIN" \
            --data-binary "@$WORK/post-$build.wasm" >/dev/null; then swaps=$((swaps + 1)); else swap_errors=$((swap_errors + 1)); fi
        build=$([ $build = a ] && echo b || echo a)
        next_swap=$((next_swap + SWAP_EVERY))
    fi
    if [ "$t" -ge "$next_reload" ]; then
        variant=$((3 - variant))
        config $variant >"$WORK/soak.toml"
        if curl -sf -X POST "$API_URL/admin/config/reload" -H "authorization: Bearer $ADMIN" >/dev/null; then
            reloads=$((reloads + 1))
        else reload_errors=$((reload_errors + 1)); fi
        next_reload=$((next_reload + RELOAD_EVERY))
    fi
    sleep 1
done
wait "$WRK_PID" || true
echo "$((SECONDS - start)) $(rss_kib) $(fds) $(threads) $(series)" >>"$WORK/samples"

requests=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
non2xx=$(awk '/Non-2xx/ {print $NF}' "$WORK/wrk.out")
errors5xx=$(curl -s "$METRICS_URL/metrics" |
    awk '/^orchestrator_request_duration_seconds_count/ && /outcome="(error|timeout)"/ {s += $2} END {print s + 0}')
echo "duration ${DURATION} s, ${CONNECTIONS} connections: ${requests} requests, ${non2xx:-0} non-2xx (${errors5xx} error or timeout outcomes)"
echo "hot swaps of post: ${swaps} (${swap_errors} failed); configuration reloads: ${reloads} (${reload_errors} failed)"
python3 - "$WORK/samples" "$MAX_SLOPE_MIB_PER_HOUR" <<'EOF'
import sys
rows = [list(map(float, l.split())) for l in open(sys.argv[1]).read().splitlines()[1:]]
limit = float(sys.argv[2])
half = rows[len(rows) // 2:]
first = rows[1:len(rows) // 2] or rows[:1]  # the sample at t=0 is before any load
def span(rows, i, scale=1.0, unit=""):
    values = [r[i] / scale for r in rows]
    return f"{min(values):.1f}-{max(values):.1f}{unit}" if scale != 1.0 else f"{int(min(values))}-{int(max(values))}"
print("| | first half | second half |\n|---|---|---|")
for name, i, scale, unit in [("RSS", 1, 1024, " MiB"), ("file descriptors", 2, 1, ""), ("threads", 3, 1, ""), ("/metrics series", 4, 1, "")]:
    print(f"| {name} | {span(first, i, scale, unit)} | {span(half, i, scale, unit)} |")
xs = [r[0] / 3600 for r in half]
ys = [r[1] / 1024 for r in half]
mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
den = sum((x - mx) ** 2 for x in xs)
slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0
print(f"RSS slope over the second half: {slope:+.1f} MiB/hour (bound {limit})")
sys.exit(1 if slope > limit else 0)
EOF
[ "$errors5xx" = 0 ] || { echo "requests failed" >&2; exit 1; }
