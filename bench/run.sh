#!/usr/bin/env bash
# Builds the Go peer (bench/go -> <build dir>/go-w4) when go is on PATH, then
# runs every benchmark program of a Release build (bench-pending, then
# bench-w1_* ... bench-w6_*) and prints their tables; bench/results.json gets
# one JSON record per workload and metric (a JSON array). Exits 1 if any run
# crashed, failed or timed out (each is reported on stderr), after running
# the rest.
#
# Usage: bench/run.sh <build dir>   (make bench does this)
# Environment: BENCH_RUNS (counted runs per system, default and minimum 5),
#   BENCH_WARMUP (uncounted rounds first, default 1), BENCH_ONLY=W1,W5 (only
#   these workloads; P1 P2 W1..W6), BENCH_TIMEOUT (seconds per run).
set -euo pipefail
build=${1:-build-release}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
lines=$(mktemp)
trap 'rm -f "$lines"' EXIT
shopt -s nullglob
progs=("$build"/bench-*)
if ((${#progs[@]} == 0)); then
    echo "bench/run.sh: no bench-* programs in $build" >&2
    exit 1
fi
# The Go peer of W4 (bench/go), built beside the bench programs as go-w4
# when Go is installed; bench-w4_pool shows its systems as not run without
# it. Go's build cache stays in the build directory; no network is used.
if command -v go >/dev/null; then
    abs=$(cd "$build" && pwd)
    (cd "$here/go" && GOCACHE="$abs/go-cache" GOPATH="$abs/go-path" GOPROXY=off GOFLAGS= \
        GO111MODULE=on go build -o "$abs/go-w4" .) || {
        echo "bench/run.sh: building the Go peer (bench/go) failed" >&2
        exit 1
    }
else
    rm -f "$build/go-w4"
    echo "bench/run.sh: no go on PATH, the Go peer of W4 is not run (apt-get install -y golang-go)" >&2
fi
start=$(date +%s.%N)
echo "libcaller benchmarks: ${BENCH_RUNS:-5} runs per system, interleaved (ours, pthread, libuv[, others], ours, ...)" \
    "after ${BENCH_WARMUP:-1} warm-up round(s), each run in its own forked process; $(nproc) cores; load average $(cut -d' ' -f1-3 /proc/loadavg)"
echo "cells: median [min-max] over the runs (\"k/n\" when only k of n runs succeeded); ratios: medians, ours/other system"
failed=0
for prog in "${progs[@]}"; do
    echo
    echo "== $(basename "$prog")"
    BENCH_JSON=$lines "$prog" || failed=1
done
{
    echo "["
    sed '$!s/$/,/' "$lines"
    echo "]"
} >"$here/results.json"
end=$(date +%s.%N)
echo
echo "wrote bench/results.json ($(wc -l <"$lines") records); benchmarks took $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.0f", b - a }') s;" \
    "load average now $(cut -d' ' -f1-3 /proc/loadavg)"
if ((failed)); then
    echo "bench/run.sh: some runs failed (see the messages above)" >&2
    exit 1
fi
