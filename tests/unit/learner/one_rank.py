"""One learner step in this process: a 1-rank gloo group, the learner's policy with only its LoRA trainable, FSDP2."""

from __future__ import annotations

from typing import Any

import numpy as np


def train_one_step(cfg: Any, groups: list[Any], rewards: list[np.ndarray], version: int) -> dict[str, float]:
    """``Updater.train_step`` on ``groups`` (wire RolloutGroups) as a 1-rank learner would run it; its stats."""
    import torch.distributed as dist

    from editrl.common.families.base import load_policy
    from editrl.learner import update
    from editrl.learner.engines import FSDP2Engine, is_lora_key

    from ...integration.conftest import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        policy = load_policy(cfg.policy, with_pipeline=False)
        for name, p in policy.trainable_module().named_parameters():
            p.requires_grad_(is_lora_key(name))
        engine = FSDP2Engine(policy.trainable_module(), policy.shard_units(), 1e-3, 0.0)
        return update.Updater(cfg, policy, engine).train_step(groups, rewards, version=version)
    finally:
        dist.destroy_process_group()
