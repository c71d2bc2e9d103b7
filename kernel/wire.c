/*
 * The Jupyter wire protocol: see wire.h. HMAC-SHA256 comes from libsodium
 * (crypto_auth_hmacsha256_*, which takes a key of any length, as Jupyter's
 * keys are), JSON from jansson.
 */
#include "wire.h"

#include <errno.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <zmq.h>

#define DELIM "<IDS|MSG>"
#define HMAC_HEX (2 * crypto_auth_hmacsha256_BYTES)

static unsigned char key[256];
static size_t key_len;
static char session[40];

static void new_uuid(char out[37])
{
    unsigned char b[16];
    randombytes_buf(b, sizeof b);
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40); /* version 4 */
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80); /* RFC 4122 variant */
    snprintf(out, 37, "%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0],
             b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
             b[14], b[15]);
}

int kwire_init(const char *k)
{
    if (sodium_init() < 0)
        return -1;
    key_len = strlen(k);
    if (key_len > sizeof key)
        return -1;
    memcpy(key, k, key_len);
    new_uuid(session);
    return 0;
}

const char *kwire_session(void)
{
    return session;
}

/* ------------------------------------------------------- connection file */

static int copy_string(json_t *root, const char *name, char *dst, size_t len, const char *dflt)
{
    json_t *v = json_object_get(root, name);
    const char *s = v ? json_string_value(v) : dflt;
    if (!s || strlen(s) >= len)
        return -1;
    memcpy(dst, s, strlen(s) + 1);
    return 0;
}

static int get_port(json_t *root, const char *name, int *port)
{
    json_t *v = json_object_get(root, name);
    if (!json_is_integer(v) || json_integer_value(v) < 0 || json_integer_value(v) > 65535)
        return -1;
    *port = (int)json_integer_value(v);
    return 0;
}

int kwire_read_connection(const char *path, kwire_connection_t *conn, char *err, size_t errlen)
{
    json_error_t jerr;
    json_t *root = json_load_file(path, 0, &jerr);
    if (!root) {
        snprintf(err, errlen, "%s:%d: %s", path, jerr.line, jerr.text);
        return -1;
    }
    memset(conn, 0, sizeof *conn);
    const char *bad = NULL;
    if (copy_string(root, "transport", conn->transport, sizeof conn->transport, "tcp") != 0)
        bad = "transport";
    else if (copy_string(root, "ip", conn->ip, sizeof conn->ip, "127.0.0.1") != 0)
        bad = "ip";
    else if (copy_string(root, "key", conn->key, sizeof conn->key, "") != 0)
        bad = "key";
    else if (copy_string(root, "signature_scheme", conn->signature_scheme,
                         sizeof conn->signature_scheme, "hmac-sha256") != 0)
        bad = "signature_scheme";
    else if (get_port(root, "shell_port", &conn->shell_port) != 0)
        bad = "shell_port";
    else if (get_port(root, "iopub_port", &conn->iopub_port) != 0)
        bad = "iopub_port";
    else if (get_port(root, "stdin_port", &conn->stdin_port) != 0)
        bad = "stdin_port";
    else if (get_port(root, "control_port", &conn->control_port) != 0)
        bad = "control_port";
    else if (get_port(root, "hb_port", &conn->hb_port) != 0)
        bad = "hb_port";
    json_decref(root);
    if (bad) {
        snprintf(err, errlen, "%s: missing or bad \"%s\"", path, bad);
        return -1;
    }
    if (strcmp(conn->signature_scheme, "hmac-sha256") != 0) {
        snprintf(err, errlen, "%s: signature_scheme \"%s\" is not supported (only hmac-sha256)",
                 path, conn->signature_scheme);
        return -1;
    }
    if (strcmp(conn->transport, "tcp") != 0 && strcmp(conn->transport, "ipc") != 0) {
        snprintf(err, errlen, "%s: transport \"%s\" is not supported (tcp or ipc)", path,
                 conn->transport);
        return -1;
    }
    return 0;
}

void kwire_endpoint(const kwire_connection_t *conn, int port, char *buf, size_t len)
{
    if (strcmp(conn->transport, "ipc") == 0)
        snprintf(buf, len, "ipc://%s-%d", conn->ip, port);
    else
        snprintf(buf, len, "tcp://%s:%d", conn->ip, port);
}

/* ------------------------------------------------------------- signing */

/* The hex HMAC of the four JSON frames. */
static void sign(const void *const part[4], const size_t len[4], char out[HMAC_HEX + 1])
{
    crypto_auth_hmacsha256_state st;
    unsigned char mac[crypto_auth_hmacsha256_BYTES];
    crypto_auth_hmacsha256_init(&st, key, key_len);
    for (int i = 0; i < 4; i++)
        crypto_auth_hmacsha256_update(&st, part[i], len[i]);
    crypto_auth_hmacsha256_final(&st, mac);
    sodium_bin2hex(out, HMAC_HEX + 1, mac, sizeof mac);
}

/* ------------------------------------------------------------- receive */

typedef struct frames {
    size_t n, cap;
    zmq_msg_t *m;
} frames_t;

static void frames_free(frames_t *f)
{
    for (size_t i = 0; i < f->n; i++)
        zmq_msg_close(&f->m[i]);
    free(f->m);
    f->m = NULL;
    f->n = f->cap = 0;
}

/* Read every frame of one multipart message. -1 when none could be read. */
static int recv_frames(void *socket, frames_t *f)
{
    int more = 1;
    while (more) {
        if (f->n == f->cap) {
            size_t cap = f->cap ? 2 * f->cap : 8;
            zmq_msg_t *m = realloc(f->m, cap * sizeof *m);
            if (!m)
                return -1; /* the rest of the message is dropped with the socket's next read */
            f->m = m;
            f->cap = cap;
        }
        zmq_msg_t *m = &f->m[f->n];
        zmq_msg_init(m);
        if (zmq_msg_recv(m, socket, f->n ? 0 : ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(m);
            return -1;
        }
        f->n++;
        more = zmq_msg_more(m);
    }
    return 0;
}

static bool frame_is(zmq_msg_t *m, const char *s)
{
    return zmq_msg_size(m) == strlen(s) && memcmp(zmq_msg_data(m), s, strlen(s)) == 0;
}

static json_t *parse_object(zmq_msg_t *m)
{
    json_t *j = json_loadb(zmq_msg_data(m), zmq_msg_size(m), 0, NULL);
    if (j && !json_is_object(j)) {
        json_decref(j);
        return NULL;
    }
    return j;
}

static int drop(frames_t *f, kwire_msg_t *msg, const char *why)
{
    fprintf(stderr, "caller-kernel: dropped a message: %s\n", why);
    kwire_msg_free(msg);
    frames_free(f);
    return 0;
}

int kwire_recv(void *socket, kwire_msg_t *msg)
{
    memset(msg, 0, sizeof *msg);
    frames_t f = {0};
    if (recv_frames(socket, &f) != 0) {
        int err = errno;
        if (f.n == 0) {
            frames_free(&f);
            errno = err;
            return -1;
        }
        return drop(&f, msg, "could not read all its frames");
    }
    size_t d = 0;
    while (d < f.n && !frame_is(&f.m[d], DELIM))
        d++;
    if (d == f.n)
        return drop(&f, msg, "no <IDS|MSG> delimiter");
    if (f.n - d < 6)
        return drop(&f, msg, "fewer than 5 frames after the delimiter");
    const void *part[4];
    size_t len[4];
    for (int i = 0; i < 4; i++) {
        part[i] = zmq_msg_data(&f.m[d + 2 + i]);
        len[i] = zmq_msg_size(&f.m[d + 2 + i]);
    }
    if (key_len > 0) {
        char want[HMAC_HEX + 1];
        sign(part, len, want);
        zmq_msg_t *got = &f.m[d + 1];
        if (zmq_msg_size(got) != HMAC_HEX || sodium_memcmp(zmq_msg_data(got), want, HMAC_HEX) != 0)
            return drop(&f, msg, "bad signature");
    }
    msg->header = parse_object(&f.m[d + 2]);
    msg->parent = parse_object(&f.m[d + 3]);
    msg->metadata = parse_object(&f.m[d + 4]);
    msg->content = parse_object(&f.m[d + 5]);
    if (!msg->header || !msg->parent || !msg->metadata || !msg->content)
        return drop(&f, msg, "a JSON frame is not a JSON object");
    msg->msg_type = json_string_value(json_object_get(msg->header, "msg_type"));
    if (!msg->msg_type)
        return drop(&f, msg, "no msg_type in its header");
    if (d > 0) {
        msg->ids = calloc(d, sizeof *msg->ids);
        if (!msg->ids)
            return drop(&f, msg, "out of memory");
        for (size_t i = 0; i < d; i++) {
            zmq_msg_t *id = malloc(sizeof *id);
            if (!id)
                return drop(&f, msg, "out of memory");
            zmq_msg_init(id);
            zmq_msg_move(id, &f.m[i]);
            msg->ids[msg->nids++] = id;
        }
    }
    frames_free(&f);
    return 1;
}

void kwire_msg_free(kwire_msg_t *msg)
{
    for (size_t i = 0; i < msg->nids; i++) {
        zmq_msg_close(msg->ids[i]);
        free(msg->ids[i]);
    }
    free(msg->ids);
    json_decref(msg->header);
    json_decref(msg->parent);
    json_decref(msg->metadata);
    json_decref(msg->content);
    memset(msg, 0, sizeof *msg);
}

/* ---------------------------------------------------------------- send */

static json_t *new_header(const char *msg_type)
{
    char id[37], date[64];
    new_uuid(id);
    struct timeval tv;
    gettimeofday(&tv, NULL);
    struct tm tm;
    gmtime_r(&tv.tv_sec, &tm);
    size_t n = strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(date + n, sizeof date - n, ".%06ldZ", (long)tv.tv_usec);
    return json_pack("{s:s, s:s, s:s, s:s, s:s, s:s}", "msg_id", id, "session", session, "username",
                     "caller-kernel", "date", date, "msg_type", msg_type, "version", "5.3");
}

static int send_frame(void *socket, const void *data, size_t len, bool more)
{
    return zmq_send(socket, data, len, more ? ZMQ_SNDMORE : 0) < 0 ? -1 : 0;
}

int kwire_send(void *socket, const kwire_msg_t *parent, bool route, const char *topic,
               const char *msg_type, json_t *content)
{
    int rc = -1;
    char *part[4] = {0};
    json_t *header = new_header(msg_type);
    json_t *metadata = json_object();
    json_t *ph = parent ? json_incref(parent->header) : json_object();
    if (!header || !metadata || !ph || !content)
        goto out;
    part[0] = json_dumps(header, JSON_COMPACT);
    part[1] = json_dumps(ph, JSON_COMPACT);
    part[2] = json_dumps(metadata, JSON_COMPACT);
    part[3] = json_dumps(content, JSON_COMPACT);
    const void *p[4];
    size_t len[4];
    for (int i = 0; i < 4; i++) {
        if (!part[i])
            goto out;
        p[i] = part[i];
        len[i] = strlen(part[i]);
    }
    char sig[HMAC_HEX + 1] = "";
    if (key_len > 0)
        sign(p, len, sig);
    /* Once the first frame is queued, the rest must follow: a multipart
     * message is sent whole or not at all, so errors past here are only
     * reported. */
    rc = 0;
    if (topic && send_frame(socket, topic, strlen(topic), true) != 0)
        rc = -1;
    if (route && parent)
        for (size_t i = 0; rc == 0 && i < parent->nids; i++) {
            zmq_msg_t copy;
            zmq_msg_init(&copy);
            zmq_msg_copy(&copy, parent->ids[i]);
            if (zmq_msg_send(&copy, socket, ZMQ_SNDMORE) < 0) {
                zmq_msg_close(&copy);
                rc = -1;
            }
        }
    if (rc == 0)
        rc = send_frame(socket, DELIM, strlen(DELIM), true);
    if (rc == 0)
        rc = send_frame(socket, sig, strlen(sig), true);
    for (int i = 0; rc == 0 && i < 4; i++)
        rc = send_frame(socket, p[i], len[i], i < 3);
out:
    for (int i = 0; i < 4; i++)
        free(part[i]);
    json_decref(header);
    json_decref(metadata);
    json_decref(ph);
    json_decref(content);
    return rc;
}
