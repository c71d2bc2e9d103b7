/*
 * W6 suspended tasks (issue 8): N=100,000 tasks on one Caller, all suspended
 * at once waiting on one Pending; then set it and wait for all. Reported:
 * RSS per task in bytes, (RSS when all are suspended - RSS before the first
 * submission) / N, from /proc/self/statm; and the wall time from the first
 * submission until all are done.
 *
 *  libcaller  one NEW_THREAD Caller; the main thread caller_call_soon()s N
 *             tasks (keeping the Pendings); each task increments a counter
 *             and caller_pending_wait()s on the one gate Pending; the N-th
 *             sets an "all in" Pending before it waits. Once that is set,
 *             one more no-op is scheduled and waited for: it runs after the
 *             N-th task suspended (calls run in order), so all N are
 *             suspended. RSS is read, the gate is set, and the main thread
 *             waits for each task's Pending and releases it.
 *  libcaller-copy  the same with the Caller in copy-stack mode
 *             (CALLER_STACK_COPY): each suspended task keeps the used part
 *             of its stack in a heap buffer instead of a stack of its own.
 *  pthread    not measured: the floor the issue names, one 4 KiB page of
 *             stack per suspended task, is printed as a figure (4096 B).
 *             (100,000 threads would exceed this VM's vm.max_map_count and
 *             pid limits, and would disturb the other processes on it.)
 *  libuv      stackless: the same submissions through the async + locked
 *             queue to a loop thread; each job parks a 24-byte
 *             continuation record (next, function, argument) on the gate's
 *             list; when the N-th is parked the main thread reads RSS, then
 *             queues the "set the gate" job, which runs every continuation;
 *             the last one wakes the main thread. What a suspended wait
 *             costs when its state is a heap record instead of a stack.
 *  libcaller-glib  the libcaller program on the GLib backend (GLib has
 *             no suspended tasks of its own: no raw GLib system here).
 */
#include "bench.h"
#include "floors.h"

#include <caller.h>
#include <stdatomic.h>

enum { N = 100000 };

static atomic_long parked, finished;

static void *noop(void *arg)
{
    return arg;
}

/* ---- libcaller ----------------------------------------------------------- */

static caller_pending_t *gate, *all_in;

static void *waiter(void *arg)
{
    (void)arg;
    if (atomic_fetch_add(&parked, 1) + 1 == N)
        caller_pending_set_result(all_in, NULL, 0);
    int rc = caller_pending_wait(gate, CALLER_FOREVER, CALLER_WAIT_PROTECT, NULL);
    return (void *)(intptr_t)(rc == 0);
}

static int run_ours(double *out, unsigned stack_mode)
{
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){
                                                       .name = "bench-w6",
                                                       .stack_mode = stack_mode,
                                                   });
    BENCH_CHECK(c != NULL);
    caller_pending_t **p = malloc(N * sizeof *p);
    BENCH_CHECK(p);
    memset(p, 0, N * sizeof *p);
    gate = caller_pending_new(CALLER_PENDING_UNTRACKED);
    all_in = caller_pending_new(CALLER_PENDING_UNTRACKED);
    BENCH_CHECK(gate && all_in);
    /* Let the new Caller settle (its first task run) before the baseline. */
    caller_pending_t *first = caller_call_soon(c, noop, NULL);
    BENCH_CHECK(first &&
                caller_pending_wait(first, CALLER_FOREVER, CALLER_WAIT_PROTECT, NULL) == 0);
    caller_pending_unref(first);

    double rss0 = bench_rss_bytes();
    double t0 = bench_now();
    for (long i = 0; i < N; i++) {
        p[i] = caller_call_soon(c, waiter, NULL);
        if (!p[i]) {
            const char *msg;
            int code = caller_last_error(&msg);
            fprintf(stderr, "bench: W6 caller_call_soon #%ld failed: %s (%s)\n", i,
                    caller_err_name(code), msg);
            _exit(5);
        }
    }
    BENCH_CHECK(caller_pending_wait(all_in, CALLER_FOREVER, CALLER_WAIT_PROTECT, NULL) == 0);
    caller_pending_t *fence = caller_call_soon(c, noop, NULL);
    BENCH_CHECK(fence &&
                caller_pending_wait(fence, CALLER_FOREVER, CALLER_WAIT_PROTECT, NULL) == 0);
    caller_pending_unref(fence);
    double rss1 = bench_rss_bytes();
    double t1 = bench_now();
    BENCH_CHECK(caller_pending_set_result(gate, NULL, 0) == 0);
    long ok = 0;
    for (long i = 0; i < N; i++) {
        void *v = NULL;
        int rc =
            caller_pending_wait(p[i], CALLER_FOREVER, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v);
        if (rc != 0 && ok == i) {
            const char *msg;
            caller_last_error(&msg);
            fprintf(stderr, "bench: W6 task #%ld ended with %s (%s)\n", i, caller_err_name(rc),
                    msg);
        }
        ok += rc == 0 && v == (void *)1;
        caller_pending_unref(p[i]);
    }
    double t2 = bench_now();
    free(p);
    caller_pending_unref(gate);
    caller_pending_unref(all_in);
    caller_stop(c, 0);
    BENCH_CHECK(caller_wait_stopped(c, CALLER_FOREVER) == 0);
    caller_unref(c);
    BENCH_CHECK(ok == N);
    BENCH_CHECK(bench_drains_to_zero(caller_live_count, 2) &&
                bench_drains_to_zero(caller_pending_live_count, 2));
    out[0] = (rss1 - rss0) / N;
    out[1] = (t2 - t0) * 1e3;
    out[2] = (t1 - t0) * 1e3;
    return 0;
}

static int ours(double *out)
{
    return run_ours(out, CALLER_STACK_OWN);
}

static int ours_copy(double *out)
{
    return run_ours(out, CALLER_STACK_COPY);
}

#if CALLER_WITH_GLIB
static int ours_glib(double *out)
{
    return bench_on_glib(ours, out);
}
#endif

/* ---- pthread: the theoretical floor -------------------------------------- */

static int floor_pthread(double *out)
{
    out[0] = 4096; /* one page of stack per suspended thread */
    return 0;
}

/* ---- libuv: continuation records, no stacks ------------------------------ */

typedef struct cont {
    struct cont *next;
    bench_fn_t fn;
    void *arg;
} cont_t;

static struct {
    uvq_t q;
    cont_t *gate; /* parked continuations: touched by the loop thread only */
    bench_waiter_t all_in, all_done;
} uw;

static void *resume(void *arg)
{
    (void)arg;
    if (atomic_fetch_add(&finished, 1) + 1 == N)
        bench_waiter_post(&uw.all_done);
    return NULL;
}

/* A job on the loop: park a continuation on the gate. */
static void *park(void *arg)
{
    cont_t *k = malloc(sizeof *k);
    BENCH_CHECK(k);
    k->fn = resume;
    k->arg = arg;
    k->next = uw.gate;
    uw.gate = k;
    if (atomic_fetch_add(&parked, 1) + 1 == N)
        bench_waiter_post(&uw.all_in);
    return NULL;
}

/* A job on the loop: set the gate, running every parked continuation. */
static void *open_gate(void *arg)
{
    (void)arg;
    cont_t *k = uw.gate;
    uw.gate = NULL;
    while (k) {
        cont_t *next = k->next;
        k->fn(k->arg);
        free(k);
        k = next;
    }
    return NULL;
}

static int floor_libuv(double *out)
{
    bench_waiter_init(&uw.all_in);
    bench_waiter_init(&uw.all_done);
    uvq_init(&uw.q);
    uvq_start_thread(&uw.q);
    bench_waiter_t first;
    bench_waiter_init(&first);
    bench_job_t *j = bench_job_new(noop, NULL, &first);
    uvq_push(&uw.q, j);
    bench_waiter_wait(&first);
    free(j);

    double rss0 = bench_rss_bytes();
    double t0 = bench_now();
    for (long i = 0; i < N; i++)
        uvq_push(&uw.q, bench_job_new(park, (void *)(intptr_t)i, NULL));
    bench_waiter_wait(&uw.all_in);
    double rss1 = bench_rss_bytes();
    double t1 = bench_now();
    uvq_push(&uw.q, bench_job_new(open_gate, NULL, NULL));
    bench_waiter_wait(&uw.all_done);
    double t2 = bench_now();
    uvq_stop_thread(&uw.q);
    out[0] = (rss1 - rss0) / N;
    out[1] = (t2 - t0) * 1e3;
    out[2] = (t1 - t0) * 1e3;
    return 0;
}

static const bench_workload_t w6 = {
    "W6",
    "suspended tasks",
    "100,000 tasks on one Caller all suspended on one Pending, then set it and wait for all",
    3,
    {{"RSS per task", "B"}, {"wall", "ms"}, {"all parked", "ms"}},
    {
        {"call_soon+pending_wait", ours},
        {"theory: 1 page/stack", floor_pthread},
        {"stackless continuations", floor_libuv},
        {"copy-stack mode (CALLER_STACK_COPY)", ours_copy},
#if CALLER_WITH_GLIB
        {"call_soon+pending_wait, GLib backend", ours_glib},
#endif
    },
    120,
    0,
};

int main(void)
{
    bench_begin();
    bench_workload_more(&w6,
                        &(bench_more_t){.key = {[3] = "libcaller-copy", [4] = "libcaller-glib"}});
    return bench_end();
}
