#!/usr/bin/env bash
# What the gateway policies cost: the bundled `auth`, `ratelimit` and
# `cache` stages in front of the five default stages, against the five
# default stages alone, all in front of the same fast upstream
# (benches/bench_upstream.rs), measured interleaved over ROUNDS rounds of
# DURATION seconds. Hosts:
#   - base:   the five default stages;
#   - memory: auth + ratelimit + cache + the five, on memory stores;
#   - redis:  the same on a redis-server on loopback (started here);
#   - empty:  the five default stages and, where the three stand, three
#             stages that do nothing (the test plugin `gate` in its `noop`
#             mode, built with the SDK and exporting `finish`): what three
#             stages cost before any policy work, a floor for the three;
#   - simple: the same three as `gate` in its `auth`, `limit` and `cache`
#             modes: a bearer token compared, one windowed counter per
#             principal, a lookup by the last user message; no hashing, no
#             reservation to settle, nothing stored after the answer.
# For each, plain requests with a different prompt every time (so the
# cache always misses and stores, the costliest path for it):
#   1. requests/s at 64 connections and CPU per request (utime+stime of
#      the host over the 2xx answers);
#   2. p50 at 1 connection.
# Then, for memory and redis, one identical request over and over (every
# one a cache hit): p50 at 1 connection, against base's generation p50;
# and two floors for that comparison, at 1 connection: base's `GET
# /health` (an answer with no stage and no store) and the bench upstream
# answering the same chat request directly.
# Finally the store operations per request on the Redis host, by store and
# operation, from its metrics (what each stage costs in round trips, on
# the request path and in its finish call).
#
#   bash benches/policies.sh                     # ROUNDS=3, DURATION=5 seconds
#   ROUNDS=1 DURATION=2 bash benches/policies.sh # a quick check
#   BIN=path/to/orchestrator UPSTREAM_BIN=path/to/bench_upstream bash benches/policies.sh
#
# Needs wrk, curl, python3, redis-server and the wasm32-wasip2 target (the
# floor rows' plugin is built here). wrk, the upstream, Redis and
# the hosts share the machine's cores: on 2 cores only the differences and
# ratios mean much.
set -euo pipefail
[ -n "${BIN:-}" ] && BIN=$(realpath "$BIN")
[ -n "${UPSTREAM_BIN:-}" ] && UPSTREAM_BIN=$(realpath "$UPSTREAM_BIN")
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
ADMIN=bench-admin-token
for tool in wrk curl python3 redis-server; do
    command -v $tool >/dev/null || { echo "$tool is required" >&2; exit 1; }
done
if [ -z "${BIN:-}" ] || [ -z "${UPSTREAM_BIN:-}" ]; then
    cargo build --release -q -p orchestrator --bin orchestrator --example bench_upstream
fi
TARGET=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
BIN=${BIN:-$TARGET/release/orchestrator}
UPSTREAM_BIN=${UPSTREAM_BIN:-$TARGET/release/examples/bench_upstream}
WORK=$(mktemp -d)
. benches/lib.sh
trap stop_all EXIT
# The floor rows' stage: the test suite's `gate` plugin.
GATE=$(build_gate "$TARGET")
SIMPLE_TOKEN=bench-simple-token

spawn "$WORK/upstream.out" "$UPSTREAM_BIN" 127.0.0.1:0
wait_for 30 "$LAST_PID" grep -q 'listening on' "$WORK/upstream.out" ||
    { log "bench_upstream did not start"; exit 1; }
UPSTREAM=$(sed -n 's|^listening on http://||p' "$WORK/upstream.out")
REDIS_PORT=$(free_port)
spawn "$WORK/redis.out" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --dir "$WORK"
wait_for 30 "$LAST_PID" redis-cli -p "$REDIS_PORT" ping

base_config() {
    printf '[backends.up]\nkind = "openai"\nbase_url = "http://%s/v1"\n[routing.models]\nup = "up"\n' "$UPSTREAM"
}
policy_config() { # [redis port]
    printf 'admin_token = "%s"\n' "$ADMIN"
    base_config
    printf '[stages.ratelimit.config]\nrules = [{ name = "per_key", requests_per_minute = 100000000, tokens_per_minute = 100000000000 }]\n'
    printf '[pipelines.default]\nstages = ["auth", "rag", "assemble", "ratelimit", "cache", "inference", "post", "stream"]\n'
    if [ -n "${1:-}" ]; then
        for store in keys limits cache; do
            printf '[stores.%s]\nkind = "redis"\nurl = "redis://127.0.0.1:%s/0"\n' "$store" "$1"
        done
    fi
}
gate_config() { # the modes of the three gate stages
    base_config
    printf '[pipelines.default]\nstages = ["g1", "rag", "assemble", "g2", "g3", "inference", "post", "stream"]\n'
    gate_stages "$GATE" "$SIMPLE_TOKEN" "$@"
}
base_config >"$WORK/base.toml"
policy_config >"$WORK/memory.toml"
policy_config "$REDIS_PORT" >"$WORK/redis.toml"
gate_config noop noop noop >"$WORK/empty.toml"
gate_config auth limit cache >"$WORK/simple.toml"
HOSTS=(base memory redis empty simple)
declare -A KEY
for name in "${HOSTS[@]}"; do
    start_host "$name" "$BIN" "$WORK/$name.toml" || exit 1
    case $name in
    memory | redis) KEY[$name]=$(create_key "${API[$name]}" "$ADMIN" bench) ;;
    simple) KEY[$name]=$SIMPLE_TOKEN ;;
    *) KEY[$name]=none ;;
    esac
done

# wrk scripts: a different prompt per request (misses), or the same (hits).
PROMPT="one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty twenty-one twenty-two twenty-three twenty-four twenty-five twenty-six twenty-seven twenty-eight twenty-nine thirty thirty-one thirty-two"
for name in "${HOSTS[@]}"; do
    wrk_chat_unique "${KEY[$name]}" up false 32 "$PROMPT" >"$WORK/$name.miss.lua"
    { wrk_chat_head "${KEY[$name]}"; cat <<EOF
wrk.body = '{"model":"up","max_tokens":32,"messages":[{"role":"user","content":"the same $PROMPT"}]}'
EOF
    } >"$WORK/$name.hit.lua"
    # Warm up (and, for the hit script, store the entry; the hit script
    # of a host without a cache is never run).
    NONCE=warm wrk -t2 -c16 -d2s -s "$WORK/$name.miss.lua" "${API[$name]}/v1/chat/completions" >/dev/null
    wrk -t1 -c1 -d1s -s "$WORK/$name.hit.lua" "${API[$name]}/v1/chat/completions" >/dev/null
done

# The bench upstream asked directly, as the hosts ask it (32 words).
cat >"$WORK/upstream.lua" <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"up","max_tokens":32,"messages":[{"role":"user","content":"$PROMPT"}]}'
EOF

ok_requests() { # wrk output: completed requests minus non-2xx
    awk '/requests in/ {t = $1} /Non-2xx/ {e = $NF} END {print t - e}'
}
p50_us() { # wrk --latency output: the 50% line, in microseconds
    awk '$1 == "50%" {v = $2; if (v ~ /us$/) {sub(/us/, "", v); print v + 0}
        else if (v ~ /ms$/) {sub(/ms/, "", v); print v * 1000}
        else {sub(/s/, "", v); print v * 1000000}}'
}

declare -A RESULTS
for round in $(seq "$ROUNDS"); do
    for name in "${HOSTS[@]}"; do
        url="${API[$name]}/v1/chat/completions"
        pid=${PID[$name]}
        before=$(tree_ticks "$pid")
        out=$(NONCE=$round-64 wrk -t2 -c64 -d"${DURATION}s" -s "$WORK/$name.miss.lua" "$url")
        after=$(tree_ticks "$pid")
        ok=$(echo "$out" | ok_requests)
        # Successful answers per second: an erroring host must not look fast.
        rps=$(awk -v n="$ok" -v d="$DURATION" 'BEGIN {printf "%d", n / d}')
        errors=$(echo "$out" | awk '/Non-2xx/ {print $NF}')
        [ -z "$errors" ] || log "round $round $name: $errors non-2xx answers"
        out1=$(NONCE=$round-1 wrk -t1 -c1 -d"${DURATION}s" --latency -s "$WORK/$name.miss.lua" "$url")
        errors=$(echo "$out1" | awk '/Non-2xx/ {print $NF}')
        [ -z "$errors" ] || log "round $round $name, 1 connection: $errors non-2xx answers"
        cpu=$(awk -v t=$((after - before)) -v n="$ok" -v hz="$TICK" 'BEGIN {printf "%d", n ? t / hz / n * 1e6 : 0}')
        p50=$(echo "$out1" | p50_us)
        RESULTS[$name.rps]+="$rps "
        RESULTS[$name.cpu]+="$cpu "
        RESULTS[$name.p50]+="$p50 "
        if [ "$name" = memory ] || [ "$name" = redis ]; then
            out1=$(wrk -t1 -c1 -d"${DURATION}s" --latency -s "$WORK/$name.hit.lua" "$url")
            errors=$(echo "$out1" | awk '/Non-2xx/ {print $NF}')
            [ -z "$errors" ] || log "round $round $name, hits: $errors non-2xx answers"
            hit=$(echo "$out1" | p50_us)
            RESULTS[$name.hit]+="$hit "
        fi
        log "round $round $name: $rps req/s, $cpu us CPU, p50 $p50 us${hit:+, hit p50 $hit us}"
        unset hit
    done
    # The floors under a hit: an answer with no stage, and the upstream's.
    health=$(wrk -t1 -c1 -d"${DURATION}s" --latency "${API[base]}/health" | p50_us)
    upstream=$(wrk -t1 -c1 -d"${DURATION}s" --latency -s "$WORK/upstream.lua" "http://$UPSTREAM/v1/chat/completions" | p50_us)
    RESULTS[health]+="$health "
    RESULTS[upstream]+="$upstream "
    log "round $round: GET /health p50 $health us, the upstream alone p50 $upstream us"
done

median_range() { # numbers: "median (min-max)"
    echo "$@" | tr ' ' '\n' | grep -v '^$' | sort -n |
        awk '{v[NR] = $1} END {printf "%s (%s-%s)", v[int((NR + 1) / 2)], v[1], v[NR]}'
}
median() { echo "$@" | tr ' ' '\n' | grep -v '^$' | sort -n | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }

echo
echo "| host | plain req/s, 64 conn. | CPU per request (µs) | p50, 1 conn. (µs) | cache-hit p50, 1 conn. (µs) |"
echo "|---|---|---|---|---|"
for name in "${HOSTS[@]}"; do
    printf '| %s | %s | %s | %s | %s |\n' "$name" "$(median_range ${RESULTS[$name.rps]})" \
        "$(median_range ${RESULTS[$name.cpu]})" "$(median_range ${RESULTS[$name.p50]})" \
        "$( [ -z "${RESULTS[$name.hit]:-}" ] && echo - || median_range ${RESULTS[$name.hit]})"
done
base_cpu=$(median ${RESULTS[base.cpu]})
base_p50=$(median ${RESULTS[base.p50]})
for name in memory redis; do
    echo "$name: the three stages add $(( $(median ${RESULTS[$name.cpu]}) - base_cpu )) µs of host CPU per request (medians); base's generation p50 over a hit's p50: $(awk -v g="$base_p50" -v h="$(median ${RESULTS[$name.hit]})" 'BEGIN {printf "%.2f", g / h}')"
done
for name in empty simple; do
    echo "$name: its three stages add $(( $(median ${RESULTS[$name.cpu]}) - base_cpu )) µs of host CPU per request (medians)"
done
echo "floors at 1 connection: base's GET /health p50 $(median_range ${RESULTS[health]}) µs; the upstream alone $(median_range ${RESULTS[upstream]}) µs; base's generation $(median_range ${RESULTS[base.p50]}) µs"

echo
echo "store operations per request on the redis host (request path and finish calls):"
requests=$(curl -s "${METRICS[redis]}/metrics" |
    awk '/^orchestrator_request_duration_seconds_count/ {s += $2} END {print s}')
curl -s "${METRICS[redis]}/metrics" | grep '^orchestrator_store_operations_total' |
    awk -v n="$requests" '$2 > 0 {printf "  %s %.2f\n", $1, $2 / n}'
echo "nproc: $(nproc)"
