"""VIEScore judge prompts, a strict-but-tolerant reply parser and the VIEScore / EditScore arithmetic (pure functions).

Two questions per edited image, both answered as JSON ``{"reasoning": "...", "score": [a, b]}`` (reasoning first, as
EditScore asks, so the numbers follow the argument):

- SC (semantic consistency) shows the source AND the edited image plus the instruction and asks for
  ``[editing success, over-editing]``, each on ``0..score_range`` (over-editing: high = minimal yet effective change).
- PQ (perceptual quality) shows ONLY the edited image and asks for ``[naturalness, artifacts]`` on
  ``0..score_range`` (artifacts: high = no visible artifacts). This is the documented VIEScore behaviour; EditScore's
  batch path also shows the source image to PQ -- we deliberately do not, so PQ judges the picture alone.

Arithmetic (every result on 0..10 whatever ``score_range`` the judge used):
``SC = min(sc) * 10 / score_range``, ``PQ = min(pq) * 10 / score_range``, ``O = sqrt(SC * PQ)``.
``avg_at_k`` is EditScore's Avg@K; with its default reduction ``average_last`` the mean over passes of
``sqrt(SC_i * PQ_i)``, with ``average_first`` ``sqrt(mean SC * mean PQ)``.

Failure model: :func:`parse_scores` either returns exactly ``n_expected`` finite numbers inside
``[0, score_range]`` or raises :class:`JudgeParseError` with the reason. It repairs *syntax* (code fences, prose
around the JSON, single quotes, trailing commas, unescaped quotes in the reasoning) but never *content*: a wrong
count, a non-numeric value, NaN/inf or an out-of-range number is rejected, not clamped, padded or guessed (unlike
the reference implementations, which fall back to 5, ``score_range / 2`` or a random integer). A reply that gives
two different score lists (a first guess and a correction, two objects, two fenced blocks, a list in the prose that
differs from the JSON's) is ambiguous and rejected too, never read as "the first one"; the same list repeated is
accepted. A reply over :data:`MAX_REPLY_CHARS` is rejected unread (far beyond any ``max_new_tokens`` a judge is
given, and it keeps the parser's time bounded). Whatever the reply holds -- a 5,000-digit number, keys that do not
sort, deep nesting -- the parser raises nothing but JudgeParseError, whose reason quotes at most
:data:`~editrl.common.fit.QUOTE_CHARS` characters of the reply; the reasoning it returns is capped at
:data:`REASONING_CHARS` (both cuts marked ``…[truncated N chars]``).
"""

from __future__ import annotations

import ast
import json
import math
import re
import reprlib
from dataclasses import dataclass
from typing import Any

from PIL import Image

from editrl.common.fit import QUOTE_CHARS, cap_text
from editrl.scorer.engines import JudgePrompt

MAX_REPLY_CHARS = 65_536  # a longer judge reply is rejected unread (512 new tokens are a few thousand characters)
REASONING_CHARS = 2_000  # the most of a judge's reasoning kept in a Score (the prompt asks for one or two sentences)

_BRIEF = reprlib.Repr()  # bounded repr of reply content in reasons (a value may be huge or deeply nested)
_BRIEF.maxlevel, _BRIEF.maxlist, _BRIEF.maxtuple, _BRIEF.maxdict = 3, 6, 6, 6
_BRIEF.maxstring, _BRIEF.maxother, _BRIEF.maxlong = 60, 60, 40


def _brief(value: Any) -> str:
    return cap_text(_BRIEF.repr(value), QUOTE_CHARS)


class JudgeParseError(ValueError):
    """A judge reply that does not carry a usable score list; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ParsedReply:
    """The validated numbers of one judge reply (on the judge's 0..score_range scale) and its reasoning text."""

    scores: list[float]
    reasoning: str


# --------------------------------------------------------------------------------------------------- prompts

_SYSTEM = (
    "You are a meticulous professional digital artist who reviews AI-edited images. "
    "You will be shown one or more images and a set of rules. Judge strictly and only from what is visible; "
    "do not reward an image for what the instruction asked if the image does not actually show it. "
    "Answer with a single JSON object and nothing else, with the reasoning first and the scores last:\n"
    '{{"reasoning": "<one or two short sentences>", "score": [<score1>, <score2>]}}\n'
    "Every score is a whole number from 0 to {score_range}."
)

_SC_RULES = (
    "Two images follow: the first is the ORIGINAL image, the second is the EDITED image produced by an AI editor "
    "from the original and this editing instruction:\n"
    "<instruction>{instruction}</instruction>\n\n"
    "Give two scores from 0 to {score_range}.\n"
    "score1 - editing success: how completely and correctly the edited image carries out the instruction. "
    "0 means the requested change is absent or wrong; {score_range} means it is fully and precisely done.\n"
    "score2 - over-editing: how well everything the instruction did not ask to change is left untouched. "
    "0 means the edited image is a different picture or heavily altered beyond the request; {score_range} means "
    "the change is minimal yet effective and the rest of the original is preserved.\n"
    "Put score1 first and score2 second in the score list."
)

_PQ_RULES = (
    "One image follows: an image produced by an AI image editor. You are NOT told what it was meant to show; "
    "judge only how it looks.\n\n"
    "Give two scores from 0 to {score_range}.\n"
    "score1 - naturalness: does the image look like a plausible, coherent photograph or artwork (consistent "
    "lighting, shadows, perspective, proportions, sense of distance)? 0 means thoroughly unnatural; "
    "{score_range} means completely natural.\n"
    "score2 - artifacts: is it free of visible generation artifacts (noise, blur, distortions, smudges, "
    "disharmonious patches, broken textures, deformed faces or hands, garbled text)? 0 means dominated by "
    "artifacts; {score_range} means no artifacts at all.\n"
    "Put score1 first and score2 second in the score list."
)


def _check_range(score_range: int) -> None:
    if isinstance(score_range, bool) or not isinstance(score_range, int) or score_range < 1:
        raise ValueError(f"score_range must be a positive integer, got {score_range!r}")


def build_prompts(
    instruction: str, source: Image.Image, edit: Image.Image, score_range: int = 10
) -> tuple[JudgePrompt, JudgePrompt]:
    """The (SC, PQ) judge prompts for one edit: SC sees [source, edit] and the instruction, PQ sees only the edit."""
    _check_range(score_range)
    system = _SYSTEM.format(score_range=score_range)
    sc = JudgePrompt(
        text=_SC_RULES.format(instruction=instruction.strip(), score_range=score_range),
        images=[source, edit],
        system=system,
    )
    pq = JudgePrompt(text=_PQ_RULES.format(score_range=score_range), images=[edit], system=system)
    return sc, pq


# --------------------------------------------------------------------------------------------------- parsing

_FENCE_RE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)
_TRAILING_COMMA_RE = re.compile(r",\s*([}\]])")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)"
_BARE_LIST_RE = re.compile(rf"\[\s*{_NUMBER}(?:\s*,\s*{_NUMBER})*\s*,?\s*\]")
_SCORE_FIELD_RE = re.compile(r"""["']scores?["']\s*:\s*(\[[^\[\]]*\]|[^,}\s]+)""")
# A broken object's reasoning: from its key to the quote that closes it before the score key (two searches, linear).
_REASONING_KEY_RE = re.compile(r"""["']reasoning["']\s*:\s*["']""")
_REASONING_END_RE = re.compile(r"""["']\s*,\s*["']scores?["']""")


def _decode_object(candidate: str) -> dict[str, Any] | None:
    """``candidate`` as a dict: strict JSON, then with trailing commas removed, then as a Python literal."""
    attempts = (candidate, _TRAILING_COMMA_RE.sub(r"\1", candidate))
    for attempt in attempts:
        try:
            value = json.loads(attempt)
        except (ValueError, RecursionError):  # ValueError: bad JSON, or an integer over Python's 4300-digit limit
            continue
        if isinstance(value, dict):
            return value
    try:  # single quotes / trailing commas, the way Python writes dicts
        value = ast.literal_eval(candidate)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def _balanced_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every top-level ``{...}`` of ``text`` by brace depth (quotes are not tracked)."""
    spans, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "{":
            if depth == 0:
                start = i
            depth += 1
        elif char == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
    return spans


def _objects(text: str) -> list[tuple[int, int, dict[str, Any]]]:
    """The decodable objects of ``text`` with their spans: the outermost ``{...}`` slice if it decodes as one object
    (braces inside its strings need not balance), else every top-level ``{...}`` that decodes, in order."""
    start, end = text.find("{"), text.rfind("}")
    if start == -1 or end <= start:
        return []
    whole = _decode_object(text[start : end + 1])
    if whole is not None:
        return [(start, end + 1, whole)]
    found = []
    for span_start, span_end in _balanced_spans(text):
        obj = _decode_object(text[span_start:span_end])
        if obj is not None:
            found.append((span_start, span_end, obj))
    return found


def _candidate_objects(text: str) -> list[dict[str, Any]]:
    """Decodable objects, most specific first: those in fenced blocks, then those of the whole text."""
    candidates = [obj for fence in _FENCE_RE.findall(text) for _, _, obj in _objects(fence)]
    return candidates + [obj for _, _, obj in _objects(text)]


def _score_key(obj: dict[str, Any]) -> str | None:
    return "score" if "score" in obj else "scores" if "scores" in obj else None


def _to_number(value: Any) -> float:
    """One score value as a float; JudgeParseError for booleans, non-numbers and NaN/inf."""
    if isinstance(value, bool):
        raise JudgeParseError(f"score value {_brief(value)} is a boolean, not a number")
    if isinstance(value, (int, float)):
        number = float(value) if not isinstance(value, int) or abs(value) < 2**1023 else math.inf  # no OverflowError
    elif isinstance(value, str) and re.fullmatch(rf"\s*{_NUMBER}\s*", value):
        number = float(value)
    else:
        raise JudgeParseError(f"score value {_brief(value)} is not a number")
    if not math.isfinite(number):
        raise JudgeParseError(f"score value {_brief(value)} is not finite")
    return number


def _validate(raw: Any, n_expected: int, score_range: int) -> list[float]:
    """The raw ``score`` field as exactly ``n_expected`` numbers in [0, score_range], or JudgeParseError."""
    values = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    if len(values) != n_expected:
        raise JudgeParseError(f"expected {n_expected} scores, got {len(values)}: {_brief(raw)}")
    numbers = [_to_number(value) for value in values]
    for number in numbers:
        if not 0.0 <= number <= score_range:
            raise JudgeParseError(f"score {number:g} is outside [0, {score_range}]")
    return numbers


def _decode_field(raw_text: str) -> Any:
    """A ``score`` field's value text (a list or a scalar) as Python, or the bare text when it is not JSON."""
    raw_text = raw_text.strip()
    try:
        return json.loads(_TRAILING_COMMA_RE.sub(r"\1", raw_text.replace("'", '"')))
    except (ValueError, RecursionError):  # bad JSON, or an integer over the 4300-digit limit
        return raw_text.strip("\"'")  # let _validate report it as non-numeric


def _field_fallback(text: str) -> tuple[Any, str] | None:
    """The ``score`` field and reasoning pulled out by pattern when the object itself does not decode."""
    match = _SCORE_FIELD_RE.search(text)
    if match is None:
        return None
    return _decode_field(match.group(1)), _reasoning_field(text)


def _reasoning_field(text: str) -> str:
    """The text between the first ``"reasoning": "`` and the quote that closes it before a score key, or ""."""
    key = _REASONING_KEY_RE.search(text)
    end = _REASONING_END_RE.search(text, key.end()) if key else None
    return text[key.end() : end.start()].strip() if key and end else ""


def _list_key(raw: Any) -> tuple[Any, ...]:
    """A score value in a form where the same list compares equal however it was written (``7``, ``7.0``, ``"7"``)."""
    values = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    key: list[Any] = []
    for value in values:
        try:
            key.append(_to_number(value))
        except JudgeParseError:
            key.append(_brief(value))
    return tuple(key)


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with every span (disjoint, in order) blanked out; same length, so later spans stay valid."""
    pieces, position = [], 0
    for start, end in spans:
        pieces += [text[position:start], " " * (end - start)]
        position = end
    return "".join([*pieces, text[position:]])


def _bare_list(text: str) -> list[float]:
    """The numbers of a ``_BARE_LIST_RE`` match (``[+7, .5, 8.]`` too, which JSON would not read)."""
    return [float(number) for number in re.findall(_NUMBER, text)]


def _score_lists(text: str, n_expected: int) -> list[tuple[Any, ...]]:
    """Every distinct score list the reply states, in order of first appearance.

    Counted: the ``score`` field of every object that decodes; a ``score`` field found by pattern outside those
    objects (a broken object); and, outside both, every bare numeric list of ``n_expected`` numbers (a list of
    another length, such as an RGB triple in the prose, is not a score list). Lists inside a decoded object's
    reasoning string are its argument, not an answer, and are not counted.
    """
    found: list[tuple[int, tuple[Any, ...]]] = []
    objects = _objects(text)
    for start, _, obj in objects:
        key = _score_key(obj)
        if key is not None:
            found.append((start, _list_key(obj[key])))
    rest = _mask(text, [(start, end) for start, end, _ in objects])
    fields = list(_SCORE_FIELD_RE.finditer(rest))
    found.extend((match.start(), _list_key(_decode_field(match.group(1)))) for match in fields)
    rest = _mask(rest, [match.span() for match in fields])
    for match in _BARE_LIST_RE.finditer(rest):
        values = _bare_list(match.group(0))
        if len(values) == n_expected:
            found.append((match.start(), _list_key(values)))
    return list(dict.fromkeys(key for _, key in sorted(found, key=lambda item: item[0])))


def _show(key: tuple[Any, ...]) -> str:
    shown = ", ".join(f"{value:g}" if isinstance(value, float) else str(value) for value in key[:6])
    return cap_text("[" + shown + (", ..." if len(key) > 6 else "") + "]", QUOTE_CHARS)


def _ambiguous(keys: list[tuple[Any, ...]]) -> JudgeParseError:
    """The rejection of a reply that states several different score lists, naming (up to three of) them."""
    shown = " vs ".join(_show(key) for key in keys[:3]) + (" vs ..." if len(keys) > 3 else "")
    return JudgeParseError(f"ambiguous reply: {len(keys)} different score lists ({shown})")


def parse_scores(text: str | None, n_expected: int = 2, score_range: int = 10) -> ParsedReply:
    """Exactly ``n_expected`` scores in [0, score_range] from a judge reply, or JudgeParseError(reason).

    Accepted shapes (first match wins): a JSON object with ``score`` (or ``scores``), possibly inside a ```json fence
    or surrounded by prose, with single quotes or trailing commas; the object's ``score``/``reasoning`` fields found
    by pattern when the object is otherwise broken (e.g. unescaped quotes in the reasoning); a bare numeric list
    ``[7, 8]`` when it is the only one in the text. A scalar ``"score": 7`` counts as one score, so it is accepted
    only when ``n_expected == 1``.

    Before any of that, a reply stating more than one *different* score list (see :func:`_score_lists`: two
    objects or fenced blocks, a broken object next to a good one, a bare list in the prose that differs from the
    object's) is rejected as ``ambiguous reply: N different score lists (...)``; the same list repeated is fine.
    """
    _check_range(score_range)
    if text is None or not text.strip():
        raise JudgeParseError("empty judge reply")
    if len(text) > MAX_REPLY_CHARS:
        raise JudgeParseError(f"judge reply too long: {len(text):,} chars (at most {MAX_REPLY_CHARS:,} are read)")
    stated = _score_lists(text, n_expected)
    if len(stated) > 1:
        raise _ambiguous(stated)
    candidates = _candidate_objects(text)
    for obj in candidates:
        key = _score_key(obj)
        if key is not None:
            reasoning = obj.get("reasoning", "")
            reasoning = reasoning if isinstance(reasoning, str) else _brief(reasoning)
            return ParsedReply(
                _validate(obj[key], n_expected, score_range), cap_text(reasoning.strip(), REASONING_CHARS)
            )
    if candidates:
        raise JudgeParseError(f"judge reply object has no 'score' field (keys: {_brief(list(candidates[0]))})")
    fields = _field_fallback(text)
    if fields is not None:
        raw, reasoning = fields
        return ParsedReply(_validate(raw, n_expected, score_range), cap_text(reasoning, REASONING_CHARS))
    lists = list(dict.fromkeys(tuple(_bare_list(match)) for match in _BARE_LIST_RE.findall(text)))
    if len(lists) == 1:
        return ParsedReply(_validate(list(lists[0]), n_expected, score_range), "")
    if len(lists) > 1:
        raise _ambiguous(lists)
    snippet = " ".join(text.split())[:80]
    raise JudgeParseError(f"no score found in judge reply: {snippet!r}")


# --------------------------------------------------------------------------------------------------- arithmetic


def overall(sc_scores: list[float], pq_scores: list[float], score_range: int = 10) -> tuple[float, float, float]:
    """VIEScore ``(SC, PQ, O)`` on 0..10: the minima rescaled by ``10 / score_range``, ``O = sqrt(SC * PQ)``."""
    _check_range(score_range)
    if not sc_scores or not pq_scores:
        raise ValueError("overall needs at least one SC and one PQ score")
    scale = 10.0 / score_range
    sc = min(sc_scores) * scale
    pq = min(pq_scores) * scale
    return sc, pq, math.sqrt(max(sc, 0.0) * max(pq, 0.0))


REDUCTIONS = ("average_last", "average_first")


def avg_at_k(
    passes: list[tuple[list[float], list[float]]], score_range: int = 10, reduction: str = "average_last"
) -> dict[str, float]:
    """EditScore Avg@K: ``{"SC", "PQ", "overall", "passes"}`` on 0..10; ``SC``/``PQ`` are the means of the per-pass values.

    ``average_last`` (EditScore's default): ``overall`` is the mean over passes of ``sqrt(SC_i * PQ_i)``.
    ``average_first``: ``overall = sqrt(mean SC * mean PQ)``, with SC the min-based VIEScore value (EditScore's
    single-image ``evaluate`` uses the first SC score there instead of the minimum; we do not copy that).
    Raises ValueError for no passes or an unknown reduction.
    """
    if not passes:
        raise ValueError("avg_at_k needs at least one pass")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    per_pass = [overall(sc, pq, score_range) for sc, pq in passes]
    k = len(per_pass)
    sc_mean = sum(p[0] for p in per_pass) / k
    pq_mean = sum(p[1] for p in per_pass) / k
    combined = sum(p[2] for p in per_pass) / k if reduction == "average_last" else math.sqrt(sc_mean * pq_mean)
    return {"SC": sc_mean, "PQ": pq_mean, "overall": combined, "passes": float(k)}
