/*
 * A Caller's inbox (inbox.c): how other threads reach a Caller. Messages
 * are embedded in the objects they concern (posting never allocates except
 * for call_direct); the inbox is a FIFO under its own lock (rank 7 in
 * lockorder.h: under it only a Pending's lock may be taken, and the
 * backend's non-blocking wake is issued, so the loop cannot close the
 * backend between a push and its wake). It wakes the loop only when it goes
 * from empty to non-empty; the loop takes the whole FIFO at once, so a
 * burst costs one wake-up and none is lost.
 */
#ifndef CALLER_INBOX_H
#define CALLER_INBOX_H

#include "caller.h"

#include "backend.h"
#include "sync.h"

#include <stdbool.h>
#include <stdint.h>

typedef enum {
    CALLER__MSG_TASK = 1, /* a new task (caller__task_t.msg) */
    CALLER__MSG_RESUME,   /* a suspended task's wait was satisfied */
    CALLER__MSG_CANCEL,   /* a task's Pending was cancelled (holds a ref) */
    CALLER__MSG_DIRECT,   /* call_direct (allocated) */
    CALLER__MSG_STOP,     /* carry out caller_stop in the loop thread */
    CALLER__MSG_CHILD,    /* a child stopped (holds a ref on the child) */
    CALLER__MSG_POOL,     /* a worker: its pool has a call for it */
} caller__msg_kind_t;

typedef struct caller__msg caller__msg_t;
struct caller__msg {
    caller__msg_t *next;
    uint8_t kind;
};

/* A FIFO of messages (or of ready tasks, through the same link). */
typedef struct {
    caller__msg_t *head, *tail;
} caller__fifo_t;

static inline void caller__fifo_push(caller__fifo_t *q, caller__msg_t *m)
{
    m->next = NULL;
    if (q->tail)
        q->tail->next = m;
    else
        q->head = m;
    q->tail = m;
}

static inline caller__msg_t *caller__fifo_pop(caller__fifo_t *q)
{
    caller__msg_t *m = q->head;
    if (m) {
        q->head = m->next;
        if (!q->head)
            q->tail = NULL;
    }
    return m;
}

typedef struct caller__inbox {
    caller__lock_t lock;
    bool refusing; /* user submissions refused: the Caller is stopping */
    bool closed;   /* nothing accepted: the Caller finished (or never ran) */
    bool spinning; /* the loop spins for work: a push pokes, no wake */
    caller__fifo_t q;
    caller__backend_t *backend; /* wake target; NULL before start, after close */
    const caller__backend_ops_t *ops;
    uint64_t wakes; /* wake-ups issued (tests, caller_stats) */
    size_t n;       /* messages in `q` (caller_stats) */
    /* The loop spins reading `poked` while producers take the lock: 64
     * bytes apart (a cache line), or every push would steal the spinner's
     * line (W3 was 25% slower so). Padding, not _Alignas: the Caller is a
     * plain heap allocation. */
    char apart[64];
    atomic_uint poked; /* work arrived while the loop spun */
} caller__inbox_t;

void caller__inbox_init(caller__inbox_t *ib, const caller__backend_ops_t *ops);

/* Post @p m (any thread). User submissions (@p user) are refused once the
 * inbox refuses them; the library's own messages until it closes. False if
 * refused. */
bool caller__inbox_post(caller__inbox_t *ib, caller__msg_t *m, bool user);

/* For state changes that must be atomic with the inbox (caller.c's stop
 * and start): the lock, and what may be done under it. */
void caller__inbox_lock(caller__inbox_t *ib);
void caller__inbox_unlock(caller__inbox_t *ib);
/* Push (even while refusing: the stop message itself), waking the loop. */
void caller__inbox_push_locked(caller__inbox_t *ib, caller__msg_t *m);
/* From now on refuse user submissions. */
void caller__inbox_refuse_locked(caller__inbox_t *ib);
/* The loop opened: wake @p backend from now on. True if messages wait. */
bool caller__inbox_open_locked(caller__inbox_t *ib, caller__backend_t *backend);
/* Close for good (no more wakes); the messages left, for the caller to
 * drain. */
caller__msg_t *caller__inbox_close_locked(caller__inbox_t *ib);

/* Loop thread: take every queued message (oldest first). */
caller__msg_t *caller__inbox_take(caller__inbox_t *ib);
/* Loop thread, about to block: spin briefly (adaptive @p spin) for work.
 * True if messages wait. */
bool caller__inbox_await_briefly(caller__inbox_t *ib, caller__spin_t *spin);

#endif /* CALLER_INBOX_H */
