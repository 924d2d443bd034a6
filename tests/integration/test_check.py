"""`editrl check` against a live broker and scorer (real processes): every item scored, in range, in order, nothing
stored in the replay; and a clear failure when no scorer answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from editrl.broker.store import ReplayStore

from .conftest import write_topology

EDITRL = [sys.executable, "-m", "editrl.scripts.cli"]


def _start(role: str, topo, env) -> subprocess.Popen:
    return subprocess.Popen([*EDITRL, role, "--config", str(topo)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


def test_check_scores_a_known_workload_through_the_live_pool(tmp_path, quickstart_tasks):
    topo = write_topology(tmp_path, tmp_path / "no-model", quickstart_tasks)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    broker, scorer = _start("broker", topo, env), _start("scorer", topo, env)
    try:
        log = tmp_path / "run/logs/broker-0.jsonl"
        deadline = time.monotonic() + 30
        while not (log.exists() and "scorer_joined" in log.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        proc = subprocess.run([*EDITRL, "check", str(topo), "--groups", "6", "--json"], capture_output=True,
                              text=True, timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        summary = json.loads(proc.stdout.strip().splitlines()[-1])
        assert summary["ok"] and summary["groups"] == 6 and summary["images"] == 24
        assert summary["images_per_s"] > 0 and summary["latency_p95_s"] >= summary["latency_p50_s"]
        scorer.terminate()
        scorer.wait(timeout=30)
        deadline = time.monotonic() + 30  # past the scorer liveness (timers.scorer_liveness_s): no scorer left
        while "scorer_dead" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        proc = subprocess.run([*EDITRL, "check", str(topo), "--groups", "1", "--timeout", "3"], capture_output=True,
                              text=True, timeout=120, env={**env})  # fmt: skip
    finally:
        for p in (scorer, broker):
            p.terminate()
            p.wait(timeout=30)
    assert proc.returncode != 0, proc.stdout
    store = ReplayStore(tmp_path / "run/replay.lmdb", capacity=10**6, readonly=True)
    assert store.counters()["ingested"] == 0  # checks are never stored
