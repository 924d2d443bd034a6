"""Group advantages of Flow-GRPO (flow_grpo's conventions; see shared REFERENCE-MATH §1.3); the objective itself is
:func:`editrl.learner.objectives.flow_grpo.decoupled_loss`."""

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
