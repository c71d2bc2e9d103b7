/*
 * Pending: a thread-safe future (SPEC §5).
 *
 * Locking: each Pending has one 4-byte lock (sync.h) guarding every field
 * but `refs` and `flags`' lock-free reads. It is a leaf lock: nothing else is
 * locked while it is held, and no user code (callbacks, cancellers,
 * finalizers, wakes) ever runs under it.
 *
 * Completion (set_result / set_exception) takes the lock once: it checks
 * and sets DONE, records the outcome, detaches the done callbacks and the
 * waiters, and releases the lock. Then, in the completing thread, it runs
 * the callbacks in the order they were added and wakes the waiters, each
 * with the outcome copied into its node. Exactly one completion can win,
 * because DONE is tested and set under the lock; a callback added after
 * DONE runs at once in the adding thread, so each callback runs once.
 *
 * Rounds (reset): a waiter belongs to the round during which it joined and
 * is woken only by that round's completion. A completion's round takes the
 * waiters that joined before it and those that join while its callbacks
 * run (the Pending is done then; they wake after the callbacks). Once a
 * reset completion's callbacks have run the Pending is not done, and a new
 * waiter is the next round's.
 *
 * An execution queue's round ends earlier, when its task finds the queue
 * empty under the queue's lock (caller__pending_close_round); the
 * completion comes after that lock is released (caller__pending_end_round).
 * A waiter that joins in between may have queued an item the task did not
 * see, so each item queued is noted (caller__pending_queued): the
 * completion wakes the closed round's waiters, and the later ones only if
 * nothing was queued since the close. A queue that drained with nothing
 * queued since has nothing to wait for: a wait gets the last drain's
 * outcome at once. Lock order there: the queues' lock, then the Pending's,
 * which is last in the library's order (lockorder.h).
 *
 * A done callback that waits on its own Pending gets its outcome at once
 * (see tl_completing): the wake it would wait for is sent by its own thread
 * after it returns.
 */
#include "pending.h"

#include "alloc.h"
#include "context.h"
#include "error.h"
#include "fiber.h"
#include "lockorder.h"
#include "sync.h"
#include "testpoint.h"

#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum {
    F_DONE = 1u << 0,
    F_CANCELLED = 1u << 1,
    F_FAILED = 1u << 2,
    F_UNTRACKED = 1u << 3,
    F_CANCELLER = 1u << 4,
    F_WEAK_OWNER = 1u << 5,
    F_COMPLETING = 1u << 6, /* done, its callbacks still running */
    F_BLOCK = 1u << 7,      /* from caller__block_alloc */
    /* Rounds closed ahead of their completion (execution queues; see
     * caller__pending_close_round). Both are changed under the lock; F_QUIET
     * only by a holder of the queue's lock as well. */
    F_ROUND_CLOSED = 1u << 8, /* a round was closed; its completion is to come */
    F_QUIET = 1u << 9,        /* nothing was queued since the last round closed */
    /* Its last reference went while it was completing: the completer frees
     * it once it is done with it (see caller_pending_unref). */
    F_ORPHANED = 1u << 10,
    /* `ext` holds the name, not an ext_t. Changed under the lock, or
     * before the Pending is shared. */
    F_NAME_ONLY = 1u << 11,
};

#define PENDING_MAGIC 0x50656e64u /* "Pend" */
#define PENDING_DEAD 0xdeadbeefu

/* Cancellation messages and error messages are cut to this in repr. */
#define REPR_MAX 100

typedef struct {
    caller_done_fn fn;
    void *arg;
} callback_t;

/* Callbacks beyond the first: a growable array. */
typedef struct {
    unsigned n, cap;
    callback_t items[];
} callback_vec_t;

/*
 * What most Pendings never use, kept out of line so that a task's block
 * stays small (W1 keeps 10^6 of them alive at once and pays for every byte
 * of them in page faults; W3 moves each one between two cores): made at
 * the first need (ext_get) and kept until the Pending goes. Its fields
 * are guarded by the Pending's lock, as the Pending's own are.
 */
typedef struct caller__pending_ext { /* named for the gdb script */
    const char *name;
    char *errmsg;        /* the error's message, or NULL */
    char *cancelmsg;     /* cancellation messages joined by "\n", or NULL */
    callback_vec_t *cbs; /* done callbacks beyond cb0 */
    void *userdata;
    void (*finalizer)(void *);
} ext_t;

struct caller_pending {
    atomic_int refs;
    atomic_uint flags;
    caller__lock_t lock;
    int code; /* the error code when F_FAILED */
    void *value;
    caller_canceller_fn canceller;
    void *canceller_arg;
    callback_t cb0; /* the first callback (no allocation); empty only when
                       all are */
    caller__waiter_t *waiters;
    /* Whose work completes it (a reference unless weak or lent). Atomic: a
     * pooled call's is set as a worker takes it (caller__pending_adopt). */
    _Atomic(caller_t *) owner;
    /* The ext_t, or with F_NAME_ONLY the name itself (a named Pending needs
     * no ext_t for that alone), or NULL. Changed only under the lock, or
     * before the Pending is shared; an ext_t, once there, stays. */
    void *ext;
    uint32_t magic;
    /* A task's, with no owner reference while the task lives (see
     * caller__pending_init_task). Set before the Pending is shared, cleared
     * only by the loop thread at the task's end while it still holds a
     * reference, read when the last reference goes: the reference count's
     * acq_rel orders these, so it needs no atomic. */
    bool owner_lent;
};

/*
 * The live count, kept per thread: one shared counter would bounce its cache
 * line between every thread that makes Pendings and every thread that frees
 * them (two contended atomics per call, measured in W3). Each thread counts
 * in its own block; the count is the sum. Blocks outlive their threads and
 * are reused by new ones, so there are never more than threads at once.
 */
typedef struct counter {
    atomic_long created, freed;
    struct counter *next;
    bool in_use; /* under counters_lock */
} counter_t;

static pthread_mutex_t counters_lock = PTHREAD_MUTEX_INITIALIZER;
static counter_t *counters;
static counter_t spare_counter; /* if a block cannot be allocated */
static pthread_key_t counter_key;
static pthread_once_t counter_once = PTHREAD_ONCE_INIT;
static _Thread_local counter_t *tl_counter;

static void release_counter(void *block)
{
    pthread_mutex_lock(&counters_lock);
    ((counter_t *)block)->in_use = false;
    pthread_mutex_unlock(&counters_lock);
    /* Never touched by this thread again (a Pending freed later in its exit
     * takes another block): each block has one writer at a time. */
    tl_counter = NULL;
}

static void counter_key_init(void)
{
    pthread_key_create(&counter_key, release_counter);
    spare_counter.next = counters;
    counters = &spare_counter;
}

void caller__pending_fork(int phase)
{
    if (phase == 0) {
        pthread_mutex_lock(&counters_lock);
    } else if (phase == 1) {
        pthread_mutex_unlock(&counters_lock);
    } else {
        /* The child counts its own Pendings from zero; every block but this
         * thread's belonged to a thread that does not exist here. */
        pthread_mutex_init(&counters_lock, NULL);
        for (counter_t *c = counters; c; c = c->next) {
            atomic_store(&c->created, 0);
            atomic_store(&c->freed, 0);
            c->in_use = c == tl_counter;
        }
    }
}

static counter_t *my_counter(void)
{
    counter_t *c = tl_counter;
    if (c)
        return c;
    pthread_once(&counter_once, counter_key_init);
    pthread_mutex_lock(&counters_lock);
    for (c = counters; c && (c->in_use || c == &spare_counter); c = c->next)
        ;
    if (!c) {
        c = calloc(1, sizeof *c); /* not caller__calloc: bookkeeping must not fail tests */
        if (c) {
            c->next = counters;
            counters = c;
        }
    }
    if (c)
        c->in_use = true;
    pthread_mutex_unlock(&counters_lock);
    if (!c)
        return &spare_counter; /* shared, still correct: the updates are atomic */
    pthread_setspecific(counter_key, c);
    tl_counter = c;
    return c;
}

/* Count one on this thread's block. Its only writer is this thread, so a
 * load and a store do (no locked instruction: two per Pending saved); the
 * shared spare block needs the atomic add. */
static void count(counter_t *c, atomic_long *n)
{
    if (c == &spare_counter)
        atomic_fetch_add_explicit(n, 1, memory_order_relaxed);
    else
        atomic_store_explicit(n, atomic_load_explicit(n, memory_order_relaxed) + 1,
                              memory_order_relaxed);
}

static const char *msg_or_empty(const char *s)
{
    return s ? s : "";
}

_Static_assert(sizeof(struct caller_pending) <= CALLER__PENDING_SIZE,
               "the extra bytes of caller__pending_new_extra would overlap the Pending");

size_t caller__pending_size(void)
{
    return sizeof(struct caller_pending);
}

/* A Pending's lock: last in the library's order (lockorder.h). */
static inline void lock_p(caller_pending_t *p)
{
    caller__order_acquire(CALLER__RANK_PENDING);
    caller__lock(&p->lock);
}

static inline void unlock_p(caller_pending_t *p)
{
    caller__unlock(&p->lock);
    caller__order_release(CALLER__RANK_PENDING);
}

/* ---- the out-of-line part ----------------------------------------------- */

/* Under the lock (or with the Pending not shared, or being freed). */
static ext_t *ext_of(const caller_pending_t *p)
{
    if (atomic_load_explicit(&p->flags, memory_order_relaxed) & F_NAME_ONLY)
        return NULL;
    return p->ext;
}

static const char *name_of(const caller_pending_t *p)
{
    if (atomic_load_explicit(&p->flags, memory_order_relaxed) & F_NAME_ONLY)
        return p->ext;
    ext_t *e = p->ext;
    return e ? e->name : NULL;
}

/* Without the lock: @p p's ext_t, made now if it has none (the allocation
 * outside the lock), or NULL if there is no memory for it. Once there it
 * stays, so a caller may lock and use it. */
static ext_t *ext_get(caller_pending_t *p)
{
    lock_p(p);
    ext_t *e = ext_of(p);
    unlock_p(p);
    if (e)
        return e;
    ext_t *made = caller__calloc(1, sizeof *made);
    if (!made)
        return NULL;
    lock_p(p);
    e = ext_of(p);
    if (!e) {
        made->name = name_of(p);
        p->ext = e = made;
        made = NULL;
        atomic_fetch_and_explicit(&p->flags, ~(unsigned)F_NAME_ONLY, memory_order_relaxed);
    }
    unlock_p(p);
    caller__free(made); /* another thread made one meanwhile */
    return e;
}

/* Under the lock (or not shared yet): name @p p. */
static void set_name_locked(caller_pending_t *p, const char *name)
{
    ext_t *e = ext_of(p);
    if (e) {
        e->name = name;
    } else {
        p->ext = (void *)name;
        if (name)
            atomic_fetch_or_explicit(&p->flags, F_NAME_ONLY, memory_order_relaxed);
        else
            atomic_fetch_and_explicit(&p->flags, ~(unsigned)F_NAME_ONLY, memory_order_relaxed);
    }
}

/* What a Pending does with its owner (a Caller: caller.c, above this file,
 * installs these before any Pending has an owner). */
static _Atomic(const caller__owner_ops_t *) owner_ops_ptr;
#define owner_ops atomic_load_explicit(&owner_ops_ptr, memory_order_acquire)

void caller__pending_set_owner_ops(const caller__owner_ops_t *ops)
{
    atomic_store_explicit(&owner_ops_ptr, ops, memory_order_release);
}

static caller_t *owner_ref(caller_t *owner)
{
    owner_ops->ref(owner);
    return owner;
}

caller_t *caller__pending_owner(const caller_pending_t *p)
{
    return atomic_load_explicit(&p->owner, memory_order_acquire);
}

size_t caller_pending_live_count(void)
{
    long live = 0;
    pthread_once(&counter_once, counter_key_init);
    pthread_mutex_lock(&counters_lock);
    for (counter_t *c = counters; c; c = c->next)
        live += atomic_load_explicit(&c->created, memory_order_relaxed) -
                atomic_load_explicit(&c->freed, memory_order_relaxed);
    pthread_mutex_unlock(&counters_lock);
    return live > 0 ? (size_t)live : 0;
}

caller_pending_t *caller__pending_new_extra(unsigned flags, size_t extra, void **extra_out)
{
    if (flags & ~(unsigned)CALLER_PENDING_UNTRACKED) {
        caller__fail(-EINVAL, "caller_pending_new: unknown flags 0x%x", flags);
        return NULL;
    }
    /* A task's (or anything else that fits) comes from the block cache. */
    bool block = extra && CALLER__PENDING_SIZE + extra <= CALLER__BLOCK_SIZE;
    caller_pending_t *p = block ? caller__block_alloc()
                                : caller__malloc(extra ? CALLER__PENDING_SIZE + extra : sizeof *p);
    if (!p) {
        caller__fail(-ENOMEM, "caller_pending_new: out of memory");
        return NULL;
    }
    memset(p, 0, sizeof *p);
    atomic_init(&p->refs, 1);
    atomic_init(&p->flags,
                ((flags & CALLER_PENDING_UNTRACKED) ? F_UNTRACKED : 0u) | (block ? F_BLOCK : 0u));
    atomic_init(&p->lock, CALLER__LOCK_INIT);
    p->magic = PENDING_MAGIC;
    counter_t *cnt = my_counter();
    count(cnt, &cnt->created);
    if (extra_out)
        *extra_out = (char *)p + CALLER__PENDING_SIZE;
    return p;
}

void caller__pending_track(caller_pending_t *p)
{
    if (!(atomic_load_explicit(&p->flags, memory_order_relaxed) & F_UNTRACKED) &&
        caller__ctx_current())
        caller__ctx_track(p);
}

caller_pending_t *caller_pending_new(unsigned flags)
{
    caller_pending_t *p = caller__pending_new_extra(flags, 0, NULL);
    if (p)
        caller__pending_track(p);
    return p;
}

void caller__pending_set_owner(caller_pending_t *p, caller_t *owner, bool weak)
{
    atomic_store_explicit(&p->owner, weak ? owner : owner_ref(owner), memory_order_relaxed);
    if (weak)
        atomic_fetch_or_explicit(&p->flags, F_WEAK_OWNER, memory_order_relaxed);
}

void caller__pending_init_task(caller_pending_t *p, caller_t *owner, const char *name,
                               caller_canceller_fn canceller, void *arg, bool lent)
{
    /* Not shared yet: no lock needed. Lent, the submitting thread does not
     * touch the Caller's reference count, which the Caller's thread would
     * otherwise change again as the Pending goes (W3: a contended atomic
     * on each side for every call). */
    atomic_store_explicit(&p->owner, lent || !owner ? owner : owner_ref(owner),
                          memory_order_relaxed);
    set_name_locked(p, name);
    p->canceller = canceller;
    p->canceller_arg = arg;
    p->owner_lent = lent;
    atomic_fetch_or_explicit(&p->flags, F_CANCELLER, memory_order_relaxed);
}

void caller__pending_task_over(caller_pending_t *p)
{
    if (!p->owner_lent)
        return;
    /* More than the caller's reference: someone may look at the owner (its
     * text form) after the task; take the reference it lacked. Only holders
     * of a reference can make another, so with just ours nobody can start
     * to. Our unref (a release) orders the store before whoever drops the
     * last reference, so exactly one caller_unref follows. Not an atomic
     * flag: W1 would pay a locked instruction more per task. */
    if (atomic_load_explicit(&p->refs, memory_order_acquire) > 1) {
        owner_ref(atomic_load_explicit(&p->owner, memory_order_relaxed));
        p->owner_lent = false;
    }
}

void caller__pending_adopt(caller_pending_t *p, caller_t *owner)
{
    /* Lent, as a task submitted to a running Caller: the worker's running
     * reference covers it while the task lives. Release: whoever reads the
     * owner with acquire sees the Caller it names fully made. */
    p->owner_lent = true;
    atomic_store_explicit(&p->owner, owner, memory_order_release);
}

static void check_alive(const caller_pending_t *p, const char *fn)
{
    if (p->magic != PENDING_MAGIC) {
        fprintf(stderr, "libcaller: %s: %p is not a live Pending (released too often?)\n", fn,
                (const void *)p);
        abort();
    }
}

caller_pending_t *caller_pending_ref(caller_pending_t *p)
{
    if (!p)
        return NULL;
    check_alive(p, "caller_pending_ref");
    atomic_fetch_add_explicit(&p->refs, 1, memory_order_relaxed);
    return p;
}

void caller__pending_ref_unshared(caller_pending_t *p)
{
    atomic_store_explicit(&p->refs, atomic_load_explicit(&p->refs, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

static void destroy(caller_pending_t *p);

void caller_pending_unref(caller_pending_t *p)
{
    if (!p)
        return;
    check_alive(p, "caller_pending_unref");
    /* The last reference needs no atomic decrement: whoever holds it is the
     * only one who could take another. */
    int old = atomic_load_explicit(&p->refs, memory_order_acquire);
    if (old != 1)
        old = atomic_fetch_sub_explicit(&p->refs, 1, memory_order_acq_rel);
    if (old > 1)
        return;
    if (old < 1) {
        fprintf(stderr, "libcaller: caller_pending_unref: %p released too often\n", (void *)p);
        abort();
    }
    /* A completer needs no reference of its own: while it still uses the
     * Pending (its callbacks run, its lock is held), the last release hands
     * the freeing to it. Two plain loads when nobody completes it. */
    if ((atomic_load_explicit(&p->flags, memory_order_acquire) & F_COMPLETING) ||
        atomic_load_explicit(&p->lock, memory_order_acquire) != 0) {
        lock_p(p);
        if (atomic_load_explicit(&p->flags, memory_order_relaxed) & F_COMPLETING) {
            atomic_fetch_or_explicit(&p->flags, F_ORPHANED, memory_order_relaxed);
            unlock_p(p);
            return;
        }
        unlock_p(p);
    }
    destroy(p);
}

/* Free @p p: its last reference is gone and nobody uses it. */
static void destroy(caller_pending_t *p)
{
    ext_t *e = ext_of(p);
    if (e) {
        if (e->finalizer)
            e->finalizer(e->userdata);
        caller__free(e->errmsg);
        caller__free(e->cancelmsg);
        caller__free(e->cbs);
        caller__free(e);
    }
    caller_t *owner = atomic_load_explicit(&p->owner, memory_order_relaxed);
    if (owner && !(atomic_load_explicit(&p->flags, memory_order_relaxed) & F_WEAK_OWNER) &&
        !p->owner_lent)
        owner_ops->unref(owner);
    p->magic = PENDING_DEAD;
    if (atomic_load_explicit(&p->flags, memory_order_relaxed) & F_BLOCK)
        caller__block_free(p);
    else
        caller__free(p);
    counter_t *cnt = my_counter();
    count(cnt, &cnt->freed);
}

int caller_pending_set_userdata(caller_pending_t *p, void *data, void (*finalizer)(void *))
{
    if (!p)
        return caller__fail(-EINVAL, "caller_pending_set_userdata: p is NULL");
    ext_t *e = data || finalizer ? ext_get(p) : NULL;
    if ((data || finalizer) && !e)
        return caller__fail(-ENOMEM, "caller_pending_set_userdata: out of memory");
    lock_p(p);
    e = ext_of(p);
    void *old = e ? e->userdata : NULL;
    void (*old_fin)(void *) = e ? e->finalizer : NULL;
    if (e) {
        e->userdata = data;
        e->finalizer = finalizer;
    }
    unlock_p(p);
    if (old_fin)
        old_fin(old);
    return 0;
}

void *caller_pending_userdata(const caller_pending_t *p)
{
    if (!p)
        return NULL;
    caller_pending_t *mp = (caller_pending_t *)p;
    lock_p(mp);
    ext_t *e = ext_of(p);
    void *d = e ? e->userdata : NULL;
    unlock_p(mp);
    return d;
}

const char *caller__pending_name(const caller_pending_t *p)
{
    caller_pending_t *mp = (caller_pending_t *)p;
    lock_p(mp);
    const char *name = name_of(p);
    unlock_p(mp);
    return name;
}

void caller__pending_set_name(caller_pending_t *p, const char *name)
{
    lock_p(p);
    set_name_locked(p, name);
    unlock_p(p);
}

bool caller__pending_trackable(const caller_pending_t *p)
{
    return !(atomic_load_explicit(&p->flags, memory_order_relaxed) & F_UNTRACKED);
}

/* ---- completion ------------------------------------------------------- */

/* The outcome code as seen by result(): cancellation beats everything. */
static int outcome_locked(const caller_pending_t *p, unsigned flags)
{
    if (flags & F_CANCELLED)
        return -ECANCELED;
    return (flags & F_FAILED) ? p->code : 0;
}

/*
 * The Pendings whose done callbacks this fiber is running, innermost first.
 * Inside its own callbacks a
 * Pending is done, and the wake a wait would need is sent by this very
 * thread once the callback returns: caller_pending_wait looks here and
 * answers at once instead of waiting for itself. A callback that suspends
 * (in a task) leaves its frame listed while other tasks of the thread run,
 * so each fiber (and the thread's scheduler context) has a list of its own
 * (caller__fiber_slot): only the fiber itself walks it, as a copy-stack
 * task's frames are not readable while it is suspended.
 */
typedef struct completing {
    const caller_pending_t *p;
    struct completing *next;
} completing_t;

bool caller__pending_completing_here(const caller_pending_t *p)
{
    for (completing_t *f = *caller__fiber_slot(); f; f = f->next)
        if (f->p == p)
            return true;
    return false;
}

static void run_callbacks(caller_pending_t *p, callback_t cb0, callback_vec_t *cbs)
{
    void **head = caller__fiber_slot();
    completing_t frame = {p, *head};
    *head = &frame;
    if (cb0.fn)
        cb0.fn(p, cb0.arg);
    if (cbs) {
        for (unsigned i = 0; i < cbs->n; i++)
            cbs->items[i].fn(p, cbs->items[i].arg);
        caller__free(cbs);
    }
    *head = frame.next; /* this fiber's list: frames end in order */
}

/* Detach every linked waiter. Under the lock. */
static caller__waiter_t *take_waiters(caller_pending_t *p)
{
    caller__waiter_t *waiters = p->waiters;
    p->waiters = NULL;
    for (caller__waiter_t *w = waiters; w; w = w->next)
        w->linked = false;
    return waiters;
}

/* Give each waiter of @p list the outcome and wake it. After its wake a
 * node may vanish: `next` is read first. */
static void wake_waiters(caller__waiter_t *list, void *value, int code)
{
    for (caller__waiter_t *w = list, *next; w; w = next) {
        next = w->next;
        w->value = value;
        w->code = code;
        w->wake(w);
    }
}

/*
 * The round that caller__pending_close_round closed cannot be completed:
 * the Pending was made done meanwhile (only misuse does that to a queue's).
 * Its waiters must not be stranded: the completion that came first takes
 * them for its late wake if its callbacks still run, or else they get its
 * outcome now. Called under the lock, which this releases.
 */
static void hand_over_round(caller_pending_t *p, unsigned flags, caller__waiter_t *round)
{
    caller__waiter_t *now = NULL;
    atomic_fetch_and_explicit(&p->flags, ~(unsigned)F_ROUND_CLOSED, memory_order_relaxed);
    if (flags & F_COMPLETING) {
        for (caller__waiter_t *w = round, *next; w; w = next) {
            next = w->next;
            w->linked = true;
            w->next = p->waiters;
            p->waiters = w;
        }
    } else {
        now = round;
    }
    int code = outcome_locked(p, flags);
    void *value = p->value;
    unlock_p(p);
    wake_waiters(now, value, code);
}

/*
 * Make the Pending done with @p value (code 0) or an error (@p code < 0,
 * message @p msg, whose ownership passes here). Returns 0 or
 * CALLER_EINVALSTATE.
 *
 * Which waiters it wakes: all that joined before it, and those that join
 * while its callbacks run (the Pending is done then: they get this
 * round's outcome, after the callbacks). With @p closed (a reset) the
 * round was closed earlier by caller__pending_close_round, and @p round
 * holds the waiters it detached. Those are woken; so are the waiters that
 * joined since, as long as nothing was queued since (F_QUIET: whatever
 * they queued ran before the round closed). Once something was, a waiter
 * that joined after the close may be waiting for that item: it stays, for
 * the next round.
 */
static int complete(caller_pending_t *p, void *value, int code, char *msg, bool reset, bool closed,
                    caller__waiter_t *round, const char *fn)
{
    lock_p(p);
    unsigned flags = atomic_load_explicit(&p->flags, memory_order_relaxed);
    if (flags & F_DONE) {
        if (closed)
            hand_over_round(p, flags, round);
        else
            unlock_p(p);
        caller__free(msg);
        return caller__fail(CALLER_EINVALSTATE, "%s: the Pending is already done", fn);
    }
    /* With no callbacks to run (cb0 is empty only when all are) and no
     * reset, the Pending is finished at once: no COMPLETING phase, and no
     * second round under the lock (W1/W3: three atomic operations fewer
     * per task). */
    bool quick = !p->cb0.fn && !reset;
    flags |= F_DONE | (quick ? 0u : F_COMPLETING) | (code ? F_FAILED : 0u);
    p->value = value;
    p->code = code;
    ext_t *e = ext_of(p);
    if (msg) /* the caller made the ext_t for it */
        e->errmsg = msg;
    atomic_store_explicit(&p->flags, flags, memory_order_release);
    int outcome = outcome_locked(p, flags);
    callback_t cb0 = p->cb0;
    callback_vec_t *cbs = e ? e->cbs : NULL;
    p->cb0 = (callback_t){0};
    if (e)
        e->cbs = NULL;
    caller__waiter_t *early = NULL;
    if (!closed || (flags & F_QUIET))
        early = take_waiters(p);
    /* Others see it done from here on and may drop their references, but
     * its callbacks and its second round are still to come: a last release
     * meanwhile leaves the freeing to us (F_ORPHANED), so a completer need
     * not hold a reference. */
    unlock_p(p);

    caller__waiter_t *late = NULL;
    if (!quick) {
        run_callbacks(p, cb0, cbs);

        /* Waiters that came while the callbacks ran were queued too (see
         * caller__pending_add_waiter): nobody sees the Pending done, through
         * a wait, before its callbacks ran. */
        lock_p(p);
        flags = atomic_load_explicit(&p->flags, memory_order_relaxed);
        if (!closed || (flags & F_QUIET))
            late = take_waiters(p);
        unsigned clear = F_COMPLETING | (closed ? F_ROUND_CLOSED : 0u);
        if (reset) {
            if (!closed) /* a closed round's value answers waits while the queue is idle */
                p->value = NULL;
            clear |= F_DONE;
        }
        unsigned was = atomic_fetch_and_explicit(&p->flags, ~clear, memory_order_release);
        unlock_p(p);
        if (was & F_ORPHANED)
            destroy(p); /* released while its callbacks ran: ours to free */
    } else {
        caller__free(cbs); /* empty: remove_done_callback may leave it so */
    }

    /* Waiters last, as in the original: when a waiter wakes, the done
     * callbacks have run. */
    wake_waiters(round, value, outcome);
    wake_waiters(early, value, outcome);
    wake_waiters(late, value, outcome);
    return 0;
}

caller__waiter_t *caller__pending_close_round(caller_pending_t *p)
{
    lock_p(p);
    caller__waiter_t *round = take_waiters(p);
    atomic_fetch_or_explicit(&p->flags, F_ROUND_CLOSED | F_QUIET, memory_order_relaxed);
    unlock_p(p);
    return round;
}

void caller__pending_queued(caller_pending_t *p)
{
    /* F_QUIET changes only under the queue's lock, which our caller holds:
     * this read is exact, and the Pending's lock is taken once per round. */
    if (!(atomic_load_explicit(&p->flags, memory_order_relaxed) & F_QUIET))
        return;
    lock_p(p);
    atomic_fetch_and_explicit(&p->flags, ~(unsigned)F_QUIET, memory_order_relaxed);
    unlock_p(p);
}

int caller__pending_end_round(caller_pending_t *p, void *value, caller__waiter_t *round)
{
    return complete(p, value, 0, NULL, true, true, round, "caller_pending_set_result");
}

int caller_pending_set_result(caller_pending_t *p, void *value, unsigned flags)
{
    if (!p)
        return caller__fail(-EINVAL, "caller_pending_set_result: p is NULL");
    if (flags & ~(unsigned)CALLER_RESULT_RESET)
        return caller__fail(-EINVAL, "caller_pending_set_result: unknown flags 0x%x", flags);
    bool reset = flags & CALLER_RESULT_RESET;
    if (caller__fiber_on_run_stack(value))
        return caller__fail(-EINVAL, "caller_pending_set_result: the value points into a "
                                     "copy-stack task's stack, which is not there while the "
                                     "task is suspended: pass heap memory (see "
                                     "CALLER_STACK_COPY)");
    return complete(p, value, 0, NULL, reset, false, NULL, "caller_pending_set_result");
}

int caller_pending_set_exception(caller_pending_t *p, int code, const char *fmt, ...)
{
    if (!p)
        return caller__fail(-EINVAL, "caller_pending_set_exception: p is NULL");
    if (code >= 0)
        return caller__fail(-EINVAL, "caller_pending_set_exception: code %d is not negative", code);
    char *msg = NULL;
    bool nomem = false;
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        msg = caller__vasprintf(fmt, ap);
        va_end(ap);
        if (msg && !ext_get(p)) { /* where the message is kept */
            caller__free(msg);
            msg = NULL;
        }
        nomem = !msg;
    }
    int rc = complete(p, NULL, code, msg, false, false, NULL, "caller_pending_set_exception");
    if (rc == 0 && nomem)
        return caller__fail(-ENOMEM,
                            "caller_pending_set_exception: no memory for the "
                            "message (the Pending is done with code %d)",
                            code);
    return rc;
}

/* ---- cancellation ----------------------------------------------------- */

/* Append @p message (not empty) to the cancellation messages in @p e.
 * Under the lock. */
static int append_cancel_message(ext_t *e, const char *message)
{
    if (!e->cancelmsg || !*e->cancelmsg) {
        char *m = caller__strdup(message);
        if (!m)
            return -ENOMEM;
        caller__free(e->cancelmsg);
        e->cancelmsg = m;
        return 0;
    }
    size_t a = strlen(e->cancelmsg), b = strlen(message);
    char *m = caller__realloc(e->cancelmsg, a + 1 + b + 1);
    if (!m)
        return -ENOMEM;
    m[a] = '\n';
    memcpy(m + a + 1, message, b + 1);
    e->cancelmsg = m;
    return 0;
}

static const char *cancelmsg_of(const caller_pending_t *p)
{
    ext_t *e = ext_of(p);
    return e ? e->cancelmsg : NULL;
}

static const char *errmsg_of(const caller_pending_t *p)
{
    ext_t *e = ext_of(p);
    return e ? e->errmsg : NULL;
}

/* Run the canceller outside the lock with a private copy of the messages
 * (a concurrent cancel may grow the shared buffer meanwhile). */
static void run_canceller(caller_pending_t *p, caller_canceller_fn fn, void *arg, char *copy)
{
    fn(p, copy ? copy : "", arg);
    caller__free(copy);
}

int caller_pending_cancel(caller_pending_t *p, const char *message)
{
    if (!p)
        return caller__fail(-EINVAL, "caller_pending_cancel: p is NULL");
    bool has_message = message && *message, nomem = false;
    ext_t *e = NULL;
    unsigned flags;
    for (;;) {
        lock_p(p);
        flags = atomic_load_explicit(&p->flags, memory_order_relaxed);
        if (flags & F_DONE) {
            unlock_p(p);
            return (flags & F_CANCELLED) ? 1 : 0;
        }
        if (!has_message || nomem || (e = ext_of(p)) != NULL)
            break; /* locked */
        /* Where the messages are kept: made outside the lock. A reset
         * Pending may be done now and not done again after: look again. */
        unlock_p(p);
        nomem = !ext_get(p);
    }
    int rc = !has_message ? 0 : e ? append_cancel_message(e, message) : -ENOMEM;
    atomic_fetch_or_explicit(&p->flags, F_CANCELLED, memory_order_release);
    caller_canceller_fn fn = p->canceller;
    void *arg = p->canceller_arg;
    char *copy = fn ? caller__strdup(cancelmsg_of(p)) : NULL;
    if (fn) /* as complete(): alive while its canceller runs */
        atomic_fetch_add_explicit(&p->refs, 1, memory_order_relaxed);
    unlock_p(p);
    if (fn) {
        run_canceller(p, fn, arg, copy);
        caller_pending_unref(p);
    }
    if (rc)
        return caller__fail(rc, "caller_pending_cancel: no memory for the message "
                                "(the Pending is cancelled without it)");
    return 1;
}

int caller_pending_set_canceller(caller_pending_t *p, caller_canceller_fn fn, void *arg)
{
    if (!p || !fn)
        return caller__fail(-EINVAL, "caller_pending_set_canceller: %s is NULL", p ? "fn" : "p");
    lock_p(p);
    unsigned flags = atomic_load_explicit(&p->flags, memory_order_relaxed);
    if (flags & (F_DONE | F_CANCELLER)) {
        unlock_p(p);
        return caller__fail(CALLER_EINVALSTATE, "caller_pending_set_canceller: %s",
                            (flags & F_DONE) ? "the Pending is already done"
                                             : "a canceller is already set");
    }
    p->canceller = fn;
    p->canceller_arg = arg;
    atomic_fetch_or_explicit(&p->flags, F_CANCELLER, memory_order_relaxed);
    bool now = flags & F_CANCELLED;
    char *copy = now ? caller__strdup(cancelmsg_of(p)) : NULL;
    unlock_p(p);
    if (now)
        run_canceller(p, fn, arg, copy);
    return 0;
}

/* ---- queries ---------------------------------------------------------- */

int caller_pending_done(const caller_pending_t *p)
{
    if (!p)
        return caller__fail(-EINVAL, "caller_pending_done: p is NULL");
    return (atomic_load_explicit(&p->flags, memory_order_acquire) & F_DONE) ? 1 : 0;
}

int caller_pending_cancelled(const caller_pending_t *p)
{
    if (!p)
        return caller__fail(-EINVAL, "caller_pending_cancelled: p is NULL");
    return (atomic_load_explicit(&p->flags, memory_order_acquire) & F_CANCELLED) ? 1 : 0;
}

/*
 * The outcome under the lock: returns 0 / error code / -ECANCELED /
 * CALLER_EINVALSTATE, fills *value, and records the message of a failure
 * (or copies it into buf) before the lock is released.
 */
static int outcome(const caller_pending_t *cp, void **value, char *buf, size_t len, const char *fn)
{
    caller_pending_t *p = (caller_pending_t *)cp;
    int rc;
    lock_p(p);
    unsigned flags = atomic_load_explicit(&p->flags, memory_order_relaxed);
    if (value)
        *value = NULL;
    if (buf && len)
        buf[0] = '\0';
    if (flags & F_CANCELLED) {
        rc = caller__fail(-ECANCELED, "%s", msg_or_empty(cancelmsg_of(p)));
        if (buf && len)
            caller__trunc(buf, len, msg_or_empty(cancelmsg_of(p)), len - 1);
    } else if (!(flags & F_DONE)) {
        rc = caller__fail(CALLER_EINVALSTATE, "%s: the Pending is not done", fn);
    } else if (flags & F_FAILED) {
        rc = caller__fail(p->code, "%s", msg_or_empty(errmsg_of(p)));
        if (buf && len)
            caller__trunc(buf, len, msg_or_empty(errmsg_of(p)), len - 1);
    } else {
        rc = 0;
        if (value)
            *value = p->value;
    }
    unlock_p(p);
    return rc;
}

int caller_pending_result(const caller_pending_t *p, void **value)
{
    if (!p)
        return caller__fail(-EINVAL, "caller_pending_result: p is NULL");
    return outcome(p, value, NULL, 0, "caller_pending_result");
}

int caller_pending_exception(const caller_pending_t *p, char *buf, size_t len)
{
    if (!p)
        return caller__fail(-EINVAL, "caller_pending_exception: p is NULL");
    return outcome(p, NULL, buf, len, "caller_pending_exception");
}

/* ---- done callbacks --------------------------------------------------- */

int caller_pending_add_done_callback(caller_pending_t *p, caller_done_fn fn, void *arg)
{
    if (!p || !fn)
        return caller__fail(-EINVAL, "caller_pending_add_done_callback: %s is NULL",
                            p ? "fn" : "p");
    ext_t *e;
    for (;;) {
        lock_p(p);
        if (atomic_load_explicit(&p->flags, memory_order_relaxed) & F_DONE) {
            unlock_p(p);
            fn(p, arg);
            return 0;
        }
        if (!p->cb0.fn) {
            p->cb0 = (callback_t){fn, arg};
            unlock_p(p);
            return 0;
        }
        if ((e = ext_of(p)) != NULL)
            break; /* locked */
        unlock_p(p);
        if (!ext_get(p)) /* where the callbacks beyond the first are kept */
            return caller__fail(-ENOMEM, "caller_pending_add_done_callback: out of memory");
    }
    callback_vec_t *v = e->cbs;
    if (!v || v->n == v->cap) {
        unsigned cap = v ? v->cap * 2 : 3;
        callback_vec_t *nv = caller__realloc(v, sizeof *v + cap * sizeof v->items[0]);
        if (!nv) {
            unlock_p(p);
            return caller__fail(-ENOMEM, "caller_pending_add_done_callback: out of memory");
        }
        if (!v)
            nv->n = 0;
        nv->cap = cap;
        e->cbs = v = nv;
    }
    v->items[v->n++] = (callback_t){fn, arg};
    unlock_p(p);
    return 0;
}

int caller_pending_remove_done_callback(caller_pending_t *p, caller_done_fn fn, void *arg)
{
    if (!p || !fn)
        return caller__fail(-EINVAL, "caller_pending_remove_done_callback: %s is NULL",
                            p ? "fn" : "p");
    lock_p(p);
    /* Treat cb0 followed by cbs as one sequence and compact it in place. */
    callback_vec_t *cbs = ext_of(p) ? ext_of(p)->cbs : NULL;
    unsigned total = (p->cb0.fn ? 1u : 0u) + (cbs ? cbs->n : 0u);
    unsigned kept = 0, removed = 0;
    for (unsigned i = 0; i < total; i++) {
        callback_t c = i == 0 ? p->cb0 : cbs->items[i - 1];
        if (c.fn == fn && c.arg == arg) {
            removed++;
            continue;
        }
        if (kept == 0)
            p->cb0 = c;
        else
            cbs->items[kept - 1] = c;
        kept++;
    }
    if (kept == 0)
        p->cb0 = (callback_t){0};
    if (cbs)
        cbs->n = kept > 0 ? kept - 1 : 0;
    unlock_p(p);
    return (int)removed;
}

/* ---- waiting ---------------------------------------------------------- */

bool caller__pending_add_waiter(caller_pending_t *p, caller__waiter_t *w)
{
    lock_p(p);
    unsigned flags = atomic_load_explicit(&p->flags, memory_order_relaxed);
    if ((flags & F_DONE) && !(flags & F_COMPLETING)) {
        unlock_p(p);
        return false;
    }
    if ((flags & (F_DONE | F_ROUND_CLOSED | F_QUIET)) == F_QUIET) {
        /* A queue that drained, with nothing queued since: there is nothing
         * to wait for, and no completion would come to end the wait. The
         * last drain's outcome, now, from this thread. */
        w->linked = false;
        w->code = (flags & F_CANCELLED) ? -ECANCELED : 0;
        w->value = w->code ? NULL : p->value;
        unlock_p(p);
        w->wake(w);
        return true;
    }
    w->linked = true;
    w->next = p->waiters;
    p->waiters = w;
    unlock_p(p);
    CALLER__TEST_POINT("pending.waiter", p);
    return true;
}

bool caller__pending_settled(const caller_pending_t *p)
{
    unsigned flags = atomic_load_explicit(&p->flags, memory_order_acquire);
    if (!(flags & F_DONE) || (flags & F_COMPLETING))
        return false;
    /* complete() publishes F_DONE inside its critical section and writes to
     * p until it unlocks, while whoever sees "settled" may free p at once
     * (a plain thread's wait returning, then unref: TSan caught the race).
     * Reading the lock word free, with acquire, orders the completer's
     * whole critical section before us; no store, so the common case
     * stays without a locked instruction. */
    caller__lock_wait_free((caller__lock_t *)&p->lock);
    return true;
}

bool caller__pending_remove_waiter(caller_pending_t *p, caller__waiter_t *w)
{
    lock_p(p);
    bool was = w->linked;
    if (was) {
        caller__waiter_t **pp = &p->waiters;
        while (*pp != w)
            pp = &(*pp)->next;
        *pp = w->next;
        w->linked = false;
    }
    unlock_p(p);
    return was;
}

/* A plain thread's waiter: a futex word on the waiting thread's stack.
 * WAITING while it spins, SLEEPING once it may be in futex_wait, WOKEN when
 * the completion arrived: the waker makes the system call only for a
 * sleeper. */
enum { TW_WAITING = 0, TW_WOKEN = 1, TW_SLEEPING = 2 };

typedef struct {
    caller__waiter_t w;
    atomic_uint state;
} thread_waiter_t;

static _Thread_local caller__spin_t wait_spin = {.budget = CALLER__SPIN_MAX_NS};

static void thread_wake(caller__waiter_t *w)
{
    thread_waiter_t *tw = (thread_waiter_t *)w;
    /* After this exchange the waiter may return at once and its frame go:
     * only the futex word's address is used below, and waking a stale
     * address is harmless (futex waiters tolerate spurious wakes). */
    if (atomic_exchange_explicit(&tw->state, TW_WOKEN, memory_order_acq_rel) == TW_SLEEPING)
        caller__futex_wake(&tw->state, 1);
}

/* Block this thread until @p p is done or @p deadline; 0 or -ETIMEDOUT.
 * On 0, *code and *value hold the outcome of the completion. */
int caller__pending_block(caller_pending_t *p, int64_t deadline, int *code, void **value)
{
    thread_waiter_t tw = {.w = {.wake = thread_wake}};
    atomic_init(&tw.state, TW_WAITING);
    if (!caller__pending_add_waiter(p, &tw.w)) {
        *code = outcome(p, value, NULL, 0, "caller_pending_wait");
        return 0;
    }
    if (deadline != INT64_MAX && caller__now_ns() >= deadline)
        goto timed_out;
    if (!caller__spin_while(&wait_spin, &tw.state, TW_WAITING)) {
        unsigned expected = TW_WAITING;
        atomic_compare_exchange_strong_explicit(&tw.state, &expected, TW_SLEEPING,
                                                memory_order_acq_rel, memory_order_acquire);
    }
    while (atomic_load_explicit(&tw.state, memory_order_acquire) != TW_WOKEN) {
        if (caller__futex_wait(&tw.state, TW_SLEEPING, deadline) != -ETIMEDOUT)
            continue; /* woken, or spurious: re-check */
    timed_out:
        if (caller__pending_remove_waiter(p, &tw.w))
            return -ETIMEDOUT;
        /* A completion detached us just before the deadline: the Pending
         * is done and our wake is on its way; it must arrive before this
         * frame goes away. */
        deadline = INT64_MAX;
        unsigned expected = TW_WAITING;
        atomic_compare_exchange_strong_explicit(&tw.state, &expected, TW_SLEEPING,
                                                memory_order_acq_rel, memory_order_acquire);
    }
    *code = tw.w.code;
    *value = tw.w.value;
    return 0;
}

int caller__pending_outcome(const caller_pending_t *p, void **value)
{
    return outcome(p, value, NULL, 0, "caller_pending_wait");
}

void *caller__pending_owner_of_undone(const caller_pending_t *p)
{
    if (atomic_load_explicit(&p->flags, memory_order_acquire) & F_DONE)
        return NULL;
    return atomic_load_explicit(&p->owner, memory_order_acquire);
}

int caller__pending_wait_end(caller_pending_t *p, int rc, int code, void *v, double timeout,
                             bool protect, bool want_result, void **value)
{
    if (rc == -ETIMEDOUT || rc == -ECANCELED) {
        if (!protect)
            caller_pending_cancel(p, "Cancelled due to cancellation or timeout");
        if (rc == -ETIMEDOUT)
            return caller__fail(rc, "caller_pending_wait: timed out after %g s", timeout);
        return caller__fail(rc, "caller_pending_wait: the waiting task was cancelled");
    }
    if (rc < 0)
        return rc; /* -EDEADLK, -ENOMEM: recorded by the task wait */
    if (!want_result)
        return 0;
    if (code == 0) {
        if (value)
            *value = v;
        return 0;
    }
    /* Record the message of the failure for caller_last_error(). */
    int rc2 = outcome(p, NULL, NULL, 0, "caller_pending_wait");
    if (rc2 != code)
        caller__fail(code, "%s", caller_strerror(code));
    return code;
}

/* ---- text form -------------------------------------------------------- */

int caller_pending_repr(const caller_pending_t *cp, char *buf, size_t len)
{
    if (!cp || (!buf && len))
        return caller__fail(-EINVAL, "caller_pending_repr: %s is NULL", cp ? "buf" : "p");
    caller_pending_t *p = (caller_pending_t *)cp;
    char cmsg[REPR_MAX + 8], emsg[REPR_MAX + 8];
    lock_p(p);
    unsigned flags = atomic_load_explicit(&p->flags, memory_order_relaxed);
    caller__trunc(cmsg, sizeof cmsg, msg_or_empty(cancelmsg_of(p)), REPR_MAX);
    caller__trunc(emsg, sizeof emsg, msg_or_empty(errmsg_of(p)), REPR_MAX);
    int code = p->code;
    const char *name = name_of(p);
    caller_t *owner = atomic_load_explicit(&p->owner, memory_order_acquire);
    unlock_p(p);

    char cancelled[sizeof cmsg + 32] = "", failed[sizeof emsg + 64] = "", label[192] = "";
    if (flags & F_CANCELLED)
        snprintf(cancelled, sizeof cancelled, " \u26d4%s%s", *cmsg ? " message=" : "", cmsg);
    if ((flags & F_FAILED) && !(flags & F_CANCELLED))
        snprintf(failed, sizeof failed, " error=%s%s%s", caller_err_name(code), *emsg ? ": " : "",
                 emsg);
    char ctext[96] = "";
    if (owner) {
        strcpy(ctext, " caller=");
        owner_ops->repr(owner, ctext + 8, sizeof ctext - 8);
    }
    if (name || owner)
        snprintf(label, sizeof label, "|%s%s%s", name ? " " : "", name ? name : "", ctext);
    return snprintf(buf, len, "<Pending%s %s at %p%s%s >", cancelled,
                    (flags & F_DONE) ? "\U0001f3c1" : "\U0001f3c3", (void *)p, failed, label);
}
