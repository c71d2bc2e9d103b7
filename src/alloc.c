/*
 * The library's one allocation path (see internal.h). Kept trivial on
 * purpose: the allocation-failure tests (issue #10) hook in here.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *caller__malloc(size_t size)
{
    return malloc(size);
}

void *caller__calloc(size_t n, size_t size)
{
    return calloc(n, size);
}

void *caller__realloc(void *ptr, size_t size)
{
    return realloc(ptr, size);
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
