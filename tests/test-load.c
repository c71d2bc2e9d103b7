/* Load: 8 Callers and their workers, 1 000 000 operations mixing call_soon,
 * call_later, to_thread, queue_call and groups, about 10% cancelled at
 * random moments from other threads: every Pending ends exactly once, the
 * counts add up, nothing leaks (issue #10). */
// TIMEOUT: 300
#include "check.h"
#include "internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

enum { CALLERS = 8, PRODUCERS = 4, CANCELLERS = 2, RING = 4096 };

enum { OPS = 1000000 };

/* Operations in flight at most (give or take one per producer): a producer
 * waits while as many have not ended yet. Without a bound the producers run
 * far ahead of the 8 loops: up to 174 000 tasks were suspended at once (a
 * stack each, 1.4 GB). Under the sanitizers fewer: TSan gives a fiber its
 * own context only for the first 512 live fibers (src/fiber.c), and
 * memory per live fiber is far higher there. */
#ifndef IN_FLIGHT
#if defined(__SANITIZE_THREAD__) || defined(__SANITIZE_ADDRESS__)
#define IN_FLIGHT 1000
#else
#define IN_FLIGHT 20000
#endif
#endif
static atomic_long in_flight;

static caller_t *callers[CALLERS];
static int queue_keys[CALLERS];
static atomic_uchar *ended; /* per operation: done callbacks run */
static long round_ops;      /* operations in the current round */
static atomic_long n_ended, n_results, n_errors, n_cancelled, n_queue_items, n_tracked;
static atomic_long expected;       /* Pendings watched */
static atomic_long cancels_landed; /* cancel calls that found the Pending not done */
static atomic_long sure_cancels;   /* of those: timers 10 s away, cancelled at once */

/* Pendings to cancel later, by other threads: a ring of references. */
static struct {
    pthread_mutex_t lock;
    caller_pending_t *items[RING];
    size_t head, tail;
    atomic_int producers_left;
} ring = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void give_permit(caller_pending_t *p, void *arg)
{
    (void)p, (void)arg;
    atomic_fetch_sub(&in_flight, 1);
}

static void on_end(caller_pending_t *p, void *arg)
{
    long id = (long)I(arg);
    int before = atomic_fetch_add(&ended[id], 1);
    CHECK_EQ(before, 0); /* exactly once */
    int rc = caller_pending_exception(p, NULL, 0);
    if (rc == 0)
        atomic_fetch_add(&n_results, 1);
    else if (rc == -ECANCELED)
        atomic_fetch_add(&n_cancelled, 1);
    else
        atomic_fetch_add(&n_errors, 1);
    atomic_fetch_add(&n_ended, 1);
    atomic_fetch_sub(&in_flight, 1);
}

static void *work(void *arg)
{
    long id = (long)I(arg);
    if (id % 7 == 0 && caller_sleep(0) < 0) /* a suspension point */
        return NULL;
    if (id % 97 == 0)
        caller_raise(-EIO, "planned failure %ld", id);
    return arg;
}

static void *queue_item(void *arg)
{
    (void)arg;
    atomic_fetch_add(&n_queue_items, 1);
    atomic_fetch_sub(&in_flight, 1);
    return NULL;
}

static void watch(caller_pending_t *p, long id, bool cancel_later)
{
    atomic_fetch_add(&expected, 1);
    CHECK_RC(caller_pending_add_done_callback(p, on_end, P(id)), 0);
    if (cancel_later) {
        pthread_mutex_lock(&ring.lock);
        if (ring.head - ring.tail < RING) {
            ring.items[ring.head++ % RING] = caller_pending_ref(p);
            p = NULL;
        }
        pthread_mutex_unlock(&ring.lock);
        if (p && caller_pending_cancel(p, "cancelled at once (ring full)") == 1)
            atomic_fetch_add(&cancels_landed, 1);
    }
}

/* A group body: three tasks in a group, then exit. */
static void *group_body(void *arg)
{
    long id = (long)I(arg);
    caller_group_t *g = caller_group_new(NULL, 0);
    CHECK_RC(caller_group_enter(g), 0);
    caller_t *self = caller_current();
    for (int k = 0; k < 3; k++) {
        caller_pending_t *p = caller_call_soon(self, work, P(id + 1 + k));
        if (p) {
            atomic_fetch_add(&n_tracked, 1);
            caller_pending_unref(p);
        }
    }
    int rc = caller_group_exit(g);
    CHECK(rc == 0 || rc == -ECANCELED);
    caller_group_unref(g);
    return NULL;
}

static void *producer(void *arg)
{
    long k = (long)I(arg);
    unsigned seed = (unsigned)k * 2654435761u;
    for (long i = k; i < round_ops; i += PRODUCERS) {
        int r = rand_r(&seed) % CALLERS;
        caller_t *c = callers[r];
        bool cancel = rand_r(&seed) % 10 == 0;
        caller_pending_t *p = NULL;
        while (atomic_load(&in_flight) >= IN_FLIGHT)
            usleep(100);
        atomic_fetch_add(&in_flight, 1);
        switch (i % 10) {
        case 6:
            if (cancel) {
                /* Surely not done yet: its cancel must land. (Other cancels
                 * race with the operation and may all come too late.) */
                p = caller_call_later(c, 10, work, P(i));
                CHECK(p != NULL);
                watch(p, i, false);
                CHECK_EQ(caller_pending_cancel(p, "cancelled 10 s before its time"), 1);
                atomic_fetch_add(&cancels_landed, 1);
                atomic_fetch_add(&sure_cancels, 1);
                caller_pending_unref(p);
                continue;
            }
            p = caller_call_later(c, (double)(rand_r(&seed) % 3) / 1000, work, P(i));
            break;
        case 7:
            p = caller_to_thread(c, work, P(i));
            break;
        case 8: {
            caller_pending_t *q = caller_queue_call_key(c, &queue_keys[r], queue_item, NULL);
            CHECK(q != NULL);
            caller_pending_unref(q); /* a queue's Pending is reset as it drains */
            continue;
        }
        case 9:
            p = caller_call_soon(c, group_body, P(i * 4 + round_ops));
            break;
        default:
            p = caller_call_soon(c, work, P(i));
        }
        CHECK(p != NULL);
        if (i % 10 == 9) { /* its tasks' ids live above OPS: not watched */
            CHECK_RC(caller_pending_add_done_callback(p, give_permit, NULL), 0);
            caller_pending_unref(p);
            continue;
        }
        watch(p, i, cancel);
        caller_pending_unref(p);
    }
    atomic_fetch_sub(&ring.producers_left, 1);
    return NULL;
}

static void *canceller(void *arg)
{
    unsigned seed = (unsigned)I(arg) * 40503u + 1;
    for (;;) {
        pthread_mutex_lock(&ring.lock);
        caller_pending_t *p = ring.tail < ring.head ? ring.items[ring.tail++ % RING] : NULL;
        pthread_mutex_unlock(&ring.lock);
        if (!p) {
            if (atomic_load(&ring.producers_left) == 0)
                break;
            sched_yield();
            continue;
        }
        if (rand_r(&seed) % 2)
            sched_yield(); /* at a random moment: before, while or after it runs */
        int rc = caller_pending_cancel(p, "random cancel");
        CHECK(rc == 0 || rc == 1);
        if (rc == 1)
            atomic_fetch_add(&cancels_landed, 1);
        caller_pending_unref(p);
    }
    return NULL;
}

/* One round: @p ops operations onto the Callers, checked. */
static void load_round(long ops, bool verbose)
{
    ended = calloc((size_t)ops + 1, sizeof *ended);
    round_ops = ops;
    atomic_store(&n_ended, 0);
    atomic_store(&n_results, 0);
    atomic_store(&n_errors, 0);
    atomic_store(&n_cancelled, 0);
    atomic_store(&n_queue_items, 0);
    atomic_store(&n_tracked, 0);
    atomic_store(&expected, 0);
    atomic_store(&cancels_landed, 0);
    atomic_store(&sure_cancels, 0);
    atomic_store(&ring.producers_left, PRODUCERS);
    atomic_store(&in_flight, 0);
    pthread_t prod[PRODUCERS], canc[CANCELLERS];
    for (long i = 0; i < CANCELLERS; i++)
        CHECK_EQ(pthread_create(&canc[i], NULL, canceller, P(i)), 0);
    for (long i = 0; i < PRODUCERS; i++)
        CHECK_EQ(pthread_create(&prod[i], NULL, producer, P(i)), 0);
    for (int i = 0; i < PRODUCERS; i++)
        pthread_join(prod[i], NULL);
    for (int i = 0; i < CANCELLERS; i++)
        pthread_join(canc[i], NULL);
    /* Every watched Pending ends: wait for the count, bounded. */
    double until = check_now() + 120 * check_time_scale();
    while (atomic_load(&n_ended) < atomic_load(&expected) && check_now() < until)
        usleep(1000);
    long exp = atomic_load(&expected);
    if (verbose)
        printf("%ld watched: %ld results, %ld errors, %ld cancelled (%ld cancels landed, %ld of "
               "them on timers 10 s away); %ld queue items, %ld in groups\n",
               exp, atomic_load(&n_results), atomic_load(&n_errors), atomic_load(&n_cancelled),
               atomic_load(&cancels_landed), atomic_load(&sure_cancels),
               atomic_load(&n_queue_items), atomic_load(&n_tracked));
    long ended_n = atomic_load(&n_ended), results = atomic_load(&n_results),
         errors = atomic_load(&n_errors), cancelled = atomic_load(&n_cancelled);
    CHECK_EQ(ended_n, exp);
    CHECK_EQ(results + errors + cancelled, exp);
    /* Each cancel that found its Pending not yet done shows as a
     * cancellation (a cancel after the end changes nothing). */
    long landed = atomic_load(&cancels_landed);
    CHECK_GE(cancelled, landed);
    CHECK_GE(atomic_load(&sure_cancels), 1);
    CHECK_GE(errors, 1);
    for (long i = 0; i < ops; i++) {
        int times = atomic_load(&ended[i]);
        CHECK(times <= 1);
    }
    /* Every operation ended (queue items and group bodies included). */
    until = check_now() + 10 * check_time_scale();
    while (atomic_load(&in_flight) > 0 && check_now() < until)
        usleep(1000);
    CHECK_EQ(atomic_load(&in_flight), 0);
    free(ended);
    ended = NULL;
}

static void start_callers(void)
{
    for (int i = 0; i < CALLERS; i++) {
        callers[i] = check_new_thread(NULL);
        /* At most 4 workers each: unbounded, a burst of to_thread calls
         * makes a thread per call (as in the original). */
        caller_pool_config_t cfg = {.max_idle = 4, .idle_shutdown = 60, .max_workers = 4};
        CHECK_RC(caller_pool_set_config(callers[i], &cfg), 0);
    }
}

static void stop_callers(void)
{
    for (int i = 0; i < CALLERS; i++)
        check_stop(callers[i]); /* workers, queues and groups end with them */
}

TEST(million_mixed_operations_with_random_cancellation)
{
    start_callers();
    const char *env = getenv("LOAD_OPS"); /* to try other sizes by hand */
    load_round(env ? atol(env) : OPS, true);
    stop_callers();
}

#ifdef LOAD_SOAK
/* make soak: the load mix round after round for SOAK_SECONDS (default 600)
 * on the same Callers; each minute prints RSS and threads; fails if they
 * grew after the first minute (warm-up). */
#include <dirent.h>

static long rss_kib(void)
{
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%ld %ld", &pages, &resident) != 2)
            resident = 0;
        fclose(f);
    }
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

static int threads(void)
{
    DIR *d = opendir("/proc/self/task");
    int n = 0;
    for (struct dirent *e; d && (e = readdir(d));)
        n += e->d_name[0] != '.';
    if (d)
        closedir(d);
    return n;
}

int main(void)
{
    const char *env = getenv("SOAK_SECONDS");
    double seconds = env ? atof(env) : 600;
    setvbuf(stdout, NULL, _IOLBF, 0);
    start_callers();
    double t0 = check_now(), next = t0 + 60;
    long rounds = 0, warm_rss = -1;
    int warm_threads = -1, ok = 1;
    printf("soak: the load mix (100 000 operations a round) for %.0f s\n", seconds);
    while (check_now() - t0 < seconds) {
        load_round(100000, false);
        rounds++;
        if (check_now() >= next || check_now() - t0 >= seconds) {
            next += 60;
            long rss = rss_kib();
            int th = threads();
            printf("soak: %4.0f s  %6ld rounds  RSS %7ld KiB  threads %3d  live Pendings %zu\n",
                   check_now() - t0, rounds, rss, th, caller_pending_live_count());
            if (warm_rss < 0) {
                warm_rss = rss, warm_threads = th;
            } else if (rss > warm_rss + warm_rss / 4 || th > warm_threads) {
                printf("soak: grew since the first minute (RSS %ld -> %ld KiB, threads %d -> %d)\n",
                       warm_rss, rss, warm_threads, th);
                ok = 0;
            }
        }
    }
    stop_callers();
    printf("soak: %s after %ld rounds\n", ok ? "flat" : "NOT flat", rounds);
    return ok ? 0 : 1;
}
#endif
