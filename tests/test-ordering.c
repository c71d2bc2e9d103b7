/*
 * Memory ordering: every happens-before guarantee that docs/guide.md
 * states ("Memory ordering"), shown the way a program relies on it. Plain,
 * non-atomic data is written before the publishing call (set_result, a
 * submission, a cancel, ...) and read in another thread after the
 * observing call (a wait, a callback, the call itself, ...), many times
 * over, with no other synchronisation between the two threads. The plain
 * build checks the values; under ThreadSanitizer (`make test-tsan`) a
 * missing edge is reported as a data race on that data.
 */
#include "check.h"

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>

enum { N = 400 };

/* One slot per round: what the publisher writes, what the observer saw. */
typedef struct {
    int in;    /* written before the publishing call */
    int cb;    /* written by a done callback */
    int out;   /* written by the call or task that observed `in` */
    int after; /* written by a task after it was cancelled */
} slot_t;

static slot_t *new_slots(void)
{
    slot_t *s = calloc(N, sizeof *s);
    CHECK(s != NULL);
    return s;
}

static caller_pending_t *new_pending(void)
{
    caller_pending_t *p = caller_pending_new(CALLER_PENDING_UNTRACKED);
    CHECK(p != NULL);
    return p;
}

/* ---- completion: set_result / set_exception -> whoever sees it done ----- */

typedef struct {
    caller_pending_t *p[N];
    slot_t *s;
} board_t;

static board_t *new_board(void)
{
    board_t *b = calloc(1, sizeof *b);
    CHECK(b != NULL);
    b->s = new_slots();
    for (int i = 0; i < N; i++)
        b->p[i] = new_pending();
    return b;
}

static void free_board(board_t *b)
{
    for (int i = 0; i < N; i++)
        caller_pending_unref(b->p[i]);
    free(b->s);
    free(b);
}

/* A plain thread: write each slot, then complete its Pending (every third
 * with an error). */
static void *complete_all(void *arg)
{
    board_t *b = arg;
    for (int i = 0; i < N; i++) {
        b->s[i].in = i + 1;
        if (i % 3 == 2)
            CHECK_RC(caller_pending_set_exception(b->p[i], -EIO, "round %d", i), 0);
        else
            CHECK_RC(caller_pending_set_result(b->p[i], &b->s[i], 0), 0);
    }
    return NULL;
}

/* What a waiter checks once the wait for round @p i returned. */
static void check_round(board_t *b, int i, int rc, void *v)
{
    if (i % 3 == 2) {
        CHECK_RC(rc, -EIO);
    } else {
        CHECK_RC(rc, 0);
        CHECK_PTR_EQ(v, &b->s[i]);
    }
    CHECK_EQ(b->s[i].in, i + 1);
}

TEST(set_result_happens_before_a_plain_threads_wait_returns)
{
    board_t *b = new_board();
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, complete_all, b), 0);
    for (int i = 0; i < N; i++) {
        void *v = NULL;
        int rc = caller_pending_wait(b->p[i], 10 * check_time_scale(), CALLER_WAIT_RESULT, &v);
        check_round(b, i, rc, v);
    }
    pthread_join(th, NULL);
    free_board(b);
}

static void *wait_all_in_task(void *arg)
{
    board_t *b = arg;
    for (int i = 0; i < N; i++) {
        void *v = NULL;
        int rc = caller_pending_wait(b->p[i], 10 * check_time_scale(), CALLER_WAIT_RESULT, &v);
        check_round(b, i, rc, v);
    }
    return NULL;
}

TEST(set_result_happens_before_a_tasks_wait_returns)
{
    caller_t *c = check_new_thread("waiter");
    board_t *b = new_board();
    caller_pending_t *t = caller_call_soon(c, wait_all_in_task, b);
    CHECK(t != NULL);
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, complete_all, b), 0);
    check_await(t, 30);
    pthread_join(th, NULL);
    free_board(b);
    check_stop(c);
}

TEST(set_result_happens_before_done_and_result_see_it)
{
    board_t *b = new_board();
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, complete_all, b), 0);
    for (int i = 0; i < N; i++) {
        while (caller_pending_done(b->p[i]) != 1)
            sched_yield();
        void *v = NULL;
        int rc = caller_pending_result(b->p[i], &v);
        check_round(b, i, rc, v);
    }
    pthread_join(th, NULL);
    free_board(b);
}

/* A task's function: what it wrote before returning is seen by whoever
 * waits for its Pending. */
static void *write_and_return(void *arg)
{
    slot_t *s = arg;
    s->out = 7;
    return s;
}

TEST(a_tasks_work_happens_before_the_wait_for_its_pending_returns)
{
    caller_t *c = check_new_thread("worker");
    slot_t *s = new_slots();
    for (int i = 0; i < N; i++) {
        void *v = check_await(caller_call_soon(c, write_and_return, &s[i]), 10);
        CHECK_PTR_EQ(v, &s[i]);
        CHECK_EQ(s[i].out, 7);
    }
    free(s);
    check_stop(c);
}

/* ---- done callbacks -> the waits the completion ends -------------------- */

static void write_cb(caller_pending_t *p, void *arg)
{
    (void)p;
    slot_t *s = arg;
    s->cb = s->in * 2; /* in the completing thread */
}

static void *wait_cbs_in_task(void *arg)
{
    board_t *b = arg;
    for (int i = 0; i < N; i++) {
        CHECK_RC(caller_pending_wait(b->p[i], 10 * check_time_scale(), CALLER_WAIT_PROTECT, NULL),
                 0);
        CHECK_EQ(b->s[i].cb, 2 * (i + 1));
    }
    return NULL;
}

TEST(done_callbacks_happen_before_the_waiters_wake)
{
    caller_t *c = check_new_thread("waiter");
    board_t *b = new_board();
    for (int i = 0; i < N; i++)
        CHECK_RC(caller_pending_add_done_callback(b->p[i], write_cb, &b->s[i]), 0);
    caller_pending_t *t = caller_call_soon(c, wait_cbs_in_task, b);
    CHECK(t != NULL);
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, complete_all, b), 0);
    for (int i = 0; i < N; i++) {
        CHECK_RC(caller_pending_wait(b->p[i], 10 * check_time_scale(), CALLER_WAIT_PROTECT, NULL),
                 0);
        CHECK_EQ(b->s[i].cb, 2 * (i + 1));
    }
    check_await(t, 30);
    pthread_join(th, NULL);
    free_board(b);
    check_stop(c);
}

TEST(done_callbacks_happen_before_caller_wait_and_as_completed_return)
{
    board_t *b = new_board();
    for (int i = 0; i < N; i++)
        CHECK_RC(caller_pending_add_done_callback(b->p[i], write_cb, &b->s[i]), 0);
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, complete_all, b), 0);
    /* caller_wait over the first half, one at a time, as they complete. */
    for (int i = 0; i < N / 2; i++) {
        caller_pending_t *done[1], *not_done[1];
        size_t nd = 0, nn = 0;
        CHECK_RC(caller_wait(&b->p[i], 1, 10 * check_time_scale(), CALLER_FIRST_COMPLETED, done,
                             &nd, not_done, &nn),
                 0);
        CHECK_EQ(nd, 1);
        CHECK_EQ(b->s[i].cb, 2 * (i + 1));
        CHECK_EQ(b->s[i].in, i + 1);
    }
    /* as_completed over the second half. */
    caller_iter_t *it = caller_as_completed(&b->p[N / 2], N - N / 2, NULL);
    CHECK(it != NULL);
    caller_pending_t *p;
    int seen = 0;
    while (caller_iter_next(it, &p) == 0) {
        int i = 0;
        while (b->p[i] != p)
            i++;
        CHECK_EQ(b->s[i].cb, 2 * (i + 1));
        CHECK_EQ(b->s[i].in, i + 1);
        caller_pending_unref(p);
        seen++;
    }
    caller_iter_close(it);
    CHECK_EQ(seen, N - N / 2);
    pthread_join(th, NULL);
    free_board(b);
}

/* ---- registration -> the callback --------------------------------------- */

static void read_both_cb(caller_pending_t *p, void *arg)
{
    (void)p;
    slot_t *s = arg;
    /* `out` was written by the registering thread, `in` by the completing
     * one: this runs in either (at once, if it was done already). */
    s->cb = s->out + s->in;
}

TEST(registering_a_callback_happens_before_it_runs)
{
    board_t *b = new_board();
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, complete_all, b), 0);
    for (int i = 0; i < N; i++) {
        b->s[i].out = 1000;
        CHECK_RC(caller_pending_add_done_callback(b->p[i], read_both_cb, &b->s[i]), 0);
    }
    pthread_join(th, NULL);
    for (int i = 0; i < N; i++)
        CHECK_EQ(b->s[i].cb, 1000 + i + 1);
    free_board(b);
}

/* ---- submission -> the call --------------------------------------------- */

/* A call: read what the submitter wrote, write what the waiter reads. */
static void *double_in(void *arg)
{
    slot_t *s = arg;
    s->out = s->in * 2;
    return s;
}

typedef struct {
    slot_t *s;
    caller_pending_t *done;
} direct_arg_t;

static void double_in_direct(void *arg)
{
    direct_arg_t *d = arg;
    double_in(d->s);
    caller_pending_set_result(d->done, NULL, 0);
}

enum { KIND_SOON, KIND_LATER, KIND_DIRECT, KIND_TO_THREAD, KIND_QUEUE, KIND_QUEUE_KEY, KINDS };

TEST(submitting_a_call_happens_before_it_runs)
{
    caller_t *c = check_new_thread("target");
    slot_t *s = new_slots();
    caller_pending_t *p[N];
    direct_arg_t d[N];
    int key;
    for (int i = 0; i < N; i++) {
        s[i].in = i + 1; /* before the submission */
        switch (i % KINDS) {
        case KIND_SOON:
            p[i] = caller_call_soon(c, double_in, &s[i]);
            break;
        case KIND_LATER:
            p[i] = caller_call_later(c, 0.001, double_in, &s[i]);
            break;
        case KIND_DIRECT:
            d[i] = (direct_arg_t){&s[i], new_pending()};
            CHECK_RC(caller_call_direct(c, double_in_direct, &d[i]), 0);
            p[i] = d[i].done;
            break;
        case KIND_TO_THREAD:
            p[i] = caller_to_thread(c, double_in, &s[i]);
            break;
        case KIND_QUEUE:
            p[i] = caller_queue_call(c, double_in, &s[i]);
            break;
        case KIND_QUEUE_KEY:
            p[i] = caller_queue_call_key(c, &key, double_in, &s[i]);
            break;
        }
        CHECK(p[i] != NULL);
    }
    /* Each wait, and for the queues the wait for the drain after the item,
     * happens after the call: what it wrote is visible here. */
    for (int i = 0; i < N; i++) {
        CHECK_RC(caller_pending_wait(p[i], 10 * check_time_scale(), 0, NULL), 0);
        CHECK_EQ(s[i].out, 2 * (i + 1));
        caller_pending_unref(p[i]);
    }
    free(s);
    check_stop(c);
}

/* ---- cancellation -> the cancelled task ----------------------------------- */

typedef struct {
    slot_t *s;
    caller_pending_t *started; /* its result: the task's scope, if any */
    bool scope;
} cancel_arg_t;

static void *cancelled_task(void *arg)
{
    cancel_arg_t *a = arg;
    caller_scope_t *scope = a->scope ? caller_scope_enter(-1, 0) : NULL;
    if (scope)
        caller_scope_ref(scope); /* the canceller's */
    caller_pending_set_result(a->started, scope, 0);
    int rc = caller_sleep(60);
    /* Cancelled: what the canceller wrote before cancelling is visible. */
    a->s->after = rc == -ECANCELED ? a->s->in : -1;
    if (scope)
        caller_scope_exit(scope);
    return NULL;
}

static void cancel_rounds(bool scope)
{
    caller_t *c = check_new_thread("cancelled");
    slot_t *s = new_slots();
    for (int i = 0; i < N / 4; i++) {
        cancel_arg_t a = {&s[i], new_pending(), scope};
        caller_pending_t *t = caller_call_soon(c, cancelled_task, &a);
        CHECK(t != NULL);
        void *v = NULL;
        CHECK_RC(caller_pending_wait(a.started, 10 * check_time_scale(), CALLER_WAIT_RESULT, &v),
                 0);
        s[i].in = i + 1; /* before the cancel */
        if (scope) {
            CHECK_RC(caller_scope_cancel(v), 0);
            caller_scope_unref(v);
        } else {
            CHECK_EQ(caller_pending_cancel(t, "stop"), 1);
        }
        CHECK_RC(caller_pending_wait(t, 10 * check_time_scale(), CALLER_WAIT_PROTECT, NULL), 0);
        CHECK_EQ(s[i].after, i + 1);
        caller_pending_unref(t);
        caller_pending_unref(a.started);
    }
    free(s);
    check_stop(c);
}

TEST(cancelling_a_task_happens_before_it_sees_the_cancellation)
{
    cancel_rounds(false);
}

TEST(cancelling_a_scope_happens_before_its_task_sees_the_cancellation)
{
    cancel_rounds(true);
}

/* A group's body: publish the group, wait inside it until cancelled, then
 * read what the canceller wrote. */
static void *cancelled_group_body(void *arg)
{
    cancel_arg_t *a = arg;
    caller_group_t *g = caller_group_new(NULL, 0);
    CHECK(g != NULL);
    CHECK_RC(caller_group_enter(g), 0);
    caller_pending_set_result(a->started, caller_group_ref(g), 0); /* the canceller's */
    int rc = caller_sleep(60);
    a->s->after = rc == -ECANCELED ? a->s->in : -1;
    CHECK_RC(caller_group_exit(g), -ECANCELED);
    caller_group_unref(g);
    return NULL;
}

TEST(cancelling_a_group_happens_before_its_body_sees_the_cancellation)
{
    caller_t *c = check_new_thread("body");
    slot_t *s = new_slots();
    for (int i = 0; i < N / 4; i++) {
        cancel_arg_t a = {&s[i], new_pending(), false};
        caller_pending_t *t = caller_call_soon(c, cancelled_group_body, &a);
        CHECK(t != NULL);
        void *g = NULL;
        CHECK_RC(caller_pending_wait(a.started, 10 * check_time_scale(), CALLER_WAIT_RESULT, &g),
                 0);
        s[i].in = i + 1; /* before the cancel */
        CHECK_EQ(caller_group_cancel(g, "stop"), 1);
        caller_group_unref(g);
        check_await(t, 10);
        CHECK_EQ(s[i].after, i + 1);
        caller_pending_unref(a.started);
    }
    free(s);
    check_stop(c);
}

static void *cancel_all_plainly(void *arg)
{
    board_t *b = arg;
    for (int i = 0; i < N; i++) {
        b->s[i].in = i + 1;
        CHECK_EQ(caller_pending_cancel(b->p[i], NULL), 1);
    }
    return NULL;
}

TEST(cancelling_happens_before_cancelled_sees_it)
{
    board_t *b = new_board();
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, cancel_all_plainly, b), 0);
    for (int i = 0; i < N; i++) {
        while (caller_pending_cancelled(b->p[i]) != 1)
            sched_yield();
        CHECK_EQ(b->s[i].in, i + 1);
    }
    pthread_join(th, NULL);
    free_board(b);
}

/* ---- groups and managers ------------------------------------------------- */

enum { ROUNDS = 40, PER_ROUND = 8 };

typedef struct {
    caller_t *other;
    slot_t *s; /* PER_ROUND slots */
} group_arg_t;

static void *write_round(void *arg)
{
    slot_t *s = arg;
    s->out = s->in;
    return NULL;
}

/* A task: spread the round's work over workers and another Caller, then
 * read it all after the group's exit, which waited for it. */
static void *group_body(void *arg)
{
    group_arg_t *g = arg;
    for (int r = 0; r < ROUNDS; r++) {
        caller_group_t *grp = caller_group_new(NULL, 0);
        CHECK(grp != NULL);
        CHECK_RC(caller_group_enter(grp), 0);
        for (int j = 0; j < PER_ROUND; j++) {
            g->s[j].in = r * 100 + j;
            caller_pending_t *p = j % 2 ? caller_to_thread(caller_current(), write_round, &g->s[j])
                                        : caller_call_soon(g->other, write_round, &g->s[j]);
            CHECK(p != NULL);
            caller_pending_unref(p); /* the group holds its own */
        }
        CHECK_RC(caller_group_exit(grp), 0);
        for (int j = 0; j < PER_ROUND; j++)
            CHECK_EQ(g->s[j].out, r * 100 + j);
        caller_group_unref(grp);
    }
    return NULL;
}

TEST(group_exit_happens_after_the_tracked_work)
{
    caller_t *body = check_new_thread("body"), *other = check_new_thread("other");
    group_arg_t g = {other, new_slots()};
    check_await(caller_call_soon(body, group_body, &g), 60);
    free(g.s);
    check_stop(body);
    check_stop(other);
}

TEST(manager_wait_happens_after_the_tracked_work)
{
    caller_t *c = check_new_thread("managed");
    slot_t *s = new_slots();
    caller_manager_t *m = caller_manager_new();
    CHECK(m != NULL);
    CHECK_RC(caller_manager_activate(m), 0);
    for (int r = 0; r < ROUNDS; r++) {
        caller_manager_token_t token;
        CHECK_RC(caller_manager_start(m, &token), 0);
        for (int j = 0; j < PER_ROUND; j++) {
            s[j].in = r * 100 + j;
            caller_pending_t *p = j % 2 ? caller_to_thread(c, write_round, &s[j])
                                        : caller_call_soon(c, write_round, &s[j]);
            CHECK(p != NULL);
            caller_pending_unref(p); /* the manager holds its own */
        }
        CHECK_RC(caller_manager_stop(m, &token), 0);
        CHECK_RC(caller_manager_wait(m, 10 * check_time_scale()), 0);
        for (int j = 0; j < PER_ROUND; j++)
            CHECK_EQ(s[j].out, r * 100 + j);
    }
    CHECK_EQ(caller_manager_deactivate(m, CALLER_MANAGER_CANCEL_PENDING), 0);
    caller_manager_unref(m);
    free(s);
    check_stop(c);
}

/* ---- stop -> caller_wait_stopped ------------------------------------------ */

typedef struct {
    slot_t *s;
    caller_pending_t *started;
} stop_arg_t;

static void write_direct(void *arg)
{
    slot_t *s = arg;
    s->out = s->in;
}

/* Runs until the stop cancels it, then writes once more. */
static void *write_after_cancel(void *arg)
{
    stop_arg_t *a = arg;
    caller_pending_set_result(a->started, NULL, 0);
    int rc = caller_sleep(60);
    a->s->after = rc == -ECANCELED ? a->s->in : -1;
    return NULL;
}

TEST(wait_stopped_happens_after_the_callers_tasks_and_direct_calls)
{
    slot_t *s = new_slots();
    for (int i = 0; i < 20; i++) {
        caller_t *c = check_new_thread("stopped");
        s[i].in = i + 1;
        stop_arg_t a = {&s[i], new_pending()};
        caller_pending_t *t = caller_call_soon(c, write_after_cancel, &a);
        CHECK(t != NULL);
        CHECK_RC(caller_pending_wait(a.started, 10 * check_time_scale(), 0, NULL), 0);
        CHECK_RC(caller_call_direct(c, write_direct, &s[i]), 0);
        caller_stop(c, CALLER_STOP_FORCE);
        CHECK_RC(caller_wait_stopped(c, 10 * check_time_scale()), 0);
        CHECK_EQ(s[i].out, i + 1);
        CHECK_EQ(s[i].after, i + 1);
        caller_pending_unref(t);
        caller_pending_unref(a.started);
        caller_unref(c);
    }
    free(s);
}
