"""Fault scenarios on real processes (`editrl up` on 127.0.0.1), each killed or stopped by pid, each ending with
lost = 0 and duplicated = 0 over the recorded history (see harness.py for the classes)."""

from __future__ import annotations

import signal
import time

import pytest

from editrl.common import wire

from .harness import FaultRun

pytestmark = pytest.mark.faults

STEPS = 12


@pytest.fixture
def fault_run(tmp_path, tiny_model_dir, quickstart_tasks):
    runs: list[FaultRun] = []

    def make(max_steps: int = STEPS, **sections) -> FaultRun:
        sections.setdefault("learner", {})
        sections["learner"] = {"checkpoint_every": 3, **sections["learner"]}
        run = FaultRun(tmp_path, tiny_model_dir, quickstart_tasks, max_steps, **sections)
        runs.append(run)
        return run.start()

    yield make
    for run in runs:
        run.abort()


def _assert_clean(verdict, steps: int = STEPS) -> None:
    assert not verdict.lost, f"lost: {verdict.lost[:5]} ({verdict.summary()})"
    assert not verdict.duplicated, f"duplicated: {verdict.duplicated[:5]} ({verdict.summary()})"
    assert not verdict.unexpected, f"unexpected: {verdict.unexpected[:5]} ({verdict.summary()})"
    assert verdict.trained >= steps * 4


def _hold_a_job(run: FaultRun, name: str) -> None:
    """SIGSTOP ``name`` (a scorer) and wait until the broker has a job in flight on it."""
    run.kill(name, signal.SIGSTOP)
    run.wait_for(lambda: run.status()["queue/jobs_inflight"] >= 1, 30, f"a job in flight on stopped {name}")


def test_kill_scorer_mid_job(fault_run):
    run = fault_run(scorers={"count": 1})
    run.wait_steps(3)
    _hold_a_job(run, "scorer-0")
    run.kill("scorer-0", signal.SIGKILL)  # dies holding the job: the broker requeues it; `up` restarts the scorer
    verdict = run.finish()
    _assert_clean(verdict)
    assert run.events("broker-*", "score_requeued"), "the dead scorer's job was never requeued"
    assert verdict.recovered


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


def test_scorer_that_heartbeats_but_never_answers_is_quarantined(fault_run, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    steps = 25
    run = fault_run(max_steps=steps, scorers={"count": 1}, broker={"score_deadline_s": 1.0})
    run.wait_steps(1)
    stuck = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("stuck_scorer.py")), run.status_endpoint(), "scorer-stuck"]
    )
    try:
        run.wait_for(lambda: run.events("broker-*", "scorer_quarantined"), 60, "scorer-stuck to be quarantined")
        assert run.steps() < steps, "the run ended before the stuck scorer was quarantined"
        verdict = run.finish()
    finally:
        stuck.kill()
        stuck.wait()
    _assert_clean(verdict, steps=steps)
    assert run.events("broker-*", "scorer_quarantined")[0]["misses"] >= wire.QUARANTINE_AFTER_MISSES
    assert [e for e in run.events("broker-*", "score_requeued") if e.get("reason") == "deadline"]


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


def test_kill_learner_mid_step_resumes_exactly(fault_run):
    run = fault_run(max_steps=STEPS)
    run.wait_steps(5)
    run.kill("learner-0", signal.SIGKILL)  # the torchrun worker; `up` restarts torchrun, which resumes from DCP
    verdict = run.finish()
    _assert_clean(verdict)
    resumed = run.events("learner-*", "checkpoint_resumed")
    assert resumed and resumed[0]["step"] in (3, 6)


def test_kill_broker_with_work_in_flight(fault_run):
    run = fault_run(actors={"count": 2})
    run.wait_steps(4)
    run.kill("broker-0", signal.SIGKILL)  # `up` restarts it; it recovers everything from LMDB
    verdict = run.finish()
    _assert_clean(verdict)
    starts = run.events("broker-*", "broker_started")
    assert len(starts) == 2


def test_stopped_learner_makes_actors_wait_with_bounded_work(fault_run):
    run = fault_run(actors={"count": 2})
    run.wait_steps(3)
    run.kill("learner-0", signal.SIGSTOP)
    # saturated: every lease granted before the stop came back as a group, and actors are being told to wait
    waits = run.status()["lease_waits"]
    run.wait_for(lambda: (s := run.status())["leases"] == 0 and s["lease_waits"] > waits + 4, 30, "actors to wait")
    first = run.status()
    time.sleep(3)  # actors ask for a lease every Wait (0.2 s): ~15 refusals each
    second = run.status()
    # admission control: nothing new is generated while the learner is stopped; actors are told to wait
    assert second["ingested"] == first["ingested"]
    budget = (1 + 1 + second["learner_step"]) * 4
    assert second["ingested"] + second["leases"] <= budget
    assert second["lease_waits"] > first["lease_waits"]
    run.kill("learner-0", signal.SIGCONT)
    _assert_clean(run.finish())


def test_lmdb_map_full_grows_and_loses_nothing(fault_run):
    run = fault_run(broker={"map_size_bytes": 64 * 1024})
    verdict = run.finish()
    _assert_clean(verdict)
    assert run.events("broker-*", "replay_map_resized")


def test_disk_full_stops_acknowledging_then_recovers(fault_run):
    import resource

    run = fault_run(actors={"count": 1})
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
    verdict = run.finish()
    _assert_clean(verdict)
    assert run.events("actor-*", "group_not_acknowledged")
