/*
 * Fibers: the stacks tasks run on, and the switch between them.
 *
 * Every scheduled call runs as a task, and every task runs on a fiber on
 * its Caller's thread (tasks that end without suspending may run one after
 * another on the same fiber: sched.c's task_entry). The scheduler runs on
 * the thread's own stack and switches into a fiber; the fiber switches back
 * when it suspends or finishes. The switch is asymmetric (scheduler <->
 * fiber, never fiber -> fiber) and a fiber never migrates: it is created,
 * run, suspended, resumed and freed on one thread. All state is
 * thread-local (the running fiber, the scheduler's saved context, the
 * stack cache), so nothing here takes a lock.
 *
 * A fiber's stack is a slot of an mmap'd slab: a guard page at its low end
 * (stacks grow down: an overflow faults in the guard page instead of
 * writing over the neighbouring memory) and the fiber struct itself at its
 * high end. Slabs of up to 64 slots come from a process-wide pool, so a
 * fresh fiber costs no system call most of the time, and a reused one costs
 * nothing but re-initialising its first frame. Finished fibers go back to a
 * per-thread cache of at most CALLER__FIBER_CACHE_MAX stacks (libdill's
 * stack cache), and from there to the pool.
 *
 * The context switch is ours (src/switch_x86_64.S, src/switch_aarch64.S);
 * other architectures, and builds with CALLER_FIBER_UCONTEXT=1, use
 * getcontext/makecontext/swapcontext instead. Each switch tells ASan, TSan
 * and valgrind about the stack change (QEMU's coroutine-ucontext.c pattern),
 * so the sanitizer suites stay meaningful.
 *
 * Floating point: on x86_64 each context keeps its own MXCSR control bits
 * and x87 control word, on aarch64 its own FPCR (the ucontext fallback saves
 * the floating-point environment too). A new fiber starts with the control
 * modes of the thread that created it, as of caller__fiber_new().
 *
 * Copy-stack mode (caller__fiber_new_copied): the fiber runs on its
 * thread's one run stack (a guarded slot like any other) instead of a stack
 * of its own. When another copied fiber is switched to, the used part of
 * the one whose bytes are on the run stack ([its saved stack pointer, the
 * top)) is copied out to a heap buffer, and the new one's bytes are copied
 * back to the same addresses, so pointers into a running fiber's stack stay
 * valid while it runs. While it is suspended they are not: its bytes are
 * elsewhere, or another fiber's frames are there. Copying is lazy: a fiber
 * that suspends and is the next copied fiber to run costs no copy. The
 * buffer is sized when the fiber yields (caller__fiber_yield fails with
 * -ENOMEM, and the fiber keeps running, when it cannot be), so a switch
 * never allocates.
 *
 * Misuse that the scheduler can never do on purpose (switching from inside a
 * fiber, freeing a suspended fiber, using a fiber on another thread) is a
 * broken invariant: it aborts with a message.
 */
#ifndef CALLER_FIBER_H
#define CALLER_FIBER_H

#include <stdbool.h>
#include <stddef.h>

typedef struct caller__fiber caller__fiber_t;
typedef void (*caller__fiber_fn)(void *arg);

/* Bytes of caller__fiber_park(): state others may read while the fiber is
 * suspended (in copy-stack mode its stack is not readable then). */
#define CALLER__FIBER_PARK_SIZE 80

/* Default usable stack size of a fiber. */
#define CALLER__FIBER_DEFAULT_STACK ((size_t)256 * 1024)
/* Stacks a thread keeps in its cache; more are unmapped when freed. */
#define CALLER__FIBER_CACHE_MAX 64

/*
 * A fiber ready to run fn(arg) on a stack of at least stack_size bytes
 * (0 = CALLER__FIBER_DEFAULT_STACK = 256 KiB), taken from this thread's cache
 * when one of that size is there (stack + fiber struct reused; no mmap, no
 * malloc on that path), else mmap'd fresh with a PROT_NONE guard page below
 * it. NULL on failure (records -ENOMEM via caller__fail; -EINVAL if fn is
 * NULL).
 *
 * Thread: any; the fiber belongs to the calling thread from then on. May be
 * called from the scheduler context or from inside a fiber.
 */
caller__fiber_t *caller__fiber_new(size_t stack_size, caller__fiber_fn fn, void *arg);

/*
 * As caller__fiber_new, in copy-stack mode (see above): the fiber runs on
 * this thread's run stack of stack_size bytes (0 = the default), mapped at
 * the first such fiber and kept while any lives. Every copied fiber of a
 * thread uses the same size: asking for another while one lives fails with
 * -EINVAL. The fiber struct is malloc'd; nothing is mapped per fiber.
 */
caller__fiber_t *caller__fiber_new_copied(size_t stack_size, caller__fiber_fn fn, void *arg);

/* True if f runs in copy-stack mode. */
bool caller__fiber_copied(const caller__fiber_t *f);

/* True if the running fiber is a copied one and @p p points into the run
 * stack: memory that is not there while that fiber is suspended. */
bool caller__fiber_on_run_stack(const void *p);

/* Bytes a copied fiber holds in its buffer (its used stack when it last
 * gave the run stack up), 0 for others. For tests and statistics. */
size_t caller__fiber_saved_bytes(const caller__fiber_t *f);

/* CALLER__FIBER_PARK_SIZE bytes of f's own, off its stack, 16-aligned, for
 * the life of the fiber (reused fibers keep old contents). */
void *caller__fiber_park(caller__fiber_t *f);

/* A pointer-sized slot of the running fiber (the scheduler context has one
 * per thread): for lists of frames that only that fiber may walk. */
void **caller__fiber_slot(void);

/*
 * From the scheduler context (not inside a fiber) of the fiber's own thread:
 * run f until it calls caller__fiber_yield() or its fn returns. f must not
 * have finished. A fiber that runs to completion without suspending costs
 * exactly one switch in and one switch out.
 */
void caller__fiber_switch_to(caller__fiber_t *f);

/*
 * From inside the running fiber: back to the scheduler context; returns 0
 * when the scheduler switches to this fiber again. A copied fiber whose
 * save buffer cannot grow to its used stack does not switch: -ENOMEM.
 */
int caller__fiber_yield(void);

/* The fiber running now on this thread, or NULL on the scheduler context. */
caller__fiber_t *caller__fiber_current(void);

/* True once fn has returned. */
bool caller__fiber_finished(const caller__fiber_t *f);

/*
 * Give a finished (or never started) fiber back: its stack goes to this
 * thread's cache (at most CALLER__FIBER_CACHE_MAX = 64 stacks kept; the rest
 * go back to the process-wide pool). Must be called on the fiber's thread.
 * NULL is a no-op.
 */
void caller__fiber_free(caller__fiber_t *f);

/* Give every stack in this thread's cache back to the pool (a Caller thread
 * calls this as it ends). Fibers in use are not affected. */
void caller__fiber_cache_clear(void);

/* Number of stacks this thread holds (in use + cached), for tests. */
size_t caller__fiber_stacks_mapped(void);

/* The guard page of f's stack: faults at addresses in [*lo, *hi) are f's
 * stack overflowing. For tests and for a crash handler's message. */
void caller__fiber_guard(const caller__fiber_t *f, void **lo, void **hi);

/* The usable stack of f: [*lo, *hi), the fiber's first frame just below hi. */
void caller__fiber_stack(const caller__fiber_t *f, void **lo, void **hi);

/*
 * Stack overflow messages. Where the process's SIGSEGV disposition is the
 * default (the application installed no handler of its own) and no
 * sanitizer runs, a fault in the guard page of the running fiber's stack
 * writes "libcaller: stack overflow in " followed by what @p describe
 * writes (e.g. "task fn on Caller 'name'"), then the default action
 * follows (the process dies of SIGSEGV, with a core where enabled). The
 * handler runs on an alternate signal stack each fiber thread gets with
 * its first fiber (given back by caller__fiber_cache_clear). @p describe
 * runs in the signal handler: it may only copy strings into @p buf.
 * Call once, before fibers are made; later calls change @p describe only.
 */
typedef void (*caller__fiber_describe_fn)(char *buf, size_t len);
void caller__fiber_overflow_messages(caller__fiber_describe_fn describe);

/* "asm (x86_64)", "asm (aarch64)" or "ucontext": the switch this build uses. */
const char *caller__fiber_impl(void);

/* fork(): 0 = prepare (take the stack pool's lock), 1 = in the parent
 * after (release it), 2 = in the child (reset it). */
void caller__fiber_fork(int phase);

#endif /* CALLER_FIBER_H */
