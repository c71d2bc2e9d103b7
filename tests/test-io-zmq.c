/* Waiting for ZeroMQ sockets (issue #17): caller_wait_zmq. Built only with
 * ZeroMQ. */
// NEEDS-ZMQ
// TIMEOUT: 120
#include "check.h"
#include "internal.h"
#include "testpoint.h"

#include <math.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <zmq.h>

enum { BURST = 1000 };

static double scaled(double s)
{
    return s * check_time_scale();
}

/* Wait for @p p (30 s at most, scaled), release it, return its result. */
static void *await(caller_pending_t *p)
{
    return check_await(p, 30);
}

/* A socket with no linger and no high-water marks (nothing dropped or
 * blocked in a burst). */
static void *zsock(void *ctx, int type)
{
    void *s = zmq_socket(ctx, type);
    CHECK(s != NULL);
    int zero = 0;
    CHECK_EQ(zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero), 0);
    CHECK_EQ(zmq_setsockopt(s, ZMQ_SNDHWM, &zero, sizeof zero), 0);
    CHECK_EQ(zmq_setsockopt(s, ZMQ_RCVHWM, &zero, sizeof zero), 0);
    return s;
}

/* A wait that must find the socket ready (never a timeout). */
static void wait_ready(void *s, unsigned events)
{
    int rc = caller_wait_zmq(s, events, scaled(10));
    CHECK_RC(rc, (int)events);
}

/* ---- PUB/SUB over tcp: a burst while the task is suspended ------------------- */

typedef struct {
    void *ctx;
    char endpoint[64];
    sem_t bound, joined, drained;
} pubsub_t;

static void *publisher(void *arg)
{
    pubsub_t *ps = arg;
    void *pub = zsock(ps->ctx, ZMQ_PUB);
    CHECK_EQ(zmq_bind(pub, "tcp://127.0.0.1:*"), 0);
    size_t len = sizeof ps->endpoint;
    CHECK_EQ(zmq_getsockopt(pub, ZMQ_LAST_ENDPOINT, ps->endpoint, &len), 0);
    sem_post(&ps->bound);
    /* PUB drops what it sends before the subscription arrives: say hello
     * until the subscriber has heard one (waiting 1 ms for it each time). */
    for (;;) {
        CHECK_EQ(zmq_send(pub, "hello", 5, 0), 5);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 1000000;
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        if (sem_timedwait(&ps->joined, &ts) == 0)
            break;
    }
    char msg[32];
    for (int i = 0; i < BURST; i++) {
        int n = snprintf(msg, sizeof msg, "M %d", i);
        CHECK_EQ(zmq_send(pub, msg, (size_t)n, 0), n);
    }
    /* Once the task drained the burst and waits again: one more. */
    check_sem_wait(&ps->drained);
    CHECK_EQ(zmq_send(pub, "late", 4, 0), 4);
    zmq_close(pub);
    return NULL;
}

static void *subscriber(void *arg)
{
    pubsub_t *ps = arg;
    void *sub = zsock(ps->ctx, ZMQ_SUB);
    CHECK_EQ(zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0), 0);
    CHECK_EQ(zmq_connect(sub, ps->endpoint), 0);
    bool joined = false;
    int next = 0;
    char buf[32];
    while (next < BURST) {
        wait_ready(sub, CALLER_READABLE);
        /* Drain until EAGAIN before waiting again. */
        int n;
        while ((n = zmq_recv(sub, buf, sizeof buf - 1, ZMQ_DONTWAIT)) >= 0) {
            buf[n] = '\0';
            if (strcmp(buf, "hello") == 0) {
                CHECK_EQ(next, 0);
                if (!joined)
                    sem_post(&ps->joined);
                joined = true;
                continue;
            }
            int i = -1;
            CHECK_EQ(sscanf(buf, "M %d", &i), 1);
            CHECK_EQ(i, next); /* none lost, none twice, in order */
            next++;
        }
        CHECK_EQ(zmq_errno(), EAGAIN);
    }
    /* Drained: the next wait sleeps until the late message, and wakes for
     * it (no wake-up lost to ZMQ_FD's edge). */
    sem_post(&ps->drained);
    wait_ready(sub, CALLER_READABLE);
    int n = zmq_recv(sub, buf, sizeof buf - 1, ZMQ_DONTWAIT);
    CHECK_EQ(n, 4);
    CHECK(memcmp(buf, "late", 4) == 0);
    zmq_close(sub);
    return P(next);
}

TEST(pub_sub_burst_from_another_thread)
{
    pubsub_t ps = {.ctx = zmq_ctx_new()};
    CHECK(ps.ctx != NULL);
    sem_init(&ps.bound, 0, 0);
    sem_init(&ps.joined, 0, 0);
    sem_init(&ps.drained, 0, 0);
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, publisher, &ps), 0);
    check_sem_wait(&ps.bound);
    caller_t *c = check_new_thread("io-zmq");
    CHECK_EQ(I(await(caller_call_soon(c, subscriber, &ps))), BURST);
    pthread_join(t, NULL);
    check_stop(c);
    CHECK_EQ(zmq_ctx_term(ps.ctx), 0);
    sem_destroy(&ps.bound);
    sem_destroy(&ps.joined);
    sem_destroy(&ps.drained);
}

/* ---- ROUTER/DEALER over inproc: one message per wait --------------------------- */

typedef struct {
    void *ctx;
    sem_t bound;
} rd_t;

/* The task: a ROUTER that answers each request, receiving one request per
 * wait (never draining): every wait with requests queued must return at
 * once, however ZMQ_FD stands. */
static void *router_task(void *arg)
{
    rd_t *rd = arg;
    void *router = zsock(rd->ctx, ZMQ_ROUTER);
    CHECK_EQ(zmq_bind(router, "inproc://io-router"), 0);
    sem_post(&rd->bound);
    for (int i = 0; i < BURST; i++) {
        wait_ready(router, CALLER_READABLE);
        char id[64], body[32];
        int idn = zmq_recv(router, id, sizeof id, ZMQ_DONTWAIT);
        CHECK(idn > 0);
        int n = zmq_recv(router, body, sizeof body - 1, ZMQ_DONTWAIT);
        CHECK(n > 0);
        body[n] = '\0';
        int k = -1;
        CHECK_EQ(sscanf(body, "Q %d", &k), 1);
        CHECK_EQ(k, i);
        body[0] = 'A';
        CHECK_EQ(zmq_send(router, id, (size_t)idn, ZMQ_SNDMORE), idn);
        CHECK_EQ(zmq_send(router, body, (size_t)n, 0), n);
    }
    zmq_close(router);
    return P(BURST);
}

/* A plain thread: a DEALER that sends every request at once, then takes
 * the answers one per wait (caller_wait_zmq in poll(2)). */
static void *dealer_thread(void *arg)
{
    rd_t *rd = arg;
    void *dealer = zsock(rd->ctx, ZMQ_DEALER);
    CHECK_EQ(zmq_connect(dealer, "inproc://io-router"), 0);
    char buf[32];
    for (int i = 0; i < BURST; i++) {
        int n = snprintf(buf, sizeof buf, "Q %d", i);
        CHECK_EQ(zmq_send(dealer, buf, (size_t)n, 0), n);
    }
    for (int i = 0; i < BURST; i++) {
        wait_ready(dealer, CALLER_READABLE);
        int n = zmq_recv(dealer, buf, sizeof buf - 1, ZMQ_DONTWAIT);
        CHECK(n > 0);
        buf[n] = '\0';
        int k = -1;
        CHECK_EQ(sscanf(buf, "A %d", &k), 1);
        CHECK_EQ(k, i);
    }
    zmq_close(dealer);
    return NULL;
}

TEST(router_dealer_one_message_per_wait)
{
    rd_t rd = {.ctx = zmq_ctx_new()};
    CHECK(rd.ctx != NULL);
    sem_init(&rd.bound, 0, 0);
    caller_t *c = check_new_thread("io-zmq");
    caller_pending_t *p = caller_call_soon(c, router_task, &rd);
    check_sem_wait(&rd.bound);
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, dealer_thread, &rd), 0);
    pthread_join(t, NULL);
    CHECK_EQ(I(await(p)), BURST);
    check_stop(c);
    CHECK_EQ(zmq_ctx_term(rd.ctx), 0);
    sem_destroy(&rd.bound);
}

/* ---- a message arriving between the ZMQ_EVENTS check and the sleep -------------- */

static _Atomic(void *) hook_push;
static atomic_int hook_hits;

static void send_in_window(const char *point, void *obj)
{
    (void)obj;
    if (strcmp(point, "io.zmq_before_sleep") != 0)
        return;
    void *push = atomic_load(&hook_push);
    if (push && atomic_fetch_add(&hook_hits, 1) == 0)
        CHECK_EQ(zmq_send(push, "x", 1, ZMQ_DONTWAIT), 1);
}

static void *window_task(void *arg)
{
    void *ctx = arg;
    void *pull = zsock(ctx, ZMQ_PULL);
    CHECK_EQ(zmq_bind(pull, "inproc://io-window"), 0);
    void *push = zsock(ctx, ZMQ_PUSH);
    CHECK_EQ(zmq_connect(push, "inproc://io-window"), 0);
    /* Nothing queued: the wait checks ZMQ_EVENTS, finds nothing, and the
     * message is sent right before it sleeps (the hook runs in this task). */
    atomic_store(&hook_push, push);
    atomic_store(&caller__test_hook, send_in_window);
    int rc = caller_wait_zmq(pull, CALLER_READABLE, scaled(10));
    atomic_store(&caller__test_hook, NULL);
    atomic_store(&hook_push, NULL);
    CHECK_RC(rc, CALLER_READABLE);
    CHECK(atomic_load(&hook_hits) >= 1);
    char b;
    CHECK_EQ(zmq_recv(pull, &b, 1, ZMQ_DONTWAIT), 1);
    zmq_close(push);
    zmq_close(pull);
    return NULL;
}

TEST(message_between_check_and_sleep_is_not_missed)
{
    void *ctx = zmq_ctx_new();
    caller_t *c = check_new_thread("io-zmq");
    await(caller_call_soon(c, window_task, ctx));
    check_stop(c);
    CHECK_EQ(zmq_ctx_term(ctx), 0);
}

/* ---- cancellation, timeouts, two waiters, misuse ------------------------------- */

typedef struct {
    void *ctx;
    atomic_int rc;
    double elapsed;
} task_state_t;

static void *wait_forever_on_pull(void *arg)
{
    task_state_t *st = arg;
    void *pull = zsock(st->ctx, ZMQ_PULL);
    CHECK_EQ(zmq_bind(pull, "inproc://io-cancel"), 0);
    atomic_store(&st->rc, caller_wait_zmq(pull, CALLER_READABLE, CALLER_FOREVER));
    zmq_close(pull);
    return NULL;
}

TEST(cancel_while_waiting_on_a_socket)
{
    task_state_t st = {.ctx = zmq_ctx_new()};
    atomic_init(&st.rc, 1);
    caller_t *c = check_new_thread("io-zmq");
    caller_pending_t *p = caller_call_soon(c, wait_forever_on_pull, &st);
    check_until_suspended(c);
    CHECK_EQ(caller_pending_done(p), 0);
    CHECK_EQ(caller_pending_cancel(p, "enough"), 1);
    CHECK_RC(caller_pending_wait(p, scaled(10), CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_RC(atomic_load(&st.rc), -ECANCELED);
    caller_pending_unref(p);
    check_stop(c);
    CHECK_EQ(zmq_ctx_term(st.ctx), 0);
}

typedef struct {
    void *ctx;
    const char *endpoint;
} where_t;

static void *timeouts(void *arg)
{
    where_t *wh = arg;
    void *ctx = wh->ctx;
    void *pull = zsock(ctx, ZMQ_PULL);
    CHECK_EQ(zmq_bind(pull, wh->endpoint), 0);
    double t0 = check_now();
    CHECK_RC(caller_wait_zmq(pull, CALLER_READABLE, 0.05), -ETIMEDOUT);
    CHECK(check_now() - t0 >= 0.05);
    CHECK_CONTAINS(check_last_message(), "caller_wait_zmq");
    CHECK_RC(caller_wait_zmq(pull, CALLER_READABLE, 0), -ETIMEDOUT);
    /* A PUSH with a peer can send at once; ask for both, get one. */
    void *push = zsock(ctx, ZMQ_PUSH);
    CHECK_EQ(zmq_connect(push, wh->endpoint), 0);
    CHECK_EQ(caller_wait_zmq(push, CALLER_READABLE | CALLER_WRITABLE, 0), CALLER_WRITABLE);
    CHECK_EQ(zmq_send(push, "x", 1, 0), 1);
    wait_ready(pull, CALLER_READABLE);
    CHECK_EQ(caller_wait_zmq(pull, CALLER_READABLE, 0), CALLER_READABLE);
    zmq_close(push);
    zmq_close(pull);
    return NULL;
}

TEST(timeouts_in_a_task_and_a_thread)
{
    void *ctx = zmq_ctx_new();
    caller_t *c = check_new_thread("io-zmq");
    /* Two endpoints: a closed socket's inproc name is freed only later, by
     * ZeroMQ's reaper thread. */
    where_t in_task = {ctx, "inproc://io-timeout-task"};
    await(caller_call_soon(c, timeouts, &in_task));
    check_stop(c);
    where_t in_thread = {ctx, "inproc://io-timeout-thread"};
    timeouts(&in_thread);
    CHECK_EQ(zmq_ctx_term(ctx), 0);
}

/* Two tasks on one PAIR socket: one waits to receive, one to send. They
 * share the watch on its ZMQ_FD. */
typedef struct {
    void *sock;
    unsigned events;
} zwait_t;

static void *zwait_task(void *arg)
{
    zwait_t *zw = arg;
    return P(caller_wait_zmq(zw->sock, zw->events, scaled(10)));
}

typedef struct {
    void *ctx, *a, *b;
} pair_sockets_t;

static void *open_pair(void *arg)
{
    pair_sockets_t *ps = arg;
    ps->a = zsock(ps->ctx, ZMQ_PAIR);
    CHECK_EQ(zmq_bind(ps->a, "inproc://io-pair"), 0);
    ps->b = zsock(ps->ctx, ZMQ_PAIR);
    CHECK_EQ(zmq_connect(ps->b, "inproc://io-pair"), 0);
    return NULL;
}

static void *send_on_b(void *arg)
{
    pair_sockets_t *ps = arg;
    return P(zmq_send(ps->b, "x", 1, 0));
}

static void *close_pair(void *arg)
{
    pair_sockets_t *ps = arg;
    char b;
    CHECK_EQ(zmq_recv(ps->a, &b, 1, ZMQ_DONTWAIT), 1);
    zmq_close(ps->a);
    zmq_close(ps->b);
    return P(caller_current()->io == NULL);
}

TEST(two_tasks_wait_on_one_socket)
{
    pair_sockets_t ps = {.ctx = zmq_ctx_new()};
    caller_t *c = check_new_thread("io-zmq");
    /* Every socket use happens in the Caller's thread. */
    await(caller_call_soon(c, open_pair, &ps));
    zwait_t r = {ps.a, CALLER_READABLE}, w = {ps.a, CALLER_WRITABLE};
    caller_pending_t *pr = caller_call_soon(c, zwait_task, &r);
    CHECK_EQ(I(await(caller_call_soon(c, zwait_task, &w))), CALLER_WRITABLE);
    CHECK_EQ(caller_pending_done(pr), 0);
    CHECK_EQ(I(await(caller_call_soon(c, send_on_b, &ps))), 1);
    CHECK_EQ(I(await(pr)), CALLER_READABLE);
    CHECK_EQ(I(await(caller_call_soon(c, close_pair, &ps))), 1);
    check_stop(c);
    CHECK_EQ(zmq_ctx_term(ps.ctx), 0);
}

TEST(bad_arguments)
{
    CHECK_RC(caller_wait_zmq(NULL, CALLER_READABLE, 1), -EINVAL);
    CHECK_CONTAINS(check_last_message(), "NULL");
    /* Not a socket: ZeroMQ checks a tag inside it (a zeroed block has
     * none; large enough for whatever ZeroMQ reads). */
    void *junk = calloc(1, 1 << 16);
    CHECK_RC(caller_wait_zmq(junk, CALLER_READABLE, 1), -ENOTSOCK);
    CHECK_CONTAINS(check_last_message(), "caller_wait_zmq");
    free(junk);
    void *ctx = zmq_ctx_new();
    void *s = zsock(ctx, ZMQ_PULL);
    CHECK_RC(caller_wait_zmq(s, 0, 1), -EINVAL);
    CHECK_RC(caller_wait_zmq(s, 4, 1), -EINVAL);
    CHECK_RC(caller_wait_zmq(s, CALLER_READABLE, NAN), -EINVAL);
    zmq_close(s);
    CHECK_EQ(zmq_ctx_term(ctx), 0);
}
