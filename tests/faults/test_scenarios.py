"""Fault scenarios on real processes (`editrl up` on 127.0.0.1), each killed or stopped by pid, each ending with
lost = 0 and duplicated = 0 over the recorded history (see harness.py for the classes).

Faults of one kind share a run where one does not mask the other (scenarios share a topology: every `editrl up`
costs ~7 s of start-up on 2 cores): a killed scorer then a stuck one; a stopped learner then a killed one; a full LMDB
map then a full disk. A shared run is a module fixture that injects the faults in order and records what each test
then checks; each test still asserts its own events and the clean history of the whole run."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from editrl.common import wire

from .harness import FaultRun, Verdict

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
    assert not verdict.duplicated, f"duplicated: {verdict.duplicated[:5]} ({verdict.summary()})"
    assert not verdict.unexpected, f"unexpected: {verdict.unexpected[:5]} ({verdict.summary()})"
    assert verdict.trained >= steps * 4


def _hold_a_job(run: FaultRun, name: str) -> None:
    """SIGSTOP ``name`` (a scorer) and wait until the broker has a job in flight on it."""
    run.kill(name, signal.SIGSTOP)
    run.wait_for(lambda: run.status()["queue/jobs_inflight"] >= 1, 30, f"a job in flight on stopped {name}")


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
            [sys.executable, str(Path(__file__).with_name("stuck_scorer.py")), run.status_endpoint(), "scorer-stuck"]
        )
        run.wait_for(lambda: run.events("broker-*", "scorer_quarantined"), 60, "scorer-stuck to be quarantined")
        assert run.steps() < SCORER_STEPS, "the run ended before the stuck scorer was quarantined"
        yield SharedRun(run, run.finish())
    finally:
        if stuck is not None:
            stuck.kill()
            stuck.wait()
        run.abort()


def test_kill_scorer_mid_job(scorer_faults):
    run, verdict = scorer_faults.run, scorer_faults.verdict
    _assert_clean(verdict, steps=SCORER_STEPS)
    assert [e for e in run.events("broker-*", "score_requeued") if e.get("reason") != "unscored"], (
        "the dead scorer's job was never requeued"
    )
    assert len(run.events("scorer-0", "scorer_started")) == 2  # `up` restarted it
    assert verdict.recovered


def test_scorer_that_heartbeats_but_never_answers_is_quarantined(scorer_faults):
    run = scorer_faults.run
    _assert_clean(scorer_faults.verdict, steps=SCORER_STEPS)
    quarantined = run.events("broker-*", "scorer_quarantined")
    assert quarantined[0]["worker_id"] == "scorer-stuck" and quarantined[0]["misses"] >= wire.QUARANTINE_AFTER_MISSES
    assert [e for e in run.events("broker-*", "score_requeued") if e.get("reason") == "deadline"]


def test_stopped_scorer_past_liveness_then_resumed_sends_a_late_duplicate(fault_run):
    steps = 20  # long enough to outlive the topology's scorer liveness window (timers.scorer_liveness_s)
    run = fault_run(max_steps=steps, scorers={"count": 2})
    run.wait_steps(3)
    _hold_a_job(run, "scorer-0")
    run.wait_for(lambda: run.events("broker-*", "scorer_dead"), 30, "the broker to declare scorer-0 dead")
    assert run.steps() < steps - 3, "the run ended before the stopped scorer could come back"
    run.kill("scorer-0", signal.SIGCONT)  # wakes up and answers its stale job
    verdict = run.finish()
    _assert_clean(verdict, steps=steps)
    # its late result either completed the requeued group first or was recognised as a duplicate
    assert run.events("broker-*", "score_result_duplicate") or verdict.recovered


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
    _assert_clean(run.finish(), steps=steps)


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


def test_kill_learner_mid_step_resumes_exactly(learner_faults):
    _assert_clean(learner_faults.verdict)
    resumed = learner_faults.run.events("learner-*", "checkpoint_resumed")
    assert resumed and resumed[0]["step"] in (3, 6)  # killed at step 5 or 6, checkpoints every 3


def test_kill_broker_with_work_in_flight(fault_run):
    run = fault_run(actors={"count": 2})
    run.wait_steps(4)
    run.kill("broker-0", signal.SIGKILL)  # `up` restarts it; it recovers everything from LMDB
    verdict = run.finish()
    _assert_clean(verdict)
    starts = run.events("broker-*", "broker_started")
    assert len(starts) == 2


# -- storage: a 64 KiB initial LMDB map that must grow, then a full disk (one run) ----------------------------------


@pytest.fixture(scope="module")
def storage_faults(tmp_path_factory, tiny_model_dir, quickstart_tasks):
    import resource

    run = _start(tmp_path_factory.mktemp("storage_faults"), tiny_model_dir, quickstart_tasks,
                 actors={"count": 1}, broker={"map_size_bytes": 64 * 1024})  # fmt: skip
    try:
        run.wait_steps(2)
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


def test_lmdb_map_full_grows_and_loses_nothing(storage_faults):
    _assert_clean(storage_faults.verdict)
    assert storage_faults.run.events("broker-*", "replay_map_resized")


def test_disk_full_stops_acknowledging_then_recovers(storage_faults):
    _assert_clean(storage_faults.verdict)
    assert storage_faults.run.events("actor-*", "group_not_acknowledged")
