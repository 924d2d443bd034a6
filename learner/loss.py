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
    log_prob: torch.Tensor, behave_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip on the per-step ratio, as Flow-GRPO: ``mean_b max(-A r, -A clamp(r, 1-ε, 1+ε))``.

    log_prob: [B] θ log-probs (element-averaged); behave_log_prob: [B] stored by the actor; advantages: [B].
    Returns the scalar loss and detached stats (clip fraction, approx KL = 0.5·mean(Δ²), max |r-1|).
    """
    delta = log_prob - behave_log_prob
    ratio = torch.exp(delta)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "clip_frac": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "approx_kl": 0.5 * (delta**2).mean(),
            "ratio_dev_max": (ratio - 1.0).abs().max(),
        }
    return loss, stats
