/*
 * Collecting results: as_completed (an iterator) and wait (SPEC §8).
 *
 * Each outstanding Pending gets an entry holding a waiter (internal.h):
 * waiters are woken after a Pending's done callbacks ran, so an entry is
 * delivered only then. The wake, in the completing thread, moves the entry
 * to the iterator's done FIFO and completes the consumer's "notify" Pending
 * if it is waiting; the consumer waits on that Pending, so a task suspends
 * and a plain thread blocks with the same code.
 *
 * Locking: `it->lock` (a leaf) guards the done FIFO, `notify`, `closed` and
 * each entry's `delivered`. Everything else belongs to the consumer.
 * Lifetime: the iterator is reference-counted — the consumer holds one and
 * every linked waiter one — so a wake that races with close never touches
 * freed memory; an entry close had to give up on (its wake in flight) is
 * freed by that wake.
 */
#include "alloc.h"
#include "core.h"
#include "error.h"
#include "pending.h"
#include "task.h"

#include <stdlib.h>
#include <string.h>

typedef struct entry {
    caller__waiter_t w; /* first: the wake gets the entry from it */
    struct caller_iter *it;
    caller_pending_t *p; /* a reference */
    size_t index;        /* position in a fixed set */
    caller__msg_t link;  /* in the done FIFO, or the free list */
    struct entry *prev_out, *next_out;
    bool delivered; /* in the done FIFO (under it->lock) */
    bool abandoned; /* closed before its wake came: the wake frees it */
} entry_t;

/* Entries come in chunks the iterator owns until it is freed, and are
 * reused through a free list (the consumer's), so a long run of items
 * costs no allocation per item. */
typedef struct chunk {
    struct chunk *next;
    size_t bytes; /* for caller__big_free; also gives its capacity */
    size_t used;  /* entries handed out so far: an entry's memory is
                     touched only when first used */
    entry_t e[];
} chunk_t;

enum { CHUNK_MIN = 16, CHUNK_MAX = 256 };

struct caller_iter {
    atomic_int refs;
    caller__lock_t lock;
    caller__fifo_t done; /* settled entries, in the order they settled */
    caller_pending_t *notify;
    bool closed;

    /* the consumer's */
    entry_t out; /* sentinel of the outstanding list */
    size_t noutstanding;
    caller_pending_t **items; /* fixed set: references not yet handed out */
    size_t n, pos;
    caller_generator_fn gen;
    void *gen_arg;
    bool exhausted;
    size_t limit; /* 0 = none */
    bool keep;
    chunk_t *chunks;   /* every entry's memory, freed with the iterator */
    entry_t *spare;    /* entries free for reuse, linked by next */
    size_t chunk_size; /* entries in the next chunk */
    /* A fixed set's items found done when first met (all are met at the
     * first call): their indices, in order, delivered before the done FIFO
     * with no entry (no waiter, no lock); their references stay in items
     * until handed out. */
    size_t *pre;
    size_t pre_head, pre_tail;
};

static void iter_unref(caller_iter_t *it)
{
    if (atomic_fetch_sub_explicit(&it->refs, 1, memory_order_acq_rel) != 1)
        return;
    for (size_t i = it->pos; i < it->n; i++)
        caller_pending_unref(it->items[i]);
    for (size_t k = it->pre_head; k < it->pre_tail; k++)
        caller_pending_unref(it->items[it->pre[k]]);
    caller__free(it->pre);
    caller__free(it->items);
    for (chunk_t *k = it->chunks, *next; k; k = next) {
        next = k->next;
        caller__big_free(k, k->bytes);
    }
    caller__free(it);
}

/* Consumer: an entry to fill (not zeroed), or NULL for lack of memory. */
static entry_t *new_entry(caller_iter_t *it)
{
    entry_t *e = it->spare;
    if (e) {
        it->spare = e->link.next ? caller__container_of(e->link.next, entry_t, link) : NULL;
        return e;
    }
    chunk_t *k = it->chunks;
    if (!k || k->used == (k->bytes - sizeof *k) / sizeof k->e[0]) {
        size_t n = it->chunk_size;
        size_t bytes = sizeof(chunk_t) + n * sizeof(entry_t);
        k = caller__big_alloc(bytes); /* a large set: its own mapping */
        if (!k)
            return NULL;
        k->bytes = bytes;
        k->used = 0;
        k->next = it->chunks;
        it->chunks = k;
        if (it->chunk_size < CHUNK_MAX)
            it->chunk_size *= 2;
    }
    return &k->e[k->used++];
}

/* Consumer: @p e (its reference already given away or released) is free
 * for reuse. */
static void recycle_entry(caller_iter_t *it, entry_t *e)
{
    e->link.next = it->spare ? &it->spare->link : NULL;
    it->spare = e;
}

/* Consumer: release @p e's reference and reuse it. */
static void free_entry(caller_iter_t *it, entry_t *e)
{
    caller_pending_unref(e->p);
    recycle_entry(it, e);
}

/* Under it->lock: @p e is done; append it to the done FIFO. */
static void entry_wake(caller__waiter_t *w)
{
    entry_t *e = (entry_t *)w;
    caller_iter_t *it = e->it;
    caller__lock(&it->lock);
    /* An entry the consumer gave up on while closing is ours to free; any
     * other stays the consumer's (close frees what is still listed), so a
     * wake never frees what close is about to look at. */
    bool abandoned = e->abandoned;
    caller_pending_t *notify = NULL;
    if (!abandoned)
        e->delivered = true;
    /* Once closed, the FIFO is dead (close frees its entries): linking
     * would write into an entry close may already have freed. */
    if (!abandoned && !it->closed) {
        caller__fifo_push(&it->done, &e->link);
        notify = it->notify;
        it->notify = NULL;
    }
    caller__unlock(&it->lock);
    if (abandoned) /* its memory goes with the iterator's chunks */
        caller_pending_unref(e->p);
    if (notify) {
        caller_pending_set_result(notify, NULL, 0);
        caller_pending_unref(notify);
    }
    iter_unref(it);
}

static caller_iter_t *iter_new(const caller_as_completed_options_t *o, bool generator)
{
    if (o && caller__check_reserved(o->reserved, sizeof o->reserved / sizeof o->reserved[0],
                                    generator ? "caller_as_completed_gen" : "caller_as_completed",
                                    "caller_as_completed_options_t") < 0)
        return NULL;
    caller_iter_t *it = caller__calloc(1, sizeof *it);
    if (!it) {
        caller__fail(-ENOMEM, "caller_as_completed: out of memory");
        return NULL;
    }
    atomic_init(&it->refs, 1);
    atomic_init(&it->lock, CALLER__LOCK_INIT);
    it->out.prev_out = it->out.next_out = &it->out;
    int mc = o ? o->max_concurrent : 0;
    if (mc > 0)
        it->limit = (size_t)mc;
    else if (mc == 0 && generator)
        it->limit = CALLER_MAX_IDLE_POOL_INSTANCES;
    it->keep = o && o->keep_unfinished;
    it->chunk_size = it->limit && it->limit < CHUNK_MIN ? it->limit : CHUNK_MIN;
    return it;
}

caller_iter_t *caller_as_completed(caller_pending_t *const *items, size_t n,
                                   const caller_as_completed_options_t *o)
{
    if (n && !items) {
        caller__fail(-EINVAL, "caller_as_completed: items is NULL");
        return NULL;
    }
    caller_pending_t *self = caller_current_pending();
    for (size_t i = 0; i < n; i++) {
        if (!items[i]) {
            caller__fail(-EINVAL, "caller_as_completed: items[%zu] is NULL", i);
            return NULL;
        }
        if (items[i] == self) {
            caller__fail(-EDEADLK,
                         "caller_as_completed: items[%zu] is the current task's own "
                         "Pending: waiting for it would never end",
                         i);
            return NULL;
        }
    }
    caller_iter_t *it = iter_new(o, false);
    if (!it)
        return NULL;
    if (n) {
        it->items = caller__malloc(n * sizeof *it->items);
        if (!it->items) {
            caller__free(it);
            caller__fail(-ENOMEM, "caller_as_completed: out of memory");
            return NULL;
        }
        for (size_t i = 0; i < n; i++)
            it->items[i] = caller_pending_ref(items[i]);
    }
    it->n = n;
    /* All are met at the first call when unlimited: one chunk for all (its
     * entries touched only as used), and those done already need none. */
    if (n > it->chunk_size && (it->limit == 0 || it->limit >= n)) {
        it->chunk_size = n;
        it->pre = caller__malloc(n * sizeof *it->pre); /* without it: entries */
    }
    return it;
}

caller_iter_t *caller_as_completed_gen(caller_generator_fn gen, void *arg,
                                       const caller_as_completed_options_t *o)
{
    if (!gen) {
        caller__fail(-EINVAL, "caller_as_completed_gen: gen is NULL");
        return NULL;
    }
    caller_iter_t *it = iter_new(o, true);
    if (it) {
        it->gen = gen;
        it->gen_arg = arg;
    }
    return it;
}

/* Start watching @p p (a reference, passed on). */
static int watch(caller_iter_t *it, caller_pending_t *p, size_t index)
{
    entry_t *e = new_entry(it);
    if (!e) {
        caller_pending_unref(p);
        return caller__fail(-ENOMEM, "caller_iter_next: out of memory");
    }
    memset(e, 0, sizeof *e);
    e->w.wake = entry_wake;
    e->it = it;
    e->p = p;
    e->index = index;
    e->prev_out = it->out.prev_out;
    e->next_out = &it->out;
    it->out.prev_out->next_out = e;
    it->out.prev_out = e;
    it->noutstanding++;
    if (caller__pending_settled(p)) {
        /* Done, its callbacks run: into the done FIFO now, in the order
         * met, with no waiter (no lock on p, no reference on it). */
        caller__lock(&it->lock);
        e->delivered = true;
        caller__fifo_push(&it->done, &e->link);
        caller__unlock(&it->lock);
        return 0;
    }
    atomic_fetch_add_explicit(&it->refs, 1, memory_order_relaxed); /* the waiter's */
    if (!caller__pending_add_waiter(p, &e->w))
        entry_wake(&e->w); /* done meanwhile (and its callbacks ran) */
    return 0;
}

/* Ask for more while below the limit: every item is watched as soon as it
 * is met (all of a fixed set at the first call), so the done FIFO keeps
 * the order in which they completed. */
static int fill(caller_iter_t *it)
{
    while (!it->exhausted && (it->limit == 0 || it->noutstanding < it->limit)) {
        caller_pending_t *p;
        size_t at = it->pos;
        if (it->gen) {
            p = it->gen(it->gen_arg);
            if (p && p == caller_current_pending()) {
                caller_pending_unref(p);
                return caller__fail(-EDEADLK, "caller_iter_next: the generator produced the "
                                              "current task's own Pending");
            }
        } else {
            p = it->pos < it->n ? it->items[it->pos++] : NULL;
            if (p && it->pre && caller__pending_settled(p)) {
                it->pre[it->pre_tail++] = at;
                continue;
            }
        }
        if (!p) {
            it->exhausted = true;
            break;
        }
        int rc = watch(it, p, at);
        if (rc < 0)
            return rc;
    }
    return 0;
}

static void unlink_out(caller_iter_t *it, entry_t *e)
{
    e->prev_out->next_out = e->next_out;
    e->next_out->prev_out = e->prev_out;
    it->noutstanding--;
}

/* Would blocking this thread until @p p is done wait for work that only
 * @p self, this thread's Caller, can do? caller_pending_wait's test. */
static bool only_self_completes(const caller_t *self, const caller_pending_t *p)
{
    return caller__pending_owner(p) == self && !caller_pending_done(p);
}

/*
 * Before blocking a plain thread (a task suspends instead): -EDEADLK if the
 * wait could only end through this thread's own Caller, whose loop it would
 * hold up. That is when every outstanding item is such a Pending, or, with
 * @p need_all (all must finish), any one is. @p api names the caller.
 */
static int check_deadlock(caller_iter_t *it, bool need_all, const char *api)
{
    caller_t *self = caller__thread_caller();
    if (!self || caller__task_current())
        return 0;
    entry_t *stuck = NULL;
    for (entry_t *e = it->out.next_out; e != &it->out; e = e->next_out) {
        if (only_self_completes(self, e->p)) {
            stuck = e;
            if (need_all)
                break;
        } else if (!need_all) {
            return 0; /* another thread can end the wait */
        }
    }
    if (!stuck)
        return 0;
    char text[160];
    caller_pending_repr(stuck->p, text, sizeof text);
    return caller__fail(-EDEADLK,
                        "%s: blocking the thread of the Caller that must complete %s "
                        "would never end",
                        api, text);
}

/* The next item done, in the order they completed: its reference in *out
 * and its position in *index (0), or an error. */
static int next_done(caller_iter_t *it, int64_t deadline, bool need_all, const char *api,
                     caller_pending_t **out, size_t *index)
{
    *out = NULL;
    /* A suspension point even when a result is there: a cancelled task
     * stops here, and one that has held its loop too long lets it turn. */
    caller__task_t *task = caller__task_current();
    if (task && caller__task_checkpoint(task, deadline) < 0)
        return caller__fail(-ECANCELED, "%s: the task was cancelled", api);
    for (;;) {
        int rc = fill(it);
        if (rc < 0)
            return rc;
        if (it->pre_head < it->pre_tail) {
            size_t at = it->pre[it->pre_head++];
            *out = it->items[at]; /* the set's reference */
            it->items[at] = NULL;
            *index = at;
            return 0;
        }
        caller__lock(&it->lock);
        caller__msg_t *m = caller__fifo_pop(&it->done);
        if (m) {
            caller__unlock(&it->lock);
            entry_t *e = caller__container_of(m, entry_t, link);
            unlink_out(it, e);
            *out = e->p; /* the entry's reference */
            *index = e->index;
            recycle_entry(it, e);
            return 0;
        }
        if (it->noutstanding == 0 && it->exhausted) {
            caller__unlock(&it->lock);
            return CALLER_ITER_END;
        }
        caller__unlock(&it->lock);
        rc = check_deadlock(it, need_all, api);
        if (rc < 0)
            return rc;
        caller_pending_t *notify = caller_pending_new(CALLER_PENDING_UNTRACKED);
        if (!notify)
            return caller__fail(-ENOMEM, "%s: out of memory", api);
        caller__lock(&it->lock);
        if (it->done.head) {
            /* Delivered since we looked. */
            caller__unlock(&it->lock);
            caller_pending_unref(notify);
            continue;
        }
        it->notify = caller_pending_ref(notify);
        caller__unlock(&it->lock);

        int64_t now = caller__now_ns();
        double left = deadline == INT64_MAX ? CALLER_FOREVER
                      : deadline > now      ? (double)(deadline - now) / 1e9
                                            : 0;
        rc = caller_pending_wait(notify, left, CALLER_WAIT_PROTECT, NULL);
        if (rc < 0) {
            caller__lock(&it->lock);
            bool ours = it->notify == notify;
            if (ours)
                it->notify = NULL;
            caller__unlock(&it->lock);
            if (ours)
                caller_pending_unref(notify);
        }
        caller_pending_unref(notify);
        if (rc < 0)
            return rc;
    }
}

int caller_iter_next_timeout(caller_iter_t *it, double timeout, caller_pending_t **out)
{
    if (out)
        *out = NULL;
    if (!it || !out)
        return caller__fail(-EINVAL, "caller_iter_next: %s is NULL", it ? "out" : "it");
    size_t index;
    return next_done(it, caller__deadline(timeout), false, "caller_iter_next", out, &index);
}

int caller_iter_next(caller_iter_t *it, caller_pending_t **out)
{
    return caller_iter_next_timeout(it, CALLER_FOREVER, out);
}

void caller_iter_close(caller_iter_t *it)
{
    if (!it)
        return;
    caller__lock(&it->lock);
    it->closed = true;
    caller_pending_t *notify = it->notify;
    it->notify = NULL;
    caller__unlock(&it->lock);
    caller_pending_unref(notify);
    /* Entries already delivered are done; the others are cancelled unless
     * kept. An entry whose wake is in flight is freed by that wake. */
    for (entry_t *e = it->out.next_out, *next; e != &it->out; e = next) {
        next = e->next_out;
        unlink_out(it, e);
        caller__lock(&it->lock);
        bool delivered = e->delivered;
        caller__unlock(&it->lock);
        if (delivered) {
            free_entry(it, e);
        } else if (caller__pending_remove_waiter(e->p, &e->w)) {
            if (!it->keep)
                caller_pending_cancel(e->p, "Cancelled by as_completed");
            free_entry(it, e);
            iter_unref(it); /* the waiter's */
        } else {
            /* Its wake is in flight: it frees the entry, unless it already
             * delivered it. */
            caller__lock(&it->lock);
            delivered = e->delivered;
            if (!delivered)
                e->abandoned = true;
            caller__unlock(&it->lock);
            if (delivered)
                free_entry(it, e);
        }
    }
    /* A fixed set's items not watched yet are unfinished too. */
    if (!it->keep)
        for (size_t i = it->pos; i < it->n; i++)
            caller_pending_cancel(it->items[i], "Cancelled by as_completed");
    iter_unref(it);
}

/* ---- wait ---------------------------------------------------------------- */

int caller_wait(caller_pending_t *const *items, size_t n, double timeout, caller_return_when_t when,
                caller_pending_t **done, size_t *ndone, caller_pending_t **not_done,
                size_t *nnot_done)
{
    if (ndone)
        *ndone = 0;
    if (nnot_done)
        *nnot_done = 0;
    if ((n && (!items || !done || !not_done)) || when > CALLER_FIRST_EXCEPTION)
        return caller__fail(-EINVAL, "caller_wait: %s",
                            when > CALLER_FIRST_EXCEPTION ? "unknown return_when"
                                                          : "an array is NULL");
    caller_as_completed_options_t o = {.max_concurrent = -1, .keep_unfinished = true};
    caller_iter_t *it = caller_as_completed(items, n, &o);
    if (!it)
        return caller_last_error(NULL);
    bool *finished = n ? caller__calloc(n, sizeof *finished) : NULL;
    if (n && !finished) {
        caller_iter_close(it);
        return caller__fail(-ENOMEM, "caller_wait: out of memory");
    }
    int64_t deadline = caller__deadline(timeout);
    size_t nd = 0;
    int rc = 0;
    while (nd < n) {
        caller_pending_t *p;
        size_t index;
        rc = next_done(it, deadline, when == CALLER_ALL_COMPLETED, "caller_wait", &p, &index);
        if (rc != 0)
            break;
        finished[index] = true;
        done[nd++] = items[index];
        bool failed = when == CALLER_FIRST_EXCEPTION && caller_pending_exception(p, NULL, 0) != 0;
        caller_pending_unref(p);
        if (when == CALLER_FIRST_COMPLETED || (when == CALLER_FIRST_EXCEPTION && failed))
            break;
    }
    caller_iter_close(it);
    /* Every item done by now is in `done`, not only those seen (the
     * Python original's sets: FIRST_COMPLETED with two done gives both). */
    for (size_t i = 0; i < n; i++)
        if (!finished[i] && caller_pending_done(items[i]) == 1) {
            finished[i] = true;
            done[nd++] = items[i];
        }
    size_t nn = 0;
    for (size_t i = 0; i < n; i++)
        if (!finished[i])
            not_done[nn++] = items[i];
    caller__free(finished);
    if (ndone)
        *ndone = nd;
    if (nnot_done)
        *nnot_done = nn;
    if (rc == -ETIMEDOUT || rc == CALLER_ITER_END)
        rc = 0; /* a timeout is not an error */
    return rc;
}
