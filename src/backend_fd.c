/*
 * The timerfd and the epoll set of descriptor watches every backend shares
 * (see backend_fd.h).
 */
#include "backend_fd.h"
#include "alloc.h"

#include "caller.h" /* CALLER_READABLE, CALLER_WRITABLE */

#include <errno.h>
#include <sys/epoll.h>
#include <sys/timerfd.h>
#include <unistd.h>

/* ---- the timer ---- */

int caller__timerfd_open(caller__timerfd_t *t)
{
    t->armed = INT64_MAX;
    t->fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    return t->fd < 0 ? -errno : 0;
}

void caller__timerfd_set(caller__timerfd_t *t, int64_t deadline_ns)
{
    if (deadline_ns == t->armed)
        return; /* already so: no system call */
    struct itimerspec its = {0};
    if (deadline_ns != INT64_MAX) {
        if (deadline_ns <= 0)
            deadline_ns = 1; /* 0 would disarm */
        its.it_value.tv_sec = deadline_ns / 1000000000;
        its.it_value.tv_nsec = deadline_ns % 1000000000;
    }
    timerfd_settime(t->fd, TFD_TIMER_ABSTIME, &its, NULL);
    t->armed = deadline_ns;
}

void caller__timerfd_settle(caller__timerfd_t *t)
{
    if (t->armed == INT64_MAX) {
        struct itimerspec none = {0};
        timerfd_settime(t->fd, 0, &none, NULL); /* disarmed: clear it */
    }
}

void caller__timerfd_close(caller__timerfd_t *t)
{
    if (t->fd >= 0)
        close(t->fd);
    t->fd = -1;
}

/* ---- descriptor watches ---- */

/* A descriptor watch: in the set (with itself as the event's data) while
 * `in_set`. Registered EPOLLONESHOT: once it fired it watches nothing until
 * watch_update arms it again. */
struct caller__backend_watch {
    caller__fdset_t *set;
    int fd;
    unsigned armed; /* what it watches now */
    bool in_set;
    bool lost; /* an epoll_ctl on it failed: the set may still hold it */
    bool dead; /* closed: dispatch ignores it */
    caller__backend_watch_fn cb;
    void *arg;
    caller__backend_watch_t *next_dead;
};

enum { IO_BATCH = 64 };

void caller__fdset_init(caller__fdset_t *s)
{
    *s = (caller__fdset_t){.fd = -1};
}

int caller__fdset_open(caller__fdset_t *s)
{
    if (s->fd >= 0)
        return 0;
    s->fd = epoll_create1(EPOLL_CLOEXEC);
    return s->fd < 0 ? -errno : 1;
}

void caller__fdset_dispatch(caller__fdset_t *s)
{
    struct epoll_event ev[IO_BATCH];
    int n = epoll_wait(s->fd, ev, IO_BATCH, 0);
    s->dispatching++;
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
    if (--s->dispatching == 0) {
        while (s->dead) {
            caller__backend_watch_t *w = s->dead;
            s->dead = w->next_dead;
            caller__free(w);
        }
    }
}

void caller__fdset_close(caller__fdset_t *s)
{
    while (s->kept) {
        caller__backend_watch_t *w = s->kept;
        s->kept = w->next_dead;
        caller__free(w);
    }
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
}

int caller__fdset_watch_start(caller__fdset_t *s, int fd, caller__backend_watch_fn cb, void *arg,
                              caller__backend_watch_t **out)
{
    caller__backend_watch_t *w = caller__calloc(1, sizeof *w);
    if (!w)
        return -ENOMEM;
    w->set = s;
    w->fd = fd;
    w->cb = cb;
    w->arg = arg;
    *out = w;
    return 0;
}

int caller__fdset_watch_update(caller__backend_watch_t *w, unsigned events)
{
    caller__fdset_t *s = w->set;
    if (!events) {
        /* Out of the set, so that nothing fires for it. */
        if (w->in_set && epoll_ctl(s->fd, EPOLL_CTL_DEL, w->fd, NULL) != 0)
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
    int rc = epoll_ctl(s->fd, w->in_set ? EPOLL_CTL_MOD : EPOLL_CTL_ADD, w->fd, &ev);
    if (rc != 0 && !w->in_set && errno == EEXIST) {
        /* The set still holds this file under this number for a watch
         * closed while its descriptor was (see watch_close), and the
         * number was given the same file again: take the entry over. */
        rc = epoll_ctl(s->fd, EPOLL_CTL_MOD, w->fd, &ev);
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
void caller__fdset_watch_close(caller__backend_watch_t *w)
{
    caller__fdset_watch_update(w, 0);
    caller__fdset_t *s = w->set;
    w->dead = true;
    if (w->lost) {
        w->next_dead = s->kept;
        s->kept = w;
    } else if (s->dispatching) {
        w->next_dead = s->dead;
        s->dead = w;
    } else {
        caller__free(w);
    }
}
