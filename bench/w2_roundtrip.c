/*
 * W2 round trip (issue 8): a plain thread (no Caller) schedules a no-op onto
 * a Caller in another thread and waits for its result; 100,000 times in
 * sequence (after 1,000 uncounted ones); p50 and p99 of the round trip in
 * µs, and the mean.
 *
 *  libcaller  a NEW_THREAD Caller; the main thread does caller_call_soon(),
 *             caller_pending_wait(p, CALLER_FOREVER, CALLER_WAIT_PROTECT, NULL),
 *             caller_pending_unref().
 *  pthread    a consumer thread on a mutex + condvar queue (signalled only
 *             when it sleeps); the main thread queues a malloc'd call
 *             record and sleeps on its own mutex + condvar until the
 *             consumer ran the call and posted it: a condvar (futex)
 *             ping-pong.
 *  libuv      a loop thread with one uv_async_t; the main thread pushes the
 *             record on a mutex-protected queue, calls uv_async_send, and
 *             waits on a mutex + condvar posted by the async callback.
 *  libcaller-glib  the libcaller program on the GLib backend.
 *  glib       a thread running a GMainLoop; the main thread calls
 *             g_main_context_invoke() with the record (an idle GSource per
 *             call, GLib's way to run a function in another thread's
 *             context) and waits on a mutex + condvar posted by it.
 */
#include "bench.h"
#include "floors.h"

#include <caller.h>

enum { N = 100000, WARM = 1000 };

static void *noop(void *arg)
{
    return arg;
}

static double lat[N];

static void report(double *out)
{
    double sum = 0;
    for (int i = 0; i < N; i++)
        sum += lat[i];
    out[2] = sum / N * 1e6;
    out[0] = bench_quantile(lat, N, 0.50) * 1e6;
    out[1] = bench_quantile(lat, N, 0.99) * 1e6;
}

static int ours(double *out)
{
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.name = "bench-w2"});
    BENCH_CHECK(c != NULL);
    for (int i = -WARM; i < N; i++) {
        double t0 = bench_now();
        caller_pending_t *p = caller_call_soon(c, noop, (void *)1);
        BENCH_CHECK(p != NULL);
        void *v = NULL;
        BENCH_CHECK(caller_pending_wait(p, CALLER_FOREVER, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT,
                                        &v) == 0);
        caller_pending_unref(p);
        double t1 = bench_now();
        BENCH_CHECK(v == (void *)1);
        if (i >= 0)
            lat[i] = t1 - t0;
    }
    caller_stop(c, 0);
    BENCH_CHECK(caller_wait_stopped(c, CALLER_FOREVER) == 0);
    caller_unref(c);
    BENCH_CHECK(bench_drains_to_zero(caller_live_count, 2) &&
                bench_drains_to_zero(caller_pending_live_count, 2));
    report(out);
    return 0;
}

/* The floors' round trips: @p push hands a call record to the floor's
 * thread, which runs it and posts the record's waiter. */
static void floor_roundtrips(bench_push_fn push, void *q, double *out)
{
    bench_waiter_t w;
    bench_waiter_init(&w);
    for (int i = -WARM; i < N; i++) {
        double t0 = bench_now();
        bench_job_t *j = bench_job_new(noop, (void *)1, &w);
        push(q, j);
        bench_waiter_wait(&w);
        void *v = j->result;
        free(j);
        double t1 = bench_now();
        BENCH_CHECK(v == (void *)1);
        if (i >= 0)
            lat[i] = t1 - t0;
    }
    bench_waiter_destroy(&w);
    report(out);
}

static int floor_pthread(double *out)
{
    return bench_drive_ptq(floor_roundtrips, out);
}

static int floor_libuv(double *out)
{
    return bench_drive_uvq(floor_roundtrips, out);
}

#if CALLER_WITH_GLIB
static int ours_glib(double *out)
{
    return bench_on_glib(ours, out);
}

static int floor_glib(double *out)
{
    return bench_drive_glq(floor_roundtrips, out);
}
#endif

static const bench_workload_t w2 = {
    "W2",
    "round trip",
    "a plain thread call_soon's a no-op onto a Caller thread and waits; 100,000 in sequence",
    3,
    {{"p50", "us"}, {"p99", "us"}, {"mean", "us"}},
    {
        {"call_soon+wait (NEW_THREAD)", ours},
        {"condvar ping-pong", floor_pthread},
        {"async+queue, condvar wait", floor_libuv},
#if CALLER_WITH_GLIB
        {"call_soon+wait, GLib backend", ours_glib},
        {"g_main_context_invoke, condvar wait", floor_glib},
#endif
    },
    60,
    1, /* each run starts with 1,000 uncounted round trips instead */
};

int main(void)
{
    bench_begin();
    bench_workload_more(&w2, &(bench_more_t){.key = {[3] = "libcaller-glib", [4] = "glib"}});
    return bench_end();
}
