/*
 * Callers: creation, the registry, children, stopping, and the text forms
 * (SPEC §2, §3, §12).
 *
 * Locks: registry_lock and caller->lock, in the library's order
 * (lockorder.h). A parent's `lock` may be taken while holding nothing; a
 * child never holds its own `lock` while taking its parent's. The state
 * machine (state.c) changes states under the inbox lock where a change must
 * be atomic with the inbox (a stop's message, the start's opening).
 *
 * Lifetime: a Caller is reference-counted. Its thread (or, for a Caller
 * attached to an application's loop, its open handles) holds a "running"
 * reference from start to finish; the thread-local pointer behind
 * caller_current() holds one too, dropped when the Caller finishes on its
 * thread (or, if it was stopped from elsewhere before it ever ran, the next
 * time that thread asks, or when the thread exits). The registry holds
 * none: lookups only take a reference from a count that is not yet zero.
 */
#include "alloc.h"
#include "core.h"
#include "error.h"
#include "fiber.h"
#include "inbox.h"
#include "iopub.h"
#include "list.h"
#include "lockorder.h"
#include "pending.h"
#include "task.h"
#include "testpoint.h"

#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define WORKER_NAME "caller-worker"

/*
 * A Caller's references, in one word so that an over-release is seen in
 * the same atomic step that makes it: the low half counts all references,
 * the high half those the library holds itself (the running one, the
 * thread-local one), which are taken after and dropped before their count
 * in the low half. A user's unref that leaves fewer in total than the
 * library holds is one too many.
 */
#define REF_USER ((uint64_t)1)
#define REF_INTERNAL (((uint64_t)1 << 32) | 1)
#define REFS_TOTAL(r) ((r)&0xffffffffu)
#define REFS_INTERNAL(r) ((r) >> 32)

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;

/* The locks of this file, in the library's order (lockorder.h). */
#define lock_registry() caller__mutex_lock(&registry_lock, CALLER__RANK_REGISTRY)
#define unlock_registry() caller__mutex_unlock(&registry_lock, CALLER__RANK_REGISTRY)
static caller__link_t registry = {&registry, &registry};
static atomic_size_t live_callers;

/* This thread's Caller (state.c keeps the pointer, borrowed there): the
 * reference behind it is held here, released by tl_release at thread exit. */
#define tl_caller caller__thread_caller()

/* Drops the thread-local reference when a thread that still holds one exits. */
static pthread_key_t tl_key;
static pthread_once_t tl_once = PTHREAD_ONCE_INIT;

static void internal_ref(caller_t *c);
static void internal_unref(caller_t *c);

static void tl_release(void *c)
{
    internal_unref(c);
}

static void tl_key_init(void)
{
    pthread_key_create(&tl_key, tl_release);
}

static void tl_set(caller_t *c)
{
    pthread_once(&tl_once, tl_key_init);
    caller_t *old = tl_caller;
    if (c)
        internal_ref(c);
    caller__set_thread_caller(c);
    pthread_setspecific(tl_key, c);
    if (old)
        internal_unref(old);
}

static int load_state(const caller_t *c)
{
    return caller__state(c);
}

/* ---- references --------------------------------------------------------- */

#define CALLER_MAGIC 0x43616c6cu /* "Call" */
#define CALLER_DEAD 0xdeadca11u

/* A released Caller is detected as far as its memory still shows it (the
 * magic word is cleared on free): a broken invariant, so abort. */
static void check_alive(const caller_t *c, const char *fn)
{
    if (c->magic != CALLER_MAGIC) {
        fprintf(stderr, "libcaller: %s: %p is not a live Caller (released too often?)\n", fn,
                (const void *)c);
        abort();
    }
}

caller_t *caller_ref(caller_t *c)
{
    if (c) {
        check_alive(c, "caller_ref");
        atomic_fetch_add_explicit(&c->refs, REF_USER, memory_order_relaxed);
    }
    return c;
}

/* A reference from a registry or child list entry whose count may already
 * have reached zero (then the Caller is being freed: skip it). */
static caller_t *ref_if_alive(caller_t *c)
{
    uint64_t n = atomic_load_explicit(&c->refs, memory_order_relaxed);
    while (REFS_TOTAL(n) > 0)
        if (atomic_compare_exchange_weak_explicit(&c->refs, &n, n + REF_USER, memory_order_acquire,
                                                  memory_order_relaxed))
            return c;
    return NULL;
}

static void registry_remove(caller_t *c)
{
    lock_registry();
    if (c->registered) {
        caller__list_del(&c->reg);
        c->registered = false;
    }
    unlock_registry();
}

/* Adds @p c unless it is already stopping: whoever made it stop removes it
 * after changing the state, so checking under the lock is enough. */
static void registry_add(caller_t *c)
{
    lock_registry();
    if (load_state(c) >= CALLER_STATE_STOPPING) {
        unlock_registry();
        return;
    }
    caller__list_add_tail(&registry, &c->reg);
    c->registered = true;
    unlock_registry();
}

static void over_released(const caller_t *c)
{
    fprintf(stderr,
            "libcaller: caller_unref: Caller '%s' (%p) released more times than it was "
            "referenced (its thread or loop still holds it)\n",
            c->name, (const void *)c);
    abort();
}

static void release(caller_t *c, uint64_t ref);

static void internal_ref(caller_t *c)
{
    atomic_fetch_add_explicit(&c->refs, REF_INTERNAL, memory_order_relaxed);
}

static void internal_unref(caller_t *c)
{
    release(c, REF_INTERNAL);
}

void caller_unref(caller_t *c)
{
    if (!c)
        return;
    check_alive(c, "caller_unref");
    release(c, REF_USER);
}

/* Drop one reference of kind @p ref; the last frees the Caller. */
static void release(caller_t *c, uint64_t ref)
{
    uint64_t old = atomic_fetch_sub_explicit(&c->refs, ref, memory_order_acq_rel);
    uint64_t total = REFS_TOTAL(old), internal = REFS_INTERNAL(old);
    /* The library's own references come last: an unref that reaches into
     * them (or below zero) is one too many. */
    if (total < 1 || (ref == REF_INTERNAL && internal < 1) ||
        total - 1 < internal - (ref == REF_INTERNAL))
        over_released(c);
    if (total > 1)
        return;
    CALLER__TEST_POINT("unref.last", c);
    registry_remove(c);
    caller_unref(c->parent);
    caller_pending_unref(c->stopped);
    for (size_t i = 0; i < c->nchildren; i++)
        caller_unref(c->children[i]);
    caller__free(c->children);
    caller__heap_free(&c->timers);
    const caller__pool_hooks_t *pool = atomic_load_explicit(&c->pool_hooks, memory_order_acquire);
    if (pool)
        pool->free(c->pool);
    pthread_mutex_destroy(&c->queues.lock);
    pthread_mutex_destroy(&c->lock);
    c->magic = CALLER_DEAD;
    caller__free(c);
    atomic_fetch_sub_explicit(&live_callers, 1, memory_order_release);
}

size_t caller_live_count(void)
{
    return atomic_load_explicit(&live_callers, memory_order_acquire);
}

/* ---- creation ---------------------------------------------------------------- */

static void thread_name_of_self(char *buf, size_t len)
{
    if (pthread_getname_np(pthread_self(), buf, len) != 0 || !buf[0])
        snprintf(buf, len, "thread-%ld", (long)syscall(SYS_gettid));
}

/* ---- fork ----------------------------------------------------------------- */

/*
 * fork(): the child has only the forking thread, so no Caller of the parent
 * runs there. Around fork the library's process-wide locks are taken, and
 * in the child its process-wide state is reset: no Callers, no iopub
 * sockets, live counts from zero. The parent's Callers and Pendings are
 * left as they were copied — the child must not touch them — and the child
 * may create Callers of its own. Forking from a Caller's own thread (a task
 * or a direct call) leaves the child inside that Caller's loop: there, only
 * exec or _exit.
 */
static void fork_prepare(void)
{
    lock_registry();
    caller__pending_fork(0);
    caller__iopub_fork(0);
    caller__fiber_fork(0);
    caller__alloc_fork(0);
}

static void fork_parent(void)
{
    caller__alloc_fork(1);
    caller__fiber_fork(1);
    caller__iopub_fork(1);
    caller__pending_fork(1);
    unlock_registry();
}

static void fork_child(void)
{
    caller__alloc_fork(2);
    caller__fiber_fork(2);
    caller__iopub_fork(2);
    caller__pending_fork(2);
    pthread_mutex_init(&registry_lock, NULL);
    caller__order_release(CALLER__RANK_REGISTRY); /* fork_prepare's */
    caller__list_init(&registry);
    atomic_store(&live_callers, 0);
    caller__set_thread_caller(NULL); /* the parent's reference stays with the parent's copy */
}

static pthread_once_t fork_once = PTHREAD_ONCE_INIT;

static void fork_init(void)
{
    pthread_atfork(fork_prepare, fork_parent, fork_child);
}

static void check_finished(caller_t *c);
static void on_stop(caller_t *c);
static void on_child_stopped(caller_t *c, caller_t *child);

/* What the scheduler calls back, in the loop thread. */
static const caller__lifecycle_t lifecycle = {.on_stop = on_stop,
                                              .on_child_stopped = on_child_stopped,
                                              .check_finished = check_finished,
                                              .unref = caller_unref};

static void owner_ref(caller_t *c)
{
    caller_ref(c);
}

/* What a Pending may do with the Caller that owns it (pending.c). */
static const caller__owner_ops_t owner_ops = {
    .ref = owner_ref, .unref = caller_unref, .repr = caller_repr};

static pthread_once_t owner_ops_once = PTHREAD_ONCE_INIT;

static void install_owner_ops(void)
{
    caller__pending_set_owner_ops(&owner_ops);
    /* A task overflowing its stack says which task on which Caller. */
    caller__fiber_overflow_messages(caller__task_describe);
}

static caller_t *alloc_caller(const caller_options_t *o, const char *default_name)
{
    pthread_once(&owner_ops_once, install_owner_ops);
    pthread_once(&fork_once, fork_init);
    const caller__backend_ops_t *ops;
    if (caller__backend_choose(o, "caller_create", &ops) < 0)
        return NULL;
    if (o && o->stack_mode > CALLER_STACK_COPY) {
        caller__fail(-EINVAL, "caller_create: unknown stack_mode %u", o->stack_mode);
        return NULL;
    }
    if (o && caller__check_reserved(o->reserved, sizeof o->reserved / sizeof o->reserved[0],
                                    "caller_create", "caller_options_t") < 0)
        return NULL;
    caller_t *c = caller__calloc(1, sizeof *c);
    if (!c) {
        caller__fail(-ENOMEM, "caller_create: out of memory");
        return NULL;
    }
    c->stopped = caller_pending_new(CALLER_PENDING_UNTRACKED);
    if (!c->stopped) {
        caller__free(c);
        caller__fail(-ENOMEM, "caller_create: out of memory");
        return NULL;
    }
    atomic_init(&c->refs, REF_USER);
    c->magic = CALLER_MAGIC;
    atomic_init(&c->state, CALLER_STATE_INITIAL);
    atomic_init(&c->started, 0);
    caller__pending_set_owner(c->stopped, c, true);
    caller__pending_set_name(c->stopped, "stopped");
    if (o && o->name && o->name[0])
        snprintf(c->name, sizeof c->name, "%s", o->name);
    else if (default_name)
        snprintf(c->name, sizeof c->name, "%s", default_name);
    else
        thread_name_of_self(c->name, sizeof c->name);
    c->ops = ops;
    c->life = &lifecycle;
    caller__inbox_init(&c->inbox, ops);
    if (o) {
        c->protect = o->protect;
        c->zmq_context = o->no_zmq ? NULL : o->zmq_context;
        c->log = o->log;
        c->log_arg = o->log_arg;
        c->stack_size = o->stack_size;
        c->copy_stacks = o->stack_mode == CALLER_STACK_COPY;
    }
    pthread_mutex_init(&c->lock, NULL);
    pthread_mutex_init(&c->queues.lock, NULL);
    caller__list_init(&c->live_tasks);
    caller__list_init(&c->pool_link);
    c->spin.budget = CALLER__SPIN_MAX_NS;
    c->stop_msg.kind = CALLER__MSG_STOP;
    c->child_msg.kind = CALLER__MSG_CHILD;
    c->pool_msg.kind = CALLER__MSG_POOL;
    atomic_fetch_add_explicit(&live_callers, 1, memory_order_relaxed);
    return c;
}

static const caller__backend_events_t events;

/*
 * On the Caller's thread: open the backend (on @p app_loop, or an own loop),
 * and make the Caller running. Calls queued before start get dispatched.
 */
static int start_loop(caller_t *c, void *app_loop)
{
    int rc = caller__iopub_open(c);
    if (rc)
        return rc;
    caller__backend_t *b;
    rc = c->ops->open(&b, app_loop, c, &events);
    if (rc) {
        caller__iopub_close(c);
        return caller__fail(rc, "caller: cannot open the %s loop: %s", c->ops->name,
                            caller_strerror(rc));
    }
    c->loop_backend = b;
    caller__inbox_lock(&c->inbox);
    bool queued = caller__inbox_open_locked(&c->inbox, b);
    /* Fails only if a stop came meanwhile: it stays STOPPING, and the stop
     * message waits in the inbox. */
    caller__transition(c, CALLER_STATE_STARTING, CALLER_STATE_RUNNING);
    caller__inbox_unlock(&c->inbox);
    if (queued)
        c->ops->more(b, true);
    return 0;
}

/*
 * @p c leaves its parent's children: the one way out of that list, for a
 * child that finished and for one that never started. The parent's
 * reference on it goes to the message that tells the parent, whose loop
 * then looks again whether it can finish (a stopping parent waits for its
 * children). Idempotent: only the call that finds it listed posts.
 */
static void child_detach(caller_t *c)
{
    caller_t *parent = c->parent;
    if (!parent)
        return;
    bool found = false;
    caller__lock_caller(parent);
    for (size_t i = 0; i < parent->nchildren; i++) {
        if (parent->children[i] == c) {
            parent->children[i] = parent->children[--parent->nchildren];
            found = true;
            break;
        }
    }
    caller__unlock_caller(parent);
    if (found && !caller__post(parent, &c->child_msg))
        caller_unref(c);
}

static void stop_children(caller_t *c);

/*
 * A Caller that will never run its loop ends here (from STARTING when its
 * start failed, from STOPPING when it was stopped before it started, from
 * INITIAL for a manual Caller stopped before it ran): its inbox closes and
 * what was queued ends cancelled, its children stop, it leaves the registry
 * and its parent, and the stopped event fires. False (nothing done) if it
 * was no longer in @p from: the caller looks again.
 */
static bool end_unstarted(caller_t *c, int from)
{
    /* Under the inbox lock, as caller_stop's own transitions: a stop either
     * came before (and is seen in @p from) or finds it STOPPED. */
    caller__inbox_lock(&c->inbox);
    if (!caller__transition(c, from, CALLER_STATE_STOPPED)) {
        caller__inbox_unlock(&c->inbox);
        return false;
    }
    caller__msg_t *left = caller__inbox_close_locked(&c->inbox);
    caller__inbox_unlock(&c->inbox);
    registry_remove(c);
    stop_children(c);
    caller__sched_drain_closed(c, left);
    if (tl_caller == c)
        tl_set(NULL);
    child_detach(c);
    caller_pending_set_result(c->stopped, NULL, 0);
    return true;
}

/* The start of @p c failed: end it, from STARTING or, if a stop came
 * meanwhile, STOPPING. */
static void end_failed_start(caller_t *c)
{
    while (!end_unstarted(c, CALLER_STATE_STARTING) && !end_unstarted(c, CALLER_STATE_STOPPING))
        ;
}

/* On the Caller's thread, once its loop has closed everything. */
static void finish(caller_t *c)
{
    caller__loop_blocking(c);
    c->ops->destroy(c->loop_backend);
    c->loop_backend = NULL;
    caller__iopub_close(c); /* before the stopped event: zmq_ctx_term may follow */
    caller__fiber_cache_clear();
    registry_remove(c);
    if (!caller__transition(c, CALLER_STATE_STOPPING, CALLER_STATE_STOPPED)) {
        fprintf(stderr, "libcaller: Caller '%s' finished while not stopping\n", c->name);
        abort();
    }
    if (tl_caller == c)
        tl_set(NULL);
    child_detach(c);
    caller_pending_set_result(c->stopped, NULL, 0);
}

static void on_closed(void *owner)
{
    caller_t *c = owner;
    if (!c->owns_loop) {
        /* Attached to the application's loop: nothing more will run here. */
        finish(c);
        internal_unref(c); /* the running reference */
    }
    /* An owned loop's run() returns now; its thread finishes. */
}

static void on_work(void *owner)
{
    caller__dispatch(owner);
}

static void before_sleep(void *owner)
{
    caller__before_sleep(owner);
    caller__loop_blocking(owner);
}

static bool await_work(void *owner)
{
    return caller__await_work(owner);
}

static const caller__backend_events_t events = {.on_work = on_work,
                                                .on_closed = on_closed,
                                                .before_sleep = before_sleep,
                                                .await_work = await_work};

static void check_finished(caller_t *c)
{
    /* Inside dispatch, wait for its end (it calls this again): the rest of
     * its batch still needs the loop. */
    if (c->in_dispatch || c->finishing || !c->stop_seen || !caller__sched_idle(c))
        return;
    caller__lock_caller(c);
    size_t children = c->nchildren;
    caller__unlock_caller(c);
    if (children)
        return;
    c->finishing = true;
    caller__inbox_lock(&c->inbox);
    caller__msg_t *left = caller__inbox_close_locked(&c->inbox); /* no more wakes */
    caller__inbox_unlock(&c->inbox);
    caller__sched_drain_closed(c, left);
    c->ops->more(c->loop_backend, false);
    c->ops->timer(c->loop_backend, INT64_MAX);
    c->ops->close(c->loop_backend);
}

static void *thread_main(void *arg)
{
    caller_t *c = arg;
    char tname[16]; /* the OS keeps 15 bytes of a thread's name */
    snprintf(tname, sizeof tname, "%.15s", c->name);
    pthread_setname_np(pthread_self(), tname);
    c->thread = pthread_self(); /* before `started`: the starter reads it after */
    c->tid = (pid_t)syscall(SYS_gettid);
    tl_set(c);
    int rc = start_loop(c, NULL);
    c->start_error = rc;
    if (rc) {
        const char *m;
        caller_last_error(&m);
        snprintf(c->start_msg, sizeof c->start_msg, "%s", m);
        CALLER__TEST_POINT("start.failed", c);
        /* Ended before the starter hears of it: its parent no longer
         * lists it, and a parent that stops meanwhile hears it end. */
        end_failed_start(c);
    }
    atomic_store_explicit(&c->started, 1, memory_order_release);
    caller__futex_wake(&c->started, 1);
    if (rc == 0) {
        c->ops->run(c->loop_backend);
        finish(c);
    }
    internal_unref(c); /* the running reference */
    return NULL;
}

/*
 * Start a new thread for @p c (listed as a child first when it has a
 * parent); returns once it runs, or failed. A Caller stopped before this
 * (its parent stopping while caller_get listed it) ends here, unstarted:
 * -ESHUTDOWN.
 */
static int start_thread(caller_t *c, const char *api)
{
    c->owns_thread = c->owns_loop = true;
    if (!caller__transition(c, CALLER_STATE_INITIAL, CALLER_STATE_STARTING)) {
        while (!end_unstarted(c, CALLER_STATE_STOPPING))
            ;
        return caller__fail(-ESHUTDOWN, "%s: Caller '%s' was stopped before it started", api,
                            c->name);
    }
    internal_ref(c); /* the running reference, for the thread */
    /* Detached: a joinable thread running at fork() is left, in the child,
     * as a thread nobody can ever join (and the child's own new threads
     * reuse its id). caller_wait_stopped waits for it to exit instead. */
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_t t; /* the thread stores its own id in c->thread */
    int rc = pthread_create(&t, &attr, thread_main, c);
    pthread_attr_destroy(&attr);
    if (rc) {
        end_failed_start(c);
        internal_unref(c);
        return caller__fail(-rc, "%s: cannot start a thread: %s", api, strerror(rc));
    }
    while (!atomic_load_explicit(&c->started, memory_order_acquire))
        caller__futex_wait(&c->started, 0, INT64_MAX);
    if (c->start_error)
        return caller__fail(c->start_error, "%s: the new thread did not start: %s", api,
                            c->start_msg);
    registry_add(c);
    return 0;
}

/* A Caller for the calling thread (attached or manual). */
static caller_t *alloc_for_this_thread(const caller_options_t *o)
{
    caller_t *c = alloc_caller(o, NULL);
    if (c) {
        c->thread = pthread_self();
        c->tid = (pid_t)syscall(SYS_gettid);
    }
    return c;
}

static caller_t *find_main_caller(void)
{
    pid_t main_tid = getpid();
    caller_t *found = NULL;
    lock_registry();
    caller__list_for_each(l, &registry)
    {
        caller_t *c = caller__container_of(l, caller_t, reg);
        if (c->tid == main_tid && (found = ref_if_alive(c)))
            break;
    }
    unlock_registry();
    return found;
}

/* This thread's Caller if it has one that has not stopped. Borrowed. */
static caller_t *thread_current(void)
{
    caller_t *c = tl_caller;
    if (c && load_state(c) == CALLER_STATE_STOPPED) {
        tl_set(NULL); /* stopped from elsewhere before it ever ran */
        c = NULL;
    }
    return c;
}

caller_t *caller_create(caller_mode_t mode, const caller_options_t *o)
{
    caller_t *c = thread_current();
    switch (mode) {
    case CALLER_CURRENT_THREAD:
        if (c) {
            if (o && o->name && o->name[0] && strcmp(o->name, c->name) != 0) {
                caller__fail(-EINVAL,
                             "The thread and caller's name do not match! (thread's Caller: "
                             "'%s', asked for: '%s')",
                             c->name, o->name);
                return NULL;
            }
            if (o && o->backend && strcmp(o->backend, c->ops->name) != 0) {
                caller__fail(-EINVAL,
                             "The backend does not match! (thread's Caller: %s, "
                             "asked for: %s)",
                             c->ops->name, o->backend);
                return NULL;
            }
            return caller_ref(c);
        }
        if (!o || (!o->loop && !o->glib_context)) {
            caller__fail(-ENOENT, "caller_create: no event loop in this thread (give "
                                  "options.loop or options.glib_context to attach to one, or "
                                  "use CALLER_NEW_THREAD)");
            return NULL;
        }
        c = alloc_for_this_thread(o);
        if (!c)
            return NULL;
        caller__transition(c, CALLER_STATE_INITIAL, CALLER_STATE_STARTING); /* not shared yet */
        /* One of them (caller__backend_choose refused both). */
        if (start_loop(c, o->loop ? (void *)o->loop : (void *)o->glib_context) < 0) {
            caller_unref(c);
            return NULL;
        }
        internal_ref(c); /* the running reference, held by the open handles */
        registry_add(c);
        tl_set(c);
        return c;
    case CALLER_MAIN_THREAD:
        c = find_main_caller();
        if (!c)
            caller__fail(-ENOENT, "caller_create: there is no Caller in the main thread");
        return c;
    case CALLER_NEW_THREAD:
        c = alloc_caller(o, WORKER_NAME);
        if (!c)
            return NULL;
        if (start_thread(c, "caller_create") < 0) {
            caller_unref(c); /* keeps this thread's last error */
            return NULL;
        }
        return c;
    case CALLER_MANUAL:
        if (c) {
            char tname[32];
            thread_name_of_self(tname, sizeof tname);
            caller__fail(-EEXIST, "An instance already exists for thread %s: Caller '%s'", tname,
                         c->name);
            return NULL;
        }
        c = alloc_for_this_thread(o);
        if (!c)
            return NULL;
        c->owns_loop = true;
        c->manual = true;
        registry_add(c);
        tl_set(c);
        return c;
    }
    caller__fail(-EINVAL, "caller_create: unknown mode %d", (int)mode);
    return NULL;
}

static void body_done(caller_pending_t *p, void *arg)
{
    (void)p;
    caller_stop(arg, CALLER_STOP_FORCE);
}

int caller_run(caller_t *c, caller_fn body, void *arg, void **result)
{
    if (result)
        *result = NULL;
    if (!c || !body)
        return caller__fail(-EINVAL, "caller_run: %s is NULL", c ? "body" : "caller");
    if (!c->owns_loop || c->owns_thread || !pthread_equal(c->thread, pthread_self()))
        return caller__fail(-EPERM,
                            "caller_run: Caller '%s' is not a manual Caller of this "
                            "thread",
                            c->name);
    if (!caller__transition(c, CALLER_STATE_INITIAL, CALLER_STATE_STARTING)) {
        int st = load_state(c);
        if (st == CALLER_STATE_STARTING || st == CALLER_STATE_RUNNING)
            return caller__fail(-EBUSY, "caller_run: Already starting/running");
        return caller__fail(-EPERM, "caller_run: Restarting is not allowed");
    }
    if (start_loop(c, NULL) < 0) {
        /* No loop: it ends without having run (no way back to INITIAL). */
        int rc = caller_last_error(NULL);
        const char *m;
        caller_last_error(&m);
        char msg[256];
        snprintf(msg, sizeof msg, "%s", m);
        end_failed_start(c);
        return caller__fail(rc, "caller_run: %s", msg);
    }
    internal_ref(c); /* the running reference */
    caller_pending_t *p = caller__task_new(c, body, arg, "caller_run body");
    int rc = p ? 0 : caller_last_error(NULL);
    if (p) {
        caller_pending_ref(p);
        c->body = p;
        rc = caller_pending_add_done_callback(p, body_done, c);
        if (rc == 0)
            rc = caller__task_submit(c, p, INT64_MIN);
        if (rc == 0)
            caller__pending_track(p);
    }
    if (rc < 0)
        caller_stop(c, CALLER_STOP_FORCE); /* nothing to run: stop at once */
    c->ops->run(c->loop_backend);
    finish(c);
    if (p) {
        rc = caller_pending_result(p, result);
        caller_pending_unref(p);
        c->body = NULL;
    }
    internal_unref(c);
    return rc;
}

/* ---- stopping ----------------------------------------------------------------- */

static void stop_children(caller_t *c)
{
    caller__lock_caller(c);
    size_t n = c->nchildren;
    caller_t **kids = n ? caller__malloc(n * sizeof *kids) : NULL;
    if (kids)
        for (size_t i = 0; i < n; i++)
            kids[i] = caller_ref(c->children[i]);
    caller__unlock_caller(c);
    if (n && !kids) {
        /* No memory for a snapshot: one at a time, each found under the
         * lock and stopped outside it (caller_stop takes the registry
         * lock, above this one in the library's order). */
        for (;;) {
            caller_t *k = NULL;
            caller__lock_caller(c);
            for (size_t i = 0; i < c->nchildren && !k; i++)
                if (load_state(c->children[i]) < CALLER_STATE_STOPPING)
                    k = caller_ref(c->children[i]);
            caller__unlock_caller(c);
            if (!k)
                return;
            caller_stop(k, CALLER_STOP_FORCE);
            caller_unref(k);
        }
    }
    for (size_t i = 0; i < n; i++) {
        caller_stop(kids[i], CALLER_STOP_FORCE);
        caller_unref(kids[i]);
    }
    caller__free(kids);
}

int caller_stop(caller_t *c, unsigned flags)
{
    if (!c)
        return caller__fail(-EINVAL, "caller_stop: caller is NULL");
    if (flags & ~(unsigned)CALLER_STOP_FORCE)
        return caller__fail(-EINVAL, "caller_stop: unknown flags 0x%x", flags);
    bool force = flags & CALLER_STOP_FORCE;
    if (c->protect && !force)
        return load_state(c);
    caller__inbox_lock(&c->inbox);
    int st = load_state(c);
    if (st >= CALLER_STATE_STOPPING) {
        caller__inbox_unlock(&c->inbox);
        return st;
    }
    if (st == CALLER_STATE_INITIAL && c->manual) {
        /* A manual Caller that never ran: nothing will run it; end it here.
         * caller_run's own INITIAL->STARTING may win meanwhile: then stop
         * it as a starting one. */
        caller__inbox_unlock(&c->inbox);
        if (end_unstarted(c, CALLER_STATE_INITIAL))
            return CALLER_STATE_STOPPED;
        return caller_stop(c, flags);
    }
    /* INITIAL (a thread Caller its starter has not started: the starter
     * sees STOPPING and ends it), STARTING or RUNNING: the stop message
     * waits in the inbox until the loop runs. */
    if (!caller__transition(c, st, CALLER_STATE_STOPPING)) {
        caller__inbox_unlock(&c->inbox);
        return caller_stop(c, flags);
    }
    caller__inbox_refuse_locked(&c->inbox);
    caller__inbox_push_locked(&c->inbox, &c->stop_msg);
    caller__inbox_unlock(&c->inbox);
    registry_remove(c);
    const caller__pool_hooks_t *pool =
        c->parent ? atomic_load_explicit(&c->parent->pool_hooks, memory_order_acquire) : NULL;
    if (pool)
        pool->forget(c->parent, c); /* a stopping worker leaves its pool */
    return CALLER_STATE_STOPPING;
}

static void on_stop(caller_t *c)
{
    c->stop_seen = true;
    const caller__pool_hooks_t *pool = atomic_load_explicit(&c->pool_hooks, memory_order_acquire);
    if (pool)
        pool->stop(c);
    stop_children(c);
    caller__sched_stop(c);
    check_finished(c);
}

static void on_child_stopped(caller_t *c, caller_t *child)
{
    caller_unref(child);
    check_finished(c);
}

/*
 * Wait until the kernel has removed @p c's own thread (which fired the
 * stopped event and then only lets go of its last references and returns),
 * so that thread counts (/proc/self/task, /proc/self/status) are exact once
 * caller_wait_stopped returns. Until @p deadline; -ETIMEDOUT if it is still
 * there. Where /proc is not mounted: at once.
 */
static int await_thread_gone(const caller_t *c, int64_t deadline)
{
    if (!c->owns_thread || pthread_equal(c->thread, pthread_self()))
        return 0;
    char path[64];
    snprintf(path, sizeof path, "/proc/self/task/%ld", (long)c->tid);
    for (int i = 0; access(path, F_OK) == 0; i++) {
        if (deadline >= 0 && caller__now_ns() >= deadline)
            return caller__fail(-ETIMEDOUT,
                                "caller_wait_stopped: Caller '%s' stopped, but its thread has "
                                "not exited yet",
                                c->name);
        if (i < 64) {
            sched_yield();
        } else {
            struct timespec ts = {0, 20000};
            nanosleep(&ts, NULL);
        }
    }
    return 0;
}

int caller_wait_stopped(caller_t *c, double timeout)
{
    if (!c)
        return caller__fail(-EINVAL, "caller_wait_stopped: caller is NULL");
    bool in_task = caller__task_current() != NULL;
    if (!in_task && tl_caller == c && load_state(c) != CALLER_STATE_STOPPED)
        return caller__fail(-EDEADLK,
                            "caller_wait_stopped: the thread of Caller '%s' cannot "
                            "block until that Caller stops",
                            c->name);
    int64_t deadline = caller__deadline(timeout);
    int rc = caller_pending_wait(c->stopped, timeout, CALLER_WAIT_PROTECT, NULL);
    /* A plain thread also waits for the Caller's thread to exit, so that
     * thread counts are exact once this returns (a task does not hold up
     * its loop for that). */
    if (rc == 0 && !in_task)
        rc = await_thread_gone(c, deadline);
    return rc;
}

/* ---- children -------------------------------------------------------------------- */

static caller_t *find_child(caller_t *parent, const char *name)
{
    for (size_t i = 0; i < parent->nchildren; i++) {
        caller_t *k = parent->children[i];
        if (strcmp(k->name, name) == 0 && load_state(k) < CALLER_STATE_STOPPING)
            return k;
    }
    return NULL;
}

caller_t *caller_get(caller_t *parent, const caller_options_t *o)
{
    if (!parent) {
        caller__fail(-EINVAL, "caller_get: parent is NULL");
        return NULL;
    }
    if (o && caller__check_reserved(o->reserved, sizeof o->reserved / sizeof o->reserved[0],
                                    "caller_get", "caller_options_t") < 0)
        return NULL;
    const char *name = o && o->name && o->name[0] ? o->name : NULL;
    caller__lock_caller(parent);
    if (load_state(parent) >= CALLER_STATE_STOPPING) {
        caller__unlock_caller(parent);
        caller__fail_stopped(parent, "caller_get");
        return NULL;
    }
    caller_t *k = name ? find_child(parent, name) : NULL;
    if (k) {
        if (o->backend && strcmp(o->backend, k->ops->name) != 0) {
            caller__unlock_caller(parent);
            caller__fail(-EINVAL, "Backend mismatch! (child '%s' runs %s, asked for %s)", name,
                         k->ops->name, o->backend);
            return NULL;
        }
        caller_ref(k);
        caller__unlock_caller(parent);
        return k;
    }
    caller_options_t merged = o ? *o : (caller_options_t){0};
    if (!merged.backend)
        merged.backend = parent->ops->name;
    if (!merged.zmq_context && !merged.no_zmq)
        merged.zmq_context = parent->zmq_context;
    if (!merged.log) {
        merged.log = parent->log;
        merged.log_arg = parent->log_arg;
    }
    if (!merged.stack_size)
        merged.stack_size = parent->stack_size;
    if (parent->nchildren == parent->children_cap) {
        size_t cap = parent->children_cap ? parent->children_cap * 2 : 4;
        caller_t **kids = caller__realloc(parent->children, cap * sizeof *kids);
        if (!kids) {
            caller__unlock_caller(parent);
            caller__fail(-ENOMEM, "caller_get: out of memory");
            return NULL;
        }
        parent->children = kids;
        parent->children_cap = cap;
    }
    k = alloc_caller(&merged, WORKER_NAME);
    if (!k) {
        caller__unlock_caller(parent);
        return NULL;
    }
    k->parent = caller_ref(parent);
    /* Listed before it starts, so a parent that stops meanwhile stops it. */
    parent->children[parent->nchildren++] = caller_ref(k);
    caller__unlock_caller(parent);
    CALLER__TEST_POINT("get.listed", k);
    if (start_thread(k, "caller_get") < 0) {
        /* It ended unstarted and left the parent (child_detach), which,
         * if stopping, looks again whether it can finish. */
        caller_unref(k); /* keeps this thread's last error */
        return NULL;
    }
    return k;
}

size_t caller_children(caller_t *c, caller_t **out, size_t max)
{
    if (!c)
        return 0;
    caller__lock_caller(c);
    size_t n = c->nchildren, k = 0;
    for (size_t i = 0; i < n && k < max; i++)
        if (out && (out[k] = ref_if_alive(c->children[i])))
            k++;
    caller__unlock_caller(c);
    return n;
}

caller_t *caller_parent(caller_t *c)
{
    return c ? caller_ref(c->parent) : NULL;
}

/* ---- lookups ------------------------------------------------------------------------ */

caller_t *caller_current(void)
{
    return thread_current();
}

caller_t *caller_for_thread(pthread_t t)
{
    caller_t *found = NULL;
    lock_registry();
    caller__list_for_each(l, &registry)
    {
        caller_t *c = caller__container_of(l, caller_t, reg);
        if (pthread_equal(c->thread, t) && (found = ref_if_alive(c)))
            break;
    }
    unlock_registry();
    return found;
}

size_t caller_all(unsigned flags, caller_t **out, size_t max)
{
    if (flags & ~(unsigned)CALLER_ALL_RUNNING) {
        caller__fail(-EINVAL, "caller_all: unknown flags 0x%x", flags);
        return 0;
    }
    bool running_only = flags & CALLER_ALL_RUNNING;
    size_t n = 0, k = 0;
    lock_registry();
    caller__list_for_each(l, &registry)
    {
        caller_t *c = caller__container_of(l, caller_t, reg);
        if (running_only && load_state(c) != CALLER_STATE_RUNNING)
            continue;
        n++;
        if (out && k < max && (out[k] = ref_if_alive(c)))
            k++;
    }
    unlock_registry();
    return n;
}

caller_pending_t *caller_current_pending(void)
{
    caller__task_t *t = caller__task_current();
    return t ? caller__task_pending(t) : NULL;
}

const char *caller_name(const caller_t *c)
{
    return c ? c->name : NULL;
}

const char *caller_backend(const caller_t *c)
{
    return c ? c->ops->name : NULL;
}

pthread_t caller_thread(const caller_t *c)
{
    return c->thread;
}

int caller_protected(const caller_t *c)
{
    if (!c)
        return caller__fail(-EINVAL, "caller_protected: caller is NULL");
    return c->protect;
}

int caller_running(const caller_t *c)
{
    if (!c)
        return caller__fail(-EINVAL, "caller_running: caller is NULL");
    return load_state(c) == CALLER_STATE_RUNNING;
}

int caller_state(const caller_t *c)
{
    if (!c)
        return caller__fail(-EINVAL, "caller_state: caller is NULL");
    return load_state(c);
}

struct uv_loop_s *caller_loop(caller_t *c)
{
    if (!c || c->ops != &caller__backend_uv || !c->loop_backend)
        return NULL;
    return c->ops->native(c->loop_backend);
}

struct _GMainContext *caller_glib_context(caller_t *c)
{
#if CALLER_WITH_GLIB
    if (c && c->ops == &caller__backend_glib && c->loop_backend)
        return c->ops->native(c->loop_backend);
#else
    (void)c;
#endif
    return NULL;
}

/* ---- text forms ------------------------------------------------------------------------ */

int caller_stats(caller_t *c, caller_stats_t *out)
{
    if (!c || !out)
        return caller__fail(-EINVAL, "caller_stats: %s is NULL", c ? "out" : "caller");
    memset(out, 0, sizeof *out);
    out->tasks_started = atomic_load_explicit(&c->stats.started, memory_order_relaxed);
    out->tasks_finished = atomic_load_explicit(&c->stats.finished, memory_order_relaxed);
    out->tasks_live = atomic_load_explicit(&c->stats.live, memory_order_relaxed);
    out->tasks_suspended = atomic_load_explicit(&c->stats.suspended, memory_order_relaxed);
    caller__inbox_lock(&c->inbox);
    out->inbox = c->inbox.n;
    out->wakeups = c->inbox.wakes;
    caller__inbox_unlock(&c->inbox);
    const caller__pool_hooks_t *pool = atomic_load_explicit(&c->pool_hooks, memory_order_acquire);
    if (pool)
        pool->stats(c->pool, &out->workers, &out->workers_idle, &out->pool_queued);
    return 0;
}

int caller_print_table(FILE *out, unsigned flags)
{
    if (!out)
        return caller__fail(-EINVAL, "caller_print_table: out is NULL");
    if (flags & ~(unsigned)CALLER_TABLE_STATS)
        return caller__fail(-EINVAL, "caller_print_table: unknown flags 0x%x", flags);
    bool stats = flags & CALLER_TABLE_STATS;
    /* caller_all counts every Caller but fills only those still alive (and
     * at most 256), one after another from the start: walk the filled ones. */
    caller_t *list[256] = {0};
    caller_all(0, list, 256);
    size_t n = 0;
    while (n < 256 && list[n])
        n++;
    caller_t *self = tl_caller;
    fprintf(out, stats ? "%-20s %-8s %-10s %-32s" : "%-20s %-8s %-10s %s", "Name", "Running",
            "Protected", "Thread");
    if (stats)
        fprintf(out, " %10s %6s %9s %6s %8s %8s %7s", "Started", "Live", "Suspended", "Inbox",
                "Wake-ups", "Workers", "Queued");
    fputc('\n', out);
    for (int i = 0; i < (stats ? 138 : 79); i++)
        fputs("\u2500", out);
    fputc('\n', out);
    for (size_t i = 0; i < n; i++) {
        caller_t *c = list[i];
        char thread[64];
        snprintf(thread, sizeof thread, "<Thread(%.15s, %ld)>", c->name, (long)c->tid);
        /* Pad by characters, not bytes: ✓ and 🔐 are multi-byte. */
        fprintf(out, stats ? "%-20s %s%-7s %s%-8s %-32s" : "%-20s %s%-7s %s%-8s %s", c->name,
                load_state(c) == CALLER_STATE_RUNNING ? "\u2713" : " ", "",
                c->protect ? "\U0001f510" : "  ", "", thread);
        if (stats) {
            caller_stats_t s;
            caller_stats(c, &s);
            char workers[32];
            snprintf(workers, sizeof workers, "%zu (%zu)", s.workers, s.workers_idle);
            fprintf(out, " %10llu %6zu %9zu %6zu %8llu %8s %7zu",
                    (unsigned long long)s.tasks_started, s.tasks_live, s.tasks_suspended, s.inbox,
                    (unsigned long long)s.wakeups, workers, s.pool_queued);
        }
        fprintf(out, "%s\n", c == self ? " \u2190 current" : "");
        caller_unref(c);
    }
    return 0;
}
