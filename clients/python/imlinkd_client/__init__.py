"""imlinkd's local API from Python: an asyncio client, a blocking wrapper, the watch stream and
an at-least-once inbox consumer (standard library only).

    import asyncio, imlinkd_client

    async def main() -> None:
        async with imlinkd_client.AsyncClient("/run/imlinkd/api.sock") as c:
            print((await c.status()).summary)
            async for event in c.watch():
                print(event.name, event.params)

    asyncio.run(main())

docs/api.md is the protocol; docs/clients.md the guide.
"""

from .client import DEFAULT_SOCKET, AsyncClient, Client, InboxConsumer, default_socket
from .errors import (
    CursorError,
    DaemonUnavailable,
    ImlinkError,
    InvalidParams,
    InvalidUserId,
    LoginInProgress,
    LoginTimeout,
    LogoutInProgress,
    MethodNotFound,
    NotLoggedIn,
    PermissionDenied,
    StoreFull,
    TooManyClients,
    Unavailable,
)
from .types import (
    AckResult,
    Conversation,
    ConversationPage,
    Event,
    HistoryPage,
    InboxPage,
    LastError,
    LoginResult,
    Message,
    SendResult,
    SigInfo,
    Status,
    Version,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_SOCKET",
    "AsyncClient",
    "Client",
    "InboxConsumer",
    "default_socket",
    "CursorError",
    "DaemonUnavailable",
    "ImlinkError",
    "InvalidParams",
    "InvalidUserId",
    "LoginInProgress",
    "LoginTimeout",
    "LogoutInProgress",
    "MethodNotFound",
    "NotLoggedIn",
    "PermissionDenied",
    "StoreFull",
    "TooManyClients",
    "Unavailable",
    "AckResult",
    "Conversation",
    "ConversationPage",
    "Event",
    "HistoryPage",
    "InboxPage",
    "LastError",
    "LoginResult",
    "Message",
    "SendResult",
    "SigInfo",
    "Status",
    "Version",
]
