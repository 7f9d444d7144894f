/*
 * fcgi.h - a sans-IO FastCGI 1.0 codec.
 *
 * Bytes in, lengths and error codes out: no allocation, no I/O, no Python. The worker's hot loop
 * (fastfpm/_core.pyx) drives it over its own buffers, and it can be fuzzed alone (csrc/fuzz/).
 * fastfpm/protocol.py is the pure-Python reference with the same behaviour.
 */
#ifndef FASTFPM_FCGI_H
#define FASTFPM_FCGI_H

#include <stddef.h>
#include <stdint.h>

#define FCGI_HEADER_LEN 8
#define FCGI_VERSION_1 1
#define FCGI_MAX_CONTENT 65535

/* Record types (FastCGI spec section 8). */
enum {
    FCGI_BEGIN_REQUEST = 1,
    FCGI_ABORT_REQUEST = 2,
    FCGI_END_REQUEST = 3,
    FCGI_PARAMS = 4,
    FCGI_STDIN = 5,
    FCGI_STDOUT = 6,
    FCGI_STDERR = 7,
    FCGI_DATA = 8,
    FCGI_GET_VALUES = 9,
    FCGI_GET_VALUES_RESULT = 10,
    FCGI_UNKNOWN_TYPE = 11
};

/* Roles, BEGIN_REQUEST flags and END_REQUEST protocol statuses. */
enum { FCGI_RESPONDER = 1, FCGI_AUTHORIZER = 2, FCGI_FILTER = 3 };
enum { FCGI_KEEP_CONN = 1 };
enum { FCGI_REQUEST_COMPLETE = 0, FCGI_CANT_MPX_CONN = 1, FCGI_OVERLOADED = 2, FCGI_UNKNOWN_ROLE = 3 };

/* Results of the parsers: >= 0 is a length, these are the failures. */
enum {
    FCGI_NEED_MORE = -1,     /* not an error: feed more bytes */
    FCGI_ERR_VERSION = -2,   /* version byte is not 1 */
    FCGI_ERR_TRUNCATED = -3, /* a name/value length runs past the end of the content */
    FCGI_ERR_LENGTH = -4,    /* a length field is out of range for the record's type */
    FCGI_ERR_REQUEST_ID = -5 /* a management record (GET_VALUES ...) with a non-zero request id */
};

typedef struct {
    uint8_t version;
    uint8_t type;
    uint16_t request_id;
    uint16_t content_length;
    uint8_t padding_length;
} fcgi_header;

/*
 * Parse one record at buf[0..len). On success fills *hdr and returns the whole record's size
 * (header + content + padding); the content starts at buf + FCGI_HEADER_LEN. Returns FCGI_NEED_MORE
 * while the record is incomplete, FCGI_ERR_VERSION for a version other than 1.
 */
long fcgi_parse_record(const uint8_t *buf, size_t len, fcgi_header *hdr);

/*
 * Parse only the 8-byte header at buf[0..len): returns FCGI_HEADER_LEN, FCGI_NEED_MORE or
 * FCGI_ERR_VERSION. Lets a reader stream a record's content (a large STDIN) without holding it whole.
 */
long fcgi_parse_header(const uint8_t *buf, size_t len, fcgi_header *hdr);

/*
 * The spec's rules on a parsed header that need no connection state: 0 when sound,
 * FCGI_ERR_REQUEST_ID for GET_VALUES, GET_VALUES_RESULT or UNKNOWN_TYPE with a request id other
 * than 0, FCGI_ERR_LENGTH for a BEGIN_REQUEST, END_REQUEST or UNKNOWN_TYPE body that is not the
 * 8 bytes the spec fixes (a record with request id 0 is a management record whatever its type,
 * and is answered with UNKNOWN_TYPE rather than checked here). Whether the request id belongs to
 * the request in progress is the caller's business.
 */
int fcgi_check_header(const fcgi_header *hdr);

/*
 * The role and flags of a BEGIN_REQUEST body: 0, or FCGI_ERR_LENGTH unless len is 8.
 */
int fcgi_parse_begin_request(const uint8_t *content, size_t len, int *role, int *flags);

/*
 * Whether buf[0..len) holds a whole request head, so that reading it will not have to wait:
 * BEGIN_REQUEST (RESPONDER), then that request's PARAMS records through the empty one. Also 1 when
 * the first record that breaks that order is complete (a management record, another role, a record
 * of another request or type, a malformed one): the caller's record rules act on it now. 0 while
 * the buffer ends inside a head (or holds nothing). Reads only record headers and BEGIN bodies.
 */
int fcgi_head_ready(const uint8_t *buf, size_t len);

/*
 * Parse one name/value pair at buf[0..len). Returns the bytes consumed and sets the name and value
 * offsets and lengths (relative to buf), or FCGI_ERR_TRUNCATED when the lengths run past len.
 */
long fcgi_parse_pair(const uint8_t *buf, size_t len, size_t *name_off, size_t *name_len,
                     size_t *value_off, size_t *value_len);

/* Writers. Each returns the bytes written to out; the caller provides room (see the _size helpers). */

/* Padding that brings content_length to a multiple of 8, as php-fpm and libfcgi emit. */
static inline unsigned fcgi_padding(size_t content_length) { return (unsigned)((8 - (content_length & 7)) & 7); }

size_t fcgi_write_header(uint8_t *out, int type, int request_id, size_t content_length, unsigned padding);

/* One record with content (at most FCGI_MAX_CONTENT bytes), padded. */
size_t fcgi_write_record(uint8_t *out, int type, int request_id, const uint8_t *content, size_t len);

/* Room needed to frame len bytes of stream data (split at FCGI_MAX_CONTENT); 0 for len == 0. */
size_t fcgi_stream_size(size_t len);

/* Frame data as a stream (STDOUT, STDERR): records of at most FCGI_MAX_CONTENT bytes, each padded. */
size_t fcgi_write_stream(uint8_t *out, int type, int request_id, const uint8_t *data, size_t len);

/* BEGIN_REQUEST record (16 bytes): what a web server sends; for clients and tests. */
size_t fcgi_write_begin_request(uint8_t *out, int request_id, int role, int flags);

/* END_REQUEST record (16 bytes). */
size_t fcgi_write_end_request(uint8_t *out, int request_id, uint32_t app_status, int protocol_status);

/* UNKNOWN_TYPE record (16 bytes, request id 0). */
size_t fcgi_write_unknown_type(uint8_t *out, int record_type);

/* Room needed for one encoded pair, and the encoder (1-byte lengths below 128, else 4 bytes). */
size_t fcgi_pair_size(size_t name_len, size_t value_len);
size_t fcgi_write_pair(uint8_t *out, const uint8_t *name, size_t name_len, const uint8_t *value,
                       size_t value_len);

#endif
