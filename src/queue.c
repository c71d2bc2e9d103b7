/*
 * Execution queues (SPEC §7): caller_queue_call appends to the queue of
 * (fn, caller) — or of an explicit key — whose items run one at a time, in
 * order, inside one task on the Caller: the queue's task, whose Pending is
 * the queue's Pending. Each time the queue runs dry that Pending is set to
 * the last item's result with reset, so a waiter sees the queue drained.
 *
 * Rounds: a wait on the queue's Pending must end only once the items
 * queued before it began have run and the queue drained after them. The
 * task decides "empty" under the Caller's lock and completes the Pending
 * only after unlocking, so a caller_queue_call and a wait can both come in
 * between. So the round is closed with the decision, under the lock
 * (caller__pending_close_round: it takes the waiters there are), each
 * caller_queue_call tells the Pending that an item came
 * (caller__pending_queued), and the completion wakes the round's waiters
 * and, if nothing was queued since the close, the later ones too. A wait
 * on a queue that drained with nothing queued since ends at once.
 *
 * Finding: the open queues (not closed) are in the Caller's index by key
 * (keyindex.h; `queues.index`), so a call finds its queue in O(1) however
 * many keys are live; every queue is also on the list `queues.head` from
 * its creation until it is closed by queue_close or ends. A queue leaves the
 * index the moment it is closed (retire), so a new call on its key makes a
 * new queue while the old one ends. The index is freed when its last queue
 * leaves it, so nothing of it outlives the Caller's queues.
 *
 * Locking: a Caller's queues (the index, the list and each queue's items)
 * are under its `queues.lock`; no user code and no Pending completion runs under
 * it. Closing a round takes the queue's Pending's lock under it (a leaf
 * lock: nothing is taken under that). A queue is freed by its own task when
 * it ends, after leaving the list, so whoever finds it under the lock may
 * use it until unlocking.
 */
#include "alloc.h"
#include "core.h"
#include "error.h"
#include "keyindex.h"
#include "lockorder.h"
#include "pending.h"
#include "task.h"
#include "testpoint.h"

#include <stdio.h>
#include <string.h>

typedef struct item {
    struct item *next;
    caller_fn fn;
    void *arg;
    const char *name;
} item_t;

/* The lock of a Caller's queues (rank 3 in lockorder.h). */
#define lock_queues(c) caller__mutex_lock(&(c)->queues.lock, CALLER__RANK_QUEUES)
#define unlock_queues(c) caller__mutex_unlock(&(c)->queues.lock, CALLER__RANK_QUEUES)
typedef struct caller__queue caller__queue_t;

struct caller__queue {
    caller__keynode_t node;              /* in caller->queues.index while open: its key is
                                            (fn, NULL) for the queue of (fn, caller), or
                                            (NULL, key) for an explicit key */
    struct caller__queue *next, **pprev; /* in caller->queues.head (pprev NULL: not) */
    caller_t *caller;
    caller_pending_t *pending; /* the queue's task; a reference */
    item_t *head, *tail;
    caller_pending_t *wake; /* the idle task waits on it (a reference) */
    bool closed;
};

/* Under the queues lock: the open queue of (fn, key), whose hash is @p hash. */
static caller__queue_t *find(caller_t *c, caller_fn fn, const void *key, size_t hash)
{
    caller__keynode_t *n = caller__keyindex_find(c->queues.index, fn, key, hash);
    return n ? caller__container_of(n, caller__queue_t, node) : NULL;
}

/* Under the queues lock: @p q is closed, so find() no longer returns it. */
static void retire(caller_t *c, caller__queue_t *q)
{
    if (q->closed)
        return;
    q->closed = true;
    caller__keyindex_t *ix = c->queues.index;
    caller__keyindex_remove(&ix, &q->node);
    c->queues.index = ix;
}

/* Under the queues lock. */
static void enlist(caller_t *c, caller__queue_t *q)
{
    q->next = c->queues.head;
    if (q->next)
        q->next->pprev = &q->next;
    q->pprev = &c->queues.head;
    c->queues.head = q;
}

/* Under the queues lock; once listed, a second time does nothing. */
static void unlist(caller__queue_t *q)
{
    if (!q->pprev)
        return;
    *q->pprev = q->next;
    if (q->next)
        q->next->pprev = q->pprev;
    q->next = NULL;
    q->pprev = NULL;
}

static void free_items(item_t *it)
{
    while (it) {
        item_t *next = it->next;
        caller__free(it);
        it = next;
    }
}

/* The queue's task: runs items until the queue is closed or cancelled. */
static void *queue_loop(void *arg)
{
    caller__queue_t *q = arg;
    caller_t *c = q->caller;
    caller_pending_t *self = caller_current_pending();
    void *last = NULL;
    for (;;) {
        lock_queues(c);
        item_t *it = q->closed ? NULL : q->head;
        if (it) {
            q->head = it->next;
            if (!q->head)
                q->tail = NULL;
        }
        caller_pending_t *wake = NULL;
        caller__waiter_t *round = NULL;
        if (!it && !q->closed) {
            wake = caller_pending_new(CALLER_PENDING_UNTRACKED);
            q->wake = caller_pending_ref(wake);
            if (wake) /* drained: this round ends here, whatever comes next */
                round = caller__pending_close_round(self);
        }
        bool closed = q->closed;
        unlock_queues(c);

        if (it) {
            void *r = it->fn(it->arg);
            int code;
            char *msg;
            if (caller__task_take_raised(&code, &msg)) {
                caller__log(c, CALLER_LOG_ERROR, "Execution of %s(%p) failed: %s (%s)",
                            it->name ? it->name : "item", it->arg, msg ? msg : "",
                            caller_err_name(code));
                caller__free(msg);
            } else {
                last = r;
            }
            caller__free(it);
            /* Cancelled (the queue's Pending): end. Else, as items that
             * keep coming (one queuing the next, a producer faster than
             * the queue) would keep the loop to this task, let it turn
             * between two of them when it is due. */
            if (caller__task_checkpoint(caller__task_current(), INT64_MAX) < 0)
                break;
            continue;
        }
        if (closed || !wake)
            break; /* closed, or no memory to wait: end the queue */
        /* Drained: this round's result to its waiters, then wait for the
         * next item. */
        CALLER__TEST_POINT("queue.empty", self);
        caller__pending_end_round(self, last, round);
        int rc = caller_pending_wait(wake, CALLER_FOREVER, CALLER_WAIT_PROTECT, NULL);
        caller_pending_unref(wake);
        if (rc < 0)
            break; /* cancelled: queue_close, the Pending, or the Caller stopping */
    }
    return last;
}

/* The queue's task is over (ran or not): the queue goes. Loop thread. */
static void queue_end(void *arg)
{
    caller__queue_t *q = arg;
    caller_t *c = q->caller;
    lock_queues(c);
    retire(c, q);
    unlist(q);
    item_t *left = q->head;
    caller_pending_t *wake = q->wake;
    q->head = q->tail = NULL;
    q->wake = NULL;
    unlock_queues(c);
    free_items(left); /* the rest never run */
    caller_pending_unref(wake);
    caller_pending_unref(q->pending);
    caller__free(q);
}

/* Under the queues lock: a new queue of (key_fn, key), its task scheduled,
 * in the index and on the list; or NULL with the error set. */
static caller__queue_t *new_queue(caller_t *c, caller_fn key_fn, const void *key, size_t hash,
                                  const char *name)
{
    /* Room in the index first: once the task is scheduled, the queue must
     * go in. */
    caller__keyindex_t *ix = c->queues.index;
    int rc = caller__keyindex_reserve(&ix);
    c->queues.index = ix;
    if (rc < 0) {
        caller__fail(rc, "caller_queue_call: out of memory to grow the table of %zu queues",
                     caller__keyindex_count(ix));
        return NULL;
    }
    caller__queue_t *q = caller__calloc(1, sizeof *q);
    if (q) { /* set before its task can look */
        q->caller = c;
        q->node = (caller__keynode_t){.fn = key_fn, .key = key, .hash = hash};
    }
    caller_pending_t *p =
        q ? caller__call_soon_ex(c, queue_loop, q, name ? name : "queue", queue_end) : NULL;
    if (!p) {
        if (q)
            caller__free(q);
        else
            caller__fail(-ENOMEM, "caller_queue_call: out of memory");
        caller__keyindex_trim(&ix); /* a table made for this queue goes */
        c->queues.index = ix;
        return NULL;
    }
    q->pending = p;  /* the queue's reference, dropped when it ends */
    q->node.aux = p; /* a call looks at it first */
    caller__keyindex_insert(ix, &q->node);
    enlist(c, q);
    return q;
}

static caller_pending_t *queue_call(caller_t *c, caller_fn key_fn, const void *key, caller_fn fn,
                                    void *arg, const char *name)
{
    if (!c || !fn || (!key_fn && !key)) {
        caller__fail(-EINVAL, "caller_queue_call: %s is NULL", !c ? "caller" : !fn ? "fn" : "key");
        return NULL;
    }
    if (caller__arg_on_task_stack(arg, "caller_queue_call", "arg"))
        return NULL;
    item_t *it = caller__malloc(sizeof *it);
    if (!it) {
        caller__fail(-ENOMEM, "caller_queue_call: out of memory");
        return NULL;
    }
    *it = (item_t){.fn = fn, .arg = arg, .name = name};
    lock_queues(c);
    if (caller_state(c) >= CALLER_STATE_STOPPING) {
        unlock_queues(c);
        caller__free(it);
        caller__fail_stopped(c, "caller_queue_call");
        return NULL;
    }
    size_t hash = caller__keyindex_hash(key_fn, key);
    caller__queue_t *q = find(c, key_fn, key, hash);
    if (q && caller_pending_cancelled(q->pending) == 1) {
        /* Its Pending was cancelled: the queue is ending; start afresh. */
        retire(c, q);
        q = NULL;
    }
    if (!q && (q = new_queue(c, key_fn, key, hash, name)) == NULL) {
        unlock_queues(c);
        caller__free(it);
        return NULL;
    }
    if (q->tail)
        q->tail->next = it;
    else
        q->head = it;
    q->tail = it;
    caller__pending_queued(q->pending); /* a round closed before now is not this item's */
    caller_pending_t *wake = q->wake;
    q->wake = NULL;
    caller_pending_t *p = caller_pending_ref(q->pending);
    unlock_queues(c);
    if (wake) {
        caller_pending_set_result(wake, NULL, 0);
        caller_pending_unref(wake);
    }
    return p;
}

caller_pending_t *(caller_queue_call)(caller_t *c, caller_fn fn, void *arg)
{
    return queue_call(c, fn, NULL, fn, arg, NULL);
}

caller_pending_t *(caller_queue_call_key)(caller_t *c, const void *key, caller_fn fn, void *arg)
{
    return queue_call(c, NULL, key, fn, arg, NULL);
}

caller_pending_t *caller_queue_call_named(caller_t *c, caller_fn fn, void *arg, const char *name)
{
    return queue_call(c, fn, NULL, fn, arg, name);
}

caller_pending_t *caller_queue_call_key_named(caller_t *c, const void *key, caller_fn fn, void *arg,
                                              const char *name)
{
    return queue_call(c, NULL, key, fn, arg, name);
}

static caller_pending_t *get(caller_t *c, caller_fn fn, const void *key, bool close)
{
    if (!c || (!fn && !key)) {
        caller__fail(-EINVAL, "caller_queue_%s: %s is NULL", close ? "close" : "get",
                     c ? "the key" : "caller");
        return NULL;
    }
    lock_queues(c);
    caller__queue_t *q = find(c, fn, key, caller__keyindex_hash(fn, key));
    caller_pending_t *p = NULL;
    if (q && (close || caller_pending_cancelled(q->pending) != 1)) {
        p = caller_pending_ref(q->pending);
        if (close) {
            retire(c, q); /* queue_get no longer finds it */
            unlist(q);
        }
    }
    unlock_queues(c);
    return p;
}

caller_pending_t *caller_queue_get(caller_t *c, caller_fn fn)
{
    return get(c, fn, NULL, false);
}

caller_pending_t *caller_queue_get_key(caller_t *c, const void *key)
{
    return get(c, NULL, key, false);
}

static int close_queue(caller_t *c, caller_fn fn, const void *key)
{
    caller_pending_t *p = get(c, fn, key, true);
    if (!p)
        return c && (fn || key) ? 0 : -EINVAL;
    caller_pending_cancel(p, "queue closed");
    caller_pending_unref(p);
    return 1;
}

int caller_queue_close(caller_t *c, caller_fn fn)
{
    return close_queue(c, fn, NULL);
}

int caller_queue_close_key(caller_t *c, const void *key)
{
    return close_queue(c, NULL, key);
}
