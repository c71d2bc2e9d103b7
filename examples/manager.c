/*
 * A PendingManager: a tracker you switch on and off by hand. While it is
 * started in a context (a plain thread's, or a task's), it tracks every
 * Pending made there, including those made by the calls scheduled from
 * there, on any thread. Unlike a PendingGroup it is not tied to one block
 * of one task: here the main thread, a plain thread, opens a "session",
 * starts work on a Caller and in its worker pool, and at the session's end
 * cancels what still runs and waits until it has finished.
 */
// RUN-IN-TESTS
#include <caller.h>

#include <stdio.h>

static void *quick(void *arg)
{
    caller_sleep(0.01);
    return arg;
}

static void *slow(void *arg)
{
    int rc = caller_sleep(10.0);
    printf("  slow call %s: %s\n", (const char *)arg, caller_err_name(rc));
    return NULL;
}

/* A task that starts another call: that one is the session's too. */
static void *spawner(void *arg)
{
    (void)arg;
    caller_pending_unref(caller_to_thread(caller_current(), slow, "started by a task"));
    return NULL;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.name = "jobs"});
    caller_manager_t *m = caller_manager_new();
    if (!c || !m || caller_manager_activate(m) < 0)
        return 1;

    caller_manager_token_t token;
    caller_manager_start(m, &token); /* from here, this thread's new Pendings are tracked */
    caller_pending_t *a = caller_call_soon(c, quick, NULL);
    caller_pending_t *b = caller_to_thread(c, slow, "in a worker");
    caller_pending_t *d = caller_call_soon(c, spawner, NULL);
    caller_manager_stop(m, &token);
    caller_pending_t *outside = caller_call_soon(c, quick, NULL); /* not tracked */

    caller_pending_wait(a, 5.0, 0, NULL);
    caller_pending_wait(d, 5.0, 0, NULL);
    caller_pending_wait(outside, 5.0, 0, NULL);
    size_t running = caller_manager_pending(m, NULL, 0);
    printf("session: %zu calls still running\n", running); /* b and the one d started */

    /* Cancel what is tracked: 1 if some are still finishing, 0 if none is
     * left. Then wait until none is. */
    int finishing = caller_manager_deactivate(m, CALLER_MANAGER_CANCEL_PENDING);
    int rc = caller_manager_wait(m, 5.0);
    printf("session over: cancelled, wait %s; the untracked call %s\n", caller_err_name(rc),
           caller_pending_cancelled(outside) ? "was cancelled" : "was not");

    int ok = running == 2 && finishing >= 0 && rc == 0 && caller_pending_cancelled(b) == 1 &&
             caller_pending_cancelled(outside) == 0 && caller_manager_pending(m, NULL, 0) == 0;
    caller_pending_unref(a);
    caller_pending_unref(b);
    caller_pending_unref(d);
    caller_pending_unref(outside);
    caller_manager_unref(m);
    caller_stop(c, 0);
    caller_wait_stopped(c, 5.0);
    caller_unref(c);
    return ok ? 0 : 1;
}
