/*
 * Fibers: the stacks tasks run on, and the switch between them.
 *
 * Every scheduled call runs as a task, and every task is a fiber on its
 * Caller's thread. The scheduler runs on the thread's own stack and switches
 * into a fiber; the fiber switches back when it suspends or finishes. The
 * switch is asymmetric (scheduler <-> fiber, never fiber -> fiber) and a
 * fiber never migrates: it is created, run, suspended, resumed and freed on
 * one thread. All state is thread-local (the running fiber, the scheduler's
 * saved context, the stack cache), so nothing here takes a lock.
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
 * From the scheduler context (not inside a fiber) of the fiber's own thread:
 * run f until it calls caller__fiber_yield() or its fn returns. f must not
 * have finished. A fiber that runs to completion without suspending costs
 * exactly one switch in and one switch out.
 */
void caller__fiber_switch_to(caller__fiber_t *f);

/*
 * From inside the running fiber: back to the scheduler context; returns when
 * the scheduler switches to this fiber again.
 */
void caller__fiber_yield(void);

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

/* "asm (x86_64)", "asm (aarch64)" or "ucontext": the switch this build uses. */
const char *caller__fiber_impl(void);

/* fork(): 0 = prepare (take the stack pool's lock), 1 = in the parent
 * after (release it), 2 = in the child (reset it). */
void caller__fiber_fork(int phase);

#endif /* CALLER_FIBER_H */
