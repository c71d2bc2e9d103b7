/* Callers, tasks, scheduling and stopping (SPEC §1–§5, §11, §12; issue #3). */
// ALSO-UCONTEXT
// TIMEOUT: 120
#include "check.h"
#include "fiber.h"
#include "internal.h"

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>
#include <uv.h>

/* Wait for a Pending and return its result, checking success. */
static void *await(caller_pending_t *p)
{
    void *v = NULL;
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, &v), 0);
    return v;
}

static void *ret_arg(void *arg)
{
    return arg;
}

static void *fail_with_eio(void *arg)
{
    caller_raise(-EIO, "failed with %d", (int)I(arg));
    return NULL;
}

/* ---- manual Callers ------------------------------------------------------ */

static void *body_schedules(void *arg)
{
    caller_t *self = caller_current();
    CHECK(self != NULL);
    CHECK_EQ(caller_state(self), CALLER_STATE_RUNNING);
    caller_options_t o = {.name = "kid"};
    caller_t *kid = caller_get(self, &o);
    CHECK(kid != NULL);
    CHECK_EQ(caller_children(self, NULL, 0), 1);
    caller_unref(kid); /* the parent keeps it, and stops it with itself */
    caller_pending_t *p = caller_call_soon(self, ret_arg, P(41));
    CHECK(p != NULL);
    void *v = await(p);
    caller_pending_unref(p);
    return P(I(v) + I(arg));
}

TEST(manual_runs_body_then_is_stopped)
{
    caller_t *c = caller_create(CALLER_MANUAL, NULL);
    CHECK(c != NULL);
    CHECK_PTR_EQ(caller_current(), c);
    CHECK_EQ(caller_state(c), CALLER_STATE_INITIAL);
    void *result = NULL;
    CHECK_RC(caller_run(c, body_schedules, P(1), &result), 0);
    CHECK_EQ(I(result), 42);
    CHECK_EQ(caller_state(c), CALLER_STATE_STOPPED);
    CHECK_EQ(caller_children(c, NULL, 0), 0);
    CHECK_PTR_EQ(caller_current(), NULL);
    CHECK_RC(caller_wait_stopped(c, 0), 0);
    caller_unref(c);
}

/* Calls scheduled before caller_run are kept: they run once the body
 * suspends; if the body returns first, the Caller stops and they end
 * cancelled without running. */
static void *body_yields(void *arg)
{
    if (arg)
        CHECK_RC(caller_sleep(0), 0);
    return NULL;
}

TEST(manual_calls_before_the_run)
{
    for (int yields = 0; yields < 2; yields++) {
        caller_t *c = caller_create(CALLER_MANUAL, NULL);
        CHECK(c != NULL);
        caller_pending_t *early = caller_call_soon(c, ret_arg, P(7));
        CHECK(early != NULL);
        CHECK_RC(caller_run(c, body_yields, yields ? P(1) : NULL, NULL), 0);
        CHECK_EQ(caller_pending_done(early), 1);
        void *v = NULL;
        if (yields) {
            CHECK_RC(caller_pending_result(early, &v), 0);
            CHECK_EQ(I(v), 7);
        } else {
            CHECK_RC(caller_pending_result(early, &v), -ECANCELED);
        }
        caller_pending_unref(early);
        caller_unref(c);
    }
}

/* A task whose Pending was cancelled while it ran: its return value is
 * dropped, as the header says, and the task can see it was cancelled. */
typedef struct {
    caller_pending_t *started, *go_on;
    int saw_cancel;
} late_t;

static void *returns_after_cancel(void *arg)
{
    late_t *l = arg;
    caller_pending_set_result(l->started, NULL, 0);
    caller_scope_t *shield = caller_scope_enter(CALLER_FOREVER, CALLER_SCOPE_SHIELD);
    CHECK_RC(caller_pending_wait(l->go_on, 10, CALLER_WAIT_PROTECT, NULL), 0);
    caller_scope_exit(shield);
    l->saw_cancel = caller_pending_cancelled(caller_current_pending());
    return P(99);
}

TEST(value_returned_after_cancel_is_dropped)
{
    caller_t *c = check_new_thread(NULL);
    late_t l = {.started = caller_pending_new(0), .go_on = caller_pending_new(0)};
    caller_pending_t *p = caller_call_soon(c, returns_after_cancel, &l);
    CHECK_RC(caller_pending_wait(l.started, 10, CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_EQ(caller_pending_cancel(p, "late"), 1);
    CHECK_RC(caller_pending_set_result(l.go_on, NULL, 0), 0);
    void *v = P(1);
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v), -ECANCELED);
    CHECK_PTR_EQ(v, NULL);
    CHECK_EQ(l.saw_cancel, 1);
    caller_pending_unref(p);
    caller_pending_unref(l.started);
    caller_pending_unref(l.go_on);
    check_stop(c);
}

TEST(manual_when_one_exists_fails)
{
    caller_t *c = caller_create(CALLER_MANUAL, NULL);
    CHECK(c != NULL);
    CHECK(caller_create(CALLER_MANUAL, NULL) == NULL);
    CHECK_RC(caller_last_error(NULL), -EEXIST);
    CHECK_CONTAINS(check_last_message(), "An instance already exists for thread");
    CHECK_EQ(caller_stop(c, 0), CALLER_STATE_STOPPED); /* never ran */
    caller_unref(c);
    /* Once stopped, the thread may have a new one. */
    c = caller_create(CALLER_MANUAL, NULL);
    CHECK(c != NULL);
    caller_stop(c, CALLER_STOP_FORCE);
    caller_unref(c);
}

static atomic_int counter;

static void *bump(void *arg)
{
    atomic_fetch_add(&counter, 1);
    return arg;
}

static void *body_waits_for(void *arg)
{
    return await(arg);
}

TEST(call_soon_before_run_is_kept)
{
    atomic_store(&counter, 0);
    caller_t *c = caller_create(CALLER_MANUAL, NULL);
    caller_pending_t *early = caller_call_soon(c, bump, P(7));
    CHECK(early != NULL);
    CHECK_EQ(caller_pending_done(early), 0);
    void *r;
    CHECK_RC(caller_run(c, body_waits_for, early, &r), 0);
    CHECK_EQ(I(r), 7);
    CHECK_EQ(atomic_load(&counter), 1);
    caller_pending_unref(early);
    caller_unref(c);
}

TEST(body_error_is_run_result)
{
    caller_t *c = caller_create(CALLER_MANUAL, NULL);
    CHECK_RC(caller_run(c, fail_with_eio, P(3), NULL), -EIO);
    CHECK_STR_EQ(check_last_message(), "failed with 3");
    caller_unref(c);
}

static void *body_runs_again(void *arg)
{
    caller_t *c = arg;
    CHECK_RC(caller_run(c, ret_arg, NULL, NULL), -EBUSY);
    CHECK_CONTAINS(check_last_message(), "Already starting/running");
    return NULL;
}

TEST(enter_running_or_stopped_fails)
{
    caller_t *c = caller_create(CALLER_MANUAL, NULL);
    CHECK_RC(caller_run(c, body_runs_again, c, NULL), 0);
    CHECK_RC(caller_run(c, ret_arg, NULL, NULL), -EPERM);
    CHECK_CONTAINS(check_last_message(), "Restarting is not allowed");
    caller_unref(c);
}

/* ---- finding Callers ------------------------------------------------------ */

static void *who_am_i(void *arg)
{
    (void)arg;
    return caller_current();
}

static void *current_from_plain_thread(void *arg)
{
    (void)arg;
    return caller_current();
}

TEST(caller_found_from_its_thread)
{
    caller_t *c = check_new_thread("finder");
    caller_pending_t *p = caller_call_soon(c, who_am_i, NULL);
    CHECK_PTR_EQ(await(p), c);
    caller_pending_unref(p);
    caller_t *f = caller_for_thread(caller_thread(c));
    CHECK_PTR_EQ(f, c);
    caller_unref(f);
    CHECK(!pthread_equal(caller_thread(c), pthread_self()));
    pthread_t t;
    void *seen = (void *)1;
    pthread_create(&t, NULL, current_from_plain_thread, NULL);
    pthread_join(t, &seen);
    CHECK_PTR_EQ(seen, NULL);
    CHECK_PTR_EQ(caller_current(), NULL); /* the main thread has none */
    caller_t *all[8];
    size_t n = caller_all(CALLER_ALL_RUNNING, all, 8);
    CHECK_EQ(n, 1);
    CHECK_PTR_EQ(all[0], c);
    caller_unref(all[0]);
    check_stop(c);
    CHECK_EQ(caller_all(0, NULL, 0), 0);
}

TEST(new_thread_from_plain_main_with_blocking_wait)
{
    caller_t *c = check_new_thread(NULL);
    CHECK_STR_EQ(caller_name(c), "caller-worker");
    CHECK_STR_EQ(caller_backend(c), check_backend());
    CHECK_EQ(caller_running(c), 1);
    caller_pending_t *p = caller_call_soon(c, ret_arg, P(5));
    CHECK_EQ(I(await(p)), 5);
    caller_pending_unref(p);
    p = caller_call_soon(c, fail_with_eio, P(9));
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, NULL), -EIO);
    CHECK_STR_EQ(check_last_message(), "failed with 9");
    caller_pending_unref(p);
    check_stop(c);
}

TEST(current_thread_needs_a_loop)
{
    CHECK(caller_create(CALLER_CURRENT_THREAD, NULL) == NULL);
    CHECK_RC(caller_last_error(NULL), -ENOENT);
    CHECK_CONTAINS(check_last_message(), "no event loop in this thread");
    CHECK(caller_create(CALLER_MAIN_THREAD, NULL) == NULL);
    CHECK_RC(caller_last_error(NULL), -ENOENT);
}

static void *stop_self(void *arg)
{
    (void)arg;
    CHECK_EQ(caller_stop(caller_current(), 0), CALLER_STATE_STOPPING);
    return P(1);
}

TEST(libuv_current_thread_attaches_to_application_loop)
{
    uv_loop_t loop;
    CHECK_EQ(uv_loop_init(&loop), 0);
    caller_options_t o = {.loop = &loop, .name = "app"};
    caller_t *c = caller_create(CALLER_CURRENT_THREAD, &o);
    CHECK(c != NULL);
    CHECK_EQ(caller_state(c), CALLER_STATE_RUNNING);
    CHECK_PTR_EQ(caller_loop(c), &loop);
    caller_t *again = caller_create(CALLER_CURRENT_THREAD, NULL);
    CHECK_PTR_EQ(again, c);
    caller_unref(again);
    caller_pending_t *p = caller_call_soon(c, stop_self, NULL);
    /* The application runs its loop; it returns once the Caller stopped. */
    CHECK_EQ(uv_run(&loop, UV_RUN_DEFAULT), 0);
    CHECK_EQ(caller_state(c), CALLER_STATE_STOPPED);
    void *v;
    CHECK_RC(caller_pending_result(p, &v), 0);
    CHECK_EQ(I(v), 1);
    caller_pending_unref(p);
    CHECK_EQ(uv_loop_close(&loop), 0);
    caller_unref(c);
}

static void *main_caller_from_worker(void *arg)
{
    caller_t *m = caller_create(CALLER_MAIN_THREAD, NULL);
    CHECK_PTR_EQ(m, arg);
    caller_unref(m);
    return NULL;
}

static void *body_asks_worker_for_main(void *arg)
{
    (void)arg;
    caller_t *w = check_new_thread("asker");
    caller_pending_t *p = caller_call_soon(w, main_caller_from_worker, caller_current());
    await(p);
    caller_pending_unref(p);
    check_stop(w);
    return NULL;
}

TEST(main_thread_caller_found_from_another_thread)
{
    caller_t *c = caller_create(CALLER_MANUAL, NULL);
    CHECK_RC(caller_run(c, body_asks_worker_for_main, NULL, NULL), 0);
    caller_unref(c);
}

/* ---- errors of creation --------------------------------------------------- */

TEST(name_and_backend_mismatch)
{
    caller_options_t named = {.name = "Shell"};
    caller_t *c = caller_create(CALLER_MANUAL, &named);
    CHECK_STR_EQ(caller_name(c), "Shell");
    caller_options_t other = {.name = "Other"};
    CHECK(caller_create(CALLER_CURRENT_THREAD, &other) == NULL);
    CHECK_RC(caller_last_error(NULL), -EINVAL);
    CHECK_CONTAINS(check_last_message(), "The thread and caller's name do not match!");
    /* Another backend than the thread's Caller has (a name this build
     * does not have is no match either). */
    const char *other_backend = check_other_backend() ? check_other_backend() : "glib";
    caller_options_t glib = {.backend = other_backend};
    CHECK(caller_create(CALLER_CURRENT_THREAD, &glib) == NULL);
    CHECK_CONTAINS(check_last_message(), "The backend does not match!");
    caller_t *same = caller_create(CALLER_CURRENT_THREAD, &named);
    CHECK_PTR_EQ(same, c);
    caller_unref(same);
    /* An unknown backend for a new Caller. */
    caller_options_t gtk = {.backend = "gtk"};
    CHECK(caller_create(CALLER_NEW_THREAD, &gtk) == NULL);
    CHECK_RC(caller_last_error(NULL), -EINVAL);
    CHECK_CONTAINS(check_last_message(), "unknown backend 'gtk'");
    caller_stop(c, CALLER_STOP_FORCE);
    caller_unref(c);
}

TEST(get_named_child_or_create)
{
    caller_t *parent = check_new_thread("parent");
    caller_options_t o = {.name = "ControlThread"};
    caller_t *a = caller_get(parent, &o);
    CHECK(a != NULL);
    caller_t *b = caller_get(parent, &o);
    CHECK_PTR_EQ(a, b);
    caller_unref(b);
    caller_t *pa = caller_parent(a);
    CHECK_PTR_EQ(pa, parent);
    caller_unref(pa);
    const char *other = check_other_backend() ? check_other_backend() : "glib";
    caller_options_t glib = {.name = "ControlThread", .backend = other};
    CHECK(caller_get(parent, &glib) == NULL);
    CHECK_RC(caller_last_error(NULL), -EINVAL);
    CHECK_CONTAINS(check_last_message(), "Backend mismatch!");
    caller_t *u1 = caller_get(parent, NULL), *u2 = caller_get(parent, NULL);
    CHECK(u1 && u2 && u1 != u2);
    CHECK_EQ(caller_children(parent, NULL, 0), 3);
    char text[128];
    caller_repr(parent, text, sizeof text);
    char want[128];
    snprintf(want, sizeof want, "Caller<parent %s \U0001f3c3 running 3 children>", check_backend());
    CHECK_STR_EQ(text, want);
    /* Stopping the parent stops every child first. */
    caller_stop(parent, 0);
    CHECK_RC(caller_wait_stopped(parent, 10), 0);
    CHECK_EQ(caller_state(a), CALLER_STATE_STOPPED);
    CHECK_EQ(caller_state(u1), CALLER_STATE_STOPPED);
    CHECK_EQ(caller_state(u2), CALLER_STATE_STOPPED);
    CHECK_EQ(caller_children(parent, NULL, 0), 0);
    CHECK(caller_get(parent, &o) == NULL);
    CHECK_RC(caller_last_error(NULL), -ESHUTDOWN);
    caller_unref(a);
    caller_unref(u1);
    caller_unref(u2);
    caller_unref(parent);
}

/* ---- scheduling ---------------------------------------------------------------- */

typedef struct {
    double submitted, ran;
} timing_t;

static void *record_time(void *arg)
{
    ((timing_t *)arg)->ran = check_now();
    return NULL;
}

TEST(call_later_not_before_its_delay)
{
    caller_t *c = check_new_thread(NULL);
    timing_t t[3];
    double delays[3] = {0.05, 0.0, 0.02};
    caller_pending_t *p[3];
    for (int i = 0; i < 3; i++) {
        t[i].submitted = check_now();
        p[i] = caller_call_later(c, delays[i], record_time, &t[i]);
        CHECK(p[i] != NULL);
    }
    for (int i = 0; i < 3; i++) {
        await(p[i]);
        caller_pending_unref(p[i]);
        CHECK_GE((t[i].ran - t[i].submitted) * 1e3, delays[i] * 1e3);
    }
    CHECK(t[1].ran <= t[2].ran && t[2].ran <= t[0].ran); /* in deadline order */
    check_stop(c);
}

typedef struct {
    int seq[64];
    int n;
} order_t;

typedef struct {
    order_t *o;
    int i;
} order_arg_t;

static void *append_order(void *arg)
{
    order_arg_t *a = arg;
    a->o->seq[a->o->n++] = a->i;
    return NULL;
}

TEST(call_soon_runs_in_submission_order)
{
    caller_t *c = check_new_thread(NULL);
    order_t o = {0};
    order_arg_t args[64];
    caller_pending_t *p[64];
    for (int i = 0; i < 64; i++) {
        args[i] = (order_arg_t){&o, i};
        p[i] = caller_call_soon(c, append_order, &args[i]);
    }
    for (int i = 0; i < 64; i++) {
        await(p[i]);
        caller_pending_unref(p[i]);
    }
    CHECK_EQ(o.n, 64);
    for (int i = 0; i < 64; i++)
        CHECK_EQ(o.seq[i], i);
    check_stop(c);
}

typedef struct {
    char messages[4][256];
    int levels[4];
    atomic_int n;
} log_capture_t;

static void capture_log(void *arg, int level, const char *message)
{
    log_capture_t *lc = arg;
    int i = atomic_load(&lc->n);
    if (i < 4) {
        snprintf(lc->messages[i], sizeof lc->messages[i], "%s", message);
        lc->levels[i] = level;
        atomic_store(&lc->n, i + 1);
    }
}

static void direct_fails(void *arg)
{
    (void)arg;
    CHECK_PTR_EQ(caller_current_pending(), NULL); /* not a task */
    caller_raise(-EIO, "direct call broke");
}

static void direct_sets(void *arg)
{
    caller_pending_set_result(arg, P(1), 0);
}

TEST(call_direct_failure_is_logged_and_loop_goes_on)
{
    log_capture_t lc = {0};
    caller_options_t o = {.log = capture_log, .log_arg = &lc};
    caller_t *c = caller_create(CALLER_NEW_THREAD, &o);
    caller_pending_t *done = caller_pending_new(0);
    CHECK_RC(caller_call_direct(c, direct_fails, NULL), 0);
    CHECK_RC(caller_call_direct(c, direct_sets, done), 0);
    CHECK_EQ(I(await(done)), 1);
    CHECK_EQ(atomic_load(&lc.n), 1);
    CHECK_EQ(lc.levels[0], CALLER_LOG_ERROR);
    CHECK_CONTAINS(lc.messages[0], "failed");
    CHECK_CONTAINS(lc.messages[0], "direct call broke");
    caller_pending_unref(done);
    CHECK_RC(caller_raise(-EIO, "not in a task"), -EPERM);
    check_stop(c);
}

/* ---- waiting from everywhere ----------------------------------------------------------- */

static void *wait_on_same_caller(void *arg)
{
    caller_t *self = caller_current();
    caller_pending_t *ok = caller_call_soon(self, ret_arg, arg);
    caller_pending_t *bad = caller_call_soon(self, fail_with_eio, P(2));
    void *v = NULL;
    CHECK_RC(caller_pending_wait(ok, 10, CALLER_WAIT_RESULT, &v), 0);
    CHECK_RC(caller_pending_wait(bad, 10, CALLER_WAIT_RESULT, NULL), -EIO);
    CHECK_STR_EQ(check_last_message(), "failed with 2");
    caller_pending_unref(ok);
    caller_pending_unref(bad);
    return v;
}

static void *wait_on_other_caller(void *arg)
{
    caller_t *other = arg;
    caller_pending_t *ok = caller_call_soon(other, ret_arg, P(8));
    caller_pending_t *bad = caller_call_soon(other, fail_with_eio, P(4));
    void *v = NULL;
    CHECK_RC(caller_pending_wait(ok, 10, CALLER_WAIT_RESULT, &v), 0);
    CHECK_RC(caller_pending_wait(bad, 10, CALLER_WAIT_RESULT, NULL), -EIO);
    CHECK_STR_EQ(check_last_message(), "failed with 4");
    caller_pending_unref(ok);
    caller_pending_unref(bad);
    return v;
}

TEST(wait_result_and_error_from_thread_task_and_other_caller)
{
    caller_t *a = check_new_thread("a"), *b = check_new_thread("b");
    caller_pending_t *p = caller_call_soon(a, wait_on_same_caller, P(6));
    CHECK_EQ(I(await(p)), 6);
    caller_pending_unref(p);
    p = caller_call_soon(a, wait_on_other_caller, b);
    CHECK_EQ(I(await(p)), 8);
    caller_pending_unref(p);
    check_stop(a);
    check_stop(b);
}

static void *own_pending(void *arg)
{
    (void)arg;
    caller_pending_t *me = caller_current_pending();
    CHECK(me != NULL);
    CHECK_RC(caller_pending_wait(me, 1, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, NULL), -EDEADLK);
    return me;
}

TEST(current_pending_is_the_tasks_own)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *p = caller_call_soon(c, own_pending, NULL);
    CHECK_PTR_EQ(await(p), p);
    caller_pending_unref(p);
    CHECK_PTR_EQ(caller_current_pending(), NULL);
    check_stop(c);
}

static void direct_blocks_on_own_task(void *arg)
{
    caller_pending_t **out = arg;
    caller_t *self = caller_current();
    caller_pending_t *p = caller_call_soon(self, ret_arg, NULL);
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, NULL), -EDEADLK);
    CHECK_CONTAINS(check_last_message(), "would never end");
    CHECK_RC(caller_wait_stopped(self, 1), -EDEADLK);
    caller_pending_unref(p);
    caller_pending_set_result(out[0], NULL, 0);
}

TEST(blocking_on_own_thread_is_deadlock_error)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *done = caller_pending_new(0);
    caller_pending_t *box[1] = {done};
    CHECK_RC(caller_call_direct(c, direct_blocks_on_own_task, box), 0);
    await(done);
    caller_pending_unref(done);
    check_stop(c);
}

/* ---- cancellation ------------------------------------------------------------------- */

typedef struct {
    atomic_int rc;
    atomic_int started;
    caller_pending_t *gate; /* set once the task is about to suspend */
} sleeper_t;

static void *sleep_forever(void *arg)
{
    sleeper_t *s = arg;
    atomic_store(&s->started, 1);
    if (s->gate)
        caller_pending_set_result(s->gate, NULL, 0);
    atomic_store(&s->rc, caller_sleep(1e6));
    return NULL;
}

static void *body_leaves_a_sleeper(void *arg)
{
    caller_pending_t **out = arg;
    sleeper_t *s = caller_pending_userdata(*out);
    *out = caller_call_soon(caller_current(), sleep_forever, s);
    CHECK_RC(caller_sleep(0.01), 0); /* let it start */
    return NULL;
}

TEST(sleeping_task_cancelled_when_body_returns)
{
    sleeper_t s = {.rc = 1};
    caller_pending_t *holder = caller_pending_new(0);
    caller_pending_set_userdata(holder, &s, NULL);
    caller_pending_t *box = holder;
    caller_t *c = caller_create(CALLER_MANUAL, NULL);
    CHECK_RC(caller_run(c, body_leaves_a_sleeper, &box, NULL), 0);
    CHECK_EQ(atomic_load(&s.started), 1);
    CHECK_RC(atomic_load(&s.rc), -ECANCELED); /* seen inside the task */
    CHECK_EQ(caller_pending_cancelled(box), 1);
    CHECK_EQ(caller_pending_done(box), 1);
    caller_pending_unref(box);
    caller_pending_unref(holder);
    caller_unref(c);
}

TEST(stop_then_scheduling_fails)
{
    caller_t *c = check_new_thread("stopper");
    CHECK_EQ(caller_stop(c, 0), CALLER_STATE_STOPPING);
    CHECK(caller_call_soon(c, ret_arg, NULL) == NULL);
    CHECK_RC(caller_last_error(NULL), -ESHUTDOWN);
    char want[64];
    snprintf(want, sizeof want, "Caller<stopper %s", check_backend());
    CHECK_CONTAINS(check_last_message(), want);
    CHECK_CONTAINS(check_last_message(), "is stopped!");
    CHECK_RC(caller_wait_stopped(c, 10), 0);
    CHECK(caller_call_later(c, 1, ret_arg, NULL) == NULL);
    CHECK_RC(caller_call_direct(c, direct_fails, NULL), -ESHUTDOWN);
    /* Stopping again changes nothing. */
    CHECK_EQ(caller_stop(c, 0), CALLER_STATE_STOPPED);
    CHECK_EQ(caller_stop(c, CALLER_STOP_FORCE), CALLER_STATE_STOPPED);
    caller_unref(c);
}

static void *stop_own_caller(void *arg)
{
    (void)arg;
    caller_stop(caller_current(), 0);
    /* This task is cancelled at its next suspension point. */
    return P(caller_sleep(10));
}

TEST(stop_from_own_task)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *p = caller_call_soon(c, stop_own_caller, NULL);
    CHECK_RC(caller_wait_stopped(c, 10), 0);
    CHECK_RC(caller_pending_result(p, NULL), -ECANCELED);
    caller_pending_unref(p);
    caller_unref(c);
}

TEST(protected_ignores_stop_unless_forced)
{
    caller_options_t o = {.protect = true, .name = "guarded"};
    caller_t *c = caller_create(CALLER_NEW_THREAD, &o);
    CHECK_EQ(caller_protected(c), 1);
    CHECK_EQ(caller_stop(c, 0), CALLER_STATE_RUNNING);
    CHECK_RC(caller_wait_stopped(c, 0.02), -ETIMEDOUT);
    CHECK_EQ(caller_stop(c, CALLER_STOP_FORCE), CALLER_STATE_STOPPING);
    CHECK_RC(caller_wait_stopped(c, 10), 0);
    caller_unref(c);
    /* A protected manual Caller stops when its run ends. */
    c = caller_create(CALLER_MANUAL, &o);
    CHECK_RC(caller_run(c, ret_arg, NULL, NULL), 0);
    CHECK_EQ(caller_state(c), CALLER_STATE_STOPPED);
    caller_unref(c);
}

TEST(call_later_waiting_at_stop_ends_cancelled)
{
    caller_t *c = check_new_thread(NULL);
    atomic_store(&counter, 0);
    caller_pending_t *p = caller_call_later(c, 30, bump, NULL);
    double t0 = check_now();
    check_stop(c);
    CHECK_LT(check_now() - t0, 20); /* did not wait for the delay */
    CHECK_EQ(caller_pending_done(p), 1);
    CHECK_EQ(caller_pending_cancelled(p), 1);
    CHECK_RC(caller_pending_result(p, NULL), -ECANCELED);
    CHECK_EQ(atomic_load(&counter), 0);
    caller_pending_unref(p);
}

TEST(cancelled_before_start_never_runs)
{
    caller_t *c = caller_create(CALLER_MANUAL, NULL);
    atomic_store(&counter, 0);
    caller_pending_t *p = caller_call_soon(c, bump, NULL);
    CHECK_EQ(caller_pending_cancel(p, "not wanted"), 1);
    CHECK_RC(caller_run(c, ret_arg, NULL, NULL), 0);
    CHECK_EQ(atomic_load(&counter), 0);
    char buf[128];
    CHECK_RC(caller_pending_exception(p, buf, sizeof buf), -ECANCELED);
    CHECK_STR_EQ(buf, "not wanted");
    caller_pending_unref(p);
    caller_unref(c);
    /* A delayed call cancelled early ends at once, not at its deadline. */
    c = check_new_thread(NULL);
    p = caller_call_later(c, 60, bump, NULL);
    caller_pending_cancel(p, NULL);
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_EQ(atomic_load(&counter), 0);
    caller_pending_unref(p);
    check_stop(c);
}

static void *cancel_from_same_thread(void *arg)
{
    caller_pending_t *victim = arg;
    caller_pending_cancel(victim, "m1");
    caller_pending_cancel(victim, "m2");
    return NULL;
}

static atomic_int hold_started, hold_release;

/* Block the Caller's thread (no suspension) until hold_release is set. */
static void *hold_thread(void *arg)
{
    (void)arg;
    atomic_store(&hold_started, 1);
    while (!atomic_load(&hold_release))
        sched_yield();
    atomic_store(&hold_started, 0);
    return NULL;
}

static void check_cancelled_sleeper(caller_pending_t *p, sleeper_t *s)
{
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_RC(atomic_load(&s->rc), -ECANCELED);
    CHECK_RC(caller_pending_result(p, NULL), -ECANCELED);
    CHECK_STR_EQ(check_last_message(), "m1\nm2");
}

TEST(cancel_suspended_task_from_same_and_other_thread)
{
    caller_t *c = check_new_thread(NULL);
    for (int from_same = 0; from_same < 2; from_same++) {
        sleeper_t s = {.rc = 1, .gate = caller_pending_new(0)};
        caller_pending_t *p = caller_call_soon(c, sleep_forever, &s);
        await(s.gate);
        if (from_same) {
            caller_pending_t *k = caller_call_soon(c, cancel_from_same_thread, p);
            await(k);
            caller_pending_unref(k);
        } else {
            /* Keep the Caller's thread busy while both cancels are made:
             * otherwise the first may resume the task and end it before
             * the second arrives, which then finds it done and adds
             * nothing. */
            atomic_store(&hold_release, 0);
            caller_pending_t *h = caller_call_soon(c, hold_thread, NULL);
            while (!atomic_load(&hold_started))
                sched_yield();
            CHECK_EQ(caller_pending_cancel(p, "m1"), 1);
            CHECK_EQ(caller_pending_cancel(p, "m2"), 1);
            atomic_store(&hold_release, 1);
            await(h);
            caller_pending_unref(h);
        }
        check_cancelled_sleeper(p, &s);
        caller_pending_unref(p);
        caller_pending_unref(s.gate);
    }
    check_stop(c);
}

typedef struct {
    caller_pending_t *target;
    int rc;
} waiter_t;

static void *wait_with_timeout(void *arg)
{
    waiter_t *w = arg;
    w->rc = caller_pending_wait(w->target, 0.05, CALLER_WAIT_RESULT, NULL);
    return NULL;
}

TEST(waiter_timeout_cancels_awaited_task)
{
    caller_t *c = check_new_thread(NULL);
    sleeper_t s = {.rc = 1, .gate = caller_pending_new(0)};
    caller_pending_t *victim = caller_call_soon(c, sleep_forever, &s);
    await(s.gate);
    waiter_t w = {.target = victim};
    caller_pending_t *p = caller_call_soon(c, wait_with_timeout, &w);
    await(p);
    CHECK_RC(w.rc, -ETIMEDOUT);
    CHECK_RC(caller_pending_wait(victim, 10, CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_RC(atomic_load(&s.rc), -ECANCELED);
    CHECK_EQ(caller_pending_cancelled(victim), 1);
    caller_pending_unref(p);
    caller_pending_unref(victim);
    caller_pending_unref(s.gate);
    check_stop(c);
}

static void *timeout_becomes_error(void *arg)
{
    caller_pending_t *never = arg;
    int rc = caller_pending_wait(never, 0.02, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, NULL);
    if (rc < 0)
        caller_raise(rc, "gave up waiting");
    return NULL;
}

TEST(timeout_inside_task_is_its_error)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *never = caller_pending_new(0);
    caller_pending_t *p = caller_call_soon(c, timeout_becomes_error, never);
    CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, NULL), -ETIMEDOUT);
    CHECK_STR_EQ(check_last_message(), "gave up waiting");
    CHECK_EQ(caller_pending_cancelled(never), 0); /* protect */
    caller_pending_unref(p);
    caller_pending_unref(never);
    check_stop(c);
}

/* ---- many tasks -------------------------------------------------------------------------- */

static void *wait_gate(void *arg)
{
    void *v;
    CHECK_RC(caller_pending_wait(arg, 60, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v), 0);
    return v;
}

TEST(ten_thousand_suspended_tasks_complete)
{
    enum { N = 10000 };
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *gate = caller_pending_new(0);
    caller_pending_t **p = malloc(N * sizeof *p);
    for (int i = 0; i < N; i++)
        p[i] = caller_call_soon(c, wait_gate, gate);
    caller_pending_set_result(gate, P(3), 0);
    for (int i = 0; i < N; i++) {
        CHECK_EQ(I(await(p[i])), 3);
        caller_pending_unref(p[i]);
    }
    free(p);
    caller_pending_unref(gate);
    check_stop(c);
}

enum { STRESS_THREADS = 4, STRESS_N = 250000 };

typedef struct {
    caller_t *c;
    int id;
    int last_seen[STRESS_THREADS]; /* only touched in the Caller's thread */
    long ran;
    caller_pending_t *last;
} stress_t;

static stress_t stress_shared;

static void *stress_item(void *arg)
{
    intptr_t v = I(arg);
    int thread = (int)(v / STRESS_N), seq = (int)(v % STRESS_N);
    CHECK_EQ(stress_shared.last_seen[thread] + 1, seq); /* per-thread order */
    stress_shared.last_seen[thread] = seq;
    stress_shared.ran++;
    return NULL;
}

static void *stress_producer(void *arg)
{
    intptr_t id = I(arg);
    caller_pending_t *last = NULL;
    for (int i = 0; i < STRESS_N; i++) {
        caller_pending_t *p = caller_call_soon(stress_shared.c, stress_item, P(id * STRESS_N + i));
        CHECK(p != NULL);
        if (i == STRESS_N - 1)
            last = p;
        else
            caller_pending_unref(p);
    }
    return last;
}

TEST(stress_four_threads_submit_250k_each)
{
    caller_t *c = check_new_thread("stress");
    memset(&stress_shared, 0, sizeof stress_shared);
    stress_shared.c = c;
    for (int i = 0; i < STRESS_THREADS; i++)
        stress_shared.last_seen[i] = -1;
    pthread_t t[STRESS_THREADS];
    for (intptr_t i = 0; i < STRESS_THREADS; i++)
        pthread_create(&t[i], NULL, stress_producer, P(i));
    for (int i = 0; i < STRESS_THREADS; i++) {
        void *last;
        pthread_join(t[i], &last);
        CHECK_RC(caller_pending_wait(last, 60, 0, NULL), 0);
        caller_pending_unref(last);
    }
    /* Read the counters in the Caller's thread, where they live. */
    caller_pending_t *p = caller_call_soon(c, ret_arg, NULL);
    await(p);
    caller_pending_unref(p);
    CHECK_EQ(stress_shared.ran, (long)STRESS_THREADS * STRESS_N);
    for (int i = 0; i < STRESS_THREADS; i++)
        CHECK_EQ(stress_shared.last_seen[i], STRESS_N - 1);
    check_stop(c);
}

/* ---- stacks ------------------------------------------------------------------------------- */

/* Unbounded on purpose: it must end in the guard page. */
static volatile int recurse_forever = 1;

static int recurse(int depth)
{
    volatile char frame[1024];
    frame[0] = (char)depth;
    if (!recurse_forever)
        return 0;
    return frame[0] + recurse(depth + 1) + frame[1023];
}

static void *overflow(void *arg)
{
    (void)arg;
    return P(recurse(0));
}

TEST(stack_overflow_in_task_hits_guard_page)
{
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        freopen("/dev/null", "w", stderr); /* ASan's own report, if any */
        caller_t *c = caller_create(CALLER_NEW_THREAD, NULL);
        caller_pending_t *p = caller_call_soon(c, overflow, NULL);
        caller_pending_wait(p, 30, CALLER_WAIT_PROTECT, NULL);
        _exit(0); /* not reached */
    }
    int status;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFSIGNALED(status) || (WIFEXITED(status) && WEXITSTATUS(status) != 0));
#if !defined(__SANITIZE_ADDRESS__)
    CHECK(WIFSIGNALED(status));
    CHECK_EQ(WTERMSIG(status), SIGSEGV);
#endif
}

/* ---- introspection ------------------------------------------------------------------------- */

TEST(repr_and_table)
{
    caller_options_t o = {.name = "Shell", .protect = true};
    caller_t *c = caller_create(CALLER_MANUAL, &o);
    char text[128], want[128];
    const char *be = check_backend();
    caller_repr(c, text, sizeof text);
    snprintf(want, sizeof want, "Caller<Shell %s \u2757 not running>", be);
    CHECK_STR_EQ(text, want);
    caller_t *w = check_new_thread("Control");
    caller_repr(w, text, sizeof text);
    snprintf(want, sizeof want, "Caller<Control %s \U0001f3c3 running>", be);
    CHECK_STR_EQ(text, want);
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    CHECK_RC(caller_print_table(f, 0), 0);
    fclose(f);
    CHECK_CONTAINS(buf, "Name");
    CHECK_CONTAINS(buf, "Protected");
    CHECK_CONTAINS(buf, "Shell");
    CHECK_CONTAINS(buf, "\U0001f510");
    CHECK_CONTAINS(buf, "Control");
    CHECK_CONTAINS(buf, "\u2713");
    /* "← current" on this thread's row only. */
    char *cur = strstr(buf, "\u2190 current");
    CHECK(cur != NULL);
    char *row = cur;
    while (row > buf && row[-1] != '\n')
        row--;
    CHECK(strncmp(row, "Shell", 5) == 0);
    CHECK(strstr(cur + 1, "\u2190 current") == NULL);
    printf("%s", buf);
    free(buf);
    /* A Pending's text names its function and Caller. */
    caller_pending_t *p = caller_call_soon(w, ret_arg, NULL);
    await(p);
    caller_pending_repr(p, text, sizeof text);
    snprintf(want, sizeof want, "| ret_arg caller=Caller<Control %s", be);
    CHECK_CONTAINS(text, want);
    caller_pending_unref(p);
    check_stop(w);
    caller_stop(c, CALLER_STOP_FORCE);
    caller_repr(c, text, sizeof text);
    snprintf(want, sizeof want, "Caller<Shell %s \U0001f3c1 stopped>", be);
    CHECK_STR_EQ(text, want);
    caller_unref(c);
}

static void *thread_id(void *arg)
{
    (void)arg;
    return (void *)(intptr_t)syscall(SYS_gettid);
}

/* A task's Pending holds no reference on its Caller while the task lives
 * (the Caller's running reference covers it) and takes one at the task's
 * end only if it is still held: a Pending kept past its Caller still shows
 * it (ASan would see a freed Caller), and Pendings released before their
 * task ended keep nothing alive (the leak check). */
TEST(task_pending_outlives_its_caller)
{
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.name = "Gone"});
    CHECK(c != NULL);
    caller_pending_t *kept = caller_call_soon(c, ret_arg, NULL);
    CHECK(kept != NULL);
    caller_pending_t *tid = caller_call_soon(c, thread_id, NULL);
    char task_dir[64];
    snprintf(task_dir, sizeof task_dir, "/proc/self/task/%ld", (long)(intptr_t)await(tid));
    caller_pending_unref(tid);
    for (int i = 0; i < 1000; i++) {
        caller_pending_t *p = caller_call_soon(c, ret_arg, NULL);
        CHECK(p != NULL);
        caller_pending_unref(p);
    }
    caller_pending_t *last = caller_call_soon(c, ret_arg, NULL);
    await(last);
    caller_pending_unref(last);
    await(kept);
    caller_stop(c, 0);
    CHECK_RC(caller_wait_stopped(c, 10), 0);
    caller_unref(c);
    /* Its thread drops its reference as it ends: wait for that. */
    double until = check_now() + 10 * check_time_scale();
    while (access(task_dir, F_OK) == 0 && check_now() < until) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    CHECK(access(task_dir, F_OK) != 0);
    char text[256];
    caller_pending_repr(kept, text, sizeof text);
    char want[64];
    snprintf(want, sizeof want, "| ret_arg caller=Caller<Gone %s", check_backend());
    CHECK_CONTAINS(text, want);
    caller_pending_unref(kept); /* the last reference on the Caller, or its
                                   thread's, which goes as the thread ends */
    until = check_now() + 10 * check_time_scale();
    while (caller_live_count() && check_now() < until) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    CHECK_EQ(caller_live_count(), 0);
}

TEST(null_arguments)
{
    CHECK(caller_call_soon(NULL, ret_arg, NULL) == NULL);
    CHECK_RC(caller_last_error(NULL), -EINVAL);
    CHECK(caller_call_later(NULL, 1, ret_arg, NULL) == NULL);
    CHECK_RC(caller_call_direct(NULL, direct_fails, NULL), -EINVAL);
    CHECK_RC(caller_stop(NULL, 0), -EINVAL);
    CHECK_RC(caller_wait_stopped(NULL, 0), -EINVAL);
    CHECK_RC(caller_run(NULL, ret_arg, NULL, NULL), -EINVAL);
    CHECK(caller_get(NULL, NULL) == NULL);
    CHECK_RC(caller_state(NULL), -EINVAL);
    CHECK_RC(caller_running(NULL), -EINVAL);
    CHECK_RC(caller_protected(NULL), -EINVAL);
    CHECK_RC(caller_repr(NULL, NULL, 0), -EINVAL);
    CHECK_RC(caller_print_table(NULL, 0), -EINVAL);
    CHECK(caller_name(NULL) == NULL);
    CHECK(caller_parent(NULL) == NULL);
    CHECK_EQ(caller_children(NULL, NULL, 0), 0);
    CHECK_RC(caller_sleep(-1), -EINVAL);
    caller_t *c = check_new_thread(NULL);
    CHECK(caller_call_soon(c, NULL, NULL) == NULL);
    CHECK_RC(caller_last_error(NULL), -EINVAL);
    CHECK_RC(caller_call_direct(c, NULL, NULL), -EINVAL);
    check_stop(c);
    caller_unref(NULL);
    CHECK(caller_create((caller_mode_t)99, NULL) == NULL);
}

TEST(sleep_on_plain_thread_blocks)
{
    double t0 = check_now();
    CHECK_RC(caller_sleep(0.02), 0);
    CHECK_GE((check_now() - t0) * 1e3, 20);
}

/* Uses the fiber layer's report of which switch this build has. */
TEST(fiber_implementation_is_the_one_built)
{
    /* The ucontext variant of this test links the ucontext build; the
     * other, the assembly switch where there is one. */
#if defined(CALLER_FIBER_UCONTEXT) && CALLER_FIBER_UCONTEXT
    const char *want = "ucontext";
#elif defined(__LP64__) && defined(__x86_64__)
    const char *want = "asm (x86_64)";
#elif defined(__LP64__) && defined(__aarch64__)
    const char *want = "asm (aarch64)";
#else
    const char *want = "ucontext";
#endif
    CHECK_STR_EQ(caller__fiber_impl(), want);
}

/* ---- more ---------------------------------------------------------------------------------- */

static void block_on(void *arg)
{
    /* Blocks the loop (a direct call is not a task) until the gate opens. */
    CHECK_RC(caller_pending_wait(arg, 10, CALLER_WAIT_PROTECT, NULL), 0);
}

static void *wait_forever_on(void *arg)
{
    caller_pending_t *target = caller_pending_userdata(caller_current_pending());
    bool protect = arg != NULL;
    return P(caller_pending_wait(target, CALLER_FOREVER,
                                 (protect ? CALLER_WAIT_PROTECT : 0) | CALLER_WAIT_RESULT, NULL));
}

TEST(cancelled_waiter_cancels_awaited_unless_protect)
{
    caller_t *c = check_new_thread(NULL);
    for (int protect = 0; protect < 2; protect++) {
        caller_pending_t *target = caller_pending_new(0);
        caller_pending_t *gate = caller_pending_new(0);
        /* The waiter finds its target through its own userdata, set before
         * it can run: the Caller is blocked on `gate` until then. */
        CHECK_RC(caller_call_direct(c, block_on, gate), 0);
        caller_pending_t *w = caller_call_soon(c, wait_forever_on, protect ? P(1) : NULL);
        caller_pending_set_userdata(w, target, NULL);
        caller_pending_set_result(gate, NULL, 0);
        /* Let it suspend on the target, then cancel the waiter. */
        caller_pending_t *probe = caller_call_soon(c, ret_arg, NULL);
        await(probe);
        caller_pending_unref(probe);
        CHECK_EQ(caller_pending_cancel(w, "stop waiting"), 1);
        CHECK_RC(caller_pending_wait(w, 10, CALLER_WAIT_PROTECT, NULL), 0);
        void *v;
        CHECK_RC(caller_pending_result(w, &v), -ECANCELED);
        CHECK_EQ(caller_pending_cancelled(target), protect ? 0 : 1);
        if (!protect) {
            CHECK_RC(caller_pending_result(target, NULL), -ECANCELED);
            CHECK_CONTAINS(check_last_message(), "Cancelled due to cancellation or timeout");
        }
        caller_pending_unref(w);
        caller_pending_unref(gate);
        caller_pending_unref(target);
    }
    check_stop(c);
}

TEST(a_burst_of_submissions_costs_one_wake_up)
{
    enum { N = 1000 };
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *gate = caller_pending_new(0);
    CHECK_RC(caller_call_direct(c, block_on, gate), 0);
    /* The loop is inside block_on, or about to be: wait until the inbox is
     * empty again, i.e. the loop took the direct call. */
    for (;;) {
        caller__inbox_lock(&c->inbox);
        bool empty = c->inbox.q.head == NULL;
        caller__inbox_unlock(&c->inbox);
        if (empty)
            break;
        sched_yield();
    }
    caller__inbox_lock(&c->inbox);
    uint64_t before = c->inbox.wakes;
    caller__inbox_unlock(&c->inbox);
    caller_pending_t *p[N];
    for (int i = 0; i < N; i++)
        p[i] = caller_call_soon(c, ret_arg, P(i));
    caller__inbox_lock(&c->inbox);
    uint64_t after = c->inbox.wakes;
    caller__inbox_unlock(&c->inbox);
    CHECK_EQ(after - before, 1);
    caller_pending_set_result(gate, NULL, 0);
    for (int i = 0; i < N; i++) {
        CHECK_EQ(I(await(p[i])), i);
        caller_pending_unref(p[i]);
    }
    caller_pending_unref(gate);
    check_stop(c);
}

static void on_uv_timer(uv_timer_t *t)
{
    caller_pending_set_result(t->data, P(99), 0);
}

static void on_uv_close(uv_handle_t *h)
{
    caller_pending_set_result(h->data, NULL, 0);
}

static void *use_the_loop(void *arg)
{
    (void)arg;
    /* Application libuv I/O on the Caller's own loop, awaited from a task. */
    uv_loop_t *loop = caller_loop(caller_current());
    CHECK(loop != NULL);
    caller_pending_t *fired = caller_pending_new(0), *closed = caller_pending_new(0);
    uv_timer_t timer;
    CHECK_EQ(uv_timer_init(loop, &timer), 0);
    timer.data = fired;
    CHECK_EQ(uv_timer_start(&timer, on_uv_timer, 10, 0), 0);
    void *v = NULL;
    CHECK_RC(caller_pending_wait(fired, 10, CALLER_WAIT_RESULT, &v), 0);
    timer.data = closed;
    uv_close((uv_handle_t *)&timer, on_uv_close);
    CHECK_RC(caller_pending_wait(closed, 10, CALLER_WAIT_RESULT, NULL), 0);
    caller_pending_unref(fired);
    caller_pending_unref(closed);
    return v;
}

TEST(libuv_io_in_a_callers_thread)
{
    caller_t *c = check_new_thread(NULL);
    CHECK(caller_loop(c) != NULL);
    caller_pending_t *p = caller_call_soon(c, use_the_loop, NULL);
    CHECK_EQ(I(await(p)), 99);
    caller_pending_unref(p);
    caller_stop(c, 0);
    CHECK_RC(caller_wait_stopped(c, 10), 0);
    CHECK(caller_loop(c) == NULL);
    caller_unref(c);
}

/* ---- fork ---------------------------------------------------------------------------------- */

static void *double_it(void *arg)
{
    return P(I(arg) * 2);
}

TEST(fork_child_starts_with_no_callers_and_may_make_its_own)
{
    caller_t *parent_c = check_new_thread("parent-side");
    caller_pending_t *p = caller_call_soon(parent_c, double_it, P(4));
    CHECK_EQ(I(await(p)), 8);
    caller_pending_unref(p);
    pid_t pid = fork(); /* from this plain thread */
    CHECK(pid >= 0);
    if (pid == 0) {
        int bad = 0;
        bad |= caller_all(0, NULL, 0) != 0; /* the parent's are not here */
        bad |= caller_current() != NULL;
        bad |= caller_pending_live_count() != 0; /* counts from zero */
        caller_t *mine = caller_create(CALLER_NEW_THREAD, NULL);
        bad |= mine == NULL;
        if (mine) {
            caller_pending_t *q = caller_call_soon(mine, double_it, P(21));
            void *v = NULL;
            bad |= caller_pending_wait(q, 10, CALLER_WAIT_RESULT, &v) != 0 || I(v) != 42;
            caller_pending_unref(q);
            caller_stop(mine, 0);
            bad |= caller_wait_stopped(mine, 10) != 0;
            caller_unref(mine);
        }
        _exit(bad ? 1 : 0);
    }
    int status;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(WIFEXITED(status));
    CHECK_EQ(WEXITSTATUS(status), 0);
    /* The parent's Caller is untouched. */
    p = caller_call_soon(parent_c, double_it, P(5));
    CHECK_EQ(I(await(p)), 10);
    caller_pending_unref(p);
    check_stop(parent_c);
}

/* ---- the naming macros ------------------------------------------------------------ */

static caller_fn counted_fn(int *count)
{
    (*count)++;
    return double_it;
}

TEST(naming_macros_evaluate_fn_once_and_named_variants_label)
{
    caller_t *c = check_new_thread("naming");
    int count = 0;
    caller_pending_t *p = caller_call_soon(c, counted_fn(&count), P(2));
    CHECK_EQ(count, 1);
    CHECK_EQ(I(await(p)), 4);
    caller_pending_unref(p);
    p = caller_call_later(c, 0, counted_fn(&count), P(3));
    CHECK_EQ(count, 2);
    CHECK_EQ(I(await(p)), 6);
    caller_pending_unref(p);
    p = caller_to_thread(c, counted_fn(&count), P(4));
    CHECK_EQ(count, 3);
    CHECK_EQ(I(await(p)), 8);
    caller_pending_unref(p);
    /* The _named functions: a label of the caller's choosing. */
    char text[256];
    p = caller_call_soon_named(c, double_it, P(5), "my-label");
    CHECK(caller_pending_repr(p, text, sizeof text) > 0);
    CHECK_CONTAINS(text, "my-label");
    CHECK_EQ(I(await(p)), 10);
    caller_pending_unref(p);
    p = caller_queue_call(c, counted_fn(&count), P(7));
    CHECK_EQ(count, 4);
    CHECK(p != NULL);
    caller_pending_unref(p);
    p = caller_queue_call_key(c, &count, counted_fn(&count), P(8));
    CHECK_EQ(count, 5);
    CHECK(p != NULL);
    caller_pending_unref(p);
    p = caller_queue_call_key_named(c, text, double_it, P(9), "queue-label");
    CHECK(caller_pending_repr(p, text, sizeof text) > 0);
    CHECK_CONTAINS(text, "queue-label");
    caller_pending_unref(p);
    p = caller_to_thread_named(c, double_it, P(6), "worker-label");
    CHECK(caller_pending_repr(p, text, sizeof text) > 0);
    CHECK_CONTAINS(text, "worker-label");
    CHECK_EQ(I(await(p)), 12);
    caller_pending_unref(p);
    check_stop(c);
}

/* ---- a task's stack overflow says which task ---------------------------- */

/* In a child process, in both stack modes: a task that recurses without
 * end dies of SIGSEGV after "libcaller: stack overflow in task <its name> on Caller '<name>'"
 * on stderr. (The sanitizers report such faults themselves: there the
 * library installs no handler, and this case checks nothing.) */
TEST(stack_overflow_names_the_task_and_caller)
{
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
    puts("skipped: the sanitizer reports the fault");
#else
    for (unsigned mode = CALLER_STACK_OWN; mode <= CALLER_STACK_COPY; mode++) {
        int fds[2];
        CHECK_EQ(pipe(fds), 0);
        fflush(NULL);
        pid_t pid = fork();
        CHECK(pid >= 0);
        if (pid == 0) {
            dup2(fds[1], STDERR_FILENO);
            close(fds[0]);
            caller_t *c = caller_create(
                CALLER_NEW_THREAD, &(caller_options_t){.name = "overflower", .stack_mode = mode});
            if (!c)
                _exit(2);
            caller_pending_t *p = caller_call_soon_named(c, overflow, NULL, "deep_recursion");
            if (!p)
                _exit(3);
            caller_pending_wait(p, 30, CALLER_WAIT_PROTECT, NULL);
            _exit(4); /* not reached: the process dies first */
        }
        close(fds[1]);
        char out[1024] = {0};
        size_t n = 0;
        ssize_t r;
        while (n + 1 < sizeof out && (r = read(fds[0], out + n, sizeof out - 1 - n)) > 0)
            n += (size_t)r;
        close(fds[0]);
        int status = 0;
        CHECK_EQ(waitpid(pid, &status, 0), pid);
        if (!WIFSIGNALED(status))
            fprintf(stderr, "child exited with %d: %s\n", WEXITSTATUS(status), out);
        CHECK(WIFSIGNALED(status));
        CHECK_EQ(WTERMSIG(status), SIGSEGV);
        CHECK_CONTAINS(out,
                       "libcaller: stack overflow in task deep_recursion on Caller 'overflower'");
    }
#endif
}

/* A task: read its own Caller's counters into @p arg (on the loop thread,
 * so they are exact at that point). */
static void *read_stats(void *arg)
{
    CHECK_RC(caller_stats(caller_current(), arg), 0);
    return NULL;
}

static void *stats_gate(void *arg)
{
    CHECK_RC(caller_pending_wait(arg, 30 * check_time_scale(), 0, NULL), 0);
    return NULL;
}

/* A pool call: say it started (first semaphore), then block the worker's
 * thread until released (second). */
static void *block_worker(void *arg)
{
    sem_t *s = arg;
    sem_post(&s[0]);
    check_sem_wait(&s[1]);
    return NULL;
}

TEST(stats_count_tasks_inbox_and_pool)
{
    caller_t *c = check_new_thread("stats");
    caller_stats_t s;
    memset(&s, 0xff, sizeof s);
    CHECK_RC(caller_stats(c, &s), 0);
    CHECK_EQ(s.tasks_started, 0);
    CHECK_EQ(s.tasks_finished, 0);
    CHECK_EQ(s.tasks_live, 0);
    CHECK_EQ(s.workers, 0);
    CHECK_EQ(s.reserved[6], 0);
    /* Five suspended, one delayed (never due). */
    caller_pending_t *gate = caller_pending_new(0);
    caller_pending_t *w[5];
    for (int i = 0; i < 5; i++)
        CHECK((w[i] = caller_call_soon(c, stats_gate, gate)) != NULL);
    caller_stats_t never;
    caller_pending_t *late = caller_call_later(c, 3600, read_stats, &never);
    CHECK(late != NULL);
    check_until_suspended(c); /* a task that ran and ended after them */
    caller_stats_t in;
    check_await(caller_call_soon(c, read_stats, &in), 10);
    CHECK_EQ(in.tasks_started, 7); /* 5 + that task + read_stats itself */
    CHECK_EQ(in.tasks_finished, 1);
    CHECK_EQ(in.tasks_live, 7); /* 5 suspended, the delayed one, read_stats */
    CHECK_EQ(in.tasks_suspended, 5);
    CHECK_EQ(in.inbox, 0);
    CHECK_RC(caller_pending_set_result(gate, NULL, 0), 0);
    for (int i = 0; i < 5; i++)
        check_await(w[i], 10);
    caller_pending_cancel(late, NULL);
    CHECK_RC(caller_pending_wait(late, 10 * check_time_scale(), 0, NULL), 0);
    caller_pending_unref(late);
    check_await(caller_call_soon(c, read_stats, &in), 10);
    CHECK_EQ(in.tasks_started, 8); /* the cancelled delayed call never started */
    CHECK_EQ(in.tasks_finished, 7);
    CHECK_EQ(in.tasks_live, 1);
    CHECK_EQ(in.tasks_suspended, 0);

    /* The pool: one worker at most; one call running, one waiting. */
    caller_pool_config_t cfg;
    CHECK_RC(caller_pool_get_config(c, &cfg), 0);
    cfg.max_workers = 1;
    CHECK_RC(caller_pool_set_config(c, &cfg), 0);
    sem_t sem[2];
    sem_init(&sem[0], 0, 0);
    sem_init(&sem[1], 0, 0);
    caller_pending_t *a = caller_to_thread(c, block_worker, sem);
    caller_pending_t *b = caller_to_thread(c, block_worker, sem);
    CHECK(a && b);
    check_sem_wait(&sem[0]); /* a runs */
    CHECK_RC(caller_stats(c, &s), 0);
    CHECK_EQ(s.workers, 1);
    CHECK_EQ(s.workers_idle, 0);
    CHECK_EQ(s.pool_queued, 1);
    /* The table shows them. */
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);
    CHECK_RC(caller_print_table(f, CALLER_TABLE_STATS), 0);
    fclose(f);
    CHECK_CONTAINS(buf, "Suspended");
    CHECK_CONTAINS(buf, "Wake-ups");
    char *row = strstr(buf, "\nstats ");
    CHECK(row != NULL);
    CHECK_CONTAINS(row, " 1 (0) ");
    free(buf);
    sem_post(&sem[1]);
    check_sem_wait(&sem[0]); /* b runs */
    sem_post(&sem[1]);
    check_await(a, 10);
    check_await(b, 10);
    CHECK_RC(caller_stats(c, &s), 0);
    CHECK_EQ(s.workers, 1);
    CHECK_EQ(s.workers_idle, 1); /* idle before its last call's waiters woke */
    CHECK_EQ(s.pool_queued, 0);
    sem_destroy(&sem[0]);
    sem_destroy(&sem[1]);
    caller_pending_unref(gate);

    /* Calls to a manual Caller before it runs wait in its inbox; nothing
     * had to be woken. */
    caller_t *m = caller_create(CALLER_MANUAL, &(caller_options_t){.name = "unrun"});
    caller_pending_t *q[3];
    for (int i = 0; i < 3; i++)
        CHECK((q[i] = caller_call_soon(m, read_stats, &never)) != NULL);
    CHECK_RC(caller_stats(m, &s), 0);
    CHECK_EQ(s.inbox, 3);
    CHECK_EQ(s.wakeups, 0);
    CHECK_EQ(s.tasks_live, 0);
    caller_stop(m, 0);
    for (int i = 0; i < 3; i++) {
        CHECK_RC(caller_pending_wait(q[i], 10 * check_time_scale(), CALLER_WAIT_RESULT, NULL),
                 -ECANCELED);
        caller_pending_unref(q[i]);
    }
    CHECK_RC(caller_stats(m, &s), 0);
    CHECK_EQ(s.inbox, 0);
    caller_unref(m);
    CHECK_RC(caller_stats(NULL, &s), -EINVAL);
    CHECK_RC(caller_stats(c, NULL), -EINVAL);
    check_stop(c);
}

static void *set_flag(void *arg)
{
    *(int *)arg = 1;
    return NULL;
}

/* In a task, a wait with timeout 0 only checks: it returns -ETIMEDOUT (and
 * cancels the Pending, unprotected) without giving the thread to the task
 * scheduled before it. */
static void *wait_zero(void *arg)
{
    int ran = 0;
    caller_pending_t *other = caller_call_soon(caller_current(), set_flag, &ran);
    CHECK(other != NULL);
    caller_pending_t *p = arg;
    CHECK_RC(caller_pending_wait(p, 0, CALLER_WAIT_PROTECT, NULL), -ETIMEDOUT);
    CHECK_EQ(ran, 0); /* not suspended: `other` has not run */
    CHECK_EQ(caller_pending_cancelled(p), 0);
    CHECK_RC(caller_pending_wait(p, 0, 0, NULL), -ETIMEDOUT);
    CHECK_EQ(ran, 0);
    CHECK_EQ(caller_pending_cancelled(p), 1);             /* a timeout cancels unprotected */
    CHECK_RC(caller_pending_wait(other, 10, 0, NULL), 0); /* now it suspends */
    CHECK_EQ(ran, 1);
    caller_pending_unref(other);
    return NULL;
}

TEST(wait_with_timeout_zero_in_a_task_does_not_suspend)
{
    caller_t *c = check_new_thread("zero");
    caller_pending_t *p = caller_pending_new(0);
    check_await(caller_call_soon(c, wait_zero, p), 10);
    caller_pending_unref(p);
    check_stop(c);
}

/* ---- waits that find their Pending done ------------------------------------ */

typedef struct {
    caller_pending_t *done; /* a Pending already done */
    double timeout;         /* of each wait */
    double until;           /* stop waiting then (check_now) */
    atomic_bool flag;       /* set by another task, or a timer */
    long waits;
} busy_waits_t;

/* Waits on the done Pending over and over, until the flag is set (1) or
 * the time is up (0). */
static void *wait_on_done_until_flag(void *arg)
{
    busy_waits_t *b = arg;
    while (!atomic_load(&b->flag)) {
        CHECK_RC(caller_pending_wait(b->done, b->timeout, CALLER_WAIT_PROTECT, NULL), 0);
        b->waits++;
        if (check_now() > b->until)
            return P(0);
    }
    return P(1);
}

static void *raise_flag(void *arg)
{
    atomic_store(&((busy_waits_t *)arg)->flag, true);
    return NULL;
}

/* A task whose waits never need to wait still lets its loop turn: the
 * task queued after it runs, and so does a timer that falls due. Before,
 * both waited until the busy task gave up, 20 s later. */
TEST(waits_on_done_pendings_let_the_loop_turn)
{
    caller_t *c = check_new_thread("turns");
    for (int timer = 0; timer < 2; timer++) {
        busy_waits_t b = {.done = caller_pending_new(0), .timeout = CALLER_FOREVER};
        CHECK_RC(caller_pending_set_result(b.done, NULL, 0), 0);
        b.until = check_now() + 20 * check_time_scale();
        caller_pending_t *busy = caller_call_soon(c, wait_on_done_until_flag, &b);
        caller_pending_t *other = timer ? caller_call_later(c, 0.001, raise_flag, &b)
                                        : caller_call_soon(c, raise_flag, &b);
        CHECK_PTR_EQ(check_await(busy, 60), P(1)); /* ended by the flag */
        CHECK(b.waits > 0);
        check_await(other, 10);
        caller_pending_unref(b.done);
    }
    check_stop(c);
}

/* A wait with a timeout of 0 only checks, so it is no suspension point
 * even when the task has held the loop for long: the task queued after
 * the busy one does not run before the busy one returns. */
TEST(waits_with_timeout_zero_on_done_pendings_never_give_the_loop_a_turn)
{
    caller_t *c = check_new_thread("checks");
    busy_waits_t b = {.done = caller_pending_new(0), .timeout = 0};
    CHECK_RC(caller_pending_set_result(b.done, NULL, 0), 0);
    b.until = check_now() + 0.05; /* well past a turn's share of the loop */
    caller_pending_t *busy = caller_call_soon(c, wait_on_done_until_flag, &b);
    caller_pending_t *other = caller_call_soon(c, raise_flag, &b);
    CHECK_PTR_EQ(check_await(busy, 60), P(0)); /* the flag never came */
    CHECK(b.waits > 0);
    check_await(other, 10);
    CHECK(atomic_load(&b.flag));
    caller_pending_unref(b.done);
    check_stop(c);
}

/* ---- one round of ready tasks (they share a fiber: sched.c) --------------- */

enum { ROUND = 200 };

typedef struct {
    int order[ROUND]; /* indices in the order the tasks began */
    int n;
    int resumed; /* kind 2 tasks that came back from their wait */
    int ran_cancelled;
    caller_pending_t *gate;
    caller_pending_t *p[ROUND];
} round_t;

typedef struct {
    round_t *r;
    int i;
} round_arg_t;

/* Kind by i % 5: 0 returns i; 1 raises; 2 suspends on the gate; 3 cancels
 * the next task (a kind 4) before it starts; 4 must never run. */
static void *round_task(void *arg)
{
    round_arg_t *a = arg;
    round_t *r = a->r;
    CHECK_PTR_EQ(caller_current_pending(), r->p[a->i]);
    switch (a->i % 5) {
    case 4:
        r->ran_cancelled++;
        return NULL;
    case 1:
        r->order[r->n++] = a->i;
        caller_raise(-EIO, "task %d failed", a->i);
        return NULL;
    case 2:
        r->order[r->n++] = a->i;
        CHECK_RC(caller_pending_wait(r->gate, 10, CALLER_WAIT_PROTECT, NULL), 0);
        r->resumed++;
        return P(a->i);
    case 3:
        r->order[r->n++] = a->i;
        CHECK_EQ(caller_pending_cancel(r->p[a->i + 1], "cancelled by the task before it"), 1);
        return P(a->i);
    default:
        r->order[r->n++] = a->i;
        return P(a->i);
    }
}

static void *round_body(void *arg)
{
    round_t *r = arg;
    caller_t *c = caller_current();
    round_arg_t args[ROUND];
    caller_stats_t before, after;
    CHECK_RC(caller_stats(c, &before), 0);
    /* All made in this task: they run in the loop's next round, one after
     * the other, while this task waits. */
    for (int i = 0; i < ROUND; i++) {
        args[i] = (round_arg_t){r, i};
        r->p[i] = caller_call_soon(c, round_task, &args[i]);
        CHECK(r->p[i] != NULL);
    }
    CHECK_RC(caller_pending_wait(r->p[ROUND - 1], 10, CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_EQ(caller_pending_cancelled(r->p[ROUND - 1]), 1);
    /* Every task of the round began or was skipped before the kind 2 ones
     * were let go. */
    CHECK_EQ(r->n, ROUND / 5 * 4);
    CHECK_EQ(r->resumed, 0);
    CHECK_RC(caller_pending_set_result(r->gate, NULL, 0), 0);
    for (int i = 0; i < ROUND; i++) {
        void *v = NULL;
        int rc = caller_pending_wait(r->p[i], 10, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, &v);
        switch (i % 5) {
        case 1: {
            CHECK_EQ(rc, -EIO);
            char msg[64];
            CHECK_RC(caller_pending_exception(r->p[i], msg, sizeof msg), -EIO);
            char want[32];
            snprintf(want, sizeof want, "task %d failed", i);
            CHECK(strstr(msg, want) != NULL);
            break;
        }
        case 4:
            CHECK_EQ(rc, -ECANCELED);
            break;
        default:
            CHECK_EQ(rc, 0);
            CHECK_PTR_EQ(v, P(i));
        }
        caller_pending_unref(r->p[i]);
    }
    CHECK_RC(caller_stats(c, &after), 0);
    /* Those cancelled before they began neither started nor finished. */
    CHECK_EQ(after.tasks_started - before.tasks_started, ROUND / 5 * 4);
    CHECK_EQ(after.tasks_finished - before.tasks_finished, ROUND / 5 * 4);
    return NULL;
}

TEST(one_round_of_tasks_runs_in_order_each_with_its_own_outcome)
{
    caller_t *c = check_new_thread(NULL);
    round_t *r = calloc(1, sizeof *r);
    CHECK(r != NULL);
    r->gate = caller_pending_new(CALLER_PENDING_UNTRACKED);
    CHECK(r->gate != NULL);
    caller_pending_t *body = caller_call_soon(c, round_body, r);
    await(body);
    caller_pending_unref(body);
    CHECK_EQ(r->n, ROUND / 5 * 4);
    for (int k = 1; k < r->n; k++)
        CHECK_LT(r->order[k - 1], r->order[k]);
    CHECK_EQ(r->resumed, ROUND / 5);
    CHECK_EQ(r->ran_cancelled, 0);
    caller_pending_unref(r->gate);
    free(r);
    check_stop(c);
}

typedef struct {
    caller_group_t *mine, *other;
    caller_pending_t *child;
} ctx_arg_t;

static bool group_tracks(caller_group_t *g, caller_pending_t *p)
{
    caller_pending_t *out[8];
    size_t n = caller_group_pending(g, out, 8);
    CHECK_LE(n, 8);
    bool found = false;
    for (size_t i = 0; i < n; i++) {
        found |= out[i] == p;
        caller_pending_unref(out[i]);
    }
    return found;
}

/* Runs in the context it was scheduled in: a Pending it makes is tracked
 * by that context's group, not by the one of the task before it. */
static void *make_child_in_context(void *arg)
{
    ctx_arg_t *a = arg;
    a->child = caller_call_soon(caller_current(), ret_arg, NULL);
    CHECK(a->child != NULL);
    CHECK(group_tracks(a->mine, a->child));
    CHECK(!group_tracks(a->other, a->child));
    return NULL;
}

static void *two_contexts_body(void *arg)
{
    (void)arg;
    caller_t *c = caller_current();
    caller_group_t *outer = caller_group_new(NULL, 0), *inner = caller_group_new(NULL, 0);
    CHECK(outer && inner);
    ctx_arg_t a1 = {outer, inner, NULL}, a2 = {inner, outer, NULL};
    CHECK_RC(caller_group_enter(outer), 0);
    caller_pending_t *t1 = caller_call_soon(c, make_child_in_context, &a1);
    CHECK_RC(caller_group_enter(inner), 0);
    caller_pending_t *t2 = caller_call_soon(c, make_child_in_context, &a2);
    /* t1 and t2 run in the next round, one right after the other. */
    CHECK_RC(caller_group_exit(inner), 0);
    CHECK_RC(caller_group_exit(outer), 0);
    CHECK(caller_pending_done(t1) && caller_pending_done(t2));
    caller_pending_unref(a1.child);
    caller_pending_unref(a2.child);
    caller_pending_unref(t1);
    caller_pending_unref(t2);
    caller_group_unref(inner);
    caller_group_unref(outer);
    return NULL;
}

TEST(tasks_of_one_round_each_run_in_their_own_context)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *body = caller_call_soon(c, two_contexts_body, NULL);
    await(body);
    caller_pending_unref(body);
    check_stop(c);
}

typedef struct stop_round stop_round_t;
typedef struct {
    stop_round_t *s;
    int i;
} stop_arg_t;
struct stop_round {
    caller_t *c;
    int ran[10];
    stop_arg_t args[10];
    caller_pending_t *p[10];
};

/* The first task of the round stops its Caller: the rest never begin. */
static void *stop_or_note(void *arg)
{
    stop_arg_t *a = arg;
    a->s->ran[a->i]++;
    if (a->i == 0)
        CHECK_EQ(caller_stop(a->s->c, 0), CALLER_STATE_STOPPING);
    return P(a->i);
}

static void *stop_round_body(void *arg)
{
    stop_round_t *s = arg;
    for (int i = 0; i < 10; i++) {
        s->args[i] = (stop_arg_t){s, i};
        s->p[i] = caller_call_soon(s->c, stop_or_note, &s->args[i]);
        CHECK(s->p[i] != NULL);
    }
    return NULL;
}

TEST(stop_by_a_task_of_the_round_cancels_the_rest_before_they_begin)
{
    stop_round_t *s = calloc(1, sizeof *s);
    CHECK(s != NULL);
    s->c = check_new_thread(NULL);
    caller_pending_t *body = caller_call_soon(s->c, stop_round_body, s);
    await(body);
    caller_pending_unref(body);
    CHECK_PTR_EQ(await(s->p[0]), P(0));
    for (int i = 1; i < 10; i++) {
        void *v = NULL;
        CHECK_RC(caller_pending_wait(s->p[i], 10, CALLER_WAIT_RESULT, &v), -ECANCELED);
        CHECK_EQ(s->ran[i], 0);
    }
    CHECK_EQ(s->ran[0], 1);
    CHECK_RC(caller_wait_stopped(s->c, 10), 0);
    for (int i = 0; i < 10; i++)
        caller_pending_unref(s->p[i]);
    check_stop(s->c);
    free(s);
}

typedef struct {
    bool ran, on_fiber, in_task;
} where_t;

static void note_where(caller_pending_t *p, void *arg)
{
    (void)p;
    where_t *w = arg;
    w->ran = true;
    w->on_fiber = caller__fiber_current() != NULL;
    w->in_task = caller_current_pending() != NULL;
}

static void *hand_on_body(void *arg)
{
    where_t *w = arg;
    caller_t *c = caller_current();
    caller_pending_t *first = caller_call_soon(c, ret_arg, P(1));
    caller_pending_t *second = caller_call_soon(c, ret_arg, P(2));
    CHECK(first && second);
    CHECK_RC(caller_pending_add_done_callback(first, note_where, w), 0);
    CHECK_PTR_EQ(await(second), P(2));
    caller_pending_unref(first);
    caller_pending_unref(second);
    return NULL;
}

/* A task that ends with a task of its round not yet begun behind it hands
 * its fiber on: it is settled there, so its done callbacks run on that
 * stack (the guide says so), still outside any task. */
TEST(a_task_followed_in_its_round_is_settled_on_its_fiber)
{
    caller_t *c = check_new_thread(NULL);
    where_t w = {0};
    caller_pending_t *body = caller_call_soon(c, hand_on_body, &w);
    await(body);
    caller_pending_unref(body);
    CHECK(w.ran);
    CHECK(w.on_fiber);
    CHECK(!w.in_task);
    check_stop(c);
}
