/*
 * A min-heap of timers ordered by deadline, as an array of pointers; each
 * timer knows its index so it can be removed in O(log n). Used only on a
 * Caller's own thread, so it has no lock.
 */
#ifndef CALLER_HEAP_H
#define CALLER_HEAP_H

#include <stddef.h>
#include <stdint.h>

/* What a timer keeps of its own: where it is. Its deadline is in the heap's
 * array, beside it (caller__heap_insert). */
typedef struct caller__timer {
    uint32_t index; /* position in the heap, or CALLER__HEAP_NONE */
} caller__timer_t;

#define CALLER__HEAP_NONE UINT32_MAX

/* The key is kept in the array beside the pointer, so sifting compares
 * neighbouring memory instead of chasing each timer (a 100 000-entry heap
 * of pointers spent most of its time in cache misses, measured in W5). */
typedef struct {
    int64_t deadline;
    uint64_t seq; /* insertion order: equal deadlines stay FIFO */
    caller__timer_t *timer;
} caller__heap_entry_t;

typedef struct {
    caller__heap_entry_t *items;
    size_t n, cap;
    uint64_t seq;
} caller__heap_t;

/* Add @p t, due at @p deadline (monotonic ns): 0, or -ENOMEM (the timer is
 * then not in the heap). */
int caller__heap_insert(caller__heap_t *h, caller__timer_t *t, int64_t deadline);
/* Remove @p t if it is in the heap. */
void caller__heap_remove(caller__heap_t *h, caller__timer_t *t);
/* The earliest timer, or NULL. */
static inline caller__timer_t *caller__heap_min(const caller__heap_t *h)
{
    return h->n ? h->items[0].timer : NULL;
}
/* The earliest deadline, or INT64_MAX if the heap is empty. */
static inline int64_t caller__heap_min_deadline(const caller__heap_t *h)
{
    return h->n ? h->items[0].deadline : INT64_MAX;
}
void caller__heap_free(caller__heap_t *h);

#endif
