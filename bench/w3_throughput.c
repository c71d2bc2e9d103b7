/*
 * W3 cross-thread throughput (issue 8): a plain thread schedules N=1,000,000
 * no-ops onto a Caller in another thread without waiting, then waits for the
 * last; ns per call, from the first submission until the last ran.
 *
 *  libcaller  a NEW_THREAD Caller; the main thread calls caller_call_soon()
 *             N times, releasing every Pending but the last, then
 *             caller_pending_wait() on the last.
 *  pthread    a consumer thread on a mutex + condvar FIFO of malloc'd call
 *             records (signalled only when it sleeps; it takes the whole
 *             list each time); the last record carries a waiter (mutex +
 *             condvar) the main thread sleeps on.
 *  libuv      a loop thread; each record is pushed on a mutex-protected
 *             FIFO followed by uv_async_send; the async callback takes the
 *             whole list; the last record carries the waiter.
 *  libcaller-glib  the libcaller program on the GLib backend.
 *  glib       a thread running a GMainLoop; each record is handed over
 *             with g_main_context_invoke(); the last carries the waiter.
 *
 * Metrics: "per call" (first submission to the last call done) / N, and
 * "submit": the submission loop alone, per call.
 */
#include "bench.h"
#include "floors.h"

#include <caller.h>

enum { N = 1000000 };

static void *noop(void *arg)
{
    return arg;
}

static int ours(double *out)
{
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.name = "bench-w3"});
    BENCH_CHECK(c != NULL);
    caller_pending_t *last = NULL;
    double t0 = bench_now();
    for (long i = 0; i < N; i++) {
        caller_pending_t *p = caller_call_soon(c, noop, NULL);
        BENCH_CHECK(p != NULL);
        if (i < N - 1)
            caller_pending_unref(p);
        else
            last = p;
    }
    double t1 = bench_now();
    BENCH_CHECK(caller_pending_wait(last, CALLER_FOREVER, CALLER_WAIT_PROTECT, NULL) == 0);
    double t2 = bench_now();
    caller_pending_unref(last);
    caller_stop(c, 0);
    BENCH_CHECK(caller_wait_stopped(c, CALLER_FOREVER) == 0);
    caller_unref(c);
    BENCH_CHECK(bench_drains_to_zero(caller_live_count, 2) &&
                bench_drains_to_zero(caller_pending_live_count, 2));
    out[0] = (t2 - t0) * 1e9 / N;
    out[1] = (t1 - t0) * 1e9 / N;
    return 0;
}

/* The floors' stream: @p push hands each call record to the floor's
 * thread; the last carries the waiter. */
static void floor_stream(bench_push_fn push, void *q, double *out)
{
    bench_waiter_t w;
    bench_waiter_init(&w);
    bench_job_t *last = NULL;
    double t0 = bench_now();
    for (long i = 0; i < N; i++) {
        bench_job_t *j = bench_job_new(noop, NULL, i == N - 1 ? &w : NULL);
        if (i == N - 1)
            last = j;
        push(q, j);
    }
    double t1 = bench_now();
    bench_waiter_wait(&w);
    double t2 = bench_now();
    free(last);
    bench_waiter_destroy(&w);
    out[0] = (t2 - t0) * 1e9 / N;
    out[1] = (t1 - t0) * 1e9 / N;
}

static int floor_pthread(double *out)
{
    return bench_drive_ptq(floor_stream, out);
}

static int floor_libuv(double *out)
{
    return bench_drive_uvq(floor_stream, out);
}

#if CALLER_WITH_GLIB
static int ours_glib(double *out)
{
    return bench_on_glib(ours, out);
}

static int floor_glib(double *out)
{
    return bench_drive_glq(floor_stream, out);
}
#endif

static const bench_workload_t w3 = {
    "W3",
    "cross-thread throughput",
    "a plain thread call_soon's 1,000,000 no-ops onto a Caller thread, then waits for the last",
    2,
    {{"per call", "ns"}, {"submit", "ns"}},
    {
        {"call_soon (NEW_THREAD)", ours},
        {"mutex+condvar queue", floor_pthread},
        {"async+locked queue", floor_libuv},
#if CALLER_WITH_GLIB
        {"call_soon, GLib backend", ours_glib},
        {"g_main_context_invoke each", floor_glib},
#endif
    },
    60,
    0,
};

int main(void)
{
    bench_begin();
    bench_workload_more(&w3, &(bench_more_t){.key = {[3] = "libcaller-glib", [4] = "glib"}});
    return bench_end();
}
