/* Fibers: stacks, the switch, the stack cache, guard pages (src/fiber.h). */
// ALSO-UCONTEXT
// TIMEOUT: 30
#include "check.h"
#include "fiber.h"
#include "internal.h"

#include <fcntl.h>
#include <fenv.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <sys/wait.h>
#include <unistd.h>

#if defined(__x86_64__)
#include <xmmintrin.h>
#endif
#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#endif
#endif
#ifndef RUNNING_ON_VALGRIND
#define RUNNING_ON_VALGRIND 0
#endif

#if defined(__SANITIZE_ADDRESS__)
#define TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define TEST_ASAN 1
#endif
#endif

/* Every case starts and ends with no stack mapped by its thread. */
static void start_clean(void)
{
    caller__fiber_cache_clear();
    CHECK_EQ(caller__fiber_stacks_mapped(), 0);
    CHECK_PTR_EQ(caller__fiber_current(), NULL);
}

static void end_clean(void)
{
    caller__fiber_cache_clear();
    CHECK_EQ(caller__fiber_stacks_mapped(), 0);
}

/* ---- one fiber, run to completion ----------------------------------------- */

struct once {
    int runs;
    caller__fiber_t *seen;
    char *local;
};

static void once_fn(void *arg)
{
    struct once *o = arg;
    o->runs++;
    o->seen = caller__fiber_current();
    o->local = __builtin_frame_address(0);
}

TEST(run_to_completion)
{
    start_clean();
    struct once o = {0};
    caller__fiber_t *f = caller__fiber_new(0, once_fn, &o);
    CHECK(f != NULL);
    CHECK(!caller__fiber_finished(f));
    CHECK_EQ(o.runs, 0);
    CHECK_EQ(caller__fiber_stacks_mapped(), 1);

    caller__fiber_switch_to(f);
    CHECK_EQ(o.runs, 1);
    CHECK_PTR_EQ(o.seen, f);
    CHECK(caller__fiber_finished(f));
    CHECK_PTR_EQ(caller__fiber_current(), NULL);

    /* Geometry: a 256 KiB stack with the guard page right below it, and fn
     * ran on that stack. */
    void *lo, *hi, *glo, *ghi;
    caller__fiber_stack(f, &lo, &hi);
    caller__fiber_guard(f, &glo, &ghi);
    CHECK_GE((char *)hi - (char *)lo, CALLER__FIBER_DEFAULT_STACK);
    CHECK_PTR_EQ(ghi, lo);
    CHECK_EQ((char *)ghi - (char *)glo, sysconf(_SC_PAGESIZE));
    CHECK(o.local >= (char *)lo && o.local < (char *)hi);

    caller__fiber_free(f);
    CHECK_EQ(caller__fiber_stacks_mapped(), 1); /* cached */
    end_clean();
}

TEST(bad_arguments)
{
    start_clean();
    CHECK_PTR_EQ(caller__fiber_new(0, NULL, NULL), NULL);
    CHECK_EQ(caller_last_error(NULL), -EINVAL);

    CHECK_PTR_EQ(caller__fiber_new(SIZE_MAX - 100, once_fn, NULL), NULL);
    CHECK_EQ(caller_last_error(NULL), -ENOMEM);
    /* 1 PiB: past the 47-bit user address space, so mmap itself fails. */
    CHECK_PTR_EQ(caller__fiber_new((size_t)1 << 50, once_fn, NULL), NULL);
    CHECK_EQ(caller_last_error(NULL), -ENOMEM);
    CHECK_CONTAINS(check_last_message(), "fiber stack");
    CHECK_EQ(caller__fiber_stacks_mapped(), 0);

    caller__fiber_free(NULL); /* a no-op */
    end_clean();
}

/* ---- yield and resume ------------------------------------------------------ */

struct chan {
    long in, out;
    long bad;
};

/* Echoes in*3+1 each time it is resumed, checking that the values arrive in
 * order, until it is sent a negative number. */
static void echo_fn(void *arg)
{
    struct chan *c = arg;
    for (long expect = 0;; expect++) {
        if (c->in < 0)
            return;
        if (c->in != expect)
            c->bad++;
        c->out = c->in * 3 + 1;
        caller__fiber_yield();
    }
}

TEST(yield_resume_order)
{
    start_clean();
    struct chan c = {0};
    caller__fiber_t *f = caller__fiber_new(0, echo_fn, &c);
    CHECK(f != NULL);
    for (long i = 0; i < 100000; i++) {
        c.in = i;
        caller__fiber_switch_to(f);
        if (c.out != i * 3 + 1)
            CHECK_EQ(c.out, i * 3 + 1);
        if (caller__fiber_finished(f))
            CHECK(!caller__fiber_finished(f));
    }
    c.in = -1;
    caller__fiber_switch_to(f);
    CHECK(caller__fiber_finished(f));
    CHECK_EQ(c.bad, 0);
    caller__fiber_free(f);
    end_clean();
}

/* ---- a round-robin scheduler ----------------------------------------------- */

struct rr_shared {
    int *log; /* id * 100 + step, in the order the steps ran */
    int n;
    int bad;
};

struct rr_task {
    struct rr_shared *sh;
    caller__fiber_t *self;
    int id;
    int yields;
};

static void rr_fn(void *arg)
{
    struct rr_task *r = arg;
    for (int k = 0;; k++) {
        if (caller__fiber_current() != r->self)
            r->sh->bad++;
        r->sh->log[r->sh->n++] = r->id * 100 + k;
        if (k == r->yields)
            return;
        caller__fiber_yield();
    }
}

/* Runs n fibers, each yielding `yields` times, round-robin from a ring
 * queue until all have finished; checks the interleaving. */
static void round_robin(int n, int yields)
{
    struct rr_shared sh = {.log = calloc((size_t)n * (yields + 1), sizeof(int))};
    struct rr_task *tasks = calloc((size_t)n, sizeof *tasks);
    caller__fiber_t **ring = calloc((size_t)n, sizeof *ring);
    CHECK(sh.log && tasks && ring);

    for (int i = 0; i < n; i++) {
        tasks[i] = (struct rr_task){.sh = &sh, .id = i, .yields = yields};
        ring[i] = tasks[i].self = caller__fiber_new(0, rr_fn, &tasks[i]);
        CHECK(ring[i] != NULL);
    }
    size_t head = 0, len = (size_t)n, switches = 0;
    while (len > 0) {
        caller__fiber_t *f = ring[head];
        head = (head + 1) % (size_t)n;
        len--;
        caller__fiber_switch_to(f);
        switches++;
        if (caller__fiber_finished(f))
            caller__fiber_free(f);
        else
            ring[(head + len++) % (size_t)n] = f;
    }

    CHECK_EQ(switches, (size_t)n * (yields + 1));
    CHECK_EQ(sh.n, n * (yields + 1));
    CHECK_EQ(sh.bad, 0);
    for (int j = 0; j < sh.n; j++) {
        int want = (j % n) * 100 + j / n;
        if (sh.log[j] != want)
            CHECK_EQ(sh.log[j], want);
    }
    free(sh.log);
    free(tasks);
    free(ring);
}

TEST(round_robin_1000)
{
    start_clean();
    round_robin(1000, 10);
    /* 1000 were mapped at once; the cache kept 64 of them. */
    CHECK_EQ(caller__fiber_stacks_mapped(), CALLER__FIBER_CACHE_MAX);
    end_clean();
}

/* ---- the stack cache ------------------------------------------------------- */

TEST(stacks_reused)
{
    start_clean();
    struct once o = {0};
    caller__fiber_t *first = caller__fiber_new(0, once_fn, &o);
    CHECK(first != NULL);
    caller__fiber_switch_to(first);
    caller__fiber_free(first);
    for (int i = 0; i < 1000; i++) {
        caller__fiber_t *f = caller__fiber_new(0, once_fn, &o);
        CHECK_PTR_EQ(f, first); /* the same stack and struct, re-initialised */
        CHECK(!caller__fiber_finished(f));
        caller__fiber_switch_to(f);
        CHECK(caller__fiber_finished(f));
        caller__fiber_free(f);
        CHECK_EQ(caller__fiber_stacks_mapped(), 1);
    }
    CHECK_EQ(o.runs, 1001);

    /* A fiber that never ran goes back to the cache too. */
    caller__fiber_free(caller__fiber_new(0, once_fn, &o));
    CHECK_EQ(caller__fiber_stacks_mapped(), 1);

    /* Sizes: 0 and the default are the same; another size maps its own
     * stack, and each size is reused for itself. */
    caller__fiber_t *big = caller__fiber_new(CALLER__FIBER_DEFAULT_STACK, once_fn, &o);
    CHECK_PTR_EQ(big, first);
    caller__fiber_t *small = caller__fiber_new(64 * 1024, once_fn, &o);
    CHECK(small != NULL && small != first);
    CHECK_EQ(caller__fiber_stacks_mapped(), 2);
    void *lo, *hi;
    caller__fiber_stack(small, &lo, &hi);
    CHECK_GE((char *)hi - (char *)lo, 64 * 1024);
    CHECK_LT((char *)hi - (char *)lo, CALLER__FIBER_DEFAULT_STACK);
    caller__fiber_free(big);
    caller__fiber_free(small);
    CHECK_PTR_EQ(caller__fiber_new(64 * 1024, once_fn, &o), small);
    CHECK_PTR_EQ(caller__fiber_new(0, once_fn, &o), first);
    CHECK_EQ(caller__fiber_stacks_mapped(), 2);
    caller__fiber_free(small);
    caller__fiber_free(first);

    /* The cache keeps at most CALLER__FIBER_CACHE_MAX stacks. */
    caller__fiber_cache_clear();
    CHECK_EQ(caller__fiber_stacks_mapped(), 0);
    caller__fiber_t *fs[100];
    for (int i = 0; i < 100; i++)
        CHECK((fs[i] = caller__fiber_new(0, once_fn, &o)) != NULL);
    CHECK_EQ(caller__fiber_stacks_mapped(), 100);
    for (int i = 0; i < 100; i++)
        caller__fiber_free(fs[i]);
    CHECK_EQ(caller__fiber_stacks_mapped(), CALLER__FIBER_CACHE_MAX);
    end_clean();
}

/* A fiber may create fibers; the scheduler runs them. */
struct spawner {
    caller__fiber_t *child;
    struct once o;
};

static void spawner_fn(void *arg)
{
    struct spawner *s = arg;
    s->child = caller__fiber_new(0, once_fn, &s->o);
    caller__fiber_yield();
    /* resumed after the child ran */
    s->o.runs += 10;
}

TEST(new_inside_fiber)
{
    start_clean();
    struct spawner s = {0};
    caller__fiber_t *f = caller__fiber_new(0, spawner_fn, &s);
    CHECK(f != NULL);
    caller__fiber_switch_to(f);
    CHECK(s.child != NULL);
    caller__fiber_switch_to(s.child);
    CHECK_PTR_EQ(s.o.seen, s.child);
    caller__fiber_switch_to(f);
    CHECK(caller__fiber_finished(f));
    CHECK_EQ(s.o.runs, 11);
    caller__fiber_free(s.child);
    caller__fiber_free(f);
    end_clean();
}

/* ---- threads --------------------------------------------------------------- */

static void *thread_main(void *arg)
{
    (void)arg;
    CHECK_PTR_EQ(caller__fiber_current(), NULL);
    CHECK_EQ(caller__fiber_stacks_mapped(), 0);
    for (int round = 0; round < 5; round++)
        round_robin(200, 20);
    CHECK_EQ(caller__fiber_stacks_mapped(), CALLER__FIBER_CACHE_MAX);
    caller__fiber_cache_clear();
    CHECK_EQ(caller__fiber_stacks_mapped(), 0);
    return NULL;
}

/* Two threads, each with its own fibers, at once (meant for TSan: each
 * thread's fibers share memory with that thread's scheduler without locks,
 * ordered only by the switches). */
TEST(two_threads)
{
    start_clean();
    pthread_t a, b;
    CHECK_EQ(pthread_create(&a, NULL, thread_main, NULL), 0);
    CHECK_EQ(pthread_create(&b, NULL, thread_main, NULL), 0);
    CHECK_EQ(pthread_join(a, NULL), 0);
    CHECK_EQ(pthread_join(b, NULL), 0);
    /* The other threads' stacks were never this thread's. */
    CHECK_EQ(caller__fiber_stacks_mapped(), 0);
    end_clean();
}

/* ---- stack depth ----------------------------------------------------------- */

struct deep {
    char *top;
    size_t want, reached;
    int depth;
};

/* Recurses, 512 bytes of locals a frame, until `want` bytes of the stack are
 * in use (measured from the real frame address, so ASan's bigger frames are
 * counted as they are). */
__attribute__((noinline)) static int deep_rec(struct deep *d, int depth)
{
    volatile char buf[512];
    for (size_t i = 0; i < sizeof buf; i += 64)
        buf[i] = (char)depth;
    size_t used = (size_t)(d->top - (char *)__builtin_frame_address(0));
    int r = 0;
    if (used < d->want) {
        r = deep_rec(d, depth + 1);
    } else {
        d->reached = used;
        d->depth = depth;
    }
    return r + buf[(depth * 64) % (int)sizeof buf];
}

static void deep_fn(void *arg)
{
    struct deep *d = arg;
    deep_rec(d, 0);
}

TEST(deep_recursion)
{
    start_clean();
    struct deep d = {.want = 200 * 1024};
    caller__fiber_t *f = caller__fiber_new(0, deep_fn, &d);
    CHECK(f != NULL);
    void *lo, *hi;
    caller__fiber_stack(f, &lo, &hi);
    d.top = hi;
    caller__fiber_switch_to(f);
    CHECK(caller__fiber_finished(f));
    CHECK_GE(d.reached, 200 * 1024);
    CHECK_LT(d.reached, (char *)hi - (char *)lo);
    CHECK_GE(d.depth, 100);
    caller__fiber_free(f);
    end_clean();
}

/* ---- registers and floating point ------------------------------------------ */

struct fp_result {
    double d;
    unsigned long l;
};

/* Many doubles and integers live across each yield (more than there are
 * callee-saved registers, so some sit in registers and some on the stack). */
__attribute__((noinline)) static struct fp_result fp_work(int rounds, bool in_fiber, int seed)
{
    double a = 1.0 + seed, b = 0.5, c = 0.25, d = 2.0, e = 3.5, g = -1.25, h = 0.125, k = 7.0;
    unsigned long x1 = (unsigned long)seed, x2 = 2, x3 = 3, x4 = 5, x5 = 7, x6 = 11, x7 = 13,
                  x8 = 17;
    for (int i = 0; i < rounds; i++) {
        a = a * 1.0000001 + b;
        b = b * 0.999 + c;
        c = c / 1.0001 + d * 1e-6;
        d = d + e * 1e-3;
        e = e * 0.9999 - g * 1e-4;
        g = g + h / (i + 1);
        h = h * 1.01 - 1e-3;
        k = k / 1.0003 + a * 1e-9;
        x1 = x1 * 31 + (unsigned long)i;
        x2 ^= x1 >> 3;
        x3 += x2 * 7;
        x4 = (x4 << 1) ^ x3;
        x5 -= x4 >> 5;
        x6 = x6 * 3 + x5;
        x7 ^= x6 + (unsigned long)i;
        x8 += x7 >> 7;
        if (in_fiber)
            caller__fiber_yield();
    }
    struct fp_result r = {a + b + c + d + e + g + h + k, x1 ^ x2 ^ x3 ^ x4 ^ x5 ^ x6 ^ x7 ^ x8};
    return r;
}

struct fp_job {
    struct fp_result r;
    int rounds;
};

static void fp_fn(void *arg)
{
    struct fp_job *j = arg;
    j->r = fp_work(j->rounds, true, 1);
}

TEST(registers_survive_switches)
{
    start_clean();
    enum { ROUNDS = 2000 };
    struct fp_result want_fiber = fp_work(ROUNDS, false, 1);
    struct fp_result want_sched = fp_work(ROUNDS, false, 2);

    struct fp_job j = {.rounds = ROUNDS};
    caller__fiber_t *f = caller__fiber_new(0, fp_fn, &j);
    CHECK(f != NULL);
    /* The scheduler side does the same kind of work with its own values,
     * switching into the fiber every round. */
    double a = 3.0, b = 0.75;
    unsigned long x = 2, y = 9;
    for (int i = 0; i < ROUNDS; i++) {
        a = a * 1.0000001 + b;
        b = b * 0.999 + 1e-3;
        x = x * 31 + (unsigned long)i;
        y ^= x >> 3;
        caller__fiber_switch_to(f);
    }
    caller__fiber_switch_to(f); /* fp_work returns */
    CHECK(caller__fiber_finished(f));
    caller__fiber_free(f);

    CHECK(j.r.d == want_fiber.d);
    CHECK_EQ(j.r.l, want_fiber.l);
    double a2 = 3.0, b2 = 0.75;
    unsigned long x2 = 2, y2 = 9;
    for (int i = 0; i < ROUNDS; i++) {
        a2 = a2 * 1.0000001 + b2;
        b2 = b2 * 0.999 + 1e-3;
        x2 = x2 * 31 + (unsigned long)i;
        y2 ^= x2 >> 3;
    }
    CHECK(a == a2 && b == b2);
    CHECK_EQ(x, x2);
    CHECK_EQ(y, y2);
    /* And a scheduler-side fp_work still agrees after all that. */
    struct fp_result again = fp_work(ROUNDS, false, 2);
    CHECK(again.d == want_sched.d);
    end_clean();
}

/* Each context keeps its own rounding mode (x86_64: MXCSR and the x87
 * control word; aarch64: FPCR; ucontext: glibc saves the fp environment). */
struct round_job {
    int seen_after_yield;
    int seen_at_start;
#if defined(__x86_64__)
    unsigned mxcsr_rc;
#endif
    double third;
};

static void round_fn(void *arg)
{
    struct round_job *j = arg;
    j->seen_at_start = fegetround();
    fesetround(FE_UPWARD);
    caller__fiber_yield();
    j->seen_after_yield = fegetround();
#if defined(__x86_64__)
    j->mxcsr_rc = _mm_getcsr() & 0x6000;
#endif
    volatile double one = 1.0, three = 3.0;
    j->third = one / three;
}

TEST(rounding_mode_per_context)
{
    start_clean();
    CHECK_EQ(fegetround(), FE_TONEAREST);
    struct round_job j = {0};
    caller__fiber_t *f = caller__fiber_new(0, round_fn, &j);
    CHECK(f != NULL);
    caller__fiber_switch_to(f);
    CHECK_EQ(j.seen_at_start, FE_TONEAREST);
    CHECK_EQ(fegetround(), FE_TONEAREST); /* the fiber's change stayed there */
#if defined(__x86_64__)
    CHECK_EQ(_mm_getcsr() & 0x6000, 0);
#endif
    caller__fiber_switch_to(f);
    CHECK(caller__fiber_finished(f));
    CHECK_EQ(j.seen_after_yield, FE_UPWARD);
#if defined(__x86_64__)
    CHECK_EQ(j.mxcsr_rc, 0x4000); /* round up */
#endif
    volatile double one = 1.0, three = 3.0;
    double nearest = one / three;
    /* Rounded up in the fiber. valgrind keeps the modes in the registers
     * but computes SSE arithmetic with round-to-nearest whatever MXCSR says,
     * so there only the registers can be checked. */
    if (!RUNNING_ON_VALGRIND)
        CHECK(j.third > nearest);
    CHECK_EQ(fegetround(), FE_TONEAREST);
    caller__fiber_free(f);
    end_clean();
}

/* ---- stack overflow -------------------------------------------------------- */

static char *overflow_guard_lo, *overflow_guard_hi;
static int overflow_report_fd = -1;

/* Reports whether the fault was in the guard page, then dies of it. Only
 * async-signal-safe calls. */
static void overflow_segv(int sig, siginfo_t *si, void *uc)
{
    (void)uc;
    char *addr = si->si_addr;
    char c = addr >= overflow_guard_lo && addr < overflow_guard_hi ? 'G' : 'X';
    ssize_t n = write(overflow_report_fd, &c, 1);
    (void)n;
    signal(sig, SIG_DFL);
    raise(sig); /* blocked until the handler returns, then kills us */
}

/* 1 KiB of locals a frame: less than the guard page, so each frame's first
 * touch below the stack lands in the guard page rather than past it. (A frame
 * bigger than the guard could skip over it; compilers only probe for that
 * with -fstack-clash-protection.) */
__attribute__((noinline)) static int overflow_rec(int depth)
{
    volatile char buf[1024];
    for (size_t i = 0; i < sizeof buf; i += 128)
        buf[i] = (char)depth;
    if (depth == INT32_MAX)
        return 0;
    return overflow_rec(depth + 1) + buf[depth % 8 * 128];
}

static void overflow_fn(void *arg)
{
    (void)arg;
    overflow_rec(0);
}

#if defined(TEST_ASAN)
/* ASan installs its own SIGSEGV handler; this lets the child's own
 * sigaction replace it (the default, made explicit). */
const char *__asan_default_options(void);
const char *__asan_default_options(void)
{
    return "allow_user_segv_handler=1";
}
#endif

/* In a child process: churn is how many fibers to run and free first, so
 * that the overflowing fiber gets a stack the pool handed out before (and,
 * past the pool's dirty limit, whose pages it dropped). */
static void overflow_in_child(int churn, bool copied)
{
    start_clean();
    int fds[2];
    CHECK_EQ(pipe(fds), 0);
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        close(fds[0]);
        overflow_report_fd = fds[1];
        static char altstack[64 * 1024];
        stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack};
        struct sigaction sa = {.sa_sigaction = overflow_segv, .sa_flags = SA_SIGINFO | SA_ONSTACK};
        sigemptyset(&sa.sa_mask);
        if (sigaltstack(&ss, NULL) != 0 || sigaction(SIGSEGV, &sa, NULL) != 0)
            _exit(2);
        if (churn > 0) {
            caller__fiber_t **fs = calloc((size_t)churn, sizeof *fs);
            struct once o = {0};
            for (int i = 0; i < churn; i++) {
                if (!fs || !(fs[i] = caller__fiber_new(0, once_fn, &o)))
                    _exit(5);
                caller__fiber_switch_to(fs[i]);
            }
            for (int i = 0; i < churn; i++)
                caller__fiber_free(fs[i]);
            caller__fiber_cache_clear();
            free(fs);
        }
        caller__fiber_t *f = copied ? caller__fiber_new_copied(0, overflow_fn, NULL)
                                    : caller__fiber_new(0, overflow_fn, NULL);
        if (!f)
            _exit(3);
        void *lo, *hi;
        caller__fiber_guard(f, &lo, &hi);
        overflow_guard_lo = lo;
        overflow_guard_hi = hi;
        caller__fiber_switch_to(f);
        _exit(4); /* not reached */
    }
    close(fds[1]);
    int status = 0;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    char c = 0;
    ssize_t n = read(fds[0], &c, 1);
    close(fds[0]);
    if (!WIFSIGNALED(status))
        fprintf(stderr, "child exited with %d\n", WEXITSTATUS(status));
    CHECK(WIFSIGNALED(status));
    CHECK_EQ(WTERMSIG(status), SIGSEGV);
    CHECK_EQ(n, 1);
    CHECK_EQ(c, 'G'); /* the fault address was in the fiber's guard page */
    end_clean();
}

TEST(stack_overflow_hits_guard)
{
    overflow_in_child(0, false);
}

/* Copy-stack mode: the run stack has its guard page too. */
TEST(copied_fiber_overflow_hits_the_run_stack_guard)
{
    overflow_in_child(0, true);
}

/* A stack back from the pool keeps its guard, also after the pool dropped
 * its pages (2000 fibers given back: past the pool's 1024 dirty slots). */
TEST(stack_overflow_hits_guard_of_a_reused_stack)
{
    overflow_in_child(2000, false);
}

/* ---- the stack pool, shared by threads ------------------------------------ */

/* Writes a pattern on its stack, yields, and checks the pattern survived:
 * two live fibers given the same slot would overwrite each other's. */
static void pattern_fn(void *arg)
{
    unsigned char mine[256];
    unsigned char seed = (unsigned char)(uintptr_t)arg;
    for (size_t i = 0; i < sizeof mine; i++)
        mine[i] = (unsigned char)(seed + i * 7);
    __asm__ volatile("" : : "r"(mine) : "memory");
    caller__fiber_yield();
    for (size_t i = 0; i < sizeof mine; i++)
        CHECK_EQ(mine[i], (unsigned char)(seed + i * 7));
}

static void *pool_thread(void *arg)
{
    enum { LIVE = 300, ROUNDS = 10 };
    caller__fiber_t *fs[LIVE];
    unsigned seed = (unsigned)(uintptr_t)arg;
    for (int round = 0; round < ROUNDS; round++) {
        for (int i = 0; i < LIVE; i++) {
            fs[i] = caller__fiber_new(0, pattern_fn, (void *)(uintptr_t)(rand_r(&seed) & 0xff));
            CHECK(fs[i] != NULL);
            caller__fiber_switch_to(fs[i]);
        }
        CHECK_EQ(caller__fiber_stacks_mapped(), LIVE);
        for (int k = 0; k < 2; k++) /* finish and free odd, then even ones */
            for (int i = 1 - k; i < LIVE; i += 2) {
                caller__fiber_switch_to(fs[i]);
                CHECK(caller__fiber_finished(fs[i]));
                caller__fiber_free(fs[i]);
            }
        CHECK_EQ(caller__fiber_stacks_mapped(), CALLER__FIBER_CACHE_MAX);
        if (round % 3 == 2)
            caller__fiber_cache_clear();
    }
    caller__fiber_cache_clear();
    CHECK_EQ(caller__fiber_stacks_mapped(), 0);
    return NULL;
}

/* Two threads taking stacks from the pool and giving them back at once
 * (meant for TSan): no slot is ever live in two fibers. */
TEST(pool_shared_by_two_threads)
{
    start_clean();
    pthread_t a, b;
    CHECK_EQ(pthread_create(&a, NULL, pool_thread, (void *)1), 0);
    CHECK_EQ(pthread_create(&b, NULL, pool_thread, (void *)2), 0);
    CHECK_EQ(pthread_join(a, NULL), 0);
    CHECK_EQ(pthread_join(b, NULL), 0);
    end_clean();
}

/* ---- misuse ---------------------------------------------------------------- */

static void yield_once_fn(void *arg)
{
    (void)arg;
    caller__fiber_yield();
}

/* Runs fn in a child process and checks that it aborts. */
static void expect_abort(void (*fn)(void))
{
    fflush(NULL);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        /* Keep the expected "fiber misuse" message out of the test log. */
        int devnull = open("/dev/null", O_WRONLY);
        if (devnull >= 0)
            dup2(devnull, 2);
        fn();
        _exit(0);
    }
    int status = 0;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFSIGNALED(status));
    CHECK_EQ(WTERMSIG(status), SIGABRT);
}

static void free_suspended(void)
{
    caller__fiber_t *f = caller__fiber_new(0, yield_once_fn, NULL);
    caller__fiber_switch_to(f);
    caller__fiber_free(f);
}

static void resume_finished(void)
{
    struct once o = {0};
    caller__fiber_t *f = caller__fiber_new(0, once_fn, &o);
    caller__fiber_switch_to(f);
    caller__fiber_switch_to(f);
}

static void yield_outside(void)
{
    caller__fiber_yield();
}

static void switch_inside_fn(void *arg)
{
    caller__fiber_switch_to(arg);
}

static void switch_inside(void)
{
    caller__fiber_t *g = caller__fiber_new(0, yield_once_fn, NULL);
    caller__fiber_t *f = caller__fiber_new(0, switch_inside_fn, g);
    caller__fiber_switch_to(f);
}

TEST(misuse_aborts)
{
    start_clean();
    expect_abort(free_suspended);
    expect_abort(resume_finished);
    expect_abort(yield_outside);
    expect_abort(switch_inside);
    end_clean();
}

/* ---- many at once ---------------------------------------------------------- */

struct many {
    int phase;
};

static void many_fn(void *arg)
{
    struct many *m = arg;
    m->phase = 1;
    caller__fiber_yield();
    m->phase = 2;
}

TEST(ten_thousand_suspended)
{
    start_clean();
    enum { N = 10000 };
    caller__fiber_t **fs = calloc(N, sizeof *fs);
    struct many *ms = calloc(N, sizeof *ms);
    CHECK(fs && ms);
    for (int i = 0; i < N; i++) {
        fs[i] = caller__fiber_new(0, many_fn, &ms[i]);
        CHECK(fs[i] != NULL);
        caller__fiber_switch_to(fs[i]);
        CHECK_EQ(ms[i].phase, 1);
    }
    CHECK_EQ(caller__fiber_stacks_mapped(), N); /* all alive, all suspended */
    for (int i = 0; i < N; i++) {
        CHECK(!caller__fiber_finished(fs[i]));
        caller__fiber_switch_to(fs[i]);
        CHECK(caller__fiber_finished(fs[i]));
        CHECK_EQ(ms[i].phase, 2);
    }
    for (int i = 0; i < N; i++)
        caller__fiber_free(fs[i]);
    CHECK_EQ(caller__fiber_stacks_mapped(), CALLER__FIBER_CACHE_MAX);
    free(fs);
    free(ms);
    end_clean();
}

/* ---- copy-stack mode -------------------------------------------------------- */

/* Each fiber fills a local array with its own pattern, notes its address,
 * and yields many times at several depths; whenever it runs again its
 * locals must be intact and at the same address, whichever fibers ran on
 * the run stack meanwhile. */
struct copied {
    int id, yields, bad;
    const void *where;
};

__attribute__((noinline)) static void copied_level(struct copied *c, int depth)
{
    unsigned char mine[200 + 40 * (depth % 5)];
    for (size_t i = 0; i < sizeof mine; i++)
        mine[i] = (unsigned char)(c->id * 31 + depth * 7 + i);
    __asm__ volatile("" : : "r"(mine) : "memory");
    if (depth == 0)
        c->where = mine;
    for (int k = 0; k < c->yields; k++) {
        CHECK_EQ(caller__fiber_yield(), 0);
        if (depth == 0 && c->where != (const void *)mine)
            c->bad++;
        for (size_t i = 0; i < sizeof mine; i++)
            if (mine[i] != (unsigned char)(c->id * 31 + depth * 7 + i))
                c->bad++;
    }
    if (depth < 6)
        copied_level(c, depth + 1);
}

static void copied_fn(void *arg)
{
    copied_level(arg, 0);
}

TEST(copied_fibers_keep_their_stacks)
{
    start_clean();
    enum { N = 50, YIELDS = 3 };
    struct copied cs[N];
    caller__fiber_t *fs[N];
    for (int i = 0; i < N; i++) {
        cs[i] = (struct copied){.id = i, .yields = YIELDS};
        fs[i] = caller__fiber_new_copied(64 * 1024, copied_fn, &cs[i]);
        CHECK(fs[i] != NULL);
        CHECK(caller__fiber_copied(fs[i]));
    }
    /* One run stack for all of them, whatever their number. */
    CHECK_EQ(caller__fiber_stacks_mapped(), 1);
    void *lo0, *hi0, *lo1, *hi1;
    caller__fiber_stack(fs[0], &lo0, &hi0);
    caller__fiber_stack(fs[N - 1], &lo1, &hi1);
    CHECK_PTR_EQ(lo0, lo1);
    CHECK_PTR_EQ(hi0, hi1);
    /* Round robin until all have finished: every switch evicts another. */
    int live = N, rounds = 0;
    while (live > 0) {
        for (int i = 0; i < N; i++) {
            if (!fs[i])
                continue;
            caller__fiber_switch_to(fs[i]);
            if (caller__fiber_finished(fs[i])) {
                caller__fiber_free(fs[i]);
                fs[i] = NULL;
                live--;
            }
        }
        rounds++;
    }
    CHECK_EQ(rounds, 7 * YIELDS + 1);
    for (int i = 0; i < N; i++)
        CHECK_EQ(cs[i].bad, 0);
    /* The run stack stays until the cache is cleared with none alive. */
    CHECK_EQ(caller__fiber_stacks_mapped(), 1);
    end_clean();
}

/* A copied fiber that yields and runs again with no other copied fiber in
 * between is never copied: its bytes stayed on the run stack. */
TEST(copied_fiber_alone_is_not_copied)
{
    start_clean();
    struct copied c = {.id = 1, .yields = 100};
    caller__fiber_t *f = caller__fiber_new_copied(0, copied_fn, &c);
    CHECK(f != NULL);
    while (!caller__fiber_finished(f)) {
        caller__fiber_switch_to(f);
        CHECK_EQ(caller__fiber_saved_bytes(f), 0);
    }
    CHECK_EQ(c.bad, 0);
    caller__fiber_free(f);
    end_clean();
}

/* What a suspended copied fiber keeps is its used stack: far less than a
 * page for a shallow one, and the run stack is not touched per fiber. */
TEST(copied_fiber_saves_its_used_stack)
{
    start_clean();
    struct copied a = {.id = 2, .yields = 1}, b = {.id = 3, .yields = 1};
    caller__fiber_t *fa = caller__fiber_new_copied(0, copied_fn, &a);
    caller__fiber_t *fb = caller__fiber_new_copied(0, copied_fn, &b);
    CHECK(fa && fb);
    caller__fiber_switch_to(fa); /* a suspends at depth 0 */
    caller__fiber_switch_to(fb); /* b takes the run stack: a is copied out */
    size_t saved = caller__fiber_saved_bytes(fa);
    CHECK_GE(saved, 200);   /* at least its array */
    CHECK_LT(saved, 16384); /* and not the whole run stack */
    while (!caller__fiber_finished(fa) || !caller__fiber_finished(fb)) {
        if (!caller__fiber_finished(fa))
            caller__fiber_switch_to(fa);
        if (!caller__fiber_finished(fb))
            caller__fiber_switch_to(fb);
    }
    CHECK_EQ(a.bad, 0);
    CHECK_EQ(b.bad, 0);
    caller__fiber_free(fa);
    caller__fiber_free(fb);
    end_clean();
}

/* Deep frames (most of a 256 KiB run stack) survive being copied out at
 * the deepest point and back in while another fiber runs: each frame
 * checks its locals on the way back up. */
struct deep_copied {
    char *top;
    size_t want, reached, saved;
    int bad;
};

__attribute__((noinline)) static void deep_copied_rec(struct deep_copied *d, int depth)
{
    volatile unsigned char buf[512];
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (unsigned char)(depth * 13 + i);
    size_t used = (size_t)(d->top - (char *)__builtin_frame_address(0));
    if (used < d->want) {
        deep_copied_rec(d, depth + 1);
    } else {
        d->reached = used;
        CHECK_EQ(caller__fiber_yield(), 0);
    }
    for (size_t i = 0; i < sizeof buf; i++)
        if (buf[i] != (unsigned char)(depth * 13 + i))
            d->bad++;
}

static void deep_copied_fn(void *arg)
{
    deep_copied_rec(arg, 0);
}

TEST(copied_fiber_deep_stack)
{
    start_clean();
    struct deep_copied d = {.want = 150 * 1024};
    caller__fiber_t *f = caller__fiber_new_copied(0, deep_copied_fn, &d);
    struct copied other = {.id = 9, .yields = 2};
    caller__fiber_t *g = caller__fiber_new_copied(0, copied_fn, &other);
    CHECK(f && g);
    void *lo, *hi;
    caller__fiber_stack(f, &lo, &hi);
    d.top = hi;
    caller__fiber_switch_to(f); /* suspends 150 KiB deep */
    CHECK_GE(d.reached, 150 * 1024);
    while (!caller__fiber_finished(g))
        caller__fiber_switch_to(g);
    CHECK_GE(caller__fiber_saved_bytes(f), d.reached);
    caller__fiber_switch_to(f);
    CHECK(caller__fiber_finished(f));
    CHECK_EQ(d.bad, 0);
    CHECK_EQ(other.bad, 0);
    caller__fiber_free(f);
    caller__fiber_free(g);
    end_clean();
}

/* All copied fibers of a thread share one run stack size. */
TEST(copied_fibers_share_one_size)
{
    start_clean();
    struct copied c = {.id = 4, .yields = 1};
    caller__fiber_t *f = caller__fiber_new_copied(64 * 1024, copied_fn, &c);
    CHECK(f != NULL);
    CHECK_PTR_EQ(caller__fiber_new_copied(128 * 1024, copied_fn, &c), NULL);
    const char *msg;
    CHECK_EQ(caller_last_error(&msg), -EINVAL);
    CHECK(strstr(msg, "one run stack") != NULL);
    while (!caller__fiber_finished(f))
        caller__fiber_switch_to(f);
    caller__fiber_free(f);
    /* None alive: another size is fine (the run stack is replaced). */
    f = caller__fiber_new_copied(128 * 1024, copied_fn, &c);
    CHECK(f != NULL);
    CHECK_EQ(caller__fiber_stacks_mapped(), 1);
    caller__fiber_free(f);
    end_clean();
}

/* Out of memory for the save buffer: the yield fails with -ENOMEM and the
 * fiber keeps running; it can yield once memory is back. */
static void nomem_fn(void *arg)
{
    int *rc = arg;
    caller__alloc_fail_after(0);
    rc[0] = caller__fiber_yield();
    caller__alloc_fail_after(-1);
    rc[1] = caller__fiber_yield();
}

TEST(copied_fiber_yield_without_memory)
{
    start_clean();
    int rc[2] = {1, 1};
    caller__fiber_t *f = caller__fiber_new_copied(0, nomem_fn, rc);
    CHECK(f != NULL);
    caller__fiber_switch_to(f); /* the first yield fails, the second works */
    CHECK_EQ(rc[0], -ENOMEM);
    CHECK(!caller__fiber_finished(f));
    caller__fiber_switch_to(f);
    CHECK_EQ(rc[1], 0);
    CHECK(caller__fiber_finished(f));
    caller__fiber_free(f);
    end_clean();
}

/* Pointers into the run stack are recognised only from a copied fiber. */
static void on_run_stack_fn(void *arg)
{
    int *seen = arg;
    int local = 0;
    seen[0] = caller__fiber_on_run_stack(&local);
    seen[1] = caller__fiber_on_run_stack(seen);
}

TEST(copied_fiber_knows_its_run_stack)
{
    start_clean();
    int seen[2] = {-1, -1};
    caller__fiber_t *f = caller__fiber_new_copied(0, on_run_stack_fn, seen);
    CHECK(f != NULL);
    caller__fiber_switch_to(f);
    CHECK_EQ(seen[0], 1);
    CHECK_EQ(seen[1], 0);
    caller__fiber_free(f);
    int local;
    CHECK(!caller__fiber_on_run_stack(&local)); /* not in a fiber */
    f = caller__fiber_new(0, on_run_stack_fn, seen);
    CHECK(f != NULL);
    caller__fiber_switch_to(f);
    CHECK_EQ(seen[0], 0); /* a stack of its own */
    caller__fiber_free(f);
    end_clean();
}
