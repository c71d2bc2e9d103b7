/* Waiting for I/O: a task reads a pipe that another thread writes; while
 * it waits, its thread is free (caller_wait_fd suspends only the task). */
// RUN-IN-TESTS
#include <caller.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int fds[2];

static void *writer(void *arg) /* runs in a child Caller's thread */
{
    (void)arg;
    const char *lines[] = {"one\n", "two\n", "three\n"};
    for (int i = 0; i < 3; i++) {
        caller_sleep(0.01);
        if (write(fds[1], lines[i], strlen(lines[i])) < 0)
            caller_raise(-errno, "write failed");
    }
    close(fds[1]); /* the reader sees the end of the pipe */
    return NULL;
}

static void *body(void *arg) /* a task on the main thread */
{
    (void)arg;
    caller_t *child = caller_get(caller_current(), NULL);
    caller_pending_t *w = caller_call_soon(child, writer, NULL);
    char buf[64];
    for (;;) {
        ssize_t n = read(fds[0], buf, sizeof buf); /* non-blocking */
        if (n > 0) {
            fwrite(buf, 1, (size_t)n, stdout);
            continue;
        }
        if (n == 0 || errno != EAGAIN)
            break; /* the end (or an error) */
        int rc = caller_wait_fd(fds[0], CALLER_READABLE, 5.0);
        if (rc < 0) {
            fprintf(stderr, "caller_wait_fd: %s\n", caller_strerror(rc));
            break;
        }
    }
    caller_pending_wait(w, 5.0, 0, NULL);
    caller_pending_unref(w);
    caller_unref(child);
    return NULL; /* stops the Caller and its child */
}

int main(void)
{
    if (pipe(fds) != 0 || fcntl(fds[0], F_SETFL, O_NONBLOCK) != 0)
        return 1;
    caller_t *c = caller_create(CALLER_MANUAL, NULL);
    int rc = caller_run(c, body, NULL, NULL);
    caller_unref(c);
    close(fds[0]);
    return rc;
}
