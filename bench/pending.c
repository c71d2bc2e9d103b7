/*
 * Pending benchmarks (issue #2), each beside a raw pthread floor doing the
 * same job:
 *
 *  P1 lifecycle    create, add one done callback, set the result, run the
 *                  callback, release: ns per Pending. Floor: malloc a 128-byte
 *                  record, store the callback and the value under a
 *                  pthread mutex, call it, free.
 *  P2 ping-pong    two threads hand a token back and forth, each hop
 *                  completing a fresh Pending the other blocks on: µs per
 *                  round trip. Floor: the same hops on a mutex + condvar.
 *
 * Run by the harness of bench.h: each run in its own forked process,
 * interleaved with the floor's.
 */
#include "bench.h"

#include <caller.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

#include "internal.h"

enum { P1_N = 1000000, P2_N = 20000 };

static atomic_long sink;

static void on_done(caller_pending_t *p, void *arg)
{
    (void)p;
    atomic_fetch_add_explicit(&sink, (long)(intptr_t)arg, memory_order_relaxed);
}

static int p1_ours(double *out)
{
    double t0 = bench_now();
    for (long i = 0; i < P1_N; i++) {
        caller_pending_t *p = caller_pending_new(0);
        caller_pending_add_done_callback(p, on_done, (void *)1);
        caller_pending_set_result(p, (void *)i, 0);
        caller_pending_unref(p);
    }
    out[0] = (bench_now() - t0) * 1e9 / P1_N;
    return caller_pending_live_count() == 0 ? 0 : 1;
}

typedef struct {
    pthread_mutex_t lock;
    void (*fn)(void *, void *);
    void *arg, *value;
    int done;
    char pad[128 - sizeof(pthread_mutex_t) - 4 * sizeof(void *) - sizeof(int)];
} raw_future_t;

static void raw_done(void *f, void *arg)
{
    (void)f;
    atomic_fetch_add_explicit(&sink, (long)(intptr_t)arg, memory_order_relaxed);
}

static int p1_floor(double *out)
{
    double t0 = bench_now();
    for (long i = 0; i < P1_N; i++) {
        raw_future_t *f = malloc(sizeof *f);
        pthread_mutex_init(&f->lock, NULL);
        pthread_mutex_lock(&f->lock);
        f->fn = raw_done;
        f->arg = (void *)1;
        pthread_mutex_unlock(&f->lock);
        pthread_mutex_lock(&f->lock);
        f->value = (void *)i;
        f->done = 1;
        void (*fn)(void *, void *) = f->fn;
        pthread_mutex_unlock(&f->lock);
        fn(f, f->arg);
        pthread_mutex_destroy(&f->lock);
        free(f);
    }
    out[0] = (bench_now() - t0) * 1e9 / P1_N;
    return 0;
}

/* P2: slot[i] is the Pending for hop i, created by the main thread ahead. */
static caller_pending_t **slots;

static void *p2_ours_peer(void *arg)
{
    (void)arg;
    for (int i = 0; i < P2_N; i++) {
        caller_pending_wait(slots[2 * i], CALLER_FOREVER, CALLER_WAIT_PROTECT, NULL);
        caller_pending_set_result(slots[2 * i + 1], NULL, 0);
    }
    return NULL;
}

static int p2_ours(double *out)
{
    slots = malloc(sizeof *slots * 2 * P2_N);
    for (int i = 0; i < 2 * P2_N; i++)
        slots[i] = caller_pending_new(CALLER_PENDING_UNTRACKED);
    pthread_t t;
    pthread_create(&t, NULL, p2_ours_peer, NULL);
    double t0 = bench_now();
    for (int i = 0; i < P2_N; i++) {
        caller_pending_set_result(slots[2 * i], NULL, 0);
        caller_pending_wait(slots[2 * i + 1], CALLER_FOREVER, CALLER_WAIT_PROTECT, NULL);
    }
    double dt = bench_now() - t0;
    pthread_join(t, NULL);
    for (int i = 0; i < 2 * P2_N; i++)
        caller_pending_unref(slots[i]);
    free(slots);
    out[0] = dt * 1e6 / P2_N;
    return caller_pending_live_count() == 0 ? 0 : 1;
}

static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    long turn;
} pp = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0};

static void pp_pass(long from)
{
    pthread_mutex_lock(&pp.lock);
    while (pp.turn != from)
        pthread_cond_wait(&pp.cond, &pp.lock);
    pp.turn = from + 1;
    pthread_cond_broadcast(&pp.cond);
    pthread_mutex_unlock(&pp.lock);
}

static void *p2_floor_peer(void *arg)
{
    (void)arg;
    for (long i = 0; i < P2_N; i++)
        pp_pass(2 * i + 1);
    return NULL;
}

static int p2_floor(double *out)
{
    pp.turn = 0;
    pthread_t t;
    pthread_create(&t, NULL, p2_floor_peer, NULL);
    double t0 = bench_now();
    for (long i = 0; i < P2_N; i++)
        pp_pass(2 * i);
    pthread_mutex_lock(&pp.lock); /* wait for the peer's last hop */
    while (pp.turn != 2 * P2_N)
        pthread_cond_wait(&pp.cond, &pp.lock);
    pthread_mutex_unlock(&pp.lock);
    double dt = bench_now() - t0;
    pthread_join(t, NULL);
    out[0] = dt * 1e6 / P2_N;
    return 0;
}

static const bench_workload_t p1 = {
    "P1",
    "pending lifecycle",
    "create a Pending, add 1 done callback, set the result (runs it), release; 1e6 times",
    1,
    {{"per Pending", "ns"}},
    {{"caller_pending_*", p1_ours}, {"malloc+mutex record", p1_floor}, {NULL, NULL}},
    60,
    0,
};

static const bench_workload_t p2 = {
    "P2",
    "cross-thread ping-pong",
    "two threads hand a token back and forth, each hop completing a Pending the other waits on",
    1,
    {{"round trip", "us"}},
    {{"caller_pending_wait", p2_ours}, {"mutex+condvar", p2_floor}, {NULL, NULL}},
    60,
    0,
};

int main(void)
{
    bench_begin();
    printf("sizeof(struct caller_pending) = %zu bytes\n", caller__pending_size());
    bench_workload(&p1);
    bench_workload(&p2);
    return bench_end();
}
