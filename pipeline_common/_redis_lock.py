"""The cross-host lock: ``flock`` on this host, then portalocker's ``RedisLock``, with fencing.

A state shared by several hosts (a network volume) is locked in two steps: first the
host's own ``flock`` queue (a per-host lock file, so threads and processes of one host
keep their fair, fast queue and no lock ever spans hosts through the file system), then
a Redis lock held by a pub/sub subscription (portalocker's ``RedisLock``): it is free as
soon as the holder's connection closes, so a killed holder blocks nobody for long.

Beside the lock, in Redis:

- ``<channel>:fence``: a counter. Each acquisition draws a token from it with ``INCR``,
  raised above the newest token the log recorded (so a Redis restart that lost the
  counter never hands out a smaller one). Every log record written under the lock
  carries its token.
- ``<channel>:holder``: a hash with the holder's id, token, pid, host, since and
  operation: what a waiter and ``pipeline-state lock --lock URL`` show.

Right before the replace the writer checks (:meth:`CrossHostLock.check`) that the
holder record is still its own and that no newer token has committed; if not, the
commit is refused with :class:`StateLockLostError` and nothing is written. See
docs/multi-host.md for the window that remains.

``redis`` and ``portalocker`` are imported only when a Redis lock is used: the core
imports without them (``pip install 'pipeline-common[redis]'``).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ._lock import ProcessLock
from ._time import now_iso
from .errors import StateLockError, StateLockLostError, StateLockUnavailableError

if TYPE_CHECKING:
    import portalocker
    import redis

__all__ = ["CrossHostLock", "RedisLock", "host_name", "local_lock_path", "resolve_lock"]

HOST_ENV = "PIPELINE_STATE_HOST"
"""Environment variable that overrides the host name the lock records (tests simulate
several hosts with it; a real host needs nothing)."""

INSTALL_HINT = "pip install 'pipeline-common[redis]'"

_ATTEMPTS = 10  # cleanup retries when interrupts keep cutting it short

# One round trip: draw a token above both the counter and the newest logged token,
# and record the holder beside the lock.
_ACQUIRE_SCRIPT = """
local v = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[1])
if v <= floor then
  v = floor + 1
  redis.call('SET', KEYS[1], v)
end
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'id', ARGV[2], 'token', v, 'pid', ARGV[3], 'host', ARGV[4],
           'since', ARGV[5], 'operation', ARGV[6])
return v
"""

# Forget the holder record only if it is still ours (a newer holder's stays).
_RELEASE_SCRIPT = """
if redis.call('HGET', KEYS[1], 'id') == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def host_name() -> str:
    """The host name the lock records: ``$PIPELINE_STATE_HOST`` or the real one."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


def _redact(url: str) -> str:
    """``url`` without its password, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def _check_db(url: str) -> None:
    """Refuse a database number redis-py would silently replace with 0 (``/abc``)."""
    parts = urlsplit(url)
    dbs = [v for k, v in parse_qsl(parts.query) if k == "db"]
    if parts.scheme != "unix" and parts.path.strip("/"):
        dbs.append(parts.path.strip("/"))
    for db in dbs:
        if not db.isdigit():
            raise ValueError(
                f"the Redis URL {_redact(url)!r} names database {db!r}: a database is a "
                "number, e.g. redis://host:6379/0"
            )


class RedisLock:
    """Lock a state across hosts through Redis: ``PipelineState(path, lock=RedisLock(url))``.

    ``PipelineState(path, lock="redis://host:6379/0")`` is the same with every default.
    Needs ``pip install 'pipeline-common[redis]'``.

    Args:
        url: The Redis server, e.g. ``redis://redis.internal:6379/0`` (``rediss://``
            for TLS; a password in the URL is never shown in messages).
        name: What identifies the state on the server. Default: the state file's
            absolute path, so mount the shared volume at the same path on every host,
            or give every host the same ``name``.
        check_interval: Seconds between attempts while the lock is held elsewhere.
        unavailable_timeout: Seconds a waiter gives a silent holder (paused, or cut
            off by the network) to answer before it cuts that holder's connection and
            takes the lock; the paused holder's commit is then refused (fencing).
        connect_timeout: Seconds to wait for a TCP connection to Redis.
        socket_timeout: Seconds to wait for a Redis reply.
        health_check_interval: Seconds between redis-py's health checks of an idle
            connection.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        check_interval: float = 0.05,
        unavailable_timeout: float = 1.0,
        connect_timeout: float = 2.0,
        socket_timeout: float = 5.0,
        health_check_interval: float = 1.0,
    ) -> None:
        if not isinstance(url, str) or urlsplit(url).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                "a Redis lock needs a redis://, rediss:// or unix:// URL, not "
                f"{_redact(url) if isinstance(url, str) else url!r}"
            )
        _check_db(url)
        self.url = url
        self.name = name
        self.check_interval = check_interval
        self.unavailable_timeout = unavailable_timeout
        self.connect_timeout = connect_timeout
        self.socket_timeout = socket_timeout
        self.health_check_interval = health_check_interval

    def __repr__(self) -> str:
        return f"RedisLock({_redact(self.url)!r})"


def resolve_lock(lock: str | RedisLock | None) -> RedisLock | None:
    """The Redis lock ``PipelineState(lock=...)`` asks for; None for the default flock.

    Raises:
        ValueError: ``lock`` is neither ``"flock"``, a Redis URL nor a :class:`RedisLock`.
        ImportError: a Redis lock without the ``redis`` extra installed.
    """
    if lock is None or lock == "flock":
        return None
    config = lock if isinstance(lock, RedisLock) else None
    if config is None:
        if not isinstance(lock, str):
            raise ValueError(
                f"lock must be 'flock', a redis:// URL or a RedisLock, not {type(lock).__name__}"
            )
        config = RedisLock(lock)
    _import_backend()
    return config


def _import_backend() -> None:
    try:
        import portalocker.redis  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            f"a Redis lock needs the redis extra, which is not installed ({exc}); run "
            f"{INSTALL_HINT}"
        ) from exc


def local_lock_path(lock_path: Path) -> Path:
    """This host's own ``flock`` file beside the state (``<state>.lock.<host>``).

    One file per host: a lock file shared by hosts would turn ``flock`` into a lock over
    the network file system (NFS emulates it with its own lock protocol, slow to recover
    when a host dies), and on one machine simulating several hosts the queues must not
    meet. Redis is what orders the hosts.
    """
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", host_name())
    return lock_path.with_name(f"{lock_path.name}.{safe}")


class CrossHostLock:
    """The state's lock in Redis mode: this host's flock, then the Redis lock.

    Duck-typed like :class:`~pipeline_common._lock.ProcessLock` (``acquire``,
    ``release``, ``held_by_current_thread``), so the transaction machinery above needs
    no change. One per ``PipelineState``; its threads are serialized by the local lock
    (threads, then flock) before any of them talks to Redis.
    """

    def __init__(
        self,
        config: RedisLock,
        local: ProcessLock,
        state_path: Path,
        last_fence: Callable[[], int],
    ) -> None:
        self.config = config
        self.local = local
        self.path = local.path
        self.state_path = state_path
        self._last_fence = last_fence
        name = config.name if config.name is not None else str(state_path)
        self.channel = f"pipeline_common:{name}"
        self.fence_key = f"{self.channel}:fence"
        self.holder_key = f"{self.channel}:holder"
        self.url = _redact(config.url)
        self.token: int | None = None
        """The fencing token of the current (or last) hold."""
        self._holder_id = ""
        self._pid = 0
        self._connection: redis.Redis | None = None
        self._remote: portalocker.RedisLock | None = None
        self._releasing: threading.Thread | None = None  # the last hold's teardown
        self._teardown_guard = threading.Lock()  # one teardown of the subscription at a time
        self._held_remote = False  # the Redis lock is ours until release() finishes with it

    # -- the ProcessLock interface ---------------------------------------------------

    def held_by_current_thread(self) -> bool:
        """True when this thread of this process holds the lock."""
        return self.local.held_by_current_thread()

    def acquire(self, timeout: float | None, operation: str, state_path: Path) -> None:
        """Take this host's flock, then the Redis lock, within ``timeout`` seconds.

        Whatever is raised where (a timeout, or a ``KeyboardInterrupt`` between any two
        steps), both locks are let go before it propagates.
        """
        start = time.monotonic()
        self.local.acquire(timeout, operation, state_path)
        try:
            remaining = None if timeout is None else max(timeout - (time.monotonic() - start), 0)
            self._acquire_remote(remaining, operation)
        except BaseException:
            # Retried: an interrupt inside the cleanup must not leave a lock held.
            for _ in range(_ATTEMPTS):
                try:
                    self.release()
                except BaseException:  # noqa: BLE001 - the first error is re-raised
                    continue
                break
            raise

    def release(self) -> None:
        """Release the Redis lock (forgetting our holder record), then the flock.

        Safe to call again when an interrupt cut a release short: the Redis part is
        marked done only once its teardown is under way, so a retry finishes it, and
        the flock's release is itself re-runnable. After fork, a child never releases
        its parent's locks.
        """
        if self._held_remote and self._pid == os.getpid():
            self._release_remote()
        self.local.release()

    # -- Redis -----------------------------------------------------------------------

    def _client(self) -> redis.Redis:
        import redis

        if self._pid != os.getpid():
            # A forked child must not touch its parent's sockets, subscription or threads.
            self._connection = None
            self._remote = None
            self._releasing = None
            self._held_remote = False
            self._teardown_guard = threading.Lock()
            self._pid = os.getpid()
        if self._connection is None:
            cfg = self.config
            self._connection = redis.Redis.from_url(
                cfg.url,
                socket_connect_timeout=cfg.connect_timeout,
                socket_timeout=cfg.socket_timeout,
                health_check_interval=cfg.health_check_interval,
                decode_responses=True,
            )
        return self._connection

    def _unavailable(self, exc: BaseException, timeout: float | None) -> StateLockUnavailableError:
        import redis.exceptions

        if isinstance(exc, redis.exceptions.AuthenticationError):
            what = "refused this client's credentials"
            check = "Check the user and password in the URL (or the server's requirepass/ACL)."
        elif isinstance(exc, redis.exceptions.ResponseError) and "DB index" in str(exc):
            what = "has no such database"
            check = (
                "Check the database number in the URL (a server has 16, 0-15, unless its "
                "'databases' setting says otherwise)."
            )
        else:
            what = "cannot be reached"
            check = (
                "Check that Redis runs there, that this host can reach it (host, port, "
                "firewall, TLS, password) and that the URL is right."
            )
        return StateLockUnavailableError(
            f"could not lock {self.state_path}: the Redis lock server {self.url} {what} "
            f"({type(exc).__name__}: {exc}). {check} Nothing was written.",
            path=self.state_path,
            url=self.url,
            timeout=timeout,
        )

    def _acquire_remote(self, timeout: float | None, operation: str) -> None:
        import portalocker
        import portalocker.exceptions
        import redis.exceptions

        connection = self._client()
        releasing = self._releasing
        if releasing is not None and releasing.ident is not None:
            releasing.join()  # the previous hold's subscription is gone before a new one
        self._releasing = None
        remote = self._remote
        if remote is not None and remote.pubsub is not None:
            # A teardown that never ran (an interrupted release): finish it here.
            with self._teardown_guard:
                self._quiet_remote_release()
        try:
            connection.ping()
        except redis.exceptions.RedisError as exc:
            raise self._unavailable(exc, timeout) from exc
        if self._remote is None:
            self._remote = portalocker.RedisLock(
                self.channel,
                connection=connection,
                check_interval=self.config.check_interval,
                unavailable_timeout=self.config.unavailable_timeout,
                thread_sleep_time=min(0.005, self.config.check_interval),
                interrupt_on_lost=False,  # a loss is caught at the commit (fencing)
            )
        remote = self._remote
        try:
            remote.acquire(timeout=1e9 if timeout is None else timeout)
        except portalocker.exceptions.AlreadyLocked:
            holder = self.holder()
            raise self._timeout_error(timeout, holder) from None
        except (redis.exceptions.RedisError, portalocker.exceptions.LockException) as exc:
            self._quiet_remote_release()
            try:
                connection.ping()
            except redis.exceptions.RedisError:
                raise self._unavailable(exc, timeout) from exc
            raise StateLockError(
                f"could not lock {self.state_path}: the Redis lock {self.channel!r} on "
                f"{self.url} failed ({type(exc).__name__}: {exc}). Nothing was written; "
                "run again.",
                path=self.state_path,
                lock_file=self.path,
                timeout=timeout,
            ) from exc
        except BaseException:
            self._quiet_remote_release()  # interrupted: never keep a half-taken lock
            raise
        try:
            self._holder_id = uuid.uuid4().hex
            script = connection.register_script(_ACQUIRE_SCRIPT)
            token = script(
                keys=[self.fence_key, self.holder_key],
                args=[
                    self._last_fence(),
                    self._holder_id,
                    os.getpid(),
                    host_name(),
                    now_iso(),
                    operation,
                ],
            )
            self.token = int(token)
            self._held_remote = True
        except BaseException as exc:
            self._quiet_remote_release()
            if isinstance(exc, redis.exceptions.RedisError):
                raise self._unavailable(exc, timeout) from exc
            raise

    def _timeout_error(
        self, timeout: float | None, holder: dict[str, Any] | None
    ) -> StateLockError:
        if holder:
            who = (
                f"held by pid {holder.get('pid')} on {holder.get('host')} since "
                f"{holder.get('since')} for {holder.get('operation')!r} (token "
                f"{holder.get('token')})"
            )
        else:
            who = "held, and the holder left no record in Redis"
        return StateLockError(
            f"could not lock {self.state_path} within {timeout} s: the Redis lock "
            f"{self.channel!r} on {self.url} is {who}. Wait for it to finish, or stop that "
            "process if it is stuck (a killed holder frees the lock at once).",
            path=self.state_path,
            lock_file=self.path,
            timeout=timeout,
            holder=holder,
        )

    def _release_remote(self) -> None:
        """Forget our holder record, then drop the subscription on a helper thread.

        Each step is safe to repeat, so a release cut short by an interrupt is finished
        by running it again (or by the next acquire).
        """
        import redis.exceptions

        connection = self._client()
        # Redis gone: so is the lock, and the record with it (or a newer one's).
        with contextlib.suppress(redis.exceptions.RedisError):
            connection.register_script(_RELEASE_SCRIPT)(
                keys=[self.holder_key], args=[self._holder_id]
            )
        # The record is gone, so no check can pass for this hold any more. Dropping the
        # subscription waits for portalocker's reader thread (~10-20 ms): do it on a
        # helper thread, joined by the next acquire, so the caller does not wait for it.
        thread = self._releasing
        if thread is None:
            thread = self._releasing = threading.Thread(
                target=self._teardown, name="pipeline-redis-release", daemon=True
            )
        if thread.ident is None:
            with contextlib.suppress(RuntimeError):  # started by the interrupted call
                thread.start()
        self._held_remote = False

    def _teardown(self) -> None:
        with self._teardown_guard:
            self._quiet_remote_release()

    def _quiet_remote_release(self) -> None:
        remote = self._remote
        if remote is None:
            return
        try:
            remote.release()
        except Exception:  # noqa: BLE001 - the subscription dies with its connection anyway
            self._remote = None  # start from a fresh object next time

    def holder(self) -> dict[str, Any] | None:
        """What the holder recorded in Redis (pid, host, since, operation, token), or None."""
        import redis.exceptions

        try:
            raw = self._client().hgetall(self.holder_key)
        except redis.exceptions.RedisError:
            return None
        if not raw:
            return None
        record: dict[str, Any] = {k: raw[k] for k in ("host", "since", "operation") if k in raw}
        for key in ("pid", "token"):
            if key in raw:
                try:
                    record[key] = int(raw[key])
                except ValueError:
                    record[key] = raw[key]
        return record

    def info(self) -> tuple[bool, dict[str, Any] | None]:
        """``(held, holder)`` as Redis sees it now (for ``lock_info()``).

        Raises:
            StateLockUnavailableError: Redis cannot be reached.
        """
        import redis.exceptions

        try:
            subscribers = int(self._client().pubsub_numsub(self.channel)[0][1])
        except redis.exceptions.RedisError as exc:
            raise self._unavailable(exc, None) from exc
        holder = self.holder()
        held = subscribers > 0 and holder is not None
        return held, holder if held else None

    def check(self, last_fence: int) -> None:
        """Refuse to commit unless this hold is still the lock's current one.

        Called right before the replace. ``last_fence`` is the newest token the log
        recorded a commit with; this hold's own token is fine (one hold may commit
        more than once: a migration or a recovery record, then the transaction).

        Raises:
            StateLockLostError: the subscription was lost, Redis cannot confirm the hold,
                the holder record is another's, or a newer token already committed.
        """
        import redis.exceptions

        token = self.token
        remote = self._remote
        reason = ""
        holder: dict[str, Any] | None = None
        if remote is None or self._pid != os.getpid() or token is None:
            reason = "this process does not hold the Redis lock"
        elif remote.lost:
            reason = "the Redis connection that held the lock was lost or cut"
        else:
            try:
                found = self._client().hmget(self.holder_key, ["id", "token"])
            except redis.exceptions.RedisError as exc:
                reason = f"Redis cannot confirm the hold ({type(exc).__name__}: {exc})"
            else:
                if found[0] != self._holder_id:
                    holder = self.holder()
                    reason = (
                        "another holder took the lock"
                        if holder
                        else "the holder record is gone (Redis restarted, or the lock was cut)"
                    )
                elif last_fence > token:
                    # Equal is this very hold: a recover or migrate record written
                    # before the transaction's own commit carries the same token.
                    reason = f"a newer holder (token {last_fence}) already committed"
        if not reason:
            return
        raise StateLockLostError(
            f"refused to commit {self.state_path}: the lock was lost during the "
            f"transaction ({reason}; this hold's token is {token}, lock server {self.url}). "
            "The state file is unchanged and nothing was logged; run the transaction "
            "again. If this repeats, raise the lock's unavailable_timeout or look for "
            "long pauses (swap, a stopped process, a slow network).",
            path=self.state_path,
            url=self.url,
            token=token,
            holder=holder,
        )
