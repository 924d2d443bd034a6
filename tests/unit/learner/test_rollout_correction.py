"""Token samplers' own log-probs (issue 13 part 2): the sampler-vs-trainer mismatch is measured and, on request,
corrected (``learner.rollout_correction: tis | mis``). The transformers engine alone shows ~no mismatch, so the
tests inject one; the objective is checked against a float64 reference computed here by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from editrl.learner.objectives.flow_grpo import decoupled_loss, rollout_weights


def test_rollout_weights_truncate_or_mask_the_trainer_sampler_ratio() -> None:
    behave = torch.tensor([[-1.0, -2.0, -3.0]], dtype=torch.float64)
    sampler = torch.tensor([[-1.5, -2.0, -2.0]], dtype=torch.float64)  # rho = e^0.5, 1, e^-1
    rho = [math.exp(0.5), 1.0, math.exp(-1.0)]
    assert rollout_weights(behave, sampler, "none", 1.2).tolist() == [[1.0, 1.0, 1.0]]
    assert rollout_weights(behave, sampler, "tis", 1.2)[0].tolist() == pytest.approx([1.2, 1.0, rho[2]], abs=1e-15)
    assert rollout_weights(behave, sampler, "mis", 1.2)[0].tolist() == pytest.approx([0.0, 1.0, rho[2]], abs=1e-15)
    with pytest.raises(ValueError, match="rollout correction"):
        rollout_weights(behave, sampler, "is", 1.2)


def test_the_loss_weights_each_unit_by_the_correction_times_the_capped_lag_weight() -> None:
    theta = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    prox = torch.tensor([[-1.1, -2.0]], dtype=torch.float64)
    behave = torch.tensor([[-1.2, -2.5]], dtype=torch.float64)
    factor = torch.tensor([[0.5, 2.0]], dtype=torch.float64)
    adv = torch.tensor([1.0], dtype=torch.float64)
    loss, _ = decoupled_loss(theta, prox, behave, adv, clip_low=10.0, clip_high=10.0, iw_cap=1.5, rollout_weight=factor)
    # by hand: surrogate = -A·exp(θ - prox) (no clip at ε = 10); w' = min(exp(prox - behave), 1.5)
    units = [-math.exp(0.1) * min(math.exp(0.1), 1.5) * 0.5, -math.exp(0.0) * min(math.exp(0.5), 1.5) * 2.0]
    assert float(loss) == pytest.approx(sum(units) / 2, rel=1e-14)


def _ar_stats(model_dir: Path, correction: str, shift: float) -> tuple[dict[str, float], float]:
    """One learner step on one ar group whose sampler log-probs are the trainer's minus ``shift`` on every other
    counted token (an injected engine mismatch); returns the stats and the injected float64 max |Δ|."""
    from PIL import Image

    from editrl.common.config import parse_config
    from editrl.common.families.base import load_policy, through_wire

    from .one_rank import train_one_step

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = parse_config({
        "policy": {"family": "ar", "model": str(model_dir), "lora": {"rank": 4, "alpha": 8}},
        "data": {"tasks": "/unused.jsonl"},
        "learner": {"rollout_correction": correction, "rollout_correction_cap": 1.2, "clip_range": 0.2, "minibatches": 1},
    })  # fmt: skip
    actor = load_policy(cfg.policy, with_pipeline=True)
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    group = through_wire(actor.sample("make it red", source, 4, torch.Generator().manual_seed(0)), source)
    mask = np.asarray(group.traj["unit_mask"]) > 0
    sampler = np.array(group.log_probs, dtype=np.float32)
    every_other = mask & (np.arange(mask.shape[1])[None, :] % 2 == 0)
    sampler[every_other] -= np.float32(shift)
    group.traj["sampler_log_probs"] = sampler
    injected = float(np.abs(np.float64(group.log_probs) - np.float64(sampler))[mask].max())
    rewards = [np.array([1.0, 4.0, 2.0, 8.0], np.float32)]
    return train_one_step(cfg, [group], rewards, version=0), injected


def test_an_injected_sampler_mismatch_is_measured_and_corrected(tiny_emu3_dir: Path) -> None:
    plain, injected = _ar_stats(tiny_emu3_dir, "none", 0.5)
    assert plain["learner/sampler_logp_dev_max"] == injected > 0.4
    assert plain["learner/sampler_kl"] > 0.01 and "learner/rollout_weight_mean" not in plain
    tis, _ = _ar_stats(tiny_emu3_dir, "tis", 0.5)
    # rho = exp(0.5) > cap 1.2 on the shifted tokens (weight 1.2), 1 elsewhere: the mean lies strictly between
    assert 1.0 < tis["learner/rollout_weight_mean"] < 1.2
    assert tis["learner/loss"] != plain["learner/loss"]
    mis, _ = _ar_stats(tiny_emu3_dir, "mis", 0.5)
    assert 0.0 < mis["learner/rollout_weight_mean"] < 1.0  # the shifted tokens are masked out
    exact, _ = _ar_stats(tiny_emu3_dir, "none", 0.0)
    assert exact["learner/sampler_logp_dev_max"] == 0.0 and exact["learner/sampler_kl"] == 0.0


def test_the_correction_is_configured_for_token_editors_only() -> None:
    from editrl.common.config import ConfigError, parse_config

    base = {"data": {"tasks": "/unused.jsonl"}}
    flow, ar = {"family": "flow", "model": "/m"}, {"family": "ar", "model": "/m"}
    with pytest.raises(ConfigError, match="learner.rollout_correction: corrects a token sampler"):
        parse_config({**base, "policy": flow, "learner": {"rollout_correction": "tis"}})
    with pytest.raises(ConfigError, match="learner.rollout_correction: must be 'none', 'tis' or 'mis'"):
        parse_config({**base, "policy": ar, "learner": {"rollout_correction": "is"}})
    with pytest.raises(ConfigError, match="learner.rollout_correction_cap: must be >= 1"):
        parse_config(
            {
                **base,
                "policy": ar,
                "learner": {"rollout_correction": "mis", "rollout_correction_cap": 0.5},
            }
        )
    assert parse_config({**base, "policy": ar}).learner.rollout_correction == "none"
