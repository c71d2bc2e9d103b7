/*
 * Tasks, suspension and cancellation. The main thread runs a manual Caller.
 * Its body starts three tasks on it that sleep 30, 10 and 20 ms: each
 * caller_sleep suspends only its task, so all three run in this one thread
 * and wake in the order of their sleeps. Then cancellation: a delayed call
 * cancelled before it starts never runs, and a task cancelled while it
 * sleeps (here on a second Caller, a thread of its own) sees -ECANCELED at
 * that suspension point and returns.
 */
// RUN-IN-TESTS
#include <caller.h>

#include <stdint.h>
#include <stdio.h>

static void *nap(void *arg)
{
    int ms = (int)(intptr_t)arg;
    printf("nap %d ms: starts\n", ms);
    caller_sleep(ms / 1000.0); /* suspends this task; the others run */
    printf("nap %d ms: wakes\n", ms);
    return arg;
}

static void *never(void *arg)
{
    (void)arg;
    printf("never: this line is never printed\n");
    return NULL;
}

static void *long_job(void *arg)
{
    caller_pending_set_result(arg, NULL, 0); /* "I have started" */
    int rc = caller_sleep(60.0);
    printf("long_job: caller_sleep returned %s\n", caller_err_name(rc));
    return NULL;
}

static void *body(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();

    caller_pending_t *naps[3];
    int ms[3] = {30, 10, 20};
    for (int i = 0; i < 3; i++)
        naps[i] = caller_call_soon(self, nap, (void *)(intptr_t)ms[i]);
    for (int i = 0; i < 3; i++) {
        caller_pending_wait(naps[i], 5.0, 0, NULL); /* suspends the body */
        caller_pending_unref(naps[i]);
    }

    /* Cancelled before it starts: it never runs. */
    char why[128];
    caller_pending_t *later = caller_call_later(self, 0.05, never, NULL);
    caller_pending_cancel(later, "changed my mind");
    int rc = caller_pending_wait(later, 5.0, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, NULL);
    caller_pending_exception(later, why, sizeof why);
    printf("never: %s (%s)\n", caller_err_name(rc), why);
    caller_pending_unref(later);

    /* Cancelled while it runs: its suspension point returns -ECANCELED. */
    caller_t *other = caller_get(self, &(caller_options_t){.name = "other"});
    caller_pending_t *started = caller_pending_new(0);
    caller_pending_t *job = caller_call_soon(other, long_job, started);
    caller_pending_wait(started, 5.0, 0, NULL);
    caller_pending_cancel(job, "taking too long");
    rc = caller_pending_wait(job, 5.0, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, NULL);
    caller_pending_exception(job, why, sizeof why);
    printf("long_job: %s (%s)\n", caller_err_name(rc), why);
    caller_pending_unref(job);
    caller_pending_unref(started);
    caller_unref(other);
    return NULL; /* stops this Caller and its child "other" */
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    caller_t *c = caller_create(CALLER_MANUAL, &(caller_options_t){.name = "Shell"});
    int rc = caller_run(c, body, NULL, NULL);
    caller_unref(c);
    return rc == 0 ? 0 : 1;
}
