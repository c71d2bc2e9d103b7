/*
 * Pending internals (pending.c): what the scheduler, the trackers and the
 * pool need of a future beyond the public API.
 */
#ifndef CALLER_PENDING_H
#define CALLER_PENDING_H

#include "caller.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Where the extra bytes of caller__pending_new_extra (a task) begin: the
 * Pending's struct, padded to this. */
#define CALLER__PENDING_SIZE 88

/*
 * A waiter: one party blocked in (or suspended on) a wait for a Pending.
 * The node lives in the waiter's own stack frame. The completing thread
 * detaches all waiters under the Pending's lock (clearing `linked`), runs
 * the done callbacks, then for each waiter fills in the outcome and calls
 * `wake` — after which it never touches the node again.
 *
 * A waiter that gives up (timeout, cancellation) calls
 * caller__pending_remove_waiter(): if that returns false, a wake is on its
 * way and the waiter must wait for it before its frame goes away.
 */
typedef struct caller__waiter caller__waiter_t;
struct caller__waiter {
    caller__waiter_t *next;
    void (*wake)(caller__waiter_t *w);
    void *value; /* outcome of the completion that woke us */
    int code;    /* 0, the error code, or -ECANCELED */
    bool linked;
};

/* Link @p w unless the Pending is done. Returns true if linked (a wake will
 * come), false if already done (no wake will come). An execution queue's
 * Pending that drained with nothing queued since wakes @p w at once, from
 * this thread, before returning true. */
bool caller__pending_add_waiter(caller_pending_t *p, caller__waiter_t *w);

/* Unlink @p w. Returns true if it was still linked (no wake will come). */
bool caller__pending_remove_waiter(caller_pending_t *p, caller__waiter_t *w);

/* Done, with its callbacks run: a wait would return at once (its outcome
 * is then read under the lock, as reset may clear it). Lock-free. */
bool caller__pending_settled(const caller_pending_t *p);

/* Rounds of an execution queue's Pending (see pending.c): close the round
 * when the queue is found empty (under the queue's lock; returns its
 * waiters), note each item queued (under that lock), and complete the
 * round later with set_result(value, reset) semantics. */
caller__waiter_t *caller__pending_close_round(caller_pending_t *p);
void caller__pending_queued(caller_pending_t *p);
int caller__pending_end_round(caller_pending_t *p, void *value, caller__waiter_t *round);

/* Label shown in the text form (a string with static lifetime, e.g. the
 * scheduled function's name). */
void caller__pending_set_name(caller_pending_t *p, const char *name);
/* Its name (a label with static lifetime), or NULL; no lock (a signal
 * handler reads it: a pointer read whole). */
const char *caller__pending_name(const caller_pending_t *p);

/* Whether the Pending was created with allow_tracking (trackers, later). */
bool caller__pending_trackable(const caller_pending_t *p);

/* sizeof(struct caller_pending), for the benchmarks' report (pending.c checks
 * at compile time that it fits CALLER__PENDING_SIZE). */
size_t caller__pending_size(void);

/* The Caller whose work completes @p p (caller__pending_set_owner), or NULL.
 * Set before the Pending is shared and never changed — except a pooled
 * call's, NULL until a worker takes it (caller__pending_adopt). */
caller_t *caller__pending_owner(const caller_pending_t *p);

/* Let the trackers of the current context see @p p (unless untracked).
 * Called once @p p is fully set up: from then on other threads can reach
 * it. caller_pending_new() does this; users of the _extra form call it. */
void caller__pending_track(caller_pending_t *p);
/* caller_pending_ref for a Pending no other thread can reach yet (made by
 * this thread and not submitted): no locked instruction. */
void caller__pending_ref_unshared(caller_pending_t *p);
/* A Pending with @p extra bytes after it (the task), at
 * CALLER__PENDING_SIZE from its start; *extra gets them. Not yet tracked:
 * see caller__pending_track. */
caller_pending_t *caller__pending_new_extra(unsigned flags, size_t extra, void **extra_out);
/* The Caller whose work completes this Pending (a reference is taken, or,
 * with @p weak, none: for the Caller's own stopped event). */
void caller__pending_set_owner(caller_pending_t *p, caller_t *owner, bool weak);
/* Set owner, name and canceller of a Pending nobody else sees yet, without
 * taking its lock (the task fast path). The owner gets a reference, or,
 * with @p lent, none while the task lives: the owner's running reference
 * covers it then (a running Caller finishes only after every task it
 * accepted ended or was drained); see caller__pending_task_over. */
void caller__pending_init_task(caller_pending_t *p, caller_t *owner, const char *name,
                               caller_canceller_fn canceller, void *arg, bool lent);
/* The loop thread, as a task ends (before it drops the task's reference on
 * @p p): if others still hold @p p, it takes its lent owner reference for
 * real, so the owner outlives it; if not, @p p is about to go and no
 * reference is needed. */
void caller__pending_task_over(caller_pending_t *p);

/* A worker's loop thread, taking a pooled call made with no owner
 * (caller__pending_init_task with NULL): @p owner completes it from now on,
 * lent as in caller__pending_init_task. */
void caller__pending_adopt(caller_pending_t *p, caller_t *owner);

/* What a Pending may do with its owner, the Caller whose work completes it
 * (pending.c knows nothing more of Callers): installed once by caller.c. */
typedef struct caller__owner_ops {
    void (*ref)(caller_t *owner);
    void (*unref)(caller_t *owner);
    int (*repr)(const caller_t *owner, char *buf, size_t len);
} caller__owner_ops_t;
void caller__pending_set_owner_ops(const caller__owner_ops_t *ops);

/* ---- waiting: the pieces of caller_pending_wait (sched.c) ---- */
/* Is this thread (this fiber) running @p p's done callbacks right now? */
bool caller__pending_completing_here(const caller_pending_t *p);
/* Block this plain thread until @p p is done or @p deadline (monotonic ns);
 * 0 or -ETIMEDOUT. On 0, *code and *value hold the completion's outcome. */
int caller__pending_block(caller_pending_t *p, int64_t deadline, int *code, void **value);
/* @p p's outcome now (done): 0 and *value, or its error, recorded. */
int caller__pending_outcome(const caller_pending_t *p, void **value);
/* @p p's owner if @p p is not done yet, else NULL. */
void *caller__pending_owner_of_undone(const caller_pending_t *p);
/* The end of every wait: cancel on timeout/cancel unless @p protect, and
 * the return value and message of caller_pending_wait. */
int caller__pending_wait_end(caller_pending_t *p, int rc, int code, void *v, double timeout,
                             bool protect, bool want_result, void **value);

/* fork(): 0 = prepare (take the module's process-wide locks), 1 = in the
 * parent after (release them), 2 = in the child (reset the state). */
void caller__pending_fork(int phase);

#endif /* CALLER_PENDING_H */
