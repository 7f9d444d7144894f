/* fcgi.c - the sans-IO FastCGI codec declared in fcgi.h. */
#include "fcgi.h"

#include <string.h>

long fcgi_parse_header(const uint8_t *buf, size_t len, fcgi_header *hdr)
{
    if (len < FCGI_HEADER_LEN)
        return FCGI_NEED_MORE;
    if (buf[0] != FCGI_VERSION_1)
        return FCGI_ERR_VERSION;
    hdr->version = buf[0];
    hdr->type = buf[1];
    hdr->request_id = (uint16_t)((buf[2] << 8) | buf[3]);
    hdr->content_length = (uint16_t)((buf[4] << 8) | buf[5]);
    hdr->padding_length = buf[6];
    return FCGI_HEADER_LEN;
}

long fcgi_parse_record(const uint8_t *buf, size_t len, fcgi_header *hdr)
{
    long rc = fcgi_parse_header(buf, len, hdr);
    if (rc < 0)
        return rc;
    size_t total = FCGI_HEADER_LEN + (size_t)hdr->content_length + hdr->padding_length;
    if (len < total)
        return FCGI_NEED_MORE;
    return (long)total;
}

int fcgi_check_header(const fcgi_header *hdr)
{
    if (hdr->request_id == 0)
        return 0; /* a management record: known types are answered, others get UNKNOWN_TYPE */
    switch (hdr->type) {
    case FCGI_GET_VALUES:
    case FCGI_GET_VALUES_RESULT:
    case FCGI_UNKNOWN_TYPE:
        return FCGI_ERR_REQUEST_ID;
    case FCGI_BEGIN_REQUEST:
    case FCGI_END_REQUEST:
        return hdr->content_length == 8 ? 0 : FCGI_ERR_LENGTH;
    default:
        return 0;
    }
}

int fcgi_parse_begin_request(const uint8_t *content, size_t len, int *role, int *flags)
{
    if (len != 8)
        return FCGI_ERR_LENGTH;
    *role = (content[0] << 8) | content[1];
    *flags = content[2];
    return 0;
}

int fcgi_head_ready(const uint8_t *buf, size_t len)
{
    fcgi_header hdr;
    int role, flags;
    long rc = fcgi_parse_record(buf, len, &hdr);
    if (rc == FCGI_NEED_MORE)
        return 0;
    if (rc < 0 || hdr.type != FCGI_BEGIN_REQUEST || hdr.request_id == 0
        || fcgi_parse_begin_request(buf + FCGI_HEADER_LEN, hdr.content_length, &role, &flags) < 0
        || role != FCGI_RESPONDER)
        return 1;
    uint16_t request_id = hdr.request_id;
    for (size_t pos = (size_t)rc;; pos += (size_t)rc) {
        rc = fcgi_parse_record(buf + pos, len - pos, &hdr);
        if (rc == FCGI_NEED_MORE)
            return 0;
        if (rc < 0 || hdr.type != FCGI_PARAMS || hdr.request_id != request_id || hdr.content_length == 0)
            return 1;
    }
}

/* Reads a 1- or 4-byte length at buf[*pos]; returns 0 on success, -1 when truncated. */
static int read_length(const uint8_t *buf, size_t len, size_t *pos, size_t *out)
{
    if (*pos >= len)
        return -1;
    uint8_t b0 = buf[*pos];
    if (b0 < 0x80) {
        *out = b0;
        *pos += 1;
        return 0;
    }
    if (len - *pos < 4)
        return -1;
    *out = ((size_t)(b0 & 0x7f) << 24) | ((size_t)buf[*pos + 1] << 16) | ((size_t)buf[*pos + 2] << 8) |
           (size_t)buf[*pos + 3];
    *pos += 4;
    return 0;
}

long fcgi_parse_pair(const uint8_t *buf, size_t len, size_t *name_off, size_t *name_len,
                     size_t *value_off, size_t *value_len)
{
    size_t pos = 0, nlen, vlen;
    if (read_length(buf, len, &pos, &nlen) || read_length(buf, len, &pos, &vlen))
        return FCGI_ERR_TRUNCATED;
    /* Compare against what is left rather than adding, so huge lengths cannot overflow. */
    if (nlen > len - pos || vlen > len - pos - nlen)
        return FCGI_ERR_TRUNCATED;
    *name_off = pos;
    *name_len = nlen;
    *value_off = pos + nlen;
    *value_len = vlen;
    return (long)(pos + nlen + vlen);
}

size_t fcgi_write_header(uint8_t *out, int type, int request_id, size_t content_length, unsigned padding)
{
    out[0] = FCGI_VERSION_1;
    out[1] = (uint8_t)type;
    out[2] = (uint8_t)(request_id >> 8);
    out[3] = (uint8_t)request_id;
    out[4] = (uint8_t)(content_length >> 8);
    out[5] = (uint8_t)content_length;
    out[6] = (uint8_t)padding;
    out[7] = 0;
    return FCGI_HEADER_LEN;
}

size_t fcgi_write_record(uint8_t *out, int type, int request_id, const uint8_t *content, size_t len)
{
    unsigned padding = fcgi_padding(len);
    fcgi_write_header(out, type, request_id, len, padding);
    if (len)
        memcpy(out + FCGI_HEADER_LEN, content, len);
    memset(out + FCGI_HEADER_LEN + len, 0, padding);
    return FCGI_HEADER_LEN + len + padding;
}

size_t fcgi_stream_size(size_t len)
{
    size_t full = len / FCGI_MAX_CONTENT, rest = len % FCGI_MAX_CONTENT;
    size_t size = full * (FCGI_HEADER_LEN + FCGI_MAX_CONTENT + fcgi_padding(FCGI_MAX_CONTENT));
    if (rest)
        size += FCGI_HEADER_LEN + rest + fcgi_padding(rest);
    return size;
}

size_t fcgi_write_stream(uint8_t *out, int type, int request_id, const uint8_t *data, size_t len)
{
    size_t written = 0;
    while (len) {
        size_t chunk = len > FCGI_MAX_CONTENT ? FCGI_MAX_CONTENT : len;
        written += fcgi_write_record(out + written, type, request_id, data, chunk);
        data += chunk;
        len -= chunk;
    }
    return written;
}

size_t fcgi_write_begin_request(uint8_t *out, int request_id, int role, int flags)
{
    uint8_t body[8] = {(uint8_t)(role >> 8), (uint8_t)role, (uint8_t)flags, 0, 0, 0, 0, 0};
    return fcgi_write_record(out, FCGI_BEGIN_REQUEST, request_id, body, sizeof body);
}

size_t fcgi_write_end_request(uint8_t *out, int request_id, uint32_t app_status, int protocol_status)
{
    uint8_t body[8] = {(uint8_t)(app_status >> 24), (uint8_t)(app_status >> 16), (uint8_t)(app_status >> 8),
                       (uint8_t)app_status, (uint8_t)protocol_status, 0, 0, 0};
    return fcgi_write_record(out, FCGI_END_REQUEST, request_id, body, sizeof body);
}

size_t fcgi_write_unknown_type(uint8_t *out, int record_type)
{
    uint8_t body[8] = {(uint8_t)record_type, 0, 0, 0, 0, 0, 0, 0};
    return fcgi_write_record(out, FCGI_UNKNOWN_TYPE, 0, body, sizeof body);
}

size_t fcgi_pair_size(size_t name_len, size_t value_len)
{
    return (name_len < 128 ? 1 : 4) + (value_len < 128 ? 1 : 4) + name_len + value_len;
}

static size_t write_length(uint8_t *out, size_t n)
{
    if (n < 128) {
        out[0] = (uint8_t)n;
        return 1;
    }
    out[0] = (uint8_t)((n >> 24) | 0x80);
    out[1] = (uint8_t)(n >> 16);
    out[2] = (uint8_t)(n >> 8);
    out[3] = (uint8_t)n;
    return 4;
}

size_t fcgi_write_pair(uint8_t *out, const uint8_t *name, size_t name_len, const uint8_t *value,
                       size_t value_len)
{
    size_t pos = write_length(out, name_len);
    pos += write_length(out + pos, value_len);
    memcpy(out + pos, name, name_len);
    pos += name_len;
    memcpy(out + pos, value, value_len);
    return pos + value_len;
}
