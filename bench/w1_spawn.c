/*
 * W1 local spawn (issue 8): inside a running Caller task, call_soon N no-op
 * functions onto the same Caller, then wait for all; ns per task.
 *
 *  libcaller  a MANUAL Caller runs a task that calls
 *             caller_call_soon(caller_current(), noop, NULL) N times
 *             (keeping the Pendings), then caller_pending_wait() on each in
 *             order (which suspends the task while the others run) and
 *             caller_pending_unref().
 *  pthread    one thread, an array of N {function, argument, result}
 *             records: fill it, call each through its function pointer,
 *             read each result.
 *  libuv      in a callback of a libuv loop, push N malloc'd call records
 *             on a mutex-protected queue with uv_async_send each; the
 *             async callback takes the list and runs them; done when the
 *             N-th ran.
 *
 *  libcaller-glib  the same on the GLib backend.
 *  glib       in a callback of a GMainLoop, g_idle_add N call records (one
 *             idle GSource each, GLib's "call this soon"); each runs once;
 *             done when the N-th ran.
 *
 * Metrics: "per task" from the first submission until all ran (and were
 * waited for), divided by N; "submit" the submission loop alone per task.
 */
#include "bench.h"
#include "floors.h"

#include <caller.h>

enum { N = 1000000 };

static void *noop(void *arg)
{
    return arg;
}

/* ---- libcaller ----------------------------------------------------------- */

static void *ours_body(void *arg)
{
    double *out = arg;
    caller_pending_t **p = calloc(N, sizeof *p);
    BENCH_CHECK(p);
    memset(p, 0xff, N * sizeof *p); /* fault the array in before timing */
    caller_t *c = caller_current();
    double t0 = bench_now();
    for (long i = 0; i < N; i++) {
        p[i] = caller_call_soon(c, noop, NULL);
        BENCH_CHECK(p[i] != NULL);
    }
    double t1 = bench_now();
    for (long i = 0; i < N; i++) {
        BENCH_CHECK(caller_pending_wait(p[i], CALLER_FOREVER, CALLER_WAIT_PROTECT, NULL) == 0);
        caller_pending_unref(p[i]);
    }
    double t2 = bench_now();
    out[0] = (t2 - t0) * 1e9 / N;
    out[1] = (t1 - t0) * 1e9 / N;
    free(p);
    return NULL;
}

static int ours(double *out)
{
    caller_t *c = caller_create(CALLER_MANUAL, &(caller_options_t){.name = "bench-w1"});
    BENCH_CHECK(c != NULL);
    BENCH_CHECK(caller_run(c, ours_body, out, NULL) == 0);
    caller_unref(c);
    BENCH_CHECK(bench_drains_to_zero(caller_live_count, 2) &&
                bench_drains_to_zero(caller_pending_live_count, 2));
    return 0;
}

/* ---- pthread: an array of function pointers ----------------------------- */

typedef struct {
    bench_fn_t fn;
    void *arg;
    void *result;
} slot_t;

/* Read through a volatile so the compiler cannot inline the calls away. */
static bench_fn_t volatile noop_ptr = noop;

static int floor_pthread(double *out)
{
    slot_t *s = malloc(N * sizeof *s);
    BENCH_CHECK(s);
    memset(s, 0, N * sizeof *s);
    uintptr_t sink = 0;
    double t0 = bench_now();
    for (long i = 0; i < N; i++) {
        s[i].fn = noop_ptr;
        s[i].arg = (void *)(intptr_t)i;
    }
    double t1 = bench_now();
    for (long i = 0; i < N; i++)
        s[i].result = s[i].fn(s[i].arg);
    for (long i = 0; i < N; i++)
        sink += (uintptr_t)s[i].result;
    double t2 = bench_now();
    BENCH_CHECK(sink == (uintptr_t)N * (N - 1) / 2);
    out[0] = (t2 - t0) * 1e9 / N;
    out[1] = (t1 - t0) * 1e9 / N;
    free(s);
    return 0;
}

/* ---- libuv: uv_async_send + locked queue, same thread ------------------- */

static struct {
    uvq_t q;
    uv_timer_t kick;
    double t0, t1, t2;
} uvw;

static void uv_drained(uvq_t *q)
{
    if (q->ran == N) {
        uvw.t2 = bench_now();
        uv_close((uv_handle_t *)&q->async, NULL);
    }
}

static void uv_kick(uv_timer_t *t)
{
    uvw.t0 = bench_now();
    for (long i = 0; i < N; i++)
        uvq_push(&uvw.q, bench_job_new(noop, NULL, NULL));
    uvw.t1 = bench_now();
    uv_close((uv_handle_t *)t, NULL);
}

static int floor_libuv(double *out)
{
    uvq_init(&uvw.q);
    uvw.q.on_drained = uv_drained;
    BENCH_CHECK(uv_timer_init(&uvw.q.loop, &uvw.kick) == 0);
    BENCH_CHECK(uv_timer_start(&uvw.kick, uv_kick, 0, 0) == 0);
    uv_run(&uvw.q.loop, UV_RUN_DEFAULT);
    BENCH_CHECK(uvw.q.ran == N);
    BENCH_CHECK(uv_loop_close(&uvw.q.loop) == 0);
    out[0] = (uvw.t2 - uvw.t0) * 1e9 / N;
    out[1] = (uvw.t1 - uvw.t0) * 1e9 / N;
    return 0;
}

#if CALLER_WITH_GLIB
static int ours_glib(double *out)
{
    return bench_on_glib(ours, out);
}

static struct {
    GMainContext *ctx;
    GMainLoop *loop;
    long ran;
    double t0, t1, t2;
} glw;

static gboolean gl_job(gpointer data)
{
    bench_job_t *j = data;
    j->result = j->fn(j->arg);
    free(j);
    if (++glw.ran == N) {
        glw.t2 = bench_now();
        g_main_loop_quit(glw.loop);
    }
    return G_SOURCE_REMOVE;
}

static gboolean gl_kick(gpointer data)
{
    (void)data;
    glw.t0 = bench_now();
    for (long i = 0; i < N; i++) {
        GSource *s = g_idle_source_new();
        g_source_set_callback(s, gl_job, bench_job_new(noop, NULL, NULL), NULL);
        g_source_attach(s, glw.ctx);
        g_source_unref(s);
    }
    glw.t1 = bench_now();
    return G_SOURCE_REMOVE;
}

static int floor_glib(double *out)
{
    glw.ctx = g_main_context_new();
    glw.loop = g_main_loop_new(glw.ctx, FALSE);
    GSource *k = g_idle_source_new();
    g_source_set_callback(k, gl_kick, NULL, NULL);
    g_source_attach(k, glw.ctx);
    g_source_unref(k);
    g_main_loop_run(glw.loop);
    BENCH_CHECK(glw.ran == N);
    g_main_loop_unref(glw.loop);
    g_main_context_unref(glw.ctx);
    out[0] = (glw.t2 - glw.t0) * 1e9 / N;
    out[1] = (glw.t1 - glw.t0) * 1e9 / N;
    return 0;
}
#endif

static const bench_workload_t w1 = {
    "W1",
    "local spawn",
    "in a running task, call_soon 1,000,000 no-ops onto the same Caller, then wait for each",
    2,
    {{"per task", "ns"}, {"submit", "ns"}},
    {
        {"call_soon+wait (MANUAL)", ours},
        {"fn-pointer array", floor_pthread},
        {"async+locked queue", floor_libuv},
#if CALLER_WITH_GLIB
        {"call_soon+wait (MANUAL), GLib backend", ours_glib},
        {"g_idle_add each", floor_glib},
#endif
    },
    60,
    0,
};

int main(void)
{
    bench_begin();
    bench_workload_more(&w1, &(bench_more_t){.key = {[3] = "libcaller-glib", [4] = "glib"}});
    return bench_end();
}
