/*
 * Fibers: stacks with a guard page carved from mmap'd slabs, a per-thread
 * stack cache, and the switch between a thread's scheduler context and its
 * fibers (see fiber.h).
 *
 * Running, switching and the cache are thread-local (struct fiber_thread),
 * without locks. Two things are process-wide, each under its own lock and
 * touched only on a cache miss or overflow: the stack pool (see "the stack
 * pool" below) and, under TSan only, the set of TSan fiber contexts (see
 * fiber_tsan_attach).
 *
 * Tool annotations, as in QEMU's util/coroutine-ucontext.c:
 *  - ASan: __sanitizer_start_switch_fiber before every switch and
 *    __sanitizer_finish_switch_fiber right after it, on the side that
 *    resumes. The final switch out of a finished fiber passes NULL as the
 *    fake-stack save, so ASan frees that fiber's fake stack.
 *  - TSan: a TSan fiber context lent to each live fiber (see
 *    fiber_tsan_attach), __tsan_switch_to_fiber(ctx, 0) right before every
 *    switch. Flag 0 makes each switch a happens-before edge, which is the
 *    truth: the fibers of a thread run one at a time.
 *  - valgrind: VALGRIND_STACK_REGISTER at mmap, _DEREGISTER at munmap, so
 *    memcheck knows the stack pointer moving between stacks is a switch.
 *
 * The switch functions are written so that every frame the sanitizers
 * instrument is entered and left on the same context. In particular a
 * fiber's main function returns normally into the trampoline, and the
 * final switch is done by fiber_exit, which TSan does not instrument: were
 * it instrumented, its __tsan_func_entry would never be matched by an exit,
 * and a reused stack's TSan context would gain a shadow frame per run.
 */
#include "fiber.h"
#include "alloc.h"
#include "error.h"
#include "sync.h"

#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

/* ---- which switch ------------------------------------------------------- */

#if defined(CALLER_FIBER_UCONTEXT) && CALLER_FIBER_UCONTEXT
#define FIBER_ASM 0
#elif defined(__LP64__) && (defined(__x86_64__) || defined(__aarch64__))
#define FIBER_ASM 1
#else
#define FIBER_ASM 0
#endif

#if !FIBER_ASM
#include <ucontext.h>
#endif

/* ---- which tools -------------------------------------------------------- */

#define FIBER_ASAN CALLER__ASAN /* internal.h */
#define FIBER_TSAN CALLER__TSAN
#if FIBER_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if FIBER_TSAN
#include <pthread.h>
#include <sanitizer/tsan_interface.h>
#include <stdatomic.h>
#endif

#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define FIBER_VALGRIND 1
#endif
#endif
#ifndef FIBER_VALGRIND
#define FIBER_VALGRIND 0
#endif

/* No TSan instrumentation at all, not even __tsan_func_entry/exit, for the
 * functions that switch away and never return (see the top of the file).
 * GCC's no_sanitize_thread removes everything; clang's no_sanitize("thread")
 * keeps function entry/exit, so clang needs disable_sanitizer_instrumentation
 * (clang >= 14). */
#if defined(__clang__) && defined(__has_attribute)
#if __has_attribute(disable_sanitizer_instrumentation)
#define FIBER_NO_TSAN_FRAME __attribute__((disable_sanitizer_instrumentation))
#endif
#endif
#ifndef FIBER_NO_TSAN_FRAME
#define FIBER_NO_TSAN_FRAME __attribute__((no_sanitize_thread))
#endif

/* ---- state -------------------------------------------------------------- */

struct fiber_thread;

struct caller__fiber {
#if FIBER_ASM
    void *sp; /* saved stack pointer while not running (switch_*.S) */
#else
    ucontext_t uc;
#endif
    caller__fiber_fn fn; /* NULL while cached */
    void *arg;
    struct fiber_thread *owner; /* the thread it belongs to */
    caller__fiber_t *next;      /* in the owner's cache */
    struct stack_slab *slab;    /* the slab its slot is in */
    char *map;                  /* its slot: guard page, stack, then this struct */
    char *stack_lo;             /* lowest usable byte; the stack's top is this struct */
    size_t stack_size;          /* size asked for, rounded up to pages: the cache key */
    bool started;
    bool finished;
    bool copied; /* runs on its thread's run stack (copy-stack mode) */
    char *saved; /* copied: its used stack while another fiber has the run stack */
    size_t saved_len, saved_cap;
#if !FIBER_ASM
    char *save_from; /* copied: the lowest live byte of its stack when it yielded */
#endif
    void *slot; /* caller__fiber_slot() */
    _Alignas(16) unsigned char park[CALLER__FIBER_PARK_SIZE];
#if FIBER_ASAN
    void *fake_stack; /* ASan's fake stack of this fiber while suspended */
#endif
#if FIBER_TSAN
    void *tsan;
    bool tsan_shared; /* tsan is the thread's shared context */
#endif
#if FIBER_VALGRIND
    unsigned vg_stack;
#endif
};

struct fiber_thread {
    caller__fiber_t *current; /* running fiber; NULL on the scheduler context */
    void *sched_slot;         /* caller__fiber_slot() on the scheduler context */
    /* Copy-stack mode: the run stack (a slot of its own, the struct at its
     * top unused but for the bounds), the copied fiber whose bytes are on
     * it now, and how many copied fibers live. */
    caller__fiber_t *run;
    caller__fiber_t *resident;
    size_t copied_live;
    struct save_arena *save; /* the copied fibers' buffers (see fiber_save_alloc) */
    void *altstack;          /* the overflow handler's signal stack, or NULL */
    caller__fiber_t *cache;  /* finished fibers, most recently freed first */
    size_t cached;
    size_t mapped;
    size_t page;
#if FIBER_ASM
    void *sched_sp; /* the scheduler context while a fiber runs */
#else
    ucontext_t sched_uc;
#endif
#if FIBER_ASAN
    void *sched_fake_stack;
    const void *sched_bottom; /* the scheduler's stack, as ASan told us */
    size_t sched_size;
#endif
#if FIBER_TSAN
    void *sched_tsan;
    void *tsan_shared;
    size_t tsan_shared_refs;
#endif
};

static _Thread_local struct fiber_thread fiber_thread;

/* A copied fiber's struct is a block (alloc.h) where it fits one. */
#define COPIED_IN_BLOCK (sizeof(caller__fiber_t) <= CALLER__BLOCK_SIZE)

#if FIBER_ASM
/* src/switch_<arch>.S */
void *caller__fiber_asm_init(void *top, void *arg, void (*main)(void *), void (*exit)(void *));
void caller__fiber_asm_switch(void **save_sp, void *sp);
#endif

__attribute__((noreturn, cold)) static void fiber_misuse(const char *what)
{
    fprintf(stderr, "libcaller: fiber misuse: %s\n", what);
    fflush(stderr);
    abort();
}

/* The top of f's stack: its struct, or for a copied fiber the run stack's. */
static char *fiber_top(const caller__fiber_t *f)
{
    return f->copied ? (char *)f->owner->run : (char *)f;
}

#if FIBER_ASAN || !FIBER_ASM
static size_t fiber_stack_bytes(const caller__fiber_t *f)
{
    return (size_t)(fiber_top(f) - f->stack_lo);
}
#endif

/* ---- TSan contexts ------------------------------------------------------ */

#if FIBER_TSAN
/*
 * A TSan fiber context is expensive in GCC 12's runtime: about 0.8 MB of
 * resident memory and 0.8 ms to create, and the runtime counts each as a
 * thread and dies ("Thread limit (8128 threads) exceeded") past 8128 of
 * them, while a program may well keep more tasks suspended at once. So the
 * process makes at most FIBER_TSAN_OWN_MAX contexts, never destroys them,
 * and lends them to fibers while they run or are suspended (from
 * caller__fiber_new to caller__fiber_free; a cached stack holds none).
 * Past that many live fibers, the others share one context per thread.
 * Sharing is correct but costly: fibers of one thread are ordered by the
 * switches whichever context they use, and since every instrumented frame
 * of a fiber returns before its final switch, a shared context's shadow
 * stack holds only the frames of its live fibers — but interleaved, so the
 * stack traces in reports from those fibers are mixed, and each allocation
 * made there records a new, unique stack in TSan's (never freed) stack
 * depot. Lending the contexts to live fibers only keeps sharing rare: when
 * contexts stayed with cached stacks, a load test spent most of them on
 * stacks in thread caches and its stack depot grew to gigabytes.
 */
#define FIBER_TSAN_OWN_MAX 512
static struct {
    caller__lock_t lock;
    size_t made, idle;
    void *free[FIBER_TSAN_OWN_MAX];
} tsan_ctx = {.lock = CALLER__LOCK_INIT};

/*
 * TSan counts each context as a live thread, and its exit (exit or _exit)
 * sleeps a second (atexit_sleep_ms) when other threads live. So the idle
 * contexts are destroyed at exit, and as a Caller's thread ends when no
 * fiber holds one (a process's Callers are done, typically; were more to
 * come, they make contexts again, 0.8 ms each).
 */
static void fiber_tsan_drop_idle(bool only_if_none_lent)
{
    caller__lock(&tsan_ctx.lock);
    if (!only_if_none_lent || tsan_ctx.made == tsan_ctx.idle) {
        while (tsan_ctx.idle) {
            __tsan_destroy_fiber(tsan_ctx.free[--tsan_ctx.idle]);
            tsan_ctx.made--;
        }
    }
    caller__unlock(&tsan_ctx.lock);
}

static void fiber_tsan_at_exit(void)
{
    fiber_tsan_drop_idle(false);
}

static void fiber_tsan_at_exit_register(void)
{
    atexit(fiber_tsan_at_exit); /* after TSan's own: runs before it */
}

static void fiber_tsan_attach(struct fiber_thread *t, caller__fiber_t *f)
{
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, fiber_tsan_at_exit_register);
    void *ctx = NULL;
    bool make = false;
    caller__lock(&tsan_ctx.lock);
    if (tsan_ctx.idle)
        ctx = tsan_ctx.free[--tsan_ctx.idle];
    else if (tsan_ctx.made < FIBER_TSAN_OWN_MAX)
        make = true, tsan_ctx.made++;
    caller__unlock(&tsan_ctx.lock);
    if (make)
        ctx = __tsan_create_fiber(0);
    if (ctx) {
        f->tsan = ctx;
        f->tsan_shared = false;
        return;
    }
    if (!t->tsan_shared)
        t->tsan_shared = __tsan_create_fiber(0);
    t->tsan_shared_refs++;
    f->tsan = t->tsan_shared;
    f->tsan_shared = true;
}

/* Never called for the running fiber's context: a fiber being freed has
 * finished (or never started), and while any fiber using the shared
 * context lives, it holds a reference. */
static void fiber_tsan_detach(struct fiber_thread *t, caller__fiber_t *f)
{
    if (!f->tsan_shared) {
        caller__lock(&tsan_ctx.lock);
        tsan_ctx.free[tsan_ctx.idle++] = f->tsan;
        caller__unlock(&tsan_ctx.lock);
    } else if (--t->tsan_shared_refs == 0) {
        __tsan_destroy_fiber(t->tsan_shared);
        t->tsan_shared = NULL;
    }
    f->tsan = NULL;
}
#endif

/* ---- stacks ------------------------------------------------------------- */

static size_t fiber_page(struct fiber_thread *t)
{
    if (!t->page)
        t->page = (size_t)sysconf(_SC_PAGESIZE);
    return t->page;
}

/*
 * Make the first page of a fresh mapping a guard page. Where the kernel has
 * them (Linux 6.13+), a "guard region" (madvise MADV_GUARD_INSTALL) faults
 * like PROT_NONE but does not split the mapping: neighbouring stacks then
 * merge into one VMA, so 100 000 suspended tasks stay far below the
 * kernel's vm.max_map_count (65 530 by default), which a PROT_NONE page per
 * stack — two VMAs per stack — would exceed at about 32 000. Older kernels:
 * mprotect.
 */
#ifndef MADV_GUARD_INSTALL
#define MADV_GUARD_INSTALL 102
#endif

static bool guard_page(char *map, size_t page)
{
    static atomic_int no_guard_regions;
    if (!atomic_load_explicit(&no_guard_regions, memory_order_relaxed)) {
        if (madvise(map, page, MADV_GUARD_INSTALL) == 0)
            return true;
        if (errno != EINVAL)
            return false;
        atomic_store_explicit(&no_guard_regions, 1, memory_order_relaxed);
    }
    return mprotect(map, page, PROT_NONE) == 0;
}

/* ---- the stack pool ------------------------------------------------------ */

/*
 * Stacks are carved from slabs: one mapping holds a header page and up to
 * SLAB_SLOTS_MAX slots, each [guard page][stack][fiber struct]. A slab's
 * guards are installed once, when it is mapped, and stay when its pages are
 * dropped, so handing a slot out again costs no system call. The pool is
 * process-wide, one lock, and sits behind each thread's cache: a thread
 * takes from it when its cache is empty and gives back when its cache is
 * full (or the thread's Caller ends).
 *
 * Why slabs rather than one mapping per stack: mapping and unmapping a
 * stack per fresh task was most of the cost of a burst of suspended tasks
 * (munmap alone ~40% of W6, which splits merged VMAs), and under TSan every
 * mapping at a new address leaves a shadow mapping behind, so a long run
 * with many suspended tasks drifted to vm.max_map_count.
 *
 * Memory: a slot given back keeps its resident pages ("dirty"), so the next
 * task to take it faults nothing in; taking prefers dirty slots. Past
 * POOL_DIRTY_MAX dirty slots, the least recently used slabs' dirty slots
 * are dropped (MADV_DONTNEED, one call per run of adjacent slots) until
 * half that is left: each drop costs a TLB shootdown across the process's
 * CPUs, so they are batched. Wholly free slabs are kept, up to
 * POOL_EMPTY_MAX per stack size; the rest are unmapped.
 */
#define SLAB_SLOTS_MAX 64
#define SLAB_BYTES (16u << 20) /* fewer slots per slab for big stacks */
#define POOL_DIRTY_MAX 1024    /* dirty slots kept, per stack size */
#define POOL_EMPTY_MAX 64      /* wholly free slabs kept, per stack size */

struct stack_pool;

struct stack_slab {
    struct stack_slab *next, *prev; /* in pool->avail: slabs with a free slot */
    struct stack_pool *pool;
    char *slots;    /* the first slot, one page into the mapping */
    size_t size;    /* the whole mapping */
    unsigned count; /* slots */
    uint64_t free;  /* bit i set: slot i is in the pool */
    uint64_t dirty; /* free slots whose pages may be resident */
};

struct stack_pool {
    struct stack_pool *next; /* pools of other stack sizes */
    size_t stack_size, slot_size, page;
    struct stack_slab *avail; /* slabs with a free slot, last given to first */
    struct stack_slab *avail_tail;
    size_t dirty; /* dirty slots, all slabs */
    size_t empty; /* slabs with every slot free */
};

static struct {
    caller__lock_t lock;
    struct stack_pool *pools;
} pool = {.lock = CALLER__LOCK_INIT};

static uint64_t slab_full_mask(const struct stack_slab *s)
{
    return s->count == 64 ? ~(uint64_t)0 : ((uint64_t)1 << s->count) - 1;
}

static void slab_unlink(struct stack_slab *s)
{
    if (s->prev)
        s->prev->next = s->next;
    else
        s->pool->avail = s->next;
    if (s->next)
        s->next->prev = s->prev;
    else
        s->pool->avail_tail = s->prev;
    s->next = s->prev = NULL;
}

static void slab_push(struct stack_slab *s)
{
    s->prev = NULL;
    s->next = s->pool->avail;
    if (s->next)
        s->next->prev = s;
    else
        s->pool->avail_tail = s;
    s->pool->avail = s;
}

/* Bytes at a slot's top for the fiber struct (cache-line rounded). */
static size_t fiber_self_size(void)
{
    return (sizeof(caller__fiber_t) + 63) & ~(size_t)63;
}

/* Under the pool lock: the pool of stack_size, made if new (NULL: -ENOMEM). */
static struct stack_pool *pool_for(size_t stack_size, size_t page)
{
    for (struct stack_pool *p = pool.pools; p; p = p->next)
        if (p->stack_size == stack_size)
            return p;
    struct stack_pool *p = caller__calloc(1, sizeof *p);
    if (!p)
        return NULL;
    p->stack_size = stack_size;
    p->page = page;
    p->slot_size = page + stack_size + ((fiber_self_size() + page - 1) & ~(page - 1));
    p->next = pool.pools;
    pool.pools = p;
    return p;
}

/* Map a slab for p, guards installed (not under the lock). */
static struct stack_slab *slab_map(struct stack_pool *p, size_t page)
{
    size_t count = SLAB_BYTES / p->slot_size;
    count = count < 1 ? 1 : count > SLAB_SLOTS_MAX ? SLAB_SLOTS_MAX : count;
    if (p->slot_size > (SIZE_MAX - page) / count) {
        caller__fail(-ENOMEM, "cannot map a fiber stack of %zu bytes: too big", p->stack_size);
        return NULL;
    }
    size_t size = page + count * p->slot_size;
    /* MAP_NORESERVE: a stack is mostly never touched, so it should not
     * count against overcommit. MAP_STACK: no transparent huge pages. */
    char *map = mmap(NULL, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (map == MAP_FAILED) {
        caller__fail(-ENOMEM, "cannot map fiber stacks (%zu bytes): %s", size, strerror(errno));
        return NULL;
    }
    for (size_t i = 0; i < count; i++) {
        if (!guard_page(map + page + i * p->slot_size, page)) {
            int e = errno;
            munmap(map, size);
            caller__fail(-ENOMEM, "cannot protect a fiber stack's guard page: %s", strerror(e));
            return NULL;
        }
    }
    struct stack_slab *s = (struct stack_slab *)map;
    s->pool = p;
    s->slots = map + page;
    s->size = size;
    s->count = (unsigned)count;
    s->free = slab_full_mask(s);
    s->dirty = 0;
    s->next = s->prev = NULL;
    return s;
}

/* A free slot of stack_size's pool, or NULL (error set). */
static char *pool_take(size_t stack_size, size_t page, struct stack_slab **slab)
{
    caller__lock(&pool.lock);
    struct stack_pool *p = pool_for(stack_size, page);
    if (!p) {
        caller__unlock(&pool.lock);
        caller__fail(-ENOMEM, "cannot map a fiber stack of %zu bytes: out of memory", stack_size);
        return NULL;
    }
    struct stack_slab *s = p->avail;
    if (!s) {
        caller__unlock(&pool.lock);
        struct stack_slab *fresh = slab_map(p, page);
        if (!fresh)
            return NULL;
        caller__lock(&pool.lock);
        slab_push(fresh);
        p->empty++;
        s = fresh;
    }
    uint64_t pick = s->free & s->dirty ? s->free & s->dirty : s->free;
    unsigned i = (unsigned)__builtin_ctzll(pick);
    uint64_t bit = (uint64_t)1 << i;
    if (s->free == slab_full_mask(s))
        p->empty--;
    s->free &= ~bit;
    if (s->dirty & bit) {
        s->dirty &= ~bit;
        p->dirty--;
    }
    if (!s->free)
        slab_unlink(s);
    caller__unlock(&pool.lock);
    *slab = s;
    return s->slots + (size_t)i * p->slot_size;
}

/* Under the lock: drop the pages of s's dirty slots, one madvise per run of
 * adjacent slots (the guard pages between them stay guards). */
static void slab_purge(struct stack_slab *s)
{
    size_t slot_size = s->pool->slot_size, page = s->pool->page;
    uint64_t d = s->dirty;
    while (d) {
        unsigned i = (unsigned)__builtin_ctzll(d);
        unsigned j = i;
        while (j + 1 < s->count && (d >> (j + 1) & 1))
            j++;
        char *lo = s->slots + (size_t)i * slot_size + page;
        char *hi = s->slots + (size_t)(j + 1) * slot_size;
        madvise(lo, (size_t)(hi - lo), MADV_DONTNEED);
        d &= j + 1 < 64 ? ~(((uint64_t)1 << (j + 1)) - 1) : 0;
    }
    s->pool->dirty -= (size_t)__builtin_popcountll(s->dirty);
    s->dirty = 0;
}

/* Give slot (of slab s) back. */
static void pool_give(struct stack_slab *s, char *slot)
{
    struct stack_pool *p = s->pool;
    uint64_t bit = (uint64_t)1 << ((size_t)(slot - s->slots) / p->slot_size);
    struct stack_slab *unmap = NULL;
    caller__lock(&pool.lock);
    if (!s->free)
        slab_push(s);
    s->free |= bit;
    s->dirty |= bit;
    p->dirty++;
    if (s->free == slab_full_mask(s)) {
        if (p->empty >= POOL_EMPTY_MAX) {
            slab_unlink(s);
            p->dirty -= (size_t)__builtin_popcountll(s->dirty);
            unmap = s;
        } else {
            p->empty++;
        }
    }
    if (p->dirty > POOL_DIRTY_MAX) /* the least recently given to first */
        for (struct stack_slab *v = p->avail_tail; v && p->dirty > POOL_DIRTY_MAX / 2; v = v->prev)
            slab_purge(v);
    caller__unlock(&pool.lock);
    if (unmap)
        munmap(unmap, unmap->size);
}

void caller__fiber_fork(int phase)
{
    if (phase == 0) {
        caller__lock(&pool.lock);
#if FIBER_TSAN
        caller__lock(&tsan_ctx.lock);
#endif
    } else if (phase == 1) {
#if FIBER_TSAN
        caller__unlock(&tsan_ctx.lock);
#endif
        caller__unlock(&pool.lock);
    } else { /* the child: slots in use by the parent's other threads stay taken */
#if FIBER_TSAN
        /* Contexts made before the fork are not reused: TSan's state for
         * them (threads to it) does not carry over (a child reusing one
         * saw races between a fiber and its own scheduler). */
        tsan_ctx.idle = 0;
        tsan_ctx.made = 0;
        atomic_store(&tsan_ctx.lock, CALLER__LOCK_INIT);
#endif
        atomic_store(&pool.lock, CALLER__LOCK_INIT);
    }
}

/* A fiber on a slot: [guard page][stack of stack_size bytes][struct]. */
static caller__fiber_t *fiber_map(struct fiber_thread *t, size_t stack_size)
{
    size_t page = fiber_page(t);
    size_t self = fiber_self_size();
    struct stack_slab *slab;
    char *slot = pool_take(stack_size, page, &slab);
    if (!slot)
        return NULL;
    size_t size = slab->pool->slot_size;

    caller__fiber_t *f = (caller__fiber_t *)(slot + size - self);
    memset(f, 0, sizeof *f);
    f->owner = t;
    f->slab = slab;
    f->map = slot;
    f->stack_lo = slot + page;
    f->stack_size = stack_size;
#if FIBER_VALGRIND
    f->vg_stack = VALGRIND_STACK_REGISTER(f->stack_lo, (char *)f);
#endif
    t->mapped++;
    return f;
}

static void fiber_unmap(struct fiber_thread *t, caller__fiber_t *f)
{
    struct stack_slab *slab = f->slab;
    char *slot = f->map;
#if FIBER_VALGRIND
    VALGRIND_STACK_DEREGISTER(f->vg_stack);
#endif
#if FIBER_ASAN
    /* Leave no poisoned shadow behind for whatever runs here next. */
    ASAN_UNPOISON_MEMORY_REGION(f->stack_lo, fiber_stack_bytes(f));
#endif
    pool_give(slab, slot); /* f is gone from here on */
    t->mapped--;
}

static caller__fiber_t *fiber_cache_take(struct fiber_thread *t, size_t stack_size)
{
    for (caller__fiber_t **p = &t->cache; *p; p = &(*p)->next) {
        caller__fiber_t *f = *p;
        if (f->stack_size == stack_size) {
            *p = f->next;
            t->cached--;
            return f;
        }
    }
    return NULL;
}

/* ---- running ------------------------------------------------------------ */

/* The fiber's main function: called by the trampoline (or fiber_uc_entry) on
 * the fiber's stack, returns into it once fn has returned. */
__attribute__((noinline)) static void fiber_main(void *p)
{
    caller__fiber_t *f = p;
#if FIBER_ASAN
    struct fiber_thread *t = &fiber_thread;
    __sanitizer_finish_switch_fiber(NULL, &t->sched_bottom, &t->sched_size);
#endif
    f->fn(f->arg);
    f->finished = true;
}

/* The final switch out of a finished fiber. Its frame is abandoned on the
 * fiber's stack, which is why TSan must not instrument it. */
FIBER_NO_TSAN_FRAME __attribute__((noinline)) static void fiber_exit(void *p)
{
    caller__fiber_t *f = p;
    struct fiber_thread *t = &fiber_thread;
#if FIBER_ASAN
    __sanitizer_start_switch_fiber(NULL, t->sched_bottom, t->sched_size);
#endif
#if FIBER_TSAN
    __tsan_switch_to_fiber(t->sched_tsan, 0);
#endif
#if FIBER_ASM
    caller__fiber_asm_switch(&f->sp, t->sched_sp);
#else
    (void)f;
    setcontext(&t->sched_uc);
#endif
    fiber_misuse("a finished fiber was resumed");
}

#if !FIBER_ASM
/* makecontext passes int arguments only, so the fiber comes from
 * fiber_thread.current, set by caller__fiber_switch_to. */
FIBER_NO_TSAN_FRAME static void fiber_uc_entry(void)
{
    caller__fiber_t *f = fiber_thread.current;
    fiber_main(f);
    fiber_exit(f);
}
#endif

/* Build f's first frame at the top of its stack. */
static int fiber_build(caller__fiber_t *f)
{
#if FIBER_ASM
    f->sp = caller__fiber_asm_init(fiber_top(f), f, fiber_main, fiber_exit);
#else
    if (getcontext(&f->uc) != 0)
        return caller__fail(-errno, "getcontext: %s", strerror(errno));
    f->uc.uc_stack.ss_sp = f->stack_lo;
    f->uc.uc_stack.ss_size = fiber_stack_bytes(f);
    f->uc.uc_link = NULL;
    makecontext(&f->uc, fiber_uc_entry, 0);
#endif
    return 0;
}

/* Make f ready to run fn(arg) from its first instruction (a copied fiber's
 * frame is built when it first gets the run stack). */
static int fiber_prepare(caller__fiber_t *f, caller__fiber_fn fn, void *arg)
{
    f->fn = fn;
    f->arg = arg;
    f->next = NULL;
    f->started = false;
    f->finished = false;
    f->slot = NULL;
    return f->copied ? 0 : fiber_build(f);
}

/* ---- copy-stack mode ------------------------------------------------------ */

/* The lowest live byte of a suspended copied fiber's stack. */
static char *fiber_saved_sp(const caller__fiber_t *f)
{
#if FIBER_ASM
    return f->sp;
#else
    return f->save_from;
#endif
}

/* Copy the resident fiber's used stack out to its buffer (sized when it
 * yielded). */
static void fiber_save(struct fiber_thread *t, caller__fiber_t *r)
{
    char *top = (char *)t->run;
    char *from = fiber_saved_sp(r);
    size_t len = (size_t)(top - from);
    if (len > r->saved_cap)
        fiber_misuse("a copied fiber's stack outgrew the buffer reserved when it yielded");
#if FIBER_ASAN
    /* Its frames' redzones are poisoned: the copy reads them anyway. */
    ASAN_UNPOISON_MEMORY_REGION(from, len);
#endif
    memcpy(r->saved, from, len);
    r->saved_len = len;
}

/* Before switching to copied fiber f: put its bytes on the run stack. */
static void fiber_take_run(struct fiber_thread *t, caller__fiber_t *f)
{
    caller__fiber_t *r = t->resident;
    if (r == f)
        return; /* still there since it yielded */
    if (r)
        fiber_save(t, r);
    t->resident = f;
#if FIBER_ASAN
    /* Stale poison of other fibers' frames would be taken for f's. */
    ASAN_UNPOISON_MEMORY_REGION(f->stack_lo, fiber_stack_bytes(f));
#endif
    if (!f->started) {
        if (fiber_build(f) != 0)
            fiber_misuse("cannot build a copied fiber's first frame");
        return;
    }
    memcpy((char *)t->run - f->saved_len, f->saved, f->saved_len);
}

/*
 * Save buffers. A thread's copied fibers are all its own, so their buffers
 * come from a per-thread arena without locks: size classes of 64-byte
 * steps up to 4 KiB, then powers of two up to 64 KiB (bigger ones from
 * caller__malloc), carved from 2 MiB areas (caller__big_alloc) and kept
 * on a free list per class. With 100 000
 * suspended tasks that is 100 000 buffers of a few hundred bytes: from
 * malloc on a Caller's thread (a non-main arena that grows by mprotect,
 * one 4 KiB page fault at a time) they took most of the time. The areas go
 * back when the thread's last copied fiber is freed and its cache cleared.
 */
#define SAVE_STEP 64
#define SAVE_STEPS 64      /* classes 0..63: 64 .. 4096 bytes */
#define SAVE_CLASSES 68    /* 64..67: 8, 16, 32, 64 KiB */
#define SAVE_AREAS_MAX 512 /* 1 GiB of buffers; then caller__malloc */

struct save_arena {
    void *free[SAVE_CLASSES];
    char *bump, *end;
    size_t nareas;
    void *areas[SAVE_AREAS_MAX];
};

static size_t save_class_size(unsigned k)
{
    return k < SAVE_STEPS ? (size_t)(k + 1) * SAVE_STEP : (size_t)4096 << (k - SAVE_STEPS + 1);
}

/* The class holding @p size bytes, or SAVE_CLASSES if none does. */
static unsigned save_class(size_t size)
{
    if (size <= SAVE_STEPS * SAVE_STEP)
        return size ? (unsigned)((size - 1) / SAVE_STEP) : 0;
    unsigned k = SAVE_STEPS;
    while (k < SAVE_CLASSES && save_class_size(k) < size)
        k++;
    return k;
}

/* A buffer of at least @p need bytes; its capacity in *cap. */
static char *fiber_save_alloc(struct fiber_thread *t, size_t need, size_t *cap)
{
    unsigned k = save_class(need);
    if (k == SAVE_CLASSES) {
        *cap = need;
        return caller__malloc(need);
    }
    size_t size = save_class_size(k);
    *cap = size;
    struct save_arena *a = t->save;
    if (!a && !(a = t->save = caller__calloc(1, sizeof *a)))
        return NULL;
    if (a->free[k]) {
        char *b = a->free[k];
        memcpy(&a->free[k], b, sizeof(void *));
        return b;
    }
    if ((size_t)(a->end - a->bump) < size) {
        if (a->nareas == SAVE_AREAS_MAX)
            return caller__malloc(size);
        char *area = caller__big_alloc(CALLER__BIG_SIZE);
        if (!area)
            return NULL;
        a->areas[a->nareas++] = area;
        a->bump = area;
        a->end = area + CALLER__BIG_SIZE;
    }
    char *b = a->bump;
    a->bump += size;
    return b;
}

static bool fiber_save_in_areas(const struct save_arena *a, const char *b)
{
    for (size_t i = 0; i < a->nareas; i++)
        if (b >= (const char *)a->areas[i] && b < (const char *)a->areas[i] + CALLER__BIG_SIZE)
            return true;
    return false;
}

static void fiber_save_free(struct fiber_thread *t, char *b, size_t cap)
{
    if (!b)
        return;
    unsigned k = save_class(cap);
    struct save_arena *a = t->save;
    if (k == SAVE_CLASSES || save_class_size(k) != cap || !a ||
        (a->nareas == SAVE_AREAS_MAX && !fiber_save_in_areas(a, b))) {
        caller__free(b);
        return;
    }
    memcpy(b, &a->free[k], sizeof(void *));
    a->free[k] = b;
}

/* The thread's last copied fiber is gone: give the areas back. */
static void fiber_save_release(struct fiber_thread *t)
{
    struct save_arena *a = t->save;
    if (!a)
        return;
    for (size_t i = 0; i < a->nareas; i++)
        caller__big_free(a->areas[i], CALLER__BIG_SIZE);
    caller__free(a);
    t->save = NULL;
}

/* An address below everything live on the stack when the caller of the
 * caller of this function switches away: this frame is at least as deep
 * as the switch's (called from the same frame or a shallower one), and
 * the switch pushes 72 bytes on x86_64 (a return address and 64 bytes),
 * 176 on aarch64; the margin covers those (fiber_save checks it held). */
__attribute__((noinline)) static char *fiber_low_water(void)
{
    return (char *)__builtin_frame_address(0) - 192;
}

/* In copied fiber f, about to yield: make its buffer hold its used stack. */
static int fiber_reserve(struct fiber_thread *t, caller__fiber_t *f)
{
    char *low = fiber_low_water();
    if (low < f->stack_lo)
        low = f->stack_lo;
#if !FIBER_ASM
    f->save_from = low;
#endif
    size_t need = (size_t)((char *)t->run - low);
    if (need <= f->saved_cap)
        return 0;
    size_t cap;
    char *buf = fiber_save_alloc(t, need, &cap);
    if (!buf)
        return caller__fail(-ENOMEM, "no memory to save a copy-stack task's stack (%zu bytes)",
                            need);
    fiber_save_free(t, f->saved, f->saved_cap);
    f->saved = buf;
    f->saved_cap = cap;
    return 0;
}

/* ---- stack overflow messages -------------------------------------------- */

#define ALTSTACK_SIZE (64 * 1024)
static _Atomic(caller__fiber_describe_fn) overflow_describe;
static atomic_bool overflow_installed;

static void write_all(const char *s, size_t n)
{
    while (n > 0) {
        ssize_t w = write(STDERR_FILENO, s, n);
        if (w <= 0)
            return;
        s += w;
        n -= (size_t)w;
    }
}

/* Is @p addr in the guard page of the fiber running on this thread? */
static bool in_running_guard(const char *addr)
{
    caller__fiber_t *f = fiber_thread.current;
    if (!f)
        return false;
    const caller__fiber_t *slot = f->copied ? f->owner->run : f;
    return slot && addr >= slot->map && addr < slot->stack_lo;
}

static void overflow_handler(int sig, siginfo_t *info, void *uctx)
{
    (void)uctx;
    if (in_running_guard(info->si_addr)) {
        char what[256] = "a task";
        caller__fiber_describe_fn d =
            atomic_load_explicit(&overflow_describe, memory_order_relaxed);
        if (d)
            d(what, sizeof what);
        write_all("libcaller: stack overflow in ", 29);
        write_all(what, strnlen(what, sizeof what));
        write_all("\n", 1);
    }
    /* The default action: returning re-runs the faulting access. */
    struct sigaction dfl = {.sa_handler = SIG_DFL};
    sigemptyset(&dfl.sa_mask);
    sigaction(sig, &dfl, NULL);
}

/* On a fiber thread's first fiber: its alternate signal stack. */
static void overflow_thread_init(struct fiber_thread *t)
{
    if (t->altstack || !atomic_load_explicit(&overflow_installed, memory_order_acquire))
        return;
    stack_t old;
    if (sigaltstack(NULL, &old) == 0 && !(old.ss_flags & SS_DISABLE))
        return; /* the application gave this thread one */
    void *mem =
        mmap(NULL, ALTSTACK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return;
    stack_t ss = {.ss_sp = mem, .ss_size = ALTSTACK_SIZE};
    if (sigaltstack(&ss, NULL) != 0) {
        munmap(mem, ALTSTACK_SIZE);
        return;
    }
    t->altstack = mem;
}

static void overflow_thread_fini(struct fiber_thread *t)
{
    if (!t->altstack)
        return;
    stack_t ss = {.ss_flags = SS_DISABLE};
    sigaltstack(&ss, NULL);
    munmap(t->altstack, ALTSTACK_SIZE);
    t->altstack = NULL;
}

void caller__fiber_overflow_messages(caller__fiber_describe_fn describe)
{
    atomic_store_explicit(&overflow_describe, describe, memory_order_relaxed);
#if FIBER_ASAN || FIBER_TSAN
    (void)overflow_handler; /* the sanitizers report faults themselves */
#else
    static pthread_mutex_t once = PTHREAD_MUTEX_INITIALIZER;
    pthread_mutex_lock(&once);
    if (!atomic_load(&overflow_installed)) {
        struct sigaction old;
        if (sigaction(SIGSEGV, NULL, &old) == 0 && !(old.sa_flags & SA_SIGINFO) &&
            old.sa_handler == SIG_DFL) {
            struct sigaction sa = {.sa_sigaction = overflow_handler,
                                   .sa_flags = SA_SIGINFO | SA_ONSTACK};
            sigemptyset(&sa.sa_mask);
            if (sigaction(SIGSEGV, &sa, NULL) == 0)
                atomic_store_explicit(&overflow_installed, true, memory_order_release);
        }
    }
    pthread_mutex_unlock(&once);
#endif
}

/* ---- API ---------------------------------------------------------------- */

/* The stack size @p api asked for, checked (@p fn too), defaulted and
 * rounded up to pages; 0 on failure (recorded). */
static size_t fiber_checked_size(struct fiber_thread *t, caller__fiber_fn fn, size_t stack_size,
                                 const char *api)
{
    if (!fn) {
        caller__fail(-EINVAL, "%s: fn is NULL", api);
        return 0;
    }
    if (stack_size == 0)
        stack_size = CALLER__FIBER_DEFAULT_STACK;
    if (stack_size > SIZE_MAX / 4) {
        caller__fail(-ENOMEM, "cannot map a fiber stack of %zu bytes: too big", stack_size);
        return 0;
    }
    size_t page = fiber_page(t);
    return (stack_size + page - 1) & ~(page - 1);
}

caller__fiber_t *caller__fiber_new(size_t stack_size, caller__fiber_fn fn, void *arg)
{
    struct fiber_thread *t = &fiber_thread;
    if (!(stack_size = fiber_checked_size(t, fn, stack_size, "caller__fiber_new")))
        return NULL;

    caller__fiber_t *f = fiber_cache_take(t, stack_size);
    if (!f && !(f = fiber_map(t, stack_size)))
        return NULL;
    overflow_thread_init(t);
    if (fiber_prepare(f, fn, arg) != 0) {
        fiber_unmap(t, f);
        return NULL;
    }
#if FIBER_TSAN
    fiber_tsan_attach(t, f);
#endif
    return f;
}

caller__fiber_t *caller__fiber_new_copied(size_t stack_size, caller__fiber_fn fn, void *arg)
{
    struct fiber_thread *t = &fiber_thread;
    if (!(stack_size = fiber_checked_size(t, fn, stack_size, "caller__fiber_new_copied")))
        return NULL;
    if (t->run && t->run->stack_size != stack_size) {
        if (t->copied_live) {
            caller__fail(-EINVAL,
                         "copy-stack tasks of one thread share one run stack: it has %zu "
                         "bytes, not %zu",
                         t->run->stack_size, stack_size);
            return NULL;
        }
        fiber_unmap(t, t->run);
        t->run = NULL;
    }
    if (!t->run && !(t->run = fiber_map(t, stack_size)))
        return NULL;
    overflow_thread_init(t);
    caller__fiber_t *f = COPIED_IN_BLOCK ? caller__block_alloc() : caller__malloc(sizeof *f);
    if (!f) {
        caller__fail(-ENOMEM, "no memory for a copy-stack task");
        return NULL;
    }
    memset(f, 0, sizeof *f);
    f->owner = t;
    f->copied = true;
    f->stack_lo = t->run->stack_lo;
    f->stack_size = stack_size;
    fiber_prepare(f, fn, arg);
#if FIBER_TSAN
    fiber_tsan_attach(t, f);
#endif
    t->copied_live++;
    return f;
}

bool caller__fiber_copied(const caller__fiber_t *f)
{
    return f->copied;
}

bool caller__fiber_on_run_stack(const void *p)
{
    struct fiber_thread *t = &fiber_thread;
    caller__fiber_t *f = t->current;
    return f && f->copied && (const char *)p >= f->stack_lo && (const char *)p < fiber_top(f);
}

size_t caller__fiber_saved_bytes(const caller__fiber_t *f)
{
    return f->copied ? f->saved_len : 0;
}

void *caller__fiber_park(caller__fiber_t *f)
{
    return f->park;
}

void **caller__fiber_slot(void)
{
    struct fiber_thread *t = &fiber_thread;
    return t->current ? &t->current->slot : &t->sched_slot;
}

void caller__fiber_switch_to(caller__fiber_t *f)
{
    struct fiber_thread *t = &fiber_thread;
    if (t->current)
        fiber_misuse("caller__fiber_switch_to called inside a fiber");
    if (!f || f->owner != t)
        fiber_misuse("caller__fiber_switch_to: not a fiber of this thread");
    if (f->finished)
        fiber_misuse("caller__fiber_switch_to: the fiber has finished");
    if (f->copied)
        fiber_take_run(t, f);
    f->started = true;
    t->current = f;
#if FIBER_ASAN
    __sanitizer_start_switch_fiber(&t->sched_fake_stack, f->stack_lo, fiber_stack_bytes(f));
#endif
#if FIBER_TSAN
    t->sched_tsan = __tsan_get_current_fiber();
    __tsan_switch_to_fiber(f->tsan, 0);
#endif
#if FIBER_ASM
    caller__fiber_asm_switch(&t->sched_sp, f->sp);
#else
    swapcontext(&t->sched_uc, &f->uc);
#endif
#if FIBER_ASAN
    __sanitizer_finish_switch_fiber(t->sched_fake_stack, NULL, NULL);
#endif
    t->current = NULL;
}

int caller__fiber_yield(void)
{
    struct fiber_thread *t = &fiber_thread;
    caller__fiber_t *f = t->current;
    if (!f)
        fiber_misuse("caller__fiber_yield called outside a fiber");
    if (f->copied && fiber_reserve(t, f) != 0)
        return -ENOMEM;
#if FIBER_ASAN
    __sanitizer_start_switch_fiber(&f->fake_stack, t->sched_bottom, t->sched_size);
#endif
#if FIBER_TSAN
    __tsan_switch_to_fiber(t->sched_tsan, 0);
#endif
#if FIBER_ASM
    caller__fiber_asm_switch(&f->sp, t->sched_sp);
#else
    swapcontext(&f->uc, &t->sched_uc);
#endif
#if FIBER_ASAN
    __sanitizer_finish_switch_fiber(f->fake_stack, &t->sched_bottom, &t->sched_size);
#endif
    return 0;
}

caller__fiber_t *caller__fiber_current(void)
{
    return fiber_thread.current;
}

bool caller__fiber_finished(const caller__fiber_t *f)
{
    return f->finished;
}

void caller__fiber_free(caller__fiber_t *f)
{
    if (!f)
        return;
    struct fiber_thread *t = &fiber_thread;
    if (f->owner != t)
        fiber_misuse("caller__fiber_free: not a fiber of this thread");
    if (!f->fn)
        fiber_misuse("caller__fiber_free: the fiber was already freed");
    if (f->started && !f->finished)
        fiber_misuse("caller__fiber_free: the fiber is running or suspended");
#if FIBER_TSAN
    fiber_tsan_detach(t, f);
#endif
    if (f->copied) {
        if (t->resident == f)
            t->resident = NULL;
        t->copied_live--;
        fiber_save_free(t, f->saved, f->saved_cap);
        if (COPIED_IN_BLOCK)
            caller__block_free(f);
        else
            caller__free(f);
        return;
    }
    if (t->cached >= CALLER__FIBER_CACHE_MAX) {
        fiber_unmap(t, f);
        return;
    }
    f->fn = NULL;
    f->arg = NULL;
    f->finished = true; /* so that switching to it fails loudly */
    f->next = t->cache;
    t->cache = f;
    t->cached++;
}

void caller__fiber_cache_clear(void)
{
    struct fiber_thread *t = &fiber_thread;
    while (t->cache) {
        caller__fiber_t *f = t->cache;
        t->cache = f->next;
        t->cached--;
        fiber_unmap(t, f);
    }
    if (!t->copied_live) {
        if (t->run)
            fiber_unmap(t, t->run);
        t->run = NULL;
        fiber_save_release(t);
    }
    overflow_thread_fini(t);
#if FIBER_TSAN
    fiber_tsan_drop_idle(true);
#endif
}

size_t caller__fiber_stacks_mapped(void)
{
    return fiber_thread.mapped;
}

void caller__fiber_guard(const caller__fiber_t *f, void **lo, void **hi)
{
    *lo = f->copied ? f->owner->run->map : f->map;
    *hi = f->stack_lo;
}

void caller__fiber_stack(const caller__fiber_t *f, void **lo, void **hi)
{
    *lo = f->stack_lo;
    *hi = fiber_top(f);
}

const char *caller__fiber_impl(void)
{
#if !FIBER_ASM
    return "ucontext";
#elif defined(__x86_64__)
    return "asm (x86_64)";
#else
    return "asm (aarch64)";
#endif
}
