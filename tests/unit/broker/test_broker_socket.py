"""The broker over a real ROUTER socket on 127.0.0.1 with real LMDB, driven by DEALER clients speaking the wire
protocol (actor, scorer and learner stand-ins: the real processes are exercised in tests/integration)."""

import contextlib
import dataclasses
import threading
import time

import numpy as np
import pytest
import structlog
import zmq
from PIL import Image

from editrl.broker.admission import GroupRules
from editrl.broker.server import Broker
from editrl.broker.store import ReplayStore
from editrl.common import codec, wire
from editrl.common.images import to_png
from editrl.common.net import harden
from editrl.common.tasks import Task

TASKS = [Task(f"t{i}", "make it red", (f"/nonexistent/{i}.png",), "color_alter") for i in range(3)]


PNG = to_png(Image.new("RGB", (16, 16), (200, 30, 30)))


@contextlib.contextmanager
def _running_broker(tmp_path, **kwargs):
    ctx = zmq.Context()
    store = ReplayStore(tmp_path / "replay", capacity=100)
    b = Broker("tcp://127.0.0.1:0", store, TASKS, groups_per_step=2, max_staleness=1, log=structlog.get_logger(),
               ctx=ctx, **kwargs)  # fmt: skip
    stop = threading.Event()
    thread = threading.Thread(target=b.run, args=(stop.is_set,), daemon=True)
    thread.start()
    try:
        yield b, ctx
    finally:
        stop.set()
        thread.join(5)
        b.close()
        store.close()
        ctx.destroy(linger=0)


@pytest.fixture
def broker(tmp_path):
    with _running_broker(tmp_path) as running:
        yield running


def _dealer(ctx, endpoint, name):
    s = harden(ctx.socket(zmq.DEALER))
    s.setsockopt(zmq.ROUTING_ID, name.encode())
    s.connect(endpoint)
    return s


def _ask(sock, msg, timeout_ms=5000):
    sock.send_multipart(codec.encode(msg))
    assert sock.poll(timeout_ms), f"no reply to {type(msg).__name__}"
    return codec.decode(sock.recv_multipart())


def _group(lease, gid, version=0, actor_id="a0"):
    return wire.RolloutGroup(
        request_id=f"req-{gid}", group_id=gid, lease_id=lease.lease_id, task_id=lease.task_id, actor_id=actor_id,
        policy_version=version, instruction=lease.instruction, task_type=lease.task_type, source_png=PNG,
        edit_pngs=[PNG, PNG], family="flow", traj={"latents": np.zeros((2, 3, 4, 2), np.float32)},
        log_probs=np.zeros((2, 2), np.float32), cond={"c": np.ones(3, np.float32)}, params={"noise_level": 0.7},
    )  # fmt: skip


def test_lease_ingest_score_sample_round_trip(broker):
    b, ctx = broker
    actor = _dealer(ctx, b.endpoint, "actor")
    lease = _ask(actor, wire.LeaseRequest("a0", "l1"))
    assert isinstance(lease, wire.Lease) and lease.task_id == "t0"
    ack = _ask(actor, _group(lease, "g1"))
    assert ack.ok and ack.detail == "stored"
    assert _ask(actor, _group(lease, "g1")).detail == "duplicate"  # resend after a lost ack: stored once

    scorer = _dealer(ctx, b.endpoint, "scorer")
    job = _ask(scorer, wire.ScorerReady("s0", "metric", 1))
    assert isinstance(job, wire.ScoreJob) and job.group_id == "g1" and job.edit_pngs == [PNG, PNG]
    result = wire.ScoreResult(job.job_id, "g1", "s0", [True, True], [2.0, 6.0], [{}, {}], ["", ""])
    scorer.send_multipart(codec.encode(result))
    scorer.send_multipart(codec.encode(result))  # a late duplicate result is ignored

    learner = _dealer(ctx, b.endpoint, "learner")
    deadline = time.monotonic() + 5
    while True:
        reply = _ask(learner, wire.SampleRequest("s1", 0, 1, 0, 4, 0))
        if isinstance(reply, wire.Batch) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert isinstance(reply, wire.Batch) and reply.rewards == [[2.0, 6.0]]
    assert codec.decode(codec.decode_record(reply.groups[0])).group_id == "g1"
    assert isinstance(_ask(learner, wire.SampleRequest("s2", 0, 2, 0, 4, 0)), wire.Wait)  # consumed exactly once
    counters = _ask(learner, wire.StatusRequest("st")).counters
    assert counters["ingested"] == 1 and counters["duplicate_groups"] == 1 and counters["consumed"] == 1
    assert counters["duplicate_results"] == 1


def test_gold_sub_scores_reach_the_learner_with_the_batch_and_are_stored(broker):
    """The held-out gold score a scorer put in an edit's sub-scores comes back to the learner per edit (None where
    the gold scorer gave none); a batch without any gold sends no gold field at all."""
    b, ctx = broker
    actor = _dealer(ctx, b.endpoint, "actor")
    scorer = _dealer(ctx, b.endpoint, "scorer")
    learner = _dealer(ctx, b.endpoint, "learner")
    for gid, subs in (("g1", [{"SC": 1.0, "gold": 3.5}, {"SC": 2.0}]), ("g2", [{"SC": 1.0}, {"SC": 2.0}])):
        lease = _ask(actor, wire.LeaseRequest("a0", f"l-{gid}"))
        assert _ask(actor, _group(lease, gid)).ok
        job = _ask(scorer, wire.ScorerReady("s0", "metric", 1))
        result = wire.ScoreResult(job.job_id, gid, "s0", [True, True], [2.0, 6.0], subs, ["", ""])
        scorer.send_multipart(codec.encode(result))
        deadline = time.monotonic() + 5
        while True:
            reply = _ask(learner, wire.SampleRequest(f"s-{gid}", 0, int(gid[1]), 0, 1, 0))
            if isinstance(reply, wire.Batch) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert isinstance(reply, wire.Batch) and reply.rewards == [[2.0, 6.0]]
        assert reply.gold == ([[3.5, None]] if gid == "g1" else [])
    assert b.store.get_status("g1")["scores"]["sub_scores"][0]["gold"] == 3.5


def test_admission_control_and_weight_announcement(broker):
    b, ctx = broker
    actor = _dealer(ctx, b.endpoint, "actor")
    # (η + 1)·B = 4 leases may be outstanding before the learner consumes anything
    leases = [_ask(actor, wire.LeaseRequest("a0", f"l{i}")) for i in range(4)]
    assert all(isinstance(x, wire.Lease) for x in leases)
    wait = _ask(actor, wire.LeaseRequest("a0", "l5"))
    assert isinstance(wait, wire.Wait) and wait.reason == "admission"
    learner = _dealer(ctx, b.endpoint, "learner")
    info = wire.WeightsInfo(version=1, uri="/tmp/w/v000001", sha256="ab", kind="lora")
    assert _ask(learner, wire.PublishWeights("p1", 1, wire.weights_dict(info))).ok
    assert _ask(actor, wire.LeaseRequest("a0", "l6")).weights["version"] == 1


def test_malformed_frames_are_counted_and_broker_keeps_serving(broker):
    b, ctx = broker
    bad = _dealer(ctx, b.endpoint, "fuzzer")
    rng = np.random.default_rng(0)
    for _ in range(300):
        bad.send_multipart([rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 4)))])
    actor = _dealer(ctx, b.endpoint, "actor")
    assert isinstance(_ask(actor, wire.LeaseRequest("a0", "ok")), wire.Lease)
    counters = _ask(actor, wire.StatusRequest("st")).counters
    assert sum(v for k, v in counters.items() if k.startswith("rejected/")) >= 290


def test_dead_scorer_job_is_requeued_to_another(broker):
    b, ctx = broker
    b.scorers.liveness_s = 0.5
    actor = _dealer(ctx, b.endpoint, "actor")
    lease = _ask(actor, wire.LeaseRequest("a0", "l1"))
    _ask(actor, _group(lease, "g1"))
    dead = _dealer(ctx, b.endpoint, "dead")
    first = _ask(dead, wire.ScorerReady("s-dead", "metric", 1))
    dead.close(linger=0)  # dies mid-job: no result, no heartbeats
    alive = _dealer(ctx, b.endpoint, "alive")
    alive.send_multipart(codec.encode(wire.ScorerReady("s-alive", "metric", 1)))
    deadline = time.monotonic() + 5
    job = None
    while time.monotonic() < deadline and job is None:
        alive.send_multipart(codec.encode(wire.Heartbeat("s-alive")))
        if alive.poll(200):
            job = codec.decode(alive.recv_multipart())
    assert job is not None and job.group_id == "g1" and job.job_id != first.job_id


def test_resent_lease_request_gets_the_same_lease(broker):
    b, ctx = broker
    actor = _dealer(ctx, b.endpoint, "actor")
    first = _ask(actor, wire.LeaseRequest("a0", "same-request"))
    again = _ask(actor, wire.LeaseRequest("a0", "same-request"))
    assert isinstance(first, wire.Lease) and again.lease_id == first.lease_id
    assert _ask(actor, wire.StatusRequest("st")).counters["leases"] == 1


def test_bad_ids_and_mismatched_results_are_rejected_not_fatal(broker):
    b, ctx = broker
    actor = _dealer(ctx, b.endpoint, "actor")
    lease = _ask(actor, wire.LeaseRequest("a0", "l1"))
    _ask(actor, _group(lease, "g1"))
    bad = _dealer(ctx, b.endpoint, "bad")
    bad.send_multipart(codec.encode(wire.SkipTask("r", "", "t", "a0", "x")))  # empty id: an LMDB key error
    bad.send_multipart(codec.encode(wire.ScoreResult("j", "g1", "s", [True], [1.0], [{}], [""])))  # 1 score for 2
    bad.send_multipart(codec.encode(wire.ScoreResult("j", "nope", "s", [True], [1.0], [{}], [""])))
    deadline = time.monotonic() + 5  # another socket: no ordering with the status request, so poll
    while "rejected/result_unknown_group" not in (counters := _ask(actor, wire.StatusRequest("st")).counters):
        assert time.monotonic() < deadline, counters
        time.sleep(0.05)
    assert counters["rejected/bad_id"] == 1 and counters["rejected/result_size"] == 1
    assert counters["rejected/result_unknown_group"] == 1 and counters["storage_ok"] == 1
    assert isinstance(_ask(actor, wire.LeaseRequest("a0", "l2")), wire.Lease)


def _counters(sock):
    return _ask(sock, wire.StatusRequest("st-" + str(time.monotonic()))).counters


def _wait_for(fn, what, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return value


def test_a_group_must_claim_a_lease_issued_to_its_actor_for_its_task(broker):
    b, ctx = broker
    actor = _dealer(ctx, b.endpoint, "actor")
    lease, other = _ask(actor, wire.LeaseRequest("a0", "l1")), _ask(actor, wire.LeaseRequest("a0", "l2"))
    forged = [
        (_group(wire.Lease("x", "never-issued", "t0", "i", "t", [], {}), "g-unknown"), "unknown_lease"),
        (_group(lease, "g-other-actor", actor_id="a9"), "lease_of_another_actor"),
        (dataclasses.replace(_group(lease, "g-other-task"), task_id=other.task_id), "lease_of_another_task"),
    ]
    for group, reason in forged:
        ack = _ask(actor, group)
        assert not ack.ok and ack.detail.startswith(f"rejected: {reason}"), ack
    assert _ask(actor, _group(lease, "g1")).detail == "stored"
    assert _ask(actor, _group(lease, "g1")).detail == "duplicate"  # a resend is still acknowledged
    second = _ask(actor, _group(lease, "g2"))  # a second group on a used lease
    assert not second.ok and second.detail.startswith("rejected: lease_closed"), second
    c = _counters(actor)
    assert c["ingested"] == 1 and c["duplicate_groups"] == 1
    assert {k: v for k, v in c.items() if k.startswith("rejected/")} == {
        "rejected/unknown_lease": 1, "rejected/lease_of_another_actor": 1, "rejected/lease_of_another_task": 1,
        "rejected/lease_closed": 1,
    }  # fmt: skip


def test_nonsense_groups_are_refused_and_give_their_lease_back(tmp_path):
    with _running_broker(tmp_path, rules=GroupRules(max_group_size=2, family="flow")) as (b, ctx):
        actor = _dealer(ctx, b.endpoint, "actor")
        cases = [
            (lambda lease: _group(lease, "g-future", version=10**12), "version_not_published"),
            (
                lambda lease: dataclasses.replace(
                    _group(lease, "g-3"),
                    edit_pngs=[PNG] * 3,
                    log_probs=np.zeros((3, 2), np.float32),
                    traj={"latents": np.zeros((3, 2), np.float32)},
                ),
                "bad_group_size",
            ),  # G > group_size
            (lambda lease: dataclasses.replace(_group(lease, "g-ar"), family="ar"), "wrong_family"),
            (lambda lease: dataclasses.replace(_group(lease, "g-txt"), edit_pngs=[b"a", b"b"]), "not_png"),
        ]
        for make, reason in cases:
            lease = _ask(actor, wire.LeaseRequest("a0", f"lease-{reason}"))
            assert isinstance(lease, wire.Lease)
            ack = _ask(actor, make(lease))
            assert not ack.ok and ack.detail.startswith(f"rejected: {reason}"), ack
            assert _counters(actor)["leases"] == 0  # the refused group's lease is closed: its slot is free again
            again = _ask(actor, _group(lease, "g-late"))
            assert not again.ok and again.detail.startswith("rejected: lease_closed")
        assert b.store.get_lease(lease.lease_id)["closed"] == "rejected:not_png"


def _score(scorer, job, worker_id, value=5.0):
    n = len(job.edit_pngs)
    scorer.send_multipart(codec.encode(wire.ScoreResult(job.job_id, job.group_id, worker_id, [True] * n,
                                                        [value] * n, [{}] * n, [""] * n)))  # fmt: skip


def test_a_job_that_fails_on_every_scorer_is_quarantined_and_no_scorer_is_blamed(tmp_path):
    with _running_broker(tmp_path, score_deadline_s=0.3, max_job_attempts=2) as (b, ctx):
        actor = _dealer(ctx, b.endpoint, "actor")
        scorers = {name: _dealer(ctx, b.endpoint, name) for name in ("s1", "s2")}
        lease = _ask(actor, wire.LeaseRequest("a0", "l1"))
        assert _ask(actor, _group(lease, "poison")).ok
        held = []
        deadline = time.monotonic() + 10
        while b.store.get_status("poison")["state"] == "pending":  # both scorers take it and never answer
            assert time.monotonic() < deadline, b.counters()
            for name, sock in scorers.items():
                sock.send_multipart(codec.encode(wire.ScorerReady(name, "m", 1)))  # alive, same socket
                while sock.poll(20):
                    held.append((name, codec.decode(sock.recv_multipart())))
            time.sleep(0.05)
        status = b.store.get_status("poison")
        assert status["state"] == "quarantined" and "failed 2 times" in status["reason"], status
        assert sorted({name for name, _ in held}) == ["s1", "s2"]
        c = _counters(actor)
        assert c["quarantined"] == 1 and c["scorers_live"] == 2 and c.get("scorers_quarantined", 0) == 0
        lease2 = _ask(actor, wire.LeaseRequest("a0", "l2"))  # the quarantined group gave its admission slot back
        assert isinstance(lease2, wire.Lease)
        name, job = held[-1]
        _score(scorers[name], job, name)  # a late answer for the quarantined group changes nothing
        _wait_for(lambda: _counters(actor).get("duplicate_results") == 1, "the late result counted as duplicate")
        assert b.store.get_status("poison")["state"] == "quarantined"


def test_groups_the_learner_refuses_are_quarantined_and_its_batch_is_topped_up(broker):
    b, ctx = broker
    actor, scorer, learner = (_dealer(ctx, b.endpoint, n) for n in ("actor", "scorer", "learner"))
    for gid in ("g1", "g2", "g3"):
        lease = _ask(actor, wire.LeaseRequest("a0", f"l-{gid}"))
        assert _ask(actor, _group(lease, gid)).ok
        _score(scorer, _ask(scorer, wire.ScorerReady("s0", "m", 1)), "s0")
        _wait_for(lambda gid=gid: b.store.get_status(gid)["state"] == "ready", f"{gid} scored")
    batch = _ask(learner, wire.SampleRequest("s1", 0, 1, 0, 2, 0))
    got = [codec.decode(codec.decode_record(r)).group_id for r in batch.groups]
    assert got == ["g1", "g2"]
    ack = _ask(learner, wire.RejectGroups("rj", 0, 1, ["g1"], ["traj['latents'] shape (2, 3) is not usable"]))
    assert ack.ok and ack.detail == "quarantined"
    assert _ask(learner, wire.RejectGroups("rj", 0, 1, ["g1"], ["again"])).ok  # a resend changes nothing
    top_up = _ask(learner, wire.SampleRequest("s2", 0, 1, 1, 1, 0))  # holds g2; asks for the one it is missing
    assert [codec.decode(codec.decode_record(r)).group_id for r in top_up.groups] == ["g3"]
    assert b.store.batch_assignment(0, 1) == ["g2", "g3"]
    status = b.store.get_status("g1")
    assert status["state"] == "quarantined" and status["reason"].startswith("learner: traj") and status["rewards"]
    c = _counters(learner)
    assert c["consumed"] == 2 and c["quarantined"] == 1
    bad = _ask(learner, wire.RejectGroups("rj2", 0, 1, ["g2"], []))
    assert not bad.ok and bad.detail.startswith("rejected: bad_reject")


def test_weights_move_forward_one_version_and_a_resend_is_acknowledged(tmp_path):
    rules = GroupRules(weights_dir=tmp_path / "weights")
    with _running_broker(tmp_path, rules=rules) as (b, ctx):
        learner = _dealer(ctx, b.endpoint, "learner")

        def publish(rid, version, uri):
            info = wire.WeightsInfo(version=version, uri=str(uri), sha256="ab", kind="lora")
            return _ask(learner, wire.PublishWeights(rid, version, wire.weights_dict(info)))

        for rid, version, uri, reason in [
            ("p0", 10**6, tmp_path / "weights" / "v1000000", "version_not_next"),
            ("p1", 1, "/etc/passwd", "weights_uri"),
        ]:
            ack = publish(rid, version, uri)
            assert not ack.ok and ack.detail.startswith(f"rejected: {reason}") and ack.weights["version"] == 0
        good = tmp_path / "weights" / "v000001"
        assert publish("p2", 1, good).ok and publish("p2", 1, good).ok  # the resend after a lost ack
        assert not publish("p3", 1, tmp_path / "weights" / "other").ok  # same number, other weights
        assert _counters(learner)["weights_version"] == 1
