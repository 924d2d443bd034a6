"""CURVE encryption, client authentication and peer roles for the broker's ROUTER and its DEALER clients.

Keys are ZeroMQ certificate files (``zmq.auth`` format): ``NAME.key`` holds a public key, ``NAME.key_secret`` the
public and the secret key (mode 0600). The broker holds the server pair and a directory of allowed client public
keys (the ZAP allowlist); every client holds the server's public key and its own pair.

Roles (:mod:`editrl.common.roles`): with :attr:`SecurityConfig.roles_enforced` (a topology file; not a config built
in code) every broker message carries its sender's role (:func:`peer_role`): a CURVE key's name, or a role secret.

Failure model
- Configuration: :meth:`SecurityConfig.validate` raises ``ValueError`` naming the field (``security.<field>: ...``)
  for a missing file, a secret readable by group/others, a file without the expected key, a public key that does
  not match its secret file, or an empty allowlist. Call it at start-up so a bad set-up stops the process there.
- A wrong key does not raise anywhere in ZeroMQ: sends queue up and receives never return. Only socket monitor
  events show it. :class:`HandshakeWatch` turns those events into :class:`HandshakeError` on the client;
  :class:`ServerWatch` reports rejected clients on the broker. What libzmq 4.3.5 emits (measured, pyzmq 27.3):

  ============================  =============================================  =====================================
  case                          client socket                                  server socket
  ============================  =============================================  =====================================
  client key not in allowlist   HANDSHAKE_FAILED_AUTH value=400, then never     HANDSHAKE_FAILED_AUTH 400
  (PLAIN: wrong role secret)    reconnects (the socket stays silent forever)
  plaintext client, CURVE srv   HANDSHAKE_FAILED_PROTOCOL 0x11000002            HANDSHAKE_FAILED_PROTOCOL 0x11000002
  (or CURVE client, plain srv;  (MECHANISM_MISMATCH), never reconnects          (MECHANISM_MISMATCH)
  no role secret, PLAIN srv)
  wrong server public key       HANDSHAKE_FAILED_NO_DETAIL value=32 (EPIPE)    HANDSHAKE_FAILED_PROTOCOL 0x11000001
                                + DISCONNECTED, retried every RECONNECT_IVL    (CRYPTOGRAPHIC), once per attempt
  server not up (refused)       CONNECT_DELAYED/CLOSED/CONNECT_RETRIED only    -
  server restart                DISCONNECTED after HANDSHAKE_SUCCEEDED, then   -
                                refused retries, then CONNECTED + SUCCEEDED
  server unresponsive (stopped  CONNECTED, then after HANDSHAKE_IVL (30 s)     -
  process, full backlog)        HANDSHAKE_FAILED_NO_DETAIL value=11 (EAGAIN)
  ============================  =============================================  =====================================

  So :class:`HandshakeWatch` fails at once on FAILED_AUTH and FAILED_PROTOCOL (definitive, and libzmq gives up on
  the connection), and after ``max_failures`` consecutive attempts that were *accepted and then dropped* during
  the handshake (NO_DETAIL other than a timeout, or DISCONNECTED with no handshake event at all, the fallback for
  other libzmq versions) with no HANDSHAKE_SUCCEEDED in between. Refused connections never count (no CONNECTED
  event), a handshake timeout (an unresponsive or stopped server: a liveness problem, not a key problem) never
  counts, and a disconnect after a successful handshake resets nothing and counts nothing.
- The ZAP authenticator is a thread in the server's context. If it is not running, libzmq 4.3.5 accepts every
  CURVE client that knows the server's public key (``ZAP_ENFORCE_DOMAIN`` is accepted but has no effect in this
  non-draft build; PLAIN likewise): start it before ``bind``, stop it only after closing the socket. ServerWatch
  reports a dead authenticator. One authenticator per context (it binds ``inproc://zeromq.zap.01``).
- The allowlist is read once when :func:`secure_server` runs; a key added later needs a broker restart.
"""

from __future__ import annotations

import collections
import errno
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from editrl.common.roles import RoleAuthenticator, check_role, key_roles, peer_role, role_keys, role_secrets, zap_logger

__all__ = [
    "HandshakeError",
    "HandshakeWatch",
    "SecurityConfig",
    "ServerWatch",
    "peer_role",
    "secure_client",
    "secure_server",
]

ZAP_LOGGER = "editrl.security.zap"  # the authenticator logs ALLOWED/DENIED (with the client key) here at DEBUG

_CLIENT_EVENTS = (
    zmq.EVENT_CONNECTED
    | zmq.EVENT_DISCONNECTED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_SERVER_EVENTS = (
    zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
_TIMEOUT_ERRNOS = {errno.EAGAIN, errno.ETIMEDOUT}  # NO_DETAIL after HANDSHAKE_IVL: the peer did not answer
_PROTOCOL_NAMES = {
    getattr(zmq, name): name.removeprefix("PROTOCOL_ERROR_") for name in dir(zmq) if name.startswith("PROTOCOL_ERROR_")
}
_PLAIN_REJECTED = "the server rejected our role secret (security.role_secrets_file is not the broker's file)"
_ZAP_STATUS = {
    300: "the server's authenticator reported a temporary error",
    400: "the server rejected our key (not in its allowlist: security.allowed_clients_dir)",
    500: "the server's authenticator failed internally",
}


# -- configuration ------------------------------------------------------------------------------------------------
@dataclass
class SecurityConfig:
    """The ``security`` section of the topology file. All paths are certificate files written by
    :func:`editrl.common.keys.generate_keys`.

    With the defaults (no curve, no role secrets: a config built in code) every function here is a no-op. A topology
    file always authenticates roles: the loader fills in ``role_secrets_file`` when curve is off.
    """

    curve: bool = False  # CURVE encryption and the client allowlist on every socket (multi-host)
    server_public_key: str = ""  # broker's public cert: every process needs it
    server_secret_key: str = ""  # broker's secret cert (mode 0600): the broker only
    client_public_key: str = ""  # this process's public cert: clients only; "{role}" = the process's role
    client_secret_key: str = ""  # its secret cert (0600); "{role}" lets one topology serve every role (editrl up)
    allowed_clients_dir: str = ""  # directory of allowed client public certs (*.key): the broker only, non-empty
    role_secrets_file: str = ""  # per-run role secrets (0600) when curve is off; "" = secrets/roles.json in run.dir

    @property
    def roles_enforced(self) -> bool:
        """Every broker message carries its sender's authenticated role (CURVE: key names; else role secrets)."""
        return self.curve or bool(self.role_secrets_file)

    def validate(self, role: str) -> None:
        """Check that ``role`` has what it needs; raise ``ValueError("security.<field>: <problem>")`` otherwise.

        ``role == "broker"`` is the server (server pair + allowlist); any other role (actor, scorer, learner, a
        command-line client) is a client (server public key + its own pair). Without curve, a ``role_secrets_file``
        is created if missing and checked (``security.role_secrets_file``); otherwise nothing is checked.
        """
        if not self.curve:
            if self.role_secrets_file:
                role_secrets(self.role_secrets_file)
            return
        server_pub = _public_key("server_public_key", self.server_public_key)
        if role == "broker":
            pub, _ = _secret_pair("server_secret_key", self.server_secret_key)
            if pub != server_pub:
                raise ValueError(
                    f"security.server_public_key: {self.server_public_key} does not hold the public key of "
                    f"security.server_secret_key ({self.server_secret_key})"
                )
            _allowlist(self.allowed_clients_dir)
        else:
            keys = role_keys(self, role)  # "{role}" in a client key path: this role's own key
            client_pub = _public_key("client_public_key", keys.client_public_key)
            pub, _ = _secret_pair("client_secret_key", keys.client_secret_key)
            if pub != client_pub:
                raise ValueError(
                    f"security.client_public_key: {keys.client_public_key} does not hold the public key of "
                    f"security.client_secret_key ({keys.client_secret_key})"
                )


def _existing_file(name: str, path: str) -> Path:
    if not path:
        raise ValueError(f"security.{name}: required when security.curve is true")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"security.{name}: file not found: {path}")
    return p


def _load(name: str, p: Path) -> tuple[bytes | None, bytes | None]:
    try:
        return zmq.auth.load_certificate(p)
    except (OSError, ValueError) as exc:
        raise ValueError(f"security.{name}: not a ZeroMQ certificate file: {p} ({exc})") from None


def _public_key(name: str, path: str) -> bytes:
    pub, _ = _load(name, _existing_file(name, path))
    if not pub:
        raise ValueError(f"security.{name}: no public key in {path}")
    return pub


def _secret_pair(name: str, path: str) -> tuple[bytes, bytes]:
    p = _existing_file(name, path)
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise ValueError(
            f"security.{name}: secret key file is readable by group/others (mode {mode:04o}): {path}; "
            f"run `chmod 600 {path}`"
        )
    pub, secret = _load(name, p)
    if not pub or not secret:
        raise ValueError(f"security.{name}: no secret key in {path} (a *.key_secret file is expected)")
    return pub, secret


def _allowlist(path: str) -> int:
    if not path:
        raise ValueError("security.allowed_clients_dir: required for the broker when security.curve is true")
    if not Path(path).is_dir():
        raise ValueError(f"security.allowed_clients_dir: directory not found: {path}")
    try:
        n = len(zmq.auth.load_certificates(path))
    except (OSError, ValueError) as exc:
        raise ValueError(f"security.allowed_clients_dir: unreadable certificate in {path} ({exc})") from None
    if n == 0:
        raise ValueError(f"security.allowed_clients_dir: no client public keys (*.key) in {path}")
    return n


# -- sockets ------------------------------------------------------------------------------------------------------


def _require_unconnected(sock: zmq.Socket, what: str) -> None:
    if sock.getsockopt(zmq.LAST_ENDPOINT):
        raise RuntimeError(f"{what} must be called before the socket's bind/connect")


def secure_server(
    sock: zmq.Socket, ctx: zmq.Context, cfg: SecurityConfig, roles: bool = True
) -> ThreadAuthenticator | None:
    """Make ``sock`` (not yet bound) a CURVE server that accepts only the keys in ``cfg.allowed_clients_dir`` or,
    with ``roles`` (the broker; every frame then tells its sender's role, :func:`peer_role`) and no curve but a
    ``cfg.role_secrets_file``, a PLAIN server that accepts only a role with its secret. ``roles=False``: CURVE only.

    Starts a ZAP authenticator thread in ``ctx`` and returns it: the caller stops it (``auth.stop()``) AFTER closing
    the socket. Returns None and changes nothing when there is nothing to authenticate. Raises ``ValueError`` naming
    the field for a bad configuration, ``RuntimeError`` if the socket is already bound, ``zmq.ZMQError``
    (EADDRINUSE) if ``ctx`` already has an authenticator.
    """
    plain = roles and not cfg.curve and bool(cfg.role_secrets_file)
    if not cfg.curve and not plain:
        return None
    _require_unconnected(sock, "secure_server")
    cfg.validate("broker")
    zap_log = zap_logger(ZAP_LOGGER)
    if not roles:
        auth = ThreadAuthenticator(ctx, log=zap_log)
    elif plain:
        auth = RoleAuthenticator(ctx, zap_log, secrets_by_role=role_secrets(cfg.role_secrets_file))
    else:
        auth = RoleAuthenticator(ctx, zap_log, roles_by_key=key_roles(cfg.allowed_clients_dir))
    auth.start()
    try:
        if plain:
            sock.plain_server = True
            return auth
        auth.configure_curve(domain="*", location=cfg.allowed_clients_dir)
        pub, secret = _secret_pair("server_secret_key", cfg.server_secret_key)
        sock.curve_secretkey = secret
        sock.curve_publickey = pub
        sock.curve_server = True
    except BaseException:
        auth.stop()
        raise
    return auth


def secure_client(sock: zmq.Socket, cfg: SecurityConfig, role: str | None = None) -> None:
    """Give ``sock`` (not yet connected) the server's public key and this process's pair (curve), or ``role`` and
    its secret from ``cfg.role_secrets_file`` (PLAIN; no curve). Broker clients pass their role (with CURVE the broker
    takes it from the key); ``None`` is for a server without roles (the weight stream). No-op if nothing to set.
    Raises ``ValueError`` naming the field (or an unknown role), ``RuntimeError`` if already connected.
    """
    if role is not None:
        check_role(role)
    if not cfg.curve:
        if role is not None and cfg.role_secrets_file:
            _require_unconnected(sock, "secure_client")
            sock.plain_username = role.encode()
            sock.plain_password = role_secrets(cfg.role_secrets_file)[role].encode()
        return
    _require_unconnected(sock, "secure_client")
    cfg = role_keys(cfg, role or "")
    cfg.validate(role or "client")
    server_pub = _public_key("server_public_key", cfg.server_public_key)
    pub, secret = _secret_pair("client_secret_key", cfg.client_secret_key)
    sock.curve_serverkey = server_pub
    sock.curve_publickey = pub
    sock.curve_secretkey = secret


# -- handshake monitoring -----------------------------------------------------------------------------------------


class HandshakeError(RuntimeError):
    """A handshake with the broker demonstrably failed; ``reason`` is a human message naming what to fix."""

    def __init__(self, reason: str, endpoint: str = "", event: str = "", value: int = 0) -> None:
        super().__init__(reason)
        self.reason, self.endpoint, self.event, self.value = reason, endpoint, event, value


def _errno_name(value: int) -> str:
    return errno.errorcode.get(value, str(value))


def _endpoint(ev: dict[str, Any], default: str) -> str:
    raw = ev.get("endpoint") or b""
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
    return text or default


class _Monitor:
    """A socket monitor read without blocking; closed with :meth:`close` (before the context is terminated)."""

    def __init__(self, sock: zmq.Socket, events: int) -> None:
        self._sock = sock
        self._mon: zmq.Socket | None = sock.get_monitor_socket(events)
        self._mon.setsockopt(zmq.LINGER, 0)

    def events(self, timeout_ms: int = 0) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if self._mon is None:
            return out
        if timeout_ms > 0 and not self._mon.poll(timeout_ms):
            return out
        while True:
            try:
                out.append(recv_monitor_message(self._mon, zmq.NOBLOCK))
            except zmq.Again:
                return out

    def close(self) -> None:
        if self._mon is None:
            return
        try:
            if not self._sock.closed:
                self._sock.disable_monitor()
        except zmq.ZMQError:
            pass  # the socket or context is already gone: nothing left to stop
        self._mon.close(linger=0)
        self._mon = None


class HandshakeWatch:
    """Watches a client socket's handshakes; :meth:`check` raises :class:`HandshakeError` when one demonstrably failed.

    Create it right after :func:`secure_client` and BEFORE ``connect`` (a rejected key is reported once and libzmq
    does not retry, so an event missed is a failure never seen). Call :meth:`check` often (every poll turn): it
    never blocks, and unread events queue in the monitor pipe. Close it before the socket (:meth:`close`).

    Fails (and keeps failing: the error is sticky) on
    - ``HANDSHAKE_FAILED_AUTH``: the broker's authenticator rejected our key (ZAP status 400: not allowlisted);
    - ``HANDSHAKE_FAILED_PROTOCOL``: mechanism mismatch (curve on one side only) or a cryptographic/protocol error;
    - ``max_failures`` consecutive connections that were accepted and then dropped during the handshake
      (``HANDSHAKE_FAILED_NO_DETAIL`` with a non-timeout errno, or ``DISCONNECTED`` with no handshake event at all),
      with no ``HANDSHAKE_SUCCEEDED`` in between: in libzmq 4.3.5 this is a wrong ``server_public_key``.
    Never fails on refused connections (server not up), on handshake timeouts (``NO_DETAIL`` with EAGAIN/ETIMEDOUT:
    a stopped or overloaded server) or on a disconnect after a successful handshake (server restart).
    See the module docstring for the events measured in each case.
    """

    def __init__(self, sock: zmq.Socket, endpoint: str = "", max_failures: int = 3) -> None:
        if max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {max_failures}")
        _require_unconnected(sock, "HandshakeWatch")
        self.endpoint, self.max_failures = endpoint, max_failures
        mechanism = sock.getsockopt(zmq.MECHANISM)
        self.curve, self.plain = mechanism == zmq.CURVE, mechanism == zmq.PLAIN  # PLAIN: a role secret
        self.succeeded = False  # a handshake ever succeeded on this socket
        self.handshakes = 0  # successful handshakes (1 + the number of reconnections)
        self.failures = 0  # consecutive dropped handshakes since the last success
        self.timeouts = 0  # handshake timeouts seen (not failures; a server that does not answer)
        self._error: HandshakeError | None = None
        self._in_handshake = False  # CONNECTED seen, no handshake outcome yet
        self._mon = _Monitor(sock, _CLIENT_EVENTS)

    @property
    def error(self) -> HandshakeError | None:
        return self._error

    def check(self) -> bool:
        """Process pending monitor events without blocking; return :attr:`succeeded`; raise on a failure."""
        return self._consume(self._mon.events())

    def wait(self, timeout_s: float) -> bool:
        """Block up to ``timeout_s`` for a first successful handshake; return :attr:`succeeded`; raise on failure."""
        deadline = time.monotonic() + timeout_s
        while not self.check() and (remaining := deadline - time.monotonic()) > 0:
            self._consume(self._mon.events(max(1, int(min(remaining, 0.1) * 1000))))
        return self.succeeded

    def close(self) -> None:
        """Stop monitoring (idempotent; safe after the socket was closed)."""
        self._mon.close()

    def _consume(self, events: list[dict[str, Any]]) -> bool:
        if self._error is None:
            for ev in events:
                self._on_event(ev)
                if self._error is not None:
                    break
        if self._error is not None:
            raise self._error
        return self.succeeded

    def _on_event(self, ev: dict[str, Any]) -> None:
        kind, value = ev["event"], int(ev["value"])
        ep = _endpoint(ev, self.endpoint)
        mech = "CURVE handshake" if self.curve else "handshake"
        if kind == zmq.EVENT_CONNECTED:
            self._in_handshake = True
        elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._in_handshake = False
            self.succeeded, self.failures = True, 0
            self.handshakes += 1
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            what = _ZAP_STATUS.get(value, f"the server's authenticator refused us (ZAP status {value})")
            what = _PLAIN_REJECTED if self.plain and value == 400 else what
            self._fail(f"{mech} with {ep} failed: {what}", ep, "HANDSHAKE_FAILED_AUTH", value)
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            self._fail(f"{mech} with {ep} failed: {self._protocol_text(value)}", ep, "HANDSHAKE_FAILED_PROTOCOL", value)
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self._in_handshake = False
            if value in _TIMEOUT_ERRNOS:
                self.timeouts += 1  # the server accepted the TCP connection but never answered: not a key problem
                return
            what = f"the server closed the connection during the handshake ({_errno_name(value)})"
            self._dropped(ep, what, "HANDSHAKE_FAILED_NO_DETAIL", value)
        elif kind == zmq.EVENT_DISCONNECTED and self._in_handshake:
            self._in_handshake = False
            self._dropped(ep, "the server closed the connection before any handshake outcome", "DISCONNECTED", value)

    def _dropped(self, ep: str, what: str, event: str, value: int) -> None:
        self.failures += 1
        if self.failures < self.max_failures:
            return
        mech = "CURVE handshake" if self.curve else "handshake"
        hint = (
            "most likely security.server_public_key is not the broker's public key"
            if self.curve
            else "the server probably requires a security mechanism this process does not use (security.curve)"
        )
        self._fail(f"{mech} with {ep} failed {self.failures} times in a row: {what}; {hint}", ep, event, value)

    def _protocol_text(self, value: int) -> str:
        if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            if self.curve:
                return "security mechanism mismatch: this process uses CURVE but the server does not (security.curve)"
            if self.plain:
                return "security mechanism mismatch: this process sends a role secret but the server uses CURVE or none"
            return (
                "security mechanism mismatch: the server requires CURVE but this process has security.curve off, "
                "or it requires a role secret this process did not send (security.role_secrets_file)"
            )
        if value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
            return "a cryptographic check failed (security.server_public_key or this process's key pair is wrong)"
        return f"protocol error {_PROTOCOL_NAMES.get(value, hex(value))}"

    def _fail(self, reason: str, ep: str, event: str, value: int) -> None:
        self._error = HandshakeError(reason, endpoint=ep, event=event, value=value)


class ServerWatch:
    """Reports handshakes the server socket rejected, and a ZAP authenticator that stopped running.

    Attach before ``bind``; call :meth:`poll` every loop turn (never blocks). A misconfigured client retries every
    RECONNECT_IVL (a wrong server key: ~10 events/s per client), so log the first message per reason and keep
    :attr:`rejected` (counts by reason: ``auth``, ``mechanism_mismatch``, ``cryptographic``, ``protocol``,
    ``dropped``, ``timeout``) as gauges. Monitor events carry no peer address; the authenticator logs the denied
    client key at DEBUG on the ``editrl.security.zap`` logger.
    """

    def __init__(self, sock: zmq.Socket, authenticator: ThreadAuthenticator | None = None) -> None:
        self.authenticator = authenticator
        self.accepted = 0  # successful handshakes
        self.rejected: collections.Counter[str] = collections.Counter()
        self._auth_reported = False
        self._mon = _Monitor(sock, _SERVER_EVENTS)

    def poll(self) -> list[str]:
        """Return one message per failed handshake since the last call (and one if the authenticator died)."""
        out: list[str] = []
        for ev in self._mon.events():
            kind, value, ep = ev["event"], int(ev["value"]), _endpoint(ev, "")
            if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.accepted += 1
                continue
            if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                reason, text = "auth", f"a client's key or role secret was refused (ZAP status {value})"
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                reason, text = "mechanism_mismatch", "a client does not use the server's mechanism (security.curve)"
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC:
                reason, text = "cryptographic", "a client uses a wrong server public key (cryptographic error)"
            elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                reason, text = "protocol", f"protocol error {_PROTOCOL_NAMES.get(value, hex(value))}"
            elif value in _TIMEOUT_ERRNOS:
                reason, text = "timeout", "a client did not complete the handshake in time"
            else:
                reason, text = "dropped", f"a client dropped the connection during the handshake ({_errno_name(value)})"
            self.rejected[reason] += 1
            out.append(f"handshake rejected on {ep}: {text}")
        auth = self.authenticator
        if auth is not None and not self._auth_reported and not auth.is_alive():
            self._auth_reported = True
            out.append("the ZAP authenticator is not running: clients' keys and role secrets are no longer checked")
        return out

    def close(self) -> None:
        """Stop monitoring (idempotent; safe after the socket was closed)."""
        self._mon.close()
