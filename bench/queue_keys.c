/*
 * Q1 queue keys: the cost of caller_queue_call_key with many live keys, in
 * ns per call, with 1,000 and with 16,000 keys alive; the figure of merit is
 * their ratio (finding a key's queue should not grow with the number of
 * keys).
 *
 *  libcaller  a MANUAL Caller runs a task that first queues one item on
 *             each of K keys, then calls caller_queue_call_key CALLS times,
 *             visiting the keys in a scattered order (i * 7919 mod K), and
 *             closes every key. The task never suspends in between, so no
 *             queue's task runs before the end: every one of the K queues
 *             is live (and holds its items) while the calls are timed, and
 *             each timed call appends to an existing queue. The keys are
 *             the addresses of 64-byte objects, as keys usually are.
 *
 * No floor: pthread and libuv have nothing to compare. Metrics: ns per call
 * with 1,000 keys, with 16,000 keys, and their ratio.
 */
#include "bench.h"

#include <caller.h>

enum { SMALL = 1000, LARGE = 16000, CALLS = 200000 };

typedef struct {
    char bytes[64];
} key_t_;

static void *noop(void *arg)
{
    return arg;
}

typedef struct {
    key_t_ *keys;
    int nkeys;
    double ns; /* per timed call */
} run_t;

static void *body(void *arg)
{
    run_t *r = arg;
    caller_t *c = caller_current();
    for (int k = 0; k < r->nkeys; k++) {
        caller_pending_t *p = caller_queue_call_key(c, &r->keys[k], noop, NULL);
        BENCH_CHECK(p != NULL);
        caller_pending_unref(p);
    }
    double t0 = bench_now();
    for (long i = 0; i < CALLS; i++) {
        caller_pending_t *p = caller_queue_call_key(c, &r->keys[(i * 7919) % r->nkeys], noop, NULL);
        BENCH_CHECK(p != NULL);
        caller_pending_unref(p);
    }
    r->ns = (bench_now() - t0) * 1e9 / CALLS;
    for (int k = 0; k < r->nkeys; k++)
        BENCH_CHECK(caller_queue_close_key(c, &r->keys[k]) == 1);
    return NULL;
}

static double measure(int nkeys)
{
    run_t r = {calloc((size_t)nkeys, sizeof(key_t_)), nkeys, NAN};
    BENCH_CHECK(r.keys != NULL);
    caller_t *c = caller_create(CALLER_MANUAL, &(caller_options_t){.name = "bench-q1"});
    BENCH_CHECK(c != NULL);
    BENCH_CHECK(caller_run(c, body, &r, NULL) == 0);
    caller_unref(c);
    BENCH_CHECK(bench_drains_to_zero(caller_live_count, 2) &&
                bench_drains_to_zero(caller_pending_live_count, 2));
    free(r.keys);
    return r.ns;
}

static int ours(double *out)
{
    out[0] = measure(SMALL);
    out[1] = measure(LARGE);
    out[2] = out[1] / out[0];
    return 0;
}

static const bench_workload_t q1 = {
    "Q1",
    "queue keys",
    "caller_queue_call_key on one of 1,000 or 16,000 live keys (200,000 calls each)",
    3,
    {{"1k keys", "ns"}, {"16k keys", "ns"}, {"16k/1k", "x"}},
    {{"queue_call_key (MANUAL)", ours}, {NULL, NULL}, {NULL, NULL}},
    300,
    0,
};

int main(void)
{
    bench_begin();
    bench_workload(&q1);
    return bench_end();
}
