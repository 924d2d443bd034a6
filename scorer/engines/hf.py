"""TransformersEngine: a Qwen-VL-style judge run in-process with Hugging Face transformers (CPU or one GPU).

Loading (lazy, on the first ``generate``): ``AutoModelForImageTextToText.from_pretrained(model, dtype=...)`` (a
Qwen2.5-VL checkpoint loads as ``Qwen2_5_VLForConditionalGeneration``) and ``AutoProcessor.from_pretrained(model)``.
Where torchvision is missing (it cannot be installed beside torch 2.13 cpu) ``AutoProcessor`` fails on the video
processor; the engine then assembles the same processor class from ``AutoTokenizer`` + ``AutoImageProcessor`` with
no video processor (:func:`editrl.common.hf_processors.load_image_text_processor`). Images work the same; videos are not supported then.

With ``lora`` (a peft adapter directory or id, e.g. EditScore's) the adapter is merged into the weights once, in
memory (``PeftModel.from_pretrained(...).merge_and_unload()``, as the editscore package's HF path does).

Prompt layout (same as :class:`~editrl.scorer.engines.openai_compat.OpenAIEngine`): an optional system message, then
one user message whose content is :func:`~editrl.scorer.engines.prompt_parts` (text first, or EditScore's labelled
images first), rendered with the processor's chat template (``add_generation_prompt=True``).

Generation: prompts run in batches of ``batch_size`` (left padding), greedy when ``temperature == 0`` else sampling
with ``top_p``/``top_k``;
``torch.manual_seed(seed)`` once per ``generate`` call, so the same prompts, seed and batch size give the same
replies. Only the new tokens are decoded (special tokens skipped). ``max_new_tokens`` of the engine caps the
per-call value: a call asks for ``min(call value, engine value)`` new tokens.

Failure model: a batch whose preprocessing or ``generate`` raises yields ``None`` for each of its prompts (logged,
the other batches still run). Loading errors (bad model id, missing files) are raised: they are configuration
errors, not per-prompt failures.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from editrl.common.hf_processors import load_image_text_processor
from editrl.scorer.engines import JudgePrompt, check_sampling, prompt_parts

log = logging.getLogger(__name__)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def chat_messages(prompt: JudgePrompt) -> list[dict[str, Any]]:
    """Qwen-VL chat messages for one prompt: optional system, then the user content in the prompt's layout."""
    messages: list[dict[str, Any]] = []
    if prompt.system:
        messages.append({"role": "system", "content": [{"type": "text", "text": prompt.system}]})
    content = [
        {"type": "text", "text": part} if isinstance(part, str) else {"type": "image"} for part in prompt_parts(prompt)
    ]
    messages.append({"role": "user", "content": content})
    return messages


class TransformersEngine:
    """In-process transformers judge engine; see the module docstring for loading, batching and failures."""

    name = "transformers"

    def __init__(
        self,
        model: str,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        dtype: str = "float32",
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        lora: str = "",
        device: str = "cpu",
    ) -> None:
        if not model or not isinstance(model, str):
            raise ValueError(f"model must be a non-empty string (model id or directory), got {model!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        if dtype not in _DTYPES and dtype != "auto":
            raise ValueError(f"dtype must be one of {sorted(_DTYPES) + ['auto']}, got {dtype!r}")
        check_sampling(temperature, top_p, top_k)
        if not isinstance(lora, str):
            raise ValueError(f"lora must be a LoRA adapter directory or id (a string), got {lora!r}")
        self.model_id = model
        self.lora = lora
        self.top_p = float(top_p)
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.dtype = dtype
        self.temperature = float(temperature)
        self.device = torch.device(device)
        self._model: Any = None
        self._processor: Any = None

    def load(self) -> None:
        """Load model and processor (no-op once loaded). Raises on a bad model id or missing files."""
        if self._model is not None:
            return
        from transformers import AutoModelForImageTextToText

        processor = load_image_text_processor(self.model_id)
        processor.tokenizer.padding_side = "left"
        dtype = "auto" if self.dtype == "auto" else _DTYPES[self.dtype]
        model = AutoModelForImageTextToText.from_pretrained(self.model_id, dtype=dtype)
        if self.lora:  # EditScore ships LoRA adapters over the base VLM: merged once, in memory
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.lora).merge_and_unload()
        self._model = model.to(self.device).eval()
        self._processor = processor
        log.info("loaded judge %s%s (%s, %s)", self.model_id, f" + {self.lora}" if self.lora else "",
                 type(model).__name__, self.dtype)  # fmt: skip

    @property
    def model(self) -> Any:
        """The loaded model (loads on first access)."""
        self.load()
        return self._model

    @property
    def processor(self) -> Any:
        """The loaded processor (loads on first access)."""
        self.load()
        return self._processor

    def generate(
        self, prompts: list[JudgePrompt], seed: int = 0, max_new_tokens: int | None = None
    ) -> list[str | None]:
        """One reply per prompt, in order; None for every prompt of a batch that raised."""
        if not prompts:
            return []
        self.load()
        limit = self.max_new_tokens if max_new_tokens is None else min(int(max_new_tokens), self.max_new_tokens)
        torch.manual_seed(seed)
        replies: list[str | None] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            try:
                replies += self._generate_batch(batch, limit)
            except Exception as exc:  # one failed batch must not stop the others
                log.warning("judge batch %d-%d failed: %r", start, start + len(batch) - 1, exc, exc_info=True)
                replies += [None] * len(batch)
        return replies

    @torch.inference_mode()
    def _generate_batch(self, batch: list[JudgePrompt], max_new_tokens: int) -> list[str]:
        """Replies of one batch (raises on any failure)."""
        processor = self._processor
        texts = [
            processor.apply_chat_template(chat_messages(p), tokenize=False, add_generation_prompt=True) for p in batch
        ]
        images = [image.convert("RGB") for p in batch for image in p.images]
        inputs = processor(text=texts, images=images or None, padding=True, return_tensors="pt").to(self.device)
        tokenizer = processor.tokenizer
        sampling: dict[str, Any] = {"do_sample": False}
        if self.temperature > 0:
            sampling = {"do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}
        out = self._model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        return tokenizer.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
