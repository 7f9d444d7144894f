/*
 * fuzz_fcgi.c - drive the sans-IO codec (../fcgi.c) with arbitrary bytes.
 *
 * Built two ways:
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -I.. fuzz_fcgi.c ../fcgi.c -o fuzz_fcgi
 *       a libFuzzer target (LLVMFuzzerTestOneInput);
 *   cc -g -O1 -fsanitize=address,undefined -DFUZZ_STANDALONE -I.. fuzz_fcgi.c ../fcgi.c -o fuzz_fcgi
 *       a standalone driver that feeds N pseudo-random inputs (tests/test_codec_fuzz.py runs it).
 * Every parser result is checked against the buffer it came from, so an out-of-range length is
 * caught even when it would not crash.
 */
#include "fcgi.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void check(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "codec invariant broken: %s\n", what);
        abort();
    }
}

/* Encode a parsed pair again and parse it back: the same name and value, in the minimal form. */
static void pair_round_trip(const uint8_t *name, size_t nlen, const uint8_t *value, size_t vlen)
{
    /* The minimal form is never longer than the one parsed, which fit in one record's content. */
    static uint8_t out[FCGI_MAX_CONTENT];
    size_t room = fcgi_pair_size(nlen, vlen);
    check(room <= sizeof out, "minimal pair no longer than the parsed one");
    check(fcgi_write_pair(out, name, nlen, value, vlen) == room, "pair size matches fcgi_pair_size");
    size_t noff, nlen2, voff, vlen2;
    check(fcgi_parse_pair(out, room, &noff, &nlen2, &voff, &vlen2) == (long)room, "own pair parses whole");
    check(nlen2 == nlen && vlen2 == vlen && memcmp(out + noff, name, nlen) == 0 &&
              memcmp(out + voff, value, vlen) == 0, "pair round trip");
}

/* Re-encode the first 8 content bytes as the END_REQUEST and UNKNOWN_TYPE writers would frame them. */
static void fixed_bodies(const fcgi_header *hdr, const uint8_t *content)
{
    uint8_t out[16];
    fcgi_header back;
    uint32_t app_status = ((uint32_t)content[0] << 24) | ((uint32_t)content[1] << 16) |
                          ((uint32_t)content[2] << 8) | content[3];
    check(fcgi_write_end_request(out, hdr->request_id, app_status, content[4]) == 16, "END_REQUEST size");
    check(fcgi_parse_record(out, sizeof out, &back) == 16 && back.type == FCGI_END_REQUEST &&
              back.request_id == hdr->request_id && fcgi_check_header(&back) == 0 &&
              memcmp(out + FCGI_HEADER_LEN, content, 5) == 0, "END_REQUEST round trip");
    check(fcgi_write_unknown_type(out, content[0]) == 16, "UNKNOWN_TYPE size");
    check(fcgi_parse_record(out, sizeof out, &back) == 16 && back.type == FCGI_UNKNOWN_TYPE &&
              back.request_id == 0 && fcgi_check_header(&back) == 0 && out[FCGI_HEADER_LEN] == content[0],
          "UNKNOWN_TYPE round trip");
}

/* Walk data as a record stream, and each record's content as name/value pairs. */
static void walk(const uint8_t *data, size_t size)
{
    size_t pos = 0;
    while (pos < size) {
        fcgi_header hdr;
        long rc = fcgi_parse_record(data + pos, size - pos, &hdr);
        if (rc == FCGI_NEED_MORE || rc == FCGI_ERR_VERSION)
            return;
        check(rc >= FCGI_HEADER_LEN && (size_t)rc <= size - pos, "record size within the buffer");
        check((size_t)rc == FCGI_HEADER_LEN + hdr.content_length + hdr.padding_length, "record size");
        const uint8_t *content = data + pos + FCGI_HEADER_LEN;
        int verdict = fcgi_check_header(&hdr);
        check(verdict == 0 || verdict == FCGI_ERR_LENGTH || verdict == FCGI_ERR_REQUEST_ID, "header verdict");
        check(hdr.request_id != 0 || verdict == 0, "management records are never refused");
        int role, flags;
        int begin = fcgi_parse_begin_request(content, hdr.content_length, &role, &flags);
        check(begin == (hdr.content_length == 8 ? 0 : FCGI_ERR_LENGTH), "BEGIN_REQUEST body length rule");
        if (begin == 0) {
            uint8_t again[16];
            check(fcgi_write_begin_request(again, hdr.request_id, role, flags) == 16, "BEGIN_REQUEST size");
            check(memcmp(again + FCGI_HEADER_LEN, content, 3) == 0, "BEGIN_REQUEST round trip");
        }
        if (hdr.content_length >= 8)
            fixed_bodies(&hdr, content);
        fcgi_header alone;
        check(fcgi_parse_header(data + pos, size - pos, &alone) == FCGI_HEADER_LEN &&
                  alone.type == hdr.type && alone.request_id == hdr.request_id &&
                  alone.content_length == hdr.content_length && alone.padding_length == hdr.padding_length,
              "header parser agrees with the record parser");
        size_t cpos = 0;
        while (cpos < hdr.content_length) {
            size_t noff, nlen, voff, vlen;
            long used = fcgi_parse_pair(content + cpos, hdr.content_length - cpos, &noff, &nlen, &voff, &vlen);
            if (used < 0)
                break;
            check(used > 0 && (size_t)used <= hdr.content_length - cpos, "pair within the content");
            check(noff + nlen <= (size_t)used && voff + vlen <= (size_t)used, "name and value within the pair");
            pair_round_trip(content + cpos + noff, nlen, content + cpos + voff, vlen);
            cpos += (size_t)used;
        }
        pos += (size_t)rc;
    }
}

/* Frame the input as a stream and parse it back: the content must come out unchanged. */
static void round_trip(const uint8_t *data, size_t size)
{
    size_t room = fcgi_stream_size(size);
    uint8_t *out = malloc(room ? room : 1);
    check(out != NULL, "malloc");
    size_t written = fcgi_write_stream(out, FCGI_STDOUT, 1, data, size);
    check(written == room, "stream size matches fcgi_stream_size");
    size_t pos = 0, got = 0;
    while (pos < written) {
        fcgi_header hdr;
        long rc = fcgi_parse_record(out + pos, written - pos, &hdr);
        check(rc > 0, "own records parse");
        check(hdr.content_length <= FCGI_MAX_CONTENT && (hdr.content_length + hdr.padding_length) % 8 == 0,
              "records padded to 8");
        check(memcmp(out + pos + FCGI_HEADER_LEN, data + got, hdr.content_length) == 0, "content preserved");
        got += hdr.content_length;
        pos += (size_t)rc;
    }
    check(got == size, "every byte framed");
    free(out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    walk(data, size);
    round_trip(data, size);
    return 0;
}

#ifdef FUZZ_STANDALONE
/* xorshift64*: reproducible inputs without libFuzzer. Half are mutated valid requests, so the
 * pair parser sees deep inputs too, not only bad versions. */
static uint64_t state = 88172645463325252ull;
static uint64_t next(void)
{
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 2685821657736338717ull;
}

int main(int argc, char **argv)
{
    long count = argc > 1 ? atol(argv[1]) : 100000;
    static uint8_t buf[1 << 17];
    static const uint8_t valid[] = {
        1, 1, 0, 1, 0, 8, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0,                     /* BEGIN_REQUEST */
        1, 4, 0, 1, 0, 20, 4, 0, 11, 7, 'Q', 'U', 'E', 'R', 'Y', '_', 'S', 'T', 'R', 'I', 'N',
        'G', 'a', '=', '1', '&', 'b', '=', '2', 0, 0, 0, 0,                   /* PARAMS + padding */
        1, 4, 0, 1, 0, 0, 0, 0, 1, 5, 0, 1, 0, 0, 0, 0};                       /* end of PARAMS, STDIN */
    for (long i = 0; i < count; i++) {
        size_t size = (size_t)(next() % 600);
        if (i & 1) {
            size = sizeof valid;
            memcpy(buf, valid, size);
            for (int flips = (int)(next() % 4); flips >= 0; flips--)
                buf[next() % size] = (uint8_t)next();
        } else {
            for (size_t j = 0; j < size; j++)
                buf[j] = (uint8_t)next();
            if (size && (next() & 1))
                buf[0] = FCGI_VERSION_1;
        }
        LLVMFuzzerTestOneInput(buf, size);
    }
    /* One large input crosses the 65535-byte record split. */
    for (size_t j = 0; j < sizeof buf; j++)
        buf[j] = (uint8_t)next();
    LLVMFuzzerTestOneInput(buf, sizeof buf);
    printf("ok %ld\n", count);
    return 0;
}
#endif
