"""Where control sockets live, and who may trust a directory.

A process serves its tracefs at `DIR/PID.sock`, where DIR is

    $XDG_RUNTIME_DIR/pykprobes      when XDG_RUNTIME_DIR is set, and is a directory owned
                                    by the process's user and closed to others (systemd makes
                                    /run/user/UID so);
    /tmp/pykprobes-UID              otherwise;

and the attach bootstrap (attach.py) writes its files beside it (`attach-PID.py`, the
script; `attach-PID.out`, its report). DIR is made 0700 and must stay so: a directory that
is a symlink, owned by another user (someone made /tmp/pykprobes-UID first) or open to group
or others is refused, never used (`UnsafeDirectory`). Clients apply the same test before they
connect, so that a socket another user planted is never spoken to.

A socket file whose process is dead is stale: the server removes those it finds in its
directory when it starts, and clients remove the one they find dead (`remove_if_stale`).

Standard library only, no imports beyond `os`: the boot stage serves from here.
"""

from __future__ import annotations

import os
import stat

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the boot stage serves from here
if TYPE_CHECKING:
    from collections.abc import Mapping

#: The socket file of a process: `PID.sock`.
SOCKET_SUFFIX = ".sock"

#: AF_UNIX paths are at most 107 bytes (sun_path is 108, with its NUL) on Linux.
SUN_PATH_MAX = 107


class UnsafeDirectory(OSError):
    """A control directory that is not private to its user: never used."""


def runtime_base(environ: Mapping[str, str], uid: int) -> str | None:
    """`$XDG_RUNTIME_DIR` when it is fit for `uid`'s sockets, else None."""
    base = environ.get("XDG_RUNTIME_DIR")
    if not base or not os.path.isabs(base):
        return None
    try:
        st = os.stat(base)
    except OSError:
        return None
    # Owned by the user (or it is root's, for root) and closed to others: the XDG spec's
    # own requirements. A variable inherited across `su`/`sudo` names another user's
    # directory: then /tmp is used.
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        return None
    return base


def candidate_dirs(uid: int, environ: Mapping[str, str]) -> list[str]:
    """Where a process of `uid` with this environment puts its socket, in the order it
    tries them (the first that is usable wins; see `control_dir`)."""
    dirs = []
    base = runtime_base(environ, uid)
    if base is not None:
        dirs.append(os.path.join(base, "pykprobes"))
    dirs.append(f"/tmp/pykprobes-{uid}")
    return dirs


def check_private(path: str, uid: int) -> None:
    """Raise UnsafeDirectory unless `path` is a real directory owned by `uid` (or root),
    with no access for group and others."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory (a symlink or a file): refusing "
                              "to use it; remove it")
    if st.st_uid not in (uid, 0):
        raise UnsafeDirectory(f"{path} belongs to uid {st.st_uid}, not {uid}: refusing to "
                              "use it; remove it")
    if st.st_mode & 0o077:
        raise UnsafeDirectory(f"{path} has mode {stat.S_IMODE(st.st_mode):04o}: refusing "
                              "to use it; it must be 0700 (chmod 700 it, or remove it)")


def make_private_dir(path: str, uid: int | None = None) -> str:
    """Create `path` mode 0700 (owned by `uid` when root makes it for another user), or
    check the one there. Returns `path`; raises UnsafeDirectory or OSError."""
    owner = os.geteuid() if uid is None else uid
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    else:
        # mkdir applies the umask, which can only remove bits: 0700 stays 0700 or less.
        os.chmod(path, 0o700)
        if owner != os.geteuid():
            os.chown(path, owner, -1)
    check_private(path, owner)
    return path


def control_dir(uid: int | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The directory this process serves from (made if missing). Raises UnsafeDirectory
    when none of the candidates is private to the user, OSError when none can be made."""
    uid = os.geteuid() if uid is None else uid
    errors = []
    for path in candidate_dirs(uid, os.environ if environ is None else environ):
        # The longest name bound there: the server's temporary one (server.py bind()).
        if len(os.fsencode(os.path.join(path, f".{2**22}.{'0' * 8}.tmp"))) > SUN_PATH_MAX:
            errors.append(f"{path}: too long for a Unix socket path")
            continue
        try:
            return make_private_dir(path, uid)
        except UnsafeDirectory:
            raise
        except OSError as exc:
            errors.append(f"{path}: {exc.strerror or exc}")
    raise OSError(f"no directory for the control socket: {'; '.join(errors)}")


def socket_path(directory: str, pid: int) -> str:
    return os.path.join(directory, f"{pid}{SOCKET_SUFFIX}")


def pid_of(name: str) -> int | None:
    """The pid a socket file name `PID.sock` is for, or None for any other name."""
    stem, dot, suffix = name.partition(".")
    if dot and "." + suffix == SOCKET_SUFFIX and stem.isdigit():
        return int(stem)
    return None


def attach_pid_of(name: str) -> int | None:
    """The pid an attach file (`attach-PID.py`, `attach-PID.out`, ...) is for, or None."""
    stem = name.partition(".")[0]
    if stem.startswith("attach-") and stem[7:].isdigit():
        return int(stem[7:])
    return None


def alive(pid: int) -> bool:
    """Whether process `pid` exists (a zombie counts as dead: it serves nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's: it exists
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            # "pid (comm) S ...": the state follows the last ')'.
            return f.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def remove_stale(directory: str) -> list[int]:
    """Remove the socket files (and attach files) of dead processes in `directory`; the
    pids removed."""
    removed: list[int] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        pid = pid_of(name)
        if pid is None:
            pid = attach_pid_of(name)
        if pid is not None and not alive(pid):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                continue
            removed.append(pid)
    return removed


def remove_if_stale(path: str, pid: int) -> bool:
    """Remove `path` if its process is dead; True if it was removed."""
    if alive(pid):
        return False
    try:
        os.unlink(path)
    except OSError:
        return False
    return True
