"""CURVE end to end with real processes: a CURVE broker with a client allowlist; an allowlisted scorer registers
and `editrl status` is answered; a scorer or client with an unknown key, the wrong server key, or no CURVE at all
exits non-zero within seconds with a clear message (instead of reconnecting forever), and the broker counts it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ..integration.conftest import free_port

pytestmark = pytest.mark.faults
EDITRL = [sys.executable, "-m", "editrl.scripts.cli"]


def _topology(path: Path, base: dict, security: dict) -> Path:
    path.write_text(yaml.safe_dump({**base, "security": security}))
    return path


@pytest.fixture
def curve_setup(tmp_path, quickstart_tasks):
    keys = tmp_path / "keys"
    subprocess.run(
        [*EDITRL, "keys", str(keys), "--clients", "scorer,tool-ops,tool-rogue"], check=True, capture_output=True
    )
    (keys / "allowed" / "tool-rogue.key").unlink()  # rogue has a key pair but is not on the allowlist
    base = {
        "run": {"dir": str(tmp_path / "run")},
        "broker": {"endpoint": f"tcp://127.0.0.1:{free_port()}"},
        "policy": {"model": str(tmp_path / "no-model")},
        "data": {"tasks": str(quickstart_tasks)},
    }
    server = {"server_public_key": str(keys / "server.key")}

    def client(name: str, **over) -> dict:
        return {"curve": True, **server, "client_public_key": str(keys / "clients" / f"{name}.key"),
                "client_secret_key": str(keys / "clients" / f"{name}.key_secret"), **over}  # fmt: skip

    broker_topo = _topology(tmp_path / "broker.yaml", base, {
        "curve": True, **server, "server_secret_key": str(keys / "server.key_secret"),
        "allowed_clients_dir": str(keys / "allowed"),
    })  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    broker = subprocess.Popen([*EDITRL, "broker", "--config", str(broker_topo)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    log = tmp_path / "run" / "logs" / "broker-0.jsonl"
    deadline = time.monotonic() + 30
    while not (log.exists() and "broker_started" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert broker.poll() is None, broker.stderr.read().decode()[-2000:]
    yield tmp_path, base, client, keys, env
    broker.terminate()
    assert broker.wait(timeout=30) == 0


def _status(topo: Path, timeout_s: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([*EDITRL, "status", str(topo), "--json"], capture_output=True, text=True, timeout=timeout_s)


def test_allowlisted_clients_work_and_rogue_ones_exit_fast(curve_setup):
    tmp_path, base, client, keys, env = curve_setup
    ops = _topology(tmp_path / "ops.yaml", base, client("tool-ops"))
    deadline = time.monotonic() + 20
    while (ok := _status(ops)).returncode != 0 and time.monotonic() < deadline:
        time.sleep(0.5)  # the broker is starting
    assert ok.returncode == 0, ok.stderr

    scorer = subprocess.Popen([*EDITRL, "scorer", "--config", str(_topology(tmp_path / "s.yaml", base,
                              client("scorer")))], env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while '"scorers": 1' not in _status(ops).stdout and time.monotonic() < deadline:
            time.sleep(0.5)
        assert '"scorers": 1' in _status(ops).stdout, "the allowlisted scorer never registered"
    finally:
        scorer.terminate()
        scorer.wait(timeout=30)

    cases = {
        "not allowlisted": client("tool-rogue"),
        "wrong server key": client("tool-ops", server_public_key=str(keys / "clients" / "tool-rogue.key")),
        "plaintext": {"curve": False},
    }
    for what, security in cases.items():
        topo = _topology(tmp_path / f"bad-{what.replace(' ', '-')}.yaml", base, security)
        t0 = time.monotonic()
        bad_scorer = subprocess.run([*EDITRL, "scorer", "--config", str(topo)], env=env, capture_output=True,
                                    text=True, timeout=60)  # fmt: skip
        elapsed = time.monotonic() - t0
        assert bad_scorer.returncode == 3, (what, bad_scorer.stderr[-2000:])
        assert "handshake" in bad_scorer.stderr.lower(), (what, bad_scorer.stderr[-2000:])
        assert elapsed < 15, f"{what}: took {elapsed:.1f} s to give up"
    counters = _status(ops).stdout
    assert "rejected/handshake_" in counters


def test_secret_key_readable_by_others_is_a_config_error(curve_setup):
    tmp_path, base, client, keys, env = curve_setup
    leaked = tmp_path / "leaked.key_secret"
    shutil.copy(keys / "clients" / "tool-ops.key_secret", leaked)
    os.chmod(leaked, 0o644)
    topo = _topology(tmp_path / "leak.yaml", base, client("tool-ops", client_secret_key=str(leaked)))
    proc = subprocess.run([*EDITRL, "scorer", "--config", str(topo)], env=env, capture_output=True, text=True,
                          timeout=30)  # fmt: skip
    assert proc.returncode == 2 and "security.client_secret_key" in proc.stderr, proc.stderr
