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
    """One question to the judge: ``text`` refers to ``images`` in order (the engine inserts them)."""

    text: str
    images: list[Image.Image] = field(default_factory=list)
    system: str = ""


@runtime_checkable
class JudgeEngine(Protocol):
    name: str

    def generate(self, prompts: list[JudgePrompt], seed: int = 0, max_new_tokens: int = 512) -> list[str | None]:
        """One reply per prompt, same order; None where the call failed. Batches internally where it can."""
        ...
