"""One writer per run: the process that runs, resumes or retries a run holds a lock on its directory while it works.

Two processes writing one run directory (the same `lvd run` started in two terminals, a scheduler's retry while the
first job still runs, `lvd resume` of a run that was only slow) download the same shards into the same work folders
and interleave their records: both failed with unrelated errors (img2dataset on a half-written shard input, pyarrow
on a truncated page) and the history showed three attempts where there were two. Now the second process is refused
before it writes anything, with who holds the run; `lvd status` and `lvd runs` tell a running run (the lock is held)
from one whose process died without recording an end (it is not).

The lock is `flock` on `<run>/.lock` (a lock on an NFS mount is taken on the server: Linux emulates flock with
POSIX byte-range locks there). The kernel releases it when its process dies, whatever killed it: SIGKILL, the
out-of-memory killer, a lost machine (NFS: once the server's lease expires). It belongs to the open file, which is
not passed to programs the process starts (close-on-exec); a child forked without exec keeps the run locked while it
lives, as it may still write to it. The file holds the holder's pid, host, command and start time, for the messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = ".lock"
log = logging.getLogger("lvd")
# A reader's probe (`holder`) holds a shared lock for microseconds; a writer starting at that moment tries again for
# this long before it calls the run busy.
ACQUIRE_WAIT_S = 2.0
BUSY_EXIT = 75  # EX_TEMPFAIL ("try again later"): the exit status of a command refused because the run is in use


@dataclass(frozen=True)
class Holder:
    """The process that holds a run: from the lock file, written by it when it took the lock."""

    pid: int | None
    host: str
    command: str
    since: str  # ISO 8601, UTC
    # Where `pid` has exited but the lock is still held: the processes of this machine with the lock file open (the
    # children it forked), as far as /proc shows them.
    openers: tuple[int, ...] = ()

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()

    def describe(self) -> str:
        """`lvd run, pid 123, since 2026-12-07 14:50:03 UTC`, with `on HOST` when it is another machine."""
        where = "" if self.here else f" on {self.host}"
        since = f", since {self.since[:19].replace('T', ' ')} UTC" if self.since else ""
        return f"{self.command}, pid {self.pid}{where}{since}" if self.pid else f"{self.command}{where}"


# `holder`'s answer where the file system takes no locks (some FUSE and old NFS mounts): whether a process writes the
# run cannot be told.
UNKNOWN = Holder(None, "", "unknown", "")
NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunBusy(RuntimeError):
    """Another process holds the run directory."""

    def __init__(self, path: Path, holder: Holder, what: str = "run"):
        self.path, self.holder = Path(path), holder
        name = self.path.name
        root = self.path.parent
        stop = _how_to_stop(holder, self.path / LOCK_FILE, what)
        super().__init__(
            f"{what} {name} is in use by another process ({holder.describe()}). Two processes writing one {what} would "
            f"mix their shards and records, so this one stops before writing anything. Follow it with `lvd status "
            f"{name} --root {root}`; {stop}, then continue with `lvd resume {name} --root {root}`"
            if what == "run" else
            f"{what} {self.path} is being written by another process ({holder.describe()}): wait for it to finish; "
            f"{stop}")


def _how_to_stop(holder: Holder, lock: Path, what: str) -> str:
    """What stops the holder, as "to stop it: ..."."""
    if not holder.here:
        return f"to stop it, stop pid {holder.pid} on {holder.host} (Ctrl-C or `kill`: it records the stop)"
    if holder.pid and _alive(holder.pid):
        return f"to stop it: kill {holder.pid} (it records the stop and stops its children)"
    if holder.openers:
        pids = " ".join(str(p) for p in holder.openers)
        return f"to stop it: kill {pids} (pid {holder.pid} has exited; processes it started still hold the {what})"
    return f"pid {holder.pid} has exited, but processes it started still hold it: `fuser -v {lock}` lists them"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _openers(lock: Path) -> tuple[int, ...]:
    try:
        st = lock.stat()
    except OSError:
        return ()
    out = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    s = fd.stat()
                    if (s.st_dev, s.st_ino) == (st.st_dev, st.st_ino):
                        out.append(int(proc.name))
                        break
    return tuple(sorted(p for p in out if p != os.getpid()))


def _read(lock: Path) -> Holder:
    try:
        info = json.loads(lock.read_text() or "{}")
    except (OSError, ValueError):
        info = {}
    holder = Holder(info.get("pid"), info.get("host") or socket.gethostname(),
                    info.get("command") or "a process starting up", info.get("since") or "")
    if holder.here and holder.pid and not _alive(holder.pid):
        return dataclasses.replace(holder, openers=_openers(lock))
    return holder


def holder(path: Path | str) -> Holder | None:
    """The process writing the run (or evaluation) at `path` now, None when none is, `UNKNOWN` where the file system
    takes no locks: a probe that changes nothing (a missing lock file is not created; a read-only folder is fine)."""
    lock = Path(path) / LOCK_FILE
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            return _read(lock) if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN) else UNKNOWN
        return None  # (closing releases the probe's lock)
    finally:
        os.close(fd)


_held: dict[str, Holder] = {}  # the lock files this process holds (realpath -> its record)
_held_guard = threading.Lock()


@contextlib.contextmanager
def writing(path: Path | str, command: str, what: str = "run", create: bool = False) -> Iterator[Holder]:
    """Hold `path` (a run or evaluation folder; `create`: made if missing) for this process while the block runs;
    `RunBusy` if another process holds it. Nested in this process (the CLI holds the run, then the flow it starts asks
    again, as a flow started by a Prefect deployment does first): the hold already taken."""
    path = Path(path)
    if create:
        path.mkdir(parents=True, exist_ok=True)
    elif not path.is_dir():
        raise FileNotFoundError(f"no {what} at {path}")
    lock = path / LOCK_FILE
    key = os.path.realpath(lock)
    with _held_guard:
        mine = _held.get(key)
    if mine is not None:
        yield mine
        return
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        deadline = time.monotonic() + ACQUIRE_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as err:
                if err.errno in NO_LOCKS:
                    log.warning("%s: the file system takes no locks (%s): a second process on this %s cannot be "
                                "refused", path, os.strerror(err.errno), what)
                    break
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() > deadline:
                    raise RunBusy(path, _read(lock), what) from None
                time.sleep(0.05)
        from infra.run import now

        me = Holder(os.getpid(), socket.gethostname(), command, now())
        record = {"pid": me.pid, "host": me.host, "command": me.command, "since": me.since}  # (no argv: no secrets)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        with _held_guard:
            _held[key] = me
        try:
            yield me
        finally:
            with _held_guard:
                _held.pop(key, None)
    finally:
        os.close(fd)  # releases the lock; the file stays (another process may already wait on it)
