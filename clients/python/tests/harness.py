"""Real components for the client's tests: the reference IM service (`imlink-sandbox`) and real
`imlinkd` daemons, started from the workspace's build (``$IMLINKD_BIN_DIR``, else
``target/debug``), each with its own socket. No mocks: the client talks to the daemon, the
daemon to the sandbox over MQTT/TLS.

The harness checks state with raw JSON-RPC lines of its own, not with the client under test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, TypeVar

REPO = Path(__file__).resolve().parents[3]
T = TypeVar("T")


def bin_dir() -> Path:
    d = Path(os.environ.get("IMLINKD_BIN_DIR") or REPO / "target" / "debug")
    for b in ("imlinkd", "imlinkctl", "imlink-sandbox"):
        if not (d / b).exists():
            raise RuntimeError(
                f"{d / b} is missing: build the workspace first (cargo build --workspace --bins) "
                "or set IMLINKD_BIN_DIR"
            )
    return d


def wait_until(what: str, pred: Callable[[], Optional[T]], timeout: float = 20.0) -> T:
    """Poll another process's state (short sleeps, a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.02)


def rpc(sock: Path, method: str, params: Optional[Dict[str, Any]] = None, timeout: float = 30.0) -> Dict[str, Any]:
    """One raw request on a fresh connection: the whole answer object."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        req = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params or {}}
        s.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return dict(json.loads(buf))


class Sandbox:
    """imlink-sandbox on ephemeral loopback ports, state in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "sandbox"
        self.log = open(root / "sandbox.log", "wb")
        self.proc = subprocess.Popen(
            [str(bin_dir() / "imlink-sandbox"), "--state-dir", str(self.dir)],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        env_file = self.dir / "endpoints.env"
        wait_until("the sandbox's endpoints", lambda: env_file.exists() and env_file.stat().st_size > 0)
        self.env: Dict[str, str] = {}
        for line in env_file.read_text().splitlines():
            k, _, v = line.partition("=")
            self.env[k] = v.strip("'")

    def admin(self, path: str) -> str:
        req = urllib.request.Request(
            self.env["ADMIN_URL"] + path,
            method="POST",
            headers={"Authorization": "Bearer " + self.env["ADMIN_TOKEN"]},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return str(r.read().decode())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.log.close()


class Daemon:
    """One imlinkd with its own directory, config and socket; restartable on the same state."""

    def __init__(self, sb: Sandbox, root: Path, user: str, api_extra: str = "") -> None:
        self.sb = sb
        self.user = user
        self.dir = Path(tempfile.mkdtemp(prefix=f"{user[:8]}-", dir=root))
        self.socket = self.dir / "api.sock"
        self.config = self.dir / "imlinkd.toml"
        self.config.write_text(
            f"""user_id = "{user}"
sdk_app_id = {sb.env["SDK_APP_ID"]}
state_dir = "{self.dir}/state"
log_level = "debug"

[broker]
url = "{sb.env["MQTT_URL"]}"
ca_file = "{sb.env["CA_PATH"]}"
keepalive = "30s"
connect_timeout = "5s"

[provisioning]
url = "{sb.env["PROVISIONING_URL_TEMPLATE"]}"
token_file = "{sb.dir}/device-token"
ca_file = "{sb.env["CA_PATH"]}"
timeout = "5s"

[session]
backoff_base = "200ms"
backoff_cap = "2s"

[api]
socket = "{self.socket}"
{api_extra}
"""
        )
        self.proc: Optional[subprocess.Popen[bytes]] = None
        self.starts = 0

    def start(self) -> "Daemon":
        self.starts += 1
        log = open(self.dir / f"imlinkd-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [str(bin_dir() / "imlinkd"), "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        log.close()
        proc = self.proc

        def serving() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"imlinkd exited {proc.returncode}:\n{self.log_text()}")
            try:
                return "result" in rpc(self.socket, "version", timeout=2)
            except OSError:
                return False

        wait_until(f"{self.user}'s API", serving)
        return self

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.dir.glob("imlinkd-*.log")))

    def status(self) -> Dict[str, Any]:
        return dict(rpc(self.socket, "status")["result"])

    def wait_phase(self, phase: str, timeout: float = 20.0) -> Dict[str, Any]:
        """Wait for ``phase`` on a raw ``watch`` (woken by its notifications); the status then."""
        deadline = time.monotonic() + timeout
        current = ""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(self.socket))
            s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"watch"}\n')
            f = s.makefile("rb")
            while True:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    line = f.readline()
                except OSError:
                    line = b""
                if not line:
                    raise AssertionError(
                        f"{self.user}: still {current!r}, not {phase!r}\n{self.log_text()[-4000:]}"
                    )
                msg = json.loads(line)
                if msg.get("id") == 1:
                    current = msg["result"]["status"]["phase"]
                elif msg.get("method") == "state_changed":
                    current = msg["params"]["phase"]
                if current == phase:
                    return self.status()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


class World:
    """One sandbox and the daemons of a test module (shared between its tests)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="imlk-py-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        self.sandbox = Sandbox(self.root)
        self.daemons: List[Daemon] = []

    def daemon(self, user: str, api_extra: str = "", online: bool = True) -> Daemon:
        d = Daemon(self.sandbox, self.root, user, api_extra).start()
        self.daemons.append(d)
        if online:
            d.wait_phase("online")
        return d

    def close(self, keep: bool = False) -> None:
        for d in self.daemons:
            d.stop()
        self.sandbox.stop()
        if not keep:
            shutil.rmtree(self.root, ignore_errors=True)
