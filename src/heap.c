/* The timer min-heap (see heap.h). */
#include "heap.h"
#include "internal.h"

static int before(const caller__timer_t *a, const caller__timer_t *b)
{
    return a->deadline < b->deadline || (a->deadline == b->deadline && a->seq < b->seq);
}

static void place(caller__heap_t *h, size_t i, caller__timer_t *t)
{
    h->items[i] = t;
    t->index = i;
}

static void sift_up(caller__heap_t *h, size_t i)
{
    caller__timer_t *t = h->items[i];
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!before(t, h->items[parent]))
            break;
        place(h, i, h->items[parent]);
        i = parent;
    }
    place(h, i, t);
}

static void sift_down(caller__heap_t *h, size_t i)
{
    caller__timer_t *t = h->items[i];
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        caller__timer_t *best = t;
        if (l < h->n && before(h->items[l], best))
            m = l, best = h->items[l];
        if (r < h->n && before(h->items[r], best))
            m = r, best = h->items[r];
        if (m == i)
            break;
        place(h, i, best);
        i = m;
    }
    place(h, i, t);
}

int caller__heap_insert(caller__heap_t *h, caller__timer_t *t)
{
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        caller__timer_t **items = caller__realloc(h->items, cap * sizeof *items);
        if (!items) {
            t->index = CALLER__HEAP_NONE;
            return -ENOMEM;
        }
        h->items = items;
        h->cap = cap;
    }
    t->seq = h->seq++;
    h->items[h->n] = t;
    t->index = h->n++;
    sift_up(h, t->index);
    return 0;
}

void caller__heap_remove(caller__heap_t *h, caller__timer_t *t)
{
    size_t i = t->index;
    if (i == CALLER__HEAP_NONE || i >= h->n || h->items[i] != t)
        return;
    t->index = CALLER__HEAP_NONE;
    caller__timer_t *last = h->items[--h->n];
    if (i == h->n)
        return;
    place(h, i, last);
    if (i > 0 && before(last, h->items[(i - 1) / 2]))
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
