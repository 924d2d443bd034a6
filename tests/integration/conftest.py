"""Topology files for integration tests: real processes on 127.0.0.1 with free ports, in a temporary run dir."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path
from typing import Any

import yaml

_HANDED_OUT: set[int] = set()
_RNG = random.Random()  # its own state: a test seeding the global generator must not replay the same ports


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range, never the same one twice in a test session.

    Ports from ``bind(0)`` come from the ephemeral range, where any process's outgoing connection may take them as its
    source port between this call and the server's bind; two consecutive ``bind(0)`` calls may also return the same
    port. Either is the suspected cause of a CI run whose learner crashed six times in 1.5 s each (torchrun's store
    failing to bind its port).
    """
    try:
        low = min(int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0]), 32768)
    except (OSError, ValueError):
        low = 32768
    for _ in range(1000):
        port = _RNG.randrange(20000, low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


# Protocol timers of every test topology: a fault is noticed in seconds, not in the production defaults' minutes.
# The liveness keeps 8 heartbeats of slack: on 2 shared cores a scorer may be descheduled for a while.
TEST_TIMERS = {
    "heartbeat_interval_s": 0.25,
    "scorer_liveness_s": 2.0,
    "request_timeout_s": 1.0,
    "restart_backoff_s": 0.5,
    "storage_retry_s": 0.25,
}


def write_topology(tmp_path: Path, model_dir: Path, tasks: Path, **sections: dict[str, Any]) -> Path:
    topo: dict[str, Any] = {
        "run": {"name": "it", "dir": str(tmp_path / "run"), "seed": 0},
        "broker": {"endpoint": f"tcp://127.0.0.1:{free_port()}", "max_staleness": 1},
        "policy": {"family": "flow", "model": str(model_dir), "sampler": {"num_steps": 4, "noise_level": 0.7}},
        "data": {"tasks": str(tasks), "group_size": 8},
        "actors": {"count": 1},
        "scorers": {"count": 1, "backend": "metric"},
        "learner": {"nproc": 1, "groups_per_step": 4, "lr": 3e-3, "checkpoint_every": 5},
        "timers": dict(TEST_TIMERS),
    }
    for name, values in sections.items():
        topo[name].update(values)
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump(topo))
    return path


def assert_exact_every_step(metrics: list[dict[str, Any]], min_steps: int = 6) -> None:
    """Issue 13: with η = 0 every group is sampled by the weights the learner holds, so the learner's recompute (prox)
    must equal the actor's stored log-probs bit for bit at every step: ``learner/logp_mismatch_max`` (float64
    difference of the float32 values) is exactly 0.0, measured (present) on every step, prox never bypassed, and
    the adapters are non-zero from step 2 on (step 1's update moved them: a non-zero gradient norm)."""
    assert len(metrics) >= min_steps, [m["step"] for m in metrics]
    assert metrics[0]["learner/grad_norm"] > 0.0
    for m in metrics:
        assert m["learner/prox_bypassed"] == 0.0, m
        assert m["learner/logp_mismatch_max"] == 0.0, (m["step"], m.get("learner/logp_mismatch_max"))
        assert m["learner/staleness_max"] == 0.0, m


def pickle_files(root: Path) -> list[str]:
    """Files below ``root`` that are pickles: a pickle stream (protocol 2-5 opcode first) or a zip holding one (the
    format of ``torch.save``)."""
    import zipfile

    found = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        head = path.read_bytes()[:2]
        if len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            found.append(str(path.relative_to(root)))
        elif zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                if any(name.endswith(".pkl") for name in archive.namelist()):
                    found.append(str(path.relative_to(root)))
    return found


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
