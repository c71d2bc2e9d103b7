/*
 * The event-loop interface under every Caller (SPEC §11). A backend gives a
 * Caller five things on its own thread — a cross-thread wake-up, one timer,
 * a "more work is ready" flag that keeps the loop from blocking, watches on
 * file descriptors (for io.c's caller_wait_fd), and a way to run and to
 * close — and calls back into the Caller through caller__backend_events_t: libuv
 * (backend_uv.c) and GLib's main context (backend_glib.c, when built with
 * GLib). What both share on Linux (the timerfd, the epoll set of watches)
 * is in backend_fd.c; backend.c is the registry that finds them by name.
 */
#ifndef CALLER_BACKEND_H
#define CALLER_BACKEND_H

#include "caller_config.h" /* CALLER_WITH_GLIB */

#include <stdbool.h>
#include <stdint.h>

typedef struct caller__backend caller__backend_t;

/* A watch on one file descriptor (watch_start), owned by the backend. */
typedef struct caller__backend_watch caller__backend_watch_t;

/* Loop thread: the watched descriptor is ready: @p ready holds
 * CALLER_READABLE and/or CALLER_WRITABLE. An error or hang-up on the
 * descriptor shows as every event watched. */
typedef void (*caller__backend_watch_fn)(void *arg, unsigned ready);

typedef struct {
    void (*on_work)(void *owner);   /* wake, timer or "more": dispatch now */
    void (*on_closed)(void *owner); /* every handle is closed */
    /* The loop is about to block waiting for events (it may dispatch here
     * and turn "more" on, and the loop will not block then). */
    void (*before_sleep)(void *owner);
    /* The same for a loop that must not run tasks there: runs nothing,
     * spins briefly where allowed; true if work came (the backend then
     * does not block, and calls on_work next). */
    bool (*await_work)(void *owner);
} caller__backend_events_t;

typedef struct {
    const char *name;
    /* On the loop's thread. @p loop is the application's loop to join, or
     * NULL for a loop the backend creates and owns. 0 or -errno. */
    int (*open)(caller__backend_t **out, void *loop, void *owner,
                const caller__backend_events_t *events);
    /* Any thread; safe until close() has been called. Coalesces. */
    void (*wake)(caller__backend_t *b);
    /* Loop thread: fire on_work at @p deadline_ns (monotonic); INT64_MAX
     * disarms. The backend may fire early by up to its resolution: the
     * Caller re-checks deadlines. */
    void (*timer)(caller__backend_t *b, int64_t deadline_ns);
    /* Loop thread: while on, the loop does not block and calls on_work on
     * every iteration. */
    void (*more)(caller__backend_t *b, bool on);
    /* Loop thread: run an owned loop until close() finished. 0 or -errno. */
    int (*run)(caller__backend_t *b);
    /* Loop thread: close every handle; on_closed follows from the loop. */
    void (*close)(caller__backend_t *b);
    /* After on_closed (and after run returned, for an owned loop). */
    void (*destroy)(caller__backend_t *b);
    /* The native loop (uv_loop_t * for libuv). */
    void *(*native)(caller__backend_t *b);
    /* Loop thread: a watch on @p fd, watching nothing yet (watch_update
     * says what): @p cb(arg, ...) runs on the loop thread whenever the
     * loop finds @p fd ready for what is watched, until watch_close. A
     * backend needs nothing of the descriptor until the first
     * watch_update, and never changes its flags (O_NONBLOCK). A watch
     * never keeps the loop alive by itself. 0 or -ENOMEM. */
    int (*watch_start)(caller__backend_t *b, int fd, caller__backend_watch_fn cb, void *arg,
                       caller__backend_watch_t **out);
    /* Loop thread: watch for @p events (CALLER_READABLE | CALLER_WRITABLE;
     * 0: nothing, not even errors). 0 or -errno: -EBADF (the descriptor is
     * closed), -EPERM (the loop cannot watch this kind of descriptor: a
     * regular file), -EEXIST (another watch of this backend has @p fd),
     * -ENOMEM. On failure it watches nothing. A descriptor closed while
     * watched is no error here: its watch just never fires. */
    int (*watch_update)(caller__backend_watch_t *w, unsigned events);
    /* Loop thread: end the watch; its callback never runs again (also if
     * called from inside a watch callback). Before close(). */
    void (*watch_close)(caller__backend_watch_t *w);
} caller__backend_ops_t;

extern const caller__backend_ops_t caller__backend_uv;
#if CALLER_WITH_GLIB
extern const caller__backend_ops_t caller__backend_glib;
#endif

/* ---- the registry (backend.c) ---- */

/* The backend with this name, or NULL. */
const caller__backend_ops_t *caller__backend_find(const char *name);

struct caller_options;

/*
 * The backend for a new Caller made with options @p o (may be NULL): the
 * one named in o->backend; else the one whose loop is given (o->loop:
 * libuv, o->glib_context: glib); else the environment's CALLER_BACKEND;
 * else libuv. 0, or -EINVAL with a message starting "@p api: " (an unknown
 * name, both loops given, a loop of another backend than the one named).
 */
int caller__backend_choose(const struct caller_options *o, const char *api,
                           const caller__backend_ops_t **ops);

#endif
