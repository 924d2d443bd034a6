"""`editrl status`'s gold row: the latest learner step with gold-scored groups, read from the run's metrics.jsonl."""

from __future__ import annotations

import json

from editrl.scripts.status import gold_line, latest_gold, render_status


def test_the_gold_row_shows_the_latest_gold_step_and_the_alarm(tmp_path):
    assert latest_gold(tmp_path) is None
    assert gold_line(None, metrics_here=False) == "gold: no metrics.jsonl on this host"
    rows = [
        {"step": 1, "reward/mean": 4.0, "reward/gold": 3.0, "reward/gap": 1.0, "reward/gold_groups": 1.0,
         "reward/hacking_alarm": 0.0},
        {"step": 2, "reward/mean": 6.5, "reward/gold": 2.0, "reward/gap": 4.5, "reward/gold_groups": 2.0,
         "reward/hacking_alarm": 1.0},
        {"step": 3, "reward/mean": 6.6},  # a step without gold: the row keeps step 2's numbers
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew')
    gold = latest_gold(tmp_path)
    assert gold == {"step": 2, "gold": 2.0, "gap": 4.5, "groups": 2.0, "alarm": True}
    line = gold_line(gold, metrics_here=True)
    assert line.startswith("gold: 2.000 at step 2") and "+4.500" in line and "SUSPECTED" in line
    table = render_status([], {}, {"version": 3}, {}, line)
    assert table.splitlines()[-1] == line
    assert "gold" not in render_status([], {}, {"version": 3}, {})  # no gold configured: no row
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rows[2]) + "\n")
    assert latest_gold(tmp_path) is None
    assert gold_line(None, metrics_here=True) == "gold: no gold-scored group trained yet"
