"""The held-out ("gold") scorer: a second backend, configured as ``scorers.gold``, that judges a share of the groups
next to the training backend. The policy is never trained on it; the learner compares it with the training reward
(the reward-hacking alarm, :mod:`editrl.learner.gold`).

Which groups: a stable hash of the group id (the first 8 bytes of its sha256 as a fraction of 2^64) below
``share``. Every scorer process, a restarted one and a requeued job agree on it, so a group is gold-scored or not
whoever scores it, and the extra load is ``share`` of the gold backend's cost.

Where it goes: each edit whose gold Score is scored gets its gold overall in its sub-scores under
:data:`editrl.common.wire.GOLD_SUB_SCORE` (``"gold"``); the training reward (``overall``) is untouched. An edit the
gold backend leaves unscored has no gold key: no number is made up, and no 0.

Failure model: a gold backend that raises, or returns the wrong number of scores, costs only the gold scores of
that call. The training results are sent as they are, the failure is logged (``gold_failed``) and counted
(``failures``, reported in the scorer's ``scorer_stopped`` line).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from editrl.common import wire
from editrl.scorer.backend import Score, ScoreBackend, ScoreRequest


def gold_selected(group_id: str, share: float) -> bool:
    """Whether the group with this id is also gold-scored: deterministic across processes (never Python's hash())."""
    digest = hashlib.sha256(group_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < share


class GoldScorer:
    """Attaches gold scores to the training results of the selected groups (see the module docstring)."""

    def __init__(self, backend: ScoreBackend, share: float, log: Any) -> None:
        self.backend, self.share, self.log = backend, share, log
        self.groups = 0  # groups gold-scored
        self.failures = 0  # gold backend calls that failed (their groups went out without gold)

    def attach(self, pairs: list[tuple[ScoreRequest, wire.ScoreResult]]) -> None:
        """Gold-score the selected groups among ``pairs`` (a request and its training result, all edits scored) in one
        backend call, and put each scored edit's gold overall in that edit's sub-scores."""
        chosen = [(req, res) for req, res in pairs if gold_selected(req.group_id, self.share)]
        if not chosen:
            return
        requests = [req for req, _ in chosen]
        try:
            many = getattr(self.backend, "score_many", None)
            all_scores = (
                many(requests) if many is not None and len(requests) > 1 else [self.backend.score(r) for r in requests]
            )
        except Exception as exc:  # the gold judge must never cost the training score
            self._failed([req.group_id for req in requests], str(exc))
            return
        if not isinstance(all_scores, list) or len(all_scores) != len(chosen):
            self._failed([req.group_id for req in requests], "gold backend returned the wrong number of groups")
            return
        for (req, res), scores in zip(chosen, all_scores, strict=True):
            if isinstance(scores, Exception) or len(scores) != len(req.edits):
                reason = str(scores) if isinstance(scores, Exception) else f"gold backend returned {len(scores)} scores"
                self._failed([req.group_id], reason)
                continue
            self.groups += 1
            for subs, score in zip(res.sub_scores, scores, strict=True):
                if _usable(score):
                    subs[wire.GOLD_SUB_SCORE] = float(score.overall)  # type: ignore[arg-type]

    def _failed(self, group_ids: list[str], reason: str) -> None:
        self.failures += 1
        self.log.warning("gold_failed", group_ids=group_ids, error=reason[:200], failures=self.failures)


def _usable(score: Any) -> bool:
    """A scored gold Score with a finite number (anything else leaves the edit without a gold key)."""
    return isinstance(score, Score) and score.scored and score.overall is not None and math.isfinite(score.overall)
