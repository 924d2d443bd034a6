"""VLMBackend: VIEScore with a vision-language judge (EditScore-style Avg@K), one batched judge call per pass.

For every edit of a group the backend asks two questions (see :mod:`editrl.scorer.viescore`): SC with the source
and the edited image, PQ with the edited image only. All prompts of a group -- or of several groups with
:meth:`VLMBackend.score_many` -- go to the engine in ONE ``generate`` call per pass, so the engine can batch them.
Pass ``i`` of ``num_pass`` (K) uses ``seed + i``; the per-edit result is EditScore's Avg@K with ``average_last``:
``overall = mean_i sqrt(SC_i * PQ_i)`` on 0..10.

Failure model:
- A reply that is None (engine failure) or that :func:`~editrl.scorer.viescore.parse_scores` rejects is re-asked,
  only that prompt, up to ``max_reasks`` times; re-ask ``r`` of pass ``i`` uses ``seed + i + r * num_pass`` so a
  sampling judge does not repeat itself and no two calls share a seed.
- An edit with any reply (SC or PQ, any pass) still unusable after the re-asks gets
  ``Score.unscored("judge reply unparseable after N re-asks: <reason>")``. It never gets a number: no default,
  no clamping, no random guess, no average over only the passes that happened to parse.
- If ``engine.generate`` itself raises or returns the wrong number of replies, that call counts as None for
  every prompt in it (so it is re-asked like any other failure) instead of crashing the scorer. A reply that is not
  text, or on which the parser itself fails, is such a failure too (for that prompt only).
- Reasons quote a bounded part of what the engine or the judge said (see :mod:`editrl.scorer.viescore`), and the
  reasoning kept is the parser's capped one, so a judge's megabyte reply never reaches the wire.
- Engines are imported lazily by name and built on first use; ``engine`` may also be a ready JudgeEngine object.
  Building it is NOT guarded: an unknown module (e.g. no vLLM engine installed) or bad ``engine_options`` raise
  from the first ``score`` call, so a misconfigured judge fails loudly instead of leaving every edit unscored.

Sub-scores (all on 0..10, means over passes): ``SC``, ``PQ``, ``SC_success``, ``SC_overedit``, ``PQ_naturalness``,
``PQ_artifacts``, plus ``passes`` = K. ``reasoning`` is the first pass's ``SC reasoning | PQ reasoning``.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

from PIL import Image

from editrl.common.fit import cap_text
from editrl.scorer.backend import Score, ScoreRequest
from editrl.scorer.engines import JudgeEngine, JudgePrompt
from editrl.scorer.viescore import REDUCTIONS, JudgeParseError, ParsedReply, avg_at_k, build_prompts, parse_scores

log = logging.getLogger(__name__)

# Engine name -> (module, class); imported only when the engine is built.
ENGINES: dict[str, tuple[str, str]] = {
    "openai": ("editrl.scorer.engines.openai_compat", "OpenAIEngine"),
    "transformers": ("editrl.scorer.engines.hf", "TransformersEngine"),
    "vllm": ("editrl.scorer.engines.vllm_engine", "VLLMEngine"),
}


@dataclass
class _Slot:
    """One question to the judge: which request/edit/pass it belongs to, and its outcome so far."""

    request: int
    edit: int
    kind: str  # "SC" or "PQ"
    prompt: JudgePrompt
    parsed: ParsedReply | None = None
    error: str = "not asked yet"


def _check_int(key: str, value: Any, minimum: int | None = None) -> None:
    """ValueError unless ``value`` is an integer (not a bool) and, if given, >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"judge backend option {key} must be an integer{bound}, got {value!r}")


class VLMBackend:
    """VIEScore/EditScore judged by a VLM engine; see the module docstring for batching and the failure model."""

    name = "vlm"
    OPTIONS = (
        "engine", "engine_options", "num_pass", "max_reasks", "score_range", "seed", "max_new_tokens", "reduction",
    )  # fmt: skip
    # Names of the four raw judge scores: SC [success, over-editing], PQ [naturalness, artifacts].
    SUB_NAMES = ("SC_success", "SC_overedit", "PQ_naturalness", "PQ_artifacts")

    def __init__(
        self,
        engine: str | JudgeEngine = "openai",
        engine_options: dict[str, Any] | None = None,
        num_pass: int = 1,
        max_reasks: int = 2,
        score_range: int = 10,
        seed: int = 42,
        max_new_tokens: int = 512,
        reduction: str = "average_last",
    ) -> None:
        """``engine`` is an engine name (built lazily with ``engine_options``) or a JudgeEngine object."""
        if isinstance(engine, str):
            if engine not in ENGINES:
                raise ValueError(f"unknown vlm engine {engine!r}; allowed: {', '.join(sorted(ENGINES))}")
        elif not callable(getattr(engine, "generate", None)):
            raise ValueError(f"engine must be a name or an object with generate(), got {engine!r}")
        elif engine_options:
            raise ValueError("engine_options only apply when engine is given by name")
        if engine_options is not None and not isinstance(engine_options, dict):
            raise ValueError(f"engine_options must be a dict, got {engine_options!r}")
        _check_int("num_pass", num_pass, 1)
        _check_int("max_reasks", max_reasks, 0)
        _check_int("score_range", score_range, 1)
        _check_int("max_new_tokens", max_new_tokens, 1)
        _check_int("seed", seed)
        if reduction not in REDUCTIONS:
            raise ValueError(f"{self.name} backend option reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.reduction = reduction
        self.engine_name = engine if isinstance(engine, str) else getattr(engine, "name", type(engine).__name__)
        self._engine: JudgeEngine | None = None if isinstance(engine, str) else engine
        self.engine_options = dict(engine_options or {})
        self.num_pass = num_pass
        self.max_reasks = max_reasks
        self.score_range = score_range
        self.seed = seed
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> VLMBackend:
        """Build from config options; unknown keys or bad values raise ValueError."""
        unknown = sorted(set(options) - set(cls.OPTIONS))
        if unknown:
            raise ValueError(f"unknown {cls.name} backend options {unknown}; allowed: {', '.join(cls.OPTIONS)}")
        engine = options.get("engine", "openai")
        if not isinstance(engine, str):
            raise ValueError(f"{cls.name} backend option engine must be one of {sorted(ENGINES)}, got {engine!r}")
        return cls(**options)

    @property
    def engine(self) -> JudgeEngine:
        """The judge engine, imported and built on first use."""
        if self._engine is None:
            module, attribute = ENGINES[self.engine_name]
            engine_cls = getattr(importlib.import_module(module), attribute)
            self._engine = engine_cls(**self.engine_options)
        return self._engine

    def score(self, request: ScoreRequest) -> list[Score]:
        """One Score per edit of the group, in order (all edits judged in one engine call per pass)."""
        return self.score_many([request])[0]

    def score_many(self, requests: list[ScoreRequest]) -> list[list[Score]]:
        """Scores of several groups, packed into one engine call per pass (plus re-asks of failed replies)."""
        engine = self.engine  # built here, outside the per-call guard: a broken engine config must fail loudly
        prompts: list[tuple[int, int, str, JudgePrompt]] = []
        for r, request in enumerate(requests):
            for e, edit in enumerate(request.edits):
                sc, pq = self.build_prompts(request.instruction, request.source, edit)
                prompts += [(r, e, "SC", sc), (r, e, "PQ", pq)]
        passes: list[list[_Slot]] = []
        for i in range(self.num_pass):
            slots = [_Slot(r, e, kind, prompt) for r, e, kind, prompt in prompts]
            self._ask(engine, slots, self.seed + i)
            for reask in range(1, self.max_reasks + 1):
                pending = [slot for slot in slots if slot.parsed is None]
                if not pending:
                    break
                self._ask(engine, pending, self.seed + i + reask * self.num_pass)
            passes.append(slots)
        results: list[list[Score]] = [[] for _ in requests]
        for index, (r, _e, kind, _) in enumerate(prompts):
            if kind == "SC":  # SC and PQ of an edit are adjacent: index, index + 1
                results[r].append(self._combine([(slots[index], slots[index + 1]) for slots in passes]))
        return results

    def build_prompts(
        self, instruction: str, source: Image.Image, edit: Image.Image
    ) -> tuple[JudgePrompt, JudgePrompt]:
        """The (SC, PQ) questions for one edit (editrl's VIEScore prompts; subclasses bring their own)."""
        return build_prompts(instruction, source, edit, self.score_range)

    def _ask(self, engine: JudgeEngine, slots: list[_Slot], seed: int) -> None:
        """One engine call for ``slots``; fills ``parsed`` or ``error`` of each."""
        if not slots:
            return
        try:
            replies = list(engine.generate([slot.prompt for slot in slots], seed, self.max_new_tokens))
            if len(replies) != len(slots):
                raise RuntimeError(f"engine returned {len(replies)} replies for {len(slots)} prompts")
        except Exception as exc:  # an engine-wide failure: every prompt of the call failed
            error = f"engine error: {type(exc).__name__}: {cap_text(str(exc))}"
            log.warning("judge engine %s failed for %d prompts: %s", self.engine_name, len(slots), error)
            for slot in slots:
                slot.error = error
            return
        for slot, reply in zip(slots, replies, strict=True):
            if not isinstance(reply, str):
                slot.error = "engine returned no reply" if reply is None else f"engine returned {type(reply).__name__}"
                continue
            try:
                slot.parsed = parse_scores(reply, n_expected=2, score_range=self.score_range)
            except JudgeParseError as exc:
                slot.error = exc.reason
            except Exception as exc:  # a parser bug costs this reply, not the whole batch
                slot.error = f"reply parser failed: {type(exc).__name__}: {cap_text(str(exc))}"
                log.warning("judge reply parser failed: %s", slot.error)

    def _combine(self, passes: list[tuple[_Slot, _Slot]]) -> Score:
        """The Score of one edit from its (SC, PQ) slots of every pass, or unscored if any is unusable."""
        for i, pair in enumerate(passes):
            for slot in pair:
                if slot.parsed is None:
                    where = f"{slot.kind} pass {i}" if self.num_pass > 1 else slot.kind
                    return Score.unscored(
                        f"judge reply unparseable after {self.max_reasks} re-asks: {where}: {slot.error}"
                    )
        sc_lists = [sc.parsed.scores for sc, _ in passes if sc.parsed is not None]
        pq_lists = [pq.parsed.scores for _, pq in passes if pq.parsed is not None]
        summary = avg_at_k(list(zip(sc_lists, pq_lists, strict=True)), self.score_range, self.reduction)
        k, scale = len(passes), 10.0 / self.score_range
        raw = [[s[0] for s in sc_lists], [s[1] for s in sc_lists], [s[0] for s in pq_lists], [s[1] for s in pq_lists]]
        sub_scores = {"SC": summary["SC"], "PQ": summary["PQ"]}
        sub_scores.update({name: sum(values) / k * scale for name, values in zip(self.SUB_NAMES, raw, strict=True)})
        sub_scores["passes"] = float(k)
        first_sc, first_pq = passes[0]
        reasoning = f"{first_sc.parsed.reasoning if first_sc.parsed else ''} | "
        reasoning += first_pq.parsed.reasoning if first_pq.parsed else ""
        return Score(scored=True, overall=summary["overall"], sub_scores=sub_scores, reasoning=reasoning)
