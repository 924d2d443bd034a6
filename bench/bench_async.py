"""Does asynchrony pay? The quickstart topology run twice on this machine -- η = 0 (synchronous: the actor generates a
step's groups only after the learner published the weights they need) and η = 2 (the actor may run two versions
ahead) -- with the same models, tasks, seeds and number of learner steps.

Printed per run: groups/s over the steady part (after ``--warmup`` steps), the mean staleness, the reward of the first
and last ``--window`` steps and the reward gained per wall-clock minute; then the throughput ratio η=2 / η=0 (target
>= 1.8; the ideal with one actor and one learner sharing 2 cores is 2.0).

    python -m bench.bench_async [--steps 60] [--warmup 5] [--window 10] [--json PATH] [--quick]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]


def _topology(root: Path, eta: int, model: Path, tasks: Path, port: int) -> Path:
    base = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    base["run"] = {"name": f"async-eta{eta}", "dir": str(root / f"eta{eta}"), "seed": 0}
    base["broker"].update(endpoint=f"tcp://127.0.0.1:{port}", max_staleness=eta)
    base["policy"]["model"] = str(model)
    base["data"]["tasks"] = str(tasks)
    base["data"].pop("make_quickstart", None)
    base["learner"].update(publish_every=1, checkpoint_every=10**6)
    path = root / f"eta{eta}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def run(eta: int, steps: int, warmup: int, window: int, root: Path, model: Path, tasks: Path, port: int) -> dict:
    topo = _topology(root, eta, model, tasks, port)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "editrl.scripts.cli", "up", str(topo), "--max-steps", str(steps)],
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"eta={eta} run failed:\n{proc.stderr[-2000:]}")
    wall = time.monotonic() - t0
    metrics = [json.loads(line) for line in (root / f"eta{eta}/metrics.jsonl").read_text().splitlines()]
    groups_per_step = yaml.safe_load(topo.read_text())["learner"]["groups_per_step"]
    times = [m["time"] for m in metrics]
    steady = (len(metrics) - warmup) * groups_per_step / (times[-1] - times[warmup - 1])
    first = sum(m["reward/mean"] for m in metrics[:window]) / window
    last = sum(m["reward/mean"] for m in metrics[-window:]) / window
    minutes = (times[-1] - times[0]) / 60
    return {
        "eta": eta,
        "steps": len(metrics),
        "groups_per_s": steady,
        "staleness_mean": sum(m["learner/staleness_mean"] for m in metrics) / len(metrics),
        "learner_idle": sum(m["learner/idle_ratio"] for m in metrics[warmup:]) / (len(metrics) - warmup),
        "reward_first": first,
        "reward_last": last,
        "reward_gain_per_min": (last - first) / minutes,
        "train_minutes": minutes,
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="8 steps each (a smoke test, not a measurement)")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.window = 8, 2, 2

    from editrl.common.families.tiny.flux_kontext import build_tiny_flux_kontext
    from editrl.common.net import free_local_port as free_port
    from editrl.common.tasks import make_quickstart_tasks

    root = Path(tempfile.mkdtemp(prefix="editrl-bench-async-"))
    model = build_tiny_flux_kontext(root / "model", seed=0)
    tasks = make_quickstart_tasks(root / "data", n_tasks=16, size=64, seed=0)
    results = [run(eta, args.steps, args.warmup, args.window, root, model, tasks, free_port()) for eta in (0, 2)]
    print(f"{'eta':>3} {'groups/s':>9} {'staleness':>9} {'learner idle':>12} {'reward first':>12} "
          f"{'reward last':>11} {'gain/min':>9} {'train min':>9}")  # fmt: skip
    for r in results:
        print(f"{r['eta']:>3} {r['groups_per_s']:>9.2f} {r['staleness_mean']:>9.2f} {r['learner_idle']:>12.2f} "
              f"{r['reward_first']:>12.2f} {r['reward_last']:>11.2f} {r['reward_gain_per_min']:>9.2f} "
              f"{r['train_minutes']:>9.2f}")  # fmt: skip
    ratio = results[1]["groups_per_s"] / results[0]["groups_per_s"]
    summary: dict[str, Any] = {"runs": results, "throughput_ratio": ratio}
    print(f"RESULT throughput ratio eta=2 / eta=0: {ratio:.2f} (target >= 1.8, ideal 2.0 on 2 cores)")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
