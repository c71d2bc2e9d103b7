/* ZeroMQ iopub sockets (iopub.c): one PUB socket per Caller thread. */
#ifndef CALLER_IOPUB_H
#define CALLER_IOPUB_H

#include "caller.h"

/* In the Caller's thread: open and register its PUB socket if it has a
 * ZeroMQ context (0 or an error); close and unregister it. */
int caller__iopub_open(caller_t *c);
void caller__iopub_close(caller_t *c);

/* fork(): 0 = prepare (take the module's process-wide lock), 1 = in the
 * parent after (release it), 2 = in the child (reset the state). */
void caller__iopub_fork(int phase);

#endif /* CALLER_IOPUB_H */
