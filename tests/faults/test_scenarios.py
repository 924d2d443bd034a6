"""Fault scenarios on real processes (`editrl up` on 127.0.0.1), each killed or stopped by pid, each ending with
lost = 0 and duplicated = 0 over the recorded history (see harness.py for the classes; duplicates are counted over
every `batch_trained` record), with the broker's counters accounting for every stored group and each drop counter
(stale, unscorable, evicted) equal to what the scenario expects.

Faults of one kind share a run where one does not mask the other (scenarios share a topology: every `editrl up`
costs ~7 s of start-up on 2 cores): a killed scorer then a stuck one; a stopped learner then a killed one; a full LMDB
map then a full disk. A shared run is a module fixture that injects the faults in order and records what each test
then checks; each test still asserts its own events and the clean history of the whole run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from editrl.common import wire
from editrl.common.images import to_png
from editrl.common.net import new_id

from .harness import FaultRun, Verdict, assert_drops, lease_of, read_store

pytestmark = pytest.mark.faults

STEPS = 12


def _start(tmp_path, model_dir, tasks, max_steps: int = STEPS, **sections) -> FaultRun:
    sections.setdefault("learner", {})
    sections["learner"] = {"checkpoint_every": 3, **sections["learner"]}
    return FaultRun(tmp_path, model_dir, tasks, max_steps, **sections).start()


@pytest.fixture
def fault_run(tmp_path, tiny_model_dir, quickstart_tasks):
    runs: list[FaultRun] = []

    def make(max_steps: int = STEPS, **sections) -> FaultRun:
        runs.append(_start(tmp_path, tiny_model_dir, quickstart_tasks, max_steps, **sections))
        return runs[-1]

    yield make
    for run in runs:
        run.abort()


@dataclass
class SharedRun:
    run: FaultRun
    verdict: Verdict
    seen: dict[str, Any] = field(default_factory=dict)  # what the fixture observed while the faults were on


def _assert_clean(verdict, steps: int = STEPS) -> None:
    assert not verdict.lost, f"lost: {verdict.lost[:5]} ({verdict.summary()})"
    assert not verdict.duplicated, f"duplicated: {verdict.duplicated[:5]} {verdict.training_errors[:5]}"
    assert not verdict.training_errors, verdict.training_errors[:5]
    assert not verdict.unexpected, f"unexpected: {verdict.unexpected[:5]} ({verdict.summary()})"
    assert not verdict.accounting_errors, verdict.accounting_errors
    assert verdict.trained >= steps * 4


def _hold_a_job(run: FaultRun, name: str) -> None:
    """SIGSTOP ``name`` (a scorer) and wait until the broker has a job in flight on it (dispatched to its socket)."""
    run.kill(name, signal.SIGSTOP)
    run.wait_for(lambda: run.jobs_on(name) >= 1, 30, f"a job in flight on stopped {name}")


def _lease(run: FaultRun) -> wire.Lease | None:
    reply = run.send(wire.LeaseRequest("fault-test", new_id()))
    return reply if isinstance(reply, wire.Lease) else None


def _inject_unscorable_group(run: FaultRun) -> str:
    """Store one group the metric judge cannot score (its instruction names no measurable target), as an actor of the
    test's own: the broker requeues it once, then drops it (``dropped_unscorable`` + 1). Returns its group id."""
    png = to_png(Image.new("RGB", (16, 16), (90, 120, 150)))
    gid = new_id()
    lease = run.wait_for(lambda: _lease(run), 60, "a lease for the injected group")  # a group claims a lease of ours
    group = wire.RolloutGroup(
        request_id=new_id(), group_id=gid, lease_id=lease.lease_id, task_id=lease.task_id, actor_id="fault-test",
        policy_version=0, instruction="Make it look nicer.", task_type="other", source_png=png, edit_pngs=[png, png],
        family="flow", traj={"latents": np.zeros((2, 3), np.float32)}, log_probs=np.zeros((2, 1), np.float32),
        cond={}, params={},
    )  # fmt: skip
    ack = run.send(group)
    assert isinstance(ack, wire.Ack) and ack.ok, ack
    run.injected.add(gid)
    return gid


# -- scorers: kill -9 one holding a job, then a scorer that heartbeats but never answers (one run) -----------------

SCORER_STEPS = 30  # the stuck scorer delays the groups it holds by a deadline each: room before the run ends


@pytest.fixture(scope="module")
def scorer_faults(tmp_path_factory, tiny_model_dir, quickstart_tasks):
    run = _start(tmp_path_factory.mktemp("scorer_faults"), tiny_model_dir, quickstart_tasks, SCORER_STEPS,
                 scorers={"count": 1}, broker={"score_deadline_s": 2.0})  # fmt: skip
    stuck = None
    try:
        run.wait_steps(3)
        _hold_a_job(run, "scorer-0")
        run.kill("scorer-0", signal.SIGKILL)  # dies holding the job: the broker requeues it; `up` restarts the scorer
        run.wait_for(lambda: run.events("broker-*", "score_requeued"), 30, "the dead scorer's job to be requeued")
        run.wait_steps(run.steps() + 2)  # the restarted scorer scores again
        stuck = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("stuck_scorer.py")), str(run.topo), "scorer-stuck"]
        )
        run.wait_for(lambda: run.events("broker-*", "scorer_quarantined"), 60, "scorer-stuck to be quarantined")
        assert run.steps() < SCORER_STEPS, "the run ended before the stuck scorer was quarantined"
        yield SharedRun(run, run.finish())
    finally:
        if stuck is not None:
            stuck.kill()
            stuck.wait()
        run.abort()


def _assert_scorer_faults_drops(verdict: Verdict) -> None:
    # Nothing is unscorable (every quickstart instruction names a measurable target) or evicted (capacity 10,000).
    # Staleness depends on timing here: a requeued group (dead scorer, missed deadline) is scored after younger groups
    # the learner may already have taken, and can fall more than η versions behind; the accounting invariant in the
    # verdict covers it.
    assert_drops(verdict, stale=None, unscorable=0, evicted=0)


def test_kill_scorer_mid_job(scorer_faults):
    run, verdict = scorer_faults.run, scorer_faults.verdict
    _assert_clean(verdict, steps=SCORER_STEPS)
    _assert_scorer_faults_drops(verdict)
    assert [e for e in run.events("broker-*", "score_requeued") if e.get("reason") != "unscored"], (
        "the dead scorer's job was never requeued"
    )
    assert len(run.events("scorer-0", "scorer_started")) == 2  # `up` restarted it
    assert verdict.recovered


def test_scorer_that_heartbeats_but_never_answers_is_quarantined(scorer_faults):
    run = scorer_faults.run
    _assert_clean(scorer_faults.verdict, steps=SCORER_STEPS)
    _assert_scorer_faults_drops(scorer_faults.verdict)
    quarantined = run.events("broker-*", "scorer_quarantined")
    assert quarantined[0]["worker_id"] == "scorer-stuck" and quarantined[0]["misses"] >= wire.QUARANTINE_AFTER_MISSES
    assert [e for e in run.events("broker-*", "score_requeued") if e.get("reason") == "deadline"]


def test_stopped_scorer_past_liveness_then_resumed_sends_a_late_duplicate(fault_run):
    steps = 20  # long enough to outlive the topology's scorer liveness window (timers.scorer_liveness_s)
    run = fault_run(max_steps=steps, scorers={"count": 2})
    run.wait_steps(3)
    _hold_a_job(run, "scorer-0")
    dead = run.wait_for(
        lambda: [e for e in run.events("broker-*", "scorer_dead") if e["worker_id"] == "scorer-0"], 30,
        "the broker to declare scorer-0 dead",
    )  # fmt: skip
    assert dead[0]["jobs"] >= 1, dead  # it died holding a job

    def requeues() -> list[dict[str, Any]]:  # logged just after scorer_dead, one per job it held
        found = [e for e in run.events("broker-*", "score_requeued") if e.get("worker_id") == "scorer-0"]
        return found if len(found) >= dead[0]["jobs"] else []

    requeued = run.wait_for(requeues, 10, "scorer-0's jobs to be requeued")
    assert all(e["reason"] == "worker_dead" for e in requeued), requeued
    held = [e["group_id"] for e in requeued]

    def scored_elsewhere() -> bool:  # the live scorer scored every requeued group: scorer-0's answer can only be late
        done = {e["group_id"] for e in run.events("broker-*", "group_scored")}
        return all(g in done for g in held)

    run.wait_for(scored_elsewhere, 30, "scorer-1 to score the requeued groups")
    assert run.steps() < steps - 3, "the run ended before the stopped scorer could come back"
    run.kill("scorer-0", signal.SIGCONT)  # wakes up and answers its stale job
    late = run.wait_for(
        lambda: (s := run.status()).get("duplicate_results", 0) >= 1 and s, 30, "the late result to arrive"
    )  # duplicate_results is a gauge of the live broker: read before the run ends
    verdict = run.finish()
    _assert_clean(verdict, steps=steps)
    # the late result arrived and was ignored: counted as a duplicate, and each held group was scored exactly once,
    # by scorer-1 (the durable `scored` counter equals the groups that passed scoring: checked by the accounting)
    assert late["duplicate_results"] >= 1
    duplicates = {e["group_id"] for e in run.events("broker-*", "score_result_duplicate")}
    assert set(held) <= duplicates, (held, duplicates)
    scorings = Counter(e["group_id"] for e in run.events("broker-*", "group_scored"))
    status = read_store(run.run_dir)["status"]
    for g in held:
        assert scorings[g] == 1, (g, scorings[g])
        assert status[g]["scores"]["worker_id"] == "scorer-1", status[g]
    # Staleness depends on timing: two scorers score out of insertion order (and the held group waited ~2 s), so a
    # group can be taken after younger ones and fall behind η; the accounting invariant covers every group.
    assert_drops(verdict, stale=None, unscorable=0, evicted=0)


def test_kill_actor_mid_group(fault_run):
    steps = STEPS  # the run cannot end without the actor: its restart and the expired lease always come first
    run = fault_run(max_steps=steps, actors={"count": 1}, broker={"lease_timeout_s": 2.0})
    run.wait_steps(3)
    for _ in range(20):  # stop it while it holds a lease (sampling or awaiting its ack), not while told to wait
        run.kill("actor-0", signal.SIGSTOP)
        time.sleep(0.3)
        if run.status()["leases"] >= 1:
            break
        run.kill("actor-0", signal.SIGCONT)
        time.sleep(0.2)
    assert run.status()["leases"] >= 1
    run.kill("actor-0", signal.SIGKILL)  # dies holding it; the lease expires and its task is re-issued
    run.wait_for(lambda: run.events("broker-*", "lease_expired"), 30, "the dead actor's lease to expire")
    verdict = run.finish()
    _assert_clean(verdict, steps=steps)
    # One actor and one scorer: groups are stored, scored and taken in the order of their leases, and admission
    # control grants a lease at learner step v only while ingested + leases < (η + 1 + v)·B, so every group is taken
    # by step v + η + 1, when the learner's version is v + η (publish_every 1): none can be stale. The dead actor's
    # expired lease only frees its slot for the re-issued task. Nothing unscorable, nothing evicted.
    assert_drops(verdict, stale=0, unscorable=0, evicted=0)


# -- the learner: SIGSTOP (back-pressure), SIGCONT, then kill -9 mid-step (one run, two actors) ---------------------


@pytest.fixture(scope="module")
def learner_faults(tmp_path_factory, tiny_model_dir, quickstart_tasks):
    run = _start(tmp_path_factory.mktemp("learner_faults"), tiny_model_dir, quickstart_tasks, actors={"count": 2})
    try:
        run.wait_steps(3)
        run.kill("learner-0", signal.SIGSTOP)
        # saturated: every lease granted before the stop came back as a group, and actors are being told to wait
        waits = run.status()["lease_waits"]
        run.wait_for(lambda: (s := run.status())["leases"] == 0 and s["lease_waits"] > waits + 4, 30, "actors to wait")
        first = run.status()
        time.sleep(3)  # actors ask for a lease every Wait (0.2 s): ~15 refusals each
        second = run.status()
        run.kill("learner-0", signal.SIGCONT)
        run.wait_steps(5)
        run.kill("learner-0", signal.SIGKILL)  # the torchrun worker; `up` restarts torchrun, which resumes from DCP
        yield SharedRun(run, run.finish(), {"first": first, "second": second})
    finally:
        run.abort()


def test_stopped_learner_makes_actors_wait_with_bounded_work(learner_faults):
    first, second = learner_faults.seen["first"], learner_faults.seen["second"]
    # admission control: nothing new is generated while the learner is stopped; actors are told to wait
    assert second["ingested"] == first["ingested"]
    budget = (1 + 1 + second["learner_step"]) * 4
    assert second["ingested"] + second["leases"] <= budget
    assert second["lease_waits"] > first["lease_waits"]
    _assert_clean(learner_faults.verdict)
    _assert_learner_faults_drops(learner_faults.verdict)


def _assert_learner_faults_drops(verdict: Verdict) -> None:
    # Staleness depends on where the kill fell: a learner resumed from step 3 fast-forwards its version to the
    # broker's (versions published after the checkpoint stay taken) and then runs ahead of its step, so groups
    # generated before may be more than η versions old when sampled; two actors also store out of lease order. The
    # accounting invariant in the verdict covers every group. Nothing unscorable, nothing evicted.
    assert_drops(verdict, stale=None, unscorable=0, evicted=0)


def test_kill_learner_mid_step_resumes_exactly(learner_faults):
    verdict = learner_faults.verdict
    _assert_clean(verdict)
    _assert_learner_faults_drops(verdict)
    resumed = learner_faults.run.events("learner-*", "checkpoint_resumed")
    assert resumed and resumed[0]["step"] in (3, 6)  # killed at step 5 or 6, checkpoints every 3
    assert verdict.resumes == [(0, resumed[0]["step"])]
    # every step trained after the restored checkpoint and before the kill was re-trained with the very same groups
    # (check_training); from step 3 that is at least steps 4 and 5
    assert all(step > resumed[0]["step"] for _, step in verdict.retrained)
    if resumed[0]["step"] == 3:
        assert {(0, 4), (0, 5)} <= set(verdict.retrained), verdict.retrained


def _freeze_with_work_in_flight(run: FaultRun, timeout_s: float = 30) -> tuple[int, dict[str, Any]]:
    """SIGSTOP the broker at a moment its committed state holds an outstanding lease (an actor generating) and a
    pending group (acknowledged, not yet scored); returns its pid, still stopped, and that state (read from LMDB while
    it is frozen: exactly what a kill -9 now leaves behind). Otherwise SIGCONT and look again a moment later."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid = run.kill("broker-0", signal.SIGSTOP)
        run.wait_state(pid, "T")
        state = read_store(run.run_dir)
        if state["leases"] and any(st["state"] == "pending" for st in state["status"].values()):
            return pid, state
        os.kill(pid, signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError(f"no moment with a lease and a pending group in {timeout_s} s")


def test_kill_broker_with_work_in_flight(fault_run):
    run = fault_run(actors={"count": 2})
    run.wait_steps(4)
    pid, at_kill = _freeze_with_work_in_flight(run)
    os.kill(pid, signal.SIGKILL)  # `up` restarts it; it recovers everything from LMDB
    assert run.steps() < STEPS, "the run ended before the kill"
    leases = at_kill["leases"]
    waiting = sorted(g for g, st in at_kill["status"].items() if st["state"] in ("pending", "ready"))
    verdict = run.finish()
    _assert_clean(verdict)
    starts = run.events("broker-*", "broker_started")
    assert len(starts) == 2
    pending = [g for g in waiting if at_kill["status"][g]["state"] == "pending"]
    assert (starts[1]["leases"], starts[1]["pending"]) == (len(leases), len(pending))  # recovered from LMDB
    # recovered: every acknowledged group waiting at the kill (unscored or scored, not yet taken) was trained (or
    # counted stale), and every lease outstanding at the kill delivered its group after the restart
    end = read_store(run.run_dir)["status"]
    trained = {g for e in run.events("learner-*", "batch_trained") for g in e["group_ids"]}
    unaccounted = [g for g in waiting if g not in trained and end[g]["state"] != "stale"]
    assert not unaccounted, f"waiting at the kill, then neither trained nor counted: {unaccounted}"
    delivered = set(lease_of(run.run_dir, list(end)).values())
    assert set(leases) <= delivered, f"leases of the kill without a group: {sorted(set(leases) - delivered)}"
    # Staleness depends on timing: two actors store groups out of their lease order, so a group can be taken after
    # younger ones and fall behind η; the accounting invariant covers every group. Nothing unscorable or evicted.
    assert_drops(verdict, stale=None, unscorable=0, evicted=0)


# -- storage: a 64 KiB initial LMDB map that must grow, then a full disk (one run) ----------------------------------


@pytest.fixture(scope="module")
def storage_faults(tmp_path_factory, tiny_model_dir, quickstart_tasks):
    import resource

    run = _start(tmp_path_factory.mktemp("storage_faults"), tiny_model_dir, quickstart_tasks,
                 actors={"count": 1}, broker={"map_size_bytes": 64 * 1024})  # fmt: skip
    try:
        run.wait_steps(2)
        unscorable = _inject_unscorable_group(run)  # a known drop: requeued once, then dropped (counted)
        run.wait_for(
            lambda: [e for e in run.events("broker-*", "group_dropped_unscorable") if e["group_id"] == unscorable],
            30, "the injected group to be dropped as unscorable",
        )  # fmt: skip
        pid = run.pid("broker-0")
        data = run.run_dir / "replay.lmdb" / "data.mdb"
        size = data.stat().st_size
        hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)[1]
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, hard))  # the disk is "full" at the current size
        run.wait_for(lambda: run.events("broker-*", "storage_write_failed"), 60, "a failed commit")
        failures = run.status()["storage_failures"]
        # still refusing (commits that need to grow the file fail), and clients keep retrying
        run.wait_for(lambda: run.status()["storage_failures"] > failures, 30, "further refused commits")
        resource.prlimit(pid, resource.RLIMIT_FSIZE, (hard, hard))  # space returns
        run.wait_for(lambda: run.events("broker-*", "storage_recovered"), 60, "the broker to recover")
        yield SharedRun(run, run.finish())
    finally:
        run.abort()


def _assert_storage_faults_drops(shared: SharedRun) -> None:
    # One actor and one scorer: groups are taken in the order of their leases and admission control keeps each
    # within η versions (see test_kill_actor_mid_group); refused commits are resent in the same order. Exactly the
    # injected group is unscorable; a 64 KiB initial map grows, it never evicts (capacity 10,000).
    assert_drops(shared.verdict, stale=0, unscorable=1, evicted=0)
    status = read_store(shared.run.run_dir)["status"]
    assert {g for g, st in status.items() if st["state"] == "unscorable"} == shared.run.injected


def test_lmdb_map_full_grows_and_loses_nothing(storage_faults):
    _assert_clean(storage_faults.verdict)
    _assert_storage_faults_drops(storage_faults)
    assert storage_faults.run.events("broker-*", "replay_map_resized")


def test_disk_full_stops_acknowledging_then_recovers(storage_faults):
    _assert_clean(storage_faults.verdict)
    _assert_storage_faults_drops(storage_faults)
    assert storage_faults.run.events("actor-*", "group_not_acknowledged")
