"""VLLMEngine: the install hint without vLLM, the adapter plumbing against a fake ``vllm`` module, and (only where
vLLM is installed) construction against the real package. No GPU is used here.
"""

from __future__ import annotations

import inspect
import sys
import types
from typing import Any

import numpy as np
import pytest
from PIL import Image

from editrl.scorer.engines import JudgeEngine, JudgePrompt


def noise_image(seed: int, size: int = 16) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_without_vllm_construction_raises_import_error_with_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError, installed or not
    from editrl.scorer.engines.vllm_engine import VLLMEngine

    with pytest.raises(ImportError, match=r"pip install editrl\[vllm\]"):
        VLLMEngine("Qwen/Qwen2.5-VL-7B-Instruct")


class FakeLLM:
    """Records calls; the reply names the prompt's text; a text containing 'boom' fails any batch it is in."""

    instances: list[FakeLLM] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple[list[Any], Any]] = []
        self.lora_requests: list[Any] = []
        FakeLLM.instances.append(self)

    def chat(
        self, messages: list[Any], sampling_params: Any = None, use_tqdm: bool = True, lora_request: Any = None
    ) -> list[Any]:
        self.calls.append((messages, sampling_params))
        self.lora_requests.append(lora_request)
        texts = [
            [p["text"] for p in conversation[-1]["content"] if p["type"] == "text"][-1] for conversation in messages
        ]
        if any("boom" in text for text in texts):
            raise ValueError("prompt too long")
        completion = types.SimpleNamespace
        return [completion(outputs=[completion(text=f"reply to {text}")]) for text in texts]


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM  # type: ignore[attr-defined]
    module.SamplingParams = lambda **kwargs: kwargs  # type: ignore[attr-defined]
    lora, request = types.ModuleType("vllm.lora"), types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda name, lora_id, path: (name, lora_id, path)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setitem(sys.modules, "vllm.lora", lora)
    monkeypatch.setitem(sys.modules, "vllm.lora.request", request)
    FakeLLM.instances.clear()
    return module


def test_adapter_builds_chat_messages_and_sampling_params(fake_vllm: types.ModuleType) -> None:
    from editrl.scorer.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine("m", max_new_tokens=64, limit_images_per_prompt=2)
    assert isinstance(engine, JudgeEngine) and not FakeLLM.instances  # lazy: no model before generate
    prompts = [
        JudgePrompt("a", [noise_image(0), noise_image(1)], system="be strict"),
        JudgePrompt("b", [noise_image(2)]),
    ]
    assert engine.generate(prompts, seed=7, max_new_tokens=1000) == ["reply to a", "reply to b"]
    (llm,) = FakeLLM.instances
    assert llm.kwargs == {
        "model": "m",
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.85,
        "max_model_len": 8192,
        "limit_mm_per_prompt": {"image": 2},
    }
    ((messages, params),) = llm.calls  # one batched call
    assert params == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 64, "seed": 7}  # engine cap wins
    assert llm.lora_requests == [None]
    system, user = messages[0]
    assert system == {"role": "system", "content": "be strict"}
    assert [part["type"] for part in user["content"]] == ["text", "image_url", "image_url"]  # text first
    assert user["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert [m["role"] for m in messages[1]] == ["user"]
    assert engine.generate([]) == []


def test_lora_sampling_and_labelled_layout(fake_vllm: types.ModuleType) -> None:
    """EditScore's set-up: a LoRA over the base model, top-p/top-k sampling, images first with <imgN> labels."""
    from editrl.scorer.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine("base", lora="/adapters/editscore", temperature=0.7, top_p=0.9, top_k=20)
    prompt = JudgePrompt("rate it", [noise_image(0), noise_image(1)], label_images=True)
    assert engine.generate([prompt], seed=43) == ["reply to rate it"]
    (llm,) = FakeLLM.instances
    assert llm.kwargs["enable_lora"] is True and llm.kwargs["max_lora_rank"] == 64
    assert llm.lora_requests == [("judge", 1, "/adapters/editscore")]
    ((messages, params),) = llm.calls
    assert params == {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_tokens": 512, "seed": 43}
    parts = messages[0][0]["content"]
    assert [p.get("text", p["type"]) for p in parts] == ["<img1>: ", "image_url", "<img2>: ", "image_url", "rate it"]


def test_failed_batch_is_retried_per_prompt_and_only_failures_are_none(fake_vllm: types.ModuleType) -> None:
    from editrl.scorer.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine("m", limit_images_per_prompt=1)
    prompts = [JudgePrompt("a"), JudgePrompt("boom"), JudgePrompt("c", [noise_image(0), noise_image(1)])]
    assert engine.generate(prompts) == ["reply to a", None, None]  # "c" has too many images: never sent
    (llm,) = FakeLLM.instances
    assert [len(messages) for messages, _ in llm.calls] == [2, 1, 1]


def test_options_are_validated(fake_vllm: types.ModuleType) -> None:
    from editrl.scorer.engines.vllm_engine import VLLMEngine

    with pytest.raises(ValueError, match="model"):
        VLLMEngine("")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMEngine("m", gpu_memory_utilization=1.5)
    with pytest.raises(ValueError, match="limit_images_per_prompt"):
        VLLMEngine("m", limit_images_per_prompt=0)


def test_real_vllm_constructs_without_loading() -> None:
    vllm = pytest.importorskip("vllm")
    from editrl.scorer.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine("Qwen/Qwen2.5-VL-7B-Instruct")
    assert engine._vllm is vllm and engine._llm is None
    assert "sampling_params" in inspect.signature(vllm.LLM.chat).parameters
    assert vllm.SamplingParams(seed=3, max_tokens=1).seed == 3
