/* Execution queues (SPEC §7; issue #5). */
// ALSO-UCONTEXT
// TIMEOUT: 120
#include "check.h"
#include "internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

static atomic_int ran, first_rc;
static caller_pending_t *first_started; /* set when item 0 runs */

/* Item 0 suspends forever (until cancelled); the others count. */
static void *item_first_blocks(void *arg)
{
    if (I(arg) == 0) {
        if (first_started)
            caller_pending_set_result(first_started, NULL, false);
        atomic_store(&first_rc, caller_sleep(1e6));
        return NULL;
    }
    atomic_fetch_add(&ran, 1);
    return arg;
}

TEST(first_item_suspends_close_ends_the_queue_twice)
{
    caller_t *c = check_new_thread(NULL);
    for (int round = 0; round < 2; round++) {
        atomic_store(&ran, 0);
        atomic_store(&first_rc, 1);
        first_started = caller_pending_new(0);
        caller_pending_t *p[10];
        for (int i = 0; i < 10; i++) {
            p[i] = caller_queue_call(c, item_first_blocks, P(i));
            CHECK(p[i] != NULL);
            CHECK_PTR_EQ(p[i], p[0]); /* one queue, one Pending */
        }
        CHECK_RC(caller_pending_wait(first_started, 10, false, false, NULL), 0);
        caller_pending_unref(first_started);
        first_started = NULL;
        caller_pending_t *g = caller_queue_get(c, item_first_blocks);
        CHECK_PTR_EQ(g, p[0]);
        caller_pending_unref(g);
        CHECK_EQ(caller_queue_close(c, item_first_blocks), 1);
        CHECK(caller_queue_get(c, item_first_blocks) == NULL);
        CHECK_RC(caller_pending_wait(p[0], 10, true, false, NULL), 0);
        CHECK_RC(caller_pending_result(p[0], NULL), -ECANCELED);
        CHECK_RC(atomic_load(&first_rc), -ECANCELED); /* the running item saw it */
        CHECK_EQ(atomic_load(&ran), 0);               /* the rest never ran */
        CHECK_EQ(caller_queue_close(c, item_first_blocks), 0);
        for (int i = 0; i < 10; i++)
            caller_pending_unref(p[i]);
    }
    check_stop(c);
}

static void *pass_through(void *arg)
{
    return arg;
}

/* From a task on the queue's Caller: the queue cannot drain before this task
 * waits, so the wait sees the round's last result. */
static void *rounds(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    caller_pending_t *q = NULL;
    for (int i = 0; i < 10; i++) {
        caller_pending_t *p = caller_queue_call(self, pass_through, P(i));
        caller_pending_unref(q);
        q = p;
    }
    void *v;
    CHECK_RC(caller_pending_wait(q, 10, false, true, &v), 0);
    CHECK_EQ(I(v), 9);
    CHECK_EQ(caller_pending_done(q), 0); /* reset: a new round can start */
    for (int i = 100; i < 105; i++)
        caller_pending_unref(caller_queue_call(self, pass_through, P(i)));
    CHECK_RC(caller_pending_wait(q, 10, false, true, &v), 0);
    CHECK_EQ(I(v), 104);
    caller_queue_close(self, pass_through);
    caller_pending_unref(q);
    return NULL;
}

TEST(drained_queue_gives_last_result_each_round)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *p = caller_call_soon(c, rounds, NULL);
    CHECK_RC(caller_pending_wait(p, 10, false, true, NULL), 0);
    caller_pending_unref(p);
    check_stop(c);
}

typedef struct {
    char messages[4][256];
    atomic_int n;
} log_capture_t;

static void capture_log(void *arg, int level, const char *message)
{
    (void)level;
    log_capture_t *lc = arg;
    int i = atomic_load(&lc->n);
    if (i < 4) {
        snprintf(lc->messages[i], sizeof lc->messages[i], "%s", message);
        atomic_store(&lc->n, i + 1);
    }
}

static void *maybe_fail(void *arg)
{
    if (I(arg) == 1)
        caller_raise(-EIO, "item one broke");
    return arg;
}

static void *fail_round(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    caller_pending_t *q = NULL;
    for (int i = 0; i < 3; i++) {
        caller_pending_unref(q);
        q = caller_queue_call(self, maybe_fail, P(i));
    }
    void *v;
    CHECK_RC(caller_pending_wait(q, 10, false, true, &v), 0);
    CHECK_EQ(I(v), 2); /* the item after the failing one ran */
    caller_queue_close(self, maybe_fail);
    caller_pending_unref(q);
    return NULL;
}

TEST(failing_item_is_logged_and_skipped)
{
    log_capture_t lc = {0};
    caller_t *c =
        caller_create(CALLER_NEW_THREAD, &(caller_options_t){.log = capture_log, .log_arg = &lc});
    caller_pending_t *p = caller_call_soon(c, fail_round, NULL);
    CHECK_RC(caller_pending_wait(p, 10, false, true, NULL), 0);
    caller_pending_unref(p);
    CHECK_EQ(atomic_load(&lc.n), 1);
    CHECK_CONTAINS(lc.messages[0], "Execution of maybe_fail");
    CHECK_CONTAINS(lc.messages[0], "failed");
    CHECK_CONTAINS(lc.messages[0], "item one broke");
    check_stop(c);
}

typedef struct {
    caller_t *target;
    caller_pending_t *ran_on; /* set by the item: the Caller it ran on */
} relay_t;

static void *report_caller(void *arg)
{
    relay_t *r = arg;
    caller_pending_set_result(r->ran_on, caller_current(), false);
    return NULL;
}

static void *queue_from_worker(void *arg)
{
    relay_t *r = arg;
    CHECK(caller_current() != r->target); /* we are on a worker */
    caller_pending_t *q = caller_queue_call(r->target, report_caller, r);
    CHECK(q != NULL);
    caller_pending_unref(q);
    return NULL;
}

TEST(queue_call_from_a_worker_runs_on_the_caller)
{
    caller_t *c = check_new_thread(NULL);
    relay_t r = {c, caller_pending_new(0)};
    caller_pending_t *w = caller_to_thread(c, queue_from_worker, &r);
    CHECK_RC(caller_pending_wait(w, 10, false, true, NULL), 0);
    caller_pending_unref(w);
    void *who = NULL;
    CHECK_RC(caller_pending_wait(r.ran_on, 10, false, true, &who), 0);
    CHECK_PTR_EQ(who, c);
    caller_pending_unref(r.ran_on);
    CHECK_EQ(caller_queue_close(c, report_caller), 1);
    check_stop(c);
}

TEST(cancelling_the_queue_pending_ends_the_queue)
{
    caller_t *c = check_new_thread(NULL);
    atomic_store(&ran, 0);
    atomic_store(&first_rc, 1);
    first_started = caller_pending_new(0);
    caller_pending_t *p = caller_queue_call(c, item_first_blocks, P(0));
    caller_pending_unref(caller_queue_call(c, item_first_blocks, P(1)));
    CHECK_RC(caller_pending_wait(first_started, 10, false, false, NULL), 0);
    caller_pending_unref(first_started);
    first_started = NULL;
    CHECK_EQ(caller_pending_cancel(p, "enough"), 1);
    CHECK_RC(caller_pending_wait(p, 10, true, false, NULL), 0);
    CHECK_RC(caller_pending_result(p, NULL), -ECANCELED);
    CHECK_RC(atomic_load(&first_rc), -ECANCELED);
    CHECK_EQ(atomic_load(&ran), 0);
    CHECK(caller_queue_get(c, item_first_blocks) == NULL);
    /* A new call starts a fresh queue. */
    caller_pending_t *fresh = caller_queue_call(c, item_first_blocks, P(5));
    CHECK(fresh != p);
    CHECK_EQ(caller_queue_close(c, item_first_blocks), 1);
    caller_pending_wait(fresh, 10, true, false, NULL);
    caller_pending_unref(fresh);
    caller_pending_unref(p);
    check_stop(c);
}

static void *sleep_long(void *arg)
{
    caller_sleep(1e6);
    return arg;
}

TEST(stopping_the_caller_closes_every_queue)
{
    caller_t *c = check_new_thread(NULL);
    int keys[3];
    caller_pending_t *p[3];
    for (int i = 0; i < 3; i++)
        p[i] = caller_queue_call_key(c, &keys[i], sleep_long, P(i));
    check_stop(c);
    for (int i = 0; i < 3; i++) {
        CHECK_EQ(caller_pending_done(p[i]), 1);
        CHECK_RC(caller_pending_result(p[i], NULL), -ECANCELED);
        caller_pending_unref(p[i]);
    }
}

static void *record_key(void *arg)
{
    int *slot = arg;
    (*slot)++;
    return arg;
}

TEST(two_keys_are_two_queues)
{
    caller_t *c = check_new_thread(NULL);
    int a = 0, b = 0, ka, kb;
    atomic_store(&first_rc, 1);
    /* Queue A is held by a suspended item; queue B still runs. */
    caller_pending_t *qa = caller_queue_call_key(c, &ka, item_first_blocks, P(0));
    caller_pending_unref(caller_queue_call_key(c, &ka, record_key, &a));
    caller_pending_t *qb = caller_queue_call_key(c, &kb, record_key, &b);
    CHECK(qa != qb);
    void *v;
    for (;;) { /* until B's round is over */
        CHECK_RC(caller_pending_wait(qb, 10, false, true, &v), 0);
        if (v == &b)
            break;
    }
    caller_pending_t *probe = caller_call_soon(c, pass_through, NULL);
    caller_pending_wait(probe, 10, false, false, NULL);
    caller_pending_unref(probe);
    CHECK_EQ(a, 0);
    CHECK_EQ(b, 1);
    CHECK_EQ(caller_queue_close_key(c, &ka), 1);
    CHECK_EQ(caller_queue_close_key(c, &kb), 1);
    caller_pending_wait(qa, 10, true, false, NULL);
    caller_pending_unref(qa);
    caller_pending_unref(qb);
    check_stop(c);
}

enum { BURST_THREADS = 4, BURST_N = 50000 };

static struct {
    caller_t *c;
    int last[BURST_THREADS]; /* in the Caller's thread only */
    long ran;
} burst;

static void *burst_item(void *arg)
{
    intptr_t v = I(arg);
    int t = (int)(v / BURST_N), seq = (int)(v % BURST_N);
    CHECK_EQ(burst.last[t] + 1, seq);
    burst.last[t] = seq;
    burst.ran++;
    return arg;
}

static void *burst_thread(void *arg)
{
    intptr_t t = I(arg);
    for (int i = 0; i < BURST_N; i++) {
        caller_pending_t *q = caller_queue_call(burst.c, burst_item, P(t * BURST_N + i));
        CHECK(q != NULL);
        caller_pending_unref(q);
    }
    return NULL;
}

static void *read_burst(void *arg)
{
    (void)arg;
    return P(burst.ran);
}

static void *queue_then_read(void *arg)
{
    (void)arg;
    /* Runs after every earlier item of the queue. */
    return P(burst.ran);
}

TEST(four_threads_50k_items_into_one_queue)
{
    caller_t *c = check_new_thread(NULL);
    memset(&burst, 0, sizeof burst);
    burst.c = c;
    for (int i = 0; i < BURST_THREADS; i++)
        burst.last[i] = -1;
    pthread_t t[BURST_THREADS];
    for (intptr_t i = 0; i < BURST_THREADS; i++)
        pthread_create(&t[i], NULL, burst_thread, P(i));
    for (int i = 0; i < BURST_THREADS; i++)
        pthread_join(t[i], NULL);
    /* A last item on another key would not wait for this queue: add one to
     * the same queue (key burst_item) whose function reads the count. */
    caller_pending_t *q = caller_queue_call_key(c, (const void *)burst_item, queue_then_read, NULL);
    caller_pending_unref(q);
    /* The burst queue drains; wait for a round whose result is the last item
     * of some thread, then check totals in the Caller's thread. */
    for (;;) {
        caller_pending_t *probe = caller_call_soon(c, read_burst, NULL);
        void *v;
        CHECK_RC(caller_pending_wait(probe, 10, false, true, &v), 0);
        caller_pending_unref(probe);
        if (I(v) == (long)BURST_THREADS * BURST_N)
            break;
        caller_pending_t *g = caller_queue_get(c, burst_item);
        CHECK(g != NULL);
        caller_pending_wait(g, 10, false, false, NULL);
        caller_pending_unref(g);
    }
    for (int i = 0; i < BURST_THREADS; i++)
        CHECK_EQ(burst.last[i], BURST_N - 1);
    caller_queue_close(c, burst_item);
    caller_queue_close_key(c, (const void *)burst_item);
    check_stop(c);
}

TEST(misuse)
{
    CHECK(caller_queue_call(NULL, pass_through, NULL) == NULL);
    CHECK_RC(caller_last_error(NULL), -EINVAL);
    CHECK(caller_queue_call_key(NULL, "k", pass_through, NULL) == NULL);
    CHECK(caller_queue_get(NULL, pass_through) == NULL);
    CHECK_RC(caller_queue_close(NULL, pass_through), -EINVAL);
    caller_t *c = check_new_thread(NULL);
    CHECK(caller_queue_call_key(c, NULL, pass_through, NULL) == NULL);
    CHECK(caller_queue_get(c, pass_through) == NULL);
    CHECK_EQ(caller_queue_close(c, pass_through), 0);
    caller_stop(c, false);
    CHECK(caller_queue_call(c, pass_through, NULL) == NULL);
    CHECK_RC(caller_last_error(NULL), -ESHUTDOWN);
    CHECK_RC(caller_wait_stopped(c, 10), 0);
    caller_unref(c);
}
