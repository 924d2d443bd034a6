"""Fault-test harness: a real `editrl up` run on 127.0.0.1, processes killed or stopped BY PID, and a checker that
reads the recorded history (every process's JSON log + the broker's LMDB) and classifies every group.

History sources
- actors: ``group_attempt`` (first send of a group) and ``group_sent`` (the broker acknowledged its commit);
- broker: the replay LMDB status table (every group ever stored and its state), ``score_requeued`` log lines;
- learner ranks: ``batch_trained`` (step, rank, group ids) — the LAST record of each (rank, step) is the model's
  lineage (a learner resumed from a checkpoint re-trains the steps after it; those records replace the old ones).

Classes
- lost: acknowledged to an actor but not in the replay, or consumed by the broker but absent from the lineage (a
  group skipped by a resume);
- duplicated: in the lineage more than once (trained twice);
- unexpected: in the replay but never sent by any actor;
- recovered: stored exactly once although its delivery or scoring was disrupted (resent, requeued).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
import zmq

from editrl.broker.store import ReplayStore
from editrl.common import wire
from editrl.common.net import BrokerClient, new_id

from ..integration.conftest import read_jsonl, write_topology


@dataclass
class Verdict:
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    recovered: list[str] = field(default_factory=list)
    acked: int = 0
    stored: int = 0
    trained: int = 0
    in_flight: int = 0

    def summary(self) -> str:
        return (
            f"acked={self.acked} stored={self.stored} trained={self.trained} lost={len(self.lost)} "
            f"duplicated={len(self.duplicated)} unexpected={len(self.unexpected)} recovered={len(self.recovered)}"
        )


def _events(run_dir: Path, pattern: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in sorted((run_dir / "logs").glob(pattern)):
        out += read_jsonl(path)
    return out


def check_history(run_dir: Path) -> Verdict:
    actor_events = _events(run_dir, "actor-*.jsonl")
    attempts = Counter(e["group_id"] for e in actor_events if e["event"] == "group_attempt")
    acked = {e["group_id"] for e in actor_events if e["event"] == "group_sent"}
    store = ReplayStore(run_dir / "replay.lmdb", capacity=10**9, readonly=True)
    try:
        status = dict(store.iter_status())
        batches = store.iter_batches()
    finally:
        store.close()
    lineage: dict[tuple[int, int], list[str]] = {}
    for e in _events(run_dir, "learner-*.jsonl"):
        if e["event"] == "batch_trained":
            lineage[(e["rank"], e["step"])] = e["group_ids"]
    trained = Counter(g for gids in lineage.values() for g in gids)
    requeued = {e["group_id"] for e in _events(run_dir, "broker-*.jsonl") if e["event"] == "score_requeued"}
    v = Verdict(acked=len(acked), stored=len(status), trained=sum(trained.values()))
    v.lost = sorted(g for g in acked if g not in status)
    # consumed by the broker but not in the lineage = skipped, unless handed out for a step the learner had not
    # finished when the run ended (in flight at the end, not lost)
    last_step = {rank: step for (rank, step) in sorted(lineage)}
    in_flight = {g for (rank, step), gids in batches.items() if step > last_step.get(rank, 0) for g in gids}
    v.in_flight = len(in_flight)
    v.lost += sorted(
        g for g, st in status.items() if st["state"] == "consumed" and g not in trained and g not in in_flight
    )
    v.duplicated = sorted(g for g, n in trained.items() if n > 1)
    v.unexpected = sorted(g for g in status if g not in attempts)
    v.recovered = sorted(g for g in status if (attempts[g] > 1 or g in requeued) and g not in v.lost)
    return v


class FaultRun:
    """`editrl up TOPO --max-steps N` as a subprocess, with helpers to find, kill and stop its processes by pid."""

    def __init__(self, tmp_path: Path, model_dir: Path, tasks: Path, max_steps: int, **sections: dict[str, Any]):
        self.topo = write_topology(tmp_path, model_dir, tasks, **sections)
        self.run_dir = tmp_path / "run"
        self.max_steps = max_steps
        self.out = open(tmp_path / "up.out", "w")  # noqa: SIM115 - closed in finish()
        self.proc: subprocess.Popen | None = None
        self.ctx = zmq.Context()

    def start(self) -> FaultRun:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "editrl.scripts.cli", "up", str(self.topo), "--max-steps", str(self.max_steps)],
            stdout=self.out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        return self

    def wait_for(self, predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            assert self.proc is None or self.proc.poll() is None or what == "exit", f"`editrl up` exited ({what})"
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")

    def pid(self, name: str) -> int:
        """Current pid of ``name`` (e.g. ``scorer-0``, ``learner-0``, ``broker-0``), once it is up."""
        path = self.run_dir / "pids" / f"{name}.pid"

        def alive() -> int | None:
            try:
                pid = int(path.read_text())
                os.kill(pid, 0)
                return pid
            except (FileNotFoundError, ValueError, ProcessLookupError):
                return None

        return self.wait_for(alive, 60, f"{name} to be running")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        pid = self.pid(name)
        os.kill(pid, sig)
        return pid

    def steps(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def wait_steps(self, n: int, timeout_s: float = 120) -> None:
        self.wait_for(lambda: self.steps() >= n, timeout_s, f"{n} learner steps")

    def events(self, name_glob: str, event: str) -> list[dict[str, Any]]:
        return [e for e in _events(self.run_dir, f"{name_glob}.jsonl") if e["event"] == event]

    def status_endpoint(self) -> str:
        return yaml.safe_load(self.topo.read_text())["broker"]["endpoint"]

    def status(self) -> dict[str, int]:
        """The broker's live counters (StatusRequest over the wire)."""
        client = BrokerClient(self.ctx, self.status_endpoint(), "fault-test", timeout_s=2.0)
        try:
            return client.request(wire.StatusRequest(new_id()), retries=3).counters
        finally:
            client.close()

    def finish(self, timeout_s: float = 300) -> Verdict:
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            self.proc.wait(timeout=60)
            raise AssertionError(f"run did not finish {self.max_steps} steps in {timeout_s} s") from None
        finally:
            self.out.close()
            self.ctx.destroy(linger=0)
        assert rc == 0, (self.run_dir.parent / "up.out").read_text()[-3000:]
        assert self.steps() >= self.max_steps
        return check_history(self.run_dir)

    def stop_and_check(self, timeout_s: float = 90) -> Verdict:
        """Ctrl-C the whole run (as a user would), then check the history."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout=timeout_s)
        self.out.close()
        self.ctx.destroy(linger=0)
        assert rc == 0, (self.run_dir.parent / "up.out").read_text()[-3000:]
        return check_history(self.run_dir)

    def abort(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if not self.out.closed:
            self.out.close()
