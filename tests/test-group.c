/* Structured concurrency: contexts, groups, managers, cancel scopes
 * (SPEC §9; issue #6). */
// ALSO-UCONTEXT
// TIMEOUT: 120
#include "check.h"
#include "internal.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>

/* Run @p body as a task on a new Caller and return its result code. */
static int run_in_task(caller_fn body, void *arg, void **result)
{
    caller_t *c = check_new_thread("group-test");
    caller_pending_t *p = caller_call_soon(c, body, arg);
    void *v = NULL;
    int rc = caller_pending_wait(p, 60, CALLER_WAIT_RESULT, &v);
    if (result)
        *result = v;
    caller_pending_unref(p);
    check_stop(c);
    return rc;
}

static bool tracked(caller_group_t *g, caller_pending_t *p)
{
    caller_pending_t *list[64];
    size_t n = caller_group_pending(g, list, 64);
    bool found = false;
    for (size_t i = 0; i < n && i < 64; i++) {
        found |= list[i] == p;
        caller_pending_unref(list[i]);
    }
    return found;
}

static void *ret_arg(void *arg)
{
    return arg;
}

/* Sleeps arg ms; fails with "boom <ms>" if arg is negative. */
static void *nap(void *arg)
{
    intptr_t ms = I(arg);
    int rc = caller_sleep((double)(ms < 0 ? -ms : ms) / 1000);
    if (rc < 0)
        return P(rc);
    if (ms < 0)
        caller_raise(-EIO, "boom %ld", (long)-ms);
    return arg;
}

/* ---- tracking ------------------------------------------------------------ */

static void *body_tracks(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    caller_group_t *g = caller_group_new(self, 0);
    CHECK_RC(caller_group_enter(g), 0);
    caller_pending_t *p = caller_call_soon(self, ret_arg, P(1));
    caller_pending_t *mine = caller_pending_new(0);
    caller_pending_t *untracked = caller_pending_new(CALLER_PENDING_UNTRACKED);
    caller_pending_t *later = caller_call_later(self, 0.01, ret_arg, P(2));
    CHECK(tracked(g, p));
    CHECK(tracked(g, mine));
    CHECK(tracked(g, later));
    CHECK(!tracked(g, untracked));
    caller_pending_set_result(mine, NULL, 0);
    CHECK_RC(caller_group_exit(g), 0);
    CHECK_EQ(caller_pending_done(p), 1);     /* exit waited for it */
    CHECK_EQ(caller_pending_done(later), 1); /* and for the delayed one */
    CHECK_EQ(caller_group_pending(g, NULL, 0), 0);
    caller_pending_t *after = caller_pending_new(0);
    CHECK(!tracked(g, after));
    CHECK_EQ(caller_group_pending(g, NULL, 0), 0);
    caller_pending_unref(after);
    caller_pending_unref(p);
    caller_pending_unref(mine);
    caller_pending_unref(untracked);
    caller_pending_unref(later);
    caller_group_unref(g);
    return NULL;
}

TEST(pending_made_inside_is_tracked_and_nothing_after_exit)
{
    CHECK_RC(run_in_task(body_tracks, NULL, NULL), 0);
}

typedef struct {
    caller_pending_t *made;       /* a Pending the task made, for the body to see */
    caller_pending_t *made_ready; /* set once `made` exists */
} spawn_t;

/* A task scheduled from inside the group: the Pending it makes is tracked. */
static void *make_one(void *arg)
{
    spawn_t *s = arg;
    s->made = caller_pending_new(0);
    caller_pending_set_result(s->made_ready, NULL, 0);
    caller_pending_wait(s->made, 10, CALLER_WAIT_PROTECT, NULL); /* until the body releases it */
    return NULL;
}

static void *body_nested_tasks(void *arg)
{
    caller_t *other = arg;
    caller_t *self = caller_current();
    caller_group_t *g = caller_group_new(self, 0);
    CHECK_RC(caller_group_enter(g), 0);
    spawn_t a = {.made_ready = caller_pending_new(CALLER_PENDING_UNTRACKED)};
    spawn_t b = {.made_ready = caller_pending_new(CALLER_PENDING_UNTRACKED)};
    caller_pending_t *pa = caller_call_soon(other, make_one, &a); /* another Caller */
    caller_pending_t *pb = caller_to_thread(self, make_one, &b);  /* a worker */
    CHECK_RC(caller_pending_wait(a.made_ready, 10, 0, NULL), 0);
    CHECK_RC(caller_pending_wait(b.made_ready, 10, 0, NULL), 0);
    CHECK(tracked(g, pa));
    CHECK(tracked(g, pb));
    CHECK(tracked(g, a.made));
    CHECK(tracked(g, b.made));
    caller_pending_set_result(a.made, NULL, 0);
    caller_pending_set_result(b.made, NULL, 0);
    CHECK_RC(caller_group_exit(g), 0);
    CHECK_EQ(caller_pending_done(pa) + caller_pending_done(pb), 2);
    caller_pending_unref(a.made);
    caller_pending_unref(b.made);
    caller_pending_unref(a.made_ready);
    caller_pending_unref(b.made_ready);
    caller_pending_unref(pa);
    caller_pending_unref(pb);
    caller_group_unref(g);
    return NULL;
}

TEST(pendings_of_tasks_scheduled_from_inside_are_tracked)
{
    caller_t *other = check_new_thread("other");
    CHECK_RC(run_in_task(body_nested_tasks, other, NULL), 0);
    check_stop(other);
}

/* ---- failure and cancellation ---------------------------------------------- */

static void *body_one_fails(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    caller_group_t *g = caller_group_new(self, 0);
    CHECK_RC(caller_group_enter(g), 0);
    caller_pending_t *slow = caller_call_soon(self, nap, P(10000));
    caller_pending_t *bad = caller_call_soon(self, nap, P(-10));
    /* The body is cancelled at its next suspension point. */
    CHECK_RC(caller_sleep(10), -ECANCELED);
    CHECK_EQ(caller_group_cancelled(g), 1);
    CHECK_RC(caller_group_exit(g), -ECANCELED);
    CHECK_CONTAINS(check_last_message(), "boom 10");
    CHECK_RC(caller_pending_result(bad, NULL), -EIO);
    CHECK_EQ(caller_pending_cancelled(slow), 1); /* the other was cancelled */
    CHECK_EQ(caller_pending_done(slow), 1);      /* and exit waited for it */
    caller_pending_unref(slow);
    caller_pending_unref(bad);
    caller_group_unref(g);
    return NULL;
}

TEST(one_failure_cancels_the_others_and_the_body)
{
    CHECK_RC(run_in_task(body_one_fails, NULL, NULL), 0);
}

typedef struct {
    caller_group_t *g;
    caller_pending_t *entered;
    int wait_rc, exit_rc;
    char exit_msg[256];
} remote_t;

static void *body_waits(void *arg)
{
    remote_t *r = arg;
    caller_group_t *g = r->g;
    CHECK_RC(caller_group_enter(g), 0);
    /* Untracked: exit would wait for it (and nobody completes it). */
    caller_pending_t *never = caller_pending_new(CALLER_PENDING_UNTRACKED);
    caller_pending_set_result(r->entered, NULL, 0);
    r->wait_rc = caller_pending_wait(never, 30, 0, NULL);
    r->exit_rc = caller_group_exit(g);
    snprintf(r->exit_msg, sizeof r->exit_msg, "%s", check_last_message());
    caller_pending_unref(never);
    return NULL;
}

TEST(cancel_from_another_thread_while_the_body_waits)
{
    caller_t *c = check_new_thread(NULL);
    remote_t r = {.g = caller_group_new(c, 0), .entered = caller_pending_new(0)};
    caller_pending_t *p = caller_call_soon(c, body_waits, &r);
    CHECK_RC(caller_pending_wait(r.entered, 10, 0, NULL), 0);
    CHECK_EQ(caller_group_cancel(r.g, "from outside"), 1);
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, NULL), 0);
    CHECK_RC(r.wait_rc, -ECANCELED);
    CHECK_RC(r.exit_rc, -ECANCELED);
    CHECK_CONTAINS(r.exit_msg, "from outside");
    caller_pending_unref(p);
    caller_pending_unref(r.entered);
    caller_group_unref(r.g);
    check_stop(c);
}

/* The body's own task is cancelled from outside while it waits in
 * caller_group_exit: the group cancels what it tracks, waits for it, and
 * exit reports -ECANCELED. */
typedef struct {
    caller_pending_t *exiting, *child;
    int exit_rc, child_cancelled;
} exit_cancel_t;

static void *body_exits_slowly(void *arg)
{
    exit_cancel_t *e = arg;
    caller_group_t *g = caller_group_new(NULL, 0);
    CHECK_RC(caller_group_enter(g), 0);
    e->child = caller_call_soon(caller_current(), nap, P(10000));
    CHECK(e->child != NULL);
    caller_pending_set_result(e->exiting, NULL, 0);
    e->exit_rc = caller_group_exit(g);
    e->child_cancelled = caller_pending_cancelled(e->child);
    caller_group_unref(g);
    return NULL;
}

TEST(exit_after_the_body_task_was_cancelled)
{
    caller_t *c = check_new_thread(NULL);
    exit_cancel_t e = {.exiting = caller_pending_new(0)};
    caller_pending_t *p = caller_call_soon(c, body_exits_slowly, &e);
    CHECK_RC(caller_pending_wait(e.exiting, 10, 0, NULL), 0);
    CHECK_EQ(caller_pending_cancel(p, "stop the body"), 1);
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_RC(e.exit_rc, -ECANCELED);
    CHECK_EQ(e.child_cancelled, 1);
    CHECK_EQ(caller_pending_done(e.child), 1);
    caller_pending_unref(e.child);
    caller_pending_unref(e.exiting);
    caller_pending_unref(p);
    check_stop(c);
}

static void *body_removes(void *arg)
{
    (void)arg;
    caller_group_t *g = caller_group_new(NULL, 0);
    CHECK_RC(caller_group_enter(g), 0);
    caller_pending_t *never = caller_pending_new(0);
    CHECK(tracked(g, never));
    CHECK_EQ(caller_group_remove(g, never), 1);
    CHECK_EQ(caller_group_remove(g, never), 0);
    CHECK(!tracked(g, never));
    CHECK_RC(caller_group_exit(g), 0); /* does not wait for it */
    CHECK_EQ(caller_pending_cancelled(never), 0);
    caller_pending_unref(never);
    caller_group_unref(g);
    return NULL;
}

TEST(remove_lets_the_group_exit_without_it)
{
    CHECK_RC(run_in_task(body_removes, NULL, NULL), 0);
}

typedef struct {
    bool shield;
    caller_pending_t *inside; /* set when the body is in its nap */
    int nap_rc, after_rc;
} shield_t;

static void *shielded_body(void *arg)
{
    shield_t *s = arg;
    caller_group_t *g = caller_group_new(NULL, (s->shield ? CALLER_GROUP_SHIELD : 0));
    CHECK_RC(caller_group_enter(g), 0);
    caller_pending_set_result(s->inside, NULL, 0);
    s->nap_rc = caller_sleep(0.05);
    caller_group_exit(g);
    caller_group_unref(g);
    s->after_rc = caller_sleep(0.001); /* outside the group: cancellation arrives */
    return NULL;
}

TEST(shield_keeps_outside_cancellation_from_the_body)
{
    for (int shield = 0; shield < 2; shield++) {
        caller_t *c = check_new_thread(NULL);
        shield_t s = {.shield = shield, .inside = caller_pending_new(0)};
        caller_pending_t *p = caller_call_soon(c, shielded_body, &s);
        CHECK_RC(caller_pending_wait(s.inside, 10, 0, NULL), 0);
        CHECK_EQ(caller_pending_cancel(p, "stop the task"), 1);
        CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_PROTECT, NULL), 0);
        CHECK_RC(s.nap_rc, shield ? 0 : -ECANCELED);
        CHECK_RC(s.after_rc, -ECANCELED);
        caller_pending_unref(p);
        caller_pending_unref(s.inside);
        check_stop(c);
    }
}

static void *nested_body(void *arg)
{
    int *out = arg;
    caller_group_t *outer = caller_group_new(NULL, 0);
    caller_group_t *inner = caller_group_new(NULL, 0);
    CHECK_RC(caller_group_enter(outer), 0);
    caller_pending_t *outer_task = caller_call_soon(caller_current(), nap, P(10000));
    CHECK_RC(caller_group_enter(inner), 0);
    caller_pending_t *inner_bad = caller_call_soon(caller_current(), nap, P(-5));
    CHECK(tracked(inner, inner_bad));
    CHECK(!tracked(outer, inner_bad)); /* the innermost group tracks */
    out[0] = caller_group_exit(inner); /* -ECANCELED: its task failed */
    /* The inner group, a Pending of the outer one, failed: the outer is
     * cancelled too. */
    out[1] = caller_sleep(10);
    out[2] = caller_group_exit(outer);
    out[3] = caller_pending_cancelled(outer_task);
    caller_pending_unref(outer_task);
    caller_pending_unref(inner_bad);
    caller_group_unref(inner);
    caller_group_unref(outer);
    return NULL;
}

static void *nested_ok_body(void *arg)
{
    (void)arg;
    caller_group_t *outer = caller_group_new(NULL, 0);
    caller_group_t *inner = caller_group_new(NULL, 0);
    CHECK_RC(caller_group_enter(outer), 0);
    CHECK_RC(caller_group_enter(inner), 0);
    caller_pending_t *p = caller_call_soon(caller_current(), nap, P(5));
    CHECK_RC(caller_group_exit(outer), CALLER_EINVALSTATE); /* inner first */
    CHECK_RC(caller_group_exit(inner), 0);
    CHECK_RC(caller_group_exit(outer), 0);
    caller_pending_unref(p);
    caller_group_unref(inner);
    caller_group_unref(outer);
    return NULL;
}

TEST(nested_groups)
{
    int out[4];
    CHECK_RC(run_in_task(nested_body, out, NULL), 0);
    CHECK_RC(out[0], -ECANCELED);
    CHECK_RC(out[1], -ECANCELED);
    CHECK_RC(out[2], -ECANCELED);
    CHECK_EQ(out[3], 1);
    CHECK_RC(run_in_task(nested_ok_body, NULL, NULL), 0);
}

static void *timeout_body(void *arg)
{
    double *elapsed = arg;
    caller_group_t *g = caller_group_new(NULL, 0);
    CHECK_RC(caller_group_set_timeout(g, 0.05), 0);
    double t0 = check_now();
    CHECK_RC(caller_group_enter(g), 0);
    CHECK_RC(caller_group_set_timeout(g, 1), CALLER_EINVALSTATE);
    caller_pending_t *p = caller_call_soon(caller_current(), nap, P(10000));
    CHECK_RC(caller_sleep(10), -ECANCELED);
    CHECK_RC(caller_group_exit(g), -ETIMEDOUT);
    CHECK_CONTAINS(check_last_message(), "timed out");
    *elapsed = check_now() - t0;
    CHECK_EQ(caller_pending_cancelled(p), 1);
    caller_pending_unref(p);
    caller_group_unref(g);
    return NULL;
}

TEST(group_timeout)
{
    double elapsed = 0;
    CHECK_RC(run_in_task(timeout_body, &elapsed, NULL), 0);
    CHECK_GE(elapsed * 1000, 50 - 1);
}

TEST(enter_outside_a_task_is_refused)
{
    caller_group_t *g = caller_group_new(NULL, 0);
    CHECK_RC(caller_group_enter(g), -EPERM);
    CHECK_RC(caller_group_exit(g), CALLER_EINVALSTATE);
    caller_group_unref(g);
    CHECK_RC(caller_group_enter(NULL), -EINVAL);
    CHECK_RC(caller_group_cancel(NULL, NULL), -EINVAL);
}

/* ---- PendingManager ------------------------------------------------------------ */

TEST(manager_activate_start_stop_deactivate)
{
    caller_manager_t *m = caller_manager_new();
    caller_manager_token_t tok;
    CHECK_RC(caller_manager_start(m, &tok), CALLER_EINVALSTATE); /* not active */
    CHECK_RC(caller_manager_activate(m), 0);
    CHECK_RC(caller_manager_activate(m), CALLER_EINVALSTATE);
    CHECK_RC(caller_manager_start(m, &tok), 0);
    caller_pending_t *a = caller_pending_new(0), *b = caller_pending_new(0);
    caller_pending_t *u = caller_pending_new(CALLER_PENDING_UNTRACKED);
    CHECK_RC(caller_manager_stop(m, &tok), 0);
    caller_pending_t *outside = caller_pending_new(0);
    CHECK_EQ(caller_manager_pending(m, NULL, 0), 2);
    /* Deactivating cancels them; they are still finishing until done. */
    CHECK_EQ(caller_manager_deactivate(m, CALLER_MANAGER_CANCEL_PENDING), 1);
    CHECK_EQ(caller_pending_cancelled(a), 1);
    CHECK_EQ(caller_pending_cancelled(b), 1);
    CHECK_EQ(caller_pending_cancelled(u), 0);
    CHECK_EQ(caller_pending_cancelled(outside), 0);
    CHECK_RC(caller_manager_wait(m, 0.01), -ETIMEDOUT);
    caller_pending_set_result(a, NULL, 0);
    caller_pending_set_result(b, NULL, 0);
    CHECK_RC(caller_manager_wait(m, 10), 0);
    CHECK_EQ(caller_manager_pending(m, NULL, 0), 0);

    /* Again, releasing instead of cancelling. */
    CHECK_RC(caller_manager_activate(m), 0);
    CHECK_RC(caller_manager_start(m, &tok), 0);
    caller_pending_t *c = caller_pending_new(0);
    CHECK_RC(caller_manager_stop(m, &tok), 0);
    CHECK_EQ(caller_manager_pending(m, NULL, 0), 1);
    CHECK_EQ(caller_manager_deactivate(m, 0), 0);
    CHECK_EQ(caller_pending_cancelled(c), 0);
    CHECK_EQ(caller_manager_pending(m, NULL, 0), 0);
    CHECK_RC(caller_manager_deactivate(m, 0), CALLER_EINVALSTATE);

    /* Deactivated with one finishing: activating waits for it to finish,
     * not for a caller_manager_wait() to have seen it. */
    CHECK_RC(caller_manager_activate(m), 0);
    CHECK_RC(caller_manager_start(m, &tok), 0);
    caller_pending_t *d = caller_pending_new(0);
    CHECK_RC(caller_manager_stop(m, &tok), 0);
    CHECK_EQ(caller_manager_deactivate(m, CALLER_MANAGER_CANCEL_PENDING), 1);
    CHECK_RC(caller_manager_activate(m), CALLER_EINVALSTATE); /* d still finishing */
    caller_pending_set_result(d, NULL, 0);
    CHECK_RC(caller_manager_activate(m), 0);
    CHECK_EQ(caller_manager_deactivate(m, 0), 0);
    caller_pending_unref(d);
    caller_pending_unref(a);
    caller_pending_unref(b);
    caller_pending_unref(c);
    caller_pending_unref(u);
    caller_pending_unref(outside);
    caller_manager_unref(m);
}

static void *made_in_task(void *arg)
{
    (void)arg;
    return caller_pending_new(0);
}

TEST(manager_follows_tasks_scheduled_in_its_context)
{
    caller_t *c = check_new_thread(NULL);
    caller_manager_t *m = caller_manager_new();
    caller_manager_token_t tok;
    caller_manager_activate(m);
    caller_manager_start(m, &tok);
    caller_pending_t *p = caller_call_soon(c, made_in_task, NULL);
    caller_manager_stop(m, &tok);
    void *made;
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, &made), 0);
    caller_pending_t *list[4];
    size_t n = caller_manager_pending(m, list, 4);
    CHECK_EQ(n, 1); /* p is done (released); the Pending its task made is not */
    CHECK_PTR_EQ(list[0], made);
    caller_pending_unref(list[0]);
    caller_manager_deactivate(m, CALLER_MANAGER_CANCEL_PENDING);
    caller_pending_set_result(made, NULL, 0);
    CHECK_RC(caller_manager_wait(m, 10), 0);
    caller_pending_unref(made);
    caller_pending_unref(p);
    caller_manager_unref(m);
    check_stop(c);
}

/* ---- cancel scopes ----------------------------------------------------------------- */

static void *scopes_body(void *arg)
{
    (void)arg;
    /* move on after */
    caller_scope_t *s = caller_scope_enter(0.02, 0);
    CHECK(s != NULL);
    double t0 = check_now();
    CHECK_RC(caller_sleep(10), -ECANCELED);
    CHECK_GE((check_now() - t0) * 1000, 20 - 1);
    CHECK_EQ(caller_scope_cancelled(s), 1);
    CHECK_RC(caller_scope_exit(s), 0);
    CHECK_RC(caller_sleep(0.001), 0); /* the task itself is fine */
    /* fail after */
    s = caller_scope_enter(0.01, CALLER_SCOPE_FAIL);
    CHECK_RC(caller_sleep(10), -ECANCELED);
    CHECK_RC(caller_scope_exit(s), -ETIMEDOUT);
    /* an explicit cancel */
    s = caller_scope_enter(-1, 0);
    caller_scope_cancel(s);
    CHECK_RC(caller_sleep(10), -ECANCELED);
    CHECK_RC(caller_scope_exit(s), 0);
    /* nesting order */
    caller_scope_t *a = caller_scope_enter(-1, 0), *b = caller_scope_enter(-1, 0);
    CHECK_RC(caller_scope_exit(a), -EINVAL);
    CHECK_RC(caller_scope_exit(b), 0);
    CHECK_RC(caller_scope_exit(a), 0);
    return NULL;
}

TEST(scopes_move_on_after_fail_after_and_cancel)
{
    CHECK_RC(run_in_task(scopes_body, NULL, NULL), 0);
    CHECK(caller_scope_enter(1, 0) == NULL);
    CHECK_RC(caller_last_error(NULL), -EPERM);
}

/* A scope handed to another thread outlives its exit: a cancel that comes
 * after caller_scope_exit() is safe and reaches nothing. */
static void *scope_exited_then_cancelled(void *arg)
{
    caller_scope_t **out = arg;
    caller_scope_t *s = caller_scope_enter(-1, 0);
    CHECK(s != NULL);
    *out = caller_scope_ref(s);
    CHECK_RC(caller_scope_exit(s), 0);
    return NULL;
}

TEST(scope_cancel_after_exit_is_safe_with_a_reference)
{
    caller_scope_t *s = NULL;
    CHECK_RC(run_in_task(scope_exited_then_cancelled, &s, NULL), 0);
    CHECK(s != NULL);
    CHECK_RC(caller_scope_cancel(s), 0); /* its task is gone (freed, under ASan) */
    CHECK_EQ(caller_scope_cancelled(s), 1);
    caller_scope_unref(s);
}

static void *scope_left_entered(void *arg)
{
    (void)arg;
    caller_scope_t *s = caller_scope_enter(10, 0);
    CHECK(s != NULL);
    return NULL; /* returns inside it: the task's end leaves it (no leak) */
}

TEST(task_ending_inside_a_scope_leaves_it)
{
    CHECK_RC(run_in_task(scope_left_entered, NULL, NULL), 0);
}

/* Scopes entered and exited by a task while another thread cancels them
 * at random moments, holding references: a cancel reaches a sleep inside
 * its scope, never the task after the exit, and never touches a freed one. */
static _Atomic(caller_scope_t *) scope_slot;
static atomic_bool scope_stress_done;

static void *scope_canceller(void *arg)
{
    (void)arg;
    unsigned seed = 99;
    while (!atomic_load(&scope_stress_done)) {
        caller_scope_t *s = atomic_exchange(&scope_slot, NULL);
        if (s) {
            for (unsigned spin = rand_r(&seed) % 2000; spin; spin--)
                __asm__ volatile("" ::: "memory");
            CHECK_RC(caller_scope_cancel(s), 0);
            caller_scope_unref(s);
        }
    }
    return NULL;
}

static void *scope_churn(void *arg)
{
    int *cancelled = arg;
    for (int i = 0; i < 20000; i++) {
        caller_scope_t *s = caller_scope_enter(-1, 0);
        CHECK(s != NULL);
        caller_scope_unref(atomic_exchange(&scope_slot, caller_scope_ref(s)));
        int rc = caller_sleep(0);
        CHECK(rc == 0 || rc == -ECANCELED);
        *cancelled += rc == -ECANCELED;
        CHECK_RC(caller_scope_exit(s), 0);
        CHECK_RC(caller_sleep(0), 0); /* outside it, nothing is cancelled */
    }
    return NULL;
}

TEST(stress_scope_cancel_racing_its_exit)
{
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, scope_canceller, NULL), 0);
    int cancelled = 0;
    CHECK_RC(run_in_task(scope_churn, &cancelled, NULL), 0);
    atomic_store(&scope_stress_done, true);
    pthread_join(t, NULL);
    caller_scope_unref(atomic_exchange(&scope_slot, NULL));
    printf("20000 scopes, %d cancelled while entered\n", cancelled);
}

typedef struct {
    caller_pending_t *inside;
    int cleanup_rc, after_rc;
} cleanup_t;

static void *shielded_cleanup(void *arg)
{
    cleanup_t *c = arg;
    caller_scope_t *s = caller_scope_enter(-1, CALLER_SCOPE_SHIELD);
    caller_pending_set_result(c->inside, NULL, 0);
    c->cleanup_rc = caller_sleep(0.05); /* must not be interrupted */
    caller_scope_exit(s);
    c->after_rc = caller_sleep(10);
    return NULL;
}

TEST(shielded_scope_finishes_its_cleanup)
{
    caller_t *c = check_new_thread(NULL);
    cleanup_t cl = {.inside = caller_pending_new(0)};
    caller_pending_t *p = caller_call_soon(c, shielded_cleanup, &cl);
    CHECK_RC(caller_pending_wait(cl.inside, 10, 0, NULL), 0);
    caller_pending_cancel(p, "now");
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_RC(cl.cleanup_rc, 0);
    CHECK_RC(cl.after_rc, -ECANCELED);
    caller_pending_unref(p);
    caller_pending_unref(cl.inside);
    check_stop(c);
}

/* ---- stress -------------------------------------------------------------------------- */

enum { STRESS_GROUPS = 100, STRESS_TASKS = 100, STRESS_CALLERS = 3 };

static caller_t *stress_callers[STRESS_CALLERS];
static atomic_int stress_exits_ok, stress_exits_cancelled, stress_failures_planned;

/* Task i of group g sleeps 0-2 ms; in every third group, task 50 fails. */
static bool stress_fails(intptr_t g, int i)
{
    return g % 3 == 0 && i == 50;
}

static void *stress_task(void *arg)
{
    intptr_t v = I(arg), g = v / STRESS_TASKS;
    int i = (int)(v % STRESS_TASKS);
    int rc = caller_sleep((double)((g + i) % 3) / 1000);
    if (rc < 0)
        return NULL;
    if (stress_fails(g, i))
        caller_raise(-EIO, "stress failure in group %ld", (long)g);
    return arg;
}

static void *stress_group(void *arg)
{
    intptr_t gi = I(arg);
    caller_group_t *g = caller_group_new(NULL, 0);
    CHECK_RC(caller_group_enter(g), 0);
    caller_pending_t *p[STRESS_TASKS];
    bool plans_failure = false;
    for (int i = 0; i < STRESS_TASKS; i++) {
        intptr_t v = gi * STRESS_TASKS + i;
        plans_failure |= stress_fails(gi, i);
        caller_t *target = stress_callers[(gi + i) % STRESS_CALLERS];
        p[i] = (i % 10 == 0) ? caller_to_thread(target, stress_task, P(v))
                             : caller_call_soon(target, stress_task, P(v));
        CHECK(p[i] != NULL);
    }
    int rc = caller_group_exit(g);
    if (plans_failure)
        atomic_fetch_add(&stress_failures_planned, 1);
    if (rc == 0) {
        CHECK(!plans_failure);
        atomic_fetch_add(&stress_exits_ok, 1);
    } else {
        CHECK_RC(rc, -ECANCELED);
        atomic_fetch_add(&stress_exits_cancelled, 1);
    }
    for (int i = 0; i < STRESS_TASKS; i++) {
        CHECK_EQ(caller_pending_done(p[i]), 1); /* every tracked Pending ended */
        caller_pending_unref(p[i]);
    }
    caller_group_unref(g);
    return NULL;
}

TEST(stress_100_groups_of_100_tasks_with_failures)
{
    for (int i = 0; i < STRESS_CALLERS; i++)
        stress_callers[i] = check_new_thread(NULL);
    atomic_store(&stress_exits_ok, 0);
    atomic_store(&stress_exits_cancelled, 0);
    atomic_store(&stress_failures_planned, 0);
    caller_pending_t *bodies[STRESS_GROUPS];
    for (int gi = 0; gi < STRESS_GROUPS; gi++)
        bodies[gi] = caller_call_soon(stress_callers[gi % STRESS_CALLERS], stress_group, P(gi));
    for (int gi = 0; gi < STRESS_GROUPS; gi++) {
        CHECK_RC(caller_pending_wait(bodies[gi], 60, CALLER_WAIT_RESULT, NULL), 0);
        caller_pending_unref(bodies[gi]);
    }
    int ok = atomic_load(&stress_exits_ok), cancelled = atomic_load(&stress_exits_cancelled);
    printf("groups: %d exited cleanly, %d cancelled (%d planned a failure)\n", ok, cancelled,
           atomic_load(&stress_failures_planned));
    CHECK_EQ(ok + cancelled, STRESS_GROUPS);
    CHECK_EQ(cancelled, atomic_load(&stress_failures_planned));
    CHECK_GE(cancelled, 1);
    CHECK_GE(ok, 1);
    for (int i = 0; i < STRESS_CALLERS; i++)
        check_stop(stress_callers[i]);
}

/* Regression: a wake that arrives while the task is already ready for a
 * cancel notice its shield keeps out must not be lost. */
typedef struct {
    caller_pending_t *inside, *target;
    int rc;
} late_wake_t;

static void *shielded_wait(void *arg)
{
    late_wake_t *w = arg;
    caller_scope_t *s = caller_scope_enter(-1, CALLER_SCOPE_SHIELD);
    caller_pending_set_result(w->inside, NULL, 0);
    w->rc = caller_pending_wait(w->target, 30, CALLER_WAIT_PROTECT, NULL);
    caller_scope_exit(s);
    return NULL;
}

typedef struct {
    caller_pending_t *blocked, *gate;
} hold_t;

/* A direct call that holds the loop until the gate opens. */
static void hold_loop(void *arg)
{
    hold_t *h = arg;
    caller_pending_set_result(h->blocked, NULL, 0);
    caller_pending_wait(h->gate, 30, CALLER_WAIT_PROTECT, NULL);
}

TEST(wake_during_a_shielded_cancel_notice_is_not_lost)
{
    caller_t *c = check_new_thread(NULL);
    late_wake_t w = {.inside = caller_pending_new(0),
                     .target = caller_pending_new(CALLER_PENDING_UNTRACKED),
                     .rc = 1};
    hold_t h = {caller_pending_new(0), caller_pending_new(0)};
    caller_pending_t *p = caller_call_soon(c, shielded_wait, &w);
    CHECK_RC(caller_pending_wait(w.inside, 10, 0, NULL), 0);
    /* The task is running now; this direct call runs after it suspended,
     * and holds the loop so both notices queue up: the cancel first, then
     * the wake. The loop then readies the task for the cancel and sees the
     * wake while it is ready. */
    CHECK_RC(caller_call_direct(c, hold_loop, &h), 0);
    CHECK_RC(caller_pending_wait(h.blocked, 10, 0, NULL), 0);
    caller_pending_cancel(p, "shielded away");
    caller_pending_set_result(w.target, NULL, 0);
    caller_pending_set_result(h.gate, NULL, 0);
    CHECK_RC(caller_pending_wait(p, 5, CALLER_WAIT_PROTECT, NULL), 0); /* not the 30 s */
    CHECK_RC(w.rc, 0);
    caller_pending_unref(p);
    caller_pending_unref(h.blocked);
    caller_pending_unref(h.gate);
    caller_pending_unref(w.inside);
    caller_pending_unref(w.target);
    check_stop(c);
}

static void *queue_item_makes(void *arg)
{
    caller_pending_t **out = arg;
    *out = caller_pending_new(0); /* left unfinished for the body to see */
    return NULL;
}

static void *body_queue(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    caller_group_t *g = caller_group_new(self, 0);
    CHECK_RC(caller_group_enter(g), 0);
    caller_pending_t *made = NULL;
    caller_pending_t *q = caller_queue_call(self, queue_item_makes, &made);
    CHECK(tracked(g, q)); /* the queue's Pending, until its round ends */
    CHECK_RC(caller_pending_wait(q, 10, 0, NULL), 0); /* the round */
    CHECK(made != NULL);
    CHECK(tracked(g, made)); /* the item ran in the group's context */
    caller_pending_set_result(made, NULL, 0);
    CHECK_RC(caller_group_exit(g), 0);
    CHECK_EQ(caller_group_pending(g, NULL, 0), 0);
    caller_queue_close(self, queue_item_makes);
    caller_pending_unref(made);
    caller_pending_unref(q);
    caller_group_unref(g);
    return NULL;
}

TEST(queue_call_carries_the_context)
{
    CHECK_RC(run_in_task(body_queue, NULL, NULL), 0);
}

/* Regression (found by the fuzzer): a call refused because its Caller is
 * stopping was still tracked by the group of its context and never ended,
 * so the group's exit waited forever. */
static void *refused_inside_group(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    caller_group_t *g = caller_group_new(self, CALLER_GROUP_SHIELD); /* shielded */
    CHECK_RC(caller_group_enter(g), 0);
    caller_stop(self, CALLER_STOP_FORCE); /* our own Caller begins to stop */
    CHECK(caller_call_soon(self, ret_arg, NULL) == NULL);
    CHECK_RC(caller_last_error(NULL), -ESHUTDOWN);
    CHECK_EQ(caller_group_pending(g, NULL, 0), 0); /* nothing left to wait for */
    int rc = caller_group_exit(g);
    caller_group_unref(g);
    return P(rc);
}

TEST(a_refused_call_does_not_keep_its_group_waiting)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *p = caller_call_soon(c, refused_inside_group, NULL);
    void *rc = P(1);
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &rc), 0);
    CHECK_RC((int)I(rc), 0);
    caller_pending_unref(p);
    CHECK_RC(caller_wait_stopped(c, 10), 0);
    caller_unref(c);
}
