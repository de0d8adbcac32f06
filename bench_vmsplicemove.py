#!/usr/bin/env python3
"""Benchmark of vmsplicemove: gift and move, handoff, against plain copies.

    python3 bench_vmsplicemove.py [--json] [--runs N] [--size SIZE] [--chunk SIZE] [SCENARIO ...]

Each scenario times its methods interleaved (the machine's noise hits them
all), the median of ``--runs`` after a warm-up, and verifies every byte after
every run.  The ratios are measured in the same run and compared with the
project's targets; the header gives this machine's limits beside them (memcpy
bandwidth, the cost of a 4 KiB and of a huge-page fault, the module's import
time).  Not part of the vendored module: it imports the module's private helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

import vmsplicemove as vm
from vmsplicemove import PAGE_SIZE, SPLICE_F_GIFT, SPLICE_F_MOVE, PageBuffer, gift, move, pipe, probe

# -- migrate: a region filled in a child process, brought to its parent -------

# method: the keyword arguments of vm._migrate (huge: the writer's PageBuffer,
# reader_huge: the reader's, None being the default choice), and prefault: the
# reader's memory faulted in before the clock starts
MIGRATE_METHODS: dict = {
    "gift": {"how": "gift"},  # the default PageBuffer: huge pages for whole huge pages
    "gift-4k": {"how": "gift", "huge": False, "reader_huge": False},
    "plain-fresh": {"how": "plain", "reader_huge": False},  # os.write, os.readv into new memory
    "plain-prefaulted": {"how": "plain", "reader_huge": False, "prefault": True},
    "handoff": {"how": "handoff"},  # a sealed memfd over a Unix socket
}


def _private_rss() -> int:
    """This process's resident memory, without shared memory (a handoff's memfd is the sender's)."""
    return (vm._status_kib("VmRSS") - vm._status_kib("RssShmem")) << 10


def _migrate_once(size: int, method: str, seed: int) -> dict:
    """One vm._migrate run, with what the demo does not need: the prefault,
    the time until a byte of every page was read, and the memory peaks."""
    options = dict(MIGRATE_METHODS[method])
    prefault = options.pop("prefault", False)
    marks: dict = {}

    def watch(stage: str, dst: PageBuffer | None) -> dict:
        if stage == "go":
            with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # Linux 4.0+: VmHWM starts again from the current RSS
            marks["rss"] = _private_rss()
            if prefault and dst is not None:  # not timed, but counted in the peaks
                dst[::PAGE_SIZE] = bytes(size // PAGE_SIZE)
            marks["start"] = time.perf_counter()
            return {}
        assert dst is not None
        _ = dst[:size:PAGE_SIZE]  # a byte of every page: a handoff's reader faults them in here
        return {"pages_s": time.perf_counter() - marks["start"], "grown": _private_rss() - marks["rss"],
                "parent_peak": vm._status_kib("VmHWM") << 10}

    run = vm._migrate(size, seed=seed, watch=watch, **options)
    # Both processes at their peak: the writer's filled region and what the reader added.
    run["peak_both"] = run["writer_filled"] + max(run["grown"], 0)
    return run


# -- stream: one reused buffer refilled and sent, chunk after chunk -----------

STREAM_METHODS = ("gift", "plain")


def _stream_source(chunk: int, seed: int) -> bytes:
    source = bytearray(chunk)
    vm._fill(source, seed)
    return bytes(source)


def _read_into(fd: int, buf: PageBuffer, length: int) -> int:
    """os.readv into ``buf[:length]`` until it is full or the pipe ends."""
    got = 0
    with memoryview(buf) as view:
        while got < length:
            n = os.readv(fd, [view[got:length]])
            if not n:
                break
            got += n
    return got


def _stream_writer(w: int, status: int, chunk: int, count: int, method: str, seed: int) -> None:
    source = _stream_source(chunk, seed)
    # Each gift leaves the buffer without pages and the refill faults them
    # back in: huge pages make that one fault per 2 MiB, where they fit.
    buf = PageBuffer(chunk, huge=None if method == "gift" else False)
    buf[:] = source
    os.write(status, b"R")
    for i in range(count):
        buf[:] = source
        struct.pack_into("<Q", buf, 0, i)
        sent = gift(w, buf) if method == "gift" else os.write(w, buf)  # a blocking pipe: all of it
        if sent != chunk:
            raise RuntimeError(f"chunk {i}: sent {sent} of {chunk} bytes")
    os.close(w)


def _stream_once(chunk: int, count: int, method: str, seed: int) -> dict:
    source = _stream_source(chunk, seed)[8:]
    with PageBuffer(chunk) as dst, \
            vm._writer_child(_stream_writer, chunk, count, method, seed) as (r, sr):
        vm._status(sr)  # "R": the writer is ready
        start = time.perf_counter()
        for i in range(count):
            got = move(r, dst) if method == "gift" else _read_into(r, dst, chunk)
            if got != chunk or struct.unpack_from("<Q", dst)[0] != i or dst.find(source, 8) != 8:
                raise RuntimeError(f"stream {method}: chunk {i} arrived wrong")
        seconds = time.perf_counter() - start
    return {"seconds": seconds}


def _refault_cost(chunk: int) -> dict:
    """What gifting a reused buffer trades: the refill of a gifted chunk
    faults every page back in, zeroed; a plain write costs one more copy.
    For huge pages also the refill after a drop in two halves, as a gift
    through a pipe of half a huge page leaves it without the module's re-drop
    of the whole huge page: 512 small faults."""
    source = _stream_source(chunk, 1)
    refill, copy, split = [], [], []
    half = vm._HUGE_PAGE_SIZE // 2
    with PageBuffer(chunk) as buf:
        buf[:] = source
        for _ in range(21):
            buf.discard()
            start = time.perf_counter()
            buf[:] = source  # into dropped pages: fault, zero, copy
            middle = time.perf_counter()
            buf[:] = source  # into present pages: copy
            refill.append(middle - start)
            copy.append(time.perf_counter() - middle)
            if buf.huge:
                for offset in range(0, chunk, half):
                    buf.discard(offset, half)
                start = time.perf_counter()
                buf[:] = source
                split.append(time.perf_counter() - start)
                buf.discard()  # a fresh huge page for the next round
                buf[:] = source
        huge = buf.huge
    result = {"chunk": chunk, "huge_pages": huge, "copy_us": _median(copy) * 1e6,
              "faults_us": (_median(refill) - _median(copy)) * 1e6}
    if split:
        result["split_faults_us"] = (_median(split) - _median(copy)) * 1e6
    return result


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
            src_iov = vm._pack_iovec(src.address, PAGE_SIZE)
            dst_iov = vm._pack_iovec(dst.address, PAGE_SIZE)
            address, dontneed, gift_flags = src.address, vm._MADV_DONTNEED, SPLICE_F_GIFT | SPLICE_F_MOVE
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


# -- chain: a region handed on through hops, as live updates do ------

CHAIN_METHODS = ("shared", "sealed")
CHAIN_HOPS = 3  # handoffs: first sender -> hop -> hop -> this process


def _chain_take(sock: socket.socket, shared: bool) -> PageBuffer:
    return vm.takeover(sock, shared=shared)


def _chain_first(sock: socket.socket, status: int, size: int, shared: bool, seed: int) -> None:
    buf = PageBuffer(size, memfd=True)
    vm._fill(buf, seed)
    os.write(status, b"R")
    if os.read(status, 1) == b"G":
        start = time.perf_counter()  # the chain begins as the first version hands off (CLOCK_MONOTONIC)
        vm.handoff(sock, buf, shared=shared)
        os.write(status, struct.pack("d", start))
        os.read(status, 1)  # as _chain_hop


def _chain_hop(left: socket.socket, right: socket.socket, status: int, shared: bool) -> None:
    buf = _chain_take(left, shared)
    if not shared:  # sealed pages cannot be handed on: the copy each later hop needs
        copy = PageBuffer(len(buf), memfd=True)
        copy[:] = buf
        buf.close()
        buf = copy
    vm.handoff(right, buf, shared=shared)
    os.read(status, 1)  # exit once the chain is timed (see _chain_once)


def _chain_once(size: int, method: str, seed: int) -> dict:
    """``size`` bytes filled in a child, handed through CHAIN_HOPS - 1 more
    children to this process, which reads a byte of every page: the time
    from the first handoff's start (the first child's clock; the go signal
    that wakes it is not part of the chain) until that read is done.  Each
    version exits only then, as the status socket closes: the teardown of a
    process forked from this one takes 1.4 to 1.8 ms of a core here, which on
    two cores the next version would wait for, in both chains alike; a live
    update's successor does not wait for its predecessor's exit."""
    shared = method == "shared"
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(CHAIN_HOPS)]
    status, status_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    everything = [s.fileno() for pair in pairs for s in pair] + [status.fileno(), status_child.fileno()]

    def keep(*socks: socket.socket) -> list:  # what a child closes: every descriptor but its own
        return [fd for fd in everything if fd not in {s.fileno() for s in socks}]
    pids = [vm._in_child(_chain_first, pairs[0][0], status_child.fileno(), size, shared, seed,
                         close=keep(pairs[0][0], status_child))]
    for hop in range(1, CHAIN_HOPS):
        left, right = pairs[hop - 1][1], pairs[hop][0]
        pids.append(vm._in_child(_chain_hop, left, right, status_child.fileno(), shared,
                                 close=keep(left, right, status_child)))
    last = pairs[-1][1]
    try:
        for sock in (s for pair in pairs for s in pair if s is not last):
            sock.close()
        status_child.close()
        vm._status(status.fileno())  # "R": the first sender has filled its region
        status.send(b"G")
        try:
            dst = _chain_take(last, shared)
        except EOFError:
            raise RuntimeError(f"chain {method}: a hop failed (its traceback is above)") from None
        _ = dst[::PAGE_SIZE]  # a byte of every page
        seconds = time.perf_counter() - struct.unpack("d", status.recv(8))[0]
        bad = vm._mismatch(dst, seed, size)
        dst.close()
        if bad is not None:
            raise RuntimeError(f"chain {method}: data differs at byte {bad} of {size}")
    finally:
        last.close()
        status.close()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
            os.waitpid(pid, 0)
    return {"seconds": seconds}


# -- this machine's limits --------------------------------------------------------


def _copy_bandwidth(size: int) -> float:
    """The machine's memcpy bandwidth in bytes/s, between faulted buffers."""
    a, b = bytearray(b"\1") * size, bytearray(size)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        b[:] = a
        best = min(best, time.perf_counter() - start)
    return size / best


def _fault_costs(size: int = 64 << 20) -> dict:
    """One page fault here, zeroing included, in microseconds: a byte written to every
    page of fresh memory, 4 KiB pages and huge pages (None where the kernel gave none),
    the median of 5."""
    costs: dict = {}
    for key, huge, step in (("fault_4k_us", False, PAGE_SIZE), ("fault_huge_us", True, vm._HUGE_PAGE_SIZE)):
        times, real = [], True
        for _ in range(5):
            with PageBuffer(size, huge=huge) as buf:
                start = time.perf_counter()
                buf[::step] = b"\1" * (size // step)
                times.append(time.perf_counter() - start)
                real = real and vm._resident(buf) == size  # huge pages: all of each one is there
        costs[key] = _median(times) / (size // step) * 1e6 if real else None
    return costs


def _fill_cost(size: int, runs: int) -> dict:
    """Creating and filling (memset) ``size`` bytes of a private PageBuffer and of a memfd
    one, each with its default huge-page choice: the medians of ``runs``, in seconds."""
    out: dict = {}
    for kind, memfd in (("private", False), ("memfd", True)):
        create, fill = [], []
        for _ in range(runs):
            start = time.perf_counter()
            buf = PageBuffer(size, memfd=memfd)
            middle = time.perf_counter()
            ctypes.memset(buf.address, 0x5A, size)
            fill.append(time.perf_counter() - middle)
            create.append(middle - start)
            huge = buf.huge
            buf.close()  # not by "with": mmap's __exit__ skips PageBuffer.close, leaving the memfd open
            del buf
        out[kind] = {"create_s": _median(create), "fill_s": _median(fill), "huge": huge}
    return out


def _import_time(runs: int = 5) -> dict:
    """``import vmsplicemove`` in fresh interpreters (``-X importtime``, bytecode cached in a
    temporary directory, as an installed module has it): the module's own cumulative time and
    that of each module it imports first that takes a millisecond or more, medians in ms."""
    samples: dict = {}
    with tempfile.TemporaryDirectory() as cache:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYTHONPYCACHEPREFIX"] = cache
        for run in range(runs + 1):  # run 0 writes the bytecode
            done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import vmsplicemove"],
                                  cwd=os.path.dirname(os.path.abspath(vm.__file__)), env=env,
                                  capture_output=True, text=True, timeout=60)
            # "import time: self | cumulative | name", the name indented two spaces a level
            rows = [(int(cumulative), name[1:]) for _, cumulative, name in
                    (line.split("|") for line in done.stderr.splitlines() if line.count("|") == 2)
                    if cumulative.strip().isdigit()]
            if done.returncode or not rows or rows[-1][1] != "vmsplicemove":
                return {}
            top = [i for i, (_, name) in enumerate(rows) if not name.startswith(" ")]
            first = top[-2] + 1 if len(top) > 1 else 0  # after the import before ours (site)
            for cumulative, name in rows[first:] if run else ():
                if not name.startswith("   "):  # ours, or one that it imports itself
                    samples.setdefault(name.strip(), []).append(cumulative / 1000)
    return {"module_ms": _median(samples.pop("vmsplicemove")),
            "imports_ms": {name: _median(t) for name, t in samples.items() if _median(t) >= 1}}


# -- the harness ----------------------------------------------------------------

SCENARIOS = {
    "migrate": (tuple(MIGRATE_METHODS), "a region filled in a child process, brought to its parent"),
    "stream": (STREAM_METHODS, "one reused buffer of --chunk bytes refilled and sent, chunk after chunk"),
    "stream-huge": (STREAM_METHODS, "the same with a buffer of one huge page (2 MiB here)"),
    "calls": (CALLS_METHODS, "one-page gift and move round trips in one process"),
    "chain": (CHAIN_METHODS, f"a region handed through {CHAIN_HOPS} hops, then every page read:\n"
                             "              shared handoffs against sealed ones plus a copy per later hop"),
}


def _median(values: list) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _bench_scenario(name: str, args: argparse.Namespace) -> dict:
    size, chunk = args.size, vm._HUGE_PAGE_SIZE if name == "stream-huge" else args.chunk
    if name == "migrate":
        def once(method: str, seed: int) -> dict:
            return _migrate_once(size, method, seed)
        volume = size
    elif name.startswith("stream"):
        count = max(1, 4 * size // chunk)
        volume = count * chunk

        def once(method: str, seed: int) -> dict:
            return _stream_once(chunk, count, method, seed)
    elif name == "chain":
        def once(method: str, seed: int) -> dict:
            return _chain_once(size, method, seed)
        volume = size
    else:
        count = size // PAGE_SIZE
        volume = count * PAGE_SIZE

        def once(method: str, seed: int) -> dict:
            return _calls_once(count, method)
    methods = SCENARIOS[name][0]
    runs: dict = {m: [] for m in methods}
    for run in range(args.runs + 1):  # run 0 is the warm-up
        for method in methods:  # interleaved: the machine's noise hits them all
            timed = once(method, seed=run * 16 + methods.index(method) + 1)
            if run:
                runs[method].append(timed)
    table = {}
    for method in methods:
        seconds = [r["seconds"] for r in runs[method]]
        med = _median(seconds)
        entry = {"median_s": med, "runs_s": seconds, "gib_s": volume / med / 2**30}
        if name == "calls":
            entry["round_trips_per_s"] = count / med
        if name == "migrate":
            entry["every_page_median_s"] = _median([r["pages_s"] for r in runs[method]])
            entry["writer_region_resident"] = max(r["writer_resident"] for r in runs[method])
            for key in ("parent_peak", "peak_both"):
                entry[key] = max(r[key] for r in runs[method])
        table[method] = entry
    result: dict = {"bytes": volume, "methods": table}
    if name.startswith("stream"):
        result["bound"] = _refault_cost(chunk)
    if name == "migrate":
        result["fill"] = _fill_cost(size, args.runs)
    result["ratios"] = _ratios(name, table, size, result)
    return result


def _ratios(name: str, table: dict, size: int, result: dict) -> dict:
    """Same-run ratios, each with the project's target (None: shown for reference)."""
    def ratio(a: str, b: str, target: float | None, a_key: str = "median_s") -> dict:
        value = table[b]["median_s"] / table[a][a_key]
        return {"value": value, "target": target, "met": None if target is None else value >= target}

    def at_most(value: float, target: float) -> dict:
        return {"value": value, "target": target, "met": value <= target, "at_most": True}
    if name == "migrate":
        return {"gift / plain-fresh": ratio("gift", "plain-fresh", 3.0),
                "gift / plain-prefaulted": ratio("gift", "plain-prefaulted", 1.3),
                "writer resident at end / region": at_most(table["gift"]["writer_region_resident"] / size,
                                                           0.05),
                "handoff takeover vs gift": ratio("handoff", "gift", 20.0),
                "handoff every page read vs gift": ratio("handoff", "gift", 8.0, "every_page_median_s"),
                "handoff peak, both processes / region": at_most(table["handoff"]["peak_both"] / size,
                                                                 1.1)}
    if name.startswith("stream"):
        # Whole huge pages refill with one fault each (the module re-drops a huge page a gift
        # emptied in pieces); 4 KiB pages fault 256 times per MiB, more than the copy saved.
        return {"gift / plain": ratio("gift", "plain", 1.5 if result["bound"]["huge_pages"] else None)}
    if name == "chain":
        return {"shared / sealed": ratio("shared", "sealed", 20.0)}
    return {"public / bare-ctypes": ratio("public", "bare-ctypes", 0.5)}


def _shmem_thp() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/shmem_enabled") as f:
            text = f.read()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return "unavailable"


def _us(value: float | None) -> str:
    return "none here" if value is None else f"{value:.2f} us" if value < 10 else f"{value:.0f} us"


def _print_scenario(name: str, scenario: dict, limits: dict) -> None:
    print(f"\n{name}: {vm._human(scenario['bytes'])}")
    for method, entry in scenario["methods"].items():
        line = f"  {method:<18} {entry['median_s']:9.4f} s  {entry['gib_s']:7.2f} GiB/s"
        if "round_trips_per_s" in entry:
            line += f"  {entry['round_trips_per_s']:10,.0f} round trips/s"
        if method == "handoff":
            every = entry["every_page_median_s"]
            line = (f"  {method:<18} {entry['median_s']:9.4f} s  until takeover returned; every page read "
                    f"{every:.4f} s ({scenario['bytes'] / every / 2**30:.2f} GiB/s), "
                    f"peak across both processes {vm._human(entry['peak_both'])}")
        elif "writer_region_resident" in entry:
            line += (f"  writer region resident {vm._human(entry['writer_region_resident'])}"
                     f", parent peak {vm._human(entry['parent_peak'])}")
        print(line)
    for label, r in scenario["ratios"].items():
        bound = "at most" if r.get("at_most") else "target"
        verdict = (f"{bound} {r['target']}: {'met' if r['met'] else 'MISSED'}" if r["target"] is not None
                   else "no target: 4 KiB pages, see the bound")
        print(f"  {label:<38} {r['value']:6.2f}   ({verdict})")
    if name == "migrate":
        huge, count = limits["fault_huge_us"], scenario["bytes"] // vm._HUGE_PAGE_SIZE
        copy_s = scenario["bytes"] / limits["copy_bandwidth_gib_s"] / 2**30
        faults = f" + {count} fresh huge-page faults {count * huge / 1e6:.4f} s" if huge and count else ""
        print(f"  bound for gift and move: one copy at memcpy speed {copy_s:.4f} s{faults}")
        for kind, fill in scenario["fill"].items():
            print(f"  fill of a {kind} PageBuffer ({'huge' if fill['huge'] else '4 KiB'} pages): "
                  f"{fill['fill_s']:.4f} s, created in {fill['create_s']:.4f} s")
    if "bound" in scenario:
        b = scenario["bound"]
        pages = "huge pages" if b["huge_pages"] else f"{PAGE_SIZE // 1024} KiB pages"
        print(f"  bound: refilling a gifted {vm._human(b['chunk'])} chunk ({pages}) costs "
              f"{b['faults_us']:.0f} us of page faults, to save one {b['copy_us']:.0f} us copy")
        if "split_faults_us" in b:
            print(f"  (dropped in two halves, as through a pipe of half a huge page, and not dropped "
                  f"whole again: {b['split_faults_us']:.0f} us)")


def _bench(args: argparse.Namespace) -> int:
    support = probe()
    r, w = pipe()
    pipe_size = fcntl.fcntl(w, vm._F_GETPIPE_SZ)
    os.close(r)
    os.close(w)
    limits = {"copy_bandwidth_gib_s": _copy_bandwidth(64 << 20) / 2**30, **_fault_costs()}
    result = {
        "kernel": support.kernel, "huge_pages": support.huge_pages, "shmem_thp": _shmem_thp(),
        "pipe_size": pipe_size, "vmsplice": support.vmsplice, "move": support.move,
        "handoff": support.handoff, "cpus": os.cpu_count(), "python": sys.version.split()[0],
        "runs": args.runs, **limits, "import": _import_time(), "scenarios": {},
    }
    if not args.json:
        print(f"vmsplicemove bench: kernel {support.kernel}, THP {support.huge_pages}, "
              f"pipe {vm._human(pipe_size)}, {os.cpu_count()} CPUs, Python {result['python']}")
        print(f"median of {args.runs} runs after a warm-up, methods interleaved, "
              f"every byte verified after every run")
        print(f"limits here: memcpy {limits['copy_bandwidth_gib_s']:.2f} GiB/s; a page fault (zeroing "
              f"included) {_us(limits['fault_4k_us'])} for 4 KiB, {_us(limits['fault_huge_us'])} for "
              f"{vm._human(vm._HUGE_PAGE_SIZE)}")
        small = result["shmem_thp"] in ("never", "deny", "unavailable")
        print(f"shmem THP (/sys/kernel/mm/transparent_hugepage/shmem_enabled): {result['shmem_thp']}"
              f"{': huge memfd pages only by MADV_COLLAPSE' if small else ''}")
        found = result["import"]
        if found:
            heavy = sorted(found["imports_ms"].items(), key=lambda item: -item[1])
            parts = ", ".join(f"{name} {ms:.1f}" for name, ms in heavy)
            print(f"import vmsplicemove: {found['module_ms']:.1f} ms (-X importtime, bytecode cached, median "
                  f"of 5){'; of which ' + parts + ' ms' if parts else ''}")
    for name in dict.fromkeys(args.scenarios):
        scenario = _bench_scenario(name, args)
        result["scenarios"][name] = scenario
        if not args.json:
            _print_scenario(name, scenario, limits)
    if args.json:
        print(json.dumps(result, indent=2))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    listing = "\n".join(f"  {name:<11} {text}\n              methods: {', '.join(methods)}"
                        for name, (methods, text) in SCENARIOS.items())
    parser = argparse.ArgumentParser(
        prog="python3 bench_vmsplicemove.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Time each scenario's methods interleaved, the median of --runs after a\n"
                    "warm-up, every byte verified after every run; print the same-run ratios\n"
                    "against the project's targets.",
        epilog=f"scenarios (default: all):\n{listing}")
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", default=list(SCENARIOS),
                        help=f"any of {', '.join(SCENARIOS)} (default: all)")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")
    parser.add_argument("--runs", type=_positive_int, default=5, help="timed runs per method (default 5)")
    parser.add_argument("--size", type=vm._parse_size, default=256 << 20,
                        help="migrate's and chain's region; stream sends 4x this, calls moves it a "
                             "page at a time (default 256M)")
    parser.add_argument("--chunk", type=vm._parse_size, default=1 << 20,
                        help="stream's reused buffer (default 1M; stream-huge uses one huge page)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario {unknown[0]!r}; choose from {', '.join(SCENARIOS)}")
    try:
        return _bench(args)
    except (RuntimeError, OSError) as exc:
        print(f"bench_vmsplicemove: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench_vmsplicemove: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
