/*
 * The test harness: registration of test cases and assertion macros.
 *
 * Why not cmocka: its assertions longjmp back to the runner, which is only
 * valid on the thread and stack that started the test. Our tests assert from
 * many threads (and, later, on fiber stacks), so a failed check here prints
 * both values with file:line and aborts the process; CTest runs each case in
 * its own process (`test-<feature> <case>`), so one failure fails one case.
 *
 * Each case is written `TEST(name) { ... }` at the start of a line; CMake
 * reads those lines to make one CTest test per case. After a case returns,
 * the runner checks that no Pending is left alive.
 */
#ifndef CALLER_CHECK_H
#define CALLER_CHECK_H

#include "caller.h"

#include <errno.h>
#include <inttypes.h>
#include <semaphore.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct check_case {
    const char *name;
    void (*fn)(void);
    struct check_case *next;
} check_case_t;

static check_case_t *check__cases;

static void check__register(check_case_t *c)
{
    c->next = check__cases;
    check__cases = c;
}

#define TEST(name)                                                                                 \
    static void test_##name(void);                                                                 \
    static check_case_t check__case_##name = {#name, test_##name, NULL};                           \
    __attribute__((constructor)) static void check__reg_##name(void)                               \
    {                                                                                              \
        check__register(&check__case_##name);                                                      \
    }                                                                                              \
    static void test_##name(void)

__attribute__((noreturn)) static void check__fail(const char *file, int line, const char *what)
{
    fprintf(stderr, "%s:%d: check failed: %s\n", file, line, what);
    fflush(stderr);
    abort();
}

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond))                                                                               \
            check__fail(__FILE__, __LINE__, #cond);                                                \
    } while (0)

#define CHECK_OP(a, op, b)                                                                         \
    do {                                                                                           \
        long long check__a = (long long)(a), check__b = (long long)(b);                            \
        if (!(check__a op check__b)) {                                                             \
            char check__m[512];                                                                    \
            snprintf(check__m, sizeof check__m, "%s %s %s (%lld %s %lld)", #a, #op, #b, check__a,  \
                     #op, check__b);                                                               \
            check__fail(__FILE__, __LINE__, check__m);                                             \
        }                                                                                          \
    } while (0)

#define CHECK_EQ(a, b) CHECK_OP(a, ==, b)
#define CHECK_NE(a, b) CHECK_OP(a, !=, b)
#define CHECK_LT(a, b) CHECK_OP(a, <, b)
#define CHECK_LE(a, b) CHECK_OP(a, <=, b)
#define CHECK_GE(a, b) CHECK_OP(a, >=, b)

/* An error code check that names both codes. */
#define CHECK_RC(expr, want)                                                                       \
    do {                                                                                           \
        int check__got = (expr), check__want = (want);                                             \
        if (check__got != check__want) {                                                           \
            char check__m[512];                                                                    \
            snprintf(check__m, sizeof check__m, "%s returned %d (%s), expected %d (%s)", #expr,    \
                     check__got, caller_err_name(check__got), check__want,                         \
                     caller_err_name(check__want));                                                \
            check__fail(__FILE__, __LINE__, check__m);                                             \
        }                                                                                          \
    } while (0)

#define CHECK_PTR_EQ(a, b)                                                                         \
    do {                                                                                           \
        const void *check__a = (a), *check__b = (b);                                               \
        if (check__a != check__b) {                                                                \
            char check__m[512];                                                                    \
            snprintf(check__m, sizeof check__m, "%s == %s (%p != %p)", #a, #b, check__a,           \
                     check__b);                                                                    \
            check__fail(__FILE__, __LINE__, check__m);                                             \
        }                                                                                          \
    } while (0)

#define CHECK_STR_EQ(a, b)                                                                         \
    do {                                                                                           \
        const char *check__a = (a), *check__b = (b);                                               \
        if (!check__a || !check__b || strcmp(check__a, check__b) != 0) {                           \
            char check__m[1024];                                                                   \
            snprintf(check__m, sizeof check__m, "%s == %s (\"%s\" != \"%s\")", #a, #b,             \
                     check__a ? check__a : "(null)", check__b ? check__b : "(null)");              \
            check__fail(__FILE__, __LINE__, check__m);                                             \
        }                                                                                          \
    } while (0)

#define CHECK_CONTAINS(hay, needle)                                                                \
    do {                                                                                           \
        const char *check__h = (hay), *check__n = (needle);                                        \
        if (!check__h || !strstr(check__h, check__n)) {                                            \
            char check__m[1024];                                                                   \
            snprintf(check__m, sizeof check__m, "\"%s\" contains \"%s\"",                          \
                     check__h ? check__h : "(null)", check__n);                                    \
            check__fail(__FILE__, __LINE__, check__m);                                             \
        }                                                                                          \
    } while (0)

/*
 * Backends: the whole suite runs once on the default backend and once with
 * CALLER_BACKEND=glib (see CMakeLists.txt); a case that states which
 * backend a Caller it made without naming one has asks check_backend().
 */
static inline const char *check_backend(void)
{
    const char *b = getenv("CALLER_BACKEND");
    return b && b[0] ? b : "libuv";
}

/* A backend this build has that is not the default one of this run, or
 * NULL in a build with one backend. */
static inline const char *check_other_backend(void)
{
    const char *names[4];
    size_t n = caller_backends(names, 4);
    for (size_t i = 0; i < n && i < 4; i++)
        if (strcmp(names[i], check_backend()) != 0)
            return names[i];
    return NULL;
}

/*
 * Timing in tests: lower bounds only, scaled for slow machines (sanitizers,
 * loaded CI) by CALLER_TEST_TIME_SCALE (default 1).
 */
static inline double check_time_scale(void)
{
    const char *s = getenv("CALLER_TEST_TIME_SCALE");
    double v = s ? atof(s) : 1.0;
    return v > 0 ? v : 1.0;
}

static inline double check_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Integers through void * task arguments and results. */
#define P(x) ((void *)(intptr_t)(x))
#define I(x) ((intptr_t)(x))

/* A new Caller on its own thread (NULL name: the default). */
static inline caller_t *check_new_thread(const char *name)
{
    caller_options_t o = {.name = name};
    caller_t *c = caller_create(CALLER_NEW_THREAD, &o);
    if (!c) {
        const char *m;
        caller_last_error(&m);
        fprintf(stderr, "caller_create: %s\n", m);
        abort();
    }
    return c;
}

/* Stop a Caller, wait until it stopped, and release it. */
static inline void check_stop(caller_t *c)
{
    caller_stop(c, CALLER_STOP_FORCE);
    if (caller_wait_stopped(c, 10 * check_time_scale()) != 0 ||
        caller_state(c) != CALLER_STATE_STOPPED) {
        fprintf(stderr, "check_stop: the Caller did not stop\n");
        abort();
    }
    caller_unref(c);
}

/* Wait for @p s to be posted, at most 10 s (scaled); fails the test after. */
static inline void check_sem_wait(sem_t *s)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    ts.tv_sec += (time_t)(10 * check_time_scale());
    int rc;
    while ((rc = sem_timedwait(s, &ts)) != 0 && errno == EINTR)
        ;
    CHECK_EQ(rc, 0);
}

/* Wait (at most @p seconds, scaled) for @p p, release it, return its
 * result. */
static inline void *check_await(caller_pending_t *p, double seconds)
{
    CHECK(p != NULL);
    void *v = NULL;
    CHECK_RC(caller_pending_wait(p, seconds * check_time_scale(), CALLER_WAIT_RESULT, &v), 0);
    caller_pending_unref(p);
    return v;
}

/* A task: post the semaphore @p arg. Scheduled after a task that waits,
 * it runs only once that task has suspended (one thread, FIFO order). */
static inline void *check_post_sem(void *arg)
{
    sem_post(arg);
    return NULL;
}

/* Schedule check_post_sem after what is queued on @p c and wait for it:
 * every task scheduled before it has run up to its first suspension. */
static inline void check_until_suspended(caller_t *c)
{
    sem_t s;
    sem_init(&s, 0, 0);
    caller_pending_t *p = caller_call_soon(c, check_post_sem, &s);
    CHECK(p != NULL);
    check_sem_wait(&s);
    check_await(p, 10);
    sem_destroy(&s);
}

/* The detailed message of this thread's last error. */
static inline const char *check_last_message(void)
{
    const char *m;
    caller_last_error(&m);
    return m;
}

#ifndef CHECK_NO_MAIN /* programs that reuse the tests (make soak) have their own */
int main(int argc, char **argv)
{
    int ran = 0;
    for (check_case_t *c = check__cases; c; c = c->next) {
        if (argc > 1 && strcmp(argv[1], c->name) != 0)
            continue;
        c->fn();
        /* A stopped Caller's thread lets go of its last references just
         * after its stopped event fires: give it (at most) 10 s. */
        double until = check_now() + 10 * check_time_scale();
        while ((caller_pending_live_count() || caller_live_count()) && check_now() < until) {
            struct timespec ts = {0, 1000000};
            nanosleep(&ts, NULL);
        }
        size_t live = caller_pending_live_count(), callers = caller_live_count();
        if (live || callers) {
            fprintf(stderr, "%s: leaked %zu Pending(s) and %zu Caller(s)\n", c->name, live,
                    callers);
            return 1;
        }
        printf("ok %s\n", c->name);
        ran++;
    }
    if (ran == 0) {
        fprintf(stderr, "no test case named %s\n", argc > 1 ? argv[1] : "(any)");
        return 1;
    }
    return 0;
}

#endif /* CHECK_NO_MAIN */

#endif /* CALLER_CHECK_H */
