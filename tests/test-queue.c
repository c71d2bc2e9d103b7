/* Execution queues (SPEC §7; issue #5). */
// ALSO-UCONTEXT
// TIMEOUT: 120
#include "check.h"
#include "internal.h"
#include "keyindex.h"
#include "testpoint.h"

#include <errno.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdint.h>

static atomic_int ran, first_rc;
static caller_pending_t *first_started; /* set when item 0 runs */

/* Item 0 suspends forever (until cancelled); the others count. */
static void *item_first_blocks(void *arg)
{
    if (I(arg) == 0) {
        if (first_started)
            caller_pending_set_result(first_started, NULL, 0);
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
        CHECK_RC(caller_pending_wait(first_started, 10, 0, NULL), 0);
        caller_pending_unref(first_started);
        first_started = NULL;
        caller_pending_t *g = caller_queue_get(c, item_first_blocks);
        CHECK_PTR_EQ(g, p[0]);
        caller_pending_unref(g);
        CHECK_EQ(caller_queue_close(c, item_first_blocks), 1);
        CHECK(caller_queue_get(c, item_first_blocks) == NULL);
        CHECK_RC(caller_pending_wait(p[0], 10, CALLER_WAIT_PROTECT, NULL), 0);
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
    CHECK_RC(caller_pending_wait(q, 10, CALLER_WAIT_RESULT, &v), 0);
    CHECK_EQ(I(v), 9);
    CHECK_EQ(caller_pending_done(q), 0); /* reset: a new round can start */
    for (int i = 100; i < 105; i++)
        caller_pending_unref(caller_queue_call(self, pass_through, P(i)));
    CHECK_RC(caller_pending_wait(q, 10, CALLER_WAIT_RESULT, &v), 0);
    CHECK_EQ(I(v), 104);
    caller_queue_close(self, pass_through);
    caller_pending_unref(q);
    return NULL;
}

TEST(drained_queue_gives_last_result_each_round)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *p = caller_call_soon(c, rounds, NULL);
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, NULL), 0);
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
    CHECK_RC(caller_pending_wait(q, 10, CALLER_WAIT_RESULT, &v), 0);
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
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, NULL), 0);
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
    caller_pending_set_result(r->ran_on, caller_current(), 0);
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
    CHECK_RC(caller_pending_wait(w, 10, CALLER_WAIT_RESULT, NULL), 0);
    caller_pending_unref(w);
    void *who = NULL;
    CHECK_RC(caller_pending_wait(r.ran_on, 10, CALLER_WAIT_RESULT, &who), 0);
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
    CHECK_RC(caller_pending_wait(first_started, 10, 0, NULL), 0);
    caller_pending_unref(first_started);
    first_started = NULL;
    CHECK_EQ(caller_pending_cancel(p, "enough"), 1);
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_RC(caller_pending_result(p, NULL), -ECANCELED);
    CHECK_RC(atomic_load(&first_rc), -ECANCELED);
    CHECK_EQ(atomic_load(&ran), 0);
    CHECK(caller_queue_get(c, item_first_blocks) == NULL);
    /* A new call starts a fresh queue. */
    caller_pending_t *fresh = caller_queue_call(c, item_first_blocks, P(5));
    CHECK(fresh != p);
    CHECK_EQ(caller_queue_close(c, item_first_blocks), 1);
    caller_pending_wait(fresh, 10, CALLER_WAIT_PROTECT, NULL);
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
        CHECK_RC(caller_pending_wait(qb, 10, CALLER_WAIT_RESULT, &v), 0);
        if (v == &b)
            break;
    }
    caller_pending_t *probe = caller_call_soon(c, pass_through, NULL);
    caller_pending_wait(probe, 10, 0, NULL);
    caller_pending_unref(probe);
    CHECK_EQ(a, 0);
    CHECK_EQ(b, 1);
    CHECK_EQ(caller_queue_close_key(c, &ka), 1);
    CHECK_EQ(caller_queue_close_key(c, &kb), 1);
    caller_pending_wait(qa, 10, CALLER_WAIT_PROTECT, NULL);
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
        CHECK_RC(caller_pending_wait(probe, 10, CALLER_WAIT_RESULT, &v), 0);
        caller_pending_unref(probe);
        if (I(v) == (long)BURST_THREADS * BURST_N)
            break;
        caller_pending_t *g = caller_queue_get(c, burst_item);
        CHECK(g != NULL);
        caller_pending_wait(g, 10, 0, NULL);
        caller_pending_unref(g);
    }
    for (int i = 0; i < BURST_THREADS; i++)
        CHECK_EQ(burst.last[i], BURST_N - 1);
    caller_queue_close(c, burst_item);
    caller_queue_close_key(c, (const void *)burst_item);
    check_stop(c);
}

/* ---- rounds: a wait wakes only after the items it queued ran ------------ */

/*
 * The queue's task decides "empty" under the Caller's lock and completes
 * the queue's Pending (with reset) only after unlocking. A thread that
 * queues an item and waits inside that gap, or while that completion's done
 * callbacks run, belongs to the next round: it must not be woken by the
 * drain that did not see its item. Each window is held open: at the test
 * point "queue.empty" (the gap) or in a done callback of the queue's
 * Pending, until the test point "pending.waiter" says the waiter joined.
 */
static struct {
    _Atomic(caller_pending_t *) q; /* the queue's Pending (hooks read it) */
    atomic_int hold_empty, hold_join;
    sem_t held, joined;
    atomic_int ran[2];
} win;

static void win_hook(const char *point, void *obj)
{
    if (obj != atomic_load(&win.q))
        return;
    if (strcmp(point, "queue.empty") == 0 && atomic_exchange(&win.hold_empty, 0)) {
        sem_post(&win.held); /* in the gap: hold it until the waiter joined */
        check_sem_wait(&win.joined);
    } else if (strcmp(point, "pending.waiter") == 0 && atomic_exchange(&win.hold_join, 0)) {
        sem_post(&win.joined);
    }
}

/* The first item: holds the queue until the test has set up the window. */
static void *win_gated(void *arg)
{
    CHECK_RC(caller_pending_wait(arg, 10 * check_time_scale(), CALLER_WAIT_PROTECT, NULL), 0);
    atomic_store(&win.ran[0], 1);
    return P(100);
}

static void *win_second(void *arg)
{
    atomic_store(&win.ran[1], 1);
    return arg;
}

/* A done callback of the queue's Pending, in its first drain only. */
static void win_hold_in_callback(caller_pending_t *p, void *arg)
{
    (void)arg;
    CHECK_EQ(caller_pending_done(p), 1);
    sem_post(&win.held);
    check_sem_wait(&win.joined);
}

/* Queue a gated first item (with the window armed), open the gate, and
 * once the window is held queue a second item and wait: the wait must end
 * with the second item's result, after it ran. */
static void queue_and_wait_in_window(bool in_callback)
{
    caller_t *c = check_new_thread(NULL);
    int key;
    memset(win.ran, 0, sizeof win.ran);
    CHECK_EQ(sem_init(&win.held, 0, 0), 0);
    CHECK_EQ(sem_init(&win.joined, 0, 0), 0);
    caller_pending_t *gate = caller_pending_new(0);
    caller_pending_t *q = caller_queue_call_key(c, &key, win_gated, gate);
    CHECK(q != NULL);
    atomic_store(&win.q, q);
    if (in_callback)
        CHECK_RC(caller_pending_add_done_callback(q, win_hold_in_callback, NULL), 0);
    else
        atomic_store(&win.hold_empty, 1);
    atomic_store(&caller__test_hook, win_hook);
    CHECK_RC(caller_pending_set_result(gate, NULL, 0), 0);

    check_sem_wait(&win.held); /* the first drain is under way */
    CHECK_EQ(atomic_load(&win.ran[0]), 1);
    caller_pending_t *q2 = caller_queue_call_key(c, &key, win_second, P(2));
    CHECK_PTR_EQ(q2, q);
    atomic_store(&win.hold_join, 1);
    void *v = NULL;
    CHECK_RC(caller_pending_wait(q, 10 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v),
             0);
    int second_ran = atomic_load(&win.ran[1]);
    atomic_store(&caller__test_hook, NULL);
    CHECK_EQ(atomic_load(&win.hold_join), 0); /* the wait did join in the window */
    CHECK_EQ(I(v), 2);                        /* not the first drain's 100 */
    CHECK_EQ(second_ran, 1);

    CHECK_EQ(caller_queue_close_key(c, &key), 1);
    caller_pending_unref(q2);
    atomic_store(&win.q, NULL);
    caller_pending_unref(q);
    caller_pending_unref(gate);
    sem_destroy(&win.held);
    sem_destroy(&win.joined);
    check_stop(c);
}

TEST(wait_queued_after_the_empty_decision_waits_for_its_item)
{
    queue_and_wait_in_window(false);
}

TEST(wait_queued_during_the_drain_callbacks_waits_for_its_item)
{
    queue_and_wait_in_window(true);
}

/* The same rule, run free: threads each queue an item and wait, many
 * times; a wait that ends before its own item ran is a violation. */
enum { ROUND_THREADS = 3, ROUND_WAITS = 20000 };

static struct {
    caller_t *c;
    int key;
    atomic_char ran[ROUND_THREADS * ROUND_WAITS];
    atomic_long violations;
} rounds_run;

static void *mark_ran(void *arg)
{
    atomic_store_explicit(&rounds_run.ran[I(arg)], 1, memory_order_relaxed);
    return arg;
}

static void *queue_and_wait_loop(void *arg)
{
    intptr_t t = I(arg);
    for (int i = 0; i < ROUND_WAITS; i++) {
        intptr_t slot = t * ROUND_WAITS + i;
        caller_pending_t *q =
            caller_queue_call_key(rounds_run.c, &rounds_run.key, mark_ran, P(slot));
        CHECK(q != NULL);
        CHECK_RC(caller_pending_wait(q, 10 * check_time_scale(), CALLER_WAIT_PROTECT, NULL), 0);
        /* The wake's acquire orders the item's store before this load. */
        if (!atomic_load_explicit(&rounds_run.ran[slot], memory_order_relaxed))
            atomic_fetch_add(&rounds_run.violations, 1);
        caller_pending_unref(q);
    }
    return NULL;
}

TEST(three_threads_queue_and_wait_60k_times)
{
    memset(&rounds_run, 0, sizeof rounds_run);
    rounds_run.c = check_new_thread(NULL);
    double t0 = check_now();
    pthread_t t[ROUND_THREADS];
    for (intptr_t i = 0; i < ROUND_THREADS; i++)
        CHECK_EQ(pthread_create(&t[i], NULL, queue_and_wait_loop, P(i)), 0);
    for (int i = 0; i < ROUND_THREADS; i++)
        CHECK_EQ(pthread_join(t[i], NULL), 0);
    printf("%d waits, %ld ended before their item ran, %.2f s\n", ROUND_THREADS * ROUND_WAITS,
           atomic_load(&rounds_run.violations), check_now() - t0);
    CHECK_EQ(atomic_load(&rounds_run.violations), 0);
    CHECK_EQ(caller_queue_close_key(rounds_run.c, &rounds_run.key), 1);
    check_stop(rounds_run.c);
}

/* Inside its own done callback the queue's Pending is done: waiting on it
 * there gives that drain's result at once (the callback runs in the
 * queue's task, which could never wake itself). */
typedef struct {
    int rc, cancelled;
    void *value;
    double elapsed;
    caller_pending_t *seen; /* completed when the callback is over */
} queue_self_wait_t;

static void wait_on_queue_in_callback(caller_pending_t *p, void *arg)
{
    queue_self_wait_t *sw = arg;
    double t0 = check_now();
    sw->rc = caller_pending_wait(p, 10 * check_time_scale(), CALLER_WAIT_RESULT, &sw->value);
    sw->elapsed = check_now() - t0;
    sw->cancelled = caller_pending_cancelled(p);
    caller_pending_set_result(sw->seen, NULL, 0);
}

TEST(done_callback_waiting_on_the_queue_pending_gets_its_drain)
{
    caller_t *c = check_new_thread(NULL);
    int key;
    queue_self_wait_t sw = {.rc = 1, .seen = caller_pending_new(0)};
    caller_pending_t *gate = caller_pending_new(0);
    caller_pending_t *q = caller_queue_call_key(c, &key, win_gated, gate);
    CHECK_RC(caller_pending_add_done_callback(q, wait_on_queue_in_callback, &sw), 0);
    CHECK_RC(caller_pending_set_result(gate, NULL, 0), 0);
    CHECK_RC(caller_pending_wait(sw.seen, 30 * check_time_scale(), CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_RC(sw.rc, 0);
    CHECK_EQ(I(sw.value), 100);
    CHECK_EQ(sw.cancelled, 0);
    CHECK(sw.elapsed < 2.5 * check_time_scale()); /* a quarter of the timeout */
    /* The queue goes on. */
    caller_pending_t *again = caller_queue_call_key(c, &key, pass_through, P(5));
    void *v;
    CHECK_RC(caller_pending_wait(again, 10 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v),
             0);
    CHECK_EQ(I(v), 5);
    CHECK_EQ(caller_queue_close_key(c, &key), 1);
    caller_pending_unref(again);
    caller_pending_unref(q);
    caller_pending_unref(gate);
    caller_pending_unref(sw.seen);
    check_stop(c);
}

/* A wait on a queue that drained, with nothing queued since, has nothing
 * to wait for: it ends at once with the last drain's result (it used to
 * wait for a drain that no one would cause — the hang of queue_call then
 * wait from another thread when the item drained before the wait began). */
static void *wait_in_task(void *arg)
{
    void *v = NULL;
    CHECK_RC(caller_pending_wait(arg, 10 * check_time_scale(), CALLER_WAIT_RESULT, &v), 0);
    return v;
}

TEST(wait_on_a_drained_queue_returns_its_last_result)
{
    caller_t *c = check_new_thread(NULL);
    int key;
    caller_pending_t *q = caller_queue_call_key(c, &key, pass_through, P(7));
    void *v = NULL;
    /* Joined before the drain or after it: either way it ends with it. */
    CHECK_RC(caller_pending_wait(q, 10 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v),
             0);
    CHECK_EQ(I(v), 7);
    double t0 = check_now();
    CHECK_RC(caller_pending_wait(q, 10 * check_time_scale(), CALLER_WAIT_RESULT, &v), 0);
    CHECK(check_now() - t0 < 2.5 * check_time_scale()); /* a quarter of the timeout */
    CHECK_EQ(I(v), 7);
    CHECK_EQ(caller_pending_done(q), 0); /* still reset: a round may start */
    CHECK_EQ(caller_pending_cancelled(q), 0);
    /* The same from a task on the queue's Caller. */
    caller_pending_t *t = caller_call_soon(c, wait_in_task, q);
    CHECK_RC(caller_pending_wait(t, 20 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v),
             0);
    CHECK_EQ(I(v), 7);
    caller_pending_unref(t);
    /* Queue again: the next wait ends with that item's drain, not 7. */
    caller_pending_unref(caller_queue_call_key(c, &key, pass_through, P(8)));
    CHECK_RC(caller_pending_wait(q, 10 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v),
             0);
    CHECK_EQ(I(v), 8);
    CHECK_EQ(caller_queue_close_key(c, &key), 1);
    caller_pending_unref(q);
    check_stop(c);
}

/* ---- a queue whose items keep coming ---------------------------------------- */

typedef struct {
    caller_t *c;
    atomic_bool flag; /* set by another task of the Caller */
    double until;     /* items stop queuing their successor then */
    long items;
    bool by_flag; /* the chain ended because the flag was seen */
} chain_t;

/* An item that queues the next one on the same key, until the flag is set
 * (or the time is up): the queue never drains by itself. */
static void *chain_item(void *arg)
{
    chain_t *ch = arg;
    ch->items++;
    if (atomic_load(&ch->flag)) {
        ch->by_flag = true;
        return NULL;
    }
    if (check_now() > ch->until)
        return NULL;
    caller_pending_t *p = caller_queue_call_key(ch->c, ch, chain_item, ch);
    CHECK(p != NULL);
    caller_pending_unref(p);
    return NULL;
}

static void *chain_flag(void *arg)
{
    atomic_store(&((chain_t *)arg)->flag, true);
    return NULL;
}

/* The queue's task runs item after item and never has to wait, yet the
 * loop still turns between items: the task queued after the first item
 * runs, and the chain ends because of it. Before, it ran only once the
 * chain gave up, 20 s later. */
TEST(a_queue_whose_items_keep_coming_lets_the_loop_turn)
{
    caller_t *c = check_new_thread(NULL);
    chain_t ch = {.c = c, .until = check_now() + 20 * check_time_scale()};
    caller_pending_t *q = caller_queue_call_key(c, &ch, chain_item, &ch);
    caller_pending_t *other = caller_call_soon(c, chain_flag, &ch);
    check_await(other, 60);
    CHECK_RC(caller_pending_wait(q, 60 * check_time_scale(), CALLER_WAIT_PROTECT, NULL), 0);
    CHECK(ch.by_flag);
    CHECK(ch.items > 1);
    CHECK_EQ(caller_queue_close_key(c, &ch), 1);
    caller_pending_unref(q);
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
    caller_stop(c, 0);
    CHECK(caller_queue_call(c, pass_through, NULL) == NULL);
    CHECK_RC(caller_last_error(NULL), -ESHUTDOWN);
    CHECK_RC(caller_wait_stopped(c, 10), 0);
    caller_unref(c);
}

/* ---- many keys: the index by key (keyindex.h) ---------------------------- */

/* The size of a Caller's index of queues (0: none), under its lock. */
static size_t index_capacity(caller_t *c)
{
    caller__mutex_lock(&c->queues.lock, CALLER__RANK_QUEUES);
    size_t n = caller__keyindex_capacity(c->queues.index);
    caller__mutex_unlock(&c->queues.lock, CALLER__RANK_QUEUES);
    return n;
}

static size_t index_count(caller_t *c)
{
    caller__mutex_lock(&c->queues.lock, CALLER__RANK_QUEUES);
    size_t n = caller__keyindex_count(c->queues.index);
    caller__mutex_unlock(&c->queues.lock, CALLER__RANK_QUEUES);
    return n;
}

enum { MANY = 20000, MANY_ROUNDS = 3 };

static struct {
    char keys[MANY]; /* key k is &keys[k] */
    int last[MANY];  /* the last round of key k that ran (Caller thread only) */
    long ran, out_of_order;
    caller_pending_t *p[MANY];
} many;

/* Round r of key k: runs after round r - 1 of the same key. The last round
 * closes its own queue, so that no queue's task stays suspended. */
static void *many_item(void *arg)
{
    int k = (int)(I(arg) / MANY_ROUNDS), r = (int)(I(arg) % MANY_ROUNDS);
    if (many.last[k] != r - 1)
        many.out_of_order++;
    many.last[k] = r;
    many.ran++;
    if (r == MANY_ROUNDS - 1)
        CHECK_EQ(caller_queue_close_key(caller_current(), &many.keys[k]), 1);
    return arg;
}

/* From a task on the Caller: nothing runs until it waits, so all MANY keys
 * are live while it queues. */
static void *many_keys_body(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    for (int r = 0; r < MANY_ROUNDS; r++)
        for (int k = 0; k < MANY; k++) {
            caller_pending_t *p =
                caller_queue_call_key(self, &many.keys[k], many_item, P(k * MANY_ROUNDS + r));
            CHECK(p != NULL);
            if (r == 0) {
                CHECK(k == 0 || p != many.p[k - 1]); /* its own queue */
                many.p[k] = p;
            } else {
                CHECK_PTR_EQ(p, many.p[k]); /* the same queue each round */
                caller_pending_unref(p);
            }
        }
    CHECK_EQ(index_count(self), MANY);
    for (int k = 0; k < MANY; k += 97) {
        caller_pending_t *g = caller_queue_get_key(self, &many.keys[k]);
        CHECK_PTR_EQ(g, many.p[k]);
        caller_pending_unref(g);
    }
    for (int k = 0; k < MANY; k++) {
        CHECK_RC(caller_pending_wait(many.p[k], 30 * check_time_scale(), CALLER_WAIT_PROTECT, NULL),
                 0);
        caller_pending_unref(many.p[k]);
    }
    CHECK_EQ(many.ran, (long)MANY * MANY_ROUNDS);
    CHECK_EQ(many.out_of_order, 0);
    for (int k = 0; k < MANY; k++)
        CHECK_EQ(many.last[k], MANY_ROUNDS - 1);
    CHECK_EQ(index_capacity(self), 0); /* every queue closed: no index left */
    return NULL;
}

TEST(twenty_thousand_keys_each_reach_their_own_queue_in_order)
{
    memset(&many, 0, sizeof many);
    for (int k = 0; k < MANY; k++)
        many.last[k] = -1;
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *t = caller_call_soon(c, many_keys_body, NULL);
    CHECK_RC(caller_pending_wait(t, 60 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, NULL),
             0);
    caller_pending_unref(t);
    check_stop(c);
}

static int key_among_many;

/* From a task on the Caller (no queue runs meanwhile): close one key among
 * many, look up keys that have no queue, and see the index shrink as
 * queues are closed and vanish when the last one is. */
static void *close_among_many_body(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    for (int k = 0; k < MANY; k++)
        caller_pending_unref(caller_queue_call_key(self, &many.keys[k], pass_through, P(k)));
    CHECK_EQ(index_count(self), MANY);
    CHECK_GE(index_capacity(self), 2 * MANY); /* at most half full */

    /* Missing keys among many: an unknown pointer, a function with no
     * queue, and a function used as an explicit key (a different queue
     * from that function's own). */
    CHECK(caller_queue_get_key(self, &key_among_many) == NULL);
    CHECK_EQ(caller_queue_close_key(self, &key_among_many), 0);
    CHECK(caller_queue_get(self, pass_through) == NULL);
    CHECK_EQ(caller_queue_close(self, pass_through), 0);
    CHECK(caller_queue_get_key(self, (const void *)pass_through) == NULL);

    /* One key among many. */
    int k = MANY / 3;
    caller_pending_t *old = caller_queue_get_key(self, &many.keys[k]);
    CHECK(old != NULL);
    CHECK_EQ(caller_queue_close_key(self, &many.keys[k]), 1);
    CHECK(caller_queue_get_key(self, &many.keys[k]) == NULL);
    CHECK_EQ(caller_queue_close_key(self, &many.keys[k]), 0);
    CHECK_EQ(index_count(self), MANY - 1);
    for (int j = k - 5; j <= k + 5; j++) { /* its neighbours are still there */
        caller_pending_t *g = caller_queue_get_key(self, &many.keys[j]);
        CHECK((g != NULL) == (j != k));
        caller_pending_unref(g);
    }
    caller_pending_t *fresh = caller_queue_call_key(self, &many.keys[k], pass_through, NULL);
    CHECK(fresh != NULL && fresh != old);
    CHECK_EQ(index_count(self), MANY);
    caller_pending_unref(fresh);
    caller_pending_unref(old);

    /* Closing all but ten shrinks the index; closing those frees it. */
    for (int j = 10; j < MANY; j++)
        CHECK_EQ(caller_queue_close_key(self, &many.keys[j]), 1);
    CHECK_EQ(index_count(self), 10);
    CHECK_LE(index_capacity(self), 8 * CALLER__KEYINDEX_MIN);
    for (int j = 0; j < 10; j++)
        CHECK_EQ(caller_queue_close_key(self, &many.keys[j]), 1);
    CHECK_EQ(index_capacity(self), 0);
    return NULL;
}

TEST(close_and_missing_keys_among_twenty_thousand_and_the_index_shrinks)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *t = caller_call_soon(c, close_among_many_body, NULL);
    CHECK_RC(caller_pending_wait(t, 60 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, NULL),
             0);
    caller_pending_unref(t);
    check_stop(c);
}

/* Queues that end on their own (their Pending cancelled) leave the index
 * too: with all of them over, nothing of it is left. */
static void *cancelled_queues_body(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    enum { N = 2000 };
    caller_pending_t *p[N];
    for (int k = 0; k < N; k++)
        p[k] = caller_queue_call_key(self, &many.keys[k], pass_through, P(k));
    CHECK_EQ(index_count(self), N);
    for (int k = 0; k < N; k++)
        caller_pending_cancel(p[k], "enough");
    for (int k = 0; k < N; k++) {
        CHECK_RC(caller_pending_wait(p[k], 10 * check_time_scale(),
                                     CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, NULL),
                 -ECANCELED);
        CHECK(caller_queue_get_key(self, &many.keys[k]) == NULL);
    }
    /* A task queued after all of them runs after they ended. */
    caller_pending_t *probe = caller_call_soon(self, pass_through, NULL);
    CHECK_RC(caller_pending_wait(probe, 10 * check_time_scale(), CALLER_WAIT_PROTECT, NULL), 0);
    caller_pending_unref(probe);
    CHECK_EQ(index_capacity(self), 0);
    for (int k = 0; k < N; k++)
        caller_pending_unref(p[k]);
    return NULL;
}

TEST(queues_ended_by_cancelling_leave_no_index)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *t = caller_call_soon(c, cancelled_queues_body, NULL);
    CHECK_RC(caller_pending_wait(t, 60 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, NULL),
             0);
    caller_pending_unref(t);
    check_stop(c);
}

/* Keys as addresses whose low 24 bits are all alike (page-aligned objects
 * and worse): each still reaches its own queue. */
#define SAME_LOW_BITS_KEY(k) ((const void *)(((uintptr_t)(k) + 1) << 24 | 0x40))

static void *same_low_bits_body(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    enum { N = 4000 };
    static caller_pending_t *p[N];
    for (int k = 0; k < N; k++) {
        p[k] = caller_queue_call_key(self, SAME_LOW_BITS_KEY(k), pass_through, P(k));
        CHECK(p[k] != NULL);
        CHECK(k == 0 || p[k] != p[k - 1]);
    }
    for (int k = 0; k < N; k++) {
        caller_pending_t *g = caller_queue_get_key(self, SAME_LOW_BITS_KEY(k));
        CHECK_PTR_EQ(g, p[k]);
        caller_pending_unref(g);
    }
    for (int k = 0; k < N; k += 2) /* every other one */
        CHECK_EQ(caller_queue_close_key(self, SAME_LOW_BITS_KEY(k)), 1);
    for (int k = 0; k < N; k++) {
        caller_pending_t *g = caller_queue_get_key(self, SAME_LOW_BITS_KEY(k));
        CHECK_PTR_EQ(g, k % 2 ? p[k] : NULL);
        caller_pending_unref(g);
    }
    for (int k = 1; k < N; k += 2)
        CHECK_EQ(caller_queue_close_key(self, SAME_LOW_BITS_KEY(k)), 1);
    CHECK_EQ(index_capacity(self), 0);
    for (int k = 0; k < N; k++)
        caller_pending_unref(p[k]);
    return NULL;
}

TEST(keys_with_the_same_low_bits_are_distinct_queues)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *t = caller_call_soon(c, same_low_bits_body, NULL);
    CHECK_RC(caller_pending_wait(t, 60 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, NULL),
             0);
    caller_pending_unref(t);
    check_stop(c);
}

/*
 * The index alone, with hashes that collide on purpose: nodes whose hashes
 * share their low bits probe through one another's runs, and the runs wrap
 * around the end of the table. Random inserts and removals against a
 * record of what is in; after each step every node is found or not as the
 * record says (removal shifts later nodes back: a wrong shift loses one).
 */
TEST(index_with_colliding_hashes_finds_every_node)
{
    enum { N = 600, STEPS = 6000 };
    static caller__keynode_t node[N];
    static bool in[N];
    static char keys[N];
    caller__keyindex_t *ix = NULL;
    size_t homes[] = {0, 1, 2, 0xfffff}; /* 0xfffff: the last slot, at any size here */
    for (int i = 0; i < N; i++) {
        node[i].key = &keys[i];
        /* Low bits from four homes; high bits tell the hashes apart, or
         * not at all for every fifth node (equal hashes). */
        size_t high = i % 5 ? (size_t)i << 20 : 0;
        node[i].hash = homes[i % 4] | high;
    }
    uint64_t rnd = 0x2545f4914f6cdd1dULL;
    size_t count = 0, peak = 0;
    for (int s = 0; s < STEPS; s++) {
        rnd ^= rnd << 13, rnd ^= rnd >> 7, rnd ^= rnd << 17;
        int i = (int)(rnd % N);
        if (in[i]) {
            caller__keyindex_remove(&ix, &node[i]);
            in[i] = false, count--;
        } else {
            CHECK(caller__keyindex_find(ix, NULL, &keys[i], node[i].hash) == NULL);
            CHECK_RC(caller__keyindex_reserve(&ix), 0);
            caller__keyindex_insert(ix, &node[i]);
            in[i] = true, count++;
        }
        peak = count > peak ? count : peak;
        CHECK_EQ(caller__keyindex_count(ix), count);
        CHECK(count == 0 ? ix == NULL : 2 * count <= caller__keyindex_capacity(ix));
        if (s % 7 == 0 || s > STEPS - 50)
            for (int j = 0; j < N; j++)
                CHECK_PTR_EQ(caller__keyindex_find(ix, NULL, &keys[j], node[j].hash),
                             in[j] ? &node[j] : NULL);
    }
    CHECK_GE(peak, N / 3);
    for (int j = N - 1; j >= 0; j--)
        if (in[j])
            caller__keyindex_remove(&ix, &node[j]);
    CHECK(ix == NULL);
}

/* Without memory to grow the index a new key's call fails with -ENOMEM and
 * leaves the queues there were as they were; the next call succeeds. */
static void *index_enomem_body(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    static int keys[CALLER__KEYINDEX_MIN];
    const char *msg = NULL;
    /* The first key: the index is made. Allocations: the item, then the
     * index. */
    caller__alloc_fail_after(1);
    caller_pending_t *p = caller_queue_call_key(self, &keys[0], pass_through, NULL);
    caller__alloc_fail_after(-1);
    CHECK(p == NULL);
    CHECK_RC(caller_last_error(&msg), -ENOMEM);
    CHECK_CONTAINS(msg, "table");
    CHECK_EQ(index_capacity(self), 0);
    /* Fill the smallest index to half; the next new key must grow it. */
    int half = CALLER__KEYINDEX_MIN / 2;
    for (int k = 0; k < half; k++)
        caller_pending_unref(caller_queue_call_key(self, &keys[k], pass_through, NULL));
    CHECK_EQ(index_capacity(self), CALLER__KEYINDEX_MIN);
    caller__alloc_fail_after(1);
    p = caller_queue_call_key(self, &keys[half], pass_through, NULL);
    caller__alloc_fail_after(-1);
    CHECK(p == NULL);
    CHECK_RC(caller_last_error(&msg), -ENOMEM);
    CHECK_CONTAINS(msg, "out of memory");
    CHECK_EQ(index_count(self), half);
    for (int k = 0; k < half; k++) {
        caller_pending_t *g = caller_queue_get_key(self, &keys[k]);
        CHECK(g != NULL);
        caller_pending_unref(g);
    }
    p = caller_queue_call_key(self, &keys[half], pass_through, NULL);
    CHECK(p != NULL);
    caller_pending_unref(p);
    CHECK_EQ(index_count(self), half + 1);
    CHECK_EQ(index_capacity(self), 2 * CALLER__KEYINDEX_MIN);
    for (int k = 0; k <= half; k++)
        CHECK_EQ(caller_queue_close_key(self, &keys[k]), 1);
    CHECK_EQ(index_capacity(self), 0);
    return NULL;
}

TEST(no_memory_to_grow_the_index_fails_the_call_cleanly)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *t = caller_call_soon(c, index_enomem_body, NULL);
    CHECK_RC(caller_pending_wait(t, 30 * check_time_scale(),
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, NULL),
             0);
    caller_pending_unref(t);
    check_stop(c);
}
