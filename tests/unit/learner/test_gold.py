"""The reward-hacking alarm: training reward up while the held-out gold score falls fires it (once per transition);
learning (both up) and steps without gold leave it silent; the per-step gold keys are absent, never 0, without gold;
a restarted learner reads the history back from metrics.jsonl."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import structlog
from structlog.testing import capture_logs

from editrl.learner.gold import HackingAlarm, group_pair, load_history
from editrl.learner.loop import Learner


def _run(alarm, steps):
    """Feed (train, gold) per step, one gold-scored group each, after the steps already fed; the verdicts."""
    first = alarm.steps[-1][0] + 1 if alarm.steps else 1
    return [alarm.add(step, 1, train, gold) for step, (train, gold) in enumerate(steps, start=first)]


def test_fires_when_training_reward_rises_while_gold_falls_and_logs_once():
    alarm = HackingAlarm(window=4, min_rise=0.5, min_fall=0.5)
    learning = [(3.0 + 0.1 * i, 3.0 + 0.1 * i) for i in range(12)]  # both up: honest learning
    hacking = [(4.2 + 0.2 * i, 4.1 - 0.3 * i) for i in range(12)]  # the training scorer likes it, gold does not
    verdicts = _run(alarm, learning + hacking)
    assert not any(v.active for v in verdicts[:12])
    fired = [i for i, v in enumerate(verdicts) if v.active]
    assert fired and fired == list(range(fired[0], len(verdicts)))  # on from then on
    assert [i for i, v in enumerate(verdicts) if v.changed] == [fired[0]]  # one transition
    v = verdicts[fired[0]]
    assert v.recent.train - v.reference.train > 0.5 and v.reference.gold - v.recent.gold > 0.5
    assert v.reference.last_step < v.recent.first_step  # the windows do not overlap
    # the reference is the best gold block so far, not the first one: gold rose before it fell
    assert v.reference.gold > np.mean([g for _, g in learning[:4]])


def test_silent_when_both_rise_when_only_gold_wobbles_and_below_the_thresholds():
    both = HackingAlarm(window=4, min_rise=0.5, min_fall=0.5)
    assert not any(v.active for v in _run(both, [(2.0 + 0.2 * i, 1.5 + 0.2 * i) for i in range(40)]))
    flat_train = HackingAlarm(window=4, min_rise=0.5, min_fall=0.5)  # gold falls but training reward does not rise
    assert not any(v.active for v in _run(flat_train, [(5.0, 6.0 - 0.1 * i) for i in range(40)]))
    small = HackingAlarm(window=4, min_rise=0.5, min_fall=0.5)  # a drift inside the thresholds
    assert not any(v.active for v in _run(small, [(5.0 + 0.01 * i, 5.0 - 0.01 * i) for i in range(40)]))


def test_needs_two_windows_and_clears_when_gold_recovers():
    alarm = HackingAlarm(window=4, min_rise=0.5, min_fall=0.5)
    verdicts = _run(alarm, [(3.0, 6.0)] * 4 + [(6.0, 2.0)] * 3)
    assert verdicts[5].recent is not None and verdicts[5].reference is None  # only one block so far, overlapping
    assert _run(alarm, [(6.0, 2.0)])[0].active
    cleared = _run(alarm, [(6.0, 6.5)] * 4)
    assert [v.active for v in cleared] == [True, True, True, False] and [v.changed for v in cleared][-1]


def test_no_gold_no_keys_and_the_same_edits_on_both_sides():
    assert group_pair(np.array([1.0, 2.0]), [None, None]) is None
    assert group_pair(np.array([1.0, 9.0, 3.0]), [2.0, None, 4.0]) == (2.0, 3.0)  # edit 1 has no gold: left out
    learner = SimpleNamespace(world=1)
    rewards = [np.array([5.0, 7.0], np.float32), np.array([1.0, 1.0], np.float32)]
    assert Learner.gold_stats(learner, rewards, [[None, None], [None, None]]) == {}  # absent, never 0.0
    stats = Learner.gold_stats(learner, rewards, [[4.0, 2.0], [None, None]])
    assert stats == {"reward/gold": 3.0, "reward/gap": 3.0, "reward/gold_groups": 1.0}


def test_the_learner_logs_one_warning_per_transition_with_the_numbers(capsys):
    gold = SimpleNamespace(window=2, min_rise=0.5, min_fall=0.5)
    learner = SimpleNamespace(alarm=HackingAlarm(gold.window, gold.min_rise, gold.min_fall), step=0,
                              log=structlog.get_logger())  # fmt: skip
    seen = []
    with capture_logs() as logs:
        for train, g in [(3.0, 6.0)] * 2 + [(6.0, 2.0)] * 6:
            learner.step += 1
            stats = {"reward/gold": g, "reward/gap": train - g, "reward/gold_groups": 1.0}
            Learner.check_alarm(learner, stats)
            seen.append(stats["reward/hacking_alarm"])
    assert seen == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    warnings = [e for e in logs if e["event"] == "reward_hacking_suspected"]
    assert len(warnings) == 1 and warnings[0]["step"] == 4 and warnings[0]["log_level"] == "warning"
    assert warnings[0]["train_rise"] == pytest.approx(3.0) and warnings[0]["gold_fall"] == pytest.approx(4.0)
    assert "reward hacking suspected at step 4" in capsys.readouterr().out


def test_a_restarted_learner_reads_the_history_back(tmp_path):
    steps = [(3.0, 6.0)] * 4 + [(6.0, 2.0)] * 4
    live = HackingAlarm(window=4, min_rise=0.5, min_fall=0.5)
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("w") as f:
        for step, (train, gold) in enumerate(steps, start=1):
            live.add(step, 2, train, gold)
            f.write(json.dumps({"step": step, "reward/mean": train}) + "\n")  # a step line without gold first
            row = {"step": step, "reward/gold": gold, "reward/gap": train - gold, "reward/gold_groups": 2.0}
            f.write(json.dumps(row) + "\n")
        f.write('{"step": 9, "reward/go')  # a torn last line
    history = load_history(metrics, upto_step=8)
    assert [h[0] for h in history] == list(range(1, 9)) and history[0] == (1, 2, 3.0, 6.0)
    resumed = HackingAlarm(window=4, min_rise=0.5, min_fall=0.5)
    for row in history:
        resumed.add(*row)
    assert resumed.active == live.active is True
    assert load_history(metrics, upto_step=4)[-1][0] == 4 and load_history(tmp_path / "none.jsonl", 10) == []
