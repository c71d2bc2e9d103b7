/*
 * The library's one allocation path (see internal.h). The allocation-
 * failure tests make the N-th allocation from now fail through
 * caller__alloc_fail_after(); otherwise this costs one relaxed load.
 */
#include "internal.h"

#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static atomic_long countdown = -1; /* allocations left before one fails */
static atomic_long allocations;    /* counted while a countdown is set */

void caller__alloc_fail_after(long n)
{
    atomic_store(&allocations, 0);
    atomic_store(&countdown, n);
}

long caller__alloc_count(void)
{
    return atomic_load(&allocations);
}

/* True if this allocation is to fail. */
static bool inject(void)
{
    if (atomic_load_explicit(&countdown, memory_order_relaxed) < 0)
        return false;
    atomic_fetch_add(&allocations, 1);
    long left = atomic_fetch_sub(&countdown, 1);
    if (left == 0)
        return true; /* this one; the countdown is now -1: later ones succeed */
    if (left < 0)
        atomic_store(&countdown, -1);
    return false;
}

void *caller__malloc(size_t size)
{
    return inject() ? NULL : malloc(size);
}

void *caller__calloc(size_t n, size_t size)
{
    return inject() ? NULL : calloc(n, size);
}

void *caller__realloc(void *ptr, size_t size)
{
    return inject() ? NULL : realloc(ptr, size);
}

void caller__free(void *ptr)
{
    free(ptr);
}

char *caller__strdup(const char *s)
{
    if (!s)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = caller__malloc(n);
    if (d)
        memcpy(d, s, n);
    return d;
}

char *caller__vasprintf(const char *fmt, va_list ap)
{
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap2);
    va_end(ap2);
    if (n < 0)
        return NULL;
    char *s = caller__malloc((size_t)n + 1);
    if (s)
        vsnprintf(s, (size_t)n + 1, fmt, ap);
    return s;
}
