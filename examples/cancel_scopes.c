/*
 * Cancel scopes: a deadline on a stretch of a task's code, and a shield
 * around a cleanup step that must not be interrupted.
 *
 * 1. "Move on after": a scope with a 50 ms deadline around a loop of
 *    10 ms sleeps. Once the deadline passes, the suspension point inside
 *    the scope returns -ECANCELED; the exit returns 0 and the task goes on.
 * 2. "Fail after": the same with CALLER_SCOPE_FAIL; the exit returns
 *    -ETIMEDOUT.
 * 3. A shield: a job is cancelled while it works. Its cleanup runs in a
 *    CALLER_SCOPE_SHIELD scope, so its sleep there completes although the
 *    job is cancelled; after the shield, the next suspension point reports
 *    the cancellation again.
 */
// RUN-IN-TESTS
#include <caller.h>

#include <stdbool.h>
#include <stdio.h>

static bool move_on_after(void)
{
    caller_scope_t *s = caller_scope_enter(0.05, 0);
    int steps = 0, rc;
    while ((rc = caller_sleep(0.01)) == 0)
        steps++;
    int exit_rc = caller_scope_exit(s); /* s is gone now: the task held it */
    printf("move on after 50 ms: %d steps, then %s; exit: %s\n", steps, caller_err_name(rc),
           caller_err_name(exit_rc));
    return rc == -ECANCELED && exit_rc == 0;
}

static bool fail_after(void)
{
    caller_scope_t *s = caller_scope_enter(0.02, CALLER_SCOPE_FAIL);
    int rc = caller_sleep(10.0); /* cut short by the deadline */
    int exit_rc = caller_scope_exit(s);
    printf("fail after 20 ms: sleep %s; exit: %s\n", caller_err_name(rc), caller_err_name(exit_rc));
    return rc == -ECANCELED && exit_rc == -ETIMEDOUT;
}

typedef struct {
    caller_pending_t *started; /* the job completes it once at work */
    bool ok;                   /* what the job found */
} job_t;

static void *job(void *arg) /* a task, cancelled while it works */
{
    job_t *j = arg;
    caller_pending_set_result(j->started, NULL, 0);
    int work = caller_sleep(10.0); /* -ECANCELED: cancelled from outside */

    caller_scope_t *shield = caller_scope_enter(-1, CALLER_SCOPE_SHIELD);
    int cleanup = caller_sleep(0.02); /* 0: the cancellation is kept out */
    caller_scope_exit(shield);
    int after = caller_sleep(0.01); /* -ECANCELED again */

    printf("job: work %s, shielded cleanup %s, after the shield %s\n", caller_err_name(work),
           caller_err_name(cleanup), caller_err_name(after));
    /* A cancelled task's return value is dropped: report through j. */
    j->ok = work == -ECANCELED && cleanup == 0 && after == -ECANCELED;
    return NULL;
}

static bool shielded_cleanup(void)
{
    job_t j = {caller_pending_new(0), false};
    caller_pending_t *p = caller_call_soon(caller_current(), job, &j);
    caller_pending_wait(j.started, 5.0, 0, NULL); /* the job is at work */
    caller_pending_cancel(p, "enough");
    int rc = caller_pending_wait(p, 5.0, CALLER_WAIT_PROTECT | CALLER_WAIT_RESULT,
                                 NULL); /* until the job returned */
    printf("the job's Pending: %s\n", caller_err_name(rc));
    caller_pending_unref(p);
    caller_pending_unref(j.started);
    return rc == -ECANCELED && j.ok;
}

static void *body(void *arg)
{
    (void)arg;
    bool ok = move_on_after();
    ok = fail_after() && ok;
    ok = shielded_cleanup() && ok;
    return (void *)ok;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    caller_t *c = caller_create(CALLER_MANUAL, &(caller_options_t){.name = "Shell"});
    void *ok = NULL;
    int rc = caller_run(c, body, NULL, &ok);
    caller_unref(c);
    return rc == 0 && ok ? 0 : 1;
}
