"""Peer roles on real sockets (127.0.0.1) and real files: a ROUTER set up by ``secure_server`` sees the role of every
message's sender (role secrets over PLAIN, or CURVE key names); a client without the right secret delivers nothing
and its HandshakeWatch says why; the secrets file is private and created once even by racing processes.

Each test owns one ``zmq.Context``; every watch, socket and authenticator is closed before the context ends.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from editrl.common import codec, wire
from editrl.common import roles as roles_module
from editrl.common.config import parse_config
from editrl.common.keys import generate_layout
from editrl.common.net import BrokerClient, new_id
from editrl.common.roles import ROLES, role_of_key_name, role_secrets
from editrl.common.security import (
    HandshakeError,
    HandshakeWatch,
    SecurityConfig,
    ServerWatch,
    peer_role,
    secure_client,
    secure_server,
)

DETECT_S = 5.0


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


class Router:
    """A ROUTER built like the broker's (``secure_server`` before ``bind``) that records ``(role, body)``."""

    def __init__(self, ctx: zmq.Context, cfg: SecurityConfig) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.auth = secure_server(self.sock, ctx, cfg)
        self.watch = ServerWatch(self.sock, self.auth)
        self.sock.bind("tcp://127.0.0.1:*")
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.received: list[tuple[str, str, bytes]] = []  # (role of the id frame, role of the body frame, body)

    def pump(self, timeout_ms: int = 0) -> None:
        self.watch.poll()
        while self.sock.poll(timeout_ms):
            ident, body = self.sock.recv_multipart(copy=False)
            self.received.append((peer_role(ident), peer_role(body), body.bytes))
            timeout_ms = 0

    def close(self) -> None:
        self.watch.close()
        self.sock.close(linger=0)
        if self.auth is not None:
            self.auth.stop()


def _client(
    ctx: zmq.Context, cfg: SecurityConfig, endpoint: str, role: str | None
) -> tuple[zmq.Socket, HandshakeWatch]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    secure_client(sock, cfg, role)
    watch = HandshakeWatch(sock, endpoint)
    sock.connect(endpoint)
    return sock, watch


def _deliver(sock: zmq.Socket, watch: HandshakeWatch, router: Router, body: bytes) -> None:
    n = len(router.received)
    sock.send(body)
    deadline = time.monotonic() + DETECT_S
    while len(router.received) == n and time.monotonic() < deadline:
        watch.check()
        router.pump(timeout_ms=20)
    assert len(router.received) > n, f"{body!r} never arrived"


def _roles_cfg(tmp_path: Path) -> SecurityConfig:
    return SecurityConfig(role_secrets_file=str(tmp_path / "run" / "secrets" / "roles.json"))


# -- role secrets (loopback, no curve) ----------------------------------------------------------------------------


def _roles_seen(ctx: zmq.Context, server: SecurityConfig, clients: dict[str, tuple[SecurityConfig, str]]) -> dict:
    """Each client (name → (its config, the role it claims)) sends its name; the role the router saw on each frame of
    it (the first and the last frame must agree), by name."""
    router = Router(ctx, server)
    socks = {name: _client(ctx, cfg, router.endpoint, role) for name, (cfg, role) in clients.items()}
    seen = {}
    try:
        for name, (sock, watch) in socks.items():
            _deliver(sock, watch, router, name.encode())
            first, last, body = router.received[-1]
            assert body == name.encode() and first == last, router.received[-1]
            seen[name] = first
    finally:
        for sock, watch in socks.values():
            watch.close()
            sock.close(linger=0)
        router.close()
    return seen


def test_every_message_carries_its_senders_role(ctx: zmq.Context, tmp_path: Path) -> None:
    cfg = _roles_cfg(tmp_path)
    assert cfg.roles_enforced
    assert _roles_seen(ctx, cfg, {f"from {r}": (cfg, r) for r in ROLES}) == {f"from {r}": r for r in ROLES}


def test_broker_client_says_its_role(ctx: zmq.Context, tmp_path: Path) -> None:
    cfg = _roles_cfg(tmp_path)
    router = Router(ctx, cfg)
    with pytest.raises(TypeError):
        BrokerClient(ctx, router.endpoint, "x", security=cfg)  # type: ignore[call-arg]  # no default role
    with pytest.raises(ValueError, match="role must be one of actor, scorer, learner, tool; got 'broker'"):
        BrokerClient(ctx, router.endpoint, "x", security=cfg, role="broker")
    client = BrokerClient(ctx, router.endpoint, "learner-0", timeout_s=5.0, security=cfg, role="learner")
    request = wire.StatusRequest(new_id())
    replies: list[object] = []
    thread = threading.Thread(target=lambda: replies.append(client.request(request, retries=0)))
    thread.start()
    try:
        assert router.sock.poll(int(DETECT_S * 1000))
        frames = router.sock.recv_multipart(copy=False)
        assert peer_role(frames[0]) == "learner" and codec.decode(frames[1:]) == request
        ack = wire.Ack(request.request_id, True, "", {})
        router.sock.send_multipart([frames[0].bytes, *codec.encode(ack)])
        thread.join(DETECT_S)
        assert replies == [ack]
    finally:
        thread.join(DETECT_S)
        client.close()
        router.close()


def _other_secrets(tmp_path: Path) -> SecurityConfig:
    return SecurityConfig(role_secrets_file=str(tmp_path / "other-run" / "secrets" / "roles.json"))


@pytest.mark.parametrize(
    ("case", "message", "server_reason"),
    [
        ("wrong_secret", r"rejected our role secret \(security\.role_secrets_file", "auth"),
        ("unknown_role", r"rejected our role secret", "auth"),
        ("no_secret", r"requires a role secret this process did not send", "mechanism_mismatch"),
    ],
    ids=["wrong_secret", "unknown_role", "no_secret"],
)
def test_a_client_without_the_right_secret_delivers_nothing(
    ctx: zmq.Context, tmp_path: Path, case: str, message: str, server_reason: str
) -> None:
    router = Router(ctx, _roles_cfg(tmp_path))
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if case == "wrong_secret":
        secure_client(sock, _other_secrets(tmp_path), "learner")  # a secret of another run
    elif case == "unknown_role":
        tool_secret = role_secrets(_roles_cfg(tmp_path).role_secrets_file)["tool"]
        sock.plain_username, sock.plain_password = b"admin", tool_secret.encode()  # a real secret, no such role
    else:
        secure_client(sock, SecurityConfig(), "learner")  # no role secrets: the NULL mechanism
    watch = HandshakeWatch(sock, router.endpoint)
    sock.connect(router.endpoint)
    try:
        sock.send(b"PublishWeights")
        deadline = time.monotonic() + DETECT_S
        error: HandshakeError | None = None
        while error is None and time.monotonic() < deadline:
            router.pump(timeout_ms=20)
            try:
                watch.check()
            except HandshakeError as exc:
                error = exc
        assert error is not None, f"no HandshakeError within {DETECT_S} s"
        assert re.search(message, error.reason), error.reason
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            router.pump(timeout_ms=20)
        assert router.received == []
        assert router.watch.rejected[server_reason] >= 1 and router.watch.accepted == 0
    finally:
        watch.close()
        sock.close(linger=0)
        router.close()


def test_without_role_secrets_nothing_changes(ctx: zmq.Context, tmp_path: Path) -> None:
    """``SecurityConfig()`` (built in code): no authenticator, the NULL mechanism, ``peer_role`` is ""; the weight
    stream server (``roles=False``) ignores role secrets."""
    assert not SecurityConfig().roles_enforced
    router = Router(ctx, SecurityConfig())
    sock, watch = _client(ctx, SecurityConfig(), router.endpoint, "actor")
    stream = ctx.socket(zmq.ROUTER)
    try:
        assert router.auth is None and sock.getsockopt(zmq.MECHANISM) == zmq.NULL
        _deliver(sock, watch, router, b"hello")
        assert router.received == [("", "", b"hello")]
        assert secure_server(stream, ctx, _roles_cfg(tmp_path), roles=False) is None
        assert stream.getsockopt(zmq.MECHANISM) == zmq.NULL
    finally:
        stream.close(linger=0)
        watch.close()
        sock.close(linger=0)
        router.close()


# -- the secrets file ---------------------------------------------------------------------------------------------


def _create(path: str, barrier: multiprocessing.synchronize.Barrier, out: multiprocessing.queues.Queue) -> None:
    barrier.wait()
    out.put(role_secrets(path))


def test_secrets_file_is_private_and_racing_creators_agree(tmp_path: Path) -> None:
    path = tmp_path / "run" / "secrets" / "roles.json"
    mp = multiprocessing.get_context("fork")
    n = 6
    barrier, out = mp.Barrier(n), mp.Queue()
    old_umask = os.umask(0)  # even with a umask that hides nothing, nobody else may ever read the secrets
    try:
        procs = [mp.Process(target=_create, args=(str(path), barrier, out)) for _ in range(n)]
        for p in procs:
            p.start()
        results = [out.get(timeout=30) for _ in range(n)]
        for p in procs:
            p.join(30)
    finally:
        os.umask(old_umask)
    assert all(p.exitcode == 0 for p in procs)
    assert all(r == results[0] for r in results) and set(results[0]) == set(ROLES)
    assert len(set(results[0].values())) == len(ROLES)  # a secret of its own per role
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert sorted(p.name for p in path.parent.iterdir()) == ["roles.json"]  # no temporary file left behind
    assert json.loads(path.read_text()) == results[0] == role_secrets(path)  # read again: unchanged
    roles_module._create(path)  # the loser of a race: its link fails, the winner's file stays
    assert role_secrets(path) == results[0] and sorted(p.name for p in path.parent.iterdir()) == ["roles.json"]


def test_a_bad_secrets_file_is_a_config_error_naming_the_field(ctx: zmq.Context, tmp_path: Path) -> None:
    cfg = _roles_cfg(tmp_path)
    path = Path(cfg.role_secrets_file)
    path.parent.mkdir(parents=True, mode=0o755)
    cfg.validate("actor")  # creates it, and makes its directory private
    assert path.is_file() and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match=r"^security\.role_secrets_file: .*readable by group/others \(mode 0644\)"):
        cfg.validate("broker")
    os.chmod(path, 0o600)
    path.write_text(json.dumps({"actor": "x"}))
    sock = ctx.socket(zmq.DEALER)
    try:
        with pytest.raises(ValueError, match=r"^security\.role_secrets_file: .*must map every role"):
            secure_client(sock, cfg, "actor")
    finally:
        sock.close(linger=0)


def test_a_topology_file_authenticates_roles(tmp_path: Path) -> None:
    raw = {"run": {"dir": str(tmp_path / "run")}, "policy": {"model": "/m"}, "data": {"tasks": "/t.jsonl"}}
    cfg = parse_config(raw)
    assert cfg.security.roles_enforced
    assert cfg.security.role_secrets_file == str(tmp_path / "run" / "secrets" / "roles.json")
    moved = parse_config({**raw, "security": {"role_secrets_file": "elsewhere.json"}}, base_dir=tmp_path)
    assert moved.security.role_secrets_file == str(tmp_path / "elsewhere.json")
    curve = parse_config({**raw, "security": {"curve": True}})
    assert curve.security.roles_enforced and curve.security.role_secrets_file == ""


# -- CURVE: the role of a key is its name -------------------------------------------------------------------------


def test_role_of_key_name() -> None:
    assert [role_of_key_name(n) for n in ("actor-0", "scorer-12", "learner", "tool.key", "tool-ops", "ops", "")] == [
        "actor", "scorer", "learner", "tool", "tool", "", "",
    ]  # fmt: skip


def test_curve_key_maps_to_its_role(ctx: zmq.Context, tmp_path: Path) -> None:
    names = {"actor-1": "actor", "scorer-0": "scorer", "learner-0": "learner", "tool": "tool", "ops": ""}
    keys = generate_layout(tmp_path / "keys", list(names))
    clients = {name: (keys.client_config(name), "tool") for name in names}
    assert _roles_seen(ctx, keys.broker_config(), clients) == names  # the key's role, not the "tool" it claims


def test_one_topology_serves_every_role_with_role_keys(ctx: zmq.Context, tmp_path: Path) -> None:
    """``{role}`` in the client key paths (one topology file for `editrl up` on one host with CURVE): each process
    loads its own role's key, and the broker sees that role."""
    keys = generate_layout(tmp_path / "keys", list(ROLES))
    shared = dataclasses.replace(keys.client_config("actor"), client_public_key=str(keys.root / "clients" / "{role}.key"),
                                 client_secret_key=str(keys.root / "clients" / "{role}.key_secret"))  # fmt: skip
    for role in ROLES:
        shared.validate(role)  # what each process checks at start-up: its own key pair
    assert _roles_seen(ctx, keys.broker_config(), {r: (shared, r) for r in ROLES}) == {r: r for r in ROLES}
