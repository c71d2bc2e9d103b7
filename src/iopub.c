/*
 * ZeroMQ iopub sockets (SPEC §10): a Caller given a ZeroMQ context opens, in
 * its own thread as it starts, a PUB socket (linger 50 ms) connected to the
 * process-wide iopub URL, and registers it in the process-wide map thread
 * -> socket; it closes and unregisters it in its thread as it finishes, so
 * zmq_ctx_term() never waits on it.
 *
 * ZeroMQ sockets are not thread-safe: a socket is only ever touched in the
 * thread that opened it. The map (under `map_lock`, a leaf) only hands out
 * the pointer; using it from another thread is the caller's error.
 */
#include "alloc.h"
#include "core.h"
#include "error.h"
#include "iopub.h"

#include <string.h>

#define DEFAULT_URL "inproc://iopub"

static pthread_mutex_t map_lock = PTHREAD_MUTEX_INITIALIZER;
static char iopub_url[256] = DEFAULT_URL;

#if CALLER_WITH_ZMQ
#include <zmq.h>

typedef struct entry {
    struct entry *next;
    pthread_t thread;
    void *socket;
} entry_t;

static entry_t *map;
static _Thread_local void *tl_socket;

int caller__iopub_open(caller_t *c)
{
    if (!c->zmq_context)
        return 0;
    char url[sizeof iopub_url];
    pthread_mutex_lock(&map_lock);
    memcpy(url, iopub_url, sizeof url);
    pthread_mutex_unlock(&map_lock);
    entry_t *e = caller__malloc(sizeof *e);
    if (!e)
        return caller__fail(-ENOMEM, "caller: no memory for the iopub socket");
    void *s = zmq_socket(c->zmq_context, ZMQ_PUB);
    int linger = 50;
    if (!s || zmq_setsockopt(s, ZMQ_LINGER, &linger, sizeof linger) != 0 ||
        zmq_connect(s, url) != 0) {
        int err = zmq_errno();
        if (s)
            zmq_close(s);
        caller__free(e);
        return caller__fail(-err, "caller: cannot open the iopub socket to %s: %s", url,
                            zmq_strerror(err));
    }
    e->thread = pthread_self();
    e->socket = s;
    pthread_mutex_lock(&map_lock);
    e->next = map;
    map = e;
    pthread_mutex_unlock(&map_lock);
    c->iopub = s;
    tl_socket = s;
    return 0;
}

void caller__iopub_close(caller_t *c)
{
    void *s = c->iopub;
    if (!s)
        return;
    entry_t *found = NULL;
    pthread_mutex_lock(&map_lock);
    for (entry_t **pp = &map; *pp; pp = &(*pp)->next)
        if ((*pp)->socket == s) {
            found = *pp;
            *pp = found->next;
            break;
        }
    pthread_mutex_unlock(&map_lock);
    caller__free(found);
    zmq_close(s);
    c->iopub = NULL;
    if (tl_socket == s)
        tl_socket = NULL;
}

void *caller_iopub_socket(void)
{
    return tl_socket;
}

void *caller_iopub_socket_for(pthread_t thread)
{
    void *s = NULL;
    pthread_mutex_lock(&map_lock);
    for (entry_t *e = map; e; e = e->next)
        if (pthread_equal(e->thread, thread)) {
            s = e->socket;
            break;
        }
    pthread_mutex_unlock(&map_lock);
    return s;
}

size_t caller_iopub_count(void)
{
    size_t n = 0;
    pthread_mutex_lock(&map_lock);
    for (entry_t *e = map; e; e = e->next)
        n++;
    pthread_mutex_unlock(&map_lock);
    return n;
}

#else /* built without ZeroMQ */

int caller__iopub_open(caller_t *c)
{
    if (!c->zmq_context)
        return 0;
    return caller__fail(-ENOTSUP, "caller: libcaller was built without ZeroMQ");
}

void caller__iopub_close(caller_t *c)
{
    (void)c;
}

void *caller_iopub_socket(void)
{
    return NULL;
}

void *caller_iopub_socket_for(pthread_t thread)
{
    (void)thread;
    return NULL;
}

size_t caller_iopub_count(void)
{
    return 0;
}

#endif

void caller__iopub_fork(int phase)
{
    if (phase == 0) {
        pthread_mutex_lock(&map_lock);
    } else if (phase == 1) {
        pthread_mutex_unlock(&map_lock);
    } else {
        pthread_mutex_init(&map_lock, NULL);
#if CALLER_WITH_ZMQ
        map = NULL; /* the parent's sockets: not ours to use or close */
        tl_socket = NULL;
#endif
    }
}

int caller_iopub_set_url(const char *url)
{
    if (!url || !*url || strlen(url) >= sizeof iopub_url)
        return caller__fail(-EINVAL, "caller_iopub_set_url: %s",
                            url && *url ? "the URL is too long" : "no URL");
    pthread_mutex_lock(&map_lock);
    strcpy(iopub_url, url);
    pthread_mutex_unlock(&map_lock);
    return 0;
}

int caller_iopub_url(char *buf, size_t len)
{
    if (!buf && len)
        return caller__fail(-EINVAL, "caller_iopub_url: buf is NULL");
    pthread_mutex_lock(&map_lock);
    int n = snprintf(buf, len, "%s", iopub_url);
    pthread_mutex_unlock(&map_lock);
    return n;
}

void *caller_zmq_context(const caller_t *c)
{
    return c ? c->zmq_context : NULL;
}
