"""Rendering ``editrl status``: the broker's process table, queues and counters as a plain-text table.

Liveness: a process started by ``editrl up`` on this host has a pid file (``<run_dir>/pids/<role>-<id>.pid``); its
``alive`` column is whether that pid runs. Processes elsewhere are judged by when the broker last heard from them:
``alive`` within ``QUIET_S`` seconds, ``quiet`` after (a long edit or a stopped process), the age shown either way.

The held-out gold row (``scorers.gold``) comes from the learner's ``<run_dir>/metrics.jsonl`` on this host: the latest
step with gold-scored groups, its ``reward/gold`` and ``reward/gap``, and the reward-hacking alarm; a learner on
another host leaves the row saying so.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil

QUIET_S = 60.0
GOLD_TAIL_BYTES = 256 * 1024  # how much of the end of metrics.jsonl is searched for the latest step with gold
COLUMNS = ("role", "id", "host", "alive", "last seen", "version", "lag", "items", "per s", "idle", "in flight")


def local_pids(run_dir: Path) -> dict[str, int]:
    """``{"actor-0": pid, ...}`` from the supervisor's pid files; {} when none."""
    out = {}
    for path in sorted((Path(run_dir) / "pids").glob("*.pid")):
        try:
            out[path.stem] = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
    return out


def _alive(row: dict[str, Any], pids: dict[str, int]) -> str:
    name = row["id"] if row["role"] != "learner" else "learner-0"
    pid = pids.get(name)
    if pid is not None:
        return "yes" if psutil.pid_exists(pid) else "NO (pid gone)"
    return "yes" if row["last_seen_s"] < QUIET_S else "quiet"


def latest_gold(run_dir: Path) -> dict[str, Any] | None:
    """The latest learner step with gold-scored groups in ``<run_dir>/metrics.jsonl`` (``step``, ``gold``, ``gap``,
    ``groups``, ``alarm``), or None when the file is absent or holds no such step in its last GOLD_TAIL_BYTES."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, 2) - GOLD_TAIL_BYTES))
            tail = f.read().decode(errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            row = json.loads(line)
            gold, gap = float(row["reward/gold"]), float(row["reward/gap"])
        except (ValueError, KeyError, TypeError):
            continue
        alarm = row.get("reward/hacking_alarm")
        return {"step": row.get("step"), "gold": gold, "gap": gap, "groups": row.get("reward/gold_groups"),
                "alarm": None if alarm is None else bool(alarm)}  # fmt: skip
    return None


def gold_line(gold: dict[str, Any] | None, metrics_here: bool) -> str:
    """The status row of the held-out gold score and the reward-hacking alarm."""
    if gold is None:
        return "gold: " + ("no gold-scored group trained yet" if metrics_here else "no metrics.jsonl on this host")
    alarm = {True: "SUSPECTED (training reward up, held-out gold down)", False: "no", None: "-"}[gold["alarm"]]
    return (f"gold: {gold['gold']:.3f} at step {gold['step']}  |  gap (train - gold) {gold['gap']:+.3f}  |  "
            f"reward hacking: {alarm}")  # fmt: skip


def render_status(processes: list[dict[str, Any]], counters: dict[str, int], weights: dict[str, Any],
                  pids: dict[str, int], gold: str | None = None) -> str:  # fmt: skip
    """The table, then one line of queue depths and one of drops (every cell from the broker's reply), then the
    ``gold`` row when given."""
    rows = [COLUMNS]
    for p in processes:
        rows.append((
            p["role"], p["id"], p.get("host") or "-", _alive(p, pids), f"{p['last_seen_s']:.1f}s",
            str(p.get("version", "-")), str(p.get("lag", "-")), str(p["items"]), f"{p['rate_per_s']:.2f}",
            f"{p['idle_ratio']:.2f}", str(p.get("in_flight", "-")),
        ))  # fmt: skip
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    if len(rows) == 1:
        lines.append("(no process has talked to the broker yet)")
    c = counters
    lines.append("")
    lines.append(
        f"weights v{weights.get('version', 0)}  |  queues: to score {c.get('queue/pending_scoring', 0)}  "
        f"scoring {c.get('queue/jobs_inflight', 0)}  ready {c.get('queue/ready', 0)}  leases {c.get('leases', 0)}  "
        f"scorers live {c.get('scorers_live', 0)}/{c.get('scorers', 0)}"
    )
    lines.append(
        f"groups: ingested {c.get('ingested', 0)}  consumed {c.get('consumed', 0)}  dropped stale "
        f"{c.get('dropped_stale', 0)}  unscorable {c.get('dropped_unscorable', 0)}  quarantined {c.get('quarantined', 0)}  "
        f"evicted {c.get('evicted', 0)}"
    )
    refused = {k.removeprefix("rejected/"): v for k, v in sorted(c.items()) if k.startswith("rejected/") and v}
    if refused:
        lines.append("refused: " + "  ".join(f"{k} {v}" for k, v in refused.items()))
    if gold is not None:
        lines.append(gold)
    return "\n".join(lines)
