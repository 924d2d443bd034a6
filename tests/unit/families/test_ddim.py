"""Tests for editrl.common.families.ddim (DDPO DDIM step, InstructPix2Pix policy) on a tiny random model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from editrl.common.families.base import ActorPolicy, LearnerPolicy, through_wire
from editrl.common.families.ddim import UNET_LORA_TARGETS, InstructPix2PixPolicy, ddim_step, ip2p_guided_eps
from editrl.common.lora import LoraSpec, load_lora_state_dict, lora_state_dict

torch.set_num_threads(1)

NUM_STEPS = 4
GROUP = 4
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


# ------------------------------------------------------------------------------------------- ddim_step


def _scheduler(clip_sample: bool = False, num_steps: int = NUM_STEPS):
    from diffusers import DDIMScheduler

    s = DDIMScheduler(**SD_BETAS, clip_sample=clip_sample, set_alpha_to_one=True, steps_offset=1)
    s.set_timesteps(num_steps)
    return s


def _np_alphas_cumprod() -> np.ndarray:
    """SD 1.x scaled_linear schedule in float64, independent of diffusers."""
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def _np_reference(x, eps, t, prev, eta, clip):
    """float64 numpy DDPO DDIM step for 4 steps over 1000 train steps: returns (log_prob [B], mean, std)."""
    ac = _np_alphas_cumprod()
    x, eps, prev = (v.double().numpy() for v in (x, eps, prev))
    t_prev = min(max(t - 1000 // NUM_STEPS, 0), 999)
    a_t, a_p = ac[t], ac[t_prev]
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    if clip:
        x0 = np.clip(x0, -1.0, 1.0)
    std = eta * math.sqrt((1 - a_p) / (1 - a_t) * (1 - a_t / a_p))
    mean = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p - std**2) * eps
    lp = -((prev - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.reshape(lp.shape[0], -1).mean(1), mean, std


def test_scheduler_alphas_match_independent_schedule() -> None:
    np.testing.assert_allclose(_scheduler().alphas_cumprod.double().numpy(), _np_alphas_cumprod(), rtol=2e-6)
    assert _scheduler().timesteps.tolist() == [751, 501, 251, 1]


@pytest.mark.parametrize("step,clip", [(0, False), (1, False), (3, False), (0, True), (3, True)])
def test_ddim_step_matches_closed_form(step: int, clip: bool) -> None:
    sched = _scheduler(clip_sample=clip)
    t = int(sched.timesteps[step])
    g = torch.Generator().manual_seed(step)
    x = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    prev, lp, mean, std = ddim_step(sched, eps, t, x, 1.0, generator=g)
    assert prev.dtype == lp.dtype == mean.dtype == std.dtype == torch.float32
    assert lp.shape == (3,) and std.shape == (3, 1, 1, 1)
    ref_lp, ref_mean, ref_std = _np_reference(x, eps, t, prev, 1.0, clip)
    # the last step's variance has a 1 - a_t/a_prev ~ 1e-3 factor, so float32 keeps ~4 fewer digits there
    np.testing.assert_allclose(lp.double().numpy(), ref_lp, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(mean.double().numpy(), ref_mean, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(std.flatten().double().numpy(), np.full(3, ref_std), rtol=1e-4)
    # scoring the drawn sample reproduces the log-prob bit for bit; a [B] timestep works the same
    _, lp2, _, _ = ddim_step(sched, eps, torch.full((3,), t), x, 1.0, prev_sample=prev)
    assert torch.equal(lp, lp2)
    # scoring an arbitrary next latent, with eta != 1
    other = torch.randn(3, 4, 8, 8, generator=g)
    _, lp3, _, _ = ddim_step(sched, eps, t, x, 0.7, prev_sample=other)
    np.testing.assert_allclose(
        lp3.double().numpy(), _np_reference(x, eps, t, other, 0.7, clip)[0], rtol=1e-4, atol=1e-3
    )


def test_ddim_step_per_sample_timesteps_and_gradients() -> None:
    sched = _scheduler()
    g = torch.Generator().manual_seed(0)
    x, prev = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g, requires_grad=True)
    prev.requires_grad_(True)
    ts = torch.tensor([751, 1, 501])
    _, lp, _, _ = ddim_step(sched, eps, ts, x, 1.0, prev_sample=prev)
    for i in range(3):
        _, lp_i, _, _ = ddim_step(sched, eps[i : i + 1], int(ts[i]), x[i : i + 1], 1.0, prev_sample=prev[i : i + 1])
        assert torch.equal(lp[i : i + 1], lp_i)
    lp.sum().backward()
    assert eps.grad is not None and bool(torch.all(torch.isfinite(eps.grad))) and eps.grad.abs().sum() > 0
    assert prev.grad is None  # the scored sample is detached: gradients flow only through the mean


def test_ddim_step_matches_diffusers_before_the_last_step() -> None:
    """diffusers' DDIMScheduler.step gives the same sample for the same noise, except at the last step where DDPO
    clamps t_prev to 0 (alphas_cumprod[0]) and diffusers uses final_alpha_cumprod (1.0 here)."""
    sched = _scheduler()
    g = torch.Generator().manual_seed(1)
    x, eps, z = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    for step, t in enumerate(sched.timesteps):
        _, _, mean, std = ddim_step(sched, eps, t, x, 1.0)
        ref = sched.step(eps, t, x, eta=1.0, variance_noise=z).prev_sample
        close = torch.allclose(mean + std * z, ref, rtol=1e-5, atol=1e-5)
        assert close == (step < NUM_STEPS - 1)


def test_ddim_step_rejects_bad_arguments() -> None:
    sched = _scheduler()
    x = torch.randn(2, 4, 8, 8)
    for eta in (0.0, -1.0):
        with pytest.raises(ValueError, match="eta"):
            ddim_step(sched, x, 751, x, eta)
    with pytest.raises(ValueError, match="eta"):
        ddim_step(sched, x, 751, x, 5.0)  # std^2 > 1 - a_prev: no valid DDIM step
    with pytest.raises(ValueError, match="timestep"):
        ddim_step(sched, x, torch.tensor([751, 501, 251]), x, 1.0)
    from diffusers import DDIMScheduler

    with pytest.raises(ValueError, match="set_timesteps"):
        ddim_step(DDIMScheduler(**SD_BETAS), x, 751, x, 1.0)
    with pytest.raises(ValueError, match="epsilon"):
        v_sched = DDIMScheduler(**SD_BETAS, prediction_type="v_prediction")
        v_sched.set_timesteps(NUM_STEPS)
        ddim_step(v_sched, x, 751, x, 1.0)


# ------------------------------------------------------------------------------------------- tiny model + policy


def _lora() -> LoraSpec:
    return LoraSpec(rank=4, alpha=8.0, target_modules=list(UNET_LORA_TARGETS), seed=0)


@pytest.fixture(scope="module")
def actor(tiny_ip2p_dir: Path) -> InstructPix2PixPolicy:
    """Actor policy whose LoRA B is non-zero, so the LoRA path changes every UNet output."""
    policy = InstructPix2PixPolicy.from_pretrained(
        tiny_ip2p_dir, lora=_lora(), num_steps=NUM_STEPS, eta=1.0, guidance=7.5, image_guidance=1.5
    )
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return policy


@pytest.fixture(scope="module")
def source():
    from PIL import Image

    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))


def test_tiny_checkpoint_loads_like_a_model_id(tiny_ip2p_dir: Path, actor: InstructPix2PixPolicy) -> None:
    from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler, StableDiffusionInstructPix2PixPipeline

    from editrl.common.families.tiny.instruct_pix2pix import build_tiny_instruct_pix2pix

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(tiny_ip2p_dir)
    assert isinstance(pipe.scheduler, EulerAncestralDiscreteScheduler)  # shipped like the real checkpoint
    assert pipe.unet.config.in_channels == 8 and pipe.unet.config.out_channels == 4
    assert pipe.safety_checker is None and pipe.feature_extractor is None and pipe.vae_scale_factor == 8
    assert len(pipe.tokenizer("make it red").input_ids) == 5  # bos, 3 whole-word tokens, eos
    # idempotent: a second build reuses the directory untouched
    stamp = (tiny_ip2p_dir / "model_index.json").stat().st_mtime_ns
    assert build_tiny_instruct_pix2pix(tiny_ip2p_dir) == tiny_ip2p_dir
    assert (tiny_ip2p_dir / "model_index.json").stat().st_mtime_ns == stamp

    assert isinstance(actor, ActorPolicy) and isinstance(actor, LearnerPolicy) and actor.family == "ddim"
    assert isinstance(actor.pipeline.scheduler, DDIMScheduler) and isinstance(actor.scheduler, DDIMScheduler)
    learner = InstructPix2PixPolicy.from_pretrained(tiny_ip2p_dir, with_pipeline=False, lora=_lora())
    assert learner.pipeline is None and learner.scheduler.config == actor.scheduler.config
    assert not learner.scheduler.config.clip_sample and learner.scheduler.config.steps_offset == 1
    assert learner.trainable_module() is learner.model
    base = {n: p for n, p in actor.model.named_parameters() if "lora_" not in n}
    for n, p in learner.model.named_parameters():
        assert p.requires_grad == ("lora_" in n)
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    units = learner.shard_units()
    assert len(units) == len(learner.model.down_blocks) + 1 + len(learner.model.up_blocks)
    assert learner.model.mid_block in units


@pytest.fixture(scope="module")
def rollout(actor: InstructPix2PixPolicy, source):
    return actor.sample("make it red", source, GROUP, torch.Generator().manual_seed(0))


def test_sample_layout(actor: InstructPix2PixPolicy, rollout, source) -> None:
    assert rollout.family == "ddim" and rollout.log_probs.shape == (GROUP, NUM_STEPS)
    assert rollout.log_probs.dtype == np.float32 and np.isfinite(rollout.log_probs).all()
    assert rollout.traj["latents"].shape == (GROUP, NUM_STEPS + 1, 4, 8, 8)
    assert rollout.traj["latents"].dtype == np.float32
    assert rollout.cond["timesteps"].tolist() == [751, 501, 251, 1] and rollout.cond["timesteps"].dtype == np.int64
    assert rollout.cond["prompt_embeds"].shape == rollout.cond["uncond_embeds"].shape == (32, 32)
    assert rollout.params == {"eta": 1.0, "guidance": 7.5, "image_guidance": 1.5}
    assert len(rollout.images) == GROUP and all(im.size == (64, 64) for im in rollout.images)
    # image latents are the VAE mode of the preprocessed source, NOT multiplied by the scaling factor
    pipe = actor.pipeline
    with torch.no_grad():
        mode = pipe.vae.encode(pipe.image_processor.preprocess(source)).latent_dist.mode()[0]
    assert pipe.vae.config.scaling_factor != 1.0
    assert torch.equal(torch.from_numpy(rollout.cond["image_latents"]), mode)
    # the G samples differ (independent noise) and the same generator seed reproduces the group
    assert not np.array_equal(rollout.traj["latents"][0, -1], rollout.traj["latents"][1, -1])
    again = actor.sample("make it red", source, GROUP, torch.Generator().manual_seed(0))
    assert np.array_equal(again.traj["latents"], rollout.traj["latents"])


def test_recompute_ratio_is_exactly_one(tiny_ip2p_dir: Path, actor: InstructPix2PixPolicy, rollout, source) -> None:
    got = through_wire(rollout, source)
    stored = torch.from_numpy(np.array(got.log_probs))
    learner = InstructPix2PixPolicy.from_pretrained(tiny_ip2p_dir, with_pipeline=False, lora=_lora())
    load_lora_state_dict(learner.model, lora_state_dict(actor.model))
    for policy in (actor, learner):
        chunks = list(policy.recompute(policy.model, got.traj, got.cond, got.params))
        assert [j for j, _ in chunks] == list(range(NUM_STEPS))
        assert all(lp.shape == (GROUP, 1) and lp.dtype == torch.float32 for _, lp in chunks)
        recomputed = torch.cat([lp for _, lp in chunks], dim=1)
        assert torch.equal(recomputed.detach(), stored)
        assert torch.equal(torch.exp(recomputed.detach() - stored), torch.ones_like(stored))
    # a recompute with other guidance scales (or other weights) is not the behaviour policy
    other = dict(got.params, guidance=2.0)
    lp_other = torch.cat([lp for _, lp in learner.recompute(learner.model, got.traj, got.cond, other)], dim=1)
    assert not torch.equal(lp_other.detach(), stored)
    with pytest.raises(ValueError, match="timesteps"):
        next(
            iter(learner.recompute(learner.model, got.traj, dict(got.cond, timesteps=got.cond["timesteps"] + 1), other))
        )


def test_recompute_gradients_reach_lora(tiny_ip2p_dir: Path, actor: InstructPix2PixPolicy, rollout) -> None:
    learner = InstructPix2PixPolicy.from_pretrained(tiny_ip2p_dir, with_pipeline=False, lora=_lora())
    load_lora_state_dict(learner.model, lora_state_dict(actor.model))
    for _, lp in learner.recompute(learner.model, rollout.traj, rollout.cond, rollout.params):
        lp.mean().backward()  # one backward per step, as the learner accumulates
    lora = {n: p for n, p in learner.model.named_parameters() if "lora_" in n}
    assert lora and all(p.grad is not None and bool(torch.all(torch.isfinite(p.grad))) for p in lora.values())
    assert all(p.grad.abs().sum() > 0 for p in lora.values())
    assert all(p.grad is None for n, p in learner.model.named_parameters() if "lora_" not in n)


def test_guided_eps_matches_the_pipeline(actor: InstructPix2PixPolicy, source) -> None:
    """The pipeline's own 3-way CFG (captured as the model_output it hands to scheduler.step) equals ours."""
    pipe = actor.pipeline
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    step = pipe.scheduler.step

    def spy(model_output, timestep, sample, *args, **kwargs):
        calls.append((model_output.clone(), timestep, sample.clone()))
        return step(model_output, timestep, sample, *args, **kwargs)

    pipe.scheduler.step = spy
    try:
        pipe(
            "make it red",
            image=source,
            num_inference_steps=2,
            guidance_scale=5.0,
            image_guidance_scale=1.8,
            generator=torch.Generator().manual_seed(0),
            output_type="latent",
        )
    finally:
        del pipe.scheduler.step
    assert len(calls) == 2
    cond = actor.encode_condition("make it red", source)
    with torch.no_grad():
        for model_output, t, sample in calls:
            ours = ip2p_guided_eps(actor.model, sample, t, **cond, guidance=5.0, image_guidance=1.8)
            torch.testing.assert_close(ours, model_output, rtol=1e-6, atol=1e-6)
            swapped = ip2p_guided_eps(actor.model, sample, t, **cond, guidance=1.8, image_guidance=5.0)
            assert not torch.allclose(swapped, model_output, rtol=1e-3, atol=1e-3)  # the scales are not symmetric
