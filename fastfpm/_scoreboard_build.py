"""cffi build script for the master's view of the scoreboard (csrc/scoreboard.h).

API mode, so the C compiler lays out the structs and cffi can never disagree with the Cython
writer about offsets. setup.py runs it through `cffi_modules`.
"""

from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent.parent / "csrc"

ffibuilder = FFI()
ffibuilder.cdef(
    """
    #define FFPM_SB_MAGIC ...
    #define FFPM_SB_VERSION ...
    #define FFPM_STAGE_FREE ...
    #define FFPM_STAGE_STARTING ...
    #define FFPM_STAGE_IDLE ...
    #define FFPM_STAGE_READING_HEADERS ...
    #define FFPM_STAGE_INFO ...
    #define FFPM_STAGE_RUNNING ...
    #define FFPM_STAGE_FINISHING ...
    #define FFPM_STAGE_ENDING ...
    typedef struct {
        uint32_t seq; uint32_t stage; int32_t pid; uint32_t generation;
        uint64_t requests; uint64_t accepted_conn;
        int64_t started_wall; int64_t request_start_ns; int64_t request_start_wall_us;
        int64_t last_request_ns; int64_t idle_since_ns; int64_t content_length;
        uint32_t status; uint32_t keepalive;
        char method[...]; char request_uri[...]; char query_string[...]; char script_filename[...];
        ...;
    } ffpm_slot;
    typedef struct {
        uint32_t magic; uint32_t version; uint32_t nslots; uint32_t slot_size;
        int64_t started_wall; uint64_t max_children_reached; uint64_t slow_requests;
        uint64_t listen_queue_max; char pool_name[...];
        ...;
    } ffpm_pool_header;
    ffpm_slot *ffpm_slots(void *base);
    size_t ffpm_scoreboard_size(uint32_t nslots);
    int ffpm_slot_read(const ffpm_slot *s, ffpm_slot *out);
    """
)
ffibuilder.set_source(
    "fastfpm._scoreboard_cffi",
    '#include "scoreboard.h"',
    include_dirs=[str(CSRC)],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
