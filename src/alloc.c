/*
 * The library's one allocation path (see internal.h). The allocation-
 * failure tests make the N-th allocation from now fail through
 * caller__alloc_fail_after(); otherwise this costs one relaxed load.
 */
#include "alloc.h"
#include "error.h"
#include "testpoint.h"
#include "lockorder.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/mman.h>
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

/*
 * The allocator (caller_replace_allocator). `allocated` turns 1, under
 * `allocator_lock`, at the library's first allocation; a replacement is
 * refused from then on, so every block is freed by the allocator that made
 * it. The functions are written only while `allocated` is 0 (under the
 * lock) and read after it was seen 1 (acquire), so they never change under
 * a reader.
 */
static struct {
    caller_malloc_fn malloc;
    caller_realloc_fn realloc;
    caller_calloc_fn calloc;
    caller_free_fn free;
} allocator = {malloc, realloc, calloc, free};
static atomic_int allocated;
static pthread_mutex_t allocator_lock = PTHREAD_MUTEX_INITIALIZER;

static void first_allocation(void)
{
    pthread_mutex_lock(&allocator_lock);
    atomic_store_explicit(&allocated, 1, memory_order_release);
    pthread_mutex_unlock(&allocator_lock);
}

/* Before each allocation: from here on the allocator stays. */
static inline void allocating(void)
{
    if (__builtin_expect(!atomic_load_explicit(&allocated, memory_order_acquire), 0))
        first_allocation();
}

int caller_replace_allocator(caller_malloc_fn malloc_fn, caller_realloc_fn realloc_fn,
                             caller_calloc_fn calloc_fn, caller_free_fn free_fn)
{
    if (!malloc_fn || !realloc_fn || !calloc_fn || !free_fn)
        return caller__fail(-EINVAL, "caller_replace_allocator: a function is NULL");
    pthread_mutex_lock(&allocator_lock);
    bool late = atomic_load_explicit(&allocated, memory_order_relaxed);
    if (!late) {
        allocator.malloc = malloc_fn;
        allocator.realloc = realloc_fn;
        allocator.calloc = calloc_fn;
        allocator.free = free_fn;
    }
    pthread_mutex_unlock(&allocator_lock);
    if (late)
        return caller__fail(-EBUSY, "caller_replace_allocator: the library has allocated "
                                    "memory already; call it before any other libcaller "
                                    "function");
    return 0;
}

void *caller__malloc(size_t size)
{
    allocating();
    return inject() ? NULL : allocator.malloc(size);
}

void *caller__calloc(size_t n, size_t size)
{
    allocating();
    return inject() ? NULL : allocator.calloc(n, size);
}

void *caller__realloc(void *ptr, size_t size)
{
    allocating();
    return inject() ? NULL : allocator.realloc(ptr, size);
}

void caller__free(void *ptr)
{
    if (ptr)
        allocator.free(ptr);
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

/* ---- large areas ------------------------------------------------------ */

#if CALLER__ASAN
#define BIG_MAPPED 0 /* ASan sees malloc'd memory only */
#else
#define BIG_MAPPED 1
#endif

#define AREA_STEP ((size_t)2 << 20)

/* Bytes mapped for an area of @p size: a whole number of 2 MiB steps. */
static size_t big_span(size_t size)
{
    return (size + AREA_STEP - 1) / AREA_STEP * AREA_STEP;
}

/*
 * A private anonymous mapping of @p span bytes (zeroed), or NULL. @p flags:
 * extra mmap flags.
 *
 * Not advised for transparent huge pages, by measurement. On this kind of
 * virtual machine (the guest hands free memory back to its host: free page
 * reporting of 8 MiB blocks) the first touch of a 2 MiB page costs 0.05 or
 * 1.5 ms depending on whether the host still backs it, which depends on
 * what other processes freed in the last seconds: 54 MiB took 5-164 ms in
 * back-to-back fresh processes, against a steady 21-33 ms with 4 KiB pages.
 * In the benchmarks that made the figures bimodal (W1 191-643 ns per task,
 * W6 copy-stack 50-463 ms) where 4 KiB pages give 239-331 and 114-150; the
 * medians of W1, W3 and W4 all-submitted (940 -> 630 ns) were as good or
 * better with 4 KiB pages, and a small program's RSS does not round up to
 * 2 MiB steps (W4: 2.6 MB instead of 4.6).
 */
static void *map_area(size_t span, int flags)
{
    char *p = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | flags, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

void *caller__big_alloc(size_t size)
{
    if (!BIG_MAPPED || size < CALLER__BIG_SIZE)
        return caller__calloc(1, size);
    return inject() ? NULL : map_area(big_span(size), 0);
}

void caller__big_free(void *p, size_t size)
{
    if (!p)
        return;
    if (!BIG_MAPPED || size < CALLER__BIG_SIZE)
        caller__free(p);
    else
        munmap(p, big_span(size));
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
 * Fresh blocks come from the arena, not from malloc: one region of
 * ARENA_BYTES, reserved at the first need (map_area: 4 KiB pages, see
 * there), carved in order so that the pages touched are the blocks used.
 * A fresh block costs the first touch of its memory, about 0.4-0.5 ns per
 * byte on this kind of virtual machine (a 4 KiB page fault, 1.6-2.3 µs),
 * paid by the thread that submits the calls. Blocks carved from
 * the arena are never given back to the system, only cached and reused
 * (kept even past MAX_BATCHES): its touched pages are the high-water mark
 * of blocks alive at once, at most ARENA_BYTES. Once it is used up, fresh
 * blocks come from caller__malloc as before. Under ASan there is no arena:
 * every block is malloc'd, so LeakSanitizer still reports a leaked one.
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

#define ARENA_BYTES ((size_t)1 << 30)
#define ARENA_STRIDE 192 /* a block per 192 bytes: three cache lines, never shared */
_Static_assert(CALLER__BLOCK_SIZE <= ARENA_STRIDE, "a block fits its slot in the arena");

#if CALLER__ASAN
#define ARENA 0
#else
#define ARENA 1
#endif

typedef struct block {
    struct block *next;       /* in a thread's list or a batch */
    struct block *next_batch; /* first block of a batch: the next batch */
    unsigned count;           /* first block of a batch: blocks in it */
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

/* The arena (under batches_lock, but `arena` is read without it by
 * in_arena(): set once, before any block of it exists). */
static _Atomic(char *) arena;
static size_t arena_used; /* bytes carved so far */
static bool arena_failed; /* no region could be reserved: do not retry */
#if CALLER_TESTING
static size_t arena_limit = ARENA_BYTES; /* tests carve from less of it */
#else
#define arena_limit ARENA_BYTES
#endif

/* Is @p b a block of the arena (never to be freed)? */
static inline bool in_arena(const void *b)
{
    char *base = atomic_load_explicit(&arena, memory_order_relaxed);
    return base && (uintptr_t)b - (uintptr_t)base < ARENA_BYTES;
}

/* Under batches_lock: up to BATCH fresh blocks from the arena, linked by
 * next (*n gets how many), or NULL once it is used up. */
static block_t *carve_locked(unsigned *n)
{
    *n = 0;
    if (!ARENA || arena_failed)
        return NULL;
    char *base = atomic_load_explicit(&arena, memory_order_relaxed);
    if (!base) {
        base = map_area(ARENA_BYTES, MAP_NORESERVE);
        if (!base) {
            arena_failed = true;
            return NULL;
        }
        atomic_store_explicit(&arena, base, memory_order_relaxed);
    }
    block_t *first = NULL, **tail = &first;
    while (*n < BATCH && arena_used + ARENA_STRIDE <= arena_limit) {
        block_t *b = (block_t *)(base + arena_used);
        arena_used += ARENA_STRIDE;
        *tail = b;
        tail = &b->next;
        ++*n;
    }
    *tail = NULL;
    return first;
}

/* Under batches_lock: push a chain of @p n blocks onto the stack. Its count
 * goes with it, so that the thread taking it need not walk the chain: its
 * blocks were last written by another core, and counting them was a chain
 * of dependent cache misses (64 per batch, most of caller__block_alloc's
 * time in W3). */
static void push_batch_locked(block_t *first, unsigned n)
{
    first->count = n;
    first->next_batch = batches;
    batches = first;
    atomic_store_explicit(&nbatches, atomic_load_explicit(&nbatches, memory_order_relaxed) + 1,
                          memory_order_relaxed);
}

/* Free the malloc'd blocks of a chain linked by next; the arena's are kept
 * (returned as a chain, or NULL; *n gets how many). */
static block_t *free_chain(block_t *b, unsigned *n)
{
    block_t *kept = NULL;
    *n = 0;
    while (b) {
        block_t *next = b->next;
        if (in_arena(b)) {
            b->next = kept;
            kept = b;
            ++*n;
        } else {
            UNPOISON(b);
            caller__free(b);
        }
        b = next;
    }
    return kept;
}

/* Give a chain of @p n (at most BATCH) blocks to the stack; past
 * MAX_BATCHES, free its malloc'd blocks and give only the arena's. */
static void give_batch(block_t *first, unsigned n)
{
    pthread_mutex_lock(&batches_lock);
    bool kept = atomic_load_explicit(&nbatches, memory_order_relaxed) < MAX_BATCHES;
    if (kept)
        push_batch_locked(first, n);
    pthread_mutex_unlock(&batches_lock);
    if (kept)
        return;
    first = free_chain(first, &n);
    if (first) {
        pthread_mutex_lock(&batches_lock);
        push_batch_locked(first, n);
        pthread_mutex_unlock(&batches_lock);
    }
}

/* Detach up to BATCH blocks from the head of @p bc's list (*n: how many). */
static block_t *take_from_list(block_cache_t *bc, unsigned *n)
{
    block_t *first = bc->head, *last = first;
    *n = 1;
    for (; *n < BATCH && last->next; ++*n)
        last = last->next;
    bc->head = last->next;
    bc->n -= *n;
    last->next = NULL;
    return first;
}

static void blocks_thread_end(void *arg)
{
    block_cache_t *bc = arg;
    bc->dead = true; /* later frees in this thread's exit bypass its list */
    while (bc->head) {
        unsigned n;
        block_t *first = take_from_list(bc, &n);
        give_batch(first, n);
    }
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
    /* A batch from the stack, else fresh ones from the arena: the lock is
     * taken once per BATCH blocks. */
    if (!bc->head && !bc->dead &&
        (ARENA || atomic_load_explicit(&nbatches, memory_order_relaxed))) {
        if (!bc->registered)
            blocks_register(bc);
        unsigned n = 0;
        pthread_mutex_lock(&batches_lock);
        block_t *b = batches;
        if (b) {
            batches = b->next_batch;
            atomic_store_explicit(&nbatches,
                                  atomic_load_explicit(&nbatches, memory_order_relaxed) - 1,
                                  memory_order_relaxed);
            n = b->count;
        } else {
            b = carve_locked(&n);
        }
        pthread_mutex_unlock(&batches_lock);
        bc->head = b;
        bc->n = n;
    }
    block_t *b = bc->head;
    if (!b)
        return caller__malloc(CALLER__BLOCK_SIZE);
    bc->head = b->next;
    bc->n--;
    /* The next one is likely in another core's cache (freed there): ask
     * for its line now, not when the next call needs it. */
    if (bc->head)
        __builtin_prefetch(bc->head, 1);
    UNPOISON(b);
    return b;
}

void caller__block_free(void *p)
{
    if (!p)
        return;
    block_cache_t *bc = &tl_blocks;
    if (bc->dead) { /* the thread is ending: no list */
        block_t *b = p;
        b->next = NULL;
        if (in_arena(b))
            give_batch(b, 1);
        else
            caller__free(b);
        return;
    }
    if (!bc->registered)
        blocks_register(bc);
    block_t *b = p;
    b->next = bc->head;
    bc->head = b;
    POISON(b);
    if (++bc->n >= 2 * BATCH) {
        unsigned n;
        block_t *first = take_from_list(bc, &n);
        give_batch(first, n);
    }
}

#if CALLER_TESTING
bool caller__block_in_arena(const void *p)
{
    return in_arena(p);
}

size_t caller__arena_limit_blocks(size_t blocks)
{
    pthread_mutex_lock(&batches_lock);
    if (blocks * ARENA_STRIDE < arena_limit)
        arena_limit = blocks * ARENA_STRIDE > arena_used ? blocks * ARENA_STRIDE : arena_used;
    size_t n = ARENA ? arena_limit / ARENA_STRIDE : 0;
    pthread_mutex_unlock(&batches_lock);
    return n;
}
#endif

void caller__alloc_fork(int phase)
{
    if (phase == 0)
        pthread_mutex_lock(&batches_lock);
    else if (phase == 1)
        pthread_mutex_unlock(&batches_lock);
    else
        pthread_mutex_init(&batches_lock, NULL);
}
