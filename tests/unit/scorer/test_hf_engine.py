"""TransformersEngine on a tiny random-weight Qwen2.5-VL built locally (no download, CPU, one thread).

The model directory is built once per session (~2 s after imports) and loaded once per module. Replies of a random
judge are garbage by construction, so the tests check plumbing (order, batching, determinism, failure isolation)
and that the VLM backend never turns garbage into a number.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from editrl.scorer.engines import JudgeEngine, JudgePrompt

MAX_NEW_TOKENS = 12


def noise_image(seed: int, size: int = 64) -> Image.Image:
    """A real RGB PIL image with random pixels."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def truncated_image() -> Image.Image:
    """A PNG cut in half: ``Image.open`` succeeds (header only), loading the pixels raises OSError."""
    buffer = io.BytesIO()
    noise_image(99).save(buffer, format="PNG")
    return Image.open(io.BytesIO(buffer.getvalue()[: len(buffer.getvalue()) // 2]))


@pytest.fixture(scope="module")
def engine(tiny_vlm_dir: Path):
    """A loaded greedy engine, batch size 2 (so 3 prompts take two batches)."""
    from editrl.scorer.engines.hf import TransformersEngine

    eng = TransformersEngine(str(tiny_vlm_dir), max_new_tokens=MAX_NEW_TOKENS, batch_size=2)
    eng.load()
    return eng


@pytest.fixture(scope="module")
def prompts() -> list[JudgePrompt]:
    """Three prompts with 2, 1 and 0 real 64x64 images; the first has a system message."""
    return [
        JudgePrompt("Compare the source and the edited image.", [noise_image(0), noise_image(1)], system="Be strict."),
        JudgePrompt("Rate this picture.", [noise_image(2)]),
        JudgePrompt('Reply with {"score": [7, 8]}.'),
    ]


def test_build_is_idempotent_and_loads_like_a_model_id(tiny_vlm_dir: Path) -> None:
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from editrl.common.families.tiny.qwen2_5_vl import QWEN_SPECIAL_TOKENS, build_tiny_qwen2_5_vl

    weights = tiny_vlm_dir / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert build_tiny_qwen2_5_vl(tiny_vlm_dir) == tiny_vlm_dir
    assert weights.stat().st_mtime_ns == mtime  # reused, not rebuilt

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm_dir)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) < 500_000
    tok = AutoTokenizer.from_pretrained(tiny_vlm_dir)
    assert len(tok) == model.config.text_config.vocab_size < 500
    for special in QWEN_SPECIAL_TOKENS:
        assert len(tok.encode(special)) == 1, special
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    text = ' {"score": [7, 10], "reasoning": "the edited image"}'
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert "Ġscore" in tok.get_vocab() and len(tok.encode(" reasoning")) == 1
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image"}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert rendered.endswith("hi<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n<|im_start|>assistant\n")
    features = AutoImageProcessor.from_pretrained(tiny_vlm_dir)(images=[noise_image(0)], return_tensors="pt")
    assert features["image_grid_thw"].tolist() == [[1, 4, 4]]  # 16 patches -> 4 vision tokens after the 2x2 merge


def test_generate_returns_one_string_per_prompt_in_order_and_is_deterministic(
    engine, prompts: list[JudgePrompt]
) -> None:
    assert isinstance(engine, JudgeEngine) and engine.name == "transformers"
    replies = engine.generate(prompts, seed=3)
    assert len(replies) == 3 and all(isinstance(r, str) and r for r in replies)
    assert engine.generate(prompts, seed=3) == replies
    # In order: each prompt alone (no padding, other batch) gives the reply it got in the batch.
    assert [engine.generate([p], seed=3)[0] for p in prompts] == replies
    for prompt, reply in zip(prompts, replies, strict=True):  # only the new tokens are decoded
        assert prompt.text not in reply and "assistant" + chr(10) not in reply
    assert engine.generate([], seed=3) == []


def test_sampling_depends_on_seed_only(tiny_vlm_dir: Path, prompts: list[JudgePrompt]) -> None:
    from editrl.scorer.engines.hf import TransformersEngine

    sampler = TransformersEngine(str(tiny_vlm_dir), max_new_tokens=MAX_NEW_TOKENS, batch_size=3, temperature=1.0)
    first = sampler.generate(prompts, seed=5)
    assert sampler.generate(prompts, seed=5) == first
    assert sampler.generate(prompts, seed=6) != first


def test_failed_batch_gives_none_and_other_batches_still_run(engine, prompts: list[JudgePrompt]) -> None:
    broken = JudgePrompt("a corrupt image", [truncated_image()])  # opens lazily, fails when the engine loads it
    replies = engine.generate([prompts[0], prompts[1], broken], seed=3)
    assert replies[2] is None
    assert replies[:2] == engine.generate(prompts[:2], seed=3)


def test_engine_rejects_bad_options() -> None:
    from editrl.scorer.engines.hf import TransformersEngine

    with pytest.raises(ValueError, match="batch_size"):
        TransformersEngine("x", batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        TransformersEngine("x", dtype="float8")
    with pytest.raises(ValueError, match="temperature"):
        TransformersEngine("x", temperature=-1.0)


def test_vlm_backend_with_random_judge_never_scores(engine) -> None:
    from editrl.scorer.backend import ScoreRequest
    from editrl.scorer.vlm import VLMBackend

    calls: list[int] = []

    class Recording:
        name = "recording"

        def generate(self, prompts: list[JudgePrompt], seed: int = 0, max_new_tokens: int = 512) -> list[str | None]:
            calls.append(len(prompts))
            return engine.generate(prompts, seed, max_new_tokens)

    backend = VLMBackend(engine=Recording(), max_reasks=1, max_new_tokens=MAX_NEW_TOKENS)
    request = ScoreRequest("g0", "make the sky red", "color_alter", noise_image(10), [noise_image(11), noise_image(12)])
    scores = backend.score(request)
    assert len(scores) == 2
    for score in scores:
        assert not score.scored and score.overall is None and score.sub_scores == {}
        assert "unparseable" in score.reasoning
    assert calls == [4, 4]  # SC + PQ per edit in one call, then one re-ask of all four


def test_labelled_layout_renders_exactly_editscores_qwen2_5_template(engine) -> None:
    """EditScore builds its Qwen2.5 prompt by hand (default system, ``<imgN>: `` before each image, then the text);
    the engine's rendering of a ``label_images`` prompt must be that string, token for token."""
    from editrl.scorer.engines.hf import chat_messages

    prompt = JudgePrompt("RULES: rate it", [noise_image(0), noise_image(1)], label_images=True)
    rendered = engine.processor.apply_chat_template(chat_messages(prompt), tokenize=False, add_generation_prompt=True)
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<img1>: {vision}<img2>: {vision}RULES: rate it<|im_end|>\n<|im_start|>assistant\n"
    )
    assert rendered == expected


@pytest.fixture(scope="module")
def lora_dir(tiny_vlm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random (non-zero) LoRA adapter over the tiny VLM's language-model attention, saved in peft's format."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(str(tiny_vlm_dir), dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("tiny_editscore_lora")
    get_peft_model(base, config).save_pretrained(out)
    return out


def test_lora_is_merged_into_the_judge(tiny_vlm_dir: Path, lora_dir: Path, engine) -> None:
    import torch
    from safetensors.torch import load_file

    from editrl.scorer.engines.hf import TransformersEngine

    merged = TransformersEngine(str(tiny_vlm_dir), lora=str(lora_dir), max_new_tokens=MAX_NEW_TOKENS)
    merged.load()
    assert type(merged.model) is type(engine.model)  # merged and unloaded: a plain transformers model again
    adapter = load_file(lora_dir / "adapter_model.safetensors")
    (a_key,) = [k for k in adapter if "layers.0.self_attn.q_proj.lora_A" in k]
    delta = adapter[a_key.replace("lora_A", "lora_B")] @ adapter[a_key] * (8 / 4)
    name = next(n for n, _ in engine.model.named_parameters() if n.endswith("layers.0.self_attn.q_proj.weight"))
    base_w, merged_w = dict(engine.model.named_parameters())[name], dict(merged.model.named_parameters())[name]
    torch.testing.assert_close(merged_w, base_w + delta)


def test_editscore_backend_on_the_tiny_judge_with_lora_never_scores(tiny_vlm_dir: Path, lora_dir: Path) -> None:
    """The whole EditScore path on a real (random) model: package prompts, labelled images, sampling, LoRA -> the
    garbage replies become unscored edits with the reason, never numbers."""
    from editrl.scorer.backend import ScoreRequest, make_backend

    backend = make_backend(
        {"backend": "editscore", "model": str(tiny_vlm_dir), "lora": str(lora_dir), "max_reasks": 1,
         "num_pass": 2, "max_new_tokens": MAX_NEW_TOKENS, "engine_options": {"batch_size": 4}}
    )  # fmt: skip
    request = ScoreRequest("g0", "make the sky red", "color_alter", noise_image(10), [noise_image(11), noise_image(12)])
    scores = backend.score(request)
    assert len(scores) == 2
    for score in scores:
        assert not score.scored and score.overall is None and "unparseable" in score.reasoning
