/* Execution queues (queue.c). */
#ifndef CALLER_QUEUE_H
#define CALLER_QUEUE_H

#include "caller.h"

typedef struct caller__queue caller__queue_t;

caller_pending_t *caller__queue_call(caller_t *c, caller_fn key_fn, const void *key, caller_fn fn,
                                     void *arg, const char *name);

#endif /* CALLER_QUEUE_H */
