/* Churn: Callers created and stopped in a loop while other threads schedule
 * onto them (issue #10). */
// TIMEOUT: 300
#include "check.h"
#include "internal.h"

#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <pthread.h>
#include <stdatomic.h>
#include <unistd.h>

/* Threads of this process whose name is one our Callers use (the
 * sanitizers' own helper threads do not count). */
static int caller_threads(void)
{
    DIR *d = opendir("/proc/self/task");
    int n = 0;
    for (struct dirent *e; (e = readdir(d));) {
        if (e->d_name[0] == '.')
            continue;
        char path[300], comm[32] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (f) {
            if (!fgets(comm, sizeof comm, f))
                comm[0] = '\0';
            fclose(f);
        }
        n += strncmp(comm, "caller-worker", 13) == 0 || strncmp(comm, "kid-", 4) == 0 ||
             strncmp(comm, "parent", 6) == 0;
    }
    closedir(d);
    return n;
}

/* The Caller the schedulers aim at now: a reference, under `lock`. */
static struct {
    pthread_mutex_t lock;
    caller_t *target;
    atomic_int stop;
    atomic_long scheduled, refused, ended;
    atomic_int budget; /* attempts left on the current target */
} slot = {.lock = PTHREAD_MUTEX_INITIALIZER};

static void *noop(void *arg)
{
    return arg;
}

/* Every accepted call ends: with its result, or cancelled by the stop. */
static void on_end(caller_pending_t *p, void *arg)
{
    (void)arg;
    int rc = caller_pending_exception(p, NULL, 0);
    CHECK(rc == 0 || rc == -ECANCELED);
    atomic_fetch_add(&slot.ended, 1);
}

static void *scheduler(void *arg)
{
    (void)arg;
    while (!atomic_load(&slot.stop)) {
        pthread_mutex_lock(&slot.lock);
        caller_t *c = atomic_fetch_sub(&slot.budget, 1) > 0 ? caller_ref(slot.target) : NULL;
        pthread_mutex_unlock(&slot.lock);
        if (!c) {
            sched_yield();
            continue;
        }
        caller_pending_t *p = caller_call_soon(c, noop, NULL);
        if (p) {
            atomic_fetch_add(&slot.scheduled, 1);
            CHECK_RC(caller_pending_add_done_callback(p, on_end, NULL), 0);
            caller_pending_unref(p); /* it runs, or ends cancelled as c stops */
        } else {
            /* Scheduling onto a stopping Caller fails cleanly, and only so. */
            CHECK_RC(caller_last_error(NULL), -ESHUTDOWN);
            CHECK_CONTAINS(check_last_message(), "is stopped!");
            atomic_fetch_add(&slot.refused, 1);
            sched_yield(); /* let the loop aim at the next one */
        }
        caller_unref(c);
    }
    return NULL;
}

static void aim(caller_t *c)
{
    pthread_mutex_lock(&slot.lock);
    caller_t *old = slot.target;
    slot.target = c ? caller_ref(c) : NULL;
    atomic_store(&slot.budget, 8); /* calls before its stop */
    pthread_mutex_unlock(&slot.lock);
    caller_unref(old);
}

/* Wait until the schedulers used the attempts they were given, or 2 ms. */
static void let_schedulers_reach(void)
{
    double give_up = check_now() + 0.002;
    while (atomic_load(&slot.budget) > 0 && check_now() < give_up)
        sched_yield();
}

TEST(create_and_stop_10000_callers_while_others_schedule)
{
    enum { N = 10000, SCHEDULERS = 2 };
    CHECK_EQ(caller_threads(), 0);
    caller_t *parent = check_new_thread("parent");
    pthread_t t[SCHEDULERS];
    for (int i = 0; i < SCHEDULERS; i++)
        CHECK_EQ(pthread_create(&t[i], NULL, scheduler, NULL), 0);
    for (int i = 0; i < N; i++) {
        caller_t *c;
        if (i % 2) {
            char name[32];
            snprintf(name, sizeof name, "kid-%d", i % 3);
            c = caller_get(parent, &(caller_options_t){.name = name});
        } else {
            c = caller_create(CALLER_NEW_THREAD, NULL);
        }
        CHECK(c != NULL);
        aim(c);
        let_schedulers_reach(); /* a few calls while it runs */
        caller_stop(c, 0);
        /* A few more while it stops: caller_stop refuses new calls at once,
         * so these meet a stopping Caller (before, the budget was shared and
         * the schedulers often spent all of it before the stop: an ASan CI
         * run saw no refusal in 10 000 Callers). */
        atomic_store(&slot.budget, 8);
        let_schedulers_reach();
        CHECK_RC(caller_wait_stopped(c, 30), 0);
        caller_unref(c);
    }
    aim(NULL);
    atomic_store(&slot.stop, 1);
    for (int i = 0; i < SCHEDULERS; i++)
        pthread_join(t[i], NULL);
    check_stop(parent);
    printf("%ld calls scheduled, %ld refused cleanly\n", atomic_load(&slot.scheduled),
           atomic_load(&slot.refused));
    CHECK_GE(atomic_load(&slot.scheduled), N); /* they did reach the Callers */
    CHECK_GE(atomic_load(&slot.refused), 1);   /* and met stopping ones */
    CHECK_EQ(atomic_load(&slot.ended), atomic_load(&slot.scheduled));
    /* Every Caller's thread ends (they are detached: they exit just after
     * their stopped event; wait for that, with a bound). */
    double until = check_now() + 30 * check_time_scale();
    while (caller_threads() > 0 && check_now() < until)
        usleep(1000);
    CHECK_EQ(caller_threads(), 0);
}
