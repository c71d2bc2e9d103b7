/*
 * The worker pool behind caller_to_thread (SPEC §6), built on the public
 * calls: workers are children made with caller_get(), calls reach them with
 * caller_call_soon(), idle workers are swept by a caller_call_later() task
 * on the pool owner's loop.
 *
 * Locks: pool->lock (lockorder.h), under which a Caller's inbox lock may be
 * taken (call_soon / call_later). caller_stop() and caller_unref() of workers are called with
 * no lock held. The done callback that hands a worker back runs in the
 * worker's thread before the call's waiters wake, so a caller that waits
 * for one to_thread and starts the next finds the worker idle again.
 *
 * A parked call is unparked (taken off the FIFO) and marked so in one hold
 * of pool->lock, then dispatched outside it (call_soon may run trackers'
 * code). A cancel in between finds it neither parked nor with a task yet:
 * it only flags the user's Pending, and the dispatch looks at that flag
 * after recording the task, as does the task before it calls the function.
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
    pthread_mutex_t lock;
    caller_t *owner; /* not a reference: the owner frees its pool */
    caller_pool_config_t cfg;
    caller__link_t idle; /* workers (references) through their pool_link:
                            the longest idle first, the most recently idled last */
    size_t nidle;
    size_t alive;          /* workers counted against cfg.max_workers */
    caller__fifo_t parked; /* calls waiting for a worker (cfg.max_workers) */
    int64_t sweep_at;      /* the earliest sweep scheduled, or INT64_MAX */
    bool stopped;
};

/* A call parked until a worker is free: lives in its proxy Pending. */
typedef struct {
    caller__msg_t link;
    caller_pool_t *pool;
    caller_fn fn;
    void *arg;
    const char *name;
    caller_pending_t *proxy; /* what the user holds */
    caller_pending_t *task;  /* once dispatched (under pool->lock) */
    caller_t *worker;
    struct caller__ctx *ctx; /* the context of the caller_to_thread call */
    bool unparked;           /* off the FIFO, to a worker (under pool->lock) */
} parked_t;

/* The pool's lock, in the library's order (lockorder.h). */
#define lock_pool(pool) caller__mutex_lock(&(pool)->lock, CALLER__RANK_POOL)
#define unlock_pool(pool) caller__mutex_unlock(&(pool)->lock, CALLER__RANK_POOL)
static const caller_pool_config_t defaults = {
    .max_idle = CALLER_MAX_IDLE_POOL_INSTANCES,
    .idle_shutdown = CALLER_IDLE_WORKER_SHUTDOWN_DURATION,
    .max_workers = 0,
};

static void pool_free(caller_pool_t *pool);
static void pool_forget(caller_t *parent, caller_t *w);
static void pool_stop(caller_t *c);

/* What the lifecycle (caller.c, below this file) calls of a Caller's pool. */
static const caller__pool_hooks_t hooks = {
    .stop = pool_stop, .forget = pool_forget, .free = pool_free};

/* The pool of @p c, made on first use. NULL only for lack of memory (the
 * error names @p api). */
static caller_pool_t *pool_of(caller_t *c, const char *api)
{
    caller__lock_caller(c);
    caller_pool_t *pool = c->pool;
    if (!pool) {
        pool = caller__calloc(1, sizeof *pool);
        if (pool) {
            pthread_mutex_init(&pool->lock, NULL);
            pool->owner = c;
            pool->cfg = defaults;
            pool->sweep_at = INT64_MAX;
            caller__list_init(&pool->idle);
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
    pthread_mutex_destroy(&pool->lock);
    caller__free(pool);
}

/* ---- idle workers ------------------------------------------------------- */

static void *sweep(void *arg);

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
            expired[n++] = unlink_idle_locked(pool, pool->idle.next);
            pool->alive--;
        }
        reschedule_sweep_locked(pool);
        unlock_pool(pool);
        for (size_t i = 0; i < n; i++) {
            caller_stop(expired[i], true);
            caller_unref(expired[i]);
        }
    } while (n == 64);
    return NULL;
}

/* Under the lock: add @p w (a reference) to the idle workers. */
static bool push_idle_locked(caller_pool_t *pool, caller_t *w)
{
    w->idle_since = caller__now_ns();
    caller__list_add_tail(&pool->idle, &w->pool_link);
    pool->nidle++;
    reschedule_sweep_locked(pool);
    return true;
}

/* Under the lock: the most recently idled worker that still runs. */
static caller_t *pop_idle_locked(caller_pool_t *pool, caller_t **stale, size_t *nstale)
{
    while (!caller__list_empty(&pool->idle)) {
        caller_t *w = unlink_idle_locked(pool, pool->idle.prev); /* the most recent */
        if (caller_state(w) == CALLER_STATE_RUNNING)
            return w;
        pool->alive--; /* stopped while idle: it leaves the pool */
        stale[(*nstale)++] = w;
        if (*nstale == 8)
            break;
    }
    return NULL;
}

static void pool_forget(caller_t *parent, caller_t *w)
{
    caller_pool_t *pool = parent->pool;
    if (!pool)
        return;
    bool found = false;
    lock_pool(pool);
    if (!caller__list_empty(&w->pool_link)) { /* idle in this pool: its parent's */
        unlink_idle_locked(pool, &w->pool_link);
        pool->alive--;
        found = true;
    }
    unlock_pool(pool);
    if (found)
        caller_unref(w);
}

/* ---- running calls ----------------------------------------------------------- */

static void worker_done(caller_pending_t *p, void *arg);
static void parked_done(caller_pending_t *p, void *arg);
static void dispatch_parked(caller_pool_t *pool, caller_t *w, parked_t *pk);

/*
 * A call on worker @p w finished (in w's thread). Hand w to a parked call,
 * back to the pool, or stop it. Consumes the reference on @p w.
 */
static void release_worker(caller_t *w)
{
    caller_pool_t *pool = w->parent->pool;
    lock_pool(pool);
    bool usable = caller_state(w) == CALLER_STATE_RUNNING && !pool->stopped;
    if (usable && pool->parked.head) {
        parked_t *pk = (parked_t *)caller__fifo_pop(&pool->parked);
        pk->unparked = true; /* with the pop: a cancel sees one or the other */
        unlock_pool(pool);
        CALLER__TEST_POINT("pool.unparked", pk->proxy);
        dispatch_parked(pool, w, pk);
        return;
    }
    if (usable && pool->nidle < pool->cfg.max_idle && push_idle_locked(pool, w)) {
        unlock_pool(pool);
        return;
    }
    pool->alive--;
    unlock_pool(pool);
    caller_stop(w, true);
    caller_unref(w);
}

static void worker_done(caller_pending_t *p, void *arg)
{
    (void)p;
    release_worker(arg);
}

/* Copy the outcome of @p from onto the proxy @p to. */
static void forward(caller_pending_t *from, caller_pending_t *to)
{
    void *v;
    char msg[512];
    int rc = caller_pending_exception(from, msg, sizeof msg);
    if (rc == 0) {
        caller_pending_result(from, &v);
        caller_pending_set_result(to, v, false);
        return;
    }
    if (rc == -ECANCELED && caller_pending_cancelled(from))
        caller_pending_cancel(to, msg);
    caller_pending_set_exception(to, rc, "%s", msg);
}

static void parked_done(caller_pending_t *p, void *arg)
{
    parked_t *pk = arg;
    caller_pool_t *pool = pk->pool;
    lock_pool(pool);
    caller_pending_t *t = pk->task; /* == p; the canceller no longer reaches it */
    pk->task = NULL;
    unlock_pool(pool);
    release_worker(pk->worker); /* before the proxy's waiters wake */
    forward(p, pk->proxy);
    caller_pending_unref(t);
    caller_pending_unref(pk->proxy); /* the pool's reference */
}

/*
 * The task of a parked call. A cancel that came after the call was unparked
 * and before its task was recorded reached no task: the user's Pending is
 * flagged, and the function must not run. (Usually the dispatch has
 * cancelled this task before it started; not when the worker was handed
 * over from another thread, which lets the task start at once.)
 */
static void *run_parked(void *arg)
{
    parked_t *pk = arg;
    if (caller_pending_cancelled(pk->proxy)) {
        caller_raise(-ECANCELED, "Cancelled before started.");
        return NULL;
    }
    return pk->fn(pk->arg);
}

/* Run parked call @p pk on worker @p w (a reference, passed on). */
static void dispatch_parked(caller_pool_t *pool, caller_t *w, parked_t *pk)
{
    /* The call runs in the context of its caller_to_thread, as unparked
     * calls do. */
    caller__ctx_t *outer = caller__ctx_swap(pk->ctx);
    caller_pending_t *t = caller_call_soon_named(w, run_parked, pk, pk->name);
    caller__ctx_swap(outer);
    caller__ctx_unref(pk->ctx);
    pk->ctx = NULL;
    lock_pool(pool);
    pk->task = t;
    pk->worker = w;
    /* A cancel since the unparking reached no task: the canceller runs
     * after the flag is set and looks for the task under this lock, so
     * either it saw the task or this sees the flag. */
    bool cancelled = caller_pending_cancelled(pk->proxy);
    unlock_pool(pool);
    if (!t) {
        /* The worker is stopping: the call fails like any call onto it. */
        caller_pending_set_exception(pk->proxy, -ESHUTDOWN, "the worker stopped");
        caller_pending_unref(pk->proxy);
        release_worker(w);
        return;
    }
    if (cancelled)
        caller_pending_cancel(t, NULL); /* so it never starts, or is told */
    /* pk->task keeps its reference until parked_done. */
    caller_pending_add_done_callback(t, parked_done, pk);
}

static void parked_canceller(caller_pending_t *proxy, const char *messages, void *arg)
{
    parked_t *pk = arg;
    caller_pool_t *pool = pk->pool;
    lock_pool(pool);
    if (!pk->unparked) {
        /* Still waiting for a worker: take it out; it never runs. */
        caller__msg_t **pp = &pool->parked.head, *prev = NULL;
        while (*pp && *pp != &pk->link) {
            prev = *pp;
            pp = &(*pp)->next;
        }
        bool found = *pp != NULL;
        if (found) {
            *pp = pk->link.next;
            if (pool->parked.tail == &pk->link)
                pool->parked.tail = prev;
        }
        unlock_pool(pool);
        if (found) {
            caller__ctx_unref(pk->ctx);
            pk->ctx = NULL;
            caller_pending_set_exception(proxy, -ECANCELED, "Cancelled before started.");
            caller_pending_unref(proxy); /* the pool's reference */
        }
        return;
    }
    /* Unparked: its task, if recorded yet, gets the cancel; if not, the
     * dispatch sees the flag on @p proxy once it recorded the task. */
    caller_pending_t *t = caller_pending_ref(pk->task);
    unlock_pool(pool);
    if (t) {
        caller_pending_cancel(t, messages);
        caller_pending_unref(t);
    }
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
    caller_pool_t *pool = pool_of(c, "caller_to_thread");
    if (!pool)
        return NULL;
    for (int attempt = 0; attempt < 100; attempt++) {
        caller_t *stale[8];
        size_t nstale = 0;
        lock_pool(pool);
        if (pool->stopped) {
            unlock_pool(pool);
            caller__fail_stopped(c, "caller_to_thread");
            return NULL;
        }
        caller_t *w = pop_idle_locked(pool, stale, &nstale);
        bool make = false;
        parked_t *pk = NULL;
        caller_pending_t *proxy = NULL;
        if (!w && nstale == 0) {
            if (pool->cfg.max_workers && pool->alive >= pool->cfg.max_workers) {
                proxy = caller__pending_new_extra(0, sizeof *pk, (void **)&pk);
                if (proxy) {
                    memset(pk, 0, sizeof *pk);
                    *pk = (parked_t){.pool = pool,
                                     .fn = fn,
                                     .arg = arg,
                                     .name = name,
                                     .proxy = proxy,
                                     .ctx = caller__ctx_ref(caller__ctx_current())};
                    caller__pending_set_name(proxy, name);
                    caller_pending_set_canceller(proxy, parked_canceller, pk);
                    caller__pending_track(proxy);
                    caller_pending_ref(proxy); /* the pool's, until it ends */
                    caller__fifo_push(&pool->parked, &pk->link);
                }
            } else {
                pool->alive++;
                make = true;
            }
        }
        unlock_pool(pool);
        for (size_t i = 0; i < nstale; i++)
            caller_unref(stale[i]);
        if (proxy)
            return proxy; /* parked until a worker is free */
        if (!w && !make) {
            if (nstale)
                continue; /* dropped stopped workers: look again */
            caller__fail(-ENOMEM, "caller_to_thread: out of memory");
            return NULL;
        }
        if (make) {
            w = caller_get(c, NULL);
            if (!w) {
                lock_pool(pool);
                pool->alive--;
                unlock_pool(pool);
                fail_no_worker(c);
                return NULL;
            }
        }
        caller_pending_t *p = caller_call_soon_named(w, fn, arg, name);
        if (!p && caller_last_error(NULL) == -ENOMEM) {
            release_worker(w); /* it is fine: back to the pool */
            caller__fail(-ENOMEM, "caller_to_thread: out of memory");
            return NULL;
        }
        if (!p) {
            /* The worker began stopping since we took it: try another. */
            lock_pool(pool);
            pool->alive--;
            unlock_pool(pool);
            caller_unref(w);
            if (caller_state(c) >= CALLER_STATE_STOPPING) {
                caller__fail_stopped(c, "caller_to_thread");
                return NULL;
            }
            continue;
        }
        if (caller_pending_add_done_callback(p, worker_done, w) < 0) {
            /* No memory to hand it back later: the call still runs; let the
             * worker go when it stops with its parent. */
            lock_pool(pool);
            pool->alive--;
            unlock_pool(pool);
            caller_unref(w);
        }
        return p;
    }
    caller__fail(-EAGAIN, "caller_to_thread: no worker could take the call");
    return NULL;
}

caller_pending_t *(caller_to_thread)(caller_t *c, caller_fn fn, void *arg)
{
    return caller_to_thread_named(c, fn, arg, NULL);
}

/* Loop thread of the owner, on stop: idle workers go (they are children,
 * stopped with it), parked calls end cancelled. */
static void pool_stop(caller_t *c)
{
    caller_pool_t *pool = c->pool;
    if (!pool)
        return;
    lock_pool(pool);
    pool->stopped = true;
    caller__link_t idle; /* the idle workers move here, to be released unlocked */
    caller__list_init(&idle);
    caller__list_splice_tail_init(&idle, &pool->idle);
    pool->alive -= pool->nidle;
    pool->nidle = 0;
    caller__msg_t *parked = pool->parked.head;
    pool->parked.head = pool->parked.tail = NULL;
    unlock_pool(pool);
    while (!caller__list_empty(&idle)) {
        caller__link_t *l = idle.next;
        caller__list_del(l);
        caller_unref(worker_of(l));
    }
    while (parked) {
        parked_t *pk = (parked_t *)parked;
        parked = parked->next;
        caller__ctx_unref(pk->ctx);
        pk->ctx = NULL;
        caller_pending_cancel(pk->proxy, NULL);
        caller_pending_set_exception(pk->proxy, -ECANCELED, "Cancelled before started.");
        caller_pending_unref(pk->proxy);
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
        excess[n++] = unlink_idle_locked(pool, pool->idle.next); /* the longest idle */
        pool->alive--;
    }
    pool->sweep_at = INT64_MAX; /* a shorter duration needs an earlier sweep */
    reschedule_sweep_locked(pool);
    unlock_pool(pool);
    for (size_t i = 0; i < n; i++) {
        caller_stop(excess[i], true);
        caller_unref(excess[i]);
    }
    return 0;
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
