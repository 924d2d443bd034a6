"""CURVE key files for a multi-host topology (``editrl keys``): a server pair, client pairs and the broker's allowlist,
secrets created 0600 and never readable by others, not even briefly. :mod:`editrl.common.security` loads them.

One key per process, named after its role: the broker takes a client's role from the name of its allowlisted key,
up to the first ``-`` (``actor-0`` and ``actor-1`` are actors, ``tool`` is a command-line tool; see
:mod:`editrl.common.roles`). A key whose name does not start with a role connects but its messages carry no role.
Every process reads its key from its topology file, so processes of different roles need topology files of their own.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

from editrl.common.security import SecurityConfig

__all__ = ["KeyLayout", "generate_keys", "generate_layout"]


def generate_keys(out_dir: str | Path, names: list[str], overwrite: bool = False) -> dict[str, tuple[Path, Path]]:
    """Write ``NAME.key`` (public, 0644) and ``NAME.key_secret`` (secret, 0600) for each name; return the paths.

    Files are created in a private temporary directory and moved in, so a secret is never group/other-readable,
    not even briefly. Raises ``FileExistsError`` rather than replace an existing key (replacing the server's key
    locks every client out) unless ``overwrite``; ``ValueError`` for a name that is not a plain file name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise ValueError(f"key name must be a plain file name, got {name!r}")
        for suffix in (".key", ".key_secret"):
            if (out / f"{name}{suffix}").exists() and not overwrite:
                raise FileExistsError(f"{out / (name + suffix)} exists (refusing to replace a key)")
    result: dict[str, tuple[Path, Path]] = {}
    tmp = Path(tempfile.mkdtemp(prefix=".keygen-", dir=out))  # mode 0700
    try:
        for name in names:
            pub_tmp, sec_tmp = (Path(p) for p in zmq.auth.create_certificates(tmp, name))
            os.chmod(sec_tmp, 0o600)
            os.chmod(pub_tmp, 0o644)
            pub, sec = out / pub_tmp.name, out / sec_tmp.name
            os.replace(sec_tmp, sec)
            os.replace(pub_tmp, pub)
            result[name] = (pub, sec)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


@dataclass
class KeyLayout:
    """A ready-to-use key directory: ``server.key*``, ``clients/NAME.key*`` and ``allowed/NAME.key``."""

    root: Path
    server: tuple[Path, Path]
    clients: dict[str, tuple[Path, Path]] = field(default_factory=dict)

    @property
    def allowed_dir(self) -> Path:
        return self.root / "allowed"

    def broker_config(self) -> SecurityConfig:
        return SecurityConfig(
            curve=True,
            server_public_key=str(self.server[0]),
            server_secret_key=str(self.server[1]),
            allowed_clients_dir=str(self.allowed_dir),
        )

    def client_config(self, name: str) -> SecurityConfig:
        pub, sec = self.clients[name]
        return SecurityConfig(
            curve=True, server_public_key=str(self.server[0]), client_public_key=str(pub), client_secret_key=str(sec)
        )


def generate_layout(out_dir: str | Path, client_names: list[str], overwrite: bool = False) -> KeyLayout:
    """Create ``out_dir/server.key*``, ``out_dir/clients/NAME.key*`` and the allowlist ``out_dir/allowed/NAME.key``
    (copies of the client public keys; NAME up to the first ``-`` is the key's role). ``clients/`` is made mode 0700.
    Same errors as :func:`generate_keys`.
    """
    root = Path(out_dir)
    server = generate_keys(root, ["server"], overwrite=overwrite)["server"]
    clients_dir, allowed = root / "clients", root / "allowed"
    clients_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(clients_dir, 0o700)
    allowed.mkdir(parents=True, exist_ok=True)
    clients = generate_keys(clients_dir, client_names, overwrite=overwrite)
    for pub, _ in clients.values():
        shutil.copyfile(pub, allowed / pub.name)
        os.chmod(allowed / pub.name, 0o644)
    return KeyLayout(root=root, server=server, clients=clients)
