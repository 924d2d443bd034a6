"""Fault-test harness: a real `editrl up` run on 127.0.0.1, processes killed or stopped BY PID, and a checker that
reads the recorded history (every process's JSON log + the broker's LMDB) and classifies every group.

History sources
- actors: ``group_attempt`` (first send of a group) and ``group_sent`` (the broker acknowledged its commit);
- broker: the replay LMDB status table (every group ever stored and its state), ``score_requeued`` log lines;
- learner ranks: ``batch_trained`` (step, rank, group ids) and ``checkpoint_resumed`` (the step restored), in
  ``logs/learner-<rank>.jsonl``: a learner restarted by the supervisor appends to the same file, so each file is its
  rank's whole history in order. The LAST record of each (rank, step) is the model's lineage (a learner resumed from
  a checkpoint re-trains the steps after it; those records replace the old ones).

Classes
- lost: acknowledged to an actor but not in the replay, or consumed by the broker but absent from the lineage (a
  group skipped by a resume);
- duplicated: trained twice, counted over EVERY ``batch_trained`` record (not only the lineage): a second training
  of a group is allowed only as the re-training of a step after the checkpoint a resume restored, after that
  resume, with the very same groups as that step's first training (:func:`check_training`); anything else is a
  duplicate;
- unexpected: in the replay but never sent by any actor (nor injected by the test);
- recovered: stored exactly once although its delivery or scoring was disrupted (resent, requeued).

Drop counters: the broker's durable counters (LMDB) must account for every stored group — each state of the status
table has its counter (:func:`check_accounting`); each scenario then asserts the drops it expects (stale,
unscorable, evicted) with :func:`assert_drops`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb
import yaml
import zmq

from editrl.broker.store import _DBS, ReplayStore
from editrl.common import codec, wire
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
    training_errors: list[str] = field(default_factory=list)  # re-trainings that break the resume rule
    retrained: list[tuple[int, int]] = field(default_factory=list)  # (rank, step) legitimately re-trained
    resumes: list[tuple[int, int]] = field(default_factory=list)  # (rank, restored step)
    counters: dict[str, int] = field(default_factory=dict)  # the broker's durable counters at the end
    states: dict[str, int] = field(default_factory=dict)  # stored groups per state at the end
    accounting_errors: list[str] = field(default_factory=list)  # counters that do not account for every group

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


def check_training(run_dir: Path) -> tuple[list[str], list[str], list[tuple[int, int]], list[tuple[int, int]]]:
    """Every group's trainings over EVERY ``batch_trained`` record of every rank, in log order.

    A group trained a second time is allowed only when a ``checkpoint_resumed`` (restored step c) of that rank came
    before it, it is re-trained at a step s > c not re-trained since that resume, right after step s - 1 of that
    lineage, and the record of step s holds exactly the same set of group ids as the first training of step s.
    Anything else — a group trained at two steps or on two ranks, a step trained twice without a resume in between,
    a re-trained step with other groups or out of order — makes every group of that record trained before a
    duplicate. A restarted learner process (a new ``pid`` in the file)
    that trains without logging ``checkpoint_resumed`` had no checkpoint: it restored step 0.

    Returns ``(duplicated group ids, errors, retrained (rank, step), resumes (rank, restored step))``.
    """
    first: dict[str, tuple[int, int]] = {}  # group id -> (rank, step) of its first training
    duplicated: set[str] = set()
    errors: list[str] = []
    retrained: list[tuple[int, int]] = []
    resumes: list[tuple[int, int]] = []
    for path in sorted((run_dir / "logs").glob("learner-*.jsonl")):
        steps: dict[int, list[str]] = {}  # step -> its groups at its first training on this rank
        retrainable: set[int] = set()  # steps after the last restored checkpoint, not re-trained since
        last = 0  # the step the model of this rank is at
        pids: list[Any] = []  # learner processes of this rank, in order
        started = False  # the current process restored its step (checkpoint_resumed) or trained
        for e in read_jsonl(path):
            pid = e.get("pid")  # None: a line a library logged through stdlib logging (e.g. a transformers warning)
            if pid is not None and pid not in pids[-1:]:
                pids.append(pid)
                started = False
            if e["event"] == "checkpoint_resumed" or (e["event"] == "batch_trained" and not started and len(pids) > 1):
                restored = int(e["step"]) if e["event"] == "checkpoint_resumed" else 0
                started = True
                resumes.append((int(path.stem.split("-")[-1]), restored))
                if restored > last:
                    errors.append(f"{path.name}: resumed at step {restored}, beyond the last trained step {last}")
                retrainable = {s for s in steps if s > restored}
                last = restored
            if e["event"] != "batch_trained":
                continue
            started = True
            rank, step, gids = int(e["rank"]), int(e["step"]), list(e["group_ids"])
            in_order = step == last + 1
            if not in_order:
                errors.append(f"rank {rank}: step {step} trained after step {last}")
            last = step
            if step in retrainable:
                retrainable.discard(step)
                if in_order and set(gids) == set(steps[step]) and len(gids) == len(steps[step]):
                    retrained.append((rank, step))
                    continue
                errors.append(f"rank {rank}: step {step} re-trained after a resume with other groups: "
                              f"{sorted(gids)} instead of {sorted(steps[step])}")  # fmt: skip
            elif step in steps:
                errors.append(f"rank {rank}: step {step} trained again without a resume to a checkpoint before it")
            for g in gids:
                if g in first:
                    duplicated.add(g)
                    errors.append(f"group {g} trained at rank {rank} step {step}, already at rank/step {first[g]}")
                else:
                    first[g] = (rank, step)
            steps.setdefault(step, gids)
    return sorted(duplicated), errors, retrained, resumes


def _state(status: dict[str, Any]) -> str:
    """A group's state for the accounting, telling apart the groups a learner quarantined after consuming them."""
    if status["state"] == "quarantined" and status.get("quarantined_from") == "consumed":
        return "quarantined_consumed"
    return status["state"]


def check_accounting(counters: dict[str, int], states: dict[str, int]) -> list[str]:
    """The durable counters account for every stored group: one counter per state of the status table.

    ingested = pending + ready + consumed + stale + unscorable + quarantined + evicted-unconsumed (every stored group
    is in exactly one state); scored = every group that passed scoring (ready, consumed, stale, evicted from ready,
    and those a learner quarantined after consuming them); each drop counter equals the number of groups in its
    state."""
    n = Counter(states)
    expect = {
        "ingested": sum(n.values()),
        "scored": n["ready"] + n["consumed"] + n["stale"] + n["evicted"] + n["quarantined_consumed"],
        "consumed": n["consumed"],
        "dropped_stale": n["stale"],
        "dropped_unscorable": n["unscorable"],
        "quarantined": n["quarantined"] + n["quarantined_consumed"],
        "evicted_unconsumed": n["evicted"],
    }
    errors = [f"{k} = {counters.get(k, 0)}, but {v} groups by state {dict(n)}" for k, v in expect.items()
              if counters.get(k, 0) != v]  # fmt: skip
    if counters.get("evicted", 0) < counters.get("evicted_unconsumed", 0):
        errors.append(f"evicted {counters.get('evicted')} < evicted_unconsumed {counters.get('evicted_unconsumed')}")
    unknown = set(n) - {
        "pending",
        "ready",
        "consumed",
        "stale",
        "unscorable",
        "quarantined",
        "quarantined_consumed",
        "evicted",
    }
    if unknown:
        errors.append(f"unknown group states {sorted(unknown)}")
    return errors


def assert_drops(verdict: Verdict, *, stale: int | None, unscorable: int = 0, evicted: int = 0) -> None:
    """The drop counters equal what the scenario expects. ``stale=None``: staleness depends on timing in this
    scenario (said why at the call); the accounting invariant (checked in every verdict) still covers every group."""
    c = verdict.counters
    got = {"dropped_unscorable": c["dropped_unscorable"], "evicted": c["evicted"],
           "evicted_unconsumed": c["evicted_unconsumed"], "reserve_missing": c["reserve_missing"]}  # fmt: skip
    want = {"dropped_unscorable": unscorable, "evicted": evicted, "evicted_unconsumed": evicted, "reserve_missing": 0}
    if stale is not None:
        got["dropped_stale"], want["dropped_stale"] = c["dropped_stale"], stale
    assert got == want, f"drop counters {got} != expected {want} (states {verdict.states})"


@contextmanager
def _replay(run_dir: Path) -> Iterator[ReplayStore]:
    """The replay LMDB, read-only and WITHOUT its lock file: only while no broker writes it (frozen by SIGSTOP,
    killed, or the run over). Every read transaction of the broker briefly takes the lock file's reader mutex; a
    broker frozen inside that window would block a locking reader forever. With no writer running, no page this
    reader sees can be reused under it, so the lock is not needed."""
    path = run_dir / "replay.lmdb"
    store = ReplayStore.__new__(ReplayStore)  # ReplayStore() always opens with the lock
    store.path, store.capacity, store.readonly = path, 10**9, True
    store.env = lmdb.open(str(path), max_dbs=len(_DBS), readonly=True, lock=False, subdir=True)
    store.db = {name: store.env.open_db(name.encode(), create=False) for name in _DBS}
    try:
        yield store
    finally:
        store.close()


def read_store(run_dir: Path) -> dict[str, Any]:
    """What the broker has committed (see :func:`_replay` for when): counters, every group's status, leases,
    learner batch assignments."""
    with _replay(run_dir) as store:
        return {
            "counters": store.counters(),
            "status": dict(store.iter_status()),
            "leases": store.leases(),
            "batches": store.iter_batches(),
        }


def lease_of(run_dir: Path, group_ids: list[str]) -> dict[str, str]:
    """group id -> the lease it was generated under (from its stored record)."""
    with _replay(run_dir) as store:
        out = {}
        for g in group_ids:
            record = store.get_record(g)
            if record is not None:
                out[g] = codec.decode(codec.decode_record(record)).lease_id
        return out


def check_history(run_dir: Path, injected: set[str] | frozenset[str] = frozenset()) -> Verdict:
    actor_events = _events(run_dir, "actor-*.jsonl")
    attempts = Counter(e["group_id"] for e in actor_events if e["event"] == "group_attempt")
    acked = {e["group_id"] for e in actor_events if e["event"] == "group_sent"}
    snap = read_store(run_dir)
    status, batches = snap["status"], snap["batches"]
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
    v.duplicated, v.training_errors, v.retrained, v.resumes = check_training(run_dir)
    v.duplicated = sorted(set(v.duplicated) | {g for g, n in trained.items() if n > 1})
    v.unexpected = sorted(g for g in status if g not in attempts and g not in injected)
    v.recovered = sorted(
        g for g in status if (attempts[g] > 1 or g in requeued) and g not in v.lost and g not in injected
    )
    v.counters = snap["counters"]
    v.states = dict(Counter(_state(st) for st in status.values()))
    v.accounting_errors = check_accounting(v.counters, v.states)
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
        self.injected: set[str] = set()  # group ids the test sent itself (not "unexpected")

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

    def status_reply(self) -> wire.Status:
        """The broker's live status (StatusRequest over the wire): counters, weights, one row per process."""
        client = BrokerClient(self.ctx, self.status_endpoint(), "fault-test", timeout_s=2.0, security=self.security(),
                              role="tool")  # fmt: skip
        try:
            return client.request(wire.StatusRequest(new_id()), retries=3)
        finally:
            client.close()

    def status(self) -> dict[str, int]:
        """The broker's live counters."""
        return self.status_reply().counters

    def jobs_on(self, worker_id: str) -> int:
        """Score jobs the broker has in flight on ``worker_id`` (0 if it does not know that scorer)."""
        rows = self.status_reply().processes
        return sum(r.get("in_flight", 0) for r in rows if r["role"] == "scorer" and r["id"] == worker_id)

    def security(self) -> Any:
        """The run's security settings (its role secrets file): what a client of the test's own proves itself with."""
        from editrl.common.config import load_config

        return load_config(self.topo).security

    def send(self, msg: Any, role: str = "actor") -> Any:
        """Send one message to the broker as a client of its own with ``role`` (e.g. an injected group as an actor)
        and return the reply."""
        client = BrokerClient(self.ctx, self.status_endpoint(), "fault-test", timeout_s=2.0, security=self.security(),
                              role=role)  # fmt: skip
        try:
            return client.request(msg, retries=5)
        finally:
            client.close()

    def wait_state(self, pid: int, states: str, timeout_s: float = 10) -> None:
        """Until ``pid`` is in one of ``states`` (``/proc`` letters: T stopped, Z zombie; a process gone counts as
        Z)."""

        def reached() -> bool:
            try:
                state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except (FileNotFoundError, ProcessLookupError):
                state = "Z"
            return state in states

        self.wait_for(reached, timeout_s, f"pid {pid} to be in state {states}")

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
        return check_history(self.run_dir, self.injected)

    def stop_and_check(self, timeout_s: float = 90) -> Verdict:
        """Ctrl-C the whole run (as a user would), then check the history."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        rc = self.proc.wait(timeout=timeout_s)
        self.out.close()
        self.ctx.destroy(linger=0)
        assert rc == 0, (self.run_dir.parent / "up.out").read_text()[-3000:]
        return check_history(self.run_dir, self.injected)

    def abort(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if not self.out.closed:
            self.out.close()
