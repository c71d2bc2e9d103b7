/*
 * Waiting for I/O (caller_wait_fd, caller_wait_zmq): a task suspends on an
 * internal Pending that a descriptor watch of its Caller's backend
 * completes, so cancellation, cancel scopes and deadlines work as at any
 * other suspension point (caller_pending_wait does them); any other thread
 * blocks in ppoll(2).
 *
 * A Caller keeps at most one watch per descriptor (a backend's epoll set
 * holds a descriptor once), shared by every task of the Caller that waits
 * on it: the list in caller->io, made of the watches that have waiters, so
 * a Caller that never waits has none. Each waiter is a node allocated with
 * its Pending, not on its task's stack: the loop walks the waiters while
 * the tasks are suspended, when a copy-stack task's stack is not where it
 * was (CALLER_STACK_COPY). Everything here runs in the Caller's own thread (the loop's
 * callbacks and the waiting tasks), so there is no lock.
 *
 * A descriptor closed while it is waited on vanishes from epoll without an
 * event (and from ppoll, if closed from another thread, never wakes it), so
 * every wait also wakes every CHECK_NS to look whether its descriptor is
 * still the file it started with.
 */
#include "alloc.h"
#include "core.h"
#include "error.h"
#include "list.h"
#include "sync.h"
#include "task.h"
#include "testpoint.h"

#include <poll.h>
#include <stdint.h>
#include <sys/stat.h>

#define container_of caller__container_of

/* How often a wait looks whether its descriptor was closed. */
#define CHECK_NS 500000000LL

/* One descriptor a Caller's tasks wait on. */
typedef struct watch {
    struct watch *next; /* in caller->io (while listed) */
    caller_t *caller;
    caller__backend_watch_t *bw; /* NULL once dropped (its descriptor changed) */
    int fd;
    dev_t dev; /* the file it was when watched */
    ino_t ino;
    bool listed;
    size_t users;          /* waiters that joined and have not left */
    caller__link_t linked; /* waiters not yet woken */
} watch_t;

/* A task waiting on a watch: the extra bytes of its Pending. */
typedef struct {
    caller__link_t link; /* in its watch's `linked` until woken */
    unsigned events;
    caller_pending_t *p; /* completed with the ready events or -errno */
} waiter_t;

static unsigned poll_events(unsigned events)
{
    return (events & CALLER_READABLE ? POLLIN : 0u) | (events & CALLER_WRITABLE ? POLLOUT : 0u);
}

/* Is @p fd still the file @p id describes? */
static bool same_file(int fd, const struct stat *id)
{
    struct stat st;
    return fstat(fd, &st) == 0 && st.st_dev == id->st_dev && st.st_ino == id->st_ino;
}

/* ---- a task's wait ---------------------------------------------------------- */

/* Complete @p w's Pending with @p outcome (ready events, or -errno): the
 * task resumes. */
static void wake(waiter_t *w, int outcome)
{
    caller__list_del(&w->link);
    caller_pending_set_result(w->p, (void *)(intptr_t)outcome, 0);
}

/* Wake every waiter on @p wt with @p err; -EPERM (a descriptor epoll
 * cannot watch, as a regular file, which poll(2) calls always ready)
 * wakes each with its events. */
static void wake_all(watch_t *wt, int err)
{
    while (!caller__list_empty(&wt->linked)) {
        waiter_t *w = container_of(wt->linked.next, waiter_t, link);
        wake(w, err == -EPERM ? (int)w->events : err);
    }
}

/* Watch for what the linked waiters want (nothing while every one has been
 * woken and not yet left: a level-triggered ready descriptor would fire
 * again and again). */
static void rearm(watch_t *wt)
{
    if (!wt->bw)
        return;
    unsigned want = 0;
    caller__list_for_each(l, &wt->linked) want |= container_of(l, waiter_t, link)->events;
    int rc = wt->caller->ops->watch_update(wt->bw, want);
    if (rc < 0)
        wake_all(wt, rc);
}

static void on_ready(void *arg, unsigned ready)
{
    watch_t *wt = arg;
    for (caller__link_t *l = wt->linked.next; l != &wt->linked;) {
        waiter_t *w = container_of(l, waiter_t, link);
        l = l->next;
        if (w->events & ready)
            wake(w, (int)(w->events & ready));
    }
    rearm(wt);
}

static void unlist(watch_t *wt)
{
    if (!wt->listed)
        return;
    for (watch_t **pp = (watch_t **)&wt->caller->io; *pp; pp = &(*pp)->next)
        if (*pp == wt) {
            *pp = wt->next;
            break;
        }
    wt->listed = false;
}

/* @p wt's descriptor is another file now (closed, its number reused): its
 * waiters end with -EBADF and new waiters get a new watch. */
static void drop(watch_t *wt)
{
    unlist(wt);
    wt->caller->ops->watch_close(wt->bw);
    wt->bw = NULL;
    wake_all(wt, -EBADF);
}

/* The Caller's watch of @p fd (the file @p id), made if there is none;
 * the caller is one more of its users. */
static int join(caller_t *c, int fd, const struct stat *id, watch_t **out)
{
    watch_t *wt;
    for (wt = c->io; wt && wt->fd != fd; wt = wt->next)
        ;
    if (wt && (wt->dev != id->st_dev || wt->ino != id->st_ino)) {
        drop(wt);
        wt = NULL;
    }
    if (!wt) {
        wt = caller__calloc(1, sizeof *wt);
        if (!wt)
            return -ENOMEM;
        wt->caller = c;
        wt->fd = fd;
        wt->dev = id->st_dev;
        wt->ino = id->st_ino;
        caller__list_init(&wt->linked);
        int rc = c->ops->watch_start(c->loop_backend, fd, on_ready, wt, &wt->bw);
        if (rc < 0) {
            caller__free(wt);
            return rc;
        }
        wt->next = c->io;
        c->io = wt;
        wt->listed = true;
    }
    wt->users++;
    *out = wt;
    return 0;
}

static void leave(watch_t *wt)
{
    if (--wt->users > 0) {
        rearm(wt);
        return;
    }
    unlist(wt);
    if (wt->bw)
        wt->caller->ops->watch_close(wt->bw);
    caller__free(wt);
}

static int wait_task(caller_t *c, int fd, unsigned events, int64_t deadline, const struct stat *id)
{
    waiter_t *w;
    caller_pending_t *p =
        caller__pending_new_extra(CALLER_PENDING_UNTRACKED, sizeof *w, (void **)&w);
    if (!p)
        return -ENOMEM;
    caller__pending_track(p);
    watch_t *wt;
    int rc = join(c, fd, id, &wt);
    if (rc < 0) {
        caller_pending_unref(p);
        return rc;
    }
    *w = (waiter_t){.events = events, .p = p};
    caller__list_add_tail(&wt->linked, &w->link);
    rearm(wt); /* a failure completes p */
    for (;;) {
        /* In steps of at most CHECK_NS, to look at the descriptor. */
        int64_t now = caller__now_ns();
        int64_t step = deadline - now < CHECK_NS ? deadline - now : CHECK_NS;
        void *v = NULL;
        rc = caller_pending_wait(p, step > 0 ? (double)step / 1e9 : 0,
                                 CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v);
        if (rc == 0) {
            rc = (int)(intptr_t)v;
            break;
        }
        if (rc != -ETIMEDOUT)
            break; /* -ECANCELED (the task), -ENOMEM */
        if (caller__now_ns() >= deadline)
            break;
        if (!same_file(fd, id)) {
            rc = -EBADF;
            break;
        }
    }
    if (!caller__list_empty(&w->link))
        caller__list_del(&w->link);
    leave(wt);
    caller_pending_unref(p);
    return rc;
}

/* ---- a thread's wait ------------------------------------------------------- */

static int wait_poll(int fd, unsigned events, int64_t deadline, const struct stat *id)
{
    struct pollfd pfd = {.fd = fd, .events = (short)poll_events(events)};
    for (;;) {
        int64_t now = caller__now_ns();
        int64_t step = deadline - now < CHECK_NS ? deadline - now : CHECK_NS;
        if (step < 0)
            step = 0;
        struct timespec ts = {step / 1000000000, step % 1000000000};
        pfd.revents = 0;
        int n = ppoll(&pfd, 1, &ts, NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue; /* a signal does not end the wait */
            return -errno;
        }
        if (n > 0) {
            if (pfd.revents & POLLNVAL)
                return -EBADF;
            unsigned ready = (pfd.revents & POLLIN ? CALLER_READABLE : 0u) |
                             (pfd.revents & POLLOUT ? CALLER_WRITABLE : 0u);
            if (pfd.revents & (POLLERR | POLLHUP))
                ready = events; /* let the reader or writer see it */
            ready &= events;
            if (ready)
                return (int)ready;
        }
        if (caller__now_ns() >= deadline)
            return -ETIMEDOUT;
        if (!same_file(fd, id))
            return -EBADF;
    }
}

/* ---- the API ------------------------------------------------------------- */

static int check_args(const char *api, unsigned events, double timeout)
{
    if (events == 0 || (events & ~(unsigned)(CALLER_READABLE | CALLER_WRITABLE)))
        return caller__fail(
            -EINVAL, "%s: events 0x%x is not CALLER_READABLE and/or CALLER_WRITABLE", api, events);
    if (timeout != timeout)
        return caller__fail(-EINVAL, "%s: the timeout is NaN", api);
    return 0;
}

/* caller_wait_fd with the arguments checked, until @p deadline (monotonic
 * ns; INT64_MAX: none). @p poll_only: check without suspending. */
static int wait_fd(const char *api, int fd, unsigned events, int64_t deadline, bool poll_only)
{
    if (fd < 0)
        return caller__fail(-EINVAL, "%s: fd %d is negative", api, fd);
    struct stat id;
    if (fstat(fd, &id) != 0) {
        int err = errno;
        return caller__fail(-err, "%s: fd %d: %s", api, fd, caller_strerror(-err));
    }
    caller_t *c = poll_only || !caller__task_current() ? NULL : caller__thread_caller();
    int rc = c && c->loop_backend ? wait_task(c, fd, events, deadline, &id)
                                  : wait_poll(fd, events, deadline, &id);
    switch (rc) {
    case -ETIMEDOUT:
        return caller__fail(rc, "%s: fd %d was not ready in time", api, fd);
    case -ECANCELED:
        return caller__fail(rc, "%s: the task was cancelled", api);
    case -EBADF:
        return caller__fail(rc, "%s: fd %d was closed while waiting", api, fd);
    default:
        if (rc < 0)
            return caller__fail(rc, "%s: fd %d: %s", api, fd, caller_strerror(rc));
        return rc;
    }
}

static int64_t deadline_of(double timeout)
{
    return timeout == 0 ? caller__now_ns() : caller__deadline(timeout);
}

int caller_wait_fd(int fd, unsigned events, double timeout)
{
    int rc = check_args("caller_wait_fd", events, timeout);
    if (rc < 0)
        return rc;
    return wait_fd("caller_wait_fd", fd, events, deadline_of(timeout), timeout == 0);
}

#if CALLER_WITH_ZMQ
#include <zmq.h>

static int zmq_fail(const char *what)
{
    int err = zmq_errno();
    return caller__fail(-ENOTSOCK, "caller_wait_zmq: %s: %s", what, zmq_strerror(err));
}

int caller_wait_zmq(void *socket, unsigned events, double timeout)
{
    int rc = check_args("caller_wait_zmq", events, timeout);
    if (rc < 0)
        return rc;
    if (!socket)
        return caller__fail(-EINVAL, "caller_wait_zmq: socket is NULL");
    int64_t deadline = deadline_of(timeout);
    int zfd;
    size_t len = sizeof zfd;
    if (zmq_getsockopt(socket, ZMQ_FD, &zfd, &len) != 0)
        return zmq_fail("cannot read ZMQ_FD");
    for (;;) {
        /* ZMQ_FD only says "ZMQ_EVENTS may have changed", once: read
         * ZMQ_EVENTS before every sleep, never sleep while it shows what
         * is wanted. Reading it also re-arms ZMQ_FD. */
        int zev;
        len = sizeof zev;
        if (zmq_getsockopt(socket, ZMQ_EVENTS, &zev, &len) != 0)
            return zmq_fail("cannot read ZMQ_EVENTS");
        unsigned ready =
            (zev & ZMQ_POLLIN ? CALLER_READABLE : 0u) | (zev & ZMQ_POLLOUT ? CALLER_WRITABLE : 0u);
        if (ready & events)
            return (int)(ready & events);
        if (caller__now_ns() >= deadline)
            return caller__fail(-ETIMEDOUT, "caller_wait_zmq: the socket was not ready in time");
        CALLER__TEST_POINT("io.zmq_before_sleep", socket);
        rc = wait_fd("caller_wait_zmq", zfd, CALLER_READABLE, deadline, false);
        if (rc == -EBADF)
            return caller__fail(-ENOTSOCK, "caller_wait_zmq: the socket was closed while waiting");
        if (rc < 0 && rc != -ETIMEDOUT)
            return rc; /* -ECANCELED, -ENOMEM (recorded) */
        /* ready or timed out: look at ZMQ_EVENTS again */
    }
}
#else
int caller_wait_zmq(void *socket, unsigned events, double timeout)
{
    (void)socket;
    (void)events;
    (void)timeout;
    return caller__fail(-ENOTSUP, "caller_wait_zmq: built without ZeroMQ (CALLER_WITH_ZMQ=OFF)");
}
#endif
