/*
 * Test points: named places in the library where a test can hold a race
 * window open (CALLER__TEST_POINT("get.listed", child)). They exist only in
 * the test build (CALLER_TESTING, the caller_static_test library the tests
 * link to); the shipped libraries compile them to nothing.
 */
#ifndef CALLER_TESTPOINT_H
#define CALLER_TESTPOINT_H

#if CALLER_TESTING
#include <stdatomic.h>

/* Called at every test point with its name and the object concerned. */
typedef void (*caller__test_hook_fn)(const char *point, void *obj);
extern _Atomic(caller__test_hook_fn) caller__test_hook;

#define CALLER__TEST_POINT(point, obj)                                                             \
    do {                                                                                           \
        caller__test_hook_fn hook_ =                                                               \
            atomic_load_explicit(&caller__test_hook, memory_order_acquire);                        \
        if (hook_)                                                                                 \
            hook_(point, (void *)(obj));                                                           \
    } while (0)
#else
#define CALLER__TEST_POINT(point, obj) ((void)0)
#endif

#endif /* CALLER_TESTPOINT_H */
