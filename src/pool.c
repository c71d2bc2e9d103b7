/*
 * The worker pool behind caller_to_thread (SPEC §6). Workers are children
 * of the pool's owner made with caller_get(): each is a Caller on its own
 * thread, so caller_current() in a call is the worker's Caller.
 *
 * Calls wait in one run queue per pool, and workers pull from it: a worker
 * whose call ended takes the next one itself, in the same dispatch round
 * (sched.c's pull()), with no loop turn and no wake-up in between. The
 * Pending the user holds is the call's own task: queued with no Caller, it
 * is adopted by the worker that takes it.
 *
 * Wake-ups. A worker sleeping in its loop is woken (a MSG_POOL message to
 * its inbox) only when a call is queued and no other worker will come for
 * it: a worker takes the next call itself as its call ends (before that
 * call's waiters wake), and `woken` counts the workers already told to
 * look; a call is queued with a wake-up only while the queued calls
 * outnumber those. The worker woken is the one
 * spinning for work if there is one (its inbox is poked, no system call),
 * else the most recently idled; with none idle a new worker is started
 * (up to max_workers). Of the idle workers at most one spins at a time
 * (on 2 cores, more spinners only steal the CPU from the work).
 *
 * A queued call is cancelled under the pool's lock: still queued, it is
 * taken out and never runs; taken, the worker's loop is told (as for any
 * task). Which of the two is decided under the lock, by the task's
 * `msg.kind` (task.h).
 *
 * Locks: pool->lock (lockorder.h); a worker's inbox lock is taken only
 * after it. caller_stop() and caller_unref() of workers are called with no
 * lock held. The pool holds one reference on each of its workers (`alive`
 * of them) until the worker leaves it.
 */
#include "alloc.h"
#include "context.h"
#include "core.h"
#include "error.h"
#include "list.h"
#include "lockorder.h"
#include "pending.h"
#include "task.h"
#include "testpoint.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define container_of caller__container_of

struct caller__pool {
    caller__lock_t lock;
    caller_t *owner; /* not a reference: the owner frees its pool */
    caller_pool_config_t cfg;
    caller__link_t runq; /* queued calls, oldest first, through their task's `live` */
    size_t nqueued;
    caller__link_t idle; /* idle workers, the longest idle first */
    size_t nidle;
    size_t alive;      /* workers in the pool (its references) */
    size_t woken;      /* workers told to look at the queue, not there yet */
    caller_t *spinner; /* the idle worker spinning for work, or NULL */
    int64_t sweep_at;  /* the earliest sweep scheduled, or INT64_MAX */
    bool stopped;
};

/* The pool's lock, in the library's order (lockorder.h). */
static inline void lock_pool(caller_pool_t *pool)
{
    caller__order_acquire(CALLER__RANK_POOL);
    caller__lock(&pool->lock);
}

static inline void unlock_pool(caller_pool_t *pool)
{
    caller__unlock(&pool->lock);
    caller__order_release(CALLER__RANK_POOL);
}
static const caller_pool_config_t defaults = {
    .max_idle = CALLER_MAX_IDLE_POOL_INSTANCES,
    .idle_shutdown = CALLER_IDLE_WORKER_SHUTDOWN_DURATION,
    .max_workers = 0,
};

static void pool_free(caller_pool_t *pool);
static void pool_forget(caller_t *parent, caller_t *w);
static void pool_stop(caller_t *c);

/* What the lifecycle (caller.c, below this file) calls of a Caller's pool. */
static void pool_stats(caller_pool_t *pool, size_t *workers, size_t *idle, size_t *queued);
static const caller__pool_hooks_t hooks = {
    .stop = pool_stop, .forget = pool_forget, .free = pool_free, .stats = pool_stats};

/* The pool of @p c, made on first use. NULL only for lack of memory (the
 * error names @p api). */
static caller_pool_t *pool_of(caller_t *c, const char *api)
{
    caller__lock_caller(c);
    caller_pool_t *pool = c->pool;
    if (!pool) {
        pool = caller__calloc(1, sizeof *pool);
        if (pool) {
            atomic_init(&pool->lock, CALLER__LOCK_INIT);
            pool->owner = c;
            pool->cfg = defaults;
            pool->sweep_at = INT64_MAX;
            caller__list_init(&pool->idle);
            caller__list_init(&pool->runq);
            c->pool = pool;
            atomic_store_explicit(&c->pool_hooks, &hooks, memory_order_release);
        }
    }
    caller__unlock_caller(c);
    if (!pool)
        caller__fail(-ENOMEM, "%s: out of memory", api);
    return pool;
}

static caller_t *worker_of(caller__link_t *l)
{
    return caller__container_of(l, caller_t, pool_link);
}

/* Under the lock (or with the pool gone from view): take the worker of
 * idle-list node @p l out of the pool's idle workers; its reference. */
static caller_t *unlink_idle_locked(caller_pool_t *pool, caller__link_t *l)
{
    caller__list_del(l);
    pool->nidle--;
    return worker_of(l);
}

static void pool_free(caller_pool_t *pool)
{
    if (!pool)
        return;
    while (!caller__list_empty(&pool->idle))
        caller_unref(unlink_idle_locked(pool, pool->idle.next));
    caller__free(pool);
}

/* ---- idle workers ------------------------------------------------------- */

/* Under the lock: worker @p w now runs a call (@p busy) or not. */
static void set_busy_locked(caller_t *w, bool busy)
{
    if (w->pool_busy == busy)
        return;
    w->pool_busy = busy;
    caller__busy_workers_add(busy ? 1 : -1);
}

static void *sweep(void *arg);
static void leave_locked(caller_pool_t *pool, caller_t *w);

/* Under the lock: make sure a sweep runs by @p at. */
static void schedule_sweep_locked(caller_pool_t *pool, int64_t at)
{
    if (at >= pool->sweep_at || pool->stopped)
        return;
    double delay = (double)(at - caller__now_ns()) / 1e9;
    /* Detached: in no context, tracked by none (a worker can come back in a
     * user's thread or task, inside a group). */
    caller_pending_t *p = caller__call_later_detached(pool->owner, delay > 0 ? delay : 0, sweep,
                                                      pool, "idle worker sweep");
    if (p) {
        pool->sweep_at = at;
        caller_pending_unref(p);
    }
}

/* Under the lock: the sweep due for the idle workers now in the pool. */
static void reschedule_sweep_locked(caller_pool_t *pool)
{
    if (pool->cfg.idle_shutdown <= 0 || pool->nidle == 0)
        return;
    int64_t earliest = worker_of(pool->idle.next)->idle_since; /* the longest idle */
    schedule_sweep_locked(pool, earliest + (int64_t)(pool->cfg.idle_shutdown * 1e9));
}

/* A task on the owner's loop: stop the workers idle for too long. */
static void *sweep(void *arg)
{
    caller_pool_t *pool = arg;
    caller_t *expired[64];
    size_t n;
    do {
        n = 0;
        lock_pool(pool);
        pool->sweep_at = INT64_MAX;
        int64_t limit = caller__now_ns() - (int64_t)(pool->cfg.idle_shutdown * 1e9);
        /* Idled in order: the expired ones come first. */
        while (pool->cfg.idle_shutdown > 0 && !caller__list_empty(&pool->idle) && n < 64 &&
               worker_of(pool->idle.next)->idle_since <= limit) {
            expired[n] = worker_of(pool->idle.next);
            leave_locked(pool, expired[n++]);
        }
        reschedule_sweep_locked(pool);
        unlock_pool(pool);
        for (size_t i = 0; i < n; i++) {
            caller_stop(expired[i], CALLER_STOP_FORCE);
            caller_unref(expired[i]);
        }
    } while (n == 64);
    return NULL;
}

/* Under the lock: add @p w (the pool's reference) to the idle workers. */
static void push_idle_locked(caller_pool_t *pool, caller_t *w)
{
    w->idle_since = caller__now_ns();
    caller__list_add_tail(&pool->idle, &w->pool_link);
    pool->nidle++;
    reschedule_sweep_locked(pool);
}

/* Under the lock: @p w leaves the pool; the caller drops its reference. */
static void leave_locked(caller_pool_t *pool, caller_t *w)
{
    if (!caller__list_empty(&w->pool_link))
        unlink_idle_locked(pool, &w->pool_link);
    if (pool->spinner == w)
        pool->spinner = NULL;
    if (w->pool_woken) {
        w->pool_woken = false;
        pool->woken--;
    }
    set_busy_locked(w, false);
    pool->alive--;
    atomic_store_explicit(&w->worker, NULL, memory_order_release);
}

static void pool_forget(caller_t *parent, caller_t *w)
{
    caller_pool_t *pool = parent->pool;
    if (!pool)
        return;
    bool found = false;
    lock_pool(pool);
    /* Idle in this pool: its parent's. One that left already (its link may
     * be on pool_stop's list) is not looked at. */
    if (atomic_load_explicit(&w->worker, memory_order_relaxed) &&
        !caller__list_empty(&w->pool_link)) {
        leave_locked(pool, w);
        found = true;
    }
    unlock_pool(pool);
    if (found)
        caller_unref(w);
}

/* ---- waking workers ---------------------------------------------------------- */

static const caller__worker_hooks_t worker_hooks;

/*
 * Under the lock: if the queued calls outnumber the workers coming for
 * them, pick a worker to wake (*wake, marked woken) or count one to start
 * (*make, alive counted). At most one of either per call.
 */
static void decide_wake_locked(caller_pool_t *pool, caller_t **wake, bool *make)
{
    if (pool->stopped || pool->nqueued <= pool->woken)
        return;
    caller_t *w = NULL;
    if (pool->spinner) {
        w = pool->spinner; /* poked, no system call */
        pool->spinner = NULL;
    } else if (pool->nidle) {
        w = worker_of(pool->idle.prev); /* the most recently idled */
    }
    if (w) {
        unlink_idle_locked(pool, &w->pool_link);
        w->pool_woken = true;
        pool->woken++;
        *wake = w;
        return;
    }
    if (pool->cfg.max_workers && pool->alive >= pool->cfg.max_workers)
        return; /* the busy workers will come for it */
    pool->alive++;
    pool->woken++; /* counted as coming from now: it takes on its first round */
    *make = true;
}

static void wake_or_make(caller_pool_t *pool, caller_t *wake, bool make);

/* Tell woken worker @p w to look at the queue (no lock held). */
static void post_wake(caller_pool_t *pool, caller_t *w)
{
    if (atomic_exchange_explicit(&w->pool_posted, true, memory_order_acq_rel))
        return; /* a wake-up is already in its inbox: it will look */
    if (caller__post(w, &w->pool_msg))
        return;
    /* Its inbox closed (it finished): it leaves the pool, another is
     * picked for the call. */
    atomic_store_explicit(&w->pool_posted, false, memory_order_release);
    caller_t *next = NULL;
    bool make = false;
    bool left = false;
    lock_pool(pool);
    if (atomic_load_explicit(&w->worker, memory_order_relaxed)) {
        leave_locked(pool, w);
        left = true;
    }
    decide_wake_locked(pool, &next, &make);
    unlock_pool(pool);
    if (left)
        caller_unref(w);
    wake_or_make(pool, next, make);
}

/*
 * Start a worker for the queue (counted by decide_wake_locked) and wake it.
 * NULL if it could not be made (the count undone, caller_get's error
 * recorded).
 */
static caller_t *make_worker(caller_pool_t *pool)
{
    caller_t *w = caller_get(pool->owner, NULL);
    lock_pool(pool);
    if (!w) {
        pool->alive--;
        pool->woken--;
        unlock_pool(pool);
        return NULL;
    }
    w->pool_woken = true; /* counted in `woken` by decide_wake_locked */
    unlock_pool(pool);
    atomic_store_explicit(&w->worker, &worker_hooks, memory_order_release);
    post_wake(pool, w);
    return w;
}

/* Under the lock: take @p t off the queue if it is still there. */
static bool unqueue_locked(caller_pool_t *pool, caller__task_t *t)
{
    if (t->msg.kind != CALLER__POOLED_QUEUED)
        return false;
    caller__list_del(&t->live);
    caller__list_init(&t->live);
    pool->nqueued--;
    t->msg.kind = CALLER__POOLED_TAKEN; /* no longer the queue's */
    return true;
}

/*
 * No worker could be started for the queue (in a worker's thread, or
 * waking): if none is left to run the queued calls, they fail now rather
 * than wait forever; with workers busy, they wait for those.
 */
static void no_new_worker(caller_pool_t *pool)
{
    caller__fifo_t failed = {0};
    lock_pool(pool);
    while (pool->alive == 0 && !caller__list_empty(&pool->runq)) {
        caller__task_t *t = container_of(pool->runq.next, caller__task_t, live);
        unqueue_locked(pool, t);
        caller__fifo_push(&failed, &t->msg);
    }
    unlock_pool(pool);
    caller__msg_t *m;
    while ((m = caller__fifo_pop(&failed))) {
        caller_pending_t *p = caller__task_pending(container_of(m, caller__task_t, msg));
        caller_pending_set_exception(p, -EAGAIN, "caller_to_thread: cannot start a worker");
        caller__task_discard(p);
    }
}

static void wake_or_make(caller_pool_t *pool, caller_t *wake, bool make)
{
    if (wake)
        post_wake(pool, wake);
    else if (make && !make_worker(pool))
        no_new_worker(pool);
}

/* ---- the worker side (its loop thread, through sched.c) -------------------- */

static caller_pool_t *pool_of_worker(caller_t *w)
{
    return w->parent->pool;
}

static caller_pending_t *worker_take(caller_t *w)
{
    caller_pool_t *pool = pool_of_worker(w);
    caller_t *wake = NULL;
    bool make = false, left = false;
    caller_pending_t *p = NULL;
    lock_pool(pool);
    if (!atomic_load_explicit(&w->worker, memory_order_relaxed)) {
        unlock_pool(pool); /* it left the pool already */
        return NULL;
    }
    if (w->pool_woken) {
        w->pool_woken = false;
        pool->woken--;
    }
    bool idle = !caller__list_empty(&w->pool_link);
    if (pool->stopped || caller__state(w) != CALLER_STATE_RUNNING) {
        leave_locked(pool, w);
        left = true;
    } else if (pool->nqueued) {
        caller__task_t *t = container_of(pool->runq.next, caller__task_t, live);
        unqueue_locked(pool, t); /* taken: a cancel goes to this worker now */
        p = caller__task_pending(t);
        caller__pending_adopt(p, w);
        if (idle) {
            unlink_idle_locked(pool, &w->pool_link);
            if (pool->spinner == w)
                pool->spinner = NULL;
        }
    } else if (!idle) {
        if (pool->nidle < pool->cfg.max_idle) {
            push_idle_locked(pool, w);
        } else {
            leave_locked(pool, w); /* enough idle workers already */
            left = true;
        }
    }
    if (!left)
        set_busy_locked(w, p != NULL);
    /* Calls it leaves behind may need another worker. */
    decide_wake_locked(pool, &wake, &make);
    unlock_pool(pool);
    if (left) {
        caller_stop(w, CALLER_STOP_FORCE);
        caller_unref(w);
    }
    wake_or_make(pool, wake, make);
    return p;
}

static bool worker_may_spin(caller_t *w)
{
    caller_pool_t *pool = pool_of_worker(w);
    bool may = true;
    lock_pool(pool);
    if (!atomic_load_explicit(&w->worker, memory_order_relaxed)) {
        unlock_pool(pool); /* it left the pool (its link is not the pool's) */
        return false;
    }
    if (!caller__list_empty(&w->pool_link)) { /* idle: one spinner at most */
        may = pool->spinner == NULL;
        if (may)
            pool->spinner = w;
    }
    unlock_pool(pool);
    return may;
}

static void worker_spun(caller_t *w)
{
    caller_pool_t *pool = pool_of_worker(w);
    lock_pool(pool);
    if (pool->spinner == w)
        pool->spinner = NULL;
    unlock_pool(pool);
}

static const caller__worker_hooks_t worker_hooks = {
    .take = worker_take,
    .may_spin = worker_may_spin,
    .spun = worker_spun,
};

/* ---- submitting calls ------------------------------------------------------ */

static void pooled_canceller(caller_pending_t *p, const char *messages, void *arg)
{
    (void)messages;
    caller_pool_t *pool = arg;
    caller__task_t *t = (caller__task_t *)((char *)p + CALLER__PENDING_SIZE);
    lock_pool(pool);
    bool queued = unqueue_locked(pool, t);
    unlock_pool(pool);
    if (queued)
        caller__task_discard(p); /* it never runs */
    else if (caller__pending_owner(p))
        caller__task_nudge(p); /* a worker has it */
    /* else: being discarded (its own cancel, from caller__task_discard) */
}

/* caller_get() failed to make a worker for @p c: report its error as
 * caller_to_thread's own, without the inner function's name. */
static void fail_no_worker(caller_t *c)
{
    const char *inner;
    int code = caller_last_error(&inner);
    if (code == -ESHUTDOWN) {
        caller__fail_stopped(c, "caller_to_thread");
        return;
    }
    /* "caller_get: out of memory" -> "out of memory" */
    const char *colon = strncmp(inner, "caller_", 7) == 0 ? strstr(inner, ": ") : NULL;
    if (colon && strcspn(inner, " ") > (size_t)(colon - inner))
        inner = colon + 2;
    char text[400];
    snprintf(text, sizeof text, "%s", inner); /* inner is the buffer rewritten below */
    caller__fail(code < 0 ? code : -EAGAIN, "caller_to_thread: cannot start a worker: %s", text);
}

caller_pending_t *caller_to_thread_named(caller_t *c, caller_fn fn, void *arg, const char *name)
{
    if (!c || !fn) {
        caller__fail(-EINVAL, "caller_to_thread: %s is NULL", c ? "fn" : "caller");
        return NULL;
    }
    if (caller__arg_on_task_stack(arg, "caller_to_thread", "arg"))
        return NULL;
    caller_pool_t *pool = pool_of(c, "caller_to_thread");
    if (!pool)
        return NULL;
    caller_pending_t *p = caller__task_new_pooled(fn, arg, name, pooled_canceller, pool);
    if (!p) {
        caller__fail(-ENOMEM, "caller_to_thread: out of memory");
        return NULL;
    }
    caller__task_t *t = (caller__task_t *)((char *)p + CALLER__PENDING_SIZE);
    caller__pending_ref_unshared(p); /* the caller's; the queue keeps the first */
    caller_t *wake = NULL;
    bool make = false;
    lock_pool(pool);
    if (pool->stopped || caller__state(c) >= CALLER_STATE_STOPPING) {
        unlock_pool(pool);
        caller__ctx_unref(t->ctx);
        t->ctx = NULL;
        caller_pending_unref(p);
        caller_pending_unref(p);
        caller__fail_stopped(c, "caller_to_thread");
        return NULL;
    }
    t->msg.kind = CALLER__POOLED_QUEUED;
    caller__list_add_tail(&pool->runq, &t->live);
    pool->nqueued++;
    decide_wake_locked(pool, &wake, &make);
    unlock_pool(pool);
    if (make && !make_worker(pool)) {
        /* No worker for it: the call fails here, unless a worker that
         * freed up meanwhile took it. */
        lock_pool(pool);
        bool queued = unqueue_locked(pool, t);
        unlock_pool(pool);
        if (queued) {
            fail_no_worker(c);
            caller__ctx_unref(t->ctx);
            t->ctx = NULL;
            caller_pending_unref(p);
            caller_pending_unref(p);
            return NULL;
        }
    }
    /* Tracked once queued (a group waits for it from here). */
    caller__pending_track(p);
    if (wake)
        post_wake(pool, wake);
    return p;
}

caller_pending_t *(caller_to_thread)(caller_t *c, caller_fn fn, void *arg)
{
    return caller_to_thread_named(c, fn, arg, NULL);
}

/* Loop thread of the owner, on stop: idle workers go (they are children,
 * stopped with it), queued calls end cancelled. */
static void pool_stop(caller_t *c)
{
    caller_pool_t *pool = c->pool;
    if (!pool)
        return;
    lock_pool(pool);
    pool->stopped = true;
    caller__link_t idle, runq; /* moved here, to be released unlocked */
    caller__list_init(&idle);
    caller__list_init(&runq);
    while (!caller__list_empty(&pool->idle)) {
        caller_t *w = worker_of(pool->idle.next);
        leave_locked(pool, w);
        caller__list_add_tail(&idle, &w->pool_link);
    }
    caller__list_splice_tail_init(&runq, &pool->runq);
    pool->nqueued = 0;
    for (caller__link_t *l = runq.next; l != &runq; l = l->next)
        container_of(l, caller__task_t, live)->msg.kind = CALLER__POOLED_TAKEN;
    unlock_pool(pool);
    CALLER__TEST_POINT("pool.stop_unhooking", c);
    /* Each link is unhooked under the lock, the reference dropped without
     * it: a worker that loaded its hooks before it left may be asking
     * may_spin about its link right now. */
    for (;;) {
        lock_pool(pool);
        caller__link_t *l = caller__list_empty(&idle) ? NULL : idle.next;
        if (l) {
            caller__list_del(l);
            caller__list_init(l);
        }
        unlock_pool(pool);
        if (!l)
            break;
        caller_unref(worker_of(l));
    }
    while (!caller__list_empty(&runq)) {
        caller__link_t *l = runq.next;
        caller__list_del(l);
        caller__list_init(l);
        caller__task_discard(caller__task_pending(container_of(l, caller__task_t, live)));
    }
}

/* ---- configuration ------------------------------------------------------------ */

int caller_pool_get_config(caller_t *c, caller_pool_config_t *out)
{
    if (!c || !out)
        return caller__fail(-EINVAL, "caller_pool_get_config: %s is NULL", c ? "out" : "caller");
    caller_pool_t *pool = pool_of(c, "caller_pool_get_config");
    if (!pool)
        return -ENOMEM;
    lock_pool(pool);
    *out = pool->cfg;
    unlock_pool(pool);
    return 0;
}

int caller_pool_set_config(caller_t *c, const caller_pool_config_t *cfg)
{
    if (!c || !cfg)
        return caller__fail(-EINVAL, "caller_pool_set_config: %s is NULL", c ? "cfg" : "caller");
    if (caller__check_reserved(cfg->reserved, sizeof cfg->reserved / sizeof cfg->reserved[0],
                               "caller_pool_set_config", "caller_pool_config_t") < 0)
        return -EINVAL;
    if (!(cfg->idle_shutdown >= 0))
        return caller__fail(-EINVAL, "caller_pool_set_config: idle_shutdown %g is negative",
                            cfg->idle_shutdown);
    caller_pool_t *pool = pool_of(c, "caller_pool_set_config");
    if (!pool)
        return -ENOMEM;
    caller_t *excess[64];
    size_t n = 0;
    lock_pool(pool);
    pool->cfg = *cfg;
    /* Fewer idle workers allowed now: stop the oldest beyond the limit. */
    while (pool->nidle > cfg->max_idle && n < 64) {
        excess[n] = worker_of(pool->idle.next); /* the longest idle */
        leave_locked(pool, excess[n++]);
    }
    pool->sweep_at = INT64_MAX; /* a shorter duration needs an earlier sweep */
    reschedule_sweep_locked(pool);
    unlock_pool(pool);
    for (size_t i = 0; i < n; i++) {
        caller_stop(excess[i], CALLER_STOP_FORCE);
        caller_unref(excess[i]);
    }
    return 0;
}

static void pool_stats(caller_pool_t *pool, size_t *workers, size_t *idle, size_t *queued)
{
    lock_pool(pool);
    *workers = pool->alive;
    *idle = pool->nidle;
    *queued = pool->nqueued;
    unlock_pool(pool);
}

size_t caller_pool_idle(caller_t *c)
{
    if (!c || !c->pool)
        return 0;
    lock_pool(c->pool);
    size_t n = c->pool->nidle;
    unlock_pool(c->pool);
    return n;
}
