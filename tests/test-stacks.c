/*
 * Stack modes of a Caller (caller_options_t.stack_mode): copy-stack mode,
 * where every task runs on the Caller's one run stack and a suspended
 * task's used stack is kept on the heap. Its tasks must behave exactly as
 * with stacks of their own (locals, results, waits, timeouts, cancels,
 * Pendings completed from other threads), and the rule it imposes (no
 * pointer into a task's stack handed on) is checked where the library can.
 */
// ALSO-UCONTEXT
// TIMEOUT: 120
#include "check.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <unistd.h>

static caller_t *copy_caller(const char *name)
{
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){
                                                       .name = name,
                                                       .stack_mode = CALLER_STACK_COPY,
                                                   });
    CHECK(c != NULL);
    return c;
}

static void finish(caller_t *c)
{
    CHECK(caller_stop(c, 0) >= 0);
    CHECK_RC(caller_wait_stopped(c, 10 * check_time_scale()), 0);
    caller_unref(c);
}

/* ---- tasks keep their stacks ------------------------------------------------ */

/* A task fills a local array with its own pattern, then suspends several
 * times on a Pending another task or thread completes; after each it checks
 * the array. Returns its id + 1 if all was intact, 0 if not. */
typedef struct {
    caller_pending_t *gate;
    intptr_t id;
} waiter_arg_t;

static void *pattern_task(void *arg)
{
    waiter_arg_t *w = arg;
    unsigned char mine[300 + (w->id % 7) * 50];
    for (size_t i = 0; i < sizeof mine; i++)
        mine[i] = (unsigned char)(w->id * 31 + i);
    const void *where = mine;
    for (int k = 0; k < 3; k++) {
        if (caller_pending_wait(w->gate, 120 * check_time_scale(), CALLER_WAIT_PROTECT, NULL) != 0)
            return NULL;
        if (caller_sleep(0) != 0) /* and let the others run in between */
            return NULL;
        if (where != (const void *)mine)
            return NULL;
        for (size_t i = 0; i < sizeof mine; i++)
            if (mine[i] != (unsigned char)(w->id * 31 + i))
                return NULL;
    }
    return P(w->id + 1);
}

TEST(suspended_tasks_keep_their_locals)
{
    enum { N = 1000 }; /* past the 512 TSan fiber contexts fiber.c makes */
    caller_t *c = copy_caller("copy-locals");
    caller_pending_t *gate = caller_pending_new(CALLER_PENDING_UNTRACKED);
    waiter_arg_t *args = calloc(N, sizeof *args);
    caller_pending_t **ps = calloc(N, sizeof *ps);
    CHECK(gate && args && ps);
    for (int i = 0; i < N; i++) {
        args[i] = (waiter_arg_t){gate, i};
        ps[i] = caller_call_soon(c, pattern_task, &args[i]);
        CHECK(ps[i] != NULL);
    }
    /* All are suspended on the gate (or will be); open it from here. */
    CHECK_RC(caller_pending_set_result(gate, NULL, 0), 0);
    for (int i = 0; i < N; i++) {
        void *v = NULL;
        CHECK_RC(caller_pending_wait(ps[i], 120 * check_time_scale(),
                                     CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v),
                 0);
        CHECK_EQ(I(v), i + 1);
        caller_pending_unref(ps[i]);
    }
    caller_pending_unref(gate);
    free(args);
    free(ps);
    finish(c);
}

/* ---- the rule, checked ------------------------------------------------------- */

static void *noop(void *arg)
{
    return arg;
}

typedef struct {
    int call_soon, call_later, to_thread, queue_call, set_result;
    int heap_ok;
    char msg[256];
} rule_seen_t;

static void *rule_task(void *arg)
{
    rule_seen_t *seen = arg;
    caller_t *c = caller_current();
    int local = 7;
    const char *msg = NULL;
    CHECK_PTR_EQ(caller_call_soon(c, noop, &local), NULL);
    seen->call_soon = caller_last_error(&msg);
    snprintf(seen->msg, sizeof seen->msg, "%s", msg ? msg : "");
    CHECK_PTR_EQ(caller_call_later(c, 0.01, noop, &local), NULL);
    seen->call_later = caller_last_error(NULL);
    CHECK_PTR_EQ(caller_to_thread(c, noop, &local), NULL);
    seen->to_thread = caller_last_error(NULL);
    CHECK_PTR_EQ(caller_queue_call(c, noop, &local), NULL);
    seen->queue_call = caller_last_error(NULL);
    caller_pending_t *p = caller_pending_new(0);
    CHECK(p != NULL);
    seen->set_result = caller_pending_set_result(p, &local, 0);
    /* Heap memory is fine, and so is a pointer that is not into a stack. */
    CHECK_RC(caller_pending_set_result(p, seen, 0), 0);
    caller_pending_unref(p);
    caller_pending_t *q = caller_call_soon(c, noop, seen);
    CHECK(q != NULL);
    void *v = NULL;
    CHECK_RC(caller_pending_wait(q, 10 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v),
             0);
    seen->heap_ok = v == (void *)seen;
    caller_pending_unref(q);
    return NULL;
}

TEST(pointers_into_a_task_stack_are_refused)
{
    caller_t *c = copy_caller("copy-rule");
    rule_seen_t seen = {0};
    caller_pending_t *p = caller_call_soon(c, rule_task, &seen);
    CHECK(p != NULL);
    CHECK_RC(caller_pending_wait(p, 10 * check_time_scale(), CALLER_WAIT_PROTECT, NULL), 0);
    caller_pending_unref(p);
    CHECK_EQ(seen.call_soon, -EINVAL);
    CHECK_EQ(seen.call_later, -EINVAL);
    CHECK_EQ(seen.to_thread, -EINVAL);
    CHECK_EQ(seen.queue_call, -EINVAL);
    CHECK_EQ(seen.set_result, -EINVAL);
    CHECK_CONTAINS(seen.msg, "copy-stack task's stack");
    CHECK_CONTAINS(seen.msg, "CALLER_STACK_COPY");
    CHECK_EQ(seen.heap_ok, 1);
    finish(c);
}

/* In the default mode the same calls are allowed (the task waits for what
 * it handed its local to, so that is correct there). */
static void *own_stack_task(void *arg)
{
    (void)arg;
    int local = 7;
    caller_pending_t *q = caller_call_soon(caller_current(), noop, &local);
    if (!q)
        return NULL;
    void *v = NULL;
    int rc = caller_pending_wait(q, 10 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v);
    caller_pending_unref(q);
    return P(rc == 0 && v == (void *)&local);
}

TEST(default_mode_allows_local_pointers)
{
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.name = "own-stacks"});
    CHECK(c != NULL);
    caller_pending_t *p = caller_call_soon(c, own_stack_task, NULL);
    CHECK(p != NULL);
    void *v = NULL;
    CHECK_RC(caller_pending_wait(p, 10 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v),
             0);
    CHECK_EQ(I(v), 1);
    caller_pending_unref(p);
    finish(c);
}

/* Children and workers do not inherit the mode: the same task runs on a
 * child of a copy-stack Caller. */
TEST(mode_is_not_inherited)
{
    caller_t *c = copy_caller("copy-parent");
    caller_t *kid = caller_get(c, &(caller_options_t){.name = "own-kid"});
    CHECK(kid != NULL);
    caller_pending_t *p = caller_call_soon(kid, own_stack_task, NULL);
    CHECK(p != NULL);
    void *v = NULL;
    CHECK_RC(caller_pending_wait(p, 10 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v),
             0);
    CHECK_EQ(I(v), 1);
    caller_pending_unref(p);
    caller_unref(kid);
    finish(c);
}

TEST(unknown_mode_is_refused)
{
    CHECK_PTR_EQ(caller_create(CALLER_NEW_THREAD, &(caller_options_t){.stack_mode = 7}), NULL);
    const char *msg;
    CHECK_EQ(caller_last_error(&msg), -EINVAL);
    CHECK_CONTAINS(msg, "stack_mode");
}

/* ---- suspension points -------------------------------------------------------- */

static void *times_out(void *arg)
{
    caller_pending_t *never = arg;
    char buf[64];
    memset(buf, 0x5a, sizeof buf);
    int rc = caller_pending_wait(never, 0.02, CALLER_WAIT_PROTECT, NULL);
    for (size_t i = 0; i < sizeof buf; i++)
        if (buf[i] != 0x5a)
            return P(1);
    return P(rc);
}

static void *sleeps_long(void *arg)
{
    atomic_int *started = arg;
    atomic_store(started, 1);
    return P(caller_sleep(60));
}

TEST(timeouts_and_cancels)
{
    caller_t *c = copy_caller("copy-cancel");
    caller_pending_t *never = caller_pending_new(CALLER_PENDING_UNTRACKED);
    CHECK(never != NULL);
    caller_pending_t *a = caller_call_soon(c, times_out, never);
    atomic_int started = 0;
    caller_pending_t *b = caller_call_soon(c, sleeps_long, &started);
    CHECK(a && b);
    void *v = NULL;
    CHECK_RC(caller_pending_wait(a, 10 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v),
             0);
    CHECK_EQ(I(v), -ETIMEDOUT);
    double until = check_now() + 10 * check_time_scale();
    while (!atomic_load(&started) && check_now() < until)
        caller_sleep(0.001);
    CHECK_EQ(atomic_load(&started), 1);
    CHECK_EQ(caller_pending_cancel(b, "enough"), 1);
    CHECK_EQ(caller_pending_wait(b, 10 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v),
             -ECANCELED);
    caller_pending_unref(a);
    caller_pending_unref(b);
    caller_pending_unref(never);
    finish(c);
}

/* ---- many threads completing what copy-stack tasks wait for ------------------ */

/* Each task hands a heap record to a worker (caller_to_thread), waits for
 * it, and checks its own locals; four submitting threads, two copy-stack
 * Callers. Meant for TSan: the waits are completed from worker threads
 * while other tasks hold the run stack. */
typedef struct {
    intptr_t in, out;
} job_t;

static void *worker_job(void *arg)
{
    job_t *j = arg;
    j->out = j->in * 3 + 1;
    return arg;
}

static void *hand_off_task(void *arg)
{
    intptr_t id = I(arg);
    volatile intptr_t mine[24];
    for (int i = 0; i < 24; i++)
        mine[i] = id ^ i;
    job_t *j = malloc(sizeof *j);
    if (!j)
        return NULL;
    j->in = id;
    caller_pending_t *w = caller_to_thread(caller_current(), worker_job, j);
    void *v = NULL;
    int rc = w ? caller_pending_wait(w, 30 * check_time_scale(),
                                     CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v)
               : -1;
    caller_pending_unref(w);
    intptr_t ok = rc == 0 && v == (void *)j && j->out == id * 3 + 1;
    for (int i = 0; i < 24; i++)
        ok &= mine[i] == (id ^ i);
    free(j);
    return P(ok);
}

typedef struct {
    caller_t *c;
    int base, n, good;
} submitter_t;

static void *submitter(void *arg)
{
    submitter_t *s = arg;
    caller_pending_t **ps = calloc((size_t)s->n, sizeof *ps);
    CHECK(ps != NULL);
    for (int i = 0; i < s->n; i++)
        ps[i] = caller_call_soon(s->c, hand_off_task, P(s->base + i));
    for (int i = 0; i < s->n; i++) {
        void *v = NULL;
        if (ps[i] &&
            caller_pending_wait(ps[i], 60 * check_time_scale(),
                                CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v) == 0 &&
            I(v) == 1)
            s->good++;
        caller_pending_unref(ps[i]);
    }
    free(ps);
    return NULL;
}

TEST(stress_waits_completed_from_other_threads)
{
    enum { THREADS = 4, EACH = 500 };
    caller_t *cs[2] = {copy_caller("copy-stress-a"), copy_caller("copy-stress-b")};
    pthread_t th[THREADS];
    submitter_t sub[THREADS];
    for (int i = 0; i < THREADS; i++) {
        sub[i] = (submitter_t){cs[i % 2], i * EACH, EACH, 0};
        CHECK_EQ(pthread_create(&th[i], NULL, submitter, &sub[i]), 0);
    }
    for (int i = 0; i < THREADS; i++) {
        CHECK_EQ(pthread_join(th[i], NULL), 0);
        CHECK_EQ(sub[i].good, EACH);
    }
    finish(cs[0]);
    finish(cs[1]);
}

/* ---- waiting for descriptors ------------------------------------------------ */

/* Tasks of a copy-stack Caller wait on pipes (two tasks on each, so they
 * share a watch); another thread writes to the pipes in reverse order.
 * The loop walks the waiters while the tasks are suspended: they must not
 * be on the tasks' stacks. Each task checks its locals after each wake. */
enum { PIPES = 16, ROUNDS = 20 };
static int pipes[PIPES][2];

static void *fd_waiter(void *arg)
{
    intptr_t id = I(arg);
    int fd = pipes[id % PIPES][0];
    volatile intptr_t mine[32];
    for (int i = 0; i < 32; i++)
        mine[i] = id * 1000 + i;
    for (int r = 0; r < ROUNDS; r++) {
        int rc = caller_wait_fd(fd, CALLER_READABLE, 30 * check_time_scale());
        if (rc != (int)CALLER_READABLE)
            return P(-1);
        char b;
        /* Two tasks per pipe, one byte for each: whoever reads it. */
        if (read(fd, &b, 1) != 1 && errno != EAGAIN)
            return P(-2);
        for (int i = 0; i < 32; i++)
            if (mine[i] != id * 1000 + i)
                return P(-3);
        caller_sleep(0);
    }
    return P(1);
}

static void *pipe_writer(void *arg)
{
    (void)arg;
    for (int r = 0; r < ROUNDS; r++)
        for (int k = PIPES - 1; k >= 0; k--) {
            char b[2] = {'a', 'b'};
            if (write(pipes[k][1], b, 2) != 2)
                return P(-1);
        }
    return NULL;
}

TEST(tasks_waiting_for_descriptors)
{
    for (int k = 0; k < PIPES; k++) {
        CHECK_EQ(pipe(pipes[k]), 0);
        CHECK_EQ(fcntl(pipes[k][0], F_SETFL, O_NONBLOCK), 0);
    }
    caller_t *c = copy_caller("copy-fds");
    caller_pending_t *ps[2 * PIPES];
    for (int i = 0; i < 2 * PIPES; i++)
        CHECK((ps[i] = caller_call_soon(c, fd_waiter, P(i))) != NULL);
    pthread_t w;
    CHECK_EQ(pthread_create(&w, NULL, pipe_writer, NULL), 0);
    void *wrc;
    CHECK_EQ(pthread_join(w, &wrc), 0);
    CHECK_PTR_EQ(wrc, NULL);
    for (int i = 0; i < 2 * PIPES; i++) {
        void *v = NULL;
        CHECK_RC(caller_pending_wait(ps[i], 60 * check_time_scale(),
                                     CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v),
                 0);
        CHECK_EQ(I(v), 1);
        caller_pending_unref(ps[i]);
    }
    finish(c);
    for (int k = 0; k < PIPES; k++) {
        close(pipes[k][0]);
        close(pipes[k][1]);
    }
}
