/* ZeroMQ iopub sockets (SPEC §10; issue #7). Built only with ZeroMQ. */
// TIMEOUT: 120
// NEEDS-ZMQ
#include "check.h"
#include "internal.h"
#include "testpoint.h"

#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <zmq.h>

enum { PUBLISHERS = 6, MAX_PUBLISHERS = 8 };

/* What the publishers and the collector share. */
static struct {
    atomic_int joined[MAX_PUBLISHERS]; /* the subscriber saw this one's hello */
    atomic_int go;                     /* every publisher is running */
    int count;                         /* messages each publisher sends */
} shared;

static void reset_shared(int count, bool go)
{
    for (int i = 0; i < MAX_PUBLISHERS; i++)
        atomic_store(&shared.joined[i], 0);
    atomic_store(&shared.go, go);
    shared.count = count;
}

/* A task: publish through this thread's own iopub socket. PUB/SUB drops what
 * is sent before the subscription reaches the publisher, so say hello until
 * the subscriber has heard it, then send the numbered messages. */
static void *publish(void *arg)
{
    int id = (int)I(arg);
    void *s = caller_iopub_socket();
    CHECK(s != NULL);
    CHECK_PTR_EQ(caller_iopub_socket_for(pthread_self()), s);
    char msg[64];
    while (!atomic_load(&shared.joined[id]) || !atomic_load(&shared.go)) {
        int n = snprintf(msg, sizeof msg, "H %d", id);
        CHECK_EQ(zmq_send(s, msg, (size_t)n, 0), n);
        CHECK_RC(caller_sleep(0.001), 0);
    }
    for (int seq = 0; seq < shared.count; seq++) {
        int n = snprintf(msg, sizeof msg, "M %d %d", id, seq);
        CHECK_EQ(zmq_send(s, msg, (size_t)n, 0), n);
    }
    return P(shared.count);
}

/* Receive until every publisher's messages arrived, each once and in
 * order. @p on_join tells a publisher it was heard. Returns 0 or a reason. */
static int collect(void *sub, int publishers, void (*on_join)(int id, void *arg), void *arg)
{
    int next[MAX_PUBLISHERS] = {0}, total = 0;
    bool joined[MAX_PUBLISHERS] = {0};
    char buf[64];
    while (total < publishers * shared.count) {
        int n = zmq_recv(sub, buf, sizeof buf - 1, 0);
        if (n < 0)
            return 1; /* timeout */
        buf[n] = '\0';
        int id, seq;
        if (sscanf(buf, "H %d", &id) == 1) {
            if (id < 0 || id >= publishers)
                return 2;
            if (!joined[id]) {
                joined[id] = true;
                on_join(id, arg);
            }
        } else if (sscanf(buf, "M %d %d", &id, &seq) == 2) {
            if (id < 0 || id >= publishers || !joined[id] || seq != next[id])
                return 3; /* lost, duplicated or out of order */
            next[id]++;
            total++;
        } else {
            return 4;
        }
    }
    return 0;
}

static void set_joined(int id, void *arg)
{
    (void)arg;
    atomic_store(&shared.joined[id], 1);
}

typedef struct {
    void *ctx;
    caller_pending_t *bound, *done;
} collector_t;

static void *collector_thread(void *arg)
{
    collector_t *co = arg;
    void *sub = zmq_socket(co->ctx, ZMQ_SUB);
    int zero = 0, timeout = 30000;
    zmq_setsockopt(sub, ZMQ_RCVHWM, &zero, sizeof zero);
    zmq_setsockopt(sub, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0);
    int rc = zmq_bind(sub, "inproc://iopub");
    caller_pending_set_result(co->bound, P(rc), 0);
    if (rc == 0)
        rc = collect(sub, PUBLISHERS, set_joined, NULL);
    zmq_close(sub);
    caller_pending_set_result(co->done, P(rc), 0);
    return NULL;
}

static void *shell(void *arg)
{
    collector_t *co = arg;
    caller_t *self = caller_current();
    CHECK_PTR_EQ(caller_zmq_context(self), co->ctx);
    caller_options_t control = {.name = "ControlThread", .protect = true};
    caller_t *child = caller_get(self, &control);
    CHECK(child != NULL);
    CHECK_PTR_EQ(caller_zmq_context(child), co->ctx); /* inherited */
    caller_pending_t *p[PUBLISHERS];
    p[1] = caller_call_soon(child, publish, P(1));
    for (int i = 2; i < PUBLISHERS; i++)
        p[i] = caller_to_thread(self, publish, P(i)); /* 4 workers, one each */
    atomic_store(&shared.go, 1);              /* all started: each worker is busy until now */
    CHECK_EQ(I(publish(P(0))), shared.count); /* the main Caller itself */
    for (int i = 1; i < PUBLISHERS; i++) {
        void *v;
        CHECK_RC(caller_pending_wait(p[i], 60, CALLER_WAIT_RESULT, &v), 0);
        CHECK_EQ(I(v), shared.count);
        caller_pending_unref(p[i]);
    }
    CHECK_EQ(caller_pool_idle(self), 4);
    CHECK_EQ(caller_iopub_count(), 2 + 4);
    void *rc;
    CHECK_RC(caller_pending_wait(co->done, 60, CALLER_WAIT_RESULT, &rc), 0);
    CHECK_EQ(I(rc), 0);
    caller_unref(child);
    return NULL;
}

TEST(every_thread_publishes_through_its_own_socket)
{
    reset_shared(10000, false);
    void *ctx = zmq_ctx_new();
    collector_t co = {ctx, caller_pending_new(0), caller_pending_new(0)};
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, collector_thread, &co), 0);
    void *bound;
    CHECK_RC(caller_pending_wait(co.bound, 10, CALLER_WAIT_RESULT, &bound), 0);
    CHECK_EQ(I(bound), 0);
    caller_t *c =
        caller_create(CALLER_MANUAL, &(caller_options_t){.name = "Shell", .zmq_context = ctx});
    CHECK_RC(caller_run(c, shell, &co, NULL), 0);
    pthread_join(t, NULL);
    CHECK_EQ(caller_iopub_count(), 0); /* all closed with their Callers */
    caller_unref(c);
    caller_pending_unref(co.bound);
    caller_pending_unref(co.done);
    CHECK_EQ(zmq_ctx_term(ctx), 0);
}

/* ---- over TCP, with the subscriber in another process --------------------- */

static void write_join(int id, void *arg)
{
    unsigned char b = (unsigned char)id;
    if (write(*(int *)arg, &b, 1) != 1)
        _exit(5);
}

static void *read_joins(void *arg)
{
    int fd = (int)I(arg);
    unsigned char b;
    while (read(fd, &b, 1) == 1)
        if (b < MAX_PUBLISHERS)
            atomic_store(&shared.joined[b], 1);
    return NULL;
}

static void *publish_here_and_on_workers(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    caller_pending_t *p[3];
    for (int i = 0; i < 3; i++)
        p[i] = caller_to_thread(self, publish, P(i + 1));
    publish(P(0));
    for (int i = 0; i < 3; i++) {
        CHECK_RC(caller_pending_wait(p[i], 60, 0, NULL), 0);
        caller_pending_unref(p[i]);
    }
    return NULL;
}

TEST(tcp_subscriber_in_another_process)
{
    enum { N = 500 }; /* within the PUB socket's default high-water mark */
    reset_shared(N, true);
    int joins[2], ep[2];
    CHECK_EQ(pipe(joins), 0);
    CHECK_EQ(pipe(ep), 0);
    pid_t pid = fork(); /* before any thread of ours exists */
    CHECK(pid >= 0);
    if (pid == 0) {
        close(joins[0]);
        close(ep[0]);
        void *ctx = zmq_ctx_new();
        void *sub = zmq_socket(ctx, ZMQ_SUB);
        int timeout = 30000;
        zmq_setsockopt(sub, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
        zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0);
        /* A port the system picks, told to the parent: a port found free
         * and bound later could be taken meanwhile by another test's
         * process (the kernel tests bind many). */
        char bound[64] = {0};
        size_t blen = sizeof bound - 1;
        if (zmq_bind(sub, "tcp://127.0.0.1:*") != 0 ||
            zmq_getsockopt(sub, ZMQ_LAST_ENDPOINT, bound, &blen) != 0 ||
            write(ep[1], bound, sizeof bound) != (ssize_t)sizeof bound)
            _exit(6);
        close(ep[1]);
        int rc = collect(sub, 4, write_join, &joins[1]);
        zmq_close(sub);
        zmq_ctx_term(ctx);
        _exit(rc);
    }
    close(joins[1]);
    close(ep[1]);
    char url[64] = {0};
    size_t got_len = 0;
    ssize_t r;
    while (got_len < sizeof url && (r = read(ep[0], url + got_len, sizeof url - got_len)) > 0)
        got_len += (size_t)r;
    close(ep[0]);
    CHECK_EQ(got_len, sizeof url);
    url[sizeof url - 1] = 0;
    CHECK(strncmp(url, "tcp://127.0.0.1:", 16) == 0);
    pthread_t reader;
    pthread_create(&reader, NULL, read_joins, P(joins[0]));
    CHECK_RC(caller_iopub_set_url(url), 0);
    char got[64];
    caller_iopub_url(got, sizeof got);
    CHECK_STR_EQ(got, url);
    void *ctx = zmq_ctx_new();
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.zmq_context = ctx});
    CHECK(c != NULL);
    caller_pending_t *p = caller_call_soon(c, publish_here_and_on_workers, NULL);
    CHECK_RC(caller_pending_wait(p, 60, 0, NULL), 0);
    caller_pending_unref(p);
    int status;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0); /* all 4 x 500 arrived, once, in order */
    check_stop(c);
    CHECK_RC(caller_iopub_set_url("inproc://iopub"), 0);
    CHECK_EQ(zmq_ctx_term(ctx), 0);
    pthread_join(reader, NULL); /* the child exited: the pipe is at its end */
    close(joins[0]);
}

/* ---- life cycle -------------------------------------------------------------- */

static void *socket_of_current(void *arg)
{
    (void)arg;
    return caller_iopub_socket();
}

TEST(stopping_closes_and_unregisters_the_socket)
{
    void *ctx = zmq_ctx_new();
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.zmq_context = ctx});
    pthread_t t = caller_thread(c);
    void *s = caller_iopub_socket_for(t);
    CHECK(s != NULL);
    caller_pending_t *p = caller_call_soon(c, socket_of_current, NULL);
    void *seen;
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, &seen), 0);
    CHECK_PTR_EQ(seen, s);
    caller_pending_unref(p);
    CHECK_EQ(caller_iopub_count(), 1);
    CHECK_PTR_EQ(caller_iopub_socket(), NULL); /* this thread has none */
    caller_stop(c, 0);
    CHECK_RC(caller_wait_stopped(c, 10), 0);
    CHECK_PTR_EQ(caller_iopub_socket_for(t), NULL);
    CHECK_EQ(caller_iopub_count(), 0);
    caller_unref(c);
    CHECK_EQ(zmq_ctx_term(ctx), 0);
}

TEST(ctx_term_returns_once_all_callers_stopped)
{
    void *ctx = zmq_ctx_new();
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.zmq_context = ctx});
    caller_t *kid = caller_get(c, &(caller_options_t){.name = "kid"});
    caller_t *plain = caller_get(c, &(caller_options_t){.name = "plain", .no_zmq = true});
    caller_pending_t *w = caller_to_thread(c, socket_of_current, NULL);
    void *ws;
    CHECK_RC(caller_pending_wait(w, 10, CALLER_WAIT_RESULT, &ws), 0);
    CHECK(ws != NULL); /* workers inherit it */
    caller_pending_unref(w);
    CHECK_PTR_EQ(caller_zmq_context(kid), ctx);
    CHECK_PTR_EQ(caller_zmq_context(plain), NULL);
    CHECK(caller_iopub_socket_for(caller_thread(plain)) == NULL);
    CHECK_EQ(caller_iopub_count(), 3); /* c, kid, the worker */
    caller_unref(kid);
    caller_unref(plain);
    check_stop(c); /* children and workers first */
    CHECK_EQ(caller_iopub_count(), 0);
    CHECK_EQ(zmq_ctx_term(ctx), 0); /* returns: no socket is left open */
}

TEST(a_caller_without_context_has_no_socket)
{
    caller_t *c = check_new_thread(NULL);
    CHECK_PTR_EQ(caller_zmq_context(c), NULL);
    CHECK_PTR_EQ(caller_iopub_socket_for(caller_thread(c)), NULL);
    caller_pending_t *p = caller_call_soon(c, socket_of_current, NULL);
    void *seen = (void *)1;
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, &seen), 0);
    CHECK_PTR_EQ(seen, NULL);
    caller_pending_unref(p);
    CHECK_EQ(caller_iopub_count(), 0);
    check_stop(c);
}

TEST(a_bad_url_fails_the_start)
{
    void *ctx = zmq_ctx_new();
    CHECK_RC(caller_iopub_set_url("bogus://nowhere"), 0);
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.zmq_context = ctx});
    CHECK(c == NULL);
    CHECK_CONTAINS(check_last_message(), "iopub socket");
    CHECK_RC(caller_iopub_set_url("inproc://iopub"), 0);
    CHECK_RC(caller_iopub_set_url(NULL), -EINVAL);
    CHECK_RC(caller_iopub_set_url(""), -EINVAL);
    CHECK_EQ(zmq_ctx_term(ctx), 0);
}

/* ---- a child that fails to start while its parent stops ------------------ */

static caller_t *failing_parent;

/* At "start.failed" (the child's thread, its start just failed): the parent
 * stops now, and its loop stops the child, which is still listed. */
static void stop_parent_at_failed_start(const char *point, void *obj)
{
    if (strcmp(point, "start.failed") != 0)
        return;
    caller_stop(failing_parent, CALLER_STOP_FORCE);
    double until = check_now() + 10 * check_time_scale();
    while (caller_state(obj) < CALLER_STATE_STOPPING && check_now() < until) {
        struct timespec ts = {0, 100000};
        nanosleep(&ts, NULL);
    }
    CHECK_EQ(caller_state(obj), CALLER_STATE_STOPPING);
}

TEST(failing_child_start_while_the_parent_stops)
{
    void *ctx = zmq_ctx_new();
    failing_parent = check_new_thread("parent");
    CHECK_RC(caller_iopub_set_url("bogus://nowhere"), 0);
    atomic_store(&caller__test_hook, stop_parent_at_failed_start);
    caller_t *k = caller_get(failing_parent, &(caller_options_t){.zmq_context = ctx});
    atomic_store(&caller__test_hook, NULL);
    CHECK_RC(caller_iopub_set_url("inproc://iopub"), 0);
    CHECK(k == NULL);
    CHECK_CONTAINS(check_last_message(), "caller_get: the new thread did not start");
    /* The parent hears the child end and finishes (it hung before). */
    CHECK_RC(caller_wait_stopped(failing_parent, 10 * check_time_scale()), 0);
    CHECK_EQ(caller_children(failing_parent, NULL, 0), 0);
    caller_unref(failing_parent);
    CHECK_EQ(zmq_ctx_term(ctx), 0);
}

static void *zmq_ctx_for_children;

static void *get_failing_child(void *arg)
{
    return caller_get(arg, &(caller_options_t){.zmq_context = zmq_ctx_for_children});
}

TEST(stress_failing_child_start_while_the_parent_stops)
{
    enum { ROUNDS = 200 };
    zmq_ctx_for_children = zmq_ctx_new();
    CHECK_RC(caller_iopub_set_url("bogus://nowhere"), 0);
    unsigned seed = 777;
    for (int r = 0; r < ROUNDS; r++) {
        caller_t *parent = check_new_thread("parent");
        pthread_t t;
        CHECK_EQ(pthread_create(&t, NULL, get_failing_child, parent), 0);
        for (unsigned spin = rand_r(&seed) % 200000; spin; spin--)
            __asm__ volatile("" ::: "memory");
        caller_stop(parent, CALLER_STOP_FORCE);
        /* Never a hang, whichever came first. */
        CHECK_RC(caller_wait_stopped(parent, 10 * check_time_scale()), 0);
        void *k;
        pthread_join(t, &k);
        CHECK(k == NULL); /* refused (parent stopping) or its start failed */
        CHECK_EQ(caller_children(parent, NULL, 0), 0);
        caller_unref(parent);
    }
    CHECK_RC(caller_iopub_set_url("inproc://iopub"), 0);
    CHECK_EQ(zmq_ctx_term(zmq_ctx_for_children), 0);
}
