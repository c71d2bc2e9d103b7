/* The worker pool: caller_to_thread (SPEC §6; issue #4). */
// ALSO-UCONTEXT
// TIMEOUT: 120
#include "check.h"
#include "internal.h"
#include "testpoint.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <unistd.h>

static caller_t *new_owner(size_t max_idle, double idle_shutdown, size_t max_workers)
{
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.name = "owner"});
    CHECK(c != NULL);
    caller_pool_config_t cfg = {
        .max_idle = max_idle, .idle_shutdown = idle_shutdown, .max_workers = max_workers};
    CHECK_RC(caller_pool_set_config(c, &cfg), 0);
    return c;
}

/* Distinct worker Callers seen, recorded from inside the calls. */
static struct {
    pthread_mutex_t lock;
    caller_t *seen[256];
    int n;
    atomic_int running, max_running;
} workers = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void reset_workers(void)
{
    pthread_mutex_lock(&workers.lock);
    workers.n = 0;
    pthread_mutex_unlock(&workers.lock);
    atomic_store(&workers.running, 0);
    atomic_store(&workers.max_running, 0);
}

static int distinct_workers(void)
{
    pthread_mutex_lock(&workers.lock);
    int n = workers.n;
    pthread_mutex_unlock(&workers.lock);
    return n;
}

static void note_worker(void)
{
    caller_t *me = caller_current();
    pthread_mutex_lock(&workers.lock);
    int i = 0;
    while (i < workers.n && workers.seen[i] != me)
        i++;
    if (i == workers.n && workers.n < 256)
        workers.seen[workers.n++] = me;
    pthread_mutex_unlock(&workers.lock);
}

/* A job: notes its worker, sleeps arg milliseconds in it, returns arg. */
static void *job(void *arg)
{
    note_worker();
    int now = atomic_fetch_add(&workers.running, 1) + 1;
    int max = atomic_load(&workers.max_running);
    while (now > max && !atomic_compare_exchange_weak(&workers.max_running, &max, now))
        ;
    if (I(arg) > 0)
        CHECK_RC(caller_sleep((double)I(arg) / 1000), 0);
    atomic_fetch_sub(&workers.running, 1);
    return arg;
}

static void *thread_name_and_worker(void *arg)
{
    char name[32];
    pthread_getname_np(pthread_self(), name, sizeof name);
    CHECK_STR_EQ(name, "caller-worker");
    caller_t *me = caller_current();
    CHECK(me != NULL && me != arg);
    CHECK_STR_EQ(caller_name(me), "caller-worker");
    caller_t *parent = caller_parent(me);
    CHECK_PTR_EQ(parent, arg);
    caller_unref(parent);
    /* A worker is a full Caller: it schedules and waits like any. */
    caller_pending_t *p = caller_call_soon(me, job, P(0));
    void *v;
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, &v), 0);
    caller_pending_unref(p);
    CHECK_RC(caller_sleep(0.001), 0);
    return P(123);
}

/* The pool's idle count once it settles at @p want: a worker that was
 * woken for a call another worker took comes back to the idle list a
 * moment after the calls' Pendings completed (its own loop turn). */
static size_t idle_settled(caller_t *c, size_t want)
{
    double until = check_now() + 10 * check_time_scale();
    while (caller_pool_idle(c) != want && check_now() < until)
        sched_yield();
    return caller_pool_idle(c);
}

TEST(to_thread_runs_on_a_named_worker)
{
    caller_t *c = new_owner(10, 0, 0);
    caller_pending_t *p = caller_to_thread(c, thread_name_and_worker, c);
    CHECK(p != NULL);
    void *v;
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, &v), 0);
    CHECK_EQ(I(v), 123);
    char text[256];
    caller_pending_repr(p, text, sizeof text);
    CHECK_CONTAINS(text, "| thread_name_and_worker caller=Caller<caller-worker");
    caller_pending_unref(p);
    CHECK_EQ(idle_settled(c, 1), 1);
    CHECK_EQ(caller_children(c, NULL, 0), 1);
    check_stop(c);
}

typedef struct {
    caller_t *c;
    int made, total;
} gen_t;

static caller_pending_t *make_jobs(void *arg)
{
    gen_t *g = arg;
    if (g->made == g->total)
        return NULL;
    g->made++;
    return caller_to_thread(g->c, job, P(2));
}

static void run_jobs(caller_t *c, int total, int max_concurrent)
{
    gen_t g = {c, 0, total};
    caller_as_completed_options_t o = {.max_concurrent = max_concurrent};
    caller_iter_t *it = caller_as_completed_gen(make_jobs, &g, &o);
    CHECK(it != NULL);
    caller_pending_t *p;
    int got = 0;
    while (caller_iter_next(it, &p) == 0) {
        void *v;
        CHECK_RC(caller_pending_result(p, &v), 0);
        CHECK_EQ(I(v), 2);
        caller_pending_unref(p);
        got++;
    }
    caller_iter_close(it);
    CHECK_EQ(got, total);
}

TEST(generator_bounded_by_max_concurrent_uses_that_many_workers)
{
    reset_workers();
    caller_t *c = new_owner(2, 0, 0);
    run_jobs(c, 40, 2);
    CHECK_EQ(distinct_workers(), 2);
    CHECK_EQ(idle_settled(c, 2), 2);
    CHECK_LE(atomic_load(&workers.max_running), 2);
    check_stop(c);
}

TEST(more_concurrency_more_threads_pool_keeps_max_idle)
{
    reset_workers();
    caller_t *c = new_owner(2, 0, 0);
    run_jobs(c, 40, 20);
    CHECK_GE(distinct_workers(), 3);
    CHECK_EQ(idle_settled(c, 2), 2);
    /* The extra workers were stopped as they finished. */
    double until = check_now() + 10;
    while (caller_children(c, NULL, 0) > 2 && check_now() < until)
        sched_yield();
    CHECK_EQ(caller_children(c, NULL, 0), 2);
    check_stop(c);
}

TEST(back_to_back_calls_reuse_one_worker)
{
    reset_workers();
    caller_t *c = new_owner(10, 0, 0);
    for (int i = 0; i < 20; i++) {
        caller_pending_t *p = caller_to_thread(c, job, P(0));
        CHECK_RC(caller_pending_wait(p, 10, 0, NULL), 0);
        caller_pending_unref(p);
    }
    CHECK_EQ(distinct_workers(), 1);
    CHECK_EQ(idle_settled(c, 1), 1);
    check_stop(c);
}

TEST(idle_workers_stop_after_idle_shutdown)
{
    reset_workers();
    caller_t *c = new_owner(10, 0.5, 0);
    double t0 = check_now(); /* no worker is idle before this */
    caller_pending_t *p[3];
    for (int i = 0; i < 3; i++)
        p[i] = caller_to_thread(c, job, P(20));
    for (int i = 0; i < 3; i++) {
        CHECK_RC(caller_pending_wait(p[i], 10, 0, NULL), 0);
        caller_pending_unref(p[i]);
    }
    /* Every worker is idle now: those that ran the calls were back in the
     * pool before the calls' waiters woke; one started for a call another
     * worker took first comes a little later (a slow thread start), so
     * wait for it. Unless this thread was held up past the 0.5 s
     * idle_shutdown (a loaded machine): then the sweep may have run. */
    int idle, workers_alive;
    for (;;) {
        idle = (int)caller_pool_idle(c);
        workers_alive = caller_children(c, NULL, 0);
        if (idle == workers_alive || check_now() - t0 >= 0.4)
            break;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    if (check_now() - t0 < 0.5) {
        CHECK_EQ(idle, workers_alive);
        CHECK_GE(idle, 1);
        CHECK_LE(idle, 3);
    }
    double until = check_now() + 10 * check_time_scale();
    while ((caller_pool_idle(c) > 0 || caller_children(c, NULL, 0) > 0) && check_now() < until) {
        struct timespec ts = {0, 2000000};
        nanosleep(&ts, NULL);
    }
    CHECK_EQ(caller_pool_idle(c), 0);
    CHECK_EQ(caller_children(c, NULL, 0), 0);
    /* Not before its time: each worker was busy 20 ms, then idle 0.5 s. */
    CHECK_GE((check_now() - t0) * 1000, 20 + 500 - 5);
    /* The pool still works: a new worker is made. */
    caller_pending_t *q = caller_to_thread(c, job, P(0));
    CHECK_RC(caller_pending_wait(q, 10, 0, NULL), 0);
    caller_pending_unref(q);
    check_stop(c);
}

static void *my_worker(void *arg)
{
    (void)arg;
    return caller_ref(caller_current());
}

TEST(worker_stopped_while_idle_is_not_reused)
{
    caller_t *c = new_owner(10, 0, 0);
    caller_pending_t *p = caller_to_thread(c, my_worker, NULL);
    void *w1;
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, &w1), 0);
    caller_pending_unref(p);
    CHECK_EQ(idle_settled(c, 1), 1);
    caller_stop(w1, 0);
    CHECK_EQ(caller_pool_idle(c), 0); /* it left the pool */
    CHECK_RC(caller_wait_stopped(w1, 10), 0);
    p = caller_to_thread(c, my_worker, NULL);
    void *w2;
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, &w2), 0);
    caller_pending_unref(p);
    CHECK(w2 != w1);
    caller_unref(w1);
    caller_unref(w2);
    check_stop(c);
}

TEST(worker_cap_holds_under_1000_submissions)
{
    enum { N = 1000, CAP = 3 };
    reset_workers();
    caller_t *c = new_owner(10, 0, CAP);
    caller_pending_t **p = malloc(N * sizeof *p);
    for (int i = 0; i < N; i++) {
        p[i] = caller_to_thread(c, job, P(i % 7 == 0 ? 1 : 0));
        CHECK(p[i] != NULL);
        CHECK_LE(caller_children(c, NULL, 0), CAP);
    }
    for (int i = 0; i < N; i++) {
        void *v;
        CHECK_RC(caller_pending_wait(p[i], 30, CALLER_WAIT_RESULT, &v), 0);
        CHECK_EQ(I(v), i % 7 == 0 ? 1 : 0);
        caller_pending_unref(p[i]);
        CHECK_LE(caller_children(c, NULL, 0), CAP);
    }
    free(p);
    CHECK_LE(distinct_workers(), CAP);
    CHECK_LE(atomic_load(&workers.max_running), CAP);
    check_stop(c);
}

static atomic_int ran_parked;

static void *mark_ran(void *arg)
{
    atomic_fetch_add(&ran_parked, 1);
    return arg;
}

TEST(a_call_waiting_for_a_worker_can_be_cancelled)
{
    atomic_store(&ran_parked, 0);
    caller_t *c = new_owner(10, 0, 1);
    /* Occupy the only worker for a while. */
    caller_pending_t *hold = caller_to_thread(c, job, P(50));
    caller_pending_t *parked = caller_to_thread(c, mark_ran, P(1));
    CHECK(parked != NULL);
    CHECK_EQ(caller_pending_done(parked), 0);
    CHECK_EQ(caller_pending_cancel(parked, "no longer needed"), 1);
    CHECK_RC(caller_pending_wait(parked, 10, CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_RC(caller_pending_result(parked, NULL), -ECANCELED);
    CHECK_RC(caller_pending_wait(hold, 10, 0, NULL), 0);
    /* The next parked call runs once the worker is free. */
    caller_pending_t *next = caller_to_thread(c, mark_ran, P(2));
    void *v;
    CHECK_RC(caller_pending_wait(next, 10, CALLER_WAIT_RESULT, &v), 0);
    CHECK_EQ(I(v), 2);
    CHECK_EQ(atomic_load(&ran_parked), 1);
    caller_pending_unref(next);
    caller_pending_unref(hold);
    caller_pending_unref(parked);
    check_stop(c);
}

static void *tiny(void *arg)
{
    return arg;
}

typedef struct {
    caller_t *c;
    int made, total;
} tiny_gen_t;

static caller_pending_t *make_tiny(void *arg)
{
    tiny_gen_t *g = arg;
    if (g->made == g->total)
        return NULL;
    return caller_to_thread(g->c, tiny, P(g->made++));
}

TEST(stress_100k_tiny_calls_through_as_completed)
{
    enum { N = 100000 };
    caller_t *c = new_owner(10, 0, 0);
    tiny_gen_t g = {c, 0, N};
    unsigned char *seen = calloc(N, 1);
    caller_iter_t *it = caller_as_completed_gen(make_tiny, &g, NULL);
    caller_pending_t *p;
    int got = 0;
    while (caller_iter_next(it, &p) == 0) {
        void *v;
        CHECK_RC(caller_pending_result(p, &v), 0);
        CHECK(I(v) >= 0 && I(v) < N);
        CHECK_EQ(seen[I(v)], 0);
        seen[I(v)] = 1;
        caller_pending_unref(p);
        got++;
    }
    caller_iter_close(it);
    CHECK_EQ(got, N);
    free(seen);
    CHECK_LE(caller_children(c, NULL, 0), 10);
    check_stop(c);
}

static void *to_thread_from_task(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    caller_pending_t *p[4];
    for (int i = 0; i < 4; i++)
        p[i] = caller_to_thread(self, job, P(5));
    for (int i = 0; i < 4; i++) {
        CHECK_RC(caller_pending_wait(p[i], 10, 0, NULL), 0);
        caller_pending_unref(p[i]);
    }
    return NULL;
}

TEST(to_thread_from_a_task_and_stop_ends_the_pool)
{
    caller_t *c = caller_create(CALLER_MANUAL, NULL);
    CHECK_RC(caller_run(c, to_thread_from_task, NULL, NULL), 0);
    CHECK_EQ(caller_children(c, NULL, 0), 0);
    CHECK(caller_to_thread(c, job, P(0)) == NULL);
    CHECK_RC(caller_last_error(NULL), -ESHUTDOWN);
    caller_unref(c);
}

TEST(config_errors)
{
    caller_pool_config_t cfg;
    CHECK_RC(caller_pool_get_config(NULL, &cfg), -EINVAL);
    CHECK(caller_to_thread(NULL, job, NULL) == NULL);
    CHECK_RC(caller_last_error(NULL), -EINVAL);
    caller_t *c = new_owner(10, 0, 0);
    CHECK_RC(caller_pool_get_config(c, &cfg), 0);
    CHECK_EQ(cfg.max_idle, 10);
    cfg.idle_shutdown = -1;
    CHECK_RC(caller_pool_set_config(c, &cfg), -EINVAL);
    CHECK(caller_to_thread(c, NULL, NULL) == NULL);
    caller_pool_config_t d = {0};
    caller_t *fresh = caller_create(CALLER_NEW_THREAD, NULL);
    CHECK_RC(caller_pool_get_config(fresh, &d), 0);
    CHECK_EQ(d.max_idle, CALLER_MAX_IDLE_POOL_INSTANCES);
    CHECK(d.idle_shutdown == CALLER_IDLE_WORKER_SHUTDOWN_DURATION);
    CHECK_EQ(d.max_workers, 0);
    check_stop(fresh);
    check_stop(c);
}

/* ---- a cancel as a parked call gets its worker ---------------------------- */

static void *wait_gate(void *arg)
{
    CHECK_RC(caller_pending_wait(arg, 30 * check_time_scale(), CALLER_WAIT_PROTECT, NULL), 0);
    return NULL;
}

static struct {
    caller_pending_t *target; /* set before the hook is */
    atomic_int fired;
} unpark_cancel;

/* At "pool.unparked" (the parked call is off the FIFO, its task not yet
 * made): cancel it there, once. */
static void cancel_when_unparked(const char *point, void *obj)
{
    if (strcmp(point, "pool.unparked") != 0 || obj != unpark_cancel.target)
        return;
    if (atomic_exchange(&unpark_cancel.fired, 1))
        return;
    CHECK_EQ(caller_pending_cancel(obj, "cancelled as it was unparked"), 1);
}

TEST(cancel_as_a_parked_call_is_unparked_is_not_lost)
{
    atomic_store(&ran_parked, 0);
    caller_t *c = new_owner(10, 0, 1);
    caller_pending_t *gate = caller_pending_new(0);
    caller_pending_t *hold = caller_to_thread(c, wait_gate, gate); /* the only worker */
    caller_pending_t *parked = caller_to_thread(c, mark_ran, P(1));
    CHECK(hold != NULL && parked != NULL);
    CHECK_EQ(caller_pending_done(parked), 0);
    unpark_cancel.target = parked;
    atomic_store(&caller__test_hook, cancel_when_unparked);
    caller_pending_set_result(gate, NULL, 0); /* the worker frees up */
    CHECK_RC(caller_pending_wait(parked, 10, CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_RC(caller_pending_wait(hold, 10, CALLER_WAIT_PROTECT, NULL), 0);
    atomic_store(&caller__test_hook, NULL);
    int fired = atomic_load(&unpark_cancel.fired), ran = atomic_load(&ran_parked);
    CHECK_EQ(fired, 1);
    CHECK_RC(caller_pending_result(parked, NULL), -ECANCELED);
    CHECK_EQ(ran, 0); /* its function never ran */
    /* The worker serves the next call. */
    caller_pending_t *next = caller_to_thread(c, mark_ran, P(2));
    void *v;
    CHECK_RC(caller_pending_wait(next, 10, CALLER_WAIT_RESULT, &v), 0);
    CHECK_EQ(I(v), 2);
    ran = atomic_load(&ran_parked);
    CHECK_EQ(ran, 1);
    caller_pending_unref(next);
    caller_pending_unref(parked);
    caller_pending_unref(hold);
    caller_pending_unref(gate);
    check_stop(c);
}

/*
 * The stress variant: round after round, the only worker finishes a call
 * (hold) while this thread cancels the call parked behind it (victim). The
 * victim blocks until cancelled, so every cancel must reach it: it either
 * never runs, or its wait ends -ECANCELED. A lost cancel leaves it waiting
 * out its timeout, and counted.
 *
 * Where the cancel lands: the even rounds come as they come, the cancel
 * issued `delay` spins after hold ends, `delay` steered so that about half
 * find the call still parked and the others just after the unparking. The
 * odd rounds also hold the window open at "pool.unparked" until the
 * cancel arrives (a loaded machine may deschedule this thread just then).
 */

static atomic_int go, leaving, victim_ran, victim_uncancelled, window_hits;
static atomic_bool linger;
static caller_pending_t *never;                /* completed by nobody */
static _Atomic(caller_pending_t *) the_victim; /* this round's */

/* Spin until *@p flag is set; yield after a while (a busy machine). */
static void spin_until(atomic_int *flag)
{
    for (int k = 0; !atomic_load_explicit(flag, memory_order_acquire); k++)
        if (k > 1000)
            sched_yield();
}

/* The call holding the worker: ends when told, and says so as it ends. */
static void *hold_until_go(void *arg)
{
    (void)arg;
    spin_until(&go);
    atomic_store_explicit(&leaving, 1, memory_order_release);
    return NULL;
}

static void *victim(void *arg)
{
    (void)arg;
    atomic_fetch_add(&victim_ran, 1);
    if (caller_pending_wait(never, 5 * check_time_scale(), CALLER_WAIT_PROTECT, NULL) != -ECANCELED)
        atomic_fetch_add(&victim_uncancelled, 1);
    return NULL;
}

static void unparked_hook(const char *point, void *obj)
{
    /* Only this round's victim: a hold call may be unparked too (queued
     * while the worker still ended the last round's victim), and nobody
     * cancels it. */
    if (strcmp(point, "pool.unparked") != 0 || obj != atomic_load(&the_victim))
        return;
    for (int i = 0; atomic_load(&linger) && i < 20000 && !caller_pending_cancelled(obj); i++)
        if (i > 200)
            sched_yield();
    if (caller_pending_cancelled(obj))
        atomic_fetch_add(&window_hits, 1);
}

TEST(stress_cancel_the_parked_call_just_as_the_worker_frees_up)
{
    enum { ROUNDS = 20000, MAX_DELAY = 1 << 14 /* spins: some µs */ };
    caller_t *c = new_owner(1, 0, 1);
    never = caller_pending_new(0);
    atomic_store(&caller__test_hook, unparked_hook);
    double t0 = check_now();
    /* On a loaded machine (a parallel test run) every round waits for
     * CPUs: a time budget as well as a count, and a minimum of rounds. */
    double budget = 20 * check_time_scale();
    int delay = 0, parked = 0, round = 0;
    for (; round < ROUNDS && (round < 2000 || check_now() - t0 < budget); round++) {
        bool steered = round % 2 == 0;
        atomic_store(&go, 0);
        atomic_store(&leaving, 0);
        atomic_store(&linger, !steered);
        caller_pending_t *hold = caller_to_thread(c, hold_until_go, NULL);
        caller_pending_t *p = caller_to_thread(c, victim, NULL);
        CHECK(hold != NULL && p != NULL);
        CHECK_EQ(caller_pending_done(p), 0); /* parked behind hold */
        atomic_store(&the_victim, p);
        atomic_store_explicit(&go, 1, memory_order_release);
        spin_until(&leaving);
        for (volatile int i = 0, n = delay + (round * 37) % 64; i < n; i++)
            ;
        CHECK_EQ(caller_pending_cancel(p, NULL), 1);
        bool early = caller_pending_done(p); /* still parked: ended at once */
        parked += early;
        CHECK_RC(caller_pending_wait(p, 30, CALLER_WAIT_PROTECT, NULL), 0);
        CHECK_RC(caller_pending_result(p, NULL), -ECANCELED);
        int lost = atomic_load(&victim_uncancelled);
        CHECK_EQ(lost, 0);
        /* Still parked: cancel later next time; unparked: earlier. Up to
         * a bound: when the worker cannot run (its CPU shared with this
         * busy loop), every cancel finds the call parked however late, and
         * the delay grew by 3% a round without end; two of these tests
         * side by side then hung for minutes in the loop above. */
        if (steered && early)
            delay = delay < MAX_DELAY ? delay + 1 + delay / 32 : MAX_DELAY;
        else if (steered && delay > 0)
            delay -= 1 + delay / 32;
        /* hold is done once the worker is back in the pool. */
        CHECK_RC(caller_pending_wait(hold, 30, 0, NULL), 0);
        caller_pending_unref(hold);
        atomic_store(&the_victim, NULL);
        caller_pending_unref(p);
    }
    atomic_store(&caller__test_hook, NULL);
    printf("%d rounds in %.2f s, none lost: the cancel found the call parked %d times, "
           "landed as it was unparked %d times, found it running %d times\n",
           round, check_now() - t0, parked, atomic_load(&window_hits), atomic_load(&victim_ran));
    caller_pending_unref(never);
    check_stop(c);
}

/* ---- errors ------------------------------------------------------------------ */

TEST(to_thread_reports_its_own_errors)
{
    caller_t *c = new_owner(10, 0, 0); /* the pool exists; no worker yet */
    int failed = 0;
    /* Each allocation of a to_thread that starts a worker fails in turn. */
    for (long n = 0; n < 1000; n++) {
        caller__alloc_fail_after(n);
        caller_pending_t *p = caller_to_thread(c, job, P(0));
        caller__alloc_fail_after(-1);
        if (p) {
            caller_pending_wait(p, 10, CALLER_WAIT_PROTECT, NULL);
            caller_pending_unref(p);
            break;
        }
        const char *m;
        int rc = caller_last_error(&m);
        CHECK(rc < 0);
        if (strncmp(m, "caller_to_thread: ", 18) != 0) {
            fprintf(stderr, "allocation %ld failing: \"%s\"\n", n, m);
            CHECK(!"caller_to_thread's error names caller_to_thread");
        }
        failed++;
    }
    CHECK_GE(failed, 1);
    printf("%d to_thread calls failed for lack of memory, each with its own name\n", failed);
    /* The first allocation is the call's own (its Pending and task), the
     * next the worker's: each error says which. */
    caller_t *fresh = new_owner(10, 0, 0);
    caller__alloc_fail_after(0);
    CHECK(caller_to_thread(fresh, job, P(0)) == NULL);
    caller__alloc_fail_after(-1);
    CHECK_RC(caller_last_error(NULL), -ENOMEM);
    CHECK_STR_EQ(check_last_message(), "caller_to_thread: out of memory");
    caller__alloc_fail_after(1);
    CHECK(caller_to_thread(fresh, job, P(0)) == NULL);
    caller__alloc_fail_after(-1);
    CHECK_RC(caller_last_error(NULL), -ENOMEM);
    CHECK_STR_EQ(check_last_message(), "caller_to_thread: cannot start a worker: out of memory");
    /* Nothing was left queued: the next call runs. */
    caller_pending_t *ok = caller_to_thread(fresh, job, P(0));
    CHECK(ok != NULL);
    CHECK_RC(caller_pending_wait(ok, 10, 0, NULL), 0);
    caller_pending_unref(ok);
    check_stop(fresh);
    check_stop(c);
}

/* A worker handed back in the caller's own task (here: no memory for the
 * call, after the worker was made) schedules the idle sweep outside the
 * caller's context: the group the task is in does not wait for the sweep
 * (an hour away here: a hang until the test's timeout otherwise). */
static void *to_thread_failing_in_a_group(void *arg)
{
    caller_t *c = arg;
    caller_group_t *g = caller_group_new(caller_current(), 0);
    CHECK(g != NULL);
    CHECK_RC(caller_group_enter(g), 0);
    int handed_back = 0;
    for (long n = 0; n < 1000; n++) {
        caller__alloc_fail_after(n);
        caller_pending_t *p = caller_to_thread(c, job, P(0));
        caller__alloc_fail_after(-1);
        if (p) {
            CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_PROTECT, NULL), 0);
            caller_pending_unref(p);
            break;
        }
        handed_back += strcmp(check_last_message(), "caller_to_thread: out of memory") == 0;
    }
    CHECK_EQ(handed_back, 1); /* the call's allocation failed, the worker's did not */
    CHECK_RC(caller_group_exit(g), 0);
    caller_group_unref(g);
    return NULL;
}

TEST(worker_handed_back_in_a_group_leaves_the_group_alone)
{
    caller_t *c = new_owner(10, 3600, 0);
    caller_t *user = check_new_thread("user");
    caller_pending_t *p = caller_call_soon(user, to_thread_failing_in_a_group, c);
    CHECK_RC(caller_pending_wait(p, 60, 0, NULL), 0);
    CHECK_EQ(idle_settled(c, 1), 1); /* the worker came back to the pool */
    caller_pending_unref(p);
    check_stop(user);
    check_stop(c);
}

/* A Caller about to sleep spins for work only while a core is idle: with a
 * pool's workers running calls on every CPU it goes to sleep at once. */
static atomic_int spin_skips, spin_allowed, busy_started, busy_release;
static caller_t *watched;

static void count_skips(const char *point, void *obj)
{
    if (obj != watched)
        return;
    if (strcmp(point, "sched.spin_skipped") == 0)
        atomic_fetch_add(&spin_skips, 1);
    else if (strcmp(point, "sched.spin_allowed") == 0)
        atomic_fetch_add(&spin_allowed, 1);
}

static void *busy_until_released(void *arg)
{
    atomic_fetch_add(&busy_started, 1);
    while (!atomic_load(&busy_release))
        sched_yield();
    return arg;
}

static void *ret_arg(void *arg)
{
    return arg;
}

/*
 * Send no-ops to @p c until happened() (10 s at most): one, then another
 * each time the last one has run and 100 ms passed without it. A loop that
 * was still spinning when a no-op came may run it within that spin's round
 * and, the round's time used up, sleep without asking whether to spin
 * again (the spin is bounded, by design); a wake-up from sleep always asks.
 * The no-ops go to @p pokes (at most @p max); returns how many were sent.
 */
static int poke_until(caller_t *c, bool (*happened)(void), caller_pending_t **pokes, int max)
{
    int n = 0;
    double until = check_now() + 10 * check_time_scale(), ran_at = 0;
    CHECK((pokes[n++] = caller_call_soon(c, ret_arg, NULL)) != NULL);
    while (!happened() && check_now() < until) {
        if (ran_at == 0 && caller_pending_done(pokes[n - 1])) {
            ran_at = check_now();
        } else if (ran_at != 0 && check_now() - ran_at > 0.1 * check_time_scale() && n < max) {
            CHECK((pokes[n++] = caller_call_soon(c, ret_arg, NULL)) != NULL);
            ran_at = 0;
        }
        sched_yield();
    }
    return n;
}

static int decisions_before;

static bool decided(void)
{
    return atomic_load(&spin_skips) + atomic_load(&spin_allowed) > decisions_before;
}

/* Let @p c run a no-op, then wait (10 s at most) until its loop decided,
 * about to sleep, whether to spin (poke_until). */
static void one_round(caller_t *c)
{
    decisions_before = atomic_load(&spin_skips) + atomic_load(&spin_allowed);
    caller_pending_t *pokes[100];
    int n = poke_until(c, decided, pokes, 100);
    for (int i = 0; i < n; i++) {
        CHECK_RC(caller_pending_wait(pokes[i], 10, 0, NULL), 0);
        caller_pending_unref(pokes[i]);
    }
    CHECK_GE(atomic_load(&spin_skips) + atomic_load(&spin_allowed), decisions_before + 1);
}

TEST(no_spinning_while_workers_fill_every_cpu)
{
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    CHECK_GE(ncpu, 1);
    caller_t *owner = new_owner(10, 0, 0);
    watched = check_new_thread(NULL);
    atomic_store(&caller__test_hook, count_skips);
    /* No worker busy: the watched Caller may spin before it sleeps. */
    one_round(watched);
    CHECK_EQ(atomic_load(&spin_skips), 0);
    /* Every CPU runs a call: it sleeps without spinning. */
    caller_pending_t *busy[64];
    CHECK_LE(ncpu, 64);
    for (long i = 0; i < ncpu; i++)
        CHECK((busy[i] = caller_to_thread(owner, busy_until_released, NULL)) != NULL);
    while (atomic_load(&busy_started) < ncpu)
        sched_yield();
    one_round(watched);
    CHECK_GE(atomic_load(&spin_skips), 1);
    atomic_store(&busy_release, 1);
    for (long i = 0; i < ncpu; i++) {
        CHECK_RC(caller_pending_wait(busy[i], 10, 0, NULL), 0);
        caller_pending_unref(busy[i]);
    }
    /* Once the workers are idle again, and their loops asleep (a loop that
     * still runs, spinning for work, holds a CPU too), it spins as before. */
    double until = check_now() + 10;
    while ((caller__pool_busy_workers() != 0 || caller__awake_loops() != 0) && check_now() < until)
        sched_yield();
    CHECK_EQ(caller__pool_busy_workers(), 0);
    CHECK_EQ(caller__awake_loops(), 0);
    int skips = atomic_load(&spin_skips);
    one_round(watched);
    CHECK_EQ(atomic_load(&spin_skips), skips);
    atomic_store(&caller__test_hook, NULL);
    check_stop(watched);
    check_stop(owner);
}

/* The same with other Callers' loops, not a pool's workers, running tasks
 * on every CPU: a spinner would take the CPU from them. */
TEST(no_spinning_while_other_loops_fill_every_cpu)
{
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    CHECK_GE(ncpu, 1);
    CHECK_LE(ncpu, 64);
    atomic_store(&busy_started, 0);
    atomic_store(&busy_release, 0);
    watched = check_new_thread(NULL);
    atomic_store(&caller__test_hook, count_skips);
    caller_t *others[64];
    caller_pending_t *busy[64];
    for (long i = 0; i < ncpu; i++) {
        others[i] = check_new_thread(NULL);
        CHECK((busy[i] = caller_call_soon(others[i], busy_until_released, NULL)) != NULL);
    }
    while (atomic_load(&busy_started) < ncpu)
        sched_yield();
    int skips = atomic_load(&spin_skips);
    one_round(watched);
    CHECK_GE(atomic_load(&spin_skips), skips + 1);
    atomic_store(&busy_release, 1);
    for (long i = 0; i < ncpu; i++) {
        CHECK_RC(caller_pending_wait(busy[i], 10, 0, NULL), 0);
        caller_pending_unref(busy[i]);
    }
    /* Once their loops sleep again, it spins as before. */
    double until = check_now() + 10 * check_time_scale();
    while (caller__awake_loops() != 0 && check_now() < until)
        sched_yield();
    CHECK_EQ(caller__awake_loops(), 0);
    skips = atomic_load(&spin_skips);
    one_round(watched);
    CHECK_EQ(atomic_load(&spin_skips), skips);
    atomic_store(&caller__test_hook, NULL);
    for (long i = 0; i < ncpu; i++)
        check_stop(others[i]);
    check_stop(watched);
}

/* Several threads submit to one capped pool and cancel about a quarter of
 * their calls as they go (the calls just made, or up to 8 before; most
 * are still queued then): every call ends; one that ran did so exactly
 * once and, unless cancelled, has its own result; one cancelled before it
 * started never runs; the cap holds; and once all is over no worker
 * counts as busy. */
enum { SUB_THREADS = 3, SUB_CALLS = 20000, SUB_CAP = 3 };

static atomic_uchar sub_ran[SUB_THREADS * SUB_CALLS];
static atomic_int sub_running, sub_max_running;

static void *sub_call(void *arg)
{
    int now = atomic_fetch_add(&sub_running, 1) + 1;
    int max = atomic_load(&sub_max_running);
    while (now > max && !atomic_compare_exchange_weak(&sub_max_running, &max, now))
        ;
    atomic_fetch_add(&sub_ran[I(arg)], 1);
    if (I(arg) % 17 == 0)
        sched_yield(); /* some run a little longer */
    atomic_fetch_sub(&sub_running, 1);
    return arg;
}

typedef struct {
    caller_t *owner;
    int first;
    caller_pending_t **p;
} submitter_t;

static void *submit_and_cancel(void *arg)
{
    submitter_t *s = arg;
    uint32_t x = 2463534242u + (uint32_t)s->first;
    for (int i = 0; i < SUB_CALLS; i++) {
        int id = s->first + i;
        s->p[i] = caller_to_thread(s->owner, sub_call, P(id));
        CHECK(s->p[i] != NULL);
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        /* Cancel one now and then: this one, or one made a little earlier. */
        if (x % 4 == 0)
            caller_pending_cancel(s->p[i - (int)(x / 4 % 8 <= (uint32_t)i ? x / 4 % 8 : 0)],
                                  "stress");
    }
    return NULL;
}

TEST(stress_submitters_cancelling_into_a_capped_pool)
{
    caller_t *owner = new_owner(10, 0, SUB_CAP);
    submitter_t s[SUB_THREADS];
    pthread_t th[SUB_THREADS];
    for (int k = 0; k < SUB_THREADS; k++) {
        s[k] = (submitter_t){owner, k * SUB_CALLS, malloc(SUB_CALLS * sizeof(caller_pending_t *))};
        CHECK_EQ(pthread_create(&th[k], NULL, submit_and_cancel, &s[k]), 0);
    }
    for (int k = 0; k < SUB_THREADS; k++)
        CHECK_EQ(pthread_join(th[k], NULL), 0);
    int cancelled = 0, never_ran = 0;
    unsigned char *unstarted = calloc(SUB_THREADS * SUB_CALLS, 1);
    for (int k = 0; k < SUB_THREADS; k++) {
        for (int i = 0; i < SUB_CALLS; i++) {
            int id = k * SUB_CALLS + i;
            caller_pending_t *p = s[k].p[i];
            CHECK_RC(caller_pending_wait(p, 30, 0, NULL), 0);
            int ran = atomic_load(&sub_ran[id]);
            CHECK_LE(ran, 1);
            void *v;
            int rc = caller_pending_result(p, &v);
            if (rc == 0) {
                CHECK_EQ(ran, 1);
                CHECK_EQ(I(v), id);
            } else {
                CHECK_RC(rc, -ECANCELED);
                cancelled++;
                never_ran += ran == 0;
                unstarted[id] = ran == 0;
            }
            caller_pending_unref(p);
        }
        free(s[k].p);
    }
    printf("%d of %d calls cancelled, %d of them before they started\n", cancelled,
           SUB_THREADS * SUB_CALLS, never_ran);
    CHECK_GE(cancelled, SUB_THREADS * SUB_CALLS / 8); /* the cancels happened */
    CHECK_GE(never_ran, 1);                           /* some were cancelled while queued */
    CHECK_LE(atomic_load(&sub_max_running), SUB_CAP);
    CHECK_LE(caller_children(owner, NULL, 0), SUB_CAP);
    /* Every worker is idle again: none counts as busy. */
    for (int i = 0; i < 1000 && caller__pool_busy_workers() != 0; i++)
        usleep(1000);
    CHECK_EQ(caller__pool_busy_workers(), 0);
    check_stop(owner);
    CHECK_EQ(caller__pool_busy_workers(), 0);
    /* Those cancelled before they started still have not run, with every
     * worker gone. */
    for (int id = 0; id < SUB_THREADS * SUB_CALLS; id++)
        if (unstarted[id])
            CHECK_EQ(atomic_load(&sub_ran[id]), 0);
    free(unstarted);
}

/*
 * A worker that loaded its pool hooks just before the pool let it go asks
 * may_spin while pool_stop unhooks its idle link: the window held open.
 * The worker is held at "sched.may_spin" (hooks loaded, about to ask)
 * until pool_stop has taken it off the pool and reached the unhooking
 * ("pool.stop_unhooking"); both then run at once. may_spin must see that
 * the worker left (no spin granted) and touch its link only under the
 * pool's lock (TSan checks that).
 *
 * The idle worker is woken with no-ops (poke_until) until the may_spin its
 * loop asks before it sleeps again is held. One is not always enough: a
 * worker still spinning from going idle can run it within that spin's
 * round and sleep without asking (seen 4 times in about 2 900 runs under
 * TSan with other tests loading both cores, all in the GLib variants).
 */
static caller_t *held_worker, *stopping_owner;
static atomic_int worker_held, stop_reached, held_decision; /* 1 refused, 2 allowed */

static void hold_may_spin(const char *point, void *obj)
{
    if (obj == held_worker && strcmp(point, "sched.may_spin") == 0 &&
        !atomic_exchange(&worker_held, 1)) {
        double until = check_now() + 30 * check_time_scale();
        while (!atomic_load(&stop_reached) && check_now() < until)
            sched_yield();
    } else if (obj == held_worker && atomic_load(&worker_held) &&
               (strcmp(point, "sched.spin_refused") == 0 ||
                strcmp(point, "sched.spin_allowed") == 0)) {
        /* the decision of the held round (the first one after the hold) */
        int d = strcmp(point, "sched.spin_refused") == 0 ? 1 : 2, none = 0;
        atomic_compare_exchange_strong(&held_decision, &none, d);
    } else if (obj == stopping_owner && strcmp(point, "pool.stop_unhooking") == 0) {
        atomic_store(&stop_reached, 1);
    }
}

static bool is_held(void)
{
    return atomic_load(&worker_held) != 0;
}

static void *current_worker(void *arg)
{
    (void)arg;
    return caller_ref(caller_current());
}

TEST(worker_asking_to_spin_while_the_pool_stops)
{
    stopping_owner = new_owner(10, 3600, 0);
    caller_pending_t *p = caller_to_thread(stopping_owner, current_worker, NULL);
    void *v = NULL;
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, &v), 0);
    caller_pending_unref(p);
    held_worker = v;
    double until = check_now() + 10 * check_time_scale();
    while (caller_pool_idle(stopping_owner) != 1 && check_now() < until)
        sched_yield();
    CHECK_EQ(caller_pool_idle(stopping_owner), 1);
    atomic_store(&caller__test_hook, hold_may_spin);
    /* Wake the idle worker: after a no-op its loop, about to sleep, loads
     * its hooks and is held before asking may_spin. */
    caller_pending_t *pokes[100];
    int npokes = poke_until(held_worker, is_held, pokes, 100);
    CHECK_EQ(atomic_load(&worker_held), 1);
    CHECK(caller_stop(stopping_owner, 0) >= 0);
    CHECK_RC(caller_wait_stopped(stopping_owner, 10 * check_time_scale()), 0);
    CHECK_EQ(atomic_load(&stop_reached), 1);
    /* Each no-op ends. Those followed by another ran; the last ran, or the
     * worker's stop cancelled it still queued (sent just as the hold
     * came). */
    for (int i = 0; i < npokes; i++) {
        int rc = caller_pending_wait(pokes[i], 10, CALLER_WAIT_PROTECT, NULL);
        if (i < npokes - 1)
            CHECK_RC(rc, 0);
        else
            CHECK(rc == 0 || rc == -ECANCELED);
        caller_pending_unref(pokes[i]);
    }
    CHECK_RC(caller_wait_stopped(held_worker, 10 * check_time_scale()), 0);
    atomic_store(&caller__test_hook, NULL);
    CHECK_EQ(atomic_load(&held_decision), 1); /* it had left: no spin granted */
    caller_unref(held_worker);
    caller_unref(stopping_owner);
}
