/*
 * The libuv backend: one uv_async_t (cross-thread wake), the timer (a
 * timerfd, backend_fd.h) and the epoll set of descriptor watches each
 * watched with a uv_poll_t, one uv_idle_t (keeps the loop spinning while
 * tasks are ready) and one uv_prepare_t (runs before the loop would block),
 * on either a loop the backend owns or the application's loop.
 */
#include "alloc.h"
#include "backend_fd.h"

#include <errno.h>
#include <unistd.h>
#include <uv.h>

struct caller__backend {
    uv_loop_t *loop;
    uv_loop_t own;
    bool owns;
    uv_async_t async;
    uv_poll_t timer; /* on tfd.fd */
    caller__timerfd_t tfd;
    uv_idle_t idle;
    uv_prepare_t prepare; /* runs right before the loop polls */
    int open_handles;
    bool idle_on;
    void *owner;
    const caller__backend_events_t *events;
    caller__fdset_t fds;
    uv_poll_t io; /* on fds.fd, once it is open */
    bool io_open;
};

static void on_async(uv_async_t *h)
{
    caller__backend_t *b = h->data;
    b->events->on_work(b->owner);
}

static void on_timer(uv_poll_t *h, int status, int events)
{
    (void)status;
    (void)events;
    caller__backend_t *b = h->data;
    caller__timerfd_fired(&b->tfd);
    b->events->on_work(b->owner);
    caller__timerfd_settle(&b->tfd);
}

static void on_idle(uv_idle_t *h)
{
    caller__backend_t *b = h->data;
    b->events->on_work(b->owner);
}

static void on_prepare(uv_prepare_t *h)
{
    caller__backend_t *b = h->data;
    /* Only when the loop would block: with idle on it polls without waiting. */
    if (!b->idle_on)
        b->events->before_sleep(b->owner);
}

static int uvb_open(caller__backend_t **out, void *loop, void *owner,
                    const caller__backend_events_t *events)
{
    caller__backend_t *b = caller__calloc(1, sizeof *b);
    if (!b)
        return -ENOMEM;
    b->owner = owner;
    b->events = events;
    caller__fdset_init(&b->fds);
    int rc = 0;
    if (loop) {
        b->loop = loop;
    } else {
        b->owns = true;
        b->loop = &b->own;
        rc = uv_loop_init(&b->own);
        if (rc)
            goto fail;
    }
    rc = caller__timerfd_open(&b->tfd);
    if (rc)
        goto fail_loop;
    rc = uv_async_init(b->loop, &b->async, on_async);
    if (rc) {
        caller__timerfd_close(&b->tfd);
        goto fail_loop;
    }
    uv_poll_init(b->loop, &b->timer, b->tfd.fd);
    uv_poll_start(&b->timer, UV_READABLE, on_timer);
    uv_idle_init(b->loop, &b->idle);
    uv_prepare_init(b->loop, &b->prepare);
    b->async.data = b->timer.data = b->idle.data = b->prepare.data = b;
    b->open_handles = 4;
    uv_prepare_start(&b->prepare, on_prepare);
    uv_unref((uv_handle_t *)&b->prepare);
    /* The async handle keeps the loop alive while the Caller is open (an
     * application loop too: work can arrive at any time); timer and idle
     * never hold a loop open by themselves. */
    uv_unref((uv_handle_t *)&b->timer);
    uv_unref((uv_handle_t *)&b->idle);
    *out = b;
    return 0;
fail_loop:
    if (b->owns)
        uv_loop_close(&b->own);
fail:
    caller__free(b);
    return rc;
}

static void uvb_wake(caller__backend_t *b)
{
    uv_async_send(&b->async);
}

static void uvb_timer(caller__backend_t *b, int64_t deadline_ns)
{
    caller__timerfd_set(&b->tfd, deadline_ns);
}

static void uvb_more(caller__backend_t *b, bool on)
{
    if (on == b->idle_on)
        return;
    b->idle_on = on;
    if (on)
        uv_idle_start(&b->idle, on_idle);
    else
        uv_idle_stop(&b->idle);
}

static int uvb_run(caller__backend_t *b)
{
    return uv_run(b->loop, UV_RUN_DEFAULT) < 0 ? -EIO : 0;
}

static void on_close(uv_handle_t *h)
{
    caller__backend_t *b = h->data;
    if (h == (uv_handle_t *)&b->timer)
        caller__timerfd_close(&b->tfd);
    if (h == (uv_handle_t *)&b->io)
        caller__fdset_close(&b->fds);
    if (--b->open_handles == 0)
        b->events->on_closed(b->owner);
}

static void uvb_close(caller__backend_t *b)
{
    if (b->io_open)
        uv_close((uv_handle_t *)&b->io, on_close);
    uv_close((uv_handle_t *)&b->async, on_close);
    uv_close((uv_handle_t *)&b->timer, on_close);
    uv_close((uv_handle_t *)&b->idle, on_close);
    uv_close((uv_handle_t *)&b->prepare, on_close);
}

static void uvb_destroy(caller__backend_t *b)
{
    caller__fdset_close(&b->fds); /* the watches kept, if the set never opened */
    if (b->owns) {
        /* Anything the application started on this loop is its own; run
         * the loop once more to let close callbacks finish. */
        uv_run(&b->own, UV_RUN_NOWAIT);
        uv_loop_close(&b->own);
    }
    caller__free(b);
}

static void *uvb_native(caller__backend_t *b)
{
    return b->loop;
}

static void on_io(uv_poll_t *h, int status, int events)
{
    (void)status;
    (void)events;
    caller__backend_t *b = h->data;
    caller__fdset_dispatch(&b->fds);
}

static int uvb_watch_start(caller__backend_t *b, int fd, caller__backend_watch_fn cb, void *arg,
                           caller__backend_watch_t **out)
{
    int rc = caller__fdset_open(&b->fds);
    if (rc < 0)
        return rc;
    if (rc == 1) {
        /* The set is new: the loop watches it from now on. */
        rc = uv_poll_init(b->loop, &b->io, b->fds.fd);
        if (rc) {
            caller__fdset_close(&b->fds);
            return rc;
        }
        b->io.data = b;
        uv_poll_start(&b->io, UV_READABLE, on_io);
        uv_unref((uv_handle_t *)&b->io); /* waiting tasks keep the Caller open, not this */
        b->io_open = true;
        b->open_handles++;
    }
    return caller__fdset_watch_start(&b->fds, fd, cb, arg, out);
}

const caller__backend_ops_t caller__backend_uv = {
    .name = "libuv",
    .open = uvb_open,
    .wake = uvb_wake,
    .timer = uvb_timer,
    .more = uvb_more,
    .run = uvb_run,
    .close = uvb_close,
    .destroy = uvb_destroy,
    .native = uvb_native,
    .watch_start = uvb_watch_start,
    .watch_update = caller__fdset_watch_update,
    .watch_close = caller__fdset_watch_close,
};
