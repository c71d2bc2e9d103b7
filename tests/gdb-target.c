/*
 * The program tests/gdb-test.sh debugs with the gdb script
 * (scripts/caller-gdb.py). It stops in gdb_target_ready() with:
 *
 *  - Caller "GdbTarget" (a thread of its own): tasks "alpha_task" and
 *    "beta_task" suspended on one Pending, each two frames deep in
 *    functions named after it (alpha_waits_on_gate, beta_waits_on_gate),
 *    and "gamma_task", a call_later for a minute from now (queued, never
 *    started);
 *  - Caller "GdbCopy" (CALLER_STACK_COPY): "delta_task" and "epsilon_task"
 *    suspended on the same Pending, so that one of them has its stack on
 *    the run stack and the other only in its save buffer.
 *
 * Then it releases the tasks, checks their results, stops both Callers and
 * exits 0, so the test can also see that the script left the threads'
 * registers as it found them (the program runs on to a normal exit).
 */
#include <caller.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static caller_pending_t *gate;
/* The tasks' Pendings, global so that the test can name them in gdb
 * (caller-bt beta_pending: a task by its Pending's address). */
caller_pending_t *alpha_pending, *beta_pending, *gamma_pending, *delta_pending, *epsilon_pending;

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "gdb-target: %s:%d: %s\n", __FILE__, __LINE__, #cond);                 \
            exit(1);                                                                               \
        }                                                                                          \
    } while (0)

/* Each waits in a frame of its own below the task function, so that the
 * backtrace has two distinctive names in it. noinline and the volatile
 * keep those frames at any optimisation level; the bodies differ (the
 * constants), or identical code folding would merge them into one. */
__attribute__((noinline)) static int alpha_waits_on_gate(int depth)
{
    volatile int keep = depth + 1;
    int rc = caller_pending_wait(gate, CALLER_FOREVER, 0, NULL);
    return rc + keep - depth - 1;
}

__attribute__((noinline)) static int beta_waits_on_gate(int depth)
{
    volatile int keep = depth + 2;
    int rc = caller_pending_wait(gate, CALLER_FOREVER, 0, NULL);
    return rc + keep - depth - 2;
}

__attribute__((noinline)) static int delta_waits_copied(int depth)
{
    volatile char on_stack[256] = {1};
    int rc = caller_pending_wait(gate, CALLER_FOREVER, 0, NULL);
    return rc + on_stack[0] - depth;
}

__attribute__((noinline)) static int epsilon_waits_copied(int depth)
{
    volatile char on_stack[512] = {2};
    int rc = caller_pending_wait(gate, CALLER_FOREVER, 0, NULL);
    return rc + on_stack[0] - depth - 1;
}

static void *alpha_task(void *arg)
{
    (void)arg;
    return (void *)(intptr_t)(alpha_waits_on_gate(1) == 0 ? 11 : -1);
}

static void *beta_task(void *arg)
{
    (void)arg;
    return (void *)(intptr_t)(beta_waits_on_gate(1) == 0 ? 12 : -1);
}

static void *gamma_task(void *arg)
{
    (void)arg;
    return NULL;
}

static void *delta_task(void *arg)
{
    (void)arg;
    return (void *)(intptr_t)(delta_waits_copied(1) == 0 ? 13 : -1);
}

static void *epsilon_task(void *arg)
{
    (void)arg;
    return (void *)(intptr_t)(epsilon_waits_copied(1) == 0 ? 14 : -1);
}

/* gdb-test.sh breaks here; nothing to do otherwise. */
__attribute__((noinline)) void gdb_target_ready(void)
{
    __asm__ volatile("" ::: "memory");
}

/* Until @p c has @p n suspended tasks (10 s at most). */
static void wait_suspended(caller_t *c, size_t n)
{
    for (int i = 0; i < 10000; i++) {
        caller_stats_t s;
        CHECK(caller_stats(c, &s) == 0);
        if (s.tasks_suspended == n)
            return;
        nanosleep(&(struct timespec){0, 1000000}, NULL);
    }
    fprintf(stderr, "gdb-target: the tasks did not suspend\n");
    exit(1);
}

static void check_result(caller_pending_t *p, intptr_t want)
{
    void *v = NULL;
    CHECK(caller_pending_wait(p, 10.0, CALLER_WAIT_RESULT, &v) == 0);
    CHECK((intptr_t)v == want);
    caller_pending_unref(p);
}

int main(void)
{
    gate = caller_pending_new(0);
    CHECK(gate);
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.name = "GdbTarget"});
    CHECK(c);
    caller_t *cc = caller_create(CALLER_NEW_THREAD, &(caller_options_t){
                                                        .name = "GdbCopy",
                                                        .stack_mode = CALLER_STACK_COPY,
                                                    });
    CHECK(cc);

    caller_pending_t *a = alpha_pending = caller_call_soon(c, alpha_task, NULL);
    caller_pending_t *b = beta_pending = caller_call_soon(c, beta_task, NULL);
    caller_pending_t *g = gamma_pending = caller_call_later(c, 60.0, gamma_task, NULL);
    caller_pending_t *d = delta_pending = caller_call_soon(cc, delta_task, NULL);
    caller_pending_t *e = epsilon_pending = caller_call_soon(cc, epsilon_task, NULL);
    CHECK(a && b && g && d && e);
    wait_suspended(c, 2);
    wait_suspended(cc, 2);

    gdb_target_ready();

    CHECK(caller_pending_set_result(gate, NULL, 0) == 0);
    check_result(a, 11);
    check_result(b, 12);
    check_result(d, 13);
    check_result(e, 14);
    caller_pending_cancel(g, NULL);
    caller_pending_unref(g);
    caller_pending_unref(gate);
    CHECK(caller_stop(c, 0) >= 0 && caller_wait_stopped(c, 10.0) == 0);
    CHECK(caller_stop(cc, 0) >= 0 && caller_wait_stopped(cc, 10.0) == 0);
    caller_unref(c);
    caller_unref(cc);
    printf("gdb-target: done\n");
    return 0;
}
