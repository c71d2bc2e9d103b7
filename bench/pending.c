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

static double p1_ours(void)
{
    double t0 = bench_now();
    for (long i = 0; i < P1_N; i++) {
        caller_pending_t *p = caller_pending_new(0);
        caller_pending_add_done_callback(p, on_done, (void *)1);
        caller_pending_set_result(p, (void *)i, false);
        caller_pending_unref(p);
    }
    return (bench_now() - t0) * 1e9 / P1_N;
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

static double p1_floor(void)
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
    return (bench_now() - t0) * 1e9 / P1_N;
}

/* P2: slot[i] is the Pending for hop i, created by the main thread ahead. */
static caller_pending_t **slots;

static void *p2_ours_peer(void *arg)
{
    (void)arg;
    for (int i = 0; i < P2_N; i++) {
        caller_pending_wait(slots[2 * i], CALLER_FOREVER, true, false, NULL);
        caller_pending_set_result(slots[2 * i + 1], NULL, false);
    }
    return NULL;
}

static double p2_ours(void)
{
    slots = malloc(sizeof *slots * 2 * P2_N);
    for (int i = 0; i < 2 * P2_N; i++)
        slots[i] = caller_pending_new(CALLER_PENDING_UNTRACKED);
    pthread_t t;
    pthread_create(&t, NULL, p2_ours_peer, NULL);
    double t0 = bench_now();
    for (int i = 0; i < P2_N; i++) {
        caller_pending_set_result(slots[2 * i], NULL, false);
        caller_pending_wait(slots[2 * i + 1], CALLER_FOREVER, true, false, NULL);
    }
    double dt = bench_now() - t0;
    pthread_join(t, NULL);
    for (int i = 0; i < 2 * P2_N; i++)
        caller_pending_unref(slots[i]);
    free(slots);
    return dt * 1e6 / P2_N;
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

static double p2_floor(void)
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
    return dt * 1e6 / P2_N;
}

int main(void)
{
    printf("sizeof(struct caller_pending) = %zu bytes\n", caller__pending_size());
    bench_header();
    bench_compare("P1 pending lifecycle (1 callback)", "ns", "malloc+mutex record", p1_ours,
                  p1_floor);
    bench_compare("P2 cross-thread ping-pong", "us/rt", "mutex+condvar", p2_ours, p2_floor);
    return caller_pending_live_count() == 0 ? 0 : 1;
}
