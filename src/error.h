/* Errors (error.c): this thread's last error, set by failing paths. */
#ifndef CALLER_ERROR_H
#define CALLER_ERROR_H

#include "caller.h"

#include <stddef.h>

/*
 * Record this thread's last error and return @p code, so failing paths read
 * `return caller__fail(-EINVAL, "caller_pending_wait: p is NULL");`.
 * A NULL @p fmt records the code's description.
 */
int caller__fail(int code, const char *fmt, ...) CALLER_PRINTF(2, 3);

/* 0 if the @p n words of an option struct's `reserved` space are zero;
 * else -EINVAL, failed with a message naming @p api and @p what (the
 * struct). */
int caller__check_reserved(const uintptr_t *reserved, size_t n, const char *api, const char *what);

/* Copy @p s into @p buf (size @p len), cutting it at @p max bytes (and at a
 * UTF-8 character boundary) with "…" when it is longer. Returns @p buf. */
char *caller__trunc(char *buf, size_t len, const char *s, size_t max);

#endif /* CALLER_ERROR_H */
