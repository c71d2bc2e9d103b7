/*
 * Tasks, cancel scopes and the scheduler (sched.c): a task runs a function
 * on a fiber in a Caller's thread and lives in its Pending's allocation.
 */
#ifndef CALLER_TASK_H
#define CALLER_TASK_H

#include "caller.h"

#include "alloc.h"
#include "heap.h"
#include "inbox.h"
#include "list.h"
#include "pending.h"
#include "sync.h"

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

struct caller__fiber;
struct caller__ctx;

typedef enum {
    CALLER__TASK_QUEUED = 0, /* submitted, not yet seen by the loop */
    CALLER__TASK_DELAYED,    /* call_later: in the timer heap */
    CALLER__TASK_READY,      /* in the ready FIFO */
    CALLER__TASK_RUNNING,
    CALLER__TASK_SUSPENDED,
    CALLER__TASK_DONE,
} caller__task_state_t;

/* A pool's call (caller__task_new_pooled) never goes through an inbox; its
 * `msg.kind` says where it is instead: in its pool's queue, or taken by a
 * worker (changed under the pool's lock). */
enum { CALLER__POOLED_QUEUED = 100, CALLER__POOLED_TAKEN = 101 };

typedef enum {
    CALLER__WAKE_NONE = 0,
    CALLER__WAKE_DONE,    /* what it waited for happened */
    CALLER__WAKE_TIMEOUT, /* its deadline passed */
    CALLER__WAKE_CANCEL,  /* its Pending was cancelled */
    CALLER__WAKE_NOMEM,   /* no memory to arm the deadline: did not suspend */
} caller__wake_t;

/* A cancel scope (caller_scope_enter): on its task's fiber stack of scopes. */
struct caller_scope {
    /* The entered scope's task holds one reference (until exit, or its
     * end), caller_scope_ref() others: caller_scope_cancel stays safe from
     * any thread that holds one. */
    atomic_int refs;
    caller__lock_t lock; /* guards `task` against exit, for cancel */
    caller_scope_t *parent;
    struct caller__task *task; /* NULL once exited */
    atomic_bool cancelled;     /* cancel called, or the deadline passed */
    bool shield;
    bool fail;    /* "fail after": exit reports -ETIMEDOUT when expired */
    bool expired; /* (L) */
    int64_t deadline;
};

/* A failure reported with caller_raise() (code 0: none). */
typedef struct {
    int code;
    char *msg;
} caller__raise_t;

/*
 * A task: lives in the same allocation as its Pending, at
 * CALLER__PENDING_SIZE bytes from its start, so a call costs one
 * allocation. Loop-thread-only fields are marked (L).
 *
 * Kept at 104 bytes: with the Pending's 88 that makes a 192-byte block,
 * three cache lines (it was 248 in four, and 304 before that). W1 keeps
 * 10^6 of them alive at once and pays a page fault per 4 KiB of them; W3
 * moves each one between two cores. Hence what is not stored: the Pending
 * (just before the task: caller__task_pending), the Caller (the Pending's
 * owner: caller__task_caller), a timer's deadline (in the timer heap's
 * array) and the end hook (one for all tasks that have one: has_end).
 */
typedef struct caller__task {
    caller__msg_t msg;        /* MSG_TASK, then the ready FIFO link */
    caller__msg_t cancel_msg; /* MSG_CANCEL */
    union {
        caller_fn fn;     /* until it is called */
        void *result;     /* what fn returned (raised_code == 0) */
        char *raised_msg; /* what caller_raise recorded (raised_code != 0) */
    } u;
    void *arg;
    struct caller__fiber *fiber; /* (L) */
    union {
        int64_t deadline; /* until its Caller accepts it: when it is due
                             (call_later), or INT64_MIN (now) */
        int raised_code;  /* (L) from its acceptance: what caller_raise
                             recorded (0: nothing) */
    };
    caller__link_t live;     /* (L) in caller->live_tasks */
    struct caller__ctx *ctx; /* its context: captured when scheduled (a
                                reference), changed by entering groups */
    caller_scope_t *scope;   /* (L) innermost cancel scope, or NULL */
    caller__timer_t timer;   /* (L) call_later delay, then wait timeouts */
    atomic_bool cancel_posted;
    uint8_t state;          /* (L) caller__task_state_t */
    uint8_t wake;           /* (L) caller__wake_t of the last resume */
    bool uncancellable : 1; /* (L) the current suspension ignores cancel */
    bool has_end : 1;       /* the end hook of caller__call_soon_ex is to be
                               called with arg once it is over (set before
                               it is submitted) */
} caller__task_t;

_Static_assert(CALLER__PENDING_SIZE + sizeof(caller__task_t) <= CALLER__BLOCK_SIZE,
               "a Pending with its task fits a cached block");

static inline caller_pending_t *caller__task_pending(caller__task_t *t)
{
    return (caller_pending_t *)((char *)t - CALLER__PENDING_SIZE);
}

/* The task running on this thread, or NULL. */
caller__task_t *caller__task_current(void);
/* Post a message; internal kinds are accepted while stopping. Returns false
 * if the inbox is closed (the Caller finished). */
bool caller__post(caller_t *c, caller__msg_t *m);
/* Loop thread: the backend's on_work. */
void caller__dispatch(caller_t *c);
/* Loop thread: the loop is about to block; spin briefly for work first. */
void caller__before_sleep(caller_t *c);
/* One round of before_sleep that runs nothing: spin briefly, where this
 * Caller may, for a message; true if one came (the caller dispatches it).
 * For a loop whose "about to block" hook must not run tasks (GLib's
 * prepare: a task there could not iterate the context). */
bool caller__await_work(caller_t *c);
/* Loop thread, on MSG_STOP: cancel every task. */
void caller__sched_stop(caller_t *c);
/* Loop thread: all tasks ended? */
bool caller__sched_idle(const caller_t *c);
/* Loop thread, after the inbox is closed: fail what was left in it. */
void caller__sched_drain_closed(caller_t *c, caller__msg_t *left);
/* In task @p t (the current one), at a wait that may have nothing to wait
 * for (an iterator's next result is there), with the wait's @p deadline:
 * -ECANCELED if the task is cancelled; else 0, after giving the loop a turn
 * if the task has held it too long (sched.c says how long) and the
 * deadline is not past (a wait that only checks never suspends). */
int caller__task_checkpoint(caller__task_t *t, int64_t deadline);
/* Suspend the current task on @p p (see caller_pending_wait). */
int caller__task_wait(caller__task_t *t, caller_pending_t *p, int64_t deadline, bool want,
                      int *code, void **value);
/* call_soon for the library's own tasks: @p on_end(arg) runs once the task
 * is over (in the Caller's thread), even if it never started. There is one
 * end hook for all of them (the execution queues'): every call passes the
 * same @p on_end. */
caller_pending_t *caller__call_soon_ex(caller_t *c, caller_fn fn, void *arg, const char *name,
                                       caller_direct_fn on_end);
/* call_later for the library's housekeeping: in no context, untracked. */
caller_pending_t *caller__call_later_detached(caller_t *c, double delay, caller_fn fn, void *arg,
                                              const char *name);
/* Make a task for @p c (one allocation with its Pending), not yet tracked:
 * callers track it (caller__pending_track) once it was submitted. */
caller_pending_t *caller__task_new(caller_t *c, caller_fn fn, void *arg, const char *name);
/* A pool's call: a task with no Caller yet, cancelled through
 * @p canceller(arg) until a worker adopts it; not tracked yet. */
caller_pending_t *caller__task_new_pooled(caller_fn fn, void *arg, const char *name,
                                          caller_canceller_fn canceller, void *cancel_arg);
/* Any thread, from a pooled call's canceller once a worker adopted it:
 * tell that worker's loop, as a task's own canceller does. */
void caller__task_nudge(caller_pending_t *p);
/* A pooled call that will never run (cancelled or its pool stopped while
 * it waited): complete it cancelled and drop the queue's reference. */
void caller__task_discard(caller_pending_t *p);
/* Queue a task made by caller__task_new (delay_ns >= 0). Consumes the
 * task's reference on failure. */
int caller__task_submit(caller_t *c, caller_pending_t *p, int64_t deadline);

/* Read and clear what caller_raise recorded in the current task (true if
 * something was). For runners of several calls in one task (queues). */
bool caller__task_take_raised(int *code, char **msg);

/* For stack overflow messages (caller__fiber_overflow_messages): "task
 * <name> on Caller '<name>'" of the task running on this thread, copied
 * into @p buf; async-signal-safe. */
void caller__task_describe(char *buf, size_t len);

/* True (and -EINVAL recorded, naming @p api and @p what) if @p p points
 * into the run stack of the copy-stack task running now. */
bool caller__arg_on_task_stack(const void *p, const char *api, const char *what);

#endif /* CALLER_TASK_H */
