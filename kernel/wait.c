/*
 * kwait: see wait.h. ZMQ_FD is edge-triggered in ZeroMQ's sense: it becomes
 * readable when the socket's state may have changed, and reading
 * ZMQ_EVENTS is what resets it. So each wait first reads ZMQ_EVENTS (a
 * message may be there already), and only then arms the poll; a message
 * that arrives after that read makes the descriptor readable again, so no
 * wake-up is lost.
 */
#include "wait.h"

#include <caller.h>

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <uv.h>
#include <zmq.h>

struct kwait {
    uv_poll_t poll; /* first: the handle's address is the waiter's */
    void *socket;
    caller_pending_t *ready; /* the current wait's, or NULL between waits */
};

static void on_poll(uv_poll_t *h, int status, int events)
{
    (void)status;
    (void)events;
    struct kwait *w = (struct kwait *)h;
    uv_poll_stop(h);
    if (w->ready)
        caller_pending_set_result(w->ready, NULL, false);
}

kwait_t *kwait_new(void *socket)
{
    caller_t *self = caller_current();
    uv_loop_t *loop = self ? caller_loop(self) : NULL;
    int fd;
    size_t len = sizeof fd;
    if (!loop || zmq_getsockopt(socket, ZMQ_FD, &fd, &len) != 0)
        return NULL;
    struct kwait *w = calloc(1, sizeof *w);
    if (!w)
        return NULL;
    if (uv_poll_init(loop, &w->poll, fd) != 0) {
        free(w);
        return NULL;
    }
    w->socket = socket;
    return w;
}

int kwait_readable(kwait_t *w)
{
    for (;;) {
        uint32_t events = 0;
        size_t len = sizeof events;
        if (zmq_getsockopt(w->socket, ZMQ_EVENTS, &events, &len) != 0)
            return -zmq_errno();
        if (events & ZMQ_POLLIN)
            return 0;
        w->ready = caller_pending_new(CALLER_PENDING_UNTRACKED);
        if (!w->ready)
            return -ENOMEM;
        int rc = uv_poll_start(&w->poll, UV_READABLE, on_poll);
        if (rc == 0)
            rc = caller_pending_wait(w->ready, CALLER_FOREVER, true, false, NULL);
        uv_poll_stop(&w->poll);
        caller_pending_unref(w->ready);
        w->ready = NULL;
        if (rc != 0)
            return rc;
    }
}

static void on_close(uv_handle_t *h)
{
    free(h);
}

void kwait_close(kwait_t *w)
{
    if (w)
        uv_close((uv_handle_t *)&w->poll, on_close);
}
