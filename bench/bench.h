/*
 * The benchmark harness shared by the programs in bench/ (header only: every
 * bench/ *.c file is its own executable). Never used by tests.
 *
 * A workload has up to three systems measured in the same run — libcaller
 * ("ours"), a raw pthread floor and a raw libuv floor — and one or more
 * metrics. Each single measurement (one system, one repetition) runs in a
 * child process forked for it: the child does the whole workload, writes its
 * figures back through a pipe and exits, so peak RSS and thread counts are
 * that run's own and nothing (allocator state, worker pools, the library's
 * globals) leaks from one run or system into the next. The parent never
 * creates threads and never calls libcaller or libuv, so fork is safe.
 *
 * Runs are interleaved (ours, pthread, libuv, ours, ...), BENCH_RUNS of each
 * (default 5, at least 5), after BENCH_WARMUP uncounted rounds (default 1;
 * none for a workload marked no_warmup, which warms up inside each run).
 * For each metric the table shows each system's median [min-max] and the
 * ratios of the medians ours/floor; one JSON record per metric goes to the
 * file named by BENCH_JSON (one record a line; bench/run.sh makes the array).
 *
 * A child that crashes, exits non-zero or overruns its time limit (SIGALRM,
 * BENCH_TIMEOUT seconds, default per workload) is reported on stderr with
 * its workload, system and run number; its figures count as missing.
 *
 * BENCH_ONLY=W1,W4 runs only the named workloads (ids, comma-separated).
 */
#ifndef CALLER_BENCH_H
#define CALLER_BENCH_H

#include <errno.h>
#include <math.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <dirent.h>

#define BENCH_MAX_RUNS 64
#define BENCH_MAX_METRICS 6
#define BENCH_SYSTEMS 3

/* Index of each system in a workload's table. */
enum { BENCH_OURS = 0, BENCH_PTHREAD = 1, BENCH_LIBUV = 2 };

static const char *const bench_system_key[BENCH_SYSTEMS] = {"libcaller", "pthread", "libuv"};

/* ---- small helpers for the workloads ------------------------------------ */

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

/* The q-quantile (0..1) of v[0..n-1], nearest rank; sorts v. */
static inline double bench_quantile(double *v, size_t n, double q)
{
    if (n == 0)
        return NAN;
    qsort(v, n, sizeof *v, bench_cmp);
    size_t k = (size_t)ceil(q * (double)n);
    return v[k == 0 ? 0 : k - 1];
}

/* Resident set size now, in bytes (/proc/self/statm, second field). */
static inline double bench_rss_bytes(void)
{
    FILE *f = fopen("/proc/self/statm", "r");
    long size = 0, resident = 0;
    if (!f)
        return NAN;
    int n = fscanf(f, "%ld %ld", &size, &resident);
    fclose(f);
    return n == 2 ? (double)resident * (double)sysconf(_SC_PAGESIZE) : NAN;
}

/* Peak resident set size of this process, in bytes (VmHWM). */
static inline double bench_peak_rss_bytes(void)
{
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    double kb = NAN;
    if (!f)
        return NAN;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, "VmHWM:", 6) == 0) {
            kb = strtod(line + 6, NULL);
            break;
        }
    fclose(f);
    return kb * 1024;
}

/* How many threads this process has now (entries of /proc/self/task). */
static inline int bench_thread_count(void)
{
    DIR *d = opendir("/proc/self/task");
    int n = 0;
    struct dirent *e;
    if (!d)
        return -1;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

/* User + system CPU seconds of this process so far. */
static inline double bench_cpu_seconds(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
}

/* True once @p count() reads 0, polling for up to @p seconds: what a Caller's
 * thread releases as it exits may go a moment after caller_wait_stopped(). */
static inline int bench_drains_to_zero(size_t (*count)(void), double seconds)
{
    double end = bench_now() + seconds;
    while (count() != 0) {
        if (bench_now() > end)
            return 0;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    return 1;
}

/* A failure inside a child run: say what and where, and fail the run. */
#define BENCH_CHECK(cond)                                                                          \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "bench: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);        \
            fflush(stderr);                                                                        \
            _exit(3);                                                                              \
        }                                                                                          \
    } while (0)

/* ---- workloads ---------------------------------------------------------- */

typedef struct {
    const char *name; /* "p50" */
    const char *unit; /* "us" */
} bench_metric_t;

/* One measurement: do the whole workload once and fill out[0..nmetrics-1]
 * (NAN where a figure does not apply to this system). Runs in a forked
 * child. Returns 0, or non-zero when the run failed (reported). */
typedef int (*bench_run_fn)(double *out);

typedef struct {
    const char *label; /* shown under the column, e.g. "mutex+condvar" */
    bench_run_fn run;  /* NULL: this system has no version of the workload */
} bench_system_t;

typedef struct {
    const char *id;    /* "W1" */
    const char *title; /* "local spawn" */
    const char *what;  /* one line: what is timed */
    int nmetrics;
    bench_metric_t metrics[BENCH_MAX_METRICS];
    bench_system_t sys[BENCH_SYSTEMS];
    int timeout;   /* seconds per run before the child is killed */
    int no_warmup; /* skip the warm-up round (the workload warms up inside) */
} bench_workload_t;

static FILE *bench_json;
static int bench_failures; /* runs that crashed, failed or timed out */

static inline int bench_env_int(const char *name, int def, int lo, int hi)
{
    const char *s = getenv(name);
    int n = s && *s ? atoi(s) : def;
    return n < lo ? lo : n > hi ? hi : n;
}

/* The number of counted runs: BENCH_RUNS, at least 5. */
static inline int bench_runs(void)
{
    return bench_env_int("BENCH_RUNS", 5, 5, BENCH_MAX_RUNS);
}

static inline int bench_selected(const char *id)
{
    const char *only = getenv("BENCH_ONLY");
    if (!only || !*only)
        return 1;
    size_t len = strlen(id);
    for (const char *s = only; *s;) {
        const char *e = strchr(s, ',');
        size_t n = e ? (size_t)(e - s) : strlen(s);
        if (n == len && strncasecmp(s, id, n) == 0)
            return 1;
        s += n + (e != NULL);
    }
    return 0;
}

static inline void bench_begin(void)
{
    const char *path = getenv("BENCH_JSON");
    if (path && *path && !bench_json)
        bench_json = fopen(path, "a");
    setvbuf(stdout, NULL, _IOLBF, 0);
}

/* Run @p fn in a forked child with a time limit; read its figures back.
 * Returns 0 when the child delivered them all. */
static inline int bench_fork_run(const bench_workload_t *w, int sys, int run, double *out)
{
    int fds[2];
    if (pipe(fds) != 0) {
        perror("bench: pipe");
        return -1;
    }
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0) {
        perror("bench: fork");
        close(fds[0]);
        close(fds[1]);
        return -1;
    }
    if (pid == 0) {
        close(fds[0]);
        double fig[BENCH_MAX_METRICS];
        for (int m = 0; m < BENCH_MAX_METRICS; m++)
            fig[m] = NAN;
        alarm((unsigned)bench_env_int("BENCH_TIMEOUT", w->timeout, 1, 3600));
        int rc = w->sys[sys].run(fig);
        fflush(stdout);
        fflush(stderr);
        if (rc != 0)
            _exit(rc > 0 && rc < 256 ? rc : 2);
        ssize_t want = (ssize_t)(sizeof(double) * (size_t)w->nmetrics);
        _exit(write(fds[1], fig, (size_t)want) == want ? 0 : 4);
    }
    close(fds[1]);
    size_t want = sizeof(double) * (size_t)w->nmetrics, got = 0;
    char *buf = (char *)out;
    while (got < want) {
        ssize_t n = read(fds[0], buf + got, want - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    const char *who = w->sys[sys].label;
    if (WIFSIGNALED(status)) {
        int sig = WTERMSIG(status);
        fprintf(stderr, "bench: %s %s (%s) run %d: killed by signal %d (%s)%s\n", w->id,
                bench_system_key[sys], who, run, sig, strsignal(sig),
                sig == SIGALRM ? " - time limit passed, the run hung or is too slow" : "");
        return -1;
    }
    if (WEXITSTATUS(status) != 0 || got != want) {
        fprintf(stderr, "bench: %s %s (%s) run %d: failed, exit status %d\n", w->id,
                bench_system_key[sys], who, run, WEXITSTATUS(status));
        return -1;
    }
    return 0;
}

typedef struct {
    int n; /* runs with a figure */
    double median, min, max;
    double v[BENCH_MAX_RUNS]; /* the figures in run order */
} bench_series_t;

static inline void bench_series_stat(bench_series_t *s, const double *all, int runs)
{
    double sorted[BENCH_MAX_RUNS];
    s->n = 0;
    for (int r = 0; r < runs; r++) {
        s->v[r] = all[r];
        if (!isnan(all[r]))
            sorted[s->n++] = all[r];
    }
    if (s->n == 0) {
        s->median = s->min = s->max = NAN;
        return;
    }
    qsort(sorted, (size_t)s->n, sizeof *sorted, bench_cmp);
    s->min = sorted[0];
    s->max = sorted[s->n - 1];
    s->median = s->n % 2 ? sorted[s->n / 2] : (sorted[s->n / 2 - 1] + sorted[s->n / 2]) / 2;
}

/* A figure with about 3 significant digits. */
static inline void bench_fmt(char *buf, size_t len, double x)
{
    double a = fabs(x);
    if (isnan(x))
        snprintf(buf, len, "-");
    else if (a >= 1000 || a == 0)
        snprintf(buf, len, "%.0f", x);
    else if (a >= 100)
        snprintf(buf, len, "%.1f", x);
    else if (a >= 1)
        snprintf(buf, len, "%.2f", x);
    else
        snprintf(buf, len, "%.3g", x);
}

static inline void bench_cell(char *buf, size_t len, const bench_series_t *s, int runs)
{
    char m[24], lo[24], hi[24];
    if (s->n == 0) {
        snprintf(buf, len, "n/a");
        return;
    }
    bench_fmt(m, sizeof m, s->median);
    bench_fmt(lo, sizeof lo, s->min);
    bench_fmt(hi, sizeof hi, s->max);
    if (s->n < runs)
        snprintf(buf, len, "%s [%s-%s] %d/%d", m, lo, hi, s->n, runs);
    else
        snprintf(buf, len, "%s [%s-%s]", m, lo, hi);
}

static inline void bench_json_num(FILE *f, double x)
{
    if (isnan(x) || isinf(x))
        fputs("null", f);
    else
        fprintf(f, "%.6g", x);
}

static inline void bench_json_str(FILE *f, const char *s)
{
    fputc('"', f);
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            fputc('\\', f);
        fputc(*s, f);
    }
    fputc('"', f);
}

/* Run workload @p w: warm-up rounds, then runs interleaved by system; print
 * its table; append its JSON records. */
static inline void bench_workload(const bench_workload_t *w)
{
    if (!bench_selected(w->id))
        return;
    int runs = bench_runs(), warm = w->no_warmup ? 0 : bench_env_int("BENCH_WARMUP", 1, 0, 10);
    static double fig[BENCH_SYSTEMS][BENCH_MAX_METRICS][BENCH_MAX_RUNS];
    double one[BENCH_MAX_METRICS];
    double t0 = bench_now();

    printf("\n%s %s: %s\n", w->id, w->title, w->what);
    for (int r = -warm; r < runs; r++)
        for (int s = 0; s < BENCH_SYSTEMS; s++) {
            if (!w->sys[s].run)
                continue;
            int ok = bench_fork_run(w, s, r < 0 ? r : r + 1, one) == 0;
            bench_failures += !ok;
            if (r < 0)
                continue;
            for (int m = 0; m < w->nmetrics; m++)
                fig[s][m][r] = ok ? one[m] : NAN;
        }

    bench_series_t st[BENCH_SYSTEMS][BENCH_MAX_METRICS];
    for (int s = 0; s < BENCH_SYSTEMS; s++)
        for (int m = 0; m < w->nmetrics; m++) {
            if (w->sys[s].run)
                bench_series_stat(&st[s][m], fig[s][m], runs);
            else
                st[s][m].n = 0;
        }

    /* The table: a header naming each system's implementation, then one
     * row per metric. */
    printf("  %-14s %-5s", "", "");
    for (int s = 0; s < BENCH_SYSTEMS; s++)
        printf(" %-28s", bench_system_key[s]);
    printf(" %9s %9s\n", "ours/pth", "ours/uv");
    printf("  %-14s %-5s", "metric", "unit");
    for (int s = 0; s < BENCH_SYSTEMS; s++) {
        char lab[29];
        snprintf(lab, sizeof lab, "%s", w->sys[s].run ? w->sys[s].label : "(none)");
        printf(" %-28s", lab);
    }
    printf("\n");
    for (int m = 0; m < w->nmetrics; m++) {
        printf("  %-14s %-5s", w->metrics[m].name, w->metrics[m].unit);
        double ratio[BENCH_SYSTEMS] = {NAN, NAN, NAN};
        for (int s = 0; s < BENCH_SYSTEMS; s++) {
            char cell[128];
            bench_cell(cell, sizeof cell, &st[s][m], runs);
            printf(" %-28s", cell);
            if (s > 0 && st[0][m].n && st[s][m].n && st[s][m].median != 0)
                ratio[s] = st[0][m].median / st[s][m].median;
        }
        for (int s = 1; s < BENCH_SYSTEMS; s++) {
            char r[32];
            if (isnan(ratio[s]))
                snprintf(r, sizeof r, "-");
            else
                snprintf(r, sizeof r, "%.2fx", ratio[s]);
            printf(" %9s", r);
        }
        printf("\n");

        if (!bench_json)
            continue;
        FILE *f = bench_json;
        fputs("{\"workload\": ", f);
        bench_json_str(f, w->id);
        fputs(", \"title\": ", f);
        bench_json_str(f, w->title);
        fputs(", \"metric\": ", f);
        bench_json_str(f, w->metrics[m].name);
        fputs(", \"unit\": ", f);
        bench_json_str(f, w->metrics[m].unit);
        fprintf(f, ", \"runs\": %d, \"systems\": {", runs);
        int first = 1;
        for (int s = 0; s < BENCH_SYSTEMS; s++) {
            if (!w->sys[s].run)
                continue;
            fprintf(f, "%s\"%s\": {\"impl\": ", first ? "" : ", ", bench_system_key[s]);
            first = 0;
            bench_json_str(f, w->sys[s].label);
            fputs(", \"median\": ", f);
            bench_json_num(f, st[s][m].n ? st[s][m].median : NAN);
            fputs(", \"min\": ", f);
            bench_json_num(f, st[s][m].n ? st[s][m].min : NAN);
            fputs(", \"max\": ", f);
            bench_json_num(f, st[s][m].n ? st[s][m].max : NAN);
            fputs(", \"runs\": [", f);
            for (int r = 0; r < runs; r++) {
                if (r)
                    fputs(", ", f);
                bench_json_num(f, st[s][m].v[r]);
            }
            fputs("]}", f);
        }
        fputs("}, \"ratios\": {", f);
        first = 1;
        for (int s = 1; s < BENCH_SYSTEMS; s++) {
            if (!w->sys[s].run)
                continue;
            fprintf(f, "%s\"ours/%s\": ", first ? "" : ", ", bench_system_key[s]);
            first = 0;
            bench_json_num(f, ratio[s]);
        }
        fputs("}}\n", f);
        fflush(f);
    }
    printf("  (%d runs per system, interleaved, each in its own process; %.1f s)\n", runs,
           bench_now() - t0);
}

/* main's return value: 1 if any run failed (each was reported). */
static inline int bench_end(void)
{
    if (bench_failures)
        fprintf(stderr, "bench: %d run(s) failed, see above\n", bench_failures);
    if (bench_json)
        fclose(bench_json);
    return bench_failures ? 1 : 0;
}

#endif
