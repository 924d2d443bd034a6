"""ZeroMQ helpers: hardened sockets and a request/reply client that survives a broker restart.

Failure model: a handshake that demonstrably failed (key not allowlisted, wrong server key, plaintext vs CURVE, a
wrong or missing role secret) raises :class:`~editrl.common.security.HandshakeError` from ``request`` instead of
retrying forever. Every request carries a ``request_id``; the client resends the *same* message (same ids) after
``timeout_s`` without a reply, rebuilding its socket so a restarted broker is reached. The broker's handlers are
idempotent by id, so a resend after a lost reply is harmless. Replies for older requests are discarded.
"""

from __future__ import annotations

import socket
import time
import uuid
from typing import Any

import zmq

from editrl.common import codec, wire
from editrl.common.roles import check_role
from editrl.common.security import HandshakeWatch, SecurityConfig, secure_client


def harden(sock: zmq.Socket, hwm: int = 1000) -> zmq.Socket:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    return sock


def free_local_port() -> int:
    """A port nobody listens on right now (the kernel's pick; torchrun binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def new_id() -> str:
    return uuid.uuid4().hex


class BrokerClient:
    """A DEALER connected to the broker's ROUTER, one outstanding request at a time.

    ``role`` (``actor``, ``scorer``, ``learner`` or ``tool``; required) is what this process proves to the broker
    when the topology authenticates roles (:mod:`editrl.common.roles`)."""

    def __init__(
        self,
        ctx: zmq.Context,
        endpoint: str,
        identity: str,
        timeout_s: float = wire.REQUEST_TIMEOUT_S,
        security: SecurityConfig | None = None,
        *,
        role: str,
    ):
        self.ctx, self.endpoint, self.identity, self.timeout_s = ctx, endpoint, identity, timeout_s
        self.role = check_role(role)
        self.security = security or SecurityConfig()
        self.sock: zmq.Socket | None = None
        self.watch: HandshakeWatch | None = None
        self._connect()

    def _connect(self) -> None:
        self.close()
        self.sock = harden(self.ctx.socket(zmq.DEALER))
        self.sock.setsockopt(zmq.ROUTING_ID, f"{self.identity}-{new_id()[:8]}".encode())
        secure_client(self.sock, self.security, self.role)
        self.watch = HandshakeWatch(self.sock, self.endpoint)  # a refused key or secret: HandshakeError in request()
        self.sock.connect(self.endpoint)

    def request(self, msg: Any, retries: int = -1, should_stop: Any = None) -> Any:
        """Send ``msg`` and return the decoded reply whose request_id matches. Resends on timeout.

        ``retries=-1`` retries forever (until ``should_stop()`` is true, then raises TimeoutError).
        """
        frames = codec.encode(msg)
        attempt = 0
        while True:
            assert self.sock is not None
            self.sock.send_multipart(frames, copy=False)
            deadline = time.monotonic() + self.timeout_s
            while (remaining := deadline - time.monotonic()) > 0:
                assert self.watch is not None
                self.watch.check()
                if not self.sock.poll(int(min(remaining, 0.1) * 1000)):  # should_stop is seen within 0.1 s
                    if should_stop is not None and should_stop():
                        raise TimeoutError("stopped while waiting for the broker")
                    continue
                reply = codec.decode(self.sock.recv_multipart(copy=False))
                if getattr(reply, "request_id", None) == msg.request_id:
                    return reply
            attempt += 1
            if 0 <= retries < attempt:
                raise TimeoutError(f"no reply from {self.endpoint} after {attempt} attempts")
            self._connect()  # a restarted broker: fresh socket, same request ids

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
            self.watch = None
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
