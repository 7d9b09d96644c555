"""A local app for the consumer test: an InboxConsumer that writes every message it is given to
a file (flushed and fsynced before the handler returns, so the file says what was handled
before any acknowledgement). The test kills it with SIGKILL at random moments.

    python3 consumer_app.py SOCKET OUTFILE
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from imlinkd_client import InboxConsumer, Message


async def main(socket: str, out: str) -> None:
    fd = os.open(out, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def handle(user_id: str, m: Message) -> None:
        line = json.dumps({"user_id": user_id, "seq": m.seq, "id": m.id, "body": m.body}) + "\n"
        os.write(fd, line.encode())
        os.fsync(fd)
        await asyncio.sleep(0.005)  # some work: widens the window between handling and acking

    print("consuming", flush=True)
    await InboxConsumer(socket, handle, limit=10, reconnect_for=60).run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
