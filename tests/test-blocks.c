/* The task-block cache and its arena (alloc.c): blocks made in one thread
 * and freed in another come back for reuse, every block is distinct and
 * keeps what is written in it until freed, and once the arena is used up
 * blocks come from malloc and are freed again. */
// TIMEOUT: 120
#include "check.h"
#include "internal.h"

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Fill a block with a pattern of its own, then check it. */
static void stamp(void *b, uintptr_t tag)
{
    uintptr_t *w = b;
    for (size_t i = 0; i < CALLER__BLOCK_SIZE / sizeof *w; i++)
        w[i] = tag ^ (i * 0x9e3779b97f4a7c15u);
}

static int stamped(const void *b, uintptr_t tag)
{
    const uintptr_t *w = b;
    for (size_t i = 0; i < CALLER__BLOCK_SIZE / sizeof *w; i++)
        if (w[i] != (tag ^ (i * 0x9e3779b97f4a7c15u)))
            return 0;
    return 1;
}

static int by_address(const void *a, const void *b)
{
    uintptr_t x = (uintptr_t) * (void *const *)a, y = (uintptr_t) * (void *const *)b;
    return x < y ? -1 : x > y;
}

enum { ARENA_FOR_TESTS = 8192 }; /* 2 MiB */

typedef struct {
    void **blocks;
    size_t n;
} chunk_t;

static void *free_chunk(void *arg)
{
    chunk_t *c = arg;
    for (size_t i = 0; i < c->n; i++)
        caller__block_free(c->blocks[i]);
    return NULL;
}

TEST(blocks_past_the_arena_are_distinct_and_freed_in_another_thread)
{
    /* A small arena: a test does not need a GiB to use it all up. */
    size_t arena = caller__arena_limit_blocks(ARENA_FOR_TESTS);
    size_t n = arena + 3000; /* past the arena: the rest from malloc */
    void **b = malloc(n * sizeof *b);
    CHECK(b != NULL);
    size_t from_arena = 0;
    for (size_t i = 0; i < n; i++) {
        b[i] = caller__block_alloc();
        CHECK(b[i] != NULL);
        stamp(b[i], i);
        from_arena += caller__block_in_arena(b[i]);
    }
    /* This process made no other blocks: the arena gave all it has. */
    CHECK_EQ(from_arena, arena);
    for (size_t i = 0; i < n; i++)
        CHECK(stamped(b[i], i));
    void **sorted = malloc(n * sizeof *sorted);
    CHECK(sorted != NULL);
    memcpy(sorted, b, n * sizeof *b);
    qsort(sorted, n, sizeof *sorted, by_address);
    for (size_t i = 1; i < n; i++)
        CHECK((uintptr_t)sorted[i] - (uintptr_t)sorted[i - 1] >= CALLER__BLOCK_SIZE);
    free(sorted);
    /* Freed by another thread: its list goes to the shared stack when it
     * ends. */
    pthread_t th;
    chunk_t all = {b, n};
    CHECK_EQ(pthread_create(&th, NULL, free_chunk, &all), 0);
    CHECK_EQ(pthread_join(th, NULL), 0);
    /* Blocks are made again, from the cache first. */
    size_t again = 0;
    for (size_t i = 0; i < 1000; i++) {
        b[i] = caller__block_alloc();
        CHECK(b[i] != NULL);
        stamp(b[i], ~i);
        again += caller__block_in_arena(b[i]);
    }
    if (arena)
        CHECK_EQ(again, 1000); /* the arena's blocks were kept for reuse */
    for (size_t i = 0; i < 1000; i++) {
        CHECK(stamped(b[i], ~i));
        caller__block_free(b[i]);
    }
    free(b);
}

enum { THREADS = 4, ROUNDS = 200, PER_ROUND = 500 };

static _Atomic(void *) ring[THREADS][PER_ROUND];

/* Each thread makes blocks, stamps them and hands them to its neighbour,
 * which checks and frees them: blocks cross threads all the time. */
static void *stress(void *arg)
{
    int id = (int)(intptr_t)arg;
    int next = (id + 1) % THREADS;
    long bad = 0;
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < PER_ROUND; i++) {
            void *b = caller__block_alloc();
            if (!b)
                return (void *)(intptr_t)-1;
            uintptr_t tag = ((uintptr_t)id << 40) | ((uintptr_t)r << 16) | (uintptr_t)i;
            stamp(b, tag); /* its first word is the tag itself */
            /* Take what the previous thread handed us, if anything, and
             * hand ours on if the neighbour took the last one. */
            void *mine = atomic_exchange(&ring[id][i], NULL);
            if (mine) {
                /* Still exactly as its maker wrote it: no other thread
                 * was given the same block meanwhile. */
                uintptr_t t = ((uintptr_t *)mine)[0];
                bad += !stamped(mine, t) || (int)(t >> 40) != (id + THREADS - 1) % THREADS;
                caller__block_free(mine);
            }
            void *empty = NULL;
            if (!atomic_compare_exchange_strong(&ring[next][i], &empty, b))
                caller__block_free(b); /* the neighbour has not taken the last one yet */
        }
    }
    return (void *)(intptr_t)bad;
}

TEST(blocks_cross_threads_under_stress)
{
    pthread_t th[THREADS];
    caller__arena_limit_blocks(ARENA_FOR_TESTS);
    for (int i = 0; i < THREADS; i++)
        CHECK_EQ(pthread_create(&th[i], NULL, stress, (void *)(intptr_t)i), 0);
    for (int i = 0; i < THREADS; i++) {
        void *rc;
        CHECK_EQ(pthread_join(th[i], &rc), 0);
        CHECK_EQ((intptr_t)rc, 0);
    }
    for (int t = 0; t < THREADS; t++)
        for (int i = 0; i < PER_ROUND; i++) {
            void *b = atomic_exchange(&ring[t][i], NULL);
            if (b)
                caller__block_free(b);
        }
}

/* Large areas: zeroed, writable end to end, given back; small ones too. */
TEST(big_areas_are_zeroed_and_writable)
{
    size_t sizes[] = {100, CALLER__BIG_SIZE - 1, CALLER__BIG_SIZE, 3 * CALLER__BIG_SIZE + 12345};
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        unsigned char *p = caller__big_alloc(sizes[k]);
        CHECK(p != NULL);
        for (size_t i = 0; i < sizes[k]; i += 997)
            CHECK_EQ(p[i], 0);
        CHECK_EQ(p[sizes[k] - 1], 0);
        memset(p, 0xa5, sizes[k]);
        CHECK_EQ(p[sizes[k] - 1], 0xa5);
        caller__big_free(p, sizes[k]);
    }
    caller__big_free(NULL, 1);
}
