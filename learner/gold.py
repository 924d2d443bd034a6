"""The reward-hacking alarm: the training reward against a held-out ("gold") score the policy is never trained on.

A gold scorer (``scorers.gold``, :mod:`editrl.scorer.gold`) judges a share of the groups; the broker hands its
per-edit scores to the learner with the batch. Per group with gold, :func:`group_pair` takes the training reward
and the gold score over the SAME edits (those the gold backend scored). Per learner step the loop logs
``reward/gold`` (mean gold of the step's gold-scored groups), ``reward/gap`` (their training reward minus their gold,
same groups, same edits) and ``reward/gold_groups``; on a step without any gold-scored group these keys are absent,
never 0.

The alarm (:class:`HackingAlarm`) keeps the per-step history of gold-scored groups. It compares the *recent* window
(the latest steps holding at least ``window`` gold-scored groups) with every earlier *reference* window: the
consecutive blocks of at least ``window`` groups that end before the recent window starts. It fires when, since one
of them, the training reward rose by more than ``min_rise`` while the gold score fell by more than ``min_fall``: the
policy found something the training scorer likes and the held-out one does not. (The usual shape of a hack: the
training reward rises fast and plateaus while gold keeps falling, so the reference that shows it is often the first
block, not the best-gold one.) The reference reported is the one with the largest gold fall among those that fire;
without an alarm, the highest-gold block. Both rising is learning; gold falling alone, or the training reward falling
with it, is not what this alarm is for.

Limits: the gap is meaningful only when both scorers use the same 0-10 scale; the alarm sees only what the gold
scorer sees (a hack both scorers fall for is invisible), and it needs 2 x ``window`` gold-scored groups before it can
fire. After a restart the history is read back from ``metrics.jsonl``, so the alarm continues where it stopped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def group_pair(rewards: np.ndarray, gold: Sequence[float | None]) -> tuple[float, float] | None:
    """(training reward, gold score) of one group, both means over the edits the gold scorer scored; None if none."""
    idx = [i for i, g in enumerate(gold) if g is not None]
    if not idx:
        return None
    return float(np.mean([rewards[i] for i in idx])), float(np.mean([gold[i] for i in idx]))


@dataclass
class Window:
    """Means over the gold-scored groups of learner steps ``first_step..last_step`` (``n`` groups)."""

    n: int
    train: float
    gold: float
    first_step: int
    last_step: int


@dataclass
class Verdict:
    active: bool  # training reward up and gold down beyond the thresholds (recent vs reference)
    changed: bool  # active differs from the previous verdict (log once per transition)
    recent: Window | None
    reference: Window | None


class HackingAlarm:
    """See the module docstring. ``add`` once per learner step that had gold-scored groups."""

    def __init__(self, window: int, min_rise: float, min_fall: float) -> None:
        self.window, self.min_rise, self.min_fall = window, min_rise, min_fall
        self.steps: list[tuple[int, int, float, float]] = []  # (step, groups, sum of train means, sum of gold means)
        self.blocks: list[Window] = []  # consecutive blocks of >= window groups, oldest first
        self.best: list[int] = []  # best[k]: index of the highest-gold block among blocks[0..k]
        self._open: list[float] = [0, 0.0, 0.0]  # the block being filled: groups, train sum, gold sum
        self._open_first = 0
        self.active = False

    def add(self, step: int, n: int, train_mean: float, gold_mean: float) -> Verdict:
        """Record a step's ``n`` gold-scored groups (their mean training reward and mean gold) and judge."""
        if n <= 0:
            raise ValueError("a step without gold-scored groups is not added")
        self.steps.append((step, n, train_mean * n, gold_mean * n))
        if self._open[0] == 0:
            self._open_first = step
        self._open = [self._open[0] + n, self._open[1] + train_mean * n, self._open[2] + gold_mean * n]
        if self._open[0] >= self.window:
            groups, train, gold = self._open
            self.blocks.append(Window(int(groups), train / groups, gold / groups, self._open_first, step))
            k = len(self.blocks) - 1
            self.best.append(k if not self.best or self.blocks[k].gold > self.blocks[self.best[-1]].gold else
                             self.best[-1])  # fmt: skip
            self._open = [0, 0.0, 0.0]
        recent, reference = self._recent(), None
        active = False
        if recent is not None:
            k = len(self.blocks) - 1
            while k >= 0 and self.blocks[k].last_step >= recent.first_step:
                k -= 1
            firing = [
                b
                for b in self.blocks[: k + 1]
                if recent.train - b.train > self.min_rise and b.gold - recent.gold > self.min_fall
            ]
            active = bool(firing)
            if firing:
                reference = max(firing, key=lambda b: b.gold)
            elif k >= 0:
                reference = self.blocks[self.best[k]]
        changed, self.active = active != self.active, active
        return Verdict(active, changed, recent, reference)

    def _recent(self) -> Window | None:
        groups, train, gold = 0, 0.0, 0.0
        for step, n, t, g in reversed(self.steps):
            groups, train, gold = groups + n, train + t, gold + g
            if groups >= self.window:
                return Window(groups, train / groups, gold / groups, step, self.steps[-1][0])
        return None


def load_history(metrics: Path, upto_step: int) -> list[tuple[int, int, float, float]]:
    """``(step, gold groups, train mean, gold mean)`` of every step <= ``upto_step`` with gold in a run's
    ``metrics.jsonl`` (the last line of a step wins: a resumed run rewrites the steps after its checkpoint)."""
    rows: dict[int, tuple[int, int, float, float]] = {}
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            row = json.loads(line)
            step, n = int(row["step"]), int(row["reward/gold_groups"])
            gold, gap = float(row["reward/gold"]), float(row["reward/gap"])
        except (ValueError, KeyError, TypeError):
            continue  # a step without gold, or a torn last line
        if step <= upto_step and n > 0:
            rows[step] = (step, n, gold + gap, gold)
    return [rows[s] for s in sorted(rows)]
