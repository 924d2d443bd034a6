"""GRPO-Guard (``learner.objective: grpo_guard``): the loss and its gradient against a float64 reference written from
the formula ``r̂ = exp(mean_D(ε · Δμ))``, the sign of its update, its limit at θ = prox, golden numbers of learner
steps on the float64 tiny FLUX-Kontext, and the config checks.

The recorded values change only when the math changes; update them deliberately: ``python -m
tests.unit.learner.test_grpo_guard`` prints the values of this machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from editrl.common.config import ConfigError, parse_config
from editrl.learner.objectives.flow_grpo import decoupled_loss
from editrl.learner.objectives.grpo_guard import guard_loss, normalized_log_ratio

F64 = torch.float64
DT = -0.2  # sigma_next - sigma of the step under test


def gauss_log_prob(x: torch.Tensor, mu: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """[B, 1]: the mean over elements of log N(x; mu, s^2), as the flow step reduces it."""
    lp = -((x - mu) ** 2) / (2 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).mean(dim=1, keepdim=True)


def step_case(seed: int, b: int = 6, shape: tuple[int, ...] = (3, 4)) -> dict[str, torch.Tensor]:
    """One SDE step of B samples drawn by a behaviour policy, a proximal and a current policy near it (float64)."""
    g = torch.Generator().manual_seed(seed)

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=g, dtype=F64)

    s = torch.full((b, 1, 1), 0.3, dtype=F64)  # transition std
    mu_behave = randn(b, *shape)
    x = mu_behave + s * randn(b, *shape)  # the stored next latent
    mu_prox = mu_behave + 0.05 * randn(b, *shape)
    mu_theta = mu_prox + 0.03 * randn(b, *shape)
    return {"s": s, "x": x, "mu_behave": mu_behave, "mu_prox": mu_prox, "mu_theta": mu_theta, "adv": randn(b)}


def reference_loss(c: dict[str, torch.Tensor], mu_theta: torch.Tensor, clip: float, cap: float, mode: str,
                   mask: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The module docstring's loss from its closed form: ``log r̂ = mean_D(ε Δμ)`` with ``ε = (x - μ_prox) / s``,
    ``w = exp(prox - behave)`` capped, ``δ mean(w · max(-A r̂, -A clip(r̂)))`` over counted units, ``δ = 1 / |dt|``."""
    eps = (c["x"] - c["mu_prox"]) / c["s"]
    r = torch.exp((eps * (mu_theta - c["mu_prox"])).flatten(1).mean(dim=1))  # [B]
    a = c["adv"]
    surrogate = torch.maximum(-a * r, -a * torch.clamp(r, 1 - clip, 1 + clip))
    w = torch.exp(gauss_log_prob(c["x"], c["mu_prox"], c["s"]) - gauss_log_prob(c["x"], c["mu_behave"], c["s"]))[:, 0]
    w = torch.clamp(w, max=cap) if mode == "truncate" else torch.where(w > cap, torch.zeros_like(w), w)
    m = mask[:, 0]
    return (surrogate * w * m).sum() / m.sum() / abs(DT)


@pytest.mark.parametrize("mode", ["truncate", "mask"])
def test_loss_and_gradient_match_the_closed_form_in_float64(mode: str) -> None:
    c = step_case(0)
    clip, cap = 0.01, 1.02
    mask = torch.ones(6, 1, dtype=F64)
    mask[2] = 0.0
    mu = c["mu_theta"].clone().requires_grad_(True)
    lp, prox, behave = (gauss_log_prob(c["x"], m, c["s"]) for m in (mu, c["mu_prox"], c["mu_behave"]))
    loss, stats = guard_loss(lp, prox, behave, c["adv"], mu, c["mu_prox"], c["s"], DT, clip_low=clip,
                             clip_high=clip, iw_cap=cap, iw_mode=mode, mask=mask)  # fmt: skip
    loss.backward()
    mu_ref = c["mu_theta"].clone().requires_grad_(True)
    ref = reference_loss(c, mu_ref, clip, cap, mode, mask)
    ref.backward()
    assert 0 < float(stats["clip_frac"]) < 1 and 0 < float(stats["iw_capped_frac"]) < 1  # both branches act
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    assert mu.grad is not None and mu_ref.grad is not None and bool(mu_ref.grad.abs().sum() > 0)
    torch.testing.assert_close(mu.grad, mu_ref.grad, rtol=1e-10, atol=1e-15)


def test_a_positive_advantage_raises_the_log_prob_of_the_sampled_step() -> None:
    """A toy Gaussian policy (a mean offset per sample): one SGD step on the loss moves each sample's log-prob of its
    stored step up for A > 0 and down for A < 0."""
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 8, generator=g, dtype=F64)
    theta = torch.zeros(2, 8, dtype=F64, requires_grad=True)
    s = torch.full((2, 1), 0.2, dtype=F64)
    x_next = (0.9 * x0 + s * torch.randn(2, 8, generator=g, dtype=F64)).detach()

    def log_prob() -> tuple[torch.Tensor, torch.Tensor]:
        mean = 0.9 * x0 + theta
        return gauss_log_prob(x_next, mean, s), mean

    before, mean = log_prob()
    loss, _ = guard_loss(before, before, before, torch.tensor([1.0, -1.0], dtype=F64), mean, mean, s, DT,
                         clip_low=1e-3, clip_high=1e-3)  # fmt: skip
    loss.backward()
    with torch.no_grad():
        theta -= 0.05 * theta.grad
        after, _ = log_prob()
    assert after[0, 0] > before[0, 0] and after[1, 0] < before[1, 0]


def test_at_theta_equal_prox_the_ratio_is_exactly_one() -> None:
    """θ = prox: ``r̂ = 1`` bit for bit, the loss is ``-δ mean(A w')`` (flow_grpo's value times δ), and its gradient is
    ``s δ`` times flow_grpo's."""
    c = step_case(2)
    mu = c["mu_prox"].clone().requires_grad_(True)
    lp = gauss_log_prob(c["x"], mu, c["s"])
    behave = gauss_log_prob(c["x"], c["mu_behave"], c["s"])  # stale: w != 1
    log_r = normalized_log_ratio(lp, lp.detach(), mu, mu.detach(), c["s"])
    assert torch.equal(torch.exp(log_r), torch.ones_like(log_r))
    kwargs: dict[str, Any] = {"clip_low": 1e-3, "clip_high": 1e-3, "iw_cap": 1.5}
    loss, stats = guard_loss(lp, lp.detach(), behave, c["adv"], mu, mu.detach(), c["s"], DT, **kwargs)
    assert float(stats["ratio_dev_max"]) == 0.0 and float(stats["clip_frac"]) == 0.0
    (guard_grad,) = torch.autograd.grad(loss, mu, retain_graph=True)  # lp's graph is flow_grpo's too
    plain, _ = decoupled_loss(lp, lp.detach(), behave, c["adv"], **kwargs)
    (plain_grad,) = torch.autograd.grad(plain, mu)
    assert float(loss.detach()) == float(plain.detach()) / abs(DT)
    w = torch.clamp(torch.exp(lp - behave)[:, 0], max=1.5).detach()
    assert float(loss.detach()) == pytest.approx(float(-(c["adv"] * w).mean()) / abs(DT), rel=1e-13)
    torch.testing.assert_close(guard_grad, plain_grad * 0.3 / abs(DT), rtol=1e-12, atol=0)


def test_the_reference_kl_is_added_once_and_not_reweighted() -> None:
    """``kl_coef > 0`` adds flow_grpo's k3 of the log-probs, ``kl_coef · mean(exp(ref - θ) - (ref - θ) - 1)``, outside
    the 1/|dt| weight of the policy term."""
    c = step_case(3)
    lp, prox, behave, ref = (gauss_log_prob(c["x"], c[k], c["s"]) for k in ("mu_theta", "mu_prox", "mu_behave", "x"))
    args = (lp, prox, behave, c["adv"], c["mu_theta"], c["mu_prox"], c["s"], DT)
    without, _ = guard_loss(*args, clip_low=0.01, clip_high=0.01, ref_log_prob=ref)
    with_kl, stats = guard_loss(*args, clip_low=0.01, clip_high=0.01, ref_log_prob=ref, kl_coef=0.1)
    d = ref - lp
    k3 = float((torch.exp(d) - d - 1).mean())
    assert float(stats["kl_ref"]) == pytest.approx(k3, rel=1e-12)
    assert float(with_kl - without) == pytest.approx(0.1 * k3, rel=1e-9)


# -- golden numbers: learner steps on the float64 tiny FLUX-Kontext ------------------------------------------------

# step -> {stat: value}, recorded on this project's CPU machine (torch 2.13.0 cpu, float64), as test_golden's. "hook":
# the stats of grpo_guard's own prox pass (``proximal``, taken before step 1) used after step 2, as the Updater would
# with several minibatches: the weights moved, so r̂ != 1 and the clip acts.
GOLDEN: dict[str, dict[str, float]] = {
    "step1": {
        "learner/loss": 3.0811704730638156e-08,
        "learner/grad_norm": 0.027769585250426335,
        "learner/behave_dev_max": 0.0,
        "learner/ratio_dev_max": 0.0,
    },
    "step2": {
        "learner/loss": -0.0026926710301984173,
        "learner/grad_norm": 0.027610468395523738,
        "learner/iw_mean": 1.0001342359099261,
        "learner/mismatch_kl": 3.069718628271693e-07,
        "learner/approx_kl": 0.0,
    },
    "hook": {
        "loss": -0.0028746609839273942,
        "ratio_dev_max": 0.0019909706715868225,
        "clip_frac": 0.29166666666666663,
        "approx_kl": 1.5148281850335882e-06,
        "iw_mean": 1.0,
    },
}
REL, ABS = 1e-9, 1e-15  # test_golden's tolerance (its measured spread between CPU kernels: 2.3e-11 relative)
REWARDS = [np.array([1.0, 4.0, 2.0, 8.0], np.float32), np.array([3.0, 3.5, 0.5, 1.0], np.float32)]
LEARNER = {"objective": "grpo_guard", "minibatches": 1, "lr": 3e-3, "clip_range": 1e-3, "iw_cap": 1.5}
RECORDED = {
    "step1": ("learner/loss", "learner/grad_norm", "learner/behave_dev_max", "learner/ratio_dev_max"),
    "step2": ("learner/loss", "learner/grad_norm", "learner/iw_mean", "learner/mismatch_kl", "learner/approx_kl"),
    "hook": ("loss", "ratio_dev_max", "clip_frac", "approx_kl", "iw_mean"),
}


def run_guard(model_dir: Path, learner: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Two float64 groups, two learner steps (the second on groups one version stale), then the hook's stats."""
    import torch.distributed as dist

    from editrl.common.families.base import load_policy
    from editrl.learner import update
    from editrl.learner.engines import FSDP2Engine, is_lora_key
    from editrl.learner.loss import group_advantages

    from ...integration.conftest import free_port
    from .one_rank import float64_setup

    cfg, groups = float64_setup(model_dir, {**LEARNER, **learner})
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        policy = load_policy(cfg.policy, with_pipeline=False)
        for name, p in policy.trainable_module().named_parameters():
            p.requires_grad_(is_lora_key(name))
        engine = FSDP2Engine(policy.trainable_module(), policy.shard_units(), cfg.learner.lr, cfg.learner.weight_decay)
        up = update.Updater(cfg, policy, engine)
        hook = [up.objective.proximal(up, g) for g in groups]  # the start weights' log-probs and means
        got = {"step1": up.train_step(groups, REWARDS, version=0), "step2": up.train_step(groups, REWARDS, version=1)}
        n_units = sum(g.log_probs.shape[1] for g in groups)
        per_group = [up.group_loss(g, group_advantages(torch.from_numpy(r)), n_units, h, None)
                     for g, r, h in zip(groups, REWARDS, hook, strict=True)]  # fmt: skip
        got["hook"] = {k: float(np.mean([s[k] for s in per_group])) for k in RECORDED["hook"]}
    finally:
        dist.destroy_process_group()
    return {name: {key: got[name][key] for key in keys if key in got[name]} for name, keys in RECORDED.items()}


def mismatches(got: dict[str, dict[str, float]], expected: dict[str, dict[str, float]]) -> list[str]:
    return [
        f"{name} {key}: got {got[name].get(key)!r}, recorded {value!r}"
        for name, stats in expected.items()
        for key, value in stats.items()
        if key not in got[name] or not abs(got[name][key] - value) <= REL * abs(value) + ABS
    ]


def test_learner_steps_match_recorded_values(tiny_model_f64_dir: Path) -> None:
    got = run_guard(tiny_model_f64_dir, {})
    assert not mismatches(got, GOLDEN)
    assert got["step1"]["learner/ratio_dev_max"] == 0.0 and got["step1"]["learner/behave_dev_max"] == 0.0
    assert got["step2"]["learner/iw_mean"] != 1.0  # stale groups: prox/behave moved
    assert 0 < got["hook"]["clip_frac"] < 1 and got["hook"]["ratio_dev_max"] > LEARNER["clip_range"]
    # the other proximal sources give the same steps: step 1 bypassed (prox = behave, every group fresh), step 2 a
    # separate prox pass (a log-prob tensor; the means from the objective's own pass)
    other = run_guard(tiny_model_f64_dir, {"prox_bypass": True, "prox_recompute": True})
    assert other["step2"] == got["step2"] and other["hook"] == got["hook"]
    assert {k: other["step1"][k] for k in ("learner/loss", "learner/grad_norm")} == {
        k: got["step1"][k] for k in ("learner/loss", "learner/grad_norm")
    }


# -- config ---------------------------------------------------------------------------------------------------------

BASE = {"policy": {"model": "/m"}, "data": {"tasks": "/t.jsonl"}}
GUARD = {"objective": "grpo_guard", "minibatches": 1}


@pytest.mark.parametrize(
    "policy, learner, reason",
    [
        ({"family": "ddim"}, GUARD, "trains ('flow',) editors"),
        ({"family": "ar"}, GUARD, "trains ('flow',) editors"),
        ({"sampler": {"sde_type": "cps"}}, GUARD, "not ('cps', True)"),
        ({}, {**GUARD, "decoupled": False}, "not ('sde', False)"),
    ],
)
def test_config_refuses_what_grpo_guard_cannot_train(policy: dict, learner: dict, reason: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config({**BASE, "policy": {"model": "/m", **policy}, "learner": learner})
    assert str(exc.value).startswith("learner.objective") and reason in str(exc.value)


def test_config_accepts_grpo_guard_on_the_flow_sde_sampler() -> None:
    assert parse_config({**BASE, "learner": GUARD}).learner.objective == "grpo_guard"
    assert parse_config({**BASE, "learner": {"objective": "grpo_guard"}}).learner.minibatches == 2  # the default


def test_with_two_minibatches_the_updater_takes_the_start_weights_means(tiny_model_f64_dir: Path) -> None:
    """minibatches: 2 (the default): the Updater takes grpo_guard's own prox pass (log-probs and means at the start
    weights) for every group, so the second minibatch, after the first one moved the weights, has r̂ != 1 and the
    clip can act; the first minibatch's ratio is still exactly 1 (θ = prox there)."""
    got = run_guard(tiny_model_f64_dir, {"minibatches": 2})
    assert 0.0 < got["step1"]["learner/ratio_dev_max"] < 0.1
    assert got["step1"]["learner/behave_dev_max"] == 0.0  # fresh groups: the start weights are the actor's


if __name__ == "__main__":  # print the values to record: python -m tests.unit.learner.test_grpo_guard
    import tempfile

    from editrl.common.families.tiny.flux_kontext import build_tiny_flux_kontext

    with tempfile.TemporaryDirectory() as tmp:
        model = build_tiny_flux_kontext(Path(tmp) / "tiny_f64", seed=0, dtype="float64")
        print(json.dumps(run_guard(model, {}), indent=1))
