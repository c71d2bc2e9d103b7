/*
 * The GLib backend: Callers on a GMainContext, attached to one the
 * application runs or on one of their own; choosing a backend; GLib
 * sources beside a Caller's tasks. (Everything else runs on GLib through
 * the whole suite's second run, <feature>.glib.<case>.)
 */
// NEEDS-GLIB
#include "check.h"

#include <glib.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <unistd.h>

static void *await(caller_pending_t *p)
{
    return check_await(p, 10);
}

static void *stop_self(void *arg)
{
    (void)arg;
    CHECK_EQ(caller_stop(caller_current(), 0), CALLER_STATE_STOPPING);
    return P(1);
}

/* What an application's main loop does: iterate the context (here until
 * the Caller stopped). */
static void run_until_stopped(GMainContext *ctx, caller_t *c)
{
    while (caller_state(c) != CALLER_STATE_STOPPED)
        g_main_context_iteration(ctx, TRUE);
}

TEST(glib_attach_to_application_context)
{
    GMainContext *ctx = g_main_context_new();
    g_main_context_push_thread_default(ctx);
    caller_options_t o = {.glib_context = ctx, .name = "app"};
    caller_t *c = caller_create(CALLER_CURRENT_THREAD, &o);
    CHECK(c != NULL);
    CHECK_STR_EQ(caller_backend(c), "glib");
    CHECK_EQ(caller_state(c), CALLER_STATE_RUNNING);
    CHECK_PTR_EQ(caller_glib_context(c), ctx);
    CHECK(caller_loop(c) == NULL); /* not a libuv Caller */
    caller_t *again = caller_create(CALLER_CURRENT_THREAD, NULL);
    CHECK_PTR_EQ(again, c);
    caller_unref(again);
    caller_options_t uv = {.backend = "libuv"};
    CHECK(caller_create(CALLER_CURRENT_THREAD, &uv) == NULL);
    CHECK_CONTAINS(check_last_message(), "The backend does not match!");
    caller_pending_t *p = caller_call_soon(c, stop_self, NULL);
    /* The application runs its loop; the Caller's work runs in it. */
    run_until_stopped(ctx, c);
    CHECK(caller_glib_context(c) == NULL);
    CHECK_EQ(I(await(p)), 1);
    caller_unref(c);
    g_main_context_pop_thread_default(ctx);
    g_main_context_unref(ctx);
}

static gboolean on_timeout(gpointer data)
{
    caller_pending_set_result(data, P(7), 0);
    return G_SOURCE_REMOVE;
}

static void *glib_source_in_a_task(void *arg)
{
    (void)arg;
    /* The Caller's own context is this thread's default: GLib code that
     * attaches to the thread-default context runs on the Caller's loop. */
    GMainContext *ctx = caller_glib_context(caller_current());
    CHECK(ctx != NULL);
    CHECK_PTR_EQ(g_main_context_get_thread_default(), ctx);
    caller_pending_t *fired = caller_pending_new(0);
    GSource *t = g_timeout_source_new(5);
    g_source_set_callback(t, on_timeout, fired, NULL);
    g_source_attach(t, ctx);
    g_source_unref(t);
    void *v = NULL;
    CHECK_RC(caller_pending_wait(fired, 10, CALLER_WAIT_RESULT, &v), 0);
    caller_pending_unref(fired);
    return v;
}

TEST(glib_own_context_is_the_threads_default)
{
    caller_options_t o = {.backend = "glib", .name = "g"};
    caller_t *c = caller_create(CALLER_NEW_THREAD, &o);
    CHECK(c != NULL);
    CHECK_STR_EQ(caller_backend(c), "glib");
    CHECK(caller_glib_context(c) != NULL);
    CHECK(caller_loop(c) == NULL);
    caller_pending_t *p = caller_call_soon(c, glib_source_in_a_task, NULL);
    CHECK_EQ(I(await(p)), 7);
    caller_stop(c, 0);
    CHECK_RC(caller_wait_stopped(c, 10), 0);
    CHECK(caller_glib_context(c) == NULL);
    caller_unref(c);
}

TEST(glib_children_and_backend_mismatch)
{
    caller_t *parent = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.backend = "libuv"});
    CHECK(parent != NULL);
    /* A child asked for by name with the other backend. */
    caller_options_t g = {.name = "gchild", .backend = "glib"};
    caller_t *k = caller_get(parent, &g);
    CHECK(k != NULL);
    CHECK_STR_EQ(caller_backend(k), "glib");
    caller_t *same = caller_get(parent, &g);
    CHECK_PTR_EQ(same, k);
    caller_unref(same);
    /* The same name with the parent's backend: refused, as in the original. */
    caller_options_t u = {.name = "gchild", .backend = "libuv"};
    CHECK(caller_get(parent, &u) == NULL);
    CHECK_RC(caller_last_error(NULL), -EINVAL);
    CHECK_CONTAINS(check_last_message(), "Backend mismatch!");
    CHECK_CONTAINS(check_last_message(), "runs glib, asked for libuv");
    /* Without a backend a child gets its parent's. */
    caller_t *gk = caller_get(k, NULL);
    CHECK_STR_EQ(caller_backend(gk), "glib");
    caller_t *uk = caller_get(parent, NULL);
    CHECK_STR_EQ(caller_backend(uk), "libuv");
    caller_unref(gk);
    caller_unref(uk);
    caller_unref(k);
    check_stop(parent);
}

TEST(glib_choosing_a_backend)
{
    const char *names[4] = {0};
    CHECK_EQ(caller_backends(names, 4), 2);
    CHECK_STR_EQ(names[0], "libuv");
    CHECK_STR_EQ(names[1], "glib");
    CHECK_EQ(caller_backends(NULL, 0), 2);
    GMainContext *ctx = g_main_context_new();
    /* Both loops given. */
    caller_options_t both = {.glib_context = ctx, .loop = (void *)ctx};
    CHECK(caller_create(CALLER_CURRENT_THREAD, &both) == NULL);
    CHECK_RC(caller_last_error(NULL), -EINVAL);
    CHECK_CONTAINS(check_last_message(), "both set");
    /* A context given with another backend named. */
    caller_options_t mismatch = {.glib_context = ctx, .backend = "libuv"};
    CHECK(caller_create(CALLER_CURRENT_THREAD, &mismatch) == NULL);
    CHECK_RC(caller_last_error(NULL), -EINVAL);
    CHECK_CONTAINS(check_last_message(), "does not match the loop");
    g_main_context_unref(ctx);
    /* The environment's default, and an unknown one there. */
    const char *saved = getenv("CALLER_BACKEND");
    char *keep = saved ? strdup(saved) : NULL;
    setenv("CALLER_BACKEND", "glib", 1);
    caller_t *c = caller_create(CALLER_NEW_THREAD, NULL);
    CHECK_STR_EQ(caller_backend(c), "glib");
    check_stop(c);
    setenv("CALLER_BACKEND", "qt", 1);
    CHECK(caller_create(CALLER_NEW_THREAD, NULL) == NULL);
    CHECK_RC(caller_last_error(NULL), -EINVAL);
    CHECK_CONTAINS(check_last_message(), "unknown backend 'qt' in CALLER_BACKEND");
    /* A name given wins over the environment. */
    c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.backend = "libuv"});
    CHECK_STR_EQ(caller_backend(c), "libuv");
    check_stop(c);
    if (keep) {
        setenv("CALLER_BACKEND", keep, 1);
        free(keep);
    } else {
        unsetenv("CALLER_BACKEND");
    }
}

/* ---- a GLib main loop with the application's own sources beside the Caller ---- */

typedef struct {
    caller_t *c;
    atomic_int ticks;
    int calls_done;
    caller_pending_t *all;
} beside_t;

static gboolean tick(gpointer data)
{
    beside_t *b = data;
    atomic_fetch_add(&b->ticks, 1);
    return G_SOURCE_CONTINUE;
}

static void *on_worker(void *arg)
{
    return arg;
}

static void *many_calls(void *arg)
{
    beside_t *b = arg;
    /* Cross-thread calls and a sleep, while the application's timeout
     * source keeps firing on the same loop. */
    for (int i = 0; i < 200; i++) {
        caller_pending_t *p = caller_to_thread(caller_current(), on_worker, P(i));
        void *v;
        CHECK_RC(caller_pending_wait(p, 10, CALLER_WAIT_RESULT, &v), 0);
        CHECK_EQ(I(v), i);
        caller_pending_unref(p);
        b->calls_done++;
    }
    while (atomic_load(&b->ticks) < 3)
        CHECK_RC(caller_sleep(0.002), 0);
    caller_stop(caller_current(), 0);
    return NULL;
}

TEST(glib_application_sources_run_beside_tasks)
{
    GMainContext *ctx = g_main_context_new();
    g_main_context_push_thread_default(ctx);
    beside_t b = {0};
    atomic_init(&b.ticks, 0);
    b.c = caller_create(CALLER_CURRENT_THREAD, &(caller_options_t){.glib_context = ctx});
    CHECK(b.c != NULL);
    GSource *t = g_timeout_source_new(1);
    g_source_set_callback(t, tick, &b, NULL);
    g_source_attach(t, ctx);
    caller_pending_t *p = caller_call_soon(b.c, many_calls, &b);
    run_until_stopped(ctx, b.c);
    CHECK_EQ(b.calls_done, 200);
    CHECK_GE(atomic_load(&b.ticks), 3);
    CHECK_RC(caller_pending_result(p, NULL), 0);
    caller_pending_unref(p);
    g_source_destroy(t);
    g_source_unref(t);
    caller_unref(b.c);
    g_main_context_pop_thread_default(ctx);
    g_main_context_unref(ctx);
}

/* ---- a nested main loop run from a task (a modal dialog's shape) ---- */

static bool nested_quit; /* the nested loop ran until its timeout */

static gboolean quit_nested(gpointer loop)
{
    nested_quit = true;
    g_main_loop_quit(loop);
    return G_SOURCE_REMOVE;
}

static void *sleeper(void *arg)
{
    (void)arg;
    CHECK_RC(caller_sleep(0.005), 0);
    return P(5);
}

static void *three(void *arg)
{
    (void)arg;
    return P(3);
}

static sem_t nesting; /* posted as the nested loop starts */

static void *run_nested_loop(void *arg)
{
    (void)arg;
    /* The Caller's own context, iterated from inside one of its tasks
     * until a timeout quits it, as gtk_dialog_run() would. The Caller's
     * work waits meanwhile (this task holds its loop): the sleeper, queued
     * behind it, and a call from another thread. */
    GMainContext *ctx = caller_glib_context(caller_current());
    GMainLoop *nested = g_main_loop_new(ctx, FALSE);
    GSource *t = g_timeout_source_new(30);
    g_source_set_callback(t, quit_nested, nested, NULL);
    g_source_attach(t, ctx);
    g_source_unref(t);
    sem_post(&nesting);
    g_main_loop_run(nested);
    /* It ran (GLib refuses, and returns at once, when the task runs inside
     * a source's prepare or check). */
    CHECK(nested_quit);
    g_main_loop_unref(nested);
    return P(1);
}

TEST(glib_nested_main_loop_in_a_task)
{
    CHECK_EQ(sem_init(&nesting, 0, 0), 0);
    caller_t *c = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.backend = "glib"});
    CHECK(c != NULL);
    /* Round trips first: the Caller then spins for work as its loop is
     * about to block, which is where the next call is likely to reach it
     * (GLib's prepare: no task may run there, so none does). */
    for (int i = 0; i < 20; i++)
        CHECK_EQ(I(await(caller_call_soon(c, three, NULL))), 3);
    caller_pending_t *n = caller_call_soon(c, run_nested_loop, NULL);
    caller_pending_t *s = caller_call_soon(c, sleeper, NULL);
    /* Work from another thread while the nested loop runs (its 30 ms). */
    check_sem_wait(&nesting);
    caller_pending_t *late = caller_call_soon(c, three, NULL);
    CHECK_EQ(I(await(n)), 1);
    CHECK_EQ(I(await(s)), 5);
    CHECK_EQ(I(await(late)), 3);
    check_stop(c);
    sem_destroy(&nesting);
}
