/*
 * A Caller's inbox: see inbox.h. Lock: `ib->lock` (rank 7 in lockorder.h).
 */
#include "inbox.h"

#include "lockorder.h"

void caller__inbox_init(caller__inbox_t *ib, const caller__backend_ops_t *ops)
{
    atomic_init(&ib->lock, CALLER__LOCK_INIT);
    atomic_init(&ib->poked, 0);
    ib->ops = ops;
}

void caller__inbox_lock(caller__inbox_t *ib)
{
    caller__order_acquire(CALLER__RANK_INBOX);
    caller__lock(&ib->lock);
}

void caller__inbox_unlock(caller__inbox_t *ib)
{
    caller__unlock(&ib->lock);
    caller__order_release(CALLER__RANK_INBOX);
}

void caller__inbox_push_locked(caller__inbox_t *ib, caller__msg_t *m)
{
    bool was_empty = ib->q.head == NULL;
    caller__fifo_push(&ib->q, m);
    ib->n++;
    if (was_empty && ib->backend) {
        if (ib->spinning) {
            /* The loop is spinning for work: no system call needed. */
            atomic_store_explicit(&ib->poked, 1, memory_order_release);
        } else {
            ib->wakes++;
            ib->ops->wake(ib->backend);
        }
    }
}

bool caller__inbox_post(caller__inbox_t *ib, caller__msg_t *m, bool user)
{
    caller__inbox_lock(ib);
    if (ib->closed || (user && ib->refusing)) {
        caller__inbox_unlock(ib);
        return false;
    }
    caller__inbox_push_locked(ib, m);
    caller__inbox_unlock(ib);
    return true;
}

void caller__inbox_refuse_locked(caller__inbox_t *ib)
{
    ib->refusing = true;
}

bool caller__inbox_open_locked(caller__inbox_t *ib, caller__backend_t *backend)
{
    ib->backend = backend;
    return ib->q.head != NULL;
}

caller__msg_t *caller__inbox_close_locked(caller__inbox_t *ib)
{
    ib->refusing = ib->closed = true;
    ib->backend = NULL;
    caller__msg_t *left = ib->q.head;
    ib->q.head = ib->q.tail = NULL;
    ib->n = 0;
    return left;
}

caller__msg_t *caller__inbox_take(caller__inbox_t *ib)
{
    caller__inbox_lock(ib);
    caller__msg_t *m = ib->q.head;
    ib->q.head = ib->q.tail = NULL;
    ib->n = 0;
    caller__inbox_unlock(ib);
    return m;
}

bool caller__inbox_await_briefly(caller__inbox_t *ib, caller__spin_t *spin)
{
    caller__inbox_lock(ib);
    bool queued = ib->q.head != NULL;
    ib->spinning = !queued;
    atomic_store_explicit(&ib->poked, 0, memory_order_relaxed);
    caller__inbox_unlock(ib);
    if (!queued) {
        caller__spin_while(spin, &ib->poked, 0);
        caller__inbox_lock(ib);
        ib->spinning = false; /* from here producers wake the loop again */
        queued = ib->q.head != NULL;
        caller__inbox_unlock(ib);
    }
    return queued;
}
