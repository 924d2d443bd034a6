"""Tests for editrl.common.families.flow (Flow-GRPO SDE step, Kontext policy, LoRA helpers) on a tiny random model."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from editrl.common.families.flow import flow_sde_step
from editrl.common.families.flux_kontext import FluxKontextPolicy, GroupCondition, flux_schedule, flux_velocity
from editrl.common.lora import LoraSpec, add_lora, load_lora_state_dict, lora_state_dict

torch.set_num_threads(1)


def _np_reference(x, v, sigma, sigma_next, a, prev, sigma_max):
    """float64 numpy Flow-GRPO step: returns (log_prob [B], mean)."""
    x, v, prev = (t.double().numpy() for t in (x, v, prev))
    dt = sigma_next - sigma
    den = sigma_max if sigma == 1.0 else sigma
    std_dev_t = a * math.sqrt(sigma / (1.0 - den))
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    s = std_dev_t * math.sqrt(-dt)
    lp = -((prev - mean) ** 2) / (2 * s**2) - math.log(s) - 0.5 * math.log(2 * math.pi)
    return lp.reshape(lp.shape[0], -1).mean(1), mean


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.9, 0.7), (0.5, 0.25), (0.2, 0.0)])
def test_sde_step_matches_closed_form(sigma: float, sigma_next: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 8, generator=g)
    v = torch.randn(3, 16, 8, generator=g)
    prev, lp, mean, std = flow_sde_step(x, v, sigma, sigma_next, 0.7, generator=g)
    assert prev.dtype == lp.dtype == mean.dtype == torch.float32 and lp.shape == (3,)
    ref_lp, ref_mean = _np_reference(x, v, sigma, sigma_next, 0.7, prev, sigma_max=sigma_next)
    np.testing.assert_allclose(lp.double().numpy(), ref_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean.double().numpy(), ref_mean, rtol=1e-5, atol=1e-6)
    # scoring a given prev_sample reproduces the same log-prob; tensors [B] for sigma work the same
    _, lp2, _, _ = flow_sde_step(x, v, torch.full((3,), sigma), torch.full((3,), sigma_next), 0.7, prev_sample=prev)
    assert torch.equal(lp, lp2)


def test_first_step_rule_at_sigma_one() -> None:
    x, v = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    _, _, _, std = flow_sde_step(x, v, 1.0, 0.8, 0.9)
    expected = 0.9 * math.sqrt(1.0 / (1.0 - 0.8)) * math.sqrt(0.2)
    assert torch.allclose(std.flatten(), torch.full((2,), expected), rtol=1e-6)
    # per-sample sigmas: only the sigma == 1 entry uses sigma_next in the denominator
    _, _, _, std = flow_sde_step(x, v, torch.tensor([1.0, 0.5]), torch.tensor([0.8, 0.3]), 0.9)
    assert math.isclose(std[1].item(), 0.9 * math.sqrt(0.5 / 0.5) * math.sqrt(0.2), rel_tol=1e-6)
    with pytest.raises(ValueError):
        flow_sde_step(x, v, 0.5, 0.3, 0.0)


@pytest.fixture(scope="module")
def policy(tiny_model_dir: Path) -> FluxKontextPolicy:
    return FluxKontextPolicy.from_pretrained(tiny_model_dir, lora=LoraSpec())


@pytest.fixture(scope="module")
def cond(policy: FluxKontextPolicy) -> GroupCondition:
    from PIL import Image

    img = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))
    return policy.encode_condition("make the sky red", img)


def test_condition_roundtrip(cond: GroupCondition) -> None:
    assert (cond.height, cond.width) == (64, 64) and cond.image_latents.shape == (16, 16)
    back = GroupCondition.from_arrays(cond.to_arrays(), cond.height, cond.width)
    for k in GroupCondition._FIELDS:
        assert torch.equal(getattr(back, k), getattr(cond, k))


def test_schedule_matches_pipeline(policy: FluxKontextPolicy, cond: GroupCondition) -> None:
    from PIL import Image

    pipe = policy.pipeline
    img = Image.new("RGB", (64, 64), (120, 30, 200))
    pipe(prompt="make it blue", image=img, height=64, width=64, num_inference_steps=4, max_area=64 * 64,
         _auto_resize=False, max_sequence_length=32, output_type="latent")  # fmt: skip
    assert torch.equal(flux_schedule(4, cond.seq_len, policy.scheduler_config), pipe.scheduler.sigmas.float())


def test_sample_then_recompute_ratio_is_exactly_one(policy: FluxKontextPolicy, cond: GroupCondition) -> None:
    g, n = 8, 4
    t0 = time.perf_counter()
    traj = policy.sample_group(cond, g, n, noise_level=0.9, guidance=2.5, generator=torch.Generator().manual_seed(1))
    elapsed = time.perf_counter() - t0
    assert traj.latents.shape == (g, n + 1, 16, 16) and traj.log_probs.shape == (g, n) and traj.sigmas.shape == (n + 1,)
    assert traj.latents.dtype == traj.log_probs.dtype == torch.float32
    assert elapsed < 2.0  # ~0.02 s in practice; generous bound for loaded CI machines
    for j in range(n):  # learner path: grad on, whole group per forward, on the stored tensors
        v = flux_velocity(policy.transformer, traj.latents[:, j], traj.sigmas[j], cond, 2.5)
        _, lp, mean, _ = flow_sde_step(
            traj.latents[:, j], v, traj.sigmas[j], traj.sigmas[j + 1], 0.9, prev_sample=traj.latents[:, j + 1]
        )
        assert torch.equal(lp, traj.log_probs[:, j]), j
        assert torch.equal(torch.exp(lp - traj.log_probs[:, j]), torch.ones(g))
        assert mean.requires_grad
    images = policy.decode(traj.latents[:, -1])
    assert len(images) == g and images[0].size == (64, 64)


def test_decoder_is_colour_responsive(policy: FluxKontextPolicy) -> None:
    z = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(0))
    base = np.stack([np.asarray(im, dtype=np.float64).mean((0, 1)) for im in policy.decode(z)]).mean(0)
    shifted = np.stack([np.asarray(im, dtype=np.float64).mean((0, 1)) for im in policy.decode(z + 1.0)]).mean(0)
    assert np.abs(shifted - base).max() > 10.0  # out of 255


def test_lora_roundtrip_changes_velocity(tiny_model_dir: Path, cond: GroupCondition) -> None:
    pol = FluxKontextPolicy.from_pretrained(tiny_model_dir, with_pipeline=False, lora=LoraSpec(rank=4))
    x = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        v0 = flux_velocity(pol.transformer, x, 0.7, cond, 2.5)
    sd = lora_state_dict(pol.transformer)
    assert sd and all("lora_" in k and ".default." not in k and v.device.type == "cpu" for k, v in sd.items())
    assert all(torch.count_nonzero(v) == 0 for k, v in sd.items() if "lora_B" in k)  # starts as identity
    gen = torch.Generator().manual_seed(4)
    new = {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in sd.items()}
    load_lora_state_dict(pol.transformer, new)
    back = lora_state_dict(pol.transformer)
    assert all(torch.equal(back[k], new[k]) for k in new)
    with torch.no_grad():
        v1 = flux_velocity(pol.transformer, x, 0.7, cond, 2.5)
    assert (v1 - v0).abs().max() > 1e-3
    bad = dict(new)
    bad["nope.lora_A.weight"] = bad.pop(next(iter(bad)))
    with pytest.raises(KeyError):
        load_lora_state_dict(pol.transformer, bad)
    k0 = next(iter(new))
    with pytest.raises(ValueError):
        load_lora_state_dict(pol.transformer, {**new, k0: torch.zeros(1, 1)})
    # learner forward + backward over a group at one step reaches the LoRA params only
    pol.transformer.train()
    v = flux_velocity(pol.transformer, torch.randn(8, 16, 16), 0.7, cond, 2.5)
    v.square().mean().backward()
    grads = [p.grad for n, p in pol.transformer.named_parameters() if "lora_" in n]
    assert all(g is not None for g in grads)
    assert all(p.grad is None for n, p in pol.transformer.named_parameters() if "lora_" not in n)


def test_add_lora_is_deterministic(tiny_model_dir: Path) -> None:
    from diffusers import FluxTransformer2DModel

    sds = []
    for _ in range(2):
        t = FluxTransformer2DModel.from_pretrained(tiny_model_dir, subfolder="transformer")
        sds.append(lora_state_dict(add_lora(t, LoraSpec(rank=2))))
    assert sds[0].keys() == sds[1].keys() and all(torch.equal(sds[0][k], sds[1][k]) for k in sds[0])


def test_offline_roundtrip_in_subprocess(tiny_model_dir: Path) -> None:
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from diffusers import FluxKontextPipeline, FluxTransformer2DModel\n"
        "p = FluxKontextPipeline.from_pretrained(sys.argv[1])\n"
        "t = FluxTransformer2DModel.from_pretrained(sys.argv[1], subfolder='transformer')\n"
        "assert not p.transformer.training and not p.text_encoder_2.training\n"
        "assert p.vae_scale_factor == 8 and t.config.in_channels == 16\n"
        "print('ok')\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(tiny_model_dir)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


# ----------------------------------------------------------------------------------------------- CPS and window


def _np_cps(x, v, sigma, sigma_next, a, prev):
    """float64 numpy CPS step (flow_grpo sde_type='cps'): returns (log_prob [B], mean, std)."""
    x, v, prev = (t.double().numpy() for t in (x, v, prev))
    std = sigma_next * math.sin(a * math.pi / 2)
    mean = (x - sigma * v) * (1 - sigma_next) + (x + (1 - sigma) * v) * math.sqrt(sigma_next**2 - std**2)
    return -((prev - mean) ** 2).reshape(x.shape[0], -1).mean(1), mean, std


@pytest.mark.parametrize("sigma,sigma_next", [(1.0, 0.9), (0.9, 0.7), (0.5, 0.25), (0.2, 0.0)])
def test_cps_step_matches_closed_form(sigma: float, sigma_next: float) -> None:
    from editrl.common.families.flow import flow_cps_step

    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(3, 16, 8, generator=g), torch.randn(3, 16, 8, generator=g)
    prev, lp, mean, std = flow_cps_step(x, v, sigma, sigma_next, 0.8, generator=g)
    ref_lp, ref_mean, ref_std = _np_cps(x, v, sigma, sigma_next, 0.8, prev)
    np.testing.assert_allclose(lp.double().numpy(), ref_lp, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(mean.double().numpy(), ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(std.flatten().double().numpy(), ref_std, rtol=1e-6)
    _, lp2, _, _ = flow_cps_step(x, v, sigma, sigma_next, 0.8, prev_sample=prev)
    assert torch.equal(lp, lp2)
    # a = 0 is the ODE step x + v dt (deterministic, log-prob 0)
    ode, lp0, _, _ = flow_cps_step(x, v, sigma, sigma_next, 0.0)
    torch.testing.assert_close(ode, x + v * (sigma_next - sigma), rtol=1e-5, atol=1e-6)
    assert torch.all(lp0 == 0)


def test_sde_window_rule() -> None:
    import random

    from editrl.common.families.flow import sde_window

    assert sde_window(6, 0, None, random.Random(0)) == (0, 5)  # no window: every step but the last
    starts = {sde_window(10, 2, None, random.Random(seed))[0] for seed in range(200)}
    assert starts == {0, 1, 2, 3}  # randint(0, 10 // 2 - 2)
    assert all(e - s == 3 for s, e in (sde_window(10, 3, (2, 8), random.Random(i)) for i in range(20)))
    with pytest.raises(ValueError, match="does not fit"):
        sde_window(6, 4, (0, 3), random.Random(0))


def test_sliding_sde_window_moves_with_the_version() -> None:
    """MixGRPO's schedule: the window starts at the high-noise end and moves one step every ``shift_every`` versions
    across ``window_range``, then starts over; the random schedule ignores the version."""
    import random

    from editrl.common.families.flow import sde_window

    starts = [sde_window(10, 2, (1, 6), random.Random(0), "sliding", v, 3)[0] for v in range(0, 27, 3)]
    assert starts == [1, 2, 3, 4, 1, 2, 3, 4, 1]  # 4 positions in [1, 6] for a 2-step window
    assert {sde_window(10, 2, (1, 6), random.Random(0), "sliding", v, 3) for v in (6, 7, 8)} == {(3, 5)}
    assert sde_window(6, 0, None, random.Random(0), "sliding", 5) == (0, 5)  # no window: unchanged
    with pytest.raises(ValueError, match="schedule"):
        sde_window(10, 2, None, random.Random(0), "spiral")


def test_the_flux_sampler_takes_its_sliding_window_from_the_policy_version(tiny_model_dir: Path) -> None:
    from editrl.common.families.flow import FlowSampler

    sampler = FlowSampler(4, 0.7, 2.5, "sde", 1, (0, 3), "sliding", 2)
    policy = FluxKontextPolicy.from_pretrained(tiny_model_dir, lora=LoraSpec(rank=4, alpha=8), sampler=sampler)
    source = policy.decode(torch.zeros(1, 16, 16))[0]
    starts = []
    for version in (0, 1, 2, 4, 6):
        policy.progress = version  # what the actor sets when it loads weights
        rollout = policy.sample("make it red", source, 2, torch.Generator().manual_seed(version))
        starts.append(rollout.params["start"])
    assert starts == [0, 0, 1, 2, 0]


@pytest.mark.parametrize(
    "sampler",
    [
        {"sde_type": "sde"},
        {"sde_type": "cps", "noise_level": 0.8},
        {"sde_type": "sde", "sde_window": 2},
        {"sde_type": "cps", "sde_window": 1, "sde_window_range": (1, 3)},
    ],
    ids=["sde", "cps", "sde-window", "cps-window"],
)
def test_rollout_through_the_wire_recomputes_exactly(tiny_model_dir: Path, sampler: dict) -> None:
    """sample -> RolloutGroup encode/decode (the stored float32 tensors) -> recompute with the learner's load of the
    same weights: ratio exactly 1; window bookkeeping: e - s log-probs and e - s + 1 latents stored."""
    from editrl.common.families.base import through_wire
    from editrl.common.families.flow import FlowSampler

    settings = {"num_steps": 4, "noise_level": 0.7, "guidance": 2.5, **sampler}
    spec = LoraSpec(rank=4, alpha=8)
    actor = FluxKontextPolicy.from_pretrained(tiny_model_dir, lora=spec, sampler=FlowSampler(**settings))
    with torch.no_grad():  # non-zero LoRA B: the adapters really act
        for name, p in actor.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.01)
    learner = FluxKontextPolicy.from_pretrained(tiny_model_dir, with_pipeline=False, lora=spec)
    load_lora_state_dict(learner.transformer, lora_state_dict(actor.transformer))
    source = actor.decode(torch.zeros(1, 16, 16))[0]
    rollout = actor.sample("make it red", source, 3, torch.Generator().manual_seed(5))
    size = settings.get("sde_window", 0) or 3  # no window: all 4 steps stochastic, the last not trained
    assert rollout.log_probs.shape == (3, size) and rollout.traj["latents"].shape[:2] == (3, size + 1)
    assert len(rollout.images) == 3 and rollout.params["sde_type"] == settings["sde_type"]
    if sampler.get("sde_window_range"):
        assert 1 <= rollout.params["start"] <= 3 - size
    stored = through_wire(rollout, source)
    chunks = list(learner.recompute(learner.transformer, stored.traj, stored.cond, stored.params))
    assert [u for u, _ in chunks] == list(range(size))
    recomputed = torch.cat([lp for _, lp in chunks], dim=1)
    assert torch.equal(recomputed.detach(), torch.from_numpy(np.array(stored.log_probs)))
