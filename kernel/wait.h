/*
 * Waiting, in a task, until a ZeroMQ socket has a message to read.
 *
 * This is the one place where the kernel waits for input; everything else
 * reads with ZMQ_DONTWAIT once it returns. It is written on the public
 * caller_loop() accessor: a uv_poll_t on the socket's ZMQ_FD, in the
 * Caller's own loop, completes a Pending that the task waits on (so the
 * task suspends, and is cancelled like any other wait). When the library's
 * caller_wait_zmq() is available, kwait_readable() becomes a call to it.
 */
#ifndef CALLER_KERNEL_WAIT_H
#define CALLER_KERNEL_WAIT_H

typedef struct kwait kwait_t;

/** A waiter for @p socket. Thread: a task of the Caller that will wait; the
 *  waiter belongs to that Caller's thread. NULL on failure. */
kwait_t *kwait_new(void *socket);

/** Suspend the running task until @p w's socket can be read.
 *  @return 0; -ECANCELED if the task was cancelled; another negative code
 *  on failure. */
int kwait_readable(kwait_t *w);

/** Release @p w (NULL: nothing). Thread: the one that made it. */
void kwait_close(kwait_t *w);

#endif
