/*
 * Small synchronisation primitives shared by the library's files: a 4-byte
 * lock and a one-shot "wake" word a thread can block on with a deadline.
 *
 * Why not pthread_mutex_t: it is 40 bytes on x86_64 glibc, and a Pending
 * must stay within 128 bytes (issue #2; it is 88 now). The lock below is the classic
 * three-state futex mutex (Drepper, "Futexes Are Tricky", mutex 2): one
 * CAS to take it uncontended, one exchange to release it, a system call
 * only when there is contention. Critical sections that use it are a few
 * loads and stores long and never call user code.
 *
 * All ordering is expressed with C11 atomics (acquire on lock, release on
 * unlock), so ThreadSanitizer sees the happens-before edges without knowing
 * about futexes.
 */
#ifndef CALLER_SYNC_H
#define CALLER_SYNC_H

#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#else
#error "libcaller's sync.h needs futexes (Linux); add a condition-variable fallback here"
#endif

/* Monotonic clock in nanoseconds. */
static inline int64_t caller__now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* A deadline (monotonic ns) from a timeout in seconds; negative = never. */
static inline int64_t caller__deadline(double timeout_s)
{
    if (timeout_s < 0)
        return INT64_MAX;
    if (timeout_s > 1e9)
        return INT64_MAX;
    return caller__now_ns() + (int64_t)(timeout_s * 1e9);
}

/*
 * Block while *addr == expected, until woken or the monotonic deadline
 * passes. Returns 0 when woken (or *addr already differed; spurious wakes
 * are possible, callers re-check) and -ETIMEDOUT at the deadline. EINTR is
 * absorbed: a signal never ends the wait.
 */
static inline int caller__futex_wait(atomic_uint *addr, unsigned expected, int64_t deadline_ns)
{
    struct timespec ts, *tsp = NULL;
    if (deadline_ns != INT64_MAX) {
        if (caller__now_ns() >= deadline_ns)
            return -ETIMEDOUT;
        ts.tv_sec = deadline_ns / 1000000000;
        ts.tv_nsec = deadline_ns % 1000000000;
        tsp = &ts;
    }
    /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline. */
    long r = syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, expected,
                     tsp, NULL, FUTEX_BITSET_MATCH_ANY);
    if (r == -1 && errno == ETIMEDOUT)
        return -ETIMEDOUT;
    return 0;
}

static inline void caller__futex_wake(atomic_uint *addr, int n)
{
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE | FUTEX_PRIVATE_FLAG, n, NULL, NULL, 0);
}

/* 0 = free, 1 = held, 2 = held and someone may be sleeping on it. */
typedef atomic_uint caller__lock_t;

#define CALLER__LOCK_INIT 0u

static inline void caller__lock(caller__lock_t *l)
{
    unsigned c = 0;
    if (atomic_compare_exchange_strong_explicit(l, &c, 1, memory_order_acquire,
                                                memory_order_relaxed))
        return;
    /* Short spin: the holders' critical sections are tens of instructions. */
    for (int i = 0; i < 64 && c != 0; i++) {
        c = 0;
        if (atomic_compare_exchange_weak_explicit(l, &c, 1, memory_order_acquire,
                                                  memory_order_relaxed))
            return;
    }
    if (c != 2)
        c = atomic_exchange_explicit(l, 2, memory_order_acquire);
    while (c != 0) {
        caller__futex_wait(l, 2, INT64_MAX);
        c = atomic_exchange_explicit(l, 2, memory_order_acquire);
    }
}

static inline void caller__unlock(caller__lock_t *l)
{
    if (atomic_exchange_explicit(l, 0, memory_order_release) != 1)
        caller__futex_wake(l, 1);
}

/*
 * Adaptive spinning before sleeping. A thread about to sleep until another
 * thread acts spins a little first: if the other side answers within a few
 * microseconds (a round trip between two running threads), the wake-up
 * system calls and the scheduler's wake latency (7-25 µs on this kind of
 * machine) are saved. The budget adapts per call site and thread: doubled
 * when a spin succeeds, halved when it fails, so on a busy machine — where
 * the other side is not running and spinning only steals its CPU — it
 * quickly drops to nothing; it probes again now and then.
 */
typedef struct {
    int64_t budget; /* ns to spin; 0 = do not spin */
    unsigned idle;  /* sleeps since the last probe while budget is 0 */
} caller__spin_t;

/* Up to the wake-up latency we want to save; a probe is short. */
#define CALLER__SPIN_MAX_NS 50000
#define CALLER__SPIN_PROBE_NS 5000

static inline void caller__cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Until l reads free, with acquire: whatever the last holder wrote under it
 * happens before what follows. No store, so nothing locked when free. */
static inline void caller__lock_wait_free(caller__lock_t *l)
{
    for (unsigned spins = 0; atomic_load_explicit(l, memory_order_acquire) != 0; spins++) {
        if (spins < 64)
            caller__cpu_relax();
        else
            sched_yield(); /* the holder was descheduled */
    }
}

/*
 * Spin while *word == value, within the budget. True if it changed. A
 * success restores the full budget (the other side answers quickly: keep
 * spinning for it); a failure halves it, and under 1 µs it stops.
 */
static inline bool caller__spin_while(caller__spin_t *s, atomic_uint *word, unsigned value)
{
    int64_t budget = s->budget;
    if (budget == 0 && ++s->idle >= 16) {
        s->idle = 0;
        budget = CALLER__SPIN_PROBE_NS;
    }
    if (budget == 0)
        return atomic_load_explicit(word, memory_order_acquire) != value;
    int64_t until = caller__now_ns() + budget;
    for (unsigned i = 1;; i++) {
        if (atomic_load_explicit(word, memory_order_acquire) != value) {
            s->budget = CALLER__SPIN_MAX_NS;
            return true;
        }
        caller__cpu_relax();
        if ((i & 63) == 0 && caller__now_ns() >= until)
            break;
    }
    s->budget = s->budget / 2 < 1000 ? 0 : s->budget / 2;
    return atomic_load_explicit(word, memory_order_acquire) != value;
}

#endif /* CALLER_SYNC_H */
