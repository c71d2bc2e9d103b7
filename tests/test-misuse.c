/* Misuse: every public function given NULL or invalid arguments, a stopped
 * Caller, the wrong thread, a double release — a clear code and message,
 * never undefined behaviour (issue #10). */
#include "check.h"
#include "internal.h"

#include <sys/wait.h>
#include <unistd.h>

/* An error code, and a message saying something. */
#define EXPECT(expr, code)                                                                         \
    do {                                                                                           \
        CHECK_RC((expr), (code));                                                                  \
        CHECK(strlen(check_last_message()) > 0);                                                   \
    } while (0)

/* A NULL result, with the code recorded. */
#define EXPECT_NULL(expr, code)                                                                    \
    do {                                                                                           \
        CHECK((expr) == NULL);                                                                     \
        CHECK_RC(caller_last_error(NULL), (code));                                                 \
        CHECK(strlen(check_last_message()) > 0);                                                   \
    } while (0)

static void *fn(void *arg)
{
    return arg;
}

static void direct(void *arg)
{
    (void)arg;
}

static void done_cb(caller_pending_t *p, void *arg)
{
    (void)p;
    (void)arg;
}

static void canceller(caller_pending_t *p, const char *m, void *arg)
{
    (void)p;
    (void)m;
    (void)arg;
}

static caller_pending_t *gen(void *arg)
{
    (void)arg;
    return NULL;
}

static caller_pending_t *gen_none(void *arg)
{
    (void)arg;
    return NULL;
}

TEST(null_arguments_across_the_api)
{
    char buf[16];
    void *v;
    caller_pending_t *list[2];
    size_t n;
    caller_manager_token_t tok = {0};
    caller_pool_config_t cfg = {0};
    /* Pending */
    EXPECT_NULL(caller_pending_new(0x80), -EINVAL);
    EXPECT(caller_pending_set_result(NULL, NULL, 0), -EINVAL);
    EXPECT(caller_pending_set_exception(NULL, -EIO, NULL), -EINVAL);
    EXPECT(caller_pending_cancel(NULL, NULL), -EINVAL);
    EXPECT(caller_pending_set_canceller(NULL, canceller, NULL), -EINVAL);
    EXPECT(caller_pending_done(NULL), -EINVAL);
    EXPECT(caller_pending_cancelled(NULL), -EINVAL);
    EXPECT(caller_pending_result(NULL, &v), -EINVAL);
    EXPECT(caller_pending_exception(NULL, buf, sizeof buf), -EINVAL);
    EXPECT(caller_pending_add_done_callback(NULL, done_cb, NULL), -EINVAL);
    EXPECT(caller_pending_remove_done_callback(NULL, done_cb, NULL), -EINVAL);
    EXPECT(caller_pending_wait(NULL, 0, CALLER_WAIT_RESULT, &v), -EINVAL);
    EXPECT(caller_pending_repr(NULL, buf, sizeof buf), -EINVAL);
    EXPECT(caller_pending_set_userdata(NULL, NULL, NULL), -EINVAL);
    CHECK(caller_pending_userdata(NULL) == NULL);
    CHECK(caller_pending_ref(NULL) == NULL);
    caller_pending_unref(NULL);
    /* Callers */
    EXPECT_NULL(caller_create((caller_mode_t)42, NULL), -EINVAL);
    EXPECT(caller_run(NULL, fn, NULL, NULL), -EINVAL);
    EXPECT(caller_stop(NULL, 0), -EINVAL);
    EXPECT(caller_wait_stopped(NULL, 0), -EINVAL);
    EXPECT_NULL(caller_get(NULL, NULL), -EINVAL);
    EXPECT_NULL(caller_call_soon(NULL, fn, NULL), -EINVAL);
    EXPECT_NULL(caller_call_later(NULL, 1, fn, NULL), -EINVAL);
    EXPECT(caller_call_direct(NULL, direct, NULL), -EINVAL);
    EXPECT_NULL(caller_to_thread(NULL, fn, NULL), -EINVAL);
    EXPECT_NULL(caller_queue_call(NULL, fn, NULL), -EINVAL);
    EXPECT_NULL(caller_queue_call_key(NULL, "k", fn, NULL), -EINVAL);
    CHECK(caller_queue_get(NULL, fn) == NULL);
    CHECK(caller_queue_get_key(NULL, "k") == NULL);
    EXPECT(caller_queue_close(NULL, fn), -EINVAL);
    EXPECT(caller_queue_close_key(NULL, "k"), -EINVAL);
    EXPECT(caller_state(NULL), -EINVAL);
    EXPECT(caller_running(NULL), -EINVAL);
    EXPECT(caller_protected(NULL), -EINVAL);
    EXPECT(caller_repr(NULL, buf, sizeof buf), -EINVAL);
    EXPECT(caller_print_table(NULL, 0), -EINVAL);
    EXPECT(caller_pool_get_config(NULL, &cfg), -EINVAL);
    EXPECT(caller_pool_set_config(NULL, &cfg), -EINVAL);
    EXPECT(caller_raise(-EIO, "outside a task"), -EPERM);
    EXPECT(caller_raise(5, "positive"), -EINVAL);
    EXPECT(caller_sleep(-1), -EINVAL);
    EXPECT(caller_wait_fd(-1, CALLER_READABLE, 0), -EINVAL);
#if CALLER_WITH_ZMQ
    EXPECT(caller_wait_zmq(NULL, CALLER_READABLE, 0), -EINVAL);
#else
    EXPECT(caller_wait_zmq(NULL, CALLER_READABLE, 0), -ENOTSUP);
#endif
    CHECK(caller_name(NULL) == NULL);
    CHECK(caller_backend(NULL) == NULL);
    CHECK(caller_parent(NULL) == NULL);
    CHECK(caller_loop(NULL) == NULL);
    CHECK(caller_zmq_context(NULL) == NULL);
    CHECK_EQ(caller_children(NULL, NULL, 0), 0);
    CHECK_EQ(caller_pool_idle(NULL), 0);
    caller_unref(NULL);
    CHECK(caller_ref(NULL) == NULL);
    /* Collection */
    EXPECT_NULL(caller_as_completed(NULL, 1, NULL), -EINVAL);
    EXPECT_NULL(caller_as_completed_gen(NULL, NULL, NULL), -EINVAL);
    EXPECT(caller_iter_next(NULL, list), -EINVAL);
    EXPECT(caller_iter_next_timeout(NULL, 0, list), -EINVAL);
    caller_iter_close(NULL);
    EXPECT(caller_wait(NULL, 1, 0, CALLER_ALL_COMPLETED, list, &n, list, &n), -EINVAL);
    caller_iter_t *it = caller_as_completed_gen(gen, NULL, NULL);
    EXPECT(caller_iter_next(it, NULL), -EINVAL);
    caller_iter_close(it);
    /* Groups, managers, scopes */
    EXPECT(caller_group_enter(NULL), -EINVAL);
    EXPECT(caller_group_exit(NULL), -EINVAL);
    EXPECT(caller_group_cancel(NULL, NULL), -EINVAL);
    EXPECT(caller_group_cancelled(NULL), -EINVAL);
    EXPECT(caller_group_remove(NULL, NULL), -EINVAL);
    EXPECT(caller_group_set_timeout(NULL, 1), -EINVAL);
    CHECK_EQ(caller_group_pending(NULL, NULL, 0), 0);
    caller_group_unref(NULL);
    EXPECT(caller_manager_activate(NULL), -EINVAL);
    EXPECT(caller_manager_start(NULL, &tok), -EINVAL);
    EXPECT(caller_manager_stop(NULL, &tok), -EINVAL);
    EXPECT(caller_manager_deactivate(NULL, CALLER_MANAGER_CANCEL_PENDING), -EINVAL);
    EXPECT(caller_manager_wait(NULL, 0), -EINVAL);
    CHECK_EQ(caller_manager_pending(NULL, NULL, 0), 0);
    caller_manager_unref(NULL);
    EXPECT_NULL(caller_scope_enter(1, 0), -EPERM); /* not in a task */
    EXPECT(caller_scope_exit(NULL), -EINVAL);
    EXPECT(caller_scope_cancel(NULL), -EINVAL);
    EXPECT(caller_scope_cancelled(NULL), -EINVAL);
    /* iopub */
    EXPECT(caller_iopub_set_url(NULL), -EINVAL);
    EXPECT(caller_iopub_url(NULL, 5), -EINVAL);
    CHECK(caller_iopub_socket() == NULL);
}

TEST(invalid_arguments_on_live_objects)
{
    caller_t *c = check_new_thread(NULL);
    caller_pending_t *p = caller_pending_new(0);
    EXPECT(caller_pending_set_exception(p, 0, "zero is not an error"), -EINVAL);
    EXPECT(caller_pending_set_canceller(p, NULL, NULL), -EINVAL);
    EXPECT(caller_pending_add_done_callback(p, NULL, NULL), -EINVAL);
    EXPECT(caller_pending_repr(p, NULL, 4), -EINVAL);
    EXPECT_NULL(caller_call_soon(c, NULL, NULL), -EINVAL);
    EXPECT(caller_call_direct(c, NULL, NULL), -EINVAL);
    EXPECT_NULL(caller_queue_call_key(c, NULL, fn, NULL), -EINVAL);
    caller_pool_config_t bad = {.idle_shutdown = -1};
    EXPECT(caller_pool_set_config(c, &bad), -EINVAL);
    EXPECT(caller_wait(&p, 1, 0, (caller_return_when_t)9, &p, NULL, &p, NULL), -EINVAL);
    EXPECT_NULL(caller_create(CALLER_NEW_THREAD, &(caller_options_t){.backend = "gtk"}), -EINVAL);
    EXPECT(caller_run(c, fn, NULL, NULL), -EPERM); /* not a manual Caller of this thread */
    caller_group_t *g = caller_group_new(c, 0);
    EXPECT(caller_group_enter(g), -EPERM); /* not in a task */
    EXPECT(caller_group_exit(g), CALLER_EINVALSTATE);
    caller_group_unref(g);
    caller_manager_t *m = caller_manager_new();
    caller_manager_token_t tok;
    EXPECT(caller_manager_start(m, &tok), CALLER_EINVALSTATE); /* not active */
    EXPECT(caller_manager_deactivate(m, CALLER_MANAGER_CANCEL_PENDING), CALLER_EINVALSTATE);
    caller_manager_unref(m);
    /* A stopped Caller: scheduling fails, stopping again is harmless. */
    caller_stop(c, 0);
    CHECK_RC(caller_wait_stopped(c, 10), 0);
    EXPECT_NULL(caller_call_soon(c, fn, NULL), -ESHUTDOWN);
    EXPECT_NULL(caller_to_thread(c, fn, NULL), -ESHUTDOWN);
    EXPECT_NULL(caller_queue_call(c, fn, NULL), -ESHUTDOWN);
    EXPECT(caller_call_direct(c, direct, NULL), -ESHUTDOWN);
    EXPECT_NULL(caller_get(c, NULL), -ESHUTDOWN);
    CHECK_EQ(caller_stop(c, 0), CALLER_STATE_STOPPED);
    CHECK_EQ(caller_stop(c, CALLER_STOP_FORCE), CALLER_STATE_STOPPED);
    caller_pending_set_result(p, NULL, 0);
    EXPECT(caller_pending_set_result(p, NULL, 0), CALLER_EINVALSTATE);
    caller_pending_unref(p);
    caller_unref(c);
}

/* Releasing more references than were taken is a broken invariant: it is
 * detected (as long as the memory still shows it) and aborts with a
 * message, in a child process here. */
static void *noop_task(void *arg)
{
    return arg;
}

static void over_release(int which)
{
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        freopen("/dev/null", "w", stderr); /* ASan reports it its own way */
        if (which == 0) {
            caller_t *c = caller_create(CALLER_MANUAL, NULL);
            caller_stop(c, 0);
            caller_unref(c);
            caller_unref(c); /* the thread-local one went at stop: this is one too many */
            caller_unref(c);
        } else if (which == 2) {
            /* A task's Pending: its block goes to a per-thread cache, not
             * straight back to malloc; the second release is still caught. */
            caller_t *c = caller_create(CALLER_NEW_THREAD, NULL);
            caller_pending_t *p = caller_call_soon(c, noop_task, NULL);
            caller_pending_wait(p, 10, 0, NULL);
            caller_stop(c, 0);
            caller_wait_stopped(c, 10); /* the loop dropped its reference */
            caller_unref(c);
            caller_pending_unref(p);
            caller_pending_unref(p);
        } else {
            caller_group_t *g = caller_group_new(NULL, 0);
            caller_group_unref(g);
            caller_pending_t *p = caller_pending_new(0);
            caller_pending_unref(p);
            caller_pending_unref(p);
        }
        _exit(0); /* not reached when detected */
    }
    int status;
    CHECK_EQ(waitpid(pid, &status, 0), pid);
    CHECK(!(WIFEXITED(status) && WEXITSTATUS(status) == 0));
}

/* Every flags parameter refuses bits it does not know, with -EINVAL and a
 * message naming the function, and changes nothing. */
TEST(unknown_flags_are_refused)
{
    caller_t *c =
        caller_create(CALLER_NEW_THREAD, &(caller_options_t){.name = "flags", .protect = true});
    CHECK(c != NULL);
    caller_pending_t *p = caller_pending_new(0);
    EXPECT(caller_pending_set_result(p, NULL, 0x4), -EINVAL);
    CHECK_EQ(caller_pending_done(p), 0);
    EXPECT(caller_pending_wait(p, 0, 0x4, NULL), -EINVAL);
    CHECK_EQ(caller_pending_cancelled(p), 0); /* not cancelled as a timeout would */
    EXPECT(caller_pending_wait(p, 0, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT, NULL), -ETIMEDOUT);
    CHECK_EQ(caller_pending_cancelled(p), 0); /* protected */
    EXPECT(caller_stop(c, 0x2), -EINVAL);
    CHECK_EQ(caller_stop(c, 0), CALLER_STATE_RUNNING); /* protected: needs the flag */
    EXPECT_NULL(caller_group_new(c, 0x2), -EINVAL);
    caller_manager_t *m = caller_manager_new();
    CHECK_RC(caller_manager_activate(m), 0);
    EXPECT(caller_manager_deactivate(m, 0x2), -EINVAL);
    CHECK_RC(caller_manager_deactivate(m, 0), 0);
    /* A second reference keeps it alive past the first release. */
    CHECK(caller_manager_ref(m) == m);
    caller_manager_unref(m);
    CHECK_RC(caller_manager_activate(m), 0);
    CHECK_RC(caller_manager_deactivate(m, CALLER_MANAGER_CANCEL_PENDING), 0);
    caller_manager_unref(m);
    EXPECT_NULL(caller_manager_ref(NULL), -EINVAL);
    CHECK_EQ(caller_all(0x2, NULL, 0), 0);
    const char *msg;
    CHECK_EQ(caller_last_error(&msg), -EINVAL);
    CHECK(strstr(msg, "caller_all") != NULL);
    CHECK(caller_all(CALLER_ALL_RUNNING, NULL, 0) >= 1);
    CHECK_RC(caller_pending_set_result(p, NULL, CALLER_RESULT_RESET), 0);
    CHECK_EQ(caller_pending_done(p), 0); /* reset: not done again */
    caller_pending_unref(p);
    CHECK_EQ(caller_stop(c, CALLER_STOP_FORCE), CALLER_STATE_STOPPING);
    CHECK_RC(caller_wait_stopped(c, 10), 0);
    caller_unref(c);
}

/* The option structs: fixed sizes and field offsets (a program built
 * against this header keeps working with later versions), zero is every
 * default, and reserved space that is not zero (a field this version does
 * not know) is refused, not ignored. */
TEST(option_structs_are_extensible)
{
#if UINTPTR_MAX == UINT64_MAX
    CHECK_EQ(sizeof(caller_options_t), 128);
    CHECK_EQ(offsetof(caller_options_t, stack_mode), 72);
    CHECK_EQ(offsetof(caller_options_t, glib_context), 80); /* was reserved[0] */
    CHECK_EQ(offsetof(caller_options_t, reserved), 88);
    CHECK_EQ(sizeof(caller_pool_config_t), 64);
    CHECK_EQ(offsetof(caller_pool_config_t, reserved), 24);
    CHECK_EQ(sizeof(caller_as_completed_options_t), 32);
    CHECK_EQ(offsetof(caller_as_completed_options_t, reserved), 8);
#endif
    caller_options_t o = {.name = "newer"};
    o.reserved[4] = 1;
    EXPECT_NULL(caller_create(CALLER_NEW_THREAD, &o), -EINVAL);
    CHECK(strstr(check_last_message(), "reserved[4]") != NULL);
    o.reserved[4] = 0;
    caller_t *c = caller_create(CALLER_NEW_THREAD, &o);
    CHECK(c != NULL);
    caller_options_t child = {.name = "child"};
    child.reserved[0] = 7;
    EXPECT_NULL(caller_get(c, &child), -EINVAL);
    caller_pool_config_t cfg;
    CHECK_RC(caller_pool_get_config(c, &cfg), 0);
    for (size_t i = 0; i < sizeof cfg.reserved / sizeof cfg.reserved[0]; i++)
        CHECK_EQ(cfg.reserved[i], 0);
    cfg.reserved[4] = 1;
    EXPECT(caller_pool_set_config(c, &cfg), -EINVAL);
    caller_pool_config_t now;
    CHECK_RC(caller_pool_get_config(c, &now), 0);
    CHECK_EQ(now.reserved[4], 0); /* unchanged */
    caller_pending_t *p = caller_pending_new(0);
    caller_as_completed_options_t ao = {.max_concurrent = 1};
    ao.reserved[2] = 1;
    EXPECT_NULL(caller_as_completed(&p, 1, &ao), -EINVAL);
    EXPECT_NULL(caller_as_completed_gen(gen_none, NULL, &ao), -EINVAL);
    ao.reserved[2] = 0;
    caller_iter_t *it = caller_as_completed(&p, 1, &ao);
    CHECK(it != NULL);
    caller_iter_close(it);
    caller_pending_unref(p);
    caller_stop(c, 0);
    CHECK_RC(caller_wait_stopped(c, 10), 0);
    caller_unref(c);
}

TEST(over_release_of_caller_and_pending_aborts)
{
    over_release(0);
    over_release(1);
    over_release(2);
}
