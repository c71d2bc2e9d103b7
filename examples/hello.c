/* The README's example. */
// RUN-IN-TESTS
#include <caller.h>
#include <stdint.h>
#include <stdio.h>

static void *add_one(void *arg) /* runs in the worker's thread */
{
    return (void *)((uintptr_t)arg + 1);
}

static void *body(void *arg) /* a task on the main thread */
{
    (void)arg;
    caller_t *worker = caller_get(caller_current(), NULL); /* new thread */
    caller_pending_t *p = caller_call_soon(worker, add_one, (void *)41);
    void *v;
    caller_pending_wait(p, 5.0, CALLER_WAIT_RESULT, &v); /* suspends this task only */
    printf("%lu\n", (unsigned long)(uintptr_t)v);        /* 42 */
    caller_pending_unref(p);
    caller_unref(worker);
    return NULL; /* stops the Caller and its children */
}

int main(void)
{
    caller_t *c = caller_create(CALLER_MANUAL, NULL);
    int rc = caller_run(c, body, NULL, NULL);
    caller_unref(c);
    return rc;
}
