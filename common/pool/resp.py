"""The Redis backend's wire path: a small RESP2 client and the binary slot record it carries.

``RespConnection`` speaks RESP2 over one socket for plain ``redis://`` and
``unix://`` URLs (TLS and Redis Cluster stay on redis-py). It exists for speed:
a draw's reply is ~4.7 MB of records (b = 128 of 36 KiB), and redis-py's
pure-Python parser spent ~9 ms of a ~25 ms draw on it. Here replies are read
with ``recv_into`` into one reused bytearray and bulk strings of 1 KiB or more
come back as memoryviews of it (no per-record bytes objects): they are valid
until the next ``execute`` on the same connection, so callers copy out first.

``SlotFormat`` is the record stored per slot (field ``{tag}:rec`` of a shard),
replacing the msgpack envelope (msgpack plus one crc32 per field cost ~6 ms per
draw; crc32 alone of 4.7 MB took 2-5 ms on the 2-core machine). Little-endian:

    offset  size  field
    0       7     magic b"DKDMSLT"
    7       1     format version (2)
    8       1     dtype code (0 fp32, 1 fp16, 2 bf16 as its int16 bits)
    9       1     flags (1: logvar present, 2: label y present)
    10      2     zero
    12      12    C, H, W (uint32 each)
    24      8     t (int64)
    32      8     y (int64, 0 without a label)
    40      ...   x_t, eps[, logvar] raw bytes, each zero-padded to a multiple of 8
    L - 8   8     checksum: the sum mod 2**64 of every little-endian uint64 word before it

The checksum is a word sum, chosen for speed (one vectorised numpy reduction
for a whole batch, well under 1 ms for 4.7 MB): it catches any damage confined
to one 8-byte word (a flipped bit or byte, a torn write of one word), and with
the exact length and the fixed header it catches truncation and foreign values.
It is a storage-damage check, not a cryptographic one: damage that cancels
exactly across words (e.g. two words swapped) passes.
"""

from __future__ import annotations

import bisect
import itertools
import socket
import struct

import numpy as np
import redis
from redis.connection import parse_url

from common.pool.base import RecordCorrupt

SLOT_MAGIC = b"DKDMSLT"
SLOT_VERSION = 2
HEADER_BYTES = 40
_DTYPE_CODES = {"fp32": 0, "fp16": 1, "bf16": 2}
_WIRE = {"fp32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "bf16": np.dtype("<i2")}
_PREFIX = struct.Struct("<7sBBBH3I")          # magic, version, dtype, flags, zero, C, H, W: 24 bytes
_VIEW_MIN = 1024      # bulk strings at least this long come back as memoryviews of the read buffer
# A direct read hands recvmsg_into the buffers of the next _READ_WINDOW bytes only: the call acquires and
# releases every buffer it is given, and a read returns 100-200 KB here (1,000 buffers: 54 us per 160 KB
# read against 21-25 us for 60-200, measured on a socketpair; about 30 reads per 4.7 MB draw)
_READ_WINDOW = 1 << 19
# ... and on TCP a read waits until _READ_LOWAT bytes are there (SO_RCVLOWAT; the rest of the stream if less):
# the server writes 64 KB per event-loop turn, and a read per write cost the client about 1 ms more CPU per
# 4.7 MB draw (43 reads against 15; measured, one client: 5.8-5.9 -> 4.9-5.0 ms of client CPU per
# draw+release, 7.8-8.4 -> 7.4-7.6 ms wall). Such a read gives up after _LOWAT_WAIT_S and the rest of the
# stream is read as it comes: a reply shorter than expected (a missing record, an error) never hangs.
_READ_LOWAT = 1 << 18
_LOWAT_WAIT_S = 0.2


def _pad8(n: int) -> int:
    return (n + 7) // 8 * 8


class SlotFormat:
    """Encode and check the slot records of one pool layout (shape [C, H, W], storage dtype, logvar, label).

    Batches are handled as one ``[n, L]`` uint8 array (``L = record_bytes``), one record per row,
    so encoding, header checks and checksums are a few numpy operations per batch.
    """

    def __init__(self, record_shape, storage: str, has_logvar: bool, has_label: bool):
        self.shape = tuple(int(s) for s in record_shape)
        if len(self.shape) != 3:
            raise ValueError(f"record shape must be [C, H, W], got {self.shape}")
        self.storage, self.has_logvar, self.has_label = storage, bool(has_logvar), bool(has_label)
        self.wire = _WIRE[storage]
        self.fields = ("x_t", "eps") + (("logvar",) if self.has_logvar else ())
        self.field_bytes = int(np.prod(self.shape)) * self.wire.itemsize
        self.field_stride = _pad8(self.field_bytes)
        self.record_bytes = HEADER_BYTES + len(self.fields) * self.field_stride + 8
        flags = int(self.has_logvar) | 2 * int(self.has_label)
        self.prefix = _PREFIX.pack(SLOT_MAGIC, SLOT_VERSION, _DTYPE_CODES[storage], flags, 0, *self.shape)
        self._prefix_arr = np.frombuffer(self.prefix, dtype=np.uint8)

    def field_view(self, rows: np.ndarray, name: str) -> np.ndarray:
        """[n, L] uint8 records -> [n, C, H, W] view of one tensor field in the wire dtype (aligned, rows strided)."""
        o = HEADER_BYTES + self.fields.index(name) * self.field_stride
        return rows[:, o:o + self.field_bytes].view(self.wire).reshape(len(rows), *self.shape)

    @staticmethod
    def t_of(rows: np.ndarray) -> np.ndarray:
        return rows[:, 24:32].view("<i8")[:, 0]

    @staticmethod
    def y_of(rows: np.ndarray) -> np.ndarray:
        return rows[:, 32:40].view("<i8")[:, 0]

    def encode(self, fields: dict[str, np.ndarray], t: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        """Wire-dtype arrays x_t, eps[, logvar] [n, C, H, W], t [n], y [n] -> records [n, L] uint8."""
        n = len(t)
        rows = np.empty((n, self.record_bytes), dtype=np.uint8)      # every byte is written below
        rows[:, :24] = self._prefix_arr
        self.t_of(rows)[:] = t
        self.y_of(rows)[:] = y if self.has_label else 0
        for i, name in enumerate(self.fields):
            self.field_view(rows, name)[:] = fields[name]
            o = HEADER_BYTES + i * self.field_stride
            rows[:, o + self.field_bytes:o + self.field_stride] = 0
        rows[:, -8:].view("<u8")[:, 0] = self._sums(rows)
        return rows

    def _sums(self, rows: np.ndarray) -> np.ndarray:
        return rows[:, :-8].view("<u8").sum(axis=1, dtype=np.uint64)

    def stage(self, payloads: list) -> tuple[np.ndarray, list[int], list[str | None]]:
        """Stored records (bytes-like or None) -> (rows [m, L] uint8: copies of the m intact records,
        idx: their positions in ``payloads``, why: per payload None if intact, else why it is corrupt).

        One copy per record, then one vectorised check of every header and checksum.
        """
        L = self.record_bytes
        why: list[str | None] = [None] * len(payloads)
        cand = []
        for j, p in enumerate(payloads):
            if p is None:
                why[j] = "READY slot holds no record"
            elif len(p) != L:
                why[j] = self._reason(p)
            else:
                cand.append(j)
        rows = np.empty((len(cand), L), dtype=np.uint8)
        for r, j in enumerate(cand):
            rows[r] = np.frombuffer(payloads[j], dtype=np.uint8)
        ok = (rows[:, :24] == self._prefix_arr).all(axis=1) & (self._sums(rows) == rows[:, -8:].view("<u8")[:, 0])
        if not ok.all():
            for r in np.flatnonzero(~ok).tolist():
                why[cand[r]] = self._reason(payloads[cand[r]])
            rows, cand = rows[ok], [j for j, g in zip(cand, ok.tolist()) if g]
        return rows, cand, why

    def decode_into(self, payloads: list, dest: dict, rows: np.ndarray, segments: list | None = None) -> list[str | None]:
        """Stored records (bytes-like or None) -> rows ``rows[j]`` of ``dest`` (wire-dtype arrays x_t, eps,
        logvar [n, C, H, W], t, y [n]); returns per payload None (written) or why it is corrupt (its row
        is then zeros with t untouched, for the caller to reuse or leave empty).

        Each tensor is copied once, from the read buffer straight into its row; then the headers and
        the checksums of the whole batch are checked in a few vectorised numpy operations. ``segments``:
        the replies ``payloads`` concatenates (default: one). A reply of equal-length records at a
        regular stride in one read buffer (``Bulks``: an HMGET of intact records) is copied with one
        strided numpy copy per field; anything else record by record.
        """
        if self.field_bytes % 8:           # fields padded on the wire: no word sums over the rows
            staged, idx, why = self.stage(payloads)
            if idx:
                to = rows[idx]
                for name in self.fields:
                    dest[name][to] = self.field_view(staged, name)
                dest["t"][to] = self.t_of(staged)
                if dest.get("y") is not None:
                    dest["y"][to] = self.y_of(staged)
            return why
        L, k = self.record_bytes, len(payloads)
        flat = [dest[name].reshape(len(dest[name]), -1).view(np.uint8) for name in self.fields]
        offsets = [(a, HEADER_BYTES + i * self.field_stride) for i, a in enumerate(flat)]
        why: list[str | None] = [None] * k
        hdr = np.empty((k, HEADER_BYTES), dtype=np.uint8)
        trailer = np.empty(k, dtype=np.uint64)
        cand: list[int] = []
        base = 0
        for seg in (segments if segments is not None else [payloads]):
            if self._strided_copy(seg, base, offsets, hdr, trailer, rows):
                cand += range(base, base + len(seg))
            else:
                for j in range(base, base + len(seg)):
                    p = payloads[j]
                    if p is None:
                        why[j] = "READY slot holds no record"
                        continue
                    if len(p) != L:
                        why[j] = self._reason(p)
                        continue
                    a8 = np.frombuffer(p, dtype=np.uint8)
                    hdr[j] = a8[:HEADER_BYTES]
                    for a, o in offsets:
                        a[rows[j]] = a8[o:o + self.field_bytes]
                    trailer[j] = a8[L - 8:].view("<u8")[0]
                    cand.append(j)
            base += len(seg)
        if not cand:
            return why
        bad = self._verify(cand, dest, rows, hdr, trailer, offsets, lambda j: payloads[j])
        return [w if b is None else b for w, b in zip(why, bad)]

    def _verify(self, cand: list, dest: dict, rows: np.ndarray, hdr: np.ndarray, trailer: np.ndarray, offsets: list,
                payload_of) -> list[str | None]:
        """Check the headers and word sums of records ``cand`` (in place at ``rows``) -> why per record (None
        where intact or not a candidate); intact ones get their t and y, damaged ones zeroed rows."""
        why: list[str | None] = [None] * len(rows)
        c = np.asarray(cand)
        rr = rows[c]
        sums = hdr[c].view("<u8").sum(axis=1, dtype=np.uint64)
        for a, _ in offsets:
            sums += a.view("<u8").sum(axis=1, dtype=np.uint64)[rr]
        ok = (hdr[c, :24] == self._prefix_arr).all(axis=1) & (sums == trailer[c])
        good = rr[ok]
        dest["t"][good] = hdr[c[ok], 24:32].view("<i8")[:, 0]
        if dest.get("y") is not None:
            dest["y"][good] = hdr[c[ok], 32:40].view("<i8")[:, 0]
        for j in c[~ok].tolist():
            why[j] = self._reason(payload_of(j))
            for a, _ in offsets:
                a[rows[j]] = 0
        return why

    @property
    def placeable(self) -> bool:
        """Whether records can be read straight into a batch (``placement``): fields not padded on the wire."""
        return self.field_bytes % 8 == 0

    def placement(self, dest: dict, rows: np.ndarray):
        """Where each record of a batch goes when it is read straight from the socket
        (``RespConnection.execute_into``) -> (targets, hdr [k, 40], trailer [k]): ``targets[j]`` lists the
        buffers record j fills in order (its header row, its rows of x_t, eps[, logvar] in ``dest`` at
        ``rows[j]``, its checksum word), together ``record_bytes`` long. None when the fields are padded on
        the wire (their pads would need buffers of their own; the caller decodes a reply instead)."""
        if not self.placeable:
            return None
        k, fb = len(rows), self.field_bytes
        hdr, trailer = np.empty((k, HEADER_BYTES), dtype=np.uint8), np.empty(k, dtype=np.uint64)
        hv, tv = memoryview(hdr.reshape(-1)), memoryview(trailer.view(np.uint8))
        flats = [memoryview(dest[name].reshape(-1).view(np.uint8)) for name in self.fields]
        targets, H = [], HEADER_BYTES
        for j, r in enumerate(rows.tolist()):
            a = r * fb
            targets.append([hv[j * H:j * H + H], *[f[a:a + fb] for f in flats], tv[j * 8:j * 8 + 8]])
        return targets, hdr, trailer

    def check_placed(self, dest: dict, rows: np.ndarray, hdr: np.ndarray, trailer: np.ndarray) -> list[str | None]:
        """The records ``placement`` put in place -> per record None (intact: its t and y written) or why it
        is corrupt (its rows zeroed), as ``decode_into`` answers."""
        offsets = [(dest[name].reshape(len(dest[name]), -1).view(np.uint8), 0) for name in self.fields]
        return self._verify(list(range(len(rows))), dest, rows, hdr, trailer, offsets,
                            lambda j: bytes(hdr[j]) + b"".join(bytes(a[rows[j]]) for a, _ in offsets) + trailer[j:j + 1].tobytes())

    def _strided_copy(self, seg, base: int, offsets: list, hdr: np.ndarray, trailer: np.ndarray, rows: np.ndarray) -> bool:
        """decode_into's copy of one reply as a single strided array; False (nothing done) unless it qualifies."""
        L = self.record_bytes
        if not isinstance(seg, Bulks) or len(seg) < 2 or any(len(p) != L for p in seg):
            return False
        starts = np.asarray(seg.starts)
        step = int(starts[1] - starts[0])
        if step < L or (np.diff(starts) != step).any():
            return False
        k = len(seg)
        recs = np.ndarray((k, L), dtype=np.uint8, buffer=seg.buf, offset=int(starts[0]), strides=(step, 1))
        hdr[base:base + k] = recs[:, :HEADER_BYTES]
        trailer[base:base + k] = np.ascontiguousarray(recs[:, L - 8:]).view("<u8")[:, 0]
        rr = rows[base:base + k]
        for a, o in offsets:
            a[rr] = recs[:, o:o + self.field_bytes]
        return True

    def check(self, payload) -> np.ndarray:
        """One stored record -> its [1, L] row; RecordCorrupt naming what is wrong."""
        rows, _, why = self.stage([payload])
        if why[0] is not None:
            raise RecordCorrupt(why[0])
        return rows

    def _reason(self, p) -> str:
        """Why ``p`` is not an intact record of this layout (the slow path, only for damaged records)."""
        p = bytes(p)
        L = self.record_bytes
        if len(p) < len(SLOT_MAGIC) or p[:len(SLOT_MAGIC)] != SLOT_MAGIC:
            return f"foreign record: missing {SLOT_MAGIC.decode()} magic"
        if len(p) < 24:
            return f"record has {len(p)} bytes, expected {L} (truncated)"
        _, version, code, flags, _, c, h, w = _PREFIX.unpack(p[:24])
        if version != SLOT_VERSION:
            return f"record format version {version} is not supported (this build reads {SLOT_VERSION})"
        names = {v: k for k, v in _DTYPE_CODES.items()}
        if code not in names or (c, h, w) != self.shape or code != _DTYPE_CODES[self.storage]:
            return f"record of shape {(c, h, w)} {names.get(code, code)}, pool stores {self.shape} {self.storage}"
        if p[:24] != self.prefix:
            return "record fields (logvar, y) do not match the pool's layout"
        if len(p) != L:
            return f"record has {len(p)} bytes, expected {L} (truncated)"
        return "record fails its checksum"


class RespConnection:
    """One RESP2 connection to the server of a ``redis://`` or ``unix://`` URL (AUTH and SELECT as in the URL).

    ``execute(commands)`` pipelines the commands and returns one reply each: int, bytes,
    memoryview (bulk strings of 1 KiB or more, valid until the next ``execute``), None, list,
    or an exception instance for an error reply (``redis.exceptions.NoScriptError`` for
    NOSCRIPT, else ``redis.ResponseError``). A server still loading its data raises
    ``redis.BusyLoadingError``; a broken connection raises ``ConnectionError`` or ``OSError``
    and is reopened by the next call.
    """

    def __init__(self, url: str, connect_timeout_s: float = 2.0, socket_timeout_s: float = 60.0,
                 preamble: list | None = None):
        """``preamble``: commands sent on every (re)open after AUTH and SELECT (a pool's SCRIPT LOADs);
        an error reply to one fails the open."""
        if not url.startswith(("redis://", "unix://")):
            raise ValueError(f"RespConnection takes redis:// or unix:// URLs, got {url!r}")
        self.url = url
        self.opts = parse_url(url)
        self.connect_timeout_s, self.socket_timeout_s = connect_timeout_s, socket_timeout_s
        self.sock: socket.socket | None = None
        self.buf = bytearray(1 << 20)
        self.pos = self.end = 0
        self.posted: list = []      # done(reply) of each posted command whose reply is still unread
        self.preamble = list(preamble or [])

    def close(self) -> None:
        """Close the socket; the replies of posted commands still unread are lost (their callbacks get a
        ConnectionError: such a command may or may not have run). ``drain`` first to read them."""
        lost, self.posted = self.posted, []
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None
        for done in lost:
            done(ConnectionError(f"redis server {self.url}: connection closed before the reply was read"))

    def post(self, command: list, done) -> None:
        """Send ``command`` now and read its reply later, before the replies of the next ``execute`` or
        ``execute_into`` on this connection, or in ``drain``: ``done(reply)`` is called then, with an
        exception instance for an error reply or for a connection lost before the reply came (the command
        may or may not have run). The caller goes on while the server runs it (a pool's release)."""
        if self.sock is None:
            self._open()
        try:
            self._send(_encode(command))
        except BaseException:
            self.close()
            raise
        self.posted.append(done)

    def drain(self) -> None:
        """Read the replies of the posted commands now (their callbacks are called)."""
        if self.posted:
            self.execute([])

    def _read_posted(self) -> None:
        """Read the posted commands' replies, which come first in the stream (pos..end as _reply reads)."""
        while self.posted:
            big: list = []
            r = self._reply(big)
            self.posted.pop(0)(owned(_resolve(r, big, self.buf)) if big else r)

    def _open(self) -> None:
        o = self.opts
        if "path" in o:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = o["path"]
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = (o.get("host", "localhost"), int(o.get("port", 6379)))
        s.settimeout(self.connect_timeout_s)
        try:
            s.connect(target)
        except BaseException:
            s.close()
            raise
        s.settimeout(self.socket_timeout_s)
        self.sock, self.pos, self.end = s, 0, 0
        hello = []
        if o.get("password") is not None:
            hello.append(["AUTH", o["username"], o["password"]] if o.get("username") else ["AUTH", o["password"]])
        if int(o.get("db") or 0):
            hello.append(["SELECT", int(o["db"])])
        hello += self.preamble
        for cmd, r in zip(hello, self._roundtrip(hello) if hello else []):
            if isinstance(r, Exception):
                self.close()
                raise redis.AuthenticationError(f"{cmd[0]} failed: {r}") if cmd[0] == "AUTH" else r

    def execute(self, commands) -> list:
        """Pipeline ``commands`` -> one reply each. A list is sent at once; any other iterable is sent one
        command at a time as it yields them, so the server works on one command while the caller makes
        the next (a fill encodes its records chunk by chunk while the server stores the previous chunk)."""
        if self.sock is None:
            self._open()
        try:
            return self._roundtrip(commands)
        except BaseException:
            self.close()       # a reply half read leaves the stream out of step: start afresh
            raise

    def _roundtrip(self, commands) -> list:
        if isinstance(commands, list):
            self._send([part for cmd in commands for part in _encode(cmd)])
            n = len(commands)
        else:
            n = 0
            for cmd in commands:
                self._send(_encode(cmd))
                n += 1
        self.pos = self.end = 0
        self._read_posted()         # sent before these commands: their replies come first
        big: list = []
        replies = [self._reply(big) for _ in range(n)]
        return _resolve(replies, big, self.buf) if big else replies

    def execute_into(self, commands: list, counts: list[int], body_bytes: int, targets) -> list | None:
        """Pipelined commands whose replies should be arrays of ``counts[i]`` bulk strings of ``body_bytes``
        each (HMGETs of intact records): their bytes are read from the socket straight into the buffers
        ``targets()[j]`` lists for the j-th string over all replies (no read buffer, no copy) -> None.
        ``targets`` is called once the commands are sent: the buffers are laid out while the server works
        (it runs a whole HMGET of 128 records of 36 KiB, about 1.6 ms, before its first byte comes back).

        Every array and string header is checked as soon as it has arrived, and a reply of any other shape
        (a missing, truncated or foreign record, an error) stops the direct reading at once: the bytes read
        so far and the rest of the stream are then parsed as ``execute`` parses them, and its replies are
        returned (whatever the targets hold then is to be ignored). A PING follows the commands, so at least
        7 bytes follow the last reply and a header is always complete before the stream ends: no read waits
        for bytes the server never sends.
        """
        if self.sock is None:
            self._open()
        try:
            return self._roundtrip_into(commands, counts, body_bytes, targets)
        except BaseException:
            self.close()
            raise

    def _roundtrip_into(self, commands: list, counts: list[int], body_bytes: int, targets) -> list | None:
        if self.posted:             # their replies first: the direct read below starts at a reply of its own
            self.pos = self.end = 0
            self._read_posted()
        self._send([part for cmd in commands + [["PING"]] for part in _encode(cmd)])
        targets = targets()
        frame = b"$%d\r\n" % body_bytes
        heads = [b"*%d\r\n" % k for k in counts]
        # headers and each string's closing CRLF in scratch, every one in its own place (the fallback
        # reassembles the stream from all buffers in order)
        scratch = bytearray(sum(len(h) for h in heads) + sum(counts) * (len(frame) + 2))
        sv = memoryview(scratch)
        bufs: list = []
        checks: list = []           # (stream offset where the header ends, its scratch view, expected bytes)
        pos = off = 0
        records = iter(targets)
        for head, k in zip(heads, counts):
            for want in [head] + [frame] * k:
                view = sv[off:off + len(want)]
                bufs.append(view)
                off, pos = off + len(want), pos + len(want)
                checks.append((pos, view, want))
                if want is frame:          # then the string itself and its CRLF
                    bufs += next(records)
                    bufs.append(sv[off:off + 2])
                    off, pos = off + 2, pos + body_bytes + 2
        total = pos
        ends = list(itertools.accumulate(v.nbytes for v in bufs))       # stream offset where each buffer ends
        iov, i, got_all, c = list(bufs), 0, 0, 0
        lowat = 1 if self.sock.family != socket.AF_UNIX else 0      # the mark now set; 0: reads take what is there
        in_step = True
        try:
            while in_step and got_all < total:
                j = min(bisect.bisect_left(ends, got_all + _READ_WINDOW), i + 1000)     # at most 1,000 (IOV_MAX 1024)
                if lowat:
                    want = max(1, min(total - got_all, _READ_LOWAT))
                    if want != lowat:
                        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, want)
                        self.sock.settimeout(_LOWAT_WAIT_S if want > 1 else self.socket_timeout_s)
                        lowat = want
                try:
                    got = self.sock.recvmsg_into(iov[i:j + 1])[0]
                except TimeoutError:
                    if lowat <= 1:
                        raise
                    self._drop_lowat()       # fewer bytes came than the mark: read the rest as it comes
                    lowat = 0
                    continue
                if got == 0:
                    raise ConnectionError(f"redis server {self.url} closed the connection")
                got_all += got
                while got:
                    nb = iov[i].nbytes
                    if got >= nb:
                        got -= nb
                        i += 1
                    else:
                        iov[i] = iov[i][got:]
                        got = 0
                while in_step and c < len(checks) and checks[c][0] <= got_all:
                    in_step = checks[c][1] == checks[c][2]
                    c += 1
        finally:
            if lowat > 1:
                self._drop_lowat()
        if not in_step:                    # off shape: the rest is parsed with the mark dropped
            return self._reparse(bufs, got_all, len(commands))
        self.pos = self.end = 0
        pong = self._reply([])
        if pong != b"PONG":
            raise ConnectionError(f"redis server {self.url}: out of step after a direct read (got {pong!r} for PING)")
        return None

    def _drop_lowat(self) -> None:
        """Reads return what has arrived again, under the connection's own timeout."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        self.sock.settimeout(self.socket_timeout_s)

    def _reparse(self, bufs: list, got_all: int, n: int) -> list:
        """execute_into's fallback: the ``got_all`` bytes read into ``bufs`` (in order) become the start of
        the read buffer, and the n replies (and the PING's) are parsed from there as ``execute`` does."""
        raw, left = bytearray(), got_all
        for b in bufs:
            if left <= 0:
                break
            raw += b[:left]
            left -= b.nbytes
        if len(raw) > len(self.buf):
            self.buf = bytearray(2 * len(raw))
        self.buf[:len(raw)] = raw
        self.pos, self.end = 0, len(raw)
        big: list = []
        replies = [self._reply(big) for _ in range(n + 1)]
        replies = _resolve(replies, big, self.buf) if big else replies
        return replies[:n]

    def _send(self, parts: list) -> None:
        """Send the parts in order without joining them (records go out from their own buffers)."""
        small: list = []
        queue: list = []
        for p in parts:        # coalesce runs of small parts, keep long ones as they are
            if len(p) < _VIEW_MIN:
                small.append(p)
                continue
            if small:
                queue.append(b"".join(small))
                small = []
            queue.append(p)
        if small:
            queue.append(b"".join(small))
        i = 0
        while i < len(queue):
            sent = self.sock.sendmsg(queue[i:i + 512])
            while sent:
                n = len(queue[i])
                if sent >= n:
                    sent -= n
                    i += 1
                else:
                    queue[i] = memoryview(queue[i])[sent:]
                    sent = 0

    # --- reading ---------------------------------------------------------------------------

    def _ensure(self, n: int) -> None:
        """Make at least n unread bytes available (pos..pos+n)."""
        need = self.pos + n
        if need > len(self.buf):
            grown = bytearray(max(need, 2 * len(self.buf)))   # a new buffer: views of the old one stay valid
            grown[:self.end] = memoryview(self.buf)[:self.end]
            self.buf = grown
        while self.end < need:
            with memoryview(self.buf) as mv:
                got = self.sock.recv_into(mv[self.end:])
            if got == 0:
                raise ConnectionError(f"redis server {self.url} closed the connection")
            self.end += got

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n", self.pos, self.end)
            if i >= 0:
                line = bytes(self.buf[self.pos:i])
                self.pos = i + 2
                return line
            self._ensure(self.end - self.pos + 1)

    def _reply(self, big: list):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            self._ensure(n + 2)
            start = self.pos
            self.pos += n + 2
            if n >= _VIEW_MIN:
                big.append((start, n))
                return _Big(len(big) - 1)
            return bytes(self.buf[start:start + n])
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._reply(big) for _ in range(n)]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            msg = rest.decode(errors="replace")
            if msg.startswith("LOADING"):
                raise redis.BusyLoadingError(msg)
            if msg.startswith("NOSCRIPT"):
                return redis.exceptions.NoScriptError(msg)
            return redis.ResponseError(msg)
        raise ConnectionError(f"redis server {self.url} sent an unknown reply type {kind!r}")


class _Big:
    """A placeholder for a long bulk string, replaced by a memoryview once the whole reply is read."""

    __slots__ = ("i",)

    def __init__(self, i: int):
        self.i = i


class Bulks(list):
    """A reply array whose items are all long bulk strings (memoryviews): ``buf`` and ``starts`` say where
    each lies in the read buffer, so equal-length records at a regular stride can be read as one array."""

    buf: bytearray
    starts: list[int]


def _resolve(x, big: list, buf: bytearray):
    if isinstance(x, _Big):
        start, n = big[x.i]
        return memoryview(buf)[start:start + n]
    if isinstance(x, list):
        if x and all(isinstance(v, _Big) for v in x):
            out = Bulks(_resolve(v, big, buf) for v in x)
            out.buf, out.starts = buf, [big[v.i][0] for v in x]
            return out
        return [_resolve(v, big, buf) for v in x]
    return x


def _encode(cmd: list):
    """One command -> RESP parts (bytes-like): short arguments joined into as few parts as possible,
    long ones (at least _VIEW_MIN bytes) sent from their own buffers without a copy."""
    out, run = [], [b"*%d\r\n" % len(cmd)]
    for a in cmd:
        t = type(a)
        # ints (slot ids, timesteps, uses) and bytes are the common case: no call per argument
        b = b"%d" % a if t is int else a if t is bytes else _as_bytes(a)
        if type(b) is bytes and len(b) < _VIEW_MIN:
            run.append(b"$%d\r\n%b\r\n" % (len(b), b))
        else:                         # a record: sent from its own buffer
            run.append(b"$%d\r\n" % memoryview(b).nbytes)
            out += (b"".join(run), b)
            run = [b"\r\n"]
    out.append(b"".join(run))
    return out


def _as_bytes(a):
    """A command argument other than bytes -> bytes, or a buffer of at least _VIEW_MIN bytes as it is."""
    if isinstance(a, (bytearray, memoryview)):
        return a if memoryview(a).nbytes >= _VIEW_MIN else bytes(a)
    if isinstance(a, str):
        return a.encode()
    if isinstance(a, (int, np.integer)):
        return b"%d" % int(a)
    if isinstance(a, float):
        return repr(a).encode()
    raise TypeError(f"cannot send a {type(a).__name__} to redis")


def owned(x):
    """A reply with every memoryview copied to bytes (to keep it across another ``execute``)."""
    if isinstance(x, memoryview):
        return bytes(x)
    if isinstance(x, list):
        return [owned(v) for v in x]
    return x
