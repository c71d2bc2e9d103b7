/* caller_replace_allocator: once replaced, first thing in the process,
 * every heap allocation of the library goes through the application's
 * functions and every block comes back to the same allocator's free; after
 * the first allocation a replacement is refused. One case per process:
 * the replacement must come before anything else. */
#include "check.h"

#include <stdatomic.h>
#include <stdint.h>

/* A header in front of each block marks it as this allocator's; free
 * checks it, so a block from the C library's malloc (or a double free)
 * given to this free aborts the test. */
#define MAGIC 0x5ca11e4a110c8ed1ull
#define FREED 0xdeadbeefdeadbeefull
typedef struct {
    uint64_t magic;
    size_t size;
} header_t;
_Static_assert(sizeof(header_t) == 16, "keeps blocks 16-byte aligned");

static atomic_long mallocs, callocs, reallocs, frees, live;

static void *user_of(header_t *h)
{
    return h ? h + 1 : NULL;
}

static header_t *header_of(void *p)
{
    header_t *h = (header_t *)p - 1;
    if (h->magic != MAGIC) {
        fprintf(stderr, "a block the test allocator did not make (or freed twice): %p\n", p);
        abort();
    }
    return h;
}

static void *my_malloc(size_t size)
{
    header_t *h = malloc(sizeof *h + size);
    if (!h)
        return NULL;
    h->magic = MAGIC;
    h->size = size;
    atomic_fetch_add(&mallocs, 1);
    atomic_fetch_add(&live, 1);
    return user_of(h);
}

static void *my_calloc(size_t n, size_t size)
{
    if (size && n > SIZE_MAX / size)
        return NULL;
    void *p = my_malloc(n * size);
    if (p) {
        memset(p, 0, n * size);
        atomic_fetch_sub(&mallocs, 1);
        atomic_fetch_add(&callocs, 1);
    }
    return p;
}

static void my_free(void *p)
{
    CHECK(p != NULL); /* documented: never called with NULL */
    header_t *h = header_of(p);
    h->magic = FREED;
    free(h);
    atomic_fetch_add(&frees, 1);
    atomic_fetch_sub(&live, 1);
}

static void *my_realloc(void *p, size_t size)
{
    if (!p)
        return my_malloc(size);
    header_t *old = header_of(p);
    void *q = my_malloc(size);
    if (!q)
        return NULL;
    memcpy(q, p, old->size < size ? old->size : size);
    my_free(p);
    atomic_fetch_add(&reallocs, 1);
    return q;
}

static void *square(void *arg)
{
    caller_sleep(0.001); /* suspends: a copy-stack task saves its stack */
    return P(I(arg) * I(arg));
}

static void *body(void *arg)
{
    caller_t *c = arg;
    caller_pending_t *ps[64];
    for (int i = 0; i < 64; i++) {
        ps[i] = i % 2 ? caller_to_thread(caller_current(), square, P(i))
                      : caller_call_soon(c, square, P(i));
        CHECK(ps[i] != NULL);
    }
    long sum = 0;
    for (int i = 0; i < 64; i++) {
        void *v;
        CHECK_RC(caller_pending_wait(ps[i], 30, CALLER_WAIT_RESULT, &v), 0);
        sum += I(v);
        caller_pending_unref(ps[i]);
    }
    CHECK_EQ(sum, 85344); /* 0^2 + ... + 63^2 */
    caller_pending_t *q = caller_queue_call_key(caller_current(), "k", square, P(3));
    CHECK(q != NULL);
    void *v;
    CHECK_RC(caller_pending_wait(q, 30, CALLER_WAIT_RESULT, &v), 0);
    CHECK_EQ(I(v), 9);
    caller_pending_unref(q);
    CHECK_EQ(caller_queue_close_key(caller_current(), "k"), 1); /* it was open */
    return NULL;
}

TEST(replaced_allocator_serves_every_allocation)
{
    /* Bad arguments change nothing and allocate nothing. */
    CHECK_RC(caller_replace_allocator(my_malloc, NULL, my_calloc, my_free), -EINVAL);
    CHECK_RC(caller_replace_allocator(my_malloc, my_realloc, my_calloc, my_free), 0);
    caller_t *copy = caller_create(
        CALLER_NEW_THREAD, &(caller_options_t){.name = "copying", .stack_mode = CALLER_STACK_COPY});
    CHECK(copy != NULL);
    caller_t *m = caller_create(CALLER_MANUAL, &(caller_options_t){.name = "main"});
    CHECK(m != NULL);
    CHECK_RC(caller_run(m, body, copy, NULL), 0);
    caller_unref(m);
    caller_stop(copy, 0);
    CHECK_RC(caller_wait_stopped(copy, 30), 0);
    caller_unref(copy);
    /* Every kind of call was made through it, and what it gave was given
     * back to it (my_free checks each block's mark). */
    CHECK(atomic_load(&mallocs) > 0);
    CHECK(atomic_load(&callocs) > 0);
    CHECK(atomic_load(&frees) > 0);
    /* Too late now: the library has allocated. */
    CHECK_RC(caller_replace_allocator(malloc, realloc, calloc, free), -EBUSY);
    const char *msg;
    caller_last_error(&msg);
    CHECK(strstr(msg, "before any other") != NULL);
}
