#!/usr/bin/env bash
# Runs examples/demo.c the ways CTest cannot with plain arguments, and checks
# what it prints. Its stdout is a file here, so it prints plain lines.
#
#   demo-test.sh <example-demo> run      --seconds 1: ends by itself, table
#   demo-test.sh <example-demo> jobs     --jobs 25 --workers 4: every job once
#   demo-test.sh <example-demo> sigint   SIGINT: exit 130, jobs cancelled,
#                                        workers stopped, table printed
#
# CALLER_TEST_TIME_SCALE (default 1) stretches the waits on slow machines.
set -uo pipefail

demo=$1
mode=$2
scale=$(awk -v s="${CALLER_TEST_TIME_SCALE:-1}" 'BEGIN { s = int(s + 0.999); print s < 1 ? 1 : s }')
out=$(mktemp)
trap 'rm -f "$out"' EXIT

fail() {
    echo "demo-test $mode: $*" >&2
    echo "---- output ----" >&2
    cat "$out" >&2
    exit 1
}

# The callers table: its header, the Shell's row (the current one), and
# how many worker rows it has.
check_table() {
    grep -q '^Name  *Running  *Protected  *Thread' "$out" || fail "no callers table"
    grep -q '^Shell .*← current' "$out" || fail "no Shell row marked current in the table"
}
table_workers() {
    sed -n '/^Name  *Running/,$p' "$out" | grep -c '^caller-worker' || true
}

case $mode in
run)
    "$demo" --seconds 1 >"$out" 2>&1
    rc=$?
    [[ $rc -eq 0 ]] || fail "exit status $rc, expected 0"
    grep -q '^Caller<caller-worker libuv .*> *n=[0-9]\{4\} sleeping *[0-9]* ms$' "$out" ||
        fail "no worker line"
    grep -q '^Finished: [0-9]' "$out" || fail "no Finished line"
    grep -q '^Done: [0-9]* jobs finished' "$out" || fail "no Done line"
    check_table
    ;;
jobs)
    "$demo" --jobs 25 --seconds 0 --workers 4 >"$out" 2>&1
    rc=$?
    [[ $rc -eq 0 ]] || fail "exit status $rc, expected 0"
    finished=$(grep '^Finished: ' "$out" | sed 's/^Finished: //' | sort -n | tr '\n' ' ')
    [[ $finished == "$(seq 1 25 | tr '\n' ' ')" ]] ||
        fail "expected Finished: 1..25 once each, got: $finished"
    grep -q '^Done: 25 jobs finished' "$out" || fail "no 'Done: 25 jobs' line"
    check_table
    workers=$(table_workers)
    ((workers >= 1 && workers <= 4)) || fail "$workers workers in the table, expected 1 to 4"
    ;;
sigint)
    "$demo" --seconds 600 >"$out" 2>&1 &
    pid=$!
    # Interrupt once it is under way: a job finished (about 0.5 s in).
    deadline=$((SECONDS + 30 * scale))
    until grep -q '^Finished: ' "$out"; do
        if ((SECONDS > deadline)) || ! kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null
            fail "no job finished within $((30 * scale)) s"
        fi
        sleep 0.05
    done
    kill -INT "$pid"
    # It must end by itself, soon.
    deadline=$((SECONDS + 30 * scale))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS > deadline)); then
            kill -KILL "$pid" 2>/dev/null
            fail "still running $((30 * scale)) s after SIGINT"
        fi
        sleep 0.05
    done
    wait "$pid"
    rc=$?
    [[ $rc -eq 130 ]] || fail "exit status $rc, expected 130"
    grep -q '^Cancelled: [0-9]' "$out" || fail "no job was cancelled"
    grep -q '^Interrupted after .* cancelled; workers stopped\.$' "$out" ||
        fail "no Interrupted line"
    check_table
    workers=$(table_workers)
    [[ $workers -eq 0 ]] || fail "$workers workers still in the table, expected none"
    ;;
*)
    echo "usage: $0 <example-demo> run|jobs|sigint" >&2
    exit 2
    ;;
esac
echo "demo-test $mode: ok"
