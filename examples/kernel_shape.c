/*
 * The shape of a kernel's use of Callers: the Shell Caller runs on the main
 * thread, a protected child named "ControlThread" beside it, workers for
 * blocking work. Every thread publishes on its own iopub socket (a PUB per
 * Caller, opened in that Caller's thread) to a SUB bound at the iopub URL;
 * a collector thread prints what arrives. At the end the Shell prints the
 * callers table.
 */
// RUN-IN-TESTS
// NEEDS-ZMQ
#include <caller.h>

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <zmq.h>

enum { SHELL, CONTROL, WORKER0, PUBLISHERS = WORKER0 + 3 };

static atomic_int heard[PUBLISHERS]; /* the collector heard this one's hello */
static void *ctx;

/* Publish from the calling thread through its own iopub socket. A new PUB
 * socket's first messages can be lost while the subscription travels to it,
 * so say hello until the collector has heard, then say what there is to say. */
static void *publish(void *arg)
{
    int id = (int)(intptr_t)arg;
    void *s = caller_iopub_socket();
    char who[96], msg[160];
    caller_repr(caller_current(), who, sizeof who);
    while (!atomic_load(&heard[id])) {
        snprintf(msg, sizeof msg, "%d hello", id);
        zmq_send(s, msg, strlen(msg), 0);
        caller_sleep(0.005);
    }
    for (int i = 1; i <= 2; i++) {
        snprintf(msg, sizeof msg, "%d %s says: message %d", id, who, i);
        zmq_send(s, msg, strlen(msg), 0);
    }
    return NULL;
}

static void *collector(void *arg)
{
    void *sub = arg; /* bound before any Caller started; used only here */
    int done = 0, seen[PUBLISHERS] = {0};
    char buf[256];
    while (done < PUBLISHERS) {
        int n = zmq_recv(sub, buf, sizeof buf - 1, 0);
        if (n < 0)
            break;
        buf[n] = '\0';
        int id = buf[0] - '0';
        if (id < 0 || id >= PUBLISHERS)
            continue;
        if (strstr(buf, " hello")) {
            atomic_store(&heard[id], 1);
            continue;
        }
        printf("iopub <- %s\n", buf + 2);
        if (++seen[id] == 2)
            done++;
    }
    zmq_close(sub);
    return NULL;
}

static void *shell(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    caller_t *control =
        caller_get(self, &(caller_options_t){.name = "ControlThread", .protect = true});
    caller_pending_t *p[PUBLISHERS];
    p[CONTROL] = caller_call_soon(control, publish, (void *)CONTROL);
    for (int i = WORKER0; i < PUBLISHERS; i++)
        p[i] = caller_to_thread(self, publish, (void *)(intptr_t)i);
    publish((void *)SHELL);
    for (int i = CONTROL; i < PUBLISHERS; i++) {
        caller_pending_wait(p[i], 10, 0, NULL);
        caller_pending_unref(p[i]);
    }
    printf("\n");
    caller_print_table(stdout, 0);
    caller_unref(control);
    return NULL; /* stops the Shell, its ControlThread and its workers */
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    ctx = zmq_ctx_new();
    void *sub = zmq_socket(ctx, ZMQ_SUB);
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0);
    char url[256];
    caller_iopub_url(url, sizeof url);
    if (zmq_bind(sub, url) != 0) {
        fprintf(stderr, "bind %s: %s\n", url, zmq_strerror(zmq_errno()));
        return 1;
    }
    pthread_t t;
    pthread_create(&t, NULL, collector, sub);
    caller_t *c = caller_create(
        CALLER_MANUAL, &(caller_options_t){.name = "Shell", .protect = true, .zmq_context = ctx});
    int rc = caller_run(c, shell, NULL, NULL);
    caller_unref(c);
    pthread_join(t, NULL);
    zmq_ctx_term(ctx); /* returns: every Caller closed its socket as it stopped */
    return rc == 0 ? 0 : 1;
}
