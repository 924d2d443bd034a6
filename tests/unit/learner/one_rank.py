"""One learner step in this process: a 1-rank gloo group, the learner's policy with only its LoRA trainable, FSDP2;
and the float64 set-up the golden tests share (a config on the float64 tiny FLUX-Kontext, two groups through the wire)."""

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


def float64_setup(model_dir: Any, learner: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The golden tests' config (float64 tiny FLUX-Kontext, LoRA rank 4, 4 sampler steps, ``learner`` settings) and
    two groups of 4 edits sampled by it from seeded random 64x64 sources, encoded and decoded as the learner gets them."""
    import torch
    from PIL import Image

    from editrl.common.config import parse_config
    from editrl.common.families.base import load_policy, through_wire

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = parse_config({
        "policy": {"model": str(model_dir), "dtype": "float64", "lora": {"rank": 4, "alpha": 8},
                   "sampler": {"num_steps": 4}},
        "data": {"tasks": "/unused.jsonl"}, "learner": learner,
    })  # fmt: skip
    rng = np.random.default_rng(0)
    actor = load_policy(cfg.policy, with_pipeline=True)
    groups = []
    for i in range(2):
        source = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        groups.append(through_wire(actor.sample("make it red", source, 4, torch.Generator().manual_seed(i)), source))
    return cfg, groups
