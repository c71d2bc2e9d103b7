/* The library's version: the header's, as it was when the library was built. */
#include "caller.h"

#define CALLER_STR_(x) #x
#define CALLER_STR(x) CALLER_STR_(x)

unsigned caller_version(void)
{
    return CALLER_VERSION_HEX;
}

const char *caller_version_string(void)
{
    return CALLER_STR(CALLER_VERSION_MAJOR) "." CALLER_STR(CALLER_VERSION_MINOR) "." CALLER_STR(
        CALLER_VERSION_PATCH);
}
