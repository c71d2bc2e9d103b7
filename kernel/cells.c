/*
 * The cells of caller-kernel: see cells.h. A cell runs as a task on the
 * Shell; %example runs its jobs on the Shell's workers (caller_to_thread)
 * and publishes from each worker's thread through that thread's own iopub
 * socket.
 */
#include "cells.h"
#include "iopub.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <sodium.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EXAMPLE_JOBS 20
#define EXAMPLE_SECONDS 0.1

static atomic_ulong cell_seq;

kcell_t *kcell_new(const kwire_msg_t *request, const char *code, caller_t *shell)
{
    kcell_t *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    c->code = strdup(code);
    c->parent.header = json_deep_copy(request->header);
    if (!c->code || !c->parent.header) {
        kcell_free(c);
        return NULL;
    }
    c->seq = atomic_fetch_add(&cell_seq, 1) + 1;
    c->shell = shell;
    return c;
}

void kcell_free(void *arg)
{
    kcell_t *c = arg;
    if (!c)
        return;
    json_decref(c->parent.header);
    free(c->code);
    free(c);
}

/* Record the cell's failure; the task raises it when the cell ends. */
static int fail(kcell_t *c, int code, const char *ename, const char *fmt, ...) CALLER_PRINTF(4, 5);
static int fail(kcell_t *c, int code, const char *ename, const char *fmt, ...)
{
    snprintf(c->ename, sizeof c->ename, "%s", ename);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->evalue, sizeof c->evalue, fmt, ap);
    va_end(ap);
    return code;
}

static int cancelled(kcell_t *c)
{
    return fail(c, -ECANCELED, "KeyboardInterrupt", "the cell was interrupted");
}

static void stream(const kwire_msg_t *parent, const char *text)
{
    kiopub_send(parent, "stream", json_pack("{s:s, s:s}", "name", "stdout", "text", text));
}

/* ------------------------------------------------------------ %callers */

static int run_callers(kcell_t *c)
{
    char *text = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&text, &len);
    if (!f)
        return fail(c, -ENOMEM, "MemoryError", "no memory for the table");
    caller_print_table(f, 0);
    fclose(f);
    stream(&c->parent, text);
    free(text);
    return 0;
}

/* ------------------------------------------------------------- %sleep */

static bool parse_seconds(const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (end == s || *end || errno || !isfinite(v) || v < 0)
        return false;
    *out = v;
    return true;
}

static int run_sleep(kcell_t *c, const char *args)
{
    double s;
    if (!parse_seconds(args, &s))
        return fail(c, -EINVAL, "UsageError", "%%sleep takes a number of seconds >= 0, not '%s'",
                    args);
    int rc = caller_sleep(s);
    if (rc == -ECANCELED)
        return cancelled(c);
    if (rc != 0)
        return fail(c, rc, "SleepError", "%s", caller_strerror(rc));
    return 0;
}

/* ----------------------------------------------------------- %example */

/* One job of %example: what its worker needs, owned by the job's Pending
 * (its user data), so it outlives a cell that is interrupted while the
 * job still runs. */
typedef struct job {
    int n;
    double seconds;
    unsigned long seq;
    kwire_msg_t parent; /* .header: a copy of the cell's, for this job alone */
} job_t;

static void job_free(void *arg)
{
    job_t *j = arg;
    json_decref(j->parent.header);
    free(j);
}

/* Each worker thread shows one line per cell (the seed's per-worker
 * output widget): the first job it runs for a cell displays it, later
 * ones update it. */
static _Thread_local unsigned long shown_seq;
static _Thread_local char display_id[64];

static void *example_job(void *arg)
{
    job_t *j = arg;
    double seconds = j->seconds * (0.5 + randombytes_uniform(1001) / 1000.0);
    char who[128], text[256];
    caller_repr(caller_current(), who, sizeof who);
    snprintf(text, sizeof text, "%s n=%04d sleeping %03.0f ms", who, j->n, seconds * 1000);
    const char *type = "update_display_data";
    if (shown_seq != j->seq) {
        shown_seq = j->seq;
        snprintf(display_id, sizeof display_id, "example-%lu-worker-%ld", j->seq, (long)gettid());
        type = "display_data";
    }
    kiopub_send(&j->parent, type,
                json_pack("{s:{s:s}, s:{}, s:{s:s}}", "data", "text/plain", text, "metadata",
                          "transient", "display_id", display_id));
    int rc = caller_sleep(seconds);
    /* Everything this worker published is forwarded before the job ends,
     * so before the cell's "Finished" line and its idle status. */
    kiopub_flush();
    if (rc != 0) {
        caller_raise(rc, "job %d: %s", j->n, caller_strerror(rc));
        return NULL;
    }
    return (void *)(intptr_t)j->n;
}

typedef struct example {
    kcell_t *cell;
    int jobs, next;
    double seconds;
    int submit_error; /* the code caller_to_thread failed with, if it did */
} example_t;

/* The seed's run_forever(), bounded: the next job as a caller_to_thread
 * Pending, or NULL after the last. as_completed asks only while fewer than
 * max_concurrent are outstanding, which bounds the workers. */
static caller_pending_t *example_next(void *arg)
{
    example_t *ex = arg;
    if (ex->next >= ex->jobs || ex->submit_error)
        return NULL;
    job_t *j = calloc(1, sizeof *j);
    if (!j || !(j->parent.header = json_deep_copy(ex->cell->parent.header))) {
        free(j);
        ex->submit_error = -ENOMEM;
        return NULL;
    }
    j->n = ++ex->next;
    j->seconds = ex->seconds;
    j->seq = ex->cell->seq;
    caller_pending_t *p = caller_to_thread(ex->cell->shell, example_job, j);
    if (!p) {
        ex->submit_error = caller_last_error(NULL);
        job_free(j);
        return NULL;
    }
    caller_pending_set_userdata(p, j, job_free);
    return p;
}

static int parse_example(kcell_t *c, const char *args, example_t *ex)
{
    ex->jobs = EXAMPLE_JOBS;
    ex->seconds = EXAMPLE_SECONDS;
    char *copy = strdup(args), *save = NULL;
    if (!copy)
        return fail(c, -ENOMEM, "MemoryError", "no memory");
    int rc = 0;
    for (char *w = strtok_r(copy, " \t", &save); w && rc == 0; w = strtok_r(NULL, " \t", &save)) {
        char *end;
        if (strncmp(w, "jobs=", 5) == 0) {
            long n = strtol(w + 5, &end, 10);
            if (end == w + 5 || *end || n < 0 || n > 1000000)
                rc = fail(c, -EINVAL, "UsageError", "jobs must be a count from 0 to 1000000");
            ex->jobs = (int)n;
        } else if (strncmp(w, "seconds=", 8) == 0) {
            if (!parse_seconds(w + 8, &ex->seconds))
                rc = fail(c, -EINVAL, "UsageError", "seconds must be a number >= 0");
        } else {
            rc =
                fail(c, -EINVAL, "UsageError", "%%example takes jobs=N and seconds=S, not '%s'", w);
        }
    }
    free(copy);
    return rc;
}

static int run_example(kcell_t *c, const char *args)
{
    example_t ex = {.cell = c};
    int rc = parse_example(c, args, &ex);
    if (rc != 0)
        return rc;
    caller_iter_t *it = caller_as_completed_gen(example_next, &ex, NULL);
    if (!it)
        return fail(c, caller_last_error(NULL), "RuntimeError", "as_completed: %s",
                    caller_strerror(caller_last_error(NULL)));
    int finished = 0, failed = 0;
    caller_pending_t *p;
    while ((rc = caller_iter_next(it, &p)) == 0) {
        if (caller_pending_result(p, NULL) == 0)
            finished++;
        else
            failed++;
        caller_pending_unref(p);
    }
    caller_iter_close(it); /* cancels the jobs still running, if any */
    if (rc == -ECANCELED)
        return cancelled(c);
    if (rc != CALLER_ITER_END)
        return fail(c, rc, "RuntimeError", "as_completed: %s", caller_strerror(rc));
    if (ex.submit_error)
        return fail(c, ex.submit_error, "RuntimeError", "to_thread: %s",
                    caller_strerror(ex.submit_error));
    char text[64];
    snprintf(text, sizeof text, "Finished: %d\n", finished);
    stream(&c->parent, text);
    if (failed)
        return fail(c, -EIO, "RuntimeError", "%d of %d jobs failed", failed, ex.jobs);
    return 0;
}

/* --------------------------------------------------------------- cells */

static const char *const magics[] = {"%callers", "%sleep", "%example"};

static char *trim(char *s)
{
    while (isspace((unsigned char)*s))
        s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1]))
        *--e = '\0';
    return s;
}

static int run_line(kcell_t *c, char *line)
{
    char whole[160];
    snprintf(whole, sizeof whole, "%s", line);
    char *args = line;
    while (*args && !isspace((unsigned char)*args))
        args++;
    if (*args)
        *args++ = '\0';
    args = trim(args);
    if (strcmp(line, "%callers") == 0 && !*args)
        return run_callers(c);
    if (strcmp(line, "%sleep") == 0)
        return run_sleep(c, args);
    if (strcmp(line, "%example") == 0)
        return run_example(c, args);
    return fail(c, -EINVAL, "UnknownCommand",
                "'%s' is not a command of caller-kernel: a cell holds %%callers, %%sleep S or "
                "%%example [jobs=N] [seconds=S], one per line",
                whole);
}

void *kcell_run(void *arg)
{
    kcell_t *c = arg;
    char *code = strdup(c->code), *save = NULL;
    int rc = code ? 0 : fail(c, -ENOMEM, "MemoryError", "no memory");
    for (char *l = code ? strtok_r(code, "\n", &save) : NULL; l && rc == 0;
         l = strtok_r(NULL, "\n", &save)) {
        l = trim(l);
        if (*l)
            rc = run_line(c, l);
    }
    free(code);
    if (rc != 0)
        caller_raise(rc, "%s: %s", c->ename, c->evalue);
    return NULL;
}

json_t *kcell_complete(const char *prefix)
{
    json_t *a = json_array();
    for (size_t i = 0; a && i < sizeof magics / sizeof *magics; i++)
        if (strncmp(magics[i], prefix, strlen(prefix)) == 0)
            json_array_append_new(a, json_string(magics[i]));
    return a;
}
