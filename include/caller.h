/*
 * libcaller — call code in other threads and tasks.
 *
 * One event loop per thread (a Caller), tasks that can suspend, thread-safe
 * futures (Pending), a worker pool, timers, execution queues and structured
 * concurrency. This is the one public header.
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
 */
#ifndef CALLER_H
#define CALLER_H

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define CALLER_EXTERN __attribute__((visibility("default")))
#define CALLER_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define CALLER_EXTERN
#define CALLER_PRINTF(f, a)
#endif

/* ======================================================================== */
/** @name Errors                                                            */
/* ======================================================================== */
/** @{ */

/*
 * The library's error codes. Each is negative. Where an errno value fits,
 * the code equals -errno (so `-ECANCELED` and CALLER_ECANCELED are the same
 * number); codes with no errno live in a reserved block starting at -4000,
 * far from any errno value.
 *
 * X(NAME, value, "description")
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

/** The error codes (all negative). */
typedef enum {
#define CALLER__ENUM(name, value, text) CALLER_##name = (value),
    CALLER_ERRNO_MAP(CALLER__ENUM)
#undef CALLER__ENUM
} caller_errno_t;

/**
 * Describe an error code.
 *
 * Thread: any. Returns a static string, never NULL: the library's text for
 * its own codes, the C library's description for other `-errno` values, and
 * "unknown error" otherwise. 0 gives "success".
 */
CALLER_EXTERN const char *caller_strerror(int code);

/**
 * The symbolic name of an error code ("ECANCELED", "EINVALSTATE", ...).
 *
 * Thread: any. Returns a static string, never NULL ("UNKNOWN" for a code
 * that is neither the library's nor an errno value; "OK" for 0).
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
/** @name Pending: a thread-safe future                                     */
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
    /** The seed's `allow_tracking=False`: the new Pending does not join the
     *  trackers (groups, managers) active in the current context. */
    CALLER_PENDING_UNTRACKED = 1u << 0,
};

/** A timeout meaning "wait forever". Any negative timeout means the same. */
#define CALLER_FOREVER (-1.0)

/** A done callback: runs once, when @p p becomes done. */
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
 */
CALLER_EXTERN void caller_pending_unref(caller_pending_t *p);

/**
 * Attach user data, with a finalizer run when the Pending is freed (or when
 * the data is replaced by another call of this function).
 *
 * Thread: any. @p finalizer may be NULL.
 * @return 0, or -EINVAL if @p p is NULL.
 */
CALLER_EXTERN int caller_pending_set_userdata(caller_pending_t *p, void *data,
                                              void (*finalizer)(void *data));

/** The user data (NULL if none or if @p p is NULL). Thread: any. */
CALLER_EXTERN void *caller_pending_userdata(const caller_pending_t *p);

/**
 * Set the result, making the Pending done.
 *
 * Exactly one of any number of racing set_result / set_exception calls
 * succeeds. The done callbacks then run in this thread, in the order they
 * were added, and then the waiters are woken (each receives @p value).
 *
 * With @p reset the Pending becomes not done again right after its done
 * callbacks ran, and a later set_result starts a new round (execution
 * queues use this). Waiters woken by this round still receive @p value.
 *
 * Thread: any.
 * @return 0; CALLER_EINVALSTATE if already done; -EINVAL if @p p is NULL.
 */
CALLER_EXTERN int caller_pending_set_result(caller_pending_t *p, void *value, bool reset);

/**
 * Set an error (the seed's exception), making the Pending done.
 *
 * Thread: any.
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
 * Thread: any. @p message may be NULL (no message added).
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
 * @return 0; CALLER_EINVALSTATE if the Pending is done or a canceller is
 *         already set (then @p fn never runs); -EINVAL if @p p or @p fn is
 *         NULL.
 */
CALLER_EXTERN int caller_pending_set_canceller(caller_pending_t *p, caller_canceller_fn fn,
                                               void *arg);

/** 1 if a result or error is set, 0 if not, -EINVAL if @p p is NULL. Thread: any. */
CALLER_EXTERN int caller_pending_done(const caller_pending_t *p);

/** 1 if cancelled, 0 if not, -EINVAL if @p p is NULL. Thread: any. */
CALLER_EXTERN int caller_pending_cancelled(const caller_pending_t *p);

/**
 * The outcome.
 *
 * Thread: any.
 * @param value  if not NULL, receives the result (NULL when there is none).
 * @return 0 with the result; -ECANCELED if cancelled (caller_last_error()
 *         gives the messages) — whether done or not; the error code if an
 *         error was set (caller_last_error() gives its message);
 *         CALLER_EINVALSTATE if not done; -EINVAL if @p p is NULL.
 */
CALLER_EXTERN int caller_pending_result(const caller_pending_t *p, void **value);

/**
 * The error, if any (the seed's `exception()`).
 *
 * Thread: any.
 * @param buf, len  if @p buf is not NULL and @p len > 0, receive the message
 *                  (cut to fit, always NUL-terminated; "" for a result).
 * @return 0 if the Pending is done with a result; the error code if it
 *         failed; -ECANCELED if cancelled (@p buf gets the messages);
 *         CALLER_EINVALSTATE if not done; -EINVAL if @p p is NULL.
 */
CALLER_EXTERN int caller_pending_exception(const caller_pending_t *p, char *buf, size_t len);

/**
 * Add a done callback. If the Pending is already done, @p fn runs at once
 * in this thread before this function returns; otherwise it runs in the
 * thread that completes the Pending. Callbacks run in the order added.
 *
 * Thread: any.
 * @return 0; -EINVAL if @p p or @p fn is NULL; -ENOMEM (then @p fn never
 *         runs). The first callback never allocates; later ones may.
 */
CALLER_EXTERN int caller_pending_add_done_callback(caller_pending_t *p, caller_done_fn fn,
                                                   void *arg);

/**
 * Remove every registration of (@p fn, @p arg) that has not run yet.
 *
 * Thread: any.
 * @return how many were removed (0 if none, including when the Pending is
 *         already done); -EINVAL if @p p or @p fn is NULL.
 */
CALLER_EXTERN int caller_pending_remove_done_callback(caller_pending_t *p, caller_done_fn fn,
                                                      void *arg);

/**
 * Wait until the Pending is done.
 *
 * On a plain thread this blocks the thread (the seed's `wait_sync`);
 * signals do not interrupt it. (Inside a task it will suspend only the
 * task.)
 *
 * Thread: any.
 * @param timeout      seconds; negative (CALLER_FOREVER) waits forever; 0
 *                     only checks.
 * @param protect      if false, a timeout cancels the Pending with the
 *                     message "Cancelled due to cancellation or timeout";
 *                     if true, the Pending is left alone.
 * @param want_result  if true, the return value is the outcome as from
 *                     caller_pending_result(); if false, 0 once done,
 *                     whatever the outcome.
 * @param value        if not NULL and the result is returned, receives it
 *                     (the value of the completion that woke this wait,
 *                     even if the Pending was reset since).
 * @return 0; -ETIMEDOUT if not done in time; with @p want_result the
 *         Pending's own outcome (-ECANCELED, its error code); -EINVAL.
 */
CALLER_EXTERN int caller_pending_wait(caller_pending_t *p, double timeout, bool protect,
                                      bool want_result, void **value);

/**
 * The text form, e.g. `<Pending 🏃 at 0x55d0c3a0| my_func >`, with `⛔` and
 * the cancellation message when cancelled, `🏁` once done, and the error
 * when it failed; long messages are cut with "…".
 *
 * Thread: any. Writes at most @p len bytes including the NUL (@p buf may be
 * NULL when @p len is 0).
 * @return the length of the whole text (as snprintf), or -EINVAL.
 */
CALLER_EXTERN int caller_pending_repr(const caller_pending_t *p, char *buf, size_t len);

/**
 * The number of Pendings alive in the process (created and not yet freed).
 * For leak checks in tests and at shutdown. Thread: any.
 */
CALLER_EXTERN size_t caller_pending_live_count(void);

/** @} */

#ifdef __cplusplus
}
#endif

#endif /* CALLER_H */
