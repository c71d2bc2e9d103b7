/*
 * Structured concurrency: trackers, PendingGroup and PendingManager.
 *
 * Contexts (context.c) name the active trackers: the current context is
 * thread-local; a task carries its own (captured when it was scheduled, a
 * reference) and the scheduler makes it current while the task runs. A
 * new Pending joins the
 * innermost group and the innermost manager of the current context (as the
 * original has one context variable per tracker class), unless it was made
 * with CALLER_PENDING_UNTRACKED.
 *
 * A tracker holds a reference to each tracked Pending and a done callback
 * on it; the callback (in the completing thread) drops it from the set and,
 * for a group, cancels the group when the Pending failed or was cancelled.
 * Locking: each tracker's `lock` guards its set and state; it is taken
 * before a Pending's lock (add/remove_done_callback), never after, and no
 * Pending is completed or cancelled under it.
 */
#include "context.h"
#include "core.h"
#include "error.h"
#include "lockorder.h"
#include "pending.h"
#include "task.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef enum { TRACKER_GROUP = 1, TRACKER_MANAGER } tracker_kind_t;

typedef enum {
    TRACK_IDLE = 0,
    TRACK_ACTIVE,
    TRACK_EXITING, /* still tracking; waiting for the tracked to finish */
    TRACK_STOPPED,
} track_state_t;

typedef struct tracker {
    atomic_int refs;
    tracker_kind_t kind;
    pthread_mutex_t lock;
    track_state_t state;
    caller_pending_t **set; /* references */
    size_t n, cap;
    caller_pending_t *drained; /* completed when n reaches 0 (a reference) */
} tracker_t;

struct caller_group {
    tracker_t t; /* first */
    caller_t *caller;
    bool shield;
    double timeout; /* < 0: none */
    char *messages; /* cancellation messages, "\n"-joined (under t.lock) */
    bool cancelled;
    bool timed_out;
    caller_scope_t *scope;  /* the body's, while entered (under t.lock) */
    caller__ctx_t *node;    /* while entered */
    caller__ctx_t *outer;   /* the context to restore at exit */
    caller_pending_t *self; /* the group as a Pending of the enclosing context */
};

struct caller_manager {
    tracker_t t; /* first */
};

/* ---- trackers ------------------------------------------------------------ */

#define lock_tracker(t) caller__mutex_lock(&(t)->lock, CALLER__RANK_TRACKER)
#define unlock_tracker(t) caller__mutex_unlock(&(t)->lock, CALLER__RANK_TRACKER)

static void tracker_init(tracker_t *t, tracker_kind_t kind)
{
    atomic_init(&t->refs, 1);
    t->kind = kind;
    pthread_mutex_init(&t->lock, NULL);
}

static void group_free(caller_group_t *g);

static void tracker_unref(tracker_t *t)
{
    if (!t || atomic_fetch_sub_explicit(&t->refs, 1, memory_order_acq_rel) != 1)
        return;
    for (size_t i = 0; i < t->n; i++)
        caller_pending_unref(t->set[i]);
    caller__free(t->set);
    caller_pending_unref(t->drained);
    pthread_mutex_destroy(&t->lock);
    if (t->kind == TRACKER_GROUP)
        group_free((caller_group_t *)t);
    caller__free(t);
}

static void group_cancel_locked_msg(caller_group_t *g, const char *msg, caller_pending_t ***out,
                                    size_t *nout);
static void cancel_all(caller_pending_t **list, size_t n, const char *msg);

/* Under t->lock: drop set[i]; returns the Pending to release (and maybe the
 * drained notice to complete) after unlocking. */
static caller_pending_t *remove_at_locked(tracker_t *t, size_t i, caller_pending_t **drained)
{
    caller_pending_t *p = t->set[i];
    t->set[i] = t->set[--t->n];
    if (t->n == 0 && t->drained) {
        *drained = t->drained;
        t->drained = NULL;
    }
    return p;
}

static void finish_removal(tracker_t *t, caller_pending_t *p, caller_pending_t *drained)
{
    if (drained) {
        caller_pending_set_result(drained, NULL, 0);
        caller_pending_unref(drained);
    }
    caller_pending_unref(p);
    tracker_unref(t); /* the tracked Pending's reference on us */
}

static void tracker_done(caller_pending_t *p, void *arg)
{
    tracker_t *t = arg;
    caller_pending_t *drained = NULL, **victims = NULL;
    size_t nvictims = 0;
    char msg[512] = "";
    bool failed = caller_pending_cancelled(p) == 1 || caller_pending_exception(p, NULL, 0) != 0;
    if (failed && t->kind == TRACKER_GROUP) {
        char why[256], text[200];
        caller_pending_exception(p, why, sizeof why);
        caller_pending_repr(p, text, sizeof text);
        snprintf(msg, sizeof msg, "%s tracked by PendingGroup failed or was cancelled: %s", text,
                 why);
    }
    lock_tracker(t);
    caller_pending_t *found = NULL;
    for (size_t i = 0; i < t->n; i++)
        if (t->set[i] == p) {
            found = remove_at_locked(t, i, &drained);
            break;
        }
    if (failed && t->kind == TRACKER_GROUP && t->state == TRACK_ACTIVE)
        group_cancel_locked_msg((caller_group_t *)t, msg, &victims, &nvictims);
    unlock_tracker(t);
    if (victims)
        cancel_all(victims, nvictims, msg);
    if (found)
        finish_removal(t, found, drained);
}

/* Track @p p (not done) in @p t. */
static void tracker_track(tracker_t *t, caller_pending_t *p)
{
    lock_tracker(t);
    if (t->state != TRACK_ACTIVE && t->state != TRACK_EXITING) {
        unlock_tracker(t);
        return;
    }
    if (t->n == t->cap) {
        size_t cap = t->cap ? t->cap * 2 : 8;
        caller_pending_t **set = caller__realloc(t->set, cap * sizeof *set);
        if (!set) {
            unlock_tracker(t);
            return; /* not tracked: the Pending itself is fine */
        }
        t->set = set;
        t->cap = cap;
    }
    t->set[t->n++] = caller_pending_ref(p);
    atomic_fetch_add_explicit(&t->refs, 1, memory_order_relaxed);
    unlock_tracker(t);
    /* Outside our lock: if p is already done the callback runs at once. */
    if (caller_pending_add_done_callback(p, tracker_done, t) < 0)
        tracker_done(p, t); /* no memory for the callback: stop tracking it */
}

static void tracker_ref(void *t)
{
    atomic_fetch_add_explicit(&((tracker_t *)t)->refs, 1, memory_order_relaxed);
}

static void tracker_unref_op(void *t)
{
    tracker_unref(t);
}

static void tracker_track_op(void *t, caller_pending_t *p)
{
    tracker_track(t, p);
}

/* How a context node names a group or a manager (context.h). */
static const caller__tracker_ops_t group_ops = {TRACKER_GROUP, tracker_ref, tracker_unref_op,
                                                tracker_track_op};
static const caller__tracker_ops_t manager_ops = {TRACKER_MANAGER, tracker_ref, tracker_unref_op,
                                                  tracker_track_op};

/* Stop tracking @p p: 1 if it was tracked, 0 if not. */
static int tracker_remove(tracker_t *t, caller_pending_t *p)
{
    if (caller_pending_remove_done_callback(p, tracker_done, t) == 0)
        return 0; /* not tracked, or its callback is running */
    caller_pending_t *drained = NULL, *found = NULL;
    lock_tracker(t);
    for (size_t i = 0; i < t->n; i++)
        if (t->set[i] == p) {
            found = remove_at_locked(t, i, &drained);
            break;
        }
    unlock_tracker(t);
    if (found)
        finish_removal(t, found, drained);
    return found ? 1 : 0;
}

static size_t tracker_snapshot(tracker_t *t, caller_pending_t **out, size_t max)
{
    lock_tracker(t);
    size_t n = t->n;
    for (size_t i = 0; i < n && i < max; i++)
        out[i] = caller_pending_ref(t->set[i]);
    unlock_tracker(t);
    return n;
}

/* Under t->lock: a reference to every tracked Pending, to cancel later. */
static void snapshot_locked(tracker_t *t, caller_pending_t ***out, size_t *nout)
{
    *out = NULL;
    *nout = 0;
    if (!t->n)
        return;
    caller_pending_t **list = caller__malloc(t->n * sizeof *list);
    if (!list)
        return;
    for (size_t i = 0; i < t->n; i++)
        list[i] = caller_pending_ref(t->set[i]);
    *out = list;
    *nout = t->n;
}

static void cancel_all(caller_pending_t **list, size_t n, const char *msg)
{
    for (size_t i = 0; i < n; i++) {
        caller_pending_cancel(list[i], msg);
        caller_pending_unref(list[i]);
    }
    caller__free(list);
}

/* Wait (suspending a task, blocking a thread) until @p t tracks nothing.
 * @p uncancellable: in a shield, so only the drain ends it. */
static int wait_drained(tracker_t *t, double timeout)
{
    lock_tracker(t);
    if (t->n == 0) {
        unlock_tracker(t);
        return 0;
    }
    caller_pending_t *d = t->drained;
    if (!d) {
        d = t->drained = caller_pending_new(CALLER_PENDING_UNTRACKED);
        if (!d) {
            unlock_tracker(t);
            return -ENOMEM;
        }
    }
    caller_pending_ref(d);
    unlock_tracker(t);
    int rc = caller_pending_wait(d, timeout, CALLER_WAIT_PROTECT, NULL);
    caller_pending_unref(d);
    return rc;
}

/* ---- PendingGroup ------------------------------------------------------------ */

static void group_free(caller_group_t *g)
{
    caller__free(g->messages);
    caller_pending_unref(g->self);
    caller_unref(g->caller);
}

caller_group_t *caller_group_new(caller_t *c, unsigned flags)
{
    if (flags & ~(unsigned)CALLER_GROUP_SHIELD) {
        caller__fail(-EINVAL, "caller_group_new: unknown flags 0x%x", flags);
        return NULL;
    }
    bool shield = flags & CALLER_GROUP_SHIELD;
    if (!c)
        c = caller_current();
    caller_group_t *g = caller__calloc(1, sizeof *g);
    if (!g) {
        caller__fail(-ENOMEM, "caller_group_new: out of memory");
        return NULL;
    }
    tracker_init(&g->t, TRACKER_GROUP);
    g->caller = caller_ref(c);
    g->shield = shield;
    g->timeout = -1;
    return g;
}

caller_group_t *caller_group_ref(caller_group_t *g)
{
    if (g)
        atomic_fetch_add_explicit(&g->t.refs, 1, memory_order_relaxed);
    return g;
}

void caller_group_unref(caller_group_t *g)
{
    if (g)
        tracker_unref(&g->t);
}

int caller_group_set_timeout(caller_group_t *g, double seconds)
{
    if (!g || !(seconds >= 0))
        return caller__fail(-EINVAL, "caller_group_set_timeout: %s",
                            g ? "the timeout is negative" : "group is NULL");
    lock_tracker(&g->t);
    bool idle = g->t.state == TRACK_IDLE;
    if (idle)
        g->timeout = seconds;
    unlock_tracker(&g->t);
    return idle ? 0 : caller__fail(CALLER_EINVALSTATE, "caller_group_set_timeout: entered");
}

int caller_group_enter(caller_group_t *g)
{
    if (!g)
        return caller__fail(-EINVAL, "caller_group_enter: group is NULL");
    if (!caller_current_pending())
        return caller__fail(-EPERM, "caller_group_enter: not in a task (run the body with "
                                    "caller_call_soon or caller_run)");
    lock_tracker(&g->t);
    if (g->t.state != TRACK_IDLE) {
        unlock_tracker(&g->t);
        return caller__fail(CALLER_EINVALSTATE, "caller_group_enter: a group is entered once");
    }
    unlock_tracker(&g->t);
    /* The group as a Pending of the enclosing context, so an enclosing
     * group sees this one fail like any Pending it tracks. */
    caller_pending_t *self = caller_pending_new(0);
    caller_scope_t *scope =
        self ? caller_scope_enter(g->timeout, g->shield ? CALLER_SCOPE_SHIELD : 0) : NULL;
    caller__ctx_t *outer = caller__ctx_current();
    caller__ctx_t *node = scope ? caller__ctx_push(&g->t, &group_ops) : NULL;
    if (!node) {
        if (scope)
            caller_scope_exit(scope);
        caller_pending_unref(self);
        return caller__fail(-ENOMEM, "caller_group_enter: out of memory");
    }
    caller__pending_set_name(self, "PendingGroup");
    lock_tracker(&g->t);
    g->t.state = TRACK_ACTIVE;
    g->self = self;
    g->scope = scope;
    g->node = node;
    g->outer = outer;
    if (g->cancelled) /* cancelled before it was entered */
        caller_scope_cancel(scope);
    unlock_tracker(&g->t);
    return 0;
}

/* Under the lock: mark the group cancelled with @p msg; what to cancel and
 * the scope to cancel are handed out to be done after unlocking. */
static void group_cancel_locked_msg(caller_group_t *g, const char *msg, caller_pending_t ***out,
                                    size_t *nout)
{
    g->cancelled = true;
    if (msg && *msg) {
        size_t a = g->messages ? strlen(g->messages) : 0, b = strlen(msg);
        char *m = caller__realloc(g->messages, a + b + 2);
        if (m) {
            if (a)
                m[a++] = '\n';
            memcpy(m + a, msg, b + 1);
            g->messages = m;
        }
    }
    snapshot_locked(&g->t, out, nout);
    /* Under the lock: exit clears g->scope under it before the scope goes. */
    if (g->scope)
        caller_scope_cancel(g->scope);
}

int caller_group_cancel(caller_group_t *g, const char *message)
{
    if (!g)
        return caller__fail(-EINVAL, "caller_group_cancel: group is NULL");
    caller_pending_t **victims = NULL;
    size_t n = 0;
    lock_tracker(&g->t);
    if (g->t.state == TRACK_STOPPED) {
        unlock_tracker(&g->t);
        return 0;
    }
    group_cancel_locked_msg(g, message, &victims, &n);
    unlock_tracker(&g->t);
    cancel_all(victims, n, message);
    return 1;
}

int caller_group_cancelled(const caller_group_t *g)
{
    if (!g)
        return caller__fail(-EINVAL, "caller_group_cancelled: group is NULL");
    caller_group_t *mg = (caller_group_t *)g;
    lock_tracker(&mg->t);
    bool c = g->cancelled;
    unlock_tracker(&mg->t);
    return c;
}

int caller_group_remove(caller_group_t *g, caller_pending_t *p)
{
    if (!g || !p)
        return caller__fail(-EINVAL, "caller_group_remove: %s is NULL", g ? "p" : "group");
    return tracker_remove(&g->t, p);
}

size_t caller_group_pending(caller_group_t *g, caller_pending_t **out, size_t max)
{
    return g ? tracker_snapshot(&g->t, out, max) : 0;
}

int caller_group_exit(caller_group_t *g)
{
    if (!g)
        return caller__fail(-EINVAL, "caller_group_exit: group is NULL");
    lock_tracker(&g->t);
    bool entered = g->t.state == TRACK_ACTIVE && caller__ctx_current() == g->node;
    unlock_tracker(&g->t);
    if (!entered)
        return caller__fail(CALLER_EINVALSTATE, "caller_group_exit: not the group this task "
                                                "entered last");
    /* In the body's scope: wait for what is tracked. Cancellation (of the
     * group, or from outside unless shielded) ends this wait. */
    int rc = wait_drained(&g->t, CALLER_FOREVER);
    lock_tracker(&g->t);
    g->t.state = TRACK_EXITING;
    caller_scope_t *scope = g->scope;
    g->scope = NULL;
    unlock_tracker(&g->t);
    bool expired =
        scope->expired || (scope->deadline != INT64_MAX && caller__now_ns() >= scope->deadline);
    caller_scope_exit(scope);
    if (rc < 0) {
        /* Not drained: the group was cancelled, its deadline passed, or the
         * task was cancelled from outside. The last two cancel it now. */
        lock_tracker(&g->t);
        bool already = g->cancelled;
        if (!already)
            g->timed_out = expired;
        unlock_tracker(&g->t);
        if (!already)
            caller_group_cancel(g, expired ? "PendingGroup timed out" : "PendingGroup cancelled");
    }
    /* Whatever is left is cancelled; wait for it, shielded. */
    caller_pending_t **victims = NULL;
    size_t n = 0;
    lock_tracker(&g->t);
    if (g->t.n)
        snapshot_locked(&g->t, &victims, &n);
    unlock_tracker(&g->t);
    if (n) {
        cancel_all(victims, n, "PendingGroup exiting");
        caller_scope_t *shield = caller_scope_enter(-1, CALLER_SCOPE_SHIELD);
        wait_drained(&g->t, CALLER_FOREVER);
        if (shield)
            caller_scope_exit(shield);
    }
    caller__ctx_swap(g->outer);
    lock_tracker(&g->t);
    g->t.state = TRACK_STOPPED;
    caller__ctx_t *node = g->node;
    g->node = NULL;
    bool cancelled = g->cancelled, timed_out = g->timed_out;
    char *msgs = caller__strdup(g->messages ? g->messages : "");
    unlock_tracker(&g->t);
    caller__ctx_unref(node);
    if (!cancelled) {
        caller_pending_set_result(g->self, NULL, 0);
        caller__free(msgs);
        return 0;
    }
    int code = timed_out ? -ETIMEDOUT : -ECANCELED;
    caller_pending_set_exception(g->self, code, "%s", msgs ? msgs : "");
    caller__fail(code, "%s", msgs ? msgs : "PendingGroup cancelled");
    caller__free(msgs);
    return code;
}

/* ---- PendingManager ------------------------------------------------------------ */

caller_manager_t *caller_manager_new(void)
{
    caller_manager_t *m = caller__calloc(1, sizeof *m);
    if (!m) {
        caller__fail(-ENOMEM, "caller_manager_new: out of memory");
        return NULL;
    }
    tracker_init(&m->t, TRACKER_MANAGER);
    return m;
}

void caller_manager_unref(caller_manager_t *m)
{
    if (m)
        tracker_unref(&m->t);
}

caller_manager_t *caller_manager_ref(caller_manager_t *m)
{
    if (!m) {
        caller__fail(-EINVAL, "caller_manager_ref: manager is NULL");
        return NULL;
    }
    tracker_ref(&m->t);
    return m;
}

int caller_manager_activate(caller_manager_t *m)
{
    if (!m)
        return caller__fail(-EINVAL, "caller_manager_activate: manager is NULL");
    lock_tracker(&m->t);
    /* Deactivated with some finishing: stopped once they all have, whether
     * or not a caller_manager_wait() saw it. */
    bool ok = m->t.state == TRACK_IDLE || m->t.state == TRACK_STOPPED ||
              (m->t.state == TRACK_EXITING && m->t.n == 0);
    bool finishing = m->t.state == TRACK_EXITING && !ok;
    if (ok)
        m->t.state = TRACK_ACTIVE;
    unlock_tracker(&m->t);
    if (finishing)
        return caller__fail(CALLER_EINVALSTATE, "caller_manager_activate: Pendings of its "
                                                "deactivation are still finishing");
    return ok ? 0 : caller__fail(CALLER_EINVALSTATE, "caller_manager_activate: already active");
}

int caller_manager_start(caller_manager_t *m, caller_manager_token_t *token)
{
    if (!m || !token)
        return caller__fail(-EINVAL, "caller_manager_start: %s is NULL", m ? "token" : "manager");
    lock_tracker(&m->t);
    bool active = m->t.state == TRACK_ACTIVE;
    unlock_tracker(&m->t);
    if (!active)
        return caller__fail(CALLER_EINVALSTATE, "caller_manager_start: not active");
    caller__ctx_t *outer = caller__ctx_current();
    caller__ctx_t *node = caller__ctx_push(&m->t, &manager_ops);
    if (!node)
        return caller__fail(-ENOMEM, "caller_manager_start: out of memory");
    token->outer = outer;
    token->node = node;
    return 0;
}

int caller_manager_stop(caller_manager_t *m, caller_manager_token_t *token)
{
    if (!m || !token || !token->node || ((caller__ctx_t *)token->node)->tracker != &m->t)
        return caller__fail(-EINVAL, "caller_manager_stop: not a token of this manager");
    if (caller__ctx_current() != token->node)
        return caller__fail(CALLER_EINVALSTATE, "caller_manager_stop: contexts must be left "
                                                "in the reverse order they were entered");
    caller__ctx_swap(token->outer);
    caller__ctx_unref(token->node);
    token->node = NULL;
    return 0;
}

int caller_manager_deactivate(caller_manager_t *m, unsigned flags)
{
    if (!m)
        return caller__fail(-EINVAL, "caller_manager_deactivate: manager is NULL");
    if (flags & ~(unsigned)CALLER_MANAGER_CANCEL_PENDING)
        return caller__fail(-EINVAL, "caller_manager_deactivate: unknown flags 0x%x", flags);
    bool cancel_pending = flags & CALLER_MANAGER_CANCEL_PENDING;
    caller_pending_t **list = NULL;
    size_t n = 0;
    lock_tracker(&m->t);
    if (m->t.state != TRACK_ACTIVE) {
        unlock_tracker(&m->t);
        return caller__fail(CALLER_EINVALSTATE, "caller_manager_deactivate: not active");
    }
    m->t.state = TRACK_EXITING;
    snapshot_locked(&m->t, &list, &n);
    unlock_tracker(&m->t);
    for (size_t i = 0; i < n; i++) {
        if (cancel_pending)
            caller_pending_cancel(list[i], "PendingManager has been deactivated");
        else
            tracker_remove(&m->t, list[i]);
        caller_pending_unref(list[i]);
    }
    caller__free(list);
    lock_tracker(&m->t);
    bool finishing = m->t.n > 0;
    if (!finishing)
        m->t.state = TRACK_STOPPED;
    unlock_tracker(&m->t);
    return finishing ? 1 : 0;
}

int caller_manager_wait(caller_manager_t *m, double timeout)
{
    if (!m)
        return caller__fail(-EINVAL, "caller_manager_wait: manager is NULL");
    int rc = wait_drained(&m->t, timeout);
    if (rc == 0) {
        lock_tracker(&m->t);
        if (m->t.state == TRACK_EXITING && m->t.n == 0)
            m->t.state = TRACK_STOPPED;
        unlock_tracker(&m->t);
    }
    return rc;
}

size_t caller_manager_pending(caller_manager_t *m, caller_pending_t **out, size_t max)
{
    return m ? tracker_snapshot(&m->t, out, max) : 0;
}
