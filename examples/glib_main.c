/*
 * A GLib program with libcaller: the main thread runs a GMainLoop, as a
 * GTK or GIO program does; a Caller attached to that loop's context runs
 * the seed's example shape in a task (caller_as_completed_gen over
 * caller_to_thread calls that each take a few milliseconds of CPU in pool
 * workers), while a g_timeout_add() timer ticks on the same loop every
 * 5 ms. The loop never stalls: the task suspends at every wait, so the
 * timer keeps ticking between results. At the end the program prints the
 * largest gap between two ticks, and fails if the loop's own part of a gap
 * was more than 20 ms: a gap minus the time the main thread spent ready
 * but waiting for a CPU (the kernel's schedstat), which is the machine's
 * doing (another process, or a parallel test run), not the loop's; and
 * once the pool's ten workers run (their start-up, a thread each started
 * from the loop's thread, is printed apart).
 *
 *   example-glib_main [--jobs N]   (default 2000 jobs)
 *
 * No display is needed: GLib's main loop is the one GTK uses, without
 * the windows.
 */
// RUN-IN-TESTS
// NEEDS-GLIB
#include <caller.h>
#include <glib.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    caller_t *caller;
    long next, jobs, done;
    GMainLoop *loop;
    gint64 last_tick, max_gap, ticks;
    gint64 last_wait, max_own;    /* run-queue wait (us) at the last tick; largest gap without it */
    gint64 last_run, max_own_run; /* run time (us) at the last tick; how much of max_own ran */
    gint64 startup_own;           /* max_own while the pool's workers started */
} app_t;

/* Microseconds this thread has spent ready to run but not running, or -1
 * if the kernel does not say (/proc/thread-self/schedstat: run time, wait
 * time, slices); *run_us gets the time it ran (-1 likewise). */
static gint64 runqueue_wait_us(gint64 *run_us)
{
    FILE *f = fopen("/proc/thread-self/schedstat", "r");
    unsigned long long run = 0, wait = 0;
    int got = f ? fscanf(f, "%llu %llu", &run, &wait) : 0;
    if (f)
        fclose(f);
    *run_us = got == 2 ? (gint64)(run / 1000) : -1;
    return got == 2 ? (gint64)(wait / 1000) : -1;
}

/* In a pool worker: 0.1 ms of CPU, then a 2 ms sleep (ten of them use
 * half a core of the two this is sized for). */
static void *crunch(void *arg)
{
    gint64 until = g_get_monotonic_time() + 100;
    uint64_t x = (uint64_t)(uintptr_t)arg;
    while (g_get_monotonic_time() < until)
        x = x * 6364136223846793005u + 1442695040888963407u;
    caller_sleep(0.002);
    return (void *)(uintptr_t)(x | 1);
}

static caller_pending_t *next_job(void *arg)
{
    app_t *a = arg;
    if (a->next >= a->jobs)
        return NULL;
    return caller_to_thread(a->caller, crunch, (void *)(intptr_t)++a->next);
}

static void *nap(void *arg)
{
    caller_sleep(0.002);
    return arg;
}

/* A task on the main loop: consume the results as they complete. */
static void *consume(void *arg)
{
    app_t *a = arg;
    a->caller = caller_current();
    /* Start the pool's ten workers first. A worker is a thread with a
     * Caller of its own, started by the loop's thread, which waits until
     * it runs: about 0.1 ms each here, ~2 ms under ThreadSanitizer. That
     * start-up is measured apart; the limit is for the loop once the pool
     * is running. */
    caller_pending_t *warm[10];
    for (int i = 0; i < 10; i++)
        warm[i] = caller_to_thread(a->caller, nap, NULL);
    caller_pending_t *done[10], *not_done[10];
    size_t nd = 10, nn = 10;
    caller_wait(warm, 10, CALLER_FOREVER, CALLER_ALL_COMPLETED, done, &nd, not_done, &nn);
    for (int i = 0; i < 10; i++)
        caller_pending_unref(warm[i]);
    a->startup_own = a->max_own;
    a->max_gap = a->max_own = a->max_own_run = 0;
    a->last_tick = g_get_monotonic_time();
    a->last_wait = runqueue_wait_us(&a->last_run);

    caller_as_completed_options_t o = {.max_concurrent = 10};
    caller_iter_t *it = caller_as_completed_gen(next_job, a, &o);
    caller_pending_t *p;
    while (caller_iter_next(it, &p) == 0) {
        if (caller_pending_result(p, NULL) == 0)
            a->done++;
        caller_pending_unref(p);
    }
    caller_iter_close(it);
    g_main_loop_quit(a->loop); /* the application's own loop: its call */
    return NULL;
}

static gboolean tick(gpointer data)
{
    app_t *a = data;
    gint64 run, now = g_get_monotonic_time(), wait = runqueue_wait_us(&run);
    gint64 gap = now - a->last_tick;
    gint64 own = wait >= 0 && a->last_wait >= 0 ? gap - (wait - a->last_wait) : gap;
    if (gap > a->max_gap)
        a->max_gap = gap;
    if (own > a->max_own) {
        a->max_own = own;
        a->max_own_run = run >= 0 && a->last_run >= 0 ? run - a->last_run : -1;
    }
    a->last_tick = now;
    a->last_wait = wait;
    a->last_run = run;
    a->ticks++;
    return G_SOURCE_CONTINUE;
}

int main(int argc, char **argv)
{
    app_t a = {.jobs = 2000};
    for (int i = 1; i + 1 < argc; i += 2)
        if (strcmp(argv[i], "--jobs") == 0)
            a.jobs = atol(argv[i + 1]);

    GMainContext *ctx = g_main_context_default();
    a.loop = g_main_loop_new(ctx, FALSE);
    caller_options_t o = {.name = "MainThread", .glib_context = ctx};
    caller_t *c = caller_create(CALLER_CURRENT_THREAD, &o);
    if (!c) {
        const char *msg;
        caller_last_error(&msg);
        fprintf(stderr, "caller_create: %s\n", msg);
        return 1;
    }
    caller_pending_t *work = caller_call_soon(c, consume, &a);
    g_timeout_add(5, tick, &a);
    a.last_tick = g_get_monotonic_time();
    a.last_wait = runqueue_wait_us(&a.last_run);
    gint64 t0 = a.last_tick;
    g_main_loop_run(a.loop);
    double secs = (double)(g_get_monotonic_time() - t0) / 1e6;

    /* Stop the Caller; its last steps run on the loop, so keep iterating
     * the context until it has stopped. */
    caller_stop(c, 0);
    while (caller_state(c) != CALLER_STATE_STOPPED)
        g_main_context_iteration(ctx, TRUE);
    int rc = caller_pending_result(work, NULL);
    caller_pending_unref(work);
    caller_unref(c);
    g_main_loop_unref(a.loop);

    printf("%ld of %ld jobs done in %.2f s on %s; the main loop ticked %" G_GINT64_FORMAT
           " times, largest gap %.1f ms, %.1f ms without waiting for a CPU (running %.1f ms of "
           "it; while the pool's workers started: %.1f ms)\n",
           a.done, a.jobs, secs, "glib", a.ticks, (double)a.max_gap / 1000.0,
           (double)a.max_own / 1000.0, (double)a.max_own_run / 1000.0,
           (double)a.startup_own / 1000.0);
    if (rc != 0 || a.done != a.jobs) {
        fprintf(stderr, "FAIL: the work did not finish (%d)\n", rc);
        return 1;
    }
    if (a.max_own > 20000) {
        /* Not running and not waiting for a CPU: blocked (a lock, a page
         * fault from disk, a sleep). */
        fprintf(stderr,
                "FAIL: the main loop stalled %.1f ms (limit 20 ms): it ran %.1f ms of it and "
                "was blocked the rest\n",
                (double)a.max_own / 1000.0, (double)a.max_own_run / 1000.0);
        return 1;
    }
    return 0;
}
