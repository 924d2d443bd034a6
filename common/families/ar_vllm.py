"""VLLMTokenEngine: the ``ar`` family's :class:`~editrl.common.families.ar.TokenEngine` on vLLM's offline ``LLM`` (GPU).

Thin adapter over vLLM's public API (checked against vLLM's V1 sampler and ``SamplingParams``):

- ``vllm`` is imported in ``__init__`` (ImportError telling to ``pip install editrl[vllm]`` when missing); the model
  is built lazily on the first ``generate`` (or :meth:`VLLMTokenEngine.load`) as ``LLM(model=...,
  logprobs_mode="processed_logprobs", ...)``. vLLM's default ``raw_logprobs`` are taken from the logits BEFORE
  ``allowed_token_ids``, temperature and top-k; ``processed_logprobs`` (vLLM >= 0.10.2) are the log-softmax of the
  logits it actually samples from (allowed ids -> temperature -> top-k), i.e. :func:`editrl.common.families.ar.masked_log_softmax`.
- One request per call: ``LLM.generate([{"prompt_token_ids": prompt}], SamplingParams(n=n, temperature=...,
  top_k=top_k or -1, top_p=1.0, min_p=0.0, max_tokens=T, seed=seed, logprobs=1, allowed_token_ids=...,
  stop_token_ids=end_ids, detokenize=False))``. Completion ``i`` is ``outputs[0].outputs[i]``: its ``token_ids``
  (the end token included, as vLLM appends a sampled stop token before finishing) and ``logprobs``, one
  ``{token_id: Logprob}`` map per position (a list of dicts, or ``FlatLogprobs`` which indexes the same way); the
  sampled token's entry is always present. Completions are right-padded to T with the pad id (mask 0, log-prob 0).
- Architecture registration goes through vLLM's plugin mechanism, never by editing vLLM: :func:`register` is a
  ``vllm.general_plugins`` entry point (see :data:`ENTRY_POINT`), which vLLM calls in every process it starts
  before loading a model. It registers :data:`EMU3_ARCHITECTURES` with ``ModelRegistry.register_model`` (a lazy
  ``"module:Class"`` string, so no CUDA is touched at plugin load) unless the running vLLM already supports them
  (recent releases resolve ``Emu3ForConditionalGeneration`` to their Transformers backend by themselves). Our
  prompts are plain token ids (the source image is inlined as VQ token ids), so vLLM only runs the language model.

The log-probs returned here are behaviour log-probs at best: the learner recomputes its own (see
:mod:`editrl.common.families.ar`), and vLLM's bf16 kernels and batching differ from the learner's numerics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from editrl.common.families.ar import check_request

__all__ = ["VLLMTokenEngine", "register", "EMU3_ARCHITECTURES", "VLLM_EMU3_MODEL_CLS", "ENTRY_POINT", "INSTALL_HINT"]

log = logging.getLogger(__name__)

INSTALL_HINT = "VLLMTokenEngine needs vLLM: pip install editrl[vllm] (GPU machines only)"
EMU3_ARCHITECTURES: tuple[str, ...] = ("Emu3ForConditionalGeneration",)
# vLLM's Transformers-backend class for multimodal causal LMs (what recent vLLM maps Emu3 to itself).
VLLM_EMU3_MODEL_CLS = "vllm.model_executor.models.transformers:TransformersMultiModalForCausalLM"
# What pyproject.toml would declare so that vLLM finds register():
#   [project.entry-points."vllm.general_plugins"]
#   editrl_emu3 = "editrl.common.families.ar_vllm:register"
ENTRY_POINT = ("vllm.general_plugins", "editrl_emu3", "editrl.common.families.ar_vllm:register")


def register() -> None:
    """``vllm.general_plugins`` entry point: make vLLM resolve the Emu3 architecture. Idempotent (vLLM may call it
    once per process); a no-op for architectures the running vLLM already supports."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch in EMU3_ARCHITECTURES:
        if arch not in supported:
            ModelRegistry.register_model(arch, VLLM_EMU3_MODEL_CLS)


class VLLMTokenEngine:
    """In-process vLLM token sampler; see the module docstring for the calls it makes."""

    def __init__(
        self,
        model: str,
        end_ids: Sequence[int],
        pad_id: int,
        *,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        max_model_len: int = 8192,
        dtype: str = "auto",
        enable_prefix_caching: bool = True,
    ) -> None:
        """Validate the options and import vLLM (ImportError with the install hint when absent); no model load yet."""
        if not model or not isinstance(model, str):
            raise ValueError(f"model must be a non-empty string (model id or directory), got {model!r}")
        if not end_ids:
            raise ValueError("end_ids must name at least one end token")
        for key, value in (("tensor_parallel_size", tensor_parallel_size), ("max_model_len", max_model_len)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if not 0.0 < gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        try:
            import vllm
        except ImportError as exc:
            raise ImportError(f"{INSTALL_HINT} ({exc})") from exc
        self._vllm: Any = vllm
        self.model_id = model
        self.end_ids, self.pad_id = [int(i) for i in end_ids], int(pad_id)
        self.llm_kwargs: dict[str, Any] = {
            "model": model,
            "logprobs_mode": "processed_logprobs",
            "tensor_parallel_size": tensor_parallel_size,
            "gpu_memory_utilization": float(gpu_memory_utilization),
            "max_model_len": max_model_len,
            "dtype": dtype,
            "enable_prefix_caching": enable_prefix_caching,
        }
        self._llm: Any = None

    def load(self) -> None:
        """Build the vLLM ``LLM`` (no-op once built). Raises on a bad model id or when the GPU cannot hold it."""
        if self._llm is None:
            self._llm = self._vllm.LLM(**self.llm_kwargs)
            log.info("vllm_token_engine_loaded model=%s", self.model_id)

    def sampling_params(
        self, n: int, max_new_tokens: int, temperature: float, top_k: int, allowed_ids: list[int] | None, seed: int
    ) -> Any:
        """The ``SamplingParams`` of one call: neutral top-p/min-p/penalties, so only our masking applies."""
        return self._vllm.SamplingParams(
            n=n,
            temperature=float(temperature),
            top_k=top_k if top_k > 0 else -1,
            top_p=1.0,
            min_p=0.0,
            max_tokens=max_new_tokens,
            seed=int(seed),
            logprobs=1,
            allowed_token_ids=list(allowed_ids) if allowed_ids is not None else None,
            stop_token_ids=list(self.end_ids),
            detokenize=False,
        )

    def generate(
        self,
        prompt_ids: list[int],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_k: int,
        allowed_ids: list[int] | None,
        seed: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """See :class:`editrl.common.families.ar.TokenEngine`. Raises RuntimeError when vLLM returns the wrong count."""
        check_request(prompt_ids, n, temperature, top_k, max_new_tokens)
        self.load()
        params = self.sampling_params(n, max_new_tokens, temperature, top_k, allowed_ids, seed)
        outputs = self._llm.generate([{"prompt_token_ids": list(prompt_ids)}], sampling_params=params, use_tqdm=False)
        completions = outputs[0].outputs if len(outputs) == 1 else []
        if len(completions) != n:
            raise RuntimeError(f"vLLM returned {len(completions)} completions for n={n}")
        tokens = torch.full((n, max_new_tokens), self.pad_id, dtype=torch.long)
        log_probs = torch.zeros((n, max_new_tokens), dtype=torch.float32)
        mask = torch.zeros((n, max_new_tokens), dtype=torch.float32)
        for i, completion in enumerate(completions):
            ids = [int(t) for t in completion.token_ids][:max_new_tokens]
            if completion.logprobs is None or len(completion.logprobs) < len(ids):
                raise RuntimeError("vLLM returned no per-token log-probs (is logprobs set?)")
            tokens[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            log_probs[i, : len(ids)] = torch.tensor(
                [completion.logprobs[t][tok].logprob for t, tok in enumerate(ids)], dtype=torch.float32
            )
            mask[i, : len(ids)] = 1.0
        return tokens, log_probs, mask
