/*
 * The GLib backend: a Caller on a GMainContext, either one the backend
 * makes (and makes its thread's default) or one the application runs
 * already (a GTK or GLib main loop). It adds two GSources of its own to
 * the context:
 *
 * - the work source, with no descriptors: the cross-thread wake is a flag
 *   set with one atomic exchange, and g_main_context_wakeup() (an eventfd
 *   write) only when the flag was clear and the loop may be about to
 *   block: prepare says so in `may_sleep` before it decides the poll's
 *   timeout. A wake while the loop is busy (dispatching, or between
 *   iterations) costs no system call; wake-ups coalesce; nothing is
 *   allocated per wake. "More work" makes its prepare say ready with a
 *   zero timeout, so the context polls without blocking and dispatches it
 *   again. When nothing is left to run, its dispatch spins briefly for the
 *   next message and runs it (before_sleep, as the libuv backend does
 *   before it polls); a prepare not preceded by such a dispatch spins too
 *   (await_work: GLib calls prepare right before it computes its poll
 *   timeout), but never runs a task there: GLib forbids iterating the
 *   context from a prepare function, and a task may (a modal dialog).
 * - the descriptor source: the timer, a timerfd (backend_fd.h: nanosecond
 *   deadlines; GLib's ready times round to milliseconds), and the shared
 *   epoll set of descriptor watches, as unix fds; it may recurse, so GLib
 *   does not block it (below).
 *
 * Why two: GLib blocks a source while it dispatches it, and blocking a
 * source with descriptors takes them out of the context's poll set and
 * puts them back, each with a g_main_context_wakeup() — two eventfd
 * writes per dispatch (measured: 2 writes per cross-thread round trip
 * with one source). The work source, dispatched for every wake, has no
 * descriptors, so blocking it costs nothing; the descriptor source is not
 * blocked at all (W5, 100 000 timers: the writes made every firing late).
 *
 * close() destroys both and attaches an idle source made at open (so
 * close cannot fail) that reports on_closed from the loop.
 */
#include "alloc.h"
#include "backend_fd.h"

#include <errno.h>
#include <glib.h>
#include <stdatomic.h>

typedef struct {
    GSource source;
    caller__backend_t *b;
} caller_gsource_t;

struct caller__backend {
    GMainContext *ctx; /* a reference */
    bool owns;         /* made here, and pushed as the thread's default */
    GSource *work;     /* a caller_gsource_t: wake, more, spinning for work */
    GSource *fdsrc;    /* a caller_gsource_t: the timerfd and the epoll set */
    GSource *closer;   /* reports on_closed, once attached by close() */
    gpointer timer_tag;
    gpointer io_tag; /* the epoll set's fd, once it is open */
    caller__timerfd_t tfd;
    caller__fdset_t fds;
    atomic_int woken;     /* set by wake(), cleared by the dispatch that sees it */
    atomic_int may_sleep; /* 1 from a prepare that lets the context block until check */
    bool more_on;
    bool spun;   /* the last dispatch spun for work: the next prepare need not */
    bool closed; /* the closer ran: an owned loop's run() returns */
    void *owner;
    const caller__backend_events_t *events;
};

static caller__backend_t *of(GSource *s)
{
    return ((caller_gsource_t *)s)->b;
}

static bool woken(caller__backend_t *b)
{
    return atomic_load_explicit(&b->woken, memory_order_acquire) != 0;
}

/* ---- the work source ---- */

static gboolean work_prepare(GSource *s, gint *timeout)
{
    caller__backend_t *b = of(s);
    /* The context is about to poll: the Caller may spin for work here,
     * but runs nothing (GLib forbids iterating the context from a prepare
     * function, and a task may do that: a modal dialog). Work that came
     * is dispatched next, as if woken: a producer that saw the spin did
     * not set the flag. */
    bool spun = b->spun;
    b->spun = false;
    if (!spun && !b->more_on && !woken(b) && b->events->await_work(b->owner))
        atomic_store(&b->woken, 1);
    if (!b->more_on) {
        /* Say that a wake must signal from here on, then look once more:
         * either this sees a wake's flag, or that wake sees may_sleep and
         * signals (both sequentially consistent). */
        atomic_store(&b->may_sleep, 1);
        if (!atomic_load(&b->woken)) {
            *timeout = -1;
            return FALSE;
        }
    }
    atomic_store_explicit(&b->may_sleep, 0, memory_order_relaxed);
    *timeout = 0;
    return TRUE;
}

static gboolean work_check(GSource *s)
{
    caller__backend_t *b = of(s);
    /* Back from the poll (the only place the context blocks). */
    atomic_store_explicit(&b->may_sleep, 0, memory_order_relaxed);
    return b->more_on || woken(b);
}

static gboolean work_dispatch(GSource *s, GSourceFunc cb, gpointer data)
{
    (void)cb;
    (void)data;
    caller__backend_t *b = of(s);
    /* Cleared before on_work reads the inbox: a message posted after that
     * read finds the flag clear and wakes the context again. */
    bool wake = atomic_exchange_explicit(&b->woken, 0, memory_order_acq_rel) != 0;
    if (wake || b->more_on)
        b->events->on_work(b->owner);
    /* Nothing left to run: spin briefly for the next message and run it
     * here (a task may iterate the context from a dispatch), as the libuv
     * backend does before it polls; the prepare that follows then does
     * not spin again. */
    if (!b->more_on && !woken(b)) {
        b->events->before_sleep(b->owner);
        b->spun = true;
    }
    return G_SOURCE_CONTINUE;
}

static GSourceFuncs work_funcs = {
    .prepare = work_prepare,
    .check = work_check,
    .dispatch = work_dispatch,
};

/* ---- the descriptor source ---- */

static bool fd_ready(GSource *s, gpointer tag)
{
    return tag && (g_source_query_unix_fd(s, tag) & (G_IO_IN | G_IO_ERR | G_IO_HUP));
}

static gboolean fd_check(GSource *s)
{
    caller__backend_t *b = of(s);
    return fd_ready(s, b->timer_tag) || fd_ready(s, b->io_tag);
}

static gboolean fd_dispatch(GSource *s, GSourceFunc cb, gpointer data)
{
    (void)cb;
    (void)data;
    caller__backend_t *b = of(s);
    if (fd_ready(s, b->io_tag))
        caller__fdset_dispatch(&b->fds);
    if (fd_ready(s, b->timer_tag)) {
        caller__timerfd_fired(&b->tfd);
        b->events->on_work(b->owner);
        caller__timerfd_settle(&b->tfd);
    }
    return G_SOURCE_CONTINUE;
}

static GSourceFuncs fd_funcs = {
    .check = fd_check,
    .dispatch = fd_dispatch,
};

static GSource *new_source(GSourceFuncs *funcs, caller__backend_t *b, const char *name)
{
    GSource *s = g_source_new(funcs, sizeof(caller_gsource_t));
    ((caller_gsource_t *)s)->b = b;
    g_source_set_name(s, name);
    return s;
}

static gboolean on_closer(gpointer data)
{
    caller__backend_t *b = data;
    b->closed = true;
    b->events->on_closed(b->owner); /* may destroy b (an attached Caller) */
    return G_SOURCE_REMOVE;
}

static int gb_open(caller__backend_t **out, void *loop, void *owner,
                   const caller__backend_events_t *events)
{
    caller__backend_t *b = caller__calloc(1, sizeof *b);
    if (!b)
        return -ENOMEM;
    b->owner = owner;
    b->events = events;
    atomic_init(&b->woken, 0);
    /* Until the first prepare, a wake signals: the loop may not have come
     * to this source yet (an application's context). */
    atomic_init(&b->may_sleep, 1);
    caller__fdset_init(&b->fds);
    int rc = caller__timerfd_open(&b->tfd);
    if (rc) {
        caller__free(b);
        return rc;
    }
    if (loop) {
        b->ctx = g_main_context_ref(loop);
    } else {
        b->owns = true;
        b->ctx = g_main_context_new();
        /* GLib code in the tasks (GIO's async calls) uses this context. */
        g_main_context_push_thread_default(b->ctx);
    }
    b->work = new_source(&work_funcs, b, "libcaller");
    b->fdsrc = new_source(&fd_funcs, b, "libcaller timer and descriptors");
    /* Not blocked while it dispatches (the blocking would cost the two
     * writes per timer firing). A nested main loop run from a task may
     * then dispatch it again: on_work does nothing inside the Caller's
     * dispatch, whose end arms the timer again, and the epoll set's
     * dispatch is re-entrant. */
    g_source_set_can_recurse(b->fdsrc, TRUE);
    b->timer_tag = g_source_add_unix_fd(b->fdsrc, b->tfd.fd, G_IO_IN);
    b->closer = g_idle_source_new();
    g_source_set_name(b->closer, "libcaller close");
    g_source_set_callback(b->closer, on_closer, b, NULL);
    g_source_attach(b->work, b->ctx);
    g_source_attach(b->fdsrc, b->ctx);
    *out = b;
    return 0;
}

static void gb_wake(caller__backend_t *b)
{
    if (!atomic_exchange(&b->woken, 1) && atomic_load(&b->may_sleep))
        g_main_context_wakeup(b->ctx);
}

static void gb_timer(caller__backend_t *b, int64_t deadline_ns)
{
    caller__timerfd_set(&b->tfd, deadline_ns);
}

static void gb_more(caller__backend_t *b, bool on)
{
    b->more_on = on;
}

static int gb_run(caller__backend_t *b)
{
    while (!b->closed)
        g_main_context_iteration(b->ctx, TRUE);
    return 0;
}

static void gb_close(caller__backend_t *b)
{
    g_source_destroy(b->work);
    g_source_destroy(b->fdsrc); /* its fds leave the context's poll set */
    g_source_attach(b->closer, b->ctx);
}

static void gb_destroy(caller__backend_t *b)
{
    g_source_unref(b->work);
    g_source_unref(b->fdsrc);
    g_source_unref(b->closer);
    caller__timerfd_close(&b->tfd);
    caller__fdset_close(&b->fds);
    if (b->owns)
        g_main_context_pop_thread_default(b->ctx);
    /* Sources the application left on an owned context go with it. */
    g_main_context_unref(b->ctx);
    caller__free(b);
}

static void *gb_native(caller__backend_t *b)
{
    return b->ctx;
}

static int gb_watch_start(caller__backend_t *b, int fd, caller__backend_watch_fn cb, void *arg,
                          caller__backend_watch_t **out)
{
    int rc = caller__fdset_open(&b->fds);
    if (rc < 0)
        return rc;
    if (rc == 1)
        b->io_tag = g_source_add_unix_fd(b->fdsrc, b->fds.fd, G_IO_IN);
    return caller__fdset_watch_start(&b->fds, fd, cb, arg, out);
}

const caller__backend_ops_t caller__backend_glib = {
    .name = "glib",
    .open = gb_open,
    .wake = gb_wake,
    .timer = gb_timer,
    .more = gb_more,
    .run = gb_run,
    .close = gb_close,
    .destroy = gb_destroy,
    .native = gb_native,
    .watch_start = gb_watch_start,
    .watch_update = caller__fdset_watch_update,
    .watch_close = caller__fdset_watch_close,
};
