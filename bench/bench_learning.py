"""Time to a good policy: the quickstart topology per objective × η × seed, reward against wall-clock time and steps.

Each run is ``editrl up`` of ``configs/quickstart.yaml`` (the trained tiny editor, the strict metric reward) with its
own run directory, broker port, ``run.seed``, ``broker.max_staleness`` = η and ``learner.objective``, for ``--steps``
learner steps. From its metrics.jsonl:

- the reward curve (``reward/mean`` per step, smoothed by a trailing mean of ``--smooth`` steps) against learner steps
  and against wall-clock seconds since ``editrl up`` was launched (start-up included: the same for every run);
- the final reward (mean of the last ``--smooth`` steps);
- time to target: the first wall-clock second at which the smoothed reward reaches the target; a run that never
  reaches it is "not reached" (never a number). The target is set by the η = 0 ``flow_grpo`` runs: by default their
  median initial reward plus ``--gain`` (0.75) of their median improvement (initial = mean of the first ``--smooth``
  steps, final = of the last), because the committed editor already starts near its final reward (8.15 → 8.4 in
  300 quickstart steps), so the issue's "final minus 0.5" would be met by the first step; ``--margin M`` uses
  median final − M instead;
- where the time goes: per run the learner's idle ratio (waiting for groups) and the actor's (told to wait by
  admission control), medians over the steps.

Reported per (objective, η): median and min..max over seeds of time to target and final reward, how many seeds
reached it; the ratio median T(η=0) / median T(η=2) for the default objective (goal ≥ 1.8). ``--png`` writes the
curves (matplotlib), ``--json`` every number.

    python -m bench.bench_learning                                   # flow_grpo 3 seeds, others 2; η 0 and 2
    python -m bench.bench_learning --objectives flow_grpo --seeds 3 --steps 80 --png docs/images/learning.png
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
DEFAULT = "flow_grpo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def topology(root: Path, objective: str, eta: int, seed: int, model: Path, tasks: Path) -> Path:
    base = yaml.safe_load((REPO / "configs/quickstart.yaml").read_text())
    name = f"{objective}-eta{eta}-seed{seed}"
    base["run"] = {"name": name, "dir": str(root / name), "seed": seed}
    base["broker"].update(endpoint=f"tcp://127.0.0.1:{_free_port()}", max_staleness=eta)
    base["policy"]["model"] = str(model)
    base["data"]["tasks"] = str(tasks)
    base["data"].pop("make_quickstart", None)
    base["learner"].update(objective=objective, publish_every=1, checkpoint_every=10**6)
    if objective == "nft":  # samples with the ODE: no SDE window (the same schedule, steps and guidance otherwise)
        base["policy"]["sampler"].update(sde_window=0, sde_window_range=[])
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def run_one(topo: Path, steps: int, smooth: int, reuse: bool = False) -> dict[str, Any]:
    """Run ``editrl up`` for ``steps`` steps (or, with ``reuse``, read a finished run of ``topo``'s directory)."""
    cfg = yaml.safe_load(topo.read_text())
    run_dir = Path(cfg["run"]["dir"])
    launched = run_dir.parent / f"{cfg['run']['name']}.launched"  # the launch time, for a later --reuse
    metrics_path = run_dir / "metrics.jsonl"
    if reuse and launched.exists() and metrics_path.exists() and len(metrics_path.read_text().splitlines()) >= steps:
        t0 = float(launched.read_text())
    else:
        t0 = time.time()
        launched.write_text(repr(t0))
        proc = subprocess.run([sys.executable, "-m", "editrl.scripts.cli", "up", str(topo), "--max-steps", str(steps)],
                              capture_output=True, text=True)  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"{topo.name} failed:\n{proc.stderr[-2000:]}")
    metrics = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()][:steps]
    rewards = [m["reward/mean"] for m in metrics]
    actor_idle = [e["idle_ratio"] for e in _events(run_dir / "logs/actor-0.jsonl") if e.get("event") == "group_sent"]
    return {
        "name": cfg["run"]["name"],
        "steps": [m["step"] for m in metrics],
        "seconds": [m["time"] - t0 for m in metrics],
        "reward": rewards,
        "smoothed": trailing_mean(rewards, smooth),
        "final": statistics.fmean(rewards[-smooth:]),
        "wall_s": metrics[-1]["time"] - t0,
        "learner_idle": statistics.median(m["learner/idle_ratio"] for m in metrics),
        "actor_idle_end": actor_idle[-1] if actor_idle else None,  # cumulative over the actor's life
        "staleness_mean": statistics.fmean(m["learner/staleness_mean"] for m in metrics),
    }


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")] if path.exists() else []


def trailing_mean(xs: list[float], n: int) -> list[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= n:
            acc -= xs[i - n]
        out.append(acc / min(i + 1, n))
    return out


def time_to(run: dict[str, Any], target: float, smooth: int) -> float | None:
    """First wall-clock second at which the smoothed reward (over at least ``smooth`` steps) reaches ``target``."""
    for i, (t, r) in enumerate(zip(run["seconds"], run["smoothed"], strict=True)):
        if i + 1 >= smooth and r >= target:
            return t
    return None


def spread(xs: list[float]) -> dict[str, float] | None:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)} if xs else None


def summarize(
    runs: dict[tuple[str, int], list[dict[str, Any]]], gain: float, margin: float | None, smooth: int
) -> dict[str, Any]:
    base = runs.get((DEFAULT, 0))
    if not base:
        raise SystemExit(f"the target needs the η = 0 {DEFAULT} runs")
    final = statistics.median(r["final"] for r in base)
    initial = statistics.median(statistics.fmean(r["reward"][:smooth]) for r in base)
    target = final - margin if margin is not None else initial + gain * (final - initial)
    table = {}
    for (objective, eta), rs in sorted(runs.items()):
        times = [t for r in rs if (t := time_to(r, target, smooth)) is not None]
        after_first = [t - r["seconds"][0] for r in rs if (t := time_to(r, target, smooth)) is not None]
        table[f"{objective}/eta{eta}"] = {
            "time_to_target_s": spread(times),
            "after_first_step_s": spread(after_first),  # start-up (the same for every run) left out
            "reached": f"{len(times)}/{len(rs)}",
            "final_reward": spread([r["final"] for r in rs]),
            # final minus the run's own first steps: nft's ODE samples score higher than SDE samples from step 1 on,
            # so levels (and a target) compare samplers as much as objectives; the gain compares learning
            "gain": spread([r["final"] - statistics.fmean(r["reward"][:smooth]) for r in rs]),
            "steps_per_min": spread([60 * len(r["steps"]) / (r["seconds"][-1] - r["seconds"][0]) for r in rs]),
            "learner_idle": spread([r["learner_idle"] for r in rs]),
            "actor_idle": spread([r["actor_idle_end"] for r in rs if r["actor_idle_end"] is not None]),
            "staleness_mean": spread([r["staleness_mean"] for r in rs]),
        }
    ratios = {}
    for key in ("time_to_target_s", "after_first_step_s"):
        t0, t2 = (table.get(f"{DEFAULT}/eta{e}", {}).get(key) for e in (0, 2))
        ratios[key] = t0["median"] / t2["median"] if t0 and t2 and t0["n"] == len(base) and t2["median"] > 0 else None
    return {
        "target": target,
        "initial": initial,
        "final": final,
        "table": table,
        "speedup_eta2": ratios["time_to_target_s"],
        "speedup_eta2_after_first_step": ratios["after_first_step_s"],
    }


def plot(runs: dict[tuple[str, int], list[dict[str, Any]]], target: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_s) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, ((objective, eta), rs) in enumerate(sorted(runs.items())):
        c = colours[k % len(colours)]
        for j, r in enumerate(rs):
            label = f"{objective} η={eta}" if j == 0 else None
            ax_t.plot([s / 60 for s in r["seconds"]], r["smoothed"], color=c, lw=1.2, alpha=0.8, label=label)
            ax_s.plot(r["steps"], r["smoothed"], color=c, lw=1.2, alpha=0.8, label=label)
    for ax, xlabel in ((ax_t, "wall-clock minutes since `editrl up`"), (ax_s, "learner step")):
        ax.axhline(target, color="grey", ls="--", lw=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("reward (trailing mean)")
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    ax_t.set_title("reward vs time (one line per seed; dashed: target)")
    ax_s.set_title("reward vs learner steps")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def report(summary: dict[str, Any]) -> None:
    def fmt(x: dict[str, float] | None, spec: str = ".0f") -> str:
        return "not reached" if x is None else f"{x['median']:{spec}} ({x['min']:{spec}}..{x['max']:{spec}})"

    print(f"\ntarget reward {summary['target']:.3f} (η=0 {DEFAULT}: median initial {summary['initial']:.3f}, final "
          f"{summary['final']:.3f})")  # fmt: skip
    print(f"{'objective/η':<22}{'time to target s':>24}{'after 1st step s':>24}{'reached':>9}{'final reward':>24}"
          f"{'gain':>22}{'steps/min':>20}{'learner idle':>20}{'actor idle':>20}")  # fmt: skip
    for key, row in summary["table"].items():
        print(f"{key:<22}{fmt(row['time_to_target_s']):>24}{fmt(row['after_first_step_s']):>24}{row['reached']:>9}"
              f"{fmt(row['final_reward'], '.3f'):>24}{fmt(row['gain'], '+.3f'):>22}"
              f"{fmt(row['steps_per_min'], '.1f'):>20}{fmt(row['learner_idle'], '.2f'):>20}"
              f"{fmt(row['actor_idle'], '.2f'):>20}")  # fmt: skip
    ratio, after = summary["speedup_eta2"], summary["speedup_eta2_after_first_step"]
    print(f"\nRESULT speedup_eta2={'n/a' if ratio is None else f'{ratio:.2f}'} (median time to target η=0 / η=2, "
          f"{DEFAULT}; goal >= 1.8) after_first_step={'n/a' if after is None else f'{after:.2f}'} "
          f"target={summary['target']:.3f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--objectives", default="flow_grpo,grpo_guard,nft")
    p.add_argument("--etas", default="0,2")
    p.add_argument("--seeds", type=int, default=3, help=f"seeds of {DEFAULT}")
    p.add_argument("--other-seeds", type=int, default=2, help="seeds of the other objectives")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument(
        "--smooth",
        type=int,
        default=8,
        help="steps per trailing mean: a multiple of the task cycle "
        "(the quickstart's 16 tasks take 4 steps of 4 groups)",
    )
    p.add_argument("--gain", type=float, default=0.75, help="target = initial + gain x (final - initial)")
    p.add_argument("--margin", type=float, help="target = final - margin instead")
    p.add_argument("--png", help="write the curves here")
    p.add_argument("--json", help="write every number here")
    p.add_argument("--keep", help="run directories here (default: a new temp dir)")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="read runs that already finished under --keep instead of "
        "running them again (e.g. to add objectives to an earlier bench)",
    )
    args = p.parse_args(argv)
    from editrl.common.config import load_config

    quick = load_config(REPO / "configs/quickstart.yaml")  # the committed editor and the demo tasks
    import structlog

    from editrl.scripts.up import prepare

    prepare(quick, structlog.get_logger())
    root = Path(args.keep or tempfile.mkdtemp(prefix="editrl-bench-learning-"))
    root.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for objective in args.objectives.split(","):
        for eta in (int(e) for e in args.etas.split(",")):
            for seed in range(args.seeds if objective == DEFAULT else args.other_seeds):
                topo = topology(root, objective, eta, seed, Path(quick.policy.model), Path(quick.data.tasks))
                r = run_one(topo, args.steps, args.smooth, args.reuse)
                runs.setdefault((objective, eta), []).append(r)
                print(f"{r['name']}: {len(r['steps'])} steps in {r['wall_s']:.0f} s, final reward {r['final']:.3f}",
                      flush=True)  # fmt: skip
    summary = summarize(runs, args.gain, args.margin, args.smooth)
    report(summary)
    if args.png:
        plot(runs, summary["target"], Path(args.png))
    if args.json:
        out = {"summary": summary, "runs": {f"{o}/eta{e}": rs for (o, e), rs in runs.items()}, "args": vars(args)}
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
