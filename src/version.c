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

/* The option structs keep their size across versions (see "Option structs"
 * in caller.h): new fields come out of `reserved`. Checked for LP64. */
#if UINTPTR_MAX == UINT64_MAX
_Static_assert(sizeof(caller_options_t) == 128, "caller_options_t must stay 128 bytes");
_Static_assert(sizeof(caller_pool_config_t) == 64, "caller_pool_config_t must stay 64 bytes");
_Static_assert(sizeof(caller_as_completed_options_t) == 32,
               "caller_as_completed_options_t must stay 32 bytes");
#endif
