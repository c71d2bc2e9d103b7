/*
 * A Caller's lifecycle: its state machine under races (a stop while a
 * child is created), over-release, joined threads, the callers table.
 * Races are held open with the library's test points (testpoint.h).
 */
// TIMEOUT: 300
#include "check.h"
#include "lockorder.h"
#include "testpoint.h"

#include <dirent.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- helpers ------------------------------------------------------------ */

/* Poll until caller_state(c) >= @p st, at most 10 s (scaled); the state. */
static int await_state(caller_t *c, int st)
{
    double until = check_now() + 10 * check_time_scale();
    int now;
    while ((now = caller_state(c)) < st && check_now() < until) {
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    return now;
}

/* This process's threads named @p name (a Caller's thread takes its
 * Caller's name; sanitizers run threads of their own, not counted). */
static int threads_named(const char *name)
{
    DIR *d = opendir("/proc/self/task");
    CHECK(d != NULL);
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.')
            continue;
        char path[300], comm[64] = "";
        snprintf(path, sizeof path, "/proc/self/task/%s/comm", e->d_name);
        FILE *f = fopen(path, "r");
        if (!f)
            continue; /* gone meanwhile */
        if (fgets(comm, sizeof comm, f))
            comm[strcspn(comm, "\n")] = 0;
        fclose(f);
        n += strcmp(comm, name) == 0;
    }
    closedir(d);
    return n;
}

/* Run @p fn in a forked child with its stderr captured into @p buf: the
 * signal that ended it (0 if it exited). */
static int child_dies(void (*fn)(void), char *buf, size_t len)
{
    int fds[2];
    CHECK_EQ(pipe(fds), 0);
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        dup2(fds[1], 2);
        fn();
        _exit(4);
    }
    close(fds[1]);
    size_t got = 0;
    ssize_t r;
    while (got < len - 1 && (r = read(fds[0], buf + got, len - 1 - got)) > 0)
        got += (size_t)r;
    buf[got] = '\0';
    close(fds[0]);
    int status;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    return WIFSIGNALED(status) ? WTERMSIG(status) : 0;
}

/* ---- race: a stop while caller_get lists a child, before it starts ----- */

static caller_t *held_parent;
static atomic_int held_hits;

/* At "get.listed": the parent stops now, and its loop stops the listed,
 * unstarted child before caller_get goes on to start it. */
static void stop_parent_at_listed(const char *point, void *obj)
{
    if (strcmp(point, "get.listed") != 0)
        return;
    atomic_fetch_add(&held_hits, 1);
    caller_stop(held_parent, CALLER_STOP_FORCE);
    CHECK_EQ(await_state(obj, CALLER_STATE_STOPPING), CALLER_STATE_STOPPING);
}

TEST(stop_while_get_lists_a_child_ends_it_unstarted)
{
    held_parent = check_new_thread("parent");
    atomic_store(&caller__test_hook, stop_parent_at_listed);
    caller_t *k = caller_get(held_parent, &(caller_options_t){.name = "kid"});
    atomic_store(&caller__test_hook, NULL);
    CHECK_EQ(atomic_load(&held_hits), 1);
    /* Stopped before it started: it never runs, and says why. */
    CHECK(k == NULL);
    CHECK_EQ(caller_last_error(NULL), -ESHUTDOWN);
    CHECK_CONTAINS(check_last_message(), "stopped before it started");
    /* The parent hears its child end and finishes (it hung before). */
    CHECK_RC(caller_wait_stopped(held_parent, 10 * check_time_scale()), 0);
    CHECK_EQ(caller_children(held_parent, NULL, 0), 0);
    caller_unref(held_parent);
}

/* The same race, run free: a manual parent (stopped by its own thread at a
 * random moment) while another thread creates its child. Every run ends
 * with both stopped, and the child either refused, ended unstarted, or
 * started and then stopped: never running on with a closed inbox. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    int round, done_round;
    caller_t *parent;
    caller_t *child;
    int err;
    bool quit;
} race;

static void *getter(void *arg)
{
    (void)arg;
    int seen = 0;
    for (;;) {
        pthread_mutex_lock(&race.lock);
        while (race.round == seen && !race.quit)
            pthread_cond_wait(&race.cond, &race.lock);
        if (race.quit) {
            pthread_mutex_unlock(&race.lock);
            return NULL;
        }
        seen = race.round;
        caller_t *parent = race.parent;
        pthread_mutex_unlock(&race.lock);
        caller_t *k = caller_get(parent, &(caller_options_t){.name = "kid"});
        int err = k ? 0 : caller_last_error(NULL);
        pthread_mutex_lock(&race.lock);
        race.child = k;
        race.err = err;
        race.done_round = seen;
        pthread_cond_broadcast(&race.cond);
        pthread_mutex_unlock(&race.lock);
    }
}

TEST(stress_stop_while_creating_a_child)
{
    enum { ROUNDS = 20000 };
    pthread_mutex_init(&race.lock, NULL);
    pthread_cond_init(&race.cond, NULL);
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, getter, NULL), 0);
    int started = 0, refused = 0;
    unsigned seed = 12345;
    for (int r = 1; r <= ROUNDS; r++) {
        caller_t *parent = caller_create(CALLER_MANUAL, &(caller_options_t){.name = "p"});
        CHECK(parent != NULL);
        pthread_mutex_lock(&race.lock);
        race.parent = parent;
        race.round = r;
        pthread_cond_broadcast(&race.cond);
        pthread_mutex_unlock(&race.lock);
        for (unsigned spin = rand_r(&seed) % 20000; spin; spin--)
            __asm__ volatile("" ::: "memory");
        CHECK_EQ(caller_stop(parent, CALLER_STOP_FORCE), CALLER_STATE_STOPPED);
        pthread_mutex_lock(&race.lock);
        while (race.done_round != r)
            pthread_cond_wait(&race.cond, &race.lock);
        caller_t *k = race.child;
        int err = race.err;
        pthread_mutex_unlock(&race.lock);
        if (k) {
            /* Created before the stop reached it: the stop stopped it. */
            started++;
            CHECK_RC(caller_wait_stopped(k, 10 * check_time_scale()), 0);
            CHECK_EQ(caller_state(k), CALLER_STATE_STOPPED);
            caller_unref(k);
        } else {
            refused++;
            CHECK_EQ(err, -ESHUTDOWN);
        }
        CHECK_EQ(caller_state(parent), CALLER_STATE_STOPPED);
        CHECK_EQ(caller_children(parent, NULL, 0), 0);
        caller_unref(parent);
    }
    pthread_mutex_lock(&race.lock);
    race.quit = true;
    pthread_cond_broadcast(&race.cond);
    pthread_mutex_unlock(&race.lock);
    pthread_join(t, NULL);
    printf("%d rounds: child started %d, refused or ended unstarted %d\n", ROUNDS, started,
           refused);
    CHECK_EQ(started + refused, ROUNDS);
}

/* ---- over-release --------------------------------------------------------- */

static void release_once_too_often(void)
{
    caller_t *c = caller_create(CALLER_NEW_THREAD, NULL);
    if (!c)
        _exit(3);
    caller_unref(c); /* the one reference the user had */
    caller_unref(c); /* one too many: its thread still holds it */
}

TEST(over_release_of_a_running_caller_aborts_with_a_message)
{
    char buf[512];
    CHECK_EQ(child_dies(release_once_too_often, buf, sizeof buf), SIGABRT);
    CHECK_CONTAINS(buf, "released more times than it was referenced");
}

/* ---- joined threads ----------------------------------------------------------- */

TEST(wait_stopped_returns_after_the_thread_exited)
{
    for (int i = 0; i < 50; i++) {
        caller_t *c = check_new_thread("joined");
        CHECK_EQ(threads_named("joined"), 1);
        caller_stop(c, CALLER_STOP_FORCE);
        CHECK_RC(caller_wait_stopped(c, 10 * check_time_scale()), 0);
        /* Exact at once: no wait for its thread to go. */
        CHECK_EQ(threads_named("joined"), 0);
        CHECK_RC(caller_wait_stopped(c, 0), 0); /* a second wait: at once */
        caller_unref(c);
    }
}

static void *wait_it(void *arg)
{
    return P(caller_wait_stopped(arg, 10 * check_time_scale()));
}

TEST(concurrent_wait_stopped_all_return_after_the_thread_exited)
{
    caller_t *c = check_new_thread("joined");
    pthread_t w[3];
    for (int i = 0; i < 3; i++)
        CHECK_EQ(pthread_create(&w[i], NULL, wait_it, c), 0);
    caller_stop(c, CALLER_STOP_FORCE);
    for (int i = 0; i < 3; i++) {
        void *rc;
        pthread_join(w[i], &rc);
        CHECK_EQ(I(rc), 0);
        CHECK_EQ(threads_named("joined"), 0);
    }
    caller_unref(c);
}

TEST(unwaited_caller_thread_is_reclaimed)
{
    /* Never waited for: its thread ends on its own once the Caller is
     * released. caller_live_count() reaching 0 orders this thread after
     * the Callers' last steps. */
    for (int i = 0; i < 20; i++) {
        caller_t *c = check_new_thread("unwaited");
        caller_stop(c, CALLER_STOP_FORCE);
        caller_unref(c);
    }
    double until = check_now() + 10 * check_time_scale();
    while ((caller_live_count() || threads_named("unwaited")) && check_now() < until) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    CHECK_EQ(caller_live_count(), 0);
    CHECK_EQ(threads_named("unwaited"), 0);
}

/* ---- the callers table ----------------------------------------------------------- */

static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t table_cond = PTHREAD_COND_INITIALIZER;
static int table_phase; /* 1: a Caller is held at unref.last; 2: let it go */

static void hold_at_last_unref(const char *point, void *obj)
{
    (void)obj;
    if (strcmp(point, "unref.last") != 0)
        return;
    pthread_mutex_lock(&table_lock);
    if (table_phase == 0) {
        table_phase = 1;
        pthread_cond_broadcast(&table_cond);
        while (table_phase != 2)
            pthread_cond_wait(&table_cond, &table_lock);
    }
    pthread_mutex_unlock(&table_lock);
}

/* A manual Caller that never ran, released by its thread: its last
 * reference (the thread's own) goes as the thread exits. */
static void *make_and_drop_manual(void *arg)
{
    (void)arg;
    caller_t *m = caller_create(CALLER_MANUAL, &(caller_options_t){.name = "dying"});
    CHECK(m != NULL);
    caller_unref(m);
    return NULL;
}

TEST(print_table_lists_only_live_callers)
{
    /* A Caller being freed is still in the registry: caller_all counts it
     * but cannot hand it out; the table prints exactly the live ones. */
    caller_t *live = check_new_thread("live-one");
    atomic_store(&caller__test_hook, hold_at_last_unref);
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, make_and_drop_manual, NULL), 0);
    pthread_mutex_lock(&table_lock);
    while (table_phase != 1)
        pthread_cond_wait(&table_cond, &table_lock);
    pthread_mutex_unlock(&table_lock);
    CHECK_EQ(caller_all(0, NULL, 0), 2); /* counted, though being freed */
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    CHECK(f != NULL);
    CHECK_RC(caller_print_table(f, 0), 0);
    fclose(f);
    pthread_mutex_lock(&table_lock);
    table_phase = 2;
    pthread_cond_broadcast(&table_cond);
    pthread_mutex_unlock(&table_lock);
    pthread_join(t, NULL);
    atomic_store(&caller__test_hook, NULL);
    /* Header, rule, and the one live Caller. */
    int lines = 0;
    for (char *s = text; *s; s++)
        lines += *s == '\n';
    CHECK_EQ(lines, 3);
    CHECK_CONTAINS(text, "live-one");
    CHECK(strstr(text, "dying") == NULL);
    free(text);
    check_stop(live);
}

/* ---- the lock order ------------------------------------------------------------ */

static void take_locks_against_the_order(void)
{
    caller__order_acquire(CALLER__RANK_CALLER);
    caller__order_acquire(CALLER__RANK_INBOX); /* in order: fine */
    caller__order_release(CALLER__RANK_INBOX);
    caller__order_release(CALLER__RANK_CALLER);
    caller__order_acquire(CALLER__RANK_INBOX);
    caller__order_acquire(CALLER__RANK_REGISTRY); /* against it */
}

TEST(lock_taken_against_the_order_aborts_naming_both)
{
    CHECK(CALLER__CHECK_LOCK_ORDER); /* the test build always checks */
    char buf[512];
    CHECK_EQ(child_dies(take_locks_against_the_order, buf, sizeof buf), SIGABRT);
    CHECK_CONTAINS(buf, "lock order: taking registry_lock while holding caller->inbox_lock");
}
