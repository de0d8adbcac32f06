"""Move memory pages between processes through a pipe with Linux vmsplice(2).

The protocol comes from the 2013 "vmsplice: Add limited zero copy" RFC:

* the writer *gifts* pages of page-aligned private memory to a pipe with
  ``SPLICE_F_GIFT | SPLICE_F_MOVE`` and never touches them again;
* the reader asks for them with ``SPLICE_F_MOVE`` into page-aligned memory;
* where a move is not possible, the kernel copies.

Mainline Linux never merged the move: ``vmsplice`` into user memory copies and
ignores ``SPLICE_F_MOVE``.  The gift half is real everywhere: ``vmsplice`` into
a pipe queues references to the writer's own pages, no copy.  That is also its
danger: a later write to the buffer changes data already queued.  ``gift``
therefore drops the gifted pages from the writer (``MADV_DONTNEED``) before it
returns, so the writer reads zeros there and the reader gets the original.

    >>> import os, vmsplicemove as vm
    >>> r, w = vm.pipe()
    >>> with vm.PageBuffer(2 * vm.PAGE_SIZE) as src, vm.PageBuffer(len(src)) as dst:
    ...     src[:5] = b"hello"
    ...     vm.gift(w, src) == len(src), bytes(src[:5])   # gifted pages read as zeros
    ...     vm.move(r, dst) == len(dst), bytes(dst[:5])
    (True, b'\\x00\\x00\\x00\\x00\\x00')
    (True, b'hello')
    >>> os.close(r), os.close(w)
    (None, None)

``probe()`` tells what the running kernel really does.  Everything here is
the standard library: ``ctypes`` on libc, ``mmap`` for page buffers.  Where
``vmsplice`` cannot be used (not Linux, or a sandbox answers ENOSYS or EPERM)
``gift`` and ``move`` copy with ``os.write`` and ``os.readv`` and keep the
same results.  CPython 3.9 or later.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import mmap
import os
import select
import stat
import struct
import sys
import termios
import threading
from collections.abc import Sequence
from typing import Any

__all__ = [
    "IOV_MAX",
    "PAGE_SIZE",
    "SPLICE_F_GIFT",
    "SPLICE_F_MORE",
    "SPLICE_F_MOVE",
    "SPLICE_F_NONBLOCK",
    "PageBuffer",
    "Support",
    "gift",
    "move",
    "pipe",
    "probe",
    "vmsplice",
]
__version__ = "0.1.0"

# ---------------------------------------------------------------------------
# Constants (include/uapi/linux/splice.h)

PAGE_SIZE: int = mmap.PAGESIZE
_PAGE_MASK = PAGE_SIZE - 1
SPLICE_F_MOVE: int = 1
SPLICE_F_NONBLOCK: int = 2
SPLICE_F_MORE: int = 4
SPLICE_F_GIFT: int = 8
_SPLICE_F_ALL = SPLICE_F_MOVE | SPLICE_F_NONBLOCK | SPLICE_F_MORE | SPLICE_F_GIFT
_MOVE_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK

try:
    IOV_MAX: int = os.sysconf("SC_IOV_MAX")
except (AttributeError, ValueError, OSError):
    IOV_MAX = 1024  # UIO_MAXIOV, the kernel's limit on every architecture
if IOV_MAX <= 0:
    IOV_MAX = 1024

_LINUX = sys.platform.startswith("linux")
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_fcntl, _F_GETFL, _O_ACCMODE = fcntl.fcntl, fcntl.F_GETFL, os.O_ACCMODE
# Only Linux promises that MADV_DONTNEED on private anonymous memory frees
# the pages and reads back zeros; elsewhere (macOS) it is advice, and
# discard() writes zeros instead.
_MADV_DONTNEED: int | None = getattr(mmap, "MADV_DONTNEED", None) if _LINUX else None
_MADV_HUGEPAGE: int | None = getattr(mmap, "MADV_HUGEPAGE", None)
_MADV_POPULATE_WRITE = 23  # Linux 5.14; older kernels answer EINVAL
_THP = "/sys/kernel/mm/transparent_hugepage/"

# ---------------------------------------------------------------------------
# The libc binding: argtypes and restype set once, errno kept per thread.


# struct iovec {void *iov_base; size_t iov_len;}, packed into bytes: the
# kernel only reads it, and ctypes passes bytes to a c_void_p argument as a
# pointer, faster than it builds and converts a Structure.
_IOVEC = struct.Struct("PN")
_pack_iovec = _IOVEC.pack


def _load_libc(loader: Any = ctypes.CDLL, **options: Any) -> Any:
    try:
        return loader(ctypes.util.find_library("c") or None, **options)
    except OSError:
        return None


_libc = _load_libc(use_errno=True)
_vmsplice_fn: Any = getattr(_libc, "vmsplice", None)
if _vmsplice_fn is not None:
    _vmsplice_fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    _vmsplice_fn.restype = ctypes.c_ssize_t

# A signal handler that raises (KeyboardInterrupt) between the vmsplice call
# and the discard would leave gifted pages mapped and writable, and lose the
# count.  Python runs handlers between bytecodes, so each non-blocking step
# runs with signals blocked; waiting happens unblocked, in poll().  This pair
# runs around every step, so it is bound for speed: without argtypes (its
# arguments are only ints and ctypes objects) and through PyDLL, which keeps
# the GIL (the call never blocks), it costs about a third less.
_Sigset = ctypes.c_ulong * (128 // ctypes.sizeof(ctypes.c_ulong))
_sigmask_fn: Any = getattr(_load_libc(ctypes.PyDLL), "pthread_sigmask", None) if _LINUX else None
_ALL_SIGNALS = _Sigset()
if _sigmask_fn is not None:
    _sigmask_fn.restype = ctypes.c_int
    _libc.sigfillset(ctypes.byref(_ALL_SIGNALS))
_ALL_SIGNALS_REF = ctypes.byref(_ALL_SIGNALS)
_SIG_BLOCK, _SIG_SETMASK = 0, 2


def _block_signals() -> Any:
    """Block every signal in this thread; return the mask to restore."""
    old = _Sigset()
    if _sigmask_fn is not None:
        _sigmask_fn(_SIG_BLOCK, _ALL_SIGNALS_REF, old)
    return old


def _restore_signals(old: Any) -> None:
    """Pending signals arrive now; their Python handlers run right after."""
    if _sigmask_fn is not None:
        _sigmask_fn(_SIG_SETMASK, old, None)


# Read-only buffers (bytes) have no address in ctypes' public API; the
# buffer protocol gives it and keeps the object exported while we use it.


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p),
    ]


_GetBuffer = ctypes.pythonapi.PyObject_GetBuffer
_GetBuffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_GetBuffer.restype = ctypes.c_int
_ReleaseBuffer = ctypes.pythonapi.PyBuffer_Release
_ReleaseBuffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_ReleaseBuffer.restype = None


class _Pins:
    """Exports of several buffers, held while the kernel may touch them."""

    def __init__(self, buffers: Sequence[Any], writable: bool, what: str) -> None:
        """``what`` names the argument; ``{}`` in it takes the buffer's index."""
        self.views: list = []
        flags = 1 if writable else 0  # PyBUF_WRITABLE, else PyBUF_SIMPLE (contiguous)
        try:
            for i, obj in enumerate(buffers):
                view = _PyBuffer()
                try:
                    _GetBuffer(obj, view, flags)
                except (BufferError, TypeError) as exc:
                    kind = "a writable, contiguous" if writable else "a contiguous"
                    raise TypeError(f"{what.format(i)} must be {kind} bytes-like object, "
                                    f"not {type(obj).__name__} ({exc})") from None
                self.views.append(view)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        while self.views:
            _ReleaseBuffer(self.views.pop())


# ---------------------------------------------------------------------------
# Page buffers


def _hugepage_size() -> int:
    try:
        with open(_THP + "hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 2 * 1024 * 1024


_HUGE_PAGE_SIZE = _hugepage_size()


def _check_int(name: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


class PageBuffer(mmap.mmap):
    """Page-aligned private anonymous memory, the only kind ``gift`` accepts.

    ``PageBuffer(size, *, huge=False)`` maps ``size`` bytes rounded up to
    whole pages with ``MAP_PRIVATE | MAP_ANONYMOUS``.  It must be private:
    dropping pages of a shared mapping (Python's ``mmap.mmap(-1, n)``
    default) does not detach them from the pipe, so the aliasing stays.

    ``huge=True`` rounds up to whole transparent huge pages and advises
    ``MADV_HUGEPAGE`` where the kernel offers it (plain pages otherwise, with
    no error).  Linux 6.7 and later start such mappings on a huge-page
    boundary; ``address`` tells.

    It is a writable bytes-like object (an ``mmap.mmap``): ``len()``,
    indexing, slicing, ``memoryview(buf)``, ``os.readv``, ``hashlib``...
    ``close()`` while a memoryview is exported raises ``BufferError``; any
    use after close raises ``ValueError``.  It cannot be resized.

    Raises ``TypeError`` if ``size`` is not an int, ``ValueError`` if it is
    not positive or too large to map, ``OSError`` if the system refuses the
    memory (ENOMEM).
    """

    __slots__ = ("_address", "_huge")
    _address: int
    _huge: bool

    def __new__(cls, size: int, *, huge: bool = False) -> PageBuffer:
        _check_int("size", size)
        if size <= 0:
            raise ValueError(f"size must be positive, not {size}")
        unit = _HUGE_PAGE_SIZE if huge else PAGE_SIZE
        rounded = -(-size // unit) * unit
        if rounded > sys.maxsize:
            raise ValueError(f"size {size} is larger than any mapping can be")
        self = super().__new__(
            cls, -1, rounded,
            flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
        probe_view = ctypes.c_char.from_buffer(self)
        self._address = ctypes.addressof(probe_view)
        del probe_view  # ends the export: close() must stay possible
        self._huge = bool(huge)
        if huge and _MADV_HUGEPAGE is not None:
            with contextlib.suppress(OSError):  # THP not built in: plain pages, silently
                self.madvise(_MADV_HUGEPAGE)
        return self

    def __init__(self, size: int, *, huge: bool = False) -> None:
        pass  # everything happens in __new__, as mmap.mmap wants

    @property
    def address(self) -> int:
        """The start address of the mapping (a multiple of ``PAGE_SIZE``)."""
        if self.closed:
            raise ValueError("the PageBuffer is closed")
        return self._address

    @property
    def size(self) -> int:  # type: ignore[override]
        """The mapped size in bytes: the requested size rounded up."""
        return len(self)

    @property
    def huge(self) -> bool:
        """Whether huge pages were asked for."""
        return self._huge

    def resize(self, newsize: int) -> None:
        raise TypeError("a PageBuffer cannot be resized: its address would change")

    def discard(self, offset: int = 0, length: int | None = None) -> None:
        """Drop ``self[offset:offset+length]`` from this process.

        The range stays mapped and reads back as zeros; its memory goes back
        to the system (``MADV_DONTNEED`` on private anonymous memory).  Pages
        the kernel still holds for a pipe stay there, unchanged.  ``offset``
        and ``length`` must be multiples of ``PAGE_SIZE``; ``length=None``
        means to the end.  Raises ``ValueError`` for a bad range or a closed
        buffer, ``TypeError`` for non-int arguments.
        """
        start, stop = _page_range(self, offset, length, aligned=True)
        self._discard(start, stop)

    def _discard(self, start: int, stop: int) -> None:
        if stop <= start:
            return
        if _MADV_DONTNEED is not None:
            self.madvise(_MADV_DONTNEED, start, stop - start)
        else:  # no madvise here: same visible result
            self[start:stop] = bytes(stop - start)

    def __repr__(self) -> str:
        if self.closed:
            return "<PageBuffer closed>"
        return f"<PageBuffer size={len(self)} address={self._address:#x} huge={self._huge}>"


def _page_range(buf: Any, offset: int, length: int | None, aligned: bool) -> tuple[int, int]:
    """Check a byte range of ``buf`` (a PageBuffer, or a buffer's size in
    bytes); return ``(start, stop)``."""
    if type(buf) is int:
        size = buf
    elif buf.closed:
        raise ValueError("the PageBuffer is closed")
    else:
        size = len(buf)
    if type(offset) is not int or (length is not None and type(length) is not int):
        _check_int("offset", offset)
        if length is not None:
            _check_int("length", length)
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"offset and length must not be negative (offset={offset}, length={length})")
    stop = size if length is None else offset + length
    if offset > stop or stop > size:
        raise ValueError(f"range [{offset}, {max(offset, stop)}) is past the end of the buffer "
                         f"({size} bytes)")
    if aligned and (offset | stop) & _PAGE_MASK:  # size is whole pages: stop tells of length
        raise ValueError(f"offset and length must be multiples of the page size {PAGE_SIZE} "
                         f"(offset={offset}, length={length})")
    return offset, stop


# ---------------------------------------------------------------------------
# The raw call


def _check_flags(flags: int, allowed: int, where: str) -> None:
    _check_int("flags", flags)
    if flags & ~allowed:
        raise ValueError(f"{where} does not accept flags {flags:#x}; allowed bits: {allowed:#x}")


def _describe_fd(fd: int) -> str:
    try:
        st = os.fstat(fd)
    except OSError:
        return f"descriptor {fd} is not open"
    kinds = [(stat.S_ISREG, "a regular file"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISDIR, "a directory"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a pipe")]
    kind = next((name for test, name in kinds if test(st.st_mode)), "not a pipe")
    return f"descriptor {fd} is {kind}"


def _fd_error(err: int, fd: int, call: str) -> OSError:
    """An OSError for ``err`` whose message says what ``fd`` is."""
    if err in (errno.EBADF, errno.EINVAL):
        what = _describe_fd(fd)
        if what.endswith("not open"):
            return OSError(errno.EBADF, f"{call}: {what}")
        if not what.endswith("a pipe"):
            return OSError(err, f"{call}: {what}, not a pipe")
    return OSError(err, f"{call} on descriptor {fd}: {os.strerror(err)}")


def _pipe_direction(fd: int, call: str) -> int:
    """Return the access mode of ``fd`` (os.O_RDONLY, O_WRONLY or O_RDWR)."""
    if (type(fd) is not int or fd < 0) and _check_int("fd", fd) < 0:
        raise OSError(errno.EBADF, f"{call}: descriptor {fd} is not open")
    try:
        return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except OSError as exc:
        raise _fd_error(exc.errno or errno.EBADF, fd, call) from None
    except OverflowError:  # beyond a C int: no such descriptor can be open
        raise OSError(errno.EBADF, f"{call}: descriptor {fd} is not open") from None


def _call_vmsplice(fd: int, iov: Any, count: int, flags: int) -> int:
    """One vmsplice(2); return the count, or -errno."""
    n = _vmsplice_fn(fd, iov, count, flags)
    return n if n >= 0 else -ctypes.get_errno()


def vmsplice(fd: int, buffers: Sequence[Any], flags: int = 0) -> int:
    """Make one ``vmsplice(2)`` call over ``buffers``; return the byte count.

    ``fd`` is a pipe end.  On a write end the bytes of ``buffers`` (any
    bytes-like objects) are queued in the pipe; on a read end the pipe's
    bytes are copied into ``buffers``, which must then be writable.  Like
    ``os.writev``/``os.readv`` the count may be short.  ``flags`` is any of
    the ``SPLICE_F_*`` constants.  EINTR is retried (a signal handler's
    exception propagates, as with ``os.write``).

    Safety: on a write end the pipe holds references to the very pages of
    ``buffers``, not a copy, and this function keeps nothing alive.  Until
    the reader has taken the data, modifying or freeing those buffers
    changes or corrupts what it receives.  Use ``gift`` to hand pages over
    safely, or copy the data into memory you will not touch again.

    Raises ``TypeError`` for a non-int ``fd`` or a buffer of the wrong kind
    (read-only on a read end, non-contiguous); ``ValueError`` for unknown
    flag bits or more than ``IOV_MAX`` buffers; ``OSError`` with the
    kernel's errno otherwise (``BlockingIOError``, ``BrokenPipeError``...,
    EBADF or EINVAL with a message when ``fd`` is not a pipe, ENOSYS where
    libc or the kernel lacks ``vmsplice``).
    """
    mode = _pipe_direction(fd, "vmsplice")
    _check_flags(flags, _SPLICE_F_ALL, "vmsplice")
    if isinstance(buffers, (bytes, bytearray, memoryview, mmap.mmap, str)):
        raise TypeError(f"buffers must be a sequence of bytes-like objects, not one "
                        f"{type(buffers).__name__}: write [buffer]")
    buffers = list(buffers)
    if len(buffers) > IOV_MAX:
        raise ValueError(f"{len(buffers)} buffers exceed IOV_MAX ({IOV_MAX})")
    if _vmsplice_fn is None:
        raise OSError(errno.ENOSYS, "vmsplice is not available in this C library")
    pins = _Pins(buffers, writable=(mode == os.O_RDONLY), what="buffers[{}]")
    try:
        iov = b"".join(_pack_iovec(view.buf, view.len) for view in pins.views) or None
        while True:
            n = _call_vmsplice(fd, iov, len(pins.views), flags)
            if n >= 0:
                return n
            if -n != errno.EINTR:
                raise _fd_error(-n, fd, "vmsplice")
    finally:
        pins.release()


# ---------------------------------------------------------------------------
# Gift and move: the protocol of the RFC

# Cleared for the whole process the first time vmsplice answers ENOSYS or
# EPERM (gVisor, a seccomp profile): from then on gift and move copy.
_use_vmsplice = _vmsplice_fn is not None and _sigmask_fn is not None
_FALLBACK = (-errno.ENOSYS, -errno.EPERM)
_ONE = (1,)


def _wait(fd: int, event: int) -> None:
    """Sleep until ``fd`` is ready (or hung up); signal handlers may run."""
    poller = select.poll()
    poller.register(fd, event)
    poller.poll()


def _queued(fd: int) -> int:
    """Bytes waiting in pipe ``fd``."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


def _require_pipe(fd: int, call: str) -> None:
    try:
        is_pipe = stat.S_ISFIFO(os.fstat(fd).st_mode)
    except OSError as exc:
        raise _fd_error(exc.errno or errno.EBADF, fd, call) from None
    if not is_pipe:
        raise _fd_error(errno.EBADF, fd, call)


def gift(fd: int, buf: PageBuffer, offset: int = 0, length: int | None = None,
         *, flags: int = 0) -> int:
    """Give the pages ``buf[offset:offset+length]`` to the pipe write end ``fd``.

    Calls ``vmsplice`` with ``SPLICE_F_GIFT | SPLICE_F_MOVE`` (plus
    ``SPLICE_F_NONBLOCK`` and ``SPLICE_F_MORE`` from ``flags``) until every
    byte is queued, or, with ``SPLICE_F_NONBLOCK``, until the pipe is full.
    Each gifted page is dropped from this process (``buf.discard``) before
    this function returns, on every path out, exceptions and signals
    included: it then reads as zeros, and writing to it never changes what
    the reader receives.  Pages not gifted keep their contents.

    ``offset`` and ``length`` are multiples of ``PAGE_SIZE``; ``length=None``
    means to the end of ``buf``; ``length=0`` returns 0.

    Returns the number of bytes gifted, a multiple of ``PAGE_SIZE``: short
    only on a full non-blocking pipe, or when an error followed some
    progress (the error then comes on the next call, like ``write(2)``).

    Where ``vmsplice`` cannot be used (not Linux, ENOSYS, EPERM) the bytes are
    written with ``os.write`` and then discarded: the same result, a copy.

    Raises ``TypeError`` if ``buf`` is not a ``PageBuffer`` or an argument is
    not an int; ``ValueError`` for a closed buffer, a bad range, unknown
    flags, or a read end; ``BlockingIOError`` if a non-blocking pipe is full
    before any page is gifted; ``BrokenPipeError`` when no reader is left;
    ``OSError`` (EBADF, EINVAL) when ``fd`` is not a pipe.  A signal
    handler's exception (``KeyboardInterrupt``) propagates with the bytes
    gifted so far in its ``transferred`` attribute.
    """
    if not isinstance(buf, PageBuffer):
        raise TypeError(f"gift needs a PageBuffer (private anonymous memory), not "
                        f"{type(buf).__name__}: pages of other objects cannot be dropped safely")
    start, stop = _page_range(buf, offset, length, aligned=True)
    if type(flags) is not int or flags & ~_SPLICE_F_ALL:
        _check_flags(flags, _SPLICE_F_ALL, "gift")
    return _transfer(True, fd, buf, buf._address, start, stop,
                     flags | SPLICE_F_GIFT | SPLICE_F_MOVE)


def move(fd: int, buf: Any, offset: int = 0, length: int | None = None,
         *, flags: int = 0) -> int:
    """Receive from the pipe read end ``fd`` into ``buf[offset:offset+length]``.

    Calls ``vmsplice`` with ``SPLICE_F_MOVE`` (plus ``SPLICE_F_NONBLOCK``
    from ``flags``) until ``length`` bytes have arrived or every writer has
    closed the pipe.  ``buf`` is a ``PageBuffer`` or any writable, contiguous
    bytes-like object; a page-aligned range of a ``PageBuffer`` is what lets a
    kernel that moves pages move them.  Mainline Linux copies (see
    ``probe().move``).  ``length=None`` means to the end of ``buf``.

    Returns the bytes received: ``length``, or fewer at end of file (0 at
    end of file with nothing read), or on a non-blocking pipe that ran dry
    after some bytes, or when an error followed some progress (the error
    then comes on the next call).

    Where ``vmsplice`` cannot be used it reads with ``os.readv``.

    Raises ``TypeError`` for a read-only or non-bytes-like ``buf`` or a
    non-int argument; ``ValueError`` for a closed buffer, a bad range, flags
    other than ``SPLICE_F_MOVE | SPLICE_F_NONBLOCK``, or a write end;
    ``BlockingIOError`` if a non-blocking pipe is empty before any byte;
    ``OSError`` (EBADF, EINVAL) when ``fd`` is not a pipe.  A signal
    handler's exception propagates with the bytes received so far in its
    ``transferred`` attribute.
    """
    if type(flags) is not int or flags & ~_MOVE_FLAGS:
        _check_flags(flags, _MOVE_FLAGS, "move")
    pins = None
    if isinstance(buf, PageBuffer):
        start, stop = _page_range(buf, offset, length, aligned=False)
        address = buf._address
    else:
        pins = _Pins([buf], writable=True, what="move's buffer")
        try:
            start, stop = _page_range(pins.views[0].len, offset, length, aligned=False)
        except BaseException:
            pins.release()
            raise
        address = pins.views[0].buf
    try:
        return _transfer(False, fd, buf, address, start, stop, flags | SPLICE_F_MOVE)
    finally:
        if pins is not None:
            pins.release()


def _transfer(gifting: bool, fd: int, buf: Any, address: int, start: int, stop: int,
              flags: int) -> int:
    """Move bytes in non-blocking steps until ``stop``; between steps wait in
    poll() unless ``flags`` has SPLICE_F_NONBLOCK.

    A signal handler may raise (KeyboardInterrupt) at any point between
    bytecodes.  So every step's count lands in ``counted`` from C or with
    signals blocked, and a gift's discard runs with signals blocked too: a
    handler's exception never separates a vmsplice call from its discard,
    and the except clause can always tell how much was transferred."""
    global _use_vmsplice
    # The direction first, before any vmsplice: on a read end vmsplice would
    # fill the gift's pages from the pipe; on a write end it would send the
    # move's buffer.  (Inline, not _pipe_direction(): this is the hot path.)
    try:
        mode = _fcntl(fd, _F_GETFL) & _O_ACCMODE if type(fd) is int and fd >= 0 else -1
    except (OSError, OverflowError):
        mode = -1
    if mode < 0:
        mode = _pipe_direction(fd, "gift" if gifting else "move")  # raises, saying why
    if gifting and mode == os.O_RDONLY:
        raise ValueError(f"gift needs the write end of a pipe; descriptor {fd} is a read end")
    if not gifting and mode != os.O_RDONLY:
        if mode == os.O_RDWR:
            _require_pipe(fd, "move")
        raise ValueError(f"move needs the read end of a pipe; descriptor {fd} is open for "
                         f"writing, so vmsplice would send the buffer instead")
    if start == stop:
        return 0
    # Gifted pages before ``kept`` are discarded; [kept, end) still await it.
    # A huge-page buffer is discarded a whole huge page at a time until the
    # call ends: dropping part of one splits it, and refilling the buffer
    # would then fault 512 small pages instead of one huge page.
    kept = end = start
    unit = _HUGE_PAGE_SIZE if gifting and buf._huge else PAGE_SIZE
    step_flags = flags | SPLICE_F_NONBLOCK
    pin = memoryview(buf)  # close() must fail while the kernel may use the pages
    counted: list = []
    done = 0
    try:
        while True:
            pos = start + done
            if _use_vmsplice:
                iov = _pack_iovec(address + pos, stop - pos)
                if gifting:
                    old = _Sigset()  # _block_signals(), inlined: this is the hot path
                    _sigmask_fn(_SIG_BLOCK, _ALL_SIGNALS_REF, old)
                    try:
                        n = _vmsplice_fn(fd, iov, 1, step_flags)
                        if n > 0:  # iter_to_pipe() queues whole pages of an aligned range
                            counted.append(n)
                            end = pos + n
                            edge = end if end == stop else end - (address + end) % unit
                            if edge > kept:
                                buf.madvise(_MADV_DONTNEED, kept, edge - kept)
                                kept = edge
                    finally:
                        _sigmask_fn(_SIG_SETMASK, old, None)
                else:
                    # Nothing follows the call but counting, so signals stay
                    # open (that saves two calls): map() stores the result from
                    # C, where no handler runs.
                    counted.extend(map(_vmsplice_fn, (fd,), (iov,), _ONE, (step_flags,)))
                    n = counted[-1]
                    if n < 0:
                        del counted[-1]
                if n < 0:
                    n = -ctypes.get_errno()
                    if n in _FALLBACK:
                        _use_vmsplice = False
                        continue
            else:
                n = (_gift_copy if gifting else _move_copy)(fd, buf, pin, pos, stop, counted)
            if n > 0:
                done += n
                if start + done >= stop:
                    break
            elif n == 0:  # move: end of file, no writer left and nothing queued
                break
            elif n == -errno.EAGAIN:
                if flags & SPLICE_F_NONBLOCK:
                    if done:
                        break
                    raise BlockingIOError(errno.EAGAIN, f"pipe {fd} is " + ("full" if gifting else "empty"))
                _wait(fd, select.POLLOUT if gifting else select.POLLIN)
            elif n != -errno.EINTR:
                if done:
                    break
                raise _fd_error(-n, fd, "gift" if gifting else "move")
    except BaseException as exc:
        exc.transferred = sum(counted)  # type: ignore[attr-defined]
        raise
    finally:
        # A short count, or an exception while waiting in poll() (huge pages
        # only: 4 KiB steps leave nothing pending).  From Python 3.11 no
        # signal handler can run before this madvise(); on 3.9 and 3.10 a
        # second raising handler in these few bytecodes could still skip it.
        if end > kept:
            buf.madvise(_MADV_DONTNEED, kept, end - kept)
        pin.release()
    return done


# The copy fallback, for where vmsplice is missing or refused.  Each step is
# non-blocking without touching the descriptor's flags: it asks the pipe
# how much it can take or give now.

def _gift_copy(fd: int, buf: PageBuffer, pin: memoryview, start: int, stop: int,
               counted: list) -> int:
    """Write whole pages that fit now, then discard them; count or -errno."""
    _require_pipe(fd, "gift")
    try:
        capacity = fcntl.fcntl(fd, _F_GETPIPE_SZ)
    except OSError:
        capacity = 16 * PAGE_SIZE  # not Linux: the smallest pipe anyone has
    room = min(stop - start, (capacity - _queued(fd)) // PAGE_SIZE * PAGE_SIZE)
    if room <= 0:
        return -errno.EAGAIN
    old = _block_signals()
    try:
        n = os.write(fd, pin[start:start + room])
        counted.append(n)
        # A short write leaves a page half sent: keep it until the rest goes.
        buf._discard(start, start + n // PAGE_SIZE * PAGE_SIZE)
    except OSError as exc:
        n = -(exc.errno or errno.EIO)
    finally:
        _restore_signals(old)
    return n


def _move_copy(fd: int, buf: Any, pin: memoryview, start: int, stop: int,
               counted: list) -> int:
    """Read what is queued now; the count, 0 at end of file, or -errno."""
    _require_pipe(fd, "move")
    queued = _queued(fd)
    if queued == 0:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        events = poller.poll(0)
        # POLLHUP with nothing queued: every writer is gone, end of file.
        return 0 if events and not events[0][1] & select.POLLIN else -errno.EAGAIN
    flat = pin.cast("B")
    old = _block_signals()
    try:
        n = os.readv(fd, [flat[start:start + min(queued, stop - start)]])
        counted.append(n)
    except OSError as exc:
        n = -(exc.errno or errno.EIO)
    finally:
        _restore_signals(old)
        flat.release()
    return n


def pipe(size: int | None = None) -> tuple[int, int]:
    """Return ``(read_fd, write_fd)`` of a new close-on-exec pipe.

    Its capacity is ``size`` bytes (the kernel rounds up to a power of two
    pages), or with ``size=None`` the largest the system allows:
    ``/proc/sys/fs/pipe-max-size``, or less where a per-user limit refuses
    it.  A bigger pipe means fewer system calls per byte.  Raises
    ``ValueError`` for a non-positive size, ``OSError`` when the kernel
    refuses ``size`` (EPERM above pipe-max-size, even as root).
    """
    if size is not None:
        _check_int("size", size)
        if not 0 < size < 2**31:  # fcntl() would silently truncate a larger one
            raise ValueError(f"size must be positive and below 2 GiB, not {size}")
    r, w = os.pipe()  # close-on-exec (non-inheritable) since Python 3.4
    try:
        if size is not None:
            fcntl.fcntl(w, _F_SETPIPE_SZ, size)
        elif _LINUX:
            want = _pipe_max_size() or 0
            while want > PAGE_SIZE:
                try:
                    fcntl.fcntl(w, _F_SETPIPE_SZ, want)
                    break
                except OSError:
                    want //= 2
    except BaseException:
        os.close(r)
        os.close(w)
        raise
    return r, w


def _pipe_max_size() -> int | None:
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------
# Detection: observe, never infer from a version number.


@dataclasses.dataclass(frozen=True)
class Support:
    """What the running kernel does, as ``probe()`` observed it."""

    vmsplice: bool
    """The call works here."""
    zero_copy_gift: bool | None
    """Queued pages are the writer's own (referenced, not copied); None: not checked."""
    move: bool | None
    """The reader got the very page gifted (True), a copy (False), or could not tell (None)."""
    huge_pages: str
    """Transparent huge pages: always, madvise, never or unavailable."""
    pipe_max_size: int | None
    """/proc/sys/fs/pipe-max-size, or None where unreadable."""
    kernel: str
    """The kernel release string."""
    reason: str
    """One plain sentence per finding."""

    def __str__(self) -> str:
        def word(value: bool | None) -> str:
            return {True: "yes", False: "no", None: "unknown"}[value]
        return "\n".join([
            f"kernel          {self.kernel}",
            f"vmsplice        {word(self.vmsplice)}",
            f"zero-copy gift  {word(self.zero_copy_gift)}",
            f"page move       {word(self.move)}",
            f"huge pages      {self.huge_pages}",
            f"pipe-max-size   {self.pipe_max_size if self.pipe_max_size else 'unknown'}",
            "",
            self.reason,
        ])


_probe_lock = threading.Lock()
_probe_cache: Support | None = None


def probe(refresh: bool = False) -> Support:
    """Observe what this kernel does with vmsplice; return a ``Support``.

    It queues a page of its own and changes it (zero-copy gift), gifts a page
    and compares page frame numbers in ``/proc/self/pagemap`` before and after
    the reader takes it (move; those are hidden without CAP_SYS_ADMIN), and
    reads the THP mode, pipe-max-size and kernel release.  It never infers
    from a version number and leaves no descriptor or mapping behind.  The
    result is cached; ``refresh=True`` measures again.  It raises nothing
    for what the system lacks: that is what ``reason`` is for.
    """
    global _probe_cache
    with _probe_lock:
        if _probe_cache is None or refresh:
            _probe_cache = _observe()
        return _probe_cache


def _observe() -> Support:
    notes = []
    works, zero_copy, moved = False, None, None
    if _vmsplice_fn is None:
        notes.append("The C library has no vmsplice function, so gift and move copy.")
    else:
        works, zero_copy, moved = _observe_calls(notes)
    mode = "unavailable"
    try:
        with open(_THP + "enabled") as f:
            text = f.read()
        mode = text[text.index("[") + 1:text.index("]")]
        notes.append(f"Transparent huge pages are in mode {mode!r}.")
    except (OSError, ValueError):
        notes.append("Transparent huge pages are unavailable.")
    max_size = _pipe_max_size()
    if max_size:
        notes.append(f"Pipes can hold up to {max_size} bytes (pipe-max-size).")
    return Support(works, zero_copy, moved, mode, max_size, os.uname().release, " ".join(notes))


def _observe_calls(notes: list) -> tuple[bool, bool | None, bool | None]:
    r, w = os.pipe()
    src = PageBuffer(PAGE_SIZE)
    dst = PageBuffer(PAGE_SIZE)
    try:
        src[:8] = b"original"
        n = _call_vmsplice(w, _pack_iovec(src._address, PAGE_SIZE), 1, SPLICE_F_NONBLOCK)
        if n < 0:
            err = errno.errorcode.get(-n, str(-n))
            why = {errno.ENOSYS: "the kernel or a sandbox does not implement it",
                   errno.EPERM: "a security policy (seccomp) refuses it"}.get(-n, os.strerror(-n))
            notes.append(f"vmsplice fails with {err}: {why}; gift and move copy.")
            return False, None, None
        notes.append("vmsplice works.")
        src[:8] = b"changed!"  # the page is queued and not discarded: does the pipe see it?
        zero_copy = os.read(r, 8) == b"changed!"
        notes.append("Queued pages are the writer's own: a write after vmsplice changed the "
                     "queued data, so gift must discard them." if zero_copy else
                     "vmsplice copied the pages when it queued them.")
        os.read(r, PAGE_SIZE)
        return True, zero_copy, _observe_move(r, w, src, dst, notes)
    finally:
        src.close()
        dst.close()
        os.close(r)
        os.close(w)


def _frame(buf: PageBuffer) -> int:
    """The page frame number behind the first page of ``buf`` (0: hidden)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(buf._address // PAGE_SIZE * 8)
        entry = struct.unpack("<Q", f.read(8))[0]
    return entry & ((1 << 55) - 1) if entry >> 63 else 0


def _observe_move(r: int, w: int, src: PageBuffer, dst: PageBuffer, notes: list) -> bool | None:
    src[:8] = b"gifted.."
    dst[:8] = b"resident"  # fault the destination in: a move must replace its frame
    try:
        gifted, before = _frame(src), _frame(dst)
    except OSError as exc:
        notes.append(f"Page moves could not be checked: /proc/self/pagemap is unreadable ({exc.strerror}).")
        return None
    if not gifted or not before:
        notes.append("Page moves could not be checked: page frame numbers are hidden "
                     "without CAP_SYS_ADMIN.")
        return None
    if gift(w, src) != PAGE_SIZE or move(r, dst) != PAGE_SIZE or dst[:8] != b"gifted..":
        notes.append("Page moves could not be checked: the gifted page did not arrive.")
        return None
    after = _frame(dst)
    if after == gifted:
        notes.append("The reader received the gifted page itself: vmsplice moves pages here.")
        return True
    kept = "kept its frame" if after == before else f"got frame {after:#x}"
    notes.append(f"The reader got a copy: the destination page {kept}, and the gifted frame {gifted:#x} "
                 "never appeared there (vmsplice copies into user memory, as mainline Linux does).")
    return False


# ===========================================================================
# The command line: python3 -m vmsplicemove probe | demo | bench
# Nothing above this line depends on anything below it.

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _parse_size(text: str) -> int:
    """'256M', '1GiB', '4096' -> bytes (binary units)."""
    s = text.strip().upper().replace("IB", "").rstrip("B")
    unit = s[-1:] if s[-1:] in _UNITS else ""
    try:
        value = int(float(s[:len(s) - len(unit)]) * _UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (try 64M or 1G)") from None
    if value < PAGE_SIZE:
        raise argparse.ArgumentTypeError(f"size {text!r} is below one page ({PAGE_SIZE} bytes)")
    return -(-value // PAGE_SIZE) * PAGE_SIZE


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _pattern(view: memoryview, pos: int, seed: int) -> None:
    """Fill ``view`` with the bytes that belong at offset ``pos`` of a test
    region: pseudo-random, with each page's first word its page number, so a
    lost, duplicated or reordered page shows.  ``pos`` and ``len(view)`` are
    multiples of 8."""
    block = _pattern_block(seed)
    n, at = len(view), pos % len(block)
    done = 0
    while done < n:
        take = min(n - done, len(block) - at)
        view[done:done + take] = block[at:at + take]
        done, at = done + take, 0
    words = view.cast("Q")
    for page in range(-(-pos // PAGE_SIZE), -(-(pos + n) // PAGE_SIZE)):
        words[(page * PAGE_SIZE - pos) // 8] = page ^ (seed << 40)
    words.release()


_blocks: dict = {}


def _pattern_block(seed: int) -> bytes:
    if seed not in _blocks:
        import random
        _blocks[seed] = random.Random(seed).randbytes(1 << 20)
    return _blocks[seed]


def _fill(buf: Any, seed: int) -> None:
    """Fill all of ``buf`` with ``_pattern``'s bytes."""
    mv = memoryview(buf)
    for pos in range(0, len(mv), 1 << 20):
        _pattern(mv[pos:pos + (1 << 20)], pos, seed)
    mv.release()


def _mismatch(buf: Any, seed: int, length: int) -> int | None:
    """Offset of the first byte of ``buf[:length]`` that ``_fill`` would not
    have written, or None."""
    expected = memoryview(bytearray(1 << 20))
    got = memoryview(buf)
    try:
        for pos in range(0, length, 1 << 20):
            end = min(pos + (1 << 20), length)
            want = expected[:end - pos]
            _pattern(want, pos, seed)
            if got[pos:end].tobytes() != want.tobytes():  # bytes: memcmp; views: item by item
                return pos + next(i for i in range(end - pos) if got[pos + i] != want[i])
    finally:
        got.release()
    return None


def _resident(buf: PageBuffer) -> int:
    """Bytes of ``buf`` resident in memory now (mincore(2))."""
    pages = len(buf) // PAGE_SIZE
    vec = (ctypes.c_ubyte * pages)()
    if _libc.mincore(ctypes.c_void_p(buf.address), ctypes.c_size_t(len(buf)), vec) != 0:
        return -1
    return sum(1 for v in vec if v & 1) * PAGE_SIZE


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    try:  # Linux 4.0+: "5" resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _populate(buf: PageBuffer) -> None:
    """Fault every page in now, in one call where the kernel can."""
    try:
        buf.madvise(_MADV_POPULATE_WRITE)
    except OSError:  # before Linux 5.14: touch each page
        for pos in range(0, len(buf), PAGE_SIZE):
            buf[pos] = 0


def _in_child(fn: Any, *args: Any, close: Sequence[int] = ()) -> int:
    """Fork; run ``fn(*args)`` in the child, which exits 0, or 1 on error.
    The child first closes ``close``, the parent's pipe ends: holding them,
    it would never see EPIPE or EOF if the parent died, and would hang."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        for fd in close:
            os.close(fd)
        fn(*args)
        code = 0
    except BrokenPipeError:
        pass  # the parent is gone or gave up: nobody to tell
    except BaseException:
        import traceback
        traceback.print_exc()
    finally:
        os._exit(code)


@contextlib.contextmanager
def _writer_child(fn: Any, *args: Any) -> Any:
    """Fork ``fn(write_fd, status_fd, *args)`` as the writer; yield the
    parent's ``(read_fd, status_fd)``.  On the way out the pipes close and the
    child is reaped; if the parent is failing (an exception, Ctrl-C), the
    child is killed first and its status not judged."""
    r, w = pipe()
    sr, sw = os.pipe()
    pid = _in_child(fn, w, sw, *args, close=(r, sr))
    os.close(w)
    os.close(sw)
    failing = True
    try:
        yield r, sr
        failing = False
    finally:
        os.close(r)
        os.close(sr)
        if failing:
            os.kill(pid, 9)  # SIGKILL: its work is no longer wanted
        status = os.waitpid(pid, 0)[1]
    if status:
        raise RuntimeError(f"child process {pid} failed (wait status {status:#x})")


def _write_all(fd: int, buf: Any, length: int | None = None) -> int:
    mv = memoryview(buf)
    stop = len(mv) if length is None else length
    done = 0
    while done < stop:
        done += os.write(fd, mv[done:stop])
    mv.release()
    return done


def _read_all(fd: int, buf: Any, length: int) -> int:
    mv = memoryview(buf)
    done = 0
    while done < length:
        n = os.readv(fd, [mv[done:length]])
        if n == 0:
            break
        done += n
    mv.release()
    return done


class _Progress:
    """A one-line progress bar on a terminal's stderr; silent elsewhere."""

    def __init__(self, label: str, total: int, enabled: bool) -> None:
        self.label, self.total = label, total
        self.enabled = enabled and sys.stderr.isatty()

    def update(self, done: int) -> None:
        if self.enabled:
            cells = 30 * done // self.total
            sys.stderr.write(f"\r{self.label:<14} [{'#' * cells:<30}] {100 * done // self.total:3d}%")
            sys.stderr.flush()

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:  # clear the line
            sys.stderr.write("\r" + " " * 60 + "\r")
            sys.stderr.flush()


# -- migrate: a region filled in a child, sent to the parent ----------------

# method: (the writer's region in huge pages, the reader's, the reader's
# memory faulted in before the clock starts)
MIGRATE_METHODS = {
    "gift": (True, True, False),          # the module's best settings
    "gift-4k": (False, False, False),     # the same without huge pages
    "plain-fresh": (True, False, False),  # os.write, os.readv into new memory
    "plain-prefaulted": (True, False, True),
}


def _migrate_writer(w: int, status: int, size: int, method: str, seed: int) -> None:
    src = PageBuffer(size, huge=MIGRATE_METHODS[method][0])
    _fill(src, seed)
    os.write(status, b"R")
    sent = gift(w, src) if method.startswith("gift") else _write_all(w, src)
    os.close(w)
    report = {"sent": sent, "region_resident": _resident(src), "rss": _status_kib("VmRSS") << 10}
    os.write(status, json.dumps(report).encode())


def _migrate_once(size: int, method: str, seed: int, label: str = "") -> dict:
    """Send ``size`` bytes child to parent by ``method``; time and verify."""
    _, huge, prefault = MIGRATE_METHODS[method]
    with _writer_child(_migrate_writer, size, method, seed) as (r, sr), \
            _Progress(label, size, bool(label)) as bar:
        if prefault:  # mapped after the fork: pages shared with the child would be copied on write
            dst = PageBuffer(size, huge=huge)
            _populate(dst)
        _reset_peak()
        if os.read(sr, 1) != b"R":
            raise RuntimeError("the writer process failed before sending")
        start = time.perf_counter()
        if not prefault:  # new memory: its page faults are part of the transfer
            dst = PageBuffer(size, huge=huge)
        got, step = 0, 16 << 20
        while got < size:
            want = min(step, size - got)
            n = move(r, dst, got, want) if method.startswith("gift") else \
                _read_all(r, memoryview(dst)[got:], want)
            got += n
            bar.update(got)
            if n < want:
                break
        seconds = time.perf_counter() - start
        peak = _status_kib("VmHWM") << 10
        report = json.loads(os.read(sr, 4096) or b"{}")
    bad = _mismatch(dst, seed, size) if got == size else got
    dst.close()
    if bad is not None:
        raise RuntimeError(f"{method}: data differs at byte {bad} of {size}")
    return {"seconds": seconds, "writer_region_resident": report.get("region_resident"),
            "writer_rss": report.get("rss"), "parent_peak": peak}


# -- the commands --------------------------------------------------------------


def _cmd_probe(args: argparse.Namespace) -> int:
    support = probe()
    print(json.dumps(dataclasses.asdict(support), indent=2) if args.json else support)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    size = args.size
    support = probe()
    print(f"vmsplicemove demo: {_human(size)} from a child process to its parent, "
          f"kernel {support.kernel}")
    runs = {}
    for method, label in (("gift", "gift + move"), ("plain-fresh", "write + readv")):
        runs[method] = _migrate_once(size, method, seed=7, label=label)
    gift_run, plain_run = runs["gift"], runs["plain-fresh"]
    how = {True: "moved (the reader got the writer's pages)", False: "copied by the reader "
           "(the kernel does not move pages into user memory)", None: "unknown (see probe)"}
    if not support.vmsplice:
        how[support.move] = "copied: vmsplice is not usable here, gift and move used os.write/readv"
    print(f"every byte verified in both runs ({size} bytes each)")
    for method, label in (("gift", "gift + move"), ("plain-fresh", "write + readv")):
        run = runs[method]
        print(f"  {label:<14} {run['seconds']:8.3f} s  {size / run['seconds'] / 2**30:6.2f} GiB/s"
              f"   writer's region still resident: {_human(run['writer_region_resident'])}")
    print(f"gift + move is {plain_run['seconds'] / gift_run['seconds']:.2f}x plain write + readv")
    print(f"pages were {how[support.move]}")
    print(f"writer memory freed along the way: "
          f"{_human(size - gift_run['writer_region_resident'])} of {_human(size)} "
          f"(gift drops each page as the pipe takes it)")
    return 0


def _main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m vmsplicemove",
                                     description="Move pages between processes with vmsplice(2).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("probe", help="report what this kernel does with vmsplice")
    p.add_argument("--json", action="store_true", help="print the fields as one JSON object")
    p.set_defaults(run=_cmd_probe)
    p = sub.add_parser("demo", help="gift a region from a child to its parent and verify it")
    p.add_argument("--size", type=_parse_size, default=256 << 20,
                   help="bytes to send, e.g. 64M or 1G (default 256M)")
    p.set_defaults(run=_cmd_demo)
    _add_bench_parser(sub)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except BrokenPipeError as exc:
        if not _stdout_closed():
            print(f"vmsplicemove {args.command}: {exc}", file=sys.stderr)
            return 1
        # Our reader left early (`| head`): quiet, and no second error at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a process ended by SIGPIPE
    except (RuntimeError, OSError) as exc:
        print(f"vmsplicemove {args.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"vmsplicemove {args.command}: interrupted", file=sys.stderr)
        return 130


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader has gone (POLLERR)."""
    poller = select.poll()
    poller.register(sys.stdout.fileno(), select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _add_bench_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="measure gift/move against plain copies",
                       description="Time each scenario's methods interleaved, median of --runs "
                                   "after a warm-up, data verified after every run.")
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO", default=list(_SCENARIOS),
                   help=f"any of {', '.join(_SCENARIOS)} (default: all)")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object")
    p.add_argument("--runs", type=_positive_int, default=5, help="timed runs per method (default 5)")
    p.add_argument("--size", type=_parse_size, default=256 << 20,
                   help="migrate region; stream sends 4x this, calls moves it a page at a time "
                        "(default 256M)")
    p.add_argument("--chunk", type=_parse_size, default=1 << 20,
                   help="stream's reused buffer (default 1M)")
    p.set_defaults(run=_cmd_bench)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value


# -- stream: one reused buffer refilled and sent, chunk after chunk -----------

STREAM_METHODS = ("gift", "plain")


def _stream_source(chunk: int, seed: int) -> bytes:
    source = bytearray(chunk)
    _fill(source, seed)
    return bytes(source)


def _stream_writer(w: int, status: int, chunk: int, count: int, method: str, seed: int) -> None:
    source = _stream_source(chunk, seed)
    # Each gift leaves the buffer without pages and the refill faults them
    # back in: huge pages make that one fault per 2 MiB, where they fit.
    buf = PageBuffer(chunk, huge=method == "gift" and chunk % _HUGE_PAGE_SIZE == 0)
    buf[:] = source
    os.write(status, b"R")
    for i in range(count):
        buf[:] = source
        struct.pack_into("<Q", buf, 0, i)
        sent = gift(w, buf) if method == "gift" else _write_all(w, buf)
        if sent != chunk:
            raise RuntimeError(f"chunk {i}: sent {sent} of {chunk} bytes")
    os.close(w)


def _stream_once(chunk: int, count: int, method: str, seed: int) -> dict:
    source = _stream_source(chunk, seed)[8:]
    with PageBuffer(chunk) as dst, \
            _writer_child(_stream_writer, chunk, count, method, seed) as (r, sr):
        if os.read(sr, 1) != b"R":
            raise RuntimeError("the writer process failed before sending")
        start = time.perf_counter()
        for i in range(count):
            got = move(r, dst) if method == "gift" else _read_all(r, dst, chunk)
            if got != chunk or struct.unpack_from("<Q", dst)[0] != i or dst[8:] != source:
                raise RuntimeError(f"stream {method}: chunk {i} arrived wrong")
        seconds = time.perf_counter() - start
    return {"seconds": seconds}


# -- calls: one-page round trips in one process -------------------------------

CALLS_METHODS = ("public", "bare-ctypes")


def _calls_once(count: int, method: str) -> dict:
    r, w = pipe()
    src, dst = PageBuffer(PAGE_SIZE), PageBuffer(PAGE_SIZE)
    try:
        if method == "public":
            start = time.perf_counter()
            for i in range(count):
                src[0] = i & 0xFF
                gift(w, src)
                move(r, dst)
                if dst[0] != i & 0xFF:
                    break
        else:
            # The least a correct gift and move can do from Python: the same
            # three system calls through ctypes, with nothing checked.
            libc = ctypes.CDLL(None, use_errno=True)
            vms = libc.vmsplice
            vms.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
            vms.restype = ctypes.c_ssize_t
            madvise = libc.madvise
            madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            madvise.restype = ctypes.c_int
            src_iov, dst_iov = _pack_iovec(src.address, PAGE_SIZE), _pack_iovec(dst.address, PAGE_SIZE)
            address, dontneed, gift_flags = src.address, _MADV_DONTNEED, SPLICE_F_GIFT | SPLICE_F_MOVE
            start = time.perf_counter()
            for i in range(count):
                src[0] = i & 0xFF
                vms(w, src_iov, 1, gift_flags)
                madvise(address, PAGE_SIZE, dontneed)
                vms(r, dst_iov, 1, SPLICE_F_MOVE)
                if dst[0] != i & 0xFF:
                    break
        seconds = time.perf_counter() - start
        if dst[0] != (count - 1) & 0xFF:
            raise RuntimeError(f"calls {method}: the last page arrived wrong")
    finally:
        src.close()
        dst.close()
        os.close(r)
        os.close(w)
    return {"seconds": seconds}


# -- the harness ----------------------------------------------------------------

_SCENARIOS = {
    "migrate": tuple(MIGRATE_METHODS),
    "stream": STREAM_METHODS,
    "calls": CALLS_METHODS,
}


def _copy_bandwidth(size: int) -> float:
    """The machine's memcpy bandwidth in bytes/s, between faulted buffers."""
    a, b = bytearray(b"\1") * size, bytearray(size)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        b[:] = a
        best = min(best, time.perf_counter() - start)
    return size / best


def _median(values: list) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _bench_scenario(name: str, args: argparse.Namespace) -> dict:
    size, chunk = args.size, args.chunk
    if name == "migrate":
        def once(method: str, seed: int) -> dict:
            return _migrate_once(size, method, seed)
        volume = size
    elif name == "stream":
        count = max(1, 4 * size // chunk)
        volume = count * chunk

        def once(method: str, seed: int) -> dict:
            return _stream_once(chunk, count, method, seed)
    else:
        count = size // PAGE_SIZE
        volume = count * PAGE_SIZE

        def once(method: str, seed: int) -> dict:
            return _calls_once(count, method)
    methods = _SCENARIOS[name]
    runs: dict = {m: [] for m in methods}
    for run in range(args.runs + 1):  # run 0 is the warm-up
        for method in methods:  # interleaved: the machine's noise hits them all
            result = once(method, seed=run * 16 + methods.index(method) + 1)
            if run:
                runs[method].append(result)
    table = {}
    for method in methods:
        seconds = [r["seconds"] for r in runs[method]]
        med = _median(seconds)
        entry = {"median_s": med, "runs_s": seconds, "gib_s": volume / med / 2**30}
        if name == "calls":
            entry["round_trips_per_s"] = count / med
        for key in ("writer_region_resident", "writer_rss", "parent_peak"):
            if key in runs[method][-1]:
                entry[key] = max(r[key] for r in runs[method])
        table[method] = entry
    result = {"bytes": volume, "methods": table, "ratios": _ratios(name, table, size)}
    if name == "stream":
        result["bound"] = _refault_cost(chunk)
    return result


def _refault_cost(chunk: int) -> dict:
    """What gifting a reused buffer trades: the refill of a gifted chunk
    faults every page back in, zeroed; a plain write costs one more copy."""
    huge = chunk % _HUGE_PAGE_SIZE == 0
    source = _stream_source(chunk, 1)
    refill, copy = [], []
    with PageBuffer(chunk, huge=huge) as buf:
        buf[:] = source
        for _ in range(21):
            buf.discard()
            start = time.perf_counter()
            buf[:] = source  # into dropped pages: fault, zero, copy
            middle = time.perf_counter()
            buf[:] = source  # into present pages: copy
            refill.append(middle - start)
            copy.append(time.perf_counter() - middle)
    return {"chunk": chunk, "huge_pages": huge, "copy_us": _median(copy) * 1e6,
            "faults_us": (_median(refill) - _median(copy)) * 1e6}


def _ratios(name: str, table: dict, size: int) -> dict:
    """Same-run speed ratios, each with the project's target."""
    def ratio(a: str, b: str, target: float) -> dict:
        value = table[b]["median_s"] / table[a]["median_s"]
        return {"value": value, "target": target, "met": value >= target}
    if name == "migrate":
        resident = table["gift"]["writer_region_resident"] / size
        return {"gift / plain-fresh": ratio("gift", "plain-fresh", 3.0),
                "gift / plain-prefaulted": ratio("gift", "plain-prefaulted", 1.3),
                "writer resident at end / region": {"value": resident, "target": 0.05,
                                                    "met": resident <= 0.05, "at_most": True}}
    if name == "stream":
        return {"gift / plain": ratio("gift", "plain", 1.3)}
    return {"public / bare-ctypes": ratio("public", "bare-ctypes", 0.6)}


def _cmd_bench(args: argparse.Namespace) -> int:
    unknown = [s for s in args.scenarios if s not in _SCENARIOS]
    if unknown:
        print(f"vmsplicemove bench: unknown scenario {unknown[0]!r}; "
              f"choose from {', '.join(_SCENARIOS)}", file=sys.stderr)
        return 2
    support = probe()
    r, w = pipe()
    pipe_size = fcntl.fcntl(w, _F_GETPIPE_SZ)
    os.close(r)
    os.close(w)
    result = {
        "kernel": support.kernel, "huge_pages": support.huge_pages, "pipe_size": pipe_size,
        "vmsplice": support.vmsplice, "move": support.move, "cpus": os.cpu_count(),
        "python": sys.version.split()[0], "runs": args.runs,
        "copy_bandwidth_gib_s": _copy_bandwidth(64 << 20) / 2**30,
        "scenarios": {},
    }
    if not args.json:
        print(f"vmsplicemove bench: kernel {support.kernel}, THP {support.huge_pages}, "
              f"pipe {_human(pipe_size)}, {os.cpu_count()} CPUs, Python {result['python']}")
        print(f"median of {args.runs} runs after a warm-up, methods interleaved, "
              f"data verified after every run; memcpy reference "
              f"{result['copy_bandwidth_gib_s']:.2f} GiB/s")
    for name in dict.fromkeys(args.scenarios):
        scenario = _bench_scenario(name, args)
        result["scenarios"][name] = scenario
        if not args.json:
            _print_scenario(name, scenario)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _print_scenario(name: str, scenario: dict) -> None:
    print(f"\n{name}: {_human(scenario['bytes'])}")
    for method, entry in scenario["methods"].items():
        line = f"  {method:<18} {entry['median_s']:9.4f} s  {entry['gib_s']:7.2f} GiB/s"
        if "round_trips_per_s" in entry:
            line += f"  {entry['round_trips_per_s']:10,.0f} round trips/s"
        if "writer_region_resident" in entry:
            line += (f"  writer region resident {_human(entry['writer_region_resident'])}"
                     f", parent peak {_human(entry['parent_peak'])}")
        print(line)
    for label, r in scenario["ratios"].items():
        bound = "at most" if r.get("at_most") else "target"
        print(f"  {label:<34} {r['value']:6.2f}   ({bound} {r['target']}: "
              f"{'met' if r['met'] else 'MISSED'})")
    if "bound" in scenario:
        b = scenario["bound"]
        pages = "huge pages" if b["huge_pages"] else f"{PAGE_SIZE // 1024} KiB pages"
        print(f"  bound: refilling a gifted {_human(b['chunk'])} chunk ({pages}) costs "
              f"{b['faults_us']:.0f} us of page faults, to save one {b['copy_us']:.0f} us copy")


if __name__ == "__main__":
    sys.exit(_main())
