"""Files whose content is re-read when it changes, judged by content and not by a stat alone.

A trust file (the registry, an agent's coordinators.pem, a truststore record) must be re-read after any rewrite, and
the writer is not always memberguard: a same-size rewrite that restores the mtime (`cp -p`, rsync, a configuration
tool, os.utime) leaves (inode, mtime, size) as they were. The stat can still rule a change out cheaply, by the ctime,
which every write, rename and utime sets and no writer can set back: a file whose stat, ctime included, is the one
seen when it was last read is unchanged, provided that ctime was already in the past then. Timestamps are taken from
a coarse clock (a tick of a few milliseconds; a second or more on some filesystems), so a write in the same tick as
the read that saw the previous version can leave the ctime as it was. A version is therefore only *settled* once its
ctime is SETTLE_MARGIN older than the read; until then every call reads the file and compares its digest (git's
"racily clean" entries, the same problem). In the steady state a call costs one stat; in the margin after a change,
one read and one SHA-256 of the file.

The one assumption: the system clock does not step back by more than SETTLE_MARGIN between a write and the next read.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

# Longer than any filesystem's timestamp granularity that a trust file is likely to live on (ext4, xfs, btrfs and
# tmpfs use the kernel's coarse clock; ext3 and some network filesystems have whole seconds).
SETTLE_MARGIN = 2.0


@dataclass(frozen=True, slots=True)
class Stamp:
    """What a stat says about a file's version."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def settled(self, read_at: float) -> bool:
        """Whether a read at `read_at` (time.time()) that saw this stamp saw a version no later write can share it
        with."""
        return self.ctime_ns < (read_at - SETTLE_MARGIN) * 1e9


@dataclass(frozen=True, slots=True)
class Version:
    """One version of a file's content. The same object comes back for as long as the content is unchanged, so a
    caller that derives something from it can tell by identity whether to derive again."""

    data: bytes
    digest: bytes


class WatchedFile:
    """One file, its current version re-read only when it may have changed. Not thread-safe: callers hold a lock."""

    def __init__(self, path: os.PathLike[str] | str, clock: Callable[[], float] = time.time) -> None:
        self.path = os.fspath(path)
        self._clock = clock
        self._stamp: Stamp | None = None
        self._settled = False
        self._version: Version | None = None

    def current(self) -> Version:
        """The file's content as of now. Raises OSError when it cannot be read."""
        read_at = self._clock()
        stamp = Stamp.of(os.stat(self.path))
        if self._version is not None and self._settled and stamp == self._stamp:
            return self._version
        with open(self.path, "rb") as handle:
            # The opened file's own stamp: the path may have been replaced since the stat above.
            stamp = Stamp.of(os.fstat(handle.fileno()))
            data = handle.read()
        digest = hashlib.sha256(data).digest()
        if self._version is None or digest != self._version.digest:
            self._version = Version(data, digest)
        self._stamp, self._settled = stamp, stamp.settled(read_at)
        return self._version
