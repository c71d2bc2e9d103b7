/*
 * C1 collect: what caller_as_completed, caller_as_completed_gen and
 * caller_wait add per item over reading the results yourself. N = 100,000
 * Pendings, already done (made and completed before the clock starts), so
 * no worker, wake-up or scheduling is timed: only the collecting.
 *
 *  libcaller  a MANUAL Caller's task: as_completed over the array (each
 *             item handed out, its result read, the reference released);
 *             as_completed_gen with max_concurrent 10 over a generator
 *             handing out the array's items (a reference each); caller_wait
 *             ALL_COMPLETED over the array, then each result read.
 *  pthread    the floor: the same task reads each Pending's result in a
 *             loop over the array (the least a consumer does).
 *
 * Figures: ns per item for each way; the ratio row is ours/floor, and the
 * overhead (ours - floor) is what the pool's consumers pay on top of it.
 */
#include "bench.h"

#include <caller.h>

enum { N = 100000 };

static caller_pending_t **items;
static uintptr_t sink;

static void make_items(void)
{
    items = malloc(sizeof *items * N);
    BENCH_CHECK(items != NULL);
    for (long i = 0; i < N; i++) {
        items[i] = caller_pending_new(CALLER_PENDING_UNTRACKED);
        BENCH_CHECK(items[i] != NULL);
        BENCH_CHECK(caller_pending_set_result(items[i], (void *)(uintptr_t)i, 0) == 0);
    }
}

static void free_items(void)
{
    for (long i = 0; i < N; i++)
        caller_pending_unref(items[i]);
    free(items);
}

typedef struct {
    long next;
} gen_t;

static caller_pending_t *generate(void *arg)
{
    gen_t *g = arg;
    return g->next < N ? caller_pending_ref(items[g->next++]) : NULL;
}

static double drain(caller_iter_t *it)
{
    BENCH_CHECK(it != NULL);
    caller_pending_t *p;
    long n = 0;
    int rc;
    while ((rc = caller_iter_next(it, &p)) == 0) {
        void *v;
        BENCH_CHECK(caller_pending_result(p, &v) == 0);
        sink += (uintptr_t)v;
        caller_pending_unref(p);
        n++;
    }
    BENCH_CHECK(rc == CALLER_ITER_END && n == N);
    caller_iter_close(it);
    return n;
}

static void *ours_body(void *arg)
{
    double *out = arg;
    make_items();
    double t0 = bench_now();
    drain(caller_as_completed(items, N, NULL));
    out[0] = (bench_now() - t0) * 1e9 / N;

    gen_t g = {0};
    t0 = bench_now();
    drain(caller_as_completed_gen(generate, &g,
                                  &(caller_as_completed_options_t){.max_concurrent = 10}));
    out[1] = (bench_now() - t0) * 1e9 / N;

    caller_pending_t **done = malloc(sizeof *done * N), **not_done = malloc(sizeof *done * N);
    BENCH_CHECK(done && not_done);
    /* The output arrays are the caller's: their first-touch faults are not
     * caller_wait's. */
    memset(done, 0, sizeof *done * N);
    memset(not_done, 0, sizeof *not_done * N);
    size_t nd = 0, nn = 0;
    t0 = bench_now();
    BENCH_CHECK(
        caller_wait(items, N, CALLER_FOREVER, CALLER_ALL_COMPLETED, done, &nd, not_done, &nn) == 0);
    for (size_t i = 0; i < nd; i++) {
        void *v;
        BENCH_CHECK(caller_pending_result(done[i], &v) == 0);
        sink += (uintptr_t)v;
    }
    out[2] = (bench_now() - t0) * 1e9 / N;
    BENCH_CHECK(nd == N && nn == 0);
    free(done);
    free(not_done);
    free_items();
    return NULL;
}

static void *floor_body(void *arg)
{
    double *out = arg;
    make_items();
    double t0 = bench_now();
    for (long i = 0; i < N; i++) {
        void *v;
        BENCH_CHECK(caller_pending_result(items[i], &v) == 0);
        sink += (uintptr_t)v;
    }
    double ns = (bench_now() - t0) * 1e9 / N;
    out[0] = out[1] = out[2] = ns;
    free_items();
    return NULL;
}

static int run_in_task(caller_fn body, double *out)
{
    caller_t *c = caller_create(CALLER_MANUAL, &(caller_options_t){.name = "bench-c1"});
    BENCH_CHECK(c != NULL);
    BENCH_CHECK(caller_run(c, body, out, NULL) == 0);
    caller_unref(c);
    return 0;
}

static int ours(double *out)
{
    return run_in_task(ours_body, out);
}

static int floor_results(double *out)
{
    return run_in_task(floor_body, out);
}

static const bench_workload_t c1 = {
    "C1",
    "collect",
    "as_completed / as_completed_gen(10) / wait over 100,000 done Pendings, ns per item",
    3,
    {{"as_completed", "ns"}, {"as_completed_gen(10)", "ns"}, {"wait ALL", "ns"}},
    {{"collecting (MANUAL task)", ours}, {"result loop (floor)", floor_results}, {NULL, NULL}},
    120,
    0,
};

int main(void)
{
    bench_begin();
    bench_workload(&c1);
    return bench_end();
}
