"""One writer per store at a time: a kernel-held file lock beside the tables, re-entrant within its holder's context."""

from __future__ import annotations

import contextlib
import contextvars
import errno
import fcntl
import json
import os
import socket
import stat
import struct
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

LOCK_FILE = "_writer.lock"
_POLL_SECONDS = 0.2


class StoreBusyError(TimeoutError):
    """Another writer held the store for longer than the caller was willing to wait."""


class _ProcessLock:
    """This process's share of one store's lock: a thread lock, and the file lock while it is held.

    The file lock is an open-file-description lock (Linux ``F_OFD_SETLK``; ``flock``
    elsewhere): it belongs to the one open file that took it, so no other open or close
    of the same file in this process can release it (as happens to classic POSIX
    locks), and the kernel drops it when the holder dies, even under ``kill -9``: a lock
    can never be left stale. Forked data-loader workers share it until they exit, a
    few seconds after their parent. ``thread_lock`` keeps holders in one process apart
    without touching the file.
    """

    def __init__(self):
        self.thread_lock = threading.Lock()
        self.what = ""
        self.fd: int | None = None
        self.inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the locked file


# The locks the running code holds. Re-entry goes by context, not by thread, so a helper
# thread started with the holder's context (contextvars.copy_context) writes under its lock.
_HELD: contextvars.ContextVar[frozenset] = contextvars.ContextVar("clipfuse_held_store_locks", default=frozenset())
_REGISTRY: dict[str, _ProcessLock] = {}
_REGISTRY_LOCK = threading.Lock()


def _lock_file(fd: int) -> bool:
    """Take the exclusive lock on an open file without waiting; False when another holder has it."""
    try:
        if hasattr(fcntl, "F_OFD_SETLK"):
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return False
        raise


def _unlock_file(fd: int) -> None:
    if hasattr(fcntl, "F_OFD_SETLK"):
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("@hhqqi4x", fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0))
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _process_lock(key: str) -> _ProcessLock:
    with _REGISTRY_LOCK:
        return _REGISTRY.setdefault(key, _ProcessLock())


def describe_holder(info: dict) -> str:
    """``"clipfuse index (pid 123), since 10:42:07"`` from the holder record in a lock file."""
    what = info.get("what") or "a writer"
    where = f"pid {info.get('pid', '?')}"
    if info.get("host") and info["host"] != socket.gethostname():
        where += f" on {info['host']}"
    since = datetime.fromtimestamp(info["since"]).strftime("%H:%M:%S") if info.get("since") else "?"
    return f"{what} ({where}), since {since}"


class WriterLock:
    """The writer lock of one store.

    Parameters
    ----------
    folder : path or None
        The store's folder; None for stores that are not on this machine's disk
        (``memory://``), which are locked between the threads of this process only.
    key : str
        Identity of the store (its resolved path or URI).
    remote : callable, optional
        For a store on object storage: makes its lease (``acquire``/``check``/``release``,
        see :class:`clipfuse.store.objectlock.S3Lease`), which keeps writers on every
        machine apart.
    """

    def __init__(self, folder: Path | None, key: str, *, remote: Callable[[], object] | None = None):
        self.folder = folder
        self.key = key
        self._lock = _process_lock(key)
        self._remote_factory = remote  # makes the object-store lease (store.objectlock.S3Lease) on first use
        self._remote = None

    @property
    def path(self) -> Path | None:
        return None if self.folder is None else self.folder / LOCK_FILE

    @property
    def held(self) -> bool:
        """Whether the running code holds the lock."""
        return self.key in _HELD.get()

    @contextlib.contextmanager
    def hold(self, what: str = "a clipfuse writer", *, timeout: float | None = None,
             on_wait: Callable[[str], None] | None = None):
        """Hold the lock for the block; re-entrant within the holder's context (see ``_HELD``).

        Parameters
        ----------
        what : str
            What the holder is doing, shown to writers that wait for it.
        timeout : float, optional
            Seconds to wait for another writer; None waits as long as it takes.
        on_wait : callable(str), optional
            Called once, with a description of the holder, when the lock is busy.

        Raises
        ------
        StoreBusyError
            When ``timeout`` passes first.
        PermissionError
            When the store's folder is not writable (checked before anything else happens).
        """
        if self.held:
            self._check_still_ours()
            yield self
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        lock = self._lock
        if not lock.thread_lock.acquire(blocking=False):
            if on_wait:
                on_wait(f"{lock.what or 'another writer'} (this process)")
            if not lock.thread_lock.acquire(timeout=-1 if deadline is None else max(0.0, deadline - time.monotonic())):
                raise StoreBusyError(f"the store {self.key!r} is being written by {lock.what or 'another writer'} "
                                     "in this process; try again when it is done.")
        remote = None
        try:
            if self.folder is not None:
                lock.fd = self._acquire_file(what, deadline, on_wait)
                lock.inode = _inode(os.fstat(lock.fd))
            elif self._remote_factory is not None:
                remote = self._acquire_remote(what, deadline, on_wait)
            lock.what = what
        except BaseException:
            lock.thread_lock.release()
            raise
        token = _HELD.set(_HELD.get() | {self.key})
        try:
            yield self
        finally:
            _HELD.reset(token)
            if remote is not None:
                with contextlib.suppress(Exception):  # an unreleased lease expires on its own
                    remote.release()
            lock.what, lock.inode = "", None
            if lock.fd is not None:
                fd, lock.fd = lock.fd, None
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
                    _unlock_file(fd)
                os.close(fd)
            lock.thread_lock.release()

    def _not_writable(self, e: OSError) -> PermissionError:
        return PermissionError(e.errno, f"the store {str(self.folder)!r} is not writable ({e.strerror}); commands "
                               "that change it (index, reembed, import-embeddings, train-heads, predict) need write "
                               "access. Use a writable --db, or copy the store.")

    def _open(self) -> int:
        """Open (or create) the lock file: never through a symlink, and only a regular file."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, flags, 0o666)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise self._not_a_lock_file("a symbolic link") from e
            if isinstance(e, PermissionError) or e.errno == errno.EROFS:
                raise self._not_writable(e) from e
            if isinstance(e, IsADirectoryError):
                raise self._not_a_lock_file("a folder") from e
            raise
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            os.close(fd)
            raise self._not_a_lock_file("not a regular file" if not stat.S_ISREG(st.st_mode)
                                        else "a file with other names (hard links)")
        os.set_blocking(fd, True)
        return fd

    def _not_a_lock_file(self, what: str) -> OSError:
        return OSError(f"{str(self.path)!r} is {what}, so it can't be the store's writer lock (it is never followed "
                       "or written through); remove it, and clipfuse creates a plain file there.")

    def _acquire_remote(self, what: str, deadline: float | None, on_wait):
        """Take the object-store lease, waiting (and saying so once) while a live holder has it."""
        if self._remote is None:
            self._remote = self._remote_factory()
        told = False
        while True:
            holder = self._remote.try_acquire(what)
            if holder is None:
                self._remote.start_renewing()
                return self._remote
            if not told and on_wait:
                on_wait(describe_holder(holder))
                told = True
            if deadline is not None and time.monotonic() >= deadline:
                raise StoreBusyError(f"the store {self.key!r} is being written by {describe_holder(holder)}; try "
                                     "again when it is done.")
            time.sleep(max(_POLL_SECONDS, 1.0))  # each poll is a request to the object store

    def _check_still_ours(self) -> None:
        """A holder whose lock file was deleted (or replaced) no longer keeps other writers out: stop."""
        if self._remote is not None and self.folder is None:
            self._remote.check()
        if self.folder is None or self._lock.inode is None:
            return
        try:
            current = _inode(os.stat(self.path, follow_symlinks=False))
        except FileNotFoundError:
            current = None
        if current != self._lock.inode:
            raise OSError(f"the writer lock {str(self.path)!r} was removed or replaced while this command held it, "
                               "so another writer may have started; this command stops here (what it committed is "
                               "complete). Never delete the lock file: it can't go stale, the system drops the lock "
                               "when its holder exits. Run the command again.")

    def _acquire_file(self, what: str, deadline: float | None, on_wait) -> int:
        fd = self._open()
        try:
            self._probe_writable()
            told = False
            while True:
                try:
                    locked = _lock_file(fd)
                except OSError as e:
                    raise OSError(e.errno, f"can't lock the store {str(self.folder)!r}: {e.strerror}; its file "
                                  "system does not support file locks, which keep two writers apart. Use a "
                                  "local folder for --db.") from e
                if locked and self._is_current(fd):
                    break
                if locked:  # the file was deleted or replaced while we waited: lock the one that is there now
                    os.close(fd)
                    fd = -1
                    fd = self._open()
                    continue
                holder = self._read_holder(fd)
                if not told and on_wait:
                    on_wait(describe_holder(holder))
                    told = True
                if deadline is not None and time.monotonic() >= deadline:
                    raise StoreBusyError(f"the store {str(self.folder)!r} is being written by "
                                         f"{describe_holder(holder)}; try again when it is done.")
                time.sleep(_POLL_SECONDS)
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                                 "since": time.time()}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            return fd
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def _probe_writable(self) -> None:
        """The lock file may be writable in a folder that is not (or in one that a
        root-owned immutable flag protects): make sure a new file can be created."""
        probe = self.folder / f".write-probe-{os.getpid()}-{threading.get_ident()}"
        try:
            os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(probe)
        except FileExistsError:
            with contextlib.suppress(OSError):
                os.unlink(probe)
        except OSError as e:
            raise self._not_writable(e) from e

    def _is_current(self, fd: int) -> bool:
        try:
            return _inode(os.fstat(fd)) == _inode(os.stat(self.path, follow_symlinks=False))
        except FileNotFoundError:
            return False

    @staticmethod
    def _read_holder(fd: int) -> dict:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            return {}


def _inode(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino
