/*
 * The backends this build has, and which one a Caller gets (backend.h).
 */
#include "backend.h"
#include "error.h"

#include "caller.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const caller__backend_ops_t *const backends[] = {
    &caller__backend_uv,
#if CALLER_WITH_GLIB
    &caller__backend_glib,
#endif
};

enum { NBACKENDS = sizeof backends / sizeof backends[0] };

const caller__backend_ops_t *caller__backend_find(const char *name)
{
    for (size_t i = 0; i < NBACKENDS; i++)
        if (strcmp(backends[i]->name, name) == 0)
            return backends[i];
    return NULL;
}

size_t caller_backends(const char **names, size_t max)
{
    for (size_t i = 0; names && i < NBACKENDS && i < max; i++)
        names[i] = backends[i]->name;
    return NBACKENDS;
}

int caller__backend_choose(const caller_options_t *o, const char *api,
                           const caller__backend_ops_t **ops)
{
    const char *name = o ? o->backend : NULL;
    void *uv = o ? (void *)o->loop : NULL;
    void *glib = o ? (void *)o->glib_context : NULL;
    if (uv && glib)
        return caller__fail(-EINVAL,
                            "%s: options.loop (a libuv loop) and options.glib_context (a GLib "
                            "context) are both set: give one",
                            api);
    if (!name) {
        if (uv)
            name = "libuv";
        else if (glib)
            name = "glib";
    }
    const char *from = "options.backend";
    if (!name) {
        /* The process's default: the environment, else libuv. */
        name = getenv("CALLER_BACKEND");
        from = "CALLER_BACKEND";
        if (!name || !name[0])
            name = "libuv";
    }
    const caller__backend_ops_t *found = caller__backend_find(name);
    if (!found) {
        char names[64] = "";
        for (size_t i = 0; i < NBACKENDS; i++)
            snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", i ? ", " : "",
                     backends[i]->name);
        return caller__fail(-EINVAL, "%s: unknown backend '%s' in %s (this build has: %s)", api,
                            name, from, names);
    }
    if ((uv && found != &caller__backend_uv) || (glib && strcmp(found->name, "glib") != 0))
        return caller__fail(-EINVAL,
                            "%s: options.backend is '%s' but the loop given is %s: the backend "
                            "does not match the loop",
                            api, found->name,
                            uv ? "options.loop (libuv)" : "options.glib_context (glib)");
    *ops = found;
    return 0;
}
