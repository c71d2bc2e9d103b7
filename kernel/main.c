/*
 * caller-kernel: a minimal Jupyter kernel (messaging protocol 5.3) on
 * libcaller.
 *
 *   caller-kernel -f CONNECTION_FILE            run (Jupyter starts it so)
 *   caller-kernel install [--user | --prefix P] write the kernelspec
 *
 * Threads:
 *  - main: the Shell Caller (manual, protected), whose first task serves
 *    the shell socket; each execute_request runs as its own task on the
 *    Shell (its Pending is what interrupt_request cancels);
 *  - Control: a protected child Caller of the Shell, named "Control",
 *    whose task serves the control socket, so kernel_info, interrupt and
 *    shutdown are answered while a cell runs;
 *  - caller-worker: the Shell's worker pool (%example);
 *  - heartbeat: a plain thread echoing on the hb socket;
 *  - iopub: a plain thread forwarding the Callers' iopub sockets to the
 *    client (iopub.h).
 * Every ZeroMQ socket is used by one thread only; the shell and control
 * sockets are made and bound in main before the Callers start and handed
 * to their thread by the scheduling call (a full memory barrier).
 *
 * Lock order: `cell_lock` is a leaf; under it only Pending references are
 * taken and released (an interrupt cancels after letting it go).
 */
#include "cells.h"
#include "iopub.h"
#include "wire.h"

#include <caller.h>

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zmq.h>

static void *zctx;
static caller_t *shell;
static void *shell_socket, *control_socket;
static atomic_bool control_socket_taken;
/* Completed when a shutdown_request has been answered (on either channel). */
static caller_pending_t *shutdown_requested;
static int execution_count; /* the Shell's thread only */

/* The Pending of the cell that runs now (a reference), for interrupts. */
static pthread_mutex_t cell_lock = PTHREAD_MUTEX_INITIALIZER;
static caller_pending_t *running_cell;

/* ------------------------------------------------------------ replies */

static void reply(void *socket, const kwire_msg_t *req, const char *type, json_t *content)
{
    if (kwire_send(socket, req, true, NULL, type, content) != 0)
        fprintf(stderr, "caller-kernel: could not send %s: %s\n", type, zmq_strerror(zmq_errno()));
}

static json_t *kernel_info(void)
{
    char banner[160];
    snprintf(banner, sizeof banner,
             "caller-kernel %s: libcaller's Jupyter kernel. Cells: %%callers, %%sleep S, "
             "%%example [jobs=N] [seconds=S]",
             caller_version_string());
    return json_pack("{s:s, s:s, s:s, s:s, s:{s:s, s:s, s:s, s:s}, s:s, s:[]}", "status", "ok",
                     "protocol_version", "5.3", "implementation", "caller-kernel",
                     "implementation_version", caller_version_string(), "language_info", "name",
                     "caller", "version", caller_version_string(), "mimetype", "text/plain",
                     "file_extension", ".txt", "banner", banner, "help_links");
}

/* ------------------------------------------------------------ execute */

static void execute(void *socket, const kwire_msg_t *req)
{
    const char *code = json_string_value(json_object_get(req->content, "code"));
    bool silent = json_is_true(json_object_get(req->content, "silent"));
    json_t *sh = json_object_get(req->content, "store_history");
    bool store = !silent && (!sh || json_is_true(sh));
    if (!code) {
        reply(socket, req, "execute_reply",
              json_pack("{s:s, s:i, s:s, s:s, s:[s]}", "status", "error", "execution_count",
                        execution_count, "ename", "BadRequest", "evalue",
                        "execute_request without code", "traceback",
                        "BadRequest: execute_request without code"));
        return;
    }
    if (store)
        execution_count++;
    if (!silent)
        kiopub_send(req, "execute_input",
                    json_pack("{s:s, s:i}", "code", code, "execution_count", execution_count));

    kcell_t *cell = kcell_new(req, code, shell);
    caller_pending_t *p = cell ? caller_call_soon(shell, kcell_run, cell) : NULL;
    int rc;
    if (!p) {
        rc = cell ? caller_last_error(NULL) : -ENOMEM;
        kcell_free(cell);
        cell = NULL;
    } else {
        caller_pending_set_userdata(p, cell, kcell_free);
        pthread_mutex_lock(&cell_lock);
        running_cell = caller_pending_ref(p);
        pthread_mutex_unlock(&cell_lock);
        /* Not protected: if this task is cancelled (shutdown), so is the
         * cell. The cell belongs to its Pending, so it lives as long as
         * the task that runs it, whatever happens here. */
        rc = caller_pending_wait(p, CALLER_FOREVER, CALLER_WAIT_RESULT, NULL);
        pthread_mutex_lock(&cell_lock);
        caller_pending_unref(running_cell);
        running_cell = NULL;
        pthread_mutex_unlock(&cell_lock);
    }

    json_t *content;
    if (rc == 0) {
        content = json_pack("{s:s, s:i, s:{}, s:[]}", "status", "ok", "execution_count",
                            execution_count, "user_expressions", "payload");
    } else {
        char ename[64], evalue[512];
        if (cell && cell->ename[0] && caller_pending_done(p) == 1) {
            snprintf(ename, sizeof ename, "%s", cell->ename);
            snprintf(evalue, sizeof evalue, "%s", cell->evalue);
        } else if (rc == -ECANCELED) {
            snprintf(ename, sizeof ename, "KeyboardInterrupt");
            snprintf(evalue, sizeof evalue, "the cell was interrupted");
        } else {
            snprintf(ename, sizeof ename, "RuntimeError");
            snprintf(evalue, sizeof evalue, "%s", caller_strerror(rc));
        }
        char line[600];
        snprintf(line, sizeof line, "%s: %s", ename, evalue);
        kiopub_send(
            req, "error",
            json_pack("{s:s, s:s, s:[s]}", "ename", ename, "evalue", evalue, "traceback", line));
        content = json_pack("{s:s, s:i, s:s, s:s, s:[s]}", "status", "error", "execution_count",
                            execution_count, "ename", ename, "evalue", evalue, "traceback", line);
    }
    caller_pending_unref(p);
    reply(socket, req, "execute_reply", content);
}

/* ------------------------------------------------------------ control */

static void interrupt(void)
{
    pthread_mutex_lock(&cell_lock);
    caller_pending_t *p = caller_pending_ref(running_cell);
    pthread_mutex_unlock(&cell_lock);
    if (p) {
        caller_pending_cancel(p, "interrupted by interrupt_request");
        caller_pending_unref(p);
    }
}

/* ----------------------------------------------------------- dispatch */

typedef enum { SHELL, CONTROL } channel_t;

/* Handle one request. @return false once the kernel is shutting down. */
static bool dispatch(channel_t ch, void *socket, const kwire_msg_t *req)
{
    const char *type = req->msg_type;
    bool go_on = true;
    kiopub_status(req, "busy");
    if (strcmp(type, "kernel_info_request") == 0) {
        reply(socket, req, "kernel_info_reply", kernel_info());
    } else if (strcmp(type, "execute_request") == 0 && ch == SHELL) {
        execute(socket, req);
    } else if (strcmp(type, "interrupt_request") == 0 && ch == CONTROL) {
        interrupt();
        reply(socket, req, "interrupt_reply", json_pack("{s:s}", "status", "ok"));
    } else if (strcmp(type, "shutdown_request") == 0) {
        json_t *restart = json_object_get(req->content, "restart");
        bool r = json_is_true(restart);
        reply(socket, req, "shutdown_reply", json_pack("{s:s, s:b}", "status", "ok", "restart", r));
        kiopub_send(req, "shutdown_reply", json_pack("{s:s, s:b}", "status", "ok", "restart", r));
        go_on = false;
    } else if (strcmp(type, "is_complete_request") == 0) {
        reply(socket, req, "is_complete_reply", json_pack("{s:s}", "status", "complete"));
    } else if (strcmp(type, "complete_request") == 0) {
        const char *code = json_string_value(json_object_get(req->content, "code"));
        json_t *pos = json_object_get(req->content, "cursor_pos");
        json_int_t cursor = json_is_integer(pos) ? json_integer_value(pos) : 0;
        char prefix[64] = "";
        if (code && cursor >= 0 && (size_t)cursor <= strlen(code) && cursor < 64) {
            memcpy(prefix, code, (size_t)cursor);
            prefix[cursor] = '\0';
        }
        reply(socket, req, "complete_reply",
              json_pack("{s:s, s:o, s:i, s:I, s:{}}", "status", "ok", "matches",
                        kcell_complete(prefix), "cursor_start", 0, "cursor_end", cursor,
                        "metadata"));
    } else if (strcmp(type, "inspect_request") == 0) {
        reply(socket, req, "inspect_reply",
              json_pack("{s:s, s:b, s:{}, s:{}}", "status", "ok", "found", 0, "data", "metadata"));
    } else if (strcmp(type, "history_request") == 0) {
        reply(socket, req, "history_reply", json_pack("{s:s, s:[]}", "status", "ok", "history"));
    } else if (strcmp(type, "comm_info_request") == 0) {
        reply(socket, req, "comm_info_reply", json_pack("{s:s, s:{}}", "status", "ok", "comms"));
    } else {
        fprintf(stderr, "caller-kernel: ignored a %s on %s\n", type,
                ch == SHELL ? "shell" : "control");
    }
    kiopub_status(req, "idle");
    return go_on;
}

/* Serve @p socket in the running task until it is cancelled or a
 * shutdown_request arrives. caller_wait_zmq() suspends the task until the
 * socket has a message (it handles ZMQ_FD's edge trigger); then every
 * queued message is read, without waiting, before the next wait. */
static void serve(void *socket, channel_t ch)
{
    bool go_on = true;
    int rc = 0;
    while (go_on && (rc = caller_wait_zmq(socket, CALLER_READABLE, CALLER_FOREVER)) > 0) {
        kwire_msg_t m;
        int r;
        while (go_on && (r = kwire_recv(socket, &m)) >= 0) {
            if (r == 1) {
                go_on = dispatch(ch, socket, &m);
                kwire_msg_free(&m);
            }
        }
    }
    if (go_on && rc != -ECANCELED)
        fprintf(stderr, "caller-kernel: waiting on the %s socket: %s\n",
                ch == SHELL ? "shell" : "control", caller_strerror(rc));
    if (!go_on)
        caller_pending_set_result(shutdown_requested, NULL, 0);
}

static void *control_main(void *arg)
{
    (void)arg;
    atomic_store(&control_socket_taken, true);
    serve(control_socket, CONTROL);
    zmq_close(control_socket);
    return NULL;
}

static void *shell_serve(void *arg)
{
    (void)arg;
    serve(shell_socket, SHELL);
    return NULL;
}

/* The Shell's first task: when it returns, caller_run() stops the Shell
 * and its children (Control, the workers). It waits for a shutdown_request,
 * then ends the shell's task (cancelling a cell that still runs). */
static void *shell_main(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    caller_options_t o = {.name = "Control", .protect = true};
    caller_t *control = caller_get(self, &o);
    caller_pending_t *p = control ? caller_call_soon(control, control_main, NULL) : NULL;
    caller_unref(control);
    caller_pending_t *shell_task = p ? caller_call_soon(self, shell_serve, NULL) : NULL;
    if (!p || !shell_task) {
        const char *msg;
        caller_last_error(&msg);
        fprintf(stderr, "caller-kernel: cannot start serving: %s\n", msg);
        caller_pending_unref(p);
        caller_raise(caller_last_error(NULL), "%s", msg);
        return NULL;
    }
    caller_pending_unref(p);
    kiopub_status(NULL, "starting");
    caller_pending_wait(shutdown_requested, CALLER_FOREVER, CALLER_WAIT_PROTECT, NULL);
    caller_pending_cancel(shell_task, "shutdown_request");
    caller_pending_wait(shell_task, CALLER_FOREVER, CALLER_WAIT_PROTECT, NULL);
    caller_pending_unref(shell_task);
    return NULL;
}

/* ---------------------------------------------------------- heartbeat */

static void *heartbeat(void *socket)
{
    zmq_msg_t m;
    zmq_msg_init(&m);
    for (;;) {
        if (zmq_msg_recv(&m, socket, 0) < 0) {
            if (zmq_errno() == EINTR)
                continue;
            break; /* ETERM: the kernel is ending */
        }
        if (zmq_msg_send(&m, socket, zmq_msg_more(&m) ? ZMQ_SNDMORE : 0) < 0 &&
            zmq_errno() == ETERM)
            break;
    }
    zmq_msg_close(&m);
    zmq_close(socket);
    return NULL;
}

/* ------------------------------------------------------------ sockets */

static void *bound(int type, const kwire_connection_t *conn, int port, const char *what)
{
    char url[128];
    kwire_endpoint(conn, port, url, sizeof url);
    void *s = zmq_socket(zctx, type);
    int linger = 1000;
    if (!s || zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger) != 0 || zmq_bind(s, url) != 0) {
        fprintf(stderr, "caller-kernel: %s socket at %s: %s\n", what, url,
                zmq_strerror(zmq_errno()));
        if (s)
            zmq_close(s);
        return NULL;
    }
    return s;
}

static int run(const char *connection_file)
{
    kwire_connection_t conn;
    char err[512];
    if (kwire_read_connection(connection_file, &conn, err, sizeof err) != 0) {
        fprintf(stderr, "caller-kernel: %s\n", err);
        return 1;
    }
    if (kwire_init(conn.key) != 0) {
        fprintf(stderr, "caller-kernel: cannot initialise libsodium\n");
        return 1;
    }
    /* Interrupts come as interrupt_request (kernel.json: interrupt_mode
     * "message"); a terminal's Ctrl-C aimed at the client must not kill
     * the kernel. */
    signal(SIGINT, SIG_IGN);
    zctx = zmq_ctx_new();
    caller_iopub_set_url("inproc://caller-kernel-iopub");
    char iopub_url[128];
    kwire_endpoint(&conn, conn.iopub_port, iopub_url, sizeof iopub_url);
    int status = 1;
    void *hb = NULL, *stdin_socket = NULL;
    bool hb_started = false;
    pthread_t hb_thread;
    if (kiopub_start(zctx, iopub_url, err, sizeof err) != 0) {
        fprintf(stderr, "caller-kernel: %s\n", err);
        goto out;
    }
    shell_socket = bound(ZMQ_ROUTER, &conn, conn.shell_port, "shell");
    control_socket = bound(ZMQ_ROUTER, &conn, conn.control_port, "control");
    stdin_socket = bound(ZMQ_ROUTER, &conn, conn.stdin_port, "stdin");
    hb = bound(ZMQ_REP, &conn, conn.hb_port, "heartbeat");
    if (!shell_socket || !control_socket || !stdin_socket || !hb)
        goto out;
    if (pthread_create(&hb_thread, NULL, heartbeat, hb) != 0) {
        fprintf(stderr, "caller-kernel: cannot start the heartbeat thread\n");
        goto out;
    }
    hb = NULL; /* the heartbeat thread's now */
    hb_started = true;

    shutdown_requested = caller_pending_new(CALLER_PENDING_UNTRACKED);
    caller_options_t o = {.name = "Shell", .protect = true, .zmq_context = zctx};
    shell = shutdown_requested ? caller_create(CALLER_MANUAL, &o) : NULL;
    if (!shell) {
        const char *msg;
        caller_last_error(&msg);
        fprintf(stderr, "caller-kernel: cannot create the Shell caller: %s\n", msg);
        goto out;
    }
    status = caller_run(shell, shell_main, NULL, NULL) == 0 ? 0 : 1;
    caller_unref(shell);
    shell = NULL;
out:
    if (shell_socket)
        zmq_close(shell_socket);
    if (control_socket && !atomic_load(&control_socket_taken))
        zmq_close(control_socket);
    if (stdin_socket)
        zmq_close(stdin_socket);
    if (hb)
        zmq_close(hb);
    caller_pending_unref(shutdown_requested);
    /* Every Caller has stopped and closed its iopub socket: end the
     * heartbeat and iopub threads (their blocking calls return ETERM). */
    zmq_ctx_shutdown(zctx);
    if (hb_started)
        pthread_join(hb_thread, NULL);
    kiopub_join();
    zmq_ctx_term(zctx);
    /* For the tests: every Caller (Shell, Control, workers) and every
     * Pending (cells, jobs, flushes) must be gone by now. */
    if (getenv("CALLER_KERNEL_CHECK_LEAKS") &&
        (caller_live_count() != 0 || caller_pending_live_count() != 0)) {
        fprintf(stderr, "caller-kernel: %zu Callers and %zu Pendings still alive at exit\n",
                caller_live_count(), caller_pending_live_count());
        status = 3;
    }
    return status;
}

/* ------------------------------------------------------------ install */

/* Write P/share/jupyter/kernels/caller/kernel.json naming this program. */
static int install(int argc, char **argv)
{
    char dir[PATH_MAX + 32], exe[PATH_MAX];
    const char *prefix = NULL;
    bool user = false;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "--user") == 0 && !prefix)
            user = true;
        else if (strcmp(argv[i], "--prefix") == 0 && i + 1 < argc && !user)
            prefix = argv[++i];
        else {
            fprintf(stderr, "usage: caller-kernel install [--user | --prefix PREFIX]\n");
            return 2;
        }
    }
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n < 0) {
        perror("caller-kernel: /proc/self/exe");
        return 1;
    }
    exe[n] = '\0';
    char base[PATH_MAX];
    if (user) {
        const char *data = getenv("XDG_DATA_HOME"), *home = getenv("HOME");
        if (data && *data)
            snprintf(base, sizeof base, "%s/jupyter", data);
        else if (home)
            snprintf(base, sizeof base, "%s/.local/share/jupyter", home);
        else {
            fprintf(stderr, "caller-kernel: no HOME for --user\n");
            return 1;
        }
    } else if (prefix) {
        snprintf(base, sizeof base, "%s/share/jupyter", prefix);
    } else {
        /* Beside the program: <prefix>/bin/caller-kernel ->
         * <prefix>/share/jupyter, as `make install` places it. */
        char *slash = strrchr(exe, '/');
        snprintf(base, sizeof base, "%.*s/../share/jupyter", (int)(slash - exe), exe);
    }
    snprintf(dir, sizeof dir, "%s/kernels/caller", base);
    /* mkdir -p */
    for (char *s = dir + 1; *s; s++)
        if (*s == '/') {
            *s = '\0';
            mkdir(dir, 0755);
            *s = '/';
        }
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "caller-kernel: mkdir %s: %s\n", dir, strerror(errno));
        return 1;
    }
    json_t *spec = json_pack("{s:[s,s,s], s:s, s:s, s:s, s:{}}", "argv", exe, "-f",
                             "{connection_file}", "display_name", "Caller (C)", "language",
                             "caller", "interrupt_mode", "message", "metadata");
    char path[PATH_MAX + 64];
    snprintf(path, sizeof path, "%s/kernel.json", dir);
    if (!spec || json_dump_file(spec, path, JSON_INDENT(2)) != 0) {
        fprintf(stderr, "caller-kernel: cannot write %s\n", path);
        json_decref(spec);
        return 1;
    }
    json_decref(spec);
    printf("Installed the caller kernelspec in %s\n", dir);
    return 0;
}

static void usage(FILE *f)
{
    fprintf(f, "usage: caller-kernel -f CONNECTION_FILE\n"
               "       caller-kernel install [--user | --prefix PREFIX]\n");
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "install") == 0)
        return install(argc, argv);
    if (argc == 3 && strcmp(argv[1], "-f") == 0)
        return run(argv[2]);
    if (argc == 2 && (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0)) {
        usage(stdout);
        return 0;
    }
    usage(stderr);
    return 2;
}
