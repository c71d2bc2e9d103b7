/*
 * Building blocks of the raw floors, written for these benchmarks and kept
 * as plain as a careful C programmer would write them by hand:
 *
 *  - bench_job_t: a malloc'd call record (function, argument, result), the
 *    floors' counterpart of a Pending;
 *  - uvq_t: a libuv loop fed through a mutex-protected FIFO plus one
 *    uv_async_t (push, unlock, uv_async_send; the async callback takes the
 *    whole list under the lock and runs it), the libuv floor of W1-W3 and W6;
 *  - bench_waiter_t: what a plain thread blocks on until a job ran (a mutex,
 *    a condvar and a flag);
 *  - glq_t (in a build with GLib): a GMainLoop on its own thread, fed with
 *    g_main_context_invoke() (GLib's own way to run a function in another
 *    thread's context: one idle GSource per call), the raw GLib floor.
 */
#ifndef CALLER_BENCH_FLOORS_H
#define CALLER_BENCH_FLOORS_H

#include <caller_config.h> /* CALLER_WITH_GLIB */
#include <pthread.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

typedef void *(*bench_fn_t)(void *arg);

struct bench_job;
/* Hand a call record to a floor's thread (ptq, uvq or glq, as void *), for
 * a workload written once over the floors: bench_push_ptq, _uvq, _glq. */
typedef void (*bench_push_fn)(void *q, struct bench_job *j);

/* A waiter a plain thread blocks on (one per waiting thread, reused). */
typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bool done;
} bench_waiter_t;

static inline void bench_waiter_init(bench_waiter_t *w)
{
    pthread_mutex_init(&w->lock, NULL);
    pthread_cond_init(&w->cond, NULL);
    w->done = false;
}

static inline void bench_waiter_destroy(bench_waiter_t *w)
{
    pthread_mutex_destroy(&w->lock);
    pthread_cond_destroy(&w->cond);
}

static inline void bench_waiter_post(bench_waiter_t *w)
{
    pthread_mutex_lock(&w->lock);
    w->done = true;
    pthread_cond_signal(&w->cond);
    pthread_mutex_unlock(&w->lock);
}

/* Wait until posted, and re-arm. */
static inline void bench_waiter_wait(bench_waiter_t *w)
{
    pthread_mutex_lock(&w->lock);
    while (!w->done)
        pthread_cond_wait(&w->cond, &w->lock);
    w->done = false;
    pthread_mutex_unlock(&w->lock);
}

/* A call record. With a waiter, the runner posts it after the call and the
 * waiting thread frees the job; without, the runner frees it. */
typedef struct bench_job {
    struct bench_job *next;
    bench_fn_t fn;
    void *arg;
    void *result;
    bench_waiter_t *waiter;
} bench_job_t;

static inline bench_job_t *bench_job_new(bench_fn_t fn, void *arg, bench_waiter_t *waiter)
{
    bench_job_t *j = malloc(sizeof *j);
    if (!j)
        abort();
    j->next = NULL;
    j->fn = fn;
    j->arg = arg;
    j->result = NULL;
    j->waiter = waiter;
    return j;
}

/* Run a list of jobs in order. Returns how many ran. */
static inline size_t bench_jobs_run(bench_job_t *j)
{
    size_t n = 0;
    while (j) {
        bench_job_t *next = j->next;
        j->result = j->fn(j->arg);
        if (j->waiter)
            bench_waiter_post(j->waiter);
        else
            free(j);
        j = next;
        n++;
    }
    return n;
}

/* ---- libuv: a loop fed by a locked queue and uv_async_send -------------- */

typedef struct uvq {
    uv_loop_t loop;
    uv_async_t async;
    uv_mutex_t lock;
    bench_job_t *head, **tail;
    bool stopping;
    size_t ran;
    uv_thread_t thread;
    void (*on_drained)(struct uvq *q); /* optional: after each drain */
    void *data;
} uvq_t;

static void uvq__async_cb(uv_async_t *a)
{
    uvq_t *q = a->data;
    uv_mutex_lock(&q->lock);
    bench_job_t *list = q->head;
    bool stopping = q->stopping;
    q->head = NULL;
    q->tail = &q->head;
    uv_mutex_unlock(&q->lock);
    q->ran += bench_jobs_run(list);
    if (q->on_drained)
        q->on_drained(q);
    if (stopping)
        uv_close((uv_handle_t *)&q->async, NULL);
}

/* Set up the loop and its async handle (not running yet). */
static inline void uvq_init(uvq_t *q)
{
    memset(q, 0, sizeof *q);
    if (uv_loop_init(&q->loop) != 0 || uv_async_init(&q->loop, &q->async, uvq__async_cb) != 0 ||
        uv_mutex_init(&q->lock) != 0)
        abort();
    q->async.data = q;
    q->tail = &q->head;
}

/* Queue a job (any thread) and wake the loop. */
static inline void uvq_push(uvq_t *q, bench_job_t *j)
{
    uv_mutex_lock(&q->lock);
    *q->tail = j;
    q->tail = &j->next;
    uv_mutex_unlock(&q->lock);
    uv_async_send(&q->async);
}

/* Ask the loop to end after running what is queued (any thread). */
static inline void uvq_request_stop(uvq_t *q)
{
    uv_mutex_lock(&q->lock);
    q->stopping = true;
    uv_mutex_unlock(&q->lock);
    uv_async_send(&q->async);
}

static void uvq__thread(void *arg)
{
    uvq_t *q = arg;
    uv_run(&q->loop, UV_RUN_DEFAULT);
}

/* Run the loop in a new thread. */
static inline void uvq_start_thread(uvq_t *q)
{
    if (uv_thread_create(&q->thread, uvq__thread, q) != 0)
        abort();
}

/* Stop the loop's thread, join it and free the loop. */
static inline void uvq_stop_thread(uvq_t *q)
{
    uvq_request_stop(q);
    uv_thread_join(&q->thread);
    uv_loop_close(&q->loop);
    uv_mutex_destroy(&q->lock);
}

/* ---- pthread: a consumer thread fed by a mutex + condvar queue ---------- */

typedef struct {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    bench_job_t *head, **tail;
    bool sleeping, stopping;
    pthread_t thread;
} ptq_t;

static void *ptq__thread(void *arg)
{
    ptq_t *q = arg;
    pthread_mutex_lock(&q->lock);
    for (;;) {
        while (!q->head && !q->stopping) {
            q->sleeping = true;
            pthread_cond_wait(&q->cond, &q->lock);
            q->sleeping = false;
        }
        bench_job_t *list = q->head;
        if (!list && q->stopping)
            break;
        q->head = NULL;
        q->tail = &q->head;
        pthread_mutex_unlock(&q->lock);
        bench_jobs_run(list);
        pthread_mutex_lock(&q->lock);
    }
    pthread_mutex_unlock(&q->lock);
    return NULL;
}

static inline void ptq_start(ptq_t *q)
{
    memset(q, 0, sizeof *q);
    pthread_mutex_init(&q->lock, NULL);
    pthread_cond_init(&q->cond, NULL);
    q->tail = &q->head;
    if (pthread_create(&q->thread, NULL, ptq__thread, q) != 0)
        abort();
}

/* Queue a job; signal only when the consumer sleeps. */
static inline void ptq_push(ptq_t *q, bench_job_t *j)
{
    pthread_mutex_lock(&q->lock);
    *q->tail = j;
    q->tail = &j->next;
    if (q->sleeping)
        pthread_cond_signal(&q->cond);
    pthread_mutex_unlock(&q->lock);
}

static inline void bench_push_uvq(void *q, bench_job_t *j)
{
    uvq_push(q, j);
}

static inline void bench_push_ptq(void *q, bench_job_t *j)
{
    ptq_push(q, j);
}

static inline void ptq_stop(ptq_t *q)
{
    pthread_mutex_lock(&q->lock);
    q->stopping = true;
    pthread_cond_signal(&q->cond);
    pthread_mutex_unlock(&q->lock);
    pthread_join(q->thread, NULL);
    pthread_mutex_destroy(&q->lock);
    pthread_cond_destroy(&q->cond);
}

/* ---- GLib: a main loop on a thread, fed by g_main_context_invoke -------- */

/* A workload written once over the floors: it feeds its records to queue
 * @p q through @p push. W2 and W3 run theirs over each floor's queue. */
typedef void (*bench_drive_fn)(bench_push_fn push, void *q, double *out);

/* Start a pthread consumer, run @p drive over it, stop it. */
static inline int bench_drive_ptq(bench_drive_fn drive, double *out)
{
    ptq_t q;
    ptq_start(&q);
    drive(bench_push_ptq, &q, out);
    ptq_stop(&q);
    return 0;
}

/* Start a libuv loop thread, run @p drive over it, stop it. */
static inline int bench_drive_uvq(bench_drive_fn drive, double *out)
{
    static uvq_t q;
    uvq_init(&q);
    uvq_start_thread(&q);
    drive(bench_push_uvq, &q, out);
    uvq_stop_thread(&q);
    return 0;
}

#if CALLER_WITH_GLIB
#include <glib.h>

typedef struct {
    GMainContext *ctx;
    GMainLoop *loop;
    pthread_t thread;
    size_t ran;
} glq_t;

static void *glq__thread(void *arg)
{
    glq_t *q = arg;
    g_main_context_push_thread_default(q->ctx);
    g_main_loop_run(q->loop);
    g_main_context_pop_thread_default(q->ctx);
    return NULL;
}

static inline void glq_start(glq_t *q)
{
    memset(q, 0, sizeof *q);
    q->ctx = g_main_context_new();
    q->loop = g_main_loop_new(q->ctx, FALSE);
    if (pthread_create(&q->thread, NULL, glq__thread, q) != 0)
        abort();
}

static gboolean glq__run(gpointer data)
{
    bench_job_t *j = data;
    j->result = j->fn(j->arg);
    if (j->waiter)
        bench_waiter_post(j->waiter);
    else
        free(j);
    return G_SOURCE_REMOVE;
}

/* Run the job in the loop's thread (any other thread). */
static inline void glq_push(glq_t *q, bench_job_t *j)
{
    g_main_context_invoke(q->ctx, glq__run, j);
}

static inline void bench_push_glq(void *q, bench_job_t *j)
{
    glq_push(q, j);
}

static gboolean glq__quit(gpointer data)
{
    g_main_loop_quit(((glq_t *)data)->loop);
    return G_SOURCE_REMOVE;
}

/* Stop after what is queued (invocations run in order), join, free. */
static inline void glq_stop(glq_t *q)
{
    g_main_context_invoke(q->ctx, glq__quit, q);
    pthread_join(q->thread, NULL);
    g_main_loop_unref(q->loop);
    g_main_context_unref(q->ctx);
}

/* Start a GLib loop thread, run @p drive over it, stop it. */
static inline int bench_drive_glq(bench_drive_fn drive, double *out)
{
    static glq_t q;
    glq_start(&q);
    drive(bench_push_glq, &q, out);
    glq_stop(&q);
    return 0;
}

/* Run @p fn(out) in a child whose Callers default to the GLib backend. */
static inline int bench_on_glib(int (*fn)(double *out), double *out)
{
    setenv("CALLER_BACKEND", "glib", 1);
    return fn(out);
}
#endif

#endif
