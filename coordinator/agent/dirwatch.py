"""Whether a directory may have changed since it was last read, told by inotify.

An agent reads its truststore on every check, one stat per record: in a cluster of N nodes a check cost N² stats,
most of an agent's answer at N = 100. With a watch, a read of an unchanged directory costs one stat and one read of
the event queue.

It is as fresh as the stats it saves. The kernel queues an event for a write, truncate, attribute change, create,
delete or rename in the watched directory inside the system call that makes it, so a drain after that call has
returned finds it; a drain that finds none proves that no entry changed since the drain before the last full read.
inotify does not see everything a stat does, and the reader then stats every file as before:
- a write through another path: a symbolic link's target, or another name of a hard link, notifies only the
  directory it was made in (the reader does not trust the watch while the directory holds either: `reliable`);
- another directory at the path (replaced, or a symbolic link repointed): its (device, inode) is compared on every
  call;
- a lost event: a queue overflow or a watch the kernel dropped marks every watch changed;
- no inotify (another kernel, or the user's instances or watches used up): every call says "changed".
The one assumption: the directory is on a filesystem whose changes this kernel makes (a node's state directory is
local to it); inotify does not see what another machine writes to a network filesystem.

The same events also tell of a change as it is made (`Listener`): the agent's notice to the coordinators it streams
to, so that a watcher hears of a change without waiting for the coordinator's next check. That use is a hint only,
and nothing is trusted on its strength.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import functools
import os
import struct
import threading
import weakref
from collections.abc import Callable, Iterable

# <sys/inotify.h>
_IN_MODIFY = 0x2
_IN_ATTRIB = 0x4
_IN_CLOSE_WRITE = 0x8
_IN_MOVED_FROM = 0x40
_IN_MOVED_TO = 0x80
_IN_CREATE = 0x100
_IN_DELETE = 0x200
_IN_DELETE_SELF = 0x400
_IN_MOVE_SELF = 0x800
_IN_Q_OVERFLOW = 0x4000
_IN_IGNORED = 0x8000
_MASK = (
    _IN_MODIFY
    | _IN_ATTRIB
    | _IN_CLOSE_WRITE
    | _IN_MOVED_FROM
    | _IN_MOVED_TO
    | _IN_CREATE
    | _IN_DELETE
    | _IN_DELETE_SELF
    | _IN_MOVE_SELF
)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name


class _Inotify:
    """One inotify instance for the process: the user's instances are few (128 by default), and a process may run many
    agents. Events are sorted to the watches of their descriptor as they are drained."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watches: dict[int, weakref.WeakSet[Watch]] = {}
        self._libc: ctypes.CDLL | None = None
        self._fd = -1
        self._served: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()
        try:
            self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
            self._fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        except (OSError, AttributeError):
            self._libc = None

    def add(self, watch: Watch, path: str) -> bool:
        """Watches path for watch; False when it cannot be watched."""
        if self._libc is None or self._fd < 0:
            return False
        with self._lock:
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(path), _MASK)
            if wd < 0:
                return False
            self._watches.setdefault(wd, weakref.WeakSet()).add(watch)
            return True

    def serve(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drains in loop as soon as an event is queued, so that watches with `notify` hear of a change when it is
        made, not at the next read. Once per loop."""
        if self._fd < 0 or loop in self._served:
            return
        loop.add_reader(self._fd, self.drain)
        self._served.add(loop)

    def drain(self) -> None:
        """Marks changed every watch whose directory an event names."""
        if self._fd < 0:
            return
        with self._lock:
            while True:
                try:
                    data = os.read(self._fd, 1 << 16)
                except BlockingIOError:
                    return
                except InterruptedError:
                    continue
                self._sort(data)

    def _sort(self, data: bytes) -> None:
        offset = 0
        while offset < len(data):
            wd, mask, _, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            if mask & _IN_Q_OVERFLOW:
                for watches in self._watches.values():
                    for watch in watches:
                        watch.changed = True
                        if watch.notify is not None:
                            watch.notify()
                continue
            for watch in self._watches.get(wd, ()):
                watch.changed = True
                if watch.notify is not None:
                    watch.notify()
                if mask & _IN_IGNORED:
                    watch.watching = None  # the kernel dropped the watch (the directory is gone): watch anew
            if mask & _IN_IGNORED:
                self._watches.pop(wd, None)


@functools.cache
def _instance() -> _Inotify:
    return _Inotify()


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None  # the reader's own listing fails too, and says why
    return st.st_dev, st.st_ino


class Watch:
    """One directory. `unchanged()` is True only if no entry of it can have changed since the last call; the first
    call, and every call after a change or while the watch is unusable, is False."""

    def __init__(self, path: str, notify: Callable[[], None] | None = None) -> None:
        self._path = path
        self.watching: tuple[int, int] | None = None  # (device, inode) of the directory the kernel watches
        self.changed = True
        # Called, in whichever thread drains, for each event that names the directory (Listener's use).
        self.notify = notify

    def unchanged(self) -> bool:
        identity = _identity(self._path)
        if identity is None:
            self.watching = None
            return False
        inotify = _instance()
        if identity != self.watching:
            self.watching = None
            # Cleared before the watch exists, so that no event after it is lost; then stat'ed again, so that a
            # directory replaced in between is not mistaken for the one watched.
            self.changed = False
            if inotify.add(self, self._path) and _identity(self._path) == identity:
                self.watching = identity
            return False
        inotify.drain()
        changed, self.changed = self.changed, False
        return not changed


def reliable(entries: list[os.DirEntry[str]]) -> bool:
    """Whether a watch on the directory these entries were listed from sees every change to them: none is a symbolic
    link, nor a file with another name (a hard link), through which it could be written unseen."""
    try:
        return not any(entry.is_symlink() or (entry.is_file() and entry.stat().st_nlink > 1) for entry in entries)
    except OSError:
        return False


class Listener:
    """Calls `callback` in the running event loop soon after any of `paths` (directories) changes: what an agent
    tells the coordinators it streams to. A hint, never a proof: a directory replaced is watched again only at the
    next `rearm`, and a kernel without inotify tells nothing, so whoever listens must still check on its own."""

    def __init__(self, paths: Iterable[str], callback: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()

        def notify() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed before this listener was dropped
                loop.call_soon_threadsafe(callback)

        self._watches = [Watch(path, notify) for path in paths]
        _instance().serve(loop)
        self.rearm()

    def rearm(self) -> None:
        """Watches again each directory whose watch the kernel dropped, or that is another directory now: one stat
        each."""
        for watch in self._watches:
            watch.unchanged()
