/*
 * The library's locks, and the one order they are taken in. A thread that
 * holds a lock takes only locks further down this table; no user code runs
 * under any of them. Debug builds (no NDEBUG) and the test build check
 * every acquisition against the table and abort on a wrong order, naming
 * both locks.
 *
 *   rank  lock                file        guards
 *   ----  ------------------  ----------  ---------------------------------------
 *   1     registry_lock       caller.c    the registry of live Callers
 *   2     caller->lock        caller.c    a Caller's children and pool pointer
 *                                         (a parent's, never while holding a child's)
 *   3     queues.lock         queue.c     a Caller's execution queues and their items
 *   4     pool->lock          pool.c      a pool's idle workers and parked calls
 *   5     tracker->lock       group.c     a group's or manager's set
 *   6     scope->lock         sched.c     an entered cancel scope's task
 *   7     caller->inbox_lock  inbox.c     a Caller's inbox (the backend's wake is
 *                                         issued under it)
 *   8     a Pending's lock    pending.c   its state, waiters and callbacks
 *   --    leaves              nothing is taken under them: iopub.c's map lock,
 *                             fiber.c's stack pool lock, alloc.c's block caches,
 *                             collect.c's iterator lock
 */
#ifndef CALLER_LOCKORDER_H
#define CALLER_LOCKORDER_H

enum {
    CALLER__RANK_REGISTRY = 1,
    CALLER__RANK_CALLER,
    CALLER__RANK_QUEUES,
    CALLER__RANK_POOL,
    CALLER__RANK_TRACKER,
    CALLER__RANK_SCOPE,
    CALLER__RANK_INBOX,
    CALLER__RANK_PENDING,
    CALLER__RANK_COUNT
};

#if !defined(NDEBUG) || CALLER_TESTING
#define CALLER__CHECK_LOCK_ORDER 1
#include <stdio.h>
#include <stdlib.h>

/* Locks of each rank this thread holds now. */
extern _Thread_local unsigned char caller__held[CALLER__RANK_COUNT];

static inline const char *caller__rank_name(int rank)
{
    static const char *const names[CALLER__RANK_COUNT] = {
        "?",           "registry_lock",      "caller->lock",
        "queues.lock", "pool->lock",         "tracker->lock",
        "scope->lock", "caller->inbox_lock", "a Pending's lock"};
    return rank > 0 && rank < CALLER__RANK_COUNT ? names[rank] : "?";
}

/* Before taking a lock of @p rank: nothing of this rank or below may be
 * held (a rank's locks are never nested either). */
static inline void caller__order_acquire(int rank)
{
    for (int r = rank; r < CALLER__RANK_COUNT; r++) {
        if (caller__held[r]) {
            fprintf(stderr, "libcaller: lock order: taking %s while holding %s\n",
                    caller__rank_name(rank), caller__rank_name(r));
            abort();
        }
    }
    caller__held[rank]++;
}

static inline void caller__order_release(int rank)
{
    caller__held[rank]--;
}
#else
#define CALLER__CHECK_LOCK_ORDER 0
#define caller__order_acquire(rank) ((void)(rank))
#define caller__order_release(rank) ((void)(rank))
#endif

#include <pthread.h>

/* A mutex of @p rank, taken and released with the order check. */
static inline void caller__mutex_lock(pthread_mutex_t *m, int rank)
{
    caller__order_acquire(rank);
    pthread_mutex_lock(m);
}

static inline void caller__mutex_unlock(pthread_mutex_t *m, int rank)
{
    pthread_mutex_unlock(m);
    caller__order_release(rank);
}

#endif /* CALLER_LOCKORDER_H */
