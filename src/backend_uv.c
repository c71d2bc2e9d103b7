/*
 * The libuv backend: one uv_async_t (cross-thread wake), one timer, one
 * uv_idle_t (keeps the loop spinning while tasks are ready), on either a
 * loop the backend owns or the application's loop.
 *
 * The timer is a timerfd watched with a uv_poll_t, not a uv_timer_t: libuv
 * timers count whole milliseconds, so a call_later would run up to ~1 ms
 * late on average (measured, W5: p50 lateness 1.7 ms); a timerfd armed at
 * the absolute deadline in nanoseconds fires when it is due.
 *
 * Descriptor watches (caller_wait_fd) live in an epoll set of our own,
 * made at the first watch and watched by the loop with one more
 * uv_poll_t, not in one uv_poll_t per descriptor. libuv calls abort() when
 * its deferred epoll_ctl finds a descriptor closed (libuv/libuv#1495,
 * #5130: a task closing a descriptor another task is about to wait on
 * would kill the process), puts every polled descriptor in O_NONBLOCK
 * (a flag of the open file description, which the application and other
 * processes share) and refuses a second uv_poll_t on a descriptor the
 * application already polls on this loop. Our own epoll_ctl reports the
 * closed descriptor as an error instead, changes no flags, and lives
 * beside the application's handles.
 */
#include "backend.h"
#include "alloc.h"

#include "caller.h" /* CALLER_READABLE, CALLER_WRITABLE */

#include <string.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <unistd.h>
#include <uv.h>

struct caller__backend {
    uv_loop_t *loop;
    uv_loop_t own;
    bool owns;
    uv_async_t async;
    uv_poll_t timer; /* on timer_fd */
    int timer_fd;
    int64_t armed; /* the deadline timer_fd is set to, or INT64_MAX */
    uv_idle_t idle;
    uv_prepare_t prepare; /* runs right before the loop polls */
    int open_handles;
    bool idle_on;
    void *owner;
    const caller__backend_events_t *events;
    /* descriptor watches: made at the first one */
    bool io_open;
    int io_fd;                        /* the epoll set of the watched descriptors */
    uv_poll_t io;                     /* on io_fd */
    int io_dispatch;                  /* inside on_io: closed watches wait in io_dead */
    caller__backend_watch_t *io_dead; /* closed, freed once on_io returns */
    caller__backend_watch_t *io_kept; /* closed, freed with the backend (see watch_close) */
};

/* A descriptor watch: in the backend's epoll set (with itself as the
 * event's data) while `in_set`. Registered EPOLLONESHOT: once it fired it
 * watches nothing until watch_update arms it again. */
struct caller__backend_watch {
    caller__backend_t *b;
    int fd;
    unsigned armed; /* what it watches now */
    bool in_set;
    bool lost; /* an epoll_ctl on it failed: the set may still hold it */
    bool dead; /* closed: on_io ignores it */
    caller__backend_watch_fn cb;
    void *arg;
    caller__backend_watch_t *next_dead;
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
    /* No read() to clear the expiration: on_work ends by setting the timer
     * again (armed is reset here, so it will), and timerfd_settime resets
     * the count — one system call per firing instead of two. */
    b->armed = INT64_MAX;
    b->events->on_work(b->owner);
    if (b->armed == INT64_MAX) {
        struct itimerspec none = {0};
        timerfd_settime(b->timer_fd, 0, &none, NULL); /* disarmed: clear it */
    }
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
    b->timer_fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (b->timer_fd < 0) {
        rc = -errno;
        goto fail_loop;
    }
    b->armed = INT64_MAX;
    rc = uv_async_init(b->loop, &b->async, on_async);
    if (rc) {
        close(b->timer_fd);
        goto fail_loop;
    }
    uv_poll_init(b->loop, &b->timer, b->timer_fd);
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
    if (deadline_ns == b->armed)
        return; /* already so: no system call */
    struct itimerspec its = {0};
    if (deadline_ns != INT64_MAX) {
        if (deadline_ns <= 0)
            deadline_ns = 1; /* 0 would disarm */
        its.it_value.tv_sec = deadline_ns / 1000000000;
        its.it_value.tv_nsec = deadline_ns % 1000000000;
    }
    timerfd_settime(b->timer_fd, TFD_TIMER_ABSTIME, &its, NULL);
    b->armed = deadline_ns;
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
        close(b->timer_fd);
    if (h == (uv_handle_t *)&b->io)
        close(b->io_fd);
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
    while (b->io_kept) {
        caller__backend_watch_t *w = b->io_kept;
        b->io_kept = w->next_dead;
        caller__free(w);
    }
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

/* ---- descriptor watches ---- */

enum { IO_BATCH = 64 };

/* The loop found the epoll set readable: run the callbacks of what is
 * ready. A batch at a time: with more ready, the set stays readable and
 * the loop comes back next iteration, after its other handles. */
static void on_io(uv_poll_t *h, int status, int events)
{
    (void)status;
    (void)events;
    caller__backend_t *b = h->data;
    struct epoll_event ev[IO_BATCH];
    int n = epoll_wait(b->io_fd, ev, IO_BATCH, 0);
    b->io_dispatch++;
    for (int i = 0; i < n; i++) {
        caller__backend_watch_t *w = ev[i].data.ptr;
        /* A callback may close or change watches later in this batch. */
        if (w->dead || !w->armed)
            continue;
        unsigned ready = 0;
        if (ev[i].events & EPOLLIN)
            ready |= CALLER_READABLE;
        if (ev[i].events & EPOLLOUT)
            ready |= CALLER_WRITABLE;
        if (ev[i].events & (EPOLLERR | EPOLLHUP))
            ready |= w->armed; /* let the reader or writer see it */
        ready &= w->armed;
        w->armed = 0; /* one-shot: it fired */
        if (ready)
            w->cb(w->arg, ready);
    }
    if (--b->io_dispatch == 0) {
        while (b->io_dead) {
            caller__backend_watch_t *w = b->io_dead;
            b->io_dead = w->next_dead;
            caller__free(w);
        }
    }
}

/* The epoll set and its uv_poll_t, at the first watch. */
static int io_open(caller__backend_t *b)
{
    if (b->io_open)
        return 0;
    b->io_fd = epoll_create1(EPOLL_CLOEXEC);
    if (b->io_fd < 0)
        return -errno;
    int rc = uv_poll_init(b->loop, &b->io, b->io_fd);
    if (rc) {
        close(b->io_fd);
        return rc;
    }
    b->io.data = b;
    uv_poll_start(&b->io, UV_READABLE, on_io);
    uv_unref((uv_handle_t *)&b->io); /* waiting tasks keep the Caller open, not this */
    b->io_open = true;
    b->open_handles++;
    return 0;
}

static int uvb_watch_start(caller__backend_t *b, int fd, caller__backend_watch_fn cb, void *arg,
                           caller__backend_watch_t **out)
{
    int rc = io_open(b);
    if (rc)
        return rc;
    caller__backend_watch_t *w = caller__calloc(1, sizeof *w);
    if (!w)
        return -ENOMEM;
    w->b = b;
    w->fd = fd;
    w->cb = cb;
    w->arg = arg;
    *out = w;
    return 0;
}

static int uvb_watch_update(caller__backend_watch_t *w, unsigned events)
{
    caller__backend_t *b = w->b;
    if (!events) {
        /* Out of the set, so that nothing fires for it. */
        if (w->in_set && epoll_ctl(b->io_fd, EPOLL_CTL_DEL, w->fd, NULL) != 0)
            w->lost = true;
        w->in_set = false;
        w->armed = 0;
        return 0;
    }
    if (events == w->armed)
        return 0;
    struct epoll_event ev = {
        .events = EPOLLONESHOT | (events & CALLER_READABLE ? EPOLLIN : 0u) |
                  (events & CALLER_WRITABLE ? EPOLLOUT : 0u),
        .data.ptr = w,
    };
    int rc = epoll_ctl(b->io_fd, w->in_set ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, w->fd, &ev);
    if (rc != 0 && !w->in_set && errno == EEXIST) {
        /* The set still holds this file under this number for a watch
         * closed while its descriptor was (see watch_close), and the
         * number was given the same file again: take the entry over. */
        rc = epoll_ctl(b->io_fd, EPOLL_CTL_MOD, w->fd, &ev);
    }
    if (rc != 0) {
        int err = errno;
        if (w->in_set) {
            /* MOD: the descriptor was closed (EBADF), or its number is
             * another file now (ENOENT). */
            w->lost = true;
            w->in_set = false;
            err = EBADF;
        }
        w->armed = 0;
        return -err;
    }
    w->in_set = true;
    w->armed = events;
    return 0;
}

/*
 * epoll holds a registration until the open file description goes, not
 * the descriptor: a descriptor closed while another one (a dup, a child
 * process's copy) keeps its file open stays in the set under a number
 * EPOLL_CTL_DEL no longer reaches, and may fire once more (one-shot: only
 * once). A watch whose epoll_ctl failed is therefore kept, dead, until the
 * set is gone; only a program that closes descriptors while waiting on
 * them pays those few bytes.
 */
static void uvb_watch_close(caller__backend_watch_t *w)
{
    uvb_watch_update(w, 0);
    caller__backend_t *b = w->b;
    w->dead = true;
    if (w->lost) {
        w->next_dead = b->io_kept;
        b->io_kept = w;
    } else if (b->io_dispatch) {
        w->next_dead = b->io_dead;
        b->io_dead = w;
    } else {
        caller__free(w);
    }
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
    .watch_update = uvb_watch_update,
    .watch_close = uvb_watch_close,
};

const caller__backend_ops_t *caller__backend_find(const char *name)
{
    if (!name || strcmp(name, "libuv") == 0)
        return &caller__backend_uv;
    return NULL;
}
