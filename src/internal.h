/*
 * What the files of src/ share. Everything here is prefixed caller__ and is
 * not part of the public API.
 */
#ifndef CALLER_INTERNAL_H
#define CALLER_INTERNAL_H

#include "caller.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>

/* The sanitizer this build runs under, 0 or 1 each: gcc defines
 * __SANITIZE_*__, clang answers __has_feature. */
#if defined(__SANITIZE_ADDRESS__)
#define CALLER__ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#define CALLER__TSAN 1
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CALLER__ASAN 1
#endif
#if __has_feature(thread_sanitizer)
#define CALLER__TSAN 1
#endif
#endif
#ifndef CALLER__ASAN
#define CALLER__ASAN 0
#endif
#ifndef CALLER__TSAN
#define CALLER__TSAN 0
#endif

/* ---- allocation ------------------------------------------------------- */

/*
 * Every allocation of the library goes through these, so a test build can
 * make the N-th one fail (allocation-failure tests) and so the library has
 * one place to change allocators.
 */
void *caller__malloc(size_t size);
void *caller__calloc(size_t n, size_t size);
void *caller__realloc(void *ptr, size_t size);
void caller__free(void *ptr);
#if CALLER_TESTING
/* Test build only: make the @p n-th allocation from now fail (0: the next
 * one; a negative @p n: none), and count allocations meanwhile. */
void caller__alloc_fail_after(long n);
long caller__alloc_count(void);
#endif
/* A copy of s (NULL if s is NULL or on allocation failure). */
char *caller__strdup(const char *s);
/* vasprintf through caller__malloc; NULL on failure. */
char *caller__vasprintf(const char *fmt, va_list ap);
/* A block of CALLER__BLOCK_SIZE bytes (a Pending with its task) from this
 * thread's cache, else from caller__malloc (NULL on failure); and its
 * return, from any thread (alloc.c explains the cache). */
void *caller__block_alloc(void);
void caller__block_free(void *p);
/* fork(): 0 = prepare, 1 = in the parent after, 2 = in the child. */
void caller__alloc_fork(int phase);

/* ---- errors ----------------------------------------------------------- */

/*
 * Record this thread's last error and return @p code, so failing paths read
 * `return caller__fail(-EINVAL, "caller_pending_wait: p is NULL");`.
 * A NULL @p fmt records the code's description.
 */
int caller__fail(int code, const char *fmt, ...) CALLER_PRINTF(2, 3);

/* Copy @p s into @p buf (size @p len), cutting it at @p max bytes (and at a
 * UTF-8 character boundary) with "…" when it is longer. Returns @p buf. */
char *caller__trunc(char *buf, size_t len, const char *s, size_t max);

/* ---- Pending internals ------------------------------------------------ */

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

/* Whether the Pending was created with allow_tracking (trackers, later). */
bool caller__pending_trackable(const caller_pending_t *p);

/* sizeof(struct caller_pending), for the size report. */
size_t caller__pending_size(void);

/* The Caller whose work completes @p p (caller__pending_set_owner), or NULL.
 * Set before the Pending is shared and never changed: no lock needed. */
caller_t *caller__pending_owner(const caller_pending_t *p);

#endif /* CALLER_INTERNAL_H */

/* ======================================================================= */
/* Callers, tasks and the scheduler (caller.c, sched.c)                     */
/* ======================================================================= */

#include "backend.h"
#include "heap.h"
#include "sync.h"

#include <stdint.h>
#include <sys/types.h>

struct caller__fiber;
typedef struct caller__pool caller_pool_t;
typedef struct caller__queue caller__queue_t;

/* A message in a Caller's inbox (cross-thread submission). Every kind is
 * embedded in the object it concerns, so posting never allocates except
 * for call_direct. */
typedef enum {
    CALLER__MSG_TASK = 1, /* a new task (caller__task_t.msg) */
    CALLER__MSG_RESUME,   /* a suspended task's wait was satisfied */
    CALLER__MSG_CANCEL,   /* a task's Pending was cancelled (holds a ref) */
    CALLER__MSG_DIRECT,   /* call_direct (allocated) */
    CALLER__MSG_STOP,     /* carry out caller_stop in the loop thread */
    CALLER__MSG_CHILD,    /* a child stopped (holds a ref on the child) */
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

/* An intrusive doubly-linked list node (live tasks). */
typedef struct caller__link {
    struct caller__link *prev, *next;
} caller__link_t;

typedef enum {
    CALLER__TASK_QUEUED = 0, /* submitted, not yet seen by the loop */
    CALLER__TASK_DELAYED,    /* call_later: in the timer heap */
    CALLER__TASK_READY,      /* in the ready FIFO */
    CALLER__TASK_RUNNING,
    CALLER__TASK_SUSPENDED,
    CALLER__TASK_DONE,
} caller__task_state_t;

typedef enum {
    CALLER__WAKE_NONE = 0,
    CALLER__WAKE_DONE,    /* what it waited for happened */
    CALLER__WAKE_TIMEOUT, /* its deadline passed */
    CALLER__WAKE_CANCEL,  /* its Pending was cancelled */
    CALLER__WAKE_NOMEM,   /* no memory to arm the deadline: did not suspend */
} caller__wake_t;

/* A cancel scope (caller_scope_enter): on its task's fiber stack of scopes. */
struct caller_scope {
    caller_scope_t *parent;
    struct caller__task *task;
    atomic_bool cancelled; /* cancel called, or the deadline passed */
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
 * Kept at 120 bytes: with the Pending's 128 that makes 248, a 256-byte
 * malloc chunk (it was 304 bytes, a 320-byte chunk). W1 keeps 10^6 of them
 * alive at once and pays a page fault per 4 KiB of them; W3 moves each one
 * between two cores. Hence what is not stored: the Pending (just before the
 * task: caller__task_pending) and the Caller (the Pending's owner:
 * caller__task_caller).
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
    caller__timer_t timer;       /* (L) call_later delay, then wait timeouts */
    caller__link_t live;         /* (L) in caller->live_tasks */
    atomic_bool cancel_posted;
    uint8_t state;           /* (L) caller__task_state_t */
    uint8_t wake;            /* (L) caller__wake_t of the last resume */
    bool uncancellable;      /* (L) the current suspension ignores cancel */
    int raised_code;         /* what caller_raise recorded (0: nothing) */
    caller_direct_fn on_end; /* library tasks: called with arg once the
                                task is over, whether it ran or not */
    struct caller__ctx *ctx; /* its context: captured when scheduled (a
                                reference), changed by entering groups */
    caller_scope_t *scope;   /* (L) innermost cancel scope, or NULL */
} caller__task_t;

/* Where the extra bytes of caller__pending_new_extra (a task) begin: the
 * Pending's struct, padded to this. */
#define CALLER__PENDING_SIZE 128

/* The size of the blocks caller__block_alloc gives: a Pending with a task. */
#define CALLER__BLOCK_SIZE (CALLER__PENDING_SIZE + sizeof(caller__task_t))

static inline caller_pending_t *caller__task_pending(caller__task_t *t)
{
    return (caller_pending_t *)((char *)t - CALLER__PENDING_SIZE);
}

struct caller {
    atomic_int refs;
    uint32_t magic;   /* CALLER_MAGIC while alive (caller.c) */
    atomic_int state; /* caller_state_t */
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
    void *zmq_context;
    void *iopub;               /* its PUB socket, in its own thread only (iopub.c) */
    caller_pending_t *stopped; /* the stopped event */

    /* children, under `lock` */
    pthread_mutex_t lock;
    caller_t **children;     /* references */
    atomic_size_t nchildren; /* changed under `lock`; read without it by repr */
    size_t children_cap;

    /* the inbox, under inbox_lock; `closed` once the loop has finished */
    caller__lock_t inbox_lock;
    bool inbox_closed;
    caller__fifo_t inbox;
    caller__backend_t *backend; /* set and cleared under inbox_lock */
    uint64_t wakes;             /* wake-ups issued (under inbox_lock), for tests */
    bool spinning;              /* the loop spins for work (under inbox_lock) */
    atomic_uint poked;          /* work arrived while it spun */

    /* loop-thread-only */
    caller__backend_t *loop_backend; /* from start until finished */
    caller__fifo_t ready;
    caller__heap_t timers;
    caller__link_t live_tasks;
    size_t nlive;
    bool in_dispatch;
    caller__spin_t spin;    /* adaptive spin before the loop blocks */
    bool stop_seen;         /* MSG_STOP processed */
    bool finishing;         /* backend close requested */
    caller_pending_t *body; /* caller_run: the body's task */
    caller__msg_t stop_msg;
    caller__msg_t child_msg; /* posted to the parent when this one stops */

    caller_pool_t *pool;          /* to_thread workers; made on first use, under `lock` */
    struct caller__queue *queues; /* execution queues, under `lock` */

    /* registry, under the registry lock */
    caller__link_t reg;
    bool registered;

    atomic_uint started; /* NEW_THREAD: 1 once running (futex word) */
    int start_error;
    char start_msg[200]; /* the thread's error message when it failed */
};

/* ---- sched.c ---- */
/* The task running on this thread, or NULL. */
caller__task_t *caller__task_current(void);
/* Post a message; internal kinds are accepted while stopping. Returns false
 * if the inbox is closed (the Caller finished). */
bool caller__post(caller_t *c, caller__msg_t *m);
/* Loop thread: the backend's on_work. */
void caller__dispatch(caller_t *c);
/* Loop thread: the loop is about to block; spin briefly for work first. */
void caller__before_sleep(caller_t *c);
/* Loop thread, on MSG_STOP: cancel every task. */
void caller__sched_stop(caller_t *c);
/* Loop thread: all tasks ended? */
static inline bool caller__sched_idle(const caller_t *c)
{
    return c->nlive == 0;
}
/* Loop thread, after the inbox is closed: fail what was left in it. */
void caller__sched_drain_closed(caller_t *c, caller__msg_t *left);
/* Suspend the current task on @p p (see caller_pending_wait). */
int caller__task_wait(caller__task_t *t, caller_pending_t *p, int64_t deadline, bool want,
                      int *code, void **value);
/* call_soon for the library's own tasks: @p on_end(arg) runs once the task
 * is over (in the Caller's thread), even if it never started. */
caller_pending_t *caller__call_soon_ex(caller_t *c, caller_fn fn, void *arg, const char *name,
                                       caller_direct_fn on_end);
/* call_later for the library's housekeeping: in no context, untracked. */
caller_pending_t *caller__call_later_detached(caller_t *c, double delay, caller_fn fn, void *arg,
                                              const char *name);
/* Make a task for @p c (one allocation with its Pending), not yet tracked:
 * callers track it (caller__pending_track) once it was submitted. */
caller_pending_t *caller__task_new(caller_t *c, caller_fn fn, void *arg, const char *name);
/* Queue a task made by caller__task_new (delay_ns >= 0). Consumes the
 * task's reference on failure. */
int caller__task_submit(caller_t *c, caller_pending_t *p, int64_t deadline);

/* ---- caller.c ---- */
/* Loop thread: the stop criteria may now hold; finish if so. */
void caller__check_finished(caller_t *c);
/* Loop thread: carry out a stop. */
void caller__on_stop(caller_t *c);
/* Loop thread: a child stopped. */
void caller__on_child_stopped(caller_t *c, caller_t *child);
/* Log through the Caller's callback (or stderr). */
void caller__log(caller_t *c, int level, const char *fmt, ...) CALLER_PRINTF(3, 4);
/* This thread's Caller (also while stopping), or NULL. */
caller_t *caller__thread_caller(void);
/* "Caller<...> is stopped!" as an error. */
int caller__fail_stopped(const caller_t *c, const char *fn);

/* Read and clear what caller_raise recorded in the current task (true if
 * something was). For runners of several calls in one task (queues). */
bool caller__task_take_raised(int *code, char **msg);

/* ---- group.c: contexts and trackers ---- */
typedef struct caller__ctx caller__ctx_t;
/* The calling thread's (or running task's) context; borrowed. */
caller__ctx_t *caller__ctx_current(void);
/* Make @p ctx current (borrowed); returns the previous one. */
caller__ctx_t *caller__ctx_swap(caller__ctx_t *ctx);
caller__ctx_t *caller__ctx_ref(caller__ctx_t *ctx);
void caller__ctx_unref(caller__ctx_t *ctx);
/* A new Pending joins the trackers active in the current context. */
void caller__ctx_track(caller_pending_t *p);

/* ---- queue.c ---- */
caller_pending_t *caller__queue_call(caller_t *c, caller_fn key_fn, const void *key, caller_fn fn,
                                     void *arg, const char *name);

/* ---- iopub.c ---- */
/* In the Caller's thread: open and register its PUB socket if it has a
 * ZeroMQ context (0 or an error); close and unregister it. */
int caller__iopub_open(caller_t *c);
void caller__iopub_close(caller_t *c);

/* fork(): 0 = prepare (take the module's process-wide locks), 1 = in the
 * parent after (release them), 2 = in the child (reset the state). */
void caller__pending_fork(int phase);
void caller__iopub_fork(int phase);
void caller__fiber_fork(int phase); /* fiber.c: the stack pool's lock */

/* ---- pool.c ---- */
void caller__pool_free(caller_pool_t *pool);
/* Loop thread of the owner, on stop. */
void caller__pool_stop(caller_t *c);
/* @p w is stopping: if it idles in @p parent's pool, it leaves it. */
void caller__pool_forget(caller_t *parent, caller_t *w);

/* ---- pending.c, for tasks ---- */
/* Let the trackers of the current context see @p p (unless untracked).
 * Called once @p p is fully set up: from then on other threads can reach
 * it. caller_pending_new() does this; users of the _extra form call it. */
void caller__pending_track(caller_pending_t *p);
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
