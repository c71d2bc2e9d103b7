/*
 * libFuzzer harness (issue #10): each input is decoded into a sequence of
 * API calls across two Callers — scheduling of every kind, cancellation,
 * waits, completion of user Pendings, done callbacks, collection, stops —
 * and the invariants are checked: every call returns one of its documented
 * results, every done callback runs at most once, and when all is stopped
 * nothing is left alive. Built with clang -fsanitize=fuzzer,address,undefined
 * (`make fuzz`); a crash becomes a regression test.
 */
#include "caller.h"

#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SLOTS 16

#define REQUIRE(cond)                                                                              \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz-api: invariant failed: %s (line %d)\n", #cond, __LINE__);        \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static atomic_int callback_runs[SLOTS * 64];

/* A result of scheduling or waiting: one a documented path can give. */
static void ok_rc(int rc)
{
    REQUIRE(rc == 0 || rc == -ECANCELED || rc == -ETIMEDOUT || rc == -ESHUTDOWN || rc == -EIO ||
            rc == CALLER_EINVALSTATE || rc == -EDEADLK || rc == CALLER_ITER_END);
}

static void *task(void *arg)
{
    uintptr_t v = (uintptr_t)arg;
    if (v & 1)
        caller_sleep(0); /* a suspension point: cancellation may land here */
    if (v & 2)
        caller_raise(-EIO, "fuzz %lu", (unsigned long)v);
    return arg;
}

static void on_done(caller_pending_t *p, void *arg)
{
    (void)p;
    int n = atomic_fetch_add(&callback_runs[(uintptr_t)arg], 1);
    REQUIRE(n == 0); /* once */
}

static void *group_body(void *arg)
{
    caller_group_t *g = caller_group_new(NULL, ((uintptr_t)arg & 1 ? CALLER_GROUP_SHIELD : 0));
    REQUIRE(g != NULL);
    REQUIRE(caller_group_enter(g) == 0);
    for (uintptr_t k = 0; k < ((uintptr_t)arg & 3); k++) {
        caller_pending_t *p =
            caller_call_soon(caller_current(), task, (void *)(k + (uintptr_t)arg));
        caller_pending_unref(p);
    }
    int rc = caller_group_exit(g);
    REQUIRE(rc == 0 || rc == -ECANCELED);
    caller_group_unref(g);
    return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* The tasks' planned failures (EIO) are logged by the library as they
 * happen: thousands a second, drowning the fuzzer's own output. Those are
 * dropped; any other message still goes to stderr. */
static void quiet_log(void *arg, int level, const char *message)
{
    (void)arg;
    if (!strstr(message, "(EIO)"))
        fprintf(stderr, "libcaller log %d: %s\n", level, message);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* The second Caller runs its tasks in copy-stack mode. */
    const caller_options_t quiet = {.log = quiet_log};
    const caller_options_t copying = {.log = quiet_log, .stack_mode = CALLER_STACK_COPY};
    caller_t *c[2] = {caller_create(CALLER_NEW_THREAD, &quiet),
                      caller_create(CALLER_NEW_THREAD, &copying)};
    REQUIRE(c[0] && c[1]);
    caller_pending_t *slot[SLOTS] = {0};
    int key[2];
    memset(callback_runs, 0, sizeof callback_runs);
    int callbacks = 0;
    for (size_t i = 0; i + 1 < size && i < 256; i += 2) {
        uint8_t op = data[i] % 12, arg = data[i + 1];
        caller_t *target = c[arg & 1];
        int s = (arg >> 1) % SLOTS;
        caller_pending_t *p = NULL;
        switch (op) {
        case 0:
            p = caller_call_soon(target, task, (void *)(uintptr_t)arg);
            break;
        case 1:
            p = caller_call_later(target, (arg % 4) / 1000.0, task, (void *)(uintptr_t)arg);
            break;
        case 2:
            p = caller_to_thread(target, task, (void *)(uintptr_t)arg);
            break;
        case 3:
            p = caller_queue_call_key(target, &key[arg & 1], task, (void *)(uintptr_t)arg);
            break;
        case 4:
            if (slot[s])
                REQUIRE(caller_pending_cancel(slot[s], "fuzz") >= 0);
            continue;
        case 5:
            if (slot[s])
                ok_rc(caller_pending_wait(slot[s], (arg % 3) / 1000.0,
                                          (arg & 8 ? CALLER_WAIT_PROTECT : 0) |
                                              (arg & 16 ? CALLER_WAIT_RESULT : 0),
                                          NULL));
            continue;
        case 6:
            p = caller_pending_new(0);
            REQUIRE(p != NULL);
            if (arg & 1)
                REQUIRE(caller_pending_set_result(p, NULL, (arg & 2 ? CALLER_RESULT_RESET : 0)) ==
                        0);
            else
                REQUIRE(caller_pending_set_exception(p, -EIO, "fuzz") == 0);
            break;
        case 7:
            if (slot[s] && callbacks < SLOTS * 64) {
                REQUIRE(caller_pending_add_done_callback(slot[s], on_done,
                                                         (void *)(uintptr_t)callbacks) == 0);
                callbacks++;
            }
            continue;
        case 8:
            REQUIRE(caller_stop(target, (arg & 4 ? CALLER_STOP_FORCE : 0)) >= 0);
            continue;
        case 9: {
            caller_pending_t *set[SLOTS];
            size_t n = 0;
            for (int k = 0; k < SLOTS; k++)
                if (slot[k])
                    set[n++] = slot[k];
            caller_as_completed_options_t o = {.keep_unfinished = arg & 1};
            caller_iter_t *it = caller_as_completed(set, n, &o);
            REQUIRE(it != NULL);
            caller_pending_t *q;
            int rc;
            while ((rc = caller_iter_next_timeout(it, 0.001, &q)) == 0)
                caller_pending_unref(q);
            ok_rc(rc);
            caller_iter_close(it);
            continue;
        }
        case 10: {
            caller_pending_t *set[SLOTS], *done[SLOTS], *rest[SLOTS];
            size_t n = 0, nd, nr;
            for (int k = 0; k < SLOTS; k++)
                if (slot[k])
                    set[n++] = slot[k];
            ok_rc(
                caller_wait(set, n, 0.001, (caller_return_when_t)(arg % 3), done, &nd, rest, &nr));
            REQUIRE(nd + nr == n);
            continue;
        }
        case 11:
            p = caller_call_soon(target, group_body, (void *)(uintptr_t)arg);
            break;
        }
        if (!p) { /* only a stopped Caller refuses */
            int rc = caller_last_error(NULL);
            REQUIRE(rc == -ESHUTDOWN);
            continue;
        }
        caller_pending_unref(slot[s]);
        slot[s] = p;
    }
    for (int k = 0; k < 2; k++) {
        caller_stop(c[k], CALLER_STOP_FORCE);
        REQUIRE(caller_wait_stopped(c[k], 30) == 0);
    }
    /* User Pendings nobody completes stay not done: complete them. */
    for (int k = 0; k < SLOTS; k++) {
        if (slot[k] && caller_pending_done(slot[k]) == 0 && caller_pending_cancelled(slot[k]) == 0)
            caller_pending_set_result(slot[k], NULL, 0);
        if (slot[k] && caller_pending_done(slot[k]) == 0)
            caller_pending_set_result(slot[k], NULL, 0);
        caller_pending_unref(slot[k]);
    }
    for (int k = 0; k < 2; k++)
        caller_unref(c[k]);
    for (int i = 0; i < 2000 && (caller_live_count() || caller_pending_live_count()); i++)
        usleep(1000);
    REQUIRE(caller_live_count() == 0);
    REQUIRE(caller_pending_live_count() == 0);
    return 0;
}
