/*
 * Shared by the benchmark programs: run a workload of ours and its floor
 * interleaved (ours, floor, ours, floor ...), take medians, print a table
 * row, and append a JSON record. Never used by tests.
 */
#ifndef CALLER_BENCH_H
#define CALLER_BENCH_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BENCH_MAX_RUNS 64

static inline double bench_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int bench_cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

typedef struct {
    double median, min, max;
} bench_stat_t;

static inline bench_stat_t bench_stat(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, bench_cmp);
    bench_stat_t s = {n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2, v[0], v[n - 1]};
    return s;
}

/* The number of runs: BENCH_RUNS from the environment, at least 5. */
static inline int bench_runs(void)
{
    const char *s = getenv("BENCH_RUNS");
    int n = s ? atoi(s) : 5;
    if (n < 5)
        n = 5;
    return n > BENCH_MAX_RUNS ? BENCH_MAX_RUNS : n;
}

/* One measured figure: a function that does the work once and returns the
 * figure (e.g. ns per operation). */
typedef double (*bench_fn)(void);

static FILE *bench_json;

static inline void bench_header(void)
{
    printf("%-34s %-6s %22s %22s %7s\n", "workload", "unit", "libcaller median [min-max]",
           "floor median [min-max]", "ratio");
    const char *path = getenv("BENCH_JSON");
    if (path)
        bench_json = fopen(path, "a");
}

/* Run ours and floor interleaved, print the row and the JSON record. */
static inline void bench_compare(const char *name, const char *unit, const char *floor_name,
                                 bench_fn ours, bench_fn floor)
{
    int runs = bench_runs();
    double a[BENCH_MAX_RUNS], b[BENCH_MAX_RUNS];
    ours(); /* warm-up, not counted */
    floor();
    for (int i = 0; i < runs; i++) {
        a[i] = ours();
        b[i] = floor();
    }
    bench_stat_t sa = bench_stat(a, runs), sb = bench_stat(b, runs);
    char ca[64], cb[64];
    snprintf(ca, sizeof ca, "%.1f [%.1f-%.1f]", sa.median, sa.min, sa.max);
    snprintf(cb, sizeof cb, "%.1f [%.1f-%.1f]", sb.median, sb.min, sb.max);
    printf("%-34s %-6s %22s %22s %6.2fx\n", name, unit, ca, cb, sa.median / sb.median);
    fflush(stdout);
    if (bench_json)
        fprintf(bench_json,
                "{\"workload\": \"%s\", \"unit\": \"%s\", \"runs\": %d, \"floor\": \"%s\", "
                "\"ours\": {\"median\": %.3f, \"min\": %.3f, \"max\": %.3f}, "
                "\"floor_stats\": {\"median\": %.3f, \"min\": %.3f, \"max\": %.3f}, "
                "\"ratio\": %.3f}\n",
                name, unit, runs, floor_name, sa.median, sa.min, sa.max, sb.median, sb.min,
                sb.max, sa.median / sb.median);
}

#endif
