/*
 * The library's one allocation path (see internal.h). The allocation-
 * failure tests make the N-th allocation from now fail through
 * caller__alloc_fail_after(); otherwise this costs one relaxed load.
 */
#include "alloc.h"
#include "testpoint.h"
#include "lockorder.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if CALLER__CHECK_LOCK_ORDER
/* lockorder.h: the locks of each rank this thread holds. */
_Thread_local unsigned char caller__held[CALLER__RANK_COUNT];
#endif

#if CALLER_TESTING
/* The test build's test points (testpoint.h) share this file. */
_Atomic(caller__test_hook_fn) caller__test_hook;

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
#else
/* The shipped library injects nothing. */
#define inject() false
#endif

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

/* ---- the task-block cache ----------------------------------------------- */

/*
 * Blocks of CALLER__BLOCK_SIZE (a Pending with its task) cached per thread,
 * moved between threads in batches (tcmalloc's transfer cache). A task's
 * block is usually made by the submitting thread and freed by the Caller's
 * thread; through glibc each such free took the allocating arena's lock
 * against the submitter's next malloc (perf on W3: futex waits in
 * __lll_lock_wait_private on both threads). Here a free goes to this
 * thread's list; past 2 * BATCH blocks, BATCH of them go to a global stack
 * of batches under one lock; an allocation takes from this thread's list,
 * else a whole batch from the stack, else calls caller__malloc. So the lock
 * is taken once per BATCH blocks, and a miss is an ordinary allocation
 * (injected failures reach it). While a failure countdown is armed
 * (caller__alloc_fail_after) allocations bypass the cache, so the
 * allocation tests see every allocation as before.
 *
 * Bounded: at most 2 * BATCH blocks per thread and MAX_BATCHES batches in
 * the stack; beyond that blocks are freed. A thread's list goes to the
 * stack (or is freed) when the thread ends. Under ASan a cached block is
 * poisoned past its links, so a use after free is still reported.
 *
 * Lock order: batches_lock is a leaf.
 */

#if CALLER__ASAN /* internal.h */
#include <sanitizer/asan_interface.h>
#define POISON(b)                                                                                  \
    ASAN_POISON_MEMORY_REGION((char *)(b) + sizeof(block_t), CALLER__BLOCK_SIZE - sizeof(block_t))
#define UNPOISON(b) ASAN_UNPOISON_MEMORY_REGION((b), CALLER__BLOCK_SIZE)
#else
#define POISON(b) ((void)(b))
#define UNPOISON(b) ((void)(b))
#endif

enum { BATCH = 64, MAX_BATCHES = 32 };

typedef struct block {
    struct block *next;       /* in a thread's list or a batch */
    struct block *next_batch; /* first block of a batch: the next batch */
} block_t;

typedef struct {
    block_t *head;
    unsigned n;
    bool registered; /* the thread-exit destructor is set */
    bool dead;       /* the thread is ending: no more caching */
} block_cache_t;

static _Thread_local block_cache_t tl_blocks;
static pthread_mutex_t batches_lock = PTHREAD_MUTEX_INITIALIZER;
static block_t *batches;
static atomic_uint nbatches; /* changed under batches_lock; read as a hint without it */
static pthread_key_t blocks_key;
static pthread_once_t blocks_once = PTHREAD_ONCE_INIT;

_Static_assert(CALLER__BLOCK_SIZE >= sizeof(block_t), "a cached block holds its links");

/* Free a chain of blocks linked by next. */
static void free_chain(block_t *b)
{
    while (b) {
        block_t *next = b->next;
        UNPOISON(b);
        caller__free(b);
        b = next;
    }
}

/* Give a chain of at most BATCH blocks to the stack, or free it. */
static void give_batch(block_t *first)
{
    pthread_mutex_lock(&batches_lock);
    unsigned n = atomic_load_explicit(&nbatches, memory_order_relaxed);
    bool kept = n < MAX_BATCHES;
    if (kept) {
        first->next_batch = batches;
        batches = first;
        atomic_store_explicit(&nbatches, n + 1, memory_order_relaxed);
    }
    pthread_mutex_unlock(&batches_lock);
    if (!kept)
        free_chain(first);
}

/* Detach up to BATCH blocks from the head of @p bc's list. */
static block_t *take_from_list(block_cache_t *bc)
{
    block_t *first = bc->head, *last = first;
    unsigned n = 1;
    for (; n < BATCH && last->next; n++)
        last = last->next;
    bc->head = last->next;
    bc->n -= n;
    last->next = NULL;
    return first;
}

static void blocks_thread_end(void *arg)
{
    block_cache_t *bc = arg;
    bc->dead = true; /* later frees in this thread's exit go to free() */
    while (bc->head)
        give_batch(take_from_list(bc));
}

static void blocks_key_init(void)
{
    pthread_key_create(&blocks_key, blocks_thread_end);
}

/* Before this thread's list first holds a block: have it emptied when the
 * thread ends. */
static void blocks_register(block_cache_t *bc)
{
    pthread_once(&blocks_once, blocks_key_init);
    pthread_setspecific(blocks_key, bc);
    bc->registered = true;
}

void *caller__block_alloc(void)
{
    block_cache_t *bc = &tl_blocks;
#if CALLER_TESTING
    if (atomic_load_explicit(&countdown, memory_order_relaxed) >= 0)
        return caller__malloc(CALLER__BLOCK_SIZE);
#endif
    /* The hint spares a thread that only allocates (W1's first 10^6) the
     * lock while the stack is empty. */
    if (!bc->head && !bc->dead && atomic_load_explicit(&nbatches, memory_order_relaxed)) {
        if (!bc->registered)
            blocks_register(bc);
        pthread_mutex_lock(&batches_lock);
        block_t *b = batches;
        if (b) {
            batches = b->next_batch;
            atomic_store_explicit(&nbatches,
                                  atomic_load_explicit(&nbatches, memory_order_relaxed) - 1,
                                  memory_order_relaxed);
        }
        pthread_mutex_unlock(&batches_lock);
        if (b) {
            unsigned n = 0;
            for (block_t *x = b; x; x = x->next)
                n++;
            bc->head = b;
            bc->n = n;
        }
    }
    block_t *b = bc->head;
    if (!b)
        return caller__malloc(CALLER__BLOCK_SIZE);
    bc->head = b->next;
    bc->n--;
    UNPOISON(b);
    return b;
}

void caller__block_free(void *p)
{
    if (!p)
        return;
    block_cache_t *bc = &tl_blocks;
    if (bc->dead) {
        caller__free(p);
        return;
    }
    if (!bc->registered)
        blocks_register(bc);
    block_t *b = p;
    b->next = bc->head;
    bc->head = b;
    POISON(b);
    if (++bc->n >= 2 * BATCH)
        give_batch(take_from_list(bc));
}

void caller__alloc_fork(int phase)
{
    if (phase == 0)
        pthread_mutex_lock(&batches_lock);
    else if (phase == 1)
        pthread_mutex_unlock(&batches_lock);
    else
        pthread_mutex_init(&batches_lock, NULL);
}
