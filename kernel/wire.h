/*
 * The Jupyter wire protocol (messaging 5.3) for caller-kernel: the
 * connection file, and messages as ZeroMQ multipart frames
 *
 *     [identities...] "<IDS|MSG>" signature header parent_header metadata content [buffers...]
 *
 * signed with HMAC-SHA256 (libsodium) over the four JSON frames, whose JSON
 * is read and written with jansson.
 *
 * Nothing here keeps state between calls except the key and session given
 * to kwire_init(), which are set once before any thread starts: every
 * function may be called from any thread, on sockets that thread owns.
 */
#ifndef CALLER_KERNEL_WIRE_H
#define CALLER_KERNEL_WIRE_H

#include <jansson.h>
#include <stdbool.h>
#include <stddef.h>

/** The connection file as Jupyter writes it. */
typedef struct kwire_connection {
    char transport[16];
    char ip[64];
    int shell_port, iopub_port, stdin_port, control_port, hb_port;
    char key[256];
    char signature_scheme[32];
} kwire_connection_t;

/** Read a connection file. @return 0, or -1 with @p err filled. */
int kwire_read_connection(const char *path, kwire_connection_t *conn, char *err, size_t errlen);

/** The ZeroMQ endpoint of @p port: "tcp://ip:port" or "ipc://ip-port". */
void kwire_endpoint(const kwire_connection_t *conn, int port, char *buf, size_t len);

/** Set the signing key (may be empty: messages are then unsigned) and
 *  make this process's session id. Call once, before any other kwire_
 *  function and before threads start. @return 0, or -1 (libsodium failed). */
int kwire_init(const char *key);

/** A received message. The identity frames are kept as they came, to route
 *  the reply back through the ROUTER socket. */
typedef struct kwire_msg {
    size_t nids;
    void **ids; /* zmq_msg_t *, one per identity frame */
    json_t *header, *parent, *metadata, *content;
    const char *msg_type; /* in header; valid while header lives */
} kwire_msg_t;

/**
 * Receive one message from @p socket (a ROUTER), without waiting: the
 * caller has made sure a message is there. A message with a bad signature
 * or malformed frames or JSON is logged and dropped.
 *
 * @return 1 with @p msg filled (free it with kwire_msg_free), 0 when a
 *         message was dropped, -1 when nothing could be read (errno set by
 *         ZeroMQ, e.g. EAGAIN).
 */
int kwire_recv(void *socket, kwire_msg_t *msg);

/** Free what kwire_recv() filled. */
void kwire_msg_free(kwire_msg_t *msg);

/**
 * Send a message of @p msg_type with @p content (a reference is taken
 * over: content is released) as a reply to or consequence of @p parent
 * (NULL: none). With @p route true the parent's identities go first (a
 * ROUTER reply); with a @p topic (iopub) that topic is the first frame.
 * Thread: the one that owns @p socket. @return 0, or -1.
 */
int kwire_send(void *socket, const kwire_msg_t *parent, bool route, const char *topic,
               const char *msg_type, json_t *content);

/** The session id of this kernel process (for iopub topics). */
const char *kwire_session(void);

#endif
