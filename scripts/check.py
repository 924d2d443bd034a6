"""``editrl check topo.yaml``: send a known workload through the LIVE broker and scorer pool and check the answers.

The workload is bundled (built procedurally, deterministic): for each of N source images, the instruction "make it
red" with four edits — unchanged, red-shifted, blue-shifted, darker. Nothing is stored in the replay (CheckGroup
messages are scored and answered, never committed). Asserts that every group comes back, for the right group, with
one score per edit, every edit scored and 0 ≤ overall ≤ 10; reports latency percentiles and images/s. With the
``metric`` backend it also asserts that the red-shifted edit beats the blue-shifted one (the scorer can tell).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
from PIL import Image

from editrl.common import wire
from editrl.common.config import TopologyConfig
from editrl.common.images import to_png
from editrl.common.net import BrokerClient, new_id

EDIT_NAMES = ("unchanged", "red", "blue", "darker")


def workload(n_groups: int, size: int = 64, seed: int = 0) -> list[wire.CheckGroup]:
    rng = np.random.default_rng(seed)
    groups = []
    for i in range(n_groups):
        base = rng.integers(60, 190, size=3)
        img = np.tile(base, (size, size, 1)).astype(np.float32)
        yy, xx = np.mgrid[:size, :size]
        cx, cy, r = rng.integers(size // 4, 3 * size // 4, size=3)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 < (r // 2 + 4) ** 2] = rng.integers(0, 255, size=3)
        shifts = {
            "unchanged": img,
            "red": img + np.array([70, -30, -30]),
            "blue": img + np.array([-30, -30, 70]),
            "darker": img * 0.5,
        }
        pngs = [to_png(Image.fromarray(np.clip(shifts[n], 0, 255).astype(np.uint8))) for n in EDIT_NAMES]
        source = to_png(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)))
        groups.append(wire.CheckGroup(new_id(), f"check-{i:04d}", "make it red", "color_alter", source, pngs))
    return groups


@dataclass
class CheckReport:
    groups: int = 0
    images: int = 0
    failures: list[str] = field(default_factory=list)
    latencies_s: list[float] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat = sorted(self.latencies_s) or [math.nan]
        return {
            "groups": self.groups,
            "images": self.images,
            "ok": not self.failures,
            "failures": self.failures[:20],
            "latency_p50_s": round(statistics.median(lat), 4),
            "latency_p95_s": round(lat[min(len(lat) - 1, int(0.95 * len(lat)))], 4),
            "images_per_s": round(self.images / self.wall_s, 2) if self.wall_s else 0.0,
        }


def run_check(cfg: TopologyConfig, n_groups: int = 8, timeout_s: float = 60.0) -> CheckReport:
    report = CheckReport()
    client = BrokerClient(zmq.Context(), cfg.broker.endpoint, "check", timeout_s, cfg.security, role="tool")
    t_start = time.monotonic()
    try:
        for group in workload(n_groups):
            t0 = time.monotonic()
            reply = client.request(group, retries=1)  # one resend (same ids) survives a broker restart
            report.latencies_s.append(time.monotonic() - t0)
            report.groups += 1
            report.images += len(group.edit_pngs)
            report.failures += _verify(group, reply, cfg.scorers.backend)
    finally:
        client.close()
    report.wall_s = time.monotonic() - t_start
    return report


def _verify(group: wire.CheckGroup, reply: Any, backend: str) -> list[str]:
    where = group.group_id
    if not isinstance(reply, wire.CheckResult) or reply.group_id != group.group_id:
        return [f"{where}: wrong reply {type(reply).__name__}"]
    if len(reply.overall) != len(group.edit_pngs):
        return [f"{where}: {len(reply.overall)} scores for {len(group.edit_pngs)} edits"]
    out = []
    for name, scored, value, why in zip(EDIT_NAMES, reply.scored, reply.overall, reply.reasoning, strict=True):
        if not scored or value is None:
            out.append(f"{where}/{name}: unscored ({why[:80]})")
        elif not 0.0 <= value <= 10.0:
            out.append(f"{where}/{name}: overall {value} outside 0..10")
    if not out and backend == "metric" and not reply.overall[1] > reply.overall[2]:
        out.append(f"{where}: red edit {reply.overall[1]:.2f} not above blue edit {reply.overall[2]:.2f}")
    return out
