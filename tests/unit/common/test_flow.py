"""Tests for editrl.common.flow (Flow-GRPO SDE step, Kontext policy, LoRA helpers) on a tiny random model."""

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

from editrl.common.flow import (
    FluxKontextPolicy,
    GroupCondition,
    LoraSpec,
    add_lora,
    flow_sde_step,
    flux_schedule,
    flux_velocity,
    load_lora_state_dict,
    lora_state_dict,
)

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
