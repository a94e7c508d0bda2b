#!/usr/bin/env bash
# Our gateway side by side with two peers, TensorZero and LiteLLM, all three
# in front of the same fast OpenAI-compatible upstream (benches/
# bench_upstream.rs: no delay, answers the first max_tokens words of the
# prompt), measured interleaved over ROUNDS rounds of DURATION seconds each.
# For the upstream alone (the baseline) and each gateway:
#   1. wrk at 64 connections, plain (stream false) and streamed (stream true)
#      requests with 32-token answers: successful requests/s, with non-2xx
#      responses and socket errors counted (an erroring gateway must not
#      look fast);
#   2. CPU per request at 64 connections, plain: utime+stime of the
#      gateway's whole process tree (LiteLLM's workers, TensorZero's Python
#      host) over the requests it answered with 2xx, and the upstream's CPU
#      over the same requests (what serving that gateway cost it: a gateway
#      that streams from the upstream for a plain client costs it more);
#   3. p50 latency at 1 connection, plain and streamed, and what the gateway
#      adds to the upstream's p50 in the same round;
#   4. only if `oha` is on PATH: an open-loop sweep at constant rates
#      (RATES, plain requests): p50 and p99 per rate;
#   5. ours (and the baseline) with its built-in `echo` backend instead of
#      the upstream, plain at 64 connections: requests/s against the
#      upstream alone, a bare warp server (the host's HTTP path and five
#      stages, no upstream call).
# It prints a markdown table of medians (min-max over the rounds), the
# peers' versions and nproc.
#
#   bash benches/gateways.sh                        # ROUNDS=3, DURATION=5 seconds
#   ROUNDS=1 DURATION=2 bash benches/gateways.sh    # a quick check
#   VENV=/tmp/gateways-venv bash benches/gateways.sh
#       keep the peers' virtualenv there and reuse it on later runs
#       (by default it is made in a temporary directory and removed)
#   BIN=path/to/orchestrator UPSTREAM_BIN=path/to/bench_upstream bash benches/gateways.sh
#       measure those binaries (no build)
#   BASELINE_BIN=path/to/older/orchestrator bash benches/gateways.sh
#       also measure another build of ours ("baseline"), interleaved with
#       the others: a regression check between two commits
#   RATES="50 100 200" bash benches/gateways.sh    # oha's rates, requests/s
#   PEERS=tensorzero bash benches/gateways.sh       # which peers to run (default
#       "tensorzero litellm"; PEERS= with BASELINE_BIN= is a quick A/B of ours)
#   STAGES="assemble inference" bash benches/gateways.sh
#       run ours (and the baseline) with that default pipeline instead of
#       the five default stages
#   POLICIES="memory" bash benches/gateways.sh      # which policy rows (default
#       "memory redis"; POLICIES= for none): ours again with the policy
#       stages (auth, ratelimit, cache) around the same stages, on memory
#       stores or on a redis-server on loopback started here
#   KEEP=1 bash benches/gateways.sh                 # keep the work directory (logs)
#
# Needs wrk, python3 with venv and pip (the peers come from PyPI:
# 'litellm[proxy]' and tensorzero==2026.6.0, installed into the virtualenv,
# never into the repo), curl, and oha for step 4. How each gateway runs:
#   - ours: the `orchestrator` built with the dist profile with its bundled pipeline (RAG,
#     assemble, stream, post plugins: it does more per request than the
#     peers), an `openai` backend pointing at the upstream, model "up";
#   - LiteLLM: `litellm --num_workers 2` with no database
#     (general_settings.dangerously_permit_weak_or_unset_master_key),
#     LITELLM_TELEMETRY=False, LITELLM_LOCAL_MODEL_COST_MAP=True, model "up"
#     (provider openai/up); its default logging (an access log line per
#     request) is kept;
#   - TensorZero: the Rust gateway its wheel carries, served over HTTP by
#     `tensorzero._start_http_gateway` from a Python process, observability
#     off, model "tensorzero::model_name::up" (an `openai` provider pointing
#     at the upstream) on its OpenAI-compatible route. Its HTTP server sets
#     no TCP_NODELAY on the connections it accepts (seen with strace), so a
#     streamed answer on a kept-alive connection waits for the client's
#     delayed ACK: ~40 ms of its p50 at 1 connection is that.
#   - ours with the policy stages ("policies-memory", "policies-redis"):
#     `auth, rag, assemble, ratelimit, cache, inference, post, stream` (with
#     STAGES: auth first, ratelimit and cache just before inference), one API
#     key sent as `Authorization: Bearer`, one rule per key (requests and
#     tokens per minute, never reached). So that every request is served by
#     the upstream like the other rows, none is a cache hit: wrk sends a
#     prompt no earlier request sent (a number before the same question),
#     so the cache misses, claims its lock and stores the answer (its
#     costliest path); oha, whose body is fixed, sends `Cache-Control:
#     no-cache` (the cache computes its key and stores the answer, without
#     the lookup and its lock: a cheaper path). wrk builds each of these
#     requests in Lua (the other rows send a fixed body), which costs wrk a
#     little more CPU on the shared cores. The Redis row's CPU is the
#     host's only: redis-server's own is not in it.
# Each gateway gets an uncounted 2 s warm-up per mode first; wrk's timeout
# is 30 s, so a slow gateway is counted slow, not erroring. wrk counts only
# the answers completed within DURATION: keep DURATION well above a
# gateway's latency at 64 connections (LiteLLM's streamed one is seconds
# here), or its requests/s read low.
# A peer that cannot be installed or does not answer 200 to a plain and a
# streamed request is skipped with a message saying why. wrk, the upstream
# and the gateways share the machine's cores, so on 2 cores the figures are
# a floor and only their ratios mean much.
set -euo pipefail
[ -n "${BIN:-}" ] && BIN=$(realpath "$BIN")
[ -n "${UPSTREAM_BIN:-}" ] && UPSTREAM_BIN=$(realpath "$UPSTREAM_BIN")
[ -n "${BASELINE_BIN:-}" ] && BASELINE_BIN=$(realpath "$BASELINE_BIN")
[ -n "${VENV:-}" ] && VENV=$(realpath -m "$VENV")
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-5}
RATES=${RATES:-50 100 200 400}
TOKENS=32
for tool in wrk curl python3; do
    command -v $tool >/dev/null || { echo "$tool is required (Debian: apt-get install $tool)" >&2; exit 1; }
done
if [ -z "${BIN:-}" ] || [ -z "${UPSTREAM_BIN:-}" ]; then
    # The dist profile, as deployed (Cargo.toml; ~30 minutes cold on 2 cores).
    cargo build --profile dist -q -p orchestrator --bin orchestrator --example bench_upstream
    TARGET=${CARGO_TARGET_DIR:-target}
    BIN=${BIN:-$TARGET/dist/orchestrator}
    UPSTREAM_BIN=${UPSTREAM_BIN:-$TARGET/dist/examples/bench_upstream}
fi
WORK=$(mktemp -d)
. benches/lib.sh
trap stop_all EXIT

# --- The peers' virtualenv -------------------------------------------------
declare -A SKIP
PEERS=${PEERS-tensorzero litellm}
for peer in tensorzero litellm; do
    case " $PEERS " in *" $peer "*) ;; *) SKIP[$peer]="not in PEERS" ;; esac
done
if [ -z "${VENV:-}" ]; then VENV=$WORK/venv; fi
if [ -n "$PEERS" ] && [ ! -x "$VENV/bin/pip" ]; then
    log "creating a virtualenv in $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip >&2 || true
fi
if [ -z "${SKIP[litellm]:-}" ] && ! "$VENV/bin/pip" show -q litellm 2>/dev/null; then
    log "installing litellm[proxy] into $VENV"
    "$VENV/bin/pip" install -q 'litellm[proxy]' >&2 || SKIP[litellm]="pip install 'litellm[proxy]' failed"
fi
if [ -z "${SKIP[tensorzero]:-}" ] && ! "$VENV/bin/pip" show -q tensorzero 2>/dev/null; then
    log "installing tensorzero==2026.6.0 into $VENV"
    "$VENV/bin/pip" install -q 'tensorzero==2026.6.0' >&2 || SKIP[tensorzero]="pip install tensorzero==2026.6.0 failed"
fi

# --- The upstream and the gateways -----------------------------------------
declare -A URL MODEL
spawn "$WORK/upstream.out" "$UPSTREAM_BIN" 127.0.0.1:0
PID[upstream]=$LAST_PID
wait_for 30 "$LAST_PID" grep -q '^listening on' "$WORK/upstream.out" ||
    { log "bench_upstream did not start:"; cat "$WORK/upstream.out" >&2; exit 1; }
UPSTREAM=$(sed -n 's|^listening on http://||p' "$WORK/upstream.out")
URL[upstream]=http://$UPSTREAM/v1/chat/completions
MODEL[upstream]=up

printf '[backends.up]\nkind = "openai"\nbase_url = "http://%s/v1"\n\n[routing]\nmodels = { up = "up" }\n' \
    "$UPSTREAM" >"$WORK/backend.part"
stage_list() { # stage names: a TOML list
    # shellcheck disable=SC2086 # one word per stage
    printf '"%s", ' "$@" | sed 's/, $//'
}
cp "$WORK/backend.part" "$WORK/ours.toml"
if [ -n "${STAGES:-}" ]; then
    # shellcheck disable=SC2086 # one word per stage
    printf '[pipelines.default]\nstages = [%s]\n' "$(stage_list $STAGES)" >>"$WORK/ours.toml"
fi
# A build of ours, as gateway `name`, in front of the upstream.
start_ours() { # name, binary
    start_host "$1" "$2" "$WORK/ours.toml" || exit 1
    URL[$1]=${API[$1]}/v1/chat/completions
    MODEL[$1]=up
}
start_ours ours "$BIN"
if [ -n "${BASELINE_BIN:-}" ]; then start_ours baseline "$BASELINE_BIN"; fi

# Ours with the policy stages, on memory stores or on Redis.
declare -A AUTH
POLICIES=${POLICIES-memory redis}
ADMIN=bench-admin-token
if [[ " $POLICIES " == *" redis "* ]] && ! command -v redis-server >/dev/null; then
    log "SKIPPING policies-redis: redis-server is not installed (Debian: apt-get install redis-server)"
    POLICIES=${POLICIES//redis/}
fi
if [[ " $POLICIES " == *" redis "* ]]; then
    REDIS_PORT=$(free_port)
    spawn "$WORK/redis.out" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --dir "$WORK"
    wait_for 30 "$LAST_PID" redis-cli -p "$REDIS_PORT" ping >/dev/null ||
        { log "redis-server did not start"; exit 1; }
fi
policy_stages() { # the policy pipeline around STAGES (or the five defaults)
    local stage
    printf 'auth '
    for stage in ${STAGES:-rag assemble inference post stream}; do
        [ "$stage" = inference ] && printf 'ratelimit cache '
        printf '%s ' "$stage"
    done
}
if [ -n "${POLICIES// /}" ] && [[ " ${STAGES:-inference} " != *" inference "* ]]; then
    log "STAGES has no inference stage: the policy rows need one (ratelimit and cache go before it); set POLICIES= to run without them"
    exit 1
fi
for store in $POLICIES; do
    name=policies-$store
    {
        printf 'admin_token = "%s"\n' "$ADMIN"
        cat "$WORK/backend.part"
        printf '[stages.ratelimit.config]\nrules = [{ name = "per_key", requests_per_minute = 100000000, tokens_per_minute = 100000000000 }]\n'
        # shellcheck disable=SC2046 # one word per stage
        printf '[pipelines.default]\nstages = [%s]\n' "$(stage_list $(policy_stages))"
        if [ "$store" = redis ]; then
            for kv in keys limits cache; do
                printf '[stores.%s]\nkind = "redis"\nurl = "redis://127.0.0.1:%s/0"\n' "$kv" "$REDIS_PORT"
            done
        fi
    } >"$WORK/$name.toml"
    start_host "$name" "$BIN" "$WORK/$name.toml" || exit 1
    URL[$name]=${API[$name]}/v1/chat/completions
    MODEL[$name]=up
    AUTH[$name]=$(create_key "${API[$name]}" "$ADMIN" bench) ||
        { log "$name: could not create an API key"; exit 1; }
done

if [ -z "${SKIP[litellm]:-}" ]; then
    cat >"$WORK/litellm.yaml" <<EOF
model_list:
  - model_name: up
    litellm_params:
      model: openai/up
      api_base: http://$UPSTREAM/v1
      api_key: none
general_settings:
  dangerously_permit_weak_or_unset_master_key: true
EOF
    port=$(free_port)
    args=(--config "$WORK/litellm.yaml" --host 127.0.0.1 --port "$port" --num_workers 2)
    # uvicorn (0.37+) kills a worker that does not answer its health check
    # within 5 s, and importing LiteLLM takes longer than that on a busy
    # machine: the workers then die and restart forever.
    if grep -qs timeout_worker_healthcheck "$VENV"/lib/python3*/site-packages/litellm/proxy/proxy_cli.py; then
        args+=(--timeout_worker_healthcheck 300)
    fi
    log "starting LiteLLM (2 workers; this takes a while)"
    spawn "$WORK/litellm.out" env LITELLM_TELEMETRY=False LITELLM_LOCAL_MODEL_COST_MAP=True \
        "$VENV/bin/litellm" "${args[@]}"
    PID[litellm]=$LAST_PID
    URL[litellm]=http://127.0.0.1:$port/v1/chat/completions
    MODEL[litellm]=up
    two_workers() { [ "$(grep -c 'Application startup complete' "$WORK/litellm.out")" -ge 2 ]; }
    wait_for 300 "$LAST_PID" two_workers ||
        SKIP[litellm]="LiteLLM's two workers did not start within 300 s: $(tail -3 "$WORK/litellm.out" | tr '\n' ' ')"
fi
if [ -z "${SKIP[tensorzero]:-}" ]; then
    cat >"$WORK/tensorzero.toml" <<EOF
[gateway.observability]
enabled = false

[models.up]
routing = ["up"]

[models.up.providers.up]
type = "openai"
api_base = "http://$UPSTREAM/v1/"
model_name = "up"
api_key_location = "none"
EOF
    # Not tensorzero.py: the script's own directory comes first on sys.path.
    cat >"$WORK/tz_gateway.py" <<'EOF'
import signal, sys
import tensorzero

gateway = tensorzero._start_http_gateway(config_file=sys.argv[1], clickhouse_url=None,
    postgres_url=None, valkey_url=None, async_setup=False)
print("listening on", gateway.base_url, flush=True)
signal.sigwait({signal.SIGTERM, signal.SIGINT})
gateway.close()
EOF
    log "starting TensorZero"
    spawn "$WORK/tensorzero.out" "$VENV/bin/python" "$WORK/tz_gateway.py" "$WORK/tensorzero.toml"
    PID[tensorzero]=$LAST_PID
    MODEL[tensorzero]=tensorzero::model_name::up
    if wait_for 120 "$LAST_PID" grep -q '^listening on' "$WORK/tensorzero.out"; then
        URL[tensorzero]=$(sed -n 's|^listening on ||p' "$WORK/tensorzero.out")/chat/completions
    else
        SKIP[tensorzero]="the TensorZero gateway did not start: $(tail -3 "$WORK/tensorzero.out" | tr '\n' ' ')"
    fi
fi

body() { # model, stream (true/false)
    printf '{"model":"%s","stream":%s,"max_tokens":%d,"messages":[{"role":"user","content":"%s"}]}' \
        "$1" "$2" "$TOKENS" "What is backpressure and how does the orchestrator shed load?"
}
# One plain and one streamed request must come back 200 with an answer.
check() { # name
    local name=$1 code auth=()
    [ -n "${AUTH[$name]:-}" ] && auth=(-H "authorization: Bearer ${AUTH[$name]}")
    code=$(curl -s -o "$WORK/check.plain" -w '%{http_code}' -H 'content-type: application/json' \
        "${auth[@]}" -d "$(body "${MODEL[$name]}" false)" "${URL[$name]}") || code=000
    if [ "$code" != 200 ] || ! python3 -c 'import json, sys
assert json.load(open(sys.argv[1]))["choices"][0]["message"]["content"]' "$WORK/check.plain" 2>/dev/null; then
        echo "a plain request answered $code: $(head -c 300 "$WORK/check.plain")"
        return
    fi
    code=$(curl -sN -o "$WORK/check.stream" -w '%{http_code}' -H 'content-type: application/json' \
        "${auth[@]}" -d "$(body "${MODEL[$name]}" true)" "${URL[$name]}") || code=000
    if [ "$code" != 200 ] || ! grep -q '"content":"[^"]' "$WORK/check.stream" ||
        ! grep -q '^data: \[DONE\]' "$WORK/check.stream"; then
        echo "a streamed request answered $code: $(head -c 300 "$WORK/check.stream")"
    fi
}
NAMES=""
POLICY_NAMES=""
for store in $POLICIES; do POLICY_NAMES="$POLICY_NAMES policies-$store"; done
# shellcheck disable=SC2086 # one word per name
for name in upstream ours $POLICY_NAMES baseline tensorzero litellm; do
    if [ -n "${SKIP[$name]:-}" ]; then
        log "SKIPPING $name: ${SKIP[$name]}"
        continue
    fi
    [ -n "${URL[$name]:-}" ] || continue # baseline without BASELINE_BIN
    problem=$(check "$name")
    if [ -n "$problem" ]; then
        case $name in
        upstream | ours | baseline | policies-*) log "$name fails: $problem"; exit 1 ;;
        *) SKIP[$name]=$problem; log "SKIPPING $name: $problem"; continue ;;
        esac
    fi
    for stream in false true; do
        if [ -n "${AUTH[$name]:-}" ]; then
            wrk_chat_unique "${AUTH[$name]}" "${MODEL[$name]}" $stream $TOKENS \
                "What is backpressure and how does the orchestrator shed load?" >"$WORK/$name.$stream.lua"
        else
            printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = %s\n' \
                "'$(body "${MODEL[$name]}" $stream)'" >"$WORK/$name.$stream.lua"
        fi
    done
    body "${MODEL[$name]}" false >"$WORK/$name.body"
    printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = %s\n' \
        "'$(body echo false)'" >"$WORK/$name.echo.lua"
    NAMES="$NAMES $name"
done
log "measuring:$NAMES"

# --- Measurements -----------------------------------------------------------
RES=$WORK/res
mkdir -p "$RES"
# wrk's summary -> "ok_requests seconds non2xx socket_errors p50_us"
parse_wrk() {
    awk '
        function us(v) {
            if (v ~ /us$/) { sub(/us$/, "", v); return v }
            if (v ~ /ms$/) { sub(/ms$/, "", v); return v * 1000 }
            if (v ~ /m$/) { sub(/m$/, "", v); return v * 60e6 }
            if (v ~ /s$/) { sub(/s$/, "", v); return v * 1e6 }
            return v
        }
        /requests in/ { n = $1; d = $4; sub(/,$/, "", d); secs = us(d) / 1e6 }
        /Non-2xx or 3xx responses:/ { bad = $NF }
        /Socket errors:/ { sock = $4 + $6 + $8 + $10 }
        $1 == "50%" { p50 = us($2) }
        END { printf "%d %.3f %d %d %.1f\n", n - bad, secs, bad, sock, p50 }'
}
# Rotate the order each round, so no gateway always runs first or last.
order() { # round
    local list=($NAMES) i n
    n=${#list[@]}
    for ((i = 0; i < n; i++)); do printf '%s ' "${list[$(((i + $1) % n))]}"; done
}
# wrk's timeout is 30 s, not 2 s: a slow answer is slow, not an error.
WRK=(wrk --timeout 30s --latency)
log "warming up (2 s per gateway and mode, not counted)"
for name in $NAMES; do
    for stream in false true; do
        NONCE=warm-$stream "${WRK[@]}" -t2 -c64 -d2s -s "$WORK/$name.$stream.lua" "${URL[$name]}" >/dev/null
    done
done
for round in $(seq "$ROUNDS"); do
    for test in plain64 stream64 plain1 stream1 echo64; do
        case $test in
        plain64) conns=64 threads=2 stream=false ;;
        stream64) conns=64 threads=2 stream=true ;;
        plain1) conns=1 threads=1 stream=false ;;
        stream1) conns=1 threads=1 stream=true ;;
        echo64) conns=64 threads=2 stream=echo ;;
        esac
        for name in $(order "$round"); do
            case $test/$name in echo64/ours | echo64/baseline | echo64/upstream) ;; echo64/*) continue ;; esac
            # The upstream alone is measured once per round (plain64).
            [ $test/$name = echo64/upstream ] && continue
            before=$(tree_ticks "${PID[$name]}")
            up_before=$(tree_ticks "${PID[upstream]}")
            out=$(NONCE=$round-$test "${WRK[@]}" -t$threads -c$conns -d"${DURATION}s" -s "$WORK/$name.$stream.lua" "${URL[$name]}")
            after=$(tree_ticks "${PID[$name]}")
            up_after=$(tree_ticks "${PID[upstream]}")
            read -r ok secs bad sock p50 <<<"$(echo "$out" | parse_wrk)"
            echo "$bad $sock" >>"$RES/$name.errors"
            case $test in
            *64)
                rps=$(awk -v n="$ok" -v s="$secs" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')
                echo "$rps" >>"$RES/$name.rps_$stream"
                if [ $test = plain64 ]; then
                    cpu=$(awk -v t=$((after - before)) -v n="$ok" -v hz="$TICK" \
                        'BEGIN { if (n > 0) printf "%.1f", t / hz / n * 1e6; else print "nan" }')
                    echo "$cpu" >>"$RES/$name.cpu"
                    # What serving this gateway cost the upstream.
                    upcpu=$(awk -v t=$((up_after - up_before)) -v n="$ok" -v hz="$TICK" \
                        'BEGIN { if (n > 0) printf "%.1f", t / hz / n * 1e6; else print "nan" }')
                    echo "$upcpu" >>"$RES/$name.upcpu"
                    log "round $round $test $name: $rps ok req/s, $cpu µs CPU/request (upstream: $upcpu), non-2xx $bad, socket errors $sock"
                else
                    log "round $round $test $name: $rps ok req/s, non-2xx $bad, socket errors $sock"
                fi
                ;;
            *1)
                echo "$p50" >>"$RES/$name.p50_$stream"
                log "round $round $test $name: p50 $p50 µs, non-2xx $bad, socket errors $sock"
                ;;
            esac
        done
    done
done

# Open loop: requests at a constant rate, whatever the answers' pace.
if command -v oha >/dev/null; then
    if oha --help 2>&1 | grep -q -- '--output-format'; then ohajson=(--output-format json); else ohajson=(-j); fi
    for round in $(seq "$ROUNDS"); do
        for rate in $RATES; do
            for name in $(order "$round"); do
                headers=()
                if [ -n "${AUTH[$name]:-}" ]; then
                    headers=(-H "authorization: Bearer ${AUTH[$name]}" -H "cache-control: no-cache")
                fi
                oha --no-tui "${ohajson[@]}" --latency-correction -q "$rate" -z "${DURATION}s" -c 64 \
                    "${headers[@]}" -m POST -T application/json -D "$WORK/$name.body" "${URL[$name]}" >"$WORK/oha.json" ||
                    true
                line=$(python3 - "$WORK/oha.json" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
    p = r["latencyPercentiles"]
    codes = r.get("statusCodeDistribution", {})
    errors = r.get("errorDistribution", {})
    # Requests still in flight at the end are "aborted due to deadline".
    bad = sum(v for k, v in codes.items() if not k.startswith("2")) + \
        sum(v for k, v in errors.items() if "deadline" not in k)
    print(p["p50"] * 1e6, p["p99"] * 1e6, bad)
except Exception:
    print("nan nan nan")
PY
                )
                echo "$line" >>"$RES/$name.oha_$rate"
                log "round $round oha $rate req/s $name: p50 p99 (µs) errors: $line"
            done
        done
    done
else
    log "oha is not on PATH: skipping the open-loop sweep (cargo install oha)"
fi

# --- Report -----------------------------------------------------------------
echo
echo "## Gateways in front of one upstream: medians (min-max) over $ROUNDS interleaved rounds of ${DURATION}s"
echo
echo "$TOKENS-token answers; req/s counts 2xx answers only; CPU is the gateway's process tree per 2xx answer;"
echo "added p50 = gateway p50 - upstream p50 in the same round. errors = non-2xx / socket errors over all runs."
echo
python3 - "$RES" "$RATES" $NAMES <<'PY'
import math, os, statistics, sys

res, rates, names = sys.argv[1], sys.argv[2].split(), sys.argv[3:]

def col(name, metric, i=0):
    path = f"{res}/{name}.{metric}"
    if not os.path.exists(path):
        return []
    return [float(l.split()[i]) for l in open(path) if l.strip()]

def lat(v):
    return f"{v:.0f} µs" if abs(v) < 1000 else f"{v / 1000:.2f} ms"

def num(v):
    return f"{v:.0f}"

def cpu(v):
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"

def show(values, fmt):
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "n/a"
    m = statistics.median(values)
    if len(values) == 1:
        return fmt(m)
    lo, hi = fmt(min(values)), fmt(max(values))
    unit = lambda s: s.split(" ")[-1] if " " in s else ""
    if unit(lo) and unit(lo) == unit(hi):
        lo = lo.rsplit(" ", 1)[0]
        hi = hi.rsplit(" ", 1)[0]
        return f"{fmt(m)} ({lo}-{hi} {unit(fmt(min(values)))})"
    return f"{fmt(m)} ({lo}-{hi})"

label = {"upstream": "upstream alone", "ours": "ours (orchestrator)",
         "policies-memory": "ours + auth, ratelimit, cache (memory stores)",
         "policies-redis": "ours + auth, ratelimit, cache (Redis)",
         "baseline": "ours, baseline build (BASELINE_BIN)",
         "tensorzero": "TensorZero", "litellm": "LiteLLM (2 workers)"}
print("| gateway | plain req/s @64 | streamed req/s @64 | CPU µs/request @64 | upstream CPU µs/request @64 "
      "| p50 plain @1 | p50 streamed @1 | added p50 plain | added p50 streamed | errors |")
print("|---|---|---|---|---|---|---|---|---|---|")
for name in names:
    errs = [l.split() for l in open(f"{res}/{name}.errors")]
    bad = sum(int(e[0]) for e in errs)
    sock = sum(int(e[1]) for e in errs)
    cells = [show(col(name, "rps_false"), num), show(col(name, "rps_true"), num),
             show(col(name, "cpu"), cpu), show(col(name, "upcpu"), cpu),
             show(col(name, "p50_false"), lat), show(col(name, "p50_true"), lat)]
    for stream in ("false", "true"):
        if name == "upstream":
            cells.append("—")
        else:
            own, base = col(name, f"p50_{stream}"), col("upstream", f"p50_{stream}")
            cells.append(show([a - b for a, b in zip(own, base)], lat))
    cells.append(f"{bad} / {sock}" + (" ⚠" if bad or sock else ""))
    print(f"| {label.get(name, name)} | " + " | ".join(cells) + " |")

bare = col("upstream", "rps_false")
for name in names:
    echo = col(name, "rps_echo")
    if echo and bare:
        share = [100 * e / b for e, b in zip(echo, bare)]
        print(f"\n{label.get(name, name)} with its built-in `echo` backend, plain @64: {show(echo, num)} req/s, "
              f"{show(share, lambda v: f'{v:.0f}')} % of the upstream alone (a bare warp server) in the same rounds")

if any(os.path.exists(f"{res}/{n}.oha_{r}") for n in names for r in rates):
    print()
    print("Open loop (oha, constant rate, plain, latency-corrected): p50 / p99, errors")
    print()
    print("| gateway | " + " | ".join(f"{r} req/s" for r in rates) + " |")
    print("|---|" + "---|" * len(rates))
    for name in names:
        cells = []
        for r in rates:
            p50, p99 = col(name, f"oha_{r}", 0), col(name, f"oha_{r}", 1)
            bad = sum(v for v in col(name, f"oha_{r}", 2) if not math.isnan(v))
            cells.append(f"{show(p50, lat)} / {show(p99, lat)}, {bad:.0f}")
        print(f"| {label.get(name, name)} | " + " | ".join(cells) + " |")
PY
echo
for name in tensorzero litellm; do
    [ -n "${SKIP[$name]:-}" ] && echo "skipped $name: ${SKIP[$name]}"
done
echo "peers: $("$VENV/bin/pip" show litellm tensorzero 2>/dev/null | awk '/^Name:/ {n = $2} /^Version:/ {printf "%s %s, ", n, $2}' | sed 's/, $//')"
echo "ours: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with uncommitted changes)'); $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2); nproc: $(nproc)"
