"""The asyncio client, the inbox consumer and the blocking wrapper.

One JSON-RPC 2.0 object per line over the daemon's Unix socket (docs/api.md). Requests share
one connection, matched to their answers by id; ``watch`` and the inbox consumer use
connections of their own and come back by themselves when the daemon restarts.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from typing import (
    Any,
    AsyncGenerator,
    Awaitable,
    Callable,
    Dict,
    Generator,
    List,
    Optional,
    TypeVar,
)

from .errors import DaemonUnavailable, ImlinkError, Unavailable, error_from_json
from .types import (
    AckResult,
    ConversationPage,
    Event,
    HistoryPage,
    InboxPage,
    Json,
    LoginResult,
    Message,
    SendResult,
    Status,
    Version,
)

DEFAULT_SOCKET = "/run/imlinkd/api.sock"
#: Answers can be large (a page of 100 messages of 12 KB); the daemon's own limit on a
#: request line is 64 KiB, an answer line is at most about 1.3 MB.
_MAX_LINE = 32 * 1024 * 1024

T = TypeVar("T")


def default_socket() -> str:
    """``$IMLINKD_SOCKET``, else ``/run/imlinkd/api.sock`` (as ``imlinkctl``)."""
    return os.environ.get("IMLINKD_SOCKET") or DEFAULT_SOCKET


class _Conn:
    """One connection: a reader task routes answers to their callers by id and queues
    notifications (``None`` at the end)."""

    def __init__(self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.path = path
        self._reader = reader
        self._writer = writer
        self._next_id = 1
        self._pending: Dict[int, "asyncio.Future[Any]"] = {}
        self.notifications: "asyncio.Queue[Optional[Json]]" = asyncio.Queue()
        self.closed = False
        self.close_error: Optional[BaseException] = None
        self._task = asyncio.ensure_future(self._read_loop())

    @classmethod
    async def open(cls, path: str) -> "_Conn":
        try:
            reader, writer = await asyncio.open_unix_connection(path, limit=_MAX_LINE)
        except FileNotFoundError as e:
            raise DaemonUnavailable(path, "missing") from e
        except ConnectionRefusedError as e:
            raise DaemonUnavailable(path, "refused") from e
        except PermissionError as e:
            raise DaemonUnavailable(path, "denied") from e
        except OSError as e:
            raise DaemonUnavailable(path, "refused", str(e)) from e
        return cls(path, reader, writer)

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(msg, dict):
                    continue
                if "method" in msg and "id" not in msg:
                    params = msg.get("params")
                    self.notifications.put_nowait(
                        {"method": msg["method"], "params": params if isinstance(params, dict) else {}}
                    )
                    continue
                rid = msg.get("id")
                fut = self._pending.pop(rid, None) if isinstance(rid, int) else None
                if fut is None:
                    if rid is None and "error" in msg:
                        # An error for the connection (too many clients, idle, line too
                        # long): the daemon closes it next.
                        self.close_error = error_from_json(msg["error"])
                    continue
                if fut.done():
                    continue
                if "error" in msg:
                    fut.set_exception(error_from_json(msg["error"]))
                else:
                    fut.set_result(msg.get("result"))
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            if self.close_error is None:
                self.close_error = DaemonUnavailable(self.path, "lost", str(e))
        finally:
            self._finish()

    def _finish(self) -> None:
        if not self.closed:
            self.closed = True
            err = self.close_error or DaemonUnavailable(self.path, "lost")
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self._pending.clear()
            self.notifications.put_nowait(None)
            try:
                self._writer.close()
            except (OSError, RuntimeError):
                pass

    def lost(self) -> BaseException:
        return self.close_error or DaemonUnavailable(self.path, "lost")

    async def call(self, method: str, params: Optional[Json] = None) -> Any:
        if self.closed:
            raise self.lost()
        rid = self._next_id
        self._next_id += 1
        req: Json = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            req["params"] = params
        fut: "asyncio.Future[Any]" = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            self._writer.write(json.dumps(req, separators=(",", ":")).encode() + b"\n")
            await self._writer.drain()
        except (OSError, RuntimeError) as e:
            self._pending.pop(rid, None)
            if self.close_error is None:
                self.close_error = DaemonUnavailable(self.path, "lost", str(e))
            raise self.lost() from e
        return await fut

    async def close(self) -> None:
        if self.close_error is None:
            self.close_error = DaemonUnavailable(self.path, "closed")
        self._finish()
        self._task.cancel()
        try:
            await self._task
        except (asyncio.CancelledError, Exception):
            pass


class _Backoff:
    """Reconnect pacing: 50 ms doubling to 2 s, with jitter, for at most ``total`` seconds
    (None: for ever)."""

    def __init__(self, total: Optional[float]) -> None:
        self.deadline = None if total is None else time.monotonic() + total
        self.delay = 0.05

    async def wait(self, why: BaseException) -> None:
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise why
        d = self.delay * (0.5 + random.random() / 2)
        if self.deadline is not None:
            d = min(d, max(0.0, self.deadline - now))
        await asyncio.sleep(d)
        self.delay = min(self.delay * 2, 2.0)


def _retryable(e: BaseException) -> bool:
    return isinstance(e, (DaemonUnavailable, Unavailable)) and getattr(e, "reason", "") not in (
        "denied",
        "closed",
    )


def _params(**kw: Any) -> Json:
    return {k: v for k, v in kw.items() if v is not None}


class AsyncClient:
    """An asyncio client of imlinkd's local API.

    ``path``: the socket (default ``$IMLINKD_SOCKET``, else ``/run/imlinkd/api.sock``).
    ``reconnect_for``: how long ``watch()`` and the inbox consumer keep trying to reach a
    daemon that went away (seconds; None: for ever) before they raise
    :class:`DaemonUnavailable`. Requests connect on first use and again after the
    connection was lost; a request in flight when it is lost raises ``DaemonUnavailable``
    (``reason == "lost"``) and is not repeated (it may have been carried out).
    """

    def __init__(self, path: Optional[str] = None, *, reconnect_for: Optional[float] = 120.0) -> None:
        self.path = path or default_socket()
        self.reconnect_for = reconnect_for
        self._conn: Optional[_Conn] = None
        self._lock: Optional[asyncio.Lock] = None
        self._closed = False

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _connection(self) -> _Conn:
        if self._closed:
            raise DaemonUnavailable(self.path, "closed")
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._conn is None or self._conn.closed:
                self._conn = await _Conn.open(self.path)
            return self._conn

    async def call(self, method: str, params: Optional[Json] = None) -> Any:
        """Any method, by name: the ``result``, or the error as an :class:`ImlinkError`."""
        conn = await self._connection()
        return await conn.call(method, params)

    # --- the API's methods, one each (docs/api.md) ------------------------------------------

    async def version(self) -> Version:
        return Version.from_json(await self.call("version"))

    async def status(self) -> Status:
        return Status.from_json(await self.call("status"))

    async def get_login_user(self) -> str:
        r = await self.call("get_login_user")
        return r if isinstance(r, str) else ""

    async def get_login_status(self) -> int:
        r = await self.call("get_login_status")
        return r if isinstance(r, int) else 3

    async def metrics(self) -> str:
        r = await self.call("metrics")
        return r.get("text", "") if isinstance(r, dict) else ""

    async def login(
        self,
        user_id: Optional[str] = None,
        user_sig: Optional[str] = None,
        timeout_ms: Optional[int] = None,
    ) -> LoginResult:
        """Log in (operator). ``user_id`` switches accounts; ``user_sig`` brings a UserSig
        (never logged). Returns at the CONNACK: the phase may still be ``subscribing``."""
        return LoginResult.from_json(
            await self.call("login", _params(user_id=user_id, user_sig=user_sig, timeout_ms=timeout_ms))
        )

    async def logout(self, timeout_ms: Optional[int] = None) -> int:
        """Log out cleanly and stay logged out (operator). Returns the login status (3)."""
        r = await self.call("logout", _params(timeout_ms=timeout_ms))
        return r.get("login_status", 3) if isinstance(r, dict) else 3

    async def send_message(self, to: str, body: str, kind: Optional[str] = None) -> SendResult:
        """Queue a C2C message (operator): committed to the store when this returns; sent
        when the session is connected (``message_sent`` / ``message_failed`` follow)."""
        return SendResult.from_json(await self.call("send_message", _params(to=to, body=body, kind=kind)))

    async def get_conversations(self, limit: Optional[int] = None, before: Optional[str] = None) -> ConversationPage:
        return ConversationPage.from_json(await self.call("get_conversations", _params(limit=limit, before=before)))

    async def get_history(self, peer: str, before: Optional[str] = None, limit: Optional[int] = None) -> HistoryPage:
        return HistoryPage.from_json(await self.call("get_history", _params(peer=peer, before=before, limit=limit)))

    async def mark_read(self, peer: str) -> int:
        """Mark every message from ``peer`` read (operator); returns how many were marked."""
        r = await self.call("mark_read", {"peer": peer})
        return r.get("marked", 0) if isinstance(r, dict) else 0

    async def read_inbox(self, cursor: Optional[str] = None, limit: Optional[int] = None) -> InboxPage:
        return InboxPage.from_json(await self.call("read_inbox", _params(cursor=cursor, limit=limit)))

    async def ack_inbox(self, cursor: str) -> AckResult:
        return AckResult.from_json(await self.call("ack_inbox", {"cursor": cursor}))

    async def watch(self, *, reconnect: bool = True) -> AsyncGenerator[Event, None]:
        """The status, then every notification, as :class:`Event` items.

        The first item is a ``snapshot`` (the status). When the daemon goes away (a restart,
        or it dropped this watcher after ``lagged``) and ``reconnect`` is true, it is
        reached again (backoff up to 2 s, for at most ``reconnect_for`` seconds) and a fresh
        ``snapshot`` with ``reconnected=True`` follows: events in between were missed.
        """
        conn: Optional[_Conn] = None
        reconnected = False
        # One backoff from a loss until the next snapshot: its bound holds even when the
        # daemon accepts connections but cannot answer (shutting down).
        backoff: Optional[_Backoff] = None
        try:
            while True:
                if conn is None:
                    if not reconnected:
                        conn = await _Conn.open(self.path)
                    else:
                        backoff = backoff or _Backoff(self.reconnect_for)
                        conn = await self._reopen(backoff)
                try:
                    snap = await conn.call("watch")
                except (ImlinkError, DaemonUnavailable) as e:
                    if not (reconnect and _retryable(e)):
                        raise
                    await conn.close()
                    conn = None
                    reconnected = True
                    backoff = backoff or _Backoff(self.reconnect_for)
                    await backoff.wait(e)
                    continue
                backoff = None
                status = Status.from_json(snap.get("status") if isinstance(snap, dict) else None)
                yield Event("snapshot", snap if isinstance(snap, dict) else {}, status, reconnected)
                while True:
                    n = await conn.notifications.get()
                    if n is None:
                        break
                    yield Event(str(n["method"]), n["params"])
                err = conn.lost()
                await conn.close()
                conn = None
                if not reconnect:
                    raise err
                reconnected = True
        finally:
            if conn is not None:
                await conn.close()

    async def _reopen(self, backoff: _Backoff) -> _Conn:
        while True:
            try:
                return await _Conn.open(self.path)
            except DaemonUnavailable as e:
                if not _retryable(e):
                    raise
                await backoff.wait(e)

    def inbox_consumer(
        self,
        handler: Callable[[str, Message], Awaitable[None]],
        *,
        limit: int = 100,
    ) -> "InboxConsumer":
        """An :class:`InboxConsumer` on this client's socket."""
        return InboxConsumer(self.path, handler, limit=limit, reconnect_for=self.reconnect_for)


class InboxConsumer:
    """At-least-once delivery of the received messages to ``handler(user_id, message)``.

    The loop of docs/api.md: ``read_inbox {}`` (the current account's messages after its
    acknowledged position), the handler for each message in order, then ``ack_inbox`` with
    the page's cursor — only after the handler returned for every message of the page. If
    the app dies before that, the daemon still holds the page unacknowledged and the next
    consumer gets it again: a message may be handled twice, never lost. The cursor names
    its user, so an account switch between the read and the ack acknowledges what was read
    for the user it came from; the next read follows the new account. ``user_id`` tells the
    handler whose inbox a message is in.

    Woken by ``message_received`` and ``state_changed`` on a watch of its own; when the
    daemon restarts it reconnects (backoff, bounded by ``reconnect_for``) and reads again
    from the acknowledged position. ``run()`` returns after ``stop()``, once the message
    being handled is (the messages handled acknowledged, the rest of the page left
    unacknowledged for the next consumer); an exception of the handler ends it (nothing of
    that page acknowledged). Needs an operator (``ack_inbox``).
    """

    def __init__(
        self,
        path: Optional[str],
        handler: Callable[[str, Message], Awaitable[None]],
        *,
        limit: int = 100,
        reconnect_for: Optional[float] = 120.0,
    ) -> None:
        self.path = path or default_socket()
        self.handler = handler
        self.limit = limit
        self.reconnect_for = reconnect_for
        #: The last acknowledged cursor ("USER:POSITION"), once one was.
        self.acknowledged: Optional[str] = None
        #: How many messages the handler was given (redeliveries included).
        self.handled = 0
        self._stop: Optional[asyncio.Event] = None
        self._stopping = False

    def stop(self) -> None:
        """End ``run()`` after the message being handled: the messages handled are
        acknowledged (up to that one), the rest of its page is not (the next consumer gets
        it)."""
        self._stopping = True
        if self._stop is not None:
            self._stop.set()

    async def run(self) -> None:
        self._stop = asyncio.Event()
        if self._stopping:
            return
        first = True
        backoff: Optional[_Backoff] = None
        while not self._stopping:
            watch: Optional[_Conn] = None
            req: Optional[_Conn] = None
            try:
                watch = await _Conn.open(self.path)
                req = await _Conn.open(self.path)
                wake = asyncio.Event()
                await watch.call("watch")
                watcher = asyncio.ensure_future(self._wake_on(watch, wake))
                try:
                    first = False
                    backoff = None
                    await self._consume(req, watch, wake)
                finally:
                    watcher.cancel()
            except (DaemonUnavailable, ImlinkError) as e:
                if first or not _retryable(e):
                    raise
                if backoff is None:
                    backoff = _Backoff(self.reconnect_for)
                await backoff.wait(e)
            finally:
                for c in (watch, req):
                    if c is not None:
                        await c.close()

    @staticmethod
    async def _wake_on(watch: _Conn, wake: asyncio.Event) -> None:
        while True:
            n = await watch.notifications.get()
            if n is None or n["method"] in ("message_received", "state_changed", "lagged"):
                wake.set()
            if n is None:
                return

    async def _consume(self, req: _Conn, watch: _Conn, wake: asyncio.Event) -> None:
        assert self._stop is not None
        while not self._stopping:
            wake.clear()
            page = InboxPage.from_json(await req.call("read_inbox", {"limit": self.limit}))
            done = 0
            for m in page.messages:
                await self.handler(page.user_id, m)
                self.handled += 1
                done += 1
                if self._stopping:
                    break
            if done:
                # Up to the last message handled: the whole page's cursor, or (stopped
                # inside it) that message's position, "USER:POSITION" (docs/api.md).
                cursor = (
                    page.cursor
                    if done == len(page.messages)
                    else f"{page.user_id}:{page.messages[done - 1].seq}"
                )
                r = AckResult.from_json(await req.call("ack_inbox", {"cursor": cursor}))
                self.acknowledged = r.cursor
            if self._stopping:
                return
            if len(page.messages) >= self.limit:
                continue
            if watch.closed:
                raise watch.lost()
            stop = asyncio.ensure_future(self._stop.wait())
            woken = asyncio.ensure_future(wake.wait())
            try:
                await asyncio.wait([stop, woken], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                woken.cancel()


class Client:
    """The blocking client: the same methods as :class:`AsyncClient`, each run to completion
    on a private event loop. Not for use from inside a running event loop (use
    ``AsyncClient`` there)."""

    def __init__(self, path: Optional[str] = None, *, reconnect_for: Optional[float] = 120.0) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = AsyncClient(path, reconnect_for=reconnect_for)
        self.path = self._client.path

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._client.close())
            self._loop.close()

    def _run(self, aw: Awaitable[T]) -> T:
        return self._loop.run_until_complete(aw)

    def call(self, method: str, params: Optional[Json] = None) -> Any:
        return self._run(self._client.call(method, params))

    def version(self) -> Version:
        return self._run(self._client.version())

    def status(self) -> Status:
        return self._run(self._client.status())

    def get_login_user(self) -> str:
        return self._run(self._client.get_login_user())

    def get_login_status(self) -> int:
        return self._run(self._client.get_login_status())

    def metrics(self) -> str:
        return self._run(self._client.metrics())

    def login(
        self,
        user_id: Optional[str] = None,
        user_sig: Optional[str] = None,
        timeout_ms: Optional[int] = None,
    ) -> LoginResult:
        return self._run(self._client.login(user_id, user_sig, timeout_ms))

    def logout(self, timeout_ms: Optional[int] = None) -> int:
        return self._run(self._client.logout(timeout_ms))

    def send_message(self, to: str, body: str, kind: Optional[str] = None) -> SendResult:
        return self._run(self._client.send_message(to, body, kind))

    def get_conversations(self, limit: Optional[int] = None, before: Optional[str] = None) -> ConversationPage:
        return self._run(self._client.get_conversations(limit, before))

    def get_history(self, peer: str, before: Optional[str] = None, limit: Optional[int] = None) -> HistoryPage:
        return self._run(self._client.get_history(peer, before, limit))

    def mark_read(self, peer: str) -> int:
        return self._run(self._client.mark_read(peer))

    def read_inbox(self, cursor: Optional[str] = None, limit: Optional[int] = None) -> InboxPage:
        return self._run(self._client.read_inbox(cursor, limit))

    def ack_inbox(self, cursor: str) -> AckResult:
        return self._run(self._client.ack_inbox(cursor))

    def watch(self, *, reconnect: bool = True) -> Generator[Event, None, None]:
        """Like :meth:`AsyncClient.watch`, as a blocking iterator."""
        agen = self._client.watch(reconnect=reconnect)
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._loop.is_closed():
                self._run(agen.aclose())

    def consume_inbox(self, handler: Callable[[str, Message], None], *, limit: int = 100) -> None:
        """Run an :class:`InboxConsumer` with a plain function as the handler, until the
        handler raises (or the daemon stays away longer than ``reconnect_for``)."""

        async def h(user_id: str, m: Message) -> None:
            handler(user_id, m)

        self._run(InboxConsumer(self.path, h, limit=limit, reconnect_for=self._client.reconnect_for).run())


__all__: List[str] = [
    "AsyncClient",
    "Client",
    "InboxConsumer",
    "DEFAULT_SOCKET",
    "default_socket",
]
