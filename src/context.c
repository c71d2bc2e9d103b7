/*
 * Contexts: the thread-local chain of active trackers that a new Pending
 * joins (see context.h). Lock-free: nodes are immutable and
 * reference-counted; only the thread that owns a context changes which one
 * is current.
 */
#include "context.h"

#include "alloc.h"

static _Thread_local caller__ctx_t *tl_ctx;

caller__ctx_t *caller__ctx_current(void)
{
    return tl_ctx;
}

caller__ctx_t *caller__ctx_swap(caller__ctx_t *ctx)
{
    caller__ctx_t *old = tl_ctx;
    tl_ctx = ctx;
    return old;
}

caller__ctx_t *caller__ctx_ref(caller__ctx_t *ctx)
{
    if (ctx)
        atomic_fetch_add_explicit(&ctx->refs, 1, memory_order_relaxed);
    return ctx;
}

void caller__ctx_unref(caller__ctx_t *ctx)
{
    while (ctx && atomic_fetch_sub_explicit(&ctx->refs, 1, memory_order_acq_rel) == 1) {
        caller__ctx_t *parent = ctx->parent;
        ctx->ops->unref(ctx->tracker);
        caller__free(ctx);
        ctx = parent;
    }
}

caller__ctx_t *caller__ctx_push(void *tracker, const caller__tracker_ops_t *ops)
{
    caller__ctx_t *n = caller__malloc(sizeof *n);
    if (!n)
        return NULL;
    atomic_init(&n->refs, 1);
    n->parent = caller__ctx_ref(tl_ctx);
    n->tracker = tracker;
    n->ops = ops;
    ops->ref(tracker);
    tl_ctx = n;
    return n;
}

void caller__ctx_track(caller_pending_t *p)
{
    /* Two kinds (groups, managers): the innermost of each. */
    int seen = 0;
    for (caller__ctx_t *n = tl_ctx; n && seen != 3; n = n->parent) {
        int bit = 1 << (n->ops->kind - 1);
        if (!(seen & bit)) {
            seen |= bit;
            n->ops->track(n->tracker, p);
        }
    }
}
