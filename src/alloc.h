/*
 * Allocation (alloc.c): every allocation of the library goes through here;
 * and which sanitizer this build runs under.
 */
#ifndef CALLER_ALLOC_H
#define CALLER_ALLOC_H

#include "caller.h"

#include <stdarg.h>
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
/* The size of the blocks below: a Pending (88 bytes) with its task (104),
 * three cache lines. W1 keeps 10^6 of them alive at once and pays a page
 * fault per 4 KiB of them; W3 moves each one between two cores. task.h
 * checks that they fit. */
#define CALLER__BLOCK_SIZE 192

/* A large zeroed area (@p size bytes, any size) for one owner: from its own
 * mapping (a whole number of 2 MiB steps, 4 KiB pages: alloc.c's map_area
 * says why) when @p size is at least CALLER__BIG_SIZE, so that giving it
 * back returns its pages to the system at once, else from caller__calloc;
 * NULL on failure. Give it back with caller__big_free and
 * the same size. Under ASan always caller__calloc. */
#define CALLER__BIG_SIZE ((size_t)2 << 20)
void *caller__big_alloc(size_t size);
void caller__big_free(void *p, size_t size);

/* A block of CALLER__BLOCK_SIZE bytes (a Pending with its task) from this
 * thread's cache, else from caller__malloc (NULL on failure); and its
 * return, from any thread (alloc.c explains the cache). */
void *caller__block_alloc(void);
void caller__block_free(void *p);
#if CALLER_TESTING
/* Test build only: is @p p a block carved from the arena (alloc.c)? And:
 * carve at most @p blocks from it from now (never fewer than were carved);
 * returns how many it gives in all (0 with no arena). */
bool caller__block_in_arena(const void *p);
size_t caller__arena_limit_blocks(size_t blocks);
#endif
/* fork(): 0 = prepare, 1 = in the parent after, 2 = in the child. */
void caller__alloc_fork(int phase);

#endif /* CALLER_ALLOC_H */
