"""parse_scores on hostile judge replies: it raises nothing but JudgeParseError, quotes a bounded part of the reply,
caps the reasoning it keeps and stays fast (each of these raised ValueError/OverflowError/TypeError out of the
backend, quoted the whole reply, or took quadratic time before issue 14)."""

from __future__ import annotations

import time

import pytest

from editrl.common.fit import QUOTE_CHARS
from editrl.scorer.viescore import MAX_REPLY_CHARS, REASONING_CHARS, JudgeParseError, parse_scores

N = MAX_REPLY_CHARS
HOSTILE = {
    "digits_over_int_limit": '{"reasoning": "x", "score": [' + "9" * 5000 + ", 5]}",
    "int_too_large_for_float": '{"reasoning": "x", "score": [' + "9" * 4000 + ", 5]}",
    "keys_that_do_not_sort": "{1: 2, 'a': 3}",
    "too_long": '{"reasoning": "' + "x" * N + '", "score": [7, 8]}',
    "many_objects": "{}" * (N // 2),
    "huge_string_score": '{"score": ["' + "y" * (N - 20) + '", 1]}',
    "many_scores": '{"score": [' + ", ".join(["1"] * (N // 3 - 6)) + "]}",
    "open_reasoning_keys": '"reasoning": "' * (N // 14) + '"score": [7, 8',
    "deep_nesting": '{"score": ' + "[" * 5000 + "]" * 5000 + "}",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_reply_is_a_bounded_parse_error(name: str):
    started = time.perf_counter()
    with pytest.raises(JudgeParseError) as caught:
        parse_scores(HOSTILE[name])
    assert len(caught.value.reason) < 2 * QUOTE_CHARS + 100, caught.value.reason
    assert time.perf_counter() - started < 2.0  # linear in the reply (was quadratic: minutes at 2 MB)


def test_a_long_reasoning_is_kept_only_up_to_its_cap():
    parsed = parse_scores('{"reasoning": "' + "r" * (N // 2) + '", "score": [7, 8]}')
    assert parsed.scores == [7.0, 8.0] and parsed.reasoning.startswith("rrrr")
    assert len(parsed.reasoning) < REASONING_CHARS + 40 and "…[truncated " in parsed.reasoning
