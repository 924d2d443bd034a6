"""What the broker knows about every process that talks to it, for ``editrl status``.

Every valid message updates the sender's row: its role and id (from the message: ``actor_id``, ``worker_id``, the
learner rank), the host it connects from, when it was first and last heard from, how many items it produced (groups
sent, score jobs answered, learner steps asked for), how often and how long it was told to wait (admission control
for actors, no ready groups for learner ranks), and the weight version it works with. Rows live in memory only: after
a broker restart they fill again as processes talk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from editrl.common import wire


@dataclass
class ProcessInfo:
    role: str
    id: str
    host: str = ""
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    items: int = 0  # actor: groups sent; scorer: jobs answered; learner: steps asked for
    waits: int = 0
    wait_s: float = 0.0
    version: int | None = None  # actor: version of its last group; learner rank 0: last published version
    step: int | None = None  # learner: the step it asks groups for


def _sender(msg: Any) -> tuple[str, str] | None:
    """(role, id) of the process that sent ``msg``; None for command-line clients (status, check)."""
    if isinstance(msg, wire.LeaseRequest | wire.RolloutGroup | wire.SkipTask):
        return "actor", msg.actor_id
    if isinstance(msg, wire.ScorerReady | wire.Heartbeat | wire.ScoreResult):
        return "scorer", msg.worker_id
    if isinstance(msg, wire.SampleRequest):
        return "learner", f"learner-{msg.rank}"
    if isinstance(msg, wire.PublishWeights):
        return "learner", "learner-0"
    return None


class ProcessTable:
    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], ProcessInfo] = {}

    def seen(self, msg: Any, host: str = "") -> None:
        sender = _sender(msg)
        if sender is None:
            return
        row = self.rows.get(sender)
        if row is None:
            row = self.rows[sender] = ProcessInfo(*sender)
        row.last_seen = time.time()
        row.host = host or row.host
        if isinstance(msg, wire.RolloutGroup):
            row.items += 1
            row.version = msg.policy_version
        elif isinstance(msg, wire.ScoreResult):
            row.items += 1
        elif isinstance(msg, wire.SampleRequest):
            if msg.step != row.step:
                row.items += 1
            row.step = msg.step
        elif isinstance(msg, wire.PublishWeights):
            version = msg.weights.get("version")  # not validated yet here: a bad map is rejected by the broker later
            if isinstance(version, int) and not isinstance(version, bool):
                row.version = version

    def waited(self, msg: Any, retry_after_s: float) -> None:
        sender = _sender(msg)
        if sender is not None and sender in self.rows:
            self.rows[sender].waits += 1
            self.rows[sender].wait_s += retry_after_s

    def snapshot(self, weights_version: int, in_flight: dict[str, int] | None = None) -> list[dict[str, Any]]:
        """One plain row per process (sorted by role, id): ages in seconds, rates per second, lag in versions."""
        now = time.time()
        out = []
        for (role, pid), r in sorted(self.rows.items()):
            alive_for = max(r.last_seen - r.first_seen, 1e-9)
            row: dict[str, Any] = {
                "role": role,
                "id": pid,
                "host": r.host,
                "last_seen_s": round(now - r.last_seen, 2),
                "items": r.items,
                "rate_per_s": round(r.items / alive_for, 3) if r.items else 0.0,
                "idle_ratio": round(min(1.0, r.wait_s / alive_for), 3),
                "waits": r.waits,
            }
            if r.version is not None:
                row["version"] = r.version
                if role == "actor":
                    row["lag"] = weights_version - r.version  # how many versions behind the latest the actor runs
            if r.step is not None:
                row["step"] = r.step
            if role == "scorer" and in_flight is not None:
                row["in_flight"] = in_flight.get(pid, 0)
            out.append(row)
        return out
