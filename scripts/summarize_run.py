"""Print how the reward moved over a run: first vs last 20 groups' mean reward, and a coarse curve.

python scripts/summarize_run.py runs/quickstart
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(run_dir: str) -> int:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if not rows:
        print("no learner steps recorded")
        return 1
    groups_per_step = max(1, round(rows[0]["learner/groups_per_s"] * rows[0]["step_s"]))
    k = max(1, 20 // groups_per_step)  # steps holding 20 groups
    first = sum(r["reward/mean"] for r in rows[:k]) / k
    last = sum(r["reward/mean"] for r in rows[-k:]) / k
    minutes = (rows[-1]["time"] - rows[0]["time"] + rows[0]["step_s"]) / 60
    print(f"steps: {len(rows)}   wall time: {minutes:.1f} min   weight versions: {rows[-1]['version']}")
    print(f"mean reward, first 20 groups: {first:.2f}   last 20 groups: {last:.2f}   change: {last - first:+.2f}")
    bucket = max(1, len(rows) // 10)
    curve = [
        sum(r["reward/mean"] for r in rows[i : i + bucket]) / len(rows[i : i + bucket])
        for i in range(0, len(rows), bucket)
    ]
    print("reward curve (10 buckets): " + " ".join(f"{c:.2f}" for c in curve))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart"))
