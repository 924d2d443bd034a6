"""Chaos soak: random kill -9 and SIGSTOP/SIGCONT of the broker, actors and scorers (never the learner) while the
quickstart trains; ends with lost = 0, duplicated = 0 and the reward still improving.

    make soak                      # 10 minutes (EDITRL_SOAK_S overrides), result in runs/soak/result.json
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from .harness import FaultRun, assert_drops, read_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.faults]

VICTIMS = ["broker-0", "actor-0", "actor-1", "scorer-0", "scorer-1"]


def test_chaos_soak(tmp_path, tiny_model_dir, quickstart_tasks):
    duration_s = float(os.environ.get("EDITRL_SOAK_S", "600"))
    rng = random.Random(int(os.environ.get("EDITRL_SOAK_SEED", "0")))
    run = FaultRun(
        tmp_path, tiny_model_dir, quickstart_tasks, max_steps=10**6,
        actors={"count": 2}, scorers={"count": 2}, broker={"lease_timeout_s": 5.0},
        learner={"checkpoint_every": 10},
    ).start()  # fmt: skip
    faults: list[dict] = []
    try:
        run.wait_steps(3)
        t_end = time.monotonic() + duration_s
        while time.monotonic() < t_end:
            time.sleep(rng.uniform(3, 10))
            victim = rng.choice(VICTIMS)
            kind = rng.choice(["kill", "stop"])
            try:
                if kind == "kill":
                    pid = run.kill(victim, signal.SIGKILL)
                else:
                    pid = run.kill(victim, signal.SIGSTOP)
                    time.sleep(rng.uniform(1, 8))
                    os.kill(pid, signal.SIGCONT)
            except (ProcessLookupError, AssertionError):
                continue  # already gone / restarting
            faults.append({"t": round(time.monotonic() - t_end + duration_s, 1), "victim": victim, "fault": kind})
        steps_before_end = run.steps()
        run.wait_steps(steps_before_end + 5, timeout_s=180)  # still training after the last fault
        verdict = run.stop_and_check()
    finally:
        run.abort()
    rewards = np.array([m["reward/mean"] for m in read_jsonl(run.run_dir / "metrics.jsonl")])
    first, last = float(rewards[:5].mean()), float(rewards[-5:].mean())
    result = {
        "duration_s": duration_s,
        "faults": len(faults),
        "kills": sum(f["fault"] == "kill" for f in faults),
        "stops": sum(f["fault"] == "stop" for f in faults),
        "learner_steps": len(rewards),
        "reward_first_5_steps": round(first, 3),
        "reward_last_5_steps": round(last, 3),
        "verdict": verdict.summary(),
        "lost": len(verdict.lost),
        "duplicated": len(verdict.duplicated),
        "unexpected": len(verdict.unexpected),
        "recovered": len(verdict.recovered),
        "drops": {k: verdict.counters.get(k, 0) for k in ("dropped_stale", "dropped_unscorable", "evicted")},
        "fault_log": faults,
    }
    out = Path(os.environ.get("EDITRL_SOAK_OUT", tmp_path / "result.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "fault_log"}))
    assert not verdict.lost and not verdict.duplicated and not verdict.unexpected, verdict.summary()
    assert not verdict.training_errors, verdict.training_errors[:5]  # every batch_trained record (never the learner)
    assert not verdict.accounting_errors, verdict.accounting_errors  # the counters account for every group
    # nothing is unscorable (metric judge, measurable instructions) or evicted (capacity 10,000); staleness is timing
    assert_drops(verdict, stale=None, unscorable=0, evicted=0)
    assert last > first, f"reward did not improve under chaos: {first:.3f} -> {last:.3f}"
