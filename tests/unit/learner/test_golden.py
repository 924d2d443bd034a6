"""Golden numbers: the tiny FLUX-Kontext policy, fixed seeds, two learner updates (FSDP2, one gloo rank) on the same
two groups -- the second one on groups one version stale, so the decoupled objective's prox recompute, importance
weights and clipping all act. The recorded values changed only when the math changed; update them deliberately."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from editrl.common import wire
from editrl.common.config import parse_config
from editrl.common.family import load_policy, through_wire
from editrl.learner.engines import FSDP2Engine, is_lora_key
from editrl.learner.update import Updater

from ...integration.conftest import free_port

# step -> {stat: value}, recorded on this project's CPU machine (torch 2.13.0 cpu, one thread)
GOLDEN = {
    1: {"learner/loss": 7.450580596923828e-09, "learner/grad_norm": 0.01442004181444645, "learner/behave_dev_max": 0.0},
    2: {
        "learner/loss": -0.0006339798370997112,
        "learner/grad_norm": 0.014470577239990234,
        "learner/iw_mean": 1.0000414450963337,
        "learner/mismatch_kl": 3.377596537272135e-07,
    },
}


def _groups(actor, n: int = 2) -> list[wire.RolloutGroup]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        source = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        r = actor.sample("make it red", source, 4, torch.Generator().manual_seed(i))
        out.append(through_wire(r, source))
    return out


@pytest.fixture
def process_group():
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _updater(tiny_model_dir, **learner):
    cfg = parse_config({
        "policy": {"model": str(tiny_model_dir), "lora": {"rank": 4, "alpha": 8}, "sampler": {"num_steps": 4}},
        "data": {"tasks": "/unused.jsonl"},
        "learner": {"lr": 3e-3, "clip_range": 1e-3, "iw_cap": 1.5, "minibatches": 1, **learner},
    })  # fmt: skip
    policy = load_policy(cfg.policy, with_pipeline=False)
    for name, p in policy.trainable_module().named_parameters():
        p.requires_grad_(is_lora_key(name))
    engine = FSDP2Engine(policy.trainable_module(), policy.shard_units(), cfg.learner.lr, cfg.learner.weight_decay)
    return cfg, Updater(cfg, policy, engine)


REWARDS = [np.array([1.0, 4.0, 2.0, 8.0], np.float32), np.array([3.0, 3.5, 0.5, 1.0], np.float32)]


@pytest.mark.parametrize("prox_recompute", [False, True], ids=["prox-from-forward", "prox-separate-pass"])
def test_two_learner_steps_match_recorded_values(tiny_model_dir, process_group, prox_recompute) -> None:
    """Also: the prox taken from the θ forward (one optimizer step per batch) equals a separate recompute exactly."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg, updater = _updater(tiny_model_dir, prox_recompute=prox_recompute)
    groups = _groups(load_policy(cfg.policy, with_pipeline=True))
    got = {1: updater.train_step(groups, REWARDS, version=0), 2: updater.train_step(groups, REWARDS, version=1)}
    print({step: {k: got[step][k] for k in GOLDEN[step]} for step in got})  # the values to record after a math change
    for step, expected in GOLDEN.items():
        for key, value in expected.items():
            assert got[step][key] == pytest.approx(value, rel=1e-5, abs=1e-10), (step, key)
    assert got[2]["learner/staleness_1"] == 2.0 and got[2]["learner/iw_mean"] != 1.0


def test_minibatches_move_the_weights_inside_an_update_so_the_clip_acts(tiny_model_dir, process_group) -> None:
    """Two optimizer steps per learner step: the second minibatch runs on moved weights against the prox of the
    start, so θ/prox deviates from 1 (and the tiny clip range clips), unlike with one step per batch."""
    torch.set_num_threads(1)
    cfg, updater = _updater(tiny_model_dir, minibatches=2, clip_range=1e-6)
    groups = _groups(load_policy(cfg.policy, with_pipeline=True))
    stats = updater.train_step(groups, REWARDS, version=0)
    assert stats["learner/ratio_dev_max"] > 0 and stats["learner/clip_frac"] > 0
    assert stats["learner/behave_dev_max"] == 0.0  # prox (start of the update) still equals behave exactly
