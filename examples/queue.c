/*
 * Execution queues: the items of one queue run one at a time, in order, in
 * one task. Here each bank account has its own queue (caller_queue_call_key,
 * keyed by the account) on a "bank" Caller. A deposit reads the balance,
 * suspends for a moment (as real work would, e.g. writing a journal), then
 * writes the new balance: scheduled with plain caller_call_soon the
 * deposits would interleave at that suspension and lose updates; queued per
 * account they cannot, while the two accounts' queues run side by side.
 *
 * To know when the deposits are done, the program queues one more item
 * after them that completes a Pending of its own: items run in order. (A
 * wait on the queue's own Pending also ends with the drain after your
 * items, but its value is the last item's of that whole drain, whoever
 * queued it.)
 */
// RUN-IN-TESTS
#include <caller.h>

#include <stdio.h>

typedef struct {
    const char *name;
    long balance; /* only touched by the account's queue, so no lock */
} account_t;

static account_t accounts[2] = {{"alice", 0}, {"bob", 0}};

static void *deposit(void *arg) /* an item of the account's queue */
{
    account_t *a = arg;
    long before = a->balance;
    caller_sleep(0.001); /* suspends: other queues' items run meanwhile */
    a->balance = before + 10;
    return arg;
}

static void *all_done(void *arg) /* the last item: runs after the deposits */
{
    caller_pending_set_result(arg, NULL, 0);
    return NULL;
}

/* Appends an item to the queue of @p key. */
static int enqueue(caller_t *c, const void *key, caller_fn fn, void *arg)
{
    caller_pending_t *q = caller_queue_call_key(c, key, fn, arg);
    caller_pending_unref(q); /* the queue's Pending: not needed here */
    return q ? 0 : -1;
}

int main(void)
{
    caller_t *bank = caller_create(CALLER_NEW_THREAD, &(caller_options_t){.name = "bank"});
    if (!bank)
        return 1;
    int rc = 0;
    for (int i = 0; i < 100; i++)
        for (int k = 0; k < 2; k++)
            rc |= enqueue(bank, &accounts[k], deposit, &accounts[k]);
    caller_pending_t *done[2];
    for (int k = 0; k < 2; k++) {
        done[k] = caller_pending_new(0);
        rc |= enqueue(bank, &accounts[k], all_done, done[k]);
    }
    for (int k = 0; k < 2; k++) {
        rc |= caller_pending_wait(done[k], 10.0, 0, NULL);
        caller_pending_unref(done[k]);
        printf("%s: %ld (100 deposits of 10)\n", accounts[k].name, accounts[k].balance);
    }
    caller_stop(bank, 0);
    caller_wait_stopped(bank, 10.0);
    caller_unref(bank);
    return rc == 0 && accounts[0].balance == 1000 && accounts[1].balance == 1000 ? 0 : 1;
}
