"""A statistic the learner did not measure in a step is absent from it, never 0.0 (issue 13, part 3)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from editrl.learner.loop import metrics_line


def _train(model_dir: Path, learner: dict, rewards: list[np.ndarray], version: int) -> dict[str, float]:
    import torch
    from PIL import Image

    from editrl.common.config import parse_config
    from editrl.common.families.base import load_policy, through_wire

    from .one_rank import train_one_step

    torch.set_num_threads(1)
    cfg = parse_config({
        "policy": {"model": str(model_dir), "lora": {"rank": 4, "alpha": 8}, "sampler": {"num_steps": 4}},
        "data": {"tasks": "/unused.jsonl"}, "learner": learner,
    })  # fmt: skip
    actor = load_policy(cfg.policy, with_pipeline=True)
    source = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    groups = [through_wire(actor.sample("make it red", source, 4, torch.Generator().manual_seed(i)), source)
              for i in range(len(rewards))]  # fmt: skip
    return train_one_step(cfg, groups, rewards, version=version)


def test_a_step_of_zero_variance_groups_reports_no_loss_statistics(tiny_model_dir: Path) -> None:
    stats = _train(tiny_model_dir, {}, [np.full(4, 5.0, np.float32)] * 2, version=0)
    assert stats["learner/zero_variance_groups"] == 2.0 and stats["reward/mean"] == 5.0
    for key in ("loss", "clip_frac", "iw_mean", "behave_dev_max", "logp_mismatch_max", "kl_ref"):
        assert f"learner/{key}" not in stats, key


def test_bypassed_prox_reports_no_exactness_statistics(tiny_model_dir: Path) -> None:
    rewards = [np.array([1.0, 4.0, 2.0, 8.0], np.float32)]
    stats = _train(tiny_model_dir, {"prox_bypass": True, "minibatches": 1}, rewards, version=0)
    assert stats["learner/prox_bypassed"] == 1.0 and "learner/loss" in stats
    assert "learner/behave_dev_max" not in stats and "learner/logp_mismatch_max" not in stats
    measured = _train(tiny_model_dir, {"minibatches": 1}, rewards, version=0)
    assert measured["learner/logp_mismatch_max"] == 0.0 and measured["learner/prox_bypassed"] == 0.0


def test_metrics_lines_are_valid_json_without_non_finite_numbers() -> None:
    line = metrics_line(3, 2, 1.5, {"reward/mean": 1.0, "learner/loss": math.nan, "learner/iw_max": math.inf})
    row = json.loads(line)  # Python accepts a bare NaN, so the text is checked too
    assert "NaN" not in line and "Infinity" not in line
    assert row["reward/mean"] == 1.0 and "learner/loss" not in row and "learner/iw_max" not in row
    assert row["non_finite"] == ["learner/iw_max", "learner/loss"]
