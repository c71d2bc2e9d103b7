/*
 * The kernel's iopub forwarder and the flush handshake: see iopub.h.
 *
 * Lock order: `sync_lock` is a leaf (no library call is made under it).
 */
#include "iopub.h"

#include <caller.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

/* A flush token: one frame, starting with a NUL byte so that it cannot be
 * taken for an iopub topic, then the waiter's id. */
#define TOKEN "\0caller-kernel-flush "
#define TOKEN_LEN (sizeof TOKEN - 1)

typedef struct waiter {
    struct waiter *next;
    uint64_t id;
    caller_pending_t *done; /* a reference: completed by the forwarder */
} waiter_t;

static pthread_mutex_t sync_lock = PTHREAD_MUTEX_INITIALIZER;
static waiter_t *waiters;
static atomic_uint_fast64_t next_id = 1;

static pthread_t forwarder;
static bool forwarder_started;
static void *sub, *pub;

/* Take the waiter @p id out of the list; NULL if it is gone already. */
static waiter_t *take_waiter(uint64_t id)
{
    waiter_t *found = NULL;
    pthread_mutex_lock(&sync_lock);
    for (waiter_t **pp = &waiters; *pp; pp = &(*pp)->next)
        if ((*pp)->id == id) {
            found = *pp;
            *pp = found->next;
            break;
        }
    pthread_mutex_unlock(&sync_lock);
    return found;
}

static void answer_token(const char *data, size_t len)
{
    char digits[32];
    size_t n = len - TOKEN_LEN;
    if (n == 0 || n >= sizeof digits)
        return;
    memcpy(digits, data + TOKEN_LEN, n);
    digits[n] = '\0';
    /* A token resent after a timeout may come twice: the second finds no
     * waiter. */
    waiter_t *w = take_waiter(strtoull(digits, NULL, 10));
    if (w) {
        caller_pending_set_result(w->done, NULL, 0);
        caller_pending_unref(w->done);
        free(w);
    }
}

/* Copy messages from `sub` to `pub` until the context is shut down. A
 * multipart message goes whole: ZeroMQ delivers all its frames or none. */
static void *forward(void *arg)
{
    (void)arg;
    zmq_msg_t m;
    zmq_msg_init(&m);
    bool first = true;
    for (;;) {
        if (zmq_msg_recv(&m, sub, 0) < 0) {
            if (zmq_errno() == EINTR)
                continue;
            break; /* ETERM: the kernel is ending */
        }
        bool more = zmq_msg_more(&m);
        if (first && !more && zmq_msg_size(&m) >= TOKEN_LEN &&
            memcmp(zmq_msg_data(&m), TOKEN, TOKEN_LEN) == 0) {
            answer_token(zmq_msg_data(&m), zmq_msg_size(&m));
            continue;
        }
        if (zmq_msg_send(&m, pub, more ? ZMQ_SNDMORE : 0) < 0 && zmq_errno() == ETERM)
            break;
        first = !more;
    }
    zmq_msg_close(&m);
    zmq_close(sub);
    zmq_close(pub);
    return NULL;
}

int kiopub_start(void *ctx, const char *endpoint, char *err, size_t errlen)
{
    char url[256];
    caller_iopub_url(url, sizeof url);
    sub = zmq_socket(ctx, ZMQ_SUB);
    pub = zmq_socket(ctx, ZMQ_PUB);
    int linger = 500;
    if (!sub || !pub || zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0) != 0 ||
        zmq_setsockopt(pub, ZMQ_LINGER, &linger, sizeof linger) != 0) {
        snprintf(err, errlen, "iopub sockets: %s", zmq_strerror(zmq_errno()));
        goto fail;
    }
    if (zmq_bind(sub, url) != 0) {
        snprintf(err, errlen, "bind %s: %s", url, zmq_strerror(zmq_errno()));
        goto fail;
    }
    if (zmq_bind(pub, endpoint) != 0) {
        snprintf(err, errlen, "bind iopub %s: %s", endpoint, zmq_strerror(zmq_errno()));
        goto fail;
    }
    /* The sockets move to the forwarder thread: pthread_create is the full
     * memory barrier ZeroMQ asks for when a socket changes threads. */
    if (pthread_create(&forwarder, NULL, forward, NULL) != 0) {
        snprintf(err, errlen, "cannot start the iopub thread");
        goto fail;
    }
    forwarder_started = true;
    return 0;
fail:
    if (sub)
        zmq_close(sub);
    if (pub)
        zmq_close(pub);
    sub = pub = NULL;
    return -1;
}

void kiopub_join(void)
{
    if (forwarder_started)
        pthread_join(forwarder, NULL);
    forwarder_started = false;
}

int kiopub_flush(void)
{
    void *s = caller_iopub_socket();
    if (!s)
        return -EINVAL;
    waiter_t *w = malloc(sizeof *w);
    caller_pending_t *done = caller_pending_new(CALLER_PENDING_UNTRACKED);
    if (!w || !done) {
        free(w);
        caller_pending_unref(done);
        return -ENOMEM;
    }
    uint64_t id = atomic_fetch_add(&next_id, 1);
    char token[TOKEN_LEN + 24];
    memcpy(token, TOKEN, TOKEN_LEN);
    int n = snprintf(token + TOKEN_LEN, sizeof token - TOKEN_LEN, "%llu", (unsigned long long)id);
    /* Once `w` is in the list, the forwarder may take and free it at any
     * time: it is not touched again outside `sync_lock`. */
    w->id = id;
    w->done = caller_pending_ref(done);
    pthread_mutex_lock(&sync_lock);
    w->next = waiters;
    waiters = w;
    pthread_mutex_unlock(&sync_lock);

    /* Resend with a growing pause while the token is dropped (no
     * subscription yet); the first usually arrives. */
    double pause = 0.001, waited = 0;
    int rc;
    for (;;) {
        zmq_send(s, token, TOKEN_LEN + (size_t)n, ZMQ_DONTWAIT);
        rc = caller_pending_wait(done, pause, CALLER_WAIT_PROTECT, NULL);
        waited += pause;
        if (rc != -ETIMEDOUT || waited > 10)
            break;
        pause = pause < 0.05 ? pause * 2 : 0.1;
    }
    w = take_waiter(id); /* still there if the forwarder never answered */
    if (w) {
        caller_pending_unref(w->done);
        free(w);
    }
    caller_pending_unref(done);
    return rc;
}

/* The socket this thread has flushed once: its subscription has arrived. */
static _Thread_local void *ready_socket;

int kiopub_send(const kwire_msg_t *parent, const char *msg_type, json_t *content)
{
    void *s = caller_iopub_socket();
    if (!s) {
        json_decref(content);
        return -1;
    }
    if (ready_socket != s) {
        int rc = kiopub_flush();
        if (rc != 0)
            fprintf(stderr, "caller-kernel: iopub is not ready (%s); publishing anyway\n",
                    caller_strerror(rc));
        else
            ready_socket = s;
    }
    char topic[96];
    snprintf(topic, sizeof topic, "kernel.%s.%s", kwire_session(), msg_type);
    return kwire_send(s, parent, false, topic, msg_type, content);
}

int kiopub_status(const kwire_msg_t *parent, const char *state)
{
    return kiopub_send(parent, "status", json_pack("{s:s}", "execution_state", state));
}
