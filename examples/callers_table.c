/*
 * A few Callers and the callers table (the `%callers` magic of the Python original, async-kernel):
 * the main thread runs a protected manual Caller "Shell"; it gets a protected child "ControlThread"
 * and two unnamed children (new threads), asks each for its name from inside its own thread, and
 * prints the table.
 */
// RUN-IN-TESTS
#include <caller.h>

#include <stdio.h>

static void *whoami(void *arg)
{
    (void)arg;
    /* Runs in the child's thread: caller_current() is that child. */
    return (void *)caller_name(caller_current());
}

static void *shell(void *arg)
{
    (void)arg;
    caller_t *self = caller_current();
    caller_options_t control = {.name = "ControlThread", .protect = true};
    caller_t *kids[3] = {caller_get(self, &control), caller_get(self, NULL),
                         caller_get(self, NULL)};
    for (int i = 0; i < 3; i++) {
        if (!kids[i]) {
            const char *msg;
            caller_last_error(&msg);
            fprintf(stderr, "caller_get: %s\n", msg);
            return NULL;
        }
        caller_pending_t *p = caller_call_soon(kids[i], whoami, NULL);
        void *name = NULL;
        caller_pending_wait(p, 5, CALLER_WAIT_RESULT, &name); /* suspends this task */
        char text[128];
        caller_repr(kids[i], text, sizeof text);
        printf("%s says it is %s\n", text, (const char *)name);
        caller_pending_unref(p);
    }
    char text[128];
    caller_repr(self, text, sizeof text);
    printf("%s\n\n", text);
    caller_print_table(stdout, 0);
    for (int i = 0; i < 3; i++)
        caller_unref(kids[i]);
    return NULL; /* the Shell stops, and its children with it */
}

int main(void)
{
    caller_options_t o = {.name = "Shell", .protect = true};
    caller_t *c = caller_create(CALLER_MANUAL, &o);
    if (!c)
        return 1;
    int rc = caller_run(c, shell, NULL, NULL);
    caller_unref(c);
    return rc == 0 ? 0 : 1;
}
