"""The scorer backend interface: one request per group, one Score per edit.

Terms:
- A *group* is the set of edits the actor sampled for one task (the GRPO group); ``group_id`` names it.
- A *Score* is VIEScore-shaped: ``overall`` on 0-10 (``sqrt(SC * PQ)`` for the built-in backends), named
  ``sub_scores`` and a short human-readable ``reasoning``.

Guarantees every backend keeps: ``score`` returns exactly one Score per edit, in the order of
``request.edits``. A backend that cannot judge an edit returns ``scored=False, overall=None`` with the reason
in ``reasoning``; it never invents a number (no random guesses, no default 5). Callers decide what an unscored
edit means for training (e.g. drop the group).

What the scorer worker (:mod:`editrl.scorer.worker`) does when a backend breaks that promise: a call that raises
fails only its own groups (a failed ``score_many`` batch is retried group by group), and such a group comes back with
every edit unscored and the error named; a reply too large for the wire has its ``reasoning`` cut with a marker
(:func:`editrl.common.fit.fit_score_result`). Reasons should still quote untrusted text (the instruction, a judge's
reply) only through :func:`editrl.common.fit.quote` / :func:`~editrl.common.fit.cap_text`.

Backends are chosen by config through ``make_backend({"backend": NAME, ...options})``. Factories import their
module lazily, so heavy backends (VLM judges) cost nothing unless selected; new ones register with
``register_backend``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image


@dataclass
class ScoreRequest:
    """Everything a backend needs to score one group of edits of the same source image."""

    group_id: str
    instruction: str
    task_type: str
    source: Image.Image
    edits: list[Image.Image]


@dataclass
class Score:
    """One edit's score; ``overall`` is on 0-10 and is None exactly when ``scored`` is False."""

    scored: bool
    overall: float | None  # 0-10, None when unscored
    sub_scores: dict[str, float] = field(default_factory=dict)
    reasoning: str = ""

    def __post_init__(self) -> None:
        if self.scored != (self.overall is not None):
            raise ValueError(f"Score.overall must be None exactly when scored is False, got {self!r}")

    @classmethod
    def unscored(cls, reasoning: str) -> Score:
        """A Score that carries no number, only the reason why."""
        return cls(scored=False, overall=None, sub_scores={}, reasoning=reasoning)


@runtime_checkable
class ScoreBackend(Protocol):
    """Scores the edits of one group; returns one Score per edit, in the same order."""

    name: str

    def score(self, request: ScoreRequest) -> list[Score]: ...


BackendFactory = Callable[[dict[str, Any]], ScoreBackend]


def _lazy_factory(module: str, attribute: str) -> BackendFactory:
    """A factory that imports ``module`` only when the backend is built, then calls ``attribute(**options)``."""

    def build(options: dict[str, Any]) -> ScoreBackend:
        backend_cls = getattr(importlib.import_module(module), attribute)
        return backend_cls.from_options(options)

    return build


# Backend name -> factory taking the options (the config minus "backend").
_BACKENDS: dict[str, BackendFactory] = {
    "metric": _lazy_factory("editrl.scorer.metric", "MetricBackend"),
    "vlm": _lazy_factory("editrl.scorer.vlm", "VLMBackend"),
    "composite": _lazy_factory("editrl.scorer.composite", "CompositeBackend"),
    "editscore": _lazy_factory("editrl.scorer.editscore", "EditScoreBackend"),
}


def available_backends() -> list[str]:
    """Names ``make_backend`` accepts."""
    return sorted(_BACKENDS)


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make ``make_backend({"backend": name, ...})`` call ``factory(options)``; names must be unique."""
    if name in _BACKENDS:
        raise ValueError(f"score backend {name!r} is already registered")
    _BACKENDS[name] = factory


def make_backend(cfg: Mapping[str, Any]) -> ScoreBackend:
    """Build the backend ``cfg["backend"]`` with the remaining keys as its options.

    Raises ValueError when the backend name is missing or unknown (naming the allowed ones), and the backend's own
    ValueError for unknown or invalid options.
    """
    options = dict(cfg)
    name = options.pop("backend", None)
    if name not in _BACKENDS:
        raise ValueError(f"unknown score backend {name!r}; allowed: {', '.join(available_backends())}")
    return _BACKENDS[name](options)
