"""EditScoreBackend: EditScore (Qwen2.5-VL + the EditScore LoRA) scored EditScore's way, without its guesses.

What comes from the ``editscore`` package (``pip install --no-deps editscore==0.2 json-repair``; its declared
dependencies would pull an unpinned torch and torchvision): the judge's prompt texts, ``editscore.vie_prompts`` --
the reasoning-first context, the two-image SC rule and the PQ rule, with every "10" replaced by ``score_range``
(25 for the released models), exactly as ``EditScore.__init__`` assembles them. The images come first, each
labelled ``<img1>: ``, ``<img2>: `` before the text, and there is no system message (Qwen's default one applies),
as in the package's hand-built Qwen2.5 chat template.

What editrl does instead of the package (see :mod:`editrl.scorer.vlm` for the shared machinery):
- The model runs on editrl's judge engines (``transformers`` in-process with the LoRA merged in memory like the
  package's HF path, ``vllm`` in-process with vLLM's LoRA support, or ``openai`` against a server that serves the
  LoRA), with EditScore's sampling defaults: temperature 0.7, top-p 0.9, top-k 20, ``seed + pass`` per pass.
  The package's own HF runner moves inputs to CUDA unconditionally, so it cannot run here at all.
- PQ shows the edited image only: the documented VIEScore behaviour and the package's ``evaluate()``. Its
  ``batch_evaluate()`` (what its reward server calls) shows both images to PQ; we do not.
- Replies are parsed by :func:`editrl.scorer.viescore.parse_scores` and re-asked on failure (a reply with two
  different score lists, a first guess and a correction, is such a failure); an edit whose reply never parses is
  unscored. The package instead substitutes ``score_range / 2`` for an empty or out-of-range list
  (``batch_evaluate``, where the 12.5 then lands on a 0-10 scale) or a random integer after two tries
  (``evaluate``).

Arithmetic (per pass, all on 0..10): ``SC = min(sc) * 10 / score_range``, ``PQ = min(pq) * 10 / score_range``,
``O = sqrt(SC * PQ)``; Avg@K over ``num_pass`` passes with ``reduction`` ``average_last`` (default: mean of the
per-pass O) or ``average_first`` (``sqrt(mean SC * mean PQ)``). Sub-scores use the package's names:
``prompt_following`` and ``consistency`` (the two SC scores), ``naturalness``, ``artifacts``, plus ``SC``, ``PQ``
and ``passes``.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from editrl.scorer.engines import JudgeEngine, JudgePrompt
from editrl.scorer.vlm import VLMBackend

INSTALL_HINT = "the editscore backend needs the editscore package: pip install --no-deps editscore==0.2 json-repair"


def editscore_prompts(score_range: int = 25) -> tuple[str, str]:
    """The package's (SC, PQ) prompt templates for ``score_range``; SC still holds the ``<instruction>`` marker.

    Raises ValueError with the install hint when the package is missing.
    """
    try:
        from editscore import vie_prompts
    except ImportError as exc:
        raise ValueError(f"{INSTALL_HINT} ({exc})") from exc
    scale = str(score_range)
    sc = "\n".join(
        [
            vie_prompts._context_no_delimit_reasoning_first,
            vie_prompts._prompts_0shot_two_image_edit_rule,
            vie_prompts._prompts_0shot_tie_rule_SC.replace("10", scale),
        ]
    )
    pq = "\n".join(
        [vie_prompts._context_no_delimit_reasoning_first, vie_prompts._prompts_0shot_rule_PQ.replace("10", scale)]
    )
    return sc, pq


class EditScoreBackend(VLMBackend):
    """EditScore on an editrl judge engine; see the module docstring for what is the package's and what is ours."""

    name = "editscore"
    OPTIONS = (
        "model", "lora", "engine", "engine_options", "num_pass", "max_reasks", "score_range", "seed",
        "max_new_tokens", "reduction", "temperature", "top_p", "top_k",
    )  # fmt: skip
    SUB_NAMES = ("prompt_following", "consistency", "naturalness", "artifacts")

    def __init__(
        self,
        model: str = "",
        lora: str = "",
        engine: str | JudgeEngine = "transformers",
        engine_options: dict[str, Any] | None = None,
        num_pass: int = 1,
        max_reasks: int = 2,
        score_range: int = 25,
        seed: int = 42,
        max_new_tokens: int = 512,
        reduction: str = "average_last",
        temperature: float = 0.7,
        top_p: float = 0.9,
        top_k: int = 20,
    ) -> None:
        """``model``: the base VLM (id or directory; for ``openai`` the served model name, LoRA included);
        ``lora``: the EditScore adapter (id or directory) for the in-process engines."""
        if isinstance(engine, str) and (not isinstance(model, str) or not model):
            raise ValueError("editscore backend option model: required (e.g. Qwen/Qwen2.5-VL-7B-Instruct)")
        if engine_options is not None and not isinstance(engine_options, dict):
            raise ValueError(f"engine_options must be a dict, got {engine_options!r}")
        if lora and engine == "openai":
            raise ValueError(
                "editscore backend option lora: the openai engine cannot load an adapter; serve it with the server "
                "(e.g. vllm serve BASE --enable-lora --lora-modules editscore=PATH) and set model to its name"
            )
        options: dict[str, Any] | None = None
        if isinstance(engine, str):  # a ready engine object (tests, custom runners) brings its own model and sampling
            options = {"model": model, "temperature": temperature, "top_p": top_p, "top_k": top_k}
            if lora:
                options["lora"] = lora
            clash = sorted(set(options) & set(engine_options or {}))
            if clash:
                raise ValueError(f"editscore backend: set {clash} as backend options, not in engine_options")
            options.update(engine_options or {})
        elif lora or engine_options:
            raise ValueError("editscore backend: lora and engine_options only apply when engine is given by name")
        super().__init__(engine, options, num_pass, max_reasks, score_range, seed, max_new_tokens, reduction)
        self.sc_template, self.pq_template = editscore_prompts(score_range)

    def build_prompts(
        self, instruction: str, source: Image.Image, edit: Image.Image
    ) -> tuple[JudgePrompt, JudgePrompt]:
        """SC sees [source, edit] and the instruction, PQ sees only the edit; images first, labelled."""
        sc = JudgePrompt(self.sc_template.replace("<instruction>", instruction), [source, edit], label_images=True)
        return sc, JudgePrompt(self.pq_template, [edit], label_images=True)
