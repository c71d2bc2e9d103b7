/*
 * The libuv backend: one uv_async_t (cross-thread wake), one uv_timer_t,
 * one uv_idle_t (keeps the loop spinning while tasks are ready), on either
 * a loop the backend owns or the application's loop.
 */
#include "backend.h"
#include "internal.h"

#include <string.h>
#include <uv.h>

struct caller__backend {
    uv_loop_t *loop;
    uv_loop_t own;
    bool owns;
    uv_async_t async;
    uv_timer_t timer;
    uv_idle_t idle;
    uv_prepare_t prepare; /* runs right before the loop polls */
    int open_handles;
    bool idle_on;
    void *owner;
    const caller__backend_events_t *events;
};

static void on_async(uv_async_t *h)
{
    caller__backend_t *b = h->data;
    b->events->on_work(b->owner);
}

static void on_timer(uv_timer_t *h)
{
    caller__backend_t *b = h->data;
    b->events->on_work(b->owner);
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
    rc = uv_async_init(b->loop, &b->async, on_async);
    if (rc)
        goto fail_loop;
    uv_timer_init(b->loop, &b->timer);
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
    if (deadline_ns == INT64_MAX) {
        uv_timer_stop(&b->timer);
        return;
    }
    int64_t now = caller__now_ns();
    /* libuv counts whole milliseconds from its cached loop time; round up
     * so the timer never fires before the deadline is due. */
    int64_t ms = deadline_ns > now ? (deadline_ns - now + 999999) / 1000000 : 0;
    uv_update_time(b->loop);
    uv_timer_start(&b->timer, on_timer, (uint64_t)ms, 0);
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
    if (--b->open_handles == 0)
        b->events->on_closed(b->owner);
}

static void uvb_close(caller__backend_t *b)
{
    uv_close((uv_handle_t *)&b->async, on_close);
    uv_close((uv_handle_t *)&b->timer, on_close);
    uv_close((uv_handle_t *)&b->idle, on_close);
    uv_close((uv_handle_t *)&b->prepare, on_close);
}

static void uvb_destroy(caller__backend_t *b)
{
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
};

const caller__backend_ops_t *caller__backend_find(const char *name)
{
    if (!name || strcmp(name, "libuv") == 0)
        return &caller__backend_uv;
    return NULL;
}
