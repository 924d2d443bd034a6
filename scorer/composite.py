"""CompositeBackend: several named backends scored together, ``overall`` from a declarative expression.

Config (YAML/JSON data)::

    backend: composite
    parts:
      m: {backend: metric}
      v: {backend: vlm, engine: openai, engine_options: {...}}
    overall: {weighted: [[0.5, m], [0.5, {sqrt: {min: [v.SC, v.PQ]}}]]}

Every part is built with :func:`~editrl.scorer.backend.make_backend` and scores every request. ``overall`` is an
expression tree, parsed once at construction and never ``eval``'ed:

- a number (int or float, not bool, finite);
- a name: ``"<part>"`` is that part's ``overall``, ``"<part>.<sub_score>"`` one of its ``sub_scores`` (split at the
  first dot, so ``"c.m.SC"`` reads sub-score ``"m.SC"`` of a nested composite ``c``);
- a one-key mapping: ``{"sum": [E, ...]}``, ``{"weighted": [[w, E], ...]}`` (sum of ``w * E``, weights are not
  normalised), ``{"product": [E, ...]}``, ``{"min": [E, ...]}``, ``{"max": [E, ...]}``, ``{"sqrt": E}``,
  ``{"scale": [factor, E]}``, ``{"clip": [lo, hi, E]}`` (lo <= hi); lists must be non-empty.

Result: ``overall`` = the expression's value; ``sub_scores`` = every part's sub-scores prefixed ``"<part>."``;
``reasoning`` = the value followed by each part's reasoning.

Failure model:
- Construction: unknown/missing options, a bad part config, an unknown operator, wrong arity, a non-number where a
  number belongs, or a name of an unknown part raise ValueError naming the place, e.g.
  ``overall.weighted[1][1]: unknown part 'x'`` or ``parts.m: unknown score backend ...``.
- Scoring, per edit: if a part the expression references left the edit unscored, or a referenced sub-score is
  missing, or the value is not finite (e.g. ``sqrt`` of a negative number) or outside [0, 10], the edit is
  ``Score.unscored(reason)``; it never gets a made-up, default or clamped number. The only exception is float
  rounding: a value within 1e-9 of the range is snapped onto it. Parts the expression does not reference never
  make an edit unscored (their sub-scores are still reported when they have any).
- A part that raises, or returns the wrong number of scores, breaks the backend contract: the error propagates
  (a RuntimeError for the wrong count) instead of being turned into unscored edits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from editrl.scorer.backend import Score, ScoreBackend, ScoreRequest, make_backend

_RANGE_TOL = 1e-9  # float rounding allowed outside [0, 10] before a value counts as out of range
_LIST_OPS: dict[str, Callable[[list[float]], float]] = {
    "sum": math.fsum,
    "product": math.prod,
    "min": min,
    "max": max,
}
OPERATORS = ("clip", "max", "min", "product", "scale", "sqrt", "sum", "weighted")


class _Unscorable(Exception):
    """An edit cannot get a composite number; the message is the reason."""


@dataclass(frozen=True)
class _Const:
    value: float

    def evaluate(self, scores: Mapping[str, Score]) -> float:
        return self.value


@dataclass(frozen=True)
class _Name:
    part: str
    sub_score: str | None  # None: the part's overall

    def evaluate(self, scores: Mapping[str, Score]) -> float:
        score = scores[self.part]
        if not score.scored or score.overall is None:
            raise _Unscorable(f"part {self.part!r} left the edit unscored: {score.reasoning}")
        if self.sub_score is None:
            return float(score.overall)
        if self.sub_score not in score.sub_scores:
            have = ", ".join(sorted(score.sub_scores)) or "none"
            raise _Unscorable(f"part {self.part!r} has no sub-score {self.sub_score!r} (has: {have})")
        return float(score.sub_scores[self.sub_score])


@dataclass(frozen=True)
class _Op:
    op: str
    args: tuple[Any, ...]  # sub-expressions (_Const | _Name | _Op)
    params: tuple[float, ...] = ()  # weights (weighted), factor (scale), lo and hi (clip)

    def evaluate(self, scores: Mapping[str, Score]) -> float:
        values = [arg.evaluate(scores) for arg in self.args]
        if self.op in _LIST_OPS:
            return float(_LIST_OPS[self.op](values))
        if self.op == "weighted":
            return math.fsum(w * v for w, v in zip(self.params, values, strict=True))
        if self.op == "sqrt":
            return math.sqrt(values[0]) if values[0] >= 0 else math.nan
        if self.op == "scale":
            return self.params[0] * values[0]
        lo, hi = self.params  # clip
        return values[0] if math.isnan(values[0]) else min(max(values[0], lo), hi)


Expr = _Const | _Name | _Op


def _number(value: Any, path: str) -> float:
    """``value`` as a finite float, or ValueError naming ``path``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{path}: expected a finite number, got {value!r}")
    return float(value)


def _sequence(value: Any, path: str, length: int | None = None) -> Sequence[Any]:
    """``value`` as a non-empty list (of exactly ``length`` items when given), or ValueError naming ``path``."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{path}: expected a non-empty list, got {value!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{path}: expected a list of {length} items, got {len(value)}: {value!r}")
    return value


def parse_expression(spec: Any, parts: Sequence[str], path: str = "overall") -> Expr:
    """Parse an ``overall`` expression (see the module docstring) over the part names ``parts``.

    Raises ValueError naming the path of the first bad node, e.g. ``overall.sum[2]: unknown part 'x'``.
    """
    if isinstance(spec, str):
        part, dot, sub_score = spec.partition(".")
        if part not in parts:
            raise ValueError(f"{path}: unknown part {part!r} in name {spec!r}; parts: {', '.join(sorted(parts))}")
        if dot and not sub_score:
            raise ValueError(f"{path}: empty sub-score name in {spec!r}")
        return _Name(part, sub_score if dot else None)
    if isinstance(spec, (bool, int, float)):
        return _Const(_number(spec, path))
    if not isinstance(spec, Mapping):
        raise ValueError(f"{path}: expected a number, a name or a one-key operator mapping, got {spec!r}")
    if len(spec) != 1:
        raise ValueError(f"{path}: an operator mapping needs exactly one key, got {sorted(map(str, spec))}")
    ((op, arg),) = spec.items()
    here = f"{path}.{op}"
    if op in _LIST_OPS:
        items = _sequence(arg, here)
        return _Op(op, tuple(parse_expression(item, parts, f"{here}[{i}]") for i, item in enumerate(items)))
    if op == "weighted":
        weights: list[float] = []
        exprs: list[Expr] = []
        for i, pair in enumerate(_sequence(arg, here)):
            weight, expr = _sequence(pair, f"{here}[{i}]", 2)
            weights.append(_number(weight, f"{here}[{i}][0]"))
            exprs.append(parse_expression(expr, parts, f"{here}[{i}][1]"))
        return _Op(op, tuple(exprs), tuple(weights))
    if op == "sqrt":
        return _Op(op, (parse_expression(arg, parts, here),))
    if op == "scale":
        factor, expr = _sequence(arg, here, 2)
        return _Op(op, (parse_expression(expr, parts, f"{here}[1]"),), (_number(factor, f"{here}[0]"),))
    if op == "clip":
        lo_spec, hi_spec, expr = _sequence(arg, here, 3)
        lo, hi = _number(lo_spec, f"{here}[0]"), _number(hi_spec, f"{here}[1]")
        if lo > hi:
            raise ValueError(f"{here}: lo {lo} is greater than hi {hi}")
        return _Op(op, (parse_expression(expr, parts, f"{here}[2]"),), (lo, hi))
    raise ValueError(f"{path}: unknown operator {op!r}; allowed: {', '.join(OPERATORS)}")


class CompositeBackend:
    """Scores with every named part and combines them with the ``overall`` expression; see the module docstring."""

    name = "composite"
    OPTIONS = ("parts", "overall")

    def __init__(self, parts: Mapping[str, ScoreBackend], overall: Any) -> None:
        """``parts``: name -> built backend (names non-empty, without dots); ``overall``: the expression data."""
        if not isinstance(parts, Mapping) or not parts:
            raise ValueError(f"composite backend needs a non-empty mapping of parts, got {parts!r}")
        for part in parts:
            if not isinstance(part, str) or not part or "." in part:
                raise ValueError(f"parts: part names must be non-empty strings without '.', got {part!r}")
        self.parts: dict[str, ScoreBackend] = dict(parts)
        self.overall_spec = overall
        self.expression: Expr = parse_expression(overall, list(self.parts))

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> CompositeBackend:
        """Build from config options: ``parts`` (name -> backend config) and ``overall`` (expression), both required."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise ValueError(f"unknown composite backend options {unknown}; allowed: {', '.join(cls.OPTIONS)}")
        missing = [key for key in cls.OPTIONS if key not in options]
        if missing:
            raise ValueError(f"composite backend options {missing} are required")
        specs = options["parts"]
        if not isinstance(specs, Mapping) or not specs:
            raise ValueError(f"parts: expected a non-empty mapping of name -> backend config, got {specs!r}")
        parts: dict[str, ScoreBackend] = {}
        for part, spec in specs.items():
            if not isinstance(spec, Mapping):
                raise ValueError(f"parts.{part}: expected a backend config mapping, got {spec!r}")
            try:
                parts[part] = make_backend(spec)
            except ValueError as exc:
                raise ValueError(f"parts.{part}: {exc}") from exc
        return cls(parts, options["overall"])

    def score(self, request: ScoreRequest) -> list[Score]:
        """One Score per edit, in order; unscored where the expression cannot give an in-range number."""
        by_part: dict[str, list[Score]] = {}
        for part, backend in self.parts.items():
            scores = list(backend.score(request))
            if len(scores) != len(request.edits):
                raise RuntimeError(f"part {part!r} returned {len(scores)} scores for {len(request.edits)} edits")
            by_part[part] = scores
        return [self._combine({part: scores[i] for part, scores in by_part.items()}) for i in range(len(request.edits))]

    def _combine(self, scores: dict[str, Score]) -> Score:
        """The composite Score of one edit from its part scores."""
        try:
            value = self.expression.evaluate(scores)
        except _Unscorable as exc:
            return Score.unscored(f"composite: {exc}")
        except (OverflowError, ValueError) as exc:
            return Score.unscored(f"composite: overall expression failed: {exc}")
        if not math.isfinite(value):
            return Score.unscored(f"composite: overall expression is not finite ({value})")
        if not -_RANGE_TOL <= value <= 10.0 + _RANGE_TOL:
            return Score.unscored(f"composite: overall {value:.6g} is outside [0, 10]")
        value = min(max(value, 0.0), 10.0)
        sub_scores = {f"{part}.{key}": val for part, score in scores.items() for key, val in score.sub_scores.items()}
        reasoning = f"composite overall {value:.2f}; " + "; ".join(f"{p}: {s.reasoning}" for p, s in scores.items())
        return Score(scored=True, overall=value, sub_scores=sub_scores, reasoning=reasoning)
