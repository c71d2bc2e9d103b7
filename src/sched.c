/*
 * The scheduler: the Caller's loop (dispatching its inbox), tasks as
 * fibers, call_soon / call_later / call_direct, suspension, cancellation,
 * cancel scopes, and waiting on a Pending (caller_pending_wait).
 *
 * Threads: everything marked (L) in task.h and core.h belongs to the
 * Caller's own thread. Other threads reach a Caller only through its inbox
 * (inbox.c), which wakes the loop when it goes from empty to non-empty;
 * the loop takes the whole FIFO at once. The scheduler calls back into the
 * lifecycle (caller.c, above it) only through the Caller's `life`
 * operations.
 *
 * A task lives in its Pending's allocation. Its Pending's reference count
 * covers the task: the loop holds one reference from submission until the
 * task ends; each message about the task in flight holds one more.
 */
#include "alloc.h"
#include "context.h"
#include "core.h"
#include "error.h"
#include "fiber.h"
#include "heap.h"
#include "inbox.h"
#include "list.h"
#include "lockorder.h"
#include "pending.h"
#include "task.h"
#include "testpoint.h"

#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <string.h>

#define container_of caller__container_of

static _Thread_local caller__task_t *tl_task;
/* Where caller_raise records: the running task's fields or a direct call's
 * slot. The message is meaningful only while the code is not 0 (a task
 * keeps it in a union with fn and result). */
static _Thread_local int *tl_raise_code;
static _Thread_local char **tl_raise_msg;

caller__task_t *caller__task_current(void)
{
    return tl_task;
}

static caller__task_t *task_of(caller_pending_t *p);

/* The Caller a task runs on: its Pending's owner. */
static caller_t *task_caller(caller__task_t *t)
{
    return caller__pending_owner(caller__task_pending(t));
}

/* ---- the inbox ------------------------------------------------------------ */

/* User submissions (@p user) are refused once the Caller is stopping; the
 * library's own messages until the inbox closes. */
static bool post(caller_t *c, caller__msg_t *m, bool user)
{
    return caller__inbox_post(&c->inbox, m, user);
}

static atomic_size_t busy_workers;
/* Loop threads running now (not blocked in their poll), as far as their
 * Callers saw: one is counted from its dispatch until it is about to block
 * (or ends). What else runs on the machine (threads that are no Caller's,
 * other processes) is not counted. */
static atomic_size_t awake_loops;

size_t caller__awake_loops(void)
{
    return atomic_load_explicit(&awake_loops, memory_order_relaxed);
}

void caller__loop_awake(caller_t *c)
{
    if (!c->awake) {
        c->awake = true;
        atomic_fetch_add_explicit(&awake_loops, 1, memory_order_relaxed);
    }
}

void caller__loop_blocking(caller_t *c)
{
    if (c->awake) {
        c->awake = false;
        atomic_fetch_sub_explicit(&awake_loops, 1, memory_order_relaxed);
    }
}

size_t caller__pool_busy_workers(void)
{
    return atomic_load_explicit(&busy_workers, memory_order_relaxed);
}

void caller__busy_workers_add(int delta)
{
    atomic_fetch_add_explicit(&busy_workers, (size_t)(ptrdiff_t)delta, memory_order_relaxed);
}

/* The CPUs this process may use (at least 1), read once. */
static size_t online_cpus(void)
{
    static atomic_size_t n;
    size_t v = atomic_load_explicit(&n, memory_order_relaxed);
    if (!v) {
        long k = sysconf(_SC_NPROCESSORS_ONLN);
        v = k > 0 ? (size_t)k : 1;
        atomic_store_explicit(&n, v, memory_order_relaxed);
    }
    return v;
}

/* Rounds of spin-and-dispatch before_sleep may run before it lets the loop
 * poll its other handles (I/O, an application's own) once, and the time
 * they may take: with work arriving steadily every round finds some, and
 * an application's timer on the same loop waits for all of them (32 rounds
 * of a few results each held a GLib main loop's 5 ms tick 25 ms under
 * TSan). */
enum { SLEEP_ROUNDS = 32 };
#define SLEEP_BUDGET_NS 1000000 /* 1 ms */

bool caller__await_work(caller_t *c)
{
    if (c->finishing || c->ready.head)
        return false;
    /* Spin only on an idle core: with pool workers running calls on
     * every core, or other loops running beside this one on every core, a
     * spinner takes the CPU from them. */
    if (caller__pool_busy_workers() >= online_cpus() ||
        atomic_load_explicit(&awake_loops, memory_order_relaxed) > online_cpus()) {
        CALLER__TEST_POINT("sched.spin_skipped", c);
        return false;
    }
    /* A pool's idle workers do not all spin: the pool says which may. */
    const caller__worker_hooks_t *wh = atomic_load_explicit(&c->worker, memory_order_acquire);
    if (wh)
        CALLER__TEST_POINT("sched.may_spin", c); /* the pool may be letting it go */
    if (wh && !wh->may_spin(c)) {
        CALLER__TEST_POINT("sched.spin_refused", c);
        return false;
    }
    CALLER__TEST_POINT("sched.spin_allowed", c);
    bool queued = caller__inbox_await_briefly(&c->inbox, &c->spin);
    if (wh)
        wh->spun(c);
    return queued;
}

void caller__before_sleep(caller_t *c)
{
    /* Work found while spinning is run here, and then the loop would block
     * again: spin again rather than sleep (a message arriving a µs later
     * would otherwise cost a wake-up), a bounded number of rounds. */
    int64_t until = caller__now_ns() + SLEEP_BUDGET_NS;
    for (int round = 0; round < SLEEP_ROUNDS; round++) {
        if (!caller__await_work(c))
            return;
        caller__dispatch(c); /* with tasks left ready the loop does not block */
        if (caller__now_ns() >= until)
            return;
    }
}

bool caller__post(caller_t *c, caller__msg_t *m)
{
    return post(c, m, false);
}

/* On the Caller's own thread, with its loop open? Then its loop-thread
 * state may be touched directly instead of through the inbox. */
static bool on_loop(const caller_t *c)
{
    return caller__thread_caller() == c && c->loop_backend && !c->finishing;
}

/* Loop thread: make sure dispatch runs soon for work queued outside it. */
static void kick(caller_t *c)
{
    if (!c->in_dispatch && c->loop_backend)
        c->ops->more(c->loop_backend, true);
}

/* ---- task life ----------------------------------------------------------- */

static void task_canceller(caller_pending_t *p, const char *messages, void *arg);

/* A task's Pending and task, in one allocation, running @p fn(arg) in the
 * current context; its owner and canceller are the caller's to set. */
static caller_pending_t *task_alloc(caller_fn fn, void *arg, caller__task_t **out)
{
    caller__task_t *t;
    caller_pending_t *p = caller__pending_new_extra(0, sizeof *t, (void **)&t);
    if (!p)
        return NULL;
    memset(t, 0, sizeof *t);
    t->msg.kind = CALLER__MSG_TASK;
    t->cancel_msg.kind = CALLER__MSG_CANCEL;
    atomic_init(&t->cancel_posted, false);
    t->u.fn = fn;
    t->arg = arg;
    t->timer.index = CALLER__HEAP_NONE;
    t->deadline = INT64_MIN;
    caller__list_init(&t->live);
    t->ctx = caller__ctx_ref(caller__ctx_current()); /* runs in its scheduler's context */
    *out = t;
    return p;
}

caller_pending_t *caller__task_new(caller_t *c, caller_fn fn, void *arg, const char *name)
{
    caller__task_t *t;
    caller_pending_t *p = task_alloc(fn, arg, &t);
    if (!p)
        return NULL;
    /* Running: its running reference keeps c until this task is over. */
    bool lent = atomic_load_explicit(&c->state, memory_order_acquire) == CALLER_STATE_RUNNING;
    caller__pending_init_task(p, c, name, task_canceller, t, lent);
    /* Not tracked yet: see caller__task_track (after its submission). */
    return p;
}

caller_pending_t *caller__task_new_pooled(caller_fn fn, void *arg, const char *name,
                                          caller_canceller_fn canceller, void *cancel_arg)
{
    caller__task_t *t;
    caller_pending_t *p = task_alloc(fn, arg, &t);
    if (!p)
        return NULL;
    t->msg.kind = CALLER__POOLED_QUEUED; /* the pool queues it at once */
    caller__pending_init_task(p, NULL, name, canceller, cancel_arg, false);
    return p;
}

static caller__task_t *task_of(caller_pending_t *p)
{
    return (caller__task_t *)((char *)p + CALLER__PENDING_SIZE);
}

/* Loop thread: a task the loop now owns (from the inbox or submitted here). */
/* Loop thread: add @p d to a caller_stats() counter only it writes. */
#define STAT_ADD(field, d)                                                                         \
    atomic_store_explicit(&(field), atomic_load_explicit(&(field), memory_order_relaxed) + (d),    \
                          memory_order_relaxed)

static void accept_task(caller_t *c, caller__task_t *t)
{
    caller__list_add_tail(&c->live_tasks, &t->live);
    c->nlive++;
    atomic_store_explicit(&c->stats.live, c->nlive, memory_order_relaxed);
    int64_t deadline = t->deadline;
    t->raised_code = 0; /* the field's use from here on */
    /* INT64_MIN (call_soon) is due without asking the clock. */
    if (deadline != INT64_MIN && deadline > caller__now_ns() &&
        !caller_pending_cancelled(caller__task_pending(t)) &&
        atomic_load_explicit(&c->state, memory_order_relaxed) < CALLER_STATE_STOPPING &&
        caller__heap_insert(&c->timers, &t->timer, deadline) == 0) {
        t->state = CALLER__TASK_DELAYED;
        return;
    }
    /* Due, cancelled, stopping — or no memory for the timer: then it runs
     * now rather than never (a late call beats a lost one). */
    t->state = CALLER__TASK_READY;
    caller__fifo_push(&c->ready, &t->msg);
}

int caller__task_submit(caller_t *c, caller_pending_t *p, int64_t deadline)
{
    caller__task_t *t = task_of(p);
    t->deadline = deadline;
    if (on_loop(c) &&
        atomic_load_explicit(&c->state, memory_order_relaxed) == CALLER_STATE_RUNNING) {
        accept_task(c, t);
        kick(c);
        if (t->state == CALLER__TASK_DELAYED && !c->in_dispatch)
            c->ops->timer(c->loop_backend, caller__heap_min_deadline(&c->timers));
        return 0;
    }
    if (post(c, &t->msg, true))
        return 0;
    return caller__fail_stopped(c, "caller_call_soon");
}

/* The end hook of caller__call_soon_ex (one for all: see there). */
static _Atomic(caller_direct_fn) end_hook;

static void scopes_leave_all(caller__task_t *t);
static void complete_cancelled_before_start(caller__task_t *t);

/* Loop thread: a task that will not run (again): its end hook, its
 * context, and the loop's reference (may free it). */
static void task_release(caller__task_t *t)
{
    scopes_leave_all(t);
    if (t->has_end)
        atomic_load_explicit(&end_hook, memory_order_relaxed)(t->arg);
    caller__ctx_unref(t->ctx);
    t->ctx = NULL;
    caller__pending_task_over(caller__task_pending(t));
    caller_pending_unref(caller__task_pending(t));
}

/* Loop thread: an accepted task is over. */
static void task_end(caller_t *c, caller__task_t *t)
{
    t->state = CALLER__TASK_DONE;
    caller__list_del(&t->live);
    c->nlive--;
    atomic_store_explicit(&c->stats.live, c->nlive, memory_order_relaxed);
    if (t->msg.kind == CALLER__POOLED_TAKEN)
        c->pool_calls--;
    task_release(t);
}

void caller__task_discard(caller_pending_t *p)
{
    caller__task_t *t = task_of(p);
    complete_cancelled_before_start(t);
    task_release(t);
}

static void complete_cancelled_before_start(caller__task_t *t)
{
    caller_pending_cancel(caller__task_pending(t), NULL);
    caller_pending_set_exception(caller__task_pending(t), -ECANCELED, "Cancelled before started.");
}

static void accept_pooled(caller_t *c, caller_pending_t *p);
static void task_settle(caller_t *c, caller__task_t *t);

/*
 * Tasks that run to their end without suspending can share a fiber: as one
 * returns, its fiber settles it and starts the next ready task of the
 * round itself, if that one never ran, instead of switching back to the
 * loop, which would free the fiber, settle the task, take a fiber again
 * and switch to it (a third of the loop's time per task in W3). Only in
 * the dispatch's round of ready tasks (c->round_last), so the order is
 * the same as without it; not in copy-stack mode, not for a pool's calls
 * (their end hands the worker its next call: run_task does that).
 *
 * The ready task that may go next on this fiber (still at the head of the
 * ready FIFO), or NULL: none may.
 */
static caller__task_t *fresh_head(caller_t *c)
{
    caller__msg_t *m = c->ready.head;
    if (!m || !c->round_last || c->copy_stacks)
        return NULL;
    caller__task_t *n = container_of(m, caller__task_t, msg);
    if (n->fiber || n->msg.kind == CALLER__POOLED_TAKEN ||
        caller_pending_cancelled(caller__task_pending(n)) ||
        atomic_load_explicit(&c->state, memory_order_relaxed) >= CALLER_STATE_STOPPING)
        return NULL;
    return n;
}

/* The next task of the dispatch's round, taken off the ready FIFO (the
 * round ends with its last). */
static caller__msg_t *pop_round(caller_t *c)
{
    caller__msg_t *m = caller__fifo_pop(&c->ready);
    if (m == c->round_last)
        c->round_last = NULL;
    return m;
}

/* In a task's fiber: make @p t the task running on it (run_task's part
 * before the switch). */
static void enter_task(caller__task_t *t)
{
    t->state = CALLER__TASK_RUNNING;
    tl_task = t;
    tl_raise_code = &t->raised_code;
    tl_raise_msg = &t->u.raised_msg;
}

static void task_entry(void *arg)
{
    caller__task_t *t = arg;
    for (;;) {
        caller_fn fn = t->u.fn; /* from here u may hold a raised message */
        void *result = fn(t->arg);
        if (!t->raised_code)
            t->u.result = result;
        caller_t *c = task_caller(t);
        if (t->msg.kind == CALLER__POOLED_TAKEN || !fresh_head(c))
            return; /* the loop settles it (run_task) */
        /* Settle it here, as run_task would after the switch back. */
        caller__fiber_t *f = t->fiber;
        t->fiber = NULL;
        t->ctx = caller__ctx_swap(c->loop_ctx);
        tl_task = NULL;
        tl_raise_code = NULL;
        tl_raise_msg = NULL;
        STAT_ADD(c->stats.finished, 1);
        task_settle(c, t);
        caller__task_t *n = fresh_head(c); /* settling may have changed it */
        if (!n)
            return; /* tl_task NULL: run_task only frees the fiber */
        pop_round(c);
        n->fiber = f;
        STAT_ADD(c->stats.started, 1);
        enter_task(n);
        caller__ctx_swap(n->ctx);
        t = n;
    }
}

/* Loop thread, scheduler context: run @p t until it suspends or ends. */
static void run_task(caller_t *c, caller__task_t *t)
{
    caller_pending_t *p = caller__task_pending(t);
    if (!t->fiber) {
        if (caller_pending_cancelled(p) ||
            atomic_load_explicit(&c->state, memory_order_relaxed) >= CALLER_STATE_STOPPING) {
            complete_cancelled_before_start(t);
            task_end(c, t);
            return;
        }
        t->fiber = c->copy_stacks ? caller__fiber_new_copied(c->stack_size, task_entry, t)
                                  : caller__fiber_new(c->stack_size, task_entry, t);
        if (!t->fiber) {
            caller_pending_set_exception(p, -ENOMEM, "no memory for the task's stack");
            task_end(c, t);
            return;
        }
        STAT_ADD(c->stats.started, 1);
    }
    enter_task(t);
    caller__ctx_t *outside = caller__ctx_swap(t->ctx);
    c->loop_ctx = outside;
    caller__fiber_t *f = t->fiber;
    caller__fiber_switch_to(f);
    /* The fiber may have settled t and run others of the round after it
     * (task_entry): the task on it now, or NULL if it settled its last. */
    t = tl_task;
    if (!t) {
        caller__fiber_free(f);
        return;
    }
    t->ctx = caller__ctx_swap(outside);
    tl_task = NULL;
    tl_raise_code = NULL;
    tl_raise_msg = NULL;
    if (!caller__fiber_finished(f))
        return; /* suspended: it set its own state */
    caller__fiber_free(f);
    t->fiber = NULL;
    STAT_ADD(c->stats.finished, 1);
    /* A pooled call: its worker takes the next one (or is idle) before
     * the waiters wake, so one that submits the next call at once finds it
     * idle, and the hand-off costs one hold of the pool's lock. */
    caller_pending_t *next = NULL;
    if (t->msg.kind == CALLER__POOLED_TAKEN && c->pool_calls == 1) {
        const caller__worker_hooks_t *wh = atomic_load_explicit(&c->worker, memory_order_acquire);
        if (wh)
            next = wh->take(c);
    }
    task_settle(c, t);
    if (next) {
        /* Handed over as the last call ended, with the worker busy when it
         * was queued: off the queue, not yet this loop's. */
        CALLER__TEST_POINT("pool.unparked", next);
        accept_pooled(c, next);
    }
}

/* Loop thread: @p t's function returned: its outcome to its Pending, and
 * its end (the Pending may go with it). */
static void task_settle(caller_t *c, caller__task_t *t)
{
    caller_pending_t *p = caller__task_pending(t);
    if (t->raised_code) {
        caller_pending_set_exception(p, t->raised_code, "%s",
                                     t->u.raised_msg ? t->u.raised_msg : "");
        caller__free(t->u.raised_msg);
        t->u.raised_msg = NULL;
    } else {
        caller_pending_set_result(p, t->u.result, 0);
    }
    task_end(c, t);
}

/* ---- suspension ------------------------------------------------------------ */

/* Loop thread: make a suspended task ready again, for reason @p why. */
static void task_resume(caller__task_t *t, caller__wake_t why)
{
    if (t->state != CALLER__TASK_SUSPENDED)
        return;
    if (why == CALLER__WAKE_CANCEL && t->uncancellable)
        return;
    caller_t *c = task_caller(t);
    caller__heap_remove(&c->timers, &t->timer);
    t->wake = why;
    t->state = CALLER__TASK_READY;
    caller__fifo_push(&c->ready, &t->msg);
    kick(c);
}

/* In a task: give the thread back until resumed. Returns why it resumed. */
static caller__wake_t task_suspend(caller__task_t *t, int64_t deadline, bool cancellable)
{
    caller_t *c = task_caller(t);
    if (deadline != INT64_MAX) {
        if (caller__heap_insert(&c->timers, &t->timer, deadline) < 0)
            return CALLER__WAKE_NOMEM;
    }
    t->wake = CALLER__WAKE_NONE;
    t->uncancellable = !cancellable;
    t->state = CALLER__TASK_SUSPENDED;
    STAT_ADD(c->stats.suspended, 1);
    int rc = caller__fiber_yield();
    STAT_ADD(c->stats.suspended, -1);
    if (rc != 0) {
        /* Copy-stack mode, no memory to save the stack: not suspended. */
        caller__heap_remove(&c->timers, &t->timer);
        t->state = CALLER__TASK_RUNNING;
        return CALLER__WAKE_NOMEM;
    }
    return t->wake;
}

/*
 * Cancel scopes. A task's scopes form a stack (innermost first) on its
 * fiber; the task's own Pending is the outermost. A suspension point is
 * cancelled if a scope up to and including the first shielded one is
 * cancelled (explicitly, or because its deadline passed), or — with no
 * shield in the way — if the task's Pending is.
 */
static bool task_cancelled(caller__task_t *t)
{
    int64_t now = INT64_MIN;
    for (caller_scope_t *s = t->scope; s; s = s->parent) {
        if (atomic_load_explicit(&s->cancelled, memory_order_acquire))
            return true;
        if (s->deadline != INT64_MAX) {
            if (now == INT64_MIN)
                now = caller__now_ns();
            if (now >= s->deadline) {
                s->expired = true;
                atomic_store_explicit(&s->cancelled, true, memory_order_release);
                return true;
            }
        }
        if (s->shield)
            return false;
    }
    return caller_pending_cancelled(caller__task_pending(t)) == 1;
}

/* The earliest deadline of the scopes that can cancel the task now. */
static int64_t scope_deadline(const caller__task_t *t)
{
    int64_t d = INT64_MAX;
    for (caller_scope_t *s = t->scope; s; s = s->parent) {
        if (s->deadline < d)
            d = s->deadline;
        if (s->shield)
            break;
    }
    return d;
}

/* Suspend until woken (*@p woken, if given, turns true), @p deadline, or
 * cancellation. CALLER__WAKE_TIMEOUT only for @p deadline itself; a
 * scope's deadline shows as CANCEL. */
static caller__wake_t suspend_point(caller__task_t *t, int64_t deadline, const bool *woken)
{
    for (;;) {
        /* The wake may have come while we were ready for another reason
         * (a cancel notice a shield kept out): then it did not resume us. */
        if (woken && *woken)
            return CALLER__WAKE_DONE;
        if (task_cancelled(t))
            return CALLER__WAKE_CANCEL;
        int64_t sd = scope_deadline(t);
        caller__wake_t why = task_suspend(t, sd < deadline ? sd : deadline, true);
        if (why == CALLER__WAKE_DONE || why == CALLER__WAKE_NOMEM)
            return why;
        if (why == CALLER__WAKE_TIMEOUT && caller__now_ns() >= deadline)
            return CALLER__WAKE_TIMEOUT;
        /* A cancel notice or a scope's deadline: look again (a shield may
         * keep it out, and then we suspend again). */
    }
}

/* A task's waiter on a Pending. The node lives in its fiber's park, not on
 * its stack: the completing thread reads it while the task is suspended,
 * when a copy-stack task's stack is not where it was. A task waits for one
 * thing at a time. */
typedef struct {
    caller__waiter_t w;
    caller__msg_t msg; /* MSG_RESUME */
    caller__task_t *task;
    bool woken; /* (L) */
} fiber_waiter_t;

_Static_assert(sizeof(fiber_waiter_t) <= CALLER__FIBER_PARK_SIZE, "a waiter fits a fiber's park");

static void on_resume(fiber_waiter_t *fw)
{
    fw->woken = true;
    task_resume(fw->task, CALLER__WAKE_DONE);
}

/* Runs in the completing thread, after the Pending's callbacks. */
static void fiber_wake(caller__waiter_t *w)
{
    fiber_waiter_t *fw = (fiber_waiter_t *)w;
    caller_t *c = task_caller(fw->task);
    if (on_loop(c)) {
        on_resume(fw);
        return;
    }
    /* The task is suspended, so its Caller cannot have finished. */
    bool ok = post(c, &fw->msg, false);
    (void)ok;
}

/*
 * A task whose waits never need to wait (its results are always there by
 * the time it asks: a consumer slower than its producers, as_completed
 * over a fast pool on a loaded machine) would keep its loop to itself for
 * as long as that lasts: no timer, I/O, other task, or other source of an
 * application's loop in between. Such a wait is still a suspension point,
 * as a wait that suspends is (as every wait is a checkpoint in trio):
 * past TURN_NS into the loop's current dispatch, it gives the loop a turn
 * before returning. The clock is read on every CHECK_EVERY-th such wait
 * only, so a wait costs a count.
 */
#define TURN_NS 2000000
#define CHECK_EVERY 16u

/* Should task @p t, at a wait that found its Pending done, give the loop a
 * turn? Not if the wait's @p deadline is past (a timeout of 0 only checks:
 * no suspension point then). */
static bool turn_over(caller__task_t *t, int64_t deadline)
{
    caller_t *c = task_caller(t);
    if (++c->settled_waits % CHECK_EVERY != 0)
        return false;
    int64_t now = caller__now_ns();
    return now - c->turn_start >= TURN_NS && deadline > now;
}

/* In a task, if turn_over(): let the loop turn (due at once, the task
 * resumes in the next dispatch, after what the loop had to do).
 * -ECANCELED if cancelled meanwhile, else 0 (also when it could not
 * suspend: no memory). */
static int give_turn_if_over(caller__task_t *t, int64_t deadline)
{
    if (!turn_over(t, deadline))
        return 0;
    return suspend_point(t, caller__now_ns(), NULL) == CALLER__WAKE_CANCEL ? -ECANCELED : 0;
}

int caller__task_checkpoint(caller__task_t *t, int64_t deadline)
{
    return task_cancelled(t) ? -ECANCELED : give_turn_if_over(t, deadline);
}

int caller__task_wait(caller__task_t *t, caller_pending_t *p, int64_t deadline, bool want,
                      int *code, void **value)
{
    if (p == caller__task_pending(t))
        return caller__fail(-EDEADLK, "caller_pending_wait: a task cannot wait for its own "
                                      "Pending");
    if (task_cancelled(t))
        return -ECANCELED;
    if (caller__pending_settled(p)) {
        /* Nothing to wait for: no waiter to link and unlink (W1's waits). */
        if (give_turn_if_over(t, deadline) < 0)
            return -ECANCELED;
        *code = want ? caller_pending_result(p, value) : 0;
        return 0;
    }
    fiber_waiter_t *fw = caller__fiber_park(t->fiber);
    *fw =
        (fiber_waiter_t){.w = {.wake = fiber_wake}, .msg = {.kind = CALLER__MSG_RESUME}, .task = t};
    if (!caller__pending_add_waiter(p, &fw->w)) {
        *code = caller_pending_result(p, value);
        return 0;
    }
    /* A timeout of 0 (a deadline already past) only checks: no suspension. */
    caller__wake_t why = deadline != INT64_MAX && deadline <= caller__now_ns()
                             ? CALLER__WAKE_TIMEOUT
                             : suspend_point(t, deadline, &fw->woken);
    if (!fw->woken) {
        if (caller__pending_remove_waiter(p, &fw->w)) {
            if (why == CALLER__WAKE_NOMEM)
                return caller__fail(-ENOMEM, "caller_pending_wait: no memory for the timeout");
            return why == CALLER__WAKE_CANCEL ? -ECANCELED : -ETIMEDOUT;
        }
        /* Completed just as we gave up: its wake is on the way, and this
         * frame must outlive it. Wait for it; it will not be long. */
        while (!fw->woken)
            task_suspend(t, INT64_MAX, false);
    }
    *code = fw->w.code;
    *value = fw->w.value;
    return 0;
}

int caller_sleep(double seconds)
{
    if (!(seconds >= 0))
        return caller__fail(-EINVAL, "caller_sleep: %g is not a duration", seconds);
    int64_t deadline = caller__deadline(seconds);
    caller__task_t *t = tl_task;
    if (!t) {
        if (deadline == INT64_MAX)
            deadline = INT64_MAX - 1;
        struct timespec ts = {deadline / 1000000000, deadline % 1000000000};
        while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR)
            ;
        return 0;
    }
    switch (suspend_point(t, deadline == INT64_MAX ? INT64_MAX - 1 : deadline, NULL)) {
    case CALLER__WAKE_CANCEL:
        return caller__fail(-ECANCELED, "caller_sleep: the task was cancelled");
    case CALLER__WAKE_NOMEM:
        return caller__fail(-ENOMEM, "caller_sleep: no memory for the timer");
    default:
        return 0;
    }
}

/* ---- cancellation ------------------------------------------------------------ */

/* Loop thread: a task's Pending was cancelled. */
static void handle_cancel(caller__task_t *t)
{
    caller_t *c = task_caller(t);
    switch (t->state) {
    case CALLER__TASK_DELAYED:
        /* It will never run: end it now rather than at its deadline. */
        caller__heap_remove(&c->timers, &t->timer);
        t->state = CALLER__TASK_READY;
        caller__fifo_push(&c->ready, &t->msg);
        kick(c);
        break;
    case CALLER__TASK_SUSPENDED:
        task_resume(t, CALLER__WAKE_CANCEL);
        break;
    default:
        /* queued or ready: the loop sees it when it gets there; running:
         * its next suspension point sees it; done: nothing to do. */
        break;
    }
}

/* Any thread: tell @p t's loop to look at its cancellation (always through
 * the inbox, even from the loop's own thread: the task may still be in
 * flight there, and only the loop may look at it). */
static void nudge(caller__task_t *t)
{
    if (atomic_exchange(&t->cancel_posted, true))
        return; /* a notice is already on its way */
    caller_pending_ref(caller__task_pending(t));
    if (!post(task_caller(t), &t->cancel_msg, false)) {
        atomic_store(&t->cancel_posted, false);
        caller_pending_unref(caller__task_pending(t));
    }
}

void caller__task_nudge(caller_pending_t *p)
{
    nudge(task_of(p));
}

static void task_canceller(caller_pending_t *p, const char *messages, void *arg)
{
    (void)p;
    (void)messages;
    nudge(arg);
}

/* ---- cancel scopes (public) -------------------------------------------- */

caller_scope_t *caller_scope_enter(double timeout, unsigned flags)
{
    caller__task_t *t = tl_task;
    if (!t) {
        caller__fail(-EPERM, "caller_scope_enter: not in a task");
        return NULL;
    }
    if (flags & ~(unsigned)(CALLER_SCOPE_SHIELD | CALLER_SCOPE_FAIL)) {
        caller__fail(-EINVAL, "caller_scope_enter: unknown flags 0x%x", flags);
        return NULL;
    }
    caller_scope_t *s = caller__calloc(1, sizeof *s);
    if (!s) {
        caller__fail(-ENOMEM, "caller_scope_enter: out of memory");
        return NULL;
    }
    atomic_init(&s->refs, 1); /* the task's, while entered */
    atomic_init(&s->cancelled, false);
    s->task = t;
    s->shield = flags & CALLER_SCOPE_SHIELD;
    s->fail = flags & CALLER_SCOPE_FAIL;
    s->deadline = timeout >= 0 ? caller__deadline(timeout) : INT64_MAX;
    s->parent = t->scope;
    t->scope = s;
    return s;
}

caller_scope_t *caller_scope_ref(caller_scope_t *s)
{
    if (s)
        atomic_fetch_add_explicit(&s->refs, 1, memory_order_relaxed);
    return s;
}

void caller_scope_unref(caller_scope_t *s)
{
    if (!s)
        return;
    int old = atomic_fetch_sub_explicit(&s->refs, 1, memory_order_acq_rel);
    if (old > 1)
        return;
    if (old < 1) {
        fprintf(stderr,
                "libcaller: caller_scope_unref: scope %p released more times than it was "
                "referenced\n",
                (void *)s);
        abort();
    }
    caller__free(s);
}

/* @p s leaves its task's stack: from now on a cancel does not reach the
 * task. The task's reference goes. */
static void scope_leave(caller__task_t *t, caller_scope_t *s)
{
    t->scope = s->parent;
    caller__order_acquire(CALLER__RANK_SCOPE);
    caller__lock(&s->lock);
    s->task = NULL;
    caller__unlock(&s->lock);
    caller__order_release(CALLER__RANK_SCOPE);
    caller_scope_unref(s);
}

/* A task that ends inside scopes (its function returned without exiting
 * them) leaves them all. */
static void scopes_leave_all(caller__task_t *t)
{
    while (t->scope)
        scope_leave(t, t->scope);
}

int caller_scope_exit(caller_scope_t *s)
{
    caller__task_t *t = tl_task;
    if (!s || !t || t->scope != s)
        return caller__fail(-EINVAL, "caller_scope_exit: %s",
                            !s ? "scope is NULL" : "not the innermost scope of this task");
    if (!s->expired && s->deadline != INT64_MAX && caller__now_ns() >= s->deadline)
        s->expired = true;
    bool expired = s->expired, fail = s->fail;
    scope_leave(t, s);
    if (expired && fail)
        return caller__fail(-ETIMEDOUT, "caller_scope_exit: the scope's deadline passed");
    return 0;
}

int caller_scope_cancel(caller_scope_t *s)
{
    if (!s)
        return caller__fail(-EINVAL, "caller_scope_cancel: scope is NULL");
    atomic_store_explicit(&s->cancelled, true, memory_order_release);
    /* The task is alive while the scope is entered, and cannot leave it
     * while we hold its lock. */
    caller__order_acquire(CALLER__RANK_SCOPE);
    caller__lock(&s->lock);
    if (s->task)
        nudge(s->task);
    caller__unlock(&s->lock);
    caller__order_release(CALLER__RANK_SCOPE);
    return 0;
}

int caller_scope_cancelled(const caller_scope_t *s)
{
    if (!s)
        return caller__fail(-EINVAL, "caller_scope_cancelled: scope is NULL");
    return atomic_load_explicit(&((caller_scope_t *)s)->cancelled, memory_order_acquire);
}

/* ---- dispatch ----------------------------------------------------------------- */

static void run_direct(caller_t *c, caller__msg_t *m);

static void process(caller_t *c, caller__msg_t *m)
{
    switch ((caller__msg_kind_t)m->kind) {
    case CALLER__MSG_TASK:
        accept_task(c, container_of(m, caller__task_t, msg));
        break;
    case CALLER__MSG_RESUME:
        on_resume(container_of(m, fiber_waiter_t, msg));
        break;
    case CALLER__MSG_CANCEL: {
        caller__task_t *t = container_of(m, caller__task_t, cancel_msg);
        atomic_store(&t->cancel_posted, false);
        handle_cancel(t);
        caller_pending_unref(caller__task_pending(t));
        break;
    }
    case CALLER__MSG_DIRECT:
        run_direct(c, m);
        break;
    case CALLER__MSG_STOP:
        c->life->on_stop(c);
        break;
    case CALLER__MSG_CHILD:
        c->life->on_child_stopped(c, container_of(m, caller_t, child_msg));
        break;
    case CALLER__MSG_POOL:
        /* Only a wake-up: the dispatch looks at the pool (pull). */
        atomic_store_explicit(&c->pool_posted, false, memory_order_release);
        break;
    }
}

/* A worker's loop thread: run pooled call @p p, which it just took from its
 * pool, as its own task (ready now). */
static void accept_pooled(caller_t *c, caller_pending_t *p)
{
    c->pool_calls++;
    accept_task(c, task_of(p));
}

/*
 * A pool's worker runs on past the round's ready tasks: what became ready
 * since (the next call it took as the last one ended, a task it resumed),
 * and, with no pooled call of its own unfinished, the next queued call —
 * until nothing is ready and the queue is empty (then the pool has it
 * idle). True if it stopped with work maybe left (the loop turns again).
 */
static bool pull(caller_t *c, const caller__worker_hooks_t *wh)
{
    for (int n = 0; n < 64; n++) {
        caller__msg_t *m = caller__fifo_pop(&c->ready);
        if (!m) {
            caller_pending_t *p = c->pool_calls ? NULL : wh->take(c);
            if (!p)
                return false;
            accept_pooled(c, p);
            m = caller__fifo_pop(&c->ready);
        }
        run_task(c, container_of(m, caller__task_t, msg));
    }
    return true;
}

void caller__dispatch(caller_t *c)
{
    if (c->in_dispatch || !c->loop_backend)
        return;
    c->in_dispatch = true;
    caller__loop_awake(c);

    caller__msg_t *m = caller__inbox_take(&c->inbox);
    while (m) {
        caller__msg_t *next = m->next; /* processing may re-link m */
        process(c, m);
        m = next;
    }

    int64_t now = caller__now_ns();
    c->turn_start = now;
    while (caller__heap_min_deadline(&c->timers) <= now) {
        caller__timer_t *tm = caller__heap_min(&c->timers);
        caller__heap_remove(&c->timers, tm);
        caller__task_t *t = container_of(tm, caller__task_t, timer);
        if (t->state == CALLER__TASK_DELAYED) {
            t->state = CALLER__TASK_READY;
            caller__fifo_push(&c->ready, &t->msg);
        } else {
            task_resume(t, CALLER__WAKE_TIMEOUT);
        }
    }

    /* Run what is ready now; what becomes ready meanwhile waits for the next
     * round, so I/O and timers are not starved. */
    c->round_last = c->ready.tail;
    while (c->round_last && (m = pop_round(c)))
        run_task(c, container_of(m, caller__task_t, msg));
    c->round_last = NULL;
    const caller__worker_hooks_t *wh = atomic_load_explicit(&c->worker, memory_order_acquire);
    bool more = wh && pull(c, wh);

    c->in_dispatch = false;
    if (!c->finishing) {
        int64_t due = caller__heap_min_deadline(&c->timers);
        /* A timer due within a few microseconds: keep the loop turning
         * instead of arming the timer (a system call, and the poll's own
         * latency, would make it later than that). */
        bool soon = due != INT64_MAX && due - caller__now_ns() < 20000;
        c->ops->more(c->loop_backend, more || c->ready.head != NULL || soon);
        c->ops->timer(c->loop_backend, soon ? INT64_MAX : due);
    }
    c->life->check_finished(c);
}

void caller__sched_stop(caller_t *c)
{
    /* Cancelling may end tasks (and unlink them): walk a stable order by
     * always restarting from the first task not yet cancelled. */
    for (caller__link_t *l = c->live_tasks.next; l != &c->live_tasks;) {
        caller__task_t *t = container_of(l, caller__task_t, live);
        l = l->next;
        if (!caller_pending_cancelled(caller__task_pending(t)))
            caller_pending_cancel(caller__task_pending(t), NULL);
    }
}

/* Fail or drop what was left in a closed inbox (nothing can run any more). */
void caller__sched_drain_closed(caller_t *c, caller__msg_t *m)
{
    while (m) {
        caller__msg_t *next = m->next;
        switch ((caller__msg_kind_t)m->kind) {
        case CALLER__MSG_TASK: {
            caller__task_t *t = container_of(m, caller__task_t, msg);
            complete_cancelled_before_start(t);
            task_release(t);
            break;
        }
        case CALLER__MSG_CANCEL: {
            caller__task_t *t = container_of(m, caller__task_t, cancel_msg);
            atomic_store(&t->cancel_posted, false);
            caller_pending_unref(caller__task_pending(t));
            break;
        }
        case CALLER__MSG_DIRECT:
            caller__free(m);
            break;
        case CALLER__MSG_CHILD:
            c->life->unref(container_of(m, caller_t, child_msg));
            break;
        case CALLER__MSG_POOL: {
            /* A worker that finished: it leaves its pool (take() sees it
             * stopped and hands out nothing). */
            atomic_store_explicit(&c->pool_posted, false, memory_order_release);
            const caller__worker_hooks_t *wh =
                atomic_load_explicit(&c->worker, memory_order_acquire);
            caller_pending_t *p = wh ? wh->take(c) : NULL;
            if (p)
                caller__task_discard(p);
            break;
        }
        case CALLER__MSG_RESUME: /* no task is left to resume */
        case CALLER__MSG_STOP:
            break;
        }
        m = next;
    }
}

/* ---- scheduling API ------------------------------------------------------------ */

static size_t append(char *buf, size_t len, size_t at, const char *s)
{
    while (s && *s && at + 1 < len)
        buf[at++] = *s++;
    buf[at < len ? at : len - 1] = 0;
    return at;
}

void caller__task_describe(char *buf, size_t len)
{
    caller__task_t *t = tl_task;
    if (!t || len == 0)
        return;
    const char *name = caller__pending_name(caller__task_pending(t));
    size_t at = append(buf, len, 0, "task ");
    at = append(buf, len, at, name ? name : "(unnamed)");
    caller_t *c = task_caller(t);
    if (c) {
        at = append(buf, len, at, " on Caller '");
        char cname[sizeof c->name + 1];
        memcpy(cname, c->name, sizeof c->name);
        cname[sizeof c->name] = 0;
        at = append(buf, len, at, cname);
        append(buf, len, at, "'");
    }
}

bool caller__arg_on_task_stack(const void *p, const char *api, const char *what)
{
    if (!caller__fiber_on_run_stack(p))
        return false;
    caller__fail(-EINVAL,
                 "%s: %s points into a copy-stack task's stack, which is not there while the "
                 "task is suspended: pass heap memory (see CALLER_STACK_COPY)",
                 api, what);
    return true;
}

static caller_pending_t *schedule(caller_t *c, double delay, caller_fn fn, void *arg,
                                  const char *name, const char *api, caller_direct_fn on_end,
                                  bool detached)
{
    if (!c || !fn) {
        caller__fail(-EINVAL, "%s: %s is NULL", api, c ? "fn" : "caller");
        return NULL;
    }
    if (caller__arg_on_task_stack(arg, api, "arg"))
        return NULL;
    if (!(delay >= 0))
        delay = 0; /* negative and NaN: now */
    int64_t deadline = delay > 0 ? caller__deadline(delay) : INT64_MIN;
    /* No early "is it stopping?" check: the submission decides (under the
     * inbox lock), and its refusal path is the one that must be right. */
    /* A detached task (the library's housekeeping) belongs to no context:
     * no tracker sees it, nor what it creates. */
    caller__ctx_t *outer = detached ? caller__ctx_swap(NULL) : NULL;
    caller_pending_t *p = caller__task_new(c, fn, arg, name);
    if (detached)
        caller__ctx_swap(outer);
    if (!p)
        return NULL;
    if (on_end) {
        caller_direct_fn was = NULL;
        if (!atomic_compare_exchange_strong_explicit(&end_hook, &was, on_end, memory_order_relaxed,
                                                     memory_order_relaxed) &&
            was != on_end) {
            fprintf(stderr, "libcaller: caller__call_soon_ex: a second end hook\n");
            abort();
        }
        task_of(p)->has_end = true;
    }
    caller__pending_ref_unshared(p); /* the caller's; the loop keeps the first */
    if (caller__task_submit(c, p, deadline) < 0) {
        task_of(p)->has_end = false; /* refused: the caller cleans up */
        caller__ctx_unref(task_of(p)->ctx);
        task_of(p)->ctx = NULL;
        caller__fail_stopped(c, api);
        caller_pending_unref(p);
        caller_pending_unref(p);
        return NULL;
    }
    /* Tracked only once accepted: a refused call, never seen by its caller,
     * must not keep a group waiting for it (the fuzzer found one that did).
     * If it already ran, the trackers see it done at once. */
    if (!detached)
        caller__pending_track(p);
    return p;
}

caller_pending_t *caller__call_later_detached(caller_t *c, double delay, caller_fn fn, void *arg,
                                              const char *name)
{
    return schedule(c, delay, fn, arg, name, "caller_call_later", NULL, true);
}

caller_pending_t *caller__call_soon_ex(caller_t *c, caller_fn fn, void *arg, const char *name,
                                       caller_direct_fn on_end)
{
    return schedule(c, 0, fn, arg, name, "caller_call_soon", on_end, false);
}

caller_pending_t *caller_call_soon_named(caller_t *c, caller_fn fn, void *arg, const char *name)
{
    return schedule(c, 0, fn, arg, name, "caller_call_soon", NULL, false);
}

caller_pending_t *caller_call_later_named(caller_t *c, double delay, caller_fn fn, void *arg,
                                          const char *name)
{
    return schedule(c, delay, fn, arg, name, "caller_call_later", NULL, false);
}

caller_pending_t *(caller_call_soon)(caller_t *c, caller_fn fn, void *arg)
{
    return schedule(c, 0, fn, arg, NULL, "caller_call_soon", NULL, false);
}

caller_pending_t *(caller_call_later)(caller_t *c, double delay, caller_fn fn, void *arg)
{
    return schedule(c, delay, fn, arg, NULL, "caller_call_later", NULL, false);
}

typedef struct {
    caller__msg_t msg;
    caller_direct_fn fn;
    void *arg;
} direct_t;

static void run_direct(caller_t *c, caller__msg_t *m)
{
    direct_t *d = (direct_t *)m;
    caller__raise_t raised = {0};
    int *outer_code = tl_raise_code;
    char **outer_msg = tl_raise_msg;
    tl_raise_code = &raised.code;
    tl_raise_msg = &raised.msg;
    d->fn(d->arg);
    tl_raise_code = outer_code;
    tl_raise_msg = outer_msg;
    if (raised.code) {
        caller__log(c, CALLER_LOG_ERROR, "Execution of call_direct function %p failed: %s (%s)",
                    (void *)(uintptr_t)d->fn, raised.msg ? raised.msg : "",
                    caller_err_name(raised.code));
        caller__free(raised.msg);
    }
    caller__free(d);
}

int caller_call_direct(caller_t *c, caller_direct_fn fn, void *arg)
{
    if (!c || !fn)
        return caller__fail(-EINVAL, "caller_call_direct: %s is NULL", c ? "fn" : "caller");
    direct_t *d = caller__malloc(sizeof *d);
    if (!d)
        return caller__fail(-ENOMEM, "caller_call_direct: out of memory");
    d->msg.kind = CALLER__MSG_DIRECT;
    d->fn = fn;
    d->arg = arg;
    if (!post(c, &d->msg, true)) {
        caller__free(d);
        return caller__fail_stopped(c, "caller_call_direct");
    }
    return 0;
}

bool caller__task_take_raised(int *code, char **msg)
{
    if (!tl_raise_code || !*tl_raise_code)
        return false;
    *code = *tl_raise_code;
    *msg = *tl_raise_msg;
    *tl_raise_code = 0;
    *tl_raise_msg = NULL;
    return true;
}

int caller_raise(int code, const char *fmt, ...)
{
    if (code >= 0)
        return caller__fail(-EINVAL, "caller_raise: code %d is not negative", code);
    if (!tl_raise_code)
        return caller__fail(-EPERM, "caller_raise: not in a task or a direct call");
    char *msg = NULL;
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        msg = caller__vasprintf(fmt, ap);
        va_end(ap);
    }
    if (*tl_raise_code)
        caller__free(*tl_raise_msg);
    *tl_raise_code = code;
    *tl_raise_msg = msg;
    return 0;
}

bool caller__sched_idle(const caller_t *c)
{
    return c->nlive == 0;
}

/* ---- waiting on a Pending ----------------------------------------------------- */

int caller_pending_wait(caller_pending_t *p, double timeout, unsigned flags, void **value)
{
    if (value)
        *value = NULL;
    if (!p)
        return caller__fail(-EINVAL, "caller_pending_wait: p is NULL");
    if (flags & ~(unsigned)(CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT))
        return caller__fail(-EINVAL, "caller_pending_wait: unknown flags 0x%x", flags);
    bool protect = flags & CALLER_WAIT_PROTECT;
    bool want_result = flags & CALLER_WAIT_RESULT;
    int code = 0, rc;
    void *v = NULL;
    int64_t deadline = caller__deadline(timeout);
    caller__task_t *task = tl_task;
    caller_t *self;
    if (caller__pending_completing_here(p)) {
        /* Inside its own done callbacks: done, and the wake a wait would
         * need comes from this thread once the callback returns. */
        rc = 0;
        if (want_result)
            code = caller__pending_outcome(p, &v);
    } else if (task) {
        rc = caller__task_wait(task, p, deadline, want_result, &code, &v);
    } else if (caller__pending_settled(p)) {
        rc = 0; /* done: no waiter to link, no lock unless the outcome is wanted */
        if (want_result)
            code = caller__pending_outcome(p, &v);
    } else if ((self = caller__thread_caller()) && caller__pending_owner_of_undone(p) == self) {
        /* Only this thread's Caller can complete it, and this thread would
         * block instead of running it. */
        char text[160];
        caller_pending_repr(p, text, sizeof text);
        return caller__fail(-EDEADLK,
                            "caller_pending_wait: blocking the thread of the Caller that "
                            "must complete %s would never end",
                            text);
    } else {
        rc = caller__pending_block(p, deadline, &code, &v);
    }
    return caller__pending_wait_end(p, rc, code, v, timeout, protect, want_result, value);
}
