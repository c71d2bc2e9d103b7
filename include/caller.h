/**
 * @file
 * libcaller — call code in other threads and tasks.
 *
 * One event loop per thread (a Caller), tasks that can suspend, thread-safe
 * futures (Pending), a worker pool, timers, execution queues and structured
 * concurrency. This is the one public header. It is the C implementation
 * of the `Caller` system of the Python project async-kernel
 * (https://github.com/fleming79/async-kernel), called "the Python
 * original" below where a name or behaviour comes from it.
 *
 * Conventions that hold for every function below unless its comment says
 * otherwise:
 *
 *  - Functions that return `int` return 0 (or a documented non-negative
 *    value) on success and a negative error code on failure. The codes are
 *    `-errno` values where one fits (see "Errors"). After any failing call,
 *    caller_last_error() gives this thread's code and a detailed message.
 *  - Functions that return a pointer return NULL on failure; then
 *    caller_last_error() says why.
 *  - A NULL pointer where an object is required fails with -EINVAL; nothing
 *    is ever dereferenced before it is checked.
 *  - libuv's callback rule: when a function that takes a callback fails, the
 *    callback never runs; when it succeeds, the callback runs exactly once
 *    (done callbacks: once, unless removed first).
 *  - "Thread: any" means the function may be called from any thread at any
 *    time, concurrently with any other function on the same object.
 *  - fork(): the child starts with no Callers (the parent's do not run
 *    there and must not be touched) and may create its own; fork from a
 *    plain thread (see docs/guide.md, "fork()").
 *  - Signals: no function may be called from a signal handler; a signal
 *    does not end a blocking wait or sleep early.
 *  - Flags: a parameter named `flags` takes named constants or-ed together
 *    (0 for none); a bit the function does not know is -EINVAL.
 *  - Option structs (caller_options_t, caller_pool_config_t,
 *    caller_as_completed_options_t) can grow without breaking programs:
 *    each has a fixed size and ends in `reserved` space from which later
 *    versions take their new fields, and the zero value of every field,
 *    present or future, means its default. So zero-initialize them (`= {0}`
 *    or a designated initializer) and set what you need. A program built
 *    against an older header keeps working with a newer library (its
 *    reserved bytes are zero: the new fields' defaults); a program that
 *    sets a field an older library does not know gets -EINVAL from it
 *    ("reserved ... is not zero") instead of the field being ignored.
 */
#ifndef CALLER_H
#define CALLER_H

/* The build's options (CALLER_WITH_ZMQ), generated and installed with
 * this header. */
#include "caller_config.h"

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/** @name Version
 *  The version of this header. While the major version is 0, a minor
 *  version may change the API; a patch version does not. */
/** @{ */
#define CALLER_VERSION_MAJOR 0 /**< major version of this header */
#define CALLER_VERSION_MINOR 1 /**< minor version of this header */
#define CALLER_VERSION_PATCH 0 /**< patch version of this header */
/** The header's version as one number, 0xMMmmpp: compare with
 *  caller_version() to find a library older than the header. */
#define CALLER_VERSION_HEX                                                                         \
    ((CALLER_VERSION_MAJOR << 16) | (CALLER_VERSION_MINOR << 8) | CALLER_VERSION_PATCH)
/** @} */

#if defined(__GNUC__)
/** Marks the functions the shared library exports (it hides the rest). */
#define CALLER_EXTERN __attribute__((visibility("default")))
/** Lets the compiler check a printf-style format: argument @p f is the
 *  format, the variable arguments start at @p a. */
#define CALLER_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define CALLER_EXTERN
#define CALLER_PRINTF(f, a)
#endif

/**
 * The version of the library that runs, as CALLER_VERSION_HEX: it may
 * differ from the header's when a program built against one version runs
 * with another shared library.
 *
 * Thread: any. @return 0xMMmmpp.
 */
CALLER_EXTERN unsigned caller_version(void);

/** The version of the library that runs, as text ("0.1.0"). Thread: any.
 *  @return a string with static lifetime. */
CALLER_EXTERN const char *caller_version_string(void);

/* ======================================================================== */
/** @name Errors */
/* ======================================================================== */
/** @{ */

/**
 * The library's error codes. Each is negative. Where an errno value fits,
 * the code equals -errno (so `-ECANCELED` and CALLER_ECANCELED are the same
 * number); codes with no errno live in a reserved block starting at -4000,
 * far from any errno value.
 *
 * The table, one `X(NAME, value, "description")` per code, from which the
 * enum caller_errno_t (`CALLER_<NAME>`), caller_strerror() and
 * caller_err_name() are made: CALLER_EINVAL, CALLER_ENOMEM,
 * CALLER_ECANCELED, CALLER_ETIMEDOUT, CALLER_EDEADLK, CALLER_ESHUTDOWN,
 * CALLER_EBUSY, CALLER_EAGAIN, CALLER_ENOENT, CALLER_EEXIST, CALLER_EPERM
 * (each `-errno`) and CALLER_EINVALSTATE (-4001: the object is not in a
 * state that allows the call, e.g. completing a done Pending).
 */
#define CALLER_ERRNO_MAP(X)                                                                        \
    X(EINVAL, -EINVAL, "invalid argument")                                                         \
    X(ENOMEM, -ENOMEM, "out of memory")                                                            \
    X(ECANCELED, -ECANCELED, "operation cancelled")                                                \
    X(ETIMEDOUT, -ETIMEDOUT, "timed out")                                                          \
    X(EDEADLK, -EDEADLK, "waiting would deadlock")                                                 \
    X(ESHUTDOWN, -ESHUTDOWN, "caller is stopped")                                                  \
    X(EBUSY, -EBUSY, "resource busy")                                                              \
    X(EAGAIN, -EAGAIN, "resource temporarily unavailable")                                         \
    X(ENOENT, -ENOENT, "no such entry")                                                            \
    X(EEXIST, -EEXIST, "already exists")                                                           \
    X(EPERM, -EPERM, "operation not permitted")                                                    \
    X(EINVALSTATE, -4001, "invalid state")

/** One row of CALLER_ERRNO_MAP as an item of caller_errno_t (defined only
 *  here, undefined right after). */
#define CALLER_ERRNO_ENUM_ITEM(name, value, text) CALLER_##name = (value),
/** The error codes (all negative). */
typedef enum {
    CALLER_ERRNO_MAP(CALLER_ERRNO_ENUM_ITEM)
#undef CALLER_ERRNO_ENUM_ITEM
} caller_errno_t;

/**
 * Describe an error code.
 *
 * Thread: any.
 * @param code  an error code: one of the library's, any `-errno` value,
 *              0, or anything else.
 * @return a static string, never NULL: the library's text for its own
 *         codes, the C library's description for other `-errno` values,
 *         and "unknown error" otherwise. 0 gives "success".
 */
CALLER_EXTERN const char *caller_strerror(int code);

/**
 * The symbolic name of an error code ("ECANCELED", "EINVALSTATE", ...).
 *
 * Thread: any.
 * @param code  an error code: one of the library's, any `-errno` value,
 *              0, or anything else.
 * @return a static string, never NULL ("UNKNOWN" for a code that is
 *         neither the library's nor an errno value; "OK" for 0).
 */
CALLER_EXTERN const char *caller_err_name(int code);

/**
 * This thread's last error: the code of the most recent failing call made
 * by this thread, and its detailed message.
 *
 * Thread: any; the state is per thread. Successful calls do not clear it.
 * @param message  if not NULL, receives a pointer to this thread's message
 *                 buffer (never NULL; "" when there was no error). The text
 *                 stays valid until this thread's next failing call.
 * @return the code (negative), or 0 if this thread has had no failure.
 */
CALLER_EXTERN int caller_last_error(const char **message);

/** @} */

/* ======================================================================== */
/** @name Memory */
/* ======================================================================== */
/** @{ */

/** An allocator's malloc: as malloc(3). */
typedef void *(*caller_malloc_fn)(size_t size);
/** An allocator's realloc: as realloc(3). */
typedef void *(*caller_realloc_fn)(void *ptr, size_t size);
/** An allocator's calloc: as calloc(3). */
typedef void *(*caller_calloc_fn)(size_t count, size_t size);
/** An allocator's free: as free(3); never called with NULL. */
typedef void (*caller_free_fn)(void *ptr);

/**
 * Make the library allocate its memory with these functions instead of the
 * C library's. Every heap allocation of libcaller's own goes through them
 * (its objects, messages, bookkeeping, a copy-stack task's saved stack).
 * Not through them: the large areas the library maps with mmap(2) (task
 * stacks, the region Pendings are carved from, areas of 2 MiB or more), and
 * what libuv, ZeroMQ or the C library allocate inside their own calls (see
 * uv_replace_allocator() for libuv's).
 *
 * Call it once, before any other libcaller function that may allocate
 * (in practice: first thing in main()); from the library's first
 * allocation on, the allocator is fixed and this returns -EBUSY, so that
 * every block is freed by the allocator that made it. The functions must
 * be thread-safe and behave as their C library namesakes.
 *
 * Thread: any.
 * @param malloc_fn   the malloc (not NULL: -EINVAL).
 * @param realloc_fn  the realloc (not NULL: -EINVAL).
 * @param calloc_fn   the calloc (not NULL: -EINVAL).
 * @param free_fn     the free (not NULL: -EINVAL).
 * @return 0; -EINVAL if a function is NULL; -EBUSY if the library has
 *         allocated already (the allocator is unchanged).
 */
CALLER_EXTERN int caller_replace_allocator(caller_malloc_fn malloc_fn, caller_realloc_fn realloc_fn,
                                           caller_calloc_fn calloc_fn, caller_free_fn free_fn);

/** @} */

/* ======================================================================== */
/** @name Pending: a thread-safe future */
/* ======================================================================== */
/** @{ */

/**
 * A Pending is a thread-safe future: a result (a `void *`), an error (a
 * negative code and a message) or a cancellation.
 *
 * It is *done* once a result or an error is set. Cancellation is a separate
 * flag: cancelling does not make a Pending done (whoever runs the work — the
 * canceller, or the task — does that), and a cancelled Pending reports the
 * cancellation from caller_pending_result() and caller_pending_exception()
 * even if a result was set afterwards.
 *
 * Memory: reference-counted. caller_pending_new() returns a reference the
 * caller owns; release it with caller_pending_unref(). Every other function
 * that returns a Pending says whether it gives a reference. Releasing more
 * references than were taken is a broken invariant: the library aborts with
 * a message.
 */
typedef struct caller_pending caller_pending_t;

/** Flags for caller_pending_new(). */
enum {
    /** The Python original's `allow_tracking=False`: the new Pending does not join the
     *  trackers (groups, managers) active in the current context. */
    CALLER_PENDING_UNTRACKED = 1u << 0,
};

/** A timeout meaning "wait forever". Any negative timeout means the same. */
#define CALLER_FOREVER (-1.0)

/** A done callback: runs once, when @p p becomes done. Inside it @p p is
 *  done: caller_pending_wait(p, ...) there returns the outcome at once. */
typedef void (*caller_done_fn)(caller_pending_t *p, void *arg);

/**
 * A canceller: carries out a cancellation. Called with the messages
 * accumulated so far (never NULL; "" when none was given).
 */
typedef void (*caller_canceller_fn)(caller_pending_t *p, const char *messages, void *arg);

/**
 * Create a Pending that is not done.
 *
 * Thread: any.
 * @param flags  0 or CALLER_PENDING_UNTRACKED; any other bit is -EINVAL.
 * @return a new Pending with one reference owned by the caller, or NULL
 *         (-ENOMEM, -EINVAL; see caller_last_error()).
 */
CALLER_EXTERN caller_pending_t *caller_pending_new(unsigned flags);

/**
 * Take a reference. Thread: any.
 * @param p  the Pending (alive: the caller holds a reference); may be NULL.
 * @return @p p (NULL if @p p is NULL).
 */
CALLER_EXTERN caller_pending_t *caller_pending_ref(caller_pending_t *p);

/**
 * Release a reference. When the last one goes, the user data finalizer runs
 * (in this thread) and the Pending is freed. A Pending that is freed while
 * not done simply goes away: its waiters hold references, so none can be
 * stranded.
 *
 * Thread: any. NULL is ignored. Releasing a freed Pending is detected (as
 * far as memory still allows) and aborts with a message.
 * @param p  the Pending whose reference is released; may be NULL.
 */
CALLER_EXTERN void caller_pending_unref(caller_pending_t *p);

/**
 * Attach user data, with a finalizer run when the Pending is freed (or when
 * the data is replaced by another call of this function).
 *
 * Thread: any. @p finalizer may be NULL.
 * @param p          the Pending (not NULL: -EINVAL).
 * @param data       the user data; may be NULL.
 * @param finalizer  called with @p data when the Pending is freed or the
 *                   data is replaced (the previous data's finalizer runs
 *                   in this thread, at once); may be NULL (none).
 * @return 0; -EINVAL if @p p is NULL; -ENOMEM if there is no memory to keep
 *         the data (the first data or done callback beyond the first, a
 *         cancellation message or an error message a Pending gets takes
 *         one small allocation, shared by all of them): nothing changed
 *         then, and @p data is still the caller's.
 */
CALLER_EXTERN int caller_pending_set_userdata(caller_pending_t *p, void *data,
                                              void (*finalizer)(void *data));

/** The user data. Thread: any.
 *  @param p  the Pending; may be NULL.
 *  @return the data set with caller_pending_set_userdata(), or NULL if
 *          none or if @p p is NULL. */
CALLER_EXTERN void *caller_pending_userdata(const caller_pending_t *p);

/** Flags of caller_pending_set_result(). */
typedef enum caller_result_flags {
    /** The Pending becomes not done again once its done callbacks ran. */
    CALLER_RESULT_RESET = 1u << 0,
} caller_result_flags_t;

/**
 * Set the result, making the Pending done.
 *
 * Exactly one of any number of racing set_result / set_exception calls
 * succeeds. The done callbacks then run in this thread, in the order they
 * were added, and then the waiters are woken (each receives @p value).
 *
 * With CALLER_RESULT_RESET the Pending becomes not done again right after its done
 * callbacks ran, and a later set_result starts a new round (execution
 * queues use this). A waiter belongs to the round during which it began
 * to wait: this completion wakes the waiters that began before it and those
 * that begin while its done callbacks run (the Pending is done then), all
 * with @p value, even if the Pending was reset since; a wait that begins
 * after the callbacks ran is the next round's.
 *
 * The completer need not hold a reference of its own: @p p must be alive
 * when the call begins, and the call keeps it alive while it runs the done
 * callbacks, even if the others who hold references release them as soon
 * as they see it done. The same holds for caller_pending_set_exception()
 * and caller_pending_cancel().
 *
 * Thread: any.
 * @param p      the Pending (not NULL: -EINVAL).
 * @param value  the result, passed to the waiters as it is; may be NULL.
 *               From a copy-stack task (CALLER_STACK_COPY), a pointer
 *               into the run stack is refused with -EINVAL.
 * @param flags  0, or CALLER_RESULT_RESET: the Pending becomes not done
 *               again once its done callbacks ran (see above).
 * @return 0; CALLER_EINVALSTATE if already done; -EINVAL if @p p is NULL
 *         (or @p value points into a copy-stack task's stack, or @p flags
 *         has another bit).
 */
CALLER_EXTERN int caller_pending_set_result(caller_pending_t *p, void *value, unsigned flags);

/**
 * Set an error (the Python original's exception), making the Pending done.
 *
 * Thread: any.
 * @param p     the Pending (not NULL: -EINVAL).
 * @param code  a negative error code (e.g. -EIO, or any negative value of
 *              the application's choosing); 0 or positive is -EINVAL.
 * @param fmt   printf-style message; may be NULL (no message).
 * @return 0; CALLER_EINVALSTATE if already done; -EINVAL; -ENOMEM (the
 *         Pending is then still made done, with the code and no message).
 */
CALLER_EXTERN int caller_pending_set_exception(caller_pending_t *p, int code, const char *fmt, ...)
    CALLER_PRINTF(3, 4);

/**
 * Cancel. Messages accumulate: two cancels with "message 1" and "message 2"
 * leave "message 1\nmessage 2". If a canceller is set it runs (in this
 * thread, after the message is recorded). Cancelling a done Pending changes
 * nothing.
 *
 * Thread: any.
 * @param p        the Pending (not NULL: -EINVAL).
 * @param message  added to the cancellation messages; may be NULL (no
 *                 message added).
 * @return 1 if the Pending is cancelled after the call, 0 if it is not (it
 *         was done before it was ever cancelled); -EINVAL if @p p is NULL;
 *         -ENOMEM if the message could not be stored (it is then cancelled
 *         anyway and 1 is not returned).
 */
CALLER_EXTERN int caller_pending_cancel(caller_pending_t *p, const char *message);

/**
 * Set the function that carries out a cancellation. If the Pending is
 * already cancelled, @p fn runs at once, in this thread, with the messages
 * so far.
 *
 * Thread: any.
 * @param p    the Pending (not NULL: -EINVAL).
 * @param fn   the canceller (not NULL: -EINVAL).
 * @param arg  passed to @p fn; may be NULL.
 * @return 0; CALLER_EINVALSTATE if the Pending is done or a canceller is
 *         already set (then @p fn never runs); -EINVAL if @p p or @p fn is
 *         NULL.
 */
CALLER_EXTERN int caller_pending_set_canceller(caller_pending_t *p, caller_canceller_fn fn,
                                               void *arg);

/** Whether a result or error is set. Thread: any.
 *  @param p  the Pending (not NULL: -EINVAL).
 *  @return 1 if a result or error is set, 0 if not, -EINVAL if @p p is
 *          NULL. */
CALLER_EXTERN int caller_pending_done(const caller_pending_t *p);

/** Whether the Pending was cancelled (done or not). Thread: any.
 *  @param p  the Pending (not NULL: -EINVAL).
 *  @return 1 if cancelled, 0 if not, -EINVAL if @p p is NULL. */
CALLER_EXTERN int caller_pending_cancelled(const caller_pending_t *p);

/**
 * The outcome.
 *
 * Thread: any.
 * @param p      the Pending (not NULL: -EINVAL).
 * @param value  if not NULL, receives the result (NULL when there is none).
 * @return 0 with the result; -ECANCELED if cancelled (caller_last_error()
 *         gives the messages) — whether done or not; the error code if an
 *         error was set (caller_last_error() gives its message);
 *         CALLER_EINVALSTATE if not done; -EINVAL if @p p is NULL.
 */
CALLER_EXTERN int caller_pending_result(const caller_pending_t *p, void **value);

/**
 * The error, if any (the Python original's `exception()`).
 *
 * Thread: any.
 * @param p         the Pending (not NULL: -EINVAL).
 * @param buf, len  if @p buf is not NULL and @p len > 0, receive the message
 *                  (cut to fit, always NUL-terminated; "" for a result).
 * @return 0 if the Pending is done with a result; the error code if it
 *         failed; -ECANCELED if cancelled (@p buf gets the messages) —
 *         also while a cancelled Pending is not done yet (a running call
 *         that cannot be stopped, as in a worker), as caller_pending_result
 *         does; CALLER_EINVALSTATE if not done and not cancelled; -EINVAL
 *         if @p p is NULL.
 */
CALLER_EXTERN int caller_pending_exception(const caller_pending_t *p, char *buf, size_t len);

/**
 * Add a done callback. If the Pending is already done, @p fn runs at once
 * in this thread before this function returns; otherwise it runs in the
 * thread that completes the Pending. Callbacks run in the order added.
 * Waiters wake after the callbacks ran; a callback that waits on its own
 * Pending gets the outcome at once (see caller_pending_wait()).
 *
 * Thread: any.
 * @param p    the Pending (not NULL: -EINVAL).
 * @param fn   the callback (not NULL: -EINVAL).
 * @param arg  passed to @p fn; may be NULL.
 * @return 0; -EINVAL if @p p or @p fn is NULL; -ENOMEM (then @p fn never
 *         runs). The first callback never allocates; later ones may.
 */
CALLER_EXTERN int caller_pending_add_done_callback(caller_pending_t *p, caller_done_fn fn,
                                                   void *arg);

/**
 * Remove every registration of (@p fn, @p arg) that has not run yet.
 *
 * Thread: any.
 * @param p    the Pending (not NULL: -EINVAL).
 * @param fn   the callback to remove (not NULL: -EINVAL).
 * @param arg  the argument it was added with (compared as a pointer; may
 *             be NULL).
 * @return how many were removed (0 if none, including when the Pending is
 *         already done); -EINVAL if @p p or @p fn is NULL.
 */
CALLER_EXTERN int caller_pending_remove_done_callback(caller_pending_t *p, caller_done_fn fn,
                                                      void *arg);

/** Flags of caller_pending_wait(), or-ed (0 for none). */
typedef enum caller_wait_flags {
    /** A timeout leaves the Pending alone (without it, the timeout cancels
     *  the Pending). */
    CALLER_WAIT_PROTECT = 1u << 0,
    /** Return the Pending's outcome (as caller_pending_result()) and store
     *  its value, instead of 0 once done. */
    CALLER_WAIT_RESULT = 1u << 1,
} caller_wait_flags_t;

/**
 * Wait until the Pending is done.
 *
 * On a plain thread this blocks the thread (the Python original's `wait_sync`);
 * signals do not interrupt it. Inside a task it suspends only the task.
 * It ends after the Pending's done callbacks ran, except inside one of
 * those callbacks, in the thread (or task) running them: there the
 * Pending is done and the wait returns its outcome at once, whatever the
 * timeout, and never cancels it. A reset Pending (caller_pending_set_result)
 * is waited for round by round: the wait ends with the first completion
 * that comes after it began, or the one whose callbacks run as it begins.
 * On an execution queue's Pending it ends once every item queued before
 * it began has run and the queue drained after them — at once if the
 * queue is drained and nothing was queued since (caller_queue_call()).
 *
 * In a task, a wait that finds the Pending done is still a suspension
 * point: -ECANCELED if the task was cancelled, and, once the Caller's
 * current dispatch has run for 2 ms, the task lets the loop turn (its
 * timers, I/O, other tasks, the other sources of an application's loop)
 * before the wait returns, so a task whose waits never need to wait
 * cannot keep its thread to itself. A timeout of 0 never suspends.
 *
 * Thread: any.
 * @param p            the Pending (not NULL: -EINVAL).
 * @param timeout      seconds; negative (CALLER_FOREVER) waits forever; 0
 *                     only checks (in a task too: it does not suspend, so
 *                     it is no suspension point then).
 * @param flags        caller_wait_flags_t, or-ed; 0 for none.
 *                     Without CALLER_WAIT_PROTECT a timeout cancels the
 *                     Pending with the message "Cancelled due to
 *                     cancellation or timeout"; with it, the Pending is
 *                     left alone. With CALLER_WAIT_RESULT the return value
 *                     is the outcome as from caller_pending_result();
 *                     without it, 0 once done, whatever the outcome.
 * @param value        if not NULL and the result is returned, receives it
 *                     (the value of the completion that woke this wait,
 *                     even if the Pending was reset since).
 * @return 0; -ETIMEDOUT if not done in time; with CALLER_WAIT_RESULT the
 *         Pending's own outcome (-ECANCELED, its error code); -EINVAL if
 *         @p p is NULL or @p flags has an unknown bit; in a task, -ECANCELED if the waiting task
 * was cancelled (or a cancel scope around the wait was) while it waited; -EDEADLK if a task waits
 * for its own Pending, or if a Caller's own thread, outside its tasks, would block on a Pending
 *         only that Caller can complete; -ENOMEM in a task without memory
 *         for the timeout (or, with CALLER_STACK_COPY, to save its stack).
 */
CALLER_EXTERN int caller_pending_wait(caller_pending_t *p, double timeout, unsigned flags,
                                      void **value);

/**
 * The text form, e.g. `<Pending 🏃 at 0x55d0c3a0| my_func >`, with `⛔` and
 * the cancellation message when cancelled, `🏁` once done, and the error
 * when it failed; long messages are cut with "…".
 *
 * Thread: any. Writes at most @p len bytes including the NUL (@p buf may be
 * NULL when @p len is 0).
 * @param p    the Pending (not NULL: -EINVAL).
 * @param buf  receives the text, cut to fit and NUL-terminated; NULL only
 *             with @p len 0 (else -EINVAL).
 * @param len  the size of @p buf in bytes.
 * @return the length of the whole text (as snprintf), or -EINVAL if @p p
 *         is NULL or @p buf is NULL with @p len > 0.
 */
CALLER_EXTERN int caller_pending_repr(const caller_pending_t *p, char *buf, size_t len);

/**
 * The number of Pendings alive in the process (created and not yet freed).
 * For leak checks in tests and at shutdown. Thread: any.
 * @return the number of live Pendings.
 */
CALLER_EXTERN size_t caller_pending_live_count(void);

/** @} */

/* ======================================================================== */
/** @name Callers: one event loop per thread */
/* ======================================================================== */
/** @{ */

/**
 * A Caller owns an event loop (libuv) running in one thread; code scheduled
 * onto it from any thread runs in that thread as a *task*: a fiber with its
 * own stack that can suspend (caller_pending_wait, caller_sleep,
 * caller_wait_stopped) without blocking the thread. There is at most one
 * Caller per thread.
 *
 * Memory: reference-counted. Every function that returns a `caller_t *`
 * gives the caller a reference to release with caller_unref(), except
 * caller_current(), which lends the calling thread's own. A Caller's thread
 * holds its own reference while it runs, so a Caller never disappears under
 * a running task; stopping it does not free it.
 */
typedef struct caller caller_t;

/** How caller_create() finds or makes a Caller. */
typedef enum {
    /** This thread's Caller; else attach a new one to `options->loop` or
     *  `options->glib_context`. */
    CALLER_CURRENT_THREAD = 0,
    /** The main thread's Caller (fails if there is none). */
    CALLER_MAIN_THREAD,
    /** A new thread with its own loop; returns once it is running. */
    CALLER_NEW_THREAD,
    /** A Caller for this thread, not started: run it with caller_run(). */
    CALLER_MANUAL,
} caller_mode_t;

/** Life cycle (caller_state()). States only move forward. */
typedef enum {
    CALLER_STATE_INITIAL = 0, /**< created, not started (manual) */
    CALLER_STATE_STARTING,
    CALLER_STATE_RUNNING,
    CALLER_STATE_STOPPING, /**< stop requested; tasks and children finishing */
    CALLER_STATE_STOPPED,  /**< finished: the stopped event has fired */
} caller_state_t;

/** Log levels passed to a caller_log_fn. */
typedef enum {
    CALLER_LOG_DEBUG = 10,
    CALLER_LOG_INFO = 20,
    CALLER_LOG_WARNING = 30,
    CALLER_LOG_ERROR = 40,
} caller_log_level_t;

/** A logging callback: called in the Caller's thread. */
typedef void (*caller_log_fn)(void *arg, int level, const char *message);

/** A task function: runs in the Caller's thread; its return value is the
 *  result of the task's Pending. To fail instead, call caller_raise()
 *  before returning. If the task's Pending was cancelled before the
 *  function returned, what it returns is dropped (the Pending's outcome is
 *  -ECANCELED and nobody receives the value): a task that returns memory
 *  or a reference should check caller_pending_cancelled(
 *  caller_current_pending()) and release it itself when cancelled. */
typedef void *(*caller_fn)(void *arg);

/** A function for caller_call_direct(): runs in the loop, not as a task. */
typedef void (*caller_direct_fn)(void *arg);

struct uv_loop_s;
struct _GMainContext;

/**
 * Where a Caller's tasks keep their stacks (caller_options_t.stack_mode).
 */
typedef enum {
    /** Each task has a stack of its own (stack_size bytes of address
     *  space, a guard page below it; the pages it touches stay resident
     *  while it lives). Safe for any C code. The default. */
    CALLER_STACK_OWN = 0,
    /**
     * Copy-stack mode: every task of the Caller runs on the Caller's one
     * run stack (stack_size bytes, a guard page below it). When a task
     * suspends and another task runs, the used part of the first one's
     * stack (typically a few hundred bytes to a few KiB) is copied to the
     * heap, and copied back to the same addresses before it resumes. A
     * suspended task then costs its used stack instead of at least a page,
     * and no stack memory is touched for the first time per task.
     *
     * The rule it imposes: **while a task is suspended, nothing may use a
     * pointer into its stack.** Do not hand the address of a local
     * variable to another task, a worker, a callback or another thread
     * and then suspend while they may use it (caller_pending_wait,
     * caller_sleep, caller_wait, ... are suspension points). Hand over heap
     * memory instead. Within one task, between its own suspension points,
     * local pointers work as usual. The library checks what it can: the
     * `arg` of caller_call_soon(), caller_call_later(), caller_to_thread()
     * and caller_queue_call(), and the value of caller_pending_set_result(),
     * when it points into the run stack from a copy-stack task, are refused
     * with -EINVAL and a message naming the rule. Pointers stored inside
     * such arguments cannot be checked.
     *
     * Costs: one copy out and one copy in of the used stack when the task
     * that runs next is another one (none when a task suspends and is the
     * next to resume). Stack overflow past stack_size faults on the guard
     * page as in the default mode. A task suspended with a deep stack keeps
     * a buffer of that depth until it ends.
     */
    CALLER_STACK_COPY = 1,
} caller_stack_mode_t;

/**
 * Options for caller_create() and caller_get(). Zero-initialise and set what
 * you need (`caller_options_t o = {.name = "ControlThread"};`); NULL means
 * all defaults.
 */
typedef struct caller_options {
    /** Name of the Caller (and of its thread, cut to 15 bytes for the OS).
     *  Default for new threads: "caller-worker"; for an attached or manual
     *  Caller: the thread's current name. Copied. */
    const char *name;
    /** Event-loop library: "libuv" or "glib" (GLib's GMainContext; only
     *  in a build with GLib: caller_backends() lists what this build has).
     *  NULL: the backend of the loop given in `loop` or `glib_context`;
     *  with neither, the environment variable CALLER_BACKEND if set, else
     *  "libuv". caller_get() children default to their parent's backend.
     *  An unknown name, or a name that does not match the loop given:
     *  -EINVAL. Not copied (read during the call only). */
    const char *backend;
    /** A protected Caller ignores caller_stop() unless forced. */
    bool protect;
    /** A ZeroMQ context (void * so this header does not need zmq.h): the
     *  Caller opens an iopub PUB socket with it in its thread (see "ZeroMQ
     *  iopub"). Children and workers inherit the parent's unless `no_zmq`. */
    void *zmq_context;
    /** caller_get(): do not inherit the parent's zmq context. */
    bool no_zmq;
    /** Logging callback; NULL logs to stderr. */
    caller_log_fn log;
    /** The first argument passed to `log`. */
    void *log_arg;
    /** Stack size for tasks in bytes; 0 = 256 KiB. Rounded up to pages.
     *  With CALLER_STACK_COPY: the size of the one run stack. A task that
     *  overflows it faults in the guard page below it; unless the
     *  application installed a SIGSEGV handler of its own before its first
     *  Caller (or a sanitizer runs), the process then dies of SIGSEGV after
     *  writing "libcaller: stack overflow in task <name> on Caller
     *  '<name>'" to stderr. */
    size_t stack_size;
    /** CALLER_CURRENT_THREAD only: the libuv loop of this thread to attach
     *  to. The application keeps running it; the Caller's handles join it
     *  (and keep it alive until the Caller stops). Implies backend "libuv".
     *  Not with `glib_context` (-EINVAL). */
    struct uv_loop_s *loop;
    /** How tasks get their stacks: CALLER_STACK_OWN (0, the default) or
     *  CALLER_STACK_COPY; see caller_stack_mode_t. Not inherited by
     *  children (caller_get) or pool workers: the mode is a rule for the
     *  code that runs on this Caller. Another value: -EINVAL. */
    unsigned stack_mode;
    /** CALLER_CURRENT_THREAD only: the GMainContext (`GMainContext *`) this
     *  thread runs, e.g. with g_main_loop_run() or gtk_main(), to attach
     *  to. The application keeps running it; the Caller adds one GSource
     *  to it, which stays until the Caller stopped. Implies backend
     *  "glib". Not with `loop` (-EINVAL). In a build without GLib: -EINVAL
     *  (no such backend). */
    struct _GMainContext *glib_context;
    /** Zero: room for the fields of later versions (see the conventions
     *  at the top of this header); not zero is -EINVAL. */
    uintptr_t reserved[5];
} caller_options_t;

/**
 * Create or find a Caller (the Python original's `Caller(modifier, **kwargs)`).
 *
 * - CALLER_CURRENT_THREAD: this thread's Caller if it has one (a given
 *   name or backend that differs is an error: -EINVAL "The thread and
 *   caller's name do not match!" / "The backend does not match!"); else a
 *   new Caller attached to `options->loop` or `options->glib_context`
 *   (running at once); with neither: -ENOENT "no event loop in this
 *   thread".
 * - CALLER_MAIN_THREAD: the main thread's Caller, or -ENOENT.
 * - CALLER_NEW_THREAD: a new thread with its own loop; returns once the
 *   Caller is running there.
 * - CALLER_MANUAL: a new, not started Caller for this thread; -EEXIST "An
 *   instance already exists for thread ..." if the thread has one.
 *
 * Thread: any.
 * @param mode     how to find or make the Caller (see above); another value
 *                 is -EINVAL.
 * @param options  the options (caller_options_t); may be NULL (all
 *                 defaults).
 * @return a reference the caller owns, or NULL (caller_last_error(): -EINVAL,
 *         -ENOENT, -EEXIST, -ENOMEM, -EAGAIN when no thread can be made).
 */
CALLER_EXTERN caller_t *caller_create(caller_mode_t mode, const caller_options_t *options);

/**
 * Run a manual Caller in this thread (the Python original's `async with Caller("manual")`):
 * starts the loop, runs `body(arg)` as the first task, and when `body`
 * returns stops the Caller (forced, so a protected one stops too), waits
 * until every task ended and every child stopped, and returns. Calls
 * scheduled before the run are kept and run after the body's first
 * suspension; those still waiting when the body returns (all of them, if
 * it returns without suspending) end cancelled without running.
 *
 * Thread: the thread that created the Caller with CALLER_MANUAL.
 * @param c       the manual Caller (not NULL: -EINVAL).
 * @param body    the first task; when it returns, the Caller stops (not
 *                NULL: -EINVAL).
 * @param arg     passed to @p body; may be NULL.
 * @param result  if not NULL, receives body's return value.
 * @return 0 if body returned normally; body's error code if it called
 *         caller_raise(); -EBUSY "Already starting/running"; -EPERM
 *         "Restarting is not allowed" (stopping or stopped), or wrong
 *         thread; -EINVAL (NULL @p c or @p body); -ENOMEM.
 */
CALLER_EXTERN int caller_run(caller_t *c, caller_fn body, void *arg, void **result);

/** Take a reference. Thread: any.
 *  @param c  the Caller (alive: the caller holds a reference); may be NULL.
 *  @return @p c (NULL if @p c is NULL). */
CALLER_EXTERN caller_t *caller_ref(caller_t *c);

/** Release a reference; the last one frees the Caller (which by then has
 *  stopped, or never started). Thread: any. NULL is ignored. Releasing the
 *  last reference of a Caller that is still running is a broken invariant
 *  that cannot happen: its thread holds one.
 *  @param c  the Caller whose reference is released; may be NULL. */
CALLER_EXTERN void caller_unref(caller_t *c);

/** Flags of caller_stop(). */
typedef enum caller_stop_flags {
    CALLER_STOP_FORCE = 1u << 0, /**< stop even a protected Caller */
} caller_stop_flags_t;

/**
 * Stop. A protected Caller ignores this without CALLER_STOP_FORCE. Else the
 * state becomes stopping, the Caller leaves the registry, and in its thread
 * every child is stopped (forced), every call not yet started ends
 * cancelled, and every running task is cancelled at its next suspension
 * point; once all tasks ended and all children stopped, the loop exits, the
 * state becomes stopped and the stopped event fires. Idempotent.
 *
 * Thread: any, including the Caller's own tasks.
 * @param c      the Caller (not NULL: -EINVAL).
 * @param flags  0, or CALLER_STOP_FORCE: stop even a protected Caller.
 * @return the state after the call (a caller_state_t, >= 0; a protected
 *         Caller's unchanged state without CALLER_STOP_FORCE); -EINVAL if
 *         @p c is NULL or @p flags has another bit.
 */
CALLER_EXTERN int caller_stop(caller_t *c, unsigned flags);

/**
 * Wait for the stopped event. In a task this suspends the task; elsewhere it
 * blocks the thread.
 *
 * From a plain thread (not a task), for a Caller with a thread of its own,
 * it returns only once that thread has exited (the system has removed it),
 * so thread counts are exact at once; a task does not hold up its loop for
 * that.
 *
 * Thread: any. Blocking on the Caller's own thread outside a task would
 * never end: -EDEADLK.
 * @param c        the Caller (not NULL: -EINVAL).
 * @param timeout  seconds; negative waits forever.
 * @return 0 once stopped; -ETIMEDOUT (also if the Caller stopped but its
 *         thread had not exited by then); -ECANCELED (the waiting task was
 *         cancelled); -EDEADLK; -EINVAL.
 */
CALLER_EXTERN int caller_wait_stopped(caller_t *c, double timeout);

/**
 * The named child of @p parent, or a new one (the Python original's `Caller.get`): a
 * new thread added to @p parent's children and stopped with it. An existing
 * name with a different backend fails (-EINVAL "Backend mismatch!"). With
 * no name, always a new child. Backend, zmq context, log and stack size
 * default to the parent's.
 *
 * Thread: any.
 * @param parent   the parent Caller (not NULL: -EINVAL).
 * @param options  the child's options; may be NULL (defaults, as above);
 *                 `options->name` NULL or "" means no name.
 * @return a reference, or NULL (-EINVAL, -ESHUTDOWN if @p parent is
 *         stopping or stopped, -ENOMEM, -EAGAIN).
 */
CALLER_EXTERN caller_t *caller_get(caller_t *parent, const caller_options_t *options);

/** @} */

/* ======================================================================== */
/** @name Scheduling: tasks from any thread */
/* ======================================================================== */
/** @{ */

/**
 * Run `fn(arg)` as a task in @p c's thread as soon as possible; calls run in
 * the order submitted. Scheduling onto a Caller that has not started yet
 * (manual) keeps the call until it starts.
 *
 * Thread: any.
 * @param c    the Caller to run it on (not NULL: -EINVAL).
 * @param fn   the task's function (not NULL: -EINVAL).
 * @param arg  passed to @p fn; may be NULL. From a copy-stack task, a
 *             pointer into the run stack is refused with -EINVAL (see
 *             CALLER_STACK_COPY).
 * @return the task's Pending — a reference the caller owns — or NULL:
 *         -ESHUTDOWN "Caller<...> is stopped!" if @p c is stopping or
 *         stopped; -EINVAL; -ENOMEM. Cancelling the Pending before the task
 *         starts means it never runs ("Cancelled before started."); after,
 *         the task's next suspension point returns -ECANCELED.
 */
CALLER_EXTERN caller_pending_t *caller_call_soon(caller_t *c, caller_fn fn, void *arg);

/**
 * As caller_call_soon(), but not before @p delay seconds after this call
 * (measured from submission). Negative delays count as 0.
 *
 * Thread: any.
 * @param c      the Caller to run it on (not NULL: -EINVAL).
 * @param delay  seconds; negative (or NaN) counts as 0.
 * @param fn     the task's function (not NULL: -EINVAL).
 * @param arg    passed to @p fn; may be NULL (the copy-stack rule of
 *               caller_call_soon() applies).
 * @return as caller_call_soon().
 */
CALLER_EXTERN caller_pending_t *caller_call_later(caller_t *c, double delay, caller_fn fn,
                                                  void *arg);

/**
 * caller_call_soon() with @p name as the Pending's label in its text form
 * (caller_pending_repr) instead of the function's name as written. The
 * caller_call_soon macro calls this with `#fn`; call it yourself to give
 * another label.
 *
 * Thread: any.
 * @param c     the Caller to run it on (not NULL: -EINVAL).
 * @param fn    the task's function (not NULL: -EINVAL).
 * @param arg   its argument (as for caller_call_soon()); may be NULL.
 * @param name  a string with static lifetime, or NULL (no label).
 * @return as caller_call_soon().
 */
CALLER_EXTERN caller_pending_t *caller_call_soon_named(caller_t *c, caller_fn fn, void *arg,
                                                       const char *name);

/** caller_call_later() with @p name as the Pending's label (static
 *  lifetime, or NULL). Thread: any.
 *  @param c      the Caller to run it on (not NULL: -EINVAL).
 *  @param delay  seconds; negative (or NaN) counts as 0.
 *  @param fn     the task's function (not NULL: -EINVAL).
 *  @param arg    its argument (as for caller_call_soon()); may be NULL.
 *  @param name   a string with static lifetime, or NULL (no label).
 *  @return as caller_call_later(). */
CALLER_EXTERN caller_pending_t *caller_call_later_named(caller_t *c, double delay, caller_fn fn,
                                                        void *arg, const char *name);

/** caller_call_soon() is a macro over the function of the same name that
 *  also records `fn`'s name for the Pending's text form (each argument is
 *  evaluated once). */
#define caller_call_soon(c, fn, arg) caller_call_soon_named((c), (fn), (arg), #fn)
/** caller_call_later() is a macro over the function of the same name that
 *  also records `fn`'s name for the Pending's text form (each argument is
 *  evaluated once). */
#define caller_call_later(c, delay, fn, arg) caller_call_later_named((c), (delay), (fn), (arg), #fn)

/**
 * Run `fn(arg)` directly in @p c's loop, not as a task and with no Pending:
 * for short calls only (it must not suspend: caller_pending_wait inside it
 * blocks the loop). A failure reported with caller_raise() is logged through
 * the Caller's log callback; the loop goes on.
 *
 * Thread: any.
 * @param c    the Caller whose loop runs it (not NULL: -EINVAL).
 * @param fn   the function (not NULL: -EINVAL).
 * @param arg  passed to @p fn; may be NULL.
 * Order: direct calls run in submission order among themselves, as soon as
 * the loop takes them from its inbox, before the tasks waiting to start
 * then: a direct call does not wait behind tasks submitted before it
 * (caller_call_soon(c, A), caller_call_direct(c, b) runs b, then A).
 *
 * @return 0 (then @p fn runs exactly once; only a manual Caller stopped
 *         before it ever ran drops it unrun); -ESHUTDOWN; -EINVAL;
 *         -ENOMEM.
 */
CALLER_EXTERN int caller_call_direct(caller_t *c, caller_direct_fn fn, void *arg);

/**
 * Report a failure from a task (the Python original's `raise`): when the task function
 * returns, its Pending ends with @p code and the message instead of a
 * result. In a caller_call_direct() function, the failure is logged. The
 * last call before returning wins.
 *
 * Thread: a task or a direct call.
 * @param code  negative.
 * @param fmt   printf-style message; may be NULL (no message).
 * @return 0; -EINVAL if @p code >= 0; -EPERM outside a task or direct call.
 */
CALLER_EXTERN int caller_raise(int code, const char *fmt, ...) CALLER_PRINTF(2, 3);

/**
 * Sleep: in a task, suspends it (the thread runs other tasks); elsewhere
 * blocks the thread (signals do not cut it short).
 *
 * Thread: any.
 * @param seconds  how long, in seconds (>= 0).
 * @return 0; -ECANCELED if the task was cancelled meanwhile;
 *         -EINVAL for a negative or NaN duration; -ENOMEM.
 */
CALLER_EXTERN int caller_sleep(double seconds);

/** @} */

/* ======================================================================== */
/**
 * @name Waiting for I/O
 *
 * A task waits for a file descriptor (or a ZeroMQ socket) to become ready
 * without blocking its thread: the Caller's loop watches the descriptor
 * and resumes the task when it is ready. On any other thread the same
 * calls block in poll(2). Readiness is a hint, as with poll(2): read or
 * write with the descriptor in non-blocking mode and go back to waiting on
 * EAGAIN. The wait never changes the descriptor's flags (it does not set
 * O_NONBLOCK: do that yourself if you need it).
 *
 * - Two waiters on one descriptor: allowed. Several tasks of one Caller
 *   may wait on the same descriptor at once (one for CALLER_READABLE and
 *   one for CALLER_WRITABLE on a socket, or several for CALLER_READABLE):
 *   the Caller keeps one watch per descriptor and wakes every waiter
 *   whose events are ready — every reader when data arrives, though
 *   perhaps only one finds it; the others get EAGAIN and wait again.
 *   Tasks of different Callers, plain threads, and an application's own
 *   libuv handles on caller_loop() may watch the same descriptor too.
 * - Closing a descriptor while a task or thread waits on it is an error in
 *   the program, but it neither crashes nor hangs the waiter: the wait
 *   notices within half a second that the descriptor is closed (or now
 *   refers to another file) and returns -EBADF. Only its number and file
 *   are checked: a new descriptor of the same kind with the same number
 *   (two eventfds look alike) is not noticed.
 * - A regular file is always ready (as with poll(2)): the wait returns the
 *   events asked for at once.
 * - Costs nothing until used: a Caller allocates a watch only while one of
 *   its tasks waits on that descriptor (and its loop opens one epoll set,
 *   with one libuv handle, at the first such wait).
 */
/* ======================================================================== */
/** @{ */

/** caller_wait_fd() / caller_wait_zmq(): wait until data can be read
 *  (POLLIN, ZMQ_POLLIN). */
#define CALLER_READABLE 1u
/** caller_wait_fd() / caller_wait_zmq(): wait until data can be written
 *  (POLLOUT, ZMQ_POLLOUT). */
#define CALLER_WRITABLE 2u

/**
 * Wait until @p fd is ready for one of @p events.
 *
 * In a task, suspends the task (its thread runs other tasks meanwhile);
 * the wait is a suspension point like any other: cancelling the task's
 * Pending, a cancelled cancel scope and a scope's deadline end it with
 * -ECANCELED. On any other thread — a plain thread, or a Caller's thread
 * outside its tasks (a direct call: it blocks the Caller's loop) — it
 * blocks in poll(2); signals do not cut it short.
 *
 * With @p timeout 0 it only checks, with poll(2), and never suspends (so
 * it is not a cancellation point): the ready events or -ETIMEDOUT.
 *
 * Thread: any.
 * @param fd       an open file descriptor (a socket, a pipe, an eventfd, a
 *                 terminal, ...: anything poll(2) takes).
 * @param events   CALLER_READABLE, CALLER_WRITABLE, or both.
 * @param timeout  seconds; negative (CALLER_FOREVER) waits forever; 0 only
 *                 checks.
 * @return the events that are ready (> 0: CALLER_READABLE and/or
 *         CALLER_WRITABLE, only ones asked for). An error or hang-up on
 *         the descriptor (POLLERR, POLLHUP) reports as every event asked
 *         for, so that the following read or write sees it.
 *         -ETIMEDOUT if not ready in time; -ECANCELED (a task, cancelled:
 *         see above); -EINVAL (@p fd < 0, @p events 0 or with unknown
 *         bits, @p timeout NaN); -EBADF (@p fd is not open, or was closed
 *         while waiting); -ENOMEM.
 */
CALLER_EXTERN int caller_wait_fd(int fd, unsigned events, double timeout);

/**
 * caller_wait_fd() for a ZeroMQ socket: wait until it can receive
 * (CALLER_READABLE = ZMQ_POLLIN) or send (CALLER_WRITABLE = ZMQ_POLLOUT)
 * a message.
 *
 * The socket's ZMQ_FD is edge-triggered: it signals that ZMQ_EVENTS may
 * have changed, not that a message is there, and stays quiet while
 * messages wait unread. So this reads ZMQ_EVENTS first and after every
 * wake-up, and never sleeps while ZMQ_EVENTS already shows an event asked
 * for. After it returns CALLER_READABLE, receive with ZMQ_DONTWAIT until
 * EAGAIN before waiting again (ZeroMQ's own advice): a wait with messages
 * still queued returns at once, so nothing is lost, but each wait then
 * returns only one more.
 *
 * ZeroMQ sockets are not thread-safe: call it in the thread that uses the
 * socket (a task of that thread's Caller, or a plain thread). Several
 * tasks may wait on one socket (caller_wait_fd's rule: they share the
 * watch on its ZMQ_FD). Closing the socket while a task waits on it is an
 * error in the program, as for any other use of a closed socket.
 *
 * Thread: the socket's. Built without ZeroMQ (-DCALLER_WITH_ZMQ=OFF) it
 * returns -ENOTSUP.
 * @param socket   a ZeroMQ socket (`void *`, so this header needs no
 *                 zmq.h); not NULL.
 * @param events   CALLER_READABLE, CALLER_WRITABLE, or both.
 * @param timeout  seconds; negative (CALLER_FOREVER) waits forever; 0 only
 *                 checks ZMQ_EVENTS.
 * @return the events that are ready (> 0); -ETIMEDOUT; -ECANCELED;
 *         -EINVAL (NULL @p socket, bad @p events or @p timeout);
 *         -ENOTSOCK (@p socket is not a ZeroMQ socket, or was closed, or
 *         its context was terminated); -ENOMEM; -ENOTSUP.
 */
CALLER_EXTERN int caller_wait_zmq(void *socket, unsigned events, double timeout);

/** @} */

/* ======================================================================== */
/** @name The worker pool */
/* ======================================================================== */
/** @{ */

/** Idle workers a Caller keeps for caller_to_thread() by default. */
#define CALLER_MAX_IDLE_POOL_INSTANCES 10
/** Seconds an idle worker stays before it is stopped, by default. */
#define CALLER_IDLE_WORKER_SHUTDOWN_DURATION 60.0

/** A Caller's worker pool settings (caller_pool_set_config()). */
typedef struct caller_pool_config {
    /** Idle workers kept; a worker that finishes a call when this many are
     *  idle is stopped. Default CALLER_MAX_IDLE_POOL_INSTANCES. */
    size_t max_idle;
    /** Seconds an idle worker may stay idle before it is stopped (by a
     *  timer on the pool owner's loop); 0 keeps them. Default
     *  CALLER_IDLE_WORKER_SHUTDOWN_DURATION. */
    double idle_shutdown;
    /** At most this many workers at once (busy or idle); calls beyond it
     *  wait in order for a worker, and can be cancelled while waiting.
     *  0 (the default) = unbounded. */
    size_t max_workers;
    /** Zero: room for the fields of later versions (see the conventions
     *  at the top of this header); not zero is -EINVAL. */
    uintptr_t reserved[5];
} caller_pool_config_t;

/**
 * Run `fn(arg)` as a task in a worker: a child Caller of @p c on its own
 * thread, named "caller-worker". Takes the most recently idled worker of
 * @p c's pool, or starts one. When the call ends, the worker goes back to
 * the pool — before the Pending's waiters wake — if fewer than `max_idle`
 * are idle, else it stops. Inside `fn`, caller_current() is the worker.
 *
 * Thread: any.
 * @param c    the Caller whose pool runs it (not NULL: -EINVAL).
 * @param fn   the function (not NULL: -EINVAL).
 * @param arg  passed to @p fn; may be NULL (the copy-stack rule of
 *             caller_call_soon() applies).
 * @return the call's Pending (a reference the caller owns), or NULL:
 *         -ESHUTDOWN if @p c is stopping or stopped; -EINVAL; -ENOMEM;
 *         -EAGAIN (no thread could be started). With `max_workers` reached
 *         the Pending is returned at once and the call waits for a worker;
 *         cancelling it meanwhile ends it ("Cancelled before started.").
 */
CALLER_EXTERN caller_pending_t *caller_to_thread(caller_t *c, caller_fn fn, void *arg);

/** caller_to_thread() with @p name as the Pending's label (static
 *  lifetime, or NULL). Thread: any.
 *  @param c     the Caller whose pool runs it (not NULL: -EINVAL).
 *  @param fn    the function (not NULL: -EINVAL).
 *  @param arg   its argument (as for caller_to_thread()); may be NULL.
 *  @param name  a string with static lifetime, or NULL (no label).
 *  @return as caller_to_thread(). */
CALLER_EXTERN caller_pending_t *caller_to_thread_named(caller_t *c, caller_fn fn, void *arg,
                                                       const char *name);
/** caller_to_thread() is a macro over the function of the same name that
 *  also records `fn`'s name for the Pending's text form (each argument is
 *  evaluated once). */
#define caller_to_thread(c, fn, arg) caller_to_thread_named((c), (fn), (arg), #fn)

/** @p c's pool settings into @p out. Thread: any.
 *  @param c    the Caller (not NULL: -EINVAL).
 *  @param out  receives the settings (not NULL: -EINVAL).
 *  @return 0; -EINVAL; -ENOMEM (the pool, made at first use, could not be
 *          allocated). */
CALLER_EXTERN int caller_pool_get_config(caller_t *c, caller_pool_config_t *out);

/** Change @p c's pool settings at run time: idle workers beyond a lower
 *  `max_idle` stop now; a shorter `idle_shutdown` applies to workers
 *  already idle. Thread: any.
 *  @param c    the Caller (not NULL: -EINVAL).
 *  @param cfg  the new settings, copied (not NULL: -EINVAL).
 *  @return 0; -EINVAL (NULL @p c or @p cfg, negative or NaN
 *          idle_shutdown); -ENOMEM. */
CALLER_EXTERN int caller_pool_set_config(caller_t *c, const caller_pool_config_t *cfg);

/** How many workers idle in @p c's pool now. Thread: any.
 *  @param c  the Caller; may be NULL (0).
 *  @return the number of idle workers (0 for NULL or before the pool's
 *          first use). */
CALLER_EXTERN size_t caller_pool_idle(caller_t *c);

/** @} */

/* ======================================================================== */
/** @name Execution queues */
/* ======================================================================== */
/** @{ */

/**
 * Append `fn(arg)` to the execution queue of (@p fn, @p c), creating it: one
 * task on @p c that runs the queue's items one at a time, in order (an item
 * that suspends holds the queue). Each time the queue runs dry, its Pending
 * is set to the last item's result with reset — so waiting on it waits for
 * the queue to drain — and later items start a new round on the same
 * Pending. An item that fails (caller_raise) is logged ("Execution of ...
 * failed") and skipped. Items from one thread keep their order. Items
 * that keep coming do not keep @p c's loop to the queue: between two
 * items, once the loop's current dispatch has run for 2 ms, the queue's
 * task lets the loop turn.
 *
 * Waiting on the queue's Pending: a round ends when the queue's task finds
 * the queue empty. A wait ends with the first such drain that comes after
 * every item queued before the wait began (by any thread) has run, with
 * that drain's result; so caller_queue_call() then caller_pending_wait()
 * never returns before the item ran. If the queue is already drained, with
 * nothing queued since, the wait returns that last drain's result at once
 * (the Pending itself stays not done between rounds).
 *
 * Thread: any.
 * @param c    the Caller the queue's task runs on (not NULL: -EINVAL).
 * @param fn   the item's function, also the queue's key (not NULL:
 *             -EINVAL).
 * @param arg  passed to @p fn; may be NULL (the copy-stack rule of
 *             caller_call_soon() applies).
 * @return the queue's Pending (a reference the caller owns), or NULL:
 *         -ESHUTDOWN, -EINVAL, -ENOMEM. Cancelling that Pending closes the
 *         queue (as caller_queue_close does).
 */
CALLER_EXTERN caller_pending_t *caller_queue_call(caller_t *c, caller_fn fn, void *arg);

/** As caller_queue_call(), for the queue of an explicit @p key (not NULL),
 *  e.g. one queue per object of the application. Thread: any.
 *  @param c    the Caller the queue's task runs on (not NULL: -EINVAL).
 *  @param key  the queue's key, compared as a pointer (not NULL: -EINVAL).
 *  @param fn   the item's function (not NULL: -EINVAL).
 *  @param arg  passed to @p fn; may be NULL.
 *  @return as caller_queue_call(). */
CALLER_EXTERN caller_pending_t *caller_queue_call_key(caller_t *c, const void *key, caller_fn fn,
                                                      void *arg);

/** caller_queue_call() with @p name (static lifetime, or NULL) as the label
 *  of the queue's Pending. Thread: any.
 *  @param c     the Caller the queue's task runs on (not NULL: -EINVAL).
 *  @param fn    the item's function and the queue's key (not NULL:
 *               -EINVAL).
 *  @param arg   passed to @p fn; may be NULL.
 *  @param name  a string with static lifetime, or NULL (no label).
 *  @return as caller_queue_call(). */
CALLER_EXTERN caller_pending_t *caller_queue_call_named(caller_t *c, caller_fn fn, void *arg,
                                                        const char *name);

/** caller_queue_call_key() with @p name (static lifetime, or NULL) as the
 *  label of the queue's Pending. Thread: any.
 *  @param c     the Caller the queue's task runs on (not NULL: -EINVAL).
 *  @param key   the queue's key, compared as a pointer (not NULL: -EINVAL).
 *  @param fn    the item's function (not NULL: -EINVAL).
 *  @param arg   passed to @p fn; may be NULL.
 *  @param name  a string with static lifetime, or NULL (no label).
 *  @return as caller_queue_call_key(). */
CALLER_EXTERN caller_pending_t *caller_queue_call_key_named(caller_t *c, const void *key,
                                                            caller_fn fn, void *arg,
                                                            const char *name);

/** caller_queue_call() is a macro over the function of the same name that
 *  also records `fn`'s name for the queue's Pending (each argument is
 *  evaluated once). */
#define caller_queue_call(c, fn, arg) caller_queue_call_named((c), (fn), (arg), #fn)
/** caller_queue_call_key() is a macro over the function of the same name
 *  that also records `fn`'s name for the queue's Pending (each argument is
 *  evaluated once). */
#define caller_queue_call_key(c, key, fn, arg)                                                     \
    caller_queue_call_key_named((c), (key), (fn), (arg), #fn)

/** The Pending of the queue of (@p fn, @p c). Thread: any.
 *  @param c   the Caller (not NULL: -EINVAL).
 *  @param fn  the queue's function (not NULL: -EINVAL).
 *  @return a reference the caller owns, or NULL if there is none (never
 *          made, closed, or ending; caller_last_error() is not set then)
 *          or on -EINVAL. */
CALLER_EXTERN caller_pending_t *caller_queue_get(caller_t *c, caller_fn fn);

/** As caller_queue_get(), for an explicit @p key. Thread: any.
 *  @param c    the Caller (not NULL: -EINVAL).
 *  @param key  the queue's key (not NULL: -EINVAL).
 *  @return as caller_queue_get(). */
CALLER_EXTERN caller_pending_t *caller_queue_get_key(caller_t *c, const void *key);

/**
 * Close the queue of (@p fn, @p c): its Pending is cancelled, the item that
 * runs is cancelled at its next suspension point and the rest never run.
 * Afterwards caller_queue_get() finds none and caller_queue_call() starts a
 * fresh queue. Stopping @p c closes all its queues.
 *
 * Thread: any.
 * @param c   the Caller (not NULL: -EINVAL).
 * @param fn  the queue's function (not NULL: -EINVAL).
 * @return 1 if a queue was closed, 0 if there was none, -EINVAL.
 */
CALLER_EXTERN int caller_queue_close(caller_t *c, caller_fn fn);

/** As caller_queue_close(), for an explicit @p key. Thread: any.
 *  @param c    the Caller (not NULL: -EINVAL).
 *  @param key  the queue's key (not NULL: -EINVAL).
 *  @return as caller_queue_close(). */
CALLER_EXTERN int caller_queue_close_key(caller_t *c, const void *key);

/** @} */

/* ======================================================================== */
/** @name Collecting results */
/* ======================================================================== */
/** @{ */

/**
 * An iterator over Pendings in the order they complete (the Python original's
 * `as_completed`). Drive it in a plain loop:
 *
 *     caller_pending_t *p;
 *     while (caller_iter_next(it, &p) == 0) { ...; caller_pending_unref(p); }
 *     caller_iter_close(it);
 *
 * caller_iter_next() suspends a task and blocks a plain thread. An
 * iterator is used by one thread (or task) at a time; the Pendings it
 * watches may complete in any thread.
 */
typedef struct caller_iter caller_iter_t;

/** A generator: returns the next Pending (a reference, passed to the
 *  iterator) or NULL when exhausted. Called by caller_iter_next(), in the
 *  iterating thread or task. */
typedef caller_pending_t *(*caller_generator_fn)(void *arg);

/** Options for caller_as_completed() / caller_as_completed_gen(). */
typedef struct caller_as_completed_options {
    /** At most this many Pendings outstanding (not yet yielded); the
     *  generator is asked for more only below it. 0 = the default: for a
     *  generator the constant CALLER_MAX_IDLE_POOL_INSTANCES (10; not the
     *  pool's current `max_idle`, which caller_pool_set_config may have
     *  changed: pass that value here to follow it), for a fixed set no
     *  limit. Negative = no limit. */
    int max_concurrent;
    /** The Python original's `cancel_unfinished=False`: closing leaves unfinished
     *  Pendings alone instead of cancelling them ("Cancelled by
     *  as_completed"). */
    bool keep_unfinished;
    /** Zero: room for the fields of later versions (see the conventions
     *  at the top of this header); not zero is -EINVAL. */
    uintptr_t reserved[3];
} caller_as_completed_options_t;

/** What caller_iter_next() returns when every Pending was yielded. */
#define CALLER_ITER_END 1

/**
 * Iterate @p n Pendings (@p items may be NULL when @p n is 0) as they
 * complete. The iterator takes its own references. It starts watching
 * them at the first caller_iter_next() (with `max_concurrent`, a chunk at
 * a time): those already done then come first, in the order given; the
 * others in the order they complete.
 *
 * Thread: any.
 * @param items    the Pendings (none NULL: -EINVAL); NULL only with @p n 0.
 * @param n        how many.
 * @param options  the options; may be NULL (defaults).
 * @return an iterator to close with caller_iter_close(), or NULL: -EINVAL;
 *         -EDEADLK if one of @p items is the current task's own Pending;
 *         -ENOMEM.
 */
CALLER_EXTERN caller_iter_t *caller_as_completed(caller_pending_t *const *items, size_t n,
                                                 const caller_as_completed_options_t *options);

/**
 * Iterate the Pendings a generator produces, as they complete, with at most
 * `max_concurrent` outstanding (the Python original's example: an endless generator of
 * caller_to_thread() calls, bounded this way).
 *
 * Thread: any.
 * @param gen      the generator (not NULL: -EINVAL).
 * @param arg      passed to @p gen; may be NULL.
 * @param options  the options; may be NULL (defaults).
 * @return an iterator to close with caller_iter_close(), or NULL (-EINVAL,
 *         -ENOMEM).
 */
CALLER_EXTERN caller_iter_t *caller_as_completed_gen(caller_generator_fn gen, void *arg,
                                                     const caller_as_completed_options_t *options);

/**
 * The next completed Pending: yielded once each, after its done callbacks
 * ran. In a task it is a suspension point even when a result is there, as
 * caller_pending_wait() on a done Pending is: a cancelled task gets
 * -ECANCELED, and one that has held its loop for 2 ms of a dispatch lets
 * it turn first.
 *
 * Thread: the iterating thread or task.
 * @param it   the iterator (not NULL: -EINVAL).
 * @param out  receives a reference the caller owns (NULL when none); not
 *             NULL (-EINVAL).
 * @return 0; CALLER_ITER_END when all were yielded; -ECANCELED if the
 *         iterating task was cancelled (@p out gets NULL); -EDEADLK if the generator produced the
 *         current task's own Pending, or if a plain (non-task) wait on a
 *         Caller's own thread could only be ended by that thread (every
 *         outstanding item is a call of that Caller); -EINVAL; -ENOMEM.
 */
CALLER_EXTERN int caller_iter_next(caller_iter_t *it, caller_pending_t **out);

/** As caller_iter_next(), waiting at most @p timeout seconds (negative:
 *  forever): -ETIMEDOUT when none completed in time (nothing is
 *  cancelled). Thread: the iterating thread or task.
 *  @param it       the iterator (not NULL: -EINVAL).
 *  @param timeout  seconds; negative (CALLER_FOREVER) waits forever; 0
 *                  only checks (a task does not suspend, but a cancelled
 *                  one still gets -ECANCELED).
 *  @param out      receives a reference the caller owns, NULL when none
 *                  (not NULL: -EINVAL).
 *  @return as caller_iter_next(), or -ETIMEDOUT. */
CALLER_EXTERN int caller_iter_next_timeout(caller_iter_t *it, double timeout,
                                           caller_pending_t **out);

/**
 * Close the iterator: unfinished Pendings are cancelled ("Cancelled by
 * as_completed") unless `keep_unfinished`; its references are released.
 * Closing before the end is how a loop stops early. Thread: the iterating
 * one. NULL is ignored.
 * @param it  the iterator; may be NULL.
 */
CALLER_EXTERN void caller_iter_close(caller_iter_t *it);

/** When caller_wait() returns. */
typedef enum {
    CALLER_ALL_COMPLETED = 0, /**< when every item is done */
    CALLER_FIRST_COMPLETED,   /**< when any item is done */
    CALLER_FIRST_EXCEPTION,   /**< when any item fails or is cancelled;
                                   else when all are done */
} caller_return_when_t;

/**
 * Wait for @p items (the Python original's `wait`). On return @p done holds
 * every item that is done by then — those seen completing during the wait
 * in completion order, then the ones found done at the end in the items'
 * order (so with CALLER_FIRST_COMPLETED, all that were done, not only the
 * first) — and @p not_done the rest in the items' order; each array has
 * room for @p n pointers; no references are taken (they are @p items'
 * own). A timeout is not an error: the unfinished stay in @p not_done.
 * Nothing is cancelled.
 *
 * Thread: any (suspends a task, blocks a plain thread). In a task it is a
 * suspension point even when the items are done, as caller_iter_next() is.
 * @param items, n          the Pendings to wait for; @p items may be NULL
 *                          only when @p n is 0 (else -EINVAL).
 * @param timeout           seconds; negative waits forever.
 * @param return_when       when to return (see caller_return_when_t);
 *                          another value is -EINVAL.
 * @param done, not_done    receive the two sets (room for @p n each); may
 *                          be NULL only when @p n is 0 (else -EINVAL).
 * @param ndone, nnot_done  receive the counts (may be NULL).
 * @return 0; -ECANCELED if the waiting task was cancelled (the sets hold
 *         what was known then); -EDEADLK; -EINVAL; -ENOMEM.
 */
CALLER_EXTERN int caller_wait(caller_pending_t *const *items, size_t n, double timeout,
                              caller_return_when_t return_when, caller_pending_t **done,
                              size_t *ndone, caller_pending_t **not_done, size_t *nnot_done);

/** @} */

/* ======================================================================== */
/**
 * @name Structured concurrency
 *
 * Contexts. Code carries a context: each task runs with the context that
 * was current where it was scheduled (caller_call_soon, caller_call_later,
 * caller_to_thread, caller_queue_call); a plain thread has its own. A
 * tracker (a PendingGroup or a PendingManager) that is active in a context
 * tracks every Pending created in it — including Pendings created by tasks
 * scheduled from it, on any Caller and thread — unless created with
 * CALLER_PENDING_UNTRACKED. The innermost group and the innermost manager
 * of a context track.
 */
/* ======================================================================== */
/** @{ */

/**
 * Cancel scopes: the mechanism under cancellation, for code that needs it
 * directly (a cleanup step that must not be interrupted, a deadline on a
 * stretch of code). A scope covers the suspension points of the task
 * between caller_scope_enter() and caller_scope_exit(); scopes nest and
 * must be exited in reverse order.
 *
 * - cancelled (caller_scope_cancel(), from any thread) or past its
 *   deadline, its suspension points return -ECANCELED;
 * - CALLER_SCOPE_SHIELD: cancellation from outside (the task's Pending, an
 *   enclosing scope) does not reach inside;
 * - a deadline: "move on after" by default (exit returns 0), "fail after"
 *   with CALLER_SCOPE_FAIL (exit returns -ETIMEDOUT once it passed).
 */
typedef struct caller_scope caller_scope_t;

enum {
    CALLER_SCOPE_SHIELD = 1u << 0, /**< keep outside cancellation out */
    CALLER_SCOPE_FAIL = 1u << 1,   /**< exit reports a passed deadline */
};

/**
 * Enter a cancel scope in the running task.
 * Thread: a task.
 * @param timeout  seconds until the deadline; negative: none.
 * @param flags    0, or CALLER_SCOPE_SHIELD and/or CALLER_SCOPE_FAIL.
 * @return the scope, or NULL (-EPERM outside a task, -EINVAL, -ENOMEM).
 *         The task holds the scope's one reference while it is entered
 *         and lets it go at caller_scope_exit() (or when the task ends):
 *         take your own with caller_scope_ref() to keep using the scope
 *         after that, e.g. to cancel it from another thread.
 */
CALLER_EXTERN caller_scope_t *caller_scope_enter(double timeout, unsigned flags);

/** Leave the innermost scope of the running task; it is freed unless a
 *  reference from caller_scope_ref() is held. Thread: that task.
 *  @param s  the innermost scope (not NULL).
 *  @return 0; -ETIMEDOUT for a CALLER_SCOPE_FAIL scope whose deadline
 *  passed; -EINVAL if @p s is NULL or not the innermost scope. */
CALLER_EXTERN int caller_scope_exit(caller_scope_t *s);

/** Take a reference on @p s (NULL: nothing). Thread: any that holds a
 *  reference, or the scope's task while it is entered.
 *  @param s  the scope; may be NULL.
 *  @return @p s (NULL for NULL). */
CALLER_EXTERN caller_scope_t *caller_scope_ref(caller_scope_t *s);

/** Release a reference from caller_scope_ref() (NULL: nothing). The scope
 *  is freed with its last reference. Releasing more than was taken aborts
 *  with a message. Thread: any.
 *  @param s  the scope; may be NULL. */
CALLER_EXTERN void caller_scope_unref(caller_scope_t *s);

/** Cancel a scope: while it is entered, its task's suspension points
 *  inside it return -ECANCELED (the current one at once). After its exit
 *  (or its task's end) it does nothing more than mark the scope cancelled:
 *  a cancel racing the exit is safe. Thread: any that holds a reference
 *  (the task's own while entered, or one from caller_scope_ref()).
 *  @param s  the scope (not NULL). @return 0, or -EINVAL for NULL. */
CALLER_EXTERN int caller_scope_cancel(caller_scope_t *s);

/** Whether the scope was cancelled. Thread: any that holds a reference
 *  (the task's own while entered, or one from caller_scope_ref()).
 *  @param s  the scope (not NULL: -EINVAL).
 *  @return 1 if cancelled (or past its deadline and noticed), 0 if not,
 *          -EINVAL for NULL. */
CALLER_EXTERN int caller_scope_cancelled(const caller_scope_t *s);

/**
 * A PendingGroup: while entered, it tracks every new Pending of its context.
 * If a tracked Pending fails or is cancelled, or the group is cancelled,
 * every other tracked Pending is cancelled and the body is cancelled at its
 * next suspension point. caller_group_exit() waits until every tracked
 * Pending is done or removed.
 *
 *     caller_group_t *g = caller_create_pending_group(NULL, false);
 *     caller_group_enter(g);
 *     ... caller_call_soon(...), caller_to_thread(...) ...
 *     int rc = caller_group_exit(g);   // 0, -ECANCELED or -ETIMEDOUT
 *     caller_group_unref(g);
 *
 * Entered, a group is also a Pending of the enclosing context: an enclosing
 * group sees an inner group that ends cancelled like any failed Pending it
 * tracks (and is cancelled in turn).
 *
 * Reference-counted: caller_create_pending_group() gives one reference.
 */
typedef struct caller_group caller_group_t;

/** Flags of caller_group_new(). */
typedef enum caller_group_flags {
    /** Cancellation from outside the group does not reach its body. */
    CALLER_GROUP_SHIELD = 1u << 0,
} caller_group_flags_t;

/** A new group, not entered. Thread: any.
 *  @param c       the Caller whose task will run the body (NULL: the
 *                 current one; informational).
 *  @param flags   0, or CALLER_GROUP_SHIELD: cancellation from outside
 *                 does not reach the body.
 *  @return a new group with one reference the caller owns (release it
 *          with caller_group_unref()), or NULL: -ENOMEM, or -EINVAL if
 *          @p flags has another bit. */
CALLER_EXTERN caller_group_t *caller_group_new(caller_t *c, unsigned flags);

/** Cancel after @p seconds from entering (call before entering): the group
 *  is cancelled ("PendingGroup timed out") and exit returns -ETIMEDOUT.
 *  Thread: any.
 *  @param g        the group (not NULL: -EINVAL).
 *  @param seconds  the timeout, >= 0 (negative or NaN: -EINVAL).
 *  @return 0, -EINVAL, CALLER_EINVALSTATE if already entered. */
CALLER_EXTERN int caller_group_set_timeout(caller_group_t *g, double seconds);

/** Enter: from now on new Pendings of this task's context are tracked.
 *  Thread: a task (the body runs in it). A group is entered once.
 *  @param g  the group (not NULL: -EINVAL).
 *  @return 0, -EINVAL, -EPERM (not in a task), CALLER_EINVALSTATE (already
 *          entered), -ENOMEM. */
CALLER_EXTERN int caller_group_enter(caller_group_t *g);

/**
 * Exit: wait (suspending the task) until every tracked Pending is done or
 * removed; if the body is cancelled meanwhile, cancel what is left and wait
 * for it anyway. Restores the enclosing context.
 * Thread: the task that entered, groups exited in reverse order.
 * @param g  the group this task entered last (not NULL: -EINVAL).
 * @return 0; -ECANCELED if the group was cancelled (caller_last_error()
 *         gives the messages, "\n"-joined, e.g. the failing Pending's),
 *         also when the body's own task was cancelled from outside while
 *         it waited here (what the group tracked is cancelled and waited
 *         for first); -ETIMEDOUT if its timeout passed; CALLER_EINVALSTATE
 *         (not the group this task entered last); -EINVAL.
 */
CALLER_EXTERN int caller_group_exit(caller_group_t *g);

/** Cancel the group: every tracked Pending and the body. Thread: any.
 *  @param g        the group (not NULL: -EINVAL).
 *  @param message  the cancellation message; may be NULL.
 *  @return 1, 0 if it already exited, -EINVAL. */
CALLER_EXTERN int caller_group_cancel(caller_group_t *g, const char *message);

/** Whether the group was cancelled. Thread: any.
 *  @param g  the group (not NULL: -EINVAL).
 *  @return 1 if the group was cancelled, 0 if not, -EINVAL. */
CALLER_EXTERN int caller_group_cancelled(const caller_group_t *g);

/** Stop tracking @p p (its failure no longer cancels the group, and exit
 *  does not wait for it). Thread: any.
 *  @param g  the group (not NULL: -EINVAL).
 *  @param p  the Pending (not NULL: -EINVAL).
 *  @return 1 if it was tracked, 0 if not; -EINVAL. */
CALLER_EXTERN int caller_group_remove(caller_group_t *g, caller_pending_t *p);

/** The tracked Pendings now: up to @p max references into @p out (the
 *  caller releases each). Thread: any.
 *  @param g    the group; may be NULL (0).
 *  @param out  room for @p max pointers; may be NULL only when @p max is 0.
 *  @param max  how many to fill at most.
 *  @return how many are tracked (may exceed @p max); 0 for NULL @p g. */
CALLER_EXTERN size_t caller_group_pending(caller_group_t *g, caller_pending_t **out, size_t max);

/** Take a reference. Thread: any.
 *  @param g  the group; may be NULL.
 *  @return @p g (NULL for NULL). */
CALLER_EXTERN caller_group_t *caller_group_ref(caller_group_t *g);
/** Release a reference; the last one frees the group (which must not be
 *  entered then). Thread: any. NULL is ignored.
 *  @param g  the group; may be NULL. */
CALLER_EXTERN void caller_group_unref(caller_group_t *g);

/**
 * A PendingManager: a tracker activated and deactivated explicitly, and made
 * current in a context with a token (any thread or task, not only in one
 * body). Reference-counted.
 */
typedef struct caller_manager caller_manager_t;

/** What caller_manager_start() gives back to caller_manager_stop(). Its
 *  fields are the library's: treat the token as opaque. */
typedef struct caller_manager_token {
    /** @var outer
     *  The library's: the context to restore.
     *  @var node
     *  The library's: the context made current. */
    void *outer, *node;
} caller_manager_token_t;

/** A new, idle manager. Thread: any.
 *  @return a new manager with one reference the caller owns (release it
 *          with caller_manager_unref()), or NULL (-ENOMEM). */
CALLER_EXTERN caller_manager_t *caller_manager_new(void);
/** Release a reference; the last one frees the manager. Thread: any. NULL
 *  is ignored.
 *  @param m  the manager; may be NULL. */
CALLER_EXTERN void caller_manager_unref(caller_manager_t *m);
/** Take another reference. Thread: any.
 *  @param m  the manager (not NULL: returns NULL).
 *  @return @p m, with one more reference the caller owns. */
CALLER_EXTERN caller_manager_t *caller_manager_ref(caller_manager_t *m);

/** Activate (from idle, or again after it stopped). Thread: any.
 *  @param m  the manager (not NULL: -EINVAL).
 *  @return 0, CALLER_EINVALSTATE if active (or still finishing after
 *          caller_manager_deactivate()), -EINVAL. */
CALLER_EXTERN int caller_manager_activate(caller_manager_t *m);

/** Track new Pendings of the current context (this thread's, or this
 *  task's) until caller_manager_stop() with the same token. Thread: any;
 *  start and stop in the same thread or task, in reverse order of others.
 *  @param m      the manager (not NULL: -EINVAL).
 *  @param token  receives what caller_manager_stop() needs (not NULL:
 *                -EINVAL).
 *  @return 0, CALLER_EINVALSTATE (not active), -EINVAL, -ENOMEM. */
CALLER_EXTERN int caller_manager_start(caller_manager_t *m, caller_manager_token_t *token);

/** Stop tracking in the context where @p token was made. Thread: the
 *  thread or task that called caller_manager_start() with @p token.
 *  @param m      the manager (not NULL: -EINVAL).
 *  @param token  the token from caller_manager_start() (-EINVAL if NULL,
 *                already stopped, or another manager's).
 *  @return 0, -EINVAL, CALLER_EINVALSTATE (another context was entered
 *          since, or this is another thread or task). */
CALLER_EXTERN int caller_manager_stop(caller_manager_t *m, caller_manager_token_t *token);

/** Flags of caller_manager_deactivate(). */
typedef enum caller_manager_flags {
    /** Cancel the tracked Pendings (without it, they are only let go). */
    CALLER_MANAGER_CANCEL_PENDING = 1u << 0,
} caller_manager_flags_t;

/**
 * Deactivate: the tracked Pendings are cancelled ("PendingManager has been
 * deactivated") with CALLER_MANAGER_CANCEL_PENDING or, without it,
 * released (no longer tracked). Thread: any.
 * @param m      the manager (not NULL: -EINVAL).
 * @param flags  0 (stop tracking the Pendings), or
 *               CALLER_MANAGER_CANCEL_PENDING (cancel them).
 * @return 1 if some are still finishing (caller_manager_wait() waits for
 *         them), 0 if none; CALLER_EINVALSTATE if not active; -EINVAL (also
 *         for another bit in @p flags).
 */
CALLER_EXTERN int caller_manager_deactivate(caller_manager_t *m, unsigned flags);

/** Wait until the manager tracks nothing. Thread: any (suspends a task,
 *  blocks a plain thread).
 *  @param m        the manager (not NULL: -EINVAL).
 *  @param timeout  seconds; negative (CALLER_FOREVER) waits forever.
 *  @return 0, -ETIMEDOUT, -ECANCELED (the waiting task was cancelled),
 *          -EINVAL, -ENOMEM. */
CALLER_EXTERN int caller_manager_wait(caller_manager_t *m, double timeout);

/** The tracked Pendings now (references into @p out, up to @p max; the
 *  caller releases each). Thread: any.
 *  @param m    the manager; may be NULL (0).
 *  @param out  room for @p max pointers; may be NULL only when @p max is 0.
 *  @param max  how many to fill at most.
 *  @return how many are tracked (may exceed @p max); 0 for NULL @p m. */
CALLER_EXTERN size_t caller_manager_pending(caller_manager_t *m, caller_pending_t **out,
                                            size_t max);

/** @} */

/* ======================================================================== */
/**
 * @name ZeroMQ iopub
 *
 * A Caller created with a ZeroMQ context (`options.zmq_context`) opens, in
 * its own thread as it starts, a PUB socket (linger 50 ms) connected to the
 * process-wide iopub URL, and registers it in the process-wide map thread ->
 * socket; the socket is closed and unregistered in its thread when the
 * Caller stops (before its stopped event), so zmq_ctx_term() returns once
 * every such Caller has stopped.
 *
 * ZeroMQ sockets are not thread-safe: use a socket only in the thread it
 * belongs to — the Caller's own thread, i.e. from its tasks and direct
 * calls. Built without ZeroMQ (-DCALLER_WITH_ZMQ=OFF), a Caller given a
 * context fails to start (-ENOTSUP) and the accessors return NULL.
 */
/* ======================================================================== */
/** @{ */

/** The iopub URL for Callers that start from now on; default
 *  "inproc://iopub" (a SUB socket binds there). Thread: any.
 *  @param url  the URL, copied (not NULL, not empty: -EINVAL).
 *  @return 0, or -EINVAL (NULL, empty, or longer than 255 bytes). */
CALLER_EXTERN int caller_iopub_set_url(const char *url);

/** The iopub URL, snprintf-style into @p buf. Thread: any.
 *  @param buf  receives the URL, cut to fit and NUL-terminated; NULL only
 *              with @p len 0 (else -EINVAL).
 *  @param len  the size of @p buf in bytes.
 *  @return the length of the whole URL (as snprintf), or -EINVAL. */
CALLER_EXTERN int caller_iopub_url(char *buf, size_t len);

/** The calling thread's iopub socket (its Caller's). Thread: any;
 *  the socket may be used only in this thread.
 *  @return the socket, or NULL if this thread has none (or the library was
 *          built without ZeroMQ). */
CALLER_EXTERN void *caller_iopub_socket(void);

/** The iopub socket registered for @p thread, or NULL. Thread: any — but
 *  the socket may be used only in @p thread (this is for lookups and
 *  checks, not for sending from elsewhere).
 *  @param thread  the thread to look up.
 *  @return the socket, or NULL if @p thread has none (or the library was
 *          built without ZeroMQ). */
CALLER_EXTERN void *caller_iopub_socket_for(pthread_t thread);

/** How many iopub sockets are open in the process. Thread: any.
 *  @return the number of registered iopub sockets (0 when built without
 *          ZeroMQ). */
CALLER_EXTERN size_t caller_iopub_count(void);

/** @p c's ZeroMQ context. Thread: any (contexts are thread-safe).
 *  @param c  the Caller; may be NULL.
 *  @return the context, or NULL if @p c has none or is NULL. */
CALLER_EXTERN void *caller_zmq_context(const caller_t *c);

/** @} */

/* ======================================================================== */
/** @name Lookups and introspection */
/* ======================================================================== */
/** @{ */

/** This thread's Caller (until it stops). Borrowed: no reference.
 *  Thread: any.
 *  @return the Caller, or NULL if this thread has none. */
CALLER_EXTERN caller_t *caller_current(void);

/** The Caller of thread @p t (not stopping or stopped). Thread: any.
 *  @param t  the thread to look up.
 *  @return a reference the caller owns, or NULL if there is none. */
CALLER_EXTERN caller_t *caller_for_thread(pthread_t t);

/** Flags of caller_all(). */
typedef enum caller_all_flags {
    CALLER_ALL_RUNNING = 1u << 0, /**< only the running Callers */
} caller_all_flags_t;

/**
 * The Callers of the process that are not stopping or stopped (with
 * CALLER_ALL_RUNNING, only those running). Fills up to @p max references into
 * @p out (which may be NULL when @p max is 0).
 * Thread: any.
 * @param flags  0, or CALLER_ALL_RUNNING: count and fill only running
 *               Callers. Another bit: 0, with -EINVAL as the last
 *               error (caller_last_error()).
 * @param out    receives references the caller owns; may be NULL when
 *               @p max is 0.
 * @param max    how many to fill at most.
 * @return how many there are (may exceed @p max).
 */
CALLER_EXTERN size_t caller_all(unsigned flags, caller_t **out, size_t max);

/** The Pending of the task running now in this thread. Borrowed.
 *  Thread: any.
 *  @return the Pending (no reference), or NULL outside a task. */
CALLER_EXTERN caller_pending_t *caller_current_pending(void);

/** The parent (the Caller that created @p c with caller_get() or as a
 *  worker). Thread: any.
 *  @param c  the Caller; may be NULL.
 *  @return a reference the caller owns, or NULL (no parent, or @p c is
 *          NULL). */
CALLER_EXTERN caller_t *caller_parent(caller_t *c);

/** The children that have not stopped: up to @p max references into @p out.
 *  Thread: any.
 *  @param c    the Caller; may be NULL (0).
 *  @param out  receives references the caller owns; may be NULL (nothing
 *              is filled).
 *  @param max  how many to fill at most.
 *  @return how many there are (may exceed @p max); 0 for NULL @p c. */
CALLER_EXTERN size_t caller_children(caller_t *c, caller_t **out, size_t max);

/** The name. Thread: any.
 *  @param c  the Caller; may be NULL.
 *  @return the name (valid while @p c lives), or NULL for NULL. */
CALLER_EXTERN const char *caller_name(const caller_t *c);

/** The backend's name. Thread: any.
 *  @param c  the Caller; may be NULL.
 *  @return the backend's name ("libuv" or "glib"; static), or NULL for
 *          NULL. */
CALLER_EXTERN const char *caller_backend(const caller_t *c);

/** The backends this build has, by name. Thread: any.
 *  @param names  receives up to @p max static names, the default ("libuv")
 *                first; may be NULL to count.
 *  @param max    the room in @p names.
 *  @return how many backends this build has (1 or 2). */
CALLER_EXTERN size_t caller_backends(const char **names, size_t max);

/** The thread the Caller runs in (for a manual Caller: the thread that
 *  created it). Thread: any.
 *  @param c  the Caller; must not be NULL (not checked).
 *  @return the thread's id. */
CALLER_EXTERN pthread_t caller_thread(const caller_t *c);

/** Whether the Caller is protected (caller_options_t.protect). Thread: any.
 *  @param c  the Caller (not NULL: -EINVAL).
 *  @return 1 if protected, 0 if not, -EINVAL. */
CALLER_EXTERN int caller_protected(const caller_t *c);

/** Whether the Caller is running. Thread: any.
 *  @param c  the Caller (not NULL: -EINVAL).
 *  @return 1 if running (accepting and running calls), 0 if not,
 *          -EINVAL. */
CALLER_EXTERN int caller_running(const caller_t *c);

/** The life-cycle state. Thread: any.
 *  @param c  the Caller (not NULL: -EINVAL).
 *  @return the state (a caller_state_t, >= 0), or -EINVAL. */
CALLER_EXTERN int caller_state(const caller_t *c);

/** The libuv loop under @p c (NULL before it started and after it stopped,
 *  and for a Caller of another backend: see caller_glib_context()),
 *  so applications can run their own libuv I/O in the Caller's thread. Use
 *  it only from that thread (libuv loops are not thread-safe); schedule
 *  onto the Caller to get there. Thread: any may ask for it; only the
 *  Caller's thread may use it.
 *  @param c  the Caller; may be NULL.
 *  @return the loop, or NULL (NULL @p c, not started, or stopped). */
CALLER_EXTERN struct uv_loop_s *caller_loop(caller_t *c);

/** The GMainContext under a Caller of the "glib" backend (NULL before it
 *  started and after it stopped, and for other backends), so applications
 *  can attach GSources (GIO, timeouts) in the Caller's thread. A Caller
 *  that made its own context (CALLER_NEW_THREAD, CALLER_MANUAL) also makes
 *  it its thread's default (g_main_context_push_thread_default), so GIO's
 *  asynchronous calls made in its tasks complete on it. Attach sources to
 *  it from any thread (GLib allows that); iterate it only in the Caller's
 *  thread, which the Caller does. Thread: any.
 *  @param c  the Caller; may be NULL.
 *  @return the context (`GMainContext *`, no reference added), or NULL. */
CALLER_EXTERN struct _GMainContext *caller_glib_context(caller_t *c);

/**
 * The text form: `Caller<name libuv 🏃 running 2 children>`; states are
 * shown as "❗ not running", "starting", "🏃 running", "🏁 stopping",
 * "🏁 stopped". Thread: any.
 * @param c    the Caller (not NULL: -EINVAL).
 * @param buf  receives the text, cut to fit and NUL-terminated; NULL only
 *             with @p len 0 (else -EINVAL).
 * @param len  the size of @p buf in bytes.
 * @return the length of the whole text (as snprintf), or -EINVAL.
 */
CALLER_EXTERN int caller_repr(const caller_t *c, char *buf, size_t len);

/**
 * A Caller's counters (caller_stats()). Each is read on its own, without
 * stopping the Caller: exact at some moment during the call, but not all
 * at the same moment. Kept as cheaply as the loop runs: no atomic
 * read-modify-write, no lock on the loop's path.
 */
typedef struct caller_stats {
    /** Tasks (calls) that began running on this Caller, since it was made. */
    uint64_t tasks_started;
    /** Of those, the ones that ended (returned, failed or were cancelled). */
    uint64_t tasks_finished;
    /** Tasks its loop has accepted and not ended: waiting to start (ready
     *  or delayed by caller_call_later), running or suspended. */
    size_t tasks_live;
    /** Of those, the ones suspended now (waiting in a suspension point). */
    size_t tasks_suspended;
    /** Messages waiting in its inbox, not yet seen by its loop: calls from
     *  other threads, resumptions and cancellations of its tasks. */
    size_t inbox;
    /** Times another thread had to wake its loop with a system call (a
     *  loop spinning for work is poked without one, not counted). */
    uint64_t wakeups;
    /** Its worker pool (caller_to_thread): workers now, busy or idle. */
    size_t workers;
    /** Of those, the idle ones. */
    size_t workers_idle;
    /** caller_to_thread() calls waiting for a worker. */
    size_t pool_queued;
    /** Zero: room for later counters (size fixed, as option structs). */
    uintptr_t reserved[7];
} caller_stats_t;

/**
 * Read a Caller's counters. Cheap (two locks held for a few loads); meant
 * for monitoring and debugging, e.g. from a timer or a signal-safe point of
 * the application (not from a signal handler).
 *
 * Thread: any.
 * @param c    the Caller (not NULL: -EINVAL); any state, stopped too.
 * @param out  receives the counters (not NULL: -EINVAL); the reserved
 *             words are set to zero.
 * @return 0, or -EINVAL.
 */
CALLER_EXTERN int caller_stats(caller_t *c, caller_stats_t *out);

/** Flags of caller_print_table(). */
typedef enum caller_table_flags {
    /** Add each Caller's counters (caller_stats()): tasks started, live,
     *  suspended, inbox, wake-ups, workers (idle) and queued calls. */
    CALLER_TABLE_STATS = 1u << 0,
} caller_table_flags_t;

/**
 * Print the callers table (the Python original's `%callers`): one row per Caller that
 * is not stopped — Name, Running ✓, Protected 🔐, Thread (name and id) — and
 * `← current` on the calling thread's row; with CALLER_TABLE_STATS, each
 * row also shows the Caller's counters (caller_stats()). Thread: any.
 * @param out    the stream to print to (not NULL: -EINVAL).
 * @param flags  0, or CALLER_TABLE_STATS.
 * @return 0, or -EINVAL if @p out is NULL or @p flags has another bit.
 */
CALLER_EXTERN int caller_print_table(FILE *out, unsigned flags);

/** How many Callers exist (created and not yet freed), for leak checks.
 *  Thread: any.
 *  @return the number of live Callers. */
CALLER_EXTERN size_t caller_live_count(void);

/** @} */

#ifdef __cplusplus
}
#endif

#endif /* CALLER_H */
