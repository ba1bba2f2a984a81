"""ShardMemory: where one shard's slots live, private to a process or shared by the processes of a node.

A PoolShard keeps all of its state in these arrays. Shared memory is an anonymous memfd that the
shard actor creates and every client on its node maps through ``/proc/<actor pid>/fd/<fd>``, to run
the shard's transitions itself (the Ray backend's fast path, docs/pool.md). A memfd lives exactly as
long as some process holds it, so a killed actor leaks nothing, and a container's small ``/dev/shm``
does not bound it.

File layout (every array 64-byte aligned, in this order):

    header   int64[16]   MAGIC, VERSION, n, owner pid, segment uid, flags, record layout fingerprint
    counters int64[len(SHARD_COUNTERS)]
    seconds  float64[6]  blocked and call seconds per side, fill_rejected (pool-wide, kept on shard 0)
    state uint8[n], t int64[n], uses int32[n], produced_at int64[n], owner int64[n], deadline float64[n],
    y int64[n] (has_label), x_t, eps [n, C, H, W] storage dtype (bf16 as int16 bits), logvar (has_logvar) fp32,
    each record array starting 2048 bytes past a page boundary (_align_records)

Locking: ``fcntl.flock`` on the file, behind a threading.RLock for the threads of one process.
The kernel drops the lock of a process that dies, so a killed client never wedges a shard.
Lifetime: clients check the owner's pid (at most every 50 ms) and the closed flag before each
call; a dead or closed owner means the actor died (its restart has a new segment) or the pool was dropped.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import math
import mmap
import os
import threading
import time
import zlib

import numpy as np

from common.metrics_discovery import pid_alive
from common.pool.errors import PoolError
from common.pool.codec import WIRE_DTYPES, field_storage

MAGIC = 0x444B444D53484D31          # "DKDMSHM1"
VERSION = 4                          # 4: logvar in fp32 (codec.field_storage)
_H_MAGIC, _H_VERSION, _H_N, _H_PID, _H_UID, _H_FLAGS, _H_LAYOUT = range(7)
FLAG_GROUPS = 1                      # consumer groups attached: only the owner may run transitions
FLAG_CLOSED = 2
SECONDS = ("draw_blocked", "fill_blocked", "draw", "fill", "fill_rejected", "reserved")


def _align(off: int) -> int:
    return (off + 63) & ~63


def _align_records(off: int) -> int:
    """The next offset at 2048 bytes past a page boundary, for record arrays: a batch that numpy or
    torch allocates starts just past a page, and a memcpy whose destination lies just past its
    source modulo 4 KiB ("4K aliasing") runs several times slower."""
    return off + (2048 - off) % 4096


def _plan(n: int, record_shape, storage_dtype: str, has_logvar: bool, has_label: bool, counters: int):
    """[(name, dtype, shape, offset)], the total size in bytes, and the layout's fingerprint: a 62-bit number
    that differs when anything about the arrays' layout differs."""
    rec = (n, *record_shape)
    fields = [("header", np.int64, (16,)), ("counters", np.int64, (counters,)),
              ("seconds", np.float64, (len(SECONDS),)), ("state", np.uint8, (n,)), ("t", np.int64, (n,)),
              ("uses", np.int32, (n,)), ("produced_at", np.int64, (n,)), ("owner", np.int64, (n,)),
              ("deadline", np.float64, (n,))]
    if has_label:
        fields.append(("y", np.int64, (n,)))
    fields += [(name, WIRE_DTYPES[field_storage(name, storage_dtype)], rec)
               for name in ("x_t", "eps", "logvar")[:2 + has_logvar]]
    out, off = [], 0
    for name, dt, shape in fields:
        off = _align_records(off) if name in ("x_t", "eps", "logvar") else _align(off)
        out.append((name, dt, shape, off))
        off += int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
    key = f"{n}|{tuple(record_shape)}|{storage_dtype}|{has_logvar}|{has_label}|{counters}|{VERSION}".encode()
    return out, _align(off), zlib.crc32(key) | (len(key) << 32)


class _FileLock:
    """Exclusive flock on a file, re-entrant within a thread; threads of one process take turns on a
    threading.RLock first (flock is per open file, so it cannot tell a process's threads apart)."""

    def __init__(self, fd: int):
        self.fd, self.depth = fd, 0
        self.rlock = threading.RLock()

    def __enter__(self):
        self.rlock.acquire()
        if self.depth == 0:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX)
            except BaseException:
                self.rlock.release()
                raise
        self.depth += 1
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        if self.depth == 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self.rlock.release()


class ShardMemory:
    """The arrays of one shard (see the module docstring); ``path`` is None for private memory."""

    def __init__(self, arrays: dict[str, np.ndarray], path: str | None, lock, owner: bool, mm=None, fd: int | None = None):
        self.a = arrays
        self.path, self.lock, self.owner = path, lock, owner
        self._mm, self._fd = mm, fd
        self._checked, self._alive = -math.inf, True

    # --- construction ----------------------------------------------------------------------

    @classmethod
    def private(cls, n: int, record_shape, storage_dtype: str, has_logvar: bool, has_label: bool, counters: int) -> "ShardMemory":
        plan, _, layout = _plan(n, record_shape, storage_dtype, has_logvar, has_label, counters)
        arrays = {name: np.zeros(shape, dtype=dt) for name, dt, shape, _ in plan}
        mem = cls(arrays, None, contextlib.nullcontext(), owner=True)
        mem._init_header(n, layout)
        return mem

    @classmethod
    def create(cls, tag: str, n: int, record_shape, storage_dtype: str, has_logvar: bool, has_label: bool,
               counters: int) -> "ShardMemory":
        """New shared memory, every page reserved up front: PoolError (one line) when memory cannot hold it,
        instead of an out-of-memory kill later."""
        plan, size, layout = _plan(n, record_shape, storage_dtype, has_logvar, has_label, counters)
        check_memory(size, f"a pool shard ({tag})")
        if not hasattr(os, "memfd_create"):
            raise PoolError("shared pool memory needs Linux (memfd_create); set pool.shared_memory=false")
        fd = os.memfd_create(f"dkdm-pool-{tag}"[:240], os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, size)
        except OSError as err:
            os.close(fd)
            raise PoolError(f"cannot reserve {size / 2**20:.1f} MiB of shared memory for a pool shard ({err.strerror}); "
                            f"use fewer slots or pool.storage_dtype=fp16") from None
        mem = cls._map(f"/proc/{os.getpid()}/fd/{fd}", fd, plan, size, owner=True)
        mem._init_header(n, layout)
        return mem

    @classmethod
    def attach(cls, path: str, n: int, record_shape, storage_dtype: str, has_logvar: bool, has_label: bool,
               counters: int, uid: int) -> "ShardMemory":
        """Map an existing shard file; PoolError unless it is the segment ``uid`` with this layout."""
        plan, size, layout = _plan(n, record_shape, storage_dtype, has_logvar, has_label, counters)
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError as err:
            raise PoolError(f"cannot open pool shard memory {path}: {err.strerror}") from None
        have = os.fstat(fd).st_size
        if have != size:
            os.close(fd)
            raise PoolError(f"pool shard memory {path} holds {have} bytes, its layout needs {size}")
        mem = cls._map(path, fd, plan, size, owner=False)
        h = mem.a["header"]
        if h[_H_MAGIC] != MAGIC or h[_H_UID] != uid or h[_H_LAYOUT] != layout:
            mem.close()
            raise PoolError(f"pool shard memory {path} is not the expected segment (magic, uid or layout differ)")
        return mem

    @classmethod
    def _map(cls, path: str, fd: int, plan, size: int, owner: bool) -> "ShardMemory":
        # MAP_POPULATE: map every page now, not one fault per page on the first draws and fills
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mm = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        arrays = {name: np.ndarray(shape, dtype=dt, buffer=mm, offset=off) for name, dt, shape, off in plan}
        return cls(arrays, path, _FileLock(fd), owner=owner, mm=mm, fd=fd)

    def _init_header(self, n: int, layout: int) -> None:
        h = self.a["header"]
        h[_H_MAGIC], h[_H_VERSION], h[_H_N], h[_H_PID] = MAGIC, VERSION, n, os.getpid()
        h[_H_UID], h[_H_LAYOUT] = int.from_bytes(os.urandom(7), "little"), layout

    # --- views -------------------------------------------------------------------------------

    @property
    def uid(self) -> int:
        return int(self.a["header"][_H_UID])

    @property
    def flags(self) -> int:
        return int(self.a["header"][_H_FLAGS])

    def set_flag(self, flag: int, on: bool) -> None:
        h = self.a["header"]
        h[_H_FLAGS] = (h[_H_FLAGS] | flag) if on else (h[_H_FLAGS] & ~flag)

    def owner_alive(self, every_s: float = 0.05) -> bool:
        """The owner has not closed the memory and its process lives (the pid checked at most every ``every_s``)."""
        if self.flags & FLAG_CLOSED:
            return False
        now = time.monotonic()
        if now - self._checked >= every_s:
            self._alive = pid_alive(int(self.a["header"][_H_PID]))
            self._checked = now
        return self._alive

    def close(self) -> None:
        """Close this process's handle (the owner first marks the memory closed for every client).
        The pages are freed when the last process that maps them drops its arrays."""
        if self.path is None:
            return
        if self.owner:
            with contextlib.suppress(Exception):
                self.set_flag(FLAG_CLOSED, True)
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
        self.path = None


_MALLOC_TUNED = False


def tune_malloc(trim_bytes: int = 256 << 20, mmap_bytes: int = 32 << 20) -> bool:
    """Let glibc keep freed memory for reuse (once per process; True if it was set now).

    By default glibc hands a freed batch (a few MB) back to the kernel and the next draw faults every
    page in again, which costs as much as the copy itself. A user's MALLOC_TRIM_THRESHOLD_ or
    MALLOC_MMAP_THRESHOLD_ is kept; other C libraries are left alone.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or "MALLOC_TRIM_THRESHOLD_" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3          # malloc.h
        return bool(libc.mallopt(m_mmap_threshold, mmap_bytes)) and bool(libc.mallopt(m_trim_threshold, trim_bytes))
    except (OSError, AttributeError):                        # not glibc
        return False


def check_memory(size: int, what: str) -> None:
    """PoolError unless ``size`` bytes fit in the memory available now (Linux MemAvailable)."""
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return
    if size > avail:
        raise PoolError(f"{what} needs {size / 2**30:.2f} GiB but only {avail / 2**30:.2f} GiB of memory is available; "
                        f"use fewer slots, more shards on more nodes, or pool.storage_dtype=fp16")


def lease_key(lease_id: str) -> int:
    """A lease or claim id -> the nonzero int64 stored as the owner of its slots."""
    k = int.from_bytes(hashlib.blake2b(lease_id.encode(), digest_size=8).digest(), "little", signed=True)
    return k or 1

