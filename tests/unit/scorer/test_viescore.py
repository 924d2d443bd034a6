"""Tests for the VIEScore prompts, the judge-reply parser and the VIEScore / EditScore Avg@K arithmetic."""

from __future__ import annotations

import math

import pytest
from PIL import Image

from editrl.scorer.viescore import JudgeParseError, avg_at_k, build_prompts, overall, parse_scores


@pytest.mark.parametrize(
    ("reply", "scores", "reasoning"),
    [
        ('{"reasoning": "The sky is now red.", "score": [7, 8]}', [7.0, 8.0], "The sky is now red."),
        ('```json\n{"reasoning": "ok", "score": [6, 9]}\n```', [6.0, 9.0], "ok"),
        ('Here is my review.\n{"reasoning": "fine", "score": [3, 10]}\nHope this helps!', [3.0, 10.0], "fine"),
        ("{'reasoning': 'single quotes', 'score': [5, 4]}", [5.0, 4.0], "single quotes"),
        ('{"reasoning": "trailing", "score": [2, 1,],}', [2.0, 1.0], "trailing"),
        ("{'reasoning': 'it's broken', 'score': [8, 7]}", [8.0, 7.0], "it's broken"),
        ('{"reasoning": "the "cat" is red", "score": [9, 2]}', [9.0, 2.0], 'the "cat" is red'),
        ("[7, 8]", [7.0, 8.0], ""),
        ("Scores: [0, 10]", [0.0, 10.0], ""),
        ('{"reasoning": "halves", "score": [7.5, "8"]}', [7.5, 8.0], "halves"),
        ('{"score": [0, 0], "reasoning": "score first"}', [0.0, 0.0], "score first"),
    ],
)
def test_parse_accepts_tolerated_shapes(reply: str, scores: list[float], reasoning: str) -> None:
    parsed = parse_scores(reply)
    assert parsed.scores == scores
    assert parsed.reasoning == reasoning


def test_parse_scalar_score_only_when_one_is_expected() -> None:
    assert parse_scores('{"reasoning": "r", "score": 7}', n_expected=1).scores == [7.0]
    with pytest.raises(JudgeParseError, match="expected 2 scores, got 1"):
        parse_scores('{"reasoning": "r", "score": 7}', n_expected=2)


@pytest.mark.parametrize(
    ("reply", "reason"),
    [
        ('{"reasoning": "r", "score": [7]}', "expected 2 scores, got 1"),
        ('{"reasoning": "r", "score": [7, 8, 9]}', "expected 2 scores, got 3"),
        ('{"reasoning": "r", "score": [11, 8]}', r"outside \[0, 10\]"),
        ('{"reasoning": "r", "score": [-1, 8]}', r"outside \[0, 10\]"),
        ('{"reasoning": "r", "score": [NaN, 8]}', "not finite"),
        ('{"reasoning": "r", "score": ["high", 8]}', "not a number"),
        ('{"reasoning": "r", "score": [true, 8]}', "boolean"),
        ('{"reasoning": "no score here"}', "no 'score' field"),
        ("", "empty judge reply"),
        ("   \n", "empty judge reply"),
        (None, "empty judge reply"),
        ("I'm sorry, but I can't help with evaluating this image.", "no score found"),
        ("first [1, 2] then [3, 4]", r"ambiguous reply: 2 different score lists \(\[1, 2\] vs \[3, 4\]\)"),
    ],
)
def test_parse_rejects_instead_of_guessing(reply: str | None, reason: str) -> None:
    with pytest.raises(JudgeParseError, match=reason):
        parse_scores(reply)


GUESS_THEN_CORRECTION = (
    "My first impression is [6, 7]: the sky is red. Looking again, the horizon has a seam, so:\n"
    '```json\n{"reasoning": "The sky is red but a seam runs along the horizon.", "score": [4, 7]}\n```'
)


@pytest.mark.parametrize(
    ("reply", "lists"),
    [
        ('{"reasoning": "a", "score": [6, 7]}\n{"reasoning": "b", "score": [4, 7]}', "[6, 7] vs [4, 7]"),
        (GUESS_THEN_CORRECTION, "[6, 7] vs [4, 7]"),
        (
            '```json\n{"reasoning": "a", "score": [6, 7]}\n```\nCorrection:\n```\n{"score": [5, 7]}\n```',
            "[6, 7] vs [5, 7]",
        ),
        (
            '{"reasoning": "the "cat" is red", "score": [9, 2]} No: {"reasoning": "x", "score": [3, 2]}',
            "[9, 2] vs [3, 2]",
        ),
        ('{"reasoning": "ok", "score": [7, 8]} Final answer: [7, 9]', "[7, 8] vs [7, 9]"),
        ("{'reasoning': 'a', 'score': [6, 7]} {'reasoning': 'b', 'score': [6, 7.5]}", "[6, 7] vs [6, 7.5]"),
    ],
)
def test_two_different_score_lists_are_ambiguous_never_the_first_one(reply: str, lists: str) -> None:
    with pytest.raises(JudgeParseError) as caught:
        parse_scores(reply)
    assert caught.value.reason == f"ambiguous reply: 2 different score lists ({lists})"


def test_ambiguity_is_checked_before_the_lists_are_validated() -> None:
    with pytest.raises(JudgeParseError, match="ambiguous reply: 2 different score lists"):
        parse_scores('{"reasoning": "a", "score": [11, 8]} {"reasoning": "b", "score": [9, 8]}')
    with pytest.raises(JudgeParseError, match=r"ambiguous reply: 4 different score lists \(.* vs \.\.\.\)"):
        parse_scores("[1, 2] [3, 4] [5, 6] [7, 8]")


@pytest.mark.parametrize(
    ("reply", "reasoning"),
    [
        ('{"reasoning": "a", "score": [6, 7]}\n{"reasoning": "b", "score": [6, 7]}', "a"),
        ('{"score": [6, 7], "reasoning": "a"} {"score": [6.0, "7"], "reasoning": "b"}', "a"),
        (
            '```json\n{"reasoning": "a", "score": [6, 7]}\n```\nAgain:\n```json\n{"reasoning": "a", "score": [6, 7]}\n```',
            "a",
        ),
        ('{"reasoning": "ok", "score": [6, 7]} So my scores are [6, 7].', "ok"),
        ("I would say [6, 7]. [6.0, 7]", ""),
    ],
)
def test_the_same_score_list_repeated_is_scored(reply: str, reasoning: str) -> None:
    parsed = parse_scores(reply)
    assert parsed.scores == [6.0, 7.0]
    assert parsed.reasoning == reasoning


@pytest.mark.parametrize(
    ("reply", "scores"),
    [
        ('{"reasoning": "I first thought [6, 7], then saw the seam", "score": [4, 7]}', [4.0, 7.0]),
        ('{"reasoning": "the wall is now [255, 0, 0] red", "score": [9, 8]}', [9.0, 8.0]),
        ('The wall became (255, 0, 0), i.e. [255, 0, 0]. {"reasoning": "red", "score": [9, 8]}', [9.0, 8.0]),
        ('Review {of the image}: {"reasoning": "r", "score": [1, 2]}', [1.0, 2.0]),
        ("Scores: [+7, 8.]", [7.0, 8.0]),
    ],
)
def test_one_score_list_is_scored(reply: str, scores: list[float]) -> None:
    """Lists inside a decoded object's reasoning are its argument, a list of another length is not a score list, and a
    bare list JSON would not read (``[+7, 8.]``, which used to raise a JSONDecodeError past the re-ask path) parses."""
    assert parse_scores(reply).scores == scores


def test_parse_range_follows_score_range() -> None:
    assert parse_scores('{"reasoning": "r", "score": [25, 11]}', score_range=25).scores == [25.0, 11.0]
    with pytest.raises(JudgeParseError, match=r"outside \[0, 25\]"):
        parse_scores('{"reasoning": "r", "score": [26, 11]}', score_range=25)


def test_overall_is_geometric_mean_of_minima() -> None:
    sc, pq, o = overall([8, 6], [9, 4])
    assert (sc, pq) == (6.0, 4.0)
    assert o == pytest.approx(math.sqrt(24.0))
    assert overall([0, 10], [10, 10]) == (0.0, 10.0, 0.0)


def test_overall_rescales_score_range_25_to_0_10() -> None:
    sc, pq, o = overall([20, 25], [15, 10], score_range=25)
    assert sc == pytest.approx(8.0)  # 20 / 2.5
    assert pq == pytest.approx(4.0)  # 10 / 2.5
    assert o == pytest.approx(math.sqrt(32.0))


def test_avg_at_k_averages_per_pass_overall_not_the_means() -> None:
    # Per pass (score_range 10): SC_i = min(sc), PQ_i = min(pq).
    passes = [([9, 4], [8, 9]), ([2, 3], [10, 10])]  # SC = 4, 2; PQ = 8, 10
    result = avg_at_k(passes, score_range=10)
    assert result["SC"] == pytest.approx(3.0)
    assert result["PQ"] == pytest.approx(9.0)
    assert result["overall"] == pytest.approx((math.sqrt(32.0) + math.sqrt(20.0)) / 2)
    assert result["overall"] != pytest.approx(math.sqrt(3.0 * 9.0))  # not average_first
    assert result["passes"] == 2.0


def test_avg_at_k_four_passes_score_range_25() -> None:
    passes = [([25, 20], [25, 25]), ([10, 15], [5, 20]), ([0, 25], [25, 25]), ([12.5, 25], [25, 12.5])]
    # SC_i = 8, 4, 0, 5; PQ_i = 10, 2, 10, 5 (all / 2.5)
    result = avg_at_k(passes, score_range=25)
    assert result["SC"] == pytest.approx((8 + 4 + 0 + 5) / 4)
    assert result["PQ"] == pytest.approx((10 + 2 + 10 + 5) / 4)
    assert result["overall"] == pytest.approx((math.sqrt(80) + math.sqrt(8) + 0 + 5) / 4)
    assert result["passes"] == 4.0


def test_avg_at_k_three_passes_and_empty() -> None:
    result = avg_at_k([([5, 5], [5, 5]), ([10, 10], [10, 10]), ([1, 9], [4, 9])])
    assert result["overall"] == pytest.approx((5 + 10 + 2) / 3)
    with pytest.raises(ValueError):
        avg_at_k([])


def test_build_prompts_sc_sees_both_images_pq_only_the_edit() -> None:
    source, edit = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    sc, pq = build_prompts("make the car blue", source, edit, score_range=25)
    assert sc.images == [source, edit]
    assert pq.images == [edit]
    assert "make the car blue" in sc.text and "make the car blue" not in pq.text
    for prompt in (sc, pq):
        assert "0 to 25" in prompt.text and "0 to 25" in prompt.system
        assert prompt.system.index('"reasoning"') < prompt.system.index('"score"')  # reasoning first
    with pytest.raises(ValueError):
        build_prompts("x", source, edit, score_range=0)
