# vmsplicemove 0.2.0: one file, to vendor as it is.  Copyright (c) 2026 The vmsplicemove developers.
# SPDX-License-Identifier: MIT; the licence's text is at the end of this file and goes with every copy.
# From the vmsplicemove repository, beside its tests (test_vmsplicemove.py) and benchmark.
"""Move memory pages between processes with Linux vmsplice(2), or hand them over whole.

The 2013 RFC's protocol: the writer *gifts* page-aligned private memory to a pipe (``SPLICE_F_GIFT |
SPLICE_F_MOVE``) and never touches it again; the reader asks for the pages (``SPLICE_F_MOVE``).  Mainline
Linux never merged the move (the reader copies), but ``vmsplice`` into a pipe does queue references to
the writer's own pages, so a later write would change queued data: ``gift`` drops them from the writer
(``MADV_DONTNEED``), which then reads zeros, while the reader gets the original.

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

``handoff``/``takeover`` move the pages themselves: a sealed memfd over a Unix socket.  ``probe()`` tells
what this kernel does.  Where ``vmsplice`` is refused (ENOSYS, EPERM), ``gift`` and ``move`` copy.
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import dataclasses
import errno
import functools
import itertools
import mmap
import operator
import os
import select
import socket
import stat
import struct
import sys
import threading
import weakref

try:
    import fcntl
except ImportError:  # Windows
    raise ImportError("vmsplicemove needs Linux, or another POSIX system (where gift and move copy, "
                      "without vmsplice(2)): this Python has no fcntl module") from None

TYPE_CHECKING = False  # typing costs milliseconds at import; annotations are strings here (PEP 563)
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any
# 3.9: the oldest CPython tested (3.8 ended in October 2024); 3.7's mmap has no madvise to drop a gift.
if sys.version_info < (3, 9):  # noqa: UP036
    raise ImportError("vmsplicemove needs Python 3.9 or later, not {}.{}".format(*sys.version_info[:2]))

__all__ = [
    "IOV_MAX", "PAGE_SIZE", "SPLICE_F_GIFT", "SPLICE_F_MORE", "SPLICE_F_MOVE", "SPLICE_F_NONBLOCK",
    "PageBuffer", "Support", "gift", "handoff", "move", "pipe", "probe", "takeover", "vmsplice",
]
__version__ = "0.2.0"

# --- Constants (include/uapi/linux/splice.h, mman-common.h, fcntl.h) ---------------------------------
PAGE_SIZE: int = mmap.PAGESIZE
_PAGE_MASK = PAGE_SIZE - 1
SPLICE_F_MOVE: int = 1
SPLICE_F_NONBLOCK: int = 2
SPLICE_F_MORE: int = 4
SPLICE_F_GIFT: int = 8
_SPLICE_F_ALL = SPLICE_F_MOVE | SPLICE_F_NONBLOCK | SPLICE_F_MORE | SPLICE_F_GIFT
_MOVE_FLAGS = SPLICE_F_MOVE | SPLICE_F_NONBLOCK
try:
    IOV_MAX: int = max(os.sysconf("SC_IOV_MAX"), 1)
except (AttributeError, ValueError, OSError):
    IOV_MAX = 1024  # UIO_MAXIOV, the kernel's limit on every architecture
_LINUX = sys.platform.startswith("linux")


def _constants(module: Any, **linux_values: int) -> list:  # the module's where it has them, else Linux's
    return [getattr(module, name, value) for name, value in linux_values.items()]


_F_SETPIPE_SZ, _F_GETPIPE_SZ = _constants(fcntl, F_SETPIPE_SZ=1031, F_GETPIPE_SZ=1032)  # Python 3.10
# MADV_DONTNEED frees private anonymous pages (read back as zeros), MADV_REMOVE shared memory's.
_MADV_DONTNEED, _MADV_REMOVE, _MADV_DONTFORK, _MADV_HUGEPAGE = _constants(
    mmap, MADV_DONTNEED=4, MADV_REMOVE=9, MADV_DONTFORK=10, MADV_HUGEPAGE=14)
_MADV_COLLAPSE = 25  # Linux 6.1: make huge pages now, whatever the THP settings say
_MADV_DONTNEED_LOCKED = 24  # Linux 5.18: MADV_DONTNEED that also drops mlock()ed pages
_F_ADD_SEALS, _F_GET_SEALS = _constants(fcntl, F_ADD_SEALS=1033, F_GET_SEALS=1034)
_F_SEAL_SEAL, _F_SEAL_SHRINK, _F_SEAL_GROW, _F_SEAL_WRITE, _F_SEAL_FUTURE_WRITE = _constants(
    fcntl, F_SEAL_SEAL=1, F_SEAL_SHRINK=2, F_SEAL_GROW=4, F_SEAL_WRITE=8, F_SEAL_FUTURE_WRITE=16)  # 3.13
_MAP_FIXED, _RW = 0x10, mmap.PROT_READ | mmap.PROT_WRITE
_THP, _PIPE_MAX_SIZE = "/sys/kernel/mm/transparent_hugepage/", "/proc/sys/fs/pipe-max-size"

# --- The libc binding: argtypes and restype set once --------------------------------------------------
# struct iovec {void *iov_base; size_t iov_len;} as bytes, passed as a pointer: cheaper than a Structure.
_pack_iovec = struct.Struct("PN").pack


def _bind(lib: Any, name: str, restype: Any, *argtypes: Any) -> Any:  # None where libc lacks it
    fn = getattr(lib, name, None)
    if fn is not None:
        fn.restype, fn.argtypes = restype, list(argtypes)
    return fn


def _libc_handle(use_errno: bool) -> Any:
    """libc without find_library (it runs ldconfig): dlopen(NULL) holds it (glibc, musl, macOS)."""
    for name in (None, "libc.so.6", "libc.so"):
        with contextlib.suppress(OSError):
            lib = ctypes.CDLL(name, use_errno=use_errno)
            if hasattr(lib, "madvise"):
                return lib
    from ctypes.util import find_library  # the last resort: a process
    return ctypes.CDLL(find_library("c"), use_errno=use_errno)


_c_int, _c_size, _c_ptr = ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p
_libc = _libc_handle(True)  # errno saved per thread right after each call (ctypes.get_errno())
_vmsplice_fn = _bind(_libc, "vmsplice", ctypes.c_ssize_t, _c_int, _c_ptr, _c_size, ctypes.c_uint)
_writev_fn = _bind(_libc, "writev", ctypes.c_ssize_t, _c_int, _c_ptr, _c_int)
_readv_fn = _bind(_libc, "readv", ctypes.c_ssize_t, _c_int, _c_ptr, _c_int)
_mmap_fn = _bind(_libc, "mmap", _c_ptr, _c_ptr, _c_size, _c_int, _c_int, _c_int, ctypes.c_long)
_munlock_fn = _bind(_libc, "munlock", _c_int, _c_ptr, _c_size)
_madvise_fn = _bind(_libc_handle(False), "madvise", _c_int, _c_ptr, _c_size, _c_int)  # see "The C step"


class _PyBuffer(ctypes.Structure):  # Py_buffer: the buffer protocol's view of an object
    _fields_ = [("buf", _c_ptr), ("obj", _c_ptr), ("len", ctypes.c_ssize_t), ("itemsize", ctypes.c_ssize_t),
                ("readonly", _c_int), ("ndim", _c_int), ("format", ctypes.c_char_p), ("shape", _c_ptr),
                ("strides", _c_ptr), ("suboffsets", _c_ptr), ("internal", _c_ptr)]


_pythonapi = ctypes.PyDLL(None)  # our own handle: ctypes.pythonapi's argtypes are everyone's
_GetBuffer = _bind(_pythonapi, "PyObject_GetBuffer", _c_int, ctypes.py_object, ctypes.POINTER(_PyBuffer),
                   _c_int)
_ReleaseBuffer = _bind(_pythonapi, "PyBuffer_Release", None, ctypes.POINTER(_PyBuffer))

# --- The C step: what no signal handler can split -------------------------------------------------
# CPython runs a Python signal handler in the main thread between bytecodes, whichever thread got the
# signal, so blocking signals cannot keep it out, and the handler may raise (KeyboardInterrupt).
# Raising between a system call and what must follow it would lose what it made: a count, a
# descriptor, gifted pages still mapped.  So each such pair is one *C step*: a chain of iterators over
# C callables, pulled to its end by one C call (``_c_step``), which stores what the chain yields.  Rules:
#   - only C callables in the chain (builtins, methods of C types, ctypes functions): a Python
#     function runs bytecodes, where a handler can raise;
#   - the caller reads what the step made from the list it passed, never from a return value;
#   - exception handlers only load and store (or make one direct C call, as pipe() does): from 3.11
#     CPython runs signal handlers only at a function's start, at backward jumps and right after a
#     call into C, so such a handler finishes.  3.9 and 3.10 check at most bytecodes: a second
#     raising handler there can cut the first short;
#   - a link after a system call whose errno is read leaves errno alone: ctypes saves errno after
#     every call through a use_errno handle, so madvise, after vmsplice in a gift's step, has another.
# Waits happen between steps; no signal is ever blocked.


def _c_step(into: list, chain: Any) -> None:
    """Run the iterator ``chain`` to its end in one C call, appending what it yields to ``into``."""
    into.extend(chain)


def _call(fn: Any, *args: Any) -> Any:
    """A link of a C step: the call ``fn(*args)``, made once when the chain pulls it."""
    return itertools.starmap(fn, (args,))


def _address_of(view: memoryview) -> int:
    """The address of a contiguous ``view``'s bytes, read-only ones too (``view`` keeps them exported)."""
    raw = _PyBuffer()
    acquired = map(operator.not_, _call(_GetBuffer, view, raw, 0))  # PyBUF_SIMPLE; 0: acquired
    _c_step([], map(_ReleaseBuffer, itertools.compress((raw,), acquired)))  # released at once
    return raw.buf or 0


# --- Page buffers ----------------------------------------------------------------------------------
def _read_setting(path: str, default: str) -> str:
    with contextlib.suppress(OSError), open(path) as f:
        return f.read().strip()
    return default


def _thp_mode(name: str, text: str | None = None) -> str:
    """The bracketed choice of a THP setting ("[madvise] never" -> madvise), read unless ``text``."""
    text = _read_setting(_THP + name, "") if text is None else text
    return text[text.find("[") + 1:text.find("]")] if "[" in text else "unavailable"


def _check_int(name: str, value: Any) -> int:
    if type(value) is not int and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


class _OwnHelp(type):
    def __dir__(cls) -> list:  # help() lists PageBuffer's own; its docstring names mmap's it keeps
        return sorted(vars(cls))


# Who owns what.  A descriptor or a mapping held as a bare int would leak if a signal handler raised
# before it reached its owner, so each is born, in one C step, inside an object that frees it in C: a
# mapping in its mmap object, a descriptor in an epoll object (``epoll.fromfd`` adopts any descriptor
# and closes it when freed; no other standard type does).  Exception handlers only drop references.
_own_fd: Any = getattr(select, "epoll", None) and select.epoll.fromfd
_HUGE_PAGE_SIZE = int(_read_setting(_THP + "hpage_pmd_size", "") or 2 << 20)
_Pin = ctypes.c_char * 0  # _Pin.from_buffer(obj): obj's address, obj exported while the pin lives
_NO_FD = {errno.EMFILE: "no free file descriptor (EMFILE: this process is at its RLIMIT_NOFILE, ulimit -n)",
          errno.ENFILE: "no free file descriptor (ENFILE: the system's file table is full, fs.file-max)"}
# Weak references to the buffers mapped shared, for _after_fork; each removes itself in C (a WeakSet
# would run Python code, where a signal handler may raise).
_shared_buffers: set = set()
# A PageBuffer's _kind: private anonymous memory; a memfd mapped shared (it can be handed off); a memfd
# mapped private copy-on-write (a sealed takeover, a failed handoff's, a fork's child).
_PRIVATE, _SHARED, _VIEW = "private", "shared memfd", "memfd view"


class PageBuffer(mmap.mmap, metaclass=_OwnHelp):
    """Page-aligned memory for ``gift`` and ``handoff``: an ``mmap.mmap``.

    ``PageBuffer(size, *, huge=None, memfd=False)`` maps ``size`` bytes rounded up to whole pages.
    ``huge=True`` rounds up to whole transparent huge pages and asks for them; ``None``: huge pages
    exactly when ``size`` is whole huge pages and the kernel can give this memory some; ``.huge`` says
    what it got.  ``memfd=False``: private anonymous memory, what ``gift`` needs (a dropped *private*
    page leaves this process; a shared one, ``mmap.mmap(-1, n)``'s default, stays shared with the pipe).
    ``memfd=True``: a sealable memfd's pages, mapped shared, for ``handoff``; a forked child sees a
    private copy-on-write view.  A writable bytes-like object with ``mmap``'s ``read``, ``write``,
    ``seek``, ``find``, ``flush``, ``madvise``, that never moves (``resize`` is refused); ``close()``
    while exported raises ``BufferError``, use after close ``ValueError``.  Raises TypeError (``size``
    not an int), ValueError (not positive, too large), OSError (no memory; memfd: not Linux, seccomp,
    no free descriptor)."""

    __slots__ = ("_huge", "_kind", "_memfd")
    _huge: bool
    _memfd: Any  # the memfd's owner (see "Who owns what") while mapped shared, else None
    _kind: str  # _PRIVATE, _SHARED or _VIEW

    def __new__(cls, size: int, *, huge: bool | None = None, memfd: bool = False) -> PageBuffer:
        if _check_int("size", size) <= 0:
            raise ValueError(f"size must be positive, not {size}")
        advice = _huge_advice(memfd)
        huge = size % _HUGE_PAGE_SIZE == 0 and advice is not None if huge is None else huge
        unit = _HUGE_PAGE_SIZE if huge else PAGE_SIZE
        rounded = -(-size // unit) * unit
        if rounded > sys.maxsize:
            raise ValueError(f"size {size} is larger than any mapping can be")
        self = cls._placeholder(rounded)
        if memfd:
            self._adopt(_new_memfd(rounded), _SHARED)
        if huge and (advice or not memfd):  # private memory: advised all the same where THP is never
            with contextlib.suppress(OSError):  # refused (PR_SET_THP_DISABLE, MADV_NOHUGEPAGE): plain pages
                for pos in range(0, rounded, _HUGE_PAGE_SIZE) if advice == _MADV_COLLAPSE else ():
                    self[pos] = 0  # MADV_COLLAPSE collapses what is there: a byte per huge page
                self.madvise(advice or _MADV_HUGEPAGE)
                self._huge = True  # MADV_HUGEPAGE: at first touch
        return self

    @classmethod
    def _placeholder(cls, size: int) -> PageBuffer:
        """Private anonymous memory, which mmap refuses to resize (Linux 6.7+ aligns huge sizes)."""
        self = super().__new__(cls, -1, size, access=mmap.ACCESS_COPY)
        self._huge, self._memfd, self._kind = False, None, _PRIVATE
        return self

    def _adopt(self, memfd: Any, kind: str, mapped: list | None = None) -> None:
        """Map ``memfd`` (an owner) over this buffer's range as _SHARED or _VIEW, mmap's answer stored
        in ``mapped`` by a C step.  Kind and owner are set first, so a handler after it finds them right."""
        address, mapped, before = self.address, [] if mapped is None else mapped, (self._memfd, self._kind)
        self._memfd, self._kind = (memfd if kind == _SHARED else None), kind
        if kind == _SHARED:
            _shared_buffers.add(weakref.ref(self, _shared_buffers.discard))
        flags = (mmap.MAP_SHARED if kind == _SHARED else mmap.MAP_PRIVATE) | _MAP_FIXED
        _c_step(mapped, _call(_mmap_fn, address, len(self), _RW, flags, memfd.fileno(), 0))
        if mapped[0] != address:
            self._memfd, self._kind = before
            raise OSError(ctypes.get_errno(), f"mmap of the memfd failed: {os.strerror(ctypes.get_errno())}")
        if kind == _SHARED:  # a fork's child does not get it at all
            self.madvise(_MADV_DONTFORK)

    @property
    def address(self) -> int:
        """The start address of the mapping, a multiple of ``PAGE_SIZE``."""
        return ctypes.addressof(_Pin.from_buffer(self))  # ValueError when closed

    size = property(len, doc="The mapped size in bytes: the requested size rounded up.")
    huge = property(lambda self: self._huge, doc="Whether the memory got huge pages.")
    memfd = property(lambda self: self._kind != _PRIVATE,
                     doc="Whether the pages live in a memfd (``memfd=True``, or from ``takeover``).")

    def close(self) -> None:
        """Unmap the pages (and let go of the memfd); ``BufferError`` while exported."""
        try:
            super().close()
        except BufferError:
            raise BufferError("the PageBuffer is still exported: release every memoryview of it "
                              "(view.release(), or leave its with block) before closing it") from None
        self._memfd = None  # the memfd closes with its last owner

    def __exit__(self, *exc_info: Any) -> None:  # mmap's own would skip close() above
        self.close()

    def discard(self, offset: int = 0, length: int | None = None) -> None:
        """Drop ``self[offset:offset+length]`` (whole pages; ``None``: to the end): it reads back as
        zeros, its memory goes back to the system.  ValueError: a bad range or a closed buffer; OSError:
        the kernel refuses (locked memory before Linux 5.18)."""
        start, stop = _page_range(_open_size(self), offset, length, aligned=True)
        if stop == start:
            return
        if self._kind == _SHARED:
            self.madvise(_MADV_REMOVE, start, stop - start)
        elif self._kind == _VIEW:  # the memfd is not ours to change: map fresh zero pages over it
            pin = _Pin.from_buffer(self)  # the range cannot be unmapped meanwhile
            _zero_pages(ctypes.addressof(pin) + start, stop - start)
        else:
            self.madvise((_MADV_DONTNEED_LOCKED if _dontneed_locked else _MADV_DONTNEED), start, stop - start)

    def __repr__(self) -> str:
        return "<PageBuffer closed>" if self.closed else \
            f"<PageBuffer size={len(self)} address={self.address:#x} huge={self._huge} memfd={self.memfd}>"


def _after_fork() -> None:
    """In a forked child: each shared buffer becomes a private view, which does not stop the seals."""
    for ref in list(_shared_buffers):
        buf = ref()
        if buf is not None and not buf.closed and buf._kind == _SHARED:
            with contextlib.suppress(OSError):  # no memory for the page tables: it stays as it came
                buf._adopt(buf._memfd, _VIEW)
    _shared_buffers.clear()


os.register_at_fork(after_in_child=_after_fork)


def _huge_advice(memfd: bool, shmem: str | None = None) -> int | None:
    """How this memory gets huge pages: MADV_HUGEPAGE, MADV_COLLAPSE (memfd, shmem THP ``never``:
    Linux 6.1+ collapses all the same) or None (THP off, or ``deny``); ``shmem``: that setting's text."""
    if not memfd:
        return None if _thp_mode("enabled") in ("never", "unavailable") else _MADV_HUGEPAGE
    mode = _thp_mode("shmem_enabled", shmem)
    return None if mode in ("deny", "unavailable") else _MADV_COLLAPSE if mode == "never" else _MADV_HUGEPAGE


def _new_memfd(size: int) -> Any:
    """A new sealable memfd of ``size`` bytes, in its owner (see "Who owns what")."""
    owner: list = []
    try:
        flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
        _c_step(owner, map(_own_fd, _call(os.memfd_create, "vmsplicemove", flags)))
    except (OSError, AttributeError, TypeError) as exc:  # AttributeError, TypeError: not Linux
        err = getattr(exc, "errno", None) or errno.ENOSYS
        why = (f"{_NO_FD[err]}: close some, or raise the limit" if err in _NO_FD else "not Linux"
               if not isinstance(exc, OSError) else f"{os.strerror(err)}: an old kernel, or a sandbox "
               "(seccomp, gVisor) refuses it" if err in (errno.ENOSYS, errno.EPERM) else os.strerror(err))
        raise OSError(err, f"memfd_create failed: {why}; no memfd PageBuffer, no handoff") from None
    os.ftruncate(owner[0].fileno(), size)
    return owner[0]


def _zero_pages(address: int, length: int) -> None:  # fresh private zero pages there (MAP_FIXED)
    if _mmap_fn(address, length, _RW, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_FIXED, -1, 0) != address:
        raise OSError(ctypes.get_errno(), "mmap over the discarded range failed")


def _open_size(buf: PageBuffer) -> int:
    if buf.closed:
        raise ValueError("the PageBuffer is closed")
    return len(buf)


def _page_range(size: int, offset: int, length: int | None, aligned: bool) -> tuple[int, int]:
    """Check the byte range ``[offset, offset + length)`` of ``size`` bytes; return ``(start, stop)``."""
    if type(offset) is not int or (length is not None and type(length) is not int):  # the common case first
        _check_int("offset", offset)
        _check_int("length", 0 if length is None else length)
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


# --- The raw call ----------------------------------------------------------------------------------
def _check_flags(flags: int, allowed: int, where: str) -> None:
    if _check_int("flags", flags) & ~allowed:
        raise ValueError(f"{where} does not accept flags {flags:#x}; allowed bits: {allowed:#x}")


def _describe_fd(fd: int) -> str:
    """What ``fd`` is: "a pipe read end", "a regular file", "an anonymous inode (eventfd)", "not open"..."""
    try:
        mode, access = os.fstat(fd).st_mode, fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    except (OSError, OverflowError):
        return "not open"
    pipe_end = ("a pipe read end", "a pipe write end", "a pipe open for reading and writing")[min(access, 2)]
    kinds = [(stat.S_ISREG, "a regular file"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISLNK, "a symbolic link (O_PATH)"), (stat.S_ISFIFO, pipe_end)]
    found = next((name for test, name in kinds if test(mode)), "")
    if not found:  # no file type: an anonymous inode (fs/anon_inodes.c), whose kind only /proc names
        with contextlib.suppress(OSError):
            found = os.readlink(f"/proc/self/fd/{fd}").partition("anon_inode:")[2].strip("[]")
        found = f"an anonymous inode ({found or 'eventfd, epoll, pidfd...'})"
    return found


def _fd_error(err: int, fd: int, call: str) -> OSError:
    """An OSError for ``err`` from ``call``, saying what ``fd`` is when that is the reason."""
    what = _describe_fd(fd)
    if what == "not open":
        return OSError(errno.EBADF, f"{call}: descriptor {fd} is not open")
    if not what.startswith("a pipe"):
        return OSError(errno.EBADF, f"{call}: descriptor {fd} is {what}, not a pipe")
    return OSError(err, f"{call} on descriptor {fd}: {os.strerror(err)}")


def _pipe_access(fd: int, call: str, want: int, check_pipe: bool = False) -> int:
    """Check that ``fd`` is open for ``want`` (O_RDONLY, O_WRONLY); return its status flags.  The copy
    fallback's writev/readv would not say EBADF for a non-pipe, as vmsplice does: it asks (check_pipe)."""
    try:
        status = fcntl.fcntl(fd if type(fd) is int else _check_int("fd", fd), fcntl.F_GETFL)
        access = status & os.O_ACCMODE
    except (OSError, OverflowError, ValueError):  # negative or beyond a C int: not open either
        raise _fd_error(errno.EBADF, fd, call) from None
    right_end = access == want or (access == os.O_RDWR and want == os.O_WRONLY)  # as vmsplice sees it
    what = "" if right_end and not check_pipe else _describe_fd(fd)
    if what and not what.startswith("a pipe"):
        raise _fd_error(errno.EBADF, fd, call)
    if not right_end:
        raise ValueError(f"{call} needs the {'write' if want == os.O_WRONLY else 'read'} end of a pipe; "
                         f"descriptor {fd} is {what}" + (", so vmsplice would send the buffer"
                                                          if want == os.O_RDONLY else ""))
    return status


def vmsplice(fd: int, buffers: Sequence[Any], flags: int = 0) -> int:
    """Make one ``vmsplice(2)`` call over ``buffers``; return the byte count (maybe short).

    Like ``os.writev`` on a pipe write end, ``os.readv`` on a read end; ``flags``: any ``SPLICE_F_*``;
    EINTR is retried.  Safety: on a write end the pipe holds references to the very pages of
    ``buffers``, not a copy, and keeps nothing alive: until the reader has the data, modifying or
    freeing them changes or corrupts what it gets (``gift`` hands pages over safely).  Raises TypeError
    (``fd`` not an int; one buffer, not a sequence; a buffer not contiguous, or read-only on a read
    end), ValueError (unknown flags, more than ``IOV_MAX`` buffers), OSError (the kernel's errno)."""
    _check_int("fd", fd)
    _check_flags(flags, _SPLICE_F_ALL, "vmsplice")
    if isinstance(buffers, (bytes, bytearray, memoryview, mmap.mmap, str)):
        raise TypeError(f"buffers must be a sequence of bytes-like objects, not one "
                        f"{type(buffers).__name__}: write [buffer]")
    buffers = list(buffers)
    if len(buffers) > IOV_MAX:
        raise ValueError(f"{len(buffers)} buffers exceed IOV_MAX ({IOV_MAX})")
    try:
        reading = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    except (OSError, OverflowError, ValueError):  # negative or beyond a C int: not open either
        raise _fd_error(errno.EBADF, fd, "vmsplice") from None
    if _vmsplice_fn is None:
        raise OSError(errno.ENOSYS, "vmsplice is not available in this C library")
    iov, views = b"", []  # views: held until the call returns, so nobody closes or resizes them
    try:
        for i, obj in enumerate(buffers):
            try:
                views.append(memoryview(obj))
                if reading and views[-1].readonly:
                    raise TypeError("it is read-only")
                iov += _pack_iovec(_address_of(views[-1]), views[-1].nbytes)
            except (TypeError, BufferError) as exc:
                raise TypeError(f"buffers[{i}] must be a {'writable, ' if reading else ''}contiguous "
                                f"bytes-like object, not {type(obj).__name__} ({exc})") from None
        while True:
            n = _vmsplice_fn(fd, iov or None, len(views), flags)
            if n >= 0:
                return n
            if ctypes.get_errno() != errno.EINTR:
                raise _fd_error(ctypes.get_errno(), fd, "vmsplice")
    finally:
        _c_step([], map(memoryview.release, views))  # every view released, or none


# --- Gift and move: the protocol of the RFC ----------------------------------------------------------
# Each call is a loop of C steps (see "The C step").  A gift's step: the system call, its count stored,
# then the madvise that drops the whole pages it queued; a move's: the call and its count.  The count
# so far is one record, ``progress[0] = (bytes before this step, the list this step stores into)``,
# replaced whole by one store after each step: an exception handler finds the bytes moved exact.
_use_vmsplice = _vmsplice_fn is not None  # False from the first ENOSYS or EPERM (gVisor, seccomp) on
_SANDBOX_ERRNOS = (errno.ENOSYS, errno.EPERM)
_is_positive = (0).__lt__
_whole_pages = functools.partial(operator.and_, ~_PAGE_MASK)  # a count rounded down to whole pages

with mmap.mmap(-1, PAGE_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS) as _page:
    try:  # whether madvise knows MADV_DONTNEED_LOCKED (Linux 5.18)
        _page.madvise(_MADV_DONTNEED_LOCKED)
        _dontneed_locked = _LINUX
    except OSError:  # then gift unlocks what it gifts: MADV_DONTNEED refuses locked pages
        _dontneed_locked = False


def _after_error(err: int, fd: int, call: str, done: int, nonblock: bool) -> bool:
    """What a failed step means: True to try again (EINTR, EAGAIN after waiting), False to return
    the count so far (an error after progress comes next call); raises if nothing moved."""
    if err == errno.EINTR:
        return True
    if done and not (err == errno.EAGAIN and not nonblock):
        return False
    if err != errno.EAGAIN:
        raise _fd_error(err, fd, call)
    if nonblock:
        raise BlockingIOError(errno.EAGAIN, f"{call}: pipe {fd} is {'full' if call == 'gift' else 'empty'}")
    poller = select.poll()  # wait until ready or hung up; signal handlers may run meanwhile
    poller.register(fd, select.POLLOUT if call == "gift" else select.POLLIN)
    poller.poll()
    return True


def gift(fd: int, buf: PageBuffer, offset: int = 0, length: int | None = None, *, flags: int = 0) -> int:
    """Give the pages ``buf[offset:offset+length]`` of a private ``PageBuffer`` (multiples of
    ``PAGE_SIZE``; ``length=None``: to the end) to the pipe write end ``fd``.

    ``vmsplice`` with ``SPLICE_F_GIFT | SPLICE_F_MOVE`` (plus ``SPLICE_F_NONBLOCK``, also where ``fd``
    is O_NONBLOCK, and ``SPLICE_F_MORE`` from ``flags``), ``writev`` where it is refused, until every
    byte is queued or a non-blocking pipe is full.  Each page queued is dropped in the same C step,
    locked memory included: it reads as zeros, and writing to it never changes what the reader gets.
    Returns the bytes gifted, whole pages: short only on a full non-blocking pipe, or when an error
    followed some progress (it comes next call).  Any exception carries them in ``transferred``
    (missing only if a signal handler raised before anything was sent).  Raises TypeError (``buf``
    not a ``PageBuffer``, an argument not an int), ValueError (a closed or memfd buffer, a bad range
    or flags, a read end), BlockingIOError (a non-blocking pipe full before any page),
    BrokenPipeError (no reader), OSError (EBADF: ``fd`` is not a pipe, or not open).
    """
    if not isinstance(buf, PageBuffer):
        raise TypeError(f"gift needs a PageBuffer (private anonymous memory), not "
                        f"{type(buf).__name__}: pages of other objects cannot be dropped safely")
    start, stop = _page_range(_open_size(buf), offset, length, aligned=True)
    _check_flags(flags, _SPLICE_F_ALL, "gift")
    if buf._kind != _PRIVATE:
        raise ValueError("gift cannot drop the pages of a memfd PageBuffer from the pipe's view "
                         "(they are shared): send them with handoff(), or gift a PageBuffer(size)")
    if _pipe_access(fd, "gift", os.O_WRONLY, check_pipe=not _use_vmsplice) & os.O_NONBLOCK:
        flags |= SPLICE_F_NONBLOCK  # as os.write would: vmsplice(2) itself ignores O_NONBLOCK
    return _transfer(_gift_loop, fd, buf, start, stop - start, flags) if stop > start else 0


def _transfer(loop: Any, fd: int, buf: Any, start: int, length: int, flags: int) -> int:
    """Run ``loop`` over ``buf[start:start+length]`` (pinned); an exception carries ``transferred``."""
    progress: list = [(0, [])]  # (bytes before this step, this step's list): see above
    try:
        try:
            pin = _Pin.from_buffer(buf)  # the address, from the buffer itself, and held while we work
            return loop(fd, ctypes.addressof(pin) + start, length, flags, progress)
        except BaseException as exc:  # calls nothing (see "The C step"): only loads and stores
            done, step = progress[0]
            exc.transferred = done + (step[0] if step and step[0] > 0 else 0)  # type: ignore[attr-defined]
            pin = None  # releases the buffer: the traceback keeps this frame
            raise
    except BaseException as exc:  # 3.9/3.10: a second raising handler cut the first one short
        done, step = progress[0]
        exc.transferred = done + (step[0] if step and step[0] > 0 else 0)  # type: ignore[attr-defined]
        pin = None
        raise


def _gift_loop(fd: int, address: int, length: int, flags: int, progress: list) -> int:
    """gift's loop: queue ``length`` bytes at ``address``, one C step at a time."""
    vmsplicing = _use_vmsplice  # the copy fallback is chosen once per call
    nonblock = bool(flags & SPLICE_F_NONBLOCK)
    flags |= SPLICE_F_GIFT | SPLICE_F_MOVE
    advice = _MADV_DONTNEED_LOCKED if _dontneed_locked else _MADV_DONTNEED
    huge = _HUGE_PAGE_SIZE
    own, out = (None, fd) if vmsplicing else _fallback_end(fd, os.O_WRONLY, nonblock)
    if not _dontneed_locked:  # before Linux 5.18 a locked page cannot be dropped: unlock them first
        _munlock_fn(address, length)
    try:
        while progress[0][0] < length:
            done, step = progress[0]
            at = address + done
            iov = _pack_iovec(at, length - done)
            # writev's count is whole pages too: pipe_write() fills a page per slot
            queue = _call(_vmsplice_fn, fd, iov, 1, flags) if vmsplicing else _call(_writev_fn, out, iov, 1)
            counted, queued = itertools.tee(queue)  # the count: stored, and what the drop drops
            drop = map(_madvise_fn, (at,), map(_whole_pages, filter(_is_positive, queued)), (advice,))
            _c_step(step, itertools.chain(counted, drop))  # step: [count] or [count, madvise's answer]
            n = step[0]
            progress[0] = (done + max(n, 0), [])  # one store: counted once, whatever interrupts
            if n >= 0:
                if step[1:] == [-1]:  # not dropped (locked by another thread meanwhile): replace them
                    _zero_pages(at, _whole_pages(n))
                # This step emptied the last of a huge page an earlier step began (and so split): drop
                # it whole once more, pages already dropped only: where the kernel then frees the empty
                # page table (CONFIG_PT_RECLAIM, 6.18) the refill takes one huge-page fault, not 512.
                whole = at & -huge
                if address <= whole < at and at + n >= whole + huge:
                    _madvise_fn(whole, huge, advice)
                continue
            err = ctypes.get_errno()
            if vmsplicing and err in _SANDBOX_ERRNOS:
                vmsplicing, (own, out) = False, _copy_from_now_on(fd, "gift", os.O_WRONLY, nonblock)
            elif not _after_error(err, fd, "gift", progress[0][0], nonblock):
                break
        return progress[0][0]
    finally:
        if own is not None:
            own.close()


def _copy_from_now_on(fd: int, call: str, access: int, nonblock: bool) -> tuple[Any, int]:
    """vmsplice was refused (ENOSYS, EPERM): copy from now on, in this process."""
    global _use_vmsplice
    _use_vmsplice = False
    _pipe_access(fd, call, access, check_pipe=True)
    return _fallback_end(fd, access, nonblock)


def _fallback_end(fd: int, access: int, nonblock: bool) -> tuple[Any, int]:
    """The copy fallback's way to ``fd``'s pipe: ``(None, fd)``, or ``(owner, descriptor)`` of its own
    (/proc/self/fd) that never waits (O_NONBLOCK) or makes no packets (O_DIRECT; vmsplice makes none)."""
    packets = access == os.O_WRONLY and fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0)
    owner: list = []
    flags = access | os.O_CLOEXEC | (os.O_NONBLOCK if nonblock else 0)
    if nonblock or packets:
        with contextlib.suppress(OSError):  # no /proc, no free descriptor: by fd itself
            _c_step(owner, map(_own_fd, _call(os.open, f"/proc/self/fd/{fd}", flags)))
    return (owner[0], owner[0].fileno()) if owner else (None, fd)


def move(fd: int, buf: Any, offset: int = 0, length: int | None = None, *, flags: int = 0) -> int:
    """Receive from the pipe read end ``fd`` into ``buf[offset:offset+length]`` (any range of a
    ``PageBuffer`` or of a writable, contiguous bytes-like object; ``length=None``: to the end).

    ``vmsplice`` with ``SPLICE_F_MOVE`` (plus ``SPLICE_F_NONBLOCK``, also where ``fd`` is O_NONBLOCK),
    ``readv`` where it is refused, until ``length`` bytes came or every writer closed the pipe.  A
    page-aligned range of a ``PageBuffer`` is what a kernel that moves pages would move; mainline Linux
    copies.  Returns the bytes received: ``length``, or fewer at end of file (0: nothing left), from a
    non-blocking pipe that ran dry, or when an error followed some progress; exceptions carry
    ``transferred`` as gift's.  Raises TypeError (``buf`` read-only, not contiguous or not bytes-like),
    ValueError (a closed buffer, a bad range or flags, a write end), BlockingIOError (a non-blocking
    pipe empty before any byte), OSError (EBADF: ``fd`` is not a pipe, or not open).
    """
    _check_flags(flags, _MOVE_FLAGS, "move")
    if isinstance(buf, PageBuffer):
        size = _open_size(buf)
    else:
        try:
            view = memoryview(buf)
        except TypeError as exc:
            raise TypeError(f"move's buffer must be a writable bytes-like object ({exc})") from None
        with view:
            if view.readonly or not view.c_contiguous:
                raise TypeError(f"move's buffer must be writable and contiguous; this {type(buf).__name__} "
                                f"is {'read-only' if view.readonly else 'not contiguous'}")
            size = view.nbytes
    start, stop = _page_range(size, offset, length, aligned=False)
    if _pipe_access(fd, "move", os.O_RDONLY, check_pipe=not _use_vmsplice) & os.O_NONBLOCK:
        flags |= SPLICE_F_NONBLOCK  # as os.readv would: vmsplice(2) itself ignores O_NONBLOCK
    return _transfer(_move_loop, fd, buf, start, stop - start, flags)


def _move_loop(fd: int, address: int, length: int, flags: int, progress: list) -> int:
    """move's loop: receive up to ``length`` bytes at ``address``, one C step at a time."""
    vmsplicing = _use_vmsplice  # the copy fallback is chosen once per call
    nonblock = bool(flags & SPLICE_F_NONBLOCK)
    flags |= SPLICE_F_MOVE
    own, source = (None, fd) if vmsplicing else _fallback_end(fd, os.O_RDONLY, nonblock)
    try:
        while progress[0][0] < length:
            done, step = progress[0]
            iov = _pack_iovec(address + done, length - done)
            _c_step(step, _call(_vmsplice_fn, fd, iov, 1, flags) if vmsplicing else
                    _call(_readv_fn, source, iov, 1))  # step: [count]
            n = step[0]
            progress[0] = (done + max(n, 0), [])  # one store: counted once, whatever interrupts
            if n == 0:
                break  # end of file: no writer left (or none yet, for a FIFO), nothing queued
            if n > 0:
                continue
            err = ctypes.get_errno()
            if vmsplicing and err in _SANDBOX_ERRNOS:
                vmsplicing, (own, source) = False, _copy_from_now_on(fd, "move", os.O_RDONLY, nonblock)
            elif not _after_error(err, fd, "move", progress[0][0], nonblock):
                break
        return progress[0][0]
    finally:
        if own is not None:
            own.close()


def pipe(size: int | None = None) -> tuple[int, int]:
    """Return ``(read_fd, write_fd)`` of a new close-on-exec pipe of ``size`` bytes (rounded up to a
    power-of-two number of pages), or by default of the largest size allowed (pipe-max-size, or less
    where a per-user limit refuses it).  ValueError outside (0, 2 GiB); OSError EPERM above
    pipe-max-size without CAP_SYS_RESOURCE, EMFILE without a free descriptor."""
    if size is not None and not 0 < _check_int("size", size) < 2**31:  # fcntl() would truncate it
        raise ValueError(f"size must be positive and below 2 GiB, not {size}")
    want = int(_read_setting(_PIPE_MAX_SIZE, "0") or 0) if size is None and _LINUX else 0
    ends: list = []  # [(read_fd, write_fd)] from one C step: os.pipe() close-on-exec, since Python 3.4
    closing = map(os.close, itertools.chain.from_iterable(ends))  # built now: the handler only runs it
    try:
        try:
            _c_step(ends, _call(os.pipe))
        except OSError as exc:
            why = f"{_NO_FD[exc.errno]}: close some, or raise the limit" if exc.errno in _NO_FD else exc
            raise OSError(exc.errno, f"pipe: {why}") from None
        r, w = ends[0]
        try:
            if size is not None:
                fcntl.fcntl(w, _F_SETPIPE_SZ, size)
        except PermissionError:
            raise PermissionError(errno.EPERM, f"pipe: {size} bytes is more than pipe-max-size "
                                  f"({_read_setting(_PIPE_MAX_SIZE, '?')}) or this user's pipe-user-pages "
                                  f"allow without CAP_SYS_RESOURCE: ask for less, or pipe()") from None
        while want > PAGE_SIZE and fcntl.fcntl(w, _F_GETPIPE_SZ) < want:
            with contextlib.suppress(OSError):
                fcntl.fcntl(w, _F_SETPIPE_SZ, want)
            want //= 2
        return r, w
    except BaseException:  # bare numbers, no owner to drop: one C call closes both (see "The C step")
        [None].extend(closing)
        raise


# --- Handoff: the pages themselves, to another process -----------------------------------------------
# A memfd passed over a Unix socket (SCM_RIGHTS) lets the receiver map the very same page frames.  The
# seals make the kernel guarantee what the receiver relies on: F_SEAL_SHRINK and F_SEAL_GROW that the size
# never changes (no SIGBUS), F_SEAL_WRITE that the pages never change, which the kernel refuses while a
# writable shared mapping exists (mm/memfd.c): the sender unmaps first.  The memfd in ``handoff``:
#   untouched  ``buf`` maps it and owns it;
#   unmapped   ``buf`` is closed; ``rescue``, mapped before anything changed, holds pages and memfd,
#              so that any exception can give them back (``exc.buffer``);
#   sealed     the kernel now refuses what the seals forbid;
#   sent       the peer has a descriptor of its own; ``rescue`` lets go: this process holds nothing.
# Not ``socket.send_fds``/``recv_fds``: their bare descriptor numbers leak if a signal handler raises.

_HANDOFF_HEADER = struct.Struct("=8sQ")  # b"pagemove", size: the wire format
_HANDOFF_MAGIC = b"pagemove"
_SIZE_SEALS = _F_SEAL_SHRINK | _F_SEAL_GROW  # every handoff: the size never changes
_MAX_FDS = 253  # SCM_MAX_FD: room for every descriptor a hostile sender can attach
_SO_PASSPIDFD, _SCM_PIDFD = 76, 4  # Linux 6.5: the sender's pidfd, in a control message of its own
_FD_MESSAGES = {(socket.SOL_SOCKET, socket.SCM_RIGHTS), (socket.SOL_SOCKET, _SCM_PIDFD)}
_CONTROL_SPACE = socket.CMSG_SPACE(_MAX_FDS * 4) + 2 * socket.CMSG_SPACE(16)  # + a pidfd, credentials
# Plain ints: socket's IntFlag operators (and socket.socket's family and type) run enum code: a quarter
# of a takeover in a fresh interpreter (0.79 ms, 0.58 without)
_TAKE = int(getattr(socket, "MSG_CMSG_CLOEXEC", 0) | socket.MSG_DONTWAIT)  # the message leaves
_PEEK, _TRUNCATED = _TAKE | int(socket.MSG_PEEK), int(socket.MSG_CTRUNC)  # a look; a cut control part
(_SO_DOMAIN,) = _constants(socket, SO_DOMAIN=39)
_SOCKET_CALLS = ("fileno", "getsockopt", "getpeername", "recv", "recvmsg", "sendmsg")  # all we call on one
_memfd_device: list = []  # st_dev of the kernel's internal shmem mount, where every memfd lives
_ancdata, _payload = operator.itemgetter(1), operator.itemgetter(2)
_level_and_type, _descriptor_numbers = operator.itemgetter(0, 1), functools.partial(array.array, "i")


def _unix_socket(sock: Any, call: str) -> Any:
    """A context manager for ``sock``, checked to be a connected AF_UNIX stream or seqpacket socket:
    the caller's socket, or for a descriptor a socket of ours on a duplicate, closed on leaving (not a
    generator: one left suspended by a raising handler would clean up in the garbage collector)."""
    if isinstance(sock, socket.socket):
        replaced = [name for name in _SOCKET_CALLS
                    if getattr(type(sock), name) is not getattr(socket.SocketType, name)]
        if replaced:
            raise TypeError(f"{call} needs a plain socket.socket or a descriptor: {type(sock).__name__} "
                            f"replaces its {', '.join(replaced)}, which {call} calls")
        obj, manager = sock, contextlib.nullcontext(sock)  # type: Any, Any
    elif isinstance(sock, int) and not isinstance(sock, bool):
        try:
            is_socket = stat.S_ISSOCK(os.fstat(sock).st_mode)
        except (OSError, OverflowError, ValueError):
            raise _fd_error(errno.EBADF, sock, call) from None
        if not is_socket:
            raise ValueError(f"{call}: descriptor {sock} is {_describe_fd(sock)}, not a Unix socket")
        owned: list = []
        try:  # socket.SocketType, the C type: socket.socket's __init__ is Python, so not born owned
            _c_step(owned, map(socket.SocketType, (-1,), (-1,), (-1,), _call(os.dup, sock)))
        except OSError as exc:
            raise OSError(exc.errno, f"{call}: cannot duplicate descriptor {sock} ({exc.strerror}): close "
                                     f"some descriptors, or pass the socket object") from None
        obj, manager = owned[0], contextlib.closing(owned[0])
    else:
        raise TypeError(f"{call} needs a socket or its descriptor, not {type(sock).__name__}")
    try:  # the kernel's answer: an object's own can be stale (fileno= with a family given, a dup2 over it),
        family = obj.getsockopt(socket.SOL_SOCKET, _SO_DOMAIN)  # and TCP drops SCM_RIGHTS without a word
        kind = obj.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
    except OSError:
        family = kind = -1
    problem = ("closed" if obj.fileno() < 0 else "not a socket now (its descriptor was closed or replaced)"
               if family == -1 else "not a Unix (AF_UNIX) socket" if family != socket.AF_UNIX
               else "" if kind in (socket.SOCK_STREAM, socket.SOCK_SEQPACKET)
               else "not a stream or seqpacket socket")
    if not problem:
        try:
            obj.getpeername()
        except OSError:
            problem = "not connected"
    if problem:
        with manager:
            raise ValueError(f"{call}: the socket is {problem}")
    return manager


def handoff(sock: Any, buf: PageBuffer, *, shared: bool = False) -> int:
    """Hand the pages of ``buf`` to the process at the other end of ``sock``: nothing is copied.

    ``sock``: a connected ``AF_UNIX`` stream or seqpacket socket, or its descriptor; ``buf``: a
    ``PageBuffer(size, memfd=True)``, or one from ``takeover(..., shared=True)``.  Unmaps ``buf`` (it is
    closed), seals its memfd, sends ``struct.pack("=8sQ", b"pagemove", size)`` with the descriptor in
    ``SCM_RIGHTS`` (one message per handoff) and returns ``len(buf)``: this process then holds no
    mapping and no descriptor of the pages.  The seals forbid shrinking, growing, writing and more
    seals, so the receiver can trust that the pages never change; with ``shared=True`` only shrinking
    and growing, for a receiver that trusts this process: ``takeover(sock, shared=True)`` maps them
    writable, to hand on again with no copy.

    Raises TypeError, ValueError or BufferError, leaving ``buf`` as it was (not a memfd buffer; closed,
    a copy-on-write view or exported; ``sock`` not a connected Unix socket as the kernel tells, or of a
    type that replaces sendmsg, as an SSL socket does), OSError (BrokenPipeError:
    the peer has gone; EBUSY: another writable mapping stops the seal).  Any exception after those
    checks, a signal handler's too, carries ``transferred`` (``len(buf)`` if the pages went, else 0)
    and ``buffer`` (the pages if ``buf`` was closed and they did not go, else None); both are missing
    only if a handler raised as the call began or, on CPython 3.9/3.10, as it returned (then ``buf``
    closed means the pages went).
    """
    if not isinstance(buf, PageBuffer) or buf._kind == _PRIVATE:
        raise TypeError(f"handoff needs a PageBuffer(size, memfd=True), not "
                        f"{'a private PageBuffer' if isinstance(buf, PageBuffer) else type(buf).__name__}")
    if type(shared) is not bool:
        raise TypeError(f"shared must be True or False, not {shared!r}")
    if buf._kind == _VIEW and not buf.closed:
        raise ValueError("handoff: these pages are a private copy-on-write view of a memfd (from a "
                         "default takeover, a failed handoff, or inherited by a fork): copy them into a new "
                         "PageBuffer(size, memfd=True) to send them on, or take them with shared=True")
    size, memfd, rescue = _open_size(buf), buf._memfd, None
    seals = _SIZE_SEALS if shared else _SIZE_SEALS | _F_SEAL_WRITE | _F_SEAL_SEAL
    sent: list = []  # sendmsg's answer, stored by the C step that sends: "was it sent?" has an answer
    try:
        with _unix_socket(sock, "handoff") as obj:
            rescue = PageBuffer._placeholder(size)  # the way back: a view does not stop F_SEAL_WRITE
            rescue._adopt(memfd, _SHARED if shared else _VIEW)
            try:
                mmap.mmap.close(buf)
            except BufferError:
                raise BufferError("handoff: a memoryview of the PageBuffer is still exported: release "
                                  "it (view.release(), or leave its with block) first") from None
            buf._memfd = None
            try:
                fcntl.fcntl(memfd.fileno(), _F_ADD_SEALS, seals)
            except OSError as exc:
                why = {errno.EBUSY: "another writable shared mapping of these pages exists (another process "
                                    "mapped the memfd, or holds it from takeover(shared=True)): end it, or "
                                    "hand such pages off with shared=True",
                       errno.EPERM: "the memfd's seals are themselves sealed (F_SEAL_SEAL) without these: "
                                    "hand it off with shared=True"}.get(exc.errno or 0, exc.strerror)
                raise OSError(exc.errno, f"handoff: the kernel refuses to seal the memfd: {why}; the pages "
                                         f"are in this exception's buffer") from None
            header, rights = _HANDOFF_HEADER.pack(_HANDOFF_MAGIC, size), struct.pack("i", memfd.fileno())
            try:
                _c_step(sent, _call(obj.sendmsg, [header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)],
                                    socket.MSG_NOSIGNAL))
            except BrokenPipeError:
                raise BrokenPipeError(errno.EPIPE, "handoff: the peer has closed its end of the socket "
                                      "(EPIPE); the pages are in this exception's buffer") from None
            rescue.close()
            return size
    except BaseException as exc:  # calls nothing (see "The C step"): only stores
        exc.transferred = size if sent else 0  # type: ignore[attr-defined]
        exc.buffer = rescue if buf.closed and not sent else None  # type: ignore[attr-defined]
        rescue = memfd = None  # sent, or never unmapped: the pages are not ours to keep
        raise


def takeover(sock: Any, *, shared: bool = False) -> PageBuffer:
    """Receive one ``handoff`` from ``sock``; return its pages, the sender's very frames, as a
    ``PageBuffer`` of the announced size (``.memfd`` true).

    A write-sealed memfd (a default handoff) is mapped private copy-on-write: reading shares the
    frames, writing a page copies it, and it cannot be handed off again.  With ``shared=True`` a memfd
    sealed only against shrinking and growing is mapped shared: writes land in the memfd, and
    ``handoff`` passes it on with no copy.  Checked before anything is mapped: one descriptor, a memfd
    (as the kernel tells: no ``/proc`` needed) of the announced size, with those seals; whatever else
    arrives is closed.  The message leaves the socket only once its pages are mapped.  Threads may
    share ``sock``: each handoff goes to exactly one.

    Raises EOFError (the peer closed the socket without a handoff), PermissionError (a seal is
    missing: the sender could still change or truncate the pages), ValueError (a malformed handoff:
    size, magic, not one descriptor, not a memfd open to be mapped; ``sock`` not a connected Unix
    socket), TypeError (``sock`` of a type that replaces recvmsg, as an SSL socket does), OSError
    (EMFILE: no descriptor free to receive into; ENOMEM: the size cannot be mapped; the handoff stays
    queued).  A rejected handoff's descriptors are closed before it raises.  A signal handler's
    exception after the message left carries its pages in ``buffer`` (None before: the message is
    still queued; on CPython 3.9/3.10 one raised as the call returns loses the handoff: README, Limits).
    """
    if type(shared) is not bool:
        raise TypeError(f"shared must be True or False, not {shared!r}")
    state: dict = {"taken": [], "mapped": [], "pages": None, "address": 0}  # what this call made: see _take
    try:
        with _unix_socket(sock, "takeover") as obj:
            _reserve_descriptors(obj)
            while not state["taken"]:
                obj.recv(1, socket.MSG_PEEK)  # waits (as the socket's timeout says), takes nothing
                with _take_lock:
                    _take(obj, shared, state)
            return state["pages"]
    except BaseException as exc:  # calls nothing (see "The C step"): only stores
        pages = state["pages"]  # taken off the socket and mapped: the pages go with the exception
        exc.buffer = pages if state["taken"] and state["mapped"] == [state["address"]] else None  # type: ignore
        state = pages = None  # type: ignore[assignment]  # closes whatever came, in C
        raise


# One thread at a time from its look at a message to its take, so that what it takes is what it mapped
# (else a handler raising before the re-check in _take could give another's pages and close its own).
# From 3.11 ``with`` cannot leave a C lock held; 3.9 and 3.10 could (between POP_BLOCK and the exit),
# hanging every later takeover, so there threads that share a socket keep that window (README, Limits).
_take_lock: Any = threading.Lock() if sys.version_info >= (3, 11) else contextlib.nullcontext()


def _take(obj: socket.socket, shared: bool, state: dict) -> None:
    """Peek at a message (a peek gets duplicates of its descriptors), check it, map its memfd and take
    it off the socket in one C step: before that the handoff is on the socket, after it in ``state``:
    ``taken`` (recvmsg's answer, the owners), ``pages`` at ``address``, ``mapped`` (mmap's answer)."""
    peeked: list = []
    try:
        _receive(obj, _PEEK, peeked)
    except BlockingIOError:
        return  # another thread took it while this one waited: wait for the next
    try:
        checked = _check_handoff(peeked, shared)
    except (ValueError, PermissionError, EOFError) as exc:
        _reject(obj, state)
        del peeked[:]  # the look's duplicates too, and the traceback, whose _check_handoff frame holds them
        raise exc.with_traceback(None) from None
    try:
        _map_into(state, *checked)
        failed = None
    except (OSError, MemoryError) as exc:  # ENOMEM, say: a size this process cannot map now
        err = getattr(exc, "errno", None) or errno.ENOMEM
        failed = OSError(err, f"takeover: cannot map the {checked[2]} bytes the handoff announces ({exc}); "
                         + ("it is still queued: free memory and call takeover again, or close the socket"
                            if err == errno.ENOMEM else "the handoff is rejected"))
    if failed is not None:  # raised here, with no context whose frames would hold the peeked memfd
        peeked = checked = None  # type: ignore[assignment]
        if failed.errno != errno.ENOMEM:  # no retry can map it
            _reject(obj, state)
        raise failed
    try:
        _receive(obj, _TAKE, state["taken"])  # one C step: now the pages are the caller's
    except BlockingIOError:
        return  # another thread or process took it: look at the next one
    taken = state["taken"]
    same = [os.path.sameopenfile(got.fileno(), checked[0].fileno()) for got in _rights(taken[:1], taken[1:])]
    if taken[0][0] != peeked[0][0] or same == [False]:  # another took the one looked at: this one, as it is
        state["mapped"] = []  # first: the pages looked at are another's
        _map_into(state, *_check_handoff(taken, shared))


def _reject(obj: socket.socket, state: dict) -> None:
    """Take a rejected message off the socket and close its descriptors now (up to 253), even if the
    caller keeps the exception (its frames hold ``state``)."""
    with contextlib.suppress(BlockingIOError):  # (another thread took it)
        _receive(obj, _TAKE, state["taken"])
    del state["taken"][:]


def _map_into(state: dict, memfd: Any, kind: str, size: int) -> None:
    """Map ``memfd`` as ``kind`` over fresh memory of ``size`` bytes: ``state``'s pages and mmap's answer."""
    state["mapped"] = []  # first: the pages of an earlier look are not these
    pages = state["pages"] = PageBuffer._placeholder(size)
    state["address"] = pages.address
    pages._adopt(memfd, kind, state["mapped"])


def _check_handoff(received: list, shared: bool) -> tuple[Any, str, int]:
    """A message checked: (the memfd's owner, _SHARED or _VIEW, its size); raises if it is rejected."""
    (data, _, msg_flags, _), owners = received[0], received[1:]
    rights = _rights(received[:1], owners)
    if not data and not owners:
        raise EOFError("takeover: the peer closed the socket (or sent an empty message) without a handoff")
    if msg_flags & _TRUNCATED:
        raise ValueError(f"takeover: a malformed handoff: more than {_MAX_FDS} descriptors (MSG_CTRUNC)")
    if len(data) != _HANDOFF_HEADER.size or not data.startswith(_HANDOFF_MAGIC):  # MSG_TRUNC: longer
        raise ValueError(f"takeover: a malformed handoff message ({len(data)} bytes: {data[:24]!r})")
    if len(rights) != 1:
        raise ValueError(f"takeover: a handoff carries exactly one descriptor, not {len(rights)}")
    fd = rights[0].fileno()
    size, info, mode = _HANDOFF_HEADER.unpack(data)[1], os.fstat(fd), fcntl.fcntl(fd, fcntl.F_GETFL)
    if not stat.S_ISREG(info.st_mode) or info.st_dev != (_memfd_device or [info.st_dev])[0]:  # not tmpfs
        what = "a hugetlbfs or tmpfs file" if stat.S_ISREG(info.st_mode) else _describe_fd(fd)
        raise ValueError(f"takeover: the descriptor received is {what}, not a memfd of shmem (memfd_create "
                         f"without MFD_HUGETLB)")
    if mode & getattr(os, "O_PATH", 0) or mode & os.O_ACCMODE not in (os.O_RDWR, os.O_RDONLY):
        how = "O_PATH" if mode & os.O_ACCMODE == os.O_RDONLY else "write-only"
        raise ValueError(f"takeover: the memfd came open {how}, so it cannot be mapped: send it open for "
                         f"reading and writing")
    seals = fcntl.fcntl(fd, _F_GET_SEALS)
    needed = {_F_SEAL_SHRINK: "F_SEAL_SHRINK", _F_SEAL_GROW: "F_SEAL_GROW", _F_SEAL_WRITE: "F_SEAL_WRITE"}
    names = [name for bit, name in needed.items() if not seals & bit and (bit != _F_SEAL_WRITE or not shared)]
    if names:
        raise PermissionError(errno.EPERM, f"takeover: the memfd lacks {', '.join(names)}: the sender "
                                           f"could still change or truncate the pages")
    if size != info.st_size or size <= 0 or size % PAGE_SIZE:
        raise ValueError(f"takeover: the handoff announces {size} bytes, the memfd holds {info.st_size} "
                         f"(both must agree, a positive multiple of {PAGE_SIZE})")
    kind = _VIEW if seals & (_F_SEAL_WRITE | _F_SEAL_FUTURE_WRITE) else _SHARED
    if kind == _SHARED and mode & os.O_ACCMODE != os.O_RDWR:
        raise ValueError("takeover: the memfd of a shared handoff came open read-only, so it cannot be "
                         "mapped writable: send it open for reading and writing")
    return rights[0], kind, size


def _reserve_descriptors(obj: socket.socket) -> None:
    """Check that a handoff's descriptors can be received (on EMFILE the kernel drops them, pages
    and all): take as many and give them back; the first time, one is a memfd: where memfds live."""
    count = 1  # for the peek: when the message is taken, duplicates that find no room are only dropped
    with contextlib.suppress(OSError):  # before Linux 6.5 there is no pidfd
        count += bool(obj.getsockopt(socket.SOL_SOCKET, _SO_PASSPIDFD))
    spare: list = []
    try:
        if not _memfd_device:
            with contextlib.suppress(OSError):  # refused here (seccomp): the seals alone must tell
                _c_step(spare, map(_own_fd, _call(os.memfd_create, "vmsplicemove", os.MFD_CLOEXEC)))
                _memfd_device.append(os.fstat(spare[0].fileno()).st_dev)
        _c_step(spare, map(_own_fd, map(os.dup, (obj.fileno(),) * (count - len(spare)))))
    except OSError as exc:
        raise OSError(exc.errno, f"takeover: no free file descriptor to receive the memfd into "
                                 f"({errno.errorcode.get(exc.errno or 0, exc.errno)}): close some, or raise "
                                 f"RLIMIT_NOFILE; the handoff is still queued on the socket") from None


def _receive(obj: socket.socket, flags: int, into: list) -> None:
    """One C step: ``recvmsg`` (one byte more than a handoff: a longer message shows), its answer
    in ``into``, then an owner for each descriptor of any control message."""
    reply, parsed = itertools.tee(_call(obj.recvmsg, _HANDOFF_HEADER.size + 1, _CONTROL_SPACE, flags))
    messages, kinds = itertools.tee(itertools.chain.from_iterable(map(_ancdata, parsed)))
    carrying = map(_FD_MESSAGES.__contains__, map(_level_and_type, kinds))
    payloads = itertools.compress(map(_payload, messages), carrying)
    numbers = filter((-1).__lt__, itertools.chain.from_iterable(map(_descriptor_numbers, payloads)))
    _c_step(into, itertools.chain(reply, map(_own_fd, numbers)))  # into: [reply, owner, owner...]


def _rights(replies: list, owners: list) -> list:
    """The owners of the descriptors that came in SCM_RIGHTS (not, say, an SCM_PIDFD's pidfd)."""
    found, at = [], 0
    for _, ancdata, _, _ in replies:
        for level, kind, payload in ancdata:
            if (level, kind) in _FD_MESSAGES:
                n = len(payload) // 4
                found += owners[at:at + n] if kind == socket.SCM_RIGHTS else []
                at += n
    return found


# --- Detection: observe, never infer from a version number --------------------------------------------
_probe_lock = threading.Lock()
_probe_cache: Support | None = None


@dataclasses.dataclass(frozen=True)
class Support:
    """What the running kernel does, as ``probe()`` observed it; None where it could not be told.
    ``vmsplice``: the call works (else gift and move copy).  ``zero_copy_gift``: queued pages are the
    writer's own.  ``move``: the reader got the very page gifted (True) or a copy (False).  ``handoff``:
    a sealed memfd over a Unix socket works.  ``huge_pages``: THP always, madvise, never, unavailable
    (or unknown).  ``pipe_max_size``: /proc/sys/fs/pipe-max-size.  ``kernel``: the release string.
    ``reason``: one plain sentence per finding, with the errno where a call failed."""

    vmsplice: bool | None
    zero_copy_gift: bool | None
    move: bool | None
    handoff: bool | None
    huge_pages: str
    pipe_max_size: int | None
    kernel: str
    reason: str

    def __str__(self) -> str:
        word = {True: "yes", False: "no", None: "unknown"}
        rows = [("kernel", self.kernel), ("vmsplice", word[self.vmsplice]),
                ("zero-copy gift", word[self.zero_copy_gift]), ("page move", word[self.move]),
                ("handoff", word[self.handoff]), ("huge pages", self.huge_pages),
                ("pipe-max-size", self.pipe_max_size or "unknown")]
        return "\n".join([f"{name:<15} {value}" for name, value in rows] + ["", self.reason])


def probe(refresh: bool = False) -> Support:
    """Observe what this kernel does; return a ``Support`` (cached; ``refresh=True`` looks again).

    It queues a page and changes it (zero-copy gift), compares frame numbers in ``/proc/self/pagemap``
    across a gift and move (hidden without CAP_SYS_ADMIN), hands a memfd page to itself, and reads the
    settings (``reason`` says whether memfd pages can be huge): never from a version number, leaving
    nothing behind, raising nothing for what the system lacks.  Findings that needed a descriptor when
    none was free (EMFILE) are None, and such a record is not cached: the next call looks again."""
    global _probe_cache
    with _probe_lock:
        if _probe_cache is None or refresh:
            notes: list = []  # one sentence per finding
            starved: list = []  # EMFILE or ENFILE met: a passing shortage, not a fact to keep
            works, zero_copy, moved = _observe_vmsplice(notes, starved)
            handed = _observe_handoff(notes, starved)
            thp, shmem, size = (_setting(path, notes, starved)
                                for path in (_THP + "enabled", _THP + "shmem_enabled", _PIPE_MAX_SIZE))
            mode = "unknown" if thp is None else _thp_mode("", thp)
            if mode != "unknown":
                notes.append("Transparent huge pages are unavailable." if mode == "unavailable"
                             else f"Transparent huge pages are in mode {mode!r}.")
            if shmem is not None:  # what PageBuffer(memfd=True) and so handoff get: see _huge_advice
                ways = {_MADV_COLLAPSE: "by MADV_COLLAPSE (Linux 6.1+)", _MADV_HUGEPAGE: "by MADV_HUGEPAGE"}
                how = ways.get(_huge_advice(True, shmem) or 0, "")
                notes.append(f"Memfd pages (handoff) {'can be huge ' + how if how else 'cannot be huge'}: "
                             f"shmem THP is {_thp_mode('', shmem)!r}.")
            max_size = int(size) if size and size.isdigit() else None
            if max_size:
                notes.append(f"Pipes can hold up to {max_size} bytes (pipe-max-size).")
            kernel = os.uname().release
            support = Support(works, zero_copy, moved, handed, mode, max_size, kernel, " ".join(notes))
            if starved:
                return support
            _probe_cache = support
        return _probe_cache


def _untried(what: str, exc: OSError, notes: list, starved: list) -> Any:
    """Note why ``what`` ("Handoff could not be tried") failed; return None, the finding unknown."""
    if exc.errno in _NO_FD:
        starved.append(exc.errno)
    notes.append(f"{what}: {_NO_FD.get(exc.errno or 0) or exc}.")
    return None


def _setting(path: str, notes: list, starved: list) -> str | None:
    """A setting's text; "" where missing; None where no descriptor was free to read it."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as exc:
        return "" if exc.errno not in _NO_FD else _untried(f"{path} could not be read", exc, notes, starved)


def _frame(buf: PageBuffer, unread: list, offset: int = 0) -> int:
    """The page frame behind ``buf[offset]``; 0 where hidden (no CAP_SYS_ADMIN), not resident or
    unreadable (no /proc, no descriptor: the error goes to ``unread``)."""
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((buf.address + offset) // PAGE_SIZE * 8)
            entry = struct.unpack("<Q", f.read(8))[0]
    except OSError as exc:  # kept without its traceback, whose frames would hold buf in a cycle
        unread.append(OSError(exc.errno, exc.strerror, exc.filename))
        return 0
    return entry & ((1 << 55) - 1) if entry >> 63 else 0


def _observe_vmsplice(notes: list, starved: list) -> tuple[bool | None, bool | None, bool | None]:
    if _vmsplice_fn is None:
        notes.append("The C library has no vmsplice function, so gift and move copy.")
        return False, None, None
    try:
        r, w = os.pipe()
    except OSError as exc:
        return _untried("vmsplice could not be tried", exc, notes, starved), None, None
    unread: list = []  # why pagemap could not be read
    frames: list = []  # the gifted page's, the destination's before and after the move
    try:
        with PageBuffer(PAGE_SIZE) as src, PageBuffer(PAGE_SIZE) as dst:
            src[:8] = b"original"
            if _vmsplice_fn(w, _pack_iovec(src.address, PAGE_SIZE), 1, SPLICE_F_NONBLOCK) < 0:
                err = ctypes.get_errno()
                why = {errno.ENOSYS: "not implemented here", errno.EPERM: "a seccomp policy refuses it"}
                notes.append(f"vmsplice fails with {errno.errorcode.get(err, err)}: "
                             f"{why.get(err, os.strerror(err))}; gift and move copy.")
                return False, None, None
            src[:8] = b"changed!"  # queued and not dropped: does the pipe see the change?
            zero_copy = os.read(r, PAGE_SIZE) == b"changed!" + bytes(PAGE_SIZE - 8)
            notes.append("vmsplice works. " + ("Queued pages are the writer's own: a write after "
                         "vmsplice changed the queued data, so gift must drop them." if zero_copy
                         else "vmsplice copied the pages when it queued them."))
            src[:8], dst[:8] = b"gifted..", b"resident"  # the destination faulted in: a move replaces it
            frames = [_frame(src, unread), _frame(dst, unread)]
            if all(frames) and gift(w, src) == PAGE_SIZE and move(r, dst) == PAGE_SIZE \
                    and dst[:8] == b"gifted..":
                frames.append(_frame(dst, unread))
    finally:
        _c_step([], map(os.close, (r, w)))
    if unread:
        return True, zero_copy, _untried("Page moves could not be checked", unread[0], notes, starved)
    if not all(frames):
        notes.append("Page moves could not be checked: page frame numbers are hidden without CAP_SYS_ADMIN.")
    elif len(frames) < 3:
        notes.append("Page moves could not be checked: the gifted page did not arrive.")
    elif frames[2] == frames[0]:
        notes.append("The reader received the gifted page itself: vmsplice moves pages here.")
        return True, zero_copy, True
    else:
        kept = "kept its frame" if frames[2] == frames[1] else f"got frame {frames[2]:#x}"
        notes.append(f"The reader got a copy: the destination page {kept}, and the gifted frame "
                     f"{frames[0]:#x} never appeared there (vmsplice copies into user memory, as mainline "
                     "Linux does).")
        return True, zero_copy, False
    return True, zero_copy, None


def _observe_handoff(notes: list, starved: list) -> bool | None:
    if not hasattr(os, "memfd_create"):
        notes.append("Handoff could not be tried: this system has no memfd.")
        return None
    unread: list = []  # why pagemap could not be read
    try:
        sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with sender, receiver, PageBuffer(PAGE_SIZE, memfd=True) as src:
            src[:8] = b"handoff!"
            sent_frame = _frame(src, unread)
            handoff(sender, src)
            with takeover(receiver) as got:
                same, got_frame = got[:8] == b"handoff!", _frame(got, unread)
    except (OSError, ValueError) as exc:  # ValueError: takeover rejected what this very module sent
        if getattr(exc, "buffer", None) is not None:  # handoff's pages, kept for a retry: not wanted
            exc.buffer.close()  # type: ignore[union-attr]
        if isinstance(exc, OSError) and exc.errno in _NO_FD:
            return _untried("Handoff could not be tried", exc, notes, starved)
        code = errno.errorcode.get(getattr(exc, "errno", None) or 0)
        notes.append(f"Handoff fails{' with ' + code if code else ''}: {exc}.")
        return False
    works = "Handoff works (a sealed memfd over a Unix socket)"
    if not same:
        notes.append("Handoff failed: the page arrived changed.")
    elif unread:
        _untried(f"{works}; whether the receiver saw the very same frame could not be checked", unread[0],
                 notes, starved)
    elif not sent_frame or not got_frame:
        notes.append(f"{works}; frame numbers are hidden, so whether the receiver saw the very same frame "
                     "could not be checked.")
    else:
        same_frame = "the very same" if sent_frame == got_frame else "another"
        notes.append(f"Handoff works: the receiver mapped {same_frame} frame ({got_frame:#x}; the sender's "
                     f"was {sent_frame:#x}).")
    return same


# ===========================================================================
# The command line: python3 -m vmsplicemove probe | demo
# Nothing above this line depends on anything below it.

import io  # noqa: E402  # (loaded with the interpreter: free; what costs is imported where it is used)
import time  # noqa: E402

_block: list = [None, b""]  # the last seed and its 1 MiB of pseudo-random bytes


def _parse_size(text: str) -> int:
    """'256M', '1GiB', '1.5G', '4096' -> bytes (binary units) rounded up to whole pages;
    ``argparse.ArgumentTypeError`` for anything else, inf and nan included."""
    import argparse
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    s = text.strip().upper().replace("IB", "").rstrip("B")
    unit = s[-1:] if s[-1:] in units else ""
    with contextlib.suppress(ValueError, OverflowError):  # int(): OverflowError for inf
        value = float(s[:len(s) - len(unit)]) * units[unit]
        if value >= PAGE_SIZE:  # not nan, not below one page
            return -(-int(value) // PAGE_SIZE) * PAGE_SIZE
    raise argparse.ArgumentTypeError(f"not a size from one page ({PAGE_SIZE} bytes) up: {text!r}")


def _human(n: float) -> str:
    unit = 0
    while abs(n) >= 1024 and unit < 8:
        n, unit = n / 1024, unit + 1
    return f"{n:.1f} {'KMGTPEZY'[unit - 1]}iB" if unit else f"{n:.0f} B"


def _pattern(pos: int, seed: int) -> bytearray:
    """The 1 MiB at ``pos`` (a multiple of 1 MiB) of the test region of ``seed``: random bytes, each
    page's first word its page number, so that a lost or misplaced page shows."""
    import random
    if _block[0] != seed:
        _block[:] = seed, random.Random(seed).randbytes(1 << 20)
    data = bytearray(_block[1])
    for page in range(0, 1 << 20, PAGE_SIZE):
        struct.pack_into("=Q", data, page, (pos + page) // PAGE_SIZE ^ seed << 40)
    return data


def _fill(buf: Any, seed: int) -> None:
    """Fill all of ``buf`` with the test region of ``seed``."""
    with memoryview(buf) as mv:
        for pos in range(0, len(mv), 1 << 20):
            mv[pos:pos + (1 << 20)] = _pattern(pos, seed)[:len(mv) - pos]


def _mismatch(buf: Any, seed: int, length: int) -> int | None:
    """Offset of the first byte of ``buf[:length]`` that ``_fill`` would not have written, or None."""
    with memoryview(buf) as mv:
        for pos in range(0, length, 1 << 20):
            got, want = mv[pos:min(length, pos + (1 << 20))].tobytes(), _pattern(pos, seed)[:length - pos]
            if got != want:  # bytes and bytearray: memcmp
                return pos + next(i for i in range(len(got)) if got[i] != want[i])
    return None


def _resident(buf: PageBuffer) -> int:
    """Bytes of ``buf`` resident in memory now (mincore(2)), -1 if unknown."""
    vec = (ctypes.c_ubyte * (len(buf) // PAGE_SIZE))()
    failed = _libc.mincore(ctypes.c_void_p(buf.address), ctypes.c_size_t(len(buf)), vec)
    return -1 if failed else sum(v & 1 for v in bytes(vec)) * PAGE_SIZE


def _status_kib(field: str, path: str = "/proc/self/status") -> int:
    """A field of /proc/self/status (or of ``path``: /proc/meminfo) in KiB, 0 if missing (or no /proc)."""
    with contextlib.suppress(OSError), open(path) as f:
        return next((int(line.split()[1]) for line in f if line.startswith(field + ":")), 0)
    return 0


def _in_child(fn: Any, *args: Any, close: Sequence[int] = ()) -> int:
    """Fork; run ``fn(*args)`` in the child, which exits 0, or 1 on error, after closing ``close``,
    the parent's pipe ends (holding them, it would hang if the parent died)."""
    pid = os.fork()
    if pid:
        return pid
    try:
        _c_step([], map(os.close, close))
        fn(*args)
        os._exit(0)
    except BaseException as exc:
        if not isinstance(exc, (BrokenPipeError, KeyboardInterrupt)):  # else: the parent is gone, or knows
            sys.excepthook(*sys.exc_info())  # the traceback, as if uncaught
    finally:
        os._exit(1)


def _status(fd: int) -> bytes:
    data = os.read(fd, 1 << 16)  # the writer's next message; its error raised here
    if data[:1] in (b"", b"E"):
        raise RuntimeError(f"the writer process failed: {data[1:].decode() or 'it ended without a word'}")
    return data


@contextlib.contextmanager
def _writer_child(fn: Any, *args: Any) -> Any:
    """Fork ``fn(w, status, *args)`` as the writer; yield the parent's ``(r, status)``: the read
    end of pipe ``w`` and a Unix packet socket (the writer's exception comes there for ``_status``)."""
    def writer(*args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:  # told by the parent, in one line
            os.write(sw, b"E" + (str(exc) or type(exc).__name__).encode(errors="replace"))
            os._exit(1)
    r, w = pipe()
    sr, sw = (s.detach() for s in socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET))
    pid = _in_child(writer, w, sw, *args, close=(r, sr))
    _c_step([], map(os.close, (w, sw)))
    try:
        yield r, sr
    finally:
        _c_step([], map(os.close, (r, sr)))
        os.kill(pid, 9)  # SIGKILL: its work is done (its last word came) or no longer wanted
        os.waitpid(pid, 0)


def _migrate_writer(w: int, status: int, size: int, how: str, huge: bool | None, seed: int) -> None:
    import json
    src = PageBuffer(size, memfd=True) if how == "handoff" else PageBuffer(size, huge=huge)
    _fill(src, seed)
    report = {"sender_frames": [_frame(src, [], at) for at in (0, size - PAGE_SIZE)],
              "writer_filled": _resident(src)}
    os.write(status, b"R")
    os.read(status, 1)  # "G", the go (or nothing: the parent is gone, and so shall we be)
    if how == "handoff":
        handoff(status, src)  # unmaps src
    else:  # os.write: all of it, the pipe blocks
        (gift if how == "gift" else os.write)(w, src)
    report["writer_resident"] = 0 if how == "handoff" else _resident(src)
    os.write(status, json.dumps(report).encode())


def _migrate(size: int, how: str, seed: int, *, huge: bool | None = None, reader_huge: bool | None = None,
             watch: Any = lambda stage, dst: {}) -> dict:
    """Bring ``size`` bytes a child fills in ``PageBuffer(size, huge=huge)`` here by ``how`` ("gift",
    "plain", "handoff") into ``PageBuffer(size, huge=reader_huge)``; check every byte.  ``watch(stage,
    dst)`` runs before the go ("go"; ``dst`` None for a handoff) and when the data came ("here")."""
    import json
    with _writer_child(_migrate_writer, size, how, huge, seed) as (r, status):
        dst = None if how == "handoff" else PageBuffer(size, huge=reader_huge)  # after the fork: not shared
        _status(status)  # "R": the writer has filled its region
        watch("go", dst)
        os.write(status, b"G")
        start, got, n = time.perf_counter(), 0, 1
        if dst is None:
            dst, got = takeover(status), size  # EOFError or ValueError if the writer failed
        with memoryview(dst) as view:
            while got < size and n:
                want = min(16 << 20, size - got)
                n = move(r, dst, got, want) if how == "gift" else os.readv(r, [view[got:got + want]])
                got += n
        seconds = time.perf_counter() - start
        report = {**watch("here", dst), **json.loads(_status(status))}  # watch first: it may time
    bad = _mismatch(dst, seed, size) if got == size else got
    verified, frames = time.perf_counter() - start, [_frame(dst, [], at) for at in (0, size - PAGE_SIZE)]
    dst.close()
    if bad is not None:
        raise RuntimeError(f"{how}: data differs at byte {bad} of {size}")
    return {"seconds": seconds, "verified_s": verified, "receiver_frames": frames, **report}


def _demo(size: int) -> None:
    available = _status_kib("MemAvailable", "/proc/meminfo") << 10
    if 0 < available < 2 * size:  # the plain run holds two copies
        raise RuntimeError(f"needs 2 x {_human(size)} of memory, {_human(available)} available")
    support = probe()
    print(f"vmsplicemove demo: {_human(size)} from a child process to its parent, kernel {support.kernel}")
    labels = {"gift": "gift + move", "plain": "write + readv", "handoff": "handoff"}
    runs = {how: _migrate(size, how, 7, reader_huge=None if how == "gift" else False)
            for how in labels if support.handoff or how != "handoff"}
    print(f"every byte verified in all {len(runs)} runs ({size} bytes each); seconds from the go:\n"
          f"  {'':<14} {'arrived':>8} {'verified':>9}   throughput   freed in the writer")
    for how, run in runs.items():
        rate = "     -    " if how == "handoff" else f"{size / run['seconds'] / 2**30:6.2f} GiB/s"
        print(f"  {labels[how]:<14} {run['seconds']:8.3f} {run['verified_s']:9.3f}   {rate}   "
              f"{_human(size - run['writer_resident'])}")
    print(f"gift + move is {runs['plain']['seconds'] / runs['gift']['seconds']:.2f}x plain write + readv; "
          f"gift frees the writer's pages as the pipe takes them")
    moved = {True: "moved (the reader got the writer's pages)", None: "moved or copied (see probe)", False:
             "copied by the reader (the kernel does not move pages into user memory)"}[support.move]
    print(f"pages were {moved if support.vmsplice else 'copied: vmsplice is not usable here'}")
    if "handoff" not in runs:
        print(f"handoff: not available here ({support.reason})")
        return
    sent, got = runs["handoff"]["sender_frames"], runs["handoff"]["receiver_frames"]
    print("handoff: the pages themselves changed hands, " + (
        "frame numbers unknown (hidden without CAP_SYS_ADMIN, or no /proc)" if not all(sent + got) else
        f"the receiver maps the sender's very frames (first and last page: {', '.join(map(hex, got))})"
        if sent == got else f"the receiver got other frames: {sent} -> {got}"))
    _chain(size)


def _chain(size: int) -> None:
    """Live update: the region handed on shared through three fresh interpreters (``_hop``) in turn."""
    import json
    import subprocess
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "import vmsplicemove; vmsplicemove._hop(*map(int, sys.argv[1:]))")
    pairs = [socket.socketpair() for _ in range(3)]
    fd = [sock.fileno() for pair in pairs for sock in pair]  # ours, then each version's way in and out
    procs = [subprocess.Popen([sys.executable, "-c", code, *map(str, ends)], pass_fds=ends, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for ends in (fd[1:3], fd[3:5], fd[5:])]
    for sock in itertools.chain(pairs[0][1:], *pairs[1:]):
        sock.close()  # theirs now: a version that fails ends the chain (EOF, EPIPE), nothing waits
    region = PageBuffer(size, memfd=True)
    _fill(region, 8)
    hops: list = [{}]
    with pairs[0][0] as mine, contextlib.suppress(BrokenPipeError):  # the next version failed: it says why
        hops[0]["handoff"] = _timed(handoff, mine, region, shared=True)[1]
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise RuntimeError(f"a version in the chain failed: {(err.strip().splitlines() or ['?'])[-1]}")
        hops.append(json.loads(out))
    if hops[3]["bad"] is not None:
        raise RuntimeError(f"live update: data differs at byte {hops[3]['bad']} of {size}")
    times = ", ".join(f"{hops[i]['handoff'] + hops[i + 1]['takeover']:.4f} s" for i in range(3))
    print("live update: handed on shared through 3 fresh interpreters, every byte verified by the last\n"
          f"  each hop's handoff + takeover: {times}\n  a sealed chain copies the region before hops 2 "
          f"and 3: {hops[1]['copy']:.4f} s, {hops[2]['copy']:.4f} s")


def _hop(inbound: int, outbound: int = -1) -> None:
    """A version in ``_chain``: take the region, time the copy a sealed chain needs, hand it on."""
    import json
    with socket.socket(fileno=inbound) as sock:
        select.select([sock], [], [])  # the handoff is here: time the takeover, not the wait
        buf, took = _timed(takeover, sock, shared=True)
    if outbound < 0:
        print(json.dumps({"takeover": took, "bad": _mismatch(buf, 8, len(buf))}))
    else:
        copy = _timed(lambda: PageBuffer(len(buf), memfd=True).write(buf))[1]
        sent = _timed(handoff, outbound, buf, shared=True)[1]
        print(json.dumps({"takeover": took, "copy": copy, "handoff": sent}))


def _timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(*args, **kwargs), time.perf_counter() - start


class _ClosedOutput(io.TextIOBase):  # sys.stdout where descriptor 1 is closed (>&-): a write fails, and the
    def write(self, text: str) -> int:  # command, in one line, status 1, as `cat >&-` (141: reader gone)
        raise OSError(errno.EBADF, "standard output is closed (EBADF): redirect it, to /dev/null to discard")


def _standard_streams() -> None:
    """/dev/null on each of descriptors 0-2 the caller closed (``>&-``): no pipe or socket of ours gets
    the number, where a C library writes.  ``sys.stdout`` (None then) fails, ``sys.stderr`` keeps quiet."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.open(os.devnull, os.O_RDWR)  # the lowest free number: this one
    sys.stdout, sys.stderr = sys.stdout or _ClosedOutput(), sys.stderr or io.StringIO()


def _main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import json

    class _Parser(argparse.ArgumentParser):
        def error(self, message: str) -> Any:  # one line, not the usage text; 2 even if stderr fails
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(f"{self.prog}: {message} (see --help)\n")
            raise SystemExit(2)

        def _print_message(self, message: str, file: Any = None) -> None:  # 3.11+ swallows write errors
            if message:
                (file or sys.stderr).write(message)

    prog = "vmsplicemove" if os.path.basename(sys.argv[0]) == "vmsplicemove" else "python3 -m vmsplicemove"
    _standard_streams()
    parser = _Parser(prog=prog, description="Move memory pages between processes: gift/move through a pipe "
                     "(vmsplice), handoff of a sealed memfd (no copy), or a plain copy (write/read).")
    parser.add_argument("--version", action="version", version=f"vmsplicemove {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("probe", help="report what this kernel does: vmsplice, page moves, memfd handoff") \
        .add_argument("--json", action="store_true", help="print the fields as one JSON object")
    sub.add_parser("demo", help="a child's region to its parent by gift/move, copy and handoff; verified") \
        .add_argument("--size", type=_parse_size, default=256 << 20,
                      help="bytes to send, from one page up, e.g. 64K, 64M or 1G (default 256M)")
    command = ""
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as stop:  # --help or --version written (0), or bad arguments said (2)
            sys.stdout.flush()  # a closed output shows here, not at exit
            return stop.code if isinstance(stop.code, int) else 1
        command = f" {args.command}"
        if args.command == "demo":
            _demo(args.size)
        else:
            print(json.dumps(dataclasses.asdict(probe()), indent=2) if args.json else probe())
        sys.stdout.flush()
        return 0
    except (RuntimeError, OSError, MemoryError, ValueError, EOFError) as exc:  # the writer's, takeover's
        message, code = str(exc) or type(exc).__name__, 1
        poller = select.poll()  # a broken pipe: is it stdout, whose reader has gone (`| head`)?
        poller.register(1, select.POLLOUT)
        gone = any(ev & select.POLLERR for _, ev in poller.poll(0))
        try:
            sys.stdout.flush()  # what is still buffered
        except (OSError, ValueError):  # cannot go (reader gone, disk full): nor at exit, a second error
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        if isinstance(exc, BrokenPipeError) and gone:
            return 141  # as a process ended by SIGPIPE
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    with contextlib.suppress(OSError, ValueError):  # stderr gone too: the status says it
        print(f"{prog}{command}: {message}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(_main())


# MIT License.  Copyright (c) 2026 The vmsplicemove developers.  Permission is hereby granted, free of
# charge, to any person obtaining a copy of this software and associated documentation files (the
# "Software"), to deal in the Software without restriction, including without limitation the rights to
# use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies of the Software, and to
# permit persons to whom the Software is furnished to do so, subject to the following conditions: The
# above copyright notice and this permission notice shall be included in all copies or substantial
# portions of the Software.  THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
# IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR
# PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY
# CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
# OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
