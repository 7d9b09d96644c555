"""What the daemon answers, as dataclasses (docs/api.md is the reference).

Every ``from_json`` takes the fields it knows and ignores the others, so a newer daemon that
adds fields never breaks an older client; the whole object stays in ``raw``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

Json = Dict[str, Any]


def _obj(v: Any) -> Json:
    return dict(v) if isinstance(v, Mapping) else {}


def _str(v: Any, default: str = "") -> str:
    return v if isinstance(v, str) else default


def _opt_str(v: Any) -> Optional[str]:
    return v if isinstance(v, str) else None


def _int(v: Any, default: int = 0) -> int:
    return v if isinstance(v, int) and not isinstance(v, bool) else default


def _opt_int(v: Any) -> Optional[int]:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _counts(v: Any) -> Dict[str, int]:
    return {k: x for k, x in _obj(v).items() if isinstance(x, int) and not isinstance(x, bool)}


@dataclass(frozen=True)
class LastError:
    """An IM error: the code (docs/errors.md), its class (``network``, ``kicked``, …) and text."""

    code: int
    cls: Optional[str]
    message: str

    @classmethod
    def from_json(cls, v: Any) -> Optional["LastError"]:
        if not isinstance(v, Mapping):
            return None
        return cls(code=_int(v.get("code")), cls=_opt_str(v.get("class")), message=_str(v.get("message")))


@dataclass(frozen=True)
class SigInfo:
    """What the daemon says about its UserSig (never the UserSig itself)."""

    fingerprint: str
    expires_at: Optional[int]
    valid_until: Optional[int]
    refresh_at: Optional[int]
    refreshing: bool
    raw: Json = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, v: Any) -> Optional["SigInfo"]:
        if not isinstance(v, Mapping):
            return None
        return cls(
            fingerprint=_str(v.get("fingerprint")),
            expires_at=_opt_int(v.get("expires_at")),
            valid_until=_opt_int(v.get("valid_until")),
            refresh_at=_opt_int(v.get("refresh_at")),
            refreshing=v.get("refreshing") is True,
            raw=dict(v),
        )


@dataclass(frozen=True)
class Status:
    """The daemon's whole state (``status``, and ``watch``'s snapshot)."""

    phase: str
    summary: str
    login_status: int
    login_user: str
    user_id: str
    sdk_app_id: Optional[int]
    broker: str
    protocol: Optional[str]
    inbox_subscribed: bool
    since: Optional[int]
    last_error: Optional[LastError]
    sig: Optional[SigInfo]
    next_retry_at_ms: Optional[int]
    next_subscribe_at_ms: Optional[int]
    counters: Dict[str, int]
    messages: Dict[str, int]
    last_event: Optional[Json]
    raw: Json = field(default_factory=dict, repr=False, compare=False)

    @property
    def online(self) -> bool:
        return self.phase == "online"

    @classmethod
    def from_json(cls, v: Any) -> "Status":
        o = _obj(v)
        le = o.get("last_event")
        return cls(
            phase=_str(o.get("phase")),
            summary=_str(o.get("summary")),
            login_status=_int(o.get("login_status"), 3),
            login_user=_str(o.get("login_user")),
            user_id=_str(o.get("user_id")),
            sdk_app_id=_opt_int(o.get("sdk_app_id")),
            broker=_str(o.get("broker")),
            protocol=_opt_str(o.get("protocol")),
            inbox_subscribed=o.get("inbox_subscribed") is True,
            since=_opt_int(o.get("since")),
            last_error=LastError.from_json(o.get("last_error")),
            sig=SigInfo.from_json(o.get("sig")),
            next_retry_at_ms=_opt_int(o.get("next_retry_at_ms")),
            next_subscribe_at_ms=_opt_int(o.get("next_subscribe_at_ms")),
            counters=_counts(o.get("counters")),
            messages=_counts(o.get("messages")),
            last_event=dict(le) if isinstance(le, Mapping) else None,
            raw=o,
        )


@dataclass(frozen=True)
class Message:
    """A stored message (``get_history``, ``read_inbox``, a conversation's ``last``)."""

    seq: int
    id: str
    peer: str
    direction: str
    kind: str
    body: str
    ts: int
    state: str
    code: Optional[int] = None
    raw: Json = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, v: Any) -> "Message":
        o = _obj(v)
        return cls(
            seq=_int(o.get("seq")),
            id=_str(o.get("id")),
            peer=_str(o.get("peer")),
            direction=_str(o.get("direction")),
            kind=_str(o.get("kind"), "text"),
            body=_str(o.get("body")),
            ts=_int(o.get("ts")),
            state=_str(o.get("state")),
            code=_opt_int(o.get("code")),
            raw=o,
        )


@dataclass(frozen=True)
class Conversation:
    peer: str
    unread: int
    last: Optional[Message]
    raw: Json = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, v: Any) -> "Conversation":
        o = _obj(v)
        last = o.get("last")
        return cls(
            peer=_str(o.get("peer")),
            unread=_int(o.get("unread")),
            last=Message.from_json(last) if isinstance(last, Mapping) else None,
            raw=o,
        )


@dataclass(frozen=True)
class Version:
    name: str
    version: str
    api: int

    @classmethod
    def from_json(cls, v: Any) -> "Version":
        o = _obj(v)
        return cls(name=_str(o.get("name")), version=_str(o.get("version")), api=_int(o.get("api")))


@dataclass(frozen=True)
class LoginResult:
    login_user: str
    login_status: int

    @classmethod
    def from_json(cls, v: Any) -> "LoginResult":
        o = _obj(v)
        return cls(login_user=_str(o.get("login_user")), login_status=_int(o.get("login_status"), 3))


@dataclass(frozen=True)
class SendResult:
    id: str
    seq: int
    to: str
    state: str

    @classmethod
    def from_json(cls, v: Any) -> "SendResult":
        o = _obj(v)
        return cls(id=_str(o.get("id")), seq=_int(o.get("seq")), to=_str(o.get("to")), state=_str(o.get("state")))


@dataclass(frozen=True)
class ConversationPage:
    conversations: List[Conversation]
    next_before: Optional[str]

    @classmethod
    def from_json(cls, v: Any) -> "ConversationPage":
        o = _obj(v)
        items = o.get("conversations")
        return cls(
            conversations=[Conversation.from_json(c) for c in items] if isinstance(items, list) else [],
            next_before=_opt_str(o.get("next_before")),
        )


@dataclass(frozen=True)
class HistoryPage:
    messages: List[Message]
    next_before: Optional[str]

    @classmethod
    def from_json(cls, v: Any) -> "HistoryPage":
        o = _obj(v)
        items = o.get("messages")
        return cls(
            messages=[Message.from_json(m) for m in items] if isinstance(items, list) else [],
            next_before=_opt_str(o.get("next_before")),
        )


@dataclass(frozen=True)
class InboxPage:
    """``read_inbox``: whose inbox (``user_id``), its messages after the cursor, oldest first,
    and ``cursor``, where this page ends (pass it to ``ack_inbox``)."""

    user_id: str
    messages: List[Message]
    cursor: str

    @classmethod
    def from_json(cls, v: Any) -> "InboxPage":
        o = _obj(v)
        items = o.get("messages")
        return cls(
            user_id=_str(o.get("user_id")),
            messages=[Message.from_json(m) for m in items] if isinstance(items, list) else [],
            cursor=_str(o.get("cursor")),
        )


@dataclass(frozen=True)
class AckResult:
    user_id: str
    cursor: str

    @classmethod
    def from_json(cls, v: Any) -> "AckResult":
        o = _obj(v)
        return cls(user_id=_str(o.get("user_id")), cursor=_str(o.get("cursor")))


#: The notifications ``watch`` delivers (docs/api.md), plus this client's own ``snapshot``.
EVENT_NAMES = (
    "snapshot",
    "connecting",
    "connect_success",
    "connect_failed",
    "kicked_offline",
    "user_sig_expired",
    "user_sig_refreshed",
    "state_changed",
    "message_received",
    "message_sent",
    "message_failed",
    "lagged",
)


@dataclass(frozen=True)
class Event:
    """One item of ``watch()``.

    ``name`` is the notification's method (``state_changed``, ``message_received``, …), or
    ``snapshot`` for the status the daemon answers ``watch`` with: the first item, and again
    after every reconnect (``reconnected`` is then true: notifications may have been missed
    while the daemon was away, so take the snapshot as the truth). ``params`` is the
    notification's params as sent; ``status`` is set for a snapshot; ``error`` for
    ``connect_failed`` and for a ``state_changed`` with a ``last_error``.
    """

    name: str
    params: Json
    status: Optional[Status] = None
    reconnected: bool = False

    @property
    def error(self) -> Optional[LastError]:
        if self.name == "connect_failed":
            return LastError.from_json(self.params)
        if self.name == "state_changed":
            return LastError.from_json(self.params.get("last_error"))
        return None

    @property
    def phase(self) -> Optional[str]:
        if self.status is not None:
            return self.status.phase
        return _opt_str(self.params.get("phase"))
