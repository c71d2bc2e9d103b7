/*
 * The original's example, in C: a generator endlessly produces
 * caller_to_thread(my_func, n); my_func sleeps a random 0-250 ms in its
 * worker and says which worker ran it; as_completed consumes the results,
 * at most 10 outstanding (so at most 10 worker threads), and prints
 * "Finished: n".
 *
 *   example-as_completed [--jobs N] [--seconds S]   (defaults: 40 jobs, no time limit)
 */
// RUN-IN-TESTS
#include <caller.h>

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    caller_t *caller;
    long next, jobs;
    double until;
} source_t;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *my_func(void *arg)
{
    long n = (long)(intptr_t)arg;
    unsigned seed = (unsigned)n * 2654435761u;
    int ms = rand_r(&seed) % 251;
    char who[96];
    caller_repr(caller_current(), who, sizeof who);
    printf("%-40s n=%04ld sleeping %3d ms\n", who, n, ms);
    caller_sleep(ms / 1000.0); /* suspends this task; the worker has no other */
    return arg;
}

/* The generator: the next job, or NULL when the limits are reached. */
static caller_pending_t *run_forever(void *arg)
{
    source_t *s = arg;
    if ((s->jobs && s->next >= s->jobs) || (s->until && now() >= s->until))
        return NULL;
    return caller_to_thread(s->caller, my_func, (void *)(intptr_t)++s->next);
}

static void *body(void *arg)
{
    source_t *s = arg;
    s->caller = caller_current();
    caller_iter_t *it = caller_as_completed_gen(run_forever, s, NULL);
    caller_pending_t *p;
    while (caller_iter_next(it, &p) == 0) {
        void *result;
        if (caller_pending_result(p, &result) == 0)
            printf("Finished: %ld\n", (long)(intptr_t)result);
        caller_pending_unref(p);
    }
    caller_iter_close(it);
    printf("\n");
    caller_print_table(stdout, 0);
    return NULL;
}

int main(int argc, char **argv)
{
    source_t s = {.jobs = 40};
    double seconds = 0;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--jobs") == 0)
            s.jobs = atol(argv[i + 1]);
        else if (strcmp(argv[i], "--seconds") == 0)
            seconds = atof(argv[i + 1]);
    }
    if (seconds > 0) {
        s.until = now() + seconds;
        if (s.jobs == 40)
            s.jobs = 0; /* bounded by time only */
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    caller_t *c = caller_create(CALLER_MANUAL, &(caller_options_t){.name = "Shell"});
    int rc = caller_run(c, body, &s, NULL);
    caller_unref(c);
    return rc == 0 ? 0 : 1;
}
