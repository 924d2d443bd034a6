"""CompositeBackend: expression arithmetic on fixed sub-scores, parse errors naming the path, unscored propagation,
and a real metric + stub composite on small PIL images.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from PIL import Image

from editrl.scorer import backend as backend_module
from editrl.scorer.backend import Score, ScoreRequest, make_backend, register_backend
from editrl.scorer.composite import CompositeBackend

STUB = "test_composite_stub"


class StubBackend:
    """Returns the same fixed Score for every edit; ``overall=None`` means unscored."""

    name = STUB

    def __init__(self, overall: float | None = 5.0, sub_scores: dict[str, float] | None = None) -> None:
        self.overall = overall
        self.sub_scores = dict(sub_scores or {})

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> StubBackend:
        return cls(**options)

    def score(self, request: ScoreRequest) -> list[Score]:
        if self.overall is None:
            return [Score.unscored("stub says no") for _ in request.edits]
        return [Score(True, self.overall, dict(self.sub_scores), "stub") for _ in request.edits]


@pytest.fixture(autouse=True)
def stub_registered() -> Iterator[None]:
    register_backend(STUB, StubBackend.from_options)
    yield
    backend_module._BACKENDS.pop(STUB)


def image(rgb: tuple[int, int, int], size: int = 32) -> Image.Image:
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.zeros((size, size, 3), dtype=np.float64) + rgb
    pixels += 40 * ((xx // 8 + yy // 8) % 2)[..., None]  # a checkerboard so SSIM has structure
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def request(n_edits: int = 2, instruction: str = "make it red") -> ScoreRequest:
    return ScoreRequest("g0", instruction, "color_alter", image((100, 100, 100)), [image((100, 100, 100))] * n_edits)


def stub(overall: float | None = 5.0, **sub_scores: float) -> dict[str, Any]:
    return {"backend": STUB, "overall": overall, "sub_scores": sub_scores}


def composite(overall: Any, **parts: dict[str, Any]) -> CompositeBackend:
    backend = make_backend({"backend": "composite", "parts": parts, "overall": overall})
    assert isinstance(backend, CompositeBackend)
    return backend


def one(backend: CompositeBackend) -> Score:
    scores = backend.score(request())
    assert len(scores) == 2 and scores[0] == scores[1]
    return scores[0]


def test_weighted_product_sqrt_min_clip_on_fixed_sub_scores() -> None:
    a, b = stub(6.0, SC=4.0, PQ=9.0), stub(8.0, X=2.0)
    weighted = one(composite({"weighted": [[0.25, "a.SC"], [0.5, "b"], [0.25, 2]]}, a=a, b=b))
    assert weighted.scored and weighted.overall == pytest.approx(0.25 * 4 + 0.5 * 8 + 0.25 * 2)
    assert weighted.sub_scores == {"a.SC": 4.0, "a.PQ": 9.0, "b.X": 2.0}
    assert one(composite({"product": ["a.SC", "b.X", 0.5]}, a=a, b=b)).overall == pytest.approx(4.0)
    assert one(composite({"sqrt": {"min": ["a.PQ", "a"]}}, a=a)).overall == pytest.approx(math.sqrt(6.0))
    assert one(composite({"sqrt": {"product": ["a.SC", "a.PQ"]}}, a=a)).overall == pytest.approx(6.0)
    assert one(composite({"clip": [0, 10, {"sum": ["a.PQ", "b.X"]}]}, a=a, b=b)).overall == 10.0
    assert one(composite({"max": ["b.X", {"scale": [0.5, "a.SC"]}]}, a=a, b=b)).overall == 2.0
    assert one(composite(3, a=a)).overall == 3.0


def test_parse_errors_name_the_path() -> None:
    a = stub(SC=1.0)
    cases = [
        ({"weighted": [[1, "a.SC"], [1, "x"]]}, r"overall\.weighted\[1\]\[1\]: unknown part 'x'"),
        ({"weighted": [[1, "a.SC"], ["w", "a"]]}, r"overall\.weighted\[1\]\[0\]: expected a finite number"),
        ({"sum": ["a", {"mean": ["a"]}]}, r"overall\.sum\[1\]: unknown operator 'mean'; allowed: clip"),
        ({"clip": [0, 10]}, r"overall\.clip: expected a list of 3 items, got 2"),
        ({"clip": [5, 1, "a"]}, r"overall\.clip: lo 5\.0 is greater than hi 1\.0"),
        ({"scale": [2, {"sqrt": "y.SC"}]}, r"overall\.scale\[1\]\.sqrt: unknown part 'y'"),
        ({"min": []}, r"overall\.min: expected a non-empty list"),
        ({"sum": ["a"], "max": ["a"]}, r"overall: an operator mapping needs exactly one key"),
        (True, r"overall: expected a finite number, got True"),
        ("a.", r"overall: empty sub-score name"),
        ([1, 2], r"overall: expected a number, a name or a one-key operator mapping"),
    ]
    for spec, message in cases:
        with pytest.raises(ValueError, match=message):
            composite(spec, a=a)
    with pytest.raises(ValueError, match=r"unknown composite backend options \['weights'\]"):
        make_backend({"backend": "composite", "parts": {"a": a}, "overall": "a", "weights": 1})
    with pytest.raises(ValueError, match=r"options \['overall'\] are required"):
        make_backend({"backend": "composite", "parts": {"a": a}})
    with pytest.raises(ValueError, match=r"parts\.m: unknown score backend 'nope'"):
        composite("m", m={"backend": "nope"})
    with pytest.raises(ValueError, match=r"part names must be non-empty strings without '\.'"):
        composite("a", **{"a.b": a})


def test_unscored_referenced_part_or_missing_sub_score_makes_the_edit_unscored() -> None:
    ok, bad = stub(5.0, SC=5.0), stub(None)
    score = one(composite({"sum": ["ok", "bad.SC"]}, ok=ok, bad=bad))
    assert not score.scored and score.overall is None
    assert "part 'bad' left the edit unscored: stub says no" in score.reasoning
    missing = one(composite("ok.PQ", ok=ok))
    assert not missing.scored and "part 'ok' has no sub-score 'PQ' (has: SC)" in missing.reasoning
    # A part the expression does not read cannot make the edit unscored.
    assert one(composite("ok.SC", ok=ok, bad=bad)).overall == 5.0


def test_out_of_range_or_non_finite_result_is_unscored_never_clamped() -> None:
    a = stub(8.0, SC=8.0, PQ=9.0)
    too_high = one(composite({"sum": ["a.SC", "a.PQ"]}, a=a))
    assert not too_high.scored and "overall 17 is outside [0, 10]" in too_high.reasoning
    negative = one(composite({"scale": [-1, "a"]}, a=a))
    assert not negative.scored and "outside [0, 10]" in negative.reasoning
    nan = one(composite({"sqrt": {"scale": [-1, "a"]}}, a=a))
    assert not nan.scored and "not finite" in nan.reasoning
    rounding = one(composite({"scale": [1.0000000000000002, "a.PQ"]}, a=stub(PQ=10.0)))  # 10.000000000000002
    assert rounding.scored and rounding.overall == 10.0  # float rounding only is snapped onto the range


def test_real_metric_part_on_pil_images() -> None:
    source = image((100, 100, 100))
    redder = image((170, 70, 70))
    req = ScoreRequest("g1", "make it red", "color_alter", source, [source, redder])
    backend = composite(
        {"weighted": [[0.5, {"sqrt": {"product": ["m.SC", "m.PQ"]}}], [0.5, "s.Q"]]},
        m={"backend": "metric"},
        s=stub(Q=10.0),
    )
    metric_scores = make_backend({"backend": "metric"}).score(req)
    scores = backend.score(req)
    for metric, score in zip(metric_scores, scores, strict=True):
        assert score.scored and metric.overall is not None
        assert score.overall == pytest.approx(0.5 * metric.overall + 5.0)
        assert score.sub_scores["m.SC"] == metric.sub_scores["SC"] and score.sub_scores["s.Q"] == 10.0
        assert score.sub_scores["m.ssim"] == pytest.approx(metric.sub_scores["ssim"])
    assert scores[1].overall > scores[0].overall  # the red edit beats the unchanged one
    unscored = backend.score(ScoreRequest("g2", "make it nicer", "other", source, [redder]))
    assert not unscored[0].scored and "part 'm' left the edit unscored" in unscored[0].reasoning
    assert backend.score(ScoreRequest("g3", "make it red", "color_alter", source, [])) == []
