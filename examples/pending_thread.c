/*
 * The smallest use of a Pending: a thread computes a value and completes the
 * Pending; the main thread blocks until it is done and reads the result. A
 * done callback runs in the completing thread, before the waiter wakes.
 */
// RUN-IN-TESTS
#include <caller.h>

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>

static void *compute(void *arg)
{
    caller_pending_t *p = arg;
    uintptr_t sum = 0;
    for (uintptr_t i = 1; i <= 1000; i++)
        sum += i;
    caller_pending_set_result(p, (void *)sum, 0);
    caller_pending_unref(p); /* the thread's reference */
    return NULL;
}

static void announce(caller_pending_t *p, void *arg)
{
    (void)arg;
    char text[128];
    caller_pending_repr(p, text, sizeof text);
    printf("done callback: %s\n", text);
}

int main(void)
{
    caller_pending_t *p = caller_pending_new(0);
    if (!p || caller_pending_add_done_callback(p, announce, NULL) < 0) {
        const char *msg;
        caller_last_error(&msg);
        fprintf(stderr, "error: %s\n", msg);
        return 1;
    }
    pthread_t t;
    pthread_create(&t, NULL, compute, caller_pending_ref(p));

    void *value;
    int rc = caller_pending_wait(p, 5.0, CALLER_WAIT_RESULT, &value);
    if (rc < 0) {
        const char *msg;
        caller_last_error(&msg);
        fprintf(stderr, "wait failed: %s (%s)\n", caller_err_name(rc), msg);
        return 1;
    }
    printf("result from another thread: %lu\n", (unsigned long)(uintptr_t)value);
    pthread_join(t, NULL);
    caller_pending_unref(p);
    return (uintptr_t)value == 500500 ? 0 : 1;
}
