/*
 * Error codes, their names and descriptions (one table: CALLER_ERRNO_MAP in
 * caller.h), and this thread's last error.
 */
#include "error.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define LAST_ERROR_MAX 512

static _Thread_local struct {
    int code;
    char message[LAST_ERROR_MAX];
} last_error;

const char *caller_strerror(int code)
{
    if (code == 0)
        return "success";
    switch (code) {
#define CALLER__TEXT(name, value, text)                                                            \
    case value:                                                                                    \
        return text;
        CALLER_ERRNO_MAP(CALLER__TEXT)
#undef CALLER__TEXT
    }
    const char *d = code < 0 ? strerrordesc_np(-code) : NULL;
    return d ? d : "unknown error";
}

const char *caller_err_name(int code)
{
    if (code == 0)
        return "OK";
    switch (code) {
#define CALLER__NAME(name, value, text)                                                            \
    case value:                                                                                    \
        return #name;
        CALLER_ERRNO_MAP(CALLER__NAME)
#undef CALLER__NAME
    }
    const char *n = code < 0 ? strerrorname_np(-code) : NULL;
    return n ? n : "UNKNOWN";
}

int caller_last_error(const char **message)
{
    if (message)
        *message = last_error.message;
    return last_error.code;
}

int caller__fail(int code, const char *fmt, ...)
{
    last_error.code = code;
    if (!fmt) {
        snprintf(last_error.message, sizeof last_error.message, "%s", caller_strerror(code));
        return code;
    }
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(last_error.message, sizeof last_error.message, fmt, ap);
    va_end(ap);
    if (n >= (int)sizeof last_error.message)
        caller__trunc(last_error.message, sizeof last_error.message, last_error.message,
                      sizeof last_error.message - 4);
    return code;
}

/* Length of the longest prefix of s no longer than max bytes that does not
 * end inside a UTF-8 sequence. */
static size_t utf8_cut(const char *s, size_t max)
{
    size_t n = max;
    while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
        n--;
    return n;
}

char *caller__trunc(char *buf, size_t len, const char *s, size_t max)
{
    static const char ellipsis[] = "\xE2\x80\xA6"; /* … */
    if (len == 0)
        return buf;
    size_t n = strlen(s);
    if (n <= max && n < len) {
        memmove(buf, s, n + 1);
        return buf;
    }
    if (max > n)
        max = n;
    if (max + sizeof ellipsis > len)
        max = len > sizeof ellipsis ? len - sizeof ellipsis : 0;
    size_t cut = utf8_cut(s, max);
    memmove(buf, s, cut);
    memcpy(buf + cut, ellipsis, sizeof ellipsis);
    return buf;
}

int caller__check_reserved(const uintptr_t *reserved, size_t n, const char *api, const char *what)
{
    for (size_t i = 0; i < n; i++)
        if (reserved[i])
            return caller__fail(-EINVAL,
                                "%s: %s.reserved[%zu] is not zero: zero-initialize the struct (or "
                                "the program sets a field this version of libcaller, %d.%d.%d, "
                                "does not have)",
                                api, what, i, CALLER_VERSION_MAJOR, CALLER_VERSION_MINOR,
                                CALLER_VERSION_PATCH);
    return 0;
}
