/*
 * Structured concurrency with a PendingGroup: the group tracks every
 * Pending made while it is entered, exit waits for all of them, and when
 * one fails the group cancels the rest. Three lookups run in workers; the
 * one for "mars" fails after 10 ms, so the group cancels the other two
 * (still sleeping) and exit reports -ECANCELED with the failure's message.
 * A second group, whose lookups all succeed, exits with 0.
 */
// RUN-IN-TESTS
#include <caller.h>

#include <stdio.h>
#include <string.h>

typedef struct {
    const char *name;
    int ms;
} lookup_t;

static void *lookup(void *arg) /* runs in a worker */
{
    const lookup_t *l = arg;
    if (caller_sleep(l->ms / 1000.0) != 0) {
        printf("  %s: cancelled\n", l->name);
        return NULL;
    }
    if (strcmp(l->name, "mars") == 0) {
        caller_raise(-ENOENT, "no such planet: %s", l->name);
        return NULL;
    }
    printf("  %s: found\n", l->name);
    return arg;
}

/* Runs the lookups in one group and returns what its exit returned. */
static int lookup_all(const lookup_t *ls, int n)
{
    caller_pending_t *ps[8];
    caller_group_t *g = caller_group_new(NULL, 0);
    caller_group_enter(g);
    for (int i = 0; i < n; i++)
        ps[i] = caller_to_thread(caller_current(), lookup, (void *)&ls[i]);
    int rc = caller_group_exit(g); /* waits for every one of them */
    if (rc != 0) {
        const char *why;
        caller_last_error(&why); /* the messages, one a line: the first says why */
        printf("  group: %s: %.*s\n", caller_err_name(rc), (int)strcspn(why, "\n"), why);
    } else {
        printf("  group: all done\n");
    }
    for (int i = 0; i < n; i++)
        caller_pending_unref(ps[i]);
    caller_group_unref(g);
    return rc;
}

static void *body(void *arg)
{
    (void)arg;
    static const lookup_t failing[] = {{"venus", 1000}, {"mars", 10}, {"jupiter", 2000}};
    static const lookup_t fine[] = {{"venus", 10}, {"earth", 20}, {"jupiter", 30}};
    printf("first group:\n");
    int rc1 = lookup_all(failing, 3);
    printf("second group:\n");
    int rc2 = lookup_all(fine, 3);
    return (void *)(long)(rc1 == -ECANCELED && rc2 == 0);
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
