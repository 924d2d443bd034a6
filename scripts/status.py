"""Rendering ``editrl status``: the broker's process table, queues and counters as a plain-text table.

Liveness: a process started by ``editrl up`` on this host has a pid file (``<run_dir>/pids/<role>-<id>.pid``); its
``alive`` column is whether that pid runs. Processes elsewhere are judged by when the broker last heard from them:
``alive`` within ``QUIET_S`` seconds, ``quiet`` after (a long edit or a stopped process), the age shown either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psutil

QUIET_S = 60.0
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


def render_status(processes: list[dict[str, Any]], counters: dict[str, int], weights: dict[str, Any],
                  pids: dict[str, int]) -> str:  # fmt: skip
    """The table, then one line of queue depths and one of drops; every cell from the broker's reply."""
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
        f"{c.get('dropped_stale', 0)}  unscorable {c.get('dropped_unscorable', 0)}  evicted {c.get('evicted', 0)}"
    )
    return "\n".join(lines)
