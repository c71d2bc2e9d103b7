/* The timer min-heap (see heap.h): 4-ary, so a sift moves through half as
 * many levels as a binary heap — each level writes the moved timer's index,
 * a likely cache miss with 100 000 timers (measured in W5). */
#include "heap.h"
#include "alloc.h"

static int before(const caller__heap_entry_t *a, const caller__heap_entry_t *b)
{
    return a->deadline < b->deadline || (a->deadline == b->deadline && a->seq < b->seq);
}

static void place(caller__heap_t *h, size_t i, caller__heap_entry_t e)
{
    h->items[i] = e;
    e.timer->index = (uint32_t)i;
}

static void sift_up(caller__heap_t *h, size_t i)
{
    caller__heap_entry_t e = h->items[i];
    while (i > 0) {
        size_t parent = (i - 1) / 4;
        if (!before(&e, &h->items[parent]))
            break;
        place(h, i, h->items[parent]);
        i = parent;
    }
    place(h, i, e);
}

static void sift_down(caller__heap_t *h, size_t i)
{
    caller__heap_entry_t e = h->items[i];
    for (;;) {
        size_t first = 4 * i + 1, m = i;
        const caller__heap_entry_t *best = &e;
        for (size_t k = first; k < first + 4 && k < h->n; k++)
            if (before(&h->items[k], best))
                m = k, best = &h->items[k];
        if (m == i)
            break;
        place(h, i, *best);
        i = m;
    }
    place(h, i, e);
}

int caller__heap_insert(caller__heap_t *h, caller__timer_t *t, int64_t deadline)
{
    if (h->n >= CALLER__HEAP_NONE - 1) { /* the index would not fit */
        t->index = CALLER__HEAP_NONE;
        return -ENOMEM;
    }
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        caller__heap_entry_t *items = caller__realloc(h->items, cap * sizeof *items);
        if (!items) {
            t->index = CALLER__HEAP_NONE;
            return -ENOMEM;
        }
        h->items = items;
        h->cap = cap;
    }
    h->items[h->n] = (caller__heap_entry_t){deadline, h->seq++, t};
    sift_up(h, h->n++);
    return 0;
}

void caller__heap_remove(caller__heap_t *h, caller__timer_t *t)
{
    size_t i = t->index;
    if (i == CALLER__HEAP_NONE || i >= h->n || h->items[i].timer != t)
        return;
    t->index = CALLER__HEAP_NONE;
    caller__heap_entry_t last = h->items[--h->n];
    if (i == h->n)
        return;
    place(h, i, last);
    if (i > 0 && before(&last, &h->items[(i - 1) / 4]))
        sift_up(h, i);
    else
        sift_down(h, i);
}

void caller__heap_free(caller__heap_t *h)
{
    caller__free(h->items);
    h->items = NULL;
    h->n = h->cap = 0;
}
