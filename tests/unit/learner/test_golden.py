"""Golden numbers: the tiny FLUX-Kontext policy, fixed seeds, two learner updates (FSDP2, one gloo rank) on the same
two groups -- the second one on groups one version stale, so the decoupled objective's prox recompute, importance
weights and (with two minibatches) the clip all act.

Everything on the recorded path runs in float64 (``policy.dtype: float64``): the tiny checkpoint is initialised and
saved in float64, the actor samples in float64 (noise, latents, behaviour log-probs), the groups cross the wire as
float64 and the update runs in float64. float32 results depend on the CPU (torch picks DEFAULT/AVX2/AVX512/NEON
kernels at run time, and even ``torch.randn`` differs between them in the last bit), and a step-2 loss that is a small
difference of larger terms turns last-bit differences into the 5th significant digit. In float64 the same
differences sit ~9 orders of magnitude below the tolerance, which is itself far below what a real change moves:
``test_the_check_fails_on_a_tiny_change`` shows a loss scaled by (1 + 2^-20) and a clip range moved by 1e-6 both
fail it. ``test_recorded_values_hold_on_other_cpu_kernels`` reruns the scenario with torch's kernels forced to
another instruction set (``ATEN_CPU_CAPABILITY``, MKL, oneDNN), as another CPU would pick them.

The recorded values change only when the math changes; update them deliberately: ``python -m
tests.unit.learner.test_golden`` prints the values of this machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# scenario -> step -> {stat: value}, recorded on this project's CPU machine (torch 2.13.0 cpu, float64); the separate
# prox pass has the θ forward's values (exactly: test_prox_from_the_forward_equals_a_separate_pass_exactly)
GOLDEN: dict[str, dict[int, dict[str, float]]] = {
    "prox-from-forward": {
        1: {
            "learner/loss": 6.51925802230835e-09,
            "learner/grad_norm": 0.011996798159967353,
            "learner/behave_dev_max": 0.0,
            "learner/ratio_dev_max": 0.0,
            "learner/clip_frac": 0.0,
        },
        2: {
            "learner/loss": -0.0006664235032826232,
            "learner/grad_norm": 0.011924962329365588,
            "learner/iw_mean": 1.0000422586968107,
            "learner/mismatch_kl": 4.089689770540398e-07,
            "learner/ratio_dev_max": 0.0,
            "learner/clip_frac": 0.0,
            "learner/approx_kl": 0.0,
        },
    },
    "two-minibatches-clipped": {
        1: {
            "learner/loss": 2.92943664621792e-05,
            "learner/grad_norm": 0.011859819051142594,
            "learner/behave_dev_max": 0.0,
            "learner/ratio_dev_max": 0.0005235189701515708,
            "learner/clip_frac": 0.5,
        },
        2: {
            "learner/loss": -0.0007964583763424663,
            "learner/grad_norm": 0.01271864358992897,
            "learner/iw_mean": 1.00000450831253,
            "learner/mismatch_kl": 9.839645527346765e-07,
            "learner/ratio_dev_max": 0.0005488268180015021,
            "learner/clip_frac": 0.5,
            "learner/approx_kl": 1.1523082209808884e-08,
        },
    },
}
GOLDEN["prox-separate-pass"] = GOLDEN["prox-from-forward"]
# |got - recorded| <= REL * |recorded| + ABS. Measured spread between torch's DEFAULT, AVX2 and AVX512 kernels (with
# MKL/oneDNN forced to SSE4.2/AVX2, or MKL_CBWR=COMPATIBLE): 2.3e-11 relative at most (the k3 KLs, exp(d) - d - 1 of
# d ~ 1e-3). A loss scaled by (1 + 2^-20) moves by 9.5e-7 relative: REL sits ~40x above the one, ~1000x below the other.
REL, ABS = 1e-9, 1e-15
REWARDS = [np.array([1.0, 4.0, 2.0, 8.0], np.float32), np.array([3.0, 3.5, 0.5, 1.0], np.float32)]
# scenario -> learner settings: one optimizer step per learner step (prox = the θ forward's value, or a separate
# no-grad pass: the two must give the same numbers), or two minibatches with a clip range the second one crosses
SCENARIOS: dict[str, dict[str, Any]] = {
    "prox-from-forward": {"minibatches": 1},
    "prox-separate-pass": {"minibatches": 1, "prox_recompute": True},
    "two-minibatches-clipped": {"minibatches": 2, "clip_range": 2e-5},
}
RECORDED_KEYS = {
    1: ("learner/loss", "learner/grad_norm", "learner/behave_dev_max", "learner/ratio_dev_max", "learner/clip_frac"),
    2: ("learner/loss", "learner/grad_norm", "learner/iw_mean", "learner/mismatch_kl", "learner/ratio_dev_max",
        "learner/clip_frac", "learner/approx_kl"),
}  # fmt: skip


def run_scenario(model_dir: Path, learner: dict[str, Any]) -> dict[int, dict[str, float]]:
    """Sample the two groups in float64 and take the two learner steps; the recorded stats of each step."""
    import torch
    import torch.distributed as dist

    from editrl.common.families.base import load_policy
    from editrl.learner import update
    from editrl.learner.engines import FSDP2Engine, is_lora_key

    from ...integration.conftest import free_port
    from .one_rank import float64_setup

    cfg, groups = float64_setup(model_dir, {"lr": 3e-3, "clip_range": 1e-3, "iw_cap": 1.5, **learner})
    assert all(g.log_probs.dtype == np.float64 and g.traj["latents"].dtype == np.float64 for g in groups)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        policy = load_policy(cfg.policy, with_pipeline=False)
        for name, p in policy.trainable_module().named_parameters():
            p.requires_grad_(is_lora_key(name))
        module = policy.trainable_module()
        engine = FSDP2Engine(module, policy.shard_units(), cfg.learner.lr, cfg.learner.weight_decay)
        assert all(p.dtype == torch.float64 for p in engine.params)
        updater = update.Updater(cfg, policy, engine)
        got = {1: updater.train_step(groups, REWARDS, version=0), 2: updater.train_step(groups, REWARDS, version=1)}
    finally:
        dist.destroy_process_group()
    assert got[2]["learner/staleness_1"] == 2.0
    assert got[1]["learner/behave_dev_max"] == 0.0  # prox at the start of step 1 equals behave exactly
    assert got[1]["learner/logp_mismatch_max"] == 0.0  # ... bit for bit: measured on fresh (version-0) groups
    assert "learner/logp_mismatch_max" not in got[2]  # step 2's groups are a version old: not measured, absent
    return {step: {key: got[step][key] for key in RECORDED_KEYS[step]} for step in got}


def mismatches(got: dict[int, dict[str, float]], expected: dict[int, dict[str, float]]) -> list[str]:
    """Every recorded stat that ``got`` does not reproduce within REL/ABS, with both values."""
    return [
        f"step {step} {key}: got {got[step][key]!r}, recorded {value!r}"
        for step, stats in expected.items()
        for key, value in stats.items()
        if not abs(got[step][key] - value) <= REL * abs(value) + ABS
    ]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_learner_steps_match_recorded_values(tiny_model_f64_dir: Path, scenario: str) -> None:
    got = run_scenario(tiny_model_f64_dir, SCENARIOS[scenario])
    assert not mismatches(got, GOLDEN[scenario])
    if scenario == "two-minibatches-clipped":  # the clip acts on the second minibatch, on some units but not all
        assert 0 < got[2]["learner/clip_frac"] < 1 and got[2]["learner/ratio_dev_max"] > 2e-5
    else:  # one optimizer step per learner step: θ/prox is exactly 1
        assert got[1]["learner/ratio_dev_max"] == 0.0 and got[2]["learner/ratio_dev_max"] == 0.0
    assert got[2]["learner/iw_mean"] != 1.0  # stale groups: prox/behave moved


def test_prox_from_the_forward_equals_a_separate_pass_exactly(tiny_model_f64_dir: Path) -> None:
    """With one optimizer step per learner step, the θ forward's detached log-probs are the proximal ones: every stat
    of a separate no-grad prox pass is the same number, bit for bit."""
    forward = run_scenario(tiny_model_f64_dir, SCENARIOS["prox-from-forward"])
    assert run_scenario(tiny_model_f64_dir, SCENARIOS["prox-separate-pass"]) == forward


def test_the_check_fails_on_a_tiny_change(tiny_model_f64_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss scaled by (1 + 2^-20), or a clip range moved by 1e-6, no longer matches the recorded values."""
    from editrl.learner.objectives import flow_grpo

    scenario, objective = "two-minibatches-clipped", flow_grpo.decoupled_loss

    def scaled_loss(*args: Any, **kwargs: Any) -> Any:
        loss, stats = objective(*args, **kwargs)
        return loss * (1.0 + 2.0**-20), stats

    with monkeypatch.context() as patch:
        patch.setattr(flow_grpo, "decoupled_loss", scaled_loss)
        scaled = run_scenario(tiny_model_f64_dir, SCENARIOS[scenario])
    assert any("learner/loss" in m for m in mismatches(scaled, GOLDEN[scenario]))
    moved = {**SCENARIOS[scenario], "clip_range": SCENARIOS[scenario]["clip_range"] + 1e-6}
    assert mismatches(run_scenario(tiny_model_f64_dir, moved), GOLDEN[scenario])


# torch's dispatch picks these per CPU; forcing them here runs other kernels than this machine's default
OTHER_KERNELS = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ONEDNN_MAX_CPU_ISA": "SSE41"}


def test_recorded_values_hold_on_other_cpu_kernels(tiny_model_f64_dir: Path) -> None:
    """The same scenario in a process whose ATen, MKL and oneDNN kernels are the plain (non-AVX) ones -- what a CPU
    without this machine's vector units computes; float32 ``torch.randn`` alone differs there."""
    env = {**os.environ, **OTHER_KERNELS, "OMP_NUM_THREADS": "1"}
    code = (
        "import json, sys; from pathlib import Path; import torch; "
        "from tests.unit.learner.test_golden import SCENARIOS, run_scenario; "
        "print(torch.backends.cpu.get_cpu_capability()); "
        "print(json.dumps(run_scenario(Path(sys.argv[1]), SCENARIOS['two-minibatches-clipped'])))"
    )
    root = Path(__file__).resolve().parents[3]
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_model_f64_dir)], env=env, cwd=root, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    capability, values = out.stdout.strip().splitlines()[-2:]
    assert capability == "DEFAULT"
    got = {int(step): stats for step, stats in json.loads(values).items()}
    assert not mismatches(got, GOLDEN["two-minibatches-clipped"])


if __name__ == "__main__":  # print the values to record: python -m tests.unit.learner.test_golden
    import tempfile

    from editrl.common.families.tiny.flux_kontext import build_tiny_flux_kontext

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_flux_kontext(Path(tmp) / "tiny_f64", seed=0, dtype="float64")
        print(json.dumps({name: run_scenario(model, learner) for name, learner in SCENARIOS.items()}, indent=1))
