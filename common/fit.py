"""Replies that always fit the wire: bounded quotes of untrusted text, and score results cut down to a size budget.

Why (issue 14): a ScoreResult whose metadata frame is over :data:`~editrl.common.wire.MAX_META_BYTES` is rejected by
the broker (``meta_too_large``), so its job is never answered, its deadline requeues it forever and training stops.
Reasons carry text the scorer does not control (the instruction, a judge's reply), so every quote is capped where it
is made (:func:`cap_text`, :func:`quote`) and every result is fitted before it is sent (:func:`fit_score_result`).

Terms
- **marker**: what replaces a cut, ``…[truncated 1,234,567 chars]`` (the number of characters removed), so a reader
  sees that text is missing and how much.
- **budget**: the size in bytes the metadata frame of one encoded result may have, by default
  :data:`FIT_META_BYTES`.

Guarantees of :func:`fit_score_result`
- A result that fits its budget is returned as it is (the same object).
- Otherwise a copy comes back in which only text was shortened: the longest ``reasoning`` strings are cut first, to
  one common length (water-filling), each cut marked. ``scored``, ``overall`` and the ids never change.
- Sub-scores are numbers; their only text is their keys. Only if the sub-scores alone are over the budget (a broken
  backend) are entries dropped: each edit keeps, in order, the entries that fit its share, the gold key
  (:data:`~editrl.common.wire.GOLD_SUB_SCORE`) first; the edit's reasoning says how many were dropped.
- The fitted metadata frame is within the budget whenever the fixed fields (ids, flags, numbers and one marker per
  edit) are: any group below about 4,000 edits at the default budget.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

import msgpack

from editrl.common import codec, wire

# The broker re-encodes what a scorer sends: the reasoning and sub-scores go into the group's LMDB status record
# beside its instruction (which may itself be close to MAX_META_BYTES) and, for ``editrl check``, into a CheckResult
# (the same lists in another envelope). A quarter of the wire limit per result leaves room for both.
FIT_META_BYTES = wire.MAX_META_BYTES // 4
QUOTE_CHARS = 200  # the most a reason quotes of an instruction or a judge's reply (then a marker)
_MARKER_BYTES = 48  # UTF-8 size of the longest marker ("…" is 3 bytes), with room to spare

Reply = TypeVar("Reply", wire.ScoreResult, wire.CheckResult)


def truncation_marker(removed_chars: int) -> str:
    """What replaces ``removed_chars`` characters cut from a text."""
    return f"…[truncated {removed_chars:,} chars]"


def cap_text(text: str, max_chars: int = QUOTE_CHARS) -> str:
    """``text`` when it has at most ``max_chars`` characters, else its first ``max_chars`` and a marker."""
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + truncation_marker(len(text) - max_chars)


def quote(text: str, max_chars: int = QUOTE_CHARS) -> str:
    """``repr(text)`` for a reason, of at most ``max_chars`` characters of ``text`` (then a marker)."""
    if len(text) <= max_chars:
        return repr(text)
    return repr(text[:max_chars]) + truncation_marker(len(text) - max_chars)


def meta_bytes(msg: object) -> int:
    """Size of ``msg``'s encoded metadata frame (what the broker checks against MAX_META_BYTES)."""
    return len(codec.encode(msg)[0])


def fit_score_result(result: Reply, limit: int = FIT_META_BYTES) -> Reply:
    """``result`` with its metadata frame cut to at most ``limit`` bytes (see the module docstring); a ScoreResult or
    a CheckResult. Raises what ``codec.encode`` raises for a result that cannot be encoded at all."""
    size = meta_bytes(result)
    if size <= limit:
        return result
    lengths = [len(text.encode()) for text in result.reasoning]
    room = limit - (size - sum(lengths)) - _MARKER_BYTES * len(lengths)  # every cut's marker counted up front
    level = _water_level(lengths, room)
    fitted = dataclasses.replace(result, reasoning=[_cut(text, level) for text in result.reasoning])
    if meta_bytes(fitted) <= limit:
        return fitted
    return _drop_sub_scores(fitted, limit)


def _water_level(lengths: list[int], room: int) -> int:
    """The largest ``level`` with ``sum(min(n, level) for n in lengths) <= room`` (0 when there is no room)."""
    remaining = max(room, 0)
    ordered = sorted(lengths)
    for i, n in enumerate(ordered):
        left = len(ordered) - i
        if n * left > remaining:
            return remaining // left
        remaining -= n
    return ordered[-1] if ordered else 0


def _cut(text: str, max_bytes: int) -> str:
    """``text`` if its UTF-8 form has at most ``max_bytes`` bytes, else the longest whole-character prefix that
    does, and a marker."""
    raw = text.encode()
    if len(raw) <= max_bytes:
        return text
    kept = raw[:max_bytes].decode("utf-8", "ignore")
    return kept + truncation_marker(len(text) - len(kept))


def _drop_sub_scores(result: Reply, limit: int) -> Reply:
    """Sub-scores too large even with the reasoning cut: keep, per edit, the entries that fit an equal share of the
    room left (the gold key first), and say in the reasoning how many were dropped."""
    bare = dataclasses.replace(result, sub_scores=[{} for _ in result.sub_scores])
    room = (limit - meta_bytes(bare)) // max(len(result.sub_scores), 1) - _MARKER_BYTES
    sub_scores, reasoning = [], []
    for subs, text in zip(result.sub_scores, result.reasoning, strict=True):
        keys = sorted(subs, key=lambda key: key != wire.GOLD_SUB_SCORE)  # stable: gold first, the rest in order
        kept: dict[str, float] = {}
        used = 1  # the map header
        for key in keys:
            entry = len(msgpack.packb({key: subs[key]}, use_bin_type=True)) - 1
            if used + entry <= room:
                kept[key] = subs[key]
                used += entry
        dropped = len(subs) - len(kept)
        sub_scores.append(kept)
        reasoning.append(text + (f" …[{dropped:,} sub-scores dropped]" if dropped else ""))
    return dataclasses.replace(result, sub_scores=sub_scores, reasoning=reasoning)
