"""fastfpm.process: identities, php-fpm's root rules, a worker's set-up after fork, allowed clients.

The set-up tests fork a real child that calls prepare_worker / prepare_master and reports what it then
is (uid, groups, limits, nice value, cwd, environment) through a pipe, so the test process itself is
never changed. Dropping privileges needs root; those tests are skipped otherwise.
"""

from __future__ import annotations

import json
import os
import pwd
import resource
import socket
import textwrap
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fastfpm.address import AllowedClients
from fastfpm.config import from_cli, load
from fastfpm.process import (
    Identity,
    Notice,
    SetupError,
    check_root,
    prepare_master,
    prepare_worker,
    resolve_identity,
    worker_environ,
)

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="changing uid, gid and limits needs root")
NOBODY = pwd.getpwnam("nobody")
REFUSED = "[pool www] please specify user and group other than root"


def in_child(body: Callable[[], Any]) -> Any:
    """Run body in a forked child and return what it returns (JSON), or re-raise what it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        status = 0
        try:
            os.close(read_end)
            try:
                result = {"value": body()}
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                result = {"error": type(exc).__name__, "message": str(exc),
                          "traceback": traceback.format_exc()}
            with os.fdopen(write_end, "w") as out:
                json.dump(result, out)
        except BaseException:  # noqa: BLE001
            status = 1
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, text
    result = json.loads(text)
    if "error" in result:
        if result["error"] == "SetupError":
            raise SetupError(result["message"])
        raise AssertionError(f"the child raised {result['error']}: {result['message']}\n"
                             f"{result['traceback']}")
    return result["value"]


def state() -> dict[str, Any]:
    """What a test wants to know about the calling process after its set-up."""
    try:
        os.setuid(0)
        can_become_root = True
    except PermissionError:
        can_become_root = False
    return {
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "egid": os.getegid(),
        "groups": sorted(os.getgroups()), "can_become_root": can_become_root,
        "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
        "core": list(resource.getrlimit(resource.RLIMIT_CORE)),
        "priority": os.getpriority(os.PRIO_PROCESS, 0), "cwd": os.getcwd(), "environ": dict(os.environ),
    }


def load_pool(tmp_path: Path, lines: str, environ: dict[str, str] | None = None) -> Any:
    """The pool [www] of a config file holding lines (plus listen and app)."""
    path = tmp_path / "fpm.conf"
    path.write_text("[www]\nlisten = 127.0.0.1:9000\napp = myapp:application\n" + textwrap.dedent(lines))
    return load(path, environ=environ or {}).pools[0]


def pool(**options: Any) -> Any:
    return from_cli(None, **options).pools[0]


# ---------------------------------------------------------------------------------------------------
# resolve_identity

def test_no_user_and_no_group_keeps_the_master_identity():
    assert resolve_identity(pool(), euid=0) is None


def test_a_user_name_brings_its_primary_group_name_and_home():
    identity = resolve_identity(pool(user="nobody"), euid=0)
    assert identity == Identity(NOBODY.pw_uid, NOBODY.pw_gid, tuple(os.getgrouplist("nobody", NOBODY.pw_gid)),
                                "nobody", NOBODY.pw_dir)
    assert not identity.is_root


def test_a_group_overrides_the_primary_group():
    identity = resolve_identity(pool(user="nobody", group="daemon"), euid=0)
    assert identity is not None
    assert (identity.uid, identity.gid) == (NOBODY.pw_uid, 1)
    assert 1 in identity.groups


def test_numeric_user_known_to_the_database_gets_its_name():
    identity = resolve_identity(pool(user=str(NOBODY.pw_uid)), euid=0)
    assert identity is not None
    assert (identity.uid, identity.gid, identity.user) == (NOBODY.pw_uid, NOBODY.pw_gid, "nobody")


def test_numeric_user_unknown_to_the_database_needs_a_group():
    with pytest.raises(ValueError, match=r"\[pool www\] user 424242 has no entry .* set 'group'"):
        resolve_identity(pool(user="424242"), euid=0)
    identity = resolve_identity(pool(user="424242", group="424243"), euid=0)
    assert identity == Identity(424242, 424243, (424243,))


def test_unknown_user_name_is_an_error():
    with pytest.raises(ValueError, match=r"\[pool www\] cannot get uid for user 'no-such-user'"):
        resolve_identity(pool(user="no-such-user"), euid=0)


def test_unknown_group_name_is_an_error():
    with pytest.raises(ValueError, match=r"\[pool www\] cannot get gid for group 'no-such-group'"):
        resolve_identity(pool(user="nobody", group="no-such-group"), euid=0)


def test_a_group_alone_keeps_the_user_root():
    identity = resolve_identity(pool(group="nogroup"), euid=0)
    assert identity is not None
    assert (identity.uid, identity.gid, identity.user) == (0, NOBODY.pw_gid, "root")
    assert identity.is_root


def test_not_root_ignores_user_and_group_without_looking_them_up():
    assert resolve_identity(pool(user="no-such-user", group="no-such-group"), euid=1000) is None


def test_identity_from_a_config_file(tmp_path):
    www = load_pool(tmp_path, "user = nobody\ngroup = nogroup\n")
    assert resolve_identity(www, euid=0) == resolve_identity(pool(user="nobody"), euid=0)


# ---------------------------------------------------------------------------------------------------
# check_root

@pytest.mark.parametrize(("options", "allow_root", "expected"), [
    ({}, False, [Notice("error", REFUSED)]),
    ({"user": "root"}, False, [Notice("error", REFUSED)]),
    ({"user": "0"}, False, [Notice("error", REFUSED)]),
    ({"user": "nobody", "group": "root"}, False, [Notice("error", REFUSED)]),
    ({"group": "nogroup"}, False, [Notice("error", REFUSED)]),
    ({"user": "nobody"}, False, []),
    ({"user": "nobody", "group": "nogroup"}, False, []),
    ({}, True, []),
    ({"user": "root"}, True, []),
])
def test_check_root_as_root(options, allow_root, expected):
    www = pool(**options)
    assert check_root(www, resolve_identity(www, euid=0), allow_root, euid=0) == expected


def test_check_root_when_not_root_notes_what_is_ignored():
    www = pool(user="nobody", group="nogroup", process_priority=5)
    notices = check_root(www, resolve_identity(www, euid=1000), False, euid=1000)
    assert notices == [
        Notice("notice", "[pool www] 'user' directive is ignored when fastfpm is not running as root"),
        Notice("notice", "[pool www] 'group' directive is ignored when fastfpm is not running as root"),
        Notice("notice", "[pool www] 'process.priority' directive is ignored when fastfpm is not running "
                         "as root"),
    ]
    assert check_root(pool(), None, False, euid=1000) == []
    assert check_root(pool(), None, True, euid=1000) == []


# ---------------------------------------------------------------------------------------------------
# prepare_worker in a real child

@needs_root
def test_worker_as_nobody_with_clear_env(tmp_path):
    workdir = tmp_path / "app"
    workdir.mkdir()
    www = load_pool(tmp_path, f"""\
        user = nobody
        group = nogroup
        chdir = {workdir}
        rlimit_files = 4096
        rlimit_core = unlimited
        process.priority = 7
        clear_env = yes
        env[APP_MODE] = production
        env[FROM_MASTER] = $SECRET
        env[PATH] = /usr/bin:/bin
        """, environ={"SECRET": "s3cret"})
    identity = resolve_identity(www)
    assert check_root(www, identity, allow_root=False) == []

    def body() -> Any:
        os.environ["LEFT_BEHIND"] = "by the master"
        notices = prepare_worker(www, identity)
        return {"notices": notices, **state()}

    got = in_child(body)
    assert got["notices"] == []
    assert (got["uid"], got["euid"]) == (NOBODY.pw_uid, NOBODY.pw_uid)
    assert (got["gid"], got["egid"]) == (NOBODY.pw_gid, NOBODY.pw_gid)
    assert got["groups"] == [NOBODY.pw_gid]
    assert got["can_become_root"] is False
    assert got["nofile"] == [4096, 4096]
    assert got["core"] == [resource.RLIM_INFINITY, resource.RLIM_INFINITY]
    assert got["priority"] == 7
    assert got["cwd"] == str(workdir)
    # exactly env[...], plus USER and HOME of the pool's user, as php-fpm
    assert got["environ"] == {"APP_MODE": "production", "FROM_MASTER": "s3cret", "PATH": "/usr/bin:/bin",
                              "USER": "nobody", "HOME": NOBODY.pw_dir}


@needs_root
def test_worker_without_clear_env_keeps_the_master_environment():
    www = pool(user="nobody", group="nogroup", clear_env=False,
               env={"APP_MODE": "test", "SHARED": "from the pool"})
    identity = resolve_identity(www)
    master = {"PATH": "/usr/local/bin:/usr/bin", "SHARED": "from the master", "HOME": "/root", "LANG": "C"}

    def body() -> Any:
        prepare_worker(www, identity, master_environ=master)
        return state()

    got = in_child(body)
    assert got["uid"] == NOBODY.pw_uid
    assert got["environ"] == {"PATH": "/usr/local/bin:/usr/bin", "SHARED": "from the pool", "LANG": "C",
                              "APP_MODE": "test", "USER": "nobody", "HOME": NOBODY.pw_dir}


@needs_root
def test_worker_keeps_the_real_master_environment_by_default():
    www = pool(user="nobody", clear_env=False, env={"EXTRA": "1"})
    identity = resolve_identity(www)
    expected = {**os.environ, "EXTRA": "1", "USER": "nobody", "HOME": NOBODY.pw_dir}
    got = in_child(lambda: (prepare_worker(www, identity), state())[1])
    assert got["environ"] == expected


@needs_root
def test_env_user_and_home_win_over_the_account(tmp_path):
    www = pool(user="nobody", clear_env=True, env={"USER": "app", "HOME": str(tmp_path)})
    identity = resolve_identity(www)
    got = in_child(lambda: (prepare_worker(www, identity), state())[1])
    assert got["environ"] == {"USER": "app", "HOME": str(tmp_path)}


@needs_root
def test_environment_reaches_subprocesses():
    www = pool(user="nobody", clear_env=True, env={"GREETING": "hello"})
    identity = resolve_identity(www)

    def body() -> Any:
        prepare_worker(www, identity)
        import subprocess

        out = subprocess.run(["/usr/bin/env"], capture_output=True, text=True, check=True).stdout
        return sorted(out.splitlines())

    assert in_child(body) == sorted(["GREETING=hello", "USER=nobody", f"HOME={NOBODY.pw_dir}"])


@needs_root
def test_group_override_and_supplementary_groups():
    www = pool(user="nobody", group="daemon")
    identity = resolve_identity(www)
    got = in_child(lambda: (prepare_worker(www, identity), state())[1])
    assert (got["uid"], got["gid"]) == (NOBODY.pw_uid, 1)
    assert got["groups"] == sorted(os.getgrouplist("nobody", 1))


@needs_root
def test_root_worker_with_allow_root_changes_nothing_but_what_is_set(tmp_path):
    www = pool(clear_env=True, env={"ONLY": "this"}, rlimit_files=1000, rlimit_core=0, chdir=str(tmp_path))
    identity = resolve_identity(www)
    assert identity is None
    assert check_root(www, identity, allow_root=True) == []
    got = in_child(lambda: (prepare_worker(www, identity), state())[1])
    assert (got["uid"], got["gid"]) == (0, 0)
    assert got["can_become_root"] is True
    assert got["nofile"] == [1000, 1000]
    assert got["core"] == [0, 0]
    assert got["cwd"] == str(tmp_path)
    # php-fpm sets no USER/HOME for a root worker without a pool user
    assert got["environ"] == {"ONLY": "this"}


@needs_root
def test_unset_directives_leave_the_process_alone():
    www = pool(clear_env=False)
    before = in_child(state)
    after = in_child(lambda: (prepare_worker(www, None), state())[1])
    for key in ("uid", "gid", "groups", "nofile", "core", "priority", "cwd", "environ"):
        assert after[key] == before[key], key


@needs_root
def test_a_worker_that_is_not_root_sets_its_own_user_and_home():
    www = pool(clear_env=True, env={"A": "1"}, process_priority=3)

    def body() -> Any:
        os.setgid(NOBODY.pw_gid)
        os.setuid(NOBODY.pw_uid)
        identity = resolve_identity(www)
        notices = check_root(www, identity, False)
        prepare_worker(www, identity)
        return {"identity": identity, "notices": notices, **state()}

    got = in_child(body)
    assert got["identity"] is None
    assert got["notices"] == [["notice", "[pool www] 'process.priority' directive is ignored when fastfpm "
                                         "is not running as root"]]
    assert got["priority"] == os.getpriority(os.PRIO_PROCESS, 0)  # not applied
    assert got["environ"] == {"A": "1", "USER": "nobody", "HOME": NOBODY.pw_dir}


@needs_root
def test_a_negative_priority_as_root():
    www = pool(user="nobody", process_priority=-5)
    identity = resolve_identity(www)
    assert in_child(lambda: (prepare_worker(www, identity), state())[1])["priority"] == -5


@needs_root
def test_missing_chdir_is_fatal(tmp_path):
    www = pool(user="nobody", chdir=str(tmp_path))
    www.chdir = str(tmp_path / "gone")
    with pytest.raises(SetupError, match=r"\[pool www\] failed to chdir\(.*gone\): No such file"):
        in_child(lambda: prepare_worker(www, resolve_identity(www)))


@needs_root
def test_an_impossible_rlimit_is_a_warning_and_the_worker_goes_on():
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    www = pool(user="nobody", rlimit_files=nr_open + 1)
    identity = resolve_identity(www)

    def body() -> Any:
        return {"notices": prepare_worker(www, identity), **state()}

    got = in_child(body)
    assert len(got["notices"]) == 1
    level, message = got["notices"][0]
    assert level == "warning"
    assert message.startswith(f"[pool www] failed to set rlimit_files = {nr_open + 1}: ")
    assert got["uid"] == NOBODY.pw_uid


def test_a_drop_that_fails_is_fatal():
    """An identity the process cannot take (here: root's, asked for by a worker that is nobody)."""
    www = pool()

    def body() -> Any:
        if os.geteuid() == 0:
            os.setgid(NOBODY.pw_gid)
            os.setuid(NOBODY.pw_uid)
        return prepare_worker(www, Identity(0, 0, (0,)))

    with pytest.raises(SetupError, match=r"\[pool www\] failed to setgroups\(\[0\]\): Operation not permit"):
        in_child(body)


def test_worker_environ_is_a_pure_function():
    www = pool(clear_env=True, env={"A": "1"})
    identity = Identity(5, 6, (6,), "five", "/home/five")
    assert worker_environ(www, identity, {"B": "2"}) == {"A": "1", "USER": "five", "HOME": "/home/five"}
    www.clear_env = False
    assert worker_environ(www, identity, {"B": "2", "USER": "x"}) == {
        "A": "1", "B": "2", "USER": "five", "HOME": "/home/five"}
    assert worker_environ(www, None, {"B": "2"}, euid=0) == {"A": "1", "B": "2"}
    assert worker_environ(www, Identity(7, 7, (7,)), {}) == {"A": "1"}  # uid unknown to the database


# ---------------------------------------------------------------------------------------------------
# prepare_master

@needs_root
def test_master_limits_and_priority(tmp_path):
    config = tmp_path / "fpm.conf"
    config.write_text("[global]\nrlimit_files = 2048\nrlimit_core = 0\nprocess.priority = 4\n"
                      "[www]\nlisten = 127.0.0.1:9000\napp = myapp:application\n")
    global_ = load(config, environ={}).global_

    def body() -> Any:
        return {"notices": prepare_master(global_), **state()}

    got = in_child(body)
    assert got["notices"] == []
    assert got["nofile"] == [2048, 2048]
    assert got["core"] == [0, 0]
    assert got["priority"] == 4


@needs_root
def test_master_limit_that_cannot_be_set_is_fatal():
    nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    global_ = from_cli(None).global_
    global_.rlimit_files = nr_open + 1
    with pytest.raises(SetupError, match=f"failed to set rlimit_files = {nr_open + 1} for the master"):
        in_child(lambda: prepare_master(global_))


def test_master_priority_is_ignored_when_not_root():
    global_ = from_cli(None).global_
    global_.process_priority = 5
    before = os.getpriority(os.PRIO_PROCESS, 0)
    notices = in_child(lambda: prepare_master(global_, euid=1000))
    assert notices == [["notice", "'process.priority' directive is ignored when fastfpm is not running as "
                                  "root"]]
    assert os.getpriority(os.PRIO_PROCESS, 0) == before


def test_master_with_nothing_set_does_nothing():
    assert prepare_master(from_cli(None).global_) == []


# ---------------------------------------------------------------------------------------------------
# AllowedClients

@pytest.mark.parametrize(("entries", "peer", "allowed"), [
    ([], "203.0.113.9", True),
    ([], "::1", True),
    (["127.0.0.1"], "127.0.0.1", True),
    (["127.0.0.1"], "127.0.0.2", False),
    (["127.0.0.1"], "::ffff:127.0.0.1", True),      # IPv4-mapped peer, IPv4 entry
    (["127.0.0.1"], "::ffff:127.0.0.2", False),
    (["127.0.0.1"], "::1", False),
    (["::ffff:192.0.2.1"], "192.0.2.1", True),     # IPv4 peer, IPv4-mapped entry
    (["::1"], "::1", True),
    (["::1"], "::2", False),                        # php-fpm would let ::2 in (12-byte compare)
    (["::1"], "127.0.0.1", False),
    (["2001:db8::1"], "2001:DB8:0::1", True),
    (["fe80::1"], "fe80::1%eth0", True),            # a scope id is ignored
    (["10.0.0.0/8"], "10.255.1.2", True),
    (["10.0.0.0/8"], "11.0.0.1", False),
    (["10.0.0.0/8"], "::ffff:10.1.2.3", True),
    (["10.1.2.3/8"], "10.9.9.9", True),             # host bits are ignored, as config.py does
    (["fd00::/8"], "fd12:3456::1", True),
    (["fd00::/8"], "fe80::1", False),
    (["192.0.2.1", "198.51.100.0/24", "::1"], "198.51.100.77", True),
    (["192.0.2.1", "198.51.100.0/24", "::1"], "192.0.2.2", False),
    (["127.0.0.1"], "not an address", False),
    (["127.0.0.1"], "", False),
])
def test_allowed_clients_table(entries, peer, allowed):
    assert AllowedClients.parse(entries).allows(peer) is allowed


def test_allowed_clients_parse():
    assert AllowedClients.parse("127.0.0.1, ::1,,10.0.0.0/8") == AllowedClients.parse(
        ["127.0.0.1", "::1", "10.0.0.0/8"])
    assert not AllowedClients.parse("").restricted
    assert AllowedClients.parse(["::1"]).restricted
    with pytest.raises(ValueError, match="'localhost' is not an IP address"):
        AllowedClients.parse(["127.0.0.1", "localhost"])


def test_allowed_clients_from_a_config_file(tmp_path):
    www = load_pool(tmp_path, "listen.allowed_clients = 127.0.0.1, ::1, 10.0.0.0/8\n")
    clients = AllowedClients.parse(www.listen_allowed_clients)
    assert clients.allows("10.2.3.4") and clients.allows("::ffff:127.0.0.1") and not clients.allows("8.8.8.8")


def connected_pair(family: int, host: str) -> tuple[socket.socket, socket.socket, socket.socket]:
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen()
    client = socket.create_connection(server.getsockname()[:2])
    accepted, _ = server.accept()
    return server, client, accepted


def test_client_filter_checks_the_peer_of_a_descriptor(tmp_path):
    refused: list[str] = []
    assert AllowedClients.parse([]).client_filter() is None
    only_v6 = AllowedClients.parse(["::1"]).client_filter(refused.append)
    only_v4 = AllowedClients.parse(["127.0.0.1"]).client_filter(refused.append)
    assert only_v6 is not None and only_v4 is not None
    sockets = connected_pair(socket.AF_INET, "127.0.0.1")
    try:
        fd = sockets[2].fileno()
        assert only_v4(fd) is True
        assert only_v6(fd) is False
        assert refused == ["127.0.0.1"]
        assert sockets[2].fileno() == fd and sockets[2].getpeername()  # still open and usable
    finally:
        for sock in sockets:
            sock.close()
    # unix socket peers are not subject to the list, as in php-fpm
    left, right = socket.socketpair(socket.AF_UNIX)
    try:
        assert only_v4(left.fileno()) is True
        assert AllowedClients.parse(["127.0.0.1"]).allows_fd(left.fileno()) is True
    finally:
        left.close()
        right.close()


def test_dual_stack_socket_reports_mapped_peers_that_match_ipv4_entries():
    server = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        server.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        server.bind(("::", 0))
    except OSError:
        server.close()
        pytest.skip("no IPv6 here")
    server.listen()
    client = socket.create_connection(("127.0.0.1", server.getsockname()[1]))
    accepted, peer = server.accept()
    try:
        assert peer[0] == "::ffff:127.0.0.1"
        assert AllowedClients.parse(["127.0.0.1"]).allows_fd(accepted.fileno()) is True
        assert AllowedClients.parse(["10.0.0.1"]).allows_fd(accepted.fileno()) is False
    finally:
        for sock in (accepted, client, server):
            sock.close()


# --- watch_master: the kernel's signal when the master dies ------------------------------------


def _parent_death_signal() -> int:
    """prctl(PR_GET_PDEATHSIG) of the calling process."""
    import ctypes

    sig = ctypes.c_int(-1)
    assert ctypes.CDLL(None, use_errno=True).prctl(2, ctypes.byref(sig), 0, 0, 0) == 0  # PR_GET_PDEATHSIG
    return sig.value


def test_watch_master_asks_for_sigquit_and_says_whether_the_master_is_there() -> None:
    import signal

    from fastfpm.process import watch_master

    def child() -> list[Any]:
        return [watch_master(os.getppid()), _parent_death_signal(), watch_master(os.getppid() + 1)]

    assert in_child(child) == [True, int(signal.SIGQUIT), False]


@needs_root
def test_a_uid_change_clears_the_parent_death_signal_so_it_is_set_after_it() -> None:
    # The kernel quirk prepare_worker's order works around: setuid() clears PR_SET_PDEATHSIG.
    from fastfpm.process import watch_master

    def child() -> list[int]:
        watch_master(os.getppid())
        before = _parent_death_signal()
        os.setgid(NOBODY.pw_gid)
        os.setuid(NOBODY.pw_uid)
        cleared = _parent_death_signal()
        watch_master(os.getppid())
        return [before, cleared, _parent_death_signal()]

    assert in_child(child) == [3, 0, 3]  # SIGQUIT, nothing, SIGQUIT again
