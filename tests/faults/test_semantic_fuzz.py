"""Issue 14: no bad group and no rogue peer can stop training.

Against a live `editrl up` (loopback, role secrets, a VLM scorer whose judge is a real HTTP server that misbehaves on
demand, see misbehaving_judge.py — it stands in for a 7B judge that cannot run here), while the run trains, a rogue
client sends every semantic attack of the issue:

- as an *actor* (it holds the run's actor secret, like a buggy actor would): groups the broker must refuse at ingest
  (a 200,000-character instruction, G = 0 and G > group_size, edits that are not PNGs or too small, a version from
  the future, another family, a forged lease, another task's lease, a second group on a used lease), groups it
  stores that no scorer can finish (a PNG whose body is garbage, a judge reply over 2 MB, a judge that fails with
  HTTP 500), and groups the judge scores but the learner's family check refuses (latents of the wrong shape, a cond
  without the schedule); then a PublishWeights, a SampleRequest and a ScoreResult (not an actor's to send);
- with no secret at all: a PublishWeights (the handshake refuses it).

Asserted: no 20-second window without a learner step, learner steps per minute during the attack >= 50 % of before,
no process restarted, every bad input counted under its reason (exact counts), and the honest actors' history clean
(lost = duplicated = 0, counters account for every group).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
from PIL import Image

from editrl.common import wire
from editrl.common.config import load_config
from editrl.common.images import to_png
from editrl.common.net import BrokerClient, new_id
from editrl.common.security import HandshakeError, SecurityConfig

from .harness import FaultRun
from .misbehaving_judge import MisbehavingJudge

pytestmark = pytest.mark.faults

BEFORE_S = 25.0  # learner steps counted before the attack
DURING_S = 30.0  # ... and from the attack's first message on
MAX_GAP_S = 20.0
ROLE_NAMES = ("broker-0", "actor-0", "scorer-0", "learner-0")


def _png(size: int = 32) -> bytes:
    return to_png(Image.new("RGB", (size, size), (120, 60, 30)))


def _garbage_png() -> bytes:
    """A PNG header the broker accepts (header check only) followed by bytes no decoder can read."""
    return _png()[:33] + b"\x00garbage" * 64


class Rogue:
    """A client with the run's actor secret that plays by none of the rules."""

    def __init__(self, run: FaultRun, security: SecurityConfig) -> None:
        self.client = BrokerClient(run.ctx, run.status_endpoint(), "rogue", timeout_s=3.0, security=security,
                                   role="actor")  # fmt: skip
        self.actor_id = "rogue-actor"

    def lease(self) -> wire.Lease:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            reply = self.client.request(wire.LeaseRequest(self.actor_id, new_id()), retries=5)
            if isinstance(reply, wire.Lease):
                return reply
            time.sleep(reply.retry_after_s)
        raise AssertionError("the rogue actor got no lease in 60 s")

    def group(self, lease: wire.Lease, g: int = 2, **changes) -> wire.RolloutGroup:
        base = wire.RolloutGroup(
            request_id=new_id(), group_id=new_id(), lease_id=lease.lease_id, task_id=lease.task_id,
            actor_id=self.actor_id, policy_version=int(lease.weights["version"]), instruction=lease.instruction,
            task_type=lease.task_type, source_png=_png(), edit_pngs=[_png()] * g, family="flow",
            traj={"latents": np.zeros((g, 5, 16, 16), np.float32)}, log_probs=np.zeros((g, 3), np.float32),
            cond={}, params={"noise_level": 0.7},
        )  # fmt: skip
        return dataclasses.replace(base, **changes)

    def send(self, msg) -> wire.Ack:
        return self.client.request(msg, retries=5)


def _zero(g: int) -> dict:
    return {"edit_pngs": [], "traj": {"latents": np.zeros((0, 5), np.float32)},
            "log_probs": np.zeros((0, 3), np.float32)}  # fmt: skip


@pytest.fixture
def judge():
    with MisbehavingJudge() as server:
        yield server


def test_no_bad_group_and_no_rogue_peer_stops_training(tmp_path, tiny_model_dir, quickstart_tasks, judge):
    run = FaultRun(
        tmp_path, tiny_model_dir, quickstart_tasks, 10_000,
        scorers={"count": 1, "backend": "vlm", "batch": 4, "options": {
            "engine": "openai", "max_reasks": 1,
            "engine_options": {"base_url": judge.base_url, "model": "misbehaving", "max_retries": 0,
                               "backoff_s": 0.0, "timeout_s": 30.0},
        }},
        broker={"score_deadline_s": 20.0},
    ).start()  # fmt: skip
    try:
        cfg = load_config(run.topo)
        run.wait_steps(3, timeout_s=180)
        pids = {name: run.pid(name) for name in ROLE_NAMES}
        t_before, steps_before = time.time(), run.steps()
        time.sleep(BEFORE_S)
        rate_before = (run.steps() - steps_before) / BEFORE_S * 60
        t_attack = time.time()
        stored, counts = _attack(run, Rogue(run, cfg.security), cfg)
        run.injected |= stored
        time.sleep(max(0.0, DURING_S - (time.time() - t_attack)))
        metrics = [m for m in _metrics(run) if m["time"] >= t_before]
        during = [m for m in metrics if t_attack <= m["time"] <= t_attack + DURING_S]
        rate_during = len(during) / DURING_S * 60
        run.wait_for(lambda: _settled(run, counts), 90, "every stored attack group to be decided")
        counters = run.status()
        restarted = {n: (p, run.pid(n)) for n, p in pids.items() if run.pid(n) != p}
        times = [t_before] + [m["time"] for m in metrics] + [time.time()]
        gaps = np.diff(times)
    finally:
        verdict = run.stop_and_check()
    print(f"\nlearner steps/min before {rate_before:.1f}, during the attack {rate_during:.1f}; "
          f"largest gap {gaps.max():.1f} s; counters {_interesting(counters)}")  # fmt: skip
    assert not restarted, f"processes restarted during the attack: {restarted}"
    assert gaps.max() < MAX_GAP_S, f"no learner step for {gaps.max():.1f} s"
    assert rate_during >= 0.5 * rate_before, (rate_before, rate_during)
    for reason, n in counts["rejected"].items():
        assert counters.get(f"rejected/{reason}", 0) == n, (reason, n, _interesting(counters))
    assert counts["handshake_refused"], "a client without the run's secret was not refused at the handshake"
    assert sum(v for k, v in counters.items() if k.startswith("rejected/handshake_")) >= 1, _interesting(counters)
    assert counters["dropped_unscorable"] == counts["unscorable"], _interesting(counters)
    assert counters["quarantined"] == counts["quarantined"], _interesting(counters)
    assert {g for g, st in verdict_states(run).items() if st == "quarantined"} == counts["quarantined_ids"]
    assert not verdict.lost and not verdict.duplicated and not verdict.training_errors, verdict.summary()
    assert not verdict.unexpected and not verdict.accounting_errors, (verdict.unexpected, verdict.accounting_errors)


def _attack(run: FaultRun, rogue: Rogue, cfg) -> tuple[set[str], dict]:
    """Send every attack; returns (ids of the groups the broker stored, what each counter should read)."""
    rejected: dict[str, int] = {}
    stored: set[str] = set()

    def refused(msg, reason: str) -> None:
        ack = rogue.send(msg)
        assert isinstance(ack, wire.Ack) and not ack.ok and ack.detail.startswith(f"rejected: {reason}"), ack
        rejected[reason] = rejected.get(reason, 0) + 1

    def accepted(msg) -> str:
        ack = rogue.send(msg)
        assert isinstance(ack, wire.Ack) and ack.ok and ack.detail == "stored", ack
        stored.add(msg.group_id)
        return msg.group_id

    g = cfg.data.group_size
    for changes, reason in [
        ({"instruction": "make it red " * 16_667}, "text_too_long"),  # ~200,000 characters
        (_zero(g), "bad_group_size"),
        (
            {
                "edit_pngs": [_png()] * (g + 1),
                "traj": {"latents": np.zeros((g + 1, 5), np.float32)},
                "log_probs": np.zeros((g + 1, 3), np.float32),
            },
            "bad_group_size",
        ),  # fmt: skip
        ({"edit_pngs": [b"GIF89a not a png", _png()]}, "not_png"),
        ({"edit_pngs": [_png(2), _png()]}, "image_size"),
        ({"policy_version": 10**12}, "version_not_published"),
        ({"family": "ar"}, "wrong_family"),
    ]:
        refused(rogue.group(rogue.lease(), **changes), reason)
    refused(rogue.group(rogue.lease(), lease_id="forged-lease"), "unknown_lease")
    refused(rogue.group(rogue.lease(), task_id="not-the-leased-task"), "lease_of_another_task")
    lease = rogue.lease()
    unscorable = [
        accepted(rogue.group(lease, edit_pngs=[_garbage_png(), _png()])),  # no decoder reads it: unscored
        accepted(rogue.group(rogue.lease(), instruction="make it red #HUGE#")),  # a 2.5 MB judge reply
        accepted(rogue.group(rogue.lease(), instruction="make it red #RAISE#")),  # the judge fails (HTTP 500)
    ]
    refused(rogue.group(lease), "lease_closed")  # a second group on a used lease
    quarantined = {
        accepted(rogue.group(rogue.lease(), traj={"latents": np.zeros((2, 3), np.float32)})),  # unusable shape
        accepted(rogue.group(rogue.lease())),  # a cond without the schedule the family needs
    }
    version = int(rogue.lease().weights["version"])
    forged = wire.WeightsInfo(version=10**6, uri="/etc/passwd", sha256="0" * 64, kind="lora")
    refused(wire.PublishWeights(new_id(), 10**6, wire.weights_dict(forged)), "role_forbidden")
    refused(wire.SampleRequest(new_id(), 0, 10**6, 0, 4, 0), "role_forbidden")
    rogue.client.sock.send_multipart(wire_frames(wire.ScoreResult("j", "g", "s", [True], [9.0], [{}], [""])))
    rejected["role_forbidden"] += 1  # no request id: not answered, only counted
    outsider = BrokerClient(run.ctx, run.status_endpoint(), "outsider", timeout_s=2.0, role="learner")  # no secret
    handshake_refused = False
    try:
        outsider.request(wire.PublishWeights(new_id(), 10**6, wire.weights_dict(forged)), retries=2)
    except HandshakeError:
        handshake_refused = True
    except TimeoutError:
        pass
    finally:
        outsider.close()
    assert version < 10**6
    return stored, {"rejected": rejected, "unscorable": len(unscorable), "quarantined": len(quarantined),
                    "quarantined_ids": quarantined, "handshake_refused": handshake_refused}  # fmt: skip


def wire_frames(msg) -> list[bytes]:
    from editrl.common import codec

    return codec.encode(msg)


def _metrics(run: FaultRun) -> list[dict]:
    import json

    path = run.run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def verdict_states(run: FaultRun) -> dict[str, str]:
    from .harness import read_store

    return {g: st["state"] for g, st in read_store(run.run_dir)["status"].items()}


def _settled(run: FaultRun, counts: dict) -> bool:
    c = run.status()
    return c.get("dropped_unscorable", 0) >= counts["unscorable"] and c.get("quarantined", 0) >= counts["quarantined"]


def _interesting(counters: dict) -> dict:
    keys = ("ingested", "consumed", "dropped_stale", "dropped_unscorable", "quarantined", "duplicate_results")
    return {k: v for k, v in counters.items() if k.startswith("rejected/") or k in keys}
