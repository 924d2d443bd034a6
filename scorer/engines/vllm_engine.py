"""VLLMEngine: a Qwen-VL-style judge run in-process with vLLM's offline ``LLM`` (GPU).

Thin adapter over vLLM's public offline API:

- ``vllm`` is imported in ``__init__`` (ImportError telling to ``pip install editrl[vllm]`` when missing); the model
  is built lazily on the first ``generate`` (or :meth:`VLLMEngine.load`) as ``LLM(model=..., tensor_parallel_size=...,
  gpu_memory_utilization=..., max_model_len=..., limit_mm_per_prompt={"image": limit_images_per_prompt})``.
- Prompt layout (same as the OpenAI and transformers engines): an optional system message, then one user message
  whose content is :func:`~editrl.scorer.engines.prompt_parts` -- text parts and images as OpenAI-style
  ``image_url`` parts with ``data:image/png;base64,...`` URLs (accepted by ``LLM.chat`` in every vLLM release we
  support; the model's chat template inserts the vision tokens).
- All prompts of a call go to ONE ``LLM.chat(conversations, sampling_params=SamplingParams(temperature=..., top_p=...,
  [top_k=...,] max_tokens=..., seed=seed), use_tqdm=False, lora_request=...)`` so vLLM batches them; reply ``i`` is
  ``outputs[i].outputs[0].text``. ``max_new_tokens`` of the engine caps the per-call value (as in the transformers
  engine). With ``lora`` (e.g. the EditScore adapter) the ``LLM`` is built with ``enable_lora=True`` and every call
  carries ``LoRARequest("judge", 1, lora)``: vLLM's own LoRA support, no merged copy of the model on disk.

Failure model: if the batched ``chat`` call raises (e.g. one prompt longer than ``max_model_len`` or with more
images than allowed), each prompt is retried alone, so only the prompts that fail on their own yield ``None``
(logged). A prompt with more images than ``limit_images_per_prompt`` yields ``None`` without being sent. An output
without text also yields ``None``. Loading errors (bad model id, out of GPU memory) are raised: they are
configuration errors, not per-prompt failures.
"""

from __future__ import annotations

import logging
from typing import Any

from editrl.scorer.engines import JudgePrompt, check_sampling
from editrl.scorer.engines.openai_compat import openai_messages

log = logging.getLogger(__name__)

INSTALL_HINT = "VLLMEngine needs vLLM: pip install editrl[vllm] (GPU machines only)"


class VLLMEngine:
    """In-process vLLM judge engine; see the module docstring for the prompt layout and the failure model."""

    name = "vllm"

    def __init__(
        self,
        model: str,
        max_new_tokens: int = 512,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        lora: str = "",
        max_lora_rank: int = 64,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int = 8192,
        limit_images_per_prompt: int = 2,
    ) -> None:
        """Validate the options and import vLLM (ImportError with the install hint when absent); no model load yet."""
        if not model or not isinstance(model, str):
            raise ValueError(f"model must be a non-empty string (model id or directory), got {model!r}")
        for key, value in (
            ("max_new_tokens", max_new_tokens),
            ("tensor_parallel_size", tensor_parallel_size),
            ("max_model_len", max_model_len),
            ("limit_images_per_prompt", limit_images_per_prompt),
            ("max_lora_rank", max_lora_rank),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        check_sampling(temperature, top_p, top_k)
        if not isinstance(lora, str):
            raise ValueError(f"lora must be a LoRA adapter directory (a string), got {lora!r}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
        self._vllm: Any = vllm
        self.model_id = model
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_p, self.top_k = float(top_p), top_k
        self.lora, self.max_lora_rank = lora, max_lora_rank
        self.tensor_parallel_size = tensor_parallel_size
        self.gpu_memory_utilization = float(gpu_memory_utilization)
        self.max_model_len = max_model_len
        self.limit_images_per_prompt = limit_images_per_prompt
        self._llm: Any = None

    def load(self) -> None:
        """Build the vLLM ``LLM`` (no-op once built). Raises on a bad model id or when the GPU cannot hold it."""
        if self._llm is not None:
            return
        self._llm = self._vllm.LLM(
            model=self.model_id,
            tensor_parallel_size=self.tensor_parallel_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            max_model_len=self.max_model_len,
            limit_mm_per_prompt={"image": self.limit_images_per_prompt},
            **({"enable_lora": True, "max_lora_rank": self.max_lora_rank} if self.lora else {}),
        )
        log.info("loaded vLLM judge %s (tp=%d)", self.model_id, self.tensor_parallel_size)

    def generate(
        self, prompts: list[JudgePrompt], seed: int = 0, max_new_tokens: int | None = None
    ) -> list[str | None]:
        """One reply per prompt, in order; None for prompts that failed on their own (see the failure model)."""
        if not prompts:
            return []
        self.load()
        limit = self.max_new_tokens if max_new_tokens is None else min(int(max_new_tokens), self.max_new_tokens)
        params = self._vllm.SamplingParams(
            temperature=self.temperature, top_p=self.top_p, max_tokens=limit, seed=seed,
            **({"top_k": self.top_k} if self.top_k > 0 else {}),
        )  # fmt: skip
        replies: list[str | None] = [None] * len(prompts)
        sendable = [i for i, p in enumerate(prompts) if len(p.images) <= self.limit_images_per_prompt]
        for i in sorted(set(range(len(prompts))) - set(sendable)):
            log.warning(
                "judge prompt %d has %d images > limit %d", i, len(prompts[i].images), self.limit_images_per_prompt
            )
        try:
            texts = self._chat([prompts[i] for i in sendable], params)
        except Exception as exc:  # one bad prompt fails the whole batch: retry each alone
            log.warning("vLLM batch of %d prompts failed (%r); retrying one by one", len(sendable), exc)
            texts = []
            for i in sendable:
                try:
                    texts += self._chat([prompts[i]], params)
                except Exception as one_exc:
                    log.warning("judge prompt %d failed: %r", i, one_exc)
                    texts.append(None)
        for i, text in zip(sendable, texts, strict=True):
            replies[i] = text
        return replies

    def _chat(self, prompts: list[JudgePrompt], params: Any) -> list[str | None]:
        """Replies of one ``LLM.chat`` call (raises on failure or on a wrong number of outputs)."""
        if not prompts:
            return []
        lora = None
        if self.lora:  # served through vLLM's LoRA support (no merged copy written to disk)
            from vllm.lora.request import LoRARequest

            lora = LoRARequest("judge", 1, self.lora)
        outputs = self._llm.chat(
            [openai_messages(p) for p in prompts], sampling_params=params, use_tqdm=False, lora_request=lora
        )
        if len(outputs) != len(prompts):
            raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {len(prompts)} prompts")
        replies: list[str | None] = []
        for output in outputs:
            completions = getattr(output, "outputs", None) or []
            text = getattr(completions[0], "text", None) if completions else None
            replies.append(text if isinstance(text, str) else None)
        return replies
