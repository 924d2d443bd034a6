"""CURVE on real sockets (127.0.0.1): keys, traffic, and every wrong-key case surfacing as a HandshakeError.

Each test owns one ``zmq.Context``; every watch, socket and authenticator is closed before the context ends.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from zmq.auth.thread import ThreadAuthenticator

from editrl.common.keys import KeyLayout, generate_keys, generate_layout
from editrl.common.security import (
    HandshakeError,
    HandshakeWatch,
    SecurityConfig,
    ServerWatch,
    secure_client,
    secure_server,
)

pytestmark = pytest.mark.faults

DETECT_S = 5.0


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> KeyLayout:
    """server + allowed client ``good``; ``intruder`` exists but is not allowlisted; ``impostor`` is a fake server."""
    root = tmp_path_factory.mktemp("keys")
    layout = generate_layout(root, ["good", "intruder"])
    os.remove(layout.allowed_dir / "intruder.key")
    generate_keys(root / "impostor", ["server"])
    return layout


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


class Server:
    """A CURVE (or plaintext) ROUTER that echoes, with its authenticator and a ServerWatch."""

    def __init__(self, ctx: zmq.Context, cfg: SecurityConfig, endpoint: str = "tcp://127.0.0.1:*") -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.auth: ThreadAuthenticator | None = secure_server(self.sock, ctx, cfg)
        self.watch = ServerWatch(self.sock, self.auth)
        deadline = time.monotonic() + 5
        while True:  # a rebind right after a close can see EADDRINUSE for a moment
            try:
                self.sock.bind(endpoint)
                break
            except zmq.ZMQError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.received: list[bytes] = []
        self.failures: list[str] = []

    def pump(self) -> None:
        self.failures += self.watch.poll()
        while self.sock.poll(0):
            ident, body = self.sock.recv_multipart()
            self.received.append(body)
            self.sock.send_multipart([ident, b"echo:" + body])

    def close(self) -> None:
        self.watch.close()
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()


def make_client(ctx: zmq.Context, cfg: SecurityConfig, endpoint: str) -> tuple[zmq.Socket, HandshakeWatch]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)  # as net.harden
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    secure_client(sock, cfg)
    watch = HandshakeWatch(sock, endpoint)
    sock.connect(endpoint)
    return sock, watch


def expect_failure(watch: HandshakeWatch, server: Server) -> HandshakeError:
    deadline = time.monotonic() + DETECT_S
    while time.monotonic() < deadline:
        server.pump()
        try:
            watch.check()
        except HandshakeError as exc:
            return exc
        time.sleep(0.02)
    pytest.fail(f"no HandshakeError within {DETECT_S} s")


def roundtrip(sock: zmq.Socket, watch: HandshakeWatch, server: Server, body: bytes, timeout_s: float = 5.0) -> None:
    """Send ``body`` and wait for its echo, checking the watch all along (any HandshakeError fails the test)."""
    sock.send(body)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        server.pump()
        watch.check()
        if sock.poll(20):
            assert sock.recv() == b"echo:" + body
            return
    pytest.fail(f"no echo of {body!r} within {timeout_s} s")


class PortHolder:
    """Keeps a 127.0.0.1 port reserved while no server listens on it: bound, never listening.

    Connections to it are refused (as when the broker is down), no other process can bind it, and the kernel never
    picks it as the source port of an outgoing connection, so a client retrying against it cannot connect to
    itself (TCP simultaneous open) or to a stranger's socket: both happened with a port merely probed and closed.
    """

    def __init__(self, port: int = 0) -> None:
        self.sock: socket.socket | None = None
        self.port = port
        self.hold()

    def hold(self) -> None:
        deadline = time.monotonic() + 5
        while True:  # after a server closes, its listener goes away asynchronously (zmq's I/O thread)
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the closed server's TIME_WAIT sockets
            try:
                sock.bind(("127.0.0.1", self.port))
                break
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.sock, self.port = sock, sock.getsockname()[1]

    def release(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"


# 1 ---------------------------------------------------------------------------------------------------------------


def test_keys_modes_and_validation(keys: KeyLayout, tmp_path: Path) -> None:
    for pub, sec in [keys.server, *keys.clients.values()]:
        assert pub.is_file() and sec.is_file()
        assert sec.stat().st_mode & 0o777 == 0o600
        assert pub.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in keys.allowed_dir.iterdir()) == ["good.key"]
    keys.broker_config().validate("broker")
    keys.client_config("good").validate("actor")
    SecurityConfig().validate("broker")  # curve off: nothing required

    with pytest.raises(FileExistsError):
        generate_keys(keys.root, ["server"])

    loose = tmp_path / "loose.key_secret"
    shutil.copyfile(keys.clients["good"][1], loose)
    os.chmod(loose, 0o644)
    cfg = keys.client_config("good")
    cfg.client_secret_key = str(loose)
    with pytest.raises(ValueError, match=r"^security\.client_secret_key: .*readable by group/others \(mode 0644\)"):
        cfg.validate("scorer")

    cfg = keys.broker_config()
    cfg.server_secret_key = "/nonexistent/server.key_secret"
    with pytest.raises(ValueError, match=r"^security\.server_secret_key: file not found: /nonexistent/"):
        cfg.validate("broker")

    cfg = keys.broker_config()
    cfg.allowed_clients_dir = str(tmp_path / "empty")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^security\.allowed_clients_dir: no client public keys"):
        cfg.validate("broker")

    cfg = keys.client_config("good")
    cfg.client_public_key = str(keys.clients["intruder"][0])
    with pytest.raises(ValueError, match=r"^security\.client_public_key: .*does not hold the public key"):
        cfg.validate("learner")

    cfg = keys.client_config("good")
    cfg.server_public_key = ""
    with pytest.raises(ValueError, match=r"^security\.server_public_key: required"):
        cfg.validate("actor")


# 2 ---------------------------------------------------------------------------------------------------------------


def test_allowed_client_talks(ctx: zmq.Context, keys: KeyLayout) -> None:
    server = Server(ctx, keys.broker_config())
    sock, watch = make_client(ctx, keys.client_config("good"), server.endpoint)
    try:
        assert server.sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
        for i in range(3):
            roundtrip(sock, watch, server, f"msg-{i}".encode())
        assert watch.succeeded and watch.handshakes == 1
        server.pump()
        assert server.watch.accepted == 1 and not server.failures
    finally:
        watch.close()
        sock.close(linger=0)
        server.close()


# 3-5 -------------------------------------------------------------------------------------------------------------


def _client_cfg(keys: KeyLayout, case: str) -> SecurityConfig:
    if case == "plaintext":
        return SecurityConfig()
    cfg = keys.client_config("intruder" if case == "not_allowlisted" else "good")
    if case == "wrong_server_key":
        cfg.server_public_key = str(keys.root / "impostor" / "server.key")
    return cfg


@pytest.mark.parametrize(
    ("case", "message", "server_reason"),
    [
        ("wrong_server_key", r"failed 3 times in a row: .*security\.server_public_key", "cryptographic"),
        ("not_allowlisted", r"the server rejected our key \(not in its allowlist", "auth"),
        ("plaintext", r"server requires CURVE but this process has security\.curve off", "mechanism_mismatch"),
    ],
    ids=["wrong_server_key", "not_allowlisted", "plaintext_client"],
)
def test_bad_client_raises_and_server_gets_nothing(
    ctx: zmq.Context, keys: KeyLayout, case: str, message: str, server_reason: str
) -> None:
    server = Server(ctx, keys.broker_config())
    sock, watch = make_client(ctx, _client_cfg(keys, case), server.endpoint)
    try:
        sock.send(b"must-not-arrive")
        t0 = time.monotonic()
        exc = expect_failure(watch, server)
        assert time.monotonic() - t0 < DETECT_S
        assert server.endpoint in exc.reason
        assert pytest.raises(HandshakeError, watch.check).value is exc  # sticky
        assert not watch.succeeded
        end = time.monotonic() + 0.5
        while time.monotonic() < end:  # keep the server turning: the message must never reach the application
            server.pump()
            time.sleep(0.02)
        assert re.search(message, exc.reason), exc.reason
        assert server.received == []
        assert server.watch.rejected[server_reason] >= 1 and server.watch.accepted == 0
        assert server.failures and all(
            f.startswith(f"handshake rejected on {server.endpoint}") for f in server.failures
        )
    finally:
        watch.close()
        sock.close(linger=0)
        server.close()


def test_server_watch_reports_dead_authenticator(ctx: zmq.Context, keys: KeyLayout) -> None:
    server = Server(ctx, keys.broker_config())
    try:
        assert server.watch.poll() == []
        assert server.auth is not None
        server.auth.stop()
        assert any("authenticator is not running" in m for m in server.watch.poll())
        assert server.watch.poll() == []  # reported once
    finally:
        server.auth = None
        server.close()


# 6 ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("curve", [False, True], ids=["plaintext", "curve"])
def test_late_server_and_restart_are_not_failures(ctx: zmq.Context, keys: KeyLayout, curve: bool) -> None:
    server_cfg = keys.broker_config() if curve else SecurityConfig()
    client_cfg = keys.client_config("good") if curve else SecurityConfig()
    holder = PortHolder()
    endpoint = holder.endpoint
    sock, watch = make_client(ctx, client_cfg, endpoint)
    server: Server | None = None
    try:
        sock.send(b"early")  # queued while nothing listens: refused connections are retried, never failures
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            assert watch.check() is False
            time.sleep(0.02)
        holder.release()
        server = Server(ctx, server_cfg, endpoint)
        deadline = time.monotonic() + 5
        while not sock.poll(20):
            server.pump()
            watch.check()
            assert time.monotonic() < deadline, "the queued message never arrived"
        assert sock.recv() == b"echo:early"
        assert watch.succeeded and watch.handshakes == 1

        for restart in range(2):
            server.close()
            holder.hold()
            end = time.monotonic() + 0.5
            while time.monotonic() < end:  # the client sees the disconnect and refused retries meanwhile
                watch.check()
                time.sleep(0.02)
            holder.release()
            server = Server(ctx, server_cfg, endpoint)
            roundtrip(sock, watch, server, f"after-restart-{restart}".encode())
        assert watch.handshakes == 3 and watch.failures == 0 and watch.error is None
        assert not server.failures
    finally:
        watch.close()
        sock.close(linger=0)
        if server is not None:
            server.close()
        holder.release()


def test_unresponsive_server_is_not_a_key_failure(ctx: zmq.Context) -> None:
    """A listener that accepts TCP but never speaks (a SIGSTOPped broker) only times out: no HandshakeError."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    endpoint = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 50)
    sock.setsockopt(zmq.HANDSHAKE_IVL, 200)
    watch = HandshakeWatch(sock, endpoint)
    sock.connect(endpoint)
    try:
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            assert watch.check() is False
            time.sleep(0.02)
        assert watch.timeouts >= 3 and watch.failures == 0
    finally:
        watch.close()
        sock.close(linger=0)
        listener.close()


def test_watch_must_attach_before_connect(ctx: zmq.Context) -> None:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect("tcp://127.0.0.1:1")
    try:
        with pytest.raises(RuntimeError, match="before"):
            HandshakeWatch(sock)
        with pytest.raises(RuntimeError, match="before"):
            secure_client(sock, SecurityConfig(curve=True))
    finally:
        sock.close(linger=0)


def test_dropped_handshakes_count_only_when_consecutive(ctx: zmq.Context) -> None:
    """Synthetic events: the DISCONNECTED-without-outcome fallback, and a success in between resetting the count."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    watch = HandshakeWatch(sock, "tcp://x:1", max_failures=3)
    ep = b"tcp://x:1"

    def feed(*events: tuple[int, int]) -> None:
        watch._consume([{"event": e, "value": v, "endpoint": ep} for e, v in events])

    dropped = [(zmq.EVENT_CONNECTED, 9), (zmq.EVENT_DISCONNECTED, 9)]
    try:
        feed(*dropped, *dropped)
        feed((zmq.EVENT_CONNECTED, 9), (zmq.EVENT_HANDSHAKE_SUCCEEDED, 0), (zmq.EVENT_DISCONNECTED, 9))
        assert watch.failures == 0 and watch.succeeded
        feed(*dropped, *dropped)
        with pytest.raises(HandshakeError, match=r"failed 3 times in a row: .*before any handshake outcome"):
            feed(*dropped)
    finally:
        watch.close()
        sock.close(linger=0)
