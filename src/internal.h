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
/* A copy of s (NULL if s is NULL or on allocation failure). */
char *caller__strdup(const char *s);
/* vasprintf through caller__malloc; NULL on failure. */
char *caller__vasprintf(const char *fmt, va_list ap);

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
 * come), false if already done (no wake will come). */
bool caller__pending_add_waiter(caller_pending_t *p, caller__waiter_t *w);

/* Unlink @p w. Returns true if it was still linked (no wake will come). */
bool caller__pending_remove_waiter(caller_pending_t *p, caller__waiter_t *w);

/* Label shown in the text form (a string with static lifetime, e.g. the
 * scheduled function's name). */
void caller__pending_set_name(caller_pending_t *p, const char *name);

/* Whether the Pending was created with allow_tracking (trackers, later). */
bool caller__pending_trackable(const caller_pending_t *p);

/* sizeof(struct caller_pending), for the size report. */
size_t caller__pending_size(void);

#endif /* CALLER_INTERNAL_H */
