/*
 * What every backend on Linux shares: the timer as a timerfd armed at an
 * absolute deadline in nanoseconds, and descriptor watches (caller_wait_fd)
 * in an epoll set of the backend's own, which the backend's loop watches
 * as one readable descriptor. A backend keeps a caller__fdset_t and hands
 * its watch operations straight through to the ones here.
 *
 * Why a timerfd: libuv's timers and GLib's ready times count whole
 * milliseconds, so a call_later would run up to ~1 ms late on average
 * (measured on libuv, W5: p50 lateness 1.7 ms); a timerfd armed at the
 * absolute deadline fires when it is due.
 *
 * Why our own epoll set, not one loop handle per descriptor: libuv calls
 * abort() when its deferred epoll_ctl finds a descriptor closed
 * (libuv/libuv#1495, #5130: a task closing a descriptor another task is
 * about to wait on would kill the process), puts every polled descriptor
 * in O_NONBLOCK (a flag of the open file description, which the
 * application and other processes share) and refuses a second uv_poll_t
 * on a descriptor the application already polls on this loop. Our own
 * epoll_ctl reports the closed descriptor as an error instead, changes no
 * flags, and lives beside the application's handles on any loop.
 */
#ifndef CALLER_BACKEND_FD_H
#define CALLER_BACKEND_FD_H

#include "backend.h"

#include <stdbool.h>
#include <stdint.h>

/* ---- the timer ---- */

typedef struct {
    int fd;        /* the timerfd (CLOCK_MONOTONIC, non-blocking) */
    int64_t armed; /* the deadline it is set to, or INT64_MAX */
} caller__timerfd_t;

/* 0 or -errno. */
int caller__timerfd_open(caller__timerfd_t *t);
/* Set to @p deadline_ns (monotonic; INT64_MAX disarms). No system call
 * when it is already so. */
void caller__timerfd_set(caller__timerfd_t *t, int64_t deadline_ns);
/* The loop found the timerfd readable: call before on_work. No read() to
 * clear the expiration: on_work ends by setting the timer again (armed is
 * reset here, so it will), and timerfd_settime resets the count. */
static inline void caller__timerfd_fired(caller__timerfd_t *t)
{
    t->armed = INT64_MAX;
}
/* After on_work: if nothing set it again, clear the expiration. */
void caller__timerfd_settle(caller__timerfd_t *t);
void caller__timerfd_close(caller__timerfd_t *t);

/* ---- descriptor watches ---- */

typedef struct {
    int fd;                        /* the epoll set, or -1 before the first watch */
    int dispatching;               /* inside dispatch: closed watches wait in dead */
    caller__backend_watch_t *dead; /* closed, freed once dispatch returns */
    caller__backend_watch_t *kept; /* closed, freed with the set (see watch_close) */
} caller__fdset_t;

void caller__fdset_init(caller__fdset_t *s);
/* Make the epoll set (at the first watch). 1 if it was made now (the
 * backend then starts watching s->fd for readability), 0 if it was there,
 * or -errno. */
int caller__fdset_open(caller__fdset_t *s);
/* The loop found s->fd readable: run the callbacks of what is ready. A
 * batch at a time: with more ready, the set stays readable and the loop
 * comes back next iteration. */
void caller__fdset_dispatch(caller__fdset_t *s);
/* After the loop stopped watching s->fd: close the set, free the watches. */
void caller__fdset_close(caller__fdset_t *s);

/* The watch operations of caller__backend_ops_t, on the watch's set.
 * watch_start takes the set instead of the backend. */
int caller__fdset_watch_start(caller__fdset_t *s, int fd, caller__backend_watch_fn cb, void *arg,
                              caller__backend_watch_t **out);
int caller__fdset_watch_update(caller__backend_watch_t *w, unsigned events);
void caller__fdset_watch_close(caller__backend_watch_t *w);

#endif
