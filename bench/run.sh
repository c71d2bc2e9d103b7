#!/usr/bin/env bash
# Runs every benchmark program of a Release build and prints their tables;
# bench/results.json gets one JSON record per workload (a JSON array).
# Usage: bench/run.sh <build dir>   (make bench does this)
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
echo "libcaller benchmarks: medians of ${BENCH_RUNS:-5} interleaved runs (ours, floor, ours, ...), $(nproc) cores"
for prog in "${progs[@]}"; do
    echo
    echo "== $(basename "$prog")"
    BENCH_JSON=$lines "$prog"
done
{
    echo "["
    sed '$!s/$/,/' "$lines"
    echo "]"
} >"$here/results.json"
echo
echo "wrote bench/results.json"
