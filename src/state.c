/*
 * The Caller's state machine. Every change of `caller->state` is a
 * compare-and-swap through caller__transition(), and only along an edge of
 * this table; nothing ever moves backwards. Who triggers each edge:
 *
 *   from      to        trigger
 *   --------  --------  ------------------------------------------------------
 *   INITIAL   STARTING  its starter: start_thread (NEW_THREAD, caller_get),
 *                       caller_run (MANUAL), attaching (CURRENT_THREAD)
 *   INITIAL   STOPPING  caller_stop of a thread Caller its starter has not
 *                       started yet (caller_get lists a child before it
 *                       starts it): the starter sees it and ends it unstarted
 *   INITIAL   STOPPED   caller_stop of a MANUAL Caller that never ran (the only
 *                       Caller that can end without a starter to see it; the
 *                       edge aborts for any other)
 *   STARTING  RUNNING   its thread, once the loop is open (start_loop)
 *   STARTING  STOPPING  caller_stop while it starts: the stop message waits in
 *                       the inbox until the loop runs
 *   STARTING  STOPPED   its thread: the start failed (no loop, no iopub socket)
 *   RUNNING   STOPPING  caller_stop (any thread), or its own end of a body
 *   STOPPING  STOPPED   its thread, once every task and child ended (finish);
 *                       or its starter, for one stopped before it started
 *
 * STOPPED is final, and the stopped event fires right after the edge into
 * it, once per Caller.
 */
#include "core.h"
#include "error.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

static const bool allowed[5][5] = {
    [CALLER_STATE_INITIAL] = {[CALLER_STATE_STARTING] = true,
                              [CALLER_STATE_STOPPING] = true,
                              [CALLER_STATE_STOPPED] = true},
    [CALLER_STATE_STARTING] = {[CALLER_STATE_RUNNING] = true,
                               [CALLER_STATE_STOPPING] = true,
                               [CALLER_STATE_STOPPED] = true},
    [CALLER_STATE_RUNNING] = {[CALLER_STATE_STOPPING] = true},
    [CALLER_STATE_STOPPING] = {[CALLER_STATE_STOPPED] = true},
};

bool caller__transition(caller_t *c, int from, int to)
{
    if (from < 0 || from > 4 || to < 0 || to > 4 || !allowed[from][to] ||
        (from == CALLER_STATE_INITIAL && to == CALLER_STATE_STOPPED && !c->manual)) {
        /* A broken invariant of the library itself, never the user's. */
        fprintf(stderr, "libcaller: Caller '%s': no transition from state %d to %d\n", c->name,
                from, to);
        abort();
    }
    return atomic_compare_exchange_strong_explicit(&c->state, &from, to, memory_order_acq_rel,
                                                   memory_order_acquire);
}

int caller__state(const caller_t *c)
{
    return atomic_load_explicit(&((caller_t *)c)->state, memory_order_acquire);
}

/* ---- this thread's Caller --------------------------------------------------- */

static _Thread_local caller_t *tl_caller;

caller_t *caller__thread_caller(void)
{
    return tl_caller;
}

void caller__set_thread_caller(caller_t *c)
{
    tl_caller = c;
}

/* ---- text forms, logging ------------------------------------------------------ */

static const char *state_text(int st)
{
    switch (st) {
    case CALLER_STATE_INITIAL:
        return "\u2757 not running";
    case CALLER_STATE_STARTING:
        return "starting";
    case CALLER_STATE_RUNNING:
        return "\U0001f3c3 running";
    case CALLER_STATE_STOPPING:
        return "\U0001f3c1 stopping";
    default:
        return "\U0001f3c1 stopped";
    }
}

int caller_repr(const caller_t *c, char *buf, size_t len)
{
    if (!c || (!buf && len))
        return caller__fail(-EINVAL, "caller_repr: %s is NULL", c ? "buf" : "caller");
    /* No lock: repr may be called under this Caller's lock (error paths). */
    size_t n = atomic_load_explicit(&((caller_t *)c)->nchildren, memory_order_relaxed);
    char kids[32] = "";
    if (n)
        snprintf(kids, sizeof kids, " %zu %s", n, n == 1 ? "child" : "children");
    return snprintf(buf, len, "Caller<%s %s %s%s>", c->name, c->ops->name,
                    state_text(caller__state(c)), kids);
}

void caller__log(caller_t *c, int level, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (c && c->log) {
        c->log(c->log_arg, level, msg);
        return;
    }
    const char *lv = level >= CALLER_LOG_ERROR     ? "ERROR"
                     : level >= CALLER_LOG_WARNING ? "WARNING"
                     : level >= CALLER_LOG_INFO    ? "INFO"
                                                   : "DEBUG";
    fprintf(stderr, "libcaller %s [%s]: %s\n", lv, c ? c->name : "-", msg);
}

int caller__fail_stopped(const caller_t *c, const char *fn)
{
    char text[128];
    caller_repr(c, text, sizeof text);
    return caller__fail(-ESHUTDOWN, "%s: %s is stopped!", fn, text);
}
