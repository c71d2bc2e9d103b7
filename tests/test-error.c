/* The error model: codes, names, descriptions, the last error (issue #2). */
#include "check.h"
#include "internal.h"

#include <pthread.h>

TEST(codes_are_negative_errno)
{
    CHECK_EQ(CALLER_EINVAL, -EINVAL);
    CHECK_EQ(CALLER_ECANCELED, -ECANCELED);
    CHECK_EQ(CALLER_ETIMEDOUT, -ETIMEDOUT);
    CHECK_EQ(CALLER_EDEADLK, -EDEADLK);
    CHECK_EQ(CALLER_ENOMEM, -ENOMEM);
    CHECK_LT(CALLER_EINVALSTATE, -133); /* outside the errno range */
}

TEST(names_and_descriptions)
{
    CHECK_STR_EQ(caller_err_name(0), "OK");
    CHECK_STR_EQ(caller_strerror(0), "success");
    CHECK_STR_EQ(caller_err_name(CALLER_ECANCELED), "ECANCELED");
    CHECK_STR_EQ(caller_strerror(CALLER_ECANCELED), "operation cancelled");
    CHECK_STR_EQ(caller_err_name(CALLER_EINVALSTATE), "EINVALSTATE");
    CHECK_STR_EQ(caller_strerror(CALLER_EINVALSTATE), "invalid state");
    CHECK_STR_EQ(caller_err_name(CALLER_EDEADLK), "EDEADLK");
    /* errno values that are not the library's own still have names. */
    CHECK_STR_EQ(caller_err_name(-EIO), "EIO");
    CHECK_STR_EQ(caller_strerror(-EIO), "Input/output error");
    CHECK_STR_EQ(caller_err_name(-3999), "UNKNOWN");
    CHECK_STR_EQ(caller_strerror(-3999), "unknown error");
    CHECK_STR_EQ(caller_err_name(12345), "UNKNOWN");
}

TEST(every_table_entry_has_name_and_text)
{
#define CHECK_ENTRY(name, value, text)                                                             \
    CHECK_STR_EQ(caller_err_name(value), #name);                                                   \
    CHECK_STR_EQ(caller_strerror(value), text);                                                    \
    CHECK_LT(value, 0);
    CALLER_ERRNO_MAP(CHECK_ENTRY)
#undef CHECK_ENTRY
}

static void *other_thread(void *arg)
{
    (void)arg;
    const char *m = NULL;
    /* A new thread starts with no error, whatever other threads did. */
    CHECK_EQ(caller_last_error(&m), 0);
    CHECK_STR_EQ(m, "");
    caller__fail(-EIO, "thread-local %d", 2);
    CHECK_EQ(caller_last_error(&m), -EIO);
    CHECK_STR_EQ(m, "thread-local 2");
    return NULL;
}

TEST(last_error_is_per_thread)
{
    const char *m = NULL;
    CHECK_RC(caller_pending_set_result(NULL, NULL, 0), -EINVAL);
    CHECK_EQ(caller_last_error(&m), -EINVAL);
    CHECK_STR_EQ(m, "caller_pending_set_result: p is NULL");
    pthread_t t;
    CHECK_EQ(pthread_create(&t, NULL, other_thread, NULL), 0);
    pthread_join(t, NULL);
    CHECK_EQ(caller_last_error(&m), -EINVAL); /* untouched by the other thread */
    CHECK_STR_EQ(m, "caller_pending_set_result: p is NULL");
    /* A successful call does not clear it. */
    caller_pending_t *p = caller_pending_new(0);
    CHECK_RC(caller_pending_set_result(p, NULL, 0), 0);
    CHECK_EQ(caller_last_error(NULL), -EINVAL);
    caller_pending_unref(p);
    /* NULL fmt records the code's description. */
    caller__fail(CALLER_ETIMEDOUT, NULL);
    CHECK_EQ(caller_last_error(&m), -ETIMEDOUT);
    CHECK_STR_EQ(m, "timed out");
}

TEST(long_messages_are_cut_at_a_character)
{
    char big[2000];
    /* "é" is two bytes: a cut must not split one. */
    for (size_t i = 0; i + 2 < sizeof big; i += 2) {
        big[i] = '\xC3';
        big[i + 1] = '\xA9';
    }
    big[sizeof big - 2] = '\0';
    caller__fail(-EIO, "%s", big);
    const char *m;
    caller_last_error(&m);
    size_t n = strlen(m);
    CHECK_LT(n, 512);
    CHECK_GE(n, 400);
    CHECK_STR_EQ(m + n - 3, "\xE2\x80\xA6");
    CHECK_EQ((unsigned char)m[n - 4], 0xA9); /* the last whole "é" */

    char buf[16];
    CHECK_STR_EQ(caller__trunc(buf, sizeof buf, "short", 10), "short");
    CHECK_STR_EQ(caller__trunc(buf, sizeof buf, "exactly ten", 10), "exactly te\xE2\x80\xA6");
    CHECK_STR_EQ(caller__trunc(buf, 6, "abcdefgh", 100), "ab\xE2\x80\xA6");
}

TEST(version_of_the_library_is_the_headers)
{
    CHECK_EQ(caller_version(), (unsigned)CALLER_VERSION_HEX);
    CHECK_EQ(CALLER_VERSION_HEX,
             (CALLER_VERSION_MAJOR << 16) | (CALLER_VERSION_MINOR << 8) | CALLER_VERSION_PATCH);
    char want[32];
    snprintf(want, sizeof want, "%d.%d.%d", CALLER_VERSION_MAJOR, CALLER_VERSION_MINOR,
             CALLER_VERSION_PATCH);
    CHECK_STR_EQ(caller_version_string(), want);
}
