"""The Redis backend's wire path: SlotFormat records and the RESP client, against a real redis-server."""

from __future__ import annotations

import numpy as np
import pytest
import redis

from common.pool.base import RecordCorrupt
from common.pool.resp import HEADER_BYTES, RespConnection, SlotFormat

SHAPE = (3, 4, 4)


def arrays(fmt: SlotFormat, n: int, seed: int = 0) -> tuple[dict, np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    fields = {}
    for name in fmt.fields:
        a = rng.standard_normal((n, *fmt.shape)).astype(np.float32)
        fields[name] = a.view(np.int32).astype(np.int16) if fmt.storage == "bf16" else a.astype(fmt.wire)
    t = rng.integers(0, 1000, n)
    y = rng.integers(0, 10, n) if fmt.has_label else None
    return fields, t, y


def empty_dest(fmt: SlotFormat, n: int) -> dict:
    d = {name: np.zeros((n, *fmt.shape), dtype=fmt.wire) for name in fmt.fields}
    d.setdefault("logvar", None)
    d["t"] = np.full(n, -1, dtype=np.int64)
    d["y"] = np.zeros(n, dtype=np.int64) if fmt.has_label else None
    return d


@pytest.mark.parametrize("storage,shape,logvar,label", [
    ("fp32", SHAPE, True, False), ("fp16", SHAPE, False, True), ("bf16", SHAPE, True, True),
    ("fp16", (1, 3, 5), True, True),      # 30 bytes per field: padded on the wire, the staged path
])
def test_records_round_trip_into_permuted_rows(storage, shape, logvar, label):
    fmt = SlotFormat(shape, storage, logvar, label)
    fields, t, y = arrays(fmt, 6)
    rows = fmt.encode(fields, t, y)
    assert rows.shape == (6, fmt.record_bytes) and fmt.record_bytes % 8 == 0
    dest, to = empty_dest(fmt, 6), np.array([3, 0, 5, 1, 4, 2])
    why = fmt.decode_into([bytes(r) for r in rows], dest, to)
    assert why == [None] * 6
    for name in fmt.fields:
        np.testing.assert_array_equal(dest[name][to], fields[name])
    np.testing.assert_array_equal(dest["t"][to], t)
    if label:
        np.testing.assert_array_equal(dest["y"][to], y)


def damaged(fmt: SlotFormat) -> tuple[bytes, dict[str, bytes]]:
    fields, t, y = arrays(fmt, 1)
    good = bytes(fmt.encode(fields, t, y)[0])
    other = SlotFormat((3, 4, 5), fmt.storage, fmt.has_logvar, fmt.has_label)
    fo, to_, yo = arrays(other, 1)
    flip = bytearray(good)
    flip[len(flip) - 5] ^= 0xFF                   # the last tensor byte (as the conformance corruption does)
    hdr_flip = bytearray(good)
    hdr_flip[26] ^= 0x01                           # t in the header: only the checksum sees it
    version = bytearray(good)
    version[7] = 9
    return good, {
        "checksum": bytes(flip), "checksum ": bytes(hdr_flip), "truncated": good[: len(good) // 2],
        "foreign": b"\x93\x01\x02\x03 a foreign value", "version": bytes(version),
        "shape": bytes(other.encode(fo, to_, yo)[0]),
        "fields": bytes(SlotFormat(fmt.shape, fmt.storage, not fmt.has_logvar, fmt.has_label).encode(
            *arrays(SlotFormat(fmt.shape, fmt.storage, not fmt.has_logvar, fmt.has_label), 1))[0]),
    }


def test_every_kind_of_damage_is_named_and_isolated():
    fmt = SlotFormat(SHAPE, "fp32", True, False)
    good, bad = damaged(fmt)
    payloads = [good, *bad.values(), None, good]
    dest = empty_dest(fmt, len(payloads))
    dest["x_t"][:] = 7.0
    why = fmt.decode_into(payloads, dest, np.arange(len(payloads)))
    assert why[0] is None and why[-1] is None
    expect = {"checksum": "fails its checksum", "checksum ": "fails its checksum", "truncated": "truncated",
              "foreign": "foreign record", "version": "version 9", "shape": "shape (3, 4, 5)",
              "fields": "(logvar, y)"}
    for (kind, _), w in zip(bad.items(), why[1:-2]):
        assert w is not None and expect[kind] in w, (kind, w)
    assert why[-2] == "READY slot holds no record"
    # a damaged record leaves its row empty (zeros, t untouched), intact ones are written
    for i, w in enumerate(why):
        if w is not None:
            assert (dest["x_t"][i] == 0).all() or (dest["x_t"][i] == 7.0).all()
            assert dest["t"][i] == -1
    with pytest.raises(RecordCorrupt, match="checksum"):
        fmt.check(bad["checksum"])


def test_the_word_sum_catches_a_flipped_byte_anywhere():
    fmt = SlotFormat((1, 4, 4), "fp16", True, True)
    good = bytes(fmt.encode(*arrays(fmt, 1))[0])
    for pos in range(len(good)):
        b = bytearray(good)
        b[pos] ^= 0x5A
        with pytest.raises(RecordCorrupt):
            fmt.check(bytes(b))
    assert fmt.check(good).shape == (1, fmt.record_bytes)
    assert good[:7] == b"DKDMSLT" and len(good) == HEADER_BYTES + 3 * 32 + 8


def test_resp_connection_pipelines_and_returns_long_values_as_views(redis_server):
    c = RespConnection(redis_server.url)
    big = np.random.default_rng(0).bytes(5000)
    r = c.execute([["SET", "a", big], ["SET", "b", b"short"], ["MGET", "a", "b", "missing"], ["INCRBY", "n", 5],
                   ["HSET", "h", 1, big, 2, b"x"], ["HMGET", "h", 1, 2, 3], ["LPUSH", "a", "x"]])
    assert r[0] == b"OK" and r[1] == b"OK" and r[3] == 5 and r[4] == 2
    a, b, missing = r[2]
    assert isinstance(a, memoryview) and bytes(a) == big and b == b"short" and missing is None
    assert bytes(r[5][0]) == big and r[5][1] == b"x" and r[5][2] is None
    assert isinstance(r[6], redis.ResponseError) and "WRONGTYPE" in str(r[6])
    # a reply larger than the read buffer (1 MiB) grows it
    huge = np.random.default_rng(1).bytes(3 << 20)
    assert bytes(c.execute([["SET", "z", huge], ["GET", "z"]])[1]) == huge
    noscript = c.execute([["EVALSHA", "0" * 40, 0]])[0]
    assert isinstance(noscript, redis.exceptions.NoScriptError)
    c.close()


def test_resp_connection_auth_select_and_reconnect(redis_server):
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "alice", "on", ">s3cret", "~*", "+@all")
    url = f"redis://alice:s3cret@127.0.0.1:{redis_server.port}/3"
    c = RespConnection(url)
    assert c.execute([["SET", "k", "v"]]) == [b"OK"]
    assert redis.Redis.from_url(url).get("k") == b"v"
    assert redis_server.client().get("k") is None           # db 0 untouched: SELECT 3 happened
    with pytest.raises(redis.AuthenticationError):
        RespConnection(f"redis://alice:wrong@127.0.0.1:{redis_server.port}/0").execute([["PING"]])
    redis_server.restart(kill=True)                           # the user is gone with the server's memory
    admin = redis_server.client()
    admin.execute_command("ACL", "SETUSER", "alice", "on", ">s3cret", "~*", "+@all")
    with pytest.raises((ConnectionError, OSError)):
        c.execute([["PING"]])                                 # the old socket is dead
    assert c.execute([["PING"]]) == [b"PONG"]                 # and the next call reconnects
    redis_server.kill()
    with pytest.raises((ConnectionError, OSError)):
        c.execute([["PING"]])
    c.close()


def test_the_preamble_runs_on_every_open_and_a_failing_one_fails_the_open(redis_server):
    c = RespConnection(redis_server.url, preamble=[["INCR", "opens"], ["SCRIPT", "LOAD", "return 7"]])
    sha = redis_server.client().script_load("return 7")
    assert c.execute([["EVALSHA", sha, 0]]) == [7]
    admin = redis_server.client()
    admin.script_flush()
    admin.client_kill_filter(_type="normal", skipme=True)       # the server drops the connection
    with pytest.raises((ConnectionError, OSError)):
        c.execute([["PING"]])
    assert c.execute([["EVALSHA", sha, 0]]) == [7]          # reopened: loaded again before this call
    assert int(admin.get("opens")) == 2
    c.close()
    with pytest.raises(redis.ResponseError):
        RespConnection(redis_server.url, preamble=[["NOSUCHCOMMAND"]]).execute([["PING"]])


def test_an_hmget_of_records_decodes_in_one_strided_pass_and_still_isolates_damage(redis_server):
    """Equal-length records at a regular stride (a Bulks reply) take the strided copy; a damaged one among
    them fails its checksum alone, a truncated one sends that reply down the record-by-record path."""
    from common.pool.resp import Bulks

    fmt = SlotFormat((3, 8, 8), "fp32", True, False)
    fields, t, _ = arrays(fmt, 5, seed=3)
    rows = fmt.encode(fields, t, None)
    blobs = [bytes(r) for r in rows]
    flipped = bytearray(blobs[2])
    flipped[HEADER_BYTES + 100] ^= 0x10
    c = RespConnection(redis_server.url)
    c.execute([["HSET", "good", *[x for i, b in enumerate(blobs) for x in (i, b)]],
               ["HSET", "bad", *[x for i, b in enumerate(blobs) for x in (i, bytes(flipped) if i == 2 else b)]],
               ["HSET", "short", 0, blobs[0], 1, blobs[1][:-8]]])
    good, bad, short = c.execute([["HMGET", "good", *range(5)], ["HMGET", "bad", *range(5)], ["HMGET", "short", 0, 1]])
    assert isinstance(good, Bulks) and isinstance(bad, Bulks)
    dest, to = empty_dest(fmt, 12), np.array([4, 0, 3, 1, 2, 9, 5, 8, 7, 6, 10, 11])
    why = fmt.decode_into(good + bad + short, dest, to, [good, bad, short])
    assert why[:5] == [None] * 5 and why[7] == "record fails its checksum" and "truncated" in why[11]
    assert [w is None for w in why] == [True] * 7 + [False] + [True] * 3 + [False]
    for j in [0, 1, 2, 3, 4, 5, 6, 8, 9, 10]:
        src = j if j < 5 else (j - 5 if j < 10 else 0)
        np.testing.assert_array_equal(dest["x_t"][to[j]], fields["x_t"][src])
        assert dest["t"][to[j]] == t[src]
    assert (dest["x_t"][to[7]] == 0).all() and dest["t"][to[7]] == -1
    c.close()


def test_a_posted_command_is_answered_before_the_next_calls_replies(redis_server):
    """post sends a command and leaves its reply unread: the next execute or execute_into reads it first and
    hands it to the callback (an error reply as an exception), drain reads it at once, and a close before it
    is read tells the callback the reply is lost."""
    c = RespConnection(redis_server.url)
    got: list = []
    c.post(["INCRBY", "n", 2], got.append)
    c.post(["LPUSH", "n", "x"], got.append)                    # WRONGTYPE: an error reply
    assert got == [] and len(c.posted) == 2                    # sent, not read
    assert c.execute([["GET", "n"]]) == [b"2"]                 # it ran before the command sent after it
    assert got[0] == 2 and isinstance(got[1], redis.ResponseError) and not c.posted
    c.post(["INCRBY", "n", 1], got.append)
    c.drain()
    assert got[2] == 3 and not c.posted
    fmt = SlotFormat(SHAPE, "fp32", True, False)               # before a direct read of records, too
    fields, t, _ = arrays(fmt, 3, seed=2)
    c.execute([["HSET", "recs", *[x for i, r in enumerate(fmt.encode(fields, t, None)) for x in (i, bytes(r))]]])
    c.post(["INCRBY", "n", 1], got.append)
    dest, rows = empty_dest(fmt, 3), np.array([2, 0, 1])
    targets, hdr, trailer = fmt.placement(dest, rows)
    assert c.execute_into([["HMGET", "recs", 0, 1, 2]], [3], fmt.record_bytes, lambda: targets) is None
    assert got[3] == 4 and fmt.check_placed(dest, rows, hdr, trailer) == [None] * 3
    np.testing.assert_array_equal(dest["x_t"][rows], fields["x_t"])
    c.post(["INCRBY", "n", 1], got.append)
    c.close()                                                  # unread: the callback learns the reply is lost
    assert isinstance(got[4], ConnectionError) and not c.posted
    assert c.execute([["PING"]]) == [b"PONG"]                  # and the next call reconnects


def test_records_read_straight_into_the_batch_or_parsed_as_execute_does_when_a_reply_is_off_shape(redis_server):
    """execute_into: intact records land in their rows with no copy (None back); a missing, truncated,
    longer or foreign value, or an error reply, anywhere (the last item too) stops the direct read and the
    replies come back exactly as execute gives them, with no read left waiting and the connection in step."""
    fmt = SlotFormat((3, 8, 8), "fp32", True, False)
    fields, t, _ = arrays(fmt, 6, seed=5)
    blobs = [bytes(r) for r in fmt.encode(fields, t, None)]
    c = RespConnection(redis_server.url)
    c.execute([["HSET", "ok", *[x for i, b in enumerate(blobs) for x in (i, b)]],
               ["HSET", "odd", 0, blobs[0], 1, blobs[1][:-8], 2, blobs[2] + b"!", 3, b"\x93 foreign", 4, blobs[4]],
               ["SET", "str", "x"]])
    dest, rows = empty_dest(fmt, 10), np.array([3, 9, 0, 7, 1, 5, 2, 8, 4, 6])
    targets, hdr, trailer = fmt.placement(dest, rows)
    cmds = [["HMGET", "ok", 0, 1, 2], ["HMGET", "ok", 3, 4, 5]]
    assert c.execute_into(cmds, [3, 3], fmt.record_bytes, lambda: targets[:6]) is None
    assert fmt.check_placed(dest, rows[:6], hdr[:6], trailer[:6]) == [None] * 6
    for j in range(6):
        np.testing.assert_array_equal(dest["eps"][rows[j]], fields["eps"][j])
        assert dest["t"][rows[j]] == t[j]
    hdr[2, 30] ^= 1                                              # damage in place: its own checksum catches it
    assert fmt.check_placed(dest, rows[:6], hdr[:6], trailer[:6])[2] == "record fails its checksum"
    assert (dest["x_t"][rows[2]] == 0).all()

    def plain(replies):
        return [r if isinstance(r, Exception) else [None if v is None else bytes(v) for v in r] for r in replies]

    for cmds, counts in [
        ([["HMGET", "ok", 0, 1], ["HMGET", "odd", 0, 1, 2, 3, 4, 9]], [2, 6]),    # truncated, longer, foreign, missing
        ([["HMGET", "ok", 0, 1, 2, 3, 4, 5, 77]], [7]),                           # the last one missing
        ([["HMGET", "str", 0, 1], ["HMGET", "ok", 5]], [2, 1]),                  # an error reply first
    ]:
        expect = plain(c.execute(cmds))
        got = c.execute_into(cmds, counts, fmt.record_bytes, lambda: fmt.placement(empty_dest(fmt, sum(counts)),
                                                                                     np.arange(sum(counts)))[0])
        assert got is not None and str(plain(got)) == str(expect)
        assert c.execute([["PING"]]) == [b"PONG"], "the connection is out of step"
    c.close()


def test_a_large_direct_read_waits_for_whole_chunks_and_never_for_bytes_that_do_not_come(redis_server):
    """MB-sized replies over TCP are read in chunks of at least _READ_LOWAT bytes (SO_RCVLOWAT); a reply
    shorter than expected (a record missing in the middle or at the end) still comes back as execute gives
    it, at once or after one _LOWAT_WAIT_S at most, never after the socket timeout, and the mark is reset."""
    import socket
    import time

    from common.pool import resp

    fmt = SlotFormat((3, 32, 32), "fp32", True, False)             # 36 KiB records: 40 of them 1.5 MB
    fields, t, _ = arrays(fmt, 40, seed=7)
    blobs = [bytes(r) for r in fmt.encode(fields, t, None)]
    c = RespConnection(redis_server.url, socket_timeout_s=30.0)
    c.execute([["HSET", "big", *[x for i, b in enumerate(blobs) for x in (i, b)]]])
    assert 40 * fmt.record_bytes > 4 * resp._READ_LOWAT
    rows = np.random.default_rng(1).permutation(40)
    dest = empty_dest(fmt, 40)
    targets, hdr, trailer = fmt.placement(dest, rows)
    assert c.execute_into([["HMGET", "big", *range(40)]], [40], fmt.record_bytes, lambda: targets) is None
    assert fmt.check_placed(dest, rows, hdr, trailer) == [None] * 40
    np.testing.assert_array_equal(dest["logvar"][rows], fields["logvar"])
    assert c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    reparse, marks = c._reparse, []

    def spy(*a):                        # the rest of the stream is parsed with the mark dropped
        marks.append(c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT))
        return reparse(*a)

    c._reparse = spy
    for ids in ([*range(30), 99, *range(30, 39)], [*range(39), 99]):   # missing in the middle, at the end
        expect = [bytes(v) if v is not None else None for v in c.execute([["HMGET", "big", *ids]])[0]]
        t0 = time.monotonic()
        got = c.execute_into([["HMGET", "big", *ids]], [40], fmt.record_bytes,
                             lambda: fmt.placement(empty_dest(fmt, 40), np.arange(40))[0])
        assert time.monotonic() - t0 < resp._LOWAT_WAIT_S + 2.0
        assert [bytes(v) if v is not None else None for v in got[0]] == expect
        assert c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
        assert c.sock.gettimeout() == 30.0
        assert c.execute([["PING"]]) == [b"PONG"]
    assert marks == [1, 1]
    c.close()
