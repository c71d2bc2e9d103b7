/*
 * The demo (`make demo`), the original's showcase: a generator endlessly
 * produces caller_to_thread(my_func, n); my_func sleeps a random 0-250 ms in
 * its worker, reporting its progress as it goes; caller_as_completed_gen
 * consumes the results with at most --workers outstanding, so at most that
 * many worker threads.
 *
 * In a terminal, one line per worker Caller is redrawn in place, 15 times a
 * second, by a task of the main thread's Caller ("Shell") — the only thread
 * that writes to the screen; workers just store their status in a slot
 * guarded by a mutex. When stdout is not a terminal it prints plain lines.
 * At the end it prints the callers table.
 *
 * Ctrl-C cancels cleanly: the outstanding Pendings are cancelled (each
 * worker's caller_sleep returns -ECANCELED), the workers are stopped, the
 * table is printed and the exit status is 130. The signal is taken by
 * sigwait() in a thread of our own, which hands it to the Shell with
 * caller_call_direct(): the library is never called from a signal handler.
 * A second Ctrl-C exits at once.
 *
 *   example-demo [--seconds S] [--jobs N] [--workers W]
 *     --seconds S  start no new job after S seconds (default 3; 0: no limit)
 *     --jobs N     start at most N jobs (default 0: no limit)
 *     --workers W  at most W jobs at once, so W worker threads (default 10)
 *
 * Not run by CTest as is: tests/demo-test.sh runs it with flags, and
 * interrupts it.
 */
#include <caller.h>

#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

/* A worker's line on the screen. Written by the worker, read by the Shell's
 * redraw task, both under demo.lock. */
typedef struct {
    caller_t *worker; /* a reference; NULL: a free slot */
    long n;           /* the job it runs or ran last; 0 before the first */
    int ms, done_ms;  /* how long it sleeps, and how much of that it slept */
    bool busy, cancelled;
} slot_t;

static struct {
    /* Set by main before the Shell runs. */
    double seconds;
    long jobs;
    int workers;
    bool live; /* stdout is a terminal: redraw in place */
    unsigned seed;
    caller_t *shell;

    pthread_mutex_t lock; /* guards slots[] */
    slot_t *slots;
    int nslots;

    /* The Shell thread's own: its tasks (body, redraw) and direct calls run
     * there one at a time, so these need no lock. */
    double start, until;
    long started, finished, cancelled, last;
    struct job {
        caller_pending_t *p; /* our reference */
        long n;
    } * outstanding; /* the unfinished jobs */
    int noutstanding;
    bool interrupted, stopping;
    slot_t *copy; /* the redraw's snapshot of slots[] */
    int drawn;    /* lines of the live view now on screen */
} demo = {.seconds = 3, .workers = 10, .lock = PTHREAD_MUTEX_INITIALIZER};

static atomic_int sigints;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ---- the workers' side --------------------------------------------------- */

/* This worker thread's slot: workers are threads, and a task never leaves
 * its thread, so a thread-local pointer finds it. */
static _Thread_local slot_t *my_slot;

static slot_t *claim_slot(void)
{
    slot_t *s = NULL;
    pthread_mutex_lock(&demo.lock);
    for (int i = 0; i < demo.nslots && !s; i++)
        if (!demo.slots[i].worker)
            s = &demo.slots[i];
    if (s)
        s->worker = caller_ref(caller_current());
    pthread_mutex_unlock(&demo.lock);
    return s; /* NULL if full: this worker is then not shown */
}

static void report(long n, int ms, int done_ms, bool busy, bool cancelled)
{
    if (!my_slot)
        return;
    pthread_mutex_lock(&demo.lock);
    *my_slot = (slot_t){my_slot->worker, n, ms, done_ms, busy, cancelled};
    pthread_mutex_unlock(&demo.lock);
}

/* A job: runs as a task in a worker thread. */
static void *my_func(void *arg)
{
    long n = (long)(intptr_t)arg;
    unsigned seed = demo.seed ^ ((unsigned)n * 2654435761u);
    int ms = rand_r(&seed) % 251;

    if (!my_slot)
        my_slot = claim_slot();
    report(n, ms, 0, true, false);
    if (!demo.live) {
        char who[128];
        caller_repr(caller_current(), who, sizeof who);
        printf("%s  n=%04ld sleeping %3d ms\n", who, n, ms);
    }
    /* Sleep in steps to report progress. caller_sleep suspends this task;
     * cancelling the job makes it return -ECANCELED. */
    int rc = 0;
    for (int done = 0; done < ms && rc == 0;) {
        int step = ms - done < 20 ? ms - done : 20;
        rc = caller_sleep(step / 1000.0);
        if (rc == 0)
            done += step;
        report(n, ms, done, rc == 0 && done < ms, rc != 0);
    }
    return arg; /* a cancelled job's Pending reports -ECANCELED anyway */
}

/* ---- the Shell's side ------------------------------------------------------ */

/* The generator, called by caller_iter_next() in the body: the next job, or
 * NULL once the limits are reached or Ctrl-C was pressed. */
static caller_pending_t *next_job(void *arg)
{
    (void)arg;
    if (demo.interrupted || (demo.jobs && demo.started >= demo.jobs) ||
        (demo.until && now() >= demo.until))
        return NULL;
    caller_pending_t *p = caller_to_thread(demo.shell, my_func, (void *)(intptr_t)++demo.started);
    if (!p) {
        const char *msg;
        caller_last_error(&msg);
        fprintf(stderr, "demo: caller_to_thread: %s\n", msg);
        return NULL;
    }
    if (demo.noutstanding < demo.workers) /* as_completed keeps within it */
        demo.outstanding[demo.noutstanding++] = (struct job){caller_pending_ref(p), demo.started};
    return p; /* the iterator's reference */
}

/* Drop our reference to a job the iterator gave back; returns its n. */
static long forget(caller_pending_t *p)
{
    for (int i = 0; i < demo.noutstanding; i++) {
        if (demo.outstanding[i].p == p) {
            long n = demo.outstanding[i].n;
            caller_pending_unref(p);
            demo.outstanding[i] = demo.outstanding[--demo.noutstanding];
            return n;
        }
    }
    return 0;
}

/* Ctrl-C, handed over by the signal thread: runs in the Shell's loop
 * (caller_call_direct), so it must not suspend; cancelling does not. */
static void on_interrupt(void *arg)
{
    (void)arg;
    if (demo.interrupted)
        return;
    demo.interrupted = true;
    for (int i = 0; i < demo.noutstanding; i++)
        caller_pending_cancel(demo.outstanding[i].p, "Interrupted (SIGINT)");
}

static int terminal_rows(void)
{
    struct winsize ws;
    if (ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 && ws.ws_row > 4)
        return ws.ws_row;
    return 24;
}

/* Redraw the live view over the previous one. Shell thread only. */
static void draw(void)
{
    pthread_mutex_lock(&demo.lock);
    memcpy(demo.copy, demo.slots, (size_t)demo.nslots * sizeof *demo.copy);
    pthread_mutex_unlock(&demo.lock);

    int room = terminal_rows() - 3, lines = 0, hidden = 0;
    if (demo.drawn)
        printf("\x1b[%dA", demo.drawn); /* back to the top of the view */
    for (int i = 0; i < demo.nslots; i++) {
        slot_t *s = &demo.copy[i];
        if (!s->worker)
            continue;
        if (lines >= room) {
            hidden++;
            continue;
        }
        char who[128];
        caller_repr(s->worker, who, sizeof who);
        if (s->busy) {
            char bar[11];
            int filled = s->ms ? s->done_ms * 10 / s->ms : 10;
            for (int k = 0; k < 10; k++)
                bar[k] = k < filled ? '=' : ' ';
            bar[10] = '\0';
            printf("\r\x1b[2K%s  n=%04ld sleeping %3d ms [%s]\n", who, s->n, s->ms, bar);
        } else if (s->cancelled) {
            printf("\r\x1b[2K%s  n=%04ld cancelled after %d of %d ms\n", who, s->n, s->done_ms,
                   s->ms);
        } else {
            printf("\r\x1b[2K%s  idle\n", who);
        }
        lines++;
    }
    if (hidden) {
        printf("\r\x1b[2K… and %d more workers\n", hidden);
        lines++;
    }
    printf("\r\x1b[2KFinished: %ld   (%ld done, %.1f s)\n", demo.last, demo.finished,
           now() - demo.start);
    lines++;
    printf("\x1b[J"); /* clear whatever the last view had below */
    fflush(stdout);
    demo.drawn = lines;
}

/* A second task on the Shell: redraws until told to stop. */
static void *redraw_task(void *arg)
{
    (void)arg;
    while (!demo.stopping) {
        draw();
        if (caller_sleep(1.0 / 15) != 0)
            break; /* cancelled: the body is done */
    }
    return NULL;
}

/* Stop the (now idle) workers the pool's way, and wait until they did. */
static void stop_workers(caller_t *self)
{
    caller_pool_config_t cfg;
    caller_pool_get_config(self, &cfg);
    cfg.max_idle = 0; /* idle workers beyond it stop now */
    caller_pool_set_config(self, &cfg);
    caller_t **kids = calloc((size_t)demo.nslots, sizeof *kids);
    size_t nkids = kids ? caller_children(self, kids, (size_t)demo.nslots) : 0;
    if (nkids > (size_t)demo.nslots)
        nkids = (size_t)demo.nslots;
    for (size_t i = 0; i < nkids; i++) {
        caller_wait_stopped(kids[i], 5.0);
        caller_unref(kids[i]);
    }
    free(kids);
}

/* The Shell's first task. */
static void *body(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    /* Keep every worker the run uses, so each keeps its line. */
    caller_pool_set_config(
        self, &(caller_pool_config_t){.max_idle = (size_t)demo.workers, .idle_shutdown = 0});
    demo.start = now();
    demo.until = demo.seconds > 0 ? demo.start + demo.seconds : 0;

    caller_pending_t *redraw = NULL;
    if (demo.live) {
        printf("\x1b[?25l\x1b[?7l"); /* hide the cursor, no line wrap */
        redraw = caller_call_soon(self, redraw_task, NULL);
    }

    caller_iter_t *it = caller_as_completed_gen(
        next_job, NULL, &(caller_as_completed_options_t){.max_concurrent = demo.workers});
    caller_pending_t *p;
    while (it && caller_iter_next(it, &p) == 0) {
        long n = forget(p);
        void *result;
        int rc = caller_pending_result(p, &result);
        if (rc == 0) {
            demo.finished++;
            demo.last = (long)(intptr_t)result;
            if (!demo.live)
                printf("Finished: %ld\n", demo.last);
        } else if (rc == -ECANCELED) {
            demo.cancelled++;
            if (!demo.live)
                printf("Cancelled: %ld\n", n);
        } else {
            fprintf(stderr, "demo: job %ld failed: %s\n", n, caller_strerror(rc));
        }
        caller_pending_unref(p);
    }
    caller_iter_close(it);
    double took = now() - demo.start;
    if (demo.interrupted)
        stop_workers(self);

    if (redraw) {
        demo.stopping = true;
        caller_pending_cancel(redraw, NULL);
        caller_pending_wait(redraw, 5.0, CALLER_WAIT_PROTECT, NULL);
        caller_pending_unref(redraw);
        draw(); /* the final state stays on screen */
        printf("\x1b[?7h\x1b[?25h");
    }

    if (demo.interrupted) {
        printf("\nInterrupted after %.1f s: %ld jobs finished, %ld cancelled; workers stopped.\n",
               took, demo.finished, demo.cancelled);
    } else {
        printf("\nDone: %ld jobs finished in %.1f s on at most %d workers.\n", demo.finished, took,
               demo.workers);
    }
    printf("\n");
    caller_print_table(stdout, 0);
    fflush(stdout);
    return NULL;
}

/* ---- signals and main ------------------------------------------------------ */

/* Takes SIGINT (blocked in every thread) with sigwait(); SIGUSR1 from main
 * ends it. A plain thread, so it may call the library. */
static void *signal_thread(void *arg)
{
    const sigset_t *set = arg;
    for (;;) {
        int sig;
        if (sigwait(set, &sig) != 0 || sig == SIGUSR1)
            return NULL;
        if (atomic_fetch_add(&sigints, 1) == 0) {
            /* Fails only once the Shell is stopping: then it is ending anyway. */
            caller_call_direct(demo.shell, on_interrupt, NULL);
        } else {
            static const char bye[] = "\x1b[?7h\x1b[?25h\ndemo: interrupted again, exiting now\n";
            if (write(STDERR_FILENO, bye, sizeof bye - 1) < 0) {
                /* nothing more to do */
            }
            _exit(130);
        }
    }
}

static int usage(const char *prog)
{
    fprintf(stderr, "usage: %s [--seconds S] [--jobs N] [--workers W]\n", prog);
    return 2;
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        char *end = NULL;
        const char *opt = argv[i], *val = i + 1 < argc ? argv[++i] : NULL;
        if (!val)
            return usage(argv[0]);
        if (strcmp(opt, "--seconds") == 0)
            demo.seconds = strtod(val, &end);
        else if (strcmp(opt, "--jobs") == 0)
            demo.jobs = strtol(val, &end, 10);
        else if (strcmp(opt, "--workers") == 0)
            demo.workers = (int)strtol(val, &end, 10);
        if (!end || *end || demo.seconds < 0 || demo.jobs < 0 || demo.workers < 1 ||
            demo.workers > 1000)
            return usage(argv[0]);
    }
    demo.live = isatty(STDOUT_FILENO);
    demo.seed = (unsigned)time(NULL);
    demo.nslots = demo.workers + 1; /* the pool never needs more */
    demo.slots = calloc((size_t)demo.nslots, sizeof *demo.slots);
    demo.copy = calloc((size_t)demo.nslots, sizeof *demo.copy);
    demo.outstanding = calloc((size_t)demo.workers, sizeof *demo.outstanding);
    if (!demo.slots || !demo.copy || !demo.outstanding)
        return 1;
    setvbuf(stdout, NULL, _IOLBF, 0);

    /* Block the signals before any thread exists, so every thread inherits
     * the mask and only sigwait() sees them. A shell starts background jobs
     * with SIGINT ignored, and an ignored signal is discarded: restore the
     * default first. */
    signal(SIGINT, SIG_DFL);
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    demo.shell = caller_create(CALLER_MANUAL, &(caller_options_t){.name = "Shell"});
    if (!demo.shell) {
        const char *msg;
        caller_last_error(&msg);
        fprintf(stderr, "demo: caller_create: %s\n", msg);
        return 1;
    }
    pthread_t sig_thread;
    if (pthread_create(&sig_thread, NULL, signal_thread, &set) != 0)
        return 1;

    printf("libcaller demo: jobs of 0-250 ms on at most %d workers", demo.workers);
    if (demo.seconds > 0)
        printf(", for %g s", demo.seconds);
    if (demo.jobs > 0)
        printf(", %ld jobs", demo.jobs);
    printf(". Ctrl-C stops it.\n\n");

    int rc = caller_run(demo.shell, body, NULL, NULL);

    pthread_kill(sig_thread, SIGUSR1);
    pthread_join(sig_thread, NULL);
    caller_unref(demo.shell);
    for (int i = 0; i < demo.nslots; i++)
        caller_unref(demo.slots[i].worker);
    free(demo.slots);
    free(demo.copy);
    free(demo.outstanding);
    if (atomic_load(&sigints) > 0)
        return 130;
    return rc == 0 ? 0 : 1;
}
