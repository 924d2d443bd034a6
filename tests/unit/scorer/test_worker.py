"""The scorer worker packs several groups into one backend call and never turns a failure into a number."""

import structlog
from PIL import Image

from editrl.common import wire
from editrl.common.images import to_png
from editrl.scorer.backend import Score
from editrl.scorer.worker import score_jobs

PNG = to_png(Image.new("RGB", (8, 8), (200, 10, 10)))


def _job(i: int, edits: int = 2, png: bytes = PNG) -> wire.ScoreJob:
    return wire.ScoreJob(f"j{i}", f"g{i}", "make it red", "color_alter", PNG, [png] * edits)


class Batching:
    name = "batching"

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def score(self, request):
        return self.score_many([request])[0]

    def score_many(self, requests):
        self.calls.append([r.group_id for r in requests])
        return [[Score(True, float(i), {"i": float(i)}, "ok") for i, _ in enumerate(r.edits)] for r in requests]


def test_groups_are_scored_together_in_order_and_bad_images_are_unscored():
    backend = Batching()
    jobs = [_job(0), _job(1, png=b"not a png"), _job(2, edits=3)]
    results = score_jobs(backend, jobs, "scorer-0", structlog.get_logger())
    assert backend.calls == [["g0", "g2"]]  # one call for both readable groups
    assert [r.job_id for r in results] == ["j0", "j1", "j2"]
    assert results[0].overall == [0.0, 1.0] and results[2].overall == [0.0, 1.0, 2.0]
    assert results[1].scored == [False, False] and results[1].overall == [None, None]


def test_a_backend_failure_leaves_every_edit_unscored():
    class Broken(Batching):
        def score_many(self, requests):
            raise RuntimeError("judge crashed")

    results = score_jobs(Broken(), [_job(0), _job(1)], "scorer-0", structlog.get_logger())
    assert all(r.overall == [None, None] and "judge crashed" in r.reasoning[0] for r in results)
