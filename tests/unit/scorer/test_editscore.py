"""EditScoreBackend on fixed judge replies: the package's prompts, the layout, Avg@K by hand, re-asks, no guesses.

The judge here is a scripted engine (a stand-in for the 7B EditScore model, which cannot run on this machine); the
real-model path with a tiny Qwen2.5-VL and a LoRA is in test_hf_engine.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from editrl.scorer.backend import ScoreRequest, make_backend
from editrl.scorer.editscore import EditScoreBackend, editscore_prompts
from editrl.scorer.engines import JudgePrompt


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


SOURCE, EDIT = image(0), image(1)


def reply(scores: list[float], why: str = "ok") -> str:
    return f'{{"reasoning": "{why}", "score": {scores}}}'


class Scripted:
    """Replies by (seed, SC|PQ) from a table; records every prompt it was asked, with its seed."""

    name = "scripted"

    def __init__(self, table: dict[tuple[int, str], str]) -> None:
        self.table = table
        self.asked: list[tuple[int, str, JudgePrompt]] = []

    def generate(self, prompts: list[JudgePrompt], seed: int = 0, max_new_tokens: int = 512) -> list[str | None]:
        out = []
        for prompt in prompts:
            kind = "SC" if len(prompt.images) == 2 else "PQ"
            self.asked.append((seed, kind, prompt))
            out.append(self.table.get((seed, kind)))
        return out


def request(n_edits: int = 1) -> ScoreRequest:
    return ScoreRequest("g", "make the car blue", "color_alter", SOURCE, [EDIT] * n_edits)


def test_prompts_are_the_packages_rescaled_to_25() -> None:
    sc, pq = editscore_prompts(25)
    from editscore import vie_prompts

    assert sc.startswith(vie_prompts._context_no_delimit_reasoning_first)
    assert "From scale 0 to 25" in sc and "0 to 10" not in sc and "<instruction>" in sc
    assert "naturalness" in pq and "From scale 0 to 25" in pq and "<instruction>" not in pq
    assert "original AI-generated image" not in pq  # the PQ rule talks about one image


def test_layout_images_first_labelled_pq_sees_only_the_edit() -> None:
    judge = Scripted({(42, "SC"): reply([20, 15]), (42, "PQ"): reply([25, 10])})
    EditScoreBackend(engine=judge).score(request())
    (_, _, sc), (_, _, pq) = judge.asked
    assert sc.label_images and pq.label_images and not sc.system and not pq.system
    assert sc.images[0] is SOURCE and sc.images[1] is EDIT and pq.images == [EDIT]
    assert "Editing instruction: make the car blue" in sc.text


def test_avg_at_k_on_fixed_replies_matches_hand_computation() -> None:
    table = {
        (42, "SC"): reply([20, 15], "pass0 sc"),  # SC = 15/2.5 = 6
        (42, "PQ"): reply([25, 10], "pass0 pq"),  # PQ = 10/2.5 = 4, O = sqrt(24)
        (43, "SC"): reply([25, 25]),  # SC = 10
        (43, "PQ"): reply([5, 20]),  # PQ = 2, O = sqrt(20)
    }
    judge = Scripted(table)
    (score,) = EditScoreBackend(engine=judge, num_pass=2).score(request())
    assert sorted({seed for seed, _, _ in judge.asked}) == [42, 43]  # distinct seeds, seed + pass
    assert score.scored
    assert score.overall == pytest.approx((math.sqrt(24) + math.sqrt(20)) / 2)  # average_last
    expected = {
        "SC": 8.0, "PQ": 3.0, "prompt_following": 9.0, "consistency": 8.0, "naturalness": 6.0, "artifacts": 6.0,
        "passes": 2.0,
    }  # fmt: skip
    assert score.sub_scores == pytest.approx(expected)
    assert score.reasoning == "pass0 sc | pass0 pq"
    (first,) = EditScoreBackend(engine=Scripted(table), num_pass=2, reduction="average_first").score(request())
    assert first.overall == pytest.approx(math.sqrt(8.0 * 3.0))


def test_out_of_range_is_reasked_with_a_new_seed_then_unscored_never_clamped() -> None:
    table = {(42, "SC"): reply([26, 20]), (42, "PQ"): reply([25, 25]), (43, "SC"): reply([10, 10])}
    judge = Scripted(table)
    (score,) = EditScoreBackend(engine=judge, max_reasks=1).score(request())
    assert score.scored and score.sub_scores["SC"] == pytest.approx(4.0)  # the re-ask (seed 43) answered
    assert [(seed, kind) for seed, kind, _ in judge.asked] == [(42, "SC"), (42, "PQ"), (43, "SC")]
    refusal = "I'm sorry, but I can't assist with that request."
    garbage = Scripted({**{(seed, "SC"): reply([26, 20]) for seed in (42, 43, 44)}, (42, "PQ"): refusal})
    scores = EditScoreBackend(engine=garbage, max_reasks=2).score(request(2))
    assert all(not s.scored and s.overall is None for s in scores)
    assert "outside [0, 25]" in scores[0].reasoning
    assert len(garbage.asked) == 4 * 3  # 2 edits x (SC, PQ), asked once and re-asked twice


def test_a_reply_with_two_different_score_lists_is_reasked_then_unscored() -> None:
    guess_then_fix = 'First guess: [20, 15]. No, on reflection: {"reasoning": "a seam", "score": [10, 15]}'
    same_twice = reply([20, 15], "twice") + " " + reply([20, 15], "twice")
    judge = Scripted({(42, "SC"): guess_then_fix, (42, "PQ"): same_twice, (43, "SC"): reply([25, 25])})
    (score,) = EditScoreBackend(engine=judge, max_reasks=1).score(request())
    assert score.scored and score.sub_scores["SC"] == pytest.approx(10.0)  # the re-ask, never the first guess (6.0)
    assert score.sub_scores["PQ"] == pytest.approx(6.0)  # the same list twice is fine
    assert [(seed, kind) for seed, kind, _ in judge.asked] == [(42, "SC"), (42, "PQ"), (43, "SC")]
    stubborn = Scripted({**{(seed, "SC"): guess_then_fix for seed in (42, 43, 44)}, (42, "PQ"): same_twice})
    (score,) = EditScoreBackend(engine=stubborn, max_reasks=2).score(request())
    assert not score.scored and score.overall is None
    assert "ambiguous reply: 2 different score lists ([20, 15] vs [10, 15])" in score.reasoning


@pytest.mark.parametrize(
    "options, message",
    [
        ({}, "option model: required"),
        ({"model": "m", "engine": "openai", "lora": "/a", "engine_options": {"base_url": "http://x"}}, "serve it"),
        ({"model": "m", "colour": 1}, "unknown editscore backend options"),
        ({"model": "m", "reduction": "median"}, "reduction"),
        ({"model": "m", "engine_options": {"temperature": 0.1}}, "as backend options"),
        ({"model": "m", "engine": "gemini"}, "unknown vlm engine"),
    ],
)
def test_bad_options_name_the_problem(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_backend({"backend": "editscore", **options})


def test_engine_built_by_name_gets_editscore_sampling_and_the_lora(tmp_path) -> None:
    backend = make_backend({"backend": "editscore", "model": "base", "lora": str(tmp_path), "engine": "transformers"})
    engine = backend.engine  # built lazily, no model loaded yet
    assert (engine.model_id, engine.lora) == ("base", str(tmp_path))
    assert (engine.temperature, engine.top_p, engine.top_k) == (0.7, 0.9, 20)
    assert backend.score_range == 25 and backend.seed == 42
