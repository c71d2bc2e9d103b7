/* The to_thread worker pool (pool.c), as the lifecycle sees it. */
#ifndef CALLER_POOL_H
#define CALLER_POOL_H

#include "core.h"

void caller__pool_free(caller_pool_t *pool);
/* Loop thread of the owner, on stop. */
void caller__pool_stop(caller_t *c);
/* @p w is stopping: if it idles in @p parent's pool, it leaves it. */
void caller__pool_forget(caller_t *parent, caller_t *w);

#endif /* CALLER_POOL_H */
