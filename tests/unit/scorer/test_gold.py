"""The held-out gold scorer: a stable share of the groups, gold scores beside (never instead of) the training reward,
no number for an edit gold could not score, and a failing gold backend costs only the gold scores."""

import os
import subprocess
import sys

import numpy as np
import structlog
from PIL import Image
from structlog.testing import capture_logs

from editrl.common import wire
from editrl.common.images import to_png
from editrl.scorer.backend import Score, make_backend
from editrl.scorer.gold import GoldScorer, gold_selected
from editrl.scorer.worker import score_jobs

IDS = [f"group-{i:04d}" for i in range(1000)]


def _png(rgb, noise: int = 0) -> bytes:
    rng = np.random.default_rng(noise)
    base = np.zeros((32, 32, 3), np.uint8) + np.array(rgb, np.uint8)
    if noise:
        base = np.clip(base.astype(int) + rng.integers(-40, 40, base.shape), 0, 255).astype(np.uint8)
    return to_png(Image.fromarray(base))


SOURCE = _png((120, 120, 120), noise=1)
EDITS = [_png((200, 60, 60), noise=2), _png((120, 120, 120), noise=3), _png((30, 200, 30), noise=4)]


def _job(group_id: str = "g0") -> wire.ScoreJob:
    return wire.ScoreJob(f"job-{group_id}", group_id, "make it red", "color_alter", SOURCE, list(EDITS))


def test_the_selection_is_a_stable_hash_close_to_the_share():
    chosen = [gid for gid in IDS if gold_selected(gid, 0.25)]
    assert 200 <= len(chosen) <= 300  # 1000 ids at share 0.25
    assert all(gold_selected(gid, 1.0) for gid in IDS)
    assert set(chosen) <= {gid for gid in IDS if gold_selected(gid, 0.5)}  # a larger share keeps the smaller's groups
    # another interpreter with another string-hash seed picks exactly the same groups (not Python's hash())
    code = "from editrl.scorer.gold import gold_selected as s; print(','.join(str(int(s(f'group-{i:04d}', 0.25))) for i in range(1000)))"  # noqa: E501
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert [gid for gid, bit in zip(IDS, out.strip().split(","), strict=True) if bit == "1"] == chosen


def test_gold_from_a_second_metric_sits_beside_the_unchanged_training_reward():
    train, gold_backend = make_backend({"backend": "metric"}), make_backend({"backend": "metric", "sc_center": 0.3})
    log = structlog.get_logger()
    plain = score_jobs(train, [_job()], "scorer-0", log)[0]
    gold = GoldScorer(gold_backend, 1.0, log)
    with_gold = score_jobs(train, [_job()], "scorer-0", log, gold)[0]
    assert with_gold.overall == plain.overall and with_gold.scored == plain.scored  # the training reward as before
    expected = score_jobs(gold_backend, [_job()], "scorer-0", log)[0].overall
    assert [s[wire.GOLD_SUB_SCORE] for s in with_gold.sub_scores] == expected
    assert expected != plain.overall  # a different judge, really
    for subs, before in zip(with_gold.sub_scores, plain.sub_scores, strict=True):
        assert {k: v for k, v in subs.items() if k != wire.GOLD_SUB_SCORE} == before
    assert gold.groups == 1 and gold.failures == 0


class PartlyUnscored:
    name = "partly"

    def score(self, request):
        return [Score.unscored("no verdict")] + [Score(True, 4.0) for _ in request.edits[1:]]


class Broken:
    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    def score(self, request):
        self.calls += 1
        raise RuntimeError("gold judge crashed")


class ClaimsGold:
    name = "claims_gold"

    def score(self, request):
        return [Score(True, 5.0, {"gold": 9.0, "SC": 5.0}) for _ in request.edits]


def test_unselected_groups_and_unscored_gold_edits_carry_no_gold_number():
    log = structlog.get_logger()
    train = make_backend({"backend": "metric"})
    gold = GoldScorer(PartlyUnscored(), 1.0, log)
    result = score_jobs(train, [_job()], "scorer-0", log, gold)[0]
    assert [wire.GOLD_SUB_SCORE in s for s in result.sub_scores] == [False, True, True]  # no key, never a 0
    assert result.sub_scores[1][wire.GOLD_SUB_SCORE] == 4.0
    unselected = next(gid for gid in IDS if not gold_selected(gid, 0.25))
    gold = GoldScorer(PartlyUnscored(), 0.25, log)
    result = score_jobs(train, [_job(unselected)], "scorer-0", log, gold)[0]
    assert not any(wire.GOLD_SUB_SCORE in s for s in result.sub_scores) and gold.groups == 0
    # a training backend's own "gold" sub-score is dropped: the key means the held-out scorer only
    result = score_jobs(ClaimsGold(), [_job(unselected)], "scorer-0", log)[0]
    assert result.sub_scores[0] == {"SC": 5.0}


def test_a_failing_gold_backend_keeps_the_training_scores_and_is_counted():
    log = structlog.get_logger()
    train = make_backend({"backend": "metric"})
    plain = score_jobs(train, [_job("a"), _job("b")], "scorer-0", log)
    broken = Broken()
    gold = GoldScorer(broken, 1.0, log)
    with capture_logs() as logs:
        results = score_jobs(train, [_job("a"), _job("b")], "scorer-0", log, gold)
    assert [r.overall for r in results] == [r.overall for r in plain] and all(all(r.scored) for r in results)
    assert not any(wire.GOLD_SUB_SCORE in s for r in results for s in r.sub_scores)
    assert gold.failures == 1 and broken.calls == 1
    failed = [e for e in logs if e["event"] == "gold_failed"]
    assert failed and "gold judge crashed" in failed[0]["error"] and failed[0]["group_ids"] == ["a", "b"]


def test_an_unscored_training_result_gets_no_gold_call():
    log = structlog.get_logger()
    gold = GoldScorer(PartlyUnscored(), 1.0, log)
    job = wire.ScoreJob("j", "g", "make it purple-ish and darker and brighter", "color_alter", SOURCE, list(EDITS))
    result = score_jobs(make_backend({"backend": "metric"}), [job], "scorer-0", log, gold)[0]
    assert result.overall == [None] * 3 and gold.groups == 0
