"""Who sent a broker message: the role of every peer, proven by ZeroMQ's ZAP handshake and read per message.

Terms
- Role: ``actor``, ``scorer``, ``learner`` or ``tool`` (``editrl status``, ``editrl check``, the offline scripts).
  The broker learns it once per connection, in the handshake, and every message of that connection carries it as the
  ZeroMQ ``User-Id`` property: :func:`peer_role` reads it from a received frame.
- Role secrets (loopback, ``security.curve: false``): one JSON file per run, ``<run.dir>/secrets/roles.json``
  (``security.role_secrets_file``), ``{role: secret}``. A client connects with ZeroMQ's PLAIN mechanism, username =
  its role, password = that role's secret; the broker's ZAP handler accepts exactly those pairs.
- Key roles (``security.curve: true``): the role of a client key is the file name of its allowlisted public key up to
  the first ``-``: ``allowed/actor-0.key`` is an actor, ``allowed/tool.key`` a tool (``editrl keys`` writes such
  names). An allowlisted key whose name does not start with a role still passes the handshake (the allowlist decides
  who may connect) but its messages carry no role (:func:`peer_role` is ``""``), and the broker logs it at start.

Guarantees and failure model
- The secrets file is created once, atomically, mode 0600 in a 0700 directory: it is written to a private temporary
  file that is then hard-linked into place, so nobody ever sees it partial or readable by others, and two processes
  racing to create it both end up reading the same content (the loser of the link reads the winner's file). Every
  process that starts from a topology creates it if missing (``editrl up`` does before it starts any child).
- A client with a wrong or missing secret never delivers a message: the handshake fails (a wrong secret or role:
  ``HANDSHAKE_FAILED_AUTH`` with ZAP status 400; no secret at all: mechanism mismatch) and
  :class:`~editrl.common.security.HandshakeWatch` raises ``HandshakeError``.
- PLAIN proves a role, it does not encrypt: secrets cross the loopback interface in clear and every process of the
  same user can read the file. It stops a process from speaking with a role it was not started as (and other users
  on the host from speaking at all); across hosts use CURVE.
- Deleting the file while the run is up locks new connections out (the broker keeps the secrets it read at start):
  stop the run first.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

__all__ = [
    "ROLES",
    "RoleAuthenticator",
    "check_role",
    "default_secrets_file",
    "key_roles",
    "peer_role",
    "role_keys",
    "zap_logger",
    "role_of_key_name",
    "role_secrets",
]

ROLES = ("actor", "scorer", "learner", "tool")
SECRETS_FILE = Path("secrets") / "roles.json"  # below the run directory
_FIELD = "security.role_secrets_file"
_SECRET_BYTES = 32

_log = structlog.get_logger("editrl.roles")


def check_role(role: str) -> str:
    """``role`` if it is one of :data:`ROLES`; ``ValueError`` naming the allowed ones otherwise."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r}")
    return role


def peer_role(frame: zmq.Frame) -> str:
    """The authenticated role of the message ``frame`` belongs to (any frame of it, received with ``copy=False``).

    ``""`` when the connection carries no role: the socket does no role authentication (NULL mechanism), or a CURVE
    key whose name names no role."""
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:  # EINVAL: no such property (no ZAP handshake on this connection)
        return ""
    if isinstance(user_id, bytes):
        user_id = user_id.decode("utf-8", "replace")
    return user_id if user_id in ROLES else ""


def zap_logger(name: str) -> logging.Logger:
    """The ZAP authenticator's stdlib logger: WARNING and up unless configured (pyzmq logs "Starting" at INFO and every
    ALLOWED/DENIED at DEBUG, which would land in a role's JSON log as events of their own)."""
    log = logging.getLogger(name)
    if log.level == logging.NOTSET:
        log.setLevel(logging.WARNING)
    return log


def role_keys(cfg: Any, role: str) -> Any:
    """``cfg`` (a SecurityConfig) with ``{role}`` in its client key paths replaced by ``role``: one topology file
    serves every role of a one-host ``editrl up`` with CURVE (``clients/{role}.key`` → ``clients/actor.key``, ...).
    Unchanged when the paths name one key (a process with a topology file of its own) or ``role`` is no role."""
    if role not in ROLES or "{role}" not in cfg.client_public_key + cfg.client_secret_key:
        return cfg
    return dataclasses.replace(cfg, client_public_key=cfg.client_public_key.replace("{role}", role),
                               client_secret_key=cfg.client_secret_key.replace("{role}", role))  # fmt: skip


# -- loopback: per-run role secrets -------------------------------------------------------------------------------


def default_secrets_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / SECRETS_FILE


def role_secrets(path: str | Path) -> dict[str, str]:
    """The ``{role: secret}`` map in ``path``, created first if it does not exist (see the module docstring).

    Raises ``ValueError("security.role_secrets_file: ...")`` for a file readable by group/others, one that is not
    a map with a secret for every role, or a directory that cannot be created or made private.
    """
    p = Path(path)
    _private_dir(p.parent)
    if not p.exists():
        _create(p)
    mode = stat.S_IMODE(p.stat().st_mode)
    if mode & 0o077:
        raise ValueError(
            f"{_FIELD}: {p} is readable by group/others (mode {mode:04o}); its secrets may have leaked: stop the run, "
            f"delete the file and start again"
        )
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{_FIELD}: cannot read {p} ({exc})") from None
    if not isinstance(data, dict) or not all(isinstance(data.get(r), str) and data[r] for r in ROLES):
        raise ValueError(
            f"{_FIELD}: {p} must map every role ({', '.join(ROLES)}) to a secret; delete it while no process of the "
            f"run is up and it is recreated"
        )
    return {r: data[r] for r in ROLES}


def _private_dir(d: Path) -> None:
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if stat.S_IMODE(d.stat().st_mode) != 0o700:
            os.chmod(d, 0o700)
    except OSError as exc:
        raise ValueError(f"{_FIELD}: cannot make the private directory {d} ({exc})") from None


def _create(p: Path) -> None:
    """Write fresh secrets to a 0600 temporary file and hard-link it into place (never replacing a file)."""
    body = json.dumps({r: secrets.token_urlsafe(_SECRET_BYTES) for r in ROLES}, indent=1) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=".roles-", dir=p.parent)  # mode 0600 from the start
    try:
        with os.fdopen(fd, "w") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, p)
            _log.info("role_secrets_created", path=str(p))
        except FileExistsError:
            pass  # another process won the race: everybody reads its file
    except OSError as exc:
        raise ValueError(f"{_FIELD}: cannot create {p} ({exc})") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


# -- CURVE: roles from key names ----------------------------------------------------------------------------------


def role_of_key_name(name: str) -> str:
    """``actor-0`` → ``actor``, ``tool`` → ``tool``, ``ops`` → ``""`` (a file name's ``.key`` suffix is ignored)."""
    role = name.removesuffix(".key").split("-", 1)[0]
    return role if role in ROLES else ""


def key_roles(allowed_dir: str | Path) -> dict[bytes, str]:
    """``{z85 public key: role}`` for every ``*.key`` in the allowlist; keys whose name names no role map to ``""``
    (and are logged once here)."""
    out: dict[bytes, str] = {}
    unnamed: list[str] = []
    for path in sorted(Path(allowed_dir).glob("*.key")):
        public, _ = zmq.auth.load_certificate(path)
        if public:
            out[public] = role_of_key_name(path.name)
            if not out[public]:
                unnamed.append(path.name)
    if unnamed:
        _log.warning("allowlisted_keys_without_role", keys=unnamed, roles=list(ROLES), allowed_dir=str(allowed_dir))
    return out


# -- the ZAP handler ----------------------------------------------------------------------------------------------


class RoleAuthenticator(ThreadAuthenticator):
    """A ZAP thread that reports the peer's role as its User-Id.

    PLAIN: accepts username ``role`` with that role's secret (compared in constant time, never logged; pyzmq's own
    PLAIN check logs passwords at DEBUG). CURVE: use ``configure_curve`` as usual; the User-Id of an allowed key is its
    role from ``key_roles``. Fails closed: a PLAIN client is refused when no secrets were given.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        log: Any,
        secrets_by_role: dict[str, str] | None = None,
        roles_by_key: dict[bytes, str] | None = None,
    ) -> None:
        super().__init__(ctx, log=log)
        self._secrets = {r: s.encode() for r, s in (secrets_by_role or {}).items()}
        self._roles_by_key = dict(roles_by_key or {})

    def _authenticate_plain(self, domain: str, username: str, password: str) -> tuple[bool, bytes]:
        expected = self._secrets.get(username)
        if expected is not None and hmac.compare_digest(expected, password.encode(self.encoding, "replace")):
            self.log.debug("ALLOWED (PLAIN) role=%s", username)
            return True, b"OK"
        self.log.debug("DENIED (PLAIN) role=%r: unknown role or wrong secret", username)
        return False, b"Invalid role or secret"

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._roles_by_key.get(z85.encode(client_public_key), "")
