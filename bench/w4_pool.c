/*
 * W4 pool (issue 8): N=200,000 tasks of about 1 µs of CPU each, at most 10
 * outstanding, their results consumed in completion order; ns per task,
 * peak RSS and the peak number of threads.
 *
 * The work is a fixed loop of dependent 64-bit multiply-adds (an LCG step;
 * an empty asm keeps the compiler from folding it), its length calibrated
 * once at start to about 1 µs and printed; every run and system uses the
 * same length.
 *
 *  libcaller  a MANUAL Caller's task drives caller_as_completed_gen() with
 *             max_concurrent 10; the generator returns caller_to_thread(c,
 *             work, arg) until N were made; the loop takes each Pending
 *             from caller_iter_next(), reads its result and releases it.
 *             The pool owner is the MANUAL Caller.
 *  libcaller-all  the pool capped instead of the submissions: the MANUAL
 *             Caller's pool set to max_workers 10 (caller_pool_set_config),
 *             its task makes all N caller_to_thread() calls at once (those
 *             beyond 10 wait in order for a worker), then waits for each
 *             Pending in submission order, reads its result and releases
 *             it.
 *  pthread    a fixed pool of 10 threads on a mutex + condvar job queue;
 *             finished jobs go on a mutex + condvar completion list; the
 *             main thread keeps 10 outstanding, takes completions, reads
 *             each result and submits the next. Workers and the main
 *             thread yield (sched_yield) up to POOL_SPIN times re-checking
 *             their list before they sleep on the condvar.
 *  libuv      uv_queue_work with UV_THREADPOOL_SIZE=10 from a loop on the
 *             main thread: 10 outstanding, the after-work callback reads
 *             the result, frees the request and submits the next.
 *  go-all, go-10  the Go peer, bench/go/w4.go, built next to this program
 *             as go-w4 (BENCH_GO_W4 names another path): the run forks and
 *             execs it with the calibrated work length on its command line
 *             and GOMAXPROCS=2 unless set; it times itself and prints one
 *             line with its figures. go-all: 10 worker goroutines on a
 *             channel holding all N; go-10: at most 10 outstanding, each a
 *             goroutine, results taken in completion order from a channel,
 *             the next started per result. Its peak RSS is getrusage's
 *             ru_maxrss (after exec, Linux also counts the forked child's
 *             own peak before it, a couple of MB like the others' start);
 *             threads as ours, from /proc/self/task. Without the binary
 *             these systems are shown as not run, not as failures.
 *  libcaller-glib  the libcaller program on the GLib backend.
 *  glib       a GThreadPool of 10 threads (g_thread_pool_push); each
 *             worker puts its finished job on a GAsyncQueue; the main
 *             thread keeps 10 outstanding, pops completions, reads each
 *             result and pushes the next.
 *  work-floor the N calls of work split evenly over one thread per online
 *             CPU, nothing else: the least time any pool can take here
 *             (N x the work's ~1 us / the cores). Not a peer: no ratio to
 *             it counts as the best peer's.
 *
 * Threads are counted from /proc/self/task twenty times during the run (the
 * maximum is reported); peak RSS is the run's VmHWM (the child starts as a
 * copy of a small parent, a couple of MB).
 */
#include "bench.h"
#include "floors.h"

#include <caller.h>
#include <sched.h>
#include <sys/prctl.h>

enum { N = 200000, CONCURRENCY = 10, SAMPLE_EVERY = N / 20 };

/* ---- the work ------------------------------------------------------------ */

static long work_iters = 300;

static uint64_t work(uint64_t x, long iters)
{
    for (long i = 0; i < iters; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        __asm__ volatile("" : "+r"(x));
    }
    return x;
}

static uint64_t volatile work_sink;

/* Set work_iters so that one call takes about 1 µs; print what it gives. */
static void calibrate(void)
{
    double best = 1e9;
    const long probe = 2000000;
    for (int k = 0; k < 7; k++) {
        double t0 = bench_now();
        work_sink = work((uint64_t)k, probe);
        double ns = (bench_now() - t0) * 1e9 / (double)probe;
        if (ns < best)
            best = ns;
    }
    work_iters = (long)(1000.0 / best + 0.5);
    /* BENCH_W4_ITERS: a fixed body instead, e.g. 600 as ../peers' programs
     * use (their "~1 us" task is ~650 ns on this machine). */
    work_iters = bench_env_int("BENCH_W4_ITERS", (int)work_iters, 1, 1000000);
    double calls[5];
    for (int k = 0; k < 5; k++) {
        double t0 = bench_now();
        for (int i = 0; i < 10000; i++)
            work_sink = work(work_sink, work_iters);
        calls[k] = (bench_now() - t0) * 1e9 / 10000;
    }
    printf("W4 calibration: %.3f ns per multiply-add; work = %ld iterations%s = %.0f ns per call "
           "(median of 5 x 10,000 calls, one thread)\n",
           best, work_iters, getenv("BENCH_W4_ITERS") ? " (BENCH_W4_ITERS)" : "",
           bench_quantile(calls, 5, 0.5));
}

static void *work_task(void *arg)
{
    return (void *)(uintptr_t)work((uint64_t)(uintptr_t)arg, work_iters);
}

static void sample_threads(long done, int *peak)
{
    if (done % SAMPLE_EVERY == 0 || done == 1) {
        int n = bench_thread_count();
        if (n > *peak)
            *peak = n;
    }
}

static void report(double *out, double t0, double t1, int threads)
{
    out[0] = (t1 - t0) * 1e9 / N;
    out[1] = bench_peak_rss_bytes() / (1024.0 * 1024.0);
    out[2] = threads;
}

/* ---- libcaller ----------------------------------------------------------- */

typedef struct {
    caller_t *c;
    long made;
} gen_t;

static caller_pending_t *generate(void *arg)
{
    gen_t *g = arg;
    if (g->made >= N)
        return NULL;
    caller_pending_t *p = caller_to_thread(g->c, work_task, (void *)(uintptr_t)g->made);
    BENCH_CHECK(p != NULL);
    g->made++;
    return p;
}

static void *ours_body(void *arg)
{
    double *out = arg;
    gen_t g = {caller_current(), 0};
    int peak = 0;
    uintptr_t sink = 0;
    long done = 0;
    double t0 = bench_now();
    caller_iter_t *it = caller_as_completed_gen(
        generate, &g, &(caller_as_completed_options_t){.max_concurrent = CONCURRENCY});
    BENCH_CHECK(it != NULL);
    caller_pending_t *p;
    int rc;
    while ((rc = caller_iter_next(it, &p)) == 0) {
        void *v = NULL;
        BENCH_CHECK(caller_pending_result(p, &v) == 0);
        sink += (uintptr_t)v;
        caller_pending_unref(p);
        sample_threads(++done, &peak);
    }
    BENCH_CHECK(rc == CALLER_ITER_END);
    caller_iter_close(it);
    double t1 = bench_now();
    work_sink = sink;
    BENCH_CHECK(done == N);
    report(out, t0, t1, peak);
    return NULL;
}

static int ours(double *out)
{
    caller_t *c = caller_create(CALLER_MANUAL, &(caller_options_t){.name = "bench-w4"});
    BENCH_CHECK(c != NULL);
    BENCH_CHECK(caller_run(c, ours_body, out, NULL) == 0);
    caller_unref(c);
    return 0;
}

/* ---- libcaller: all submitted, the pool capped at 10 workers -------------- */

static void *ours_all_body(void *arg)
{
    double *out = arg;
    caller_t *c = caller_current();
    caller_pool_config_t cfg;
    BENCH_CHECK(caller_pool_get_config(c, &cfg) == 0);
    cfg.max_workers = CONCURRENCY;
    BENCH_CHECK(caller_pool_set_config(c, &cfg) == 0);
    caller_pending_t **ps = malloc(sizeof *ps * N);
    BENCH_CHECK(ps != NULL);
    int peak = 0;
    uintptr_t sink = 0;
    double t0 = bench_now();
    for (long i = 0; i < N; i++) {
        ps[i] = caller_to_thread(c, work_task, (void *)(uintptr_t)i);
        BENCH_CHECK(ps[i] != NULL);
    }
    for (long i = 0; i < N; i++) {
        void *v = NULL;
        BENCH_CHECK(caller_pending_wait(ps[i], CALLER_FOREVER,
                                        CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v) == 0);
        sink += (uintptr_t)v;
        caller_pending_unref(ps[i]);
        sample_threads(i + 1, &peak);
    }
    double t1 = bench_now();
    work_sink = sink;
    free(ps);
    report(out, t0, t1, peak);
    return NULL;
}

static int ours_all(double *out)
{
    caller_t *c = caller_create(CALLER_MANUAL, &(caller_options_t){.name = "bench-w4-all"});
    BENCH_CHECK(c != NULL);
    BENCH_CHECK(caller_run(c, ours_all_body, out, NULL) == 0);
    caller_unref(c);
    return 0;
}

/* ---- the work alone on every core: what no pool can beat ------------------- */

typedef struct {
    long calls;
    uint64_t sink;
} share_t;

static void *work_share(void *arg)
{
    share_t *s = arg;
    uint64_t x = 0;
    for (long i = 0; i < s->calls; i++)
        x += work((uint64_t)i, work_iters);
    s->sink = x;
    return NULL;
}

/* The N calls of work split evenly over one thread per online CPU, no
 * queue, no hand-off, nothing shared: the time they take is the least any
 * pool on this machine can take for W4 (with 1 us of work per task on 2
 * cores, about 500 ns per task). */
static int work_floor(double *out)
{
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    if (ncpu < 1)
        ncpu = 1;
    if (ncpu > 64)
        ncpu = 64;
    pthread_t th[64];
    share_t share[64];
    double t0 = bench_now();
    for (long k = 0; k < ncpu; k++) {
        share[k] = (share_t){N / ncpu + (k < N % ncpu), 0};
        BENCH_CHECK(pthread_create(&th[k], NULL, work_share, &share[k]) == 0);
    }
    uint64_t sink = 0;
    for (long k = 0; k < ncpu; k++) {
        BENCH_CHECK(pthread_join(th[k], NULL) == 0);
        sink += share[k].sink;
    }
    double t1 = bench_now();
    work_sink = sink;
    report(out, t0, t1, (int)ncpu + 1);
    return 0;
}

/* ---- pthread: a fixed pool of 10 ------------------------------------------ */

typedef struct pjob {
    struct pjob *next;
    uint64_t arg, result;
} pjob_t;

static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    pjob_t *head, **tail;
    bool stopping;
    pthread_mutex_t done_lock;
    pthread_cond_t done_cond;
    pjob_t *done;
    bool waiting;
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, NULL, false,
          PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, NULL, false};

/* Before sleeping on its condvar, a thread that finds nothing to do yields
 * the CPU up to this many times, re-checking between yields. On this 2-core
 * VM a futex sleep + wake-up costs several µs of system time, more than the
 * 1 µs task, so a pool that sleeps at once spends its time in the kernel
 * (measured: about 8.5 µs per task with no spinning, about 2.5 µs with
 * this, while the machine also ran another build). Yielding rather than
 * pausing lets a busy machine run the others meanwhile. */
enum { POOL_SPIN = 200 };

static void *pool_worker(void *arg)
{
    (void)arg;
    for (;;) {
        for (int spin = 0; spin < POOL_SPIN && !__atomic_load_n(&pool.head, __ATOMIC_RELAXED);
             spin++)
            sched_yield();
        pthread_mutex_lock(&pool.lock);
        while (!pool.head && !pool.stopping)
            pthread_cond_wait(&pool.cond, &pool.lock);
        pjob_t *j = pool.head;
        if (!j) {
            pthread_mutex_unlock(&pool.lock);
            return NULL;
        }
        pool.head = j->next;
        if (!pool.head)
            pool.tail = &pool.head;
        pthread_mutex_unlock(&pool.lock);

        j->result = work(j->arg, work_iters);

        pthread_mutex_lock(&pool.done_lock);
        j->next = pool.done;
        pool.done = j;
        if (pool.waiting)
            pthread_cond_signal(&pool.done_cond);
        pthread_mutex_unlock(&pool.done_lock);
    }
}

static void pool_submit(uint64_t arg)
{
    pjob_t *j = malloc(sizeof *j);
    BENCH_CHECK(j);
    j->next = NULL;
    j->arg = arg;
    pthread_mutex_lock(&pool.lock);
    *pool.tail = j;
    pool.tail = &j->next;
    pthread_cond_signal(&pool.cond);
    pthread_mutex_unlock(&pool.lock);
}

static int floor_pthread(double *out)
{
    pthread_t th[CONCURRENCY];
    pool.tail = &pool.head;
    for (int i = 0; i < CONCURRENCY; i++)
        BENCH_CHECK(pthread_create(&th[i], NULL, pool_worker, NULL) == 0);
    int peak = 0;
    uintptr_t sink = 0;
    long made = 0, done = 0;
    double t0 = bench_now();
    while (made < CONCURRENCY)
        pool_submit((uint64_t)made++);
    while (done < N) {
        for (int spin = 0; spin < POOL_SPIN && !__atomic_load_n(&pool.done, __ATOMIC_RELAXED);
             spin++)
            sched_yield();
        pthread_mutex_lock(&pool.done_lock);
        pool.waiting = true;
        while (!pool.done)
            pthread_cond_wait(&pool.done_cond, &pool.done_lock);
        pool.waiting = false;
        pjob_t *list = pool.done;
        pool.done = NULL;
        pthread_mutex_unlock(&pool.done_lock);
        while (list) {
            pjob_t *j = list;
            list = j->next;
            sink += j->result;
            free(j);
            sample_threads(++done, &peak);
            if (made < N)
                pool_submit((uint64_t)made++);
        }
    }
    double t1 = bench_now();
    work_sink = sink;
    pthread_mutex_lock(&pool.lock);
    pool.stopping = true;
    pthread_cond_broadcast(&pool.cond);
    pthread_mutex_unlock(&pool.lock);
    for (int i = 0; i < CONCURRENCY; i++)
        pthread_join(th[i], NULL);
    report(out, t0, t1, peak);
    return 0;
}

/* ---- libuv: uv_queue_work, 10 threads ------------------------------------ */

typedef struct {
    uv_work_t req;
    uint64_t arg, result;
} uvjob_t;

static struct {
    uv_loop_t loop;
    long made, done;
    int peak;
    uintptr_t sink;
} uvw;

static void uv_work(uv_work_t *req)
{
    uvjob_t *j = (uvjob_t *)req;
    j->result = work(j->arg, work_iters);
}

static void uv_submit(void);

static void uv_after(uv_work_t *req, int status)
{
    uvjob_t *j = (uvjob_t *)req;
    BENCH_CHECK(status == 0);
    uvw.sink += j->result;
    free(j);
    sample_threads(++uvw.done, &uvw.peak);
    if (uvw.made < N)
        uv_submit();
}

static void uv_submit(void)
{
    uvjob_t *j = malloc(sizeof *j);
    BENCH_CHECK(j);
    j->arg = (uint64_t)uvw.made++;
    BENCH_CHECK(uv_queue_work(&uvw.loop, &j->req, uv_work, uv_after) == 0);
}

static int floor_libuv(double *out)
{
    setenv("UV_THREADPOOL_SIZE", "10", 1); /* read once, at the pool's first use */
    BENCH_CHECK(uv_loop_init(&uvw.loop) == 0);
    double t0 = bench_now();
    while (uvw.made < CONCURRENCY)
        uv_submit();
    uv_run(&uvw.loop, UV_RUN_DEFAULT);
    double t1 = bench_now();
    work_sink = uvw.sink;
    BENCH_CHECK(uvw.done == N);
    BENCH_CHECK(uv_loop_close(&uvw.loop) == 0);
    report(out, t0, t1, uvw.peak);
    return 0;
}

/* ---- GLib: GThreadPool + GAsyncQueue ------------------------------------- */

#if CALLER_WITH_GLIB
static int ours_glib(double *out)
{
    return bench_on_glib(ours, out);
}

typedef struct {
    uint64_t arg, result;
} gljob_t;

static void gl_work(gpointer data, gpointer user)
{
    gljob_t *j = data;
    j->result = work(j->arg, work_iters);
    g_async_queue_push(user, j);
}

static int floor_glib(double *out)
{
    GAsyncQueue *done_q = g_async_queue_new();
    GThreadPool *tp = g_thread_pool_new(gl_work, done_q, CONCURRENCY, FALSE, NULL);
    BENCH_CHECK(tp != NULL);
    int peak = 0;
    uintptr_t sink = 0;
    long made = 0, done = 0;
    double t0 = bench_now();
    for (; made < CONCURRENCY; made++) {
        gljob_t *j = malloc(sizeof *j);
        BENCH_CHECK(j);
        j->arg = (uint64_t)made;
        BENCH_CHECK(g_thread_pool_push(tp, j, NULL));
    }
    while (done < N) {
        gljob_t *j = g_async_queue_pop(done_q);
        sink += j->result;
        sample_threads(++done, &peak);
        if (made < N) {
            j->arg = (uint64_t)made++; /* reused for the next */
            BENCH_CHECK(g_thread_pool_push(tp, j, NULL));
        } else {
            free(j);
        }
    }
    double t1 = bench_now();
    work_sink = sink;
    g_thread_pool_free(tp, FALSE, TRUE);
    g_async_queue_unref(done_q);
    report(out, t0, t1, peak);
    return 0;
}
#endif

/* ---- the Go peer --------------------------------------------------------- */

static char go_path[4096];

/* Where the Go program is: $BENCH_GO_W4, else go-w4 beside this program.
 * Returns 0 if it is there and executable. */
static int go_find(void)
{
    const char *env = getenv("BENCH_GO_W4");
    if (env && *env) {
        snprintf(go_path, sizeof go_path, "%s", env);
    } else {
        static const char name[] = "go-w4";
        ssize_t n = readlink("/proc/self/exe", go_path, sizeof go_path - sizeof name);
        if (n <= 0 || (size_t)n >= sizeof go_path - sizeof name)
            return -1;
        go_path[n] = '\0';
        char *slash = strrchr(go_path, '/');
        if (!slash)
            return -1;
        memcpy(slash + 1, name, sizeof name);
    }
    return access(go_path, X_OK);
}

/* Run the Go program in mode @p mode and parse its line into out[0..2]. */
static int go_run(const char *mode, double *out)
{
    int fds[2];
    char iters[32];
    snprintf(iters, sizeof iters, "%ld", work_iters);
    BENCH_CHECK(pipe(fds) == 0);
    pid_t pid = fork();
    BENCH_CHECK(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* the run's time limit kills it too */
        dup2(fds[1], STDOUT_FILENO);
        close(fds[0]);
        close(fds[1]);
        setenv("GOMAXPROCS", "2", 0);
        execl(go_path, go_path, mode, iters, (char *)NULL);
        fprintf(stderr, "bench: exec %s: %s\n", go_path, strerror(errno));
        _exit(127);
    }
    close(fds[1]);
    char line[512];
    size_t got = 0;
    ssize_t n;
    while (got < sizeof line - 1 &&
           ((n = read(fds[0], line + got, sizeof line - 1 - got)) > 0 || (n < 0 && errno == EINTR)))
        got += n > 0 ? (size_t)n : 0;
    line[got] = '\0';
    close(fds[0]);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    BENCH_CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    int threads = 0;
    BENCH_CHECK(sscanf(line, "ns_per_task=%lf peak_rss_mib=%lf threads=%d", &out[0], &out[1],
                       &threads) == 3);
    out[2] = threads;
    return 0;
}

static int go_all(double *out)
{
    return go_run("all", out);
}

static int go_outstanding(double *out)
{
    return go_run("outstanding", out);
}

static const bench_workload_t w4 = {
    "W4",
    "pool",
    "200,000 tasks of ~1 us CPU, at most 10 outstanding, consumed as they complete",
    3,
    {{"per task", "ns"}, {"peak RSS", "MiB"}, {"threads", "peak"}},
    {
        {"to_thread+as_completed_gen", ours},
        {"fixed pool of 10", floor_pthread},
        {"uv_queue_work, 10 threads", floor_libuv},
        {"to_thread, all submitted, max_workers 10", ours_all},
        {"Go, 10 goroutines, all submitted", go_all},
        {"Go, 10 outstanding", go_outstanding},
#if CALLER_WITH_GLIB
        {"to_thread+as_completed_gen, GLib backend", ours_glib},
        {"GThreadPool of 10 + GAsyncQueue", floor_glib},
#else
        {"(built without GLib)", NULL},
        {"(built without GLib)", NULL},
#endif
        {"work alone, a thread per CPU, no queue", work_floor},
    },
    120,
    0,
};

enum { GO_ALL = 4, GO_10 = 5, WORK_FLOOR = 8 }; /* systems in w4.sys */

int main(void)
{
    bench_more_t more = {.key = {[3] = "libcaller-all",
                                 [GO_ALL] = "go-all",
                                 [GO_10] = "go-10",
                                 [6] = "libcaller-glib",
                                 [7] = "glib",
                                 [WORK_FLOOR] = "work-floor"}};
    bench_workload_t w = w4;
    static char why[4200];
    bench_begin();
    if (bench_selected("W4")) {
        calibrate();
        if (go_find() != 0) {
            /* Not a failure: the peer is optional (make bench builds it
             * when Go is installed). */
            snprintf(why, sizeof why, "%s not built (apt-get install golang-go, then make bench)",
                     go_path);
            w.sys[GO_ALL].run = w.sys[GO_10].run = NULL;
            more.skip[GO_ALL] = more.skip[GO_10] = why;
        }
    }
#if !CALLER_WITH_GLIB
    more.skip[6] = more.skip[7] = "built without GLib (CALLER_WITH_GLIB=OFF)";
#endif
    bench_workload_more(&w, &more);
    return bench_end();
}
