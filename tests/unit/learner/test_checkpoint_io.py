"""Pickle-free learner checkpoints: tensors in safetensors, the rest in JSON; a resume restores them exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from editrl.learner.checkpoint_io import OTHERS, TENSORS, read_state, write_state


def test_nested_state_roundtrips_exactly_without_pickle(tmp_path: Path) -> None:
    state = {
        "model": {"a.lora_A.weight": torch.randn(3, 4, dtype=torch.float64), "b.lora_B.weight": torch.zeros(2)},
        "optim": {
            "state": {"a.lora_A.weight": {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 4)}, "b": {}},
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "foreach": None, "params": ["a.lora_A.weight"]}],
        },
    }
    write_state(tmp_path / "ck", state)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted([TENSORS, OTHERS])
    back = read_state(tmp_path / "ck")
    assert torch.equal(back["model"]["a.lora_A.weight"], state["model"]["a.lora_A.weight"])
    assert back["model"]["a.lora_A.weight"].dtype == torch.float64
    assert torch.equal(
        back["optim"]["state"]["a.lora_A.weight"]["exp_avg"], state["optim"]["state"]["a.lora_A.weight"]["exp_avg"]
    )
    assert back["optim"]["state"]["b"] == {}
    assert back["optim"]["param_groups"] == [
        {"lr": 1e-3, "betas": [0.9, 0.999], "foreach": None, "params": ["a.lora_A.weight"]}
    ]
    for name in (TENSORS, OTHERS):
        assert (tmp_path / "ck" / name).read_bytes()[:1] != b"\x80"  # not a pickle stream


def test_state_that_json_cannot_hold_fails_at_save_not_at_resume(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        write_state(tmp_path / "ck", {"optim": {"param_groups": [{"lr": object()}]}})
    with pytest.raises(ValueError):
        write_state(tmp_path / "ck", {"optim": {"param_groups": [{"lr": math.nan}]}})
    assert not (tmp_path / "ck").exists()  # nothing half-written under the final name
