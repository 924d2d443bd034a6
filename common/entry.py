"""What every role's ``main`` does first: parse, load the topology (exit 2 naming the field), title, logging, signals.

Heavy imports (torch, diffusers, zmq) happen only after this returns, so ``--help`` and config errors are instant.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from editrl.common.config import ConfigError, TopologyConfig, load_config
from editrl.common.log import set_process_title, setup_logging


def role_parser(role: str, doc: str | None, with_id: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"editrl {role}", description=doc)
    parser.add_argument("--config", required=True, help="the topology YAML file")
    if with_id:
        parser.add_argument("--id", type=int, default=0, help="this process's index within its role")
    return parser


def start_role(
    role: str,
    parser: argparse.ArgumentParser,
    argv: list[str] | None,
    proc_id: Callable[[argparse.Namespace, TopologyConfig], int] | None = None,
) -> tuple[argparse.Namespace, TopologyConfig, Any]:
    """Parse ``argv``, load the config (exit 2 with the dotted field path on error), set the process title and
    logging. Returns ``(args, cfg, log)``."""
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config)
        cfg.security.validate(role)
    except (ConfigError, ValueError) as exc:
        print(f"editrl {role}: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    index = proc_id(args, cfg) if proc_id is not None else getattr(args, "id", 0)
    set_process_title(f"editrl::{role}-{index}")
    pid_dir = cfg.run_dir / "pids"  # who is who, for operators and fault tests (kill by pid)
    pid_dir.mkdir(parents=True, exist_ok=True)
    (pid_dir / f"{role}-{index}.pid").write_text(f"{os.getpid()}\n")
    return args, cfg, setup_logging(role, index, cfg.run_dir)


def run_guarded(role: str, log: Any, body: Callable[[], int]) -> int:
    """Run a role's body; a failed CURVE handshake ends the process with exit 3 and a clear message instead of
    reconnecting forever."""
    from editrl.common.security import HandshakeError

    try:
        return body()
    except HandshakeError as exc:
        log.error("handshake_failed", error=str(exc))
        print(f"editrl {role}: {exc}", file=sys.stderr)
        return 3


def exit_now(code: int) -> NoReturn:
    """End a role process whose own clean-up is done (sockets, writers and checkpoints closed): flush the log files
    and the standard streams, then ``os._exit``. This skips the interpreter's teardown of the torch / diffusers /
    transformers modules, ~1.4 s of CPU on this machine kind that held up every stop and every restart."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


def stop_flag() -> Callable[[], bool]:
    """Install SIGTERM/SIGINT handlers; the returned callable says whether a stop was requested."""
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopping.append(1))
    return lambda: bool(stopping)
