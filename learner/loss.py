"""Pure loss functions of Flow-GRPO (flow_grpo's conventions; see shared REFERENCE-MATH §1.3–1.4)."""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, eps: float = 1e-4, clip: float = 5.0, global_std: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-group advantages ``(r - mean_g) / (std + eps)``, clipped to ±``clip``.

    rewards: [G] one group's rewards. ``std`` is the group's population std (ddof=0) unless ``global_std`` (the
    batch std, flow_grpo's ``global_std=True``) is given. A zero-variance group gives all-zero advantages.
    Returns [G] float32 with zero mean (before clipping).
    """
    r = rewards.double()
    std = r.std(unbiased=False) if global_std is None else global_std.double()
    adv = (r - r.mean()) / (std + eps)
    return adv.clamp(-clip, clip).float()


def clipped_policy_loss(
    log_prob: torch.Tensor,
    behave_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip on the per-unit ratio, as Flow-GRPO: ``mean max(-A r, -A clamp(r, 1-ε, 1+ε))``.

    log_prob: [B] or [B, k] θ log-probs of B samples' units (a flow/DDIM step: element-averaged; an AR token: one
    categorical); behave_log_prob: same shape, stored by the actor; advantages: [B], broadcast over units; mask:
    optional [B, k] of 0/1, units that count. The loss is the mean over the counted units of all samples (for
    [B] inputs: the mean over the batch). Returns the scalar loss and detached stats (clip fraction, approx KL =
    0.5·mean(Δ²), max |r-1|), all over counted units.
    """
    if log_prob.ndim == 1:
        log_prob, behave_log_prob = log_prob[:, None], behave_log_prob[:, None]
        mask = None if mask is None else mask.reshape(-1, 1)
    weight = torch.ones_like(log_prob) if mask is None else mask.to(log_prob.dtype)
    count = weight.sum().clamp_min(1.0)
    adv = advantages.reshape(-1, 1)
    delta = log_prob - behave_log_prob
    ratio = torch.exp(delta)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = (torch.maximum(unclipped, clipped) * weight).sum() / count
    with torch.no_grad():
        counted = weight > 0
        deviation = (ratio - 1.0).abs()
        stats = {
            "clip_frac": ((deviation > clip_range).to(weight.dtype) * weight).sum() / count,
            "approx_kl": 0.5 * (delta**2 * weight).sum() / count,
            "ratio_dev_max": deviation[counted].max() if bool(counted.any()) else deviation.new_zeros(()),
        }
    return loss, stats
