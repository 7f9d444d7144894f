# The environ builder: PARAMS bytes in, a PEP 3333 environ out, keys interned and values shared
# between requests. The path policy (which part of the request path is SCRIPT_NAME and which is
# PATH_INFO) is a separate, swappable piece. Included by _core.pyx; no I/O, nothing FastCGI-specific
# beyond the CGI-style params every web server sends.

cdef inline int hexval(uint8_t c) noexcept nogil:
    if c >= c'0' and c <= c'9':
        return c - c'0'
    if c >= c'a' and c <= c'f':
        return c - c'a' + 10
    if c >= c'A' and c <= c'F':
        return c - c'A' + 10
    return -1


cdef size_t percent_decode(const uint8_t *src, size_t n, uint8_t *dst) noexcept nogil:
    """%XX-decode src into dst (room for n bytes); malformed escapes are kept as they are."""
    cdef size_t i = 0, j = 0
    cdef int hi, lo
    while i < n:
        if src[i] == c'%' and i + 2 < n:
            hi = hexval(src[i + 1])
            lo = hexval(src[i + 2])
            if hi >= 0 and lo >= 0:
                dst[j] = <uint8_t>(hi * 16 + lo)
                j += 1
                i += 3
                continue
        dst[j] = src[i]
        j += 1
        i += 1
    return j


# Environ keys seen on the wire are decoded once and kept: a request from nginx repeats the same
# twenty-odd names, so most requests create no key strings at all. Bounded, so a client sending
# random header names cannot grow it.
cdef enum:
    KEY_CACHE_SIZE = 512
    KEY_MAX_LEN = 48

# What a param means to the loop beyond being copied into environ.
cdef enum:
    K_PLAIN = 0
    K_CONTENT_TYPE
    K_CONTENT_LENGTH
    K_REQUEST_URI
    K_SCRIPT_NAME
    K_PATH_INFO
    K_HTTPS
    K_REQUEST_SCHEME
    K_REQUEST_METHOD
    K_QUERY_STRING
    K_SCRIPT_FILENAME
    K_REMOTE_USER
    K_DROP
    K_COUNT

cdef enum:
    VALUE_MAX_LEN = 80       # values up to this long are remembered per key (Host, User-Agent ...)

cdef struct KeyEntry:
    uint64_t hash
    size_t length
    char name[KEY_MAX_LEN]
    PyObject *key
    int kind
    # The value this key had last time, as bytes and as the str handed to the app: most params
    # (SERVER_NAME, DOCUMENT_ROOT, HTTP_HOST, HTTP_USER_AGENT ...) repeat from request to request,
    # and an immutable str can be shared instead of decoded again.
    size_t value_length
    char value[VALUE_MAX_LEN]
    PyObject *value_str

_SPECIAL_KEYS = {
    b"CONTENT_TYPE": K_CONTENT_TYPE, b"CONTENT_LENGTH": K_CONTENT_LENGTH, b"REQUEST_URI": K_REQUEST_URI,
    b"SCRIPT_NAME": K_SCRIPT_NAME, b"PATH_INFO": K_PATH_INFO, b"HTTPS": K_HTTPS,
    b"REQUEST_SCHEME": K_REQUEST_SCHEME, b"REQUEST_METHOD": K_REQUEST_METHOD,
    b"QUERY_STRING": K_QUERY_STRING, b"SCRIPT_FILENAME": K_SCRIPT_FILENAME,
    b"REMOTE_USER": K_REMOTE_USER,  # the status page's "user" (nginx: $remote_user)
    # nginx passes every request header as HTTP_*, Content-Type and Content-Length included, but
    # CGI (RFC 3875 4.1.18) and PEP 3333 carry those two only as CONTENT_TYPE/CONTENT_LENGTH.
    b"HTTP_CONTENT_TYPE": K_DROP, b"HTTP_CONTENT_LENGTH": K_DROP,
}

# httpoxy (CVE-2016-5385): a request's `Proxy:` header arrives as HTTP_PROXY (RFC 3875's rule for
# headers), the name that HTTP client libraries read their outgoing proxy from. Dropped unless the
# pool keeps it (security.keep_http_proxy), whether the web server made it from the header or a
# client sent the param itself. Names are case-sensitive: a web server only makes upper-case HTTP_*.
_HTTPOXY_KEYS = {b"HTTP_PROXY": K_DROP}


cdef inline uint64_t key_hash(const uint8_t *p, size_t n) noexcept nogil:
    """A cheap hash of a param name: its length and its first and last 8 bytes, mixed.

    Names are short and a hit is confirmed with memcmp, so this only has to spread the few dozen
    names a web server sends; hashing every byte cost more than the rest of the lookup.
    """
    cdef uint64_t head = 0, tail = 0
    if n >= 8:
        memcpy(&head, p, 8)
        memcpy(&tail, p + n - 8, 8)
    else:
        memcpy(&head, p, n)
    cdef uint64_t h = (head * 0x9E3779B97F4A7C15ULL) ^ (tail + n) * 0xC2B2AE3D27D4EB4FULL
    h ^= h >> 29
    return h | 1  # never 0: 0 marks an empty entry


cdef enum:
    PREDICTED_PARAMS = 64
    ENVIRON_ROOM = 64       # entries an environ holds without growing (nginx sends about 30 params)


cdef class PathPolicy:
    """Which part of the request path is SCRIPT_NAME and which PATH_INFO: the default mounts the
    app at a prefix (--mount); a subclass (script mode) can map the path differently."""
    cdef str mount
    cdef bytes mount_bytes

    def __init__(self, str mount=""):
        self.mount = mount.rstrip("/")
        self.mount_bytes = self.mount.encode("latin-1")

    cdef int apply(self, dict env, EnvironBuilder request) except -1:
        """Set SCRIPT_NAME and PATH_INFO: the mount prefix, when the path starts with it, and the rest.

        The same from every web server: nginx's stock fastcgi_params send SCRIPT_NAME as the whole
        path and no PATH_INFO (the PHP mapping), others split differently; the full request path
        (EnvironBuilder.request_path) is what they agree on.
        """
        cdef size_t n, mlen = len(self.mount_bytes)
        cdef uint8_t *path = request.request_path(&n)
        if mlen and n >= mlen and memcmp(path, PyBytes_AS_STRING(self.mount_bytes), mlen) == 0 and (
                n == mlen or path[mlen] == c'/'):
            env["SCRIPT_NAME"] = self.mount
            env["PATH_INFO"] = PyUnicode_DecodeLatin1(<char *>path + mlen, n - mlen, NULL)
        else:
            env["SCRIPT_NAME"] = ""
            env["PATH_INFO"] = PyUnicode_DecodeLatin1(<char *>path, n, NULL)
        return 0


cdef class ScriptPathPolicy(PathPolicy):
    """Script mode's paths (fastfpm.script), php's: SCRIPT_NAME is the script's URL path and
    PATH_INFO the rest, as the web server sent them (nginx: $fastcgi_script_name, and
    $fastcgi_path_info when fastcgi_split_path_info splits). Without a SCRIPT_NAME param, the whole
    request path; without PATH_INFO, empty (the dispatcher then cuts it off SCRIPT_FILENAME)."""

    cdef int apply(self, dict env, EnvironBuilder request) except -1:
        cdef size_t n
        cdef uint8_t *path
        if request.vseen[K_SCRIPT_NAME]:
            env["SCRIPT_NAME"] = PyUnicode_DecodeLatin1(
                <char *>request.pbuf + request.voff[K_SCRIPT_NAME], request.vlen[K_SCRIPT_NAME], NULL)
        else:
            path = request.request_path(&n)
            env["SCRIPT_NAME"] = PyUnicode_DecodeLatin1(<char *>path, n, NULL)
        if request.vseen[K_PATH_INFO]:
            env["PATH_INFO"] = PyUnicode_DecodeLatin1(
                <char *>request.pbuf + request.voff[K_PATH_INFO], request.vlen[K_PATH_INFO], NULL)
        else:
            env["PATH_INFO"] = ""
        return 0


@cython.final
cdef class EnvironBuilder:
    """One request's params (PARAMS bytes, gathered by the connection) and the environ made of them.

    Keys seen on the wire are decoded and interned once; values that repeat from request to request
    (Host, User-Agent, DOCUMENT_ROOT ...) are shared rather than decoded again. The well-known params
    (method, URI, query, script, content length) are remembered by position for the scoreboard.
    """
    cdef dict template               # the constant wsgi.* entries, copied for every request
    cdef dict special_keys           # param name (bytes) -> kind: _SPECIAL_KEYS, and the httpoxy rule
    cdef PathPolicy paths
    cdef size_t max_params_size
    cdef KeyEntry keys[KEY_CACHE_SIZE]
    # The cache entry of the i-th param of the previous request. A web server sends its params in
    # the same order every time, so checking the predicted entry first skips the hash lookup.
    cdef KeyEntry *key_order[PREDICTED_PARAMS]
    cdef uint8_t *pbuf               # the current request's params
    cdef size_t plen, pcap
    cdef uint8_t *scratch            # percent-decoding room, as large as pbuf
    cdef size_t voff[K_COUNT]        # where each well-known param's value is in pbuf
    cdef size_t vlen[K_COUNT]
    cdef bint vseen[K_COUNT]
    cdef int64_t content_length      # CONTENT_LENGTH as a number, -1 when absent
    cdef str error                   # why the last build() failed

    def __cinit__(self):
        self.pbuf = NULL
        self.scratch = NULL
        memset(self.keys, 0, sizeof(self.keys))
        memset(self.key_order, 0, sizeof(self.key_order))

    def __dealloc__(self):
        cdef size_t i
        for i in range(KEY_CACHE_SIZE):
            if self.keys[i].key != NULL:
                Py_DECREF(<object>self.keys[i].key)
            if self.keys[i].value_str != NULL:
                Py_DECREF(<object>self.keys[i].value_str)
        free(self.pbuf)
        free(self.scratch)

    def __init__(self, dict environ_template, PathPolicy paths, Py_ssize_t max_params_size,
                 bint keep_http_proxy=False):
        # Copying a dict clones its hash table, so a template built with room for a full request's
        # params spares each environ two resizes.
        self.template = _PyDict_NewPresized(ENVIRON_ROOM)
        for name, value in environ_template.items():
            # One by one: dict.update() into an empty dict would adopt the source's small table.
            self.template[name] = value
        self.paths = paths
        # A name's kind is looked up once, when it enters the key cache: dropping HTTP_PROXY
        # costs the hot path nothing beyond the K_DROP test every param already gets.
        self.special_keys = dict(_SPECIAL_KEYS)
        if not keep_http_proxy:
            self.special_keys.update(_HTTPOXY_KEYS)
        self.max_params_size = max_params_size
        self.pcap = max_params_size + 1024
        self.pbuf = <uint8_t *>malloc(self.pcap)
        self.scratch = <uint8_t *>malloc(self.pcap)
        if self.pbuf == NULL or self.scratch == NULL:
            raise MemoryError()

    cdef inline void clear_params(self) noexcept:
        self.plen = 0

    cdef inline bint add_params(self, const uint8_t *content, size_t n) noexcept:
        """Append PARAMS content; False when the request's params would pass max_params_size."""
        if self.plen + n > self.max_params_size:
            return False
        memcpy(self.pbuf + self.plen, content, n)
        self.plen += n
        return True

    cdef inline void copy_param(self, int kind, char *dst, size_t cap) noexcept:
        """Copy a well-known param's value into a fixed field (a scoreboard slot's); unset: untouched."""
        if self.vseen[kind]:
            ffpm_copy_field(dst, cap, <char *>self.pbuf + self.voff[kind], self.vlen[kind])

    cdef KeyEntry *entry_for(self, const uint8_t *name, size_t n) except? NULL:
        """The cache entry for a param name (made on first sight), or NULL when it does not fit."""
        cdef uint64_t h
        cdef size_t i, probe
        cdef KeyEntry *e
        if n >= KEY_MAX_LEN:
            return NULL
        h = key_hash(name, n)
        i = h & (KEY_CACHE_SIZE - 1)
        for probe in range(8):
            e = &self.keys[(i + probe) & (KEY_CACHE_SIZE - 1)]
            if e.hash == h and e.length == n and memcmp(e.name, name, n) == 0:
                return e
            if e.hash == 0:
                # Interned, so it is the very object the environ template and the app's own string
                # literals use: dict lookups then match on identity without comparing text.
                key = sys.intern(PyUnicode_DecodeLatin1(<char *>name, n, NULL))
                e.kind = self.special_keys.get(PyBytes_FromStringAndSize(<char *>name, n), K_PLAIN)
                e.hash = h
                e.length = n
                memcpy(e.name, name, n)
                Py_INCREF(key)
                e.key = <PyObject *>key
                return e
        return NULL

    cdef inline object value_for(self, KeyEntry *e, const uint8_t *value, size_t n):
        """The str for a param value, shared with the last request when the bytes are the same."""
        if e.value_str != NULL and e.value_length == n and memcmp(e.value, value, n) == 0:
            return <object>e.value_str
        text = PyUnicode_DecodeLatin1(<char *>value, n, NULL)
        if n <= VALUE_MAX_LEN:
            if e.value_str != NULL:
                Py_DECREF(<object>e.value_str)
            Py_INCREF(text)
            e.value_str = <PyObject *>text
            e.value_length = n
            memcpy(e.value, value, n)
        return text

    cdef object build(self, object stream):
        """The WSGI environ of the params gathered, with wsgi.input = stream; None when malformed
        (self.error says why)."""
        cdef dict env = PyDict_Copy(self.template)
        memset(self.vseen, 0, sizeof(self.vseen))
        if self.copy_pairs(env) < 0 or self.parse_content_length() < 0:
            return None
        self.paths.apply(env, self)
        if self.is_https():
            env["wsgi.url_scheme"] = "https"
        env["wsgi.input"] = stream
        return env

    cdef int copy_pairs(self, dict env) except -2:
        """Every name/value pair into env, noting where the well-known ones are: 0, or -1 if truncated."""
        cdef size_t pos = 0, noff, nlen, voff, vlen, plen = self.plen
        cdef long rc
        cdef int kind
        cdef const uint8_t *base = self.pbuf
        cdef KeyEntry *e
        cdef size_t index = 0
        while pos < plen:
            rc = fcgi_parse_pair(base + pos, plen - pos, &noff, &nlen, &voff, &vlen)
            if rc < 0:
                self.error = "truncated name/value pair in PARAMS"
                return -1
            e = self.key_order[index] if index < PREDICTED_PARAMS else NULL
            if e == NULL or e.length != nlen or memcmp(e.name, base + pos + noff, nlen) != 0:
                e = self.entry_for(base + pos + noff, nlen)
                if index < PREDICTED_PARAMS:
                    self.key_order[index] = e
            index += 1
            if e != NULL:
                key = <object>e.key
                kind = e.kind
            else:
                key = PyUnicode_DecodeLatin1(<char *>base + pos + noff, nlen, NULL)
                kind = self.special_keys.get(
                    PyBytes_FromStringAndSize(<char *>base + pos + noff, nlen), K_PLAIN)
            if kind == K_DROP:
                pos += rc
                continue
            if kind != K_PLAIN:
                self.vseen[kind] = True
                self.voff[kind] = pos + voff
                self.vlen[kind] = vlen
                if kind == K_SCRIPT_NAME or kind == K_PATH_INFO:
                    pos += rc
                    continue  # set by the path policy, from the full request path
                if (kind == K_CONTENT_TYPE or kind == K_CONTENT_LENGTH) and vlen == 0:
                    pos += rc
                    continue  # PEP 3333: absent rather than empty
            if e != NULL:
                PyDict_SetItem(env, key, self.value_for(e, base + pos + voff, vlen))
            else:
                PyDict_SetItem(env, key, PyUnicode_DecodeLatin1(<char *>base + pos + voff, vlen, NULL))
            pos += rc
        return 0

    cdef int parse_content_length(self) except -2:
        """CONTENT_LENGTH as a number into self.content_length (-1 when absent): 0, or -1 if not a number."""
        cdef size_t i
        cdef int digit
        cdef int64_t value = 0
        self.content_length = -1
        if not (self.vseen[K_CONTENT_LENGTH] and self.vlen[K_CONTENT_LENGTH]):
            return 0
        for i in range(self.vlen[K_CONTENT_LENGTH]):
            digit = self.pbuf[self.voff[K_CONTENT_LENGTH] + i] - 48
            if digit < 0 or digit > 9 or value > 100000000000000:
                self.error = "CONTENT_LENGTH is not a number"
                return -1
            value = value * 10 + digit
        self.content_length = value
        return 0

    cdef inline bint is_https(self) noexcept:
        """HTTPS set and not "off" (CGI's way), or REQUEST_SCHEME https."""
        cdef const uint8_t *base = self.pbuf
        if self.vseen[K_HTTPS] and self.vlen[K_HTTPS] and not (
                self.vlen[K_HTTPS] == 3 and memcmp(base + self.voff[K_HTTPS], b"off", 3) == 0):
            return True
        return (self.vseen[K_REQUEST_SCHEME] and self.vlen[K_REQUEST_SCHEME] == 5
                and memcmp(base + self.voff[K_REQUEST_SCHEME], b"https", 5) == 0)

    cdef uint8_t *request_path(self, size_t *length) noexcept:
        """The full request path, percent-decoded into scratch room (latin-1 bytes, as PEP 3333 asks).

        From REQUEST_URI (its query cut, an absolute-form target reduced to its path), or from
        SCRIPT_NAME + PATH_INFO when REQUEST_URI is missing.
        """
        cdef const uint8_t *src
        cdef const uint8_t *q
        cdef size_t n
        cdef uint8_t *dst = self.scratch
        if self.vseen[K_REQUEST_URI] and self.vlen[K_REQUEST_URI]:
            src = self.pbuf + self.voff[K_REQUEST_URI]
            n = self.vlen[K_REQUEST_URI]
            q = <const uint8_t *>memchr(src, c'?', n)
            if q != NULL:
                n = q - src
            if n and src[0] != c'/':
                # absolute-form request target (http://host/path): keep the path only
                q = <const uint8_t *>memchr(src, c'/', n)
                if q != NULL and q + 1 < src + n and q[1] == c'/':
                    q = <const uint8_t *>memchr(q + 2, c'/', n - (q + 2 - src))
                    if q == NULL:
                        n = 0
                    else:
                        n -= q - src
                        src = q
            length[0] = percent_decode(src, n, dst)
            return dst
        n = 0
        if self.vseen[K_SCRIPT_NAME]:
            memcpy(dst, self.pbuf + self.voff[K_SCRIPT_NAME], self.vlen[K_SCRIPT_NAME])
            n = self.vlen[K_SCRIPT_NAME]
        if self.vseen[K_PATH_INFO]:
            memcpy(dst + n, self.pbuf + self.voff[K_PATH_INFO], self.vlen[K_PATH_INFO])
            n += self.vlen[K_PATH_INFO]
        length[0] = n
        return dst
