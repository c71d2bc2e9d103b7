/*
 * The Caller object (caller.c owns it; the scheduler, sched.c, runs its
 * loop), its state machine (state.c) and what lies below the lifecycle:
 * this thread's Caller, logging.
 */
#ifndef CALLER_CORE_H
#define CALLER_CORE_H

#include "caller.h"

#include "backend.h"
#include "heap.h"
#include "inbox.h"
#include "list.h"
#include "lockorder.h"
#include "sync.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

typedef struct caller__pool caller_pool_t;

/* A Caller's execution queues (queue.c's: only queue.c touches them). */
typedef struct caller__queues {
    pthread_mutex_t lock; /* rank 3 in lockorder.h */
    struct caller__queue *head;
    void *index; /* its queues by key (queue.c: a caller__keyindex_t) */
} caller__queues_t;

/*
 * What the scheduler (below) calls back into the lifecycle (caller.c,
 * above it), in the Caller's loop thread.
 */
typedef struct caller__lifecycle {
    void (*on_stop)(caller_t *c);                           /* MSG_STOP processed */
    void (*on_child_stopped)(caller_t *c, caller_t *child); /* MSG_CHILD (its reference) */
    void (*check_finished)(caller_t *c);                    /* the stop criteria may now hold */
    void (*unref)(caller_t *c);                             /* a reference a drained message held */
} caller__lifecycle_t;

/*
 * What the Caller's own (to_thread) pool (pool.c, above caller.c) lets the
 * lifecycle call, installed when the pool is made.
 */
typedef struct caller__pool_hooks {
    void (*stop)(caller_t *c);                    /* owner's loop thread, on stop */
    void (*forget)(caller_t *owner, caller_t *w); /* @p w stops: it leaves the pool */
    void (*free)(caller_pool_t *pool);            /* the owner is freed */
    /* Any thread: the pool's workers (busy or idle), idle ones, queued calls. */
    void (*stats)(caller_pool_t *pool, size_t *workers, size_t *idle, size_t *queued);
} caller__pool_hooks_t;

/*
 * What a worker of a pool (pool.c) lets its own loop (the scheduler) call,
 * installed on the worker when the pool makes it. All in the worker's
 * loop thread.
 */
typedef struct caller__worker_hooks {
    /* No pooled call of its own is unfinished, or the one it runs is
     * about to complete: the next queued call of its pool (a reference,
     * adopted by @p w, to run), or NULL — then the worker is idle in its
     * pool (or has left it). */
    caller_pending_t *(*take)(caller_t *w);
    /* About to sleep with nothing to do: may it spin first? If true,
     * spun() follows the spin. */
    bool (*may_spin)(caller_t *w);
    void (*spun)(caller_t *w);
} caller__worker_hooks_t;

/* Workers of all pools running a call right now (a hint, read without a
 * lock): the scheduler spins before sleeping only while they leave a CPU
 * idle. Counted in sched.c; pool.c adds 1 / -1 as a worker takes a call /
 * goes idle or leaves. */
size_t caller__pool_busy_workers(void);
/* The loop thread of @p c: it runs (a dispatch), or is about to block in
 * its poll or to end. Counted for the spin's "is there an idle core?". */
void caller__loop_awake(caller_t *c);
size_t caller__awake_loops(void); /* how many are counted now (the tests) */
void caller__loop_blocking(caller_t *c);
void caller__busy_workers_add(int delta);

struct caller {
    const caller__lifecycle_t *life; /* caller.c's, for the scheduler below it */
    _Atomic uint64_t refs;           /* all | the library's own << 32 (caller.c) */
    uint32_t magic;                  /* CALLER_MAGIC while alive (caller.c) */
    atomic_int state;                /* caller_state_t: only through caller__transition (state.c) */
    bool manual;                     /* CALLER_MANUAL: the one kind that may stop from INITIAL */
    char name[64];
    const caller__backend_ops_t *ops;
    bool protect;
    bool owns_thread; /* NEW_THREAD: its own thread and loop */
    bool owns_loop;   /* NEW_THREAD and MANUAL */
    pthread_t thread;
    pid_t tid;
    caller_t *parent; /* a reference */
    caller_log_fn log;
    void *log_arg;
    size_t stack_size;
    bool copy_stacks; /* CALLER_STACK_COPY */
    void *zmq_context;
    void *iopub;               /* its PUB socket, in its own thread only (iopub.c) */
    caller_pending_t *stopped; /* the stopped event */

    /* children, under `lock` */
    pthread_mutex_t lock;
    caller_t **children;     /* references */
    atomic_size_t nchildren; /* changed under `lock`; read without it by repr */
    size_t children_cap;

    caller__inbox_t inbox; /* other threads reach it only through this */

    /* loop-thread-only */
    caller__backend_t *loop_backend; /* from start until finished */
    caller__fifo_t ready;
    /* The dispatch's current round (sched.c): its last ready task while
     * the round still has tasks to run, else NULL; and the context the
     * loop runs in outside tasks. */
    caller__msg_t *round_last;
    /* When the current dispatch began (its timers' "now"), and a count of
     * the waits that may return without suspending (a done Pending, an
     * iterator's next, a queue's next item): every few of those, a task
     * that has held the loop longer than a turn's share gives it back
     * (sched.c, caller__task_checkpoint). */
    int64_t turn_start;
    unsigned settled_waits;
    struct caller__ctx *loop_ctx;
    caller__heap_t timers;
    caller__link_t live_tasks;
    size_t nlive;
    /* For caller_stats(): written by the loop thread only (a relaxed load
     * and store, no read-modify-write), read by any thread. */
    struct {
        _Atomic uint64_t started, finished;
        atomic_size_t live, suspended;
    } stats;
    bool in_dispatch;
    bool awake;             /* counted in the awake loops (sched.c) */
    caller__spin_t spin;    /* adaptive spin before the loop blocks */
    bool stop_seen;         /* MSG_STOP processed */
    bool finishing;         /* backend close requested */
    caller_pending_t *body; /* caller_run: the body's task */
    void *io;               /* its descriptor watches (io.c's), NULL while none */
    caller__msg_t stop_msg;
    caller__msg_t child_msg; /* posted to the parent when this one stops */

    caller_pool_t *pool; /* to_thread workers; made on first use, under `lock` */
    _Atomic(const caller__pool_hooks_t *) pool_hooks; /* set once `pool` is (pool.c) */
    caller__queues_t queues;                          /* its execution queues (queue.c) */
    /* as a worker of its parent's pool (pool.c) */
    _Atomic(const caller__worker_hooks_t *) worker; /* NULL unless in a pool */
    caller__link_t pool_link;                       /* idle in the pool (under its lock); unlinked
                                                       (to itself) when not idle there */
    int64_t idle_since;                             /* under the pool's lock */
    bool pool_woken;                                /* told to look at the queue (pool's lock) */
    bool pool_busy;                                 /* running a call (pool's lock) */
    size_t pool_calls;                              /* (L) pooled calls taken and not ended */
    atomic_bool pool_posted;                        /* pool_msg is in the inbox */
    caller__msg_t pool_msg;                         /* MSG_POOL: look at the pool's queue */

    /* registry, under the registry lock */
    caller__link_t reg;
    bool registered;

    atomic_uint started; /* NEW_THREAD: 1 once running (futex word) */
    int start_error;
    char start_msg[200]; /* the thread's error message when it failed */
};

/* The Caller's `lock` (rank 2 in lockorder.h). */
static inline void caller__lock_caller(caller_t *c)
{
    caller__mutex_lock(&c->lock, CALLER__RANK_CALLER);
}

static inline void caller__unlock_caller(caller_t *c)
{
    caller__mutex_unlock(&c->lock, CALLER__RANK_CALLER);
}

/* ---- state.c ---- */
/* Move @p c from state @p from to @p to (a CAS); false if it was not in
 * @p from. An edge not in state.c's table aborts. */
bool caller__transition(caller_t *c, int from, int to);
int caller__state(const caller_t *c);
/* This thread's Caller (also while stopping), or NULL; borrowed. */
caller_t *caller__thread_caller(void);
/* caller.c: set it (caller.c holds the reference behind it). */
void caller__set_thread_caller(caller_t *c);
/* Log through the Caller's callback (or stderr). */
void caller__log(caller_t *c, int level, const char *fmt, ...) CALLER_PRINTF(3, 4);
/* "Caller<...> is stopped!" as an error. */
int caller__fail_stopped(const caller_t *c, const char *fn);

#endif /* CALLER_CORE_H */
