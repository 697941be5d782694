#!/bin/sh
# The in-container half of deploy/image-test.sh (POSIX sh: the image has no bash
# guarantee). HEALTH is the image's HEALTHCHECK command.
#
#   smoke.sh SERVER_ARGV...   start the server in the background, probe, call, SIGTERM
#   smoke.sh --probe-only     the server runs already (PID 1): probe and call only
set -eu
dir=$(dirname "$0")
: "${HEALTH:?HEALTH must hold the HEALTHCHECK command of the image}"
pid=""

fail() {
    echo "FAIL: $*"
    if [ -n "$pid" ] && [ -f "$dir/server.log" ]; then
        tail -n 20 "$dir/server.log" | sed 's/^/   server| /'
    fi
    [ -z "$pid" ] || kill -KILL "$pid" 2>/dev/null || true
    exit 1
}

wait_serving() {
    waited=0
    # shellcheck disable=SC2086  # word splitting: the argv of the HEALTHCHECK
    until $HEALTH >/dev/null 2>&1; do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then fail "the server exited"; fi
        waited=$((waited + 1))
        [ "$waited" -le 180 ] || fail "no SERVING from '$HEALTH' within 180 s"
        sleep 1
    done
    echo ">> health: SERVING after ${waited} s ($HEALTH exits 0)"
}

call_example() {
    echo ">> client: python examples/saliency.py (a Forward and a Vjp through the server)"
    out=$(python "$dir/saliency.py" --address 127.0.0.1:50051 2>&1) || {
        echo "$out" | sed 's/^/   client| /'; fail "the example client failed"; }
    echo "$out" | sed 's/^/   client| /'
    echo "$out" | grep -q '^correct: True$' || fail "the example's prediction is not correct"
    grad=$(echo "$out" | sed -n 's/^max |d logit\[[0-9]*\] \/ d pixel| = //p')
    python -c "import sys; sys.exit(not float('$grad') > 0)" \
        || fail "the gradient the server sent back is zero"
    echo ">> client: correct prediction, non-zero input gradient ($grad)"
}

if [ "${1:-}" = --probe-only ]; then
    wait_serving
    call_example
    exit 0
fi

echo ">> server: $*"
"$@" >"$dir/server.log" 2>&1 &
pid=$!
wait_serving
call_example

echo ">> SIGTERM to the server (pid $pid)"
start=$(date +%s)
kill -TERM "$pid"
# Draining: health leaves SERVING at once (NOT_SERVING, or the port is closed).
tries=0
# shellcheck disable=SC2086
while $HEALTH >/dev/null 2>&1; do
    tries=$((tries + 1))
    [ "$tries" -le 20 ] || fail "health still SERVING 2 s after SIGTERM"
    sleep 0.1
done
echo ">> health: not SERVING any more ($HEALTH exits non-zero)"
( sleep 60; kill -KILL "$pid" 2>/dev/null ) &
watchdog=$!
rc=0
wait "$pid" || rc=$?
kill "$watchdog" 2>/dev/null || true
echo ">> server exited $rc after $(( $(date +%s) - start )) s"
tail -n 5 "$dir/server.log" | sed 's/^/   server| /'
pid=""
[ "$rc" -eq 0 ] || fail "the server exited $rc on SIGTERM, not 0"
