"""Tests of vmsplicemove: real pipes, real processes, nothing mocked that can run."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import pickle
import platform
import re
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import pytest

import vmsplicemove as vm
import contextlib

HERE = Path(__file__).resolve().parent
PAGE = vm.PAGE_SIZE


# -- helpers -------------------------------------------------------------------


def in_child(fn, *args):
    """Run ``fn(*args)`` in a forked child; return its (pickled) result or
    fail with the child's traceback."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            payload = pickle.dumps(("ok", fn(*args)))
        except BaseException:
            payload, code = pickle.dumps(("error", traceback.format_exc())), 1
        with os.fdopen(w, "wb") as f:
            f.write(payload)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    kind, value = pickle.loads(data) if data else ("error", f"child died, wait status {status:#x}")
    if kind != "ok":
        pytest.fail(f"in the child process:\n{value}")
    return value


def start_child(fn, *args):
    """Fork a child running ``fn(*args)``; it exits 0 on success, 1 on error."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn(*args)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def reap(pid):
    status = os.waitpid(pid, 0)[1]
    assert os.waitstatus_to_exitcode(status) == 0, f"child wait status {status:#x}"


def pattern(n, seed=1):
    """n deterministic bytes, different in every page."""
    block = bytes((i * 131 + seed * 7) & 0xFF for i in range(PAGE - 8))
    return b"".join(struct.pack("<Q", p ^ (seed << 32)) + block for p in range(-(-n // PAGE)))[:n]


def queued(fd):
    import fcntl
    import termios
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def read_exactly(fd, n):
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


@pytest.fixture
def pipe_fds():
    r, w = vm.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


# seccomp: make vmsplice fail the way gVisor (ENOSYS) or Podman (EPERM) do.
_AUDIT_ARCH = {"x86_64": (0xC000003E, 278), "aarch64": (0xC00000B7, 75)}


def block_vmsplice(err):
    """Install a seccomp filter in this process that fails vmsplice with ``err``."""
    arch, nr = _AUDIT_ARCH[platform.machine()]

    class SockFilter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                    ("k", ctypes.c_uint)]

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]

    ld_abs, jeq, ret = 0x20, 0x15, 0x06
    program = [
        SockFilter(ld_abs, 0, 0, 4),           # seccomp_data.arch
        SockFilter(jeq, 1, 0, arch),           # our architecture: go on
        SockFilter(ret, 0, 0, 0x7FFF0000),     # another: allow
        SockFilter(ld_abs, 0, 0, 0),           # seccomp_data.nr
        SockFilter(jeq, 0, 1, nr),             # vmsplice?
        SockFilter(ret, 0, 0, 0x00050000 | err),   # SECCOMP_RET_ERRNO | err
        SockFilter(ret, 0, 0, 0x7FFF0000),     # SECCOMP_RET_ALLOW
    ]
    filters = (SockFilter * len(program))(*program)
    prog = SockFprog(len(program), filters)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong]
    if libc.prctl(38, 1, None, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    if libc.prctl(22, 2, ctypes.byref(prog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        raise OSError(ctypes.get_errno(), "PR_SET_SECCOMP")


needs_seccomp = pytest.mark.skipif(platform.machine() not in _AUDIT_ARCH,
                                   reason="seccomp test filter knows x86_64 and aarch64")


# -- PageBuffer ------------------------------------------------------------------


def test_pagebuffer_is_page_aligned_private_and_rounded():
    with vm.PageBuffer(1) as buf:
        assert len(buf) == buf.size == PAGE
        assert buf.address % PAGE == 0
        maps = Path("/proc/self/maps").read_text()
        line = next(ln for ln in maps.splitlines() if int(ln.split("-")[0], 16) == buf.address)
        assert line.split()[1] == "rw-p"  # private, not shared
    with vm.PageBuffer(PAGE + 1) as buf:
        assert len(buf) == 2 * PAGE


def test_pagebuffer_is_a_writable_bytes_like_object():
    with vm.PageBuffer(2 * PAGE) as buf:
        buf[0] = 65
        buf[1:4] = b"bcd"
        assert buf[0] == 65 and buf[:4] == b"Abcd"
        view = memoryview(buf)
        view[4:6] = b"ef"
        assert bytes(view[:6]) == b"Abcdef"
        view.release()
        assert hashlib.sha256(buf).hexdigest() == hashlib.sha256(bytes(buf)).hexdigest()
        r, w = os.pipe()
        os.write(w, b"readv!")
        assert os.readv(r, [buf]) == 6 and buf[:6] == b"readv!"
        os.close(r)
        os.close(w)


def test_pagebuffer_close_with_export_and_use_after_close():
    buf = vm.PageBuffer(PAGE)
    view = memoryview(buf)
    with pytest.raises(BufferError):
        buf.close()
    view.release()
    buf.close()
    assert buf.closed
    for use in (lambda: buf[0], lambda: buf.__setitem__(0, 1), lambda: len(buf),
                lambda: buf.address, lambda: buf.discard(), lambda: memoryview(buf)):
        with pytest.raises(ValueError):
            use()
    buf.close()  # twice is fine


def test_pagebuffer_bad_sizes():
    for size in (0, -1, -(2 ** 70)):
        with pytest.raises(ValueError):
            vm.PageBuffer(size)
    with pytest.raises(ValueError):
        vm.PageBuffer(2 ** 64)
    for size in (1.5, "4096", None, True):
        with pytest.raises(TypeError):
            vm.PageBuffer(size)
    with pytest.raises(TypeError):
        vm.PageBuffer(PAGE).resize(2 * PAGE)


def test_pagebuffer_huge_rounds_to_huge_pages():
    hp = vm._hugepage_size()
    with vm.PageBuffer(1, huge=True) as buf:
        assert len(buf) == hp and buf.huge
        buf[:] = b"\1" * len(buf)
        assert buf[hp - 1] == 1


def test_discard_zeroes_exactly_the_range_and_frees_memory():
    with vm.PageBuffer(4 * PAGE) as buf:
        buf[:] = b"\7" * len(buf)
        assert vm._resident(buf) == 4 * PAGE
        buf.discard(PAGE, 2 * PAGE)
        assert vm._resident(buf) == 2 * PAGE  # before reading: zeros map the zero page
        assert buf[:PAGE] == b"\7" * PAGE
        assert buf[PAGE:3 * PAGE] == bytes(2 * PAGE)
        assert buf[3 * PAGE:] == b"\7" * PAGE
        with pytest.raises(ValueError, match=str(PAGE)):
            buf.discard(1)
        with pytest.raises(ValueError):
            buf.discard(0, 5 * PAGE)
        buf.discard()
        assert buf[:] == bytes(4 * PAGE)


# -- gift and move: the guarantees ----------------------------------------------


def test_gift_then_overwrite_reader_gets_the_original(pipe_fds):
    r, w = pipe_fds
    original = pattern(8 * PAGE)
    with vm.PageBuffer(8 * PAGE) as buf:
        buf[:] = original
        assert vm.gift(w, buf) == 8 * PAGE
        buf[:] = b"\xff" * len(buf)  # at once, while the pages are queued
        assert read_exactly(r, 8 * PAGE) == original


def test_raw_vmsplice_aliases_the_writers_pages(pipe_fds):
    """The bug gift exists to prevent: un-gifted pages stay shared with the pipe."""
    r, w = pipe_fds
    with vm.PageBuffer(PAGE) as buf:
        buf[:] = b"a" * PAGE
        assert vm.vmsplice(w, [buf]) == PAGE
        buf[:] = b"b" * PAGE
        assert read_exactly(r, PAGE) == b"b" * PAGE


def test_gifted_pages_read_as_zeros_and_are_freed(pipe_fds):
    r, w = pipe_fds
    with vm.PageBuffer(4 * PAGE) as buf:
        buf[:] = b"\x55" * len(buf)
        assert vm.gift(w, buf, PAGE, 2 * PAGE) == 2 * PAGE
        assert vm._resident(buf) == 2 * PAGE
        assert buf[PAGE:3 * PAGE] == bytes(2 * PAGE)
        assert buf[:PAGE] == buf[3 * PAGE:] == b"\x55" * PAGE
        assert read_exactly(r, 2 * PAGE) == b"\x55" * 2 * PAGE


def test_length_zero_and_empty_tail(pipe_fds):
    r, w = pipe_fds
    with vm.PageBuffer(PAGE) as buf:
        buf[:1] = b"k"
        assert vm.gift(w, buf, length=0) == 0
        assert vm.gift(w, buf, offset=PAGE) == 0
        assert buf[:1] == b"k" and queued(r) == 0
        assert vm.move(r, buf, length=0) == 0


def _send_region(w, size, seed):
    buf = vm.PageBuffer(size)
    buf[:] = pattern(size, seed)
    assert vm.gift(w, buf) == size
    assert vm._resident(buf) == 0  # everything gifted is gone from the writer
    os.close(w)


def test_64mib_region_across_processes_byte_for_byte():
    size = 64 << 20
    r, w = vm.pipe()
    pid = start_child(_send_region, w, size, 3)
    os.close(w)
    with vm.PageBuffer(size) as dst:
        assert vm.move(r, dst) == size
        assert vm.move(r, dst, 0, PAGE) == 0  # then end of file
        assert dst[:] == pattern(size, 3)
    os.close(r)
    reap(pid)


def test_move_into_bytearray_and_memoryview_slices(pipe_fds):
    r, w = pipe_fds
    data = pattern(3 * PAGE)
    os.write(w, data)
    out = bytearray(5 * PAGE)
    assert vm.move(r, out, 100, PAGE) == PAGE
    assert vm.move(r, memoryview(out)[100 + PAGE:], 0, 2 * PAGE) == 2 * PAGE
    assert out[100:100 + 3 * PAGE] == data and out[:100] == bytes(100)


def test_move_is_short_only_at_eof(pipe_fds):
    r, w = pipe_fds
    os.write(w, b"abc")
    os.close(w)
    out = bytearray(PAGE)
    assert vm.move(r, out) == 3 and out[:3] == b"abc"
    assert vm.move(r, out) == 0


def test_nonblocking_gift_short_count_discards_only_gifted_pages():
    r, w = vm.pipe(16 * PAGE)
    data = pattern(40 * PAGE)
    with vm.PageBuffer(40 * PAGE) as buf:
        buf[:] = data
        sent = vm.gift(w, buf, flags=vm.SPLICE_F_NONBLOCK)
        assert sent == 16 * PAGE
        assert buf[:sent] == bytes(sent)
        assert buf[sent:] == data[sent:]  # not gifted: intact
        with pytest.raises(BlockingIOError) as info:
            vm.gift(w, buf, sent, flags=vm.SPLICE_F_NONBLOCK)
        assert info.value.errno == errno.EAGAIN
        assert buf[sent:] == data[sent:]
        assert read_exactly(r, sent) == data[:sent]
        assert vm.gift(w, buf, sent, 8 * PAGE, flags=vm.SPLICE_F_NONBLOCK) == 8 * PAGE
        assert read_exactly(r, 8 * PAGE) == data[sent:sent + 8 * PAGE]
    os.close(r)
    os.close(w)


def test_nonblocking_move(pipe_fds):
    r, w = pipe_fds
    out = bytearray(4 * PAGE)
    with pytest.raises(BlockingIOError):
        vm.move(r, out, flags=vm.SPLICE_F_NONBLOCK)
    os.write(w, b"x" * PAGE)
    assert vm.move(r, out, flags=vm.SPLICE_F_NONBLOCK) == PAGE  # ran dry after some


def test_gift_to_a_pipe_without_reader_raises_broken_pipe(pipe_fds):
    r, w = pipe_fds
    os.close(r)
    with vm.PageBuffer(PAGE) as buf:
        buf[:4] = b"keep"
        with pytest.raises(BrokenPipeError):
            vm.gift(w, buf)
        assert buf[:4] == b"keep"  # nothing gifted, nothing dropped


def test_blocking_move_in_a_thread_while_another_gifts():
    """ctypes releases the GIL: a blocked move must not stop the gifting thread."""
    size = 16 << 20
    r, w = vm.pipe(64 * PAGE)  # small, so both sides block many times
    data = pattern(size, 5)
    got = {}

    def reader():
        with vm.PageBuffer(size) as dst:
            got["n"] = vm.move(r, dst)
            got["ok"] = dst[:] == data

    thread = threading.Thread(target=reader)
    thread.start()
    with vm.PageBuffer(size) as src:
        src[:] = data
        assert vm.gift(w, src) == size
    thread.join(60)
    assert not thread.is_alive()
    assert got == {"n": size, "ok": True}
    os.close(r)
    os.close(w)


# -- bad input: a clear error before any system call, nothing touched -------------


def _bad_calls(r, w, buf, out):
    closed = vm.PageBuffer(PAGE)
    closed.close()
    return [
        (lambda: vm.gift(w, buf, 1), ValueError, "page size"),
        (lambda: vm.gift(w, buf, 0, PAGE + 1), ValueError, "page size"),
        (lambda: vm.gift(w, buf, -PAGE), ValueError, "negative"),
        (lambda: vm.gift(w, buf, 0, -PAGE), ValueError, "negative"),
        (lambda: vm.gift(w, buf, 4 * PAGE), ValueError, "past the end"),
        (lambda: vm.gift(w, buf, PAGE, 3 * PAGE), ValueError, "past the end"),
        (lambda: vm.gift(w, bytearray(PAGE)), TypeError, "PageBuffer"),
        (lambda: vm.gift(w, memoryview(buf)), TypeError, "PageBuffer"),
        (lambda: vm.gift(w, buf, flags=0x10), ValueError, "flags 0x10"),
        (lambda: vm.gift(w, buf, flags=-1), ValueError, "flags"),
        (lambda: vm.gift(w, closed), ValueError, "closed"),
        (lambda: vm.gift(r, buf), ValueError, "write end"),
        (lambda: vm.gift(str(w), buf), TypeError, "fd must be an int"),
        (lambda: vm.gift(float(w), buf), TypeError, "fd must be an int"),
        (lambda: vm.gift(w, buf, 0.0), TypeError, "offset"),
        (lambda: vm.gift(w, buf, flags=None), TypeError, "flags"),
        (lambda: vm.move(r, b"\0" * PAGE), TypeError, "writable"),
        (lambda: vm.move(r, memoryview(bytearray(PAGE)).toreadonly()), TypeError, "writable"),
        (lambda: vm.move(r, "text"), TypeError, "bytes-like"),
        (lambda: vm.move(r, out, flags=vm.SPLICE_F_GIFT), ValueError, "flags 0x8"),
        (lambda: vm.move(r, out, flags=vm.SPLICE_F_MORE), ValueError, "flags 0x4"),
        (lambda: vm.move(r, out, -1), ValueError, "negative"),
        (lambda: vm.move(r, out, 0, 2 * PAGE), ValueError, "past the end"),
        (lambda: vm.move(r, closed), ValueError, "closed"),
        (lambda: vm.move(w, out), ValueError, "read end"),
        (lambda: vm.move(None, out), TypeError, "fd must be an int"),
        (lambda: vm.vmsplice(w, [b"x"] * (vm.IOV_MAX + 1)), ValueError, "IOV_MAX"),
        (lambda: vm.vmsplice(r, [b"x"]), TypeError, "writable"),
        (lambda: vm.vmsplice(w, [b"x"], flags=0x20), ValueError, "flags"),
        (lambda: vm.vmsplice(w, ["x"]), TypeError, "bytes-like"),
    ]


def test_bad_input_raises_before_any_system_call_and_touches_nothing(pipe_fds):
    r, w = pipe_fds
    os.write(w, b"queued")
    data = pattern(2 * PAGE, 9)
    with vm.PageBuffer(2 * PAGE) as buf:
        buf[:] = data
        out = bytearray(PAGE)
        for call, kind, words in _bad_calls(r, w, buf, out):
            with pytest.raises(kind, match=words):
                call()
            assert buf[:] == data, words
            assert out == bytes(PAGE), words
            assert queued(r) == 6, words
    assert os.read(r, 6) == b"queued"


def test_descriptors_that_are_not_pipes_say_what_they_are():
    with vm.PageBuffer(PAGE) as buf, tempfile.TemporaryFile() as f, socket.socket() as s:
        out = bytearray(PAGE)
        with pytest.raises(OSError, match="regular file, not a pipe") as info:
            vm.gift(f.fileno(), buf)
        assert info.value.errno in (errno.EBADF, errno.EINVAL)
        with pytest.raises(OSError, match="socket, not a pipe"):
            vm.gift(s.fileno(), buf)
        with pytest.raises(OSError, match="socket, not a pipe"):
            vm.move(s.fileno(), out)
        r, w = os.pipe()
        os.close(r)
        os.close(w)
        with pytest.raises(OSError, match="not open") as info:
            vm.gift(w, buf)
        assert info.value.errno == errno.EBADF
        with pytest.raises(OSError, match="not open"):
            vm.move(r, out)
        with pytest.raises(OSError, match="not open"):
            vm.vmsplice(-1, [b"x"])


def test_error_after_partial_gift_comes_on_the_next_call():
    """A reader that leaves midway: the count first, BrokenPipeError next."""
    size = 8 << 20
    r, w = vm.pipe(16 * PAGE)

    def reader():
        os.close(w)
        read_exactly(r, 32 * PAGE)
        os._exit(0)

    pid = start_child(reader)
    os.close(r)
    with vm.PageBuffer(size) as buf:
        buf[:] = pattern(size)
        sent = vm.gift(w, buf)
        assert 32 * PAGE <= sent < size and sent % PAGE == 0
        assert buf[:sent] == bytes(sent)
        assert buf[sent:] == pattern(size)[sent:]
        with pytest.raises(BrokenPipeError):
            vm.gift(w, buf, sent)
    reap(pid)
    os.close(w)


# -- the raw call, pipe() ------------------------------------------------------------


def test_raw_vmsplice_segments_both_directions(pipe_fds):
    r, w = pipe_fds
    # Kept alive and unchanged until read: the pipe holds their pages, not copies.
    sources = [b"ab", bytearray(b"cd"), memoryview(b"ef")]
    assert vm.vmsplice(w, sources) == 6
    a, b = bytearray(2), bytearray(10)
    assert vm.vmsplice(r, [a, b]) == 6
    assert bytes(a) + bytes(b[:4]) == b"abcdef"
    assert vm.vmsplice(w, []) == 0


def test_pipe_sizes():
    r, w = vm.pipe()
    import fcntl
    assert fcntl.fcntl(w, vm._F_GETPIPE_SZ) == vm._pipe_max_size()
    assert os.get_inheritable(r) is False and os.get_inheritable(w) is False
    os.close(r)
    os.close(w)
    r, w = vm.pipe(3 * PAGE)
    assert fcntl.fcntl(w, vm._F_GETPIPE_SZ) == 4 * PAGE  # rounded up to a power of two
    os.close(r)
    os.close(w)
    with pytest.raises(ValueError):
        vm.pipe(0)
    with pytest.raises(TypeError):
        vm.pipe("big")
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(PermissionError):
        vm.pipe(vm._pipe_max_size() * 2)
    assert set(os.listdir("/proc/self/fd")) == before


# -- detection ---------------------------------------------------------------------


def test_probe_on_this_machine():
    support = vm.probe(refresh=True)
    assert support is vm.probe()
    assert support.vmsplice is True
    assert support.zero_copy_gift is True
    assert support.kernel == os.uname().release
    assert support.huge_pages in ("always", "madvise", "never", "unavailable")
    assert support.pipe_max_size == vm._pipe_max_size()
    assert "vmsplice works" in support.reason
    with open("/proc/self/pagemap", "rb") as f:
        addr = id(support) // PAGE * PAGE
        f.seek(addr // PAGE * 8)
        frames_visible = struct.unpack("<Q", f.read(8))[0] & ((1 << 55) - 1) != 0
    if frames_visible:  # root: mainline copies
        assert support.move is False and "copy" in support.reason
    else:
        assert support.move is None and "CAP_SYS_ADMIN" in support.reason
    with pytest.raises(dataclass_error()):
        support.move = True
    assert "zero-copy gift" in str(support)


def dataclass_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_probe_leaves_nothing_behind():
    vm.probe(refresh=True)
    fds = sorted(os.listdir("/proc/self/fd"))
    maps = Path("/proc/self/maps").read_text().count("\n")
    for _ in range(20):
        vm.probe(refresh=True)
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert Path("/proc/self/maps").read_text().count("\n") == maps


def _transfer_under_filter(err):
    block_vmsplice(err)
    support = vm.probe(refresh=True)
    size = 4 << 20
    r, w = vm.pipe()
    pid = start_child(_send_region, w, size, 11)
    os.close(w)
    with vm.PageBuffer(size) as dst:
        got = vm.move(r, dst)
        ok = got == size and dst[:] == pattern(size, 11)
    reap(pid)
    return support, ok, vm._use_vmsplice


@needs_seccomp
@pytest.mark.parametrize("err", [errno.ENOSYS, errno.EPERM])
def test_copy_fallback_where_vmsplice_is_refused(err):
    support, ok, using = in_child(_transfer_under_filter, err)
    assert support.vmsplice is False
    assert support.zero_copy_gift is None and support.move is None
    assert errno.errorcode[err] in support.reason
    assert ok and using is False


# -- the command line and the README -------------------------------------------------


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vmsplicemove", *args], cwd=HERE,
                          capture_output=True, text=True, timeout=timeout)


def test_cli_probe_json_has_the_support_fields():
    done = run_cli("probe", "--json")
    assert done.returncode == 0, done.stderr
    fields = json.loads(done.stdout)
    assert list(fields) == ["vmsplice", "zero_copy_gift", "move", "huge_pages",
                            "pipe_max_size", "kernel", "reason"]
    assert fields["vmsplice"] is True
    plain = run_cli("probe")
    assert plain.returncode == 0 and "zero-copy gift" in plain.stdout


def test_cli_demo_small_region():
    done = run_cli("demo", "--size", "8M")
    assert done.returncode == 0, done.stderr
    assert "every byte verified" in done.stdout
    assert re.search(r"gift \+ move .* GiB/s", done.stdout)
    assert "writer memory freed along the way: 8.0 MiB of 8.0 MiB" in done.stdout


@pytest.mark.parametrize("args", [["demo", "--size", "lots"], ["nothing"], [], ["demo", "--size", "1"]])
def test_cli_bad_arguments_exit_2(args):
    assert run_cli(*args).returncode == 2


def readme_examples():
    text = (HERE / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_has_examples():
    assert len(readme_examples()) >= 3


@pytest.mark.parametrize("index", range(len(readme_examples())))
def test_readme_example_runs(index):
    code = readme_examples()[index]
    done = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
