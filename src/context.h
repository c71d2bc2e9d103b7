/*
 * Contexts (context.c): what a new Pending joins. A context is an
 * immutable chain of nodes, each naming one active tracker (a group or a
 * manager, group.c) by its operations; the current context is
 * thread-local, and a task carries its own (sched.c swaps it in while the
 * task runs). Contexts know nothing of what a tracker is.
 */
#ifndef CALLER_CONTEXT_H
#define CALLER_CONTEXT_H

#include "caller.h"

#include <stdatomic.h>

/* What a context needs of a tracker. */
typedef struct caller__tracker_ops {
    int kind;                                          /* one tracker of each kind joins */
    void (*ref)(void *tracker);                        /* a context node holds one */
    void (*unref)(void *tracker);                      /* the node's, at its end */
    void (*track)(void *tracker, caller_pending_t *p); /* @p p is new */
} caller__tracker_ops_t;

typedef struct caller__ctx {
    atomic_int refs;
    struct caller__ctx *parent; /* a reference */
    void *tracker;              /* a reference (ops->ref) */
    const caller__tracker_ops_t *ops;
} caller__ctx_t;

/* The calling thread's (or running task's) context; borrowed. */
caller__ctx_t *caller__ctx_current(void);
/* Make @p ctx current (borrowed); returns the previous one. */
caller__ctx_t *caller__ctx_swap(caller__ctx_t *ctx);
caller__ctx_t *caller__ctx_ref(caller__ctx_t *ctx);
void caller__ctx_unref(caller__ctx_t *ctx);
/* A node for @p tracker on top of the current context, made current (its
 * one reference is the thread's); NULL without memory. */
caller__ctx_t *caller__ctx_push(void *tracker, const caller__tracker_ops_t *ops);
/* A new Pending joins the innermost tracker of each kind in the current
 * context. */
void caller__ctx_track(caller_pending_t *p);

#endif /* CALLER_CONTEXT_H */
