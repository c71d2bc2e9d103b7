/*
 * The benchmark harness shared by the programs in bench/ (header only: every
 * bench/ *.c file is its own executable). Never used by tests.
 *
 * A workload has systems measured in the same run — libcaller ("ours"), a
 * raw pthread floor and a raw libuv floor, and for some workloads more (a
 * second libcaller configuration, peers such as a Go program) — and one or
 * more metrics. Each single measurement (one system, one repetition) runs in a
 * child process forked for it: the child does the whole workload, writes its
 * figures back through a pipe and exits, so peak RSS and thread counts are
 * that run's own and nothing (allocator state, worker pools, the library's
 * globals) leaks from one run or system into the next. The parent never
 * creates threads and never calls libcaller or libuv, so fork is safe.
 *
 * Runs are interleaved (ours, pthread, libuv, [others,] ours, ...),
 * BENCH_RUNS of each (default 5, at least 5), after BENCH_WARMUP uncounted
 * rounds (default 1; none for a workload marked no_warmup, which warms up
 * inside each run). For each metric the table shows each system's median
 * [min-max] and the ratios of the medians ours/other, "ours" being the first
 * system; one JSON record per metric goes to the file named by BENCH_JSON
 * (one record a line; bench/run.sh makes the array). A workload of three
 * systems has one column per system and one row per metric; one of more
 * systems has one row per system and one column per metric, then a row per
 * ratio, the last ours/best-peer (the best median of the systems that are
 * not libcaller).
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
#define BENCH_SYSTEMS 3     /* the first three: ours and the two floors */
#define BENCH_MAX_SYSTEMS 9 /* with the others a workload may add */

/* Index of each system in a workload's table. */
enum { BENCH_OURS = 0, BENCH_PTHREAD = 1, BENCH_LIBUV = 2 };

/* The key of each of the first three systems, unless the system names its
 * own. */
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

/* What a workload with more than three systems says about each system
 * (bench_workload_more()). A separate table so that the workloads of three
 * systems keep their two-field initializers. */
typedef struct {
    const char *key[BENCH_MAX_SYSTEMS];  /* JSON and ratio name; NULL:
                                            bench_system_key[s] for the
                                            first three; "libcaller..." for
                                            ours, unique per workload */
    const char *skip[BENCH_MAX_SYSTEMS]; /* non-NULL (with run NULL): why the
                                            system is not run, shown in its
                                            row (e.g. not built) */
} bench_more_t;

typedef struct {
    const char *id;    /* "W1" */
    const char *title; /* "local spawn" */
    const char *what;  /* one line: what is timed */
    int nmetrics;
    bench_metric_t metrics[BENCH_MAX_METRICS];
    bench_system_t sys[BENCH_MAX_SYSTEMS]; /* after the first three, up to
                                              the first without a label */
    int timeout;                           /* seconds per run before the child is killed */
    int no_warmup; /* skip the warm-up round (the workload warms up inside) */
} bench_workload_t;

/* How many systems @p w has: the first three, then those with a label. */
static inline int bench_nsys(const bench_workload_t *w)
{
    int n = BENCH_SYSTEMS;
    while (n < BENCH_MAX_SYSTEMS && w->sys[n].label)
        n++;
    return n;
}

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
static inline int bench_fork_run(const bench_workload_t *w, int sys, const char *key, int run,
                                 double *out)
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
        fprintf(stderr, "bench: %s %s (%s) run %d: killed by signal %d (%s)%s\n", w->id, key, who,
                run, sig, strsignal(sig),
                sig == SIGALRM ? " - time limit passed, the run hung or is too slow" : "");
        return -1;
    }
    if (WEXITSTATUS(status) != 0 || got != want) {
        fprintf(stderr, "bench: %s %s (%s) run %d: failed, exit status %d\n", w->id, key, who, run,
                WEXITSTATUS(status));
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

/* The figures of one workload, gathered by bench_workload(). */
typedef struct {
    int nsys, runs;
    const char *key[BENCH_MAX_SYSTEMS];  /* from bench_more_t or the default */
    const char *skip[BENCH_MAX_SYSTEMS]; /* from bench_more_t */
    bench_series_t st[BENCH_MAX_SYSTEMS][BENCH_MAX_METRICS];
    double ratio[BENCH_MAX_SYSTEMS][BENCH_MAX_METRICS]; /* ours/system s, medians */
    int best[BENCH_MAX_METRICS]; /* the best peer: lowest median of the systems
                                    that are not libcaller; -1 if none ran */
} bench_result_t;

static inline void bench_ratio_fmt(char *buf, size_t len, double ratio)
{
    if (isnan(ratio))
        snprintf(buf, len, "-");
    else
        snprintf(buf, len, "%.2fx", ratio);
}

/* A libcaller system (ours or another configuration of it): left out of
 * the best peer. */
static inline int bench_is_ours(const bench_result_t *res, int s)
{
    return strncmp(res->key[s], "libcaller", 9) == 0;
}

/* A floor that is no system anyone would use (its key ends in "-floor",
 * e.g. W4's work alone on every core): shown with its ratio, left out of
 * the best peer too. */
static inline int bench_is_floor(const bench_result_t *res, int s)
{
    size_t n = strlen(res->key[s]);
    return n >= 6 && strcmp(res->key[s] + n - 6, "-floor") == 0;
}

/* Three systems: one column per system, one row per metric, the ratios to
 * the two floors at the end of each row. */
static inline void bench_table_columns(const bench_workload_t *w, const bench_result_t *res)
{
    printf("  %-14s %-5s", "", "");
    for (int s = 0; s < BENCH_SYSTEMS; s++)
        printf(" %-28s", res->key[s]);
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
        for (int s = 0; s < BENCH_SYSTEMS; s++) {
            char cell[128];
            bench_cell(cell, sizeof cell, &res->st[s][m], res->runs);
            printf(" %-28s", cell);
        }
        for (int s = 1; s < BENCH_SYSTEMS; s++) {
            char r[32];
            bench_ratio_fmt(r, sizeof r, res->ratio[s][m]);
            printf(" %9s", r);
        }
        printf("\n");
    }
}

/* More systems: one row per system, one column per metric, then one row per
 * ratio ours/system and ours/best-peer (with the best peer's key). */
static inline void bench_table_rows(const bench_workload_t *w, const bench_result_t *res)
{
    printf("  %-14s %-42s", "system", "");
    for (int m = 0; m < w->nmetrics; m++) {
        char head[64];
        snprintf(head, sizeof head, "%s (%s)", w->metrics[m].name, w->metrics[m].unit);
        printf(" %-*s", m + 1 < w->nmetrics ? 24 : 0, head);
    }
    printf("\n");
    for (int s = 0; s < res->nsys; s++) {
        printf("  %-14s %-42.42s", res->key[s], w->sys[s].label ? w->sys[s].label : "(none)");
        if (res->skip[s])
            printf(" not run: %s", res->skip[s]);
        else
            for (int m = 0; m < w->nmetrics; m++) {
                char cell[128];
                bench_cell(cell, sizeof cell, &res->st[s][m], res->runs);
                printf(" %-*s", m + 1 < w->nmetrics ? 24 : 0, cell);
            }
        printf("\n");
    }
    for (int s = 1; s <= res->nsys; s++) {
        if (s < res->nsys && !w->sys[s].run)
            continue;
        char name[64];
        snprintf(name, sizeof name, "ours/%s", s < res->nsys ? res->key[s] : "best-peer");
        printf("  %-57s", name);
        for (int m = 0; m < w->nmetrics; m++) {
            char r[32], cell[96];
            if (s < res->nsys) {
                bench_ratio_fmt(cell, sizeof cell, res->ratio[s][m]);
            } else {
                int b = res->best[m];
                bench_ratio_fmt(r, sizeof r, b < 0 ? NAN : res->ratio[b][m]);
                snprintf(cell, sizeof cell, "%s%s%s", r, b < 0 ? "" : " ",
                         b < 0 ? "" : res->key[b]);
            }
            printf(" %-*s", m + 1 < w->nmetrics ? 24 : 0, cell);
        }
        printf("\n");
    }
}

/* One JSON record (one line) for metric @p m. */
static inline void bench_json_metric(FILE *f, const bench_workload_t *w, const bench_result_t *res,
                                     int m)
{
    fputs("{\"workload\": ", f);
    bench_json_str(f, w->id);
    fputs(", \"title\": ", f);
    bench_json_str(f, w->title);
    fputs(", \"metric\": ", f);
    bench_json_str(f, w->metrics[m].name);
    fputs(", \"unit\": ", f);
    bench_json_str(f, w->metrics[m].unit);
    fprintf(f, ", \"runs\": %d, \"systems\": {", res->runs);
    int first = 1;
    for (int s = 0; s < res->nsys; s++) {
        const bench_series_t *st = &res->st[s][m];
        if (!w->sys[s].run && !res->skip[s])
            continue;
        fprintf(f, "%s\"%s\": {\"impl\": ", first ? "" : ", ", res->key[s]);
        first = 0;
        bench_json_str(f, w->sys[s].label);
        if (res->skip[s]) {
            fputs(", \"skipped\": ", f);
            bench_json_str(f, res->skip[s]);
            fputs("}", f);
            continue;
        }
        fputs(", \"median\": ", f);
        bench_json_num(f, st->n ? st->median : NAN);
        fputs(", \"min\": ", f);
        bench_json_num(f, st->n ? st->min : NAN);
        fputs(", \"max\": ", f);
        bench_json_num(f, st->n ? st->max : NAN);
        fputs(", \"runs\": [", f);
        for (int r = 0; r < res->runs; r++) {
            if (r)
                fputs(", ", f);
            bench_json_num(f, st->v[r]);
        }
        fputs("]}", f);
    }
    fputs("}, \"ratios\": {", f);
    first = 1;
    for (int s = 1; s < res->nsys; s++) {
        if (!w->sys[s].run)
            continue;
        fprintf(f, "%s\"ours/%s\": ", first ? "" : ", ", res->key[s]);
        first = 0;
        bench_json_num(f, res->ratio[s][m]);
    }
    if (res->nsys > BENCH_SYSTEMS) {
        int b = res->best[m];
        fputs(", \"ours/best-peer\": ", f);
        bench_json_num(f, b < 0 ? NAN : res->ratio[b][m]);
        fputs(", \"best-peer\": ", f);
        if (b < 0)
            fputs("null", f);
        else
            bench_json_str(f, res->key[b]);
    }
    fputs("}}\n", f);
    fflush(f);
}

/* Run workload @p w: warm-up rounds, then runs interleaved by system; print
 * its table; append its JSON records. @p more (NULL for none) names the
 * systems and says which are skipped. */
static inline void bench_workload_more(const bench_workload_t *w, const bench_more_t *more)
{
    if (!bench_selected(w->id))
        return;
    int runs = bench_runs(), warm = w->no_warmup ? 0 : bench_env_int("BENCH_WARMUP", 1, 0, 10);
    static double fig[BENCH_MAX_SYSTEMS][BENCH_MAX_METRICS][BENCH_MAX_RUNS];
    static bench_result_t res;
    double one[BENCH_MAX_METRICS];
    double t0 = bench_now();

    res.nsys = bench_nsys(w);
    res.runs = runs;
    for (int s = 0; s < res.nsys; s++) {
        res.key[s] = more && more->key[s] ? more->key[s]
                     : s < BENCH_SYSTEMS  ? bench_system_key[s]
                                          : "?";
        res.skip[s] = more ? more->skip[s] : NULL;
    }
    printf("\n%s %s: %s\n", w->id, w->title, w->what);
    for (int r = -warm; r < runs; r++)
        for (int s = 0; s < res.nsys; s++) {
            if (!w->sys[s].run)
                continue;
            int ok = bench_fork_run(w, s, res.key[s], r < 0 ? r : r + 1, one) == 0;
            bench_failures += !ok;
            if (r < 0)
                continue;
            for (int m = 0; m < w->nmetrics; m++)
                fig[s][m][r] = ok ? one[m] : NAN;
        }

    for (int m = 0; m < w->nmetrics; m++) {
        res.best[m] = -1;
        for (int s = 0; s < res.nsys; s++) {
            bench_series_t *st = &res.st[s][m];
            if (w->sys[s].run)
                bench_series_stat(st, fig[s][m], runs);
            else
                st->n = 0;
            res.ratio[s][m] = NAN;
            if (s > 0 && res.st[0][m].n && st->n && st->median != 0)
                res.ratio[s][m] = res.st[0][m].median / st->median;
            if (!bench_is_ours(&res, s) && !bench_is_floor(&res, s) && st->n &&
                (res.best[m] < 0 || st->median < res.st[res.best[m]][m].median))
                res.best[m] = s;
        }
    }

    if (res.nsys > BENCH_SYSTEMS)
        bench_table_rows(w, &res);
    else
        bench_table_columns(w, &res);
    for (int m = 0; bench_json && m < w->nmetrics; m++)
        bench_json_metric(bench_json, w, &res, m);
    printf("  (%d runs per system, interleaved, each in its own process; %.1f s)\n", runs,
           bench_now() - t0);
}

/* bench_workload_more() for a workload of the three usual systems. */
static inline void bench_workload(const bench_workload_t *w)
{
    bench_workload_more(w, NULL);
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
