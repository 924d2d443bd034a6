"""The fault suite's history checker can fail: synthetic learner logs and counters (no processes, milliseconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .harness import check_accounting, check_training

pytestmark = pytest.mark.faults


def _logs(run_dir: Path, rank: int, events: list[tuple]) -> Path:
    """``events``: ("t", step, [group ids]) for batch_trained, ("r", step) for checkpoint_resumed (by a restarted
    process), ("p",) for a restarted process that logs no resume (it found no checkpoint)."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    lines, pid = [], 100
    for e in events:
        if e[0] in "rp":
            pid += 1
        if e[0] == "t":
            lines.append({"event": "batch_trained", "step": e[1], "rank": rank, "group_ids": e[2], "pid": pid})
        elif e[0] == "r":
            lines.append({"event": "checkpoint_resumed", "step": e[1], "version": e[1], "pid": pid})
    (run_dir / "logs" / f"learner-{rank}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run_dir


BEFORE_KILL = [("t", 1, ["a", "b"]), ("t", 2, ["c", "d"]), ("t", 3, ["e", "f"]), ("t", 4, ["g", "h"])]


def test_retraining_after_a_resume_with_the_same_groups_is_allowed(tmp_path):
    run = _logs(tmp_path, 0, [*BEFORE_KILL, ("r", 2), ("t", 3, ["f", "e"]), ("t", 4, ["g", "h"]), ("t", 5, ["i"])])
    duplicated, errors, retrained, resumes = check_training(run)
    assert (duplicated, errors) == ([], [])
    assert retrained == [(0, 3), (0, 4)] and resumes == [(0, 2)]


def test_library_lines_without_a_pid_are_not_a_restarted_process(tmp_path):
    """transformers logs warnings (no pid) into the same file at start-up and after a restart (seen in CI)."""
    run = _logs(tmp_path, 0, [*BEFORE_KILL, ("r", 2), ("t", 3, ["e", "f"])])
    path = run / "logs/learner-0.jsonl"
    lines = path.read_text().splitlines()
    warning = json.dumps({"event": "`CLIPImageProcessor` requires torchvision", "level": "warning"})
    path.write_text("\n".join([warning, *lines[:4], warning, *lines[4:]]) + "\n")
    duplicated, errors, retrained, resumes = check_training(run)
    assert (duplicated, errors, retrained, resumes) == ([], [], [(0, 3)], [(0, 2)])


def test_a_restart_without_checkpoint_restores_step_0(tmp_path):
    run = _logs(tmp_path, 0, [("t", 1, ["a", "b"]), ("t", 2, ["c", "d"]), ("p",), ("t", 1, ["b", "a"])])
    duplicated, errors, retrained, resumes = check_training(run)
    assert (duplicated, errors, retrained, resumes) == ([], [], [(0, 1)], [(0, 0)])


@pytest.mark.parametrize(
    ("events", "dups"),
    [
        # a group trained at two steps without any resume
        ([("t", 1, ["a", "b"]), ("t", 2, ["b", "c"])], ["b"]),
        # re-trained after the resume, but at a step not after the restored checkpoint
        ([*BEFORE_KILL, ("r", 4), ("t", 5, ["d", "x"])], ["d"]),
        # the re-trained step holds other groups than its first training (one old, one new)
        ([*BEFORE_KILL, ("r", 2), ("t", 3, ["e", "x"])], ["e"]),
        # a step re-trained twice after one resume
        ([*BEFORE_KILL, ("r", 2), ("t", 3, ["e", "f"]), ("t", 3, ["e", "f"])], ["e", "f"]),
        # the same step trained again with no resume in between (the same process)
        ([("t", 1, ["a", "b"]), ("t", 1, ["a", "b"])], ["a", "b"]),
        # a restarted process without a checkpoint that skips to a later step with earlier groups
        ([("t", 1, ["a", "b"]), ("t", 2, ["c", "d"]), ("p",), ("t", 2, ["c", "d"])], ["c", "d"]),
    ],
)
def test_any_other_second_training_is_a_duplicate(tmp_path, events, dups):
    duplicated, errors, _, _ = check_training(_logs(tmp_path, 0, events))
    assert duplicated == dups and errors


def test_a_group_trained_on_two_ranks_is_a_duplicate(tmp_path):
    _logs(tmp_path, 0, [("t", 1, ["a", "b"])])
    _logs(tmp_path, 1, [("t", 1, ["b", "c"])])
    assert check_training(tmp_path)[0] == ["b"]


def test_counters_must_account_for_every_group():
    states = {"consumed": 5, "stale": 1, "unscorable": 1, "pending": 1, "ready": 2, "quarantined": 1,
              "quarantined_consumed": 1}  # fmt: skip
    good = {"ingested": 12, "scored": 9, "consumed": 5, "dropped_stale": 1, "dropped_unscorable": 1,
            "quarantined": 2, "evicted": 0, "evicted_unconsumed": 0}  # fmt: skip
    assert check_accounting(good, states) == []
    for key in ("ingested", "consumed", "dropped_stale", "dropped_unscorable", "scored", "quarantined"):
        assert check_accounting({**good, key: good[key] + 1}, states), key
    assert check_accounting({**good, "evicted_unconsumed": 1}, states)
