/*
 * W5 timers (issue 8): schedule N=100,000 no-ops with delays spread
 * uniformly over 0-100 ms (the same pseudo-random delays for every run and
 * system) onto one timer thread, from a plain thread; each records when it
 * ran. Lateness = run time - submission time - delay. Reported: p50, p99
 * and max lateness (µs), how many ran early (lateness < 0: a broken
 * promise, should be 0), and the CPU seconds (user + system, getrusage) of
 * the whole run: setup, submission, waiting, teardown.
 *
 *  libcaller  caller_call_later(c, delay, fn, rec) onto one NEW_THREAD
 *             Caller, each Pending released at once; the N-th task to run
 *             sets a Pending the main thread waits on.
 *  pthread    a timer thread with a binary min-heap of deadlines under a
 *             mutex, sleeping in pthread_cond_timedwait (CLOCK_MONOTONIC)
 *             until the earliest; a submission that becomes the earliest
 *             signals it.
 *  libuv      a loop thread fed by the async + locked queue; each queued
 *             record starts its own uv_timer_t (ms resolution; the timeout
 *             is rounded up against uv_now(), so it is never early); the
 *             timer callback records the time and closes the handle.
 *  libcaller-glib  the libcaller program on the GLib backend.
 *  glib       a thread running a GMainLoop; each record is handed over
 *             with g_main_context_invoke(), which starts a
 *             g_timeout_source_new() of its own (ms resolution; rounded up
 *             against g_get_monotonic_time(), so never early); its callback
 *             records the time.
 */
#include "bench.h"
#include "floors.h"

#include <caller.h>
#include <stdatomic.h>

enum { N = 100000 };

typedef struct {
    double submit, delay, run;
} rec_t;

static rec_t rec[N];
static double delays[N];
static atomic_long ran;

/* The delays: xorshift64*, fixed seed, uniform in [0, 0.1) s. */
static void make_delays(void)
{
    uint64_t x = 0x9e3779b97f4a7c15ull;
    for (int i = 0; i < N; i++) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        uint64_t r = x * 0x2545f4914f6cdd1dull;
        delays[i] = (double)(r >> 11) / 9007199254740992.0 * 0.1;
    }
}

static void report(double *out, double cpu0)
{
    static double late[N];
    long early = 0;
    double max = -1e9;
    for (int i = 0; i < N; i++) {
        late[i] = rec[i].run - rec[i].submit - rec[i].delay;
        if (late[i] < 0)
            early++;
        if (late[i] > max)
            max = late[i];
    }
    out[0] = bench_quantile(late, N, 0.50) * 1e6;
    out[1] = bench_quantile(late, N, 0.99) * 1e6;
    out[2] = max * 1e6;
    out[3] = (double)early;
    out[4] = bench_cpu_seconds() - cpu0;
}

/* ---- libcaller ----------------------------------------------------------- */

static caller_pending_t *all_ran;

static void *on_time(void *arg)
{
    rec_t *r = arg;
    r->run = bench_now();
    if (atomic_fetch_add(&ran, 1) + 1 == N)
        BENCH_CHECK(caller_pending_set_result(all_ran, NULL, 0) == 0);
    return NULL;
}

static int ours(double *out)
{
    double cpu0 = bench_cpu_seconds();
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.name = "bench-w5"});
    BENCH_CHECK(c != NULL);
    all_ran = caller_pending_new(CALLER_PENDING_UNTRACKED);
    BENCH_CHECK(all_ran != NULL);
    for (int i = 0; i < N; i++) {
        rec[i].delay = delays[i];
        rec[i].submit = bench_now();
        caller_pending_t *p = caller_call_later(c, delays[i], on_time, &rec[i]);
        BENCH_CHECK(p != NULL);
        caller_pending_unref(p);
    }
    BENCH_CHECK(caller_pending_wait(all_ran, CALLER_FOREVER, CALLER_WAIT_PROTECT, NULL) == 0);
    caller_pending_unref(all_ran);
    caller_stop(c, 0);
    BENCH_CHECK(caller_wait_stopped(c, CALLER_FOREVER) == 0);
    caller_unref(c);
    BENCH_CHECK(bench_drains_to_zero(caller_live_count, 2) &&
                bench_drains_to_zero(caller_pending_live_count, 2));
    report(out, cpu0);
    return 0;
}

/* ---- pthread: binary heap + condvar timer thread -------------------------- */

static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    rec_t **heap; /* min-heap on submit + delay */
    size_t n;
    bool stopping;
    bench_waiter_t all;
} tt;

static inline double deadline(const rec_t *r)
{
    return r->submit + r->delay;
}

static void heap_push(rec_t *r)
{
    size_t i = tt.n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (deadline(tt.heap[parent]) <= deadline(r))
            break;
        tt.heap[i] = tt.heap[parent];
        i = parent;
    }
    tt.heap[i] = r;
}

static rec_t *heap_pop(void)
{
    rec_t *top = tt.heap[0], *last = tt.heap[--tt.n];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= tt.n)
            break;
        if (child + 1 < tt.n && deadline(tt.heap[child + 1]) < deadline(tt.heap[child]))
            child++;
        if (deadline(last) <= deadline(tt.heap[child]))
            break;
        tt.heap[i] = tt.heap[child];
        i = child;
    }
    if (tt.n)
        tt.heap[i] = last;
    return top;
}

static void *timer_thread(void *arg)
{
    (void)arg;
    pthread_mutex_lock(&tt.lock);
    for (;;) {
        if (tt.n == 0) {
            if (tt.stopping)
                break;
            pthread_cond_wait(&tt.cond, &tt.lock);
            continue;
        }
        double due = deadline(tt.heap[0]);
        if (due > bench_now()) {
            struct timespec ts = {(time_t)due, (long)((due - (double)(time_t)due) * 1e9) + 1};
            if (ts.tv_nsec >= 1000000000) {
                ts.tv_sec++;
                ts.tv_nsec -= 1000000000;
            }
            pthread_cond_timedwait(&tt.cond, &tt.lock, &ts);
            continue;
        }
        rec_t *r = heap_pop();
        pthread_mutex_unlock(&tt.lock);
        r->run = bench_now();
        if (atomic_fetch_add(&ran, 1) + 1 == N)
            bench_waiter_post(&tt.all);
        pthread_mutex_lock(&tt.lock);
    }
    pthread_mutex_unlock(&tt.lock);
    return NULL;
}

static int floor_pthread(double *out)
{
    double cpu0 = bench_cpu_seconds();
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&tt.cond, &ca);
    pthread_condattr_destroy(&ca);
    pthread_mutex_init(&tt.lock, NULL);
    bench_waiter_init(&tt.all);
    tt.heap = malloc(N * sizeof *tt.heap);
    BENCH_CHECK(tt.heap);
    pthread_t th;
    BENCH_CHECK(pthread_create(&th, NULL, timer_thread, NULL) == 0);
    for (int i = 0; i < N; i++) {
        rec_t *r = &rec[i];
        r->delay = delays[i];
        r->submit = bench_now();
        pthread_mutex_lock(&tt.lock);
        heap_push(r);
        if (tt.heap[0] == r)
            pthread_cond_signal(&tt.cond);
        pthread_mutex_unlock(&tt.lock);
    }
    bench_waiter_wait(&tt.all);
    pthread_mutex_lock(&tt.lock);
    tt.stopping = true;
    pthread_cond_signal(&tt.cond);
    pthread_mutex_unlock(&tt.lock);
    pthread_join(th, NULL);
    free(tt.heap);
    report(out, cpu0);
    return 0;
}

/* ---- libuv: one uv_timer_t per call -------------------------------------- */

static struct {
    uvq_t q;
    uv_timer_t *timers;
    bench_waiter_t all;
} ut;

static void uv_fire(uv_timer_t *t)
{
    rec_t *r = t->data;
    r->run = bench_now();
    uv_close((uv_handle_t *)t, NULL);
    if (atomic_fetch_add(&ran, 1) + 1 == N)
        bench_waiter_post(&ut.all);
}

/* Runs in the loop thread: start the record's timer. */
static void *uv_arm(void *arg)
{
    rec_t *r = arg;
    uv_timer_t *t = &ut.timers[r - rec];
    uv_update_time(&ut.q.loop);
    double ms = ceil(deadline(r) * 1e3 - (double)uv_now(&ut.q.loop));
    BENCH_CHECK(uv_timer_init(&ut.q.loop, t) == 0);
    t->data = r;
    BENCH_CHECK(uv_timer_start(t, uv_fire, ms > 0 ? (uint64_t)ms : 0, 0) == 0);
    return NULL;
}

static int floor_libuv(double *out)
{
    double cpu0 = bench_cpu_seconds();
    ut.timers = calloc(N, sizeof *ut.timers);
    BENCH_CHECK(ut.timers);
    bench_waiter_init(&ut.all);
    uvq_init(&ut.q);
    uvq_start_thread(&ut.q);
    for (int i = 0; i < N; i++) {
        rec_t *r = &rec[i];
        r->delay = delays[i];
        r->submit = bench_now();
        uvq_push(&ut.q, bench_job_new(uv_arm, r, NULL));
    }
    bench_waiter_wait(&ut.all);
    uvq_stop_thread(&ut.q);
    free(ut.timers);
    report(out, cpu0);
    return 0;
}

#if CALLER_WITH_GLIB
static int ours_glib(double *out)
{
    return bench_on_glib(ours, out);
}

static struct {
    glq_t q;
    bench_waiter_t all;
} gt;

static gboolean gl_fire(gpointer data)
{
    rec_t *r = data;
    r->run = bench_now();
    if (atomic_fetch_add(&ran, 1) + 1 == N)
        bench_waiter_post(&gt.all);
    return G_SOURCE_REMOVE;
}

/* Runs in the loop thread: start the record's timeout. */
static void *gl_arm(void *arg)
{
    rec_t *r = arg;
    double ms = ceil((deadline(r) - bench_now()) * 1e3);
    GSource *t = g_timeout_source_new(ms > 0 ? (guint)ms : 0);
    g_source_set_callback(t, gl_fire, r, NULL);
    g_source_attach(t, gt.q.ctx);
    g_source_unref(t);
    return NULL;
}

static int floor_glib(double *out)
{
    double cpu0 = bench_cpu_seconds();
    bench_waiter_init(&gt.all);
    glq_start(&gt.q);
    for (int i = 0; i < N; i++) {
        rec_t *r = &rec[i];
        r->delay = delays[i];
        r->submit = bench_now();
        glq_push(&gt.q, bench_job_new(gl_arm, r, NULL));
    }
    bench_waiter_wait(&gt.all);
    glq_stop(&gt.q);
    report(out, cpu0);
    return 0;
}
#endif

static const bench_workload_t w5 = {
    "W5",
    "timers",
    "100,000 call_later no-ops, delays uniform over 0-100 ms, onto one thread",
    5,
    {{"p50 late", "us"}, {"p99 late", "us"}, {"max late", "us"}, {"early", "count"}, {"CPU", "s"}},
    {
        {"call_later (NEW_THREAD)", ours},
        {"heap+condvar thread", floor_pthread},
        {"uv_timer each", floor_libuv},
#if CALLER_WITH_GLIB
        {"call_later, GLib backend", ours_glib},
        {"g_timeout_source each", floor_glib},
#endif
    },
    60,
    0,
};

int main(void)
{
    bench_begin();
    make_delays();
    bench_workload_more(&w5, &(bench_more_t){.key = {[3] = "libcaller-glib", [4] = "glib"}});
    return bench_end();
}
