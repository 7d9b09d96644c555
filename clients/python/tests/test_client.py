"""The Python client against real imlinkd daemons and the reference IM service (no mocks).

Run: IMLINKD_BIN_DIR=target/debug python3 -m unittest discover -s clients/python/tests -v
(as root: the role test switches uids; tests/clients.rs runs it in the suite).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
from pathlib import Path
from typing import Any, Dict, List, Optional, Set

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import imlinkd_client  # noqa: E402
from imlinkd_client import (  # noqa: E402
    AsyncClient,
    Client,
    CursorError,
    DaemonUnavailable,
    Event,
    ImlinkError,
    InboxConsumer,
    InvalidParams,
    Message,
    MethodNotFound,
    NotLoggedIn,
    PermissionDenied,
)

REPO = harness.REPO
WORLD: Optional[harness.World] = None
A: harness.Daemon  # kiosk-0042, as in ./scripts/demo
B: harness.Daemon  # kiosk-0043, its peer


def setUpModule() -> None:
    global WORLD, A, B
    WORLD = harness.World()
    A = WORLD.daemon("kiosk-0042")
    B = WORLD.daemon("kiosk-0043")


def tearDownModule() -> None:
    if WORLD is not None:
        WORLD.close(keep=os.environ.get("IMLINKD_KEEP_TEST_DIRS") == "1")


def world() -> harness.World:
    assert WORLD is not None
    return WORLD


def documented_methods() -> List[str]:
    """Every method docs/api.md has a heading for (``### `name```, several per heading)."""
    names: List[str] = []
    for line in (REPO / "docs" / "api.md").read_text().splitlines():
        if line.startswith("### "):
            names += re.findall(r"`([a-z_]+)`", line)
    return names


async def next_event(it: Any, name: str, timeout: float = 20.0, pred: Any = None) -> Event:
    """The next event called ``name`` (and matching ``pred``) from a watch iterator."""

    async def find() -> Event:
        async for ev in it:
            if ev.name == name and (pred is None or pred(ev)):
                return ev  # type: ignore[no-any-return]
        raise AssertionError(f"the watch ended before {name}")

    return await asyncio.wait_for(find(), timeout)


class Tolerance(unittest.TestCase):
    def test_results_ignore_unknown_fields_and_survive_missing_ones(self) -> None:
        s = imlinkd_client.Status.from_json(
            {"phase": "online", "login_status": 1, "future_field": {"x": 1}, "last_error": {"code": 6208, "class": "kicked", "message": "m", "new": 1}}
        )
        self.assertEqual((s.phase, s.login_status, s.user_id, s.sig), ("online", 1, "", None))
        assert s.last_error is not None
        self.assertEqual((s.last_error.code, s.last_error.cls), (6208, "kicked"))
        self.assertEqual(s.raw["future_field"], {"x": 1})
        m = imlinkd_client.Message.from_json({"seq": 3, "id": "X", "body": "b", "reactions": []})
        self.assertEqual((m.seq, m.kind, m.code, m.raw["reactions"]), (3, "text", None, []))
        c = imlinkd_client.Conversation.from_json({"peer": "p", "unread": 2, "last": None, "pinned": True})
        self.assertEqual((c.peer, c.unread, c.last), ("p", 2, None))
        self.assertEqual(imlinkd_client.Status.from_json("not an object").phase, "")


class Methods(unittest.IsolatedAsyncioTestCase):
    def test_every_documented_method_has_a_client_method(self) -> None:
        docs = documented_methods()
        self.assertIn("read_inbox", docs)
        self.assertIn("ack_inbox", docs)
        self.assertIn("get_login_status", docs)
        # The daemon's own list: its unknown-method error names every method it serves.
        err = harness.rpc(A.socket, "no_such_method")["error"]
        self.assertEqual(err["code"], -32601)
        served = [m.strip() for m in err["message"].split("methods:", 1)[1].split(",")]
        self.assertEqual(sorted(docs), sorted(served), "docs/api.md and the daemon list the same methods")
        for m in docs:
            for cls in (AsyncClient, Client):
                self.assertTrue(callable(getattr(cls, m, None)), f"{cls.__name__}.{m} is missing")

    async def test_session_methods(self) -> None:
        async with AsyncClient(str(A.socket)) as c:
            v = await c.version()
            self.assertEqual((v.name, v.api), ("imlinkd", 1))
            s = await c.status()
            self.assertEqual(s.phase, "online")
            self.assertTrue(s.online and s.inbox_subscribed)
            self.assertEqual((s.user_id, s.login_user, s.login_status), ("kiosk-0042", "kiosk-0042", 1))
            self.assertIsNone(s.last_error)
            assert s.sig is not None
            self.assertTrue(s.sig.fingerprint.startswith("sha256:"))
            self.assertGreater(s.counters["logins"], 0)
            self.assertIn("summary", s.raw)
            self.assertEqual(await c.get_login_user(), "kiosk-0042")
            self.assertEqual(await c.get_login_status(), 1)
            m = await c.metrics()
            self.assertIn('imlinkd_phase{phase="online"} 1', m)
            self.assertTrue(m.rstrip().endswith("# EOF"))
            # An already logged-in user's login succeeds at once.
            r = await c.login()
            self.assertEqual((r.login_user, r.login_status), ("kiosk-0042", 1))

    async def test_messaging_methods(self) -> None:
        body = f"hello {time.time_ns()}"
        async with AsyncClient(str(A.socket)) as a, AsyncClient(str(B.socket)) as b:
            bw = b.watch()
            snap = await bw.__anext__()
            self.assertEqual(snap.name, "snapshot")
            assert snap.status is not None
            self.assertEqual(snap.status.user_id, "kiosk-0043")
            aw = a.watch()
            await aw.__anext__()
            sent = await a.send_message("kiosk-0043", body)
            self.assertEqual((sent.to, sent.state), ("kiosk-0043", "queued"))
            self.assertEqual(len(sent.id), 26)
            ok = await next_event(aw, "message_sent", pred=lambda e: e.params.get("id") == sent.id)
            self.assertEqual(ok.params["to"], "kiosk-0043")
            got = await next_event(bw, "message_received", pred=lambda e: e.params.get("id") == sent.id)
            self.assertEqual((got.params["from"], got.params["body"], got.params["kind"]), ("kiosk-0042", body, "text"))
            await bw.aclose()
            await aw.aclose()

            page = await b.get_conversations(limit=10)
            conv = next(c for c in page.conversations if c.peer == "kiosk-0042")
            self.assertGreaterEqual(conv.unread, 1)
            assert conv.last is not None
            self.assertEqual((conv.last.body, conv.last.direction), (body, "in"))
            hist = await b.get_history("kiosk-0042", limit=5)
            self.assertEqual(hist.messages[0].id, sent.id)
            self.assertEqual(hist.messages[0].state, "unread")
            older = await b.get_history("kiosk-0042", before=sent.id, limit=5)
            self.assertNotIn(sent.id, [m.id for m in older.messages])
            a_hist = await a.get_history("kiosk-0043", limit=1)
            self.assertEqual((a_hist.messages[0].direction, a_hist.messages[0].state), ("out", "sent"))

            inbox = await b.read_inbox("kiosk-0043:0", limit=100)
            self.assertEqual(inbox.user_id, "kiosk-0043")
            self.assertIn(sent.id, [m.id for m in inbox.messages])
            self.assertTrue(inbox.cursor.startswith("kiosk-0043:"))
            self.assertGreaterEqual(await b.mark_read("kiosk-0042"), 1)
            page = await b.get_conversations()
            self.assertEqual(next(c for c in page.conversations if c.peer == "kiosk-0042").unread, 0)
            ack = await b.ack_inbox(inbox.cursor)
            self.assertEqual((ack.user_id, ack.cursor), ("kiosk-0043", inbox.cursor))

            custom = await a.send_message("kiosk-0043", '{"k":1}', kind="custom")
            self.assertEqual(custom.state, "queued")

    async def test_errors_carry_the_code_and_class(self) -> None:
        async with AsyncClient(str(A.socket)) as c:
            with self.assertRaises(CursorError) as e:
                await c.read_inbox("not a cursor")
            self.assertEqual(e.exception.code, 6017)
            self.assertIn("USER:POSITION", e.exception.message)
            with self.assertRaises(InvalidParams) as p:
                await c.send_message("kiosk-0043", "x", kind="bogus")
            self.assertEqual(p.exception.code, -32602)
            with self.assertRaises(MethodNotFound):
                await c.call("no_such_method")
            with self.assertRaises(ImlinkError) as u:
                await c.send_message("not a user id!", "x")
            self.assertEqual(u.exception.code, 7003)
            # A UserSig the app brings for another user: refused before anything is sent.
            sig = json.loads(world().sandbox.admin("/issue-sig?user_id=kiosk-9999"))["user_sig"]
            with self.assertRaises(ImlinkError) as s:
                await c.login(user_id="kiosk-0042", user_sig=sig)
            self.assertEqual(s.exception.code, 70013)
            self.assertNotIn(sig, str(s.exception))
            self.assertEqual((await c.status()).phase, "online")

    async def test_login_logout_and_not_logged_in(self) -> None:
        d = world().daemon("kiosk-0044")
        async with AsyncClient(str(d.socket)) as c:
            w = c.watch()
            await w.__anext__()
            self.assertEqual(await c.logout(), 3)
            await next_event(w, "state_changed", pred=lambda e: e.params.get("phase") == "idle")
            with self.assertRaises(NotLoggedIn) as e:
                await c.send_message("kiosk-0043", "x")
            self.assertEqual(e.exception.code, 6014)
            # A login the IM service refuses: the IM code and the class (data.class).
            world().sandbox.admin("/ban?user_id=kiosk-0044")
            with self.assertRaises(ImlinkError) as b:
                await c.login()
            self.assertEqual((b.exception.code, b.exception.cls), (70051, "fatal"))
            world().sandbox.admin("/unban?user_id=kiosk-0044")
            r = await c.login()
            self.assertEqual((r.login_user, r.login_status), ("kiosk-0044", 1))
            await next_event(w, "connect_success")
            await next_event(w, "state_changed", pred=lambda e: e.phase == "online")
            # A kick (the IM service's admin) arrives as kicked_offline with its reason.
            world().sandbox.admin("/kick?user_id=kiosk-0044")
            k = await next_event(w, "kicked_offline")
            self.assertEqual((k.params["reason"], k.params["code"]), ("kicked_by_admin", 6208))
            st = await next_event(w, "state_changed", pred=lambda e: e.phase == "kicked")
            assert st.error is not None
            self.assertEqual((st.error.code, st.error.cls), (6208, "kicked"))
            await w.aclose()
        d.stop()

    async def test_watch_and_calls_come_back_after_a_daemon_restart(self) -> None:
        d = world().daemon("kiosk-0045")
        async with AsyncClient(str(d.socket), reconnect_for=30) as c:
            self.assertEqual((await c.status()).phase, "online")
            w = c.watch()
            first = await w.__anext__()
            self.assertEqual((first.name, first.reconnected), ("snapshot", False))
            for how in ("kill9", "sigterm"):
                (d.kill9 if how == "kill9" else d.stop)()
                # Calls fail while it is away, saying why.
                with self.assertRaises(DaemonUnavailable):
                    await c.status()
                d.start()
                # A fresh snapshot after the reconnect, then the session's events.
                snap = await next_event(w, "snapshot")
                self.assertTrue(snap.reconnected, how)
                assert snap.status is not None
                if snap.status.phase != "online":
                    await next_event(w, "state_changed", pred=lambda e: e.phase == "online")
                self.assertEqual((await c.status()).user_id, "kiosk-0045")
            await w.aclose()
        d.stop()

    async def test_watch_without_reconnect_raises(self) -> None:
        d = world().daemon("kiosk-0046", online=False)
        async with AsyncClient(str(d.socket)) as c:
            w = c.watch(reconnect=False)
            await w.__anext__()
            d.kill9()
            with self.assertRaises(DaemonUnavailable) as e:
                async for _ in w:
                    pass
            self.assertEqual(e.exception.reason, "lost")
        with self.assertRaises(DaemonUnavailable) as m:
            await AsyncClient(str(d.dir / "nope.sock")).status()
        self.assertEqual(m.exception.reason, "missing")
        with self.assertRaises(DaemonUnavailable) as r:
            await AsyncClient(str(d.socket)).status()  # the stale socket file of a killed daemon
        self.assertEqual(r.exception.reason, "refused")


class Consumer(unittest.IsolatedAsyncioTestCase):
    async def test_in_process_consumer_acknowledges_after_the_handler(self) -> None:
        d = world().daemon("kiosk-0047")
        async with AsyncClient(str(B.socket)) as b, AsyncClient(str(d.socket)) as c:
            seen: List[str] = []
            boom = asyncio.Event()

            async def failing(user_id: str, m: Message) -> None:
                seen.append(m.body)
                raise RuntimeError("the app crashed")

            for i in range(3):
                await b.send_message("kiosk-0047", f"c-{i}")
            harness.wait_until("3 received", lambda: d.status()["messages"]["received"] >= 3)
            with self.assertRaises(RuntimeError):
                await c.inbox_consumer(failing).run()
            self.assertEqual(seen, ["c-0"])
            # Nothing was acknowledged: the next consumer gets everything, in order.
            got: List[str] = []
            cons: InboxConsumer

            async def ok(user_id: str, m: Message) -> None:
                self.assertEqual(user_id, "kiosk-0047")
                got.append(m.body)
                if len(got) == 3:
                    cons.stop()
                    boom.set()

            cons = c.inbox_consumer(ok, limit=2)
            await asyncio.wait_for(cons.run(), 20)
            self.assertEqual(got, ["c-0", "c-1", "c-2"])
            self.assertEqual(cons.acknowledged, (await c.read_inbox()).cursor)
            self.assertEqual((await c.read_inbox()).messages, [])
        d.stop()

    async def test_stop_takes_effect_after_the_message_being_handled(self) -> None:
        # A backlog of 6 in one page (limit 100): stop() in the handler of the second ends
        # run() there, those two acknowledged, the other four left for the next consumer.
        d = world().daemon("kiosk-0052")
        async with AsyncClient(str(B.socket)) as b, AsyncClient(str(d.socket)) as c:
            for i in range(6):
                await b.send_message("kiosk-0052", f"s-{i}")
            harness.wait_until("6 received", lambda: d.status()["messages"]["received"] >= 6)
            got: List[Message] = []
            cons: InboxConsumer

            async def show(user_id: str, m: Message) -> None:
                got.append(m)
                if len(got) == 2:
                    cons.stop()

            cons = c.inbox_consumer(show)
            await asyncio.wait_for(cons.run(), 20)
            self.assertEqual([m.body for m in got], ["s-0", "s-1"])
            self.assertEqual(cons.handled, 2)
            self.assertEqual(cons.acknowledged, f"kiosk-0052:{got[1].seq}")
            rest = await c.read_inbox()
            self.assertEqual([m.body for m in rest.messages], ["s-2", "s-3", "s-4", "s-5"])
        d.stop()

    async def test_consumer_loses_nothing_across_kill9_of_the_app_and_the_daemon(self) -> None:
        d = world().daemon("kiosk-0048")
        out = d.dir / "handled.jsonl"
        env = dict(os.environ, PYTHONPATH=str(REPO / "clients" / "python"))
        app_cmd = [sys.executable, str(Path(__file__).parent / "consumer_app.py"), str(d.socket), str(out)]

        def handled() -> List[str]:
            if not out.exists():
                return []
            return [json.loads(line)["body"] for line in out.read_text().splitlines() if line.endswith("}")]

        def start_app() -> "subprocess.Popen[bytes]":
            p = subprocess.Popen(app_cmd, env=env, stdout=subprocess.PIPE)
            assert p.stdout is not None
            self.assertEqual(p.stdout.readline().strip(), b"consuming")
            return p

        bodies = [f"m-{i:03}" for i in range(60)]
        async with AsyncClient(str(B.socket)) as b:
            app = start_app()
            for m in bodies[:20]:
                await b.send_message("kiosk-0048", m)
            harness.wait_until("8 handled", lambda: len(handled()) >= 8)
            app.send_signal(signal.SIGKILL)  # the app dies mid-stream
            app.wait()
            assert app.stdout is not None
            app.stdout.close()
            for m in bodies[20:40]:
                await b.send_message("kiosk-0048", m)
            app = start_app()
            harness.wait_until("28 handled", lambda: len(set(handled())) >= 28)
            d.kill9()  # the daemon dies mid-stream; the app stays and reconnects
            for m in bodies[40:]:
                await b.send_message("kiosk-0048", m)
            d.start()
            harness.wait_until("all 60 handled", lambda: set(handled()) >= set(bodies), 60)
            self.assertIsNone(app.poll(), "the app reconnected by itself")
            # Everything handled was acknowledged in the end (the inbox is consumed).
            harness.wait_until(
                "the inbox acknowledged",
                lambda: harness.rpc(d.socket, "read_inbox", {})["result"]["messages"] == [],
            )
            app.send_signal(signal.SIGKILL)
            app.wait()
            assert app.stdout is not None
            app.stdout.close()
        h = handled()
        self.assertEqual(set(h), set(bodies), "nothing lost, nothing invented")
        # In order, apart from redeliveries (each redelivery starts again at an unacked page).
        firsts: Dict[str, int] = {}
        for i, body in enumerate(h):
            firsts.setdefault(body, i)
        self.assertEqual(sorted(bodies, key=lambda x: firsts[x]), bodies)
        print(f"\n  consumer: 60 messages, {len(h)} handlings ({len(h) - 60} redelivered)", file=sys.stderr)
        d.stop()


class Roles(unittest.TestCase):
    CLIENTS_GID = 61101
    READER = 61102
    OUTSIDER = 61103

    def as_uid(self, uid: int, gid: int, socket: str) -> Dict[str, Any]:
        """Run the client in a forked child as ``uid``/``gid`` (the interpreter and the
        client are already loaded: nothing has to be reachable by that uid but the socket)."""
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            result: Dict[str, Any] = {}
            try:
                os.close(r)
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                with Client(socket) as c:
                    try:
                        result["phase"] = c.status().phase
                        result["messages"] = len(c.read_inbox().messages) >= 0
                    except DaemonUnavailable as e:
                        result["unavailable"] = e.reason
                    for name, call in (
                        ("send_message", lambda: c.send_message("kiosk-0043", "x")),
                        ("logout", lambda: c.logout()),
                        ("ack_inbox", lambda: c.ack_inbox("kiosk-0049:0")),
                    ):
                        try:
                            call()
                            result[name] = "allowed"
                        except PermissionDenied as e:
                            result[name] = {"code": e.code, "message": e.message}
                        except DaemonUnavailable as e:
                            result[name] = "unavailable:" + e.reason
            except BaseException as e:  # reported to the parent
                result["exception"] = repr(e)
            finally:
                os.write(w, json.dumps(result).encode())
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            data = f.read()
        os.waitpid(pid, 0)
        return dict(json.loads(data))

    def test_a_reader_socket_refuses_operator_methods(self) -> None:
        self.assertEqual(os.geteuid(), 0, "this test switches uids: run it as root (CI does)")
        d = world().daemon("kiosk-0049", api_extra=f'group = "{self.CLIENTS_GID}"')
        os.chmod(d.dir, 0o755)
        r = self.as_uid(self.READER, self.CLIENTS_GID, str(d.socket))
        self.assertNotIn("exception", r, r)
        self.assertEqual(r["phase"], "online")
        for m in ("send_message", "logout", "ack_inbox"):
            self.assertIsInstance(r[m], dict, r)
            self.assertEqual(r[m]["code"], -32001)
            self.assertIn("needs an operator", r[m]["message"])
            self.assertIn(f"uid {self.READER}", r[m]["message"])
        self.assertEqual(d.status()["phase"], "online", "not logged out")
        # Outside the socket's group: not even a connection, and the error says so.
        o = self.as_uid(self.OUTSIDER, self.OUTSIDER, str(d.socket))
        self.assertEqual(o.get("unavailable"), "denied", o)
        d.stop()


class Blocking(unittest.TestCase):
    def test_the_blocking_client(self) -> None:
        with Client(str(A.socket)) as a:
            self.assertEqual(a.status().phase, "online")
            self.assertEqual(a.get_login_user(), "kiosk-0042")
            events = a.watch()
            first = next(events)
            self.assertEqual(first.name, "snapshot")
            sent = a.send_message("kiosk-0043", "blocking hello")
            for ev in events:
                if ev.name == "message_sent" and ev.params["id"] == sent.id:
                    break
            events.close()
            self.assertEqual(a.get_history("kiosk-0043", limit=1).messages[0].body, "blocking hello")

    def test_the_blocking_consumer(self) -> None:
        d = world().daemon("kiosk-0051")
        with Client(str(B.socket)) as b:
            b.send_message("kiosk-0051", "for the blocking consumer")
        got: List[str] = []

        class Done(Exception):
            pass

        def handler(user_id: str, m: Message) -> None:
            got.append(f"{user_id}:{m.body}")
            raise Done()

        with Client(str(d.socket)) as c:
            with self.assertRaises(Done):
                c.consume_inbox(handler)
        self.assertEqual(got, ["kiosk-0051:for the blocking consumer"])
        d.stop()


class Docs(unittest.TestCase):
    def example(self, lang: str) -> str:
        text = (REPO / "docs" / "clients.md").read_text()
        m = re.search(rf"<!-- {lang}-example -->\n```\w+\n(.*?)```\n<!-- /{lang}-example -->", text, re.S)
        assert m, f"no {lang} example in docs/clients.md"
        return m.group(1)

    def test_the_docs_example_runs_against_the_demo_daemons(self) -> None:
        code = self.example("python")
        self.assertLessEqual(len([l for l in code.splitlines() if l.strip()]), 12, "about ten lines")
        with tempfile.TemporaryDirectory() as t:
            script = Path(t) / "example.py"
            script.write_text(code)
            env = dict(os.environ, PYTHONPATH=str(REPO / "clients" / "python"))
            # The example sends to kiosk-0043 and waits for one inbox message: B answers.
            p = subprocess.Popen(
                [sys.executable, str(script), str(A.socket)], env=env, stdout=subprocess.PIPE, text=True
            )
            with Client(str(B.socket)) as b:
                harness.wait_until(
                    "the example's message",
                    lambda: any(m.body == "hello from Python" for m in b.get_history("kiosk-0042", limit=5).messages),
                )
                b.send_message("kiosk-0042", "hello back")
            out, _ = p.communicate(timeout=30)
            self.assertEqual(p.returncode, 0, out)
            self.assertIn("online as kiosk-0042", out)
            self.assertIn("kiosk-0043: hello back", out)

    def test_pip_installs_the_package(self) -> None:
        tools = os.environ.get("IMLINKD_PY_TOOLS")
        self.assertTrue(tools, "IMLINKD_PY_TOOLS: scripts/setup's python tools (setuptools), as tests/clients.rs sets")
        with tempfile.TemporaryDirectory() as t:
            src = Path(t) / "src"
            shutil.copytree(REPO / "clients" / "python", src, ignore=shutil.ignore_patterns("tests", "build", "*.egg-info", "__pycache__"))
            env = dict(os.environ, PYTHONPATH=str(tools))
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-build-isolation",
                 "--disable-pip-version-check", "--root-user-action=ignore", "--target", str(Path(t) / "site"), str(src)],
                env=env, check=True,
            )
            out = subprocess.run(
                [sys.executable, "-c", "import imlinkd_client, sys; print(imlinkd_client.__version__, imlinkd_client.__file__)"],
                env=dict(os.environ, PYTHONPATH=str(Path(t) / "site")), check=True, capture_output=True, text=True, cwd=t,
            ).stdout
            self.assertIn(str(Path(t) / "site"), out)
            self.assertTrue((Path(t) / "site" / "imlinkd_client" / "py.typed").exists())
            self.assertEqual(out.split()[0], imlinkd_client.__version__)


if __name__ == "__main__":
    unittest.main()
