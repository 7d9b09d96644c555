"""Exceptions: an error answer of the daemon is an :class:`ImlinkError` carrying the IM code
(docs/errors.md) or JSON-RPC code (docs/api.md), the message and, for login errors, the class
(``data.class``). Well-known codes have their own subclasses; not reaching the daemon at all
is :class:`DaemonUnavailable`."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Type


class ImlinkError(Exception):
    """An error answer: ``code`` (IM or JSON-RPC), ``message``, ``cls`` (``data.class``: the
    error's class for login errors — ``network``, ``sig_rejected``, ``kicked``, … — or None)
    and ``data`` (the whole ``data`` object, if any)."""

    def __init__(
        self,
        code: int,
        message: str,
        cls: Optional[str] = None,
        data: Optional[Dict[str, Any]] = None,
    ) -> None:
        super().__init__(f"{message} (code {code}{', class ' + cls if cls else ''})")
        self.code = code
        self.message = message
        self.cls = cls
        self.data = data


class PermissionDenied(ImlinkError):
    """-32001: an operator method called by a reader (the message names the fix)."""


class MethodNotFound(ImlinkError):
    """-32601: the daemon has no such method (an older daemon?)."""


class InvalidParams(ImlinkError):
    """-32602: bad params."""


class TooManyClients(ImlinkError):
    """-32002: the daemon's client or watcher limit."""


class Unavailable(ImlinkError):
    """-32004: the daemon is shutting down, or busy (try again)."""


class NotLoggedIn(ImlinkError):
    """6014: logged out, kicked or stopped."""


class CursorError(ImlinkError):
    """6017: an inbox cursor that cannot be used (the message says what to do)."""


class StoreFull(ImlinkError):
    """6022: the message store is full and eviction could not make room."""


class InvalidUserId(ImlinkError):
    """7003: not a valid UserID."""


class LoginInProgress(ImlinkError):
    """7501: a login is already in progress."""


class LogoutInProgress(ImlinkError):
    """7502: a logout is in progress."""


class LoginTimeout(ImlinkError):
    """9510: not online within ``timeout_ms``; the login goes on (watch it)."""


_BY_CODE: Dict[int, Type[ImlinkError]] = {
    -32001: PermissionDenied,
    -32601: MethodNotFound,
    -32602: InvalidParams,
    -32002: TooManyClients,
    -32004: Unavailable,
    6014: NotLoggedIn,
    6017: CursorError,
    6022: StoreFull,
    7003: InvalidUserId,
    7501: LoginInProgress,
    7502: LogoutInProgress,
    9510: LoginTimeout,
}


def error_from_json(err: Any) -> ImlinkError:
    """The exception for a JSON-RPC ``error`` object."""
    if not isinstance(err, Mapping):
        return ImlinkError(-32603, f"malformed error from the daemon: {err!r}")
    code = err.get("code")
    code = code if isinstance(code, int) and not isinstance(code, bool) else -32603
    message = err.get("message")
    message = message if isinstance(message, str) else ""
    data = err.get("data")
    data = dict(data) if isinstance(data, Mapping) else None
    cls = data.get("class") if data else None
    return _BY_CODE.get(code, ImlinkError)(code, message, cls if isinstance(cls, str) else None, data)


class DaemonUnavailable(ConnectionError):
    """The daemon could not be reached, or the connection to it was lost.

    ``path`` is the socket; ``reason`` says which: ``missing`` (no socket: the daemon is not
    running, or another path is configured), ``refused`` (a stale socket: nothing behind
    it), ``denied`` (the socket's group: add your user to it), ``lost`` (the connection
    closed: the daemon stopped or restarted; a request in flight may or may not have been
    carried out), ``closed`` (this client was closed)."""

    def __init__(self, path: str, reason: str, detail: str = "") -> None:
        hints = {
            "missing": "no socket there: is imlinkd running, and is this its api.socket?",
            "refused": "nothing listens on it (a stale socket): is imlinkd running?",
            "denied": "permission denied: add your user to the socket's group (imlinkd-clients)",
            "lost": "the connection to imlinkd closed (it stopped or restarted)",
            "closed": "this client was closed",
        }
        text = f"{path}: {hints.get(reason, reason)}"
        if detail:
            text += f" ({detail})"
        super().__init__(text)
        self.path = path
        self.reason = reason
