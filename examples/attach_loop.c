/*
 * An application that already runs a libuv loop attaches a Caller to it:
 * caller_create(CALLER_CURRENT_THREAD) with options.loop. The application
 * keeps calling uv_run; the Caller's tasks run inside it, between the
 * application's own callbacks, on the same thread.
 *
 * Here the application's own handle is a timer that ticks every 10 ms. A
 * task sends a sum to a worker thread (caller_to_thread) and waits for it,
 * then waits for a Pending that the timer's callback completes at its
 * third tick: while the task waits, the loop keeps running the timer. At
 * the end the task stops the Caller and the timer closes, and uv_run
 * returns.
 */
// RUN-IN-TESTS
// LIBUV-ONLY
#include <caller.h>
#include <uv.h>

#include <stdint.h>
#include <stdio.h>

static caller_pending_t *three_ticks; /* completed by the timer's callback */
static int ticks;

/* The application's own libuv callback: on the loop's thread, not in a
 * task, so it must not wait; completing a Pending is fine. */
static void on_tick(uv_timer_t *timer)
{
    if (++ticks == 3) {
        caller_pending_set_result(three_ticks, (void *)(intptr_t)ticks, 0);
        uv_close((uv_handle_t *)timer, NULL);
    }
}

static void *sum_to(void *arg) /* in a worker thread */
{
    intptr_t n = (intptr_t)arg, sum = 0;
    for (intptr_t i = 1; i <= n; i++)
        sum += i;
    return (void *)sum;
}

static void *main_task(void *arg) /* a task on the application's loop */
{
    (void)arg;
    void *sum = NULL, *seen = NULL;
    caller_pending_t *p = caller_to_thread(caller_current(), sum_to, (void *)1000);
    int rc1 =
        caller_pending_wait(p, 5.0, CALLER_WAIT_RESULT, &sum); /* suspends; the loop runs on */
    int rc2 = caller_pending_wait(three_ticks, 5.0, CALLER_WAIT_RESULT, &seen);
    caller_pending_unref(p);
    printf("worker's sum: %ld; the application's timer ticked %ld times while the task waited\n",
           (long)(intptr_t)sum, (long)(intptr_t)seen);
    caller_stop(caller_current(), 0); /* uv_run returns once it stopped */
    return (void *)(intptr_t)(rc1 == 0 && rc2 == 0 && (intptr_t)sum == 500500);
}

int main(void)
{
    uv_loop_t loop;
    uv_timer_t timer;
    uv_loop_init(&loop);
    uv_timer_init(&loop, &timer);
    uv_timer_start(&timer, on_tick, 10, 10);

    caller_t *app =
        caller_create(CALLER_CURRENT_THREAD, &(caller_options_t){.loop = &loop, .name = "app"});
    three_ticks = caller_pending_new(0);
    if (!app || !three_ticks) {
        const char *msg;
        caller_last_error(&msg);
        fprintf(stderr, "error: %s\n", msg);
        return 1;
    }
    caller_pending_t *task = caller_call_soon(app, main_task, NULL);

    uv_run(&loop, UV_RUN_DEFAULT); /* the application's loop, as before */

    void *ok = NULL;
    int rc = caller_pending_result(task, &ok);
    printf("uv_run returned; the Caller is %s\n",
           caller_state(app) == CALLER_STATE_STOPPED ? "stopped" : "still running");
    caller_pending_unref(task);
    caller_pending_unref(three_ticks);
    int closed = uv_loop_close(&loop);
    caller_unref(app);
    return rc == 0 && ok && closed == 0 ? 0 : 1;
}
