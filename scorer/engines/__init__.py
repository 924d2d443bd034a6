"""Judge engines: one interface, several ways to run a vision-language judge.

An engine turns judge prompts (text + images) into reply texts. It knows nothing about scores: parsing, retries of
unparseable replies and the VIEScore arithmetic live in :mod:`editrl.scorer.vlm` / :mod:`editrl.scorer.viescore`.

Failure model: ``generate`` returns one entry per prompt, in order; ``None`` for a prompt whose call failed after the
engine's own transport retries (timeouts, HTTP 429/5xx). It never raises for a single failed prompt and never
returns a made-up reply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image


@dataclass
class JudgePrompt:
    """One question to the judge: ``text`` refers to ``images`` in order (the engine inserts them).

    ``label_images`` selects EditScore's layout: the images first, each preceded by ``"<img1>: "``, ``"<img2>: "``...,
    then the text (the layout its LoRA was trained on); otherwise the text comes first, then the images.
    An empty ``system`` sends no system message (Qwen's chat template then adds its default one).
    """

    text: str
    images: list[Image.Image] = field(default_factory=list)
    system: str = ""
    label_images: bool = False


def prompt_parts(prompt: JudgePrompt) -> list[str | Image.Image]:
    """The user message content in order: text pieces (str) and images, per the prompt's layout."""
    if not prompt.label_images:
        return [prompt.text, *prompt.images]
    parts: list[str | Image.Image] = []
    for i, image in enumerate(prompt.images, start=1):
        parts += [f"<img{i}>: ", image]
    return [*parts, prompt.text]


@runtime_checkable
class JudgeEngine(Protocol):
    name: str

    def generate(self, prompts: list[JudgePrompt], seed: int = 0, max_new_tokens: int = 512) -> list[str | None]:
        """One reply per prompt, same order; None where the call failed. Batches internally where it can."""
        ...


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """ValueError unless temperature in [0, 2], top_p in (0, 1] and top_k an integer >= 0 (0 = no top-k cut)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 <= temperature <= 2.0:
        raise ValueError(f"temperature must be in [0, 2], got {temperature!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
