/*
 * The kernel's iopub channel, built on the library's per-thread iopub
 * sockets (SPEC §10).
 *
 * Every Caller of the kernel (Shell, Control, the workers of %example) is
 * made with the kernel's ZeroMQ context, so each opens its own PUB socket,
 * connected to the library's iopub URL, in its own thread. The kernel binds
 * one SUB socket at that URL and one PUB socket at the connection file's
 * iopub port, and a forwarder thread copies every message from the first
 * to the second. That is the simplest correct shape: no socket is shared
 * between threads (each thread publishes on its own, without locks), and
 * the client sees one PUB at the port it was given.
 *
 * Two things a PUB socket does not promise, and what kiopub_flush() adds:
 *  - a new PUB socket drops what it sends until the SUB's subscription has
 *    reached it (ZeroMQ's "slow joiner");
 *  - messages of two threads may reach the forwarder in either order, while
 *    Jupyter needs a cell's output to come before its "idle" status.
 * kiopub_flush() sends a token on this thread's socket and waits (suspending
 * a task) until the forwarder has seen it, resending while none arrives:
 * once it returns, the subscription is there and everything this thread
 * sent before has been forwarded. kiopub_send() flushes a thread's socket
 * the first time it is used; worker jobs flush once more before they end.
 */
#ifndef CALLER_KERNEL_IOPUB_H
#define CALLER_KERNEL_IOPUB_H

#include "wire.h"

/** Bind the SUB at the library's iopub URL and the PUB at @p endpoint, and
 *  start the forwarder thread. Call before any Caller starts.
 *  @return 0, or -1 with @p err filled. */
int kiopub_start(void *zmq_context, const char *endpoint, char *err, size_t errlen);

/** Join the forwarder. It ends when the ZeroMQ context is shut down
 *  (zmq_ctx_shutdown), after every Caller has stopped. */
void kiopub_join(void);

/** Publish on this thread's iopub socket (its Caller's): @p content is
 *  taken over. Thread: a Caller thread of the kernel. @return 0 or -1. */
int kiopub_send(const kwire_msg_t *parent, const char *msg_type, json_t *content);

/** See above. @return 0; -ECANCELED (the task was cancelled); -ETIMEDOUT
 *  (the forwarder never answered in 10 s); -EINVAL (no iopub socket). */
int kiopub_flush(void);

/** Publish a status message ("busy", "idle", "starting"). */
int kiopub_status(const kwire_msg_t *parent, const char *state);

#endif
