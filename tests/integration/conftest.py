"""Topology files for integration tests: real processes on 127.0.0.1 with free ports, in a temporary run dir."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import yaml


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_topology(tmp_path: Path, model_dir: Path, tasks: Path, **sections: dict[str, Any]) -> Path:
    topo: dict[str, Any] = {
        "run": {"name": "it", "dir": str(tmp_path / "run"), "seed": 0},
        "broker": {"endpoint": f"tcp://127.0.0.1:{free_port()}", "max_staleness": 1},
        "policy": {"family": "flow", "model": str(model_dir), "sampler": {"num_steps": 4, "noise_level": 0.7}},
        "data": {"tasks": str(tasks), "group_size": 8},
        "actors": {"count": 1},
        "scorers": {"count": 1, "backend": "metric"},
        "learner": {"nproc": 1, "groups_per_step": 4, "lr": 3e-3, "master_port": free_port(), "checkpoint_every": 5},
    }
    for name, values in sections.items():
        topo[name].update(values)
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump(topo))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
