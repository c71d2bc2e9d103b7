/* Waiting for I/O (issue #17): caller_wait_fd in tasks and on threads. */
// ALSO-UCONTEXT
// TIMEOUT: 120
#include "check.h"
#include "internal.h"

#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

static double scaled(double s)
{
    return s * check_time_scale();
}

/* Wait for @p p (10 s at most, scaled), release it, return its result. */
static void *await(caller_pending_t *p)
{
    return check_await(p, 10);
}

static void make_pipe(int fds[2])
{
    CHECK_EQ(pipe2(fds, O_CLOEXEC | O_NONBLOCK), 0);
}

static void make_socketpair(int sv[2])
{
    CHECK_EQ(socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv), 0);
}

/* A task: 1 if its Caller has no descriptor watch left. */
static void *no_watches(void *arg)
{
    (void)arg;
    return P(caller_current()->io == NULL);
}

static void check_no_watches(caller_t *c)
{
    CHECK_EQ(I(await(caller_call_soon(c, no_watches, NULL))), 1);
}

/* What a waiting task is given and reports. */
typedef struct {
    int fd;
    unsigned events;
    double timeout;
    atomic_int rc;
    double elapsed;
    caller_pending_t *other; /* for tasks that cancel another */
} wait_t;

static void wait_init(wait_t *w, int fd, unsigned events, double timeout)
{
    memset(w, 0, sizeof *w);
    w->fd = fd;
    w->events = events;
    w->timeout = timeout;
    atomic_init(&w->rc, 1); /* "not returned yet" */
}

static void *wait_task(void *arg)
{
    wait_t *w = arg;
    double t0 = check_now();
    int rc = caller_wait_fd(w->fd, w->events, w->timeout);
    w->elapsed = check_now() - t0;
    atomic_store(&w->rc, rc);
    return P(rc);
}

/* ---- waking ------------------------------------------------------------------ */

TEST(pipe_readable_wakes_suspended_task)
{
    int fds[2];
    make_pipe(fds);
    caller_t *c = check_new_thread("io");
    wait_t w;
    wait_init(&w, fds[0], CALLER_READABLE, CALLER_FOREVER);
    caller_pending_t *p = caller_call_soon(c, wait_task, &w);
    check_until_suspended(c);
    CHECK_EQ(caller_pending_done(p), 0);
    CHECK_EQ(write(fds[1], "x", 1), 1); /* from this thread, not the Caller's */
    CHECK_EQ(I(await(p)), CALLER_READABLE);
    char b;
    CHECK_EQ(read(fds[0], &b, 1), 1);
    check_no_watches(c);
    check_stop(c);
    close(fds[0]);
    close(fds[1]);
}

TEST(socketpair_writable)
{
    int sv[2];
    make_socketpair(sv);
    caller_t *c = check_new_thread("io");
    wait_t w;
    /* Room in the buffer: writable at once; only the events asked for. */
    wait_init(&w, sv[0], CALLER_WRITABLE, CALLER_FOREVER);
    CHECK_EQ(I(await(caller_call_soon(c, wait_task, &w))), CALLER_WRITABLE);
    wait_init(&w, sv[0], CALLER_READABLE | CALLER_WRITABLE, CALLER_FOREVER);
    CHECK_EQ(I(await(caller_call_soon(c, wait_task, &w))), CALLER_WRITABLE);

    /* A full buffer: the task waits until this thread drains the peer. */
    char buf[4096] = {0};
    while (write(sv[0], buf, sizeof buf) > 0)
        ;
    CHECK_EQ(errno, EAGAIN);
    wait_init(&w, sv[0], CALLER_WRITABLE, CALLER_FOREVER);
    caller_pending_t *p = caller_call_soon(c, wait_task, &w);
    check_until_suspended(c);
    CHECK_EQ(caller_pending_done(p), 0);
    while (read(sv[1], buf, sizeof buf) > 0)
        ;
    CHECK_EQ(I(await(p)), CALLER_WRITABLE);
    check_no_watches(c);
    check_stop(c);
    close(sv[0]);
    close(sv[1]);
}

TEST(hang_up_reports_the_events_asked_for)
{
    int fds[2];
    make_pipe(fds);
    caller_t *c = check_new_thread("io");
    wait_t w;
    wait_init(&w, fds[0], CALLER_READABLE, CALLER_FOREVER);
    caller_pending_t *p = caller_call_soon(c, wait_task, &w);
    check_until_suspended(c);
    close(fds[1]); /* the writer goes: POLLHUP, and read() sees the end */
    CHECK_EQ(I(await(p)), CALLER_READABLE);
    char b;
    CHECK_EQ(read(fds[0], &b, 1), 0);
    /* And on a plain thread. */
    CHECK_EQ(caller_wait_fd(fds[0], CALLER_READABLE, scaled(10)), CALLER_READABLE);
    check_no_watches(c);
    check_stop(c);
    close(fds[0]);
}

TEST(regular_file_is_always_ready)
{
    char path[] = "/tmp/caller-test-io-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    unlink(path);
    caller_t *c = check_new_thread("io");
    wait_t w;
    wait_init(&w, fd, CALLER_READABLE | CALLER_WRITABLE, CALLER_FOREVER);
    CHECK_EQ(I(await(caller_call_soon(c, wait_task, &w))), CALLER_READABLE | CALLER_WRITABLE);
    CHECK_EQ(caller_wait_fd(fd, CALLER_WRITABLE, CALLER_FOREVER), CALLER_WRITABLE);
    check_no_watches(c);
    check_stop(c);
    close(fd);
}

/* Many tasks run and end while one waits: the Caller is not blocked. */
static void *identity(void *arg)
{
    return arg;
}

TEST(caller_runs_other_tasks_while_one_waits)
{
    int fds[2];
    make_pipe(fds);
    caller_t *c = check_new_thread("io");
    wait_t w;
    wait_init(&w, fds[0], CALLER_READABLE, CALLER_FOREVER);
    caller_pending_t *p = caller_call_soon(c, wait_task, &w);
    enum { N = 100 };
    caller_pending_t *others[N];
    for (int i = 0; i < N; i++)
        others[i] = caller_call_soon(c, identity, P(i));
    for (int i = 0; i < N; i++)
        CHECK_EQ(I(await(others[i])), i);
    CHECK_EQ(caller_pending_done(p), 0);
    CHECK_EQ(write(fds[1], "x", 1), 1);
    CHECK_EQ(I(await(p)), CALLER_READABLE);
    check_stop(c);
    close(fds[0]);
    close(fds[1]);
}

/* Copy-stack mode: a suspended task's stack is copied away and the run
 * stack reused by the next task, so nothing of a wait may stay on it. */
static caller_t *copy_caller(void)
{
    caller_t *c = caller_create(
        CALLER_NEW_THREAD, &(caller_options_t){.name = "io-copy", .stack_mode = CALLER_STACK_COPY});
    CHECK(c != NULL);
    return c;
}

/* A task that fills its stack, so a run stack reused by it is overwritten. */
static void *scribble(void *arg)
{
    volatile unsigned char junk[8192];
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (unsigned char)(i + (size_t)I(arg));
    return P(junk[100]);
}

TEST(copy_stack_tasks_wait)
{
    int sv[2], fds[2];
    make_socketpair(sv);
    make_pipe(fds);
    caller_t *c = copy_caller();
    wait_t a, b, d;
    wait_init(&a, sv[0], CALLER_READABLE, CALLER_FOREVER);
    wait_init(&b, sv[0], CALLER_READABLE, CALLER_FOREVER);
    wait_init(&d, fds[0], CALLER_READABLE, scaled(10));
    caller_pending_t *pa = caller_call_soon(c, wait_task, &a);
    caller_pending_t *pb = caller_call_soon(c, wait_task, &b);
    caller_pending_t *pd = caller_call_soon(c, wait_task, &d);
    for (int i = 0; i < 10; i++)
        await(caller_call_soon(c, scribble, P(i)));
    check_until_suspended(c);
    CHECK_EQ(write(sv[1], "x", 1), 1);
    CHECK_EQ(write(fds[1], "y", 1), 1);
    CHECK_EQ(I(await(pa)), CALLER_READABLE);
    CHECK_EQ(I(await(pb)), CALLER_READABLE);
    CHECK_EQ(I(await(pd)), CALLER_READABLE);
    check_no_watches(c);
    check_stop(c);
    close(sv[0]);
    close(sv[1]);
    close(fds[0]);
    close(fds[1]);
}

/* ---- timeouts ------------------------------------------------------------------ */

TEST(timeout_returns_etimedout)
{
    int fds[2];
    make_pipe(fds);
    caller_t *c = check_new_thread("io");
    wait_t w;
    wait_init(&w, fds[0], CALLER_READABLE, 0.05);
    CHECK_EQ(I(await(caller_call_soon(c, wait_task, &w))), -ETIMEDOUT);
    CHECK(w.elapsed >= 0.05);
    /* Longer than the 0.5 s step in which a wait looks at its descriptor. */
    wait_init(&w, fds[0], CALLER_READABLE, 0.6);
    CHECK_EQ(I(await(caller_call_soon(c, wait_task, &w))), -ETIMEDOUT);
    CHECK(w.elapsed >= 0.6);
    check_no_watches(c);

    /* A plain thread. */
    double t0 = check_now();
    CHECK_RC(caller_wait_fd(fds[0], CALLER_READABLE, 0.05), -ETIMEDOUT);
    CHECK(check_now() - t0 >= 0.05);
    CHECK_CONTAINS(check_last_message(), "caller_wait_fd: fd");
    CHECK_CONTAINS(check_last_message(), "not ready in time");
    check_stop(c);
    close(fds[0]);
    close(fds[1]);
}

TEST(timeout_zero_only_checks)
{
    int fds[2];
    make_pipe(fds);
    caller_t *c = check_new_thread("io");
    wait_t w;
    wait_init(&w, fds[0], CALLER_READABLE, 0);
    CHECK_EQ(I(await(caller_call_soon(c, wait_task, &w))), -ETIMEDOUT);
    CHECK_RC(caller_wait_fd(fds[0], CALLER_READABLE, 0), -ETIMEDOUT);
    CHECK_EQ(write(fds[1], "x", 1), 1);
    CHECK_EQ(I(await(caller_call_soon(c, wait_task, &w))), CALLER_READABLE);
    CHECK_EQ(caller_wait_fd(fds[0], CALLER_READABLE, 0), CALLER_READABLE);
    CHECK_EQ(caller_wait_fd(fds[1], CALLER_READABLE | CALLER_WRITABLE, 0), CALLER_WRITABLE);
    check_no_watches(c); /* no watch was ever made */
    check_stop(c);
    close(fds[0]);
    close(fds[1]);
}

/* ---- cancellation ---------------------------------------------------------------- */

TEST(cancel_from_another_thread)
{
    int fds[2];
    make_pipe(fds);
    caller_t *c = check_new_thread("io");
    wait_t w;
    wait_init(&w, fds[0], CALLER_READABLE, CALLER_FOREVER);
    caller_pending_t *p = caller_call_soon(c, wait_task, &w);
    check_until_suspended(c);
    CHECK_EQ(caller_pending_cancel(p, "enough"), 1);
    CHECK_RC(caller_pending_wait(p, scaled(10), CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_RC(atomic_load(&w.rc), -ECANCELED);
    caller_pending_unref(p);
    check_no_watches(c);
    check_stop(c);
    close(fds[0]);
    close(fds[1]);
}

static void *cancel_other(void *arg)
{
    wait_t *w = arg;
    return P(caller_pending_cancel(w->other, "from a sibling"));
}

TEST(cancel_from_the_same_caller)
{
    int fds[2];
    make_pipe(fds);
    caller_t *c = check_new_thread("io");
    wait_t w;
    wait_init(&w, fds[0], CALLER_READABLE, CALLER_FOREVER);
    caller_pending_t *p = caller_call_soon(c, wait_task, &w);
    w.other = p;
    CHECK_EQ(I(await(caller_call_soon(c, cancel_other, &w))), 1);
    CHECK_RC(caller_pending_wait(p, scaled(10), CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_RC(atomic_load(&w.rc), -ECANCELED);
    caller_pending_unref(p);
    check_no_watches(c);
    check_stop(c);
    close(fds[0]);
    close(fds[1]);
}

static void *wait_in_failing_scope(void *arg)
{
    wait_t *w = arg;
    caller_scope_t *s = caller_scope_enter(0.05, CALLER_SCOPE_FAIL);
    CHECK(s != NULL);
    double t0 = check_now();
    int rc = caller_wait_fd(w->fd, CALLER_READABLE, CALLER_FOREVER);
    w->elapsed = check_now() - t0;
    CHECK_RC(rc, -ECANCELED);
    CHECK_RC(caller_scope_exit(s), -ETIMEDOUT);
    return P(rc);
}

TEST(cancel_scope_deadline_ends_the_wait)
{
    int fds[2];
    make_pipe(fds);
    caller_t *c = check_new_thread("io");
    wait_t w;
    wait_init(&w, fds[0], CALLER_READABLE, CALLER_FOREVER);
    CHECK_EQ(I(await(caller_call_soon(c, wait_in_failing_scope, &w))), -ECANCELED);
    CHECK(w.elapsed >= 0.05);
    check_no_watches(c);
    check_stop(c);
    close(fds[0]);
    close(fds[1]);
}

/* A shielded wait is not cut short by its task's cancellation; the next
 * suspension point outside the shield sees it. */
static void *wait_shielded(void *arg)
{
    wait_t *w = arg;
    caller_scope_t *s = caller_scope_enter(-1, CALLER_SCOPE_SHIELD);
    CHECK(s != NULL);
    sem_post((sem_t *)w->other);
    int rc = caller_wait_fd(w->fd, CALLER_READABLE, scaled(10));
    CHECK_RC(caller_scope_exit(s), 0);
    atomic_store(&w->rc, rc);
    CHECK_RC(caller_wait_fd(w->fd, CALLER_READABLE, CALLER_FOREVER), -ECANCELED);
    return P(rc);
}

TEST(shield_keeps_cancellation_out_of_the_wait)
{
    int fds[2];
    make_pipe(fds);
    caller_t *c = check_new_thread("io");
    wait_t w;
    sem_t entered;
    sem_init(&entered, 0, 0);
    wait_init(&w, fds[0], CALLER_READABLE, CALLER_FOREVER);
    w.other = (caller_pending_t *)(void *)&entered;
    caller_pending_t *p = caller_call_soon(c, wait_shielded, &w);
    check_sem_wait(&entered);
    check_until_suspended(c);
    CHECK_EQ(caller_pending_cancel(p, NULL), 1);
    /* The cancel notice reaches the task's loop; the wait goes on. The
     * write wakes it: a task after it shows the notice was processed. */
    check_until_suspended(c);
    CHECK_EQ(caller_pending_done(p), 0);
    CHECK_EQ(write(fds[1], "x", 1), 1);
    CHECK_RC(caller_pending_wait(p, scaled(10), CALLER_WAIT_PROTECT, NULL), 0);
    CHECK_EQ(atomic_load(&w.rc), CALLER_READABLE);
    caller_pending_unref(p);
    sem_destroy(&entered);
    check_no_watches(c);
    check_stop(c);
    close(fds[0]);
    close(fds[1]);
}

/* Stopping a Caller cancels a task that waits on a descriptor. */
TEST(stop_ends_a_waiting_task)
{
    int fds[2];
    make_pipe(fds);
    caller_t *c = check_new_thread("io");
    wait_t w;
    wait_init(&w, fds[0], CALLER_READABLE, CALLER_FOREVER);
    caller_pending_t *p = caller_call_soon(c, wait_task, &w);
    check_until_suspended(c);
    check_stop(c);
    CHECK_RC(atomic_load(&w.rc), -ECANCELED);
    CHECK_EQ(caller_pending_done(p), 1);
    caller_pending_unref(p);
    close(fds[0]);
    close(fds[1]);
}

/* ---- threads ----------------------------------------------------------------------- */

static void *write_byte(void *arg)
{
    int fd = *(int *)arg;
    CHECK_EQ(write(fd, "x", 1), 1);
    return NULL;
}

TEST(plain_thread_blocks_in_poll)
{
    int fds[2];
    make_pipe(fds);
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, write_byte, &fds[1]), 0);
    CHECK_EQ(caller_wait_fd(fds[0], CALLER_READABLE, CALLER_FOREVER), CALLER_READABLE);
    pthread_join(t, NULL);
    char b;
    CHECK_EQ(read(fds[0], &b, 1), 1);
    close(fds[0]);
    close(fds[1]);
}

/* A direct call (a Caller's thread outside its tasks) polls too. */
static void direct_wait(void *arg)
{
    wait_t *w = arg;
    atomic_store(&w->rc, caller_wait_fd(w->fd, w->events, w->timeout));
    sem_post((sem_t *)w->other);
}

TEST(direct_call_polls)
{
    int fds[2];
    make_pipe(fds);
    CHECK_EQ(write(fds[1], "x", 1), 1);
    caller_t *c = check_new_thread("io");
    sem_t done;
    sem_init(&done, 0, 0);
    wait_t w;
    wait_init(&w, fds[0], CALLER_READABLE, scaled(10));
    w.other = (caller_pending_t *)(void *)&done;
    CHECK_RC(caller_call_direct(c, direct_wait, &w), 0);
    check_sem_wait(&done);
    CHECK_EQ(atomic_load(&w.rc), CALLER_READABLE);
    sem_destroy(&done);
    check_no_watches(c);
    check_stop(c);
    close(fds[0]);
    close(fds[1]);
}

/* ---- misuse -------------------------------------------------------------------------- */

/* Every argument error, in the calling context (task or thread). */
static void *bad_arguments(void *arg)
{
    int fd = (int)I(arg);
    CHECK_RC(caller_wait_fd(-1, CALLER_READABLE, 1), -EINVAL);
    CHECK_CONTAINS(check_last_message(), "negative");
    CHECK_RC(caller_wait_fd(fd, 0, 1), -EINVAL);
    CHECK_CONTAINS(check_last_message(), "events");
    CHECK_RC(caller_wait_fd(fd, 4, 1), -EINVAL);
    CHECK_RC(caller_wait_fd(fd, CALLER_READABLE | 8, 1), -EINVAL);
    CHECK_RC(caller_wait_fd(fd, CALLER_READABLE, NAN), -EINVAL);
    CHECK_CONTAINS(check_last_message(), "NaN");
    /* Not open: no descriptor near the limit is. */
    int closed = (int)sysconf(_SC_OPEN_MAX) - 1;
    CHECK_EQ(fcntl(closed, F_GETFD), -1);
    CHECK_RC(caller_wait_fd(closed, CALLER_READABLE, 1), -EBADF);
    CHECK_CONTAINS(check_last_message(), "caller_wait_fd");
    CHECK_RC(caller_wait_fd(closed, CALLER_READABLE, 0), -EBADF);
    return NULL;
}

TEST(bad_arguments)
{
    int fds[2];
    make_pipe(fds);
    bad_arguments(P(fds[0]));
    caller_t *c = check_new_thread("io");
    await(caller_call_soon(c, bad_arguments, P(fds[0])));
    check_no_watches(c);
    check_stop(c);
    close(fds[0]);
    close(fds[1]);
}

/* ---- one descriptor, several waiters -------------------------------------------------- */

TEST(two_waiters_on_one_descriptor)
{
    int sv[2];
    make_socketpair(sv);
    caller_t *c = check_new_thread("io");
    wait_t a, b, t, wr;
    wait_init(&a, sv[0], CALLER_READABLE, CALLER_FOREVER);
    wait_init(&b, sv[0], CALLER_READABLE, CALLER_FOREVER);
    wait_init(&t, sv[0], CALLER_READABLE, 0.05); /* gives up, the others stay */
    wait_init(&wr, sv[0], CALLER_WRITABLE, CALLER_FOREVER);
    caller_pending_t *pa = caller_call_soon(c, wait_task, &a);
    caller_pending_t *pb = caller_call_soon(c, wait_task, &b);
    caller_pending_t *pt = caller_call_soon(c, wait_task, &t);
    /* A writer on the same descriptor shares the watch and is woken
     * alone: the readers wait on. */
    CHECK_EQ(I(await(caller_call_soon(c, wait_task, &wr))), CALLER_WRITABLE);
    CHECK_EQ(I(await(pt)), -ETIMEDOUT);
    CHECK_EQ(caller_pending_done(pa), 0);
    CHECK_EQ(caller_pending_done(pb), 0);
    /* Data wakes every reader. */
    CHECK_EQ(write(sv[1], "x", 1), 1);
    CHECK_EQ(I(await(pa)), CALLER_READABLE);
    CHECK_EQ(I(await(pb)), CALLER_READABLE);
    check_no_watches(c);
    /* A plain thread waits on it alongside a task. */
    wait_init(&a, sv[0], CALLER_READABLE, CALLER_FOREVER);
    pa = caller_call_soon(c, wait_task, &a);
    check_until_suspended(c);
    CHECK_EQ(caller_wait_fd(sv[0], CALLER_READABLE, scaled(10)), CALLER_READABLE);
    CHECK_EQ(I(await(pa)), CALLER_READABLE);
    check_stop(c);
    close(sv[0]);
    close(sv[1]);
}

/* Tasks of two Callers wait on one descriptor: each loop watches it. */
TEST(two_callers_wait_on_one_descriptor)
{
    int fds[2];
    make_pipe(fds);
    caller_t *c1 = check_new_thread("io-1");
    caller_t *c2 = check_new_thread("io-2");
    wait_t a, b;
    wait_init(&a, fds[0], CALLER_READABLE, CALLER_FOREVER);
    wait_init(&b, fds[0], CALLER_READABLE, CALLER_FOREVER);
    caller_pending_t *pa = caller_call_soon(c1, wait_task, &a);
    caller_pending_t *pb = caller_call_soon(c2, wait_task, &b);
    check_until_suspended(c1);
    check_until_suspended(c2);
    CHECK_EQ(write(fds[1], "x", 1), 1);
    CHECK_EQ(I(await(pa)), CALLER_READABLE);
    CHECK_EQ(I(await(pb)), CALLER_READABLE);
    check_stop(c1);
    check_stop(c2);
    close(fds[0]);
    close(fds[1]);
}

/* ---- a descriptor closed while waited on ------------------------------------------------ */

static void *close_fd(void *arg)
{
    return P(close((int)I(arg)));
}

typedef struct {
    int fd, with;
} dup2_t;

static void *dup2_over(void *arg)
{
    dup2_t *d = arg;
    return P(dup2(d->with, d->fd));
}

TEST(descriptor_closed_while_waiting)
{
    int fds[2];
    make_pipe(fds);
    caller_t *c = check_new_thread("io");
    wait_t w;
    wait_init(&w, fds[0], CALLER_READABLE, CALLER_FOREVER);
    caller_pending_t *p = caller_call_soon(c, wait_task, &w);
    /* Another task of the same Caller closes it. */
    CHECK_EQ(I(await(caller_call_soon(c, close_fd, P(fds[0])))), 0);
    CHECK_EQ(I(await(p)), -EBADF);
    check_no_watches(c);

    /* Closed and its number reused for another pipe at once. */
    int other[2];
    make_pipe(other);
    int fd = fcntl(other[0], F_DUPFD_CLOEXEC, 0);
    CHECK(fd >= 0);
    wait_init(&w, fd, CALLER_READABLE, CALLER_FOREVER);
    p = caller_call_soon(c, wait_task, &w);
    int fresh[2];
    make_pipe(fresh);
    dup2_t d = {fd, fresh[0]};
    CHECK_EQ(I(await(caller_call_soon(c, dup2_over, &d))), fd);
    /* A new waiter on the number finds the old watch stale and ends it. */
    wait_t w2;
    wait_init(&w2, fd, CALLER_READABLE, CALLER_FOREVER);
    caller_pending_t *p2 = caller_call_soon(c, wait_task, &w2);
    CHECK_EQ(I(await(p)), -EBADF);
    CHECK_EQ(caller_pending_done(p2), 0);
    CHECK_EQ(write(fresh[1], "x", 1), 1);
    CHECK_EQ(I(await(p2)), CALLER_READABLE);
    /* The old pipe, still open through other[0], never reaches it. */
    CHECK_EQ(write(other[1], "x", 1), 1);
    check_no_watches(c);
    check_stop(c);
    close(fd);
    close(other[0]);
    close(other[1]);
    close(fresh[0]);
    close(fresh[1]);
    close(fds[1]);
}

/* Closed while a duplicate keeps the file open: epoll keeps the file's
 * registration, which fires later for a watch that is gone. */
TEST(descriptor_closed_while_a_duplicate_keeps_it_open)
{
    int fds[2];
    make_pipe(fds);
    int dup_fd = dup(fds[0]);
    CHECK(dup_fd >= 0);
    caller_t *c = check_new_thread("io");
    wait_t w;
    wait_init(&w, fds[0], CALLER_READABLE, CALLER_FOREVER);
    caller_pending_t *p = caller_call_soon(c, wait_task, &w);
    CHECK_EQ(I(await(caller_call_soon(c, close_fd, P(fds[0])))), 0);
    CHECK_EQ(I(await(p)), -EBADF);
    /* The file gets data: its old registration may fire; nothing breaks,
     * and a wait on the duplicate works. */
    CHECK_EQ(write(fds[1], "x", 1), 1);
    wait_init(&w, dup_fd, CALLER_READABLE, CALLER_FOREVER);
    CHECK_EQ(I(await(caller_call_soon(c, wait_task, &w))), CALLER_READABLE);
    /* The old number given the same file again: epoll still has it under
     * that number; a new wait takes the entry over. */
    dup2_t d = {fds[0], dup_fd};
    CHECK_EQ(I(await(caller_call_soon(c, dup2_over, &d))), fds[0]);
    wait_init(&w, fds[0], CALLER_READABLE, CALLER_FOREVER);
    CHECK_EQ(I(await(caller_call_soon(c, wait_task, &w))), CALLER_READABLE);
    char b;
    CHECK_EQ(read(fds[0], &b, 1), 1);
    wait_init(&w, fds[0], CALLER_READABLE, CALLER_FOREVER);
    caller_pending_t *p2 = caller_call_soon(c, wait_task, &w);
    check_until_suspended(c);
    CHECK_EQ(write(fds[1], "y", 1), 1);
    CHECK_EQ(I(await(p2)), CALLER_READABLE);
    check_no_watches(c);
    check_stop(c);
    close(fds[0]);
    close(dup_fd);
    close(fds[1]);
}

/* ---- stress ---------------------------------------------------------------------------- */

/* Ping-pong: a task waits for a byte on `in`, reads it and answers on
 * `out`; a plain thread (caller_wait_fd in poll(2)) sends and waits for
 * the answer. Several pairs at once on one Caller. */
enum { PAIRS = 4, ROUNDS = 2000 };

typedef struct {
    int to_task[2], to_thread[2];
} pair_t;

static void *echo_task(void *arg)
{
    pair_t *pr = arg;
    for (int i = 0; i < ROUNDS; i++) {
        unsigned char b;
        ssize_t n;
        while ((n = read(pr->to_task[0], &b, 1)) < 0 && errno == EAGAIN)
            CHECK_EQ(caller_wait_fd(pr->to_task[0], CALLER_READABLE, scaled(10)), CALLER_READABLE);
        CHECK_EQ(n, 1);
        CHECK_EQ(b, (unsigned char)i);
        CHECK_EQ(write(pr->to_thread[1], &b, 1), 1);
    }
    return NULL;
}

static void *echo_thread(void *arg)
{
    pair_t *pr = arg;
    for (int i = 0; i < ROUNDS; i++) {
        unsigned char b = (unsigned char)i;
        CHECK_EQ(write(pr->to_task[1], &b, 1), 1);
        ssize_t n;
        while ((n = read(pr->to_thread[0], &b, 1)) < 0 && errno == EAGAIN)
            CHECK_EQ(caller_wait_fd(pr->to_thread[0], CALLER_READABLE, scaled(10)),
                     CALLER_READABLE);
        CHECK_EQ(n, 1);
        CHECK_EQ(b, (unsigned char)i);
    }
    return NULL;
}

static void stress(caller_t *c)
{
    pair_t pairs[PAIRS];
    caller_pending_t *tasks[PAIRS];
    pthread_t threads[PAIRS];
    for (int i = 0; i < PAIRS; i++) {
        make_pipe(pairs[i].to_task);
        make_pipe(pairs[i].to_thread);
        tasks[i] = caller_call_soon(c, echo_task, &pairs[i]);
        CHECK_EQ(pthread_create(&threads[i], NULL, echo_thread, &pairs[i]), 0);
    }
    for (int i = 0; i < PAIRS; i++) {
        pthread_join(threads[i], NULL);
        CHECK_RC(caller_pending_wait(tasks[i], scaled(30), CALLER_WAIT_RESULT, NULL), 0);
        caller_pending_unref(tasks[i]);
    }
    check_no_watches(c);
    check_stop(c);
    for (int i = 0; i < PAIRS; i++) {
        close(pairs[i].to_task[0]);
        close(pairs[i].to_task[1]);
        close(pairs[i].to_thread[0]);
        close(pairs[i].to_thread[1]);
    }
}

TEST(stress_wake_wait_cycles)
{
    stress(check_new_thread("io"));
}

TEST(stress_wake_wait_cycles_copy_stack)
{
    stress(copy_caller());
}
