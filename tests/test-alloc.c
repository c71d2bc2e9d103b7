/* Allocation failure: for every N, a run where the library's N-th
 * allocation fails ends cleanly — the failure surfaces as -ENOMEM (or as a
 * cancelled or failed Pending), with no crash, no leak, no hang (issue #10). */
// TIMEOUT: 300
#include "check.h"
#include "internal.h"

#include <limits.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

/* Exit codes of a run. */
enum { RUN_OK = 0, RUN_BAD_ERROR = 3, RUN_LEAK = 4 };

static int bad_error;
static long enomem_seen; /* -ENOMEM errors this run observed */

/* An error from the library must be one a lack of memory explains. */
static void expect(int rc)
{
    if (rc == -ENOMEM)
        enomem_seen++;
    if (rc == 0 || rc == -ENOMEM || rc == -ECANCELED || rc == -ESHUTDOWN || rc == -EIO)
        return;
    fprintf(stderr, "unexpected error %d (%s)\n", rc, caller_err_name(rc));
    bad_error = 1;
}

static void expect_ptr(const void *p)
{
    if (!p)
        expect(caller_last_error(NULL));
}

static void *item(void *arg)
{
    if (I(arg) == 3)
        caller_raise(-EIO, "item %d fails on purpose", 3);
    return arg;
}

static void *sleeper(void *arg)
{
    caller_sleep(0.001);
    return arg;
}

/* A task exercising most of the library. */
static void *body(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    caller_group_t *g = caller_group_new(self, 0);
    expect_ptr(g);
    int entered = g ? caller_group_enter(g) : -1;
    if (g)
        expect(entered);
    caller_pending_t *p[8] = {0};
    p[0] = caller_call_soon(self, item, P(1));
    p[1] = caller_call_later(self, 0.001, sleeper, P(2));
    p[2] = caller_to_thread(self, sleeper, P(4));
    p[3] = caller_queue_call(self, item, P(5));
    p[4] = caller_call_soon(self, item, P(6));
    for (int i = 0; i < 5; i++)
        expect_ptr(p[i]);
    caller_pending_t *set[8];
    size_t n = 0;
    for (int i = 0; i < 5; i++)
        if (p[i] && i != 3) /* the queue's Pending is reset as it drains */
            set[n++] = p[i];
    caller_iter_t *it = caller_as_completed(set, n, NULL);
    expect_ptr(it);
    if (it) {
        caller_pending_t *q;
        int rc;
        while ((rc = caller_iter_next(it, &q)) == 0)
            caller_pending_unref(q);
        if (rc != CALLER_ITER_END)
            expect(rc);
        caller_iter_close(it);
    }
    caller_queue_close(self, item);
    if (g && entered == 0)
        expect(caller_group_exit(g));
    caller_group_unref(g);
    for (int i = 0; i < 5; i++)
        caller_pending_unref(p[i]);
    return NULL;
}

/* One run in this (forked) process. */
static int run(void)
{
    caller_t *c = caller_create(CALLER_NEW_THREAD, NULL);
    expect_ptr(c);
    if (c) {
        caller_pending_t *b = caller_call_soon(c, body, NULL);
        expect_ptr(b);
        if (b) {
            int rc = caller_pending_wait(b, 30, CALLER_WAIT_RESULT, NULL);
            expect(rc);
            caller_pending_unref(b);
        }
        caller_stop(c, CALLER_STOP_FORCE);
        expect(caller_wait_stopped(c, 30));
        caller_unref(c);
    }
    for (int i = 0; i < 2000 && (caller_live_count() || caller_pending_live_count()); i++)
        usleep(1000);
    if (caller_live_count() || caller_pending_live_count()) {
        fprintf(stderr, "leak: %zu Callers, %zu Pendings\n", caller_live_count(),
                caller_pending_live_count());
        return RUN_LEAK;
    }
    return bad_error ? RUN_BAD_ERROR : RUN_OK;
}

/* Run with the @p n-th allocation failing (negative: none) in a child. */
static int run_forked(long n, long *allocations, long *enomem)
{
    int fds[2];
    CHECK_EQ(pipe(fds), 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        alarm(60); /* a hang ends as SIGALRM */
        caller__alloc_fail_after(n < 0 ? LONG_MAX : n);
        int rc = run();
        long out[2] = {caller__alloc_count(), enomem_seen};
        caller__alloc_fail_after(-1);
        if (write(fds[1], out, sizeof out) != sizeof out)
            rc = 5;
        _exit(rc);
    }
    close(fds[1]);
    long in[2] = {-1, 0};
    if (read(fds[0], in, sizeof in) != sizeof in)
        in[0] = -1;
    close(fds[0]);
    int status;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    if (allocations)
        *allocations = in[0];
    if (enomem)
        *enomem = in[1];
    if (WIFSIGNALED(status))
        return 1000 + WTERMSIG(status);
    return WEXITSTATUS(status);
}

TEST(every_allocation_failing_in_turn_ends_cleanly)
{
    long total = 0;
    long enomem = 0;
    CHECK_EQ(run_forked(-1, &total, &enomem), RUN_OK); /* the run itself is clean */
    CHECK_EQ(enomem, 0);

    CHECK_GE(total, 20);
    printf("a run makes %ld allocations; failing each in turn\n", total);
    int failures = 0, reported = 0;
    /* A little past the count: runs vary (threads race), so the tail too. */
    for (long n = 0; n < total + 20; n++) {
        long seen = 0;
        int rc = run_forked(n, NULL, &seen);
        reported += seen > 0;
        if (rc != RUN_OK) {
            fprintf(stderr, "allocation %ld failing: run ended with %s %d\n", n,
                    rc >= 1000 ? "signal" : "status", rc >= 1000 ? rc - 1000 : rc);
            failures++;
        }
    }
    printf("%d of %ld runs saw -ENOMEM from the API; the others absorbed the failure\n", reported,
           total + 20);
    CHECK_EQ(failures, 0);
    CHECK_GE(reported, total / 4); /* the injection really reaches the API */
}
