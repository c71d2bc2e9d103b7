/*
 * Fibers: mmap'd stacks with a guard page, a per-thread stack cache, and the
 * switch between a thread's scheduler context and its fibers (see fiber.h).
 *
 * No locks: every piece of state is thread-local (struct fiber_thread). The
 * one exception is a process-wide atomic counter that exists only under
 * TSan (see fiber_tsan_attach).
 *
 * Tool annotations, as in QEMU's util/coroutine-ucontext.c:
 *  - ASan: __sanitizer_start_switch_fiber before every switch and
 *    __sanitizer_finish_switch_fiber right after it, on the side that
 *    resumes. The final switch out of a finished fiber passes NULL as the
 *    fake-stack save, so ASan frees that fiber's fake stack.
 *  - TSan: one TSan fiber context per mapped stack (created at mmap,
 *    destroyed at munmap), __tsan_switch_to_fiber(ctx, 0) right before every
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
#include "internal.h"

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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

#if defined(__SANITIZE_ADDRESS__)
#define FIBER_ASAN 1
#endif
#if defined(__SANITIZE_THREAD__)
#define FIBER_TSAN 1
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FIBER_ASAN 1
#endif
#if __has_feature(thread_sanitizer)
#define FIBER_TSAN 1
#endif
#endif
#ifndef FIBER_ASAN
#define FIBER_ASAN 0
#endif
#ifndef FIBER_TSAN
#define FIBER_TSAN 0
#endif

#if FIBER_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if FIBER_TSAN
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
    char *map;                  /* guard page, stack, then this struct */
    size_t map_size;
    char *stack_lo;    /* lowest usable byte; the stack's top is this struct */
    size_t stack_size; /* size asked for, rounded up to pages: the cache key */
    bool started;
    bool finished;
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
    caller__fiber_t *cache;   /* finished fibers, most recently freed first */
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

#if FIBER_ASAN || !FIBER_ASM
static size_t fiber_stack_bytes(const caller__fiber_t *f)
{
    return (size_t)((const char *)f - f->stack_lo);
}
#endif

/* ---- TSan contexts ------------------------------------------------------ */

#if FIBER_TSAN
/*
 * A TSan fiber context is expensive in GCC 12's runtime: about 0.8 MB of
 * resident memory and 0.8 ms to create, and the runtime counts each as a
 * thread and dies ("Thread limit (8128 threads) exceeded") past 8128 of
 * them, while a program may well keep more tasks suspended at once. So at
 * most FIBER_TSAN_OWN_MAX stacks in the process get a context of their own
 * and the others share one context per thread. Sharing costs only the
 * accuracy of the stack traces in reports from those fibers: fibers of one
 * thread are ordered by the switches whichever context they use, and since
 * every instrumented frame of a fiber returns before its final switch, a
 * shared context's shadow stack holds only the frames of its live fibers.
 */
#define FIBER_TSAN_OWN_MAX 512
static atomic_size_t fiber_tsan_own;

static void fiber_tsan_attach(struct fiber_thread *t, caller__fiber_t *f)
{
    if (atomic_fetch_add_explicit(&fiber_tsan_own, 1, memory_order_relaxed) < FIBER_TSAN_OWN_MAX) {
        f->tsan = __tsan_create_fiber(0);
        f->tsan_shared = false;
        return;
    }
    atomic_fetch_sub_explicit(&fiber_tsan_own, 1, memory_order_relaxed);
    if (!t->tsan_shared)
        t->tsan_shared = __tsan_create_fiber(0);
    t->tsan_shared_refs++;
    f->tsan = t->tsan_shared;
    f->tsan_shared = true;
}

/* Never called for the running fiber's context: a fiber being unmapped has
 * finished, and while any fiber using the shared context lives, it holds a
 * reference. */
static void fiber_tsan_detach(struct fiber_thread *t, caller__fiber_t *f)
{
    if (!f->tsan_shared) {
        __tsan_destroy_fiber(f->tsan);
        atomic_fetch_sub_explicit(&fiber_tsan_own, 1, memory_order_relaxed);
    } else if (--t->tsan_shared_refs == 0) {
        __tsan_destroy_fiber(t->tsan_shared);
        t->tsan_shared = NULL;
    }
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

/* A fresh fiber: [guard page][stack of >= stack_size bytes][struct]. */
static caller__fiber_t *fiber_map(struct fiber_thread *t, size_t stack_size)
{
    size_t page = fiber_page(t);
    size_t self = (sizeof(caller__fiber_t) + 63) & ~(size_t)63;
    size_t size = page + stack_size + ((self + page - 1) & ~(page - 1));

    /* MAP_NORESERVE: a stack is mostly never touched, so it should not
     * count against overcommit. MAP_STACK: no transparent huge pages. */
    char *map = mmap(NULL, size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (map == MAP_FAILED) {
        caller__fail(-ENOMEM, "cannot map a fiber stack of %zu bytes: %s", stack_size,
                     strerror(errno));
        return NULL;
    }
    if (!guard_page(map, page)) {
        int e = errno;
        munmap(map, size);
        caller__fail(-ENOMEM, "cannot protect a fiber stack's guard page: %s", strerror(e));
        return NULL;
    }

    caller__fiber_t *f = (caller__fiber_t *)(map + size - self);
    memset(f, 0, sizeof *f);
    f->owner = t;
    f->map = map;
    f->map_size = size;
    f->stack_lo = map + page;
    f->stack_size = stack_size;
#if FIBER_TSAN
    fiber_tsan_attach(t, f);
#endif
#if FIBER_VALGRIND
    f->vg_stack = VALGRIND_STACK_REGISTER(f->stack_lo, (char *)f);
#endif
    t->mapped++;
    return f;
}

static void fiber_unmap(struct fiber_thread *t, caller__fiber_t *f)
{
    char *map = f->map;
    size_t size = f->map_size;
#if FIBER_VALGRIND
    VALGRIND_STACK_DEREGISTER(f->vg_stack);
#endif
#if FIBER_TSAN
    fiber_tsan_detach(t, f);
#endif
#if FIBER_ASAN
    /* Leave no poisoned shadow behind for whatever is mapped here next. */
    ASAN_UNPOISON_MEMORY_REGION(f->stack_lo, fiber_stack_bytes(f));
#endif
    munmap(map, size); /* f is gone from here on */
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

/* Make f ready to run fn(arg) from its first instruction. */
static int fiber_prepare(caller__fiber_t *f, caller__fiber_fn fn, void *arg)
{
    f->fn = fn;
    f->arg = arg;
    f->next = NULL;
    f->started = false;
    f->finished = false;
#if FIBER_ASM
    f->sp = caller__fiber_asm_init(f, f, fiber_main, fiber_exit);
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

/* ---- API ---------------------------------------------------------------- */

caller__fiber_t *caller__fiber_new(size_t stack_size, caller__fiber_fn fn, void *arg)
{
    struct fiber_thread *t = &fiber_thread;
    if (!fn) {
        caller__fail(-EINVAL, "caller__fiber_new: fn is NULL");
        return NULL;
    }
    if (stack_size == 0)
        stack_size = CALLER__FIBER_DEFAULT_STACK;
    if (stack_size > SIZE_MAX / 4) {
        caller__fail(-ENOMEM, "cannot map a fiber stack of %zu bytes: too big", stack_size);
        return NULL;
    }
    size_t page = fiber_page(t);
    stack_size = (stack_size + page - 1) & ~(page - 1);

    caller__fiber_t *f = fiber_cache_take(t, stack_size);
    if (!f && !(f = fiber_map(t, stack_size)))
        return NULL;
    if (fiber_prepare(f, fn, arg) != 0) {
        fiber_unmap(t, f);
        return NULL;
    }
    return f;
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

void caller__fiber_yield(void)
{
    struct fiber_thread *t = &fiber_thread;
    caller__fiber_t *f = t->current;
    if (!f)
        fiber_misuse("caller__fiber_yield called outside a fiber");
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
}

size_t caller__fiber_stacks_mapped(void)
{
    return fiber_thread.mapped;
}

void caller__fiber_guard(const caller__fiber_t *f, void **lo, void **hi)
{
    *lo = f->map;
    *hi = f->stack_lo;
}

void caller__fiber_stack(const caller__fiber_t *f, void **lo, void **hi)
{
    *lo = f->stack_lo;
    *hi = (void *)f;
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
