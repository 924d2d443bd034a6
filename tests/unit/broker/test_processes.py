"""The broker's process table (what `editrl status` shows): rows by sender, counts, waits, versions, lag."""

from __future__ import annotations

import numpy as np

from editrl.broker.processes import ProcessTable
from editrl.common import wire


def _group(version: int) -> wire.RolloutGroup:
    return wire.RolloutGroup(
        request_id="r", group_id="g", lease_id="l", task_id="t", actor_id="actor-3", policy_version=version,
        instruction="i", task_type="t", source_png=b"s", edit_pngs=[b"e", b"e"], family="flow",
        traj={"latents": np.zeros((2, 2), np.float32)}, log_probs=np.zeros((2, 1), np.float32), cond={}, params={},
    )  # fmt: skip


def test_rows_counts_waits_and_lag() -> None:
    table = ProcessTable()
    table.seen(wire.LeaseRequest("actor-3", "q1"), "10.0.0.7")
    table.waited(wire.LeaseRequest("actor-3", "q1"), 0.2)
    table.seen(_group(4))
    table.seen(_group(5))
    table.seen(wire.ScorerReady("scorer-0", "metric", 2))
    table.seen(wire.ScoreResult("j", "g", "scorer-0", [True], [5.0], [{}], [""]))
    for step in (7, 7, 8):  # a resend of step 7 is not a new step
        table.seen(wire.SampleRequest("s", 0, step, 0, 4, 0))
    table.seen(wire.PublishWeights("p", 8, {"version": "bad"}))  # not validated here: must not crash or count
    table.seen(wire.StatusRequest("cli"))  # command-line clients have no row
    rows = {r["id"]: r for r in table.snapshot(weights_version=7, in_flight={"scorer-0": 2})}
    assert set(rows) == {"actor-3", "scorer-0", "learner-0"}
    actor = rows["actor-3"]
    assert actor["role"] == "actor" and actor["host"] == "10.0.0.7" and actor["items"] == 2
    assert actor["version"] == 5 and actor["lag"] == 2 and actor["waits"] == 1
    assert rows["scorer-0"]["items"] == 1 and rows["scorer-0"]["in_flight"] == 2
    learner = rows["learner-0"]
    assert learner["step"] == 8 and learner["items"] == 2 and "version" not in learner
    table.seen(wire.PublishWeights("p", 8, {"version": 8, "uri": "u", "sha256": "x", "kind": "lora"}))
    assert {r["id"]: r for r in table.snapshot(8)}["learner-0"]["version"] == 8
