/*
 * A hash index of nodes keyed by (fn, key): what finds a Caller's execution
 * queue by its key in O(1) (queue.c; the tests use it directly too). The
 * node lives in the object it indexes, as a list link does; the index holds
 * pointers to nodes and never owns them.
 *
 * Open addressing with linear probing over a power-of-two table of at most
 * half load, and deletion by shifting the following entries back (no
 * tombstones), so a lookup stops at the first empty slot and a table that
 * saw many deletions is as fast as a fresh one. The table grows by doubling
 * before an insert would pass half load; after a removal it shrinks when
 * under an eighth full, and is freed when empty, so a Caller whose queues
 * have all ended holds no table at all.
 *
 * The index is a pointer, NULL while empty; the functions that may
 * reallocate it take its address. Not thread-safe: its owner locks.
 */
#ifndef CALLER_KEYINDEX_H
#define CALLER_KEYINDEX_H

#include "alloc.h"
#include "caller.h"

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef struct caller__keynode {
    caller_fn fn;
    const void *key;
    size_t hash; /* caller__keyindex_hash(fn, key), set before inserting */
    void *aux;   /* what a lookup will touch next (or NULL), set before
                    inserting: kept in the slot too, and fetched from
                    there while the node itself is still on its way */
} caller__keynode_t;

/* A slot keeps its node's hash beside it, so a probe past other keys
 * compares hashes in the table and does not touch their nodes (a cache
 * miss each, with thousands of keys). */
typedef struct caller__keyslot {
    size_t hash;
    caller__keynode_t *node; /* NULL: empty */
    void *aux;               /* the node's aux */
} caller__keyslot_t;

typedef struct caller__keyindex {
    size_t mask;  /* capacity - 1, capacity a power of two */
    size_t count; /* nodes in the table */
    caller__keyslot_t slot[];
} caller__keyindex_t;

#define CALLER__KEYINDEX_MIN 16 /* the smallest capacity */

/*
 * The hash of (fn, key). Keys are usually addresses of objects, whose low
 * bits are all alike (alignment) and whose high bits barely vary, so every
 * bit is mixed into every other before the table takes the low ones: the
 * two words are combined with an odd multiplier, then put through the
 * 64-bit finalizer of MurmurHash3 (xor-shift, multiply, three times).
 */
static inline size_t caller__keyindex_hash(caller_fn fn, const void *key)
{
    uint64_t x = (uint64_t)(uintptr_t)key ^ ((uint64_t)(uintptr_t)fn * 0x9e3779b97f4a7c15u);
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdu;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53u;
    x ^= x >> 33;
    return (size_t)x;
}

static inline size_t caller__keyindex_capacity(const caller__keyindex_t *ix)
{
    return ix ? ix->mask + 1 : 0;
}

static inline size_t caller__keyindex_count(const caller__keyindex_t *ix)
{
    return ix ? ix->count : 0;
}

/* The node of (fn, key) whose hash is @p hash, or NULL. @p ix may be NULL. */
static inline caller__keynode_t *caller__keyindex_find(const caller__keyindex_t *ix, caller_fn fn,
                                                       const void *key, size_t hash)
{
    if (!ix)
        return NULL;
    for (size_t i = hash & ix->mask;; i = (i + 1) & ix->mask) {
        caller__keynode_t *n = ix->slot[i].node;
        if (!n)
            return NULL;
        if (ix->slot[i].hash != hash)
            continue;
        /* With thousands of keys both are cache misses: start the second
         * before the first is in (the node's line is needed to compare). */
        if (ix->slot[i].aux)
            __builtin_prefetch(ix->slot[i].aux);
        if (n->fn == fn && n->key == key)
            return n;
    }
}

/* Put @p n in the first free slot of its probe sequence (there is one). */
static inline void caller__keyindex_place(caller__keyindex_t *ix, caller__keynode_t *n)
{
    size_t i = n->hash & ix->mask;
    while (ix->slot[i].node)
        i = (i + 1) & ix->mask;
    ix->slot[i] = (caller__keyslot_t){n->hash, n, n->aux};
}

/* Move the nodes of *@p ix into a new table of @p capacity (a power of two
 * that holds them). -ENOMEM leaves *@p ix as it was. */
static inline int caller__keyindex_resize(caller__keyindex_t **ix, size_t capacity)
{
    caller__keyindex_t *old = *ix, *nx;
    nx = caller__calloc(1, sizeof *nx + capacity * sizeof nx->slot[0]);
    if (!nx)
        return -ENOMEM;
    nx->mask = capacity - 1;
    if (old) {
        for (size_t i = 0; i <= old->mask; i++)
            if (old->slot[i].node)
                caller__keyindex_place(nx, old->slot[i].node);
        nx->count = old->count;
        caller__free(old);
    }
    *ix = nx;
    return 0;
}

/* Room for one more node: 0, or -ENOMEM with *@p ix as it was. */
static inline int caller__keyindex_reserve(caller__keyindex_t **ix)
{
    size_t cap = caller__keyindex_capacity(*ix), need = (caller__keyindex_count(*ix) + 1) * 2;
    if (need <= cap)
        return 0;
    if (cap == 0)
        cap = CALLER__KEYINDEX_MIN;
    while (cap < need) {
        if (cap > SIZE_MAX / 2 / sizeof(caller__keyslot_t))
            return -ENOMEM;
        cap *= 2;
    }
    return caller__keyindex_resize(ix, cap);
}

/* Add @p n, which is not in the index, after a successful reserve. */
static inline void caller__keyindex_insert(caller__keyindex_t *ix, caller__keynode_t *n)
{
    caller__keyindex_place(ix, n);
    ix->count++;
}

/* Give memory back: free an empty index; shrink one under an eighth full to
 * a quarter full (best effort: without memory it stays as it is). */
static inline void caller__keyindex_trim(caller__keyindex_t **ix)
{
    caller__keyindex_t *t = *ix;
    if (!t)
        return;
    if (t->count == 0) {
        caller__free(t);
        *ix = NULL;
        return;
    }
    if (t->mask + 1 <= CALLER__KEYINDEX_MIN || t->count * 8 >= t->mask + 1)
        return;
    size_t cap = CALLER__KEYINDEX_MIN;
    while (cap < t->count * 4)
        cap *= 2;
    (void)caller__keyindex_resize(ix, cap);
}

/* Take out @p n, which is in the index (found by identity, not by key),
 * then trim. */
static inline void caller__keyindex_remove(caller__keyindex_t **ix, caller__keynode_t *n)
{
    caller__keyindex_t *t = *ix;
    size_t mask = t->mask, i = n->hash & mask;
    while (t->slot[i].node != n)
        i = (i + 1) & mask;
    /* Shift back each later node of the run whose home slot is not in
     * (i, j]: it was probed past i, and must stay reachable from its home
     * once i is empty. */
    for (size_t j = i;;) {
        t->slot[i].node = NULL;
        for (;;) {
            j = (j + 1) & mask;
            if (!t->slot[j].node)
                goto removed;
            size_t home = t->slot[j].hash & mask;
            bool stays = i <= j ? (i < home && home <= j) : (i < home || home <= j);
            if (!stays) {
                t->slot[i] = t->slot[j];
                i = j;
                break;
            }
        }
    }
removed:
    t->count--;
    caller__keyindex_trim(ix);
}

#endif /* CALLER_KEYINDEX_H */
