"""Who is writing a log: the writer holds a lock on one byte far past the end of the file for as long
as it runs, so a reader can tell a live run (`running`) from one whose writer died (`incomplete`).

Linux open-file-description locks (F_OFD_SETLK) are used because they are independent of the
flock() that HDF5 itself takes and survive the writer opening and closing the file around every
flush (a classic POSIX lock would be dropped by any close of the file in the writing process). The
kernel drops the lock when the writer dies, however it dies. Elsewhere no lock is taken and readers
cannot tell (they report `running`).
"""

from __future__ import annotations

import ctypes
import fcntl
import os

LOCK_OFFSET = 1 << 62  # a byte no HDF5 file reaches


class _Flock(ctypes.Structure):
    _fields_ = [("l_type", ctypes.c_short), ("l_whence", ctypes.c_short), ("l_start", ctypes.c_int64),
                ("l_len", ctypes.c_int64), ("l_pid", ctypes.c_int)]


def _request(kind: int) -> bytes:
    lock = _Flock(kind, os.SEEK_SET, LOCK_OFFSET, 1, 0)
    return bytes(lock)


SUPPORTED = hasattr(fcntl, "F_OFD_SETLK") and hasattr(fcntl, "F_OFD_GETLK")


class WriterLock:
    """Held by a log's writer from creation to close."""

    def __init__(self, path: str):
        self.fd = None
        if not SUPPORTED:
            return
        fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _request(fcntl.F_WRLCK))
        except OSError:
            os.close(fd)
            raise
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def writer_alive(path: str) -> bool | None:
    """True while some process holds the writer lock of `path`, False when none does, None if unknown."""
    if not SUPPORTED:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _request(fcntl.F_RDLCK))
    except OSError:
        return None
    finally:
        os.close(fd)
    return _Flock.from_buffer_copy(answer).l_type != fcntl.F_UNLCK
