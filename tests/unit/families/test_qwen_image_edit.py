"""Tests for editrl.common.families.qwen_image_edit (Qwen-Image-Edit adapter of the flow family) on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from editrl.common.families.base import ActorPolicy, LearnerPolicy, through_wire
from editrl.common.families.qwen_image_edit import QWEN_LORA_TARGETS, QwenImageEditPolicy, load_edit_processor
from editrl.common.families.qwen_image_edit_ops import (
    PIPELINE_CONDITION_AREA,
    condition_size,
    qwen_edit_schedule,
    qwen_guided_velocity,
)
from editrl.common.families.tiny.qwen_image_edit import (
    QWEN_IMAGE_SCHEDULER,
    TINY_CONDITION_AREA,
    build_tiny_qwen_image_edit,
)
from editrl.common.lora import LoraSpec, load_lora_state_dict, lora_state_dict

torch.set_num_threads(1)

NUM_STEPS = 4
GROUP = 4
CFG = 4.0
INSTRUCTION = "make the sky red"


@pytest.fixture(scope="module")
def tiny_dir(tiny_qwen_edit_dir: Path) -> Path:
    """The session's tiny Qwen-Image-Edit checkpoint (tests/conftest.py)."""
    return tiny_qwen_edit_dir


def _lora() -> LoraSpec:
    return LoraSpec(rank=4, alpha=8.0, target_modules=list(QWEN_LORA_TARGETS), seed=0)


@pytest.fixture(scope="module")
def actor(tiny_dir: Path) -> QwenImageEditPolicy:
    """Actor policy whose LoRA B is non-zero, so the LoRA path changes every transformer output."""
    policy = QwenImageEditPolicy.from_pretrained(
        tiny_dir, lora=_lora(), num_steps=NUM_STEPS, noise_level=0.7, true_cfg_scale=CFG
    )
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return policy


@pytest.fixture(scope="module")
def learner(tiny_dir: Path, actor: QwenImageEditPolicy) -> QwenImageEditPolicy:
    """Transformer-only policy holding the actor's LoRA weights."""
    policy = QwenImageEditPolicy.from_pretrained(tiny_dir, with_pipeline=False, lora=_lora())
    load_lora_state_dict(policy.model, lora_state_dict(actor.model))
    return policy


@pytest.fixture(scope="module")
def source():
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))


@pytest.fixture(scope="module")
def rollout(actor: QwenImageEditPolicy, source):
    return actor.sample(INSTRUCTION, source, GROUP, torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------- (a) loading


def test_tiny_checkpoint_loads_like_a_model_id(tiny_dir: Path) -> None:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageEditPipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor

    from editrl.common.families.base import detect_pipeline

    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImageEditPipeline" and index["processor"] == [
        "transformers",
        "Qwen2VLProcessor",
    ]
    assert detect_pipeline(tiny_dir) == "qwen_image_edit"
    # the processor component as the real id would load it: directly with torchvision, image-only without
    try:
        import torchvision  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="[Tt]orchvision"):
            QwenImageEditPipeline.from_pretrained(tiny_dir)
    else:
        assert isinstance(QwenImageEditPipeline.from_pretrained(tiny_dir).processor, Qwen2VLProcessor)
    pipe = QwenImageEditPipeline.from_pretrained(tiny_dir, processor=load_edit_processor(tiny_dir))
    assert isinstance(pipe.processor, Qwen2VLProcessor) and isinstance(pipe.tokenizer, Qwen2Tokenizer)
    assert isinstance(pipe.text_encoder, Qwen2_5_VLForConditionalGeneration)
    assert isinstance(pipe.transformer, QwenImageTransformer2DModel) and isinstance(pipe.vae, AutoencoderKLQwenImage)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    assert {k: pipe.scheduler.config[k] for k in QWEN_IMAGE_SCHEDULER} == QWEN_IMAGE_SCHEDULER
    assert pipe.vae_scale_factor == 8 and pipe.transformer.config.in_channels == 4 * pipe.vae.config.z_dim
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder.config.text_config.hidden_size
    # idempotent: a second build reuses the directory untouched
    stamp = (tiny_dir / "model_index.json").stat().st_mtime_ns
    assert build_tiny_qwen_image_edit(tiny_dir) == tiny_dir
    assert (tiny_dir / "model_index.json").stat().st_mtime_ns == stamp


def test_policies_and_condition_area(tiny_dir: Path, actor: QwenImageEditPolicy, learner: QwenImageEditPolicy) -> None:
    from editrl.common.config import LoraConfig, PolicyConfig, SamplerConfig
    from editrl.common.families.base import load_policy

    assert isinstance(actor, ActorPolicy) and isinstance(actor, LearnerPolicy) and actor.family == "flow"
    assert learner.pipeline is None and learner.scheduler_config == actor.scheduler_config
    assert learner.trainable_module() is learner.model
    assert learner.shard_units() == list(learner.model.transformer_blocks) and len(learner.shard_units()) == 2
    base = {n: p for n, p in actor.model.named_parameters() if "lora_" not in n}
    lora = [n for n, p in learner.model.named_parameters() if "lora_A" in n]
    assert len(lora) == len(QWEN_LORA_TARGETS) * len(learner.model.transformer_blocks)
    for n, p in learner.model.named_parameters():
        assert p.requires_grad == ("lora_" in n)
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    # the tiny checkpoint declares its small condition area; anything else gets the pipeline's 1024 * 1024
    assert actor.condition_area == learner.condition_area == TINY_CONDITION_AREA
    assert QwenImageEditPolicy(learner.model, learner.scheduler_config).condition_area == PIPELINE_CONDITION_AREA
    explicit = QwenImageEditPolicy.from_pretrained(
        tiny_dir, with_pipeline=False, condition_area=PIPELINE_CONDITION_AREA
    )
    assert explicit.condition_area == PIPELINE_CONDITION_AREA
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_dimensions

    for size in ((64, 64), (640, 480), (300, 1000)):  # what the pipeline computes from its hard-coded area
        w, h, _ = calculate_dimensions(1024 * 1024, size[0] / size[1])
        assert condition_size(size, PIPELINE_CONDITION_AREA, 16) == (w, h, w // 16 * 16, h // 16 * 16)
    # the config-driven loader (guidance = the true-CFG scale, sampler kind and window passed on)
    cfg = PolicyConfig(
        family="flow", model=str(tiny_dir), lora=LoraConfig(4, 8.0), sampler=SamplerConfig(num_steps=3, guidance=3.0)
    )
    loaded = load_policy(cfg, with_pipeline=False)
    assert isinstance(loaded, QwenImageEditPolicy) and (loaded.num_steps, loaded.true_cfg_scale) == (3, 3.0)
    windowed = load_policy(
        PolicyConfig(family="flow", model=str(tiny_dir), sampler=SamplerConfig(sde_type="cps", sde_window=1)),
        with_pipeline=False,
    )
    assert (windowed.sde_type, windowed.sde_window_size) == ("cps", 1)
    with pytest.raises(ValueError, match="num_steps"):
        QwenImageEditPolicy(learner.model, learner.scheduler_config, num_steps=1)


# ------------------------------------------------------------------------------------------- (b) sample / recompute


def test_sample_layout(actor: QwenImageEditPolicy, rollout, source) -> None:
    g, n, c = GROUP, NUM_STEPS, actor.model.config.in_channels
    assert rollout.family == "flow" and rollout.log_probs.shape == (g, n - 1)
    assert rollout.log_probs.dtype == np.float32 and np.isfinite(rollout.log_probs).all()
    assert rollout.traj["latents"].shape == (g, n, 16, c) and rollout.traj["latents"].dtype == np.float32
    assert rollout.params == {
        "noise_level": 0.7, "true_cfg_scale": CFG, "sde_type": "sde", "start": 0, "steps": n - 1, "height": 64,
        "width": 64,
    }  # fmt: skip
    assert len(rollout.images) == g and all(im.size == (64, 64) for im in rollout.images)
    cond = rollout.cond
    assert cond["img_shapes"].tolist() == [[1, 4, 4], [1, 4, 4]] and cond["image_latents"].shape == (16, c)
    assert cond["prompt_embeds"].shape[0] == cond["prompt_mask"].shape[0] and cond["prompt_mask"].all()
    assert cond["negative_prompt_embeds"].shape[1] == cond["prompt_embeds"].shape[1]
    sigmas, timesteps = qwen_edit_schedule(n, 16, actor.scheduler_config)
    assert np.array_equal(cond["sigmas"], sigmas.numpy()) and np.array_equal(cond["timesteps"], timesteps.numpy())
    assert cond["sigmas"][0] == 1.0 and cond["sigmas"][-1] == 0.0
    assert cond["sigmas"][-2] == pytest.approx(QWEN_IMAGE_SCHEDULER["shift_terminal"])
    # the last step is the deterministic Euler step x + v dt from x_{N-1} (the last stored latent); its result is
    # what was decoded into the edits
    x = torch.from_numpy(rollout.traj["latents"][:, -1])
    c_t = actor.encode_condition(INSTRUCTION, source)[0]
    with torch.no_grad():
        v = qwen_guided_velocity(actor.model, x, timesteps[-1], c_t, CFG)
    final = actor.decode(x + v * (sigmas[-1] - sigmas[-2]), 64, 64)
    assert all(np.array_equal(np.array(a), np.array(b)) for a, b in zip(final, rollout.images, strict=True))
    # the G samples differ (independent noise) and the same generator seed reproduces the group
    assert not np.array_equal(rollout.traj["latents"][0, -1], rollout.traj["latents"][1, -1])
    again = actor.sample(INSTRUCTION, source, GROUP, torch.Generator().manual_seed(0))
    assert np.array_equal(again.traj["latents"], rollout.traj["latents"])
    assert np.array_equal(again.log_probs, rollout.log_probs)


def test_recompute_ratio_is_exactly_one(
    actor: QwenImageEditPolicy, learner: QwenImageEditPolicy, rollout, source
) -> None:
    got = through_wire(rollout, source)
    stored = torch.from_numpy(np.array(got.log_probs))
    for policy in (actor, learner):
        chunks = list(policy.recompute(policy.model, got.traj, got.cond, got.params))
        assert [j for j, _ in chunks] == list(range(NUM_STEPS - 1))
        assert all(lp.shape == (GROUP, 1) and lp.dtype == torch.float32 for _, lp in chunks)
        recomputed = torch.cat([lp for _, lp in chunks], dim=1)
        assert torch.equal(recomputed.detach(), stored)
        assert torch.equal(torch.exp(recomputed.detach() - stored), torch.ones_like(stored))
    # another guidance scale is not the behaviour policy; a truncated trajectory is refused
    other = dict(got.params, true_cfg_scale=2.0)
    lp_other = torch.cat([lp for _, lp in learner.recompute(learner.model, got.traj, got.cond, other)], dim=1)
    assert not torch.equal(lp_other.detach(), stored)
    short = {"latents": np.array(got.traj["latents"])[:, :-1]}
    with pytest.raises(ValueError, match="latents"):
        next(iter(learner.recompute(learner.model, short, got.cond, got.params)))


def test_cps_with_a_window_recomputes_exactly(learner: QwenImageEditPolicy, source, tiny_dir) -> None:
    """CPS steps inside a 1-step window (ODE elsewhere): 2 latents and 1 log-prob stored, ratio exactly 1."""
    windowed = QwenImageEditPolicy.from_pretrained(
        tiny_dir, lora=LoraSpec(rank=4, alpha=8.0, target_modules=list(QWEN_LORA_TARGETS)), num_steps=NUM_STEPS,
        true_cfg_scale=4.0, sde_type="cps", sde_window_size=1, sde_window_range=(1, NUM_STEPS - 1),
    )  # fmt: skip
    load_lora_state_dict(windowed.model, lora_state_dict(learner.model))
    rollout = windowed.sample(INSTRUCTION, source, GROUP, torch.Generator().manual_seed(2))
    assert rollout.log_probs.shape == (GROUP, 1) and rollout.traj["latents"].shape[1] == 2
    assert 1 <= rollout.params["start"] <= NUM_STEPS - 2 and rollout.params["sde_type"] == "cps"
    got = through_wire(rollout, source)
    chunks = list(learner.recompute(learner.model, got.traj, got.cond, got.params))
    assert len(chunks) == 1 and torch.equal(chunks[0][1].detach(), torch.from_numpy(np.array(got.log_probs)))


# ------------------------------------------------------------------------------------------- (c) vs the pipeline


def test_guided_velocity_matches_the_pipeline(
    actor: QwenImageEditPolicy, source, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline's own true CFG + norm rescale (the model_output it hands to scheduler.step) equals ours.

    The pipeline hard-codes a 1024 * 1024 condition area; it is patched to the tiny checkpoint's area (the one
    constant our ``condition_area`` replaces), everything else runs unchanged.
    """
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as qwen_edit_module

    cond, _, _ = actor.encode_condition(INSTRUCTION, source)
    pipe = actor.pipeline
    dims = qwen_edit_module.calculate_dimensions
    monkeypatch.setattr(qwen_edit_module, "calculate_dimensions", lambda _, ratio: dims(actor.condition_area, ratio))
    steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    calls: list[dict] = []
    scheduler_step, forward = pipe.scheduler.step, pipe.transformer.forward

    def spy_step(model_output, timestep, sample, *args, **kwargs):
        steps.append((model_output.clone(), timestep, sample.clone()))
        return scheduler_step(model_output, timestep, sample, *args, **kwargs)

    def spy_forward(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", spy_step)
    monkeypatch.setattr(pipe.transformer, "forward", spy_forward)
    kw = {"negative_prompt": " ", "true_cfg_scale": CFG, "num_inference_steps": NUM_STEPS, "output_type": "latent"}
    pipe(
        image=source, prompt=INSTRUCTION, num_images_per_prompt=GROUP, generator=torch.Generator().manual_seed(7), **kw
    )
    assert len(steps) == NUM_STEPS and len(calls) == 2 * NUM_STEPS  # conditional, then negative, every step
    # same inputs: schedule, initial noise, prompt / negative embeddings, source latents, img_shapes
    sigmas, timesteps = qwen_edit_schedule(NUM_STEPS, cond.seq_len, actor.scheduler_config)
    assert torch.equal(pipe.scheduler.sigmas, sigmas) and torch.equal(torch.stack([t for _, t, _ in steps]), timesteps)
    assert torch.equal(steps[0][2], actor.initial_noise(cond, GROUP, torch.Generator().manual_seed(7)))
    assert torch.equal(calls[0]["encoder_hidden_states"][0], cond.prompt_embeds)
    assert torch.equal(calls[1]["encoder_hidden_states"][0], cond.negative_prompt_embeds)
    assert torch.equal(calls[0]["hidden_states"][0, cond.seq_len :], cond.image_latents)
    assert calls[0]["img_shapes"][0] == [tuple(r) for r in cond.img_shapes.tolist()]
    with torch.no_grad():
        for model_output, t, sample in steps:
            ours = qwen_guided_velocity(actor.model, sample, t, cond, CFG)
            assert torch.equal(ours, model_output)  # same kernels, same batch (G per branch): bit for bit
            # the per-token norm rescale matters: plain CFG is a different velocity
            v_pos = qwen_guided_velocity(actor.model, sample, t, cond, 1.0)
            v_neg = qwen_guided_velocity(actor.model, sample, t, _negative_only(cond), 1.0)
            assert not torch.allclose(v_neg + CFG * (v_pos - v_neg), model_output, rtol=1e-3, atol=1e-3)
            torch.testing.assert_close(ours.norm(dim=-1), v_pos.norm(dim=-1), rtol=1e-5, atol=1e-6)


def _negative_only(cond):
    """The condition with the negative prompt in the conditional slot."""
    from dataclasses import replace

    return replace(cond, prompt_embeds=cond.negative_prompt_embeds, prompt_mask=cond.negative_prompt_mask)


# ------------------------------------------------------------------------------------------- (d) gradients


def test_recompute_gradients_reach_lora(learner: QwenImageEditPolicy, rollout) -> None:
    learner.model.zero_grad(set_to_none=True)
    for _, lp in learner.recompute(learner.model, rollout.traj, rollout.cond, rollout.params):
        lp.mean().backward()  # one backward per step, as the learner accumulates
    lora = {n: p for n, p in learner.model.named_parameters() if "lora_" in n}
    # the last block's text-stream output is discarded by the model, so its text-only LoRA layers get no gradient
    last = f"transformer_blocks.{len(learner.model.transformer_blocks) - 1}."
    dead = {n for n in lora if n.startswith(last) and any(k in n for k in ("add_q_proj", "to_add_out", "txt_mlp"))}
    assert len(dead) == 2 * 4 and len(lora) > len(dead)
    for n, p in lora.items():
        if n in dead:
            assert p.grad is None or not p.grad.any(), n
        else:
            assert p.grad is not None and bool(torch.all(torch.isfinite(p.grad))) and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for n, p in learner.model.named_parameters() if "lora_" not in n)
    learner.model.zero_grad(set_to_none=True)
