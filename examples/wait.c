/*
 * caller_wait: wait for several Pendings at once, from a plain thread
 * (which it blocks; in a task it would suspend the task). Three calls run
 * in the worker pool: two short ones and one that runs until cancelled.
 *
 * - CALLER_FIRST_COMPLETED returns as soon as one is done;
 * - CALLER_ALL_COMPLETED returns when all are;
 * - with a timeout, it returns when the time is up: that is not an error,
 *   the unfinished ones are in not_done, and nothing is cancelled.
 */
// RUN-IN-TESTS
#include <caller.h>

#include <stdint.h>
#include <stdio.h>

static void *nap(void *arg) /* in a worker: sleeps arg ms */
{
    if (caller_sleep((double)(intptr_t)arg / 1000) < 0)
        return NULL; /* cancelled */
    return arg;
}

static const char *name_of(caller_pending_t *p, caller_pending_t *const *items)
{
    static const char *names[] = {"20 ms", "40 ms", "forever"};
    for (int i = 0; i < 3; i++)
        if (items[i] == p)
            return names[i];
    return "?";
}

int main(void)
{
    caller_t *c = caller_create(CALLER_NEW_THREAD, NULL);
    if (!c)
        return 1;
    caller_pending_t *items[3] = {
        caller_to_thread(c, nap, (void *)20),
        caller_to_thread(c, nap, (void *)40),
        caller_to_thread(c, nap, (void *)3600000),
    };
    caller_pending_t *done[3], *not_done[3];
    size_t nd, nn;
    int ok = 1;

    caller_wait(items, 3, CALLER_FOREVER, CALLER_FIRST_COMPLETED, done, &nd, not_done, &nn);
    printf("FIRST_COMPLETED: %zu done (%s), %zu not done\n", nd, name_of(done[0], items), nn);
    ok &= nd >= 1 && nd + nn == 3;

    caller_wait(items, 2, CALLER_FOREVER, CALLER_ALL_COMPLETED, done, &nd, not_done, &nn);
    printf("ALL_COMPLETED of the first two: %zu done, %zu not done\n", nd, nn);
    ok &= nd == 2 && nn == 0;

    int rc = caller_wait(items, 3, 0.1, CALLER_ALL_COMPLETED, done, &nd, not_done, &nn);
    printf("ALL_COMPLETED within 0.1 s: %s, %zu done, not done: %s (cancelled: %s)\n",
           caller_err_name(rc), nd, name_of(not_done[0], items),
           caller_pending_cancelled(not_done[0]) ? "yes" : "no");
    ok &= rc == 0 && nd == 2 && nn == 1 && not_done[0] == items[2] &&
          !caller_pending_cancelled(items[2]);

    caller_pending_cancel(items[2], "no longer needed"); /* ours to end */
    caller_pending_wait(items[2], 5.0, CALLER_WAIT_PROTECT, NULL);
    for (int i = 0; i < 3; i++)
        caller_pending_unref(items[i]);
    caller_stop(c, 0);
    caller_wait_stopped(c, 5.0);
    caller_unref(c);
    return ok ? 0 : 1;
}
