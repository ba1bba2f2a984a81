"""The calls of a Redis pool to its servers: pipelines, the pool's Lua script, connection loss and lost shards.

The commands for one server go in one redis-py pipeline; the Lua of ``common/pool/lua/`` is one script
whose first ARGV names the operation. Connection loss is retried with exponential backoff for
``pool.redis_retry_timeout_s``, then one PoolError names the server. A shard whose keys are gone (a
server restarted without persistence) is re-created empty, every slot in REFILL. URLs reach logs and
errors only through ``mask_url``, error texts with any password scrubbed.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from common.config import PoolConfig, mask_url, with_env_password
from common.pool.base import PoolError
from common.pool.redis_records import CLUSTER_SCHEME, parse_urls

logger = logging.getLogger("common.pool.redis_backend")     # one logger for the whole backend

_LUA = "\n".join((Path(__file__).parent / "lua" / f).read_text() for f in ("lib.lua", "groups.lua", "ops.lua"))
_SLOT_OVERHEAD = 256     # bytes per slot besides its record (set and hash entries): a lower bound


def queued(command: str, *args, **kw):
    """A queue function for ``RedisShards.exec``: ``pipe.<command>(*args, **kw)``."""
    return lambda pipe: getattr(pipe, command)(*args, **kw)


def _noinit(reply) -> bool:
    return isinstance(reply, redis.ResponseError) and str(reply).startswith("DKDMNOINIT")


class RedisShards:
    """The servers of pool ``cfg.name``: shard i's keys carry the hash tag ``{<name>:<i>}`` and live on
    server i mod n (one seed URL for a Redis Cluster). ``layout`` is checked against the stored one."""

    def __init__(self, cfg: PoolConfig, ranges: list[tuple[int, int]], layout: str, record_bytes: int, stored_bytes: int):
        self.cfg, self.ranges, self.layout = cfg, ranges, layout
        self.record_bytes, self.stored_bytes = record_bytes, stored_bytes
        self.local = {"retries": 0, "reinitialised_shards": 0}
        urls, self.cluster = parse_urls(cfg.redis_url)
        self.urls = [with_env_password(u) for u in urls]
        self._secrets = [p for p in (redis.connection.parse_url(u.replace(CLUSTER_SCHEME, "redis://")).get("password")
                                     for u in self.urls) if p]
        # One retry loop, ours (call), owns connection loss, so the clients' own retries are off.
        self._retry = Retry(ExponentialBackoff(cap=1.0, base=0.01), -1, (redis.ConnectionError, redis.TimeoutError),
                            is_retryable=lambda err: not isinstance(err, redis.AuthenticationError))
        self._down: dict[int, float] = {}       # server -> when its outage was first seen (monotonic)
        self._lock = threading.Lock()
        opts = {"socket_connect_timeout": 2.0, "socket_timeout": 60.0}
        if self.cluster:
            self.clients = [RedisCluster.from_url("redis://" + self.urls[0][len(CLUSTER_SCHEME):], **opts)]
        else:
            self.clients = [redis.Redis.from_url(u, retry=Retry(NoBackoff(), 0), **opts) for u in self.urls]
        self._script = self.clients[0].register_script(_LUA)

    def key(self, shard: int, name: str) -> str:
        """A key of shard ``shard``: its hash tag, then ``name`` (lib.lua lists them)."""
        return f"{{{self.cfg.name}:{shard}}}:{name}"

    def server(self, shard: int) -> int:
        return 0 if self.cluster else shard % len(self.clients)

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def call(self, server: int, fn):
        """``fn()`` against ``server``; connection loss is retried with exponential backoff for
        ``pool.redis_retry_timeout_s``, then PoolError. The outage is logged when it starts and ends."""
        url, first = mask_url(self.urls[server]), []

        def failed(err: Exception) -> None:
            if isinstance(err, redis.AuthenticationError):
                return
            now = time.monotonic()
            first.append(now)
            # an outage is a failure that outlasts the first retry (a pooled connection that died while the
            # server was away fails once and reconnects at once); threads sharing the client log it once
            if len(first) == 2 and self._down.setdefault(server, first[0]) == first[0]:
                logger.warning("pool %r: redis server %s unreachable (%s); retrying with backoff for up to %gs "
                               "(pool.redis_retry_timeout_s)", self.cfg.name, url, self._scrub(str(err)),
                               self.cfg.redis_retry_timeout_s)
            if now - first[0] >= self.cfg.redis_retry_timeout_s:
                raise PoolError(f"redis server {url} unreachable for {now - first[0]:.1f}s "
                                f"(pool.redis_retry_timeout_s={self.cfg.redis_retry_timeout_s:g}): "
                                f"{type(err).__name__}: {self._scrub(str(err))}") from None
            self.local["retries"] += 1

        try:
            out = self._retry.call_with_retry(fn, failed)
        except redis.AuthenticationError as err:
            raise PoolError(f"redis server {url} refused the credentials in pool.redis_url: {self._scrub(str(err))}") from None
        since = self._down.pop(server, None)
        if since is not None:
            logger.warning("pool %r: redis server %s reachable again after %.1fs; the pool carries on",
                           self.cfg.name, url, time.monotonic() - since)
        return out

    def exec(self, cmds: list) -> list:
        """(shard, queue) pairs, ``queue(pipe)`` queueing one command -> the replies in order (errors in place),
        one pipeline per server. Calls that meet NOSCRIPT (a server restarted, or a new one) run again once
        the script is loaded (SCRIPT LOAD reaches every primary of a cluster)."""
        out: list = [None] * len(cmds)
        by_server: dict[int, list[int]] = {}
        for i, (s, _) in enumerate(cmds):
            by_server.setdefault(self.server(s), []).append(i)
        for server, todo in by_server.items():
            for attempt in range(2):
                replies = self.call(server, lambda todo=todo, server=server: self._pipeline(server, [cmds[i][1] for i in todo]))
                for i, r in zip(todo, replies):
                    out[i] = r
                todo = [i for i in todo if isinstance(out[i], redis.exceptions.NoScriptError)]
                if not todo or attempt:
                    break
                self.call(server, lambda server=server: self.clients[server].script_load(_LUA))
        return out

    def evalsha(self, shard: int, argv: list):
        """The queue function of one call of the pool's script on ``shard``. EVALSHA is queued as it is:
        a pipeline given the Script object itself would ask SCRIPT EXISTS first, a round trip per call."""
        return queued("evalsha", self._script.sha, 1, self.key(shard, "meta"), *argv)

    def _pipeline(self, server: int, queue: list) -> list:
        pipe = self.clients[server].pipeline(transaction=False)
        for q in queue:
            q(pipe)
        return pipe.execute(raise_on_error=False)

    def run(self, calls: list) -> list:
        """Script calls (shard, argv[, pre]) -> their replies. ``pre``: commands queued before the call in its
        pipeline (a fill's staged records). A shard whose keys are gone is re-created and its calls run again."""
        replies = self._scripts(calls)
        if any(_noinit(r) for r in replies):
            self._recreate()
            again = [i for i, r in enumerate(replies) if _noinit(r)]
            for i, r in zip(again, self._scripts([calls[i] for i in again])):
                replies[i] = r
        for (s, argv, *_), r in zip(calls, replies):
            if isinstance(r, Exception):
                raise self.error(s, f"pool script {argv[0]}", r)
        return replies

    def _scripts(self, calls: list) -> list:
        cmds, at = [], []
        for s, argv, *pre in calls:
            cmds += [(s, q) for q in (pre[0] if pre else [])]
            at.append(len(cmds))
            cmds.append((s, self.evalsha(s, argv)))
        replies = self.exec(cmds)
        errors = [(s, r) for i, ((s, _), r) in enumerate(zip(cmds, replies)) if i not in at and isinstance(r, Exception)]
        if errors:
            raise self.error(errors[0][0], "a write", errors[0][1])
        return [replies[i] for i in at]

    def error(self, shard: int, what: str, err: Exception) -> PoolError:
        msg = str(err)
        if msg.startswith("DKDM "):             # the scripts' own errors: a user's mistake, said in one line
            return PoolError(msg[5:].split(" script: ")[0])
        return PoolError(f"redis server {mask_url(self.urls[self.server(shard)])}: {what} failed on shard {shard} "
                         f"of pool {self.cfg.name!r}: {self._scrub(msg)}")

    # --- shards ---------------------------------------------------------------------------------

    def init(self, shards: list[int], force: bool) -> list[int]:
        """Create the shards that do not exist (``force``: re-create them all, empty) -> the shards created."""
        if not force and not self.cluster:
            self._check_memory(shards)
        replies = self.exec([(s, self.evalsha(s, ["init", self.layout, *self.ranges[s], self.record_bytes, int(force)]))
                              for s in shards])
        for s, r in zip(shards, replies):
            if isinstance(r, Exception):
                raise self.error(s, "creating the shard", r)
            layout = r[1].decode()
            if layout != self.layout:
                raise PoolError(f"pool {self.cfg.name!r} on {mask_url(self.urls[self.server(s)])} has layout '{layout}', "
                                f"this process expects '{self.layout}' (another pool uses that name: pick another "
                                "pool.name or restore over it)")
        return [s for s, r in zip(shards, replies) if int(r[0])]

    def _recreate(self) -> None:
        """Some shard was found missing: re-create every missing shard of the pool (a server that restarted
        without persistence lost all of its shards), one thread of this process at a time."""
        with self._lock:
            created = self.init(list(range(len(self.ranges))), force=False)
        self.local["reinitialised_shards"] += len(created)
        if created:
            slots = sum(self.ranges[s][1] - self.ranges[s][0] for s in created)
            logger.warning("pool %r: shard(s) %s missing on %s (the server restarted without persistence?); re-created "
                           "with all %d of their slots empty in REFILL, the teachers warm them up again", self.cfg.name,
                           created, mask_url(",".join(sorted({self.urls[self.server(s)] for s in created}))), slots)

    def _check_memory(self, shards: list[int]) -> None:
        """Refuse shards that the server's maxmemory cannot hold (a fill hours later would fail otherwise)."""
        for server in sorted({self.server(s) for s in shards}):
            mine = [s for s in shards if self.server(s) == server]
            client = self.clients[server]
            info = self.call(server, lambda client=client: client.info("memory"))
            limit, used = int(info.get("maxmemory", 0) or 0), int(info["used_memory"])
            new = [s for s in mine if not self.call(server, lambda s=s, client=client: client.hexists(self.key(s, "meta"), "layout"))]
            slots = sum(self.ranges[s][1] - self.ranges[s][0] for s in new)
            need = slots * (self.stored_bytes + _SLOT_OVERHEAD)
            if limit > 0 and new and used + need > limit:
                raise PoolError(
                    f"redis server {mask_url(self.urls[server])}: pool {self.cfg.name!r} needs about {need / 2**20:.0f} MiB for "
                    f"{slots} slots of {self.stored_bytes} bytes, but maxmemory is {limit / 2**20:.0f} MiB with "
                    f"{used / 2**20:.0f} MiB used (raise maxmemory, or use fewer slots or storage_dtype fp16/bf16)")

    def destroy(self) -> None:
        """Delete every key of the pool."""
        for s in range(len(self.ranges)):
            client = self.clients[self.server(s)]
            keys = self.call(self.server(s), lambda client=client, s=s: list(client.scan_iter(match=self.key(s, "*"), count=1000)))
            for i in range(0, len(keys), 1000):
                self.exec([(s, queued("unlink", *keys[i:i + 1000]))])

    def close(self) -> None:
        for c in self.clients:
            c.close()
