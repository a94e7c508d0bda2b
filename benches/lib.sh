# Shared by the benchmark scripts (source it): starting processes in
# sessions of their own, waiting for them, stopping them, reading their CPU
# time, and starting a host.
#
#   . "$(dirname "$0")/lib.sh"
#   WORK=$(mktemp -d); trap stop_all EXIT
#   start_host NAME BINARY [CONFIG_FILE]   # sets API[NAME], METRICS[NAME], PID[NAME]
#   before=$(tree_ticks "${PID[NAME]}"); ...; after=$(tree_ticks "${PID[NAME]}")
#
# The caller sets WORK (a directory for logs and caches). KEEP=1 keeps it.

PIDS=()
declare -A API METRICS PID
TICK=$(getconf CLK_TCK)

log() { echo "$*" >&2; }

# Start a command in a session of its own (setsid does not fork here: a
# background job of a script is no process group leader), so its pid is its
# session and process group: stop_all kills the group, and tree_ticks sums
# CPU over the session. Sets LAST_PID.
spawn() { # output file, command...
    local out=$1
    shift
    setsid "$@" >"$out" 2>&1 &
    PIDS+=($!)
    LAST_PID=$!
    disown # no "Killed" notice from bash at exit
}

# Until the command succeeds; fails if `pid` dies or `seconds` pass first.
wait_for() { # seconds, pid, command...
    local deadline=$((SECONDS + $1)) pid=$2
    shift 2
    until "$@" 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || return 1
        [ $SECONDS -lt $deadline ] || return 1
        sleep 0.05
    done
}

# Whether any process group started with spawn is still there.
any_alive() {
    local pid
    for pid in "${PIDS[@]}"; do kill -0 -- "-$pid" 2>/dev/null && return 0; done
    return 1
}

# Stop every process group started with spawn (TERM, then KILL after up to
# 10 s), and remove WORK unless KEEP is set.
stop_all() {
    local pid i
    for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    for i in $(seq 50); do
        any_alive || break
        sleep 0.2
    done
    for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
    if [ -n "${WORK:-}" ]; then
        if [ -n "${KEEP:-}" ]; then log "kept $WORK (configurations, logs, raw results)"; else rm -rf "$WORK"; fi
    fi
}

# A free TCP port on loopback.
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# utime + stime of the live processes of a session, in clock ticks (TICK
# per second).
tree_ticks() { # session id
    local stats
    stats=$(ps -o pid= -s "$1" | awk '{print "/proc/" $1 "/stat"}')
    # shellcheck disable=SC2086 # one path per word
    { cat $stats 2>/dev/null || true; } | awk '{ sub(/^.*\) /, ""); t += $12 + $13 } END { print t + 0 }'
}

# Start an orchestrator as NAME, with CONFIG_FILE if given, on free ports
# and a cache of its own in WORK; wait until it listens. Sets API[NAME] and
# METRICS[NAME] (base URLs) and PID[NAME].
start_host() { # name, binary[, config file]
    local name=$1 bin=$2 config=${3:-}
    local args=(--listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 --cache-dir "$WORK/cache-$name")
    [ -n "$config" ] && args=(--config "$config" "${args[@]}")
    spawn "$WORK/$name.out" "$bin" "${args[@]}"
    PID[$name]=$LAST_PID
    wait_for 120 "$LAST_PID" grep -q 'orchestrator listening' "$WORK/$name.out" ||
        { log "$name (orchestrator) did not start:"; tail -20 "$WORK/$name.out" >&2; return 1; }
    API[$name]=$(grep 'orchestrator listening' "$WORK/$name.out" | grep -o 'api=[^ ]*' | cut -d= -f2)
    METRICS[$name]=$(grep 'orchestrator listening' "$WORK/$name.out" | grep -o 'metrics=[^ ]*' | cut -d= -f2)
}

# Create an API key through a host's admin API; prints the key.
create_key() { # api url, admin token, principal
    curl -sf "$1/admin/keys" -H "authorization: Bearer $2" \
        -H 'content-type: application/json' -d "{\"principal\":\"$3\"}" |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
}

# A wrk script that POSTs chat completions with the API key given, each
# with a prompt no earlier request sent: NONCE (from the environment)
# differs from one wrk run to the next, the thread's id and a counter within
# one, so no request is a cache hit.
wrk_chat_unique() { # key, model, stream (true/false), max_tokens, question
    wrk_chat_head "$1"
    cat <<EOF
local nonce = os.getenv("NONCE") or ""
request = function()
  n = n + 1
  local body = '{"model":"$2","stream":$3,"max_tokens":$4,"messages":[{"role":"user","content":"' ..
    nonce .. "-" .. tostring(id) .. "-" .. n .. ' $5"}]}'
  return wrk.format(nil, nil, nil, body)
end
EOF
}

# The start of a wrk script that POSTs chat completions with the API key
# given: the method and headers, each thread's number in the global `id`
# (set by setup) and a request counter `n`. The caller appends the rest.
wrk_chat_head() { # key
    cat <<EOF
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer $1"
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end
local n = 0
EOF
}

# The test plugin `gate` (tests/plugins/gate), built where the tests build
# it, for the floors under the policy stages; prints its path.
build_gate() { # target directory
    cargo build --release -q --target wasm32-wasip2 --manifest-path tests/plugins/Cargo.toml \
        -p test-gate --target-dir "$1/test-plugins" >&2
    realpath "$1/test-plugins/wasm32-wasip2/release/test_gate.wasm"
}

# Three `gate` stages, g1 to g3, in the modes given: `auth` (the bearer
# token TOKEN, principal `bench`), `limit` (a windowed counter per
# principal, never reached), `cache` (a lookup by the last user message),
# or another of its modes (`noop`).
gate_stages() { # plugin path, token, mode...
    local plugin=$1 token=$2 n=0 mode
    shift 2
    for mode in "$@"; do
        n=$((n + 1))
        printf '[stages.g%s]\nplugin = "%s"\n' "$n" "$plugin"
        case $mode in
        auth) printf 'config = { mode = "auth", token = "%s", principal = "bench" }\ncapabilities = { headers = ["authorization"] }\n' "$token" ;;
        limit) printf 'config = { mode = "limit", limit = 100000000, window_ms = 60000 }\ncapabilities = { stores = ["limits"] }\n' ;;
        cache) printf 'config = { mode = "cache" }\ncapabilities = { stores = ["cache"] }\n' ;;
        *) printf 'config = { mode = "%s" }\n' "$mode" ;;
        esac
    done
}
