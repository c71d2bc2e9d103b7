/* Collecting results: as_completed and wait (SPEC §8; issue #4). */
// ALSO-UCONTEXT
#include "check.h"
#include "internal.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>

/* Sleeps arg ms (low bits), fails if bit 16 is set. */
static void *sleeper(void *arg)
{
    intptr_t v = I(arg);
    int rc = caller_sleep((double)(v & 0xffff) / 1000);
    if (rc < 0)
        return NULL;
    if (v & 0x10000)
        caller_raise(-EIO, "sleeper %ld failed", (long)(v & 0xffff));
    return arg;
}

TEST(already_done_pendings)
{
    caller_pending_t *p[3];
    for (int i = 0; i < 3; i++) {
        p[i] = caller_pending_new(0);
        caller_pending_set_result(p[i], P(i), 0);
    }
    caller_iter_t *it = caller_as_completed(p, 3, NULL);
    CHECK(it != NULL);
    int seen = 0;
    caller_pending_t *q;
    while (caller_iter_next(it, &q) == 0) {
        void *v;
        CHECK_RC(caller_pending_result(q, &v), 0);
        seen |= 1 << I(v);
        caller_pending_unref(q);
    }
    CHECK_EQ(seen, 7);
    CHECK_RC(caller_iter_next(it, &q), CALLER_ITER_END); /* stays at the end */
    caller_iter_close(it);
    for (int i = 0; i < 3; i++)
        caller_pending_unref(p[i]);
}

TEST(empty_set_ends_at_once)
{
    caller_iter_t *it = caller_as_completed(NULL, 0, NULL);
    caller_pending_t *q;
    CHECK_RC(caller_iter_next(it, &q), CALLER_ITER_END);
    CHECK_PTR_EQ(q, NULL);
    caller_iter_close(it);
    caller_pending_t *done[1], *not_done[1];
    size_t nd = 9, nn = 9;
    CHECK_RC(caller_wait(NULL, 0, 1, CALLER_ALL_COMPLETED, done, &nd, not_done, &nn), 0);
    CHECK_EQ(nd, 0);
    CHECK_EQ(nn, 0);
}

/* A task that waits for its gate, then returns its value or fails. */
typedef struct {
    caller_pending_t *gate;
    int value;
    bool fail;
} gated_t;

static void *gated(void *arg)
{
    gated_t *g = arg;
    if (caller_pending_wait(g->gate, CALLER_FOREVER, CALLER_WAIT_PROTECT, NULL) < 0)
        return NULL;
    if (g->fail)
        caller_raise(-EIO, "gated %d failed", g->value);
    return P(g->value);
}

typedef struct {
    gated_t *g;
    caller_pending_t **p;
    caller_pending_t *kick;
    sem_t iterating;
} opener_t;

/* Complete the kick, and once the iterator yielded it (so it watches
 * every item from then on), open the gates in the order 1, 2, 0, each once
 * the previous task ended. */
static void *open_gates(void *arg)
{
    opener_t *o = arg;
    caller_pending_set_result(o->kick, NULL, 0);
    check_sem_wait(&o->iterating);
    static const int order[3] = {1, 2, 0};
    for (int k = 0; k < 3; k++) {
        int i = order[k];
        caller_pending_set_result(o->g[i].gate, NULL, 0);
        CHECK_RC(caller_pending_wait(o->p[i], 10, 0, NULL), 0);
    }
    return NULL;
}

TEST(completion_order_and_errors)
{
    caller_t *c = check_new_thread(NULL);
    gated_t g[3] = {{caller_pending_new(0), 60, false},
                    {caller_pending_new(0), 10, true},
                    {caller_pending_new(0), 30, false}};
    /* Watching starts at the first caller_iter_next(): what is done by
     * then comes first, in the order given. The kick is yielded first, and
     * only then do the gated tasks end, so their order is completion order
     * whatever the scheduler does. */
    caller_pending_t *p[4];
    for (int i = 0; i < 3; i++)
        p[i] = caller_call_soon(c, gated, &g[i]);
    p[3] = caller_pending_new(0);
    caller_iter_t *it = caller_as_completed(p, 4, NULL);
    opener_t o = {.g = g, .p = p, .kick = p[3]};
    CHECK_EQ(sem_init(&o.iterating, 0, 0), 0);
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, open_gates, &o), 0);
    caller_pending_t *q;
    int order[3], n = 0;
    CHECK_RC(caller_iter_next(it, &q), 0);
    CHECK_PTR_EQ(q, p[3]);
    caller_pending_unref(q);
    sem_post(&o.iterating);
    while (caller_iter_next(it, &q) == 0) {
        for (int i = 0; i < 3 && n < 3; i++)
            if (q == p[i])
                order[n++] = i;
        caller_pending_unref(q);
    }
    caller_iter_close(it);
    CHECK_EQ(pthread_join(th, NULL), 0);
    CHECK_EQ(n, 3);
    CHECK_EQ(order[0], 1);
    CHECK_EQ(order[1], 2);
    CHECK_EQ(order[2], 0);
    CHECK_RC(caller_pending_result(p[1], NULL), -EIO);
    CHECK_STR_EQ(check_last_message(), "gated 10 failed");
    for (int i = 0; i < 3; i++) {
        caller_pending_unref(p[i]);
        caller_pending_unref(g[i].gate);
    }
    caller_pending_unref(p[3]);
    sem_destroy(&o.iterating);
    check_stop(c);
}

TEST(early_close_cancels_unfinished_unless_kept)
{
    caller_t *c = check_new_thread(NULL);
    for (int keep = 0; keep < 2; keep++) {
        caller_pending_t *p[3] = {
            caller_call_soon(c, sleeper, P(1)),
            caller_call_soon(c, sleeper, P(5000)),
            caller_call_soon(c, sleeper, P(5000)),
        };
        caller_as_completed_options_t o = {.keep_unfinished = keep};
        caller_iter_t *it = caller_as_completed(p, 3, &o);
        caller_pending_t *q;
        CHECK_RC(caller_iter_next(it, &q), 0);
        CHECK_PTR_EQ(q, p[0]);
        caller_pending_unref(q);
        caller_iter_close(it); /* break out early */
        for (int i = 1; i < 3; i++) {
            CHECK_EQ(caller_pending_cancelled(p[i]), keep ? 0 : 1);
            if (!keep) {
                CHECK_RC(caller_pending_wait(p[i], 10, CALLER_WAIT_PROTECT, NULL), 0);
                CHECK_RC(caller_pending_result(p[i], NULL), -ECANCELED);
                CHECK_STR_EQ(check_last_message(), "Cancelled by as_completed");
            } else {
                CHECK_EQ(caller_pending_done(p[i]), 0);
                caller_pending_cancel(p[i], NULL);
            }
        }
        for (int i = 0; i < 3; i++) {
            caller_pending_wait(p[i], 10, CALLER_WAIT_PROTECT, NULL);
            caller_pending_unref(p[i]);
        }
    }
    check_stop(c);
}

typedef struct {
    atomic_int flag;
} cb_flag_t;

static void slow_callback(caller_pending_t *p, void *arg)
{
    (void)p;
    struct timespec ts = {0, 20000000};
    nanosleep(&ts, NULL);
    atomic_store(&((cb_flag_t *)arg)->flag, 1);
}

static void *set_later(void *arg)
{
    CHECK_RC(caller_sleep(0.01), 0);
    caller_pending_set_result(arg, P(1), 0);
    return NULL;
}

TEST(yielded_after_done_callbacks_ran)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *p = caller_pending_new(0);
    cb_flag_t f = {0};
    caller_pending_add_done_callback(p, slow_callback, &f);
    caller_iter_t *it = caller_as_completed(&p, 1, NULL);
    caller_pending_t *setter = caller_call_soon(c, set_later, p);
    caller_pending_t *q;
    CHECK_RC(caller_iter_next(it, &q), 0);
    CHECK_EQ(atomic_load(&f.flag), 1);
    caller_pending_unref(q);
    caller_iter_close(it);
    caller_pending_wait(setter, 10, 0, NULL);
    caller_pending_unref(setter);
    caller_pending_unref(p);
    check_stop(c);
}

typedef struct {
    caller_t *c;
    int made, total, outstanding, max_outstanding;
} gen_t;

static caller_pending_t *gen_sleepers(void *arg)
{
    gen_t *g = arg;
    if (g->made == g->total)
        return NULL;
    g->made++;
    if (++g->outstanding > g->max_outstanding)
        g->max_outstanding = g->outstanding;
    return caller_call_soon(g->c, sleeper, P(1 + g->made % 3));
}

TEST(generator_asked_only_below_max_concurrent)
{
    caller_t *c = check_new_thread(NULL);
    gen_t g = {.c = c, .total = 30};
    caller_as_completed_options_t o = {.max_concurrent = 4};
    caller_iter_t *it = caller_as_completed_gen(gen_sleepers, &g, &o);
    caller_pending_t *q;
    int n = 0;
    while (caller_iter_next(it, &q) == 0) {
        g.outstanding--;
        n++;
        caller_pending_unref(q);
    }
    caller_iter_close(it);
    CHECK_EQ(n, 30);
    CHECK_EQ(g.max_outstanding, 4);
    check_stop(c);
}

/* Opens the gate Pending @p arg. */
static void *open_gate(void *arg)
{
    caller_pending_set_result(arg, NULL, 0);
    return arg;
}

static void *as_completed_in_task(void *arg)
{
    caller_t *other = arg;
    caller_t *self = caller_current();
    /* The items (on the other Caller) wait for a gate that only `opener`,
     * a task of this Caller, opens: they can complete only if this task
     * suspends in caller_iter_next and lets its Caller run the opener.
     * The opener ends (in this thread) before this task is resumed. */
    caller_pending_t *gate = caller_pending_new(CALLER_PENDING_UNTRACKED);
    CHECK(gate != NULL);
    gated_t g[2] = {{gate, 1, false}, {gate, 2, false}};
    caller_pending_t *items[2] = {caller_call_soon(other, gated, &g[0]),
                                  caller_call_soon(other, gated, &g[1])};
    caller_pending_t *ticker = caller_call_soon(self, open_gate, gate);
    caller_iter_t *it = caller_as_completed(items, 2, NULL);
    caller_pending_t *q;
    int n = 0;
    while (caller_iter_next(it, &q) == 0) {
        CHECK_EQ(caller_pending_done(ticker), 1);
        CHECK_RC(caller_pending_result(q, NULL), 0);
        caller_pending_unref(q);
        n++;
    }
    caller_iter_close(it);
    /* Its own Pending is refused. */
    caller_pending_t *me = caller_current_pending();
    CHECK(caller_as_completed(&me, 1, NULL) == NULL);
    CHECK_RC(caller_last_error(NULL), -EDEADLK);
    caller_pending_unref(items[0]);
    caller_pending_unref(items[1]);
    caller_pending_unref(ticker);
    caller_pending_unref(gate);
    return P(n);
}

TEST(as_completed_inside_a_task_suspends_it)
{
    caller_t *a = check_new_thread(NULL), *b = check_new_thread(NULL);
    caller_pending_t *p = caller_call_soon(a, as_completed_in_task, b);
    void *v;
    CHECK_RC(caller_pending_wait(p, 20 * check_time_scale(), CALLER_WAIT_RESULT, &v), 0);
    CHECK_EQ(I(v), 2);
    caller_pending_unref(p);
    check_stop(a);
    check_stop(b);
}

static caller_pending_t *gen_self(void *arg)
{
    (void)arg;
    return caller_pending_ref(caller_current_pending());
}

static void *iterate_own(void *arg)
{
    (void)arg;
    caller_iter_t *it = caller_as_completed_gen(gen_self, NULL, NULL);
    caller_pending_t *q;
    int rc = caller_iter_next(it, &q);
    caller_iter_close(it);
    return P(rc);
}

TEST(generator_yielding_own_pending_is_refused)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *p = caller_call_soon(c, iterate_own, NULL);
    void *v;
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, &v), 0);
    CHECK_RC((int)I(v), -EDEADLK);
    caller_pending_unref(p);
    check_stop(c);
}

typedef struct {
    caller_pending_t *prev;
    int ms;
    bool fail;
} link_t;

/* A chain: wait for the previous link, sleep, then succeed or fail. */
static void *chain_link(void *arg)
{
    link_t *l = arg;
    if (l->prev)
        caller_pending_wait(l->prev, 10, CALLER_WAIT_PROTECT, NULL);
    caller_sleep((double)l->ms / 1000);
    if (l->fail)
        caller_raise(-EIO, "link failed");
    return arg;
}

static void run_chain(caller_return_when_t when, size_t want_done)
{
    caller_t *c = check_new_thread(NULL);
    link_t l[3] = {{NULL, 10, false}, {NULL, 10, true}, {NULL, 30, false}};
    caller_pending_t *p[3];
    for (int i = 0; i < 3; i++) {
        l[i].prev = i ? p[i - 1] : NULL;
        p[i] = caller_call_soon(c, chain_link, &l[i]);
    }
    caller_pending_t *done[3], *not_done[3];
    size_t nd, nn;
    CHECK_RC(caller_wait(p, 3, 10, when, done, &nd, not_done, &nn), 0);
    CHECK_EQ(nd, want_done);
    CHECK_EQ(nn, 3 - want_done);
    for (size_t i = 0; i < nd; i++)
        CHECK_PTR_EQ(done[i], p[i]); /* the chain completes in order */
    for (size_t i = 0; i < nn; i++) {
        CHECK_PTR_EQ(not_done[i], p[nd + i]);
        CHECK_EQ(caller_pending_cancelled(not_done[i]), 0); /* wait cancels nothing */
    }
    for (int i = 2; i >= 0; i--) {
        CHECK_RC(caller_pending_wait(p[i], 10, CALLER_WAIT_PROTECT, NULL), 0);
        caller_pending_unref(p[i]);
    }
    check_stop(c);
}

TEST(wait_first_completed)
{
    run_chain(CALLER_FIRST_COMPLETED, 1);
}

TEST(wait_first_exception)
{
    run_chain(CALLER_FIRST_EXCEPTION, 2);
}

TEST(wait_all_completed)
{
    run_chain(CALLER_ALL_COMPLETED, 3);
}

/* Every item done by the return is in `done`, not only the first seen:
 * with two of three done before the wait, FIRST_COMPLETED gives both
 * (items' order after the one seen first), FIRST_EXCEPTION too. */
TEST(wait_first_completed_reports_every_done_item)
{
    for (int k = 0; k < 2; k++) {
        caller_return_when_t when = k ? CALLER_FIRST_EXCEPTION : CALLER_FIRST_COMPLETED;
        caller_pending_t *p[3] = {caller_pending_new(0), caller_pending_new(0),
                                  caller_pending_new(0)};
        CHECK_RC(caller_pending_set_result(p[0], NULL, 0), 0);
        CHECK_RC(caller_pending_set_exception(p[2], -EIO, "failed"), 0);
        caller_pending_t *done[3], *not_done[3];
        size_t nd, nn;
        CHECK_RC(caller_wait(p, 3, 10, when, done, &nd, not_done, &nn), 0);
        CHECK_EQ(nd, 2);
        CHECK_EQ(nn, 1);
        CHECK_PTR_EQ(not_done[0], p[1]);
        CHECK((done[0] == p[0] && done[1] == p[2]) || (done[0] == p[2] && done[1] == p[0]));
        CHECK_RC(caller_pending_set_result(p[1], NULL, 0), 0);
        for (int i = 0; i < 3; i++)
            caller_pending_unref(p[i]);
    }
}

TEST(wait_timeout_leaves_unfinished)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *p[2] = {caller_call_soon(c, sleeper, P(1)),
                              caller_call_soon(c, sleeper, P(5000))};
    caller_pending_t *done[2], *not_done[2];
    size_t nd, nn;
    double t0 = check_now();
    CHECK_RC(caller_wait(p, 2, 0.1, CALLER_ALL_COMPLETED, done, &nd, not_done, &nn), 0);
    CHECK_GE((check_now() - t0) * 1000, 100 - 1);
    CHECK_EQ(nd, 1);
    CHECK_PTR_EQ(done[0], p[0]);
    CHECK_EQ(nn, 1);
    CHECK_PTR_EQ(not_done[0], p[1]);
    CHECK_EQ(caller_pending_done(p[1]), 0);
    CHECK_EQ(caller_pending_cancelled(p[1]), 0);
    caller_pending_cancel(p[1], NULL);
    caller_pending_wait(p[1], 10, CALLER_WAIT_PROTECT, NULL);
    caller_pending_unref(p[0]);
    caller_pending_unref(p[1]);
    check_stop(c);
}

TEST(iterator_timeout_and_misuse)
{
    caller_pending_t *never = caller_pending_new(0);
    caller_iter_t *it = caller_as_completed(&never, 1, NULL);
    caller_pending_t *q;
    CHECK_RC(caller_iter_next_timeout(it, 0.02, &q), -ETIMEDOUT);
    CHECK_EQ(caller_pending_cancelled(never), 0);
    caller_iter_close(it);
    CHECK_EQ(caller_pending_cancelled(never), 1); /* closed unfinished */
    caller_pending_unref(never);
    CHECK_RC(caller_iter_next(NULL, &q), -EINVAL);
    CHECK(caller_as_completed_gen(NULL, NULL, NULL) == NULL);
    CHECK(caller_as_completed(NULL, 2, NULL) == NULL);
    caller_pending_t *holes[1] = {NULL};
    CHECK(caller_as_completed(holes, 1, NULL) == NULL);
    CHECK_RC(caller_last_error(NULL), -EINVAL);
    caller_iter_close(NULL);
}

/* Many threads complete the items of one iterator at once. */
static void *complete_range(void *arg)
{
    caller_pending_t **p = arg;
    for (int i = 0; i < 1000; i++)
        caller_pending_set_result(p[i], P(i), 0);
    return NULL;
}

TEST(concurrent_completions_each_yielded_once)
{
    enum { T = 4, N = 1000 };
    caller_pending_t **p = malloc(T * N * sizeof *p);
    for (int i = 0; i < T * N; i++)
        p[i] = caller_pending_new(0);
    caller_iter_t *it = caller_as_completed(p, T * N, NULL);
    pthread_t t[T];
    for (int k = 0; k < T; k++)
        pthread_create(&t[k], NULL, complete_range, p + k * N);
    unsigned char *seen = calloc(T * N, 1);
    caller_pending_t *q;
    int n = 0;
    while (caller_iter_next(it, &q) == 0) {
        size_t idx = 0;
        while (p[idx] != q)
            idx++;
        CHECK_EQ(seen[idx], 0);
        seen[idx] = 1;
        caller_pending_unref(q);
        n++;
    }
    caller_iter_close(it);
    for (int k = 0; k < T; k++)
        pthread_join(t[k], NULL);
    CHECK_EQ(n, T * N);
    for (int i = 0; i < T * N; i++)
        caller_pending_unref(p[i]);
    free(p);
    free(seen);
}

/* Regression (found by the fuzzer, a use-after-free under ASan): closing an
 * iterator while its items' wakes are in flight on other threads. Each
 * round completes 8 Pendings in a burst on another Caller while this thread
 * returns from caller_wait at the first one and closes. */
static void *complete_all(void *arg)
{
    caller_pending_t **p = arg;
    for (int i = 0; i < 8; i++)
        caller_pending_set_result(p[i], P(i), 0);
    return NULL;
}

TEST(close_while_wakes_are_in_flight)
{
    caller_t *c = check_new_thread(NULL);
    for (int round = 0; round < 2000; round++) {
        caller_pending_t *p[8], *done[8], *rest[8];
        for (int i = 0; i < 8; i++)
            p[i] = caller_pending_new(0);
        caller_pending_t *t = caller_call_soon(c, complete_all, p);
        size_t nd, nr;
        CHECK_RC(caller_wait(p, 8, 10, CALLER_FIRST_COMPLETED, done, &nd, rest, &nr), 0);
        CHECK_GE(nd, 1);
        CHECK_EQ(nd + nr, 8);
        CHECK_RC(caller_pending_wait(t, 10, 0, NULL), 0);
        caller_pending_unref(t);
        for (int i = 0; i < 8; i++)
            caller_pending_unref(p[i]);
    }
    check_stop(c);
}

/* ---- blocking the thread of the Caller that must do the work ------------- */

static void *ret_arg(void *arg)
{
    return arg;
}

/* A manual Caller's body: lets its earlier call run before it stops. */
static void *await_arg(void *arg)
{
    CHECK_RC(caller_pending_wait(arg, 10, CALLER_WAIT_PROTECT, NULL), 0);
    return NULL;
}

/* A plain wait on a Caller's own thread (here: a manual Caller not run yet)
 * for its own call_soon would never end: -EDEADLK, as caller_pending_wait
 * says, not a timeout. */
TEST(wait_on_a_callers_own_thread_for_its_work_is_deadlock_error)
{
    caller_t *c = caller_create(CALLER_MANUAL, NULL);
    CHECK(c != NULL);
    caller_pending_t *p = caller_call_soon(c, ret_arg, P(1));
    caller_pending_t *other = caller_pending_new(0); /* any thread may complete it */
    caller_pending_t *done[2], *not_done[2];
    size_t nd = 9, nn = 9;
    CHECK_RC(caller_pending_wait(p, 0.2, CALLER_WAIT_PROTECT, NULL), -EDEADLK);
    CHECK_RC(caller_wait(&p, 1, 0.2, CALLER_ALL_COMPLETED, done, &nd, not_done, &nn), -EDEADLK);
    CHECK_CONTAINS(check_last_message(), "caller_wait: blocking the thread of the Caller");
    CHECK_CONTAINS(check_last_message(), "would never end");
    CHECK_EQ(nd, 0);
    CHECK_EQ(nn, 1);
    CHECK_RC(caller_wait(&p, 1, -1, CALLER_FIRST_COMPLETED, done, &nd, not_done, &nn), -EDEADLK);
    /* All must finish and one never can: refused at once. */
    caller_pending_t *both[2] = {p, other};
    CHECK_RC(caller_wait(both, 2, -1, CALLER_ALL_COMPLETED, done, &nd, not_done, &nn), -EDEADLK);
    /* One may finish elsewhere: that wait can end, so it is a wait. */
    CHECK_RC(caller_wait(both, 2, 0.02, CALLER_FIRST_COMPLETED, done, &nd, not_done, &nn), 0);
    CHECK_EQ(nd, 0);
    caller_pending_set_result(other, P(2), 0);
    CHECK_RC(caller_wait(both, 2, -1, CALLER_FIRST_COMPLETED, done, &nd, not_done, &nn), 0);
    CHECK_EQ(nd, 1);
    CHECK_PTR_EQ(done[0], other);
    CHECK_EQ(caller_pending_cancelled(p), 0); /* nothing cancelled */
    /* Once run, it is done and the waits return. */
    CHECK_RC(caller_run(c, await_arg, p, NULL), 0);
    CHECK_RC(caller_wait(&p, 1, -1, CALLER_ALL_COMPLETED, done, &nd, not_done, &nn), 0);
    CHECK_EQ(nd, 1);
    CHECK_RC(caller_pending_result(p, NULL), 0);
    caller_pending_unref(other);
    caller_pending_unref(p);
    caller_unref(c);
}

TEST(iter_next_on_a_callers_own_thread_for_its_work_is_deadlock_error)
{
    caller_t *c = caller_create(CALLER_MANUAL, NULL);
    CHECK(c != NULL);
    caller_pending_t *p = caller_call_soon(c, ret_arg, P(1));
    caller_pending_t *other = caller_pending_new(0);
    caller_pending_t *both[2] = {p, other};
    caller_as_completed_options_t keep = {.keep_unfinished = true};
    caller_iter_t *it = caller_as_completed(both, 2, &keep);
    caller_pending_t *q = NULL;
    /* `other` may still complete: a wait, which times out. */
    CHECK_RC(caller_iter_next_timeout(it, 0.02, &q), -ETIMEDOUT);
    caller_pending_set_result(other, P(2), 0);
    CHECK_RC(caller_iter_next(it, &q), 0);
    CHECK_PTR_EQ(q, other);
    caller_pending_unref(q);
    /* Only this thread's Caller can complete what is left. */
    CHECK_RC(caller_iter_next_timeout(it, 0.2, &q), -EDEADLK);
    CHECK_CONTAINS(check_last_message(), "caller_iter_next: blocking the thread of the Caller");
    CHECK_RC(caller_iter_next(it, &q), -EDEADLK);
    CHECK_PTR_EQ(q, NULL);
    caller_iter_close(it);
    CHECK_EQ(caller_pending_cancelled(p), 0);
    CHECK_RC(caller_run(c, await_arg, p, NULL), 0);
    CHECK_RC(caller_pending_result(p, NULL), 0);
    caller_pending_unref(other);
    caller_pending_unref(p);
    caller_unref(c);
}

/* Inside call_direct (the loop, not a task) the same holds. */
static void direct_waits_on_own_work(void *arg)
{
    caller_pending_t **box = arg;
    caller_t *self = caller_current();
    caller_pending_t *p = caller_call_soon(self, ret_arg, P(1));
    caller_pending_t *done[1], *not_done[1];
    size_t nd, nn;
    int rc1 = caller_wait(&p, 1, 10, CALLER_ALL_COMPLETED, done, &nd, not_done, &nn);
    caller_iter_t *it = caller_as_completed(&p, 1, NULL);
    caller_pending_t *q;
    int rc2 = caller_iter_next_timeout(it, 10, &q);
    caller_iter_close(it); /* cancels p: it never runs */
    caller_pending_unref(p);
    caller_pending_set_result(box[0], P(rc1), 0);
    caller_pending_set_result(box[1], P(rc2), 0);
}

TEST(wait_and_iter_next_in_call_direct_are_deadlock_errors)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *box[2] = {caller_pending_new(0), caller_pending_new(0)};
    CHECK_RC(caller_call_direct(c, direct_waits_on_own_work, box), 0);
    void *v;
    CHECK_RC(caller_pending_wait(box[0], 30, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v), 0);
    CHECK_RC((int)I(v), -EDEADLK);
    CHECK_RC(caller_pending_wait(box[1], 30, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v), 0);
    CHECK_RC((int)I(v), -EDEADLK);
    caller_pending_unref(box[0]);
    caller_pending_unref(box[1]);
    check_stop(c);
}

/* A task suspends instead of blocking: waiting for its own Caller's work is
 * fine there. */
static void *task_waits_on_own_work(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    caller_pending_t *p[2] = {caller_call_soon(self, ret_arg, P(1)),
                              caller_call_soon(self, ret_arg, P(2))};
    caller_pending_t *done[2], *not_done[2];
    size_t nd, nn;
    CHECK_RC(caller_wait(p, 2, 10, CALLER_ALL_COMPLETED, done, &nd, not_done, &nn), 0);
    CHECK_EQ(nd, 2);
    caller_pending_unref(p[0]);
    caller_pending_unref(p[1]);
    return P(nd);
}

TEST(wait_in_a_task_for_its_own_callers_work_suspends)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *p = caller_call_soon(c, task_waits_on_own_work, NULL);
    void *v;
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, &v), 0);
    CHECK_EQ(I(v), 2);
    caller_pending_unref(p);
    check_stop(c);
}

/* The generator hands out items some of which are done already (handed
 * out at once, without watching) while the others are completed by two
 * threads a few items ahead of it, racing with the check: each is yielded
 * once, with its own value, and the limit holds throughout. */
enum { MIX_N = 20000, MIX_AHEAD = 6 };

typedef struct {
    caller_pending_t **items;
    atomic_long made;       /* items handed out by the generator */
    atomic_long unfinished; /* handed out, not done when handed out */
} mix_t;

static caller_pending_t *gen_mix(void *arg)
{
    mix_t *m = arg;
    long i = atomic_load(&m->made);
    if (i >= MIX_N)
        return NULL;
    if (!caller_pending_done(m->items[i]))
        atomic_fetch_add(&m->unfinished, 1);
    atomic_store(&m->made, i + 1);
    return caller_pending_ref(m->items[i]);
}

typedef struct {
    mix_t *m;
    int parity;
} completer_t;

static void *complete_ahead(void *arg)
{
    completer_t *c = arg;
    for (long i = c->parity; i < MIX_N; i += 2) {
        if (i % 5 == 0)
            continue; /* done before the run */
        /* Some only once handed out (so watched), the others up to a few
         * items ahead (most of them done before they are handed out). */
        long after = i % 7 < 3 ? i + 1 : i - MIX_AHEAD;
        while (atomic_load(&c->m->made) < after)
            sched_yield();
        caller_pending_set_result(c->m->items[i], P(i), 0);
    }
    return NULL;
}

TEST(generator_mixing_done_and_racing_items_yields_each_once)
{
    mix_t m = {.items = malloc(MIX_N * sizeof(caller_pending_t *))};
    for (long i = 0; i < MIX_N; i++) {
        m.items[i] = caller_pending_new(0);
        if (i % 5 == 0)
            caller_pending_set_result(m.items[i], P(i), 0);
    }
    completer_t cs[2] = {{&m, 0}, {&m, 1}};
    pthread_t th[2];
    for (int k = 0; k < 2; k++)
        CHECK_EQ(pthread_create(&th[k], NULL, complete_ahead, &cs[k]), 0);
    caller_iter_t *it =
        caller_as_completed_gen(gen_mix, &m, &(caller_as_completed_options_t){.max_concurrent = 4});
    unsigned char *seen = calloc(MIX_N, 1);
    caller_pending_t *q;
    long n = 0;
    while (caller_iter_next(it, &q) == 0) {
        void *v;
        CHECK_RC(caller_pending_result(q, &v), 0);
        long idx = (long)(intptr_t)v;
        CHECK(idx >= 0 && idx < MIX_N);
        CHECK(m.items[idx] == q);
        CHECK_EQ(seen[idx], 0);
        seen[idx] = 1;
        /* Never more than the limit handed out and not yet yielded. */
        CHECK_LE(atomic_load(&m.made) - n, 4);
        caller_pending_unref(q);
        n++;
    }
    caller_iter_close(it);
    for (int k = 0; k < 2; k++)
        pthread_join(th[k], NULL);
    CHECK_EQ(n, MIX_N);
    /* The premise: a good part was not done when handed out (so watched);
     * every fifth was done before the run (so handed out at once); how
     * many of the others were done first depends on the machine's load. */
    CHECK_GE(atomic_load(&m.unfinished), MIX_N / 4);
    for (long i = 0; i < MIX_N; i++)
        caller_pending_unref(m.items[i]);
    free(m.items);
    free(seen);
}

/* Items are yielded in the order they completed even when the consumer
 * takes them late: one done before the first call, then two completed
 * between calls in the order 2, 0; from a fixed set and from a generator. */
typedef struct {
    caller_pending_t **items;
    int next;
} array_gen_t;

static caller_pending_t *gen_array(void *arg)
{
    array_gen_t *g = arg;
    return g->next < 3 ? caller_pending_ref(g->items[g->next++]) : NULL;
}

TEST(order_of_completion_kept_for_a_slow_consumer)
{
    for (int use_gen = 0; use_gen < 2; use_gen++) {
        caller_pending_t *p[3];
        for (int i = 0; i < 3; i++)
            p[i] = caller_pending_new(0);
        array_gen_t g = {p, 0};
        caller_iter_t *it =
            use_gen ? caller_as_completed_gen(gen_array, &g,
                                              &(caller_as_completed_options_t){.max_concurrent = 3})
                    : caller_as_completed(p, 3, NULL);
        caller_pending_set_result(p[1], P(1), 0);
        caller_pending_t *q;
        CHECK_RC(caller_iter_next(it, &q), 0);
        CHECK_PTR_EQ(q, p[1]);
        caller_pending_unref(q);
        caller_pending_set_result(p[2], P(2), 0);
        caller_pending_set_result(p[0], P(0), 0);
        CHECK_RC(caller_iter_next(it, &q), 0);
        CHECK_PTR_EQ(q, p[2]);
        caller_pending_unref(q);
        CHECK_RC(caller_iter_next(it, &q), 0);
        CHECK_PTR_EQ(q, p[0]);
        caller_pending_unref(q);
        CHECK_RC(caller_iter_next(it, &q), CALLER_ITER_END);
        caller_iter_close(it);
        for (int i = 0; i < 3; i++)
            caller_pending_unref(p[i]);
    }
}

/* A set large enough for its entries to come from one large area: 30 000
 * items, a third done before, the rest completed by another thread while
 * they are collected; each yielded once. */
static void *complete_odd_thirds(void *arg)
{
    caller_pending_t **p = arg;
    for (int i = 0; i < 30000; i++)
        if (i % 3 != 0)
            caller_pending_set_result(p[i], P(i), 0);
    return NULL;
}

TEST(large_set_each_yielded_once)
{
    enum { N = 30000 };
    caller_pending_t **p = malloc(N * sizeof *p);
    for (int i = 0; i < N; i++) {
        p[i] = caller_pending_new(0);
        if (i % 3 == 0)
            caller_pending_set_result(p[i], P(i), 0);
    }
    caller_iter_t *it = caller_as_completed(p, N, NULL);
    pthread_t th;
    CHECK_EQ(pthread_create(&th, NULL, complete_odd_thirds, p), 0);
    unsigned char *seen = calloc(N, 1);
    caller_pending_t *q;
    int n = 0;
    while (caller_iter_next(it, &q) == 0) {
        void *v;
        CHECK_RC(caller_pending_result(q, &v), 0);
        CHECK(I(v) >= 0 && I(v) < N && p[I(v)] == q);
        CHECK_EQ(seen[I(v)], 0);
        seen[I(v)] = 1;
        caller_pending_unref(q);
        n++;
    }
    caller_iter_close(it);
    CHECK_EQ(pthread_join(th, NULL), 0);
    CHECK_EQ(n, N);
    for (int i = 0; i < N; i++)
        caller_pending_unref(p[i]);
    free(p);
    free(seen);
}

/* A fixed set's items done before the first call come first, in index
 * order (they need no waiter); the rest follow in the order they complete. */
static void check_done_first_then_completion_order(bool fail_the_index)
{
    enum { N = 100 };
    caller_pending_t *p[N];
    for (int i = 0; i < N; i++) {
        p[i] = caller_pending_new(0);
        CHECK(p[i] != NULL);
        if (i % 2 == 0)
            CHECK_RC(caller_pending_set_result(p[i], P(i), 0), 0);
    }
#if CALLER_TESTING
    if (fail_the_index)
        caller__alloc_fail_after(2); /* the iterator, its items, then this one */
#else
    (void)fail_the_index;
#endif
    caller_iter_t *it = caller_as_completed(p, N, NULL);
#if CALLER_TESTING
    caller__alloc_fail_after(-1);
#endif
    CHECK(it != NULL);
    caller_pending_t *q;
    for (int i = 0; i < N; i += 2) {
        CHECK_RC(caller_iter_next(it, &q), 0);
        CHECK_PTR_EQ(q, p[i]);
        caller_pending_unref(q);
    }
    /* Nothing else is done: it would block. */
    CHECK_RC(caller_iter_next_timeout(it, 0, &q), -ETIMEDOUT);
    for (int i = N - 1; i > 0; i -= 2)
        CHECK_RC(caller_pending_set_result(p[i], P(i), 0), 0);
    for (int i = N - 1; i > 0; i -= 2) {
        CHECK_RC(caller_iter_next(it, &q), 0);
        CHECK_PTR_EQ(q, p[i]);
        caller_pending_unref(q);
    }
    CHECK_RC(caller_iter_next(it, &q), CALLER_ITER_END);
    caller_iter_close(it);
    for (int i = 0; i < N; i++)
        caller_pending_unref(p[i]);
}

TEST(fixed_set_done_items_first_in_order_then_as_they_complete)
{
    check_done_first_then_completion_order(false);
}

TEST(fixed_set_order_kept_without_memory_for_the_done_index)
{
    check_done_first_then_completion_order(true);
}

/* ---- results that are always there already --------------------------------- */

/* A generator of Pendings done as they are made, until told to stop. */
typedef struct {
    atomic_bool stop; /* set by another task of the same Caller */
    long made;
} endless_t;

static caller_pending_t *gen_done(void *arg)
{
    endless_t *e = arg;
    if (atomic_load(&e->stop))
        return NULL;
    caller_pending_t *p = caller_pending_new(0);
    if (p)
        caller_pending_set_result(p, P(1), 0);
    e->made++;
    return p;
}

/* Iterates until the generator ends (1) or a generous deadline passes (0):
 * every caller_iter_next finds a result there and need not wait. */
static void *iterate_done_results(void *arg)
{
    endless_t *e = arg;
    double give_up = check_now() + 20 * check_time_scale();
    caller_iter_t *it = caller_as_completed_gen(gen_done, e, NULL);
    caller_pending_t *q;
    int rc;
    while ((rc = caller_iter_next(it, &q)) == 0) {
        caller_pending_unref(q);
        if (check_now() > give_up)
            break;
    }
    caller_iter_close(it);
    return P(rc == CALLER_ITER_END);
}

static void *set_stop(void *arg)
{
    atomic_store(&((endless_t *)arg)->stop, true);
    return NULL;
}

/* The iterating task never has to wait, yet its loop still turns: the task
 * queued after it runs (and ends the iteration). Before, it ran only once
 * the iterating task gave up, 20 s later. */
TEST(iterating_results_already_there_lets_the_loop_turn)
{
    caller_t *c = check_new_thread(NULL);
    endless_t e = {0};
    caller_pending_t *it = caller_call_soon(c, iterate_done_results, &e);
    caller_pending_t *other = caller_call_soon(c, set_stop, &e);
    void *v;
    CHECK_RC(caller_pending_wait(it, 60 * check_time_scale(), CALLER_WAIT_RESULT, &v), 0);
    CHECK_EQ(I(v), 1); /* ended by the other task, not by the deadline */
    CHECK_EQ(caller_pending_done(other), 1);
    CHECK(e.made > 1); /* it did iterate before the other task ran */
    caller_pending_unref(it);
    caller_pending_unref(other);
    check_stop(c);
}

typedef struct {
    caller_pending_t *done; /* a Pending already done */
    int rc;
    caller_pending_t *got;
} cancelled_next_t;

static void *next_after_own_cancel(void *arg)
{
    cancelled_next_t *x = arg;
    caller_iter_t *it = caller_as_completed(&x->done, 1, NULL);
    caller_pending_cancel(caller_current_pending(), "stop iterating");
    x->got = P(1);
    x->rc = caller_iter_next(it, &x->got);
    caller_iter_close(it);
    return NULL;
}

/* caller_iter_next is a suspension point even with a result there: a
 * cancelled task gets -ECANCELED (and no Pending), as from a wait. */
TEST(cancelled_task_stops_at_iter_next_with_a_result_there)
{
    caller_t *c = check_new_thread(NULL);
    cancelled_next_t x = {.done = caller_pending_new(0)};
    CHECK_RC(caller_pending_set_result(x.done, P(7), 0), 0);
    caller_pending_t *p = caller_call_soon(c, next_after_own_cancel, &x);
    CHECK_RC(caller_pending_wait(p, 20 * check_time_scale(), CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_EQ(caller_pending_cancelled(p), 1);
    CHECK_RC(x.rc, -ECANCELED);
    CHECK_PTR_EQ(x.got, NULL);
    CHECK_EQ(caller_pending_cancelled(x.done), 0); /* done already: left alone */
    caller_pending_unref(p);
    caller_pending_unref(x.done);
    check_stop(c);
}

/* Closing before every done item was taken: those left are neither
 * cancelled nor leaked (the harness checks that no Pending is left). */
TEST(close_with_done_items_not_taken)
{
    enum { N = 64 };
    caller_pending_t *p[N];
    for (int i = 0; i < N; i++) {
        p[i] = caller_pending_new(0);
        CHECK(p[i] != NULL);
        if (i != 5)
            CHECK_RC(caller_pending_set_result(p[i], P(i), 0), 0);
    }
    caller_iter_t *it = caller_as_completed(p, N, NULL);
    CHECK(it != NULL);
    caller_pending_t *q;
    for (int i = 0; i < 3; i++) {
        CHECK_RC(caller_iter_next(it, &q), 0);
        CHECK_PTR_EQ(q, p[i]);
        caller_pending_unref(q);
    }
    caller_iter_close(it);
    for (int i = 0; i < N; i++) {
        CHECK_EQ(caller_pending_cancelled(p[i]), i == 5);
        caller_pending_unref(p[i]);
    }
}

#if CALLER_TESTING
/* Items already done need no entry: iterating a set of them allocates
 * nothing (an entry per item took memory for the whole set before). */
TEST(fixed_set_of_done_items_is_iterated_without_allocating)
{
    enum { N = 100 };
    caller_pending_t *p[N];
    for (int i = 0; i < N; i++) {
        p[i] = caller_pending_new(0);
        CHECK(p[i] != NULL);
        CHECK_RC(caller_pending_set_result(p[i], P(i), 0), 0);
    }
    caller_iter_t *it = caller_as_completed(p, N, NULL);
    CHECK(it != NULL);
    caller__alloc_fail_after(1000000); /* counts allocations, fails none here */
    long before = caller__alloc_count();
    caller_pending_t *q;
    for (int i = 0; i < N; i++) {
        CHECK_RC(caller_iter_next(it, &q), 0);
        CHECK_PTR_EQ(q, p[i]);
        caller_pending_unref(q);
    }
    CHECK_RC(caller_iter_next(it, &q), CALLER_ITER_END);
    long made = caller__alloc_count() - before;
    caller__alloc_fail_after(-1);
    CHECK_EQ(made, 0);
    caller_iter_close(it);
    for (int i = 0; i < N; i++)
        caller_pending_unref(p[i]);
}
#endif
