"""Tests of vmsplicemove: real pipes, real processes, nothing mocked that can run."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import pickle
import platform
import re
import select
import signal
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

HERE = Path(__file__).resolve().parent
PAGE = vm.PAGE_SIZE


# -- helpers -------------------------------------------------------------------


def child_watchdog():
    """conftest's watchdog is a thread, and threads do not survive fork():
    a child that hangs is ended by SIGALRM instead (a test that sets its own
    timer replaces this one)."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(300)


def in_child(fn, *args):
    """Run ``fn(*args)`` in a forked child; return its (pickled) result or
    fail with the child's traceback."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        child_watchdog()
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


def start_child(fn, *args, close=()):
    """Fork a child running ``fn(*args)``; it exits 0 on success, 1 on error.
    It first closes ``close``, the parent's pipe ends, so that either side
    sees EOF or EPIPE when the other dies."""
    def watched():
        child_watchdog()
        fn(*args)
    return vm._in_child(watched, close=close)


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
    pid = start_child(_send_region, w, size, 3, close=[r])
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
        read_exactly(r, 32 * PAGE)
        os._exit(0)

    pid = start_child(reader, close=[w])
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
    pid = start_child(_send_region, w, size, 11, close=[r])
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


def test_demo_and_bench_verification_finds_a_wrong_byte():
    with vm.PageBuffer(3 << 20) as buf:
        vm._fill(buf, 5)
        assert vm._mismatch(buf, 5, len(buf)) is None
        buf[(2 << 20) + 12345] ^= 1
        assert vm._mismatch(buf, 5, len(buf)) == (2 << 20) + 12345
        assert vm._mismatch(buf, 6, PAGE) is not None  # another seed: another page


def test_cli_bench_runs_every_scenario_with_tiny_sizes():
    done = run_cli("bench", "--json", "--runs", "1", "--size", "1M", "--chunk", "64K")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["kernel"] == os.uname().release and result["pipe_size"] > 0
    scenarios = result["scenarios"]
    assert set(scenarios) == {"migrate", "stream", "calls"}
    assert set(scenarios["migrate"]["methods"]) == {"gift", "gift-4k", "plain-fresh", "plain-prefaulted"}
    assert set(scenarios["stream"]["methods"]) == {"gift", "plain"}
    assert set(scenarios["calls"]["methods"]) == {"public", "bare-ctypes"}
    for scenario in scenarios.values():
        for entry in scenario["methods"].values():
            assert len(entry["runs_s"]) == 1 and entry["median_s"] > 0
        for ratio in scenario["ratios"].values():
            assert ratio["value"] >= 0 and isinstance(ratio["met"], bool)
    assert scenarios["migrate"]["methods"]["gift"]["writer_region_resident"] == 0
    assert scenarios["stream"]["bound"]["chunk"] == 64 << 10
    text = run_cli("bench", "calls", "--runs", "1", "--size", "64K")
    assert text.returncode == 0 and "public / bare-ctypes" in text.stdout
    assert run_cli("bench", "nope").returncode == 2


@pytest.mark.parametrize("args", [["demo", "--size", "lots"], ["nothing"], [], ["demo", "--size", "1"],
                                  ["bench", "--runs", "0"]])
def test_cli_bad_arguments_exit_2(args):
    assert run_cli(*args).returncode == 2


def test_module_docstring_example():
    import doctest
    assert doctest.testmod(vm).failed == 0


def test_raw_vmsplice_wants_a_sequence(pipe_fds):
    with pytest.raises(TypeError, match="sequence"):
        vm.vmsplice(pipe_fds[1], b"abc")
    assert queued(pipe_fds[0]) == 0


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


# ===================================================================================
# Reliability: faults, sandboxes, signals, peers that die, misuse, soak.


# -- peers that die -------------------------------------------------------------------


def test_reader_killed_during_a_large_gift():
    size = 64 << 20
    r, w = vm.pipe()
    data = pattern(size, 21)

    def reader():
        read_exactly(r, 3 << 20)
        os.kill(os.getpid(), signal.SIGKILL)

    pid = start_child(reader, close=[w])
    os.close(r)
    with vm.PageBuffer(size) as buf:
        buf[:] = data
        sent = vm.gift(w, buf)  # returns once the pipe is broken: no hang
        assert 3 << 20 <= sent < size and sent % PAGE == 0
        assert vm._resident(buf) == size - sent  # exactly the gifted pages dropped
        assert buf[:sent] == bytes(sent)
        assert buf[sent:] == data[sent:]
        with pytest.raises(BrokenPipeError):
            vm.gift(w, buf, sent)
        assert buf[sent:] == data[sent:]
    assert os.waitpid(pid, 0)[1] & 0x7F == signal.SIGKILL
    os.close(w)


def test_writer_killed_during_a_move():
    size = 64 << 20
    r, w = vm.pipe()
    pid = start_child(_send_region, w, size, 22, close=[r])
    os.close(w)
    data = pattern(size, 22)
    with vm.PageBuffer(size) as dst:
        first = vm.move(r, dst, 0, 8 << 20)
        assert first == 8 << 20
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        rest = vm.move(r, dst, first)  # what was queued, then end of file
        assert rest <= vm._pipe_max_size() and rest % PAGE == 0
        assert vm.move(r, dst, first + rest) == 0
        got = first + rest
        assert dst[:got] == data[:got]
        assert dst[got:] == bytes(size - got)  # nothing after it
    os.close(r)


# -- signals ----------------------------------------------------------------------------


def _send_under_timer(w, size, seed):
    ticks = [0]
    signal.signal(signal.SIGALRM, lambda *_: ticks.__setitem__(0, ticks[0] + 1))
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        _send_region(w, size, seed)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    assert ticks[0] > 10, ticks


@pytest.mark.parametrize("huge", [False, True])
def test_256mib_under_a_timer_signal_every_millisecond(huge):
    size = 256 << 20
    r, w = vm.pipe()
    pid = start_child(_send_under_timer, w, size, 23, close=[r])
    os.close(w)
    ticks = [0]
    old = signal.signal(signal.SIGALRM, lambda *_: ticks.__setitem__(0, ticks[0] + 1))
    signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
    try:
        with vm.PageBuffer(size, huge=huge) as dst:
            got = 0
            while got < size:  # small moves: many calls, many interrupted waits
                n = vm.move(r, dst, got, min(size - got, 3 << 20))
                assert n > 0
                got += n
            signal.setitimer(signal.ITIMER_REAL, 0)
            assert dst[:] == pattern(size, 23)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        os.close(r)
    reap(pid)
    assert ticks[0] > 10


@pytest.mark.parametrize("huge", [False, True])
def test_keyboard_interrupt_during_a_blocking_gift_leaves_no_gifted_page_mapped(huge):
    r, w = vm.pipe(16 * PAGE)  # nobody reads: gift blocks once 16 pages are queued
    size = 64 * PAGE if not huge else vm._HUGE_PAGE_SIZE
    data = pattern(size, 24)
    interrupter = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    with vm.PageBuffer(size, huge=huge) as buf:
        buf[:] = data
        interrupter.start()
        with pytest.raises(KeyboardInterrupt) as info:
            vm.gift(w, buf)
        sent = info.value.transferred
        assert sent == 16 * PAGE
        assert vm._resident(buf) == size - sent
        assert buf[sent:] == data[sent:]  # not gifted: intact
        buf[:] = b"\xee" * size  # a write to a gifted page must not reach the pipe
        assert read_exactly(r, sent) == data[:sent]
        assert queued(r) == 0
    interrupter.join()
    os.close(r)
    os.close(w)


def test_keyboard_interrupt_during_a_blocking_move_keeps_the_count(pipe_fds):
    r, w = pipe_fds
    os.write(w, b"x" * 3 * PAGE)
    out = bytearray(8 * PAGE)
    interrupter = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    interrupter.start()
    with pytest.raises(KeyboardInterrupt) as info:
        vm.move(r, out)
    interrupter.join()
    assert info.value.transferred == 3 * PAGE
    assert out[:3 * PAGE] == b"x" * 3 * PAGE and out[3 * PAGE:] == bytes(5 * PAGE)


# -- non-blocking pipes -------------------------------------------------------------------


def test_nonblocking_full_empty_and_half_full_pipes():
    r, w = vm.pipe(16 * PAGE)
    data = pattern(32 * PAGE, 25)
    with vm.PageBuffer(32 * PAGE) as buf, vm.PageBuffer(32 * PAGE) as dst:
        buf[:] = data
        nb = vm.SPLICE_F_NONBLOCK
        with pytest.raises(BlockingIOError):  # empty
            vm.move(r, dst, flags=nb)
        assert vm.gift(w, buf, 0, 8 * PAGE, flags=nb) == 8 * PAGE   # now half full
        assert vm.gift(w, buf, 8 * PAGE, flags=nb) == 8 * PAGE      # takes exactly the rest
        assert buf[16 * PAGE:] == data[16 * PAGE:]
        with pytest.raises(BlockingIOError):  # full
            vm.gift(w, buf, 16 * PAGE, flags=nb)
        assert buf[16 * PAGE:] == data[16 * PAGE:]
        assert vm.move(r, dst, 0, 5 * PAGE, flags=nb) == 5 * PAGE    # partly drained
        assert vm.gift(w, buf, 16 * PAGE, flags=nb) == 5 * PAGE      # page-exact refill
        assert vm.move(r, dst, 5 * PAGE, flags=nb) == 16 * PAGE      # all of it, dry after
        assert dst[:21 * PAGE] == data[:21 * PAGE]                   # no page lost or doubled
        assert buf[21 * PAGE:] == data[21 * PAGE:]
        with pytest.raises(BlockingIOError):
            vm.move(r, dst, flags=nb)
    os.close(r)
    os.close(w)


# -- randomised transfers between two processes ----------------------------------------------


def _random_cases(seed, count):
    import random
    rng = random.Random(seed)
    for i in range(count):
        pages = rng.choice([1, 2, 3, 7, 16, 64, 300, rng.randint(1, 1100)])
        first = rng.randint(0, 3)
        yield {
            "index": i,
            "seed": rng.getrandbits(32),
            "pages": pages,
            "first": first,                                  # gift starts this many pages in
            "huge": rng.random() < 0.15,
            "gift_chunks": rng.choice([None, 1, 5, 64]),      # pages per gift call; None: one call
            "gift_nonblocking": rng.random() < 0.4,
            "more": rng.random() < 0.2,
            "dest": rng.choice(["pagebuffer", "bytearray", "memoryview"]),
            "dest_offset": rng.choice([0, 0, 1, 100, PAGE]),
            # bytes per move call; single bytes only where that stays quick
            "move_chunk": rng.choice([None, 4095, PAGE, 3 * PAGE + 5, 1 << 20]
                                     + ([1, 7] if pages <= 3 else [])),
            "move_nonblocking": rng.random() < 0.4,
        }


def _case_bytes(case):
    import random
    return random.Random(case["seed"]).randbytes(case["pages"] * PAGE)


def _random_writer(w, cases):
    for case in cases:
        data = _case_bytes(case)
        first = case["first"] * PAGE
        end = first + len(data)
        with vm.PageBuffer(end, huge=case["huge"]) as buf:  # huge: rounded up to 2 MiB
            buf[:first] = b"\x5a" * first
            buf[first:end] = data
            buf[end:] = b"\xa5" * (len(buf) - end)
            flags = (vm.SPLICE_F_NONBLOCK if case["gift_nonblocking"] else 0) | \
                    (vm.SPLICE_F_MORE if case["more"] else 0)
            step = (case["gift_chunks"] or case["pages"]) * PAGE
            pos = first
            while pos < end:
                try:
                    pos += vm.gift(w, buf, pos, min(step, end - pos), flags=flags)
                except BlockingIOError:
                    select.select([], [w], [])
            if (buf[:first] != b"\x5a" * first or buf[first:end] != bytes(len(data))
                    or buf[end:] != b"\xa5" * (len(buf) - end)):
                raise AssertionError(f"case {case['index']}: writer pages wrong after gift")
    os.close(w)


def _random_reader(r, cases, seed):
    for case in cases:
        expected = hashlib.sha256(_case_bytes(case)).hexdigest()
        n = case["pages"] * PAGE
        off = case["dest_offset"]
        if case["dest"] == "pagebuffer":
            dest = vm.PageBuffer(off + n)
        elif case["dest"] == "bytearray":
            dest = bytearray(off + n)
        else:
            dest = memoryview(bytearray(off + n + 7))[3:3 + off + n]
        flags = vm.SPLICE_F_NONBLOCK if case["move_nonblocking"] else 0
        got = 0
        while got < n:
            want = min(n - got, case["move_chunk"] or n)
            try:
                k = vm.move(r, dest, off + got, want, flags=flags)
            except BlockingIOError:
                select.select([r], [], [])
                continue
            assert k > 0, f"seed {seed} case {case['index']}: unexpected end of file"
            got += k
        digest = hashlib.sha256(memoryview(dest)[off:off + n]).hexdigest()
        assert digest == expected, f"seed {seed} case {case['index']}: data differs ({case})"
        if isinstance(dest, vm.PageBuffer):
            dest.close()
    assert vm.move(r, bytearray(1)) == 0, f"seed {seed}: bytes after the last case"


def _random_session(seed, count):
    cases = list(_random_cases(seed, count))
    r, w = vm.pipe(rng_pipe_size(seed))
    pid = start_child(_random_writer, w, cases, close=[r])
    os.close(w)
    try:
        _random_reader(r, cases, seed)
    finally:
        os.close(r)
    status = os.waitpid(pid, 0)[1]
    assert status == 0, f"seed {seed}: writer failed (status {status:#x}); replay with this seed"


def rng_pipe_size(seed):
    return [16 * PAGE, 64 * PAGE, None][seed % 3]


def test_randomised_transfers(soak):
    sessions = 40 if soak else 8
    per_session = 2500 if soak else 260  # 2,080 cases by default
    for seed in range(1000, 1000 + sessions):
        _random_session(seed, per_session)


@needs_seccomp
def test_randomised_transfers_through_the_copy_fallback(soak):
    def run():
        block_vmsplice(errno.EPERM)
        for seed in range(2000, 2000 + (8 if soak else 2)):
            _random_session(seed, 100)
        return vm._use_vmsplice
    assert in_child(run) is False


# -- leaks -------------------------------------------------------------------------------


def _process_state():
    maps = [ln.split()[0] for ln in Path("/proc/self/maps").read_text().splitlines()]
    return sorted(os.listdir("/proc/self/fd")), len(maps), vm._status_kib("VmRSS") << 10


def test_no_leaks_over_many_cycles_and_probes(soak):
    cycles, probes = (500_000, 10_000) if soak else (50_000, 1_000)
    r, w = vm.pipe()
    src, dst = vm.PageBuffer(PAGE), vm.PageBuffer(PAGE)
    for i in range(1000):  # warm up: allocator pools, caches
        vm.gift(w, src)
        vm.move(r, dst)
        vm.probe(refresh=i % 10 == 0)
    fds, maps, rss = _process_state()
    for i in range(cycles):
        src[0] = i & 0xFF
        vm.gift(w, src)
        vm.move(r, dst)
        assert dst[0] == i & 0xFF
    for _ in range(probes):
        vm.probe(refresh=True)
    fds2, maps2, rss2 = _process_state()
    assert fds2 == fds
    assert maps2 == maps
    assert rss2 - rss < 8 << 20, (rss, rss2)
    src.close()
    dst.close()
    os.close(r)
    os.close(w)


# -- misuse cannot crash the interpreter ---------------------------------------------------------


def _misuse_matrix():
    import array
    import mmap as mmap_module
    r, w = vm.pipe(16 * PAGE)
    closed = vm.PageBuffer(PAGE)
    closed.close()
    live = vm.PageBuffer(2 * PAGE)
    shared = mmap_module.mmap(-1, PAGE)
    f = tempfile.TemporaryFile()  # noqa: SIM115 -- closed at the end, with the others
    s = socket.socket()
    dead_r, dead_w = os.pipe()
    os.close(dead_r)
    os.close(dead_w)
    buffers = {
        "bytes": b"\0" * PAGE, "bytearray": bytearray(PAGE), "str": "x" * PAGE, "int": PAGE,
        "None": None, "list": [0] * PAGE, "array": array.array("d", [0.0] * 512),
        "shared mmap": shared, "closed PageBuffer": closed,
        "strided view": memoryview(bytearray(2 * PAGE))[::2],
        "2-d view": memoryview(bytearray(PAGE)).cast("B", (64, 64)),
        "readonly view": memoryview(bytearray(PAGE)).toreadonly(),
        "ctypes array": (ctypes.c_char * PAGE)(),
    }
    fds = {"file": f.fileno(), "socket": s.fileno(), "closed": dead_w, "negative": -5,
           "huge": 2 ** 40, "str": "3", "float": 3.0, "bool": True}
    sizes = [-1, 0, 2 ** 63, 2 ** 80, 1.5, "1", None]
    outcomes = []

    def attempt(label, call):
        try:
            call()
            outcomes.append((label, "ok"))
        except (TypeError, ValueError, OSError, BufferError, OverflowError) as exc:
            outcomes.append((label, type(exc).__name__))

    for name, obj in buffers.items():
        attempt(f"gift {name}", lambda obj=obj: vm.gift(w, obj))
        attempt(f"move {name}", lambda obj=obj: vm.move(r, obj, flags=vm.SPLICE_F_NONBLOCK))
        attempt(f"vmsplice w {name}", lambda obj=obj: vm.vmsplice(w, [obj], vm.SPLICE_F_NONBLOCK))
        attempt(f"vmsplice r {name}", lambda obj=obj: vm.vmsplice(r, [obj], vm.SPLICE_F_NONBLOCK))
    for name, fd in fds.items():
        attempt(f"gift fd {name}", lambda fd=fd: vm.gift(fd, live))
        attempt(f"move fd {name}", lambda fd=fd: vm.move(fd, live, flags=vm.SPLICE_F_NONBLOCK))
        attempt(f"vmsplice fd {name}", lambda fd=fd: vm.vmsplice(fd, [b"x"]))
    for size in sizes:
        attempt(f"PageBuffer({size!r})", lambda size=size: vm.PageBuffer(size))
        attempt(f"pipe({size!r})", lambda size=size: os.close(vm.pipe(size)[0]))
        attempt(f"gift length {size!r}", lambda size=size: vm.gift(w, live, 0, size))
        attempt(f"move offset {size!r}", lambda size=size: vm.move(r, live, size, flags=vm.SPLICE_F_NONBLOCK))
        attempt(f"discard {size!r}", lambda size=size: live.discard(0, size))
    view = memoryview(live)
    attempt("close with a live export", live.close)
    view.release()
    live.close()
    for label, use in [("index", lambda: live[0]), ("slice", lambda: live[:1]),
                       ("assign", lambda: live.__setitem__(0, 1)), ("len", lambda: len(live)),
                       ("memoryview", lambda: memoryview(live)), ("address", lambda: live.address),
                       ("discard", live.discard), ("gift", lambda: vm.gift(w, live)),
                       ("move", lambda: vm.move(r, live)), ("vmsplice", lambda: vm.vmsplice(w, [live]))]:
        attempt(f"after close: {label}", use)
    f.close()
    s.close()
    shared.close()
    os.close(r)
    os.close(w)
    return outcomes


def test_misuse_gets_its_documented_exception_and_never_crashes():
    outcomes = dict(in_child(_misuse_matrix))  # a crash would kill only the child
    for name in ("bytes", "bytearray", "str", "int", "None", "list", "array", "shared mmap",
                 "strided view", "2-d view", "readonly view", "ctypes array"):
        assert outcomes[f"gift {name}"] == "TypeError", name  # only PageBuffers are gifted
    assert outcomes["gift closed PageBuffer"] == "ValueError"
    for name in ("bytes", "str", "int", "None", "list", "strided view", "readonly view"):
        assert outcomes[f"move {name}"] == "TypeError", name
    for name in ("bytearray", "array", "shared mmap", "2-d view", "ctypes array"):
        # valid: it reads what an earlier case queued, or finds the pipe empty
        assert outcomes[f"move {name}"] in ("ok", "BlockingIOError"), name
    assert outcomes["move closed PageBuffer"] == "ValueError"
    assert outcomes["vmsplice r bytes"] == "TypeError"
    assert outcomes["vmsplice w bytes"] == "ok"
    for fd in ("file", "socket", "closed", "negative", "huge"):
        for call in ("gift", "move", "vmsplice"):
            assert outcomes[f"{call} fd {fd}"] == "OSError", (call, fd)
    for fd in ("str", "float", "bool"):
        for call in ("gift", "move", "vmsplice"):
            assert outcomes[f"{call} fd {fd}"] == "TypeError", (call, fd)
    for size, kind in [(-1, "ValueError"), (0, "ValueError"), (2 ** 63, "ValueError"),
                       (2 ** 80, "ValueError"), (1.5, "TypeError"), ("1", "TypeError")]:
        assert outcomes[f"PageBuffer({size!r})"] == kind, size
        if size != 0:  # a zero length is valid: nothing to do
            assert outcomes[f"gift length {size!r}"] == kind, size
            assert outcomes[f"discard {size!r}"] == kind, size
            assert outcomes[f"move offset {size!r}"] == kind, size
    assert outcomes["gift length 0"] == outcomes["discard 0"] == "ok"
    assert outcomes["move offset 0"] == "BlockingIOError"
    assert outcomes["PageBuffer(None)"] == "TypeError"
    for size, kind in [(-1, "ValueError"), (0, "ValueError"), (2 ** 63, "ValueError"),
                       (2 ** 80, "ValueError"), (1.5, "TypeError"), ("1", "TypeError"),
                       (None, "ok")]:
        assert outcomes[f"pipe({size!r})"] == kind, size
    assert outcomes["close with a live export"] == "BufferError"
    for label, kind in outcomes.items():
        if label.startswith("after close"):
            assert kind == "ValueError", label


def test_close_while_another_thread_is_blocked_in_move(pipe_fds):
    r, w = pipe_fds
    buf = vm.PageBuffer(4 * PAGE)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("n", vm.move(r, buf)))
    thread.start()
    import time
    time.sleep(0.1)
    with pytest.raises(BufferError):
        buf.close()  # the kernel may be writing into it: refused, not a crash
    os.write(w, b"y" * 4 * PAGE)
    thread.join(10)
    assert result == {"n": 4 * PAGE} and buf[:] == b"y" * 4 * PAGE
    buf.close()


# -- threads --------------------------------------------------------------------------------


def test_threads_gift_and_move_on_several_pipes_at_once(soak):
    pipes, size = (8, 64 << 20) if soak else (4, 8 << 20)
    results = {}

    def writer(i, w):
        with vm.PageBuffer(size, huge=i % 2 == 1) as buf:
            buf[:] = pattern(size, 30 + i)
            for pos in range(0, size, 1 << 20):  # many calls, interleaved with the others
                assert vm.gift(w, buf, pos, 1 << 20) == 1 << 20
        os.close(w)

    def reader(i, r):
        dst = bytearray(size) if i % 2 else vm.PageBuffer(size)
        got = 0
        while got < size:
            n = vm.move(r, dst, got, min(size - got, 777 * 1000))
            if n == 0:
                break
            got += n
        assert vm.move(r, bytearray(1)) == 0  # and nothing after it
        results[i] = (got, hashlib.sha256(memoryview(dst)[:got]).hexdigest())
        os.close(r)

    threads = []
    for i in range(pipes):
        r, w = vm.pipe(64 * PAGE)
        threads += [threading.Thread(target=writer, args=(i, w)),
                    threading.Thread(target=reader, args=(i, r))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    for i in range(pipes):
        assert results[i] == (size, hashlib.sha256(pattern(size, 30 + i)).hexdigest()), i
